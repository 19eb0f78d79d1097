//! A guest with two vCPUs gets a virtio-net queue pair per vCPU over a
//! multi-queue TAP, as a server gets one per CPU from its NIC: its driver
//! enables both (the control queue), traffic sent from each CPU leaves on
//! that CPU's queue and its answers come back there, on the VMM's own
//! datapath (counted per pair in `status`) and on vhost-net (one kernel
//! worker per pair, each of which does work).

use tests::guest::{scenario, Guest, HostDir, NetNs, Spec, GUEST_IP, HOST_IP, INIT_OK};

const MAC: &str = "52:54:00:12:34:59";

fn two_cpu_guest(h: &'static tests::Host, ns: &NetNs, vhost: &str) -> Guest {
    let spec = Spec::new("mini")
        .memory(384)
        .vcpus(2)
        .netns(ns)
        .args(&["--net", &format!("tap=tap0,mac={MAC},vhost={vhost}")]);
    let mut g = Guest::start_in(h, spec, HostDir::new(h, "net-mq"));
    g.wait_shell(INIT_OK);
    g.run(&format!(
        "ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up"
    ));
    g
}

/// Sends 8 MiB to the host from each vCPU in turn (`taskset`): the
/// driver's transmit-queue map sends a CPU's packets on its own queue,
/// and the TAP steers a flow's answers to the queue it came from.
fn send_from_each_cpu(ns: &NetNs, g: &mut Guest) {
    let mut sink = ns
        .spawn(&[
            "socat",
            "-u",
            "TCP-LISTEN:5003,reuseaddr,fork",
            "OPEN:/dev/null",
        ])
        .expect("socat sink");
    for cpu in 0..2 {
        let out = g.run(&format!(
            "for i in 1 2 3 4 5 6 7 8 9 10; do \
               dd if=/dev/zero bs=1M count=8 2>/dev/null | taskset -c {cpu} nc {HOST_IP} 5003 && echo SENT-{cpu} && break; \
               sleep 0.5; \
             done"
        ));
        assert!(out.contains(&format!("SENT-{cpu}")), "cpu {cpu}: {out}");
    }
    let _ = sink.kill();
}

/// Checks what the guest and `status` say of the queue pairs.
fn both_pairs_in_use(g: &mut Guest) -> serde_json::Value {
    let queues = g.run("ls /sys/class/net/eth0/queues");
    for q in ["rx-0", "rx-1", "tx-0", "tx-1"] {
        assert!(queues.contains(q), "the guest's queues: {queues}");
    }
    let s = g.ctl().status();
    let net = s["nets"][0].clone();
    assert_eq!(net["queue_pairs"], 2, "{s}");
    assert_eq!(
        net["queue_pairs_enabled"], 2,
        "the driver enabled both: {s}"
    );
    let out = g.run(&format!("ping -c 2 -W 5 {HOST_IP}"));
    assert!(out.contains("2 packets received"), "{out}");
    net
}

#[test]
fn a_two_vcpu_guest_gets_a_queue_pair_per_cpu_and_sends_on_both_over_either_datapath() {
    scenario(|h| {
        let ns = NetNs::new(h, "mq");
        let mut g = two_cpu_guest(h, &ns, "off");
        send_from_each_cpu(&ns, &mut g);
        let net = both_pairs_in_use(&mut g);
        assert_eq!(net["datapath"], "userspace");
        eprintln!("userspace datapath, two pairs: {net}");
        let frames = net["pair_frames"].as_array().cloned().unwrap_or_default();
        assert_eq!(frames.len(), 2, "{net}");
        for (p, f) in frames.iter().enumerate() {
            for (d, dir) in ["received", "sent"].iter().enumerate() {
                let n = f[d].as_u64().unwrap_or(0);
                assert!(n > 20, "pair {p} {dir} {n} frames: {net}");
            }
        }
        drop(g);
        drop(ns);

        let ns = NetNs::new(h, "mqv");
        let mut g = two_cpu_guest(h, &ns, "on");
        let before = vhost_worker_ticks(h, &g);
        assert_eq!(before.len(), 2, "one vhost-net worker per pair: {before:?}");
        send_from_each_cpu(&ns, &mut g);
        let net = both_pairs_in_use(&mut g);
        assert_eq!(net["datapath"], "vhost-net");
        let after = vhost_worker_ticks(h, &g);
        eprintln!("vhost-net workers' CPU ticks: {before:?} -> {after:?}");
        assert_eq!(after.len(), 2, "{after:?}");
        for ((w, b), (_, a)) in before.iter().zip(&after) {
            assert!(a > b, "worker {w} did no work: {before:?} -> {after:?}");
        }
    });
}

/// The VMM's vhost-net workers (threads named `vhost-<tid of a VMM
/// thread>`) with their CPU time in clock ticks (utime + stime), by name.
fn vhost_worker_ticks(h: &'static tests::Host, g: &Guest) -> Vec<(String, u64)> {
    let out = h
        .sh(&format!(
            "pid=$(pgrep -f -- '[-]-control {}' | head -n 1); [ -n \"$pid\" ] || exit 3; \
             for t in $(ls /proc/$pid/task); do \
               ps -eLo tid=,comm= | while read tid comm; do \
                 [ \"$comm\" = \"vhost-$t\" ] && echo $comm $(cut -d' ' -f14,15 /proc/$tid/stat); \
               done; \
             done | sort",
            g.sock.display()
        ))
        .ok("vhost workers");
    out.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let name = w.next()?.to_string();
            let ticks = w.map(|n| n.parse::<u64>().unwrap_or(0)).sum();
            Some((name, ticks))
        })
        .collect()
}
