//! Live migration between two VMMs in two network namespaces standing for
//! two hosts (each with its own TAP on its own bridge, the bridges joined
//! to a third namespace standing for the network, where the guest's TCP
//! peer is), with a disk both open (shared storage): a target killed
//! mid-copy leaves the guest running at its source; the real migration
//! keeps the guest's counter going, its TCP connection open and its disk.

use std::time::Duration;

use serde_json::Value;
use tests::guest::{scenario, Guest, HostDir, NetNs, Spec, GUEST_IP, HOST_IP, INIT_OK};

const TOKEN: &str = "migration-token-0123456789abcdef";
const MAC: &str = "52:54:00:12:34:70";

fn counter(g: &mut Guest) -> u64 {
    g.run("cat /tmp/counter")
        .trim()
        .parse()
        .expect("the guest's counter")
}

/// Joins a host namespace (with its `tap0`) to the network namespace
/// `net`: a bridge of the TAP and a veth to `net`'s bridge, and `ip` on
/// the bridge for the migration stream.
fn join(h: &tests::Host, host: &NetNs, net: &NetNs, tag: &str, ip: &str) {
    h.sh(&format!(
        "set -e; x={x}; n={n}; \
         ip -n $x addr flush dev tap0; \
         ip -n $x link add br0 type bridge; ip -n $x link set tap0 master br0; \
         ip -n $x link add v{tag} type veth peer name p{tag} netns $n; \
         ip -n $x link set v{tag} master br0; ip -n $x link set v{tag} up; \
         ip -n $x addr add {ip}/24 dev br0; ip -n $x link set br0 up; \
         ip -n $n link set p{tag} master br0; ip -n $n link set p{tag} up",
        x = host.name,
        n = net.name
    ))
    .ok("join a host namespace to the network");
}

fn spec(ns: &NetNs, img: &str, extra: &[&str]) -> Spec {
    Spec::new("mini")
        .netns(ns)
        .args(&[
            "--net",
            &format!("tap=tap0,mac={MAC},vhost=auto"),
            "--disk",
            &format!("path={img}"),
        ])
        .args(extra)
}

/// The reply to a `migrate` sent on `c` (events in between skipped).
fn reply(c: &mut tests::control::Ctl) -> Value {
    loop {
        let v = c.read_value();
        if v.get("ok").is_some() {
            return v;
        }
    }
}

