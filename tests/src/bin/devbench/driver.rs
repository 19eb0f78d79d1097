//! A host-side virtio driver that plays the guest: it programs the real
//! virtio-mmio transport through its registers (as the guest's MMIO writes
//! would), writes descriptor chains into guest memory, kicks the queue
//! through the device's queue eventfd (what KVM's ioeventfd does on a guest
//! write to QueueNotify) and waits on the interrupt eventfd (what KVM's irqfd
//! would inject), while the device runs on the VMM's real event loop
//! (`event-manager`) on its own thread.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::virtio::mmio::{reg, status};
use devices::virtio::{
    GuestMemoryHandle, GuestMemoryMmap, MmioTransport, VirtioDevice, INT_USED_RING,
};
use devices::BusDevice;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Descriptor flags.
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// The device, its transport and the event-loop thread serving it.
pub struct Driver {
    pub mem: Arc<GuestMemoryMmap>,
    transport: MmioTransport,
    notify: Vec<EventFd>,
    irq: EventFd,
    stop: Arc<AtomicBool>,
    /// The event-loop thread's id, for its CPU time in /proc.
    loop_tid: libc::pid_t,
    event_loop: Option<JoinHandle<()>>,
    /// Whether, and how, the driver polls for its interrupt before it
    /// sleeps (see [`HaltPoll`]).
    halt_poll: Option<HaltPoll>,
}

/// KVM's halt polling (`virt/kvm/kvm_main.c`, `kvm_vcpu_halt`), which every
/// vCPU on a KVM host does by default: a vCPU that halts waiting for an
/// interrupt first checks for one for up to its window before the host
/// schedules its thread out, so an interrupt that comes within the window
/// costs no scheduler wake-up. The window adapts per vCPU: it starts at
/// nothing, grows to 10 µs and then doubles when a halt ended after the
/// window but within `halt_poll_ns` (x86's default 200 µs), and drops to
/// nothing after a halt longer than that (`halt_poll_ns_shrink=0`). The
/// harness's driver stands in for the guest's vCPU; with this it waits for
/// the device's interrupt as such a vCPU does, still interrupt-driven: the
/// device decides to signal and writes the irqfd, the driver sees the
/// eventfd become readable.
#[derive(Clone, Copy, Debug, Default)]
pub struct HaltPoll {
    window: Duration,
}

impl HaltPoll {
    /// KVM's x86 default `halt_poll_ns`: the longest window.
    pub const MAX: Duration = Duration::from_micros(200);
    const GROW_START: Duration = Duration::from_micros(10);

    /// Adapts the window after a halt that lasted `halted`.
    fn after_halt(&mut self, halted: Duration) {
        if halted <= self.window {
            return;
        }
        if !self.window.is_zero() && halted > Self::MAX {
            self.window = Duration::ZERO;
        } else if self.window < Self::MAX && halted < Self::MAX {
            self.window = (self.window * 2).max(Self::GROW_START).min(Self::MAX);
        }
    }
}

/// One timed pass: wall-clock seconds, and the CPU seconds of the thread
/// doing the I/O (the host thread, or the device's event-loop thread).
#[derive(Clone, Copy, Debug)]
pub struct Pass {
    pub secs: f64,
    pub cpu_secs: f64,
}

/// Times one pass: wall clock from `start`, CPU from the two readings of
/// whichever thread does the I/O.
pub struct Stopwatch {
    started: std::time::Instant,
    cpu_at_start: f64,
}

impl Stopwatch {
    pub fn start(cpu_now: f64) -> Stopwatch {
        Stopwatch {
            started: std::time::Instant::now(),
            cpu_at_start: cpu_now,
        }
    }

    pub fn finish(self, cpu_now: f64) -> Pass {
        Pass {
            secs: self.started.elapsed().as_secs_f64(),
            cpu_secs: cpu_now - self.cpu_at_start,
        }
    }
}

/// Waits up to `timeout` for `fd` to become readable; false on timeout.
pub fn wait_readable(fd: std::os::fd::RawFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    match unsafe { libc::poll(&mut pfd, 1, ms) } {
        r if r < 0 => Err(io::Error::last_os_error()),
        0 => Ok(false),
        _ => Ok(true),
    }
}

/// CPU time the calling thread has used, in seconds.
pub fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

