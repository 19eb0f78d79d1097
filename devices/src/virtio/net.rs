//! virtio-net over a TAP device.
//!
//! Queues: 0 = RX, 1 = TX. The TAP carries a 12-byte `virtio_net_hdr_v1`
//! in front of every frame (`IFF_VNET_HDR`, `TUNSETVNETHDRSZ`), so the
//! guest's checksum/GSO metadata passes through untouched and frames move
//! between the TAP and guest memory with `readv`/`writev` and no copy.
//!
//! Offloads: the device offers CSUM, GUEST_CSUM, HOST/GUEST_TSO4/6,
//! HOST/GUEST_ECN and MRG_RXBUF; at activation the TAP is told (via
//! `TUNSETOFFLOAD`) to hand us only what the guest accepted.
//!
//! RX: with MRG_RXBUF a frame may fill several chains (`num_buffers` in the
//! header says how many). When the chains at hand can hold a maximal frame
//! (64 KiB + headers) the frame is read straight into them; otherwise it is
//! read into a bounce buffer and copied once enough chains are there, so a
//! guest that posts few buffers still gets every frame. Without MRG_RXBUF
//! each frame goes into one chain.
//!
//! When the guest has no RX buffers the TAP is taken out of the event loop
//! (frames wait in the TAP's queue) and RX queue notifications are turned
//! on; the guest's next RX notification puts it back. Nothing spins and
//! nothing is read that cannot be delivered.
//!
//! A wake-up moves at most a queue's worth (the queue size) of frames
//! each way: a flood from the TAP into a guest that refills its ring as
//! fast, or a guest that refills its TX ring as fast, would otherwise keep
//! the event loop here for good. RX then yields with the TAP still polled
//! (epoll reports it again after the other ready events); TX kicks its own
//! queue eventfd.
//!
//! vhost-net (`vhost=auto|on|off`, [`vhost`]): where `/dev/vhost-net` can
//! be opened the host kernel moves the frames instead of this file; the
//! device, its features and activation stay here, and the event loop only
//! relays the kernel's used-buffer signals as interrupts.
//!
//! MAC: the configured one, else one derived from the TAP name with
//! FNV-1a (locally administered, unicast): stable across restarts of the
//! same VM on the same TAP, different for different TAP names.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use self::vhost::{VhostMode, VhostPath};
use super::iov::{parse_chain, push_iovecs, write_segs, Seg, IOV_MAX};
use super::tap::{Tap, VNET_HDR_LEN};
use super::{
    drain_eventfd, new_queue_events, read_config_bytes, ActivateError, GuestMemoryMmap, Interrupt,
    VirtioDevice, COMMON_FEATURES,
};
use crate::state::StateError;

/// virtio device ID of a network device.
pub const VIRTIO_ID_NET: u32 = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];
const RX: usize = 0;
const TX: usize = 1;
/// The largest frame the TAP can hand us: vnet header, Ethernet + VLAN
/// header, 64 KiB of GSO payload.
const MAX_FRAME: usize = VNET_HDR_LEN + 14 + 4 + 65535;
/// Offset of `num_buffers` in the vnet header.
const NUM_BUFFERS_OFFSET: u64 = 10;

pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_MAC: u64 = 1 << 5;
pub const F_GUEST_TSO4: u64 = 1 << 7;
pub const F_GUEST_TSO6: u64 = 1 << 8;
pub const F_GUEST_ECN: u64 = 1 << 9;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_HOST_TSO6: u64 = 1 << 12;
pub const F_HOST_ECN: u64 = 1 << 13;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_STATUS: u64 = 1 << 16;
const S_LINK_UP: u16 = 1;

const OFFERED: u64 = COMMON_FEATURES
    | F_CSUM
    | F_GUEST_CSUM
    | F_MAC
    | F_GUEST_TSO4
    | F_GUEST_TSO6
    | F_GUEST_ECN
    | F_HOST_TSO4
    | F_HOST_TSO6
    | F_HOST_ECN
    | F_MRG_RXBUF
    | F_STATUS;

mod migrate;
mod rx_dirty;
mod state;
pub mod vhost;
pub use migrate::rarp_frame;

