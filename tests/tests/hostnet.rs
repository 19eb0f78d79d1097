//! `vmm net up|down` on this machine, in a network namespace of its own
//! with a bridge: the TAP is made and put on the bridge, the kernel takes
//! the nftables rules (Debian's own nft and kernel, not our reading of the
//! syntax), the DHCP lease is written, a second `up` changes the addresses
//! in place and `down` removes it all. What the rules do to a guest's
//! frames is tested with real guests in `userspace::addresses`.

use std::process::Command;

/// A network namespace with a bridge `br0`, removed on drop.
struct Ns(String);

impl Ns {
    fn new() -> Ns {
        let name = format!("vmm-hostnet-{}", tests::rand_u64() % 1_000_000);
        sh(&format!(
            "ip netns add {name} && ip -n {name} link add br0 type bridge && ip -n {name} link set br0 up"
        ));
        Ns(name)
    }

    /// Runs `script` in the namespace: its output; panics with it on failure.
    fn sh(&self, script: &str) -> String {
        sh(&format!("ip netns exec {} sh -c '{script}'", self.0))
    }

    /// `vmm net ARGS` in the namespace: (exit code, stdout + stderr).
    fn vmm_net(&self, args: &str) -> (i32, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .arg(tests::bin("vmm"))
            .arg("net")
            .args(args.split_whitespace())
            .output()
            .unwrap_or_else(|e| panic!("cannot run vmm net: {e}"));
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn sh(script: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", script])
        .output()
        .unwrap_or_else(|e| panic!("cannot run sh: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{script}:\n{text}");
    text
}

const MAC: &str = "52:54:00:00:5e:01";

#[test]
fn net_up_puts_the_tap_on_the_bridge_with_its_filtering_and_lease_and_down_removes_them() {
    let ns = Ns::new();
    let leases = tests::TempDir::new("hostnet");
    let dir = leases.path().display().to_string();
    let net = format!("--name web1 --dhcp-dir {dir} --net tap=tap-web1,mac={MAC},bridge=br0");

    let (rc, out) = ns.vmm_net(&format!("up {net},ip=10.0.2.2,ip=fd00:2::2"));
    assert_eq!(rc, 0, "{out}");
    assert_eq!(
        out.trim(),
        "web1: net up: tap-web1 on br0, sends from 10.0.2.2/32 fd00:2::2/128"
    );
    // A TAP, on the bridge, up.
    assert!(ns
        .sh("cat /sys/class/net/tap-web1/tun_flags")
        .starts_with("0x"));
    assert!(ns.sh("ip -o link show dev tap-web1").contains("master br0"));
    // The kernel holds the rules and the addresses.
    let rules = ns.sh("nft list table netdev vmm");
    for want in [
        "hook ingress device \"tap-web1\"",
        "hook egress device \"tap-web1\"",
        "ether saddr != 52:54:00:00:5e:01 counter packets 0 bytes 0 drop",
        "elements = { 10.0.2.2 }",
        // Its IPv6 address and its own link-local one, as a source and
        // as a neighbour advertisement's target.
        "fd00:2::2",
        "fe80::5054:ff:fe00:5e01",
        "0xfe80000000000000505400fffe005e01",
        "ether daddr 52:54:00:00:5e:01 accept",
    ] {
        assert!(rules.contains(want), "missing {want:?} in\n{rules}");
    }
    let lease = std::fs::read_to_string(leases.path().join("web1")).unwrap_or_default();
    assert_eq!(lease, format!("{MAC},10.0.2.2,[fd00:2::2]\n"));

    // Again with another address: the set changes, nothing is doubled.
    let (rc, out) = ns.vmm_net(&format!("up {net},ip=10.0.2.2,ip=10.0.2.7"));
    assert_eq!(rc, 0, "{out}");
    let rules = ns.sh("nft list table netdev vmm");
    assert!(
        rules.contains("elements = { 10.0.2.2, 10.0.2.7 }"),
        "{rules}"
    );
    assert!(!rules.contains("fd00:2::2 "), "{rules}");
    assert_eq!(
        rules
            .matches("ether saddr != 52:54:00:00:5e:01 counter")
            .count(),
        1,
        "{rules}"
    );

    // Overlapping entries are merged, not an error.
    let (rc, out) = ns.vmm_net(&format!("up {net},ip=10.0.3.0/24,ip=10.0.3.5"));
    assert_eq!(rc, 0, "{out}");
    assert!(ns
        .sh("nft list table netdev vmm")
        .contains("elements = { 10.0.3.0/24 }"));

    // down: no chain, no set, no lease; twice is fine.
    for _ in 0..2 {
        let (rc, out) = ns.vmm_net(&format!("down {net}"));
        assert_eq!(rc, 0, "{out}");
    }
    let rules = ns.sh("nft list table netdev vmm");
    assert!(!rules.contains("tap-web1"), "{rules}");
    assert!(!leases.path().join("web1").exists());
}

#[test]
fn net_up_with_a_missing_bridge_says_how_to_make_one_and_makes_no_tap() {
    let ns = Ns::new();
    let leases = tests::TempDir::new("hostnet");
    let (rc, out) = ns.vmm_net(&format!(
        "up --name web1 --dhcp-dir {} --net tap=tap-web1,bridge=vmbr9,ip=10.0.2.2",
        leases.path().display()
    ));
    assert_eq!(rc, 2, "{out}");
    assert_eq!(
        out.trim(),
        "vmm net: web1: tap tap-web1: bridge vmbr9 does not exist \
         (create it: ip link add vmbr9 type bridge; ip link set vmbr9 up)"
    );
    assert!(!ns.sh("ls /sys/class/net").contains("tap-web1"));
}

#[test]
fn net_up_refuses_an_interface_that_is_not_a_tap() {
    let ns = Ns::new();
    let leases = tests::TempDir::new("hostnet");
    let (rc, out) = ns.vmm_net(&format!(
        "up --name web1 --dhcp-dir {} --net tap=br0,ip=10.0.2.2",
        leases.path().display()
    ));
    assert_eq!(rc, 2, "{out}");
    assert_eq!(
        out.trim(),
        "vmm net: web1: tap br0: br0 exists and is not a TAP"
    );
}

#[test]
fn an_interface_no_longer_bridged_or_addressed_loses_its_old_filtering() {
    let ns = Ns::new();
    let leases = tests::TempDir::new("hostnet");
    let dir = leases.path().display().to_string();
    let (rc, out) = ns.vmm_net(&format!(
        "up --name web1 --dhcp-dir {dir} --net tap=tap-web1,ip=10.0.2.2"
    ));
    assert_eq!(rc, 0, "{out}");
    assert!(ns.sh("nft list table netdev vmm").contains("from-tap-web1"));
    let (rc, out) = ns.vmm_net(&format!(
        "up --name web1 --dhcp-dir {dir} --net tap=tap-web1"
    ));
    assert_eq!(rc, 0, "{out}");
    assert_eq!(out.trim(), "web1: net up: tap-web1");
    assert!(!ns.sh("nft list table netdev vmm").contains("tap-web1"));
    assert!(!leases.path().join("web1").exists());
}

#[test]
fn a_second_vm_given_an_address_the_first_sends_from_is_refused_and_nothing_of_it_is_made() {
    let ns = Ns::new();
    let leases = tests::TempDir::new("hostnet");
    let dir = leases.path().display();
    let web1 = format!(
        "up --name web1 --dhcp-dir {dir} --net tap=tap-web1,bridge=br0,ip=10.0.2.2,ip=2001:db8:1::/64"
    );
    let (rc, out) = ns.vmm_net(&web1);
    assert_eq!(rc, 0, "{out}");
    let (rc, out) = ns.vmm_net(&format!(
        "up --name web2 --dhcp-dir {dir} --net tap=tap-web2,bridge=br0,ip=10.0.2.3,ip=2001:db8:1::7"
    ));
    assert_eq!(rc, 2, "{out}");
    assert_eq!(
        out.trim(),
        "vmm net: web2: tap tap-web2: 2001:db8:1::7/128 is already tap-web1's \
         (another VM's ip=): one address, one VM"
    );
    assert!(!ns.sh("ls /sys/class/net").contains("tap-web2"), "no TAP");
    assert!(
        !ns.sh("nft list table netdev vmm").contains("tap-web2"),
        "no rules"
    );
    assert!(!leases.path().join("web2").exists(), "no lease");
    // The first VM's own `up` again (a reload) is not a conflict, and the
    // second gets in with addresses of its own.
    let (rc, out) = ns.vmm_net(&web1);
    assert_eq!(rc, 0, "{out}");
    let (rc, out) = ns.vmm_net(&format!(
        "up --name web2 --dhcp-dir {dir} --net tap=tap-web2,bridge=br0,ip=10.0.2.3,ip=2001:db8:2::7"
    ));
    assert_eq!(rc, 0, "{out}");
}

/// Writes `frames` into `tap` of namespace `ns` as the VM behind it would
/// (attached as its queue, from a thread moved into the namespace).
fn send_as_vm(ns: &str, tap: &str, frames: &[Vec<u8>]) {
    let (ns, tap, frames) = (ns.to_string(), tap.to_string(), frames.to_vec());
    std::thread::spawn(move || {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let nsf = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
        // SAFETY: setns on a namespace descriptor we hold; it moves only
        // this thread, which ends here.
        assert_eq!(
            unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        let mut tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        let mut ifr = [0u8; 40];
        ifr[..tap.len()].copy_from_slice(tap.as_bytes());
        // `vmm net up` makes multi-queue TAPs: a queue of one attaches
        // only as a multi-queue open.
        let flags: i16 = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE) as i16;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a 40-byte ifreq we own.
        let r = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, ifr.as_mut_ptr()) };
        assert_eq!(r, 0, "TUNSETIFF {tap}: {}", std::io::Error::last_os_error());
        // The bridge forwards from the port once it has carrier.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !sh(&format!("bridge -n {ns} link show dev {tap}")).contains("state forwarding") {
            assert!(
                std::time::Instant::now() < deadline,
                "{tap} never forwarded"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        for f in &frames {
            tun.write_all(f).unwrap();
        }
    })
    .join()
    .unwrap();
}

/// A neighbour solicitation from `src` for `target`, with `options` (raw).
fn neighbour_solicitation(mac: [u8; 6], src: &str, target: &str, options: &[u8]) -> Vec<u8> {
    let src: std::net::Ipv6Addr = src.parse().unwrap();
    let target: std::net::Ipv6Addr = target.parse().unwrap();
    let t = target.octets();
    // The target's solicited-node multicast address and MAC.
    let mut dst = [0u8; 16];
    dst[..2].copy_from_slice(&[0xff, 0x02]);
    dst[11..].copy_from_slice(&[0x01, 0xff, t[13], t[14], t[15]]);
    let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&t);
    icmp.extend_from_slice(options);
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    add(&src.octets());
    add(&dst);
    add(&(icmp.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(&icmp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    icmp[2..4].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let mut f = vec![0x33, 0x33, 0xff, t[13], t[14], t[15]];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&icmp);
    f
}

#[test]
fn a_vm_cannot_point_the_hosts_neighbour_entry_for_its_address_at_another_mac() {
    let ns = Ns::new();
    ns.sh("ip addr add fd00:2::1/64 dev br0 nodad");
    let leases = tests::TempDir::new("hostnet");
    let (rc, out) = ns.vmm_net(&format!(
        "up --name web1 --dhcp-dir {} --net tap=tap-web1,mac={MAC},bridge=br0,ip=fd00:2::2,ip=fd00:2::3",
        leases.path().display()
    ));
    assert_eq!(rc, 0, "{out}");
    let own = [0x52, 0x54, 0, 0, 0x5e, 0x01];
    let other = [0x52, 0x54, 0, 0, 0x5e, 0x99];
    let slla = |m: [u8; 6]| [&[1u8, 1][..], &m[..]].concat();
    let nonce = [14u8, 1, 1, 2, 3, 4, 5, 6];
    send_as_vm(
        &ns.0,
        "tap-web1",
        &[
            // Another MAC in the option, then the same after a nonce.
            neighbour_solicitation(own, "fd00:2::2", "fd00:2::1", &slla(other)),
            neighbour_solicitation(
                own,
                "fd00:2::2",
                "fd00:2::1",
                &[&nonce[..], &slla(other)].concat(),
            ),
            // Then a fair one from its other address: once the host has
            // its entry, it has seen the two before.
            neighbour_solicitation(own, "fd00:2::3", "fd00:2::1", &slla(own)),
        ],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !ns
        .sh("ip -6 neigh show dev br0")
        .contains("fd00:2::3 lladdr 52:54:00:00:5e:01")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the fair solicitation never reached the host: {}",
            ns.sh("ip -6 neigh show dev br0; nft list table netdev vmm")
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let neigh = ns.sh("ip -6 neigh show dev br0");
    assert!(
        !neigh.contains("5e:99"),
        "the host took the other MAC: {neigh}"
    );
    let rules = ns.sh("nft list chain netdev vmm from-tap-web1");
    let dropped = |pattern: &str| {
        rules
            .lines()
            .find(|l| l.contains(pattern) && l.contains("drop"))
            .unwrap_or_else(|| panic!("no rule with {pattern}: {rules}"))
            .contains("packets 1 ")
    };
    assert!(dropped("@th,208,48"), "the other MAC's rule: {rules}");
    assert!(
        dropped("ip6 length != { 24, 32 }"),
        "the two options' rule: {rules}"
    );
}
