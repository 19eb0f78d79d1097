//! virtio-blk as the guest's user space uses it: files on an ext4 root
//! reach the image, read-only disks stay untouched, several disks keep
//! their sizes and serials, fsync'd data survives the VMM's death, and a
//! stalled disk stalls nothing else.

use std::time::{Duration, Instant};

use tests::control::Ctl;
use tests::guest::{scenario, Guest, HostDir, Spec, ROOT_OK};
use tests::Host;

use crate::sha256;

/// A copy of the library's root disk (`build/disks/rootfs.ext4`) in `dir`.
pub fn root_image(h: &Host, dir: &HostDir) -> String {
    let img = dir.join("root.ext4");
    h.sh(&format!("cp build/disks/rootfs.ext4 {img}"))
        .ok("copy the root disk");
    img
}

#[test]
fn a_file_the_guest_writes_and_syncs_is_in_the_image_after_poweroff() {
    scenario(|h| {
        let dir = HostDir::new(h, "root");
        let img = root_image(h, &dir);
        let spec = Spec::new("mini").cmdline("root=/dev/vda rw").args(&[
            "--disk",
            &format!("path={img},id=root"),
            "--exit-on-poweroff",
        ]);
        let mut g = Guest::start_in(h, spec, dir);
        g.wait_shell(ROOT_OK);
        let out = g.run("cat /proc/mounts | grep ' / '");
        assert!(out.contains("/dev/vda / ext4 rw"), "root is not vda: {out}");
        g.run("echo customer-data-$((6*7)) > /home.txt && sync");
        // What a clean shutdown does before the power goes.
        g.vmm.send("mount -o remount,ro / && poweroff -f\n");
        let st = g.vmm.wait_exit(Duration::from_secs(60));
        assert_eq!(st.and_then(|s| s.code()), Some(0), "{}", g.report());
        let file = h
            .sh(&format!("debugfs -R 'cat /home.txt' {img} 2>/dev/null"))
            .ok("debugfs");
        assert_eq!(file.trim(), "customer-data-42");
        h.sh(&format!("e2fsck -fn {img}"))
            .ok("the file system is clean");
    });
}

#[test]
fn a_read_only_disk_refuses_the_guests_writes_and_stays_byte_identical() {
    scenario(|h| {
        let dir = HostDir::new(h, "ro");
        let img = root_image(h, &dir);
        let before = sha256(h, &img);
        let spec = Spec::new("mini").args(&["--disk", &format!("path={img},ro=on,id=ro")]);
        let mut g = Guest::start_in(h, spec, dir);
        g.wait_shell(tests::guest::INIT_OK);
        assert_eq!(g.run("cat /sys/block/vda/ro").trim(), "1");
        let (code, out) = g.run_status(
            "dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct",
            tests::guest::CMD,
        );
        assert_ne!(code, 0, "a write to a read-only disk succeeded: {out}");
        // The kernel mounts it read-only, and writes through it fail.
        g.run("mkdir -p /mnt && mount -t ext4 -o ro /dev/vda /mnt && ls /mnt/sbin/init");
        let (code, out) = g.run_status("echo x > /mnt/new-file", tests::guest::CMD);
        assert_ne!(code, 0, "a file was created on a read-only disk: {out}");
        g.run("umount /mnt && sync");
        let _dir = g.into_dir();
        assert_eq!(sha256(h, &img), before, "the read-only image changed");
    });
}

#[test]
fn two_disks_show_their_sizes_and_serials_in_order() {
    scenario(|h| {
        let dir = HostDir::new(h, "two");
        let (a, b) = (dir.join("a.img"), dir.join("b.img"));
        h.sh(&format!("truncate -s 24M {a} && truncate -s 40M {b}"))
            .ok("images");
        let spec = Spec::new("mini").args(&[
            "--disk",
            &format!("path={a},id=alpha-disk"),
            "--disk",
            &format!("path={b},id=beta-disk"),
        ]);
        let mut g = Guest::start_in(h, spec, dir);
        g.wait_shell(tests::guest::INIT_OK);
        let out = g.run(
            "for d in vda vdb; do echo $d $(cat /sys/block/$d/size) $(cat /sys/block/$d/serial); done",
        );
        assert!(out.contains("vda 49152 alpha-disk"), "{out}");
        assert!(out.contains("vdb 81920 beta-disk"), "{out}");
    });
}

