//! virtio-net over a TAP device.
//!
//! Queues: 0 = RX, 1 = TX, and with more than one queue pair (`queues=N`,
//! a multi-queue TAP) 2k = RX and 2k+1 = TX of pair k, then the control
//! queue ([`ctrl`]). Each pair has its own TAP queue, and with vhost-net
//! its own vhost-net instance (a kernel worker per pair). The TAP carries a 12-byte `virtio_net_hdr_v1`
//! in front of every frame (`IFF_VNET_HDR`, `TUNSETVNETHDRSZ`), so the
//! guest's checksum/GSO metadata passes through untouched and frames move
//! between the TAP and guest memory with `readv`/`writev` and no copy.
//!
//! Offloads: the device offers CSUM, GUEST_CSUM, HOST/GUEST_TSO4/6,
//! HOST/GUEST_ECN and MRG_RXBUF; at activation the TAP is told (via
//! `TUNSETOFFLOAD`) to hand us only what the guest accepted.
//!
//! RX: with MRG_RXBUF a frame may fill several chains (`num_buffers` in the
//! header says how many). Frames are read straight into the guest's
//! buffers, in one of two ways (see `rx`): while frames fit one chain
//! (MTU-sized traffic, the usual case) the read covers the front chain and
//! a bounce buffer behind it, and a frame that overflows has its rest copied
//! into the next chains; after such a frame, and for the next
//! [`BIG_FRAMES_HOLD`] frames, the read covers as many chains as hold a
//! maximal frame (64 KiB + headers: TSO streams), so big frames are not
//! copied. Fewer iovecs per read is what the first way saves: the kernel
//! copies and checks each one. When wide reads are due but the guest has
//! not posted chains for a maximal frame, the read covers those it has and
//! the bounce buffer behind them, and what overflows is copied on once
//! enough chains are there, so a guest that posts few buffers still gets
//! every frame. Without MRG_RXBUF each frame goes into one chain.
//!
//! When the guest has no RX buffers the TAP is taken out of the event loop
//! (frames wait in the TAP's queue) and RX queue notifications are turned
//! on; the guest's next RX notification puts it back. Nothing spins and
//! nothing is read that cannot be delivered.
//!
//! A wake-up moves at most a queue's worth (the queue size) of frames
//! each way: a flood from the TAP into a guest that refills its ring as
//! fast, or a guest that refills its TX ring as fast, would otherwise keep
//! its thread here for good (and a second TAP queue, the control queue and
//! a device reset waiting on its lock). RX then yields with the TAP still polled
//! (epoll reports it again after the other ready events); TX kicks its own
//! queue eventfd. Within a wake-up the guest is signalled every
//! [`SIGNAL_BATCH`] used entries (if it wants to be: EVENT_IDX), not only
//! at the end, so its driver refills RX buffers and reclaims TX ones while
//! the device goes on instead of after it ran dry.
//!
//! vhost-net (`vhost=auto|on|off`, [`vhost`]): where `/dev/vhost-net` can
//! be opened the host kernel moves the frames instead of this file; the
//! device, its features and activation stay here; the kernel raises the
//! guest's used-buffer interrupts on the irqfd itself.
//!
//! MAC: the configured one, else one derived from the TAP name with
//! FNV-1a (locally administered, unicast): stable across restarts of the
//! same VM on the same TAP, different for different TAP names.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use self::ctrl::Ctrl;
use self::vhost::{VhostMode, VhostPath};
use super::iov::{ParsedChain, IOV_MAX};
use super::tap::{Tap, VNET_HDR_LEN};
use super::used::UsedSignal;
use super::{
    drain_eventfd, new_queue_events, read_config_bytes, ActivateError, GuestMemoryMmap, Interrupt,
    VirtioDevice, COMMON_FEATURES,
};
use crate::state::StateError;

