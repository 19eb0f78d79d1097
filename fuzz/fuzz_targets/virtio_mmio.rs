//! The virtio-mmio transport's register file: arbitrary reads and writes
//! (any offset, any width) with a real device behind it (virtio-blk on a
//! small image, or virtio-net over a socket pair), guest memory that the
//! driver fills as it likes, queue notifications served by the device,
//! resets, and memory coming and going.
//!
//! Checks the register contract in `devices/src/virtio/mmio.rs`: the
//! identification registers read as documented; accesses below 0x100 that
//! are not 4 aligned bytes read as zeros; QueueNumMax is the device's for
//! an existing queue and 0 past the last; only INTERRUPT_STATUS bits 0
//! and 1 are ever set; ConfigGeneration never goes back; the status never
//! has a step without the ones before it, FEATURES_OK only with
//! VERSION_1 and no feature the device did not offer, and the device is
//! running exactly while DRIVER_OK is set.
#![no_main]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use arbitrary::Arbitrary;
use devices::virtio::mmio::{reg, status};
use devices::virtio::{
    Block, BlockConfig, GuestMemoryHandle, MmioTransport, Net, VirtioDevice, VIRTIO_F_VERSION_1,
};
use devices::BusDevice;
use event_manager::{MutEventSubscriber, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_fuzz::net::{recv_all, send, seqpacket_pair, Manager};
use vmm_fuzz::virtio::{guest_memory, Addr};

const REGS: &[u64] = &[
    reg::MAGIC,
    reg::VERSION,
    reg::DEVICE_ID,
    reg::VENDOR_ID,
    reg::DEVICE_FEATURES,
    reg::DEVICE_FEATURES_SEL,
    reg::DRIVER_FEATURES,
    reg::DRIVER_FEATURES_SEL,
    reg::QUEUE_SEL,
    reg::QUEUE_NUM_MAX,
    reg::QUEUE_NUM,
    reg::QUEUE_READY,
    reg::QUEUE_NOTIFY,
    reg::INTERRUPT_STATUS,
    reg::INTERRUPT_ACK,
    reg::STATUS,
    reg::QUEUE_DESC_LOW,
    reg::QUEUE_DESC_HIGH,
    reg::QUEUE_DRIVER_LOW,
    reg::QUEUE_DRIVER_HIGH,
    reg::QUEUE_DEVICE_LOW,
    reg::QUEUE_DEVICE_HIGH,
    reg::SHM_LEN_LOW,
    reg::SHM_LEN_HIGH,
    reg::SHM_BASE_LOW,
    reg::SHM_BASE_HIGH,
    reg::CONFIG_GENERATION,
];

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Value {
    Raw(u32),
    Small(u8),
    /// A status value built from the protocol's bits.
    Status(u8),
    /// The low 32 bits of a guest address (for the queue registers).
    Addr(Addr),
}

impl Value {
    fn get(self) -> u32 {
        match self {
            Value::Raw(v) => v,
            Value::Small(v) => u32::from(v),
            Value::Status(b) => {
                let bits = [
                    status::ACKNOWLEDGE,
                    status::DRIVER,
                    status::FEATURES_OK,
                    status::DRIVER_OK,
                    status::DEVICE_NEEDS_RESET,
                    status::FAILED,
                ];
                bits.iter()
                    .enumerate()
                    .filter(|(i, _)| b & (1 << i) != 0)
                    .fold(0, |acc, (_, bit)| acc | bit)
            }
            Value::Addr(a) => a.get() as u32,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// A known register, 4 aligned bytes.
    Write {
        reg: u8,
        value: Value,
    },
    Read {
        reg: u8,
    },
    /// Anything: offset in the 0x200 window (or past it), any width.
    RawWrite {
        offset: u16,
        data: Vec<u8>,
    },
    RawRead {
        offset: u16,
        len: u8,
    },
    /// The features the device offers, as a driver acks them.
    AckOffered {
        mask: u64,
    },
    Poke {
        addr: Addr,
        bytes: Vec<u8>,
    },
    /// Run the device on its queues (what the ioeventfd would trigger).
    Serve,
    /// A frame arrives for a net device.
    Frame(u16),
    Reset,
    ClearMemory,
    SetMemory,
}

#[derive(Arbitrary, Debug)]
struct Input {
    net: bool,
    /// The VMM's set-up: KVM keeps the used bit's acknowledgements.
    acks_absorbed: bool,
    ops: Vec<Op>,
}

struct Image {
    _file: File,
    path: PathBuf,
}

fn image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("vmm-fuzz-mmio-{}.img", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create the image");
        file.set_len(8 * 512).expect("size the image");
        std::fs::remove_file(&path).expect("unlink the image");
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        Image { _file: file, path }
    })
}

enum Dev {
    Blk(Arc<Mutex<Block>>),
    Net(Arc<Mutex<Net>>, Manager, std::os::fd::OwnedFd),
}

impl Dev {
    fn virtio(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        match self {
            Dev::Blk(b) => b.clone(),
            Dev::Net(n, ..) => n.clone(),
        }
    }

    fn serve(&mut self) {
        match self {
            Dev::Blk(b) => b.lock().unwrap().serve_kick(),
            Dev::Net(_, em, host) => {
                for _ in 0..64 {
                    if em.run_with_timeout(0).unwrap() == 0 {
                        break;
                    }
                }
                let _ = recv_all(host);
            }
        }
    }
}

fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

fuzz_target!(|input: Input| {
    let mut dev = if input.net {
        let (d, host) = seqpacket_pair();
        let net = Arc::new(Mutex::new(Net::with_fd(d, [2, 0, 0, 0, 0, 2])));
        let mut em = Manager::new().unwrap();
        em.add_subscriber(net.clone() as Arc<Mutex<dyn MutEventSubscriber + Send>>);
        Dev::Net(net, em, host)
    } else {
        let blk = Block::new(&BlockConfig {
            path: image().path.clone(),
            read_only: false,
            id: None,
            direct: false,
            engine: devices::virtio::IoEngine::Sync,
            // Two: the transport's multi-queue paths (a queue left not
            // ready is the device's to skip) are fuzzed too.
            queues: 2,
            poll: Default::default(),
            limits: Default::default(),
        })
        .unwrap();
        Dev::Blk(Arc::new(Mutex::new(blk)))
    };
    let virtio = dev.virtio();
    let (id, offered, max_sizes) = {
        let d = virtio.lock().unwrap();
        (
            d.device_type(),
            d.device_features(),
            d.queue_max_sizes().to_vec(),
        )
    };
    let handle = GuestMemoryHandle::new(guest_memory());
    let mem = handle.get().unwrap();
    let mut t = MmioTransport::new(virtio.clone(), handle.clone()).unwrap();
    if input.acks_absorbed {
        t.interrupt().absorb_used_acks();
    }
    // What KVM completes itself where the VMM registers it: the guest's
    // acknowledgement of the used bit alone.
    let kvm_keeps = |offset: u64, data: &[u8]| {
        input.acks_absorbed && offset == reg::INTERRUPT_ACK && data == [1, 0, 0, 0]
    };
    let mut generation = 0u32;
    let mut queue_sel = 0u32;
    for op in input.ops.iter().take(128) {
        match op {
            Op::Write { reg, value } => {
                let offset = REGS[usize::from(*reg) % REGS.len()];
                let v = value.get();
                match offset {
                    reg::QUEUE_SEL => queue_sel = v,
                    // A reset selects queue 0 again.
                    reg::STATUS if v == 0 => queue_sel = 0,
                    _ => {}
                }
                if !kvm_keeps(offset, &v.to_le_bytes()) {
                    t.write(offset, &v.to_le_bytes());
                }
            }
            Op::Read { reg } => {
                let offset = REGS[usize::from(*reg) % REGS.len()];
                let v = read32(&mut t, offset);
                match offset {
                    reg::MAGIC => assert_eq!(v, 0x7472_6976),
                    reg::VERSION => assert_eq!(v, 2),
                    reg::DEVICE_ID => assert_eq!(v, id),
                    reg::VENDOR_ID => assert_eq!(v, 0),
                    reg::QUEUE_NUM_MAX => assert_eq!(
                        v,
                        max_sizes
                            .get(queue_sel as usize)
                            .map_or(0, |&s| u32::from(s))
                    ),
                    _ => {}
                }
            }
            Op::RawWrite { offset, data } => {
                let offset = u64::from(*offset % 0x240);
                let data = &data[..data.len().min(8)];
                if let Ok(b) = <[u8; 4]>::try_from(data) {
                    match (offset, u32::from_le_bytes(b)) {
                        (reg::QUEUE_SEL, v) => queue_sel = v,
                        (reg::STATUS, 0) => queue_sel = 0,
                        _ => {}
                    }
                }
                if !kvm_keeps(offset, data) {
                    t.write(offset, data);
                }
            }
            Op::RawRead { offset, len } => {
                let offset = u64::from(*offset % 0x240);
                let mut buf = vec![0u8; usize::from(*len % 9)];
                t.read(offset, &mut buf);
                if offset < 0x100 && (buf.len() != 4 || offset & 3 != 0) {
                    assert!(buf.iter().all(|&b| b == 0), "odd register read {buf:?}");
                }
            }
            Op::AckOffered { mask } => {
                let f = offered & mask | VIRTIO_F_VERSION_1;
                for (sel, half) in [(0u32, f as u32), (1, (f >> 32) as u32)] {
                    t.write(reg::DRIVER_FEATURES_SEL, &sel.to_le_bytes());
                    t.write(reg::DRIVER_FEATURES, &half.to_le_bytes());
                }
            }
            Op::Poke { addr, bytes } => {
                let _ = mem.write_slice(bytes, GuestAddress(addr.get()));
            }
            Op::Serve => dev.serve(),
            Op::Frame(n) => {
                if let Dev::Net(_, _, host) = &dev {
                    let frame = vec![0x11; 12 + usize::from(*n)];
                    let _ = send(host, &frame);
                }
            }
            Op::Reset => {
                t.reset();
                queue_sel = 0;
            }
            Op::ClearMemory => handle.clear(),
            Op::SetMemory => handle.set(mem.clone()),
        }
        let s = t.status();
        use status::*;
        if s & DRIVER_OK != 0 {
            assert_eq!(
                s & (ACKNOWLEDGE | DRIVER | FEATURES_OK),
                ACKNOWLEDGE | DRIVER | FEATURES_OK,
                "status {s:#x}"
            );
        }
        if s & FEATURES_OK != 0 {
            assert_eq!(
                s & (ACKNOWLEDGE | DRIVER),
                ACKNOWLEDGE | DRIVER,
                "status {s:#x}"
            );
            let acked = t.acked_features();
            assert_ne!(
                acked & VIRTIO_F_VERSION_1,
                0,
                "FEATURES_OK without VERSION_1"
            );
            assert_eq!(acked & !offered, 0, "FEATURES_OK with features not offered");
        }
        if s & DRIVER != 0 {
            assert_ne!(s & ACKNOWLEDGE, 0, "status {s:#x}");
        }
        assert_eq!(
            virtio.lock().unwrap().is_activated(),
            s & DRIVER_OK != 0,
            "device running vs status {s:#x}"
        );
        assert_eq!(t.interrupt().status() & !3, 0);
        let g = t.interrupt().config_generation();
        assert!(g >= generation, "ConfigGeneration went back");
        generation = g;
        // Queue notifications land in the eventfds; the device drains
        // them when served.
    }
    dev.serve();
});