impl Driver {
    /// Guest memory of `mem_bytes` at address 0; the device served by an
    /// `EventManager` on a new thread, exactly as the VMM wires it.
    pub fn new<D>(device: Arc<Mutex<D>>, mem_bytes: usize) -> io::Result<Driver>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        // Mapped as the VMM maps guest RAM (2 MiB aligned, advised
        // `MADV_HUGEPAGE`): the device's copies and ring accesses then see
        // the page sizes they see in a VM.
        let mem = devices::virtio::guest_ram(&[(GuestAddress(0), mem_bytes)])
            .map_err(|e| io::Error::other(format!("guest memory: {e}")))?;
        let handle = GuestMemoryHandle::new(mem);
        let mem = handle
            .get()
            .ok_or_else(|| io::Error::other("no guest memory"))?;
        let transport = MmioTransport::new(device.clone(), handle)?;
        // As the VMM sets it up: KVM keeps the guest's acknowledgement of
        // the used bit (`wait_interrupt` skips that write as KVM would).
        transport.interrupt().absorb_used_acks();
        let notify = transport
            .queue_events()
            .iter()
            .map(EventFd::try_clone)
            .collect::<io::Result<Vec<_>>>()?;
        let irq = transport.interrupt_event().try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let sub: Subscriber = device;
        let stop_loop = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let event_loop = std::thread::Builder::new()
            .name("event-loop".into())
            .spawn(move || {
                let mut em = match EventManager::<Subscriber>::new() {
                    Ok(em) => em,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("event manager: {e:?}")));
                        return;
                    }
                };
                em.add_subscriber(sub);
                // SAFETY: gettid has no arguments and cannot fail.
                let tid = unsafe { libc::gettid() };
                let _ = ready_tx.send(Ok(tid));
                while !stop_loop.load(Ordering::Relaxed) {
                    if let Err(e) = em.run_with_timeout(50) {
                        eprintln!("devbench: event loop: {e:?}");
                        return;
                    }
                }
            })?;
        let loop_tid = ready_rx
            .recv()
            .map_err(|_| io::Error::other("event loop thread died"))?
            .map_err(io::Error::other)?;
        Ok(Driver {
            mem,
            transport,
            notify,
            irq,
            stop,
            loop_tid,
            event_loop: Some(event_loop),
            halt_poll: None,
        })
    }

    /// CPU seconds the device's event-loop thread has used so far (from
    /// /proc, so that measuring costs the loop nothing).
    pub fn device_cpu_secs(&self) -> f64 {
        let path = format!("/proc/self/task/{}/schedstat", self.loop_tid);
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(f64::NAN, |ns| ns as f64 * 1e-9)
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        self.transport.write(offset, &v.to_le_bytes());
    }

    /// Status ACK → DRIVER → features → FEATURES_OK → queues → DRIVER_OK,
    /// accepting `wanted` ∩ what the device offers.
    pub fn start(&mut self, wanted: u64, queues: &[&Vq]) -> io::Result<u64> {
        self.write_reg(reg::STATUS, 0);
        self.write_reg(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let mut offered = 0u64;
        for sel in 0..2u32 {
            self.write_reg(reg::DEVICE_FEATURES_SEL, sel);
            offered |= u64::from(self.read_reg(reg::DEVICE_FEATURES)) << (32 * sel);
        }
        let acked = offered & wanted;
        for sel in 0..2u32 {
            self.write_reg(reg::DRIVER_FEATURES_SEL, sel);
            self.write_reg(reg::DRIVER_FEATURES, (acked >> (32 * sel)) as u32);
        }
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write_reg(reg::STATUS, s);
        if self.read_reg(reg::STATUS) & status::FEATURES_OK == 0 {
            return Err(io::Error::other("the device refused the features"));
        }
        for q in queues {
            self.write_reg(reg::QUEUE_SEL, q.index);
            self.write_reg(reg::QUEUE_NUM, u32::from(q.size));
            for (lo, addr) in [
                (reg::QUEUE_DESC_LOW, q.desc),
                (reg::QUEUE_DRIVER_LOW, q.avail),
                (reg::QUEUE_DEVICE_LOW, q.used),
            ] {
                self.write_reg(lo, addr as u32);
                self.write_reg(lo + 4, (addr >> 32) as u32);
            }
            self.write_reg(reg::QUEUE_READY, 1);
        }
        self.write_reg(reg::STATUS, s | status::DRIVER_OK);
        if self.read_reg(reg::STATUS) & status::DEVICE_NEEDS_RESET != 0 {
            return Err(io::Error::other("the device failed to activate"));
        }
        Ok(acked)
    }

    /// QueueNotify for queue `index`, as the guest's write reaches the
    /// device through KVM's ioeventfd.
    pub fn notify(&self, index: usize) -> io::Result<()> {
        self.notify
            .get(index)
            .ok_or_else(|| io::Error::other("no such queue"))?
            .write(1)
    }

    /// Whether the driver halt-polls as a KVM vCPU does before it sleeps
    /// on the interrupt (`None`: it sleeps at once).
    pub fn set_halt_poll(&mut self, hp: Option<HaltPoll>) {
        self.halt_poll = hp;
    }

    /// Waits for the irqfd to fire, then reads and acknowledges
    /// INTERRUPT_STATUS as the guest's handler does. False on timeout.
    pub fn wait_interrupt(&mut self, timeout: Duration) -> io::Result<bool> {
        let fd = self.irq.as_raw_fd();
        let halted = std::time::Instant::now();
        let mut pending = false;
        if let Some(hp) = self.halt_poll {
            while halted.elapsed() < hp.window {
                if wait_readable(fd, Duration::ZERO)? {
                    pending = true;
                    break;
                }
                std::hint::spin_loop();
            }
        }
        if !pending && !wait_readable(fd, timeout)? {
            return Ok(false);
        }
        if let Some(hp) = self.halt_poll.as_mut() {
            hp.after_halt(halted.elapsed());
        }
        let _ = self.irq.read();
        let isr = self.read_reg(reg::INTERRUPT_STATUS);
        // The used bit's acknowledgement alone is KVM's ioeventfd in the
        // VMM: it never reaches the transport.
        if isr != INT_USED_RING {
            self.write_reg(reg::INTERRUPT_ACK, isr);
        }
        Ok(true)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.write_reg(reg::STATUS, 0);
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.event_loop.take() {
            let _ = t.join();
        }
    }
}

