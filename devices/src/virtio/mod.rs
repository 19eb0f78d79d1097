//! Virtio devices (block, net) behind the virtio-mmio transport (virtio 1.x).
//!
//! # Pieces
//! - [`VirtioDevice`]: what a device model offers the transport (type, features,
//!   config space, queue sizes and queue-notification `EventFd`s, `activate`,
//!   `reset`, `quiesce`).
//! - [`MmioTransport`]: the virtio-mmio register file (version 2). It is a
//!   [`BusDevice`](crate::BusDevice) on the MMIO bus, [`MMIO_SIZE`] bytes wide.
//! - [`Block`] and [`Net`]: the device models. Each also implements
//!   `event_manager::MutEventSubscriber` and serves its queues from an event
//!   manager (the VMM runs one per device, each on an I/O thread of its own).
//! - [`Interrupt`]: the INTERRUPT_STATUS bits plus the `EventFd` the VMM
//!   registers as a KVM irqfd.
//! - [`GuestMemoryHandle`]: the guest memory, swappable per boot.
//!
//! # Threads and locking
//! Two kinds of threads touch a device:
//! - vCPU threads, through the MMIO bus, which holds the transport as
//!   `Arc<Mutex<MmioTransport>>`;
//! - the device's I/O thread running its `EventManager`, which holds the device model
//!   itself as `Arc<Mutex<Block>>` (or `Net`), coerced to
//!   `Arc<Mutex<dyn MutEventSubscriber + Send>>`.
//!
//! The transport keeps an `Arc<Mutex<dyn VirtioDevice>>` to the *same* device
//! object. So there are two locks, always taken in the order transport →
//! device, never the other way (the event loop only ever takes the device
//! lock):
//! - register accesses that only touch transport state (feature and queue
//!   setup, QueueNotify, InterruptStatus/InterruptACK, ConfigGeneration) take
//!   the transport lock only, so a vCPU acking an interrupt never waits behind
//!   a disk read that the event loop is doing;
//! - config-space accesses, DRIVER_OK (activation) and reset also take the
//!   device lock, and therefore wait for the request the event loop is
//!   serving to finish. After `reset` returns the device holds no queue, no
//!   guest memory and no interrupt, so nothing stale can reach the guest.
//!
//! Queue notifications never take a lock on the vCPU side: the guest's write
//! to QueueNotify is an ioeventfd (or, without one, the transport writes the
//! same `EventFd`), and the event loop wakes the device.
//!
//! # Wiring (what the VMM does per device)
//! ```ignore
//! let mem = GuestMemoryHandle::new(guest_memory);            // once; `set` per boot
//! let blk = Arc::new(Mutex::new(Block::new(&BlockConfig { .. })?));
//! let transport = MmioTransport::new(blk.clone(), mem.clone())?;
//! for (i, evt) in transport.queue_events().iter().enumerate() {
//!     vm.register_ioevent(evt, &IoEventAddress::Mmio(base + NOTIFY_OFFSET), i as u32)?;
//! }
//! vm.register_irqfd(transport.interrupt_event(), gsi)?;
//! mmio_bus.insert(Arc::new(Mutex::new(transport)), base, MMIO_SIZE)?;
//! event_manager.add_subscriber(blk);                          // registers queue fds
//! ```
//! On a guest reset the VMM calls [`MmioTransport::reset`] on every transport
//! (the guest driver will also write status 0 when it probes again), then may
//! `set` fresh memory in the handle; devices pick the memory up at the next
//! DRIVER_OK.
//!
//! # Snapshots
//! [`MmioTransport::save_state`] quiesces the device ([`VirtioDevice::quiesce`]:
//! stopped like a reset, but every queue's position is kept) and returns a
//! [`TransportState`]; [`MmioTransport::restore_state`] puts a transport
//! (the same one, or a fresh one built from the same configuration in
//! another process) back into that state and restarts the device where it
//! stopped. Save before copying guest memory (quiescing writes the last
//! completions into it), and keep the vCPUs paused from `save_state` until
//! `restore_state` (or a reset): in between, the transport says DRIVER_OK but
//! nothing serves the queues.

pub mod block;
mod dirty;
mod iov;
pub mod mmio;
pub mod net;
mod ram;
pub mod tap;
#[cfg(any(test, feature = "fuzzing"))]
pub mod test_utils;
mod used;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::state::StateError;

