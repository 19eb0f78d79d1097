//! The vhost-net datapath: the host kernel moves frames between the TAP and
//! the guest's rings (`/dev/vhost-net`, the rust-vmm `vhost` crate).
//!
//! The VMM still owns the device (features, config space, activation,
//! reset); at DRIVER_OK it hands the kernel the guest memory table, each
//! ring's addresses and position, the queue-notification eventfd the guest
//! kicks (the same one KVM's ioeventfd writes, so a kick reaches the kernel
//! without the VMM) and the TAP. The kernel's "used buffers" signals go
//! straight to the guest: every queue's call eventfd is the device's
//! irqfd, so KVM injects the interrupt without waking the VMM. Since
//! virtio-mmio's handler ignores an interrupt whose INTERRUPT_STATUS bits
//! are clear, the device reports the used-ring bit set while the kernel's
//! datapath runs ([`Interrupt::direct_used`]); Linux then walks each
//! queue's used ring, which costs nothing for a queue with nothing new.
//! (Until 2026-12-07 the VMM's event loop relayed each call into the bit
//! and the irqfd: one thread wake-up per interrupt, as QEMU's virtio-mmio
//! still does.)
//!
//! The TAP keeps its 12-byte vnet header (`VHOST_NET_F_VIRTIO_NET_HDR` is
//! not negotiated): the kernel passes the guest's header through to the
//! TAP and fills in `num_buffers` on receive with MRG_RXBUF, so offloads
//! (`TUNSETOFFLOAD`) work exactly as on the userspace path.
//!
//! A hostile guest's rings are the kernel's to check here; the VMM only
//! checks what it passes in (ring addresses inside guest memory, the queue
//! sizes), and a reset stops the kernel's use of guest memory before it
//! returns (`VHOST_NET_SET_BACKEND` -1 stops a queue and flushes it).
//!
//! A multi-queue device has one vhost-net instance per queue pair, each
//! with its TAP queue (so one kernel worker per pair, as QEMU does), and
//! the VMM keeps serving the control queue.
//!
//! `/dev/vhost-net` is opened once per pair, when the device is made
//! (start-up, still root), and those instances serve every activation of
//! the device, as QEMU does: a reset detaches the TAP from both queues, the
//! next DRIVER_OK programs the instance again. So a VMM that has dropped to
//! `--user` and confined itself (Landlock) keeps vhost-net across guest
//! reboots and driver resets without being able to open the node, which
//! Debian leaves to root (0600).
//!
//! The kernel's writes into guest memory (received frames, used rings) do
//! not reach the guest memory's dirty bitmap
//! ([`take_dirty_pages`](crate::virtio::take_dirty_pages)): vhost can log
//! them (`VHOST_F_LOG_ALL`), but this VMM does not ask it to, so a VM being
//! live-migrated must run its network on the userspace datapath.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt as _;

use vhost::vhost_kern::vhost_binding::{
    vhost_vring_file, vhost_vring_state, VHOST, VHOST_NET_SET_BACKEND,
};
use vhost::vhost_kern::VhostKernBackend;
use vhost::{VhostBackend as _, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Address as _, Bytes as _, GuestAddress};
use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};
use vmm_sys_util::eventfd::EventFd;

use super::F_MRG_RXBUF;

/// A vhost-net instance's vrings: each serves one queue pair.
const RX: usize = 0;
const TX: usize = 1;
use crate::virtio::{
    DirectUsed, GuestMemoryMmap, Interrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};

// The kernel's busy polling of a vring (Linux 4.6), which the `vhost`
// crate does not wrap. The GET is declared _IOW by the kernel too.
vmm_sys_util::ioctl_iow_nr!(
    VHOST_SET_VRING_BUSYLOOP_TIMEOUT,
    VHOST,
    0x23,
    vhost_vring_state
);
vmm_sys_util::ioctl_iow_nr!(
    VHOST_GET_VRING_BUSYLOOP_TIMEOUT,
    VHOST,
    0x24,
    vhost_vring_state
);

/// Where vhost-net lives.
pub const VHOST_NET_DEV: &str = "/dev/vhost-net";

/// The guest features the kernel datapath itself must know about (the
/// offloads are the TAP's business, not vhost's).
const VHOST_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX | F_MRG_RXBUF;

