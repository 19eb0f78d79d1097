use super::*;

fn net(text: &str) -> IpNet {
    parse_address(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn web1(addresses: &[&str]) -> Port {
    Port {
        tap: "tap-web1".into(),
        mac: [0x52, 0x54, 0, 0, 0x5e, 1],
        addresses: addresses.iter().map(|a| net(a)).collect(),
    }
}

#[test]
fn an_address_is_one_host_and_a_prefix_must_have_its_host_bits_clear() {
    assert_eq!(net("203.0.113.5").to_string(), "203.0.113.5/32");
    assert_eq!(net("2001:db8::5").to_string(), "2001:db8::5/128");
    assert_eq!(net("2001:db8:1::/64").to_string(), "2001:db8:1::/64");
    let e = parse_address("203.0.113.5/24").unwrap_err();
    assert!(
        e.contains("203.0.113.5 for one address or 203.0.113.0/24"),
        "{e}"
    );
}

#[test]
fn addresses_no_vm_can_be_given_are_refused() {
    for bad in [
        "0.0.0.0",
        "::",
        "127.0.0.1",
        "::1",
        "224.0.0.1",
        "ff02::1",
        "255.255.255.255",
        "fe80::1",
        "0.0.0.0/0",
        "::/0",
        "128.0.0.0/1",
        "10.0.0.0/15",
        "2000::/3",
        "10.0.2",
        "web1",
        "",
    ] {
        assert!(parse_address(bad).is_err(), "{bad} was accepted");
    }
}

#[test]
fn interface_names_are_those_nft_takes_unquoted() {
    for good in ["tap0", "tap-web1", "vm_web1.0", "123456789012345"] {
        assert!(valid_ifname(good), "{good}");
    }
    for bad in [
        "",
        "1234567890123456",
        "-tap",
        ".tap",
        "tap web1",
        "tap\"",
        "tap;",
        "täp",
    ] {
        assert!(!valid_ifname(bad), "{bad}");
    }
}

#[test]
fn the_vm_may_send_only_from_its_mac_and_addresses() {
    let s = up_script(&web1(&["10.0.2.2", "10.0.3.0/24", "fd00:2::2"]));
    for want in [
        "add element netdev vmm v4-tap-web1 { 10.0.2.2/32, 10.0.3.0/24 }",
        "add element netdev vmm v6-tap-web1 { fe80::5054:ff:fe00:5e01, fd00:2::2/128 }",
        "add rule netdev vmm from-tap-web1 ether saddr != 52:54:00:00:5e:01 counter drop",
        "add rule netdev vmm from-tap-web1 ether type arp arp saddr ether != 52:54:00:00:5e:01 counter drop",
        "add rule netdev vmm from-tap-web1 ether type arp arp saddr ip != @v4-tap-web1 counter drop",
        "add rule netdev vmm from-tap-web1 ether type ip ip saddr != @v4-tap-web1 counter drop",
        "add rule netdev vmm from-tap-web1 ether type ip6 ip6 saddr != @v6-tap-web1 counter drop",
        "hook ingress device \"tap-web1\"",
        "hook egress device \"tap-web1\"",
        "add rule netdev vmm to-tap-web1 ether daddr 52:54:00:00:5e:01 accept",
    ] {
        assert!(s.contains(want), "missing {want:?} in\n{s}");
    }
    // The chains end in drop: another protocol or a VLAN tag goes nowhere.
    let last_from = s
        .lines()
        .rfind(|l| l.starts_with("add rule netdev vmm from-tap-web1"));
    assert_eq!(
        last_from,
        Some("add rule netdev vmm from-tap-web1 counter drop")
    );
}

#[test]
fn the_rules_are_replaced_in_place_so_running_up_again_changes_the_addresses() {
    let s = up_script(&web1(&["10.0.2.2"]));
    let pos = |needle: &str| {
        s.find(needle)
            .unwrap_or_else(|| panic!("missing {needle:?} in\n{s}"))
    };
    // Each set and chain is emptied before it is filled, in the same script.
    assert!(pos("flush set netdev vmm v4-tap-web1") < pos("add element netdev vmm v4-tap-web1"));
    assert!(pos("flush chain netdev vmm from-tap-web1") < pos("add rule netdev vmm from-tap-web1"));
    assert!(pos("flush chain netdev vmm to-tap-web1") < pos("add rule netdev vmm to-tap-web1"));
}

#[test]
fn a_vm_without_addresses_sends_only_dhcp_discovery_and_from_its_own_link_local_address() {
    let s = up_script(&web1(&[]));
    assert!(!s.contains("add element netdev vmm v4-tap-web1"), "{s}");
    assert!(s.contains("add element netdev vmm v6-tap-web1 { fe80::5054:ff:fe00:5e01 }"));
    assert!(s.contains("ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept"));
}

#[test]
fn the_link_local_address_is_the_eui_64_one_of_the_mac() {
    assert_eq!(
        web1(&[]).link_local().to_string(),
        "fe80::5054:ff:fe00:5e01"
    );
    let p = Port {
        tap: "t".into(),
        mac: [0x02, 0xff, 0x10, 0x20, 0x30, 0x40],
        addresses: vec![],
    };
    assert_eq!(p.link_local().to_string(), "fe80::ff:10ff:fe20:3040");
}

#[test]
fn neighbour_advertisements_may_name_only_the_vms_own_v6_addresses() {
    let p = web1(&["2001:db8::5", "2001:db8:1::/64", "10.0.2.2"]);
    assert_eq!(
        p.na_targets(),
        vec![
            "0xfe80000000000000505400fffe005e01".to_string(),
            "0x20010db8000000000000000000000005".to_string(),
            "0x20010db8000100000000000000000000-0x20010db800010000ffffffffffffffff".to_string(),
        ]
    );
}

#[test]
fn neighbour_discovery_may_carry_only_the_vms_own_link_layer_address() {
    let s = up_script(&web1(&["2001:db8::5"]));
    for rule in [
        "ip6 length != { 24, 32 } counter drop",
        "nd-neighbor-solicit ip6 length 32 @th,192,16 != 0x0101 counter drop",
        "nd-neighbor-advert ip6 length 32 @th,192,16 != 0x0201 counter drop",
        "ip6 length 32 @th,208,48 != 0x525400005e01 counter drop",
        "nd-router-solicit ip6 length 16 @th,80,48 != 0x525400005e01 counter drop",
    ] {
        assert!(s.contains(rule), "missing {rule}:\n{s}");
    }
    // Before address detection's solicitations from :: are let through.
    let options = s.find("@th,208,48").unwrap_or(usize::MAX);
    let dad = s.find("ip6 saddr :: icmpv6").unwrap_or(0);
    assert!(options < dad, "{s}");
}

#[test]
fn rogue_dhcp_servers_routers_and_redirects_from_a_vm_are_dropped() {
    let s = up_script(&web1(&["10.0.2.2"]));
    for want in [
        "from-tap-web1 ether type ip udp sport 67 counter drop",
        "from-tap-web1 ether type ip udp dport 68 counter drop",
        "from-tap-web1 ether type ip6 udp sport 547 counter drop",
        "from-tap-web1 ether type ip6 udp dport 546 counter drop",
        "icmpv6 type { nd-router-advert, nd-redirect, mld-listener-query } counter drop",
        // and other clients' requests never reach it
        "to-tap-web1 ether type ip udp dport 67 counter drop",
        "to-tap-web1 ether type ip6 udp dport 547 counter drop",
    ] {
        assert!(s.contains(want), "missing {want:?} in\n{s}");
    }
}

#[test]
fn only_address_detection_and_mld_reports_may_come_from_the_unspecified_address() {
    let s = up_script(&web1(&["fd00:2::2"]));
    assert!(s.contains(
        "ether type ip6 ip6 saddr :: icmpv6 type { nd-neighbor-solicit, mld-listener-report, mld2-listener-report } accept"
    ));
    assert!(!s.contains("fe80::/10"), "{s}");
}

#[test]
fn down_removes_both_chains_and_all_three_sets() {
    let all = Existing {
        chains: vec![
            "from-tap-web1".into(),
            "to-tap-web1".into(),
            "from-tap-web2".into(),
        ],
        sets: ["v4", "v6", "na"]
            .iter()
            .map(|k| format!("{k}-tap-web1"))
            .collect(),
        claims: vec![],
    };
    assert_eq!(
        down_script("tap-web1", &all),
        "delete chain netdev vmm from-tap-web1\n\
         delete chain netdev vmm to-tap-web1\n\
         delete set netdev vmm v4-tap-web1\n\
         delete set netdev vmm v6-tap-web1\n\
         delete set netdev vmm na-tap-web1\n"
    );
}

#[test]
fn down_removes_what_is_left_and_nothing_when_nothing_is() {
    let sets_only = Existing {
        chains: vec![],
        sets: vec!["v4-tap-web1".into()],
        claims: vec![],
    };
    assert_eq!(
        down_script("tap-web1", &sets_only),
        "delete set netdev vmm v4-tap-web1\n"
    );
    assert_eq!(down_script("tap-web1", &Existing::default()), "");
}

#[test]
fn the_table_listing_is_read_from_nfts_json() {
    let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
        {"table": {"family": "netdev", "name": "vmm", "handle": 1}},
        {"set": {"family": "netdev", "name": "v4-tap-web1", "table": "vmm", "type": "ipv4_addr"}},
        {"chain": {"family": "netdev", "table": "vmm", "name": "from-tap-web1", "handle": 4}},
        {"rule": {"family": "netdev", "table": "vmm", "chain": "from-tap-web1", "expr": []}}]}"#;
    assert_eq!(
        Existing::from_json(json),
        Some(Existing {
            chains: vec!["from-tap-web1".into()],
            sets: vec!["v4-tap-web1".into()],
            claims: vec![],
        })
    );
    assert_eq!(Existing::from_json("not json"), None);
    assert_eq!(Existing::from_json("{}"), None);
}

