//! The host side of a VM's network, for `vmm net up|down` (run as root by
//! the unit before the VMM starts, on `systemctl reload` and after it
//! stops): the VM's TAP, on the operator's bridge; nftables rules on the
//! TAP itself that let the VM send only from its own MAC and addresses and
//! give it only the frames meant for it; its DHCP lease for dnsmasq.
//!
//! The rules hang on the TAP's own `ingress` and `egress` hooks (the
//! `netdev` family), not on a bridge: they hold whatever the TAP is plugged
//! into, a bridge or a routed setup, and only that VM's frames pass through
//! its chains. Everything here is pure text; [`apply`] runs `ip` and `nft`.

pub mod apply;

use std::fmt::Write as _;
use std::net::IpAddr;

use devices::virtio::net::format_mac;
use ipnet::IpNet;

/// `ip=` entries one interface may have.
pub const MAX_ADDRESSES: usize = 64;
/// The nftables table (family `netdev`) that holds every VM's chains.
pub const TABLE: &str = "vmm";
/// Bytes of a neighbour solicitation or advertisement without options
/// (ICMPv6 header, reserved word, target address).
const ND_LEN: u32 = 24;

/// An interface name `vmm net` accepts: 1-15 bytes of letters, digits,
/// `-`, `_` and `.`, starting with a letter or digit. Narrower than Linux
/// allows: the name becomes part of nftables identifiers, which cannot be
/// quoted in Debian 12's nft.
pub fn valid_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `ADDR` (one address) or `NET/LEN` (a prefix routed to the VM, host
/// bits clear). Addresses no host could give a VM are refused.
pub fn parse_address(text: &str) -> Result<IpNet, String> {
    let net = if text.contains('/') {
        let net: IpNet = text
            .parse()
            .map_err(|_| "not an address or ADDRESS/PREFIX-LENGTH".to_string())?;
        if net.trunc() != net {
            return Err(format!(
                "host bits are set: write {} for one address or {} for the prefix",
                net.addr(),
                net.trunc()
            ));
        }
        net
    } else {
        let addr: IpAddr = text.parse().map_err(|_| "not an IP address".to_string())?;
        IpNet::from(addr)
    };
    let a = net.addr();
    let refused = a.is_unspecified()
        || a.is_loopback()
        || a.is_multicast()
        || matches!(a, IpAddr::V4(v4) if v4.is_broadcast())
        || matches!(a, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
    if refused {
        return Err("not an address a VM can be given".into());
    }
    // A guard against a typo letting a VM send from half the Internet.
    let shortest = if net.addr().is_ipv4() { 16 } else { 32 };
    if net.prefix_len() < shortest {
        return Err(format!(
            "a prefix routed to one VM is /{shortest} or longer"
        ));
    }
    Ok(net)
}

/// One VM interface as the host sees it: the TAP, the MAC the VM was given,
/// the addresses and prefixes it may send from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    pub tap: String,
    pub mac: [u8; 6],
    pub addresses: Vec<IpNet>,
}

impl Port {
    fn v4(&self) -> impl Iterator<Item = &IpNet> {
        self.addresses.iter().filter(|n| matches!(n, IpNet::V4(_)))
    }

    fn v6(&self) -> impl Iterator<Item = &IpNet> {
        self.addresses.iter().filter(|n| matches!(n, IpNet::V6(_)))
    }

    /// The VM's IPv6 link-local address: the EUI-64 one its MAC gives
    /// (Linux's and systemd-networkd's default). The only link-local source
    /// it may use: any other could claim the host's (the VMs' router).
    pub fn link_local(&self) -> std::net::Ipv6Addr {
        let m = self.mac.map(u128::from);
        let iid = ((m[0] ^ 2) << 56)
            | (m[1] << 48)
            | (m[2] << 40)
            | (0xff << 32)
            | (0xfe << 24)
            | (m[3] << 16)
            | (m[4] << 8)
            | m[5];
        std::net::Ipv6Addr::from((0xfe80u128 << 112) | iid)
    }

    /// The set holding the targets the VM's neighbour advertisements may
    /// name: its IPv6 addresses and its link-local one, as 128-bit ranges
    /// (Debian 12's nft has no `icmpv6 taddr`, so the target is a raw
    /// payload field).
    fn na_targets(&self) -> Vec<String> {
        let mut out = vec![format!("0x{:032x}", u128::from(self.link_local()))];
        for n in self.v6() {
            if let IpNet::V6(n) = n {
                let lo = u128::from(n.network());
                let hi = u128::from(n.broadcast());
                out.push(if lo == hi {
                    format!("0x{lo:032x}")
                } else {
                    format!("0x{lo:032x}-0x{hi:032x}")
                });
            }
        }
        out
    }
}

fn elements(items: impl Iterator<Item = String>) -> Option<String> {
    let v: Vec<String> = items.collect();
    (!v.is_empty()).then(|| v.join(", "))
}

/// The nft script that installs (or replaces, atomically: `nft -f` is one
/// transaction) the port's filtering. Run again with changed addresses it
/// swaps the address sets in place: a live address change.
pub fn up_script(p: &Port) -> String {
    let t = TABLE;
    let tap = &p.tap;
    let mac = format_mac(p.mac);
    let mac48 = format!(
        "0x{}",
        p.mac.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let (v4, v6, na) = (
        format!("v4-{tap}"),
        format!("v6-{tap}"),
        format!("na-{tap}"),
    );
    let (from, to) = (format!("from-{tap}"), format!("to-{tap}"));
    let mut s = String::new();
    let mut line = |l: String| {
        s.push_str(&l);
        s.push('\n');
    };
    line(format!("add table netdev {t}"));
    line(format!(
        "add set netdev {t} {v4} {{ type ipv4_addr; flags interval; auto-merge; }}"
    ));
    line(format!(
        "add set netdev {t} {v6} {{ type ipv6_addr; flags interval; auto-merge; }}"
    ));
    line(format!(
        "add set netdev {t} {na} {{ typeof @th,64,128; flags interval; auto-merge; }}"
    ));
    for set in [&v4, &v6, &na] {
        line(format!("flush set netdev {t} {set}"));
    }
    if let Some(e) = elements(p.v4().map(|n| n.to_string())) {
        line(format!("add element netdev {t} {v4} {{ {e} }}"));
    }
    let v6_elements =
        std::iter::once(p.link_local().to_string()).chain(p.v6().map(|n| n.to_string()));
    if let Some(e) = elements(v6_elements) {
        line(format!("add element netdev {t} {v6} {{ {e} }}"));
    }
    line(format!(
        "add element netdev {t} {na} {{ {} }}",
        p.na_targets().join(", ")
    ));
    // What the VM sends (the TAP's ingress).
    line(format!(
        "add chain netdev {t} {from} {{ type filter hook ingress device \"{tap}\" priority -500; policy accept; }}"
    ));
    line(format!("flush chain netdev {t} {from}"));
    let rules = [
        // Its own MAC only, in the frame and in ARP.
        format!("ether saddr != {mac} counter drop"),
        format!("ether type arp arp saddr ether != {mac} counter drop"),
        // ARP probes (RFC 5227) come from 0.0.0.0.
        "ether type arp arp saddr ip 0.0.0.0 accept".into(),
        format!("ether type arp arp saddr ip != @{v4} counter drop"),
        "ether type arp accept".into(),
        // A DHCP client has no address yet; a DHCP server in a VM (any
        // reply to a client's port) is a rogue server for the others.
        "ether type ip ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept".into(),
        format!("ether type ip ip saddr != @{v4} counter drop"),
        "ether type ip udp sport 67 counter drop".into(),
        "ether type ip udp dport 68 counter drop".into(),
        "ether type ip accept".into(),
        // No router advertisement, redirect or MLD query (the host is the
        // router), no DHCPv6 server, no neighbour advertisement for an
        // address not its own.
        "ether type ip6 icmpv6 type { nd-router-advert, nd-redirect, mld-listener-query } counter drop".into(),
        "ether type ip6 udp sport 547 counter drop".into(),
        "ether type ip6 udp dport 546 counter drop".into(),
        format!("ether type ip6 icmpv6 type nd-neighbor-advert @th,64,128 != @{na} counter drop"),
        // A link-layer address option would point the host's (and the
        // others') neighbour entry for the VM's address at another MAC:
        // solicitations, advertisements and router solicitations carry at
        // most one option, its own MAC (nft cannot look past a first
        // option, so more options are refused outright). Address
        // detection's solicitations (from ::) carry none but a nonce.
        format!(
            "ether type ip6 ip6 saddr != :: icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} ip6 length != {{ {}, {} }} counter drop",
            ND_LEN, ND_LEN + 8
        ),
        format!(
            "ether type ip6 ip6 saddr != :: icmpv6 type nd-neighbor-solicit ip6 length {} @th,192,16 != 0x0101 counter drop",
            ND_LEN + 8
        ),
        format!(
            "ether type ip6 icmpv6 type nd-neighbor-advert ip6 length {} @th,192,16 != 0x0201 counter drop",
            ND_LEN + 8
        ),
        format!(
            "ether type ip6 ip6 saddr != :: icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} ip6 length {} @th,208,48 != {mac48} counter drop",
            ND_LEN + 8
        ),
        "ether type ip6 icmpv6 type nd-router-solicit ip6 length != { 8, 16 } counter drop".into(),
        "ether type ip6 icmpv6 type nd-router-solicit ip6 length 16 @th,64,16 != 0x0101 counter drop".into(),
        format!(
            "ether type ip6 icmpv6 type nd-router-solicit ip6 length 16 @th,80,48 != {mac48} counter drop"
        ),
        // Duplicate address detection and MLD reports come from ::;
        // everything else from its own addresses, its link-local one among
        // them.
        "ether type ip6 ip6 saddr :: icmpv6 type { nd-neighbor-solicit, mld-listener-report, mld2-listener-report } accept".into(),
        format!("ether type ip6 ip6 saddr != @{v6} counter drop"),
        "ether type ip6 accept".into(),
        // Anything else (VLAN tags, other protocols) goes nowhere.
        "counter drop".into(),
    ];
    for r in rules {
        line(format!("add rule netdev {t} {from} {r}"));
    }
    // What the VM receives (the TAP's egress): frames for its MAC,
    // broadcast and multicast; not other VMs' unicast a bridge floods,
    // nor their DHCP requests.
    line(format!(
        "add chain netdev {t} {to} {{ type filter hook egress device \"{tap}\" priority -500; policy accept; }}"
    ));
    line(format!("flush chain netdev {t} {to}"));
    for r in [
        // Other clients' DHCP requests are for the host alone.
        "ether type ip udp dport 67 counter drop".into(),
        "ether type ip6 udp dport 547 counter drop".into(),
        format!("ether daddr {mac} accept"),
        "ether daddr & 01:00:00:00:00:00 == 01:00:00:00:00:00 accept".into(),
        "counter drop".into(),
    ] {
        line(format!("add rule netdev {t} {to} {r}"));
    }
    s
}

/// The nft script that removes the port's chains and sets, of those the
/// table holds (`nft -j list table` gives them): a chain can be gone with
/// its TAP while its sets stay. Empty when there is nothing to remove.
pub fn down_script(tap: &str, existing: &Existing) -> String {
    let t = TABLE;
    let mut s = String::new();
    for chain in ["from", "to"] {
        let name = format!("{chain}-{tap}");
        if existing.chains.contains(&name) {
            let _ = writeln!(s, "delete chain netdev {t} {name}");
        }
    }
    for set in ["v4", "v6", "na"] {
        let name = format!("{set}-{tap}");
        if existing.sets.contains(&name) {
            let _ = writeln!(s, "delete set netdev {t} {name}");
        }
    }
    s
}

/// The chains and sets of the table, from `nft -j list table netdev vmm`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Existing {
    pub chains: Vec<String>,
    pub sets: Vec<String>,
    /// What each filtered TAP may send from (its `v4-`/`v6-` sets), as
    /// address ranges: the host's record of which VM owns which address.
    pub claims: Vec<Claim>,
}

/// A range of addresses one TAP's VM may send from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub tap: String,
    pub first: IpAddr,
    pub last: IpAddr,
}