pub use block::{
    BackupDone, BackupInbox, BackupReport, BackupRequest, BackupStarted, BackupSubmitError, Block,
    BlockConfig, BlockCounters, BlockError, BlockStats, CopyReader, CopySource, ImageLock,
    IoEngine, IoLimits, PollControl, ThrottleControl, WriteLog, BACKUP_CHUNK, COPY_CHUNK,
};
pub use dirty::{clear_dirty_pages, take_dirty_pages, DIRTY_PAGE_SIZE};
pub use mmio::{
    MmioTransport, RingView, RingWatch, SavedQueue, TransportState, ACK_OFFSET, MMIO_SIZE,
    NOTIFY_OFFSET,
};
pub use net::{Net, NetConfig, NetError, NetStats};
pub use ram::{advise, guest_ram, GuestBitmap};

/// Guest memory as the whole VMM sees it: every region carries a dirty-page
/// bitmap ([`GuestBitmap`], an [`AtomicBitmap`](vm_memory::bitmap::AtomicBitmap), one bit per
/// [`DIRTY_PAGE_SIZE`] page) that records the writes the VMM itself makes
/// into guest memory, for live migration (KVM's dirty log sees only the
/// vCPUs' writes). Writes through vm-memory's API mark it by themselves; the
/// devices mark what the kernel writes through raw iovecs once it is done.
/// See [`take_dirty_pages`]. The VMM makes it with [`guest_ram`].
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<GuestBitmap>;

/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<GuestBitmap>;

/// `VIRTIO_F_VERSION_1`: virtio 1.x; the transport refuses drivers without it.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// Features every device here offers on top of its own.
pub const COMMON_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;

/// INTERRUPT_STATUS bit: a queue has new used buffers.
pub const INT_USED_RING: u32 = 0x1;
/// INTERRUPT_STATUS bit: the configuration space changed.
pub const INT_CONFIG_CHANGE: u32 = 0x2;

/// Why a device refused to start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the device expects {expected} queues, the driver set up {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("queue {0} is not ready or does not fit in guest memory")]
    InvalidQueue(usize),
    #[error("no guest memory is attached to the device")]
    NoMemory,
    #[error("device I/O setup failed: {0}")]
    Io(#[from] io::Error),
}

