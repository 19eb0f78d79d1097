//! virtio-net through the harness vs reading/writing a TAP directly.
//!
//! Both sides use a TAP opened by the same code (`IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR`, 12-byte header) in a network namespace of the benchmark's
//! own, so nothing reaches the host's network.
//! - TX (guest → host): `count` frames; the device writes each chain to its
//!   TAP, the baseline `write`s each frame to its TAP.
//! - RX (host → guest): `count` frames are queued on the TAP first (an
//!   `AF_PACKET` socket sends them out of the interface; `txqueuelen` is
//!   raised so the TAP keeps them all), then the clock starts and the
//!   device (into 2 KiB mergeable RX buffers) or the baseline (`read`)
//!   drains them. Pre-queuing keeps the sender off the 2 CPUs while the
//!   reader is timed.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::virtio::net::NetCounters;
use devices::virtio::net::F_MRG_RXBUF;
pub use devices::virtio::tap::Tap as RawTap;
use devices::virtio::tap::VNET_HDR_LEN as VNET_HDR;
use devices::virtio::{Net, NetConfig, VIRTIO_F_VERSION_1};
use vm_memory::{Bytes, GuestAddress};

use crate::driver::{thread_cpu_secs, wait_readable, Driver, HaltPoll, Pass, Stopwatch, Vq};

const RXQ: u64 = 0x1_0000;
const TXQ: u64 = 0x2_0000;
const RX_BUFS: u64 = 0x10_0000;
/// Linux's mergeable RX buffer while frames average under GOOD_PACKET_LEN
/// (1518): the 12-byte header plus 1518, rounded up to a cache line.
const RX_BUF_LEN: u32 = 1536;
/// The page fragments Linux carves RX buffers from (`SKB_FRAG_PAGE_ORDER`).
const RX_FRAG: u64 = 32 << 10;
const TX_BUFS: u64 = 0x100_0000;
const TX_SLOT: u64 = 2048;
const MEM: usize = 32 << 20;
const QSIZE: u16 = 256;
/// The most frames one RX round may pre-queue (the TAPs' queues are
/// twice that long; older kernels refuse a queue much longer, see
/// [`bring_up`]).
pub const MAX_FRAMES: usize = 100_000;

/// Moves this process into a network namespace of its own (root only),
/// with IPv6 off so that the kernel sends nothing of its own (router
/// solicitations, MLD reports) through the TAPs.
pub fn enter_private_netns() -> io::Result<()> {
    // SAFETY: unshare takes flags only.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    for conf in ["all", "default"] {
        // A kernel without IPv6 has no such file, and nothing to silence.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1");
    }
    Ok(())
}

fn ip(args: &[&str]) -> io::Result<()> {
    let st = Command::new("ip").args(args).status()?;
    if !st.success() {
        return Err(io::Error::other(format!("ip {} failed", args.join(" "))));
    }
    Ok(())
}

/// Sets the interface up with a queue that holds twice `frames`, the
/// most one round pre-queues (the kernel refuses a length it cannot
/// allocate: Debian's 6.1 refused 200,000 with ERANGE).
pub fn bring_up(name: &str, frames: usize) -> io::Result<()> {
    let qlen = frames.saturating_mul(2).max(1000);
    ip(&[
        "link",
        "set",
        "dev",
        name,
        "txqueuelen",
        &qlen.to_string(),
        "up",
    ])
}

/// An Ethernet frame of `len` bytes (≥ 14) with a local experimental
/// EtherType, so the host stack drops it cheaply; the same for both sides.
pub fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    for (i, b) in f.iter_mut().enumerate().skip(14) {
        *b = i as u8;
    }
    f
}