/// nft 1.0.6's listing of two VMs' sets (as `nft -j list table` prints
/// them: addresses, prefixes and merged ranges).
const TWO_VMS: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
    {"set": {"family": "netdev", "name": "v4-tap-web2", "table": "vmm", "type": "ipv4_addr",
      "flags": ["interval"], "elem": ["10.0.2.3", {"prefix": {"addr": "10.0.5.0", "len": 24}},
      {"range": ["10.0.4.1", "10.0.4.7"]}]}},
    {"set": {"family": "netdev", "name": "v6-tap-web2", "table": "vmm", "type": "ipv6_addr",
      "flags": ["interval"], "elem": [{"prefix": {"addr": "2001:db8:2::", "len": 64}},
      "fe80::5054:ff:fe00:5e01"]}},
    {"set": {"family": "netdev", "name": "v4-tap-web1", "table": "vmm", "type": "ipv4_addr",
      "flags": ["interval"], "elem": ["10.0.2.2"]}},
    {"set": {"family": "netdev", "name": "na-tap-web2", "table": "vmm",
      "elem": [{"range": ["0x1", "0x2"]}]}}]}"#;

#[test]
fn each_vms_addresses_are_read_from_its_sets() {
    let e = Existing::from_json(TWO_VMS).unwrap_or_else(|| panic!("not read"));
    let web2: Vec<String> = e
        .claims
        .iter()
        .filter(|c| c.tap == "tap-web2")
        .map(|c| format!("{}-{}", c.first, c.last))
        .collect();
    assert_eq!(
        web2,
        [
            "10.0.2.3-10.0.2.3",
            "10.0.5.0-10.0.5.255",
            "10.0.4.1-10.0.4.7",
            "2001:db8:2::-2001:db8:2:0:ffff:ffff:ffff:ffff",
            "fe80::5054:ff:fe00:5e01-fe80::5054:ff:fe00:5e01",
        ]
    );
}