/// A virtio device model, as the transport sees it.
///
/// Implementations keep all guest-visible I/O state behind `activate` /
/// `reset`: before `activate` and after `reset` they must not touch guest
/// memory or raise interrupts.
pub trait VirtioDevice: Send {
    /// Virtio device ID (1 = net, 2 = block).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the number of queues is this length.
    fn queue_max_sizes(&self) -> &[u16];
    /// One notification `EventFd` per queue, owned by the device. The
    /// transport duplicates them (same underlying eventfd) for the VMM.
    fn queue_events(&self) -> &[EventFd];
    /// Features the device offers (including [`COMMON_FEATURES`]).
    fn device_features(&self) -> u64;
    /// Reads from the device-specific config space (offset from 0x100).
    /// Bytes past the end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to the device-specific config space. Read-only fields ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device: the driver set DRIVER_OK. `queues` are validated
    /// and ready, in queue-index order; `acked_features` is what the driver
    /// accepted.
    fn activate(
        &mut self,
        mem: Arc<GuestMemoryMmap>,
        queues: Vec<Queue>,
        acked_features: u64,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError>;
    /// Stops the device and forgets queues, memory and interrupt.
    fn reset(&mut self);
    /// Stops the device as [`reset`](Self::reset) does, for a snapshot, but
    /// returns every queue's state (configuration and positions: next
    /// avail, next used) in queue-index order, so that a later `activate`
    /// with those queues, in this process or another one, carries on
    /// exactly where the device stopped: no request lost, none served
    /// twice.
    ///
    /// When it returns nothing is in flight: every request the device took
    /// from a ring is either completed into the used ring (guest memory;
    /// the interrupt it deserves is raised) or given back to the avail ring
    /// (`next_avail` rewound). An empty vector when not activated. On error
    /// the device keeps running as before.
    fn quiesce(&mut self) -> Result<Vec<QueueState>, StateError>;
    /// Whether `activate` succeeded and no `reset` came since.
    fn is_activated(&self) -> bool;
    /// What a snapshot keeps of the device beyond its queues: the queue
    /// pairs a multi-queue virtio-net's driver enabled (read after
    /// [`quiesce`](Self::quiesce)); `None` for other devices.
    fn saved_queue_pairs(&self) -> Option<u16> {
        None
    }
    /// Puts back what [`saved_queue_pairs`](Self::saved_queue_pairs)
    /// returned, right after a restore's activation.
    fn restore_queue_pairs(&mut self, _pairs: u16) {}
}

/// Copies `config[offset..]` into `data`, zero-filling past the end.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

struct InterruptInner {
    status: AtomicU32,
    config_generation: AtomicU32,
    evt: EventFd,
    /// How many [`DirectUsed`] guards are alive: while any is, something
    /// outside the VMM (vhost-net's kernel workers) writes `evt` itself
    /// for used buffers, and INTERRUPT_STATUS reports the used-ring bit.
    direct: AtomicU32,
    /// What KVM signals in place of the guest's INTERRUPT_ACK of the
    /// used-ring bit alone, once registered as an ioeventfd (see
    /// [`Interrupt::absorb_used_acks`]); nothing reads it.
    ack_evt: EventFd,
    /// Whether those acknowledgements are absorbed by KVM.
    acks_absorbed: AtomicBool,
    /// With acknowledgements absorbed: a used-buffer interrupt was raised
    /// and the guest has not read INTERRUPT_STATUS since (its handler's
    /// first step), so a new signal needs no new interrupt.
    raised: AtomicBool,
    /// Signals asked for, coalesced or not (tests: when a device signals).
    #[cfg(test)]
    asked: std::sync::atomic::AtomicU64,
}

/// The transport's interrupt line: INTERRUPT_STATUS plus the irqfd.
///
/// Cloning shares the same state. An `EventFd` write happens only when a
/// status bit goes from 0 to 1: while the guest has not acknowledged the
/// previous interrupt, its handler will see the new used buffers anyway
/// (it acknowledges before it walks the used ring), so extra interrupts
/// would only cost it spurious handler runs. (Not for the used-ring bit
/// once its acknowledgements are absorbed by KVM:
/// [`Interrupt::absorb_used_acks`].)
#[derive(Clone)]
pub struct Interrupt(Arc<InterruptInner>);

impl Interrupt {
    pub fn new() -> io::Result<Self> {
        Ok(Self(Arc::new(InterruptInner {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            evt: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            direct: AtomicU32::new(0),
            ack_evt: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            acks_absorbed: AtomicBool::new(false),
            raised: AtomicBool::new(false),
            #[cfg(test)]
            asked: Default::default(),
        })))
    }

    /// The eventfd to register as a KVM ioeventfd on INTERRUPT_ACK with
    /// datamatch 1 (the used-ring bit alone, what Linux's handler writes
    /// back for a used-buffer interrupt), before calling
    /// [`Self::absorb_used_acks`]. Nothing reads it: KVM's count saturates.
    pub fn ack_event(&self) -> &EventFd {
        &self.0.ack_evt
    }

    /// From now on the guest's acknowledgements of the used-ring bit alone
    /// do not reach the VMM: KVM completes that MMIO write in the kernel
    /// ([`Self::ack_event`]). A used-buffer interrupt then costs the guest
    /// one exit to user space (its INTERRUPT_STATUS read) instead of two.
    ///
    /// What changes: the VMM no longer sees the guest acknowledge, so
    /// - the used-ring bit stays set until a reset or an acknowledgement
    ///   that reaches the VMM (one that also clears the config bit).
    ///   Linux's virtio-mmio handler reads the bit, writes it back and
    ///   walks every queue, which returns at once for a queue with nothing
    ///   new: a bit set with nothing new is what vhost-net's [`DirectUsed`]
    ///   already reports;
    /// - signals are coalesced from the interrupt raised to the guest's
    ///   next read of INTERRUPT_STATUS (which still reaches the VMM, and
    ///   comes right before the handler walks the rings) instead of to its
    ///   acknowledgement. Not coalescing at all was measured slower: the
    ///   RX and TX queues share the line, and each signal of either became
    ///   an interrupt.
    pub fn absorb_used_acks(&self) {
        self.0.acks_absorbed.store(true, Ordering::SeqCst);
    }