#[test]
fn a_disk_gives_each_vcpu_a_queue_and_writes_from_both_at_once_land_intact() {
    scenario(|h| {
        let dir = HostDir::new(h, "mq");
        let img = dir.join("data.img");
        h.sh(&format!("truncate -s 32M {img}")).ok("image");
        let spec = Spec::new("mini")
            .vcpus(2)
            .args(&["--disk", &format!("path={img},id=mq-disk,queues=2")]);
        let mut g = Guest::start_in(h, spec, dir);
        g.wait_shell(tests::guest::INIT_OK);
        // blk-mq: one hardware queue per CPU.
        let queues = g.run("echo $(ls /sys/block/vda/mq)");
        assert_eq!(queues.trim(), "0 1", "{}", g.report());
        let cpus =
            g.run("echo $(cat /sys/block/vda/mq/0/cpu_list) $(cat /sys/block/vda/mq/1/cpu_list)");
        assert_eq!(cpus.trim(), "0 1");
        // Two writers at once, one on each half, then the whole read back
        // on the host.
        g.run(
            "dd if=/dev/urandom of=/a bs=64k count=128 2>/dev/null && \
             dd if=/dev/urandom of=/b bs=64k count=128 2>/dev/null && \
             { dd if=/a of=/dev/vda bs=64k conv=fsync 2>/dev/null & \
               dd if=/b of=/dev/vda bs=64k seek=128 conv=fsync 2>/dev/null & wait; }",
        );
        let in_guest = g.run("cat /a /b | sha256sum | cut -d' ' -f1");
        let on_host = h
            .sh(&format!("head -c 16M {img} | sha256sum | cut -d' ' -f1"))
            .ok("sha256sum");
        assert_eq!(on_host.trim(), in_guest.trim());
    });
}