/// Which datapath a `--net` asks for (`vhost=auto|on|off`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VhostMode {
    /// vhost-net where `/dev/vhost-net` can be opened, else userspace.
    #[default]
    Auto,
    /// vhost-net, and an error at start-up where it cannot be opened.
    On,
    /// The VMM's own userspace datapath.
    Off,
}

impl std::str::FromStr for VhostMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(VhostMode::Auto),
            "on" => Ok(VhostMode::On),
            "off" => Ok(VhostMode::Off),
            _ => Err(format!("vhost={s}: expected auto, on or off")),
        }
    }
}

impl VhostMode {
    /// The vhost-net instances activations will use, one per queue pair,
    /// or none for the userspace datapath: `on` insists (an error where
    /// `/dev/vhost-net` cannot be opened), `auto` takes them where they
    /// open.
    pub fn resolve(self, pairs: usize) -> io::Result<Vec<File>> {
        let all = || (0..pairs).map(|_| open()).collect::<io::Result<Vec<_>>>();
        match self {
            VhostMode::Off => Ok(Vec::new()),
            VhostMode::On => all(),
            VhostMode::Auto => Ok(all().unwrap_or_default()),
        }
    }
}

/// A new vhost-net instance. (Opening the node is the only real test of
/// it: it may exist with the module unloaded or the mode denied.)
pub fn open() -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(Path::new(VHOST_NET_DEV))
}

/// The device's vhost-net instance as the `vhost` crate's ioctls want it:
/// a descriptor of the instance opened at start-up (the crate's own
/// `vhost_kern::net::Net` opens a new instance, which a confined VMM could
/// not) and the guest memory its ring addresses are checked against.
struct Handle {
    fd: File,
    mem: Arc<GuestMemoryMmap>,
}

impl AsRawFd for Handle {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl VhostKernBackend for Handle {
    type AS = Arc<GuestMemoryMmap>;