/// One element of an address set in nft's JSON: an address, a prefix
/// (`{"prefix":{"addr":..,"len":..}}`) or a range (`{"range":[a,b]}`).
fn element_range(e: &serde_json::Value) -> Option<(IpAddr, IpAddr)> {
    if let Some(a) = e.as_str() {
        let a: IpAddr = a.parse().ok()?;
        return Some((a, a));
    }
    if let Some(p) = e.get("prefix") {
        let addr: IpAddr = p.get("addr")?.as_str()?.parse().ok()?;
        let len = u8::try_from(p.get("len")?.as_u64()?).ok()?;
        let net = IpNet::new(addr, len).ok()?;
        return Some((net.network(), net.broadcast()));
    }
    let r = e.get("range")?.as_array()?;
    let first: IpAddr = r.first()?.as_str()?.parse().ok()?;
    let last: IpAddr = r.get(1)?.as_str()?.parse().ok()?;
    Some((first, last))
}

/// The first of `port`'s addresses that another TAP's VM may already send
/// from (a link-local address is each VM's own, from its MAC): two VMs
/// given one address would take each other's traffic.
pub fn conflict(port: &Port, existing: &Existing) -> Option<(IpNet, String)> {
    port.addresses.iter().find_map(|net| {
        let (first, last) = (net.network(), net.broadcast());
        existing
            .claims
            .iter()
            .filter(|c| c.tap != port.tap)
            .filter(|c| !matches!(c.first, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80))
            .find(|c| c.first.is_ipv4() == first.is_ipv4() && c.first <= last && first <= c.last)
            .map(|c| (*net, c.tap.clone()))
    })
}

