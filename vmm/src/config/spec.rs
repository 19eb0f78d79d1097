//! The `--disk` and `--net` specs: `key=value,...` into typed specs, each
//! bad key or value a one-line reason.

use std::path::PathBuf;

use super::ConfigError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub read_only: bool,
    pub id: Option<String>,
    /// `direct=on`: O_DIRECT, the host page cache is bypassed.
    pub direct: bool,
    /// `io=auto|sync|io_uring`: how requests reach the image.
    pub engine: devices::virtio::IoEngine,
    /// `queues=N`: request queues (1 to 16); default one.
    pub queues: Option<u16>,
    /// `poll_us=N`: adaptive polling up to N µs (0 to 1000); default 0, off.
    pub poll_us: u32,
    /// `iops=N`, `mib_s=N`: at most N requests, N MiB a second; default 0,
    /// no limit.
    pub iops: u64,
    pub mib_s: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetSpec {
    pub tap: String,
    pub mac: Option<[u8; 6]>,
    /// `vhost=auto|on|off`: the host kernel's datapath (vhost-net) or ours.
    pub vhost: devices::virtio::net::vhost::VhostMode,
    /// `queues=N`: queue pairs (1 to 16); default one per vCPU.
    pub queues: Option<u16>,
    /// `poll_us=N`: vhost-net's busy polling, up to N µs (0 to 1000);
    /// default 0, off.
    pub poll_us: u32,
    /// `bridge=NAME`: the host bridge `vmm net up` puts the TAP on (the VMM
    /// itself ignores it).
    pub bridge: Option<String>,
    /// `ip=ADDR[/LEN]` (repeatable): the addresses and prefixes the VM may
    /// send from; its first IPv4 and first IPv6 address are its DHCP leases.
    /// For `vmm net`; the VMM itself ignores them.
    pub addresses: Vec<ipnet::IpNet>,
}

fn spec_pairs<'a>(flag: &str, spec: &'a str) -> Result<Vec<(&'a str, &'a str)>, ConfigError> {
    spec.split(',')
        .map(|kv| {
            kv.split_once('=').ok_or_else(|| ConfigError::Spec {
                flag: flag.to_string(),
                spec: spec.to_string(),
                reason: format!("'{kv}' is not key=value"),
            })
        })
        .collect()
}

/// `queues=N` of a `--disk` or `--net`: 1 to `max`.
fn parse_queues(v: &str, max: u16) -> Result<u16, String> {
    v.parse::<u16>()
        .ok()
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(|| format!("queues={v}: use 1 to {max}"))
}

pub(super) fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

pub fn parse_disk(spec: &str) -> Result<DiskSpec, ConfigError> {
    let err = |reason: String| ConfigError::Spec {
        flag: "--disk".into(),
        spec: spec.to_string(),
        reason,
    };
    let mut path = None;
    let mut read_only = false;
    let mut id = None;
    let mut direct = false;
    let mut engine = devices::virtio::IoEngine::default();
    let mut queues = None;
    let mut poll_us = 0;
    let (mut iops, mut mib_s) = (0, 0);
    for (k, v) in spec_pairs("--disk", spec)? {
        match k {
            "path" => path = Some(PathBuf::from(v)),
            "ro" => {
                read_only = parse_bool(v).ok_or_else(|| err(format!("ro={v}: use on or off")))?
            }
            "id" if v.len() <= 20 => id = Some(v.to_string()),
            "id" => return Err(err("id is longer than 20 bytes".into())),
            "direct" => {
                direct = parse_bool(v).ok_or_else(|| err(format!("direct={v}: use on or off")))?
            }
            "io" => engine = v.parse().map_err(err)?,
            "queues" => {
                queues = Some(parse_queues(v, devices::virtio::block::MAX_QUEUES).map_err(err)?)
            }
            "poll_us" => poll_us = parse_poll_us(v).map_err(err)?,
            "iops" => {
                iops = parse_limit(v, devices::virtio::block::MAX_IOPS)
                    .map_err(|max| err(format!("iops={v}: use 0 (no limit) to {max}")))?
            }
            "mib_s" => {
                mib_s = parse_limit(v, protocol::MAX_SPEED_MIB_S)
                    .map_err(|max| err(format!("mib_s={v}: use 0 (no limit) to {max}")))?
            }
            other => {
                return Err(err(format!(
                    "unknown key '{other}' (path, ro, id, direct, io, queues, poll_us, iops, mib_s)"
                )))
            }
        }
    }
    let path = path.ok_or_else(|| err("path= is required".into()))?;
    Ok(DiskSpec {
        path,
        read_only,
        id,
        direct,
        engine,
        queues,
        poll_us,
        iops,
        mib_s,
    })
}