/// One split virtqueue in guest memory, driver side.
pub struct Vq {
    index: u32,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    free: Vec<u16>,
    /// The descriptors of each chain, by head index.
    chains: Vec<Vec<u16>>,
    avail_idx: u16,
    used_idx: u16,
}

impl Vq {
    /// A queue of `size` entries laid out at `base` (needs 12 KiB).
    pub fn new(index: u32, base: u64, size: u16) -> Vq {
        Vq {
            index,
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            free: (0..size).rev().collect(),
            chains: vec![Vec::new(); usize::from(size)],
            avail_idx: 0,
            used_idx: 0,
        }
    }

    /// Asks the device for interrupts on this queue, or not
    /// (`VRING_AVAIL_F_NO_INTERRUPT`: a driver that polls the used ring, as
    /// Linux does on virtio-blk's poll queues).
    pub fn set_interrupts(&self, mem: &GuestMemoryMmap, on: bool) -> io::Result<()> {
        let flags: u16 = if on { 0 } else { 1 };
        mem.write_obj(flags, GuestAddress(self.avail))
            .map_err(|e| io::Error::other(format!("avail flags: {e}")))
    }

    /// Writes a chain of `(addr, len, device_writable)` buffers and puts it
    /// in the avail ring (not yet visible: see [`Vq::publish`]).
    pub fn add(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > self.free.len() {
            return None;
        }
        let ids: Vec<u16> = (0..bufs.len()).filter_map(|_| self.free.pop()).collect();
        for (i, (&(addr, len, writable), &id)) in bufs.iter().zip(&ids).enumerate() {
            let next = ids.get(i + 1).copied();
            let mut flags = if writable { F_WRITE } else { 0 };
            if next.is_some() {
                flags |= F_NEXT;
            }
            let d = self.desc + 16 * u64::from(id);
            mem.write_obj(addr, GuestAddress(d)).ok()?;
            mem.write_obj(len, GuestAddress(d + 8)).ok()?;
            mem.write_obj(flags, GuestAddress(d + 12)).ok()?;
            mem.write_obj(next.unwrap_or(0), GuestAddress(d + 14))
                .ok()?;
        }
        let head = ids[0];
        self.push_avail(mem, head)?;
        self.chains[usize::from(head)] = ids;
        Some(head)
    }

