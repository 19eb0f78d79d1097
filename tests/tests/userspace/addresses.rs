//! A server's addresses, the operator's way (README.md, "Addresses"): the
//! host is a network namespace with a bridge, dnsmasq runs on it with the
//! shipped configuration, `vmm net up` makes each VM's TAP, filtering and
//! lease, and the stock Debian server image takes its addresses by DHCP.
//! A second address added to the running VM works once `vmm net up` has
//! run again; until then, and for addresses and MACs not its own, what the
//! VM sends reaches nobody.

use tests::guest::{Guest, HostDir, NetNs, Spec, HOST_IP, HOST_IP6};
use tests::Host;

use crate::server::{ssh_to, start_server, try_ssh_to};

/// dnsmasq in a namespace, from `resources/network/dnsmasq.conf` plus the
/// site's lines (the bridge and its ranges) and a leases directory of the
/// test's own; stopped on drop.
struct Dhcp {
    host: &'static Host,
    dir: HostDir,
}

impl Dhcp {
    fn start(h: &'static Host, ns: &NetNs) -> Dhcp {
        let dir = HostDir::new(h, "dhcp");
        let shipped = tests::repo_root().join("resources/network/dnsmasq.conf");
        let conf = dir.join("dnsmasq.conf");
        let leases = dir.join("leases");
        // dnsmasq reads the leases as `nobody`, as on an operator's host.
        h.sh(&format!(
            "set -e; chmod 755 {}; mkdir -p {leases}; \
             sed 's|^dhcp-hostsdir=.*|dhcp-hostsdir={leases}|' {} > {conf}; \
             printf '%s\\n' interface=br0 dhcp-range=10.0.2.0,static,255.255.255.0 \
                 dhcp-range=fd00:2::,static,64 pid-file={} log-dhcp log-facility={} >> {conf}",
            dir.path().display(),
            shipped.display(),
            dir.join("dnsmasq.pid"),
            dir.join("dnsmasq.log"),
        ))
        .ok("write the dnsmasq configuration");
        ns.sh(&format!("dnsmasq --conf-file={conf}"))
            .ok("start dnsmasq");
        Dhcp { host: h, dir }
    }

    fn leases(&self) -> String {
        self.dir.join("leases")
    }

    fn log(&self) -> String {
        self.host
            .sh(&format!("cat {}", self.dir.join("dnsmasq.log")))
            .stdout
    }
}

impl Drop for Dhcp {
    fn drop(&mut self) {
        let _ = self.host.try_sh(
            &format!(
                "kill $(cat {}) 2>/dev/null; true",
                self.dir.join("dnsmasq.pid")
            ),
            std::time::Duration::from_secs(30),
        );
    }
}

/// Waits for sshd at `addr` to answer `systemctl is-system-running --wait`
/// with `running`; on failure, the report names what the host saw: the
/// DHCP server's log, the filtering's counters, the guest's console.
fn wait_running(ns: &NetNs, dhcp: &Dhcp, g: &Guest, addr: &str) {
    let out = try_ssh_to(ns, addr, "systemctl is-system-running --wait", 30);
    if out.stdout.trim() != "running" {
        let nft = ns
            .sh("nft list table netdev vmm; ip neigh; bridge link")
            .stdout;
        panic!(
            "{addr}: {}{}\n--- dnsmasq ---\n{}\n--- host ---\n{nft}\n{}",
            out.stdout,
            out.stderr,
            dhcp.log(),
            g.report()
        );
    }
}

/// `vmm net up` (or `down`) for VM `name` with interface `net`, in `ns`.
fn vmm_net(ns: &NetNs, dhcp: &Dhcp, action: &str, name: &str, net: &str) -> String {
    ns.sh(&format!(
        "{} net {action} --name {name} --dhcp-dir {} --net {net}",
        tests::bin("vmm").display(),
        dhcp.leases()
    ))
    .ok(&format!("vmm net {action} {net}"))
}

/// A server VM `name` on the namespace's bridge, its interface `net`
/// (also given to `vmm net up` first), taking its addresses by DHCP.
fn server_on_bridge(h: &'static Host, ns: &NetNs, dhcp: &Dhcp, name: &str, net: &str) -> Guest {
    vmm_net(ns, dhcp, "up", name, net);
    start_server(h, ns, name, "debian-6.1", "", &["--net", net])
}