    fn mem(&self) -> &Self::AS {
        &self.mem
    }
}

impl Handle {
    /// `VHOST_NET_SET_BACKEND`: `tap` serves queue `index` from now on;
    /// `None` stops the queue (the kernel flushes it before returning).
    fn set_backend(&self, index: usize, tap: Option<&File>) -> io::Result<()> {
        let arg = vhost_vring_file {
            index: u32::try_from(index)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
            fd: tap.map_or(-1, |t| t.as_raw_fd()),
        };
        // SAFETY: the descriptor is a vhost-net instance we own, the
        // argument is the `vhost_vring_file` this ioctl reads (and does not
        // keep), and the result is checked.
        let ret =
            unsafe { vmm_sys_util::ioctl::ioctl_with_ref(self, VHOST_NET_SET_BACKEND(), &arg) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Asks the kernel's worker to busy-poll queue `index` (its ring and
    /// the TAP) for up to `us` µs before it sleeps (0: not at all), and
    /// returns what the kernel now holds.
    fn set_busyloop(&self, index: usize, us: u32) -> io::Result<u32> {
        let index =
            u32::try_from(index).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let set = vhost_vring_state { index, num: us };
        // SAFETY: the descriptor is a vhost-net instance we own; the ioctl
        // reads the `vhost_vring_state` given (and does not keep it).
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_ref(self, VHOST_SET_VRING_BUSYLOOP_TIMEOUT(), &set)
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut got = vhost_vring_state { index, num: 0 };
        // SAFETY: as above; the kernel writes the whole `vhost_vring_state`
        // it is given, which lives across the call.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(
                self,
                VHOST_GET_VRING_BUSYLOOP_TIMEOUT(),
                &mut got,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(got.num)
    }
}

/// Why the kernel datapath could not start.
#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    #[error("{what}: {source}")]
    Ioctl {
        what: &'static str,
        source: vhost::Error,
    },
    #[error("the kernel's vhost-net lacks features {0:#x}")]
    Features(u64),
    #[error("queue {0}: its rings are not inside guest memory")]
    Ring(usize),
    #[error("VHOST_NET_SET_BACKEND: {0}")]
    Backend(io::Error),
    #[error("cannot duplicate a descriptor: {0}")]
    Dup(io::Error),
    #[error("{0} queue pairs, but fewer vhost-net instances or TAP queues")]
    Pairs(usize),
}

/// A running kernel datapath; dropping it (or [`VhostPath::stop`]) stops
/// it: the TAP is detached from both queues, and the vhost-net instance
/// waits, idle, for the device's next activation.
pub(super) struct VhostPath {
    handle: Handle,
    /// The kernel holds references to these; keep them for its lifetime.
    _tap: File,
    /// The kernel raises the irqfd itself while this lives; dropped after
    /// [`Drop::drop`] has detached the queues.
    _direct: DirectUsed,
    /// The queues as handed over (RX, TX): their configuration, for
    /// [`VhostPath::quiesce`] to return with the kernel's positions.
    queues: [QueueState; 2],
    /// How long (µs) the kernel's worker busy-polls both queues, as the
    /// kernel reported it (0: it does not).
    poll_us: u32,
}

impl VhostPath {
    /// Programs vhost-net instance `dev` for `queues` (RX, TX), guest
    /// kicks on `kicks`, its used-buffer signals on `interrupt`'s irqfd;
    /// the kernel does nothing with them until [`Self::attach`].
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start(
        dev: &File,
        mem: Arc<GuestMemoryMmap>,
        queues: [&Queue; 2],
        acked: u64,
        tap: File,
        kicks: &[EventFd],
        interrupt: &Interrupt,
        poll_us: u32,
    ) -> Result<Self, VhostError> {
        let ioctl = |what: &'static str| move |source| VhostError::Ioctl { what, source };
        let fd = dev.try_clone().map_err(VhostError::Dup)?;
        // From here on a failure drops `path`, which detaches whatever
        // queue was already handed over.
        let mut path = VhostPath {
            handle: Handle {
                fd,
                mem: mem.clone(),
            },
            _tap: tap,
            _direct: interrupt.direct_used(),
            queues: [queues[RX].state(), queues[TX].state()],
            poll_us: 0,
        };
        let handle = &path.handle;
        // The first activation makes this process the instance's owner;
        // later ones find it owned already (EBUSY), by us.
        match handle.set_owner() {
            Err(vhost::Error::IoctlError(e)) if e.raw_os_error() == Some(libc::EBUSY) => {}
            r => r.map_err(ioctl("VHOST_SET_OWNER"))?,
        }
        let offered = handle.get_features().map_err(ioctl("VHOST_GET_FEATURES"))?;
        let want = acked & VHOST_FEATURES;
        if want & !offered != 0 {
            return Err(VhostError::Features(want & !offered));
        }
        handle
            .set_features(want)
            .map_err(ioctl("VHOST_SET_FEATURES"))?;
        let regions: Vec<VhostUserMemoryRegionInfo> = mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                mmap_offset: 0,
                mmap_handle: -1,
            })
            .collect();
        handle
            .set_mem_table(&regions)
            .map_err(ioctl("VHOST_SET_MEM_TABLE"))?;
        for (i, q) in queues.iter().enumerate() {
            let ring = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: q.desc_table(),
                used_ring_addr: q.used_ring(),
                avail_ring_addr: q.avail_ring(),
                log_addr: None,
            };
            if !handle.is_valid(&ring) {
                return Err(VhostError::Ring(i));
            }
            handle
                .set_vring_num(i, q.size())
                .map_err(ioctl("VHOST_SET_VRING_NUM"))?;
            // The addresses are translated through the memory table here:
            // one outside guest memory fails.
            handle
                .set_vring_addr(i, &ring)
                .map_err(|_| VhostError::Ring(i))?;
            handle
                .set_vring_base(i, q.next_avail())
                .map_err(ioctl("VHOST_SET_VRING_BASE"))?;
            // KVM's irqfd: the kernel's signal is the guest's interrupt.
            handle
                .set_vring_call(i, interrupt.event())
                .map_err(ioctl("VHOST_SET_VRING_CALL"))?;
            handle
                .set_vring_kick(i, &kicks[i])
                .map_err(ioctl("VHOST_SET_VRING_KICK"))?;
        }
        // Set on every activation, 0 included: the instance outlives them.
        // A kernel without busy polling still moves frames: a warning, if
        // polling was asked for.
        let held = [RX, TX].map(|i| handle.set_busyloop(i, poll_us));
        path.poll_us = match held {
            [Ok(rx), Ok(tx)] => rx.min(tx),
            [Err(e), _] | [_, Err(e)] => {
                if poll_us > 0 {
                    tracing::warn!("vhost-net: busy polling (poll_us={poll_us}) refused: {e}");
                }
                0
            }
        };
        Ok(path)
    }

    /// Hands the TAP to both queues: from here the kernel moves frames.
    /// Buffers the driver posted before DRIVER_OK (and kicks that came
    /// before the kernel listened) are picked up now.
    fn attach(&self, kicks: &[EventFd]) -> Result<(), VhostError> {
        for i in [RX, TX] {
            self.handle
                .set_backend(i, Some(&self._tap))
                .map_err(VhostError::Backend)?;
        }
        for k in kicks {
            let _ = k.write(1);
        }
        Ok(())
    }

    /// Stops the kernel datapath as dropping it does and returns where
    /// each queue (RX, TX) stopped, for a snapshot. Detaching a queue's
    /// backend flushes it, so every chain the kernel took is used by then:
    /// `VHOST_GET_VRING_BASE` gives the next avail index, the used ring's
    /// index in guest memory the next used one. Where a queue cannot be detached
    /// the ones already detached are attached again: the datapath keeps
    /// running, and the reason comes back.
    pub(super) fn quiesce(&mut self) -> Result<[QueueState; 2], String> {
        for (n, i) in [RX, TX].into_iter().enumerate() {
            if let Err(e) = self.handle.set_backend(i, None) {
                self.reattach(n);
                return Err(format!("detaching the TAP from vhost-net queue {i}: {e}"));
            }
        }
        for i in [RX, TX] {
            // Validated at start, and the memory is held: only a bug gets
            // here, and then the datapath goes on rather than lose track.
            let Some(used) = self.used_idx(i) else {
                self.reattach(2);
                return Err(format!("vhost-net queue {i}: cannot read the used ring"));
            };
            let avail = match self.handle.get_vring_base(i).map(u16::try_from) {
                Ok(Ok(a)) => a,
                other => {
                    // As QEMU does: with the queue flushed every chain the
                    // kernel took was used, so the used index is where it
                    // stopped.
                    tracing::warn!(
                        "vhost-net: VHOST_GET_VRING_BASE {i}: {other:?}; using the used index"
                    );
                    used
                }
            };
            if let Some(q) = self.queues.get_mut(i) {
                q.next_avail = avail;
                q.next_used = used;
            }
        }
        // The caller drops the path, which detaches the queues again (a
        // no-op for the kernel) and, with its guard, sets the used-ring
        // bit it reported.
        Ok(self.queues)
    }

    /// Attaches the TAP again to the first `n` queues (RX, TX) after a
    /// failed [`Self::quiesce`]: the datapath carries on.
    fn reattach(&self, n: usize) {
        for j in [RX, TX].into_iter().take(n) {
            if let Err(e) = self.handle.set_backend(j, Some(&self._tap)) {
                tracing::error!("vhost-net: re-attaching the TAP to queue {j}: {e}");
            }
        }
    }

    /// Attaches the TAP again to both queues, after a quiesce whose
    /// snapshot failed on another pair.
    pub(super) fn reattach_all(&self) {
        self.reattach(2);
    }

    /// The used ring's index of queue `i`, from guest memory.
    fn used_idx(&self, i: usize) -> Option<u16> {
        let q = self.queues.get(i)?;
        let addr = GuestAddress(q.used_ring).checked_add(2)?;
        self.handle.mem.read_obj::<u16>(addr).ok().map(u16::from_le)
    }
}