    /// Puts `head` in the next avail-ring slot (visible after `publish`).
    fn push_avail(&mut self, mem: &GuestMemoryMmap, head: u16) -> Option<()> {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).ok()?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Some(())
    }

    /// Puts a chain the device returned back in the avail ring as it is
    /// (its descriptors still describe the same buffers), the way a driver
    /// with fixed buffers recycles them: one ring write per chain.
    pub fn recycle(&mut self, mem: &GuestMemoryMmap, head: u16) -> Option<()> {
        if self.chains.get(usize::from(head))?.is_empty() {
            return None;
        }
        self.push_avail(mem, head)
    }

    /// Whether the device wants a kick for new buffers: not while it sets
    /// `VRING_USED_F_NO_NOTIFY` (it is polling the ring anyway). Read after
    /// [`Vq::publish`], as Linux's `virtqueue_kick_prepare` does.
    pub fn kick_needed(&self, mem: &GuestMemoryMmap) -> bool {
        fence(Ordering::SeqCst);
        mem.load::<u16>(GuestAddress(self.used), Ordering::Acquire)
            .map_or(true, |flags| flags & 1 == 0)
    }

    /// Frees the descriptors of a chain the device returned.
    pub fn release(&mut self, head: u16) {
        if let Some(chain) = self.chains.get_mut(usize::from(head)) {
            self.free.extend(chain.drain(..).rev());
        }
    }

    /// Makes the chains added so far visible to the device.
    pub fn publish(&self, mem: &GuestMemoryMmap) -> io::Result<()> {
        fence(Ordering::Release);
        mem.store(
            self.avail_idx,
            GuestAddress(self.avail + 2),
            Ordering::Release,
        )
        .map_err(|e| io::Error::other(format!("avail idx: {e}")))
    }

    /// Takes the used entries the device has returned: `(head, len)`. The
    /// chains stay allocated: [`Vq::recycle`] or [`Vq::release`] each.
    /// Whether the device returned chains not taken yet (a polling
    /// driver's check).
    pub fn has_used(&self, mem: &GuestMemoryMmap) -> bool {
        mem.load::<u16>(GuestAddress(self.used + 2), Ordering::Acquire)
            .is_ok_and(|idx| idx != self.used_idx)
    }

    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let Ok(idx) = mem.load::<u16>(GuestAddress(self.used + 2), Ordering::Acquire) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        while self.used_idx != idx {
            let e = self.used + 4 + 8 * u64::from(self.used_idx % self.size);
            let id: u32 = mem.read_obj(GuestAddress(e)).unwrap_or(u32::MAX);
            let len: u32 = mem.read_obj(GuestAddress(e + 4)).unwrap_or(0);
            self.used_idx = self.used_idx.wrapping_add(1);
            if let Ok(head) = u16::try_from(id) {
                out.push((head, len));
            }
        }
        out
    }
}

/// The machine's floor for any kick → interrupt round trip: two threads
/// ping-ponging through two eventfds, nothing else. Returns the round trip
/// and the responder thread's CPU per round, in µs.
pub fn eventfd_ping_pong(rounds: usize) -> io::Result<(f64, f64)> {
    let kick = EventFd::new(0)?;
    let irq = EventFd::new(0)?;
    let (kick2, irq2) = (kick.try_clone()?, irq.try_clone()?);
    let responder = std::thread::spawn(move || -> io::Result<f64> {
        let c = thread_cpu_secs();
        for _ in 0..rounds {
            kick2.read()?;
            irq2.write(1)?;
        }
        Ok(thread_cpu_secs() - c)
    });
    let t = std::time::Instant::now();
    for _ in 0..rounds {
        kick.write(1)?;
        irq.read()?;
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = responder
        .join()
        .map_err(|_| io::Error::other("responder panicked"))??;
    Ok((secs / rounds as f64 * 1e6, cpu / rounds as f64 * 1e6))
}

#[cfg(test)]
mod tests {
    use super::HaltPoll;
    use std::time::Duration;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn halt_polling_starts_off_and_grows_from_ten_microseconds_by_doubling_up_to_its_limit() {
        let mut hp = HaltPoll::default();
        assert_eq!(hp.window, Duration::ZERO);
        let mut windows = Vec::new();
        for _ in 0..7 {
            // Each halt ends just after the window, within the limit.
            hp.after_halt((hp.window + US).min(HaltPoll::MAX - US));
            windows.push(hp.window.as_micros());
        }
        assert_eq!(windows, [10, 20, 40, 80, 160, 200, 200]);
    }

    #[test]
    fn a_halt_that_the_window_covered_leaves_it_as_it_is() {
        let mut hp = HaltPoll::default();
        hp.after_halt(5 * US);
        hp.after_halt(15 * US);
        assert_eq!(hp.window, 20 * US);
        hp.after_halt(19 * US);
        assert_eq!(hp.window, 20 * US);
    }

    #[test]
    fn a_halt_longer_than_the_limit_turns_polling_off_until_halts_are_short_again() {
        let mut hp = HaltPoll::default();
        hp.after_halt(5 * US);
        assert_eq!(hp.window, 10 * US);
        hp.after_halt(Duration::from_millis(5));
        assert_eq!(hp.window, Duration::ZERO);
        // A long halt with polling already off changes nothing.
        hp.after_halt(Duration::from_millis(5));
        assert_eq!(hp.window, Duration::ZERO);
        hp.after_halt(50 * US);
        assert_eq!(hp.window, 10 * US);
    }
}
