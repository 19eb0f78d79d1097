//! virtio-net over a real TAP in a network namespace the test creates,
//! on both datapaths (the VMM's own, and the host kernel's vhost-net): the
//! guest and the host ping each other, 64 MiB cross each way intact, and a
//! guest that takes no receive buffers cannot stop the VMM.

use std::time::{Duration, Instant};

use tests::guest::{scenario, Guest, HostDir, NetNs, Spec, GUEST_IP, HOST_IP, INIT_OK};

/// A mini guest with eth0 up at GUEST_IP; `keys` are the `--net` keys
/// after its MAC (`vhost=off`: the VMM's own datapath, `vhost=on`:
/// vhost-net).
fn net_guest(h: &'static tests::Host, ns: &NetNs, mac: &str, keys: &str) -> Guest {
    net_guest_with(h, ns, mac, keys, &[])
}

fn net_guest_with(
    h: &'static tests::Host,
    ns: &NetNs,
    mac: &str,
    keys: &str,
    extra: &[&str],
) -> Guest {
    let spec = Spec::new("mini")
        .memory(384)
        .netns(ns)
        .args(&["--net", &format!("tap=tap0,mac={mac},{keys}")])
        .args(extra);
    let mut g = Guest::start_in(h, spec, HostDir::new(h, "net"));
    g.wait_shell(INIT_OK);
    g.run(&format!(
        "ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up"
    ));
    g
}

#[test]
fn guest_and_host_ping_each_other_and_move_64_mib_each_way_intact() {
    scenario(|h| {
        let ns = NetNs::new(h, "net");
        let mac = "52:54:00:12:34:56";
        // As an operator runs it: dropped to an unprivileged user once
        // the TAP, /dev/kvm and the socket are open (vmm/src/sandbox.rs).
        let mut g = net_guest_with(h, &ns, mac, "vhost=off", &["--user", "nobody"]);
        ping_and_move_64_mib_each_way(h, &ns, &mut g, mac);
        rings_are_idle_with_receive_buffers_posted(&g);
        let s = g.ctl().status();
        assert_eq!(s["nets"][0]["datapath"], "userspace", "{s}");
        assert_eq!(s["nets"][0]["poll_us"], 0, "{s}");
        assert!(
            s["nets"][0]["rx_bytes"].as_u64().unwrap_or(0) >= 64 << 20,
            "{s}"
        );
        assert_eq!(vhost_workers(h, &g), 0, "no vhost-net worker");
        // Every thread: nobody's uid (real, effective, saved, fs), no
        // capability in any set, filtered, no_new_privs.
        let threads = h
            .sh(&format!(
                "{} for t in /proc/$pid/task/*; do \
                   echo \"$(cat $t/comm)\" $(grep -E '^(Uid|CapInh|CapPrm|CapEff|CapBnd|CapAmb|Seccomp|NoNewPrivs):' $t/status | cut -f2- | tr -s '\t' ' ' | tr '\n' ' '); \
                 done",
                vmm_pid(&g)
            ))
            .ok("thread list");
        let nobody = h.sh("id -u nobody").ok("uid of nobody");
        let u = nobody.trim();
        let zero = "0000000000000000";
        let want = format!("{u} {u} {u} {u} {zero} {zero} {zero} {zero} {zero} 1 2");
        assert!(threads.lines().count() >= 4, "{threads}");
        for l in threads.lines() {
            let (_, rest) = l.split_once(' ').unwrap_or((l, ""));
            assert_eq!(rest.trim(), want, "{l}\n{threads}");
        }
    });
}