/// One `--net`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// TAP interface name (created if absent and we may).
    pub tap: String,
    /// Guest MAC; `None` derives one from the TAP name ([`mac_from_name`]).
    pub mac: Option<[u8; 6]>,
    /// The datapath: the host kernel's vhost-net or the VMM's own.
    pub vhost: VhostMode,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot open TAP device {name}: {source}")]
    Tap { name: String, source: io::Error },
    #[error("cannot create an eventfd: {0}")]
    EventFd(io::Error),
    #[error("TAP {name}: vhost=on, but {dev} cannot be opened: {source} (load vhost_net, or vhost=auto)", dev = vhost::VHOST_NET_DEV)]
    Vhost { name: String, source: io::Error },
}

/// A stable, locally administered unicast MAC derived from `name`.
pub fn mac_from_name(name: &str) -> [u8; 6] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    [(b[2] & 0xfe) | 0x02, b[3], b[4], b[5], b[6], b[7]]
}

/// `aa:bb:cc:dd:ee:ff`, what [`parse_mac`] reads.
pub fn format_mac(mac: [u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for m in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Per-device counters, readable without the device lock.
#[derive(Debug, Default)]
pub struct NetCounters {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    rx_dropped: AtomicU64,
    tx_dropped: AtomicU64,
    invalid_chains: AtomicU64,
    rx_deferred: AtomicU64,
    /// Whether the kernel's datapath serves the device (or will, at its
    /// next activation): the counters above then stay still.
    vhost: std::sync::atomic::AtomicBool,
}

/// A snapshot of [`NetCounters`]. Byte counts exclude the vnet header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Frames the TAP refused to hand over (read errors, short frames).
    pub rx_dropped: u64,
    /// Frames the TAP refused (write errors).
    pub tx_dropped: u64,
    /// Chains returned unused: wrong direction, outside guest memory,
    /// malformed, RX buffers smaller than the vnet header.
    pub invalid_chains: u64,
    /// Times the TAP was taken out of the event loop for lack of RX buffers.
    pub rx_deferred: u64,
    /// vhost-net moves the frames (the counters above do not count them).
    pub vhost: bool,
}

impl NetStats {
    /// "vhost-net" or "userspace".
    pub fn datapath(&self) -> &'static str {
        if self.vhost {
            "vhost-net"
        } else {
            "userspace"
        }
    }
}

impl NetCounters {
    pub fn snapshot(&self) -> NetStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetStats {
            rx_packets: g(&self.rx_packets),
            rx_bytes: g(&self.rx_bytes),
            tx_packets: g(&self.tx_packets),
            tx_bytes: g(&self.tx_bytes),
            rx_dropped: g(&self.rx_dropped),
            tx_dropped: g(&self.tx_dropped),
            invalid_chains: g(&self.invalid_chains),
            rx_deferred: g(&self.rx_deferred),
            vhost: self.vhost.load(Ordering::Relaxed),
        }
    }
}

fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Event-loop tokens (`Events` data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    RxQueue,
    TxQueue,
    Tap,
    /// The datapath changed (activation, reset): re-register.
    Wake,
    /// vhost-net signalled used buffers on a queue.
    RxCall,
    TxCall,
}

impl Token {
    const ALL: [Token; 6] = [
        Token::RxQueue,
        Token::TxQueue,
        Token::Tap,
        Token::Wake,
        Token::RxCall,
        Token::TxCall,
    ];

    fn data(self) -> u32 {
        match self {
            Token::RxQueue => RX as u32,
            Token::TxQueue => TX as u32,
            Token::Tap => 2,
            Token::Wake => 3,
            Token::RxCall => 4,
            Token::TxCall => 5,
        }
    }

    fn from_data(d: u32) -> Option<Self> {
        Token::ALL.into_iter().find(|t| t.data() == d)
    }
}

/// An RX chain popped from the ring and checked, not yet used.
struct RxChain {
    head: u16,
    segs: Vec<Seg>,
    /// Host `(address, length)` of each buffer, resolved once when the
    /// chain is popped (plain integers keep the device `Send`; they stay
    /// valid while `Active::mem` lives).
    host: Vec<(usize, usize)>,
    cap: usize,
}