    /// Lets another writer of [`Self::event`] (vhost-net's kernel worker,
    /// whose call eventfd it becomes) raise used-buffer interrupts without
    /// the VMM: until the guard is dropped INTERRUPT_STATUS reports the
    /// used-ring bit set, since virtio-mmio's handler ignores an interrupt
    /// whose bits are clear and the VMM no longer sees each one go by.
    /// Linux then walks every queue's used ring, as it would for the bit;
    /// one with nothing new returns at once. Dropping the guard sets the
    /// bit for real and raises the irqfd once (see [`DirectUsed`]).
    pub fn direct_used(&self) -> DirectUsed {
        self.0.direct.fetch_add(1, Ordering::SeqCst);
        DirectUsed(self.clone())
    }

    /// Signals used buffers on some queue (INTERRUPT_STATUS bit 0).
    pub fn signal_used_queue(&self) {
        self.signal(INT_USED_RING);
    }

    /// Signals a configuration change (bit 1) and bumps ConfigGeneration.
    pub fn signal_config_change(&self) {
        self.0.config_generation.fetch_add(1, Ordering::SeqCst);
        self.signal(INT_CONFIG_CHANGE);
    }

    fn signal(&self, bit: u32) {
        #[cfg(test)]
        self.0.asked.fetch_add(1, Ordering::SeqCst);
        let old = self.0.status.fetch_or(bit, Ordering::SeqCst);
        let raise = if bit == INT_USED_RING && self.0.acks_absorbed.load(Ordering::Relaxed) {
            !self.0.raised.swap(true, Ordering::SeqCst)
        } else {
            old & bit == 0
        };
        if raise {
            if let Err(e) = self.0.evt.write(1) {
                tracing::warn!("virtio: cannot signal interrupt eventfd: {e}");
            }
        }
    }

    /// How many signals the device asked for, including those that
    /// found the bit still set and wrote no irqfd (tests).
    #[cfg(test)]
    pub(crate) fn asked(&self) -> u64 {
        self.0.asked.load(Ordering::SeqCst)
    }

    /// Current INTERRUPT_STATUS: the bits pending, and the used-ring bit
    /// while a [`DirectUsed`] guard lives.
    pub fn status(&self) -> u32 {
        let pending = self.0.status.load(Ordering::SeqCst);
        if self.0.direct.load(Ordering::SeqCst) > 0 {
            pending | INT_USED_RING
        } else {
            pending
        }
    }

    /// INTERRUPT_STATUS as the guest reads it: [`Self::status`], and from
    /// here on a used-buffer signal raises the line again (see
    /// [`Self::absorb_used_acks`]).
    pub fn read_by_guest(&self) -> u32 {
        // Cleared before the bits are read: a signal after this point
        // raises the line again; one before it is covered by this read and
        // the walk of the rings that follows it.
        self.0.raised.swap(false, Ordering::SeqCst);
        self.status()
    }

    /// What `status` shows: the bits raised that the guest's handler has
    /// not taken. With acknowledgements kept in KVM the used bit stays set
    /// for good, so it counts here only while an interrupt the VMM raised
    /// waits for the guest's read of INTERRUPT_STATUS.
    pub fn untaken(&self) -> u32 {
        let pending = self.pending();
        if self.0.acks_absorbed.load(Ordering::Relaxed) && !self.0.raised.load(Ordering::SeqCst) {
            pending & !INT_USED_RING
        } else {
            pending
        }
    }