impl Drop for VhostPath {
    fn drop(&mut self) {
        for i in [RX, TX] {
            if let Err(e) = self.handle.set_backend(i, None) {
                tracing::warn!("vhost-net: detaching the TAP from queue {i}: {e}");
            }
        }
        // `_direct` goes after this: the used-ring bit is set for real.
    }
}

impl super::Net {
    /// Replaces the running kernel datapath (none: empty), and with it
    /// what `status` says vhost-net's workers busy-poll: what the kernel
    /// holds for these paths, 0 without any. Every change of `vhost` goes
    /// through here, so the two cannot disagree.
    pub(super) fn set_vhost(&mut self, paths: Vec<VhostPath>) {
        let held = paths.iter().map(|p| p.poll_us).min().unwrap_or(0);
        self.counters
            .poll_us
            .store(held, std::sync::atomic::Ordering::Relaxed);
        self.vhost = paths;
    }

    /// Hands the activated queue pairs to the kernel, each on its own
    /// vhost-net instance (the device's) and TAP queue. All or none: a
    /// pair that fails stops the ones started.
    pub(super) fn start_vhost(
        &self,
        mem: &Arc<GuestMemoryMmap>,
        pairs: &mut [(Queue, Queue)],
        acked: u64,
        interrupt: &Interrupt,
    ) -> Result<Vec<VhostPath>, VhostError> {
        use std::os::fd::AsRawFd;
        // Every instance is programmed before any is handed its TAP: a
        // failure up to there leaves the rings untouched by the kernel.
        let mut paths = Vec::with_capacity(pairs.len());
        for (p, (rx, tx)) in pairs.iter().enumerate() {
            let (Some(dev), Some(tap)) = (self.vhost_dev.get(p), self.taps.get(p)) else {
                return Err(VhostError::Pairs(pairs.len()));
            };
            let Some(kicks) = self.pair_fds(&self.queue_evts, p) else {
                return Err(VhostError::Pairs(pairs.len()));
            };
            // The kernel takes its own reference to the TAP's file; a
            // duplicate keeps ours independent of it.
            // SAFETY: the TAP's descriptor is open for as long as `self`;
            // the borrowed descriptor is only duplicated here.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(tap.as_raw_fd()) };
            let tap = File::from(fd.try_clone_to_owned().map_err(VhostError::Dup)?);
            paths.push(VhostPath::start(
                dev,
                mem.clone(),
                [rx, tx],
                acked,
                tap,
                kicks,
                interrupt,
                self.poll_us,
            )?);
        }
        for p in 0..paths.len() {
            let kicks = self.pair_fds(&self.queue_evts, p).unwrap_or_default();
            let Err(e) = paths[p].attach(kicks) else {
                continue;
            };
            // The pairs attached may have moved already: the userspace
            // datapath takes over from where the kernel stopped.
            for (q, path) in pairs.iter_mut().zip(paths.iter_mut()) {
                if let Ok([rx, tx]) = path.quiesce() {
                    for (queue, st) in [(&mut q.0, rx), (&mut q.1, tx)] {
                        queue.set_next_avail(st.next_avail);
                        queue.set_next_used(st.next_used);
                    }
                }
            }
            return Err(e);
        }
        Ok(paths)
    }