impl Existing {
    /// Reads nft's JSON listing; None when it is not one.
    pub fn from_json(text: &str) -> Option<Existing> {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        let mut e = Existing::default();
        for item in v.get("nftables")?.as_array()? {
            let name = |kind: &str| {
                item.get(kind)
                    .and_then(|o| o.get("name"))
                    .and_then(|n| n.as_str())
                    .map(str::to_string)
            };
            if let Some(n) = name("chain") {
                e.chains.push(n);
            }
            if let Some(n) = name("set") {
                let tap = n.strip_prefix("v4-").or_else(|| n.strip_prefix("v6-"));
                let elems = item
                    .get("set")
                    .and_then(|s| s.get("elem"))
                    .and_then(|v| v.as_array());
                if let (Some(tap), Some(elems)) = (tap, elems) {
                    for (first, last) in elems.iter().filter_map(element_range) {
                        e.claims.push(Claim {
                            tap: tap.to_string(),
                            first,
                            last,
                        });
                    }
                }
                e.sets.push(n);
            }
        }
        Some(e)
    }
}

/// dnsmasq's `dhcp-hostsdir` file for a VM: per interface, its MAC with its
/// first single IPv4 address and first single IPv6 address (`MAC,ADDR,[ADDR6]`).
/// Interfaces with neither get no line.
pub fn dhcp_hosts(ports: &[Port]) -> String {
    let mut s = String::new();
    for p in ports {
        let v4 = p.v4().find(|n| n.prefix_len() == 32).map(|n| n.addr());
        let v6 = p.v6().find(|n| n.prefix_len() == 128).map(|n| n.addr());
        let mut fields = vec![format_mac(p.mac)];
        fields.extend(v4.map(|a| a.to_string()));
        fields.extend(v6.map(|a| format!("[{a}]")));
        if fields.len() > 1 {
            let _ = writeln!(s, "{}", fields.join(","));
        }
    }
    s
}

#[cfg(test)]
mod tests;
