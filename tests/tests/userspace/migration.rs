//! Live migration between two VMMs in two network namespaces standing for
//! two hosts (each with its own TAP on its own bridge, the bridges joined
//! to a third namespace standing for the network, where the guest's TCP
//! peer is), with a disk both open (shared storage): a target killed
//! mid-copy leaves the guest running at its source; the real migration
//! keeps the guest's counter going, its TCP connection open and its disk.
//! With `"disks":"copy"` each host has its own image, the guest writes its
//! disk throughout, and the target's image ends up with every write.

use std::time::Duration;

use serde_json::Value;
use tests::guest::{scenario, Guest, HostDir, NetNs, Spec};

use crate::connection::{counter, counter_after, echo_of, echo_server, guest_with_a_connection};

const TOKEN: &str = "migration-token-0123456789abcdef";
const MAC: &str = "52:54:00:12:34:70";

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

/// The two hosts, the network between them and the guest's TCP peer.
struct World {
    /// Kept for as long as the test runs (dropped, its namespace goes).
    _net: NetNs,
    a: NetNs,
    b: NetNs,
    echo: tests::host::Proc,
}

fn world(h: &'static tests::Host) -> World {
    let net = NetNs::bridged(h, "mig-n");
    let a = NetNs::new(h, "mig-a");
    let b = NetNs::new(h, "mig-b");
    join(h, &a, &net, "a", "10.0.2.11");
    join(h, &b, &net, "b", "10.0.2.12");
    // The guest's TCP peer, on the network.
    let echo = echo_server(&net);
    World {
        _net: net,
        a,
        b,
        echo,
    }
}

fn wait_listening(ns: &NetNs) {
    ns.sh("for i in $(seq 1 300); do ss -ltn | grep -q :4444 && exit 0; sleep 0.1; done; exit 1")
        .ok("the target listens");
}

/// After the migration: the source ended, the target runs the same boot,
/// its counter goes on from `counted` and its TCP connection works.
fn runs_on_at_the_target(g: &mut Guest, t: &mut Guest, boot_count: &Value, counted: u64) {
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
    assert_eq!(&s["boot_count"], boot_count, "the same boot: {s}");
    let first = counter(t);
    let next = counter_after(t, 3);
    assert!(
        first >= counted && next > first,
        "the counter goes on from {counted}: {first}, then {next}\n{}",
        t.report()
    );
    assert!(
        echo_of(t, "after").contains("after"),
        "the TCP connection survives the move\n{}",
        t.report()
    );
}

#[test]
fn a_live_migration_keeps_the_guests_counter_tcp_connection_and_disk_and_a_target_killed_mid_copy_changes_nothing(
) {
    scenario(|h| {
        let mut w = world(h);
        let (a, b) = (&w.a, &w.b);
        let dir = HostDir::new(h, "migration");
        let img = dir.join("shared.img");
        let tok = dir.join("token");
        h.sh(&format!("truncate -s 16M {img} && echo {TOKEN} > {tok}"))
            .ok("the shared disk and the token");
        let mut g = Guest::start_in(h, spec(a, &img, &[]), dir);
        guest_with_a_connection(&mut g);
        g.run("echo on-the-disk | dd of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null");
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
            spec(b, &img, &target_args).name("g-target"),
            HostDir::new(h, "mig-doomed"),
        );
        let mut c = g.ctl();
        let want = format!(r#"{{"cmd":"migrate","to":"10.0.2.12:4444","token":"{TOKEN}"}}"#);
        // The target listens once its process is up; then it is frozen
        // (the connection is made, nothing answers) and killed.
        wait_listening(b);
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
        let later = counter_after(&mut g, 2);
        assert!(
            later > before,
            "the source's guest runs on: {before}, {later}"
        );
        assert!(echo_of(&mut g, "still").contains("still"), "{}", g.report());

        // The real one.
        let mut t = Guest::start_in(
            h,
            spec(b, &img, &target_args).name("g-target"),
            HostDir::new(h, "mig-target"),
        );
        wait_listening(b);
        let counted = counter(&mut g);
        let r = g.ctl().ok(&want);
        eprintln!("live migration of a 256 MiB mini guest between two namespaces (test host): {r}");
        assert!(r["downtime_ms"].as_u64().is_some(), "{r}");
        runs_on_at_the_target(&mut g, &mut t, &boot_count, counted);
        assert_eq!(
            t.run("dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 12"),
            "on-the-disk\n",
            "the disk, on the target"
        );
        let _ = w.echo.kill();
    });
}

