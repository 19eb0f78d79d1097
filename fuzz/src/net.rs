//! A virtio-net device over a `SOCK_SEQPACKET` socket pair in place of the
//! TAP (the socket keeps frame boundaries as a TAP does; the device's code
//! is the same, only the TUN ioctls are skipped), with its queues set up
//! through the MMIO transport and served by a real `EventManager`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use devices::virtio::mmio::reg;
use devices::virtio::test_utils::{start, write_reg, TestQueue};
use devices::virtio::{GuestMemoryHandle, GuestMemoryMmap, MmioTransport, Net, NetStats};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

use crate::virtio::{fresh_queue, guest_memory, queue_base, queue_size, Alloc};

pub type Manager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

pub const RX: usize = 0;
pub const TX: usize = 1;
pub const QUEUE_MAX: u16 = 256;
const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

/// A nonblocking `SOCK_SEQPACKET` pair: (device end, host end).
pub fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: socketpair returned two fresh descriptors that we now own.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Sends one frame from the host end; false if the socket is full.
pub fn send(fd: &OwnedFd, data: &[u8]) -> bool {
    // SAFETY: `data` is valid for reads of its length.
    let n = unsafe { libc::send(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), 0) };
    n == data.len() as isize
}

/// Every frame waiting on the host end.
pub fn recv_all(fd: &OwnedFd) -> Vec<Vec<u8>> {
    thread_local! {
        // One receive buffer for every call (allocating it per input costs
        // more than the device's work), larger than any datagram the
        // socket takes.
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 1 << 21]);
    }
    BUF.with_borrow_mut(|buf| recv_into(fd, buf))
}

fn recv_into(fd: &OwnedFd, buf: &mut [u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            return out;
        }
        let n = n as usize;
        assert!(n <= buf.len(), "a frame of {n} bytes");
        out.push(buf[..n].to_vec());
    }
}

pub struct NetHarness {
    pub net: Arc<Mutex<Net>>,
    pub t: MmioTransport,
    pub mem: Arc<GuestMemoryMmap>,
    pub em: Manager,
    pub host: OwnedFd,
    pub rxq: TestQueue,
    pub txq: TestQueue,
    pub alloc: Alloc,
}

/// `net` on its transport over fresh guest memory, registered with an
/// event manager of its own.
pub fn served(
    net: Net,
) -> (
    Arc<Mutex<Net>>,
    MmioTransport,
    Arc<GuestMemoryMmap>,
    Manager,
) {
    let net = Arc::new(Mutex::new(net));
    let handle = GuestMemoryHandle::new(guest_memory());
    let mem = handle.get().expect("memory");
    let t = MmioTransport::new(net.clone(), handle).expect("transport");
    let mut em = Manager::new().expect("event manager");
    em.add_subscriber(net.clone());
    (net, t, mem, em)
}

/// Runs the event loop until it is idle (bounded: a device that keeps
/// re-arming itself forever would be a bug of its own).
pub fn settle(em: &mut Manager) {
    for _ in 0..64 {
        if em.run_with_timeout(0).expect("event loop") == 0 {
            return;
        }
    }
    panic!("the event loop never went idle");
}

impl NetHarness {
    pub fn new(features: u64, rx_size: u8, tx_size: u8) -> Self {
        let (dev, host) = seqpacket_pair();
        let (net, t, mem, em) = served(Net::with_fd(dev, MAC));
        let mut h = Self {
            net,
            t,
            mem,
            em,
            host,
            rxq: TestQueue::new(queue_base(RX), 1),
            txq: TestQueue::new(queue_base(TX), 1),
            alloc: Alloc::default(),
        };
        h.restart(features, rx_size, tx_size);
        h
    }

    /// Resets the device (Status 0) and drives it to DRIVER_OK again with
    /// fresh queues. Returns the status read back. Activation kicks both
    /// queues: the caller runs the event loop (`settle`) when it is ready
    /// to check what that serves.
    pub fn restart(&mut self, features: u64, rx_size: u8, tx_size: u8) -> u32 {
        write_reg(&mut self.t, reg::STATUS, 0);
        self.rxq = fresh_queue(&self.mem, RX, queue_size(rx_size, QUEUE_MAX));
        self.txq = fresh_queue(&self.mem, TX, queue_size(tx_size, QUEUE_MAX));
        start(&mut self.t, features, &[&self.rxq, &self.txq])
    }

    pub fn notify(&mut self, queue: usize) {
        write_reg(&mut self.t, reg::QUEUE_NOTIFY, queue as u32);
    }

    pub fn settle(&mut self) {
        settle(&mut self.em);
    }

    pub fn stats(&self) -> NetStats {
        self.net.lock().unwrap_or_else(|e| e.into_inner()).stats()
    }

    pub fn active(&self) -> bool {
        use devices::virtio::VirtioDevice;
        self.net
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_activated()
    }

    pub fn queues(&self) -> [(u64, u16); 2] {
        [
            (self.rxq.desc, self.rxq.size),
            (self.txq.desc, self.txq.size),
        ]
    }
}