/// virtio device ID of a network device.
pub const VIRTIO_ID_NET: u32 = 1;
/// Size of each RX and TX queue.
pub const QUEUE_SIZE: u16 = 256;
/// Size of the control queue (a few commands per driver start).
const CTRL_QUEUE_SIZE: u16 = 64;
/// The most queue pairs a `--net` may ask for (one per vCPU, as disks).
pub const MAX_QUEUE_PAIRS: u16 = 16;
/// Used entries after which a long wake-up signals the guest before it
/// ends, so that the driver recycles buffers while the device goes on
/// (EVENT_IDX still decides whether the guest wants it). vhost-net's
/// batch is the same 64.
const SIGNAL_BATCH: u16 = 64;
/// Counts `added` more used entries in this wake-up; every
/// [`SIGNAL_BATCH`], signals the guest if it wants an interrupt now
/// (`needs`: the queue's EVENT_IDX test).
fn signal_every_batch(
    interrupt: &Interrupt,
    unsignalled: &mut u16,
    added: u16,
    needs: impl FnOnce() -> bool,
) {
    *unsignalled = unsignalled.saturating_add(added);
    if *unsignalled >= SIGNAL_BATCH {
        *unsignalled = 0;
        if needs() {
            interrupt.signal_used_queue();
        }
    }
}

/// The largest frame the TAP can hand us: vnet header, Ethernet + VLAN
/// header, 64 KiB of GSO payload.
const MAX_FRAME: usize = VNET_HDR_LEN + 14 + 4 + 65535;
/// After a frame that did not fit one RX chain, the next this many frames
/// are read over enough chains for a maximal frame (see the module docs):
/// a TSO stream stays there, an odd big frame among small ones costs one
/// copy and this many wider reads.
const BIG_FRAMES_HOLD: u16 = 64;
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
pub const F_CTRL_VQ: u64 = 1 << 17;
pub const F_MQ: u64 = 1 << 22;
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

mod ctrl;
mod migrate;
mod rx;
mod rx_dirty;
mod state;
mod stats;
mod tx;
pub mod vhost;
pub use migrate::rarp_frame;
use stats::inc;
pub use stats::{format_mac, mac_from_name, parse_mac, NetCounters, NetStats};

/// Queue index of pair `p`'s RX queue.
fn rx_index(p: usize) -> usize {
    2 * p
}

/// Queue index of pair `p`'s TX queue.
fn tx_index(p: usize) -> usize {
    2 * p + 1
}

/// One `--net`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// TAP interface name (created if absent and we may).
    pub tap: String,
    /// Guest MAC; `None` derives one from the TAP name ([`mac_from_name`]).
    pub mac: Option<[u8; 6]>,
    /// The datapath: the host kernel's vhost-net or the VMM's own.
    pub vhost: VhostMode,
    /// Queue pairs to offer (1 to [`MAX_QUEUE_PAIRS`]); a TAP made
    /// without `multi_queue` gets one whatever this says.
    pub queues: u16,
    /// vhost-net's busy polling, µs (0: off); the userspace datapath
    /// ignores it.
    pub poll_us: u32,
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

/// Event-loop tokens (`Events` data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    /// The datapath changed (activation, reset): re-register.
    Wake,
    /// The driver queued a control command.
    Ctrl,
    /// Pair `p`'s RX or TX queue was notified.
    RxQueue(usize),
    TxQueue(usize),
    /// Pair `p`'s TAP queue has frames.
    Tap(usize),
}

impl Token {
    const INDEX: u32 = 0xffff;

    fn data(self) -> u32 {
        let (kind, i) = match self {
            Token::Wake => (0, 0),
            Token::Ctrl => (1, 0),
            Token::RxQueue(p) => (2, p),
            Token::TxQueue(p) => (3, p),
            Token::Tap(p) => (4, p),
        };
        (kind << 16) | (u32::try_from(i).unwrap_or(Self::INDEX) & Self::INDEX)
    }

    fn from_data(d: u32) -> Option<Self> {
        let i = usize::try_from(d & Self::INDEX).ok()?;
        Some(match d >> 16 {
            0 => Token::Wake,
            1 => Token::Ctrl,
            2 => Token::RxQueue(i),
            3 => Token::TxQueue(i),
            4 => Token::Tap(i),
            _ => return None,
        })
    }
}

impl Net {
    /// The token of queue `i`'s eventfd.
    fn queue_token(&self, i: usize) -> Token {
        if i >= 2 * self.taps.len() {
            Token::Ctrl
        } else if i.is_multiple_of(2) {
            Token::RxQueue(i / 2)
        } else {
            Token::TxQueue(i / 2)
        }
    }