/// One of the namespace's ICMP counters (`/proc/net/snmp`, `/proc/net/snmp6`):
/// echo requests that reached the host.
fn echoes_in(ns: &NetNs) -> (u64, u64) {
    let snmp = ns.sh("cat /proc/net/snmp").ok("read /proc/net/snmp");
    let lines: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Icmp:")).collect();
    let v4 = match lines.as_slice() {
        [names, values, ..] => names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == "InEchos")
            .and_then(|(_, v)| v.parse().ok()),
        _ => None,
    };
    let snmp6 = ns.sh("cat /proc/net/snmp6").ok("read /proc/net/snmp6");
    let v6 = snmp6.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next() == Some("Icmp6InEchos"))
            .then(|| w.next().and_then(|v| v.parse().ok()))
            .flatten()
    });
    match (v4, v6) {
        (Some(a), Some(b)) => (a, b),
        _ => panic!("no echo counters in\n{snmp}\n{snmp6}"),
    }
}

/// Packets the rule of `tap`'s `from-` chain that starts with `rule` has
/// dropped. `rule` as `nft list` prints it: without the `ether type`
/// dependencies the rules were written with.
fn drops(ns: &NetNs, tap: &str, rule: &str) -> u64 {
    let chain = ns
        .sh(&format!("nft list chain netdev vmm from-{tap}"))
        .ok("nft list chain");
    chain
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(rule) && l.contains(" counter packets "))
        .and_then(|l| l.split(" counter packets ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counted rule {rule:?} in\n{chain}"))
}

const MAC1: &str = "52:54:00:00:5e:11";
const MAC2: &str = "52:54:00:00:5e:12";

#[test]
fn a_server_takes_its_addresses_by_dhcp_and_a_second_one_works_once_added_to_the_running_vm() {
    tests::guest::scenario(|h| {
        let ns = NetNs::bridged(h, "addr");
        let dhcp = Dhcp::start(h, &ns);
        let net = format!("tap=tap-addr1,mac={MAC1},bridge=br0,ip=10.0.2.2,ip=fd00:2::2");
        let g = server_on_bridge(h, &ns, &dhcp, "addr1", &net);
        wait_running(&ns, &dhcp, &g, "10.0.2.2");
        // Both leases, by DHCP and DHCPv6, from the stock image's networkd.
        let addrs = ssh_to(&ns, "10.0.2.2", "ip -o addr show dev eth0");
        assert!(
            addrs.contains("inet 10.0.2.2/24"),
            "{addrs}\n{}",
            dhcp.log()
        );
        assert!(
            addrs.contains("inet6 fd00:2::2/"),
            "{addrs}\n{}",
            dhcp.log()
        );
        // A TCP service (sshd) answers at the IPv6 address too.
        assert_eq!(ssh_to(&ns, "fd00:2::2", "hostname").trim(), "web1");
        let boot_id = ssh_to(&ns, "10.0.2.2", "cat /proc/sys/kernel/random/boot_id");

        // The customer configures a second address the VM has not been
        // given: nobody hears it.
        ssh_to(&ns, "10.0.2.2", "ip addr add 10.0.2.3/24 dev eth0");
        // (busybox: this machine's tools are the test host's; exit 1 is
        // "no reply", anything else would prove nothing.)
        let r = ns.sh("busybox ping -c 2 -W 2 10.0.2.3");
        assert_eq!(
            r.status.code(),
            Some(1),
            "10.0.2.3 answered before it was given, or ping failed:\n{}{}",
            r.stdout,
            r.stderr
        );
        // The operator adds it to the config and reloads: it works, the VM
        // did not reboot (same boot, same VMM).
        let out = vmm_net(&ns, &dhcp, "up", "addr1", &format!("{net},ip=10.0.2.3"));
        assert!(
            out.contains("sends from 10.0.2.2/32 fd00:2::2/128 10.0.2.3/32"),
            "{out}"
        );
        ns.sh("busybox ping -c 1 -W 5 10.0.2.3")
            .ok("ping the second address");
        assert_eq!(ssh_to(&ns, "10.0.2.3", "hostname").trim(), "web1");
        assert_eq!(
            ssh_to(&ns, "10.0.2.2", "cat /proc/sys/kernel/random/boot_id"),
            boot_id
        );
        assert_eq!(g.ctl().status()["boot_count"], 1);
    });
}