    /// The bits the VMM raised and the guest has not acknowledged, without
    /// the used-ring bit a [`DirectUsed`] guard reports: what a snapshot
    /// keeps (a quiesce sets the bit for real first). With
    /// acknowledgements kept in KVM that is the used bit once raised, so a
    /// restore raises one interrupt that may find nothing new (harmless).
    pub fn pending(&self) -> u32 {
        self.0.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the given bits.
    pub fn ack(&self, bits: u32) {
        self.0.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears every pending bit (device reset).
    pub fn clear(&self) {
        self.0.status.store(0, Ordering::SeqCst);
        self.0.raised.store(false, Ordering::SeqCst);
    }

    /// Puts INTERRUPT_STATUS and ConfigGeneration back as saved (snapshot
    /// restore). With a bit pending it fires the irqfd once: the guest may
    /// not have taken the interrupt that set the bit before the snapshot,
    /// and a spurious interrupt is harmless where a lost one wedges the
    /// driver.
    pub fn restore(&self, status: u32, config_generation: u32) {
        self.0
            .config_generation
            .store(config_generation, Ordering::SeqCst);
        self.0.status.store(status, Ordering::SeqCst);
        self.0.raised.store(status != 0, Ordering::SeqCst);
        if status != 0 {
            if let Err(e) = self.0.evt.write(1) {
                tracing::warn!("virtio: cannot signal interrupt eventfd: {e}");
            }
        }
    }

    /// ConfigGeneration register value.
    pub fn config_generation(&self) -> u32 {
        self.0.config_generation.load(Ordering::SeqCst)
    }

    /// The eventfd to register as the KVM irqfd.
    pub fn event(&self) -> &EventFd {
        &self.0.evt
    }
}

/// While alive, used-buffer interrupts come from outside the VMM: see
/// [`Interrupt::direct_used`]. Drop it once the other writer has stopped.
pub struct DirectUsed(Interrupt);

impl Drop for DirectUsed {
    /// The reported bit goes, while an interrupt the other writer raised
    /// may still wait for the guest, whose handler would then find the bit
    /// clear: the bit is set for real instead (a no-op when it already
    /// is). A spurious interrupt costs the guest a look at its rings; a
    /// lost one stalls a queue for good (EVENT_IDX). After a device reset
    /// the transport clears it again.
    fn drop(&mut self) {
        self.0 .0.direct.fetch_sub(1, Ordering::SeqCst);
        self.0.signal_used_queue();
    }
}

/// The guest memory the devices use, shared between the VMM and all
/// transports and swappable per boot.
///
/// The transport takes a snapshot (`Arc<GuestMemoryMmap>`) at DRIVER_OK and
/// hands it to the device; the device drops it on reset. Replacing the memory
/// therefore takes effect at the next activation: reset the transports first.
#[derive(Clone, Default)]
pub struct GuestMemoryHandle(Arc<RwLock<Option<Arc<GuestMemoryMmap>>>>);

impl GuestMemoryHandle {
    pub fn new(mem: GuestMemoryMmap) -> Self {
        let h = Self::default();
        h.set(Arc::new(mem));
        h
    }

    /// A handle with no memory yet: activation fails until `set`.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Installs the memory for the next boot.
    pub fn set(&self, mem: Arc<GuestMemoryMmap>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
    }

    /// Drops the memory (devices keep their snapshot until reset).
    pub fn clear(&self) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The current memory, if any.
    pub fn get(&self) -> Option<Arc<GuestMemoryMmap>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The end of a pass over a queue in a device's serve loop (disable
/// kicks, pop all, re-arm): turns the guest's kicks back on and says
/// whether to pass again. Yes when more arrived meanwhile; also once after
/// a pass that popped nothing, since the guest may have published between
/// that pass's look and the re-arm while told not to kick; but not twice,
/// as an avail index that moved yet yields nothing is a broken ring and
/// would spin. `rechecked` carries that "once" across a wake-up's passes.
pub(crate) fn rearm_and_recheck(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    popped: bool,
    rechecked: &mut bool,
    dev: &str,
) -> bool {
    use virtio_queue::QueueT;
    match q.enable_notification(mem) {
        Ok(true) if popped || !*rechecked => {
            *rechecked |= !popped;
            true
        }
        Ok(_) => false,
        Err(e) => {
            tracing::debug!("{dev}: enable_notification: {e}");
            false
        }
    }
}

/// Drains a queue-notification eventfd; `EAGAIN` (nothing pending) is fine.
pub(crate) fn drain_eventfd(evt: &EventFd) {
    if let Err(e) = evt.read() {
        if e.kind() != io::ErrorKind::WouldBlock {
            tracing::warn!("virtio: reading a queue eventfd failed: {e}");
        }
    }
}

/// Creates `n` nonblocking queue-notification eventfds.
pub(crate) fn new_queue_events(n: usize) -> io::Result<Vec<EventFd>> {
    (0..n)
        .map(|_| EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC))
        .collect()
}