    /// Pair `p`'s two eventfds (RX, TX) of `fds`.
    fn pair_fds<'a>(&self, fds: &'a [EventFd], p: usize) -> Option<&'a [EventFd]> {
        fds.get(super::rx_index(p)..super::tx_index(p) + 1)
    }

    /// Wakes the event loop to re-register (see [`Self::sync_registrations`]).
    pub(super) fn wake_event_loop(&self) {
        if let Err(e) = self.wake.write(1) {
            tracing::warn!(
                "virtio-net {}: cannot wake the event loop: {e}",
                self.tap_name()
            );
        }
    }

    /// Polls the queue eventfds except those vhost-net serves (the
    /// control queue, and any queue no running pair has, stay polled), and
    /// the TAP never while the kernel's datapath runs.
    pub(super) fn sync_registrations(&mut self, ops: &mut event_manager::EventOps) {
        use event_manager::{EventSet, Events};
        let served: Vec<usize> = (0..2 * self.vhost.len()).collect();
        let changes: Vec<(usize, bool)> = self
            .unpolled
            .iter()
            .filter(|i| !served.contains(i))
            .map(|&i| (i, true))
            .chain(
                served
                    .iter()
                    .filter(|i| !self.unpolled.contains(i))
                    .map(|&i| (i, false)),
            )
            .collect();
        for (i, on) in changes {
            let Some(evt) = self.queue_evts.get(i) else {
                continue;
            };
            let ev = Events::with_data(evt, self.queue_token(i).data(), EventSet::IN);
            let r = if on { ops.add(ev) } else { ops.remove(ev) };
            if let Err(e) = r {
                tracing::error!(
                    "virtio-net {}: cannot change queue polling: {e:?}",
                    self.tap_name()
                );
            }
        }
        self.unpolled = served;
        if !self.vhost.is_empty() {
            for p in 0..self.taps.len() {
                self.set_tap_polling(p, ops, false);
            }
        }
    }
}
