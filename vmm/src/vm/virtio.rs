//! The VM's virtio devices: its disks and network interfaces opened from
//! the configuration, each behind a virtio-mmio transport at its slot, and
//! what `status`, `backup` and a migration keep of them.

use std::sync::{Arc, Mutex};

use devices::virtio::{
    Block, BlockConfig, GuestMemoryHandle, Interrupt, MmioTransport, Net, NetConfig, RingWatch,
};

use super::VmmError;
use crate::config::{VmConfig, MODULES_DISK_SERIAL};
use crate::machine::VirtioSlot;
use crate::runtime::Subscriber;

/// A network interface as `status` shows it.
pub struct NetSource {
    /// The device, for a migration (its datapath, its announcement).
    pub device: Arc<Mutex<Net>>,
    pub tap: String,
    pub mac: [u8; 6],
    pub counters: Arc<devices::virtio::net::NetCounters>,
    /// Its running rings, for their indices (`status`).
    pub rings: RingWatch,
    /// Its INTERRUPT_STATUS, readable without the transport's lock.
    pub interrupt: Interrupt,
}

/// A disk as `status` shows it.
pub struct DiskSource {
    pub id: String,
    /// The operator's `id=` for it, if any (`backup` takes either name).
    pub name: Option<String>,
    /// Where `backup` hands the device its request.
    pub backup: devices::virtio::BackupInbox,
    /// The image's lock, which a migration hands over.
    pub image: devices::virtio::ImageLock,
    /// What a migration with `"disks":"copy"` reads the disk through.
    pub copy: devices::virtio::CopySource,
    pub path: std::path::PathBuf,
    pub read_only: bool,
    pub engine: &'static str,
    /// Its `poll_us` (0: the disk's thread does not poll), which
    /// `set-disk` changes while it runs.
    pub poll: devices::virtio::PollControl,
    /// Its limits (`iops`, `mib_s`), which `set-disk` changes while it runs.
    pub limits: devices::virtio::ThrottleControl,
    pub counters: Arc<devices::virtio::BlockCounters>,
    /// Its running rings, for their indices (`status`).
    pub rings: RingWatch,
    /// Its INTERRUPT_STATUS, readable without the transport's lock.
    pub interrupt: Interrupt,
}

/// The virtio devices: their MMIO slots, the network interfaces'
/// subscribers and the disks' (each for an I/O thread of its own, named).
pub(super) type VirtioSet = (
    Vec<VirtioSlot>,
    Vec<(String, Subscriber)>,
    Vec<(String, Subscriber)>,
    Vec<DiskSource>,
    Vec<NetSource>,
);