    /// The queue index an event is about, for queue notifications.
    fn token_queue(&self, t: Token) -> Option<usize> {
        match t {
            Token::RxQueue(p) => Some(rx_index(p)),
            Token::TxQueue(p) => Some(tx_index(p)),
            Token::Ctrl => Some(2 * self.taps.len()),
            _ => None,
        }
    }
}

/// One queue pair served by the userspace datapath.
struct Active {
    /// Which queue pair this is.
    pair: usize,
    mem: Arc<GuestMemoryMmap>,
    rx: Queue,
    /// RX's interrupt decision: a frame's entries are published together
    /// (`used::add_used_batch`), which virtio-queue's count does not see.
    rx_signal: UsedSignal,
    tx: Queue,
    interrupt: Interrupt,
    mrg_rxbuf: bool,
    rx_chains: VecDeque<rx::RxChain>,
    /// Sum of `rx_chains` capacities.
    rx_cap: usize,
    /// A frame read ahead (its length), waiting for buffers: its first
    /// `pending_in_place` bytes in the front chain, the rest in `bounce`.
    pending: usize,
    pending_in_place: usize,
    bounce: Vec<u8>,
    /// Frames left to read over chains for a maximal frame (the last big
    /// frame was this recent; see [`BIG_FRAMES_HOLD`]).
    big_frames_hold: u16,
    /// Scratch space reused for every frame (no allocation per frame).
    rx_iov: IovScratch,
    rx_parts: Vec<(u16, u32)>,
    /// Per-chain scratch, reused for the same reason: the chain being
    /// parsed, its host iovecs, and the lists of chains already used.
    rx_parsed: ParsedChain,
    fill_iov: IovScratch,
    rx_spare: Vec<rx::RxChain>,
    tx_parsed: ParsedChain,
    tx_iov: IovScratch,
}

/// The most entries a per-frame scratch list keeps between frames (as
/// many iovecs as one `readv` takes): a guest's chain of thousands of
/// descriptors (indirect tables allow 65,535) is served, and then its
/// lists are let go rather than kept for good.
const SCRATCH_KEEP: usize = IOV_MAX;