#[test]
fn a_live_migration_keeps_the_guests_counter_tcp_connection_and_disk_and_a_target_killed_mid_copy_changes_nothing(
) {
    scenario(|h| {
        let net = NetNs::bridged(h, "mig-n");
        let a = NetNs::new(h, "mig-a");
        let b = NetNs::new(h, "mig-b");
        join(h, &a, &net, "a", "10.0.2.11");
        join(h, &b, &net, "b", "10.0.2.12");
        let dir = HostDir::new(h, "migration");
        let img = dir.join("shared.img");
        let tok = dir.join("token");
        h.sh(&format!("truncate -s 16M {img} && echo {TOKEN} > {tok}"))
            .ok("the shared disk and the token");
        let mut g = Guest::start_in(h, spec(&a, &img, &[]), dir);
        g.wait_shell(INIT_OK);
        g.run(&format!(
            "ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up"
        ));
        // The guest's TCP peer, on the network.
        let mut echo = h
            .spawn(
                &[
                    "ip",
                    "netns",
                    "exec",
                    &net.name,
                    "socat",
                    "TCP-LISTEN:7000,reuseaddr",
                    "EXEC:cat",
                ],
                &[],
            )
            .expect("echo server");
        net.sh(
            "for i in $(seq 1 100); do ss -ltn | grep -q :7000 && exit 0; sleep 0.1; done; exit 1",
        )
        .ok("the echo server listens");
        g.run(&format!(
            "mkfifo /tmp/to-host; exec 3<>/tmp/to-host; \
             nc {HOST_IP} 7000 </tmp/to-host >/tmp/from-host 2>&1 &"
        ));
        let echo_of = |g: &mut Guest, word: &str| {
            g.run(&format!(
                "echo {word} >&3; for i in $(seq 1 100); do grep -q {word} /tmp/from-host && break; \
                 sleep 0.2; done; cat /tmp/from-host"
            ))
        };
        assert!(echo_of(&mut g, "before").contains("before"));
        g.run("echo on-the-disk | dd of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null");
        g.run(
            "(i=0; while :; do i=$((i+1)); echo $i >/tmp/counter; sleep 1; done) >/dev/null 2>&1 &",
        );
        let boot_count = g.ctl().status()["boot_count"].clone();

        // A target that dies during the copy: the source's guest runs on.
        let target_args = [
            "--incoming",
            "10.0.2.12:4444",
            "--incoming-token-file",
            &tok,
        ];
        let doomed = Guest::start_in(
            h,
            spec(&b, &img, &target_args).name("g-target"),
            HostDir::new(h, "mig-doomed"),
        );
        let mut c = g.ctl();
        let want = format!(r#"{{"cmd":"migrate","to":"10.0.2.12:4444","token":"{TOKEN}"}}"#);
        // The target listens once its process is up; then it is frozen
        // (the connection is made, nothing answers) and killed.
        b.sh(
            "for i in $(seq 1 300); do ss -ltn | grep -q :4444 && exit 0; sleep 0.1; done; exit 1",
        )
        .ok("the target listens");
        let frozen = h.sh(&format!(
            "pid=$(pgrep -f -- '[-]-control {}' | head -n 1); [ -n \"$pid\" ] && kill -STOP $pid",
            doomed.sock.display()
        ));
        frozen.ok("freeze the target");
        c.send_line(&want);
        b.sh("for i in $(seq 1 300); do ss -tn state established | grep -q :4444 && exit 0; sleep 0.1; done; exit 1")
            .ok("the source connected");
        let _ = doomed.into_dir();
        let r = reply(&mut c);
        assert_eq!(r["ok"], false, "{r}");
        assert_eq!(g.ctl().status()["state"], "running");
        let before = counter(&mut g);
        let later: u64 = g
            .run("sleep 2; cat /tmp/counter")
            .trim()
            .parse()
            .expect("the counter");
        assert!(
            later > before,
            "the source's guest runs on: {before}, {later}"
        );
        assert!(echo_of(&mut g, "still").contains("still"), "{}", g.report());

        // The real one.
        let mut t = Guest::start_in(
            h,
            spec(&b, &img, &target_args).name("g-target"),
            HostDir::new(h, "mig-target"),
        );
        b.sh(
            "for i in $(seq 1 300); do ss -ltn | grep -q :4444 && exit 0; sleep 0.1; done; exit 1",
        )
        .ok("the target listens");
        let counted = counter(&mut g);
        let r = g.ctl().ok(&want);
        eprintln!("live migration of a 256 MiB mini guest between two namespaces (test host): {r}");
        assert!(r["downtime_ms"].as_u64().is_some(), "{r}");
        assert!(
            g.vmm.wait_exit(Duration::from_secs(60)).is_some(),
            "the source ends\n{}",
            g.report()
        );
        assert!(
            t.vmm
                .wait_for("restored from migration", Duration::from_secs(60)),
            "{}",
            t.report()
        );
        let s = t.ctl().status();
        assert_eq!(s["state"], "running", "{s}");
        assert_eq!(s["boot_count"], boot_count, "the same boot: {s}");
        let first = counter(&mut t);
        let next: u64 = t
            .run("sleep 3; cat /tmp/counter")
            .trim()
            .parse()
            .expect("the counter");
        assert!(
            first >= counted && next > first,
            "the counter goes on from {counted}: {first}, then {next}\n{}",
            t.report()
        );
        assert!(
            echo_of(&mut t, "after").contains("after"),
            "the TCP connection survives the move\n{}",
            t.report()
        );
        assert_eq!(
            t.run("dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 12"),
            "on-the-disk\n",
            "the disk, on the target"
        );
        let _ = echo.kill();
    });
}
