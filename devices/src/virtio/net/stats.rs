//! A network interface's MAC and counters.

use std::sync::atomic::{AtomicU64, Ordering};

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
    pub(super) rx_packets: AtomicU64,
    pub(super) rx_bytes: AtomicU64,
    pub(super) tx_packets: AtomicU64,
    pub(super) tx_bytes: AtomicU64,
    pub(super) rx_dropped: AtomicU64,
    pub(super) tx_dropped: AtomicU64,
    pub(super) invalid_chains: AtomicU64,
    pub(super) rx_deferred: AtomicU64,
    /// Whether the kernel's datapath serves the device (or will, at its
    /// next activation): the counters above then stay still.
    pub(super) vhost: std::sync::atomic::AtomicBool,
    /// Frames received and sent per queue pair (userspace datapath).
    pub(super) pairs: Vec<[AtomicU64; 2]>,
    /// The queue pairs the driver enabled.
    pub(super) enabled: AtomicU64,
    /// How long (µs) vhost-net's worker busy-polls, as the kernel said
    /// at the running activation; 0 without polling or vhost-net.
    pub(super) poll_us: std::sync::atomic::AtomicU32,
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

impl NetCounters {
    pub(super) fn with_pairs(n: usize) -> Self {
        Self {
            pairs: (0..n).map(|_| Default::default()).collect(),
            enabled: AtomicU64::new(1),
            ..Default::default()
        }
    }

    /// Counts a frame on pair `p`: received (`0`) or sent (`1`).
    pub(super) fn count_pair(&self, p: usize, dir: usize) {
        if let Some(c) = self.pairs.get(p).and_then(|d| d.get(dir)) {
            inc(c, 1);
        }
    }

    /// The queue pairs the device offers.
    pub fn queue_pairs(&self) -> usize {
        self.pairs.len()
    }

    /// The queue pairs the guest's driver uses.
    pub fn enabled_pairs(&self) -> u64 {
        self.enabled.load(Ordering::Relaxed)
    }

    /// How long (µs) vhost-net's worker busy-polls the running datapath,
    /// as the kernel holds it: 0 where it does not poll, on the userspace
    /// datapath, or before the driver starts the device.
    pub fn vhost_poll_us(&self) -> u32 {
        self.poll_us.load(Ordering::Relaxed)
    }

    /// Frames `[received, sent]` per queue pair, on the userspace datapath
    /// (vhost-net's frames never reach the VMM).
    pub fn pair_frames(&self) -> Vec<[u64; 2]> {
        self.pairs
            .iter()
            .map(|[r, t]| [r.load(Ordering::Relaxed), t.load(Ordering::Relaxed)])
            .collect()
    }
}

pub(super) fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}