#[test]
fn over_vhost_net_busy_polling_the_same_traffic_is_moved_by_the_host_kernel_for_a_vmm_run_as_nobody_and_survives_a_driver_reset(
) {
    scenario(|h| {
        let ns = NetNs::new(h, "vhost");
        let mac = "52:54:00:12:34:58";
        // nobody cannot open /dev/vhost-net (root's alone, 0600): the VMM
        // opened its vhost-net instance before it dropped to nobody, and
        // keeps it across driver resets (devices::virtio::net::vhost).
        // With the kernel's worker busy-polling up to 50 µs (poll_us).
        let mut g = net_guest_with(h, &ns, mac, "vhost=on,poll_us=50", &["--user", "nobody"]);
        let uid = h
            .sh(&format!(
                "{} grep ^Uid: /proc/$pid/status | cut -f2",
                vmm_pid(&g)
            ))
            .ok("the VMM's uid");
        let nobody = h.sh("id -u nobody").ok("uid of nobody");
        assert_eq!(uid.trim(), nobody.trim(), "the VMM does not run as nobody");
        ping_and_move_64_mib_each_way(h, &ns, &mut g, mac);
        rings_are_idle_with_receive_buffers_posted(&g);
        interrupts_were_taken_and_the_line_stays_enabled(&mut g);
        let s = g.ctl().status();
        let net = &s["nets"][0];
        assert_eq!(net["datapath"], "vhost-net", "{s}");
        assert_eq!(net["tap"], "tap0", "{s}");
        assert_eq!(net["mac"], mac, "{s}");
        // As the kernel holds it (read back from vhost-net).
        assert_eq!(net["poll_us"], 50, "{s}");
        // The TAP counted the 64 MiB each way (the VMM never saw them).
        for dir in ["rx_bytes", "tx_bytes"] {
            assert!(net[dir].as_u64().unwrap_or(0) >= 64 << 20, "{dir}: {s}");
        }
        assert_eq!(vhost_workers(h, &g), 1, "the kernel's worker for this VMM");
        // Every thread of this VMM runs under its seccomp filter, with
        // no_new_privs (vmm/src/seccomp.rs).
        let threads = h
            .sh(&format!(
                "{} for t in /proc/$pid/task/*; do \
                   echo \"$(cat $t/comm) $(grep ^Seccomp: $t/status | cut -f2) $(grep ^NoNewPrivs: $t/status | cut -f2)\"; \
                 done",
                vmm_pid(&g)
            ))
            .ok("thread list");
        assert!(threads.lines().count() >= 4, "{threads}");
        for l in threads.lines() {
            assert!(l.ends_with(" 2 1"), "not filtered: {l}\n{threads}");
        }
        // The driver goes away (device reset: the kernel lets go of the
        // rings) and comes back (a new activation on vhost-net).
        let dev = g.run("basename $(readlink /sys/class/net/eth0/device)");
        let dev = dev.trim().to_string();
        g.run(&format!(
            "echo {dev} > /sys/bus/virtio/drivers/virtio_net/unbind; \
             echo {dev} > /sys/bus/virtio/drivers/virtio_net/bind; \
             ip addr add {GUEST_IP}/24 dev eth0; ip link set eth0 up"
        ));
        let out = g.run(&format!("ping -c 2 -W 5 {HOST_IP}"));
        assert!(out.contains("2 packets received"), "{out}");
        let s = g.ctl().status();
        assert_eq!(s["nets"][0]["datapath"], "vhost-net", "{s}");
        // The new activation asked the kernel again.
        assert_eq!(s["nets"][0]["poll_us"], 50, "{s}");
        // The same instance serves the new activation: still one worker.
        assert_eq!(vhost_workers(h, &g), 1, "the kernel's worker for this VMM");
    });
}

/// vhost-net raises the guest's interrupts on the irqfd itself, with
/// INTERRUPT_STATUS reporting the used-ring bit set while it runs
/// (devices::virtio::net::vhost): the guest's handler took interrupts on
/// the device's line, and Linux never judged the line's interrupts
/// unhandled and switched it off ("nobody cared", after 99,900 unhandled
/// in 100,000), which a handler that found its bit clear would make it do.
fn interrupts_were_taken_and_the_line_stays_enabled(g: &mut Guest) {
    let out = g.run(
        r#"d=$(basename $(readlink /sys/class/net/eth0/device)); \
           awk -v d="$d" '$NF == d { s = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i;
                                      sub(":", "", $1); print "irq", $1, s }' /proc/interrupts > /tmp/irq; \
           cat /tmp/irq; cat /proc/irq/$(cut -d' ' -f2 /tmp/irq)/spurious; \
           echo "nobody-cared $(dmesg | grep -c 'nobody cared')""#,
    );
    let field = |name: &str| -> Option<u64> {
        out.lines().find_map(|l| {
            l.strip_prefix(name)?
                .split_whitespace()
                .last()?
                .parse()
                .ok()
        })
    };
    eprintln!("vhost-net's interrupt line in the guest:\n{out}");
    assert_eq!(field("nobody-cared "), Some(0), "{out}");
    let taken = out.lines().find_map(|l| {
        l.strip_prefix("irq ")?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
    });
    assert!(taken.is_some_and(|n| n > 0), "no interrupt taken: {out}");
    // Handled ones outnumber the rest by far: a ring walked with nothing
    // new (the guest's polling had taken it) is the exception. Both counts
    // restart every 100,000 interrupts; right after that they say little.
    let (Some(count), Some(unhandled)) = (field("count "), field("unhandled ")) else {
        panic!("no spurious-interrupt counts: {out}");
    };
    assert!(count < 100 || unhandled * 2 < count, "{out}");
}