enum RxOutcome {
    /// The TAP has nothing more to read.
    Drained,
    /// A frame may be waiting but the guest gave no (or too few) buffers.
    NoBuffers,
    /// This wake-up's budget of frames is spent; the TAP may hold more
    /// (it stays polled, so the event loop comes back after the others).
    Budget,
}

struct Active {
    mem: Arc<GuestMemoryMmap>,
    rx: Queue,
    tx: Queue,
    interrupt: Interrupt,
    mrg_rxbuf: bool,
    rx_chains: VecDeque<RxChain>,
    /// Sum of `rx_chains` capacities.
    rx_cap: usize,
    /// A frame read ahead into `bounce` (its length), waiting for buffers.
    pending: usize,
    bounce: Vec<u8>,
    /// Scratch space reused for every frame (no allocation per frame).
    rx_iov: IovScratch,
    rx_parts: Vec<(u16, u32)>,
}

/// Host iovecs built for one `readv` and dropped right after it.
#[derive(Default)]
struct IovScratch(Vec<libc::iovec>);

// SAFETY: the raw pointers inside are only dereferenced by the kernel during
// a `readv` made by the thread that holds the device (and built just before
// it from `Active::mem`, which keeps the memory mapped); nothing reads them
// from another thread.
unsafe impl Send for IovScratch {}

/// A virtio-net device. See the [module docs](super) for how it is shared
/// between the MMIO bus and the event loop.
pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    config: [u8; 8],
    queue_evts: Vec<EventFd>,
    active: Option<Active>,
    tap_registered: bool,
    /// The vhost-net instance activations try first (opened with the
    /// device, kept for its life: see [`vhost`]).
    vhost_dev: Option<std::fs::File>,
    /// The kernel datapath, while it runs.
    vhost: Option<VhostPath>,
    /// vhost-net's used-buffer signals (RX, TX); always polled.
    calls: Vec<EventFd>,
    /// Written at activation and reset: the event loop re-registers.
    wake: EventFd,
    /// Whether the queue eventfds are polled (not while vhost-net serves
    /// them: every guest kick would wake the event loop for nothing).
    queues_registered: bool,
    counters: Arc<NetCounters>,
    /// Frames (RX) or chains (TX) served per wake-up at most; `None`: the
    /// queue's size. See the module's documentation.
    budget: Option<u16>,
}

impl Net {
    /// Opens the TAP named in `cfg`.
    pub fn new(cfg: &NetConfig) -> Result<Self, NetError> {
        let tap = Tap::open(&cfg.tap).map_err(|source| NetError::Tap {
            name: cfg.tap.clone(),
            source,
        })?;
        let mac = cfg.mac.unwrap_or_else(|| mac_from_name(&cfg.tap));
        let vhost_dev = cfg.vhost.resolve().map_err(|source| NetError::Vhost {
            name: cfg.tap.clone(),
            source,
        })?;
        let mut net = Self::with_tap(tap, mac)?;
        net.counters
            .vhost
            .store(vhost_dev.is_some(), Ordering::Relaxed);
        net.vhost_dev = vhost_dev;
        Ok(net)
    }