/// Opens the disks and TAPs (start-up errors are clear and final) and puts
/// each behind a virtio-mmio transport at its slot.
pub(super) fn create_virtio(
    config: &VmConfig,
    mem: &GuestMemoryHandle,
) -> Result<VirtioSet, VmmError> {
    let mut slots = Vec::new();
    let mut disks: Vec<(String, Subscriber)> = Vec::new();
    let mut sources = Vec::new();
    let mut add_slot = |dev: Arc<Mutex<dyn devices::virtio::VirtioDevice>>| {
        let (base, gsi) = crate::layout::virtio_mmio_slot(slots.len());
        let t = MmioTransport::new(dev, mem.clone())
            .map_err(|e| VmmError::Setup(format!("virtio transport: {e}")))?;
        let shown = (t.rings(), t.interrupt().clone());
        slots.push(VirtioSlot {
            transport: Arc::new(Mutex::new(t)),
            base,
            gsi,
        });
        Ok::<_, VmmError>(shown)
    };
    for (i, d) in config.disks.iter().enumerate() {
        let blk = open_block(
            config,
            &BlockConfig {
                path: d.path.clone(),
                read_only: d.read_only,
                id: d.id.clone(),
                direct: d.direct,
                engine: d.engine,
                // One unless asked: over virtio-mmio every queue shares the
                // disk's one I/O thread and one interrupt (docs/notes.md).
                queues: d.queues.unwrap_or(1),
                poll: std::time::Duration::from_micros(d.poll_us.into()),
                limits: devices::virtio::IoLimits {
                    iops: d.iops,
                    bytes_per_s: d.mib_s.saturating_mul(1 << 20),
                },
            },
        )
        .map_err(|e| VmmError::Setup(e.to_string()))?;
        let (engine, counters, poll) = (blk.engine_name(), blk.counters(), blk.poll_control());
        let limits = blk.throttle_control();
        let backup = blk.backup_inbox();
        let image = blk
            .image_lock()
            .map_err(|e| VmmError::Setup(format!("{}: {e}", d.path.display())))?;
        let copy = blk
            .copy_source()
            .map_err(|e| VmmError::Setup(format!("{}: {e}", d.path.display())))?;
        let blk = Arc::new(Mutex::new(blk));
        let (rings, interrupt) = add_slot(blk.clone())?;
        sources.push(DiskSource {
            id: format!("disk{i}"),
            name: d.id.clone(),
            backup,
            image,
            copy,
            path: d.path.clone(),
            read_only: d.read_only,
            engine,
            poll,
            limits,
            counters,
            rings,
            interrupt,
        });
        disks.push((format!("disk{i}"), blk));
    }
    // The kernel library's modules (every entry's `/lib/modules/<release>`
    // tree, resources/build-kernels.sh `modules`): a read-only disk after the
    // customer's, which the library's initramfs mounts where the customer's
    // system looks for modules, whichever entry boots.
    if let Some(img) = config.library_modules() {
        let i = disks.len();
        let blk = open_block(
            config,
            &BlockConfig {
                path: img.clone(),
                read_only: true,
                id: Some(MODULES_DISK_SERIAL.into()),
                direct: false,
                engine: devices::virtio::IoEngine::Auto,
                queues: 1,
                poll: Default::default(),
                limits: Default::default(),
            },
        )
        .map_err(|e| VmmError::Setup(format!("the kernel library's modules: {e}")))?;
        let (engine, counters, poll) = (blk.engine_name(), blk.counters(), blk.poll_control());
        let limits = blk.throttle_control();
        let backup = blk.backup_inbox();
        let image = blk
            .image_lock()
            .map_err(|e| VmmError::Setup(format!("{}: {e}", img.display())))?;
        let copy = blk
            .copy_source()
            .map_err(|e| VmmError::Setup(format!("{}: {e}", img.display())))?;
        let blk = Arc::new(Mutex::new(blk));
        let (rings, interrupt) = add_slot(blk.clone())?;
        sources.push(DiskSource {
            id: format!("disk{i}"),
            name: Some(MODULES_DISK_SERIAL.into()),
            backup,
            image,
            copy,
            path: img,
            read_only: true,
            engine,
            poll,
            limits,
            counters,
            rings,
            interrupt,
        });
        disks.push((format!("disk{i}"), blk));
    }
    let mut nets: Vec<(String, Subscriber)> = Vec::new();
    let mut net_sources = Vec::new();
    for (i, n) in config.nets.iter().enumerate() {
        // One queue pair per vCPU unless asked otherwise, as a physical
        // NIC gives each CPU its queue.
        let queues = n
            .queues
            .unwrap_or_else(|| u16::from(config.vcpus).min(devices::virtio::net::MAX_QUEUE_PAIRS));
        let net = Net::new(&NetConfig {
            tap: n.tap.clone(),
            mac: n.mac,
            vhost: n.vhost,
            queues,
            poll_us: n.poll_us,
        })
        .map_err(|e| VmmError::Setup(e.to_string()))?;
        tracing::info!(
            "virtio-net {}: {} datapath, {} queue pair(s)",
            n.tap,
            net.datapath(),
            net.queue_pairs()
        );
        let (mac, counters) = (net.mac(), net.counters());
        let net = Arc::new(Mutex::new(net));
        let (rings, interrupt) = add_slot(net.clone())?;
        net_sources.push(NetSource {
            device: net.clone(),
            tap: n.tap.clone(),
            mac,
            counters,
            rings,
            interrupt,
        });
        nets.push((format!("net{i}"), net));
    }
    Ok((slots, nets, disks, sources, net_sources))
}

impl super::Vm {
    /// The disk a control request names: `disk0`, `disk1`... (as `status`
    /// lists them) or its `id=`.
    pub fn find_disk(&self, disk: &str) -> Result<&DiskSource, protocol::ControlError> {
        self.disks
            .iter()
            .find(|d| d.id == disk || d.name.as_deref() == Some(disk))
            .ok_or_else(|| {
                let names: Vec<&str> = self.disks.iter().map(|d| d.id.as_str()).collect();
                let has = if names.is_empty() {
                    "this VM has no disks".to_string()
                } else {
                    format!("this VM has {}", names.join(", "))
                };
                protocol::ControlError::new(
                    protocol::ErrorCode::NotFound,
                    format!("no disk '{}' ({has})", protocol::truncate_for_message(disk)),
                )
            })
    }
}

/// Opens a disk: locked, except for a migration's target, whose source
/// holds the lock until it lets go of the guest.
fn open_block(config: &VmConfig, cfg: &BlockConfig) -> Result<Block, devices::virtio::BlockError> {
    if config.incoming.is_some() {
        Block::new_unlocked(cfg)
    } else {
        Block::new(cfg)
    }
}