/// Sends `count` frames out of `ifname` with an `AF_PACKET` socket (they
/// land in the TAP's queue for its reader). The socket receives nothing
/// (protocol 0).
pub fn inject(ifname: &str, frame: &[u8], count: usize) -> io::Result<()> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned here.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let cname = std::ffi::CString::new(ifname).map_err(io::Error::other)?;
    // SAFETY: a valid NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sockaddr_ll is plain old data.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    // Protocol 0: send only.
    sll.sll_protocol = 0;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: `sll` is a valid sockaddr_ll of the size given.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut sent = 0;
    while sent < count {
        // SAFETY: `frame` is valid for reads of its length.
        let r = unsafe { libc::send(sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                std::thread::sleep(Duration::from_micros(50));
                continue;
            }
            return Err(e);
        }
        sent += 1;
    }
    Ok(())
}

fn tx_packet(frame: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; VNET_HDR];
    p.extend_from_slice(frame);
    p
}

/// Baseline TX: `count` writes.
pub fn raw_tx(tap: &RawTap, frame: &[u8], count: usize) -> io::Result<Pass> {
    let p = tx_packet(frame);
    let sw = Stopwatch::start(thread_cpu_secs());
    for _ in 0..count {
        tap.write_frame(&p)?;
    }
    Ok(sw.finish(thread_cpu_secs()))
}