#[test]
fn with_disks_copy_the_targets_own_image_receives_every_write_the_guest_made_while_it_moved() {
    scenario(|h| {
        let mut w = world(h);
        let (a, b) = (&w.a, &w.b);
        let dir = HostDir::new(h, "migration-copy");
        let src = dir.join("source.img");
        let dst = dir.join("target.img");
        let tok = dir.join("token");
        // The target's image starts full of what must not survive.
        h.sh(&format!(
            "truncate -s 64M {src} && yes stale | head -c 64M > {dst} && echo {TOKEN} > {tok}"
        ))
        .ok("the two images and the token");
        let mut g = Guest::start_in(h, spec(a, &src, &[]), dir);
        guest_with_a_connection(&mut g);
        // 8 MiB of random data, then a writer that writes each of its
        // counts to a sector of its own from 32 MiB on, synced, until told
        // to stop: before, during and after the migration.
        let data = g.run(
            "dd if=/dev/urandom of=/dev/vda bs=1M count=8 conv=fsync 2>/dev/null; \
             dd if=/dev/vda bs=1M count=8 2>/dev/null | sha256sum | cut -d' ' -f1",
        );
        g.run(
            "(n=0; while [ ! -e /tmp/stop ] && [ $n -lt 60000 ]; do n=$((n+1)); \
              echo \"count $n\" | dd of=/dev/vda bs=512 seek=$((65536+n)) count=1 conv=sync,fsync 2>/dev/null; \
              echo $n > /tmp/written; done; touch /tmp/stopped) >/dev/null 2>&1 &",
        );
        let boot_count = g.ctl().status()["boot_count"].clone();
        let target_args = [
            "--incoming",
            "10.0.2.12:4444",
            "--incoming-token-file",
            &tok,
        ];
        let mut t = Guest::start_in(
            h,
            spec(b, &dst, &target_args).name("g-target"),
            HostDir::new(h, "mig-copy-target"),
        );
        wait_listening(b);
        let counted = counter(&mut g);
        let before: u64 = g.run("cat /tmp/written").trim().parse().expect("writes");
        let r = g.ctl().ok(&format!(
            r#"{{"cmd":"migrate","to":"10.0.2.12:4444","token":"{TOKEN}","disks":"copy"}}"#
        ));
        eprintln!("live migration with a 64 MiB disk copied, written throughout (test host): {r}");
        assert!(
            r["disk_bytes"].as_u64().unwrap_or(0) >= 8 << 20,
            "the disk's data went over: {r}"
        );
        runs_on_at_the_target(&mut g, &mut t, &boot_count, counted);
        // The source's own image holds what the writer wrote there: more
        // than before the request, so some of it was written while the
        // disk was being copied (all of it must be on the target's image).
        let at_source = h
            .sh(&format!(
                "dd if={src} bs=512 skip=65537 count=60000 2>/dev/null | tr -s '\\000' '\\n' | grep -c '^count '"
            ))
            .ok("read the source's image");
        let at_source: u64 = at_source.trim().parse().expect("a count");
        assert!(
            at_source > before,
            "the guest wrote its disk during the migration: {before}, then {at_source}"
        );
        // The writer went on at the target; stopped, every count it wrote
        // is on the target's image, and so are the 8 MiB.
        t.run("touch /tmp/stop; for i in $(seq 1 100); do [ -e /tmp/stopped ] && break; sleep 0.1; done");
        let last: u64 = t.run("cat /tmp/written").trim().parse().expect("writes");
        assert!(last > before, "the writer ran on: {before}, then {last}");
        t.vmm.child.kill().expect("kill the target's VMM");
        assert!(
            t.vmm.wait_exit(Duration::from_secs(30)).is_some(),
            "{}",
            t.report()
        );
        let after = 65537 + last;
        let on_image = h
            .sh(&format!(
                "dd if={dst} bs=512 skip=65537 count={last} 2>/dev/null | tr -s '\\000' '\\n' \
                   | awk '/^count / {{ printf \"%s \", $2 }} END {{ print \"\" }}'; \
                 dd if={dst} bs=1M count=8 2>/dev/null | sha256sum | cut -d' ' -f1; \
                 dd if={dst} bs=1M skip=8 count=24 2>/dev/null | tr -d '\\000' | wc -c; \
                 dd if={dst} bs=512 skip={after} 2>/dev/null | tr -d '\\000' | wc -c"
            ))
            .ok("read the target's image");
        let mut lines = on_image.lines();
        let want: Vec<String> = (1..=last).map(|n| n.to_string()).collect();
        let counts = lines.next().unwrap_or_default().trim();
        assert!(
            counts == want.join(" "),
            "every count 1..={last} in its sector (the migration began after {before}): {}",
            &counts[..counts.len().min(2000)]
        );
        assert_eq!(lines.next(), Some(data.trim()), "the 8 MiB: {on_image}");
        assert_eq!(
            lines.next().map(str::trim),
            Some("0"),
            "nothing of the stale image is left between them: {on_image}"
        );
        assert_eq!(
            lines.next().map(str::trim),
            Some("0"),
            "nor after the counts: {on_image}"
        );
        let _ = w.echo.kill();
    });
}