/// The operator's limits (`iops=N` on `--disk`, `set-disk` while it
/// runs): the guest's reads go no faster than the limit, whatever the
/// machine, and lifting it while the guest runs lets them go.
#[test]
fn a_disk_limited_to_50_iops_serves_the_guest_no_faster_and_the_limit_lifts_while_it_runs() {
    scenario(|h| {
        let dir = HostDir::new(h, "iops");
        let img = dir.join("data.img");
        h.sh(&format!("truncate -s 16M {img}")).ok("image");
        let spec = Spec::new("mini").args(&["--disk", &format!("path={img},id=limited,iops=50")]);
        let mut g = Guest::start_in(h, spec, dir);
        g.wait_shell(tests::guest::INIT_OK);
        // 200 direct 4 KiB reads, one at a time: a full bucket takes 50 at
        // once, the other 150 go at 50 a second, so 3 s at least however
        // fast the machine (the emulator only makes it longer).
        let t0 = Instant::now();
        g.run("dd if=/dev/vda of=/dev/null bs=4k count=200 iflag=direct 2>/dev/null");
        let limited = t0.elapsed();
        let s = g.ctl().status();
        assert_eq!(s["disks"][0]["iops"], 50, "{s}");
        let throttled = s["disks"][0]["throttled"].as_u64().unwrap_or_default();
        assert!(throttled > 0, "nothing waited: {s}");
        assert!(
            limited >= Duration::from_millis(2800),
            "200 reads at 50 IOPS took {limited:?}"
        );
        // Lifted while the guest runs: nothing waits any more.
        let r = g
            .ctl()
            .call(r#"{"cmd":"set-disk","disk":"limited","iops":0}"#);
        assert_eq!(r["iops"], 0, "{r}");
        let t0 = Instant::now();
        g.run("dd if=/dev/vda of=/dev/null bs=4k count=200 skip=200 iflag=direct 2>/dev/null");
        let free = t0.elapsed();
        let s = g.ctl().status();
        assert_eq!(s["disks"][0]["throttled"], throttled, "{s}");
        eprintln!(
            "200 direct 4 KiB reads: {limited:?} at iops=50, {free:?} without a limit (software emulation)"
        );
    });
}

/// The guest writes 4 MiB to its disk with `conv=fsync`; once dd has
/// returned, the VMM is killed with SIGKILL: the data is in the image.
/// `engine`: the disk's `io=` (`status` must show it in use); `poll_us`:
/// its polling window (with one, `status` must show polling found work).
fn fsynced_data_survives_sigkill(direct: bool, engine: &str, poll_us: u32) {
    scenario(|h| {
        let dir = HostDir::new(h, "fsync");
        // O_DIRECT needs a file system that has it: tmpfs before Linux 6.6
        // (the test host's) does not, so the image goes on an ext4 on a
        // loop device there.
        let img = if direct {
            let fs = dir.join("fs.img");
            let mnt = dir.join("mnt");
            h.sh(&format!(
                "set -e; truncate -s 64M {fs}; mkfs.ext4 -q {fs}; mkdir {mnt}; mount -o loop {fs} {mnt}"
            ))
            .ok("an ext4 for O_DIRECT");
            format!("{mnt}/data.img")
        } else {
            dir.join("data.img")
        };
        h.sh(&format!("truncate -s 16M {img}")).ok("image");
        let opts = if direct { ",direct=on" } else { "" };
        let opts = format!("{opts},io={engine},poll_us={poll_us}");
        let spec = Spec::new("mini")
            .memory(128)
            .args(&["--disk", &format!("path={img},id=data{opts}")]);
        let mut g = Guest::start_in(h, spec, HostDir::new(h, "fsync-vm"));
        g.wait_shell(tests::guest::INIT_OK);
        let status = g.ctl().status();
        assert_eq!(status["disks"][0]["engine"], engine, "{status}");
        let want = g
            .run("dd if=/dev/urandom of=/tmp/p bs=1M count=4 2>/dev/null && sha256sum /tmp/p")
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        g.run("dd if=/tmp/p of=/dev/vda bs=1M conv=fsync 2>/dev/null");
        let status = g.ctl().status();
        assert_eq!(status["disks"][0]["write_bytes"], 4 << 20, "{status}");
        assert_eq!(status["disks"][0]["poll_us"], poll_us, "{status}");
        // Small direct reads (what polling is for): the window grows when
        // the guest's next request comes soon after the last. Four readers
        // at once, so that gaps stay within the window even when the
        // emulated guest is slow (one reader under a loaded test host left
        // every gap longer than 1 ms once, and polling found nothing).
        let readers = |g: &mut Guest| {
            g.run(
                "for i in 0 1 2 3; do \
                   dd if=/dev/vda of=/dev/null bs=4k count=512 skip=$((i * 512)) iflag=direct 2>/dev/null & \
                 done; wait",
            );
            let status = g.ctl().status();
            let polled = status["disks"][0]["polled"].as_u64().unwrap_or_default();
            (status, polled)
        };
        let (status, polled) = readers(&mut g);
        eprintln!("disk poll_us={poll_us}: polling found {polled} requests and completions");
        if poll_us == 0 {
            assert_eq!(polled, 0, "{status}");
        } else {
            assert!(polled > 0, "polling found nothing: {status}");
        }
        if poll_us == 0 && engine == "io_uring" {
            // The operator turns polling on while the guest runs: the
            // disk's thread takes it up at its next wake-up.
            let r = g
                .ctl()
                .call(r#"{"cmd":"set-disk","disk":"data","poll_us":1000}"#);
            assert_eq!(r["poll_us"], 1000, "{r}");
            let (status, polled) = readers(&mut g);
            eprintln!("disk poll_us=1000 set while running: polling found {polled}");
            assert!(polled > 0, "polling turned on found nothing: {status}");
        }
        g.vmm.child.kill().expect("SIGKILL the VMM");
        let st = g.vmm.wait_exit(Duration::from_secs(30));
        assert_eq!(
            st.and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s)),
            Some(libc::SIGKILL)
        );
        let got = h
            .sh(&format!("head -c 4194304 {img} | sha256sum"))
            .ok("hash the image");
        assert_eq!(got.split_whitespace().next(), Some(want.as_str()));
        if direct {
            let _ = h.sh(&format!("umount {}", dir.join("mnt")));
        }
    });
}

#[test]
fn data_the_guest_fsynced_is_in_the_image_after_the_vmm_is_killed() {
    fsynced_data_survives_sigkill(false, "sync", 0);
}

#[test]
fn data_the_guest_fsynced_is_in_a_direct_io_image_after_the_vmm_is_killed() {
    fsynced_data_survives_sigkill(true, "io_uring", 0);
}

#[test]
fn data_the_guest_fsynced_through_a_polling_io_uring_disk_is_in_the_image_after_the_vmm_is_killed()
{
    fsynced_data_survives_sigkill(false, "io_uring", 1000);
}

/// A device-mapper `delay` disk (every I/O waits `delay_ms`) over a loop
/// device on a file in `dir`; removed on drop. (No udev in the test
/// host: `mknodes` makes the `/dev/mapper` node.)
struct SlowDisk {
    host: &'static Host,
    name: String,
    loop_dev: String,
}