    fn with_tap(tap: Tap, mac: [u8; 6]) -> Result<Self, NetError> {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&mac);
        config[6..].copy_from_slice(&S_LINK_UP.to_le_bytes());
        Ok(Self {
            tap,
            mac,
            config,
            queue_evts: new_queue_events(2).map_err(NetError::EventFd)?,
            active: None,
            tap_registered: false,
            vhost_dev: None,
            vhost: None,
            calls: new_queue_events(2).map_err(NetError::EventFd)?,
            wake: EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(NetError::EventFd)?,
            queues_registered: false,
            budget: None,
            counters: Arc::default(),
        })
    }

    /// A device over a frame-preserving socket instead of a TAP (tests and
    /// the fuzz targets).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn with_fd(fd: std::os::fd::OwnedFd, mac: [u8; 6]) -> Self {
        #[allow(clippy::unwrap_used)]
        Self::with_tap(Tap::from_fd(fd), mac).unwrap()
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// The datapath activations use: "vhost-net" or "userspace" (the
    /// former falls back to the latter, with a warning, where the kernel
    /// refuses a ring).
    pub fn datapath(&self) -> &'static str {
        self.stats().datapath()
    }

    /// Shared counters (read them without locking the device).
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    pub fn stats(&self) -> NetStats {
        self.counters.snapshot()
    }

    fn set_tap_polling(&mut self, ops: &mut EventOps, on: bool) {
        if self.tap_registered == on {
            return;
        }
        let ev = Events::with_data(&self.tap, Token::Tap.data(), EventSet::IN);
        let r = if on { ops.add(ev) } else { ops.remove(ev) };
        match r {
            Ok(()) => self.tap_registered = on,
            Err(e) => tracing::error!(
                "virtio-net {}: cannot change TAP polling: {e:?}",
                self.tap.name()
            ),
        }
    }

    /// Moves frames from the TAP to the guest until one side runs dry, and
    /// starts or stops polling the TAP accordingly.
    fn handle_rx(&mut self, ops: &mut EventOps) {
        let Some(a) = self.active.as_mut() else {
            self.set_tap_polling(ops, false);
            return;
        };
        let mem = a.mem.clone();
        let mut used = false;
        let mut outcome = RxOutcome::Drained;
        let mut frames = self.budget.unwrap_or_else(|| a.rx.size()).max(1);
        for _ in 0..8 {
            let (o, u) = a.process_rx(&self.tap, &self.counters, &mut frames);
            used |= u;
            outcome = o;
            if !matches!(outcome, RxOutcome::NoBuffers) {
                break;
            }
            // Out of buffers: ask the guest to notify us when it adds some.
            // If it added some meanwhile, go on reading.
            match a.rx.enable_notification(&*mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    tracing::debug!("virtio-net: enable_notification: {e}");
                    break;
                }
            }
        }
        if used && a.rx.needs_notification(&*mem).unwrap_or(true) {
            a.interrupt.signal_used_queue();
        }
        match outcome {
            RxOutcome::Drained | RxOutcome::Budget => {
                // The TAP is polled while there are buffers: RX
                // notifications are not needed meanwhile.
                if let Err(e) = a.rx.disable_notification(&*mem) {
                    tracing::debug!("virtio-net: disable_notification: {e}");
                }
                self.set_tap_polling(ops, true);
            }
            RxOutcome::NoBuffers => {
                if self.tap_registered {
                    inc(&self.counters.rx_deferred, 1);
                }
                self.set_tap_polling(ops, false);
            }
        }
    }

    /// Sends every available TX chain to the TAP.
    fn process_tx(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mem = a.mem.clone();
        let c = &self.counters;
        let mut used = false;
        let mut iovs: Vec<libc::iovec> = Vec::new();
        let budget = self.budget.unwrap_or_else(|| a.tx.size()).max(1);
        let mut served: u16 = 0;
        let mut more = false;
        'wake: loop {
            if let Err(e) = a.tx.disable_notification(&*mem) {
                tracing::debug!("virtio-net: disable_notification: {e}");
            }
            let mut popped = false;
            while let Some(chain) = a.tx.pop_descriptor_chain(&*mem) {
                popped = true;
                let head = chain.head_index();
                iovs.clear();
                match parse_chain(chain) {
                    Ok(p)
                        if p.writable.is_empty()
                            && p.readable_len() >= VNET_HDR_LEN as u64
                            && push_iovecs(&mem, &p.readable, &mut iovs).is_some() =>
                    {
                        match self.tap.writev(&iovs) {
                            Ok(_) => {
                                inc(&c.tx_packets, 1);
                                inc(&c.tx_bytes, p.readable_len() - VNET_HDR_LEN as u64);
                            }
                            Err(e) => {
                                tracing::debug!("virtio-net {}: TAP write: {e}", self.tap.name());
                                inc(&c.tx_dropped, 1);
                            }
                        }
                    }
                    _ => inc(&c.invalid_chains, 1),
                }
                match a.tx.add_used(&*mem, head, 0) {
                    Ok(()) => used = true,
                    Err(e) => tracing::debug!("virtio-net: cannot return TX chain {head}: {e}"),
                }
                served = served.saturating_add(1);
                if served >= budget {
                    // Notifications stay off: the self-kick below brings
                    // the event loop back, the guest need not.
                    more = true;
                    break 'wake;
                }
            }
            match a.tx.enable_notification(&*mem) {
                Ok(true) if popped => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::debug!("virtio-net: enable_notification: {e}");
                    break;
                }
            }
        }
        if used && a.tx.needs_notification(&*mem).unwrap_or(true) {
            a.interrupt.signal_used_queue();
        }
        if more {
            if let Err(e) = self.queue_evts[TX].write(1) {
                tracing::warn!("virtio-net: cannot re-arm its TX queue: {e}");
            }
        }
    }

    /// Overrides the per-wake-up budget (tests).
    #[cfg(test)]
    pub(crate) fn set_budget(&mut self, n: u16) {
        self.budget = Some(n);
    }
}

