//! The io_uring I/O engine: reads, writes and flushes of many requests in
//! flight at once, completed through an eventfd the disk's event loop
//! watches.
//!
//! - **Memory.** Each request in flight keeps its iovecs (pointers into guest
//!   memory) and an `Arc` of that guest memory, so the mapping outlives the
//!   kernel's use of it even if the device is reset or the VM reboots meanwhile;
//!   a device reset still waits for every request in flight ([`Uring::wait_all`])
//!   so that no completion of the old queue reaches the new one.
//! - **Ordering.** A FLUSH is submitted with `IOSQE_IO_DRAIN`: it starts only
//!   once every request submitted before it has completed, and nothing after
//!   it starts before it completes. So it covers every write the guest had
//!   completed (and even the ones still in flight) when it asked.
//! - **Capacity.** The ring has as many entries as the virtqueue: a request
//!   holds its descriptor head until completed, so there can never be more in
//!   flight than the queue's size.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::super::iov::{mark_written, Seg};
use super::super::GuestMemoryMmap;

/// What a request asks of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IoKind {
    Read,
    Write,
    Flush,
}

/// One request's I/O, from parsing to completion.
pub(super) struct IoOp {
    pub kind: IoKind,
    pub off: u64,
    pub len: u64,
    /// The guest buffers (for the bounce-buffer fallback) and their iovecs.
    pub segs: Vec<Seg>,
    pub iovs: Vec<libc::iovec>,
}

impl IoOp {
    /// Marks the guest buffers a read filled dirty (see
    /// [`mark_written`]); called once the read is over, whatever its
    /// result: a failed or short read may still have written some of them,
    /// and marking a page that did not change costs only a resend.
    pub fn mark_read_dirty(&self, mem: &GuestMemoryMmap) {
        if self.kind == IoKind::Read {
            mark_written(mem, &self.segs, self.len);
        }
    }
}

/// A request in flight: what to tell the guest when it completes.
pub(super) struct InFlight {
    /// The queue it came from (and goes back to).
    pub queue: usize,
    pub head: u16,
    pub status_addr: GuestAddress,
    pub op: IoOp,
    /// Keeps the guest memory the iovecs point into mapped.
    pub mem: Arc<GuestMemoryMmap>,
}

// SAFETY: the raw pointers in `iovecs` point into guest memory kept alive by `mem`; they are
// only handed to the kernel and never dereferenced by Rust code, so moving an `InFlight` to
// another thread is as safe as moving the `Arc` itself.
unsafe impl Send for InFlight {}

/// How long dropping the engine waits for requests in flight.
const DROP_WAIT: Duration = Duration::from_secs(2);

pub(super) struct Uring {
    ring: IoUring,
    evt: EventFd,
    slots: Vec<Option<InFlight>>,
    free: Vec<u32>,
    in_flight: usize,
}

impl Uring {
    /// A ring of `entries` (the queue size) whose completions signal an eventfd.
    pub(super) fn new(entries: u16) -> io::Result<Self> {
        let ring = IoUring::new(u32::from(entries.max(1)).next_power_of_two())?;
        let evt = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        ring.submitter().register_eventfd(evt.as_raw_fd())?;
        Ok(Uring {
            ring,
            evt,
            slots: (0..entries).map(|_| None).collect(),
            free: (0..u32::from(entries)).rev().collect(),
            in_flight: 0,
        })
    }

    pub(super) fn event(&self) -> &EventFd {
        &self.evt
    }