/// Empties `v` and gives back its memory beyond [`SCRATCH_KEEP`] entries.
fn trim_scratch<T>(v: &mut Vec<T>) {
    if v.capacity() > SCRATCH_KEEP {
        v.clear();
        v.shrink_to(SCRATCH_KEEP);
    }
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
/// between the MMIO bus and its I/O thread's event manager.
pub struct Net {
    /// One TAP queue per queue pair (one for a single-queue TAP).
    taps: Vec<Tap>,
    mac: [u8; 6],
    /// MAC, status, max_virtqueue_pairs.
    config: [u8; 10],
    queue_sizes: Vec<u16>,
    queue_evts: Vec<EventFd>,
    /// The pairs the userspace datapath serves, from pair 0; empty while
    /// not activated or while vhost-net serves them.
    active: Vec<Active>,
    /// The control queue, while activated with one.
    ctrl: Option<Ctrl>,
    /// Every queue as the last activation got it, in index order: what a
    /// snapshot saves for queues no datapath serves (a pair the driver left
    /// unused), the running ones' positions replacing theirs.
    activated: Vec<QueueState>,
    tap_registered: Vec<bool>,
    /// The vhost-net instances activations try first, one per pair
    /// (opened with the device, kept for its life: see [`vhost`]); empty
    /// for the userspace datapath.
    vhost_dev: Vec<File>,
    /// vhost-net's busy polling asked for, µs (`NetConfig::poll_us`).
    poll_us: u32,
    /// The kernel datapath, one per pair, while it runs.
    vhost: Vec<VhostPath>,
    /// Written at activation and reset: the device's event manager
    /// re-registers.
    wake: EventFd,
    /// The queues whose eventfds are not polled: those vhost-net serves
    /// (every guest kick would wake the event loop for nothing).
    unpolled: Vec<usize>,
    counters: Arc<NetCounters>,
    /// Frames (RX) or chains (TX) served per wake-up at most; `None`: the
    /// queue's size. See the module's documentation.
    budget: Option<u16>,
    /// Runs once, right before the TX queue's kicks are re-armed (tests:
    /// the guest publishing at the worst moment).
    #[cfg(test)]
    pub(crate) before_rearm: Option<Box<dyn FnOnce() + Send>>,
}

impl Net {
    /// Opens the TAP named in `cfg`, one queue per pair.
    pub fn new(cfg: &NetConfig) -> Result<Self, NetError> {
        let want = usize::from(cfg.queues.clamp(1, MAX_QUEUE_PAIRS));
        let taps = Tap::open_queues(&cfg.tap, want).map_err(|source| NetError::Tap {
            name: cfg.tap.clone(),
            source,
        })?;
        if taps.len() < want {
            tracing::warn!(
                "virtio-net {}: the TAP was made without multi_queue: one queue pair instead of {want}",
                cfg.tap
            );
        }
        let mac = cfg.mac.unwrap_or_else(|| mac_from_name(&cfg.tap));
        let vhost_dev = cfg
            .vhost
            .resolve(taps.len())
            .map_err(|source| NetError::Vhost {
                name: cfg.tap.clone(),
                source,
            })?;
        let mut net = Self::with_taps(taps, mac)?;
        net.counters
            .vhost
            .store(!vhost_dev.is_empty(), Ordering::Relaxed);
        if vhost_dev.is_empty() && cfg.poll_us > 0 {
            tracing::warn!(
                "virtio-net {}: poll_us={} is vhost-net's busy polling, and this device has the userspace datapath: no polling",
                cfg.tap,
                cfg.poll_us
            );
        }
        net.vhost_dev = vhost_dev;
        net.poll_us = cfg.poll_us;
        Ok(net)
    }

    fn with_taps(taps: Vec<Tap>, mac: [u8; 6]) -> Result<Self, NetError> {
        let pairs = taps.len().max(1);
        let mut config = [0u8; 10];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&S_LINK_UP.to_le_bytes());
        let max_pairs = u16::try_from(pairs).unwrap_or(MAX_QUEUE_PAIRS);
        config[8..].copy_from_slice(&max_pairs.to_le_bytes());
        let mut queue_sizes = vec![QUEUE_SIZE; 2 * pairs];
        if pairs > 1 {
            queue_sizes.push(CTRL_QUEUE_SIZE);
        }
        Ok(Self {
            tap_registered: vec![false; pairs],
            taps,
            mac,
            config,
            queue_evts: new_queue_events(queue_sizes.len()).map_err(NetError::EventFd)?,
            queue_sizes,
            active: Vec::new(),
            ctrl: None,
            activated: Vec::new(),
            vhost_dev: Vec::new(),
            poll_us: 0,
            vhost: Vec::new(),
            wake: EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(NetError::EventFd)?,
            unpolled: Vec::new(),
            budget: None,
            #[cfg(test)]
            before_rearm: None,
            counters: Arc::new(NetCounters::with_pairs(pairs)),
        })
    }

    /// A device over a frame-preserving socket instead of a TAP (tests and
    /// the fuzz targets).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn with_fd(fd: std::os::fd::OwnedFd, mac: [u8; 6]) -> Self {
        Self::with_fds(vec![fd], mac)
    }

    /// A multi-queue device over sockets, one per queue pair (tests and
    /// the fuzz targets).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn with_fds(fds: Vec<std::os::fd::OwnedFd>, mac: [u8; 6]) -> Self {
        let taps = fds.into_iter().map(Tap::from_fd).collect();
        #[allow(clippy::unwrap_used)]
        Self::with_taps(taps, mac).unwrap()
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn tap_name(&self) -> &str {
        self.taps.first().map_or("", |t| t.name())
    }

    /// The queue pairs offered (the TAP's queues).
    pub fn queue_pairs(&self) -> usize {
        self.taps.len()
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

    /// Attaches the first `n` TAP queues and detaches the others, so the
    /// kernel steers frames only to pairs the driver serves. Returns
    /// whether every queue followed.
    fn steer_to(&mut self, n: usize) -> bool {
        let mut ok = true;
        for (i, tap) in self.taps.iter_mut().enumerate() {
            if let Err(e) = tap.set_attached(i < n) {
                tracing::warn!("virtio-net {}: TUNSETQUEUE on queue {i}: {e}", tap.name());
                ok = false;
            }
        }
        ok
    }

    /// The queue pairs the driver enabled (`VIRTIO_NET_CTRL_MQ`); 1 until
    /// it asks for more. Kept across a quiesce, for the snapshot. The
    /// counters hold it, so that `status` reads it without the lock.
    fn enabled(&self) -> usize {
        usize::try_from(self.counters.enabled_pairs()).unwrap_or(1)
    }

    fn set_enabled(&mut self, n: u16) {
        self.counters.enabled.store(u64::from(n), Ordering::Relaxed);
    }

    /// Overrides the per-wake-up budget (tests).
    #[cfg(test)]
    pub(crate) fn set_budget(&mut self, n: u16) {
        self.budget = Some(n);
    }

    /// The pairs an activation can serve: `pairs` negotiated, counted from
    /// pair 0 up to the first whose queues the driver did not set up.
    fn usable_pairs(queues: &[Queue], pairs: usize) -> usize {
        (0..pairs)
            .take_while(|&p| {
                [rx_index(p), tx_index(p)]
                    .iter()
                    .all(|&i| queues.get(i).is_some_and(|q| q.ready()))
            })
            .count()
    }

    /// Sets the TAP's offloads to what the guest accepted.
    fn set_offloads(&self, acked: u64) {
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
        // The offloads are the TAP's (every queue's): set through the
        // first. If this fails the TAP keeps handing over plain frames
        // only, which every guest accepts.
        if let Some(tap) = self.taps.first() {
            if let Err(e) = tap.set_offload(offload) {
                tracing::warn!("virtio-net {}: TUNSETOFFLOAD {offload:#x}: {e}", tap.name());
            }
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn device_features(&self) -> u64 {
        if self.taps.len() > 1 {
            OFFERED | F_CTRL_VQ | F_MQ
        } else {
            OFFERED
        }
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
        queues: Vec<Queue>,
        acked: u64,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        if queues.len() != self.queue_sizes.len() {
            return Err(ActivateError::QueueCount {
                expected: self.queue_sizes.len(),
                got: queues.len(),
            });
        }
        // Without MQ the driver knows one pair, and a control queue (if it
        // took one) sits right after it (virtio 1.2, 5.1.2).
        let pairs = if acked & F_MQ != 0 {
            self.taps.len()
        } else {
            1
        };
        let usable = Self::usable_pairs(&queues, pairs);
        if usable == 0 {
            let i = [rx_index(0), tx_index(0)]
                .into_iter()
                .find(|&i| !queues.get(i).is_some_and(|q| q.ready()))
                .unwrap_or(rx_index(0));
            return Err(ActivateError::InvalidQueue(i));
        }
        self.set_offloads(acked);
        self.activated = queues.iter().map(Queue::state).collect();
        // Until the driver asks for more (VIRTIO_NET_CTRL_MQ), one pair.
        self.set_enabled(1);
        self.steer_to(1);
        let mut queues = queues.into_iter().map(Some).collect::<Vec<_>>();
        let mut take = |i: usize| queues.get_mut(i).and_then(Option::take);
        let mut pair_queues = Vec::with_capacity(usable);
        for p in 0..usable {
            if let (Some(rx), Some(tx)) = (take(rx_index(p)), take(tx_index(p))) {
                pair_queues.push((rx, tx));
            }
        }
        self.ctrl = take(2 * pairs)
            .filter(|q| acked & F_CTRL_VQ != 0 && q.ready())
            .map(|q| Ctrl::new(2 * pairs, mem.clone(), q, interrupt.clone()));
        if !self.vhost_dev.is_empty() {
            match self.start_vhost(&mem, &mut pair_queues, acked, &interrupt) {
                Ok(v) => {
                    self.set_vhost(v);
                    self.counters.vhost.store(true, Ordering::Relaxed);
                    self.kick_ctrl();
                    self.wake_event_loop();
                    return Ok(());
                }
                Err(e) => tracing::warn!(
                    "virtio-net {}: vhost-net did not start ({e}); this activation uses the userspace datapath",
                    self.tap_name()
                ),
            }
        }
        self.counters.vhost.store(false, Ordering::Relaxed);
        self.active = pair_queues
            .into_iter()
            .enumerate()
            .map(|(pair, (rx, tx))| Active {
                pair,
                mem: mem.clone(),
                rx_signal: UsedSignal::new(&rx),
                rx,
                tx,
                interrupt: interrupt.clone(),
                mrg_rxbuf: acked & F_MRG_RXBUF != 0,
                rx_chains: VecDeque::new(),
                rx_cap: 0,
                pending: 0,
                pending_in_place: 0,
                bounce: Vec::new(),
                big_frames_hold: 0,
                rx_iov: IovScratch::default(),
                rx_parts: Vec::new(),
                rx_parsed: ParsedChain::default(),
                fill_iov: IovScratch::default(),
                rx_spare: Vec::new(),
                tx_parsed: ParsedChain::default(),
                tx_iov: IovScratch::default(),
            })
            .collect();
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
        self.active.clear();
        self.ctrl = None;
        self.activated.clear();
        if !self.vhost.is_empty() {
            self.set_vhost(Vec::new());
            self.wake_event_loop();
        }
        self.set_enabled(1);
        self.steer_to(1);
        // The next activation tries the kernel's datapath again.
        self.counters
            .vhost
            .store(!self.vhost_dev.is_empty(), Ordering::Relaxed);
        if let Some(tap) = self.taps.first() {
            if let Err(e) = tap.set_offload(0) {
                tracing::debug!("virtio-net: TUNSETOFFLOAD 0: {e}");
            }
        }
    }

    fn quiesce(&mut self) -> Result<Vec<QueueState>, StateError> {
        self.quiesce_queues()
    }

    fn is_activated(&self) -> bool {
        !self.active.is_empty() || !self.vhost.is_empty()
    }

    fn saved_queue_pairs(&self) -> Option<u16> {
        u16::try_from(self.counters.enabled_pairs())
            .ok()
            .filter(|_| self.taps.len() > 1)
    }

    fn restore_queue_pairs(&mut self, pairs: u16) {
        if let Err(why) = self.enable_pairs(pairs) {
            tracing::warn!(
                "virtio-net {}: the snapshot's {pairs} queue pairs: {why}",
                self.tap_name()
            );
        }
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        let mut fixed = vec![(Token::Wake, &self.wake)];
        fixed.extend(
            self.queue_evts
                .iter()
                .enumerate()
                .map(|(i, e)| (self.queue_token(i), e)),
        );
        for (t, evt) in fixed {
            if let Err(e) = ops.add(Events::with_data(evt, t.data(), EventSet::IN)) {
                tracing::error!(
                    "virtio-net {}: cannot register an eventfd: {e:?}",
                    self.tap_name()
                );
            }
        }
        self.sync_registrations(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let token = Token::from_data(events.data());
        // A queue's notification: the control queue's wherever the driver
        // put it (after the last pair it negotiated, which is not the
        // device's last queue when it took CTRL_VQ without MQ).
        if let Some(q) = token.and_then(|t| self.token_queue(t)) {
            // vhost-net's queues' kicks are the kernel's to read.
            let kernels = q < 2 * self.vhost.len();
            if let (Some(evt), false) = (self.queue_evts.get(q), kernels) {
                drain_eventfd(evt);
            }
            if self.ctrl.as_ref().is_some_and(|c| c.index() == q) {
                self.process_ctrl(ops);
                return;
            }
        }
        match token {
            Some(Token::Wake) => {
                drain_eventfd(&self.wake);
                self.sync_registrations(ops);
            }
            // A queue no pair and no control queue uses.
            Some(Token::Ctrl) => {}
            // Served by the kernel now (a kick that raced the wake-up).
            Some(Token::RxQueue(_) | Token::TxQueue(_) | Token::Tap(_))
                if !self.vhost.is_empty() =>
            {
                self.sync_registrations(ops);
            }
            Some(Token::RxQueue(p)) => {
                if !self.active.is_empty() {
                    self.handle_rx(p, ops);
                }
            }
            Some(Token::TxQueue(p)) => self.process_tx(p),
            Some(Token::Tap(p)) => {
                if events
                    .event_set()
                    .intersects(EventSet::ERROR | EventSet::HANG_UP)
                {
                    // Rate-limited: each RX kick registers the TAP again,
                    // and a hung-up TAP reports the hang-up again.
                    crate::limited!(
                        error,
                        "virtio-net {}: TAP queue {p} error/hang-up; not polling it",
                        self.tap_name()
                    );
                    self.set_tap_polling(p, ops, false);
                    return;
                }
                self.handle_rx(p, ops);
            }
            None => tracing::warn!("virtio-net: unexpected event {}", events.data()),
        }
    }
}

#[cfg(test)]
mod tests;