impl Active {
    /// Pops and checks RX chains until `need` bytes are at hand or the ring
    /// is empty. Returns whether chains were returned as invalid.
    fn fill_rx(&mut self, need: usize, c: &NetCounters) -> bool {
        let mem = self.mem.clone();
        let mut used = false;
        let mut iovs = Vec::new();
        while self.rx_cap < need {
            let Some(chain) = self.rx.pop_descriptor_chain(&*mem) else {
                break;
            };
            let head = chain.head_index();
            iovs.clear();
            match parse_chain(chain) {
                Ok(p)
                    if p.readable.is_empty()
                        && p.writable_len() >= VNET_HDR_LEN as u64
                        && push_iovecs(&mem, &p.writable, &mut iovs).is_some() =>
                {
                    let cap = usize::try_from(p.writable_len()).unwrap_or(usize::MAX);
                    self.rx_cap = self.rx_cap.saturating_add(cap);
                    self.rx_chains.push_back(RxChain {
                        head,
                        segs: p.writable,
                        host: iovs
                            .iter()
                            .map(|v| (v.iov_base as usize, v.iov_len))
                            .collect(),
                        cap,
                    });
                }
                _ => {
                    inc(&c.invalid_chains, 1);
                    used |= self.rx.add_used(&*mem, head, 0).is_ok();
                }
            }
        }
        used
    }

    /// Reads frames from the TAP into RX buffers. Returns the outcome and
    /// whether used buffers were added.
    fn process_rx(&mut self, tap: &Tap, c: &NetCounters, frames: &mut u16) -> (RxOutcome, bool) {
        let mut used = false;
        let mut errors = 0;
        loop {
            if *frames == 0 {
                return (RxOutcome::Budget, used);
            }
            if self.pending > 0 {
                used |= self.fill_rx(self.pending, c);
                if self.rx_cap < self.pending {
                    return (RxOutcome::NoBuffers, used);
                }
                let n = std::mem::take(&mut self.pending);
                self.complete_rx(n, true, c);
                used = true;
                *frames = frames.saturating_sub(1);
                continue;
            }
            let need = if self.mrg_rxbuf { MAX_FRAME } else { 1 };
            used |= self.fill_rx(need, c);
            if self.rx_chains.is_empty() {
                return (RxOutcome::NoBuffers, used);
            }
            // A reader may report more than fit (the TAP counts a frame it
            // truncated): never trust `n` beyond the buffers offered.
            let result = match self.rx_iovecs() {
                Some(cap) => tap.readv(&self.rx_iov.0).map(|n| (n.min(cap), false)),
                None => {
                    // Not enough room for a maximal frame: read ahead into
                    // the bounce buffer, deliver when it fits.
                    self.bounce.resize(MAX_FRAME, 0);
                    let iov = [libc::iovec {
                        iov_base: self.bounce.as_mut_ptr().cast(),
                        iov_len: self.bounce.len(),
                    }];
                    tap.readv(&iov).map(|n| (n.min(MAX_FRAME), true))
                }
            };
            if let Ok((n, false)) = result {
                // Written behind vm-memory's back: mark it (even a runt
                // that is dropped below changed the buffers).
                self.mark_rx_written(n);
            }
            match result {
                Ok((0, _)) => return (RxOutcome::Drained, used),
                Ok((n, _)) if n < VNET_HDR_LEN => inc(&c.rx_dropped, 1),
                Ok((n, true)) => self.pending = n,
                Ok((n, false)) => {
                    self.complete_rx(n, false, c);
                    used = true;
                    *frames = frames.saturating_sub(1);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return (RxOutcome::Drained, used);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // The TAP dropped the frame (e.g. it did not fit).
                    tracing::debug!("virtio-net: TAP read: {e}");
                    inc(&c.rx_dropped, 1);
                    errors += 1;
                    if errors > 16 {
                        return (RxOutcome::Drained, used);
                    }
                }
            }
        }
    }