#[test]
fn an_address_another_vm_sends_from_is_refused_and_its_own_are_not() {
    let e = Existing::from_json(TWO_VMS).unwrap_or_else(|| panic!("not read"));
    let taken = |addrs: &[&str]| conflict(&web1(addrs), &e).map(|(n, t)| format!("{n} {t}"));
    assert_eq!(
        taken(&["10.0.2.3"]).as_deref(),
        Some("10.0.2.3/32 tap-web2")
    );
    assert_eq!(
        taken(&["10.0.5.77"]).as_deref(),
        Some("10.0.5.77/32 tap-web2")
    );
    assert_eq!(
        taken(&["10.0.4.0/29"]).as_deref(),
        Some("10.0.4.0/29 tap-web2")
    );
    assert_eq!(
        taken(&["2001:db8:2:0:1::1"]).as_deref(),
        Some("2001:db8:2:0:1::1/128 tap-web2")
    );
    // Its own set (an `up` again) and addresses nobody has are fine; so
    // are link-local ones, each VM's own from its MAC.
    assert_eq!(
        taken(&["10.0.2.2", "10.0.4.8", "10.0.2.4", "2001:db8:3::/64"]),
        None
    );
    assert_eq!(taken(&[]), None);
}

#[test]
fn the_dhcp_lease_is_the_first_single_address_of_each_family() {
    let ports = [
        web1(&[
            "10.0.3.0/24",
            "10.0.2.2",
            "10.0.2.3",
            "2001:db8:1::/64",
            "2001:db8::2",
        ]),
        Port {
            tap: "tap-web1b".into(),
            mac: [0x52, 0x54, 0, 0, 0x5e, 2],
            addresses: vec![net("2001:db8::9")],
        },
        Port {
            tap: "tap-web1c".into(),
            mac: [0x52, 0x54, 0, 0, 0x5e, 3],
            addresses: vec![],
        },
    ];
    assert_eq!(
        dhcp_hosts(&ports),
        "52:54:00:00:5e:01,10.0.2.2,[2001:db8::2]\n52:54:00:00:5e:02,[2001:db8::9]\n"
    );
}