    /// The kernel posted completions not taken yet (a look at the shared
    /// ring, no system call).
    pub(super) fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Requests handed to the kernel and not completed yet.
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues `req` (submitted by the next [`Uring::submit`]). Gives it back when the ring
    /// cannot take it (full, or more iovecs than one call accepts): the caller runs it
    /// synchronously instead.
    pub(super) fn push(&mut self, fd: RawFd, req: InFlight) -> Result<(), InFlight> {
        if req.op.iovs.len() > super::super::iov::IOV_MAX {
            return Err(req);
        }
        let Some(slot) = self.free.pop() else {
            return Err(req);
        };
        let fd = types::Fd(fd);
        let n_iov = req.op.iovs.len() as u32;
        let sqe = match req.op.kind {
            IoKind::Read => opcode::Readv::new(fd, req.op.iovs.as_ptr(), n_iov)
                .offset(req.op.off)
                .build(),
            IoKind::Write => opcode::Writev::new(fd, req.op.iovs.as_ptr(), n_iov)
                .offset(req.op.off)
                .build(),
            IoKind::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .flags(squeue::Flags::IO_DRAIN),
        }
        .user_data(u64::from(slot));
        // SAFETY: the iovec array and the guest memory it points into live in `req`, which
        // stays in `self.slots[slot]` until the kernel's completion for `slot` is reaped
        // (`reap`/`wait_all`), and `Drop` waits for every request in flight.
        let pushed = unsafe { self.ring.submission().push(&sqe) };
        if pushed.is_err() {
            self.free.push(slot);
            return Err(req);
        }
        self.slots[slot as usize] = Some(req);
        self.in_flight += 1;
        Ok(())
    }

    /// Hands the queued requests to the kernel. Nothing queued, no system
    /// call: a wake-up that only returned completions or answered GET_ID
    /// costs no `io_uring_enter`.
    pub(super) fn submit(&mut self) -> io::Result<()> {
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // Completion queue full: reap first (the caller's next `reap` does).
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes every completion the kernel has posted: `(request, result)` where the result is
    /// the bytes moved or `-errno`. The eventfd is not read: the event loop
    /// watches it edge-triggered (each completion the kernel posts is a new
    /// edge), and every completion posted before this call is taken.
    pub(super) fn reap(&mut self, mut done: impl FnMut(InFlight, i32)) {
        loop {
            let Some(cqe) = self.ring.completion().next() else {
                return;
            };
            let slot = cqe.user_data();
            let Some(req) = usize::try_from(slot)
                .ok()
                .and_then(|s| self.slots.get_mut(s))
                .and_then(Option::take)
            else {
                continue;
            };
            self.free.push(slot as u32);
            self.in_flight -= 1;
            done(req, cqe.result());
        }
    }

    /// Waits for every request in flight until `deadline` at most, handing
    /// each completion to `done` (a snapshot, or a VMM stopping, must not
    /// hang on a dead disk); what is left stays in flight.
    pub(super) fn wait_all_until(
        &mut self,
        deadline: Instant,
        mut done: impl FnMut(InFlight, i32),
    ) {
        // Anything still queued (held back by EBUSY) would never complete.
        if let Err(e) = self.submit() {
            tracing::warn!("virtio-blk: io_uring submit: {e}");
        }
        while self.in_flight > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            self.wait_event(left);
            self.reap(&mut done);
        }
    }

    /// Sleeps until the kernel posts a completion, `left` at most (a
    /// snapshot's wait, and the wait at exit). The eventfd is read here
    /// (and only here): the event loop never reads it,
    /// so it stays readable after the first completion, and a wait that did
    /// not empty it would not sleep.
    fn wait_event(&self, left: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.evt.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd, for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, ms) };
        // Emptied before the caller reaps: a completion posted after that
        // makes it readable again, so the next wait does not miss it.
        let _ = self.evt.read();
    }

    pub(super) fn wait_all(&mut self, mut done: impl FnMut(InFlight, i32)) {
        while self.in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    // Cannot wait: the requests stay in their slots (their memory with them)
                    // until the ring itself goes away.
                    tracing::error!("virtio-blk: io_uring wait failed: {e}");
                    return;
                }
            }
            self.reap(&mut done);
        }
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // The kernel may still write into the buffers of requests in flight: wait for them,
        // but not for ever (a VMM stopping must not hang on a dead disk). What is still in
        // flight then keeps its guest memory mapped for good (leaked), so a late completion
        // can never land in memory reused for something else.
        self.wait_all_until(Instant::now() + DROP_WAIT, |req, _| {
            req.op.mark_read_dirty(&req.mem)
        });
        if self.in_flight > 0 {
            tracing::warn!(
                "virtio-blk: {} requests still in flight at exit; their guest memory stays mapped",
                self.in_flight
            );
            for req in self.slots.drain(..).flatten() {
                std::mem::forget(req);
            }
        }
    }
}