/// `iops=N` or `mib_s=N`: 0 (no limit) to `max`; the error is `max`.
fn parse_limit(v: &str, max: u64) -> Result<u64, u64> {
    v.parse::<u64>().ok().filter(|n| *n <= max).ok_or(max)
}

/// `poll_us=N` of a `--disk` or `--net`: 0 (off) to the disk's limit
/// (one limit for both, so one rule for the operator).
fn parse_poll_us(v: &str) -> Result<u32, String> {
    let max = devices::virtio::block::MAX_POLL.as_micros();
    v.parse::<u32>()
        .ok()
        .filter(|n| u128::from(*n) <= max)
        .ok_or_else(|| format!("poll_us={v}: use 0 (off) to {max}"))
}

pub fn parse_net(spec: &str) -> Result<NetSpec, ConfigError> {
    let err = |reason: String| ConfigError::Spec {
        flag: "--net".into(),
        spec: spec.to_string(),
        reason,
    };
    let mut tap = None;
    let mut mac = None;
    let mut vhost = Default::default();
    let mut queues = None;
    let mut poll_us = 0;
    let mut bridge = None;
    let mut addresses = Vec::new();
    for (k, v) in spec_pairs("--net", spec)? {
        match k {
            "tap" if !v.is_empty() && v.len() < 16 => tap = Some(v.to_string()),
            "tap" => return Err(err("tap name must be 1-15 bytes".into())),
            "mac" => {
                mac = Some(
                    devices::virtio::net::parse_mac(v)
                        .ok_or_else(|| err(format!("mac={v} is not aa:bb:cc:dd:ee:ff")))?,
                )
            }
            "vhost" => vhost = v.parse().map_err(err)?,
            "queues" => {
                queues = Some(parse_queues(v, devices::virtio::net::MAX_QUEUE_PAIRS).map_err(err)?)
            }
            "poll_us" => poll_us = parse_poll_us(v).map_err(err)?,
            "bridge" if crate::hostnet::valid_ifname(v) => bridge = Some(v.to_string()),
            "bridge" => {
                return Err(err(format!(
                    "bridge={v}: an interface name is 1-15 letters, digits, '-', '_' or '.'"
                )))
            }
            "ip" if addresses.len() < crate::hostnet::MAX_ADDRESSES => addresses
                .push(crate::hostnet::parse_address(v).map_err(|e| err(format!("ip={v}: {e}")))?),
            "ip" => {
                return Err(err(format!(
                    "more than {} ip= entries",
                    crate::hostnet::MAX_ADDRESSES
                )))
            }
            other => {
                return Err(err(format!(
                    "unknown key '{other}' (tap, mac, vhost, queues, poll_us, bridge, ip)"
                )))
            }
        }
    }
    let tap = tap.ok_or_else(|| err("tap= is required".into()))?;
    if poll_us > 0 && vhost == devices::virtio::net::vhost::VhostMode::Off {
        return Err(err(format!(
            "poll_us={poll_us} is vhost-net's busy polling: it needs vhost=auto or vhost=on"
        )));
    }
    Ok(NetSpec {
        tap,
        mac,
        vhost,
        queues,
        poll_us,
        bridge,
        addresses,
    })
}