impl SlowDisk {
    fn new(h: &'static Host, dir: &HostDir, mib: u64, delay_ms: u32) -> SlowDisk {
        let backing = dir.join("backing.img");
        let name = format!("vmm-slow-{}", tests::rand_u64() % 1_000_000);
        let sectors = mib * 2048;
        let loop_dev = h
            .sh(&format!(
                "set -e; truncate -s {mib}M {backing}; l=$(losetup -f --show {backing}); \
                 dmsetup create {name} --noudevsync --table \"0 {sectors} delay $l 0 {delay_ms}\"; \
                 dmsetup mknodes {name}; test -b /dev/mapper/{name}; echo $l"
            ))
            .ok("a device-mapper delay disk (dm_delay, dmsetup)")
            .trim()
            .to_string();
        SlowDisk {
            host: h,
            name,
            loop_dev,
        }
    }

    fn path(&self) -> String {
        format!("/dev/mapper/{}", self.name)
    }
}

impl Drop for SlowDisk {
    fn drop(&mut self) {
        let _ = self.host.try_sh(
            &format!(
                "dmsetup remove --noudevsync --retry {} ; losetup -d {}",
                self.name, self.loop_dev
            ),
            Duration::from_secs(60),
        );
    }
}

/// A disk whose every I/O takes two seconds, read flat out by the guest:
/// meanwhile 10 clients polling `status` at once are all answered, the
/// console answers, and SIGTERM ends the VMM (block I/O is served on its
/// own thread, not on the event loop: vmm/src/runtime.rs).
#[test]
fn a_stalled_disk_never_stalls_the_control_socket_the_console_or_sigterm() {
    scenario(|h| {
        let dir = HostDir::new(h, "stall");
        let slow = SlowDisk::new(h, &dir, 64, 2000);
        let spec = Spec::new("mini")
            .memory(128)
            .args(&["--disk", &format!("path={},id=slow", slow.path())]);
        let mut g = Guest::start_in(h, spec, HostDir::new(h, "stall-vm"));
        g.wait_shell(tests::guest::INIT_OK);
        // Four readers at different places keep requests queued.
        g.run(
            "for i in 1 2 3 4; do dd if=/dev/vda of=/dev/null bs=64k skip=$((i*200)) \
             count=100 2>/dev/null & done; true",
        );
        // Wait (through the console, which must answer) for I/O in flight.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let inflight = g.run("cat /sys/block/vda/inflight");
            let busy: u64 = inflight
                .split_whitespace()
                .filter_map(|n| n.parse::<u64>().ok())
                .sum();
            if busy > 0 {
                break;
            }
            assert!(Instant::now() < deadline, "no I/O in flight: {inflight}");
        }
        // 10 clients at once, 10 `status` each.
        let sock = g.sock.clone();
        let workers: Vec<_> = (0..10)
            .map(|_| {
                let sock = sock.clone();
                std::thread::spawn(move || {
                    let mut ctl = Ctl::connect_on(h, &sock);
                    (0..10)
                        .map(|_| {
                            let t0 = Instant::now();
                            let s = ctl.status();
                            assert_eq!(s["state"], "running", "{s}");
                            t0.elapsed()
                        })
                        .collect::<Vec<Duration>>()
                })
            })
            .collect();
        let mut times: Vec<Duration> = workers
            .into_iter()
            .flat_map(|w| w.join().expect("a status client failed"))
            .collect();
        times.sort();
        let (p50, max) = (times[times.len() / 2], times[times.len() - 1]);
        eprintln!(
            "status during the stall: {} answers, p50 {p50:?}, max {max:?} (through the test host's agent)",
            times.len()
        );
        // One disk request alone takes 2 s: an answer that waited for the
        // disk would take at least that.
        assert!(
            max < Duration::from_secs(1),
            "status waited on the disk: max {max:?}"
        );
        // The console still answers while the readers are stuck.
        assert!(
            g.run("cat /sys/block/vda/inflight")
                .split_whitespace()
                .any(|n| n != "0"),
            "the disk was no longer busy: the check above proved nothing"
        );
        // SIGTERM ends the VMM: at most the one request in flight (2 s)
        // holds the process.
        let t0 = Instant::now();
        g.vmm.child.signal(libc::SIGTERM).expect("SIGTERM");
        let st = g.vmm.wait_exit(Duration::from_secs(30));
        assert!(
            st.is_some(),
            "SIGTERM not honoured within 30 s\n{}",
            g.report()
        );
        eprintln!("SIGTERM → exit: {:?}", t0.elapsed());
        drop(g);
        drop(slow);
    });
}