/// `status` shows the running rings as guest memory holds them, whichever
/// datapath moves the frames: after the traffic the guest has receive
/// buffers posted that the device holds for the next frames, every frame
/// it sent was returned, and it asked for interrupts by index (EVENT_IDX).
/// The guest's own background frames (neighbour discovery) may be in
/// flight at one reading: a few readings are taken before failing.
fn rings_are_idle_with_receive_buffers_posted(g: &Guest) {
    let mut ctl = g.ctl();
    let mut last = String::new();
    for _ in 0..20 {
        let s = ctl.status();
        match idle_rings(&s) {
            Ok(()) => return,
            Err(e) => last = format!("{e}: {s}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{last}");
}

fn idle_rings(s: &serde_json::Value) -> Result<(), &'static str> {
    let q = s["nets"][0]["queues"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if q.len() != 2 {
        return Err("not RX 0 and TX 0");
    }
    let idx = |i: usize, k: &str| q[i][k].as_u64().unwrap_or(u64::MAX);
    for (i, e) in q.iter().enumerate() {
        if idx(i, "queue") != i as u64 || idx(i, "size") != 256 {
            return Err("queue index or size");
        }
        if !e["used_event"].is_u64() {
            return Err("no EVENT_IDX");
        }
    }
    let posted = (idx(0, "avail_idx").wrapping_sub(idx(0, "used_idx"))) & 0xffff;
    if posted == 0 || posted > 256 {
        return Err("RX buffers the device holds");
    }
    if idx(1, "avail_idx") != idx(1, "used_idx") {
        return Err("TX frames not returned");
    }
    Ok(())
}

/// The host kernel's vhost-net workers serving the guest's VMM: threads
/// named `vhost-<id of the VMM thread that took ownership>` (the vCPU's
/// that wrote DRIVER_OK): kernel threads before Linux 6.4, the VMM's own
/// since.
fn vhost_workers(h: &'static tests::Host, g: &Guest) -> usize {
    let out = h
        .sh(&format!(
            "{} n=0; \
             for t in $(ls /proc/$pid/task); do \
               n=$((n + $(ps -eLo comm= | grep -c \"^vhost-$t\\$\"))); \
             done; echo $n",
            vmm_pid(g)
        ))
        .ok("count vhost workers");
    out.trim().parse().unwrap_or(usize::MAX)
}

/// Shell that sets `$pid` to the guest's VMM process in the test host (its
/// `--control` path names it; the `[-]` keeps the shell itself out).
fn vmm_pid(g: &Guest) -> String {
    format!(
        "pid=$(pgrep -f -- '[-]-control {}' | head -n 1); [ -n \"$pid\" ] || exit 3;",
        g.sock.display()
    )
}

fn ping_and_move_64_mib_each_way(
    h: &'static tests::Host,
    ns: &NetNs,
    g: &mut Guest,
    want_mac: &str,
) {
    {
        let out = g.run(&format!("ping -c 3 -W 5 {HOST_IP}"));
        assert!(out.contains("3 packets received"), "{out}");
        let out = ns
            .sh(&format!("busybox ping -c 3 -W 5 {GUEST_IP}"))
            .ok("ping the guest");
        assert!(out.contains("3 packets received"), "{out}");
        let mac = ns.sh("ip neigh show dev tap0").ok("neighbours");
        assert!(mac.contains(want_mac), "the guest's MAC: {mac}");

        // Host → guest.
        let dir = HostDir::new(h, "net-data");
        let data = dir.join("to-guest");
        h.sh(&format!("head -c 67108864 /dev/urandom > {data}"))
            .ok("data");
        let want = crate::sha256(h, &data);
        g.vmm.send("nc -l -p 5000 > /tmp/in; echo RECEIVED-$?\n");
        // The guest's nc listens once its line ran; connect until it does.
        let t0 = Instant::now();
        // A few seconds in the test host; a transfer that stands still
        // for minutes is caught with the rings' state (`status`).
        let out = ns.sh(&format!(
            "for i in $(seq 1 50); do timeout 240 socat -u FILE:{data} TCP:{GUEST_IP}:5000 && exit 0; \
             [ $? = 124 ] && exit 124; sleep 0.2; done; exit 1"
        ));
        if !out.status.success() {
            panic!(
                "send 64 MiB to the guest: {}\n{}{}\nstatus: {}",
                out.status,
                out.stdout,
                out.stderr,
                g.ctl().status()
            );
        }
        let to_guest = t0.elapsed();
        g.expect("RECEIVED-0", Duration::from_secs(120));
        let got = g.run("sha256sum /tmp/in; rm /tmp/in");
        assert_eq!(got.split_whitespace().next(), Some(want.as_str()), "{got}");
        // Every frame reached the guest's driver whole: Linux counts a
        // length error for a frame whose buffers it could not all find
        // (a frame over several mergeable buffers seen half published).
        let errors = g.run("cat /sys/class/net/eth0/statistics/rx_length_errors");
        assert_eq!(errors.trim(), "0", "the guest's RX length errors");

        // Guest → host.
        let sent = g
            .run("dd if=/dev/urandom of=/tmp/out bs=1M count=64 2>/dev/null && sha256sum /tmp/out")
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        let recv = dir.join("from-guest");
        let mut listener = ns
            .spawn(&[
                "socat",
                "-u",
                "TCP-LISTEN:5001,reuseaddr",
                &format!("CREATE:{recv}"),
            ])
            .expect("socat listener");
        let t0 = Instant::now();
        g.run_status(
            &format!("for i in 1 2 3 4 5 6 7 8 9 10; do nc {HOST_IP} 5001 < /tmp/out && break; sleep 0.5; done"),
            Duration::from_secs(300),
        );
        let from_guest = t0.elapsed();
        let st = listener.wait_timeout(Duration::from_secs(60));
        assert!(st.is_some_and(|s| s.success()), "socat: {st:?}");
        assert_eq!(crate::sha256(h, &recv), sent);
        eprintln!(
            "64 MiB host→guest {:.1} s, guest→host {:.1} s (software emulation: scaled)",
            to_guest.as_secs_f64(),
            from_guest.as_secs_f64()
        );
    }
}

#[test]
fn a_guest_that_takes_no_receive_buffers_cannot_stop_the_vmm() {
    scenario(|h| {
        let ns = NetNs::new(h, "rx");
        let mut g = net_guest(h, &ns, "52:54:00:12:34:57", "vhost=off");
        g.run(&format!("ping -c 1 -W 5 {HOST_IP}"));
        // Unbind the driver: the device is reset and no buffer is posted.
        let dev = g.run("basename $(readlink /sys/class/net/eth0/device)");
        let dev = dev.trim().to_string();
        assert!(dev.starts_with("virtio"), "{dev}");
        g.run(&format!(
            "echo {dev} > /sys/bus/virtio/drivers/virtio_net/unbind"
        ));
        // Flood the TAP for a while (the neighbour entry is static: no
        // ARP answer will come).
        ns.sh(&format!(
            "ip neigh replace {GUEST_IP} lladdr 52:54:00:12:34:57 dev tap0 nud permanent"
        ))
        .ok("static neighbour");
        let mut flood = ns
            .spawn(&[
                "sh",
                "-c",
                &format!("head -c 50000000 /dev/zero | socat -u - UDP:{GUEST_IP}:9,sndbuf=1048576"),
            ])
            .expect("flood");
        // Meanwhile the control socket and the console answer promptly.
        let mut ctl = g.ctl();
        let mut worst = Duration::ZERO;
        for _ in 0..20 {
            let t0 = Instant::now();
            let s = ctl.status();
            worst = worst.max(t0.elapsed());
            assert_eq!(s["state"], "running");
        }
        assert!(g.run("echo console-alive").contains("console-alive"));
        let _ = flood.wait_timeout(Duration::from_secs(120));
        let _ = flood.kill();
        // The guest binds the driver again and the network works.
        g.run(&format!(
            "echo {dev} > /sys/bus/virtio/drivers/virtio_net/bind"
        ));
        g.run(&format!(
            "ip addr add {GUEST_IP}/24 dev eth0; ip link set eth0 up"
        ));
        let out = g.run(&format!("ping -c 2 -W 5 {HOST_IP}"));
        assert!(out.contains("2 packets received"), "{out}");
        eprintln!("status while flooded: worst round trip {worst:?} (software emulation)");
    });
}