    /// Builds `rx_iov` over the chains at hand for a direct read and
    /// returns their total size, or `None` when they cannot hold a maximal
    /// frame (MRG_RXBUF).
    fn rx_iovecs(&mut self) -> Option<usize> {
        let iovs = &mut self.rx_iov.0;
        iovs.clear();
        let mut cap = 0usize;
        for ch in &self.rx_chains {
            iovs.extend(ch.host.iter().map(|&(base, len)| libc::iovec {
                iov_base: base as *mut libc::c_void,
                iov_len: len,
            }));
            cap = cap.saturating_add(ch.cap);
            if !self.mrg_rxbuf || cap >= MAX_FRAME {
                break;
            }
        }
        if iovs.len() > IOV_MAX || (self.mrg_rxbuf && cap < MAX_FRAME) {
            return None;
        }
        Some(cap)
    }

    /// Hands a frame of `n` bytes to the guest: it is already in the front
    /// chains (direct read) or in `bounce` (`from_bounce`).
    fn complete_rx(&mut self, n: usize, from_bounce: bool, c: &NetCounters) {
        let mem = self.mem.clone();
        let mut parts = std::mem::take(&mut self.rx_parts);
        parts.clear();
        let mut first_segs: Option<Vec<Seg>> = None;
        let mut done = 0usize;
        while done < n {
            let Some(ch) = self.rx_chains.pop_front() else {
                break;
            };
            self.rx_cap -= ch.cap;
            let len = ch.cap.min(n - done);
            if from_bounce
                && write_segs(&mem, &ch.segs, 0, &self.bounce[done..done + len]).is_none()
            {
                inc(&c.invalid_chains, 1);
            }
            parts.push((ch.head, len as u32));
            if first_segs.is_none() {
                first_segs = Some(ch.segs);
            }
            done += len;
        }
        let num_buffers = parts.len() as u16;
        if let Some(segs) = first_segs {
            // The TAP leaves num_buffers alone: fill it in before the guest
            // can see the first buffer.
            let _ = write_segs(&mem, &segs, NUM_BUFFERS_OFFSET, &num_buffers.to_le_bytes());
        }
        for &(head, len) in &parts {
            if let Err(e) = self.rx.add_used(&*mem, head, len) {
                tracing::debug!("virtio-net: cannot return RX chain {head}: {e}");
            }
        }
        self.rx_parts = parts;
        inc(&c.rx_packets, 1);
        inc(&c.rx_bytes, (n - VNET_HDR_LEN) as u64);
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn device_features(&self) -> u64 {
        OFFERED
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("virtio-net: config write at {offset:#x} ignored");
    }

    fn activate(
        &mut self,
        mem: Arc<GuestMemoryMmap>,
        mut queues: Vec<Queue>,
        acked: u64,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        if queues.len() != 2 {
            return Err(ActivateError::QueueCount {
                expected: 2,
                got: queues.len(),
            });
        }
        if let Some(i) = queues.iter().position(|q| !q.ready()) {
            return Err(ActivateError::InvalidQueue(i));
        }
        let tx = queues.remove(TX);
        let rx = queues.remove(RX);
        let mut offload = 0;
        if acked & F_GUEST_CSUM != 0 {
            offload |= libc::TUN_F_CSUM;
            if acked & F_GUEST_TSO4 != 0 {
                offload |= libc::TUN_F_TSO4;
            }
            if acked & F_GUEST_TSO6 != 0 {
                offload |= libc::TUN_F_TSO6;
            }
            if acked & F_GUEST_ECN != 0 && acked & (F_GUEST_TSO4 | F_GUEST_TSO6) != 0 {
                offload |= libc::TUN_F_TSO_ECN;
            }
        }
        // If this fails the TAP keeps handing over plain frames only, which
        // every guest accepts.
        if let Err(e) = self.tap.set_offload(offload) {
            tracing::warn!(
                "virtio-net {}: TUNSETOFFLOAD {offload:#x}: {e}",
                self.tap.name()
            );
        }
        if let Some(dev) = &self.vhost_dev {
            match self.start_vhost(dev, &mem, [&rx, &tx], acked, &interrupt) {
                Ok(v) => {
                    self.vhost = Some(v);
                    self.counters.vhost.store(true, Ordering::Relaxed);
                    self.wake_event_loop();
                    return Ok(());
                }
                Err(e) => tracing::warn!(
                    "virtio-net {}: vhost-net did not start ({e}); this activation uses the userspace datapath",
                    self.tap.name()
                ),
            }
        }
        self.counters.vhost.store(false, Ordering::Relaxed);
        self.active = Some(Active {
            mem,
            rx,
            tx,
            interrupt,
            mrg_rxbuf: acked & F_MRG_RXBUF != 0,
            rx_chains: VecDeque::new(),
            rx_cap: 0,
            pending: 0,
            bounce: Vec::new(),
            rx_iov: IovScratch::default(),
            rx_parts: Vec::new(),
        });
        // The event loop picks the device up from here: the RX kick starts
        // polling the TAP, the TX kick sends what was queued early (the
        // wake-up registers the queue eventfds again after vhost-net).
        for evt in &self.queue_evts {
            if let Err(e) = evt.write(1) {
                tracing::warn!("virtio-net: cannot kick a queue: {e}");
            }
        }
        self.wake_event_loop();
        Ok(())
    }

    fn reset(&mut self) {
        // Chains popped but unused and a read-ahead frame go with it; the
        // TAP is unregistered at its next event.
        self.active = None;
        if let Some(v) = self.vhost.take() {
            v.stop();
            self.wake_event_loop();
        }
        // The next activation tries the kernel's datapath again.
        self.counters
            .vhost
            .store(self.vhost_dev.is_some(), Ordering::Relaxed);
        if let Err(e) = self.tap.set_offload(0) {
            tracing::debug!("virtio-net: TUNSETOFFLOAD 0: {e}");
        }
    }

    fn quiesce(&mut self) -> Result<Vec<QueueState>, StateError> {
        self.quiesce_queues()
    }

    fn is_activated(&self) -> bool {
        self.active.is_some() || self.vhost.is_some()
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        let fixed = [
            (Token::Wake, &self.wake),
            (Token::RxCall, &self.calls[RX]),
            (Token::TxCall, &self.calls[TX]),
        ];
        for (t, evt) in fixed {
            if let Err(e) = ops.add(Events::with_data(evt, t.data(), EventSet::IN)) {
                tracing::error!(
                    "virtio-net {}: cannot register an eventfd: {e:?}",
                    self.tap.name()
                );
            }
        }
        self.sync_registrations(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match Token::from_data(events.data()) {
            Some(Token::Wake) => {
                drain_eventfd(&self.wake);
                self.sync_registrations(ops);
            }
            Some(t @ (Token::RxCall | Token::TxCall)) => {
                drain_eventfd(&self.calls[if t == Token::RxCall { RX } else { TX }]);
                if let Some(v) = &self.vhost {
                    v.signal_used();
                }
            }
            // Served by the kernel now (a kick that raced the wake-up).
            Some(Token::RxQueue | Token::TxQueue | Token::Tap) if self.vhost.is_some() => {
                self.sync_registrations(ops);
            }
            Some(Token::RxQueue) => {
                drain_eventfd(&self.queue_evts[RX]);
                if self.active.is_some() {
                    self.handle_rx(ops);
                }
            }
            Some(Token::TxQueue) => {
                drain_eventfd(&self.queue_evts[TX]);
                self.process_tx();
            }
            Some(Token::Tap) => {
                if events
                    .event_set()
                    .intersects(EventSet::ERROR | EventSet::HANG_UP)
                {
                    tracing::error!(
                        "virtio-net {}: TAP error/hang-up; not polling it",
                        self.tap.name()
                    );
                    self.set_tap_polling(ops, false);
                    return;
                }
                self.handle_rx(ops);
            }
            None => tracing::warn!("virtio-net: unexpected event {}", events.data()),
        }
    }
}

#[cfg(test)]
mod tests;