#[test]
fn a_vm_on_the_bridge_cannot_send_from_another_vms_addresses_or_mac() {
    tests::guest::scenario(|h| {
        let ns = NetNs::bridged(h, "spoof");
        let dhcp = Dhcp::start(h, &ns);
        let server = server_on_bridge(
            h,
            &ns,
            &dhcp,
            "spoof1",
            &format!("tap=tap-spoof1,mac={MAC1},bridge=br0,ip=10.0.2.2,ip=fd00:2::2"),
        );
        wait_running(&ns, &dhcp, &server, "10.0.2.2");
        // The other VM: a Debian kernel's initramfs shell (root in its own
        // VM, as a hostile customer is), its addresses set by hand.
        let net = format!("tap=tap-spoof2,mac={MAC2},bridge=br0,ip=10.0.2.4,ip=fd00:2::4");
        vmm_net(&ns, &dhcp, "up", "spoof2", &net);
        let mut b = crate::boot(
            h,
            Spec::new("debian-6.1")
                .name("spoof2")
                .netns(&ns)
                .args(&["--net", &net]),
        );
        // (No duplicate address detection: busybox's `ip` has no nodad.)
        b.run(
            "echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad && ip link set eth0 up && \
             ip addr add 10.0.2.4/24 dev eth0 && ip -6 addr add fd00:2::4/64 dev eth0",
        );
        // The host knows spoof1 at 10.0.2.2 by its MAC.
        ns.sh("busybox ping -c 1 -W 5 10.0.2.2").ok("ping spoof1");

        // From its own addresses spoof2 reaches the host: 3 echoes each.
        let before = echoes_in(&ns);
        b.run(&format!(
            "ping -c 3 -W 5 {HOST_IP} >/dev/null && ping -c 3 -W 5 {HOST_IP6} >/dev/null"
        ));
        let own = echoes_in(&ns);
        assert_eq!((own.0 - before.0, own.1 - before.1), (3, 3));

        // From spoof1's addresses (added beside its own, so that its
        // neighbour entries for the host stay and the echoes do leave it):
        // nothing arrives, the filter's address rules drop them.
        b.run(&format!(
            "ip addr add 10.0.2.2/32 dev eth0 && ip -6 addr add fd00:2::2/128 dev eth0 && \
             {{ ping -c 3 -W 1 -I 10.0.2.2 {HOST_IP}; ping -c 3 -W 1 -I fd00:2::2 {HOST_IP6}; true; }} && \
             ip addr del 10.0.2.2/32 dev eth0 && ip -6 addr del fd00:2::2/128 dev eth0"
        ));
        assert_eq!(
            echoes_in(&ns),
            own,
            "echoes from spoof1's addresses reached the host"
        );
        assert!(drops(&ns, "tap-spoof2", "ip saddr != @v4") > 0);
        assert!(drops(&ns, "tap-spoof2", "ip6 saddr != @v6") > 0);
        // From its own addresses with spoof1's MAC: nothing arrives.
        b.run(&format!(
            "ip link set eth0 address {MAC1} && \
             {{ ping -c 3 -W 1 {HOST_IP}; ping -c 3 -W 1 {HOST_IP6}; true; }} && \
             ip link set eth0 address {MAC2}"
        ));
        assert_eq!(
            echoes_in(&ns),
            own,
            "echoes with spoof1's MAC reached the host"
        );
        assert!(drops(&ns, "tap-spoof2", "ether saddr !=") > 0);
        // Back to its own: it reaches the host again.
        b.run(&format!("ping -c 1 -W 5 {HOST_IP} >/dev/null"));
        // spoof1 kept its address: the host still reaches it at its MAC.
        let neigh = ns.sh("ip neigh show 10.0.2.2").ok("ip neigh");
        assert!(neigh.contains(MAC1), "{neigh}");
        assert_eq!(
            ssh_to(&ns, "10.0.2.2", "cat /sys/class/net/eth0/address").trim(),
            MAC1
        );
    });
}
