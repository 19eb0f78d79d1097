//! The `sshd` row: process start → the guest's sshd greeting a TCP
//! connection from the host (`SSH-2.0-...`), the customer's Debian 12
//! server image (`build/disks/debian-server.ext4`, a fresh copy per boot)
//! with the library's `debian-6.1` (the same vmlinux, PVH entry, and
//! initramfs for both), its modules disk, 1 vCPU, 512 MiB, a TAP with
//! vhost-net and the address on the command line. Ours against QEMU
//! `-M microvm` (virtio-mmio as ours, its minimal qboot firmware: QEMU's
//! fastest boot), `aio=io_uring`. The probe is a TCP connect and the
//! greeting's read, 3 s at most, every 0.1 s after the last; the host knows
//! the guest's MAC (a permanent neighbour entry), so once the guest's
//! network is up a connect before sshd listens is refused at once and the
//! figures are good to a few tenths of a second.
//!
//! A run whose guest was reset on the way (the test host's emulator fault:
//! a triple fault, which ours logs and survives by booting again, and
//! which ends QEMU, started with `-no-reboot`) is not a boot time: it is
//! run again, said as `NOTE:`. Before this such runs were timed, which may
//! be why our figures of 2026-12-05 spread from 25.7 to 66.9 s.

use std::time::{Duration, Instant};

use tests::guest::{entry_cmdline, kernel_dir, HostDir, NetNs};
use tests::testhost::wedge::wedged_vmms;
use tests::{host, Host};

use super::{argv, start, Guest, Peer, TIMEOUT};

const MAC: &str = "52:54:00:00:5e:01";
const ADDR: &str = "10.0.2.2";

/// The server's disks and interface, in `peer`'s syntax: the image as
/// root, the library's modules disk, a TAP with vhost-net.
fn devices(peer: Peer, img: &str, modules: &str) -> Vec<String> {
    let v: Vec<String> = match peer {
        Peer::Ours => vec![
            "--disk".into(),
            format!("path={img},id=root"),
            "--disk".into(),
            format!("path={modules},ro=on,id=vmm-modules"),
            "--net".into(),
            format!("tap=tap0,mac={MAC},vhost=on"),
        ],
        Peer::Microvm | Peer::Q35 => vec![
            "-no-reboot".into(),
            "-drive".into(),
            format!("file={img},if=none,id=root,format=raw,aio=io_uring"),
            "-device".into(),
            "virtio-blk-device,drive=root".into(),
            "-drive".into(),
            format!("file={modules},if=none,id=mods,format=raw,readonly=on,aio=io_uring"),
            "-device".into(),
            "virtio-blk-device,drive=mods,serial=vmm-modules".into(),
            "-netdev".into(),
            "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=on".into(),
            "-device".into(),
            format!("virtio-net-device,netdev=n0,mac={MAC}"),
        ],
    };
    v
}

/// Seconds from spawn to the greeting; None when the run was lost (the
/// test host's emulator fault, or no greeting in time).
fn once(h: &'static Host, peer: Peer, g: &Guest, modules: &str) -> Option<f64> {
    for attempt in 1..=3 {
        // Single-queue: QEMU's one pair cannot open a multi-queue TAP.
        let ns = NetNs::single_queue(h, "bench-sshd");
        let dir = HostDir::new(h, "bench-sshd");
        let img = dir.join("root.ext4");
        let src = tests::repo_root().join("build/disks/debian-server.ext4");
        h.sh(&format!("cp --sparse=always {} {img}", src.display()))
            .ok("copy the server image");
        ns.sh(&format!(
            "ip neigh replace {ADDR} lladdr {MAC} dev tap0 nud permanent"
        ))
        .ok("the guest's neighbour entry");
        let prefix = ["ip", "netns", "exec", ns.name.as_str()];
        let t0 = Instant::now();
        let mut p = start(
            h,
            &prefix,
            &argv(peer, g, "", &devices(peer, &img, modules)),
        );
        let probe = format!(
            "timeout 3 bash -c 'exec 3<>/dev/tcp/{ADDR}/22 && head -c 7 <&3' 2>/dev/null | grep -q SSH-2.0"
        );
        let mut lost = None;
        let seen = loop {
            if ns.sh(&probe).status.success() {
                break Some(t0.elapsed().as_secs_f64());
            }
            if t0.elapsed() > TIMEOUT || !h.is_alive() {
                break None;
            }
            if wedged_vmms(h).contains(&p.child.id()) {
                lost = Some("wedged the guest");
                break None;
            }
            if p.child.try_wait().is_some() {
                lost = Some("reset the guest (QEMU -no-reboot exited)");
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let _ = p.child.kill();
        let _ = p.wait_exit(Duration::from_secs(30));
        if seen.is_some() && p.output().contains("(reset: triple_fault") {
            lost = Some("reset the guest (a triple fault, booted again)");
        }
        match (seen, lost) {
            (Some(t), None) => return Some(t),
            (_, Some(why)) if attempt < 3 => {
                eprintln!(
                    "NOTE: sshd: {}: the test host's emulator {why}; run again",
                    peer.label()
                )
            }
            (Some(_), Some(why)) => {
                eprintln!("{}: the emulator {why} three times", peer.label());
                return None;
            }
            (None, _) => {
                let out = p.output();
                eprintln!(
                    "{}: sshd never answered:\n{}",
                    peer.label(),
                    out.lines().rev().take(20).collect::<Vec<_>>().join("\n")
                );
                return None;
            }
        }
    }
    None
}

pub fn row(runs: usize) {
    let entry = kernel_dir().join("debian-6.1");
    let g = Guest {
        kernel: entry.join("vmlinux").display().to_string(),
        initrd: entry.join("initrd.img").display().to_string(),
        cmdline: format!(
            "{} root=/dev/vda rw ip={ADDR}::10.0.2.1:255.255.255.0:web1:eth0:off",
            entry_cmdline("debian-6.1")
        ),
        memory_mib: 512,
    };
    let modules = kernel_dir().join("modules.img").display().to_string();
    let peers = [Peer::Ours, Peer::Microvm];
    let mut t: Vec<Vec<f64>> = vec![Vec::new(); peers.len()];
    for r in 0..runs {
        for (i, p) in peers.iter().enumerate() {
            // A test host the emulator's fault killed is replaced.
            if let Some(s) = once(host(), *p, &g, &modules) {
                eprintln!("sshd run {}: {}: {s:.1} s", r + 1, p.label());
                t[i].push(s);
            }
        }
        eprintln!("sshd run {}/{runs} done", r + 1);
    }
    super::times_table("start → sshd greets (Debian 12)", &peers, &t);
}