/// Baseline RX: reads `count` queued frames.
pub fn raw_rx(tap: &RawTap, count: usize) -> io::Result<Pass> {
    let mut buf = vec![0u8; 65536 + VNET_HDR];
    let sw = Stopwatch::start(thread_cpu_secs());
    let mut got = 0;
    while got < count {
        match tap.read_frame(&mut buf) {
            Ok(_) => got += 1,
            // The last frames may still be on their way through the stack.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !wait_readable(tap.as_raw_fd(), Duration::from_secs(1))? {
                    return Err(io::Error::other("a queued frame never reached the TAP"));
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(sw.finish(thread_cpu_secs()))
}

/// `count` RX buffers (address, length) from `base` on, placed as Linux's
/// virtio-net driver places its mergeable buffers (`add_recvbuf_mergeable`
/// in Linux 6.1): [`RX_BUF_LEN`] bytes each, one after another in
/// [`RX_FRAG`]-byte page fragments, the last of a fragment taking the
/// leftover too (20 of 1536 bytes, then one of 2048).
///
/// Where the buffers sit matters to the kernel's copy into them: a buffer
/// starting on a page or at its middle (the frame then lands 12 bytes in)
/// was read into ~20 % slower than one elsewhere, whoever reads (the host
/// alone too); 2 KiB buffers on 2 KiB slots, this harness's layout before,
/// all sit there, Linux's only every fourth one.
pub fn linux_rx_buffers(base: u64, count: usize) -> Vec<(u64, u32)> {
    let len = u64::from(RX_BUF_LEN);
    let mut bufs = Vec::with_capacity(count);
    let (mut frag, mut off) = (base, 0u64);
    while bufs.len() < count {
        // A fragment always has room for one more buffer here (the one
        // before took the leftover), so this cannot underflow.
        let mut take = len;
        if RX_FRAG - (off + len) < len {
            take = RX_FRAG - off;
        }
        // Lengths are at most a fragment's, far below u32::MAX.
        bufs.push((frag + off, take as u32));
        off += take;
        if off == RX_FRAG {
            frag += RX_FRAG;
            off = 0;
        }
    }
    bufs
}

/// The device and its driver, queues started, no buffers posted yet; one
/// per round (dropping it closes the TAP, which then disappears).
pub struct DeviceSide {
    d: Driver,
    rx: Vq,
    tx: Vq,
    counters: Arc<NetCounters>,
    vhost: bool,
}

/// Whether this host can run the vhost-net rows.
pub fn vhost_available() -> bool {
    std::path::Path::new("/dev/vhost-net").exists()
}

/// CPU seconds of this process's vhost workers: the kernel threads (a
/// thread of ours since Linux 6.4, a kthread before) named `vhost-<pid>`
/// that move the frames of a vhost-net device. Their sum: a finished
/// round's worker is gone, and a pass only looks at the difference.
fn vhost_workers_cpu_secs() -> f64 {
    let name = format!("vhost-{}", std::process::id());
    let mut ns = 0u64;
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return f64::NAN;
    };
    for p in procs.flatten() {
        let Ok(tasks) = std::fs::read_dir(p.path().join("task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim_end() != name {
                continue;
            }
            ns += std::fs::read_to_string(t.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    ns as f64 * 1e-9
}

impl DeviceSide {
    /// The device's CPU time: its event-loop thread's, plus with vhost-net
    /// the kernel workers' that move the frames.
    fn cpu_secs(&self) -> f64 {
        let own = self.d.device_cpu_secs();
        if self.vhost {
            own + vhost_workers_cpu_secs()
        } else {
            own
        }
    }

    /// Checks the device's own counters: every frame really went through.
    /// vhost-net's frames are the kernel's, not counted by the device: the
    /// used entries (and RX's lengths) checked by the caller are the proof.
    fn check(&self, tx: u64, rx: u64) -> io::Result<()> {
        if self.vhost {
            return Ok(());
        }
        let s = self.counters.snapshot();
        if s.tx_packets != tx
            || s.rx_packets != rx
            || s.tx_dropped + s.rx_dropped + s.invalid_chains != 0
        {
            return Err(io::Error::other(format!(
                "virtio-net counters disagree: {s:?}"
            )));
        }
        Ok(())
    }

    /// Opens (creates) the TAP, starts the device (its datapath in the
    /// kernel with `vhost`) and sets the link up. The driver waits for
    /// interrupts with `halt_poll` (see [`crate::driver::HaltPoll`]).
    pub fn new(
        tap: &str,
        vhost: bool,
        frames: usize,
        halt_poll: Option<HaltPoll>,
    ) -> io::Result<DeviceSide> {
        use devices::virtio::net::vhost::VhostMode;
        let net = Net::new(&NetConfig {
            tap: tap.to_owned(),
            mac: None,
            vhost: if vhost { VhostMode::On } else { VhostMode::Off },
            queues: 1,
            poll_us: 0,
        })
        .map_err(io::Error::other)?;
        let counters = net.counters();
        let mut d = Driver::new(Arc::new(Mutex::new(net)), MEM)?;
        d.set_halt_poll(halt_poll);
        let rx = Vq::new(0, RXQ, QSIZE);
        let tx = Vq::new(1, TXQ, QSIZE);
        d.start(VIRTIO_F_VERSION_1 | F_MRG_RXBUF, &[&rx, &tx])?;
        bring_up(tap, frames)?;
        Ok(DeviceSide {
            d,
            rx,
            tx,
            counters,
            vhost,
        })
    }

    /// TX of `count` frames, up to a queue's worth in flight: the chains
    /// are written once and recycled as the device returns them. Seconds.
    pub fn tx(&mut self, frame: &[u8], count: usize) -> io::Result<Pass> {
        let p = tx_packet(frame);
        let mem = self.d.mem.clone();
        let len = p.len() as u32;
        let ring = usize::from(QSIZE);
        if count < ring {
            return Err(io::Error::other("fewer frames than a queue's worth"));
        }
        for i in 0..u64::from(QSIZE) {
            let addr = TX_BUFS + i * TX_SLOT;
            mem.write_slice(&p, GuestAddress(addr))
                .map_err(|e| io::Error::other(format!("guest memory: {e}")))?;
            self.tx
                .add(&mem, &[(addr, len, false)])
                .ok_or_else(|| io::Error::other("tx queue full"))?;
        }
        let sw = Stopwatch::start(self.cpu_secs());
        let mut queued = ring;
        let mut done = 0usize;
        self.tx.publish(&mem)?;
        self.d.notify(1)?;
        while done < count {
            if !self.d.wait_interrupt(Duration::from_secs(10))? {
                return Err(io::Error::other("no TX interrupt from virtio-net in 10 s"));
            }
            let used = self.tx.take_used(&mem);
            done += used.len();
            let mut more = false;
            for (head, _) in used {
                if queued < count {
                    self.tx
                        .recycle(&mem, head)
                        .ok_or_else(|| io::Error::other("recycle"))?;
                    queued += 1;
                    more = true;
                } else {
                    self.tx.release(head);
                }
            }
            if more {
                self.tx.publish(&mem)?;
                if self.tx.kick_needed(&mem) {
                    self.d.notify(1)?;
                }
            }
        }
        let pass = sw.finish(self.cpu_secs());
        self.check(count as u64, 0)?;
        Ok(pass)
    }

    /// RX of `count` frames already queued on the TAP, into a ring of
    /// buffers laid out as Linux posts them ([`linux_rx_buffers`]),
    /// recycled as they come back (the last ones stay posted: once per
    /// `DeviceSide`). Seconds.
    pub fn rx(&mut self, count: usize, frame_len: usize) -> io::Result<Pass> {
        let mem = self.d.mem.clone();
        for (addr, len) in linux_rx_buffers(RX_BUFS, usize::from(QSIZE)) {
            self.rx
                .add(&mem, &[(addr, len, true)])
                .ok_or_else(|| io::Error::other("rx queue full"))?;
        }
        let sw = Stopwatch::start(self.cpu_secs());
        self.rx.publish(&mem)?;
        self.d.notify(0)?;
        let mut got = 0usize;
        while got < count {
            if !self.d.wait_interrupt(Duration::from_secs(10))? {
                return Err(io::Error::other(format!(
                    "no RX interrupt from virtio-net in 10 s ({got} of {count} frames)"
                )));
            }
            // With MRG_RXBUF and buffers of at least 1536 bytes every frame
            // here fits one buffer (num_buffers = 1): one used entry per
            // frame.
            let used = self.rx.take_used(&mem);
            if let Some(&(_, len)) = used
                .iter()
                .find(|&&(_, len)| len as usize != frame_len + VNET_HDR)
            {
                return Err(io::Error::other(format!(
                    "RX used length {len}, expected {}",
                    frame_len + VNET_HDR
                )));
            }
            got += used.len();
            for (head, _) in used {
                self.rx
                    .recycle(&mem, head)
                    .ok_or_else(|| io::Error::other("recycle"))?;
            }
            self.rx.publish(&mem)?;
            if self.rx.kick_needed(&mem) {
                self.d.notify(0)?;
            }
        }
        let pass = sw.finish(self.cpu_secs());
        self.check(0, count as u64)?;
        Ok(pass)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rx_buffers_are_carved_from_32_kib_fragments_as_linux_carves_them() {
        let bufs = linux_rx_buffers(RX_BUFS, 256);
        assert_eq!(bufs.len(), 256);
        // 20 of 1536 bytes, then one of 2048 that ends the fragment.
        assert_eq!(bufs[0], (RX_BUFS, 1536));
        assert_eq!(bufs[19], (RX_BUFS + 19 * 1536, 1536));
        assert_eq!(bufs[20], (RX_BUFS + 20 * 1536, 2048));
        assert_eq!(bufs[21], (RX_BUFS + RX_FRAG, 1536));
        for w in bufs.windows(2) {
            let ((a, len), (b, _)) = (w[0], w[1]);
            assert_eq!(a + u64::from(len), b, "buffers follow one another");
        }
        for &(a, len) in &bufs {
            assert_eq!(a % 64, 0, "cache-line aligned");
            let frag = (a - RX_BUFS) / RX_FRAG;
            let end = a + u64::from(len) - 1;
            assert_eq!((end - RX_BUFS) / RX_FRAG, frag, "within one fragment");
        }
    }

    #[test]
    fn rx_buffers_stay_below_the_tx_buffers() {
        let &(last, len) = linux_rx_buffers(RX_BUFS, usize::from(QSIZE))
            .last()
            .expect("a ring's worth");
        assert!(last + u64::from(len) <= TX_BUFS);
    }

    #[test]
    fn a_full_size_frame_and_its_header_fit_one_rx_buffer() {
        assert!(1514 + VNET_HDR <= RX_BUF_LEN as usize);
    }
}
