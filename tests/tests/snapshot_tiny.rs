//! Snapshots of tiny guests (this machine's KVM): a guest that prints the
//! alphabet with its letter in a register is saved, its VMM killed, and a
//! new VMM continues it at the next letter, not from the start; what a
//! snapshot is refused for, and what a restore refuses.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tests::control::Ctl;
use tests::tiny::{alphabet, dirtier, letters_of, vmm_command, vmm_command_sized};
use tests::{TempDir, VmmProcess};

const T: Duration = Duration::from_secs(30);

struct Vm {
    dir: PathBuf,
    sock: PathBuf,
    p: VmmProcess,
}

fn start(dir: &Path, extra: &[&str]) -> Vm {
    let sock = dir.join("run/vm1/control.sock");
    let snaps = dir.join("snapshots");
    let _ = std::fs::create_dir(&snaps);
    let mut cmd = vmm_command(dir, "vm1", &alphabet(), &sock);
    cmd.arg("--snapshot-dir").arg(&snaps).args(extra);
    Vm {
        dir: dir.to_path_buf(),
        sock,
        p: VmmProcess::spawn_cmd(&mut cmd),
    }
}

impl Vm {
    fn ctl(&self) -> Ctl {
        Ctl::connect(&self.sock)
    }
    fn snapshot(&self, name: &str) -> PathBuf {
        self.dir.join("snapshots").join(name)
    }
    /// The letters printed after READY.
    fn letters(&self) -> String {
        letters_of(&self.p.output())
    }
}

fn next_letter(c: char) -> char {
    if c == 'z' {
        'a'
    } else {
        ((c as u8) + 1) as char
    }
}

#[test]
fn a_restored_tiny_guest_goes_on_at_the_next_letter_in_a_new_process() {
    goes_on_at_the_next_letter(&[]);
}

#[test]
fn a_restored_two_vcpu_guest_goes_on_with_its_second_vcpu_still_waiting_for_its_start() {
    // The second vCPU never started (INIT/SIPI pending): its MP state and
    // LAPIC go through the snapshot too.
    goes_on_at_the_next_letter(&["--vcpus", "2"]);
}

fn goes_on_at_the_next_letter(extra: &[&str]) {
    let dir = TempDir::new("snap-tiny");
    let mut vm = start(dir.path(), extra);
    assert!(vm.p.wait_for("READY", T), "{}", vm.p.report());
    assert!(
        vm.p.wait_until(0, T, |t| (letters_of(t).len() >= 30).then_some(()))
            .is_some(),
        "{}",
        vm.p.report()
    );
    let boot_count = vm.ctl().status()["boot_count"].clone();

    // Saved and powered off: no letter after the last one printed.
    let r = vm.ctl().ok(r#"{"cmd":"snapshot","dir":"s1","stop":true}"#);
    assert_eq!(r["stopped"], true, "{r}");
    assert_eq!(r["memory_bytes"], 64 << 20, "{r}");
    assert_eq!(vm.ctl().status()["state"], "stopped");
    let snap = vm.snapshot("s1");
    assert!(snap.join("state").is_file() && snap.join("memory").is_file());
    assert!(!vm.dir.join("snapshots/s1.part").exists());
    // SIGTERM, not SIGKILL: the VMM writes out the last letters it got.
    vm.p.child.signal(libc::SIGTERM).expect("SIGTERM");
    assert!(vm.p.wait_exit(T).is_some(), "{}", vm.p.report());
    let printed = vm.letters();
    let last = printed.chars().last().expect("letters");
    let saved_by = vm.p.stderr();

    let restored = start(
        dir.path(),
        &[&["--restore", snap.to_str().expect("a UTF-8 path")], extra].concat(),
    );
    assert!(
        restored
            .p
            .wait_until(0, T, |t| (letters_of(t).len() >= 5).then_some(()))
            .is_some(),
        "{}",
        restored.p.report()
    );
    let out = restored.p.output();
    assert!(!out.contains("READY"), "it booted again: {out}");
    assert!(
        out.contains("restored from snapshot"),
        "the console marks the restore: {out}"
    );
    let first = letters_of(&out).chars().next().expect("letters");
    assert_eq!(
        first,
        next_letter(last),
        "it goes on after '{last}' (printed before: ...{})\n{}\nthe VMM that saved it:\n{saved_by}",
        &printed[printed.len().saturating_sub(10)..],
        restored.p.report()
    );
    let s = restored.ctl().status();
    assert_eq!(s["state"], "running", "{s}");
    assert_eq!(s["boot_count"], boot_count, "{s}");
}

#[test]
fn a_snapshot_leaves_the_guest_running_and_refuses_customers_names_outside_its_directory_and_existing_names(
) {
    let dir = TempDir::new("snap-tiny-run");
    let vm = start(dir.path(), &["--allow-user", "65534"]);
    assert!(vm.p.wait_for("READY", T), "{}", vm.p.report());
    let mut c = vm.ctl();
    let r = c.ok(r#"{"cmd":"snapshot","dir":"s1"}"#);
    assert_eq!(r["stopped"], false, "{r}");
    assert!(r["paused_us"].as_u64().unwrap_or(0) > 0, "{r}");
    let before = vm.letters().len();
    assert!(
        vm.p.wait_until(0, T, |t| (letters_of(t).len() > before + 5).then_some(()))
            .is_some(),
        "the guest runs on after the snapshot\n{}",
        vm.p.report()
    );
    for (line, code) in [
        (r#"{"cmd":"snapshot","dir":"s1"}"#, "bad_request"),
        (r#"{"cmd":"snapshot","dir":"../escape"}"#, "bad_request"),
        (r#"{"cmd":"snapshot","dir":"x.part"}"#, "bad_request"),
        (r#"{"cmd":"snapshot"}"#, "bad_request"),
        (
            r#"{"cmd":"snapshot","dir":"x","stop":"yes"}"#,
            "bad_request",
        ),
    ] {
        let e = c.call(line);
        assert_eq!(e["ok"], false, "{line}: {e}");
        assert_eq!(e["code"], code, "{line}: {e}");
    }
    // A customer runs the VM; the operator copies it.
    let (text, _) =
        tests::control::send_as_nobody(&vm.sock, Some(r#"{"cmd":"snapshot","dir":"mine"}"#));
    assert!(text.contains("\"code\":\"forbidden\""), "{text}");
    assert!(!vm.snapshot("mine").exists() && !vm.snapshot("mine.part").exists());
    let names: Vec<_> = std::fs::read_dir(dir.path().join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("s1")]);
    assert_eq!(c.status()["state"], "running");
}

/// A 1 GiB guest that has written every page of 992 MiB: its memory file
/// is data, not holes, and takes a while to write (seconds).
fn start_large(dir: &Path) -> Vm {
    let sock = dir.join("run/vm1/control.sock");
    let snaps = dir.join("snapshots");
    std::fs::create_dir(&snaps).unwrap();
    let asm = dirtier(16 << 20, 992 << 20);
    let mut cmd = vmm_command_sized(dir, "vm1", &asm, &sock, 1024);
    cmd.arg("--snapshot-dir").arg(&snaps);
    let vm = Vm {
        dir: dir.to_path_buf(),
        sock,
        p: VmmProcess::spawn_cmd(&mut cmd),
    };
    assert!(vm.p.wait_for("READY", T), "{}", vm.p.report());
    // A letter per sweep: one means every page was written.
    assert!(
        vm.p.wait_until(0, T, |t| (!letters_of(t).is_empty()).then_some(()))
            .is_some(),
        "{}",
        vm.p.report()
    );
    vm
}

/// Polls `status` until it says a snapshot is being written (`None` if
/// `asked` was answered first).
fn while_snapshotting(
    c: &mut Ctl,
    asked: &std::thread::ScopedJoinHandle<'_, serde_json::Value>,
) -> Option<serde_json::Value> {
    let deadline = std::time::Instant::now() + T;
    while !asked.is_finished() && std::time::Instant::now() < deadline {
        let st = c.status();
        if st["snapshotting"] == true {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

#[test]
fn while_a_large_snapshot_is_written_the_control_socket_answers_and_power_requests_are_refused_until_it_is_done(
) {
    let dir = TempDir::new("snap-tiny-large");
    let vm = start_large(dir.path());
    let mut c = vm.ctl();
    let sock = vm.sock.clone();
    let (answer, seen, refused) = std::thread::scope(|s| {
        let asked = s.spawn(|| Ctl::connect(&sock).call(r#"{"cmd":"snapshot","dir":"big"}"#));
        // `status` answers while the snapshot is written, and says so.
        let seen = while_snapshotting(&mut c, &asked);
        // Meanwhile a reset, a pause or another snapshot is refused, not
        // queued behind it nor carried out under it.
        let refused: Vec<serde_json::Value> = if seen.is_some() {
            [
                r#"{"cmd":"reset"}"#,
                r#"{"cmd":"pause"}"#,
                r#"{"cmd":"snapshot","dir":"second"}"#,
            ]
            .iter()
            .map(|l| c.call(l))
            .collect()
        } else {
            Vec::new()
        };
        (asked.join().expect("the snapshot call"), seen, refused)
    });
    assert_eq!(answer["ok"], true, "{answer}");
    let seen = seen
        .unwrap_or_else(|| panic!("no status answered while the snapshot was written: {answer}"));
    assert_eq!(seen["state"], "running", "{seen}");
    for e in &refused {
        assert_eq!(e["code"], "invalid_state", "{e}");
        assert!(
            e["error"]
                .as_str()
                .unwrap_or_default()
                .contains("snapshot of this VM is being written"),
            "{e}"
        );
    }
    assert_eq!(refused.len(), 3);
    assert!(!vm.snapshot("second").exists());
    assert_eq!(answer["memory_bytes"], 1u64 << 30, "{answer}");
    // Done: the guest runs on, power requests are served again.
    let s = c.status();
    assert_eq!(s["snapshotting"], serde_json::Value::Null, "{s}");
    assert_eq!(s["boot_count"], 1, "the refused reset did nothing: {s}");
    let before = vm.letters().len();
    assert!(
        vm.p.wait_until(0, T, |t| (letters_of(t).len() > before).then_some(()))
            .is_some(),
        "the guest runs on after the snapshot\n{}",
        vm.p.report()
    );
    c.ok(r#"{"cmd":"reset"}"#);
    assert_eq!(c.status()["boot_count"], 2);
    assert!(vm.snapshot("big").join("memory").is_file());
}

#[test]
fn a_vmm_told_to_exit_while_it_writes_a_snapshot_finishes_it_first() {
    let dir = TempDir::new("snap-tiny-exit");
    let mut vm = start_large(dir.path());
    let mut c = vm.ctl();
    let sock = vm.sock.clone();
    let (answer, seen) = std::thread::scope(|s| {
        let asked = s.spawn(|| Ctl::connect(&sock).call(r#"{"cmd":"snapshot","dir":"last"}"#));
        let seen = while_snapshotting(&mut c, &asked);
        if seen.is_some() {
            // As systemd's stop does once its ExecStop is done.
            vm.p.child.signal(libc::SIGTERM).expect("SIGTERM");
        }
        (asked.join().expect("the snapshot call"), seen)
    });
    assert!(seen.is_some(), "never seen writing: {answer}");
    assert_eq!(answer["ok"], true, "{answer}");
    assert!(vm.p.wait_exit(T).is_some(), "{}", vm.p.report());
    let snap = vm.snapshot("last");
    assert!(snap.join("state").is_file() && snap.join("memory").is_file());
    assert!(!vm.dir.join("snapshots/last.part").exists());
}

#[test]
fn without_a_snapshot_directory_snapshot_is_refused_as_unsupported() {
    let dir = TempDir::new("snap-tiny-none");
    let sock = dir.path().join("run/vm1/control.sock");
    let p = VmmProcess::spawn_cmd(&mut vmm_command(dir.path(), "vm1", &alphabet(), &sock));
    assert!(p.wait_for("READY", T), "{}", p.report());
    let e = Ctl::connect(&sock).call(r#"{"cmd":"snapshot","dir":"s"}"#);
    assert_eq!(e["code"], "unsupported", "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap_or_default()
            .contains("--snapshot-dir"),
        "{e}"
    );
}

/// `vmm --restore` of `snap` with `extra` flags: its exit and stderr.
fn restore_fails(dir: &Path, snap: &Path, extra: &[&str]) -> String {
    let mut vm = start(
        dir,
        &[&["--restore", snap.to_str().expect("UTF-8")], extra].concat(),
    );
    let st = vm.p.wait_exit(T);
    assert!(
        st.is_some_and(|s| !s.success()),
        "the restore did not fail: {st:?}\n{}",
        vm.p.report()
    );
    assert!(
        !vm.p.output().contains('a'),
        "the guest ran: {}",
        vm.p.report()
    );
    vm.p.stderr()
}

#[test]
fn a_corrupt_foreign_or_mismatched_snapshot_is_refused_with_a_clear_error() {
    let dir = TempDir::new("snap-tiny-bad");
    let mut vm = start(dir.path(), &[]);
    assert!(vm.p.wait_for("READY", T), "{}", vm.p.report());
    vm.ctl()
        .ok(r#"{"cmd":"snapshot","dir":"good","stop":true}"#);
    let _ = vm.p.child.kill();
    let _ = vm.p.wait_exit(T);
    let good = vm.snapshot("good");
    let copy = |name: &str| {
        let d = vm.snapshot(name);
        std::fs::create_dir(&d).unwrap();
        for f in ["state", "memory"] {
            std::fs::copy(good.join(f), d.join(f)).unwrap();
        }
        d
    };

    // One byte of the state flipped.
    let flipped = copy("flipped");
    let mut state = std::fs::read(flipped.join("state")).unwrap();
    let i = state.len() / 2;
    state[i] ^= 0x20;
    std::fs::write(flipped.join("state"), &state).unwrap();
    let err = restore_fails(dir.path(), &flipped, &[]);
    assert!(err.contains("corrupt"), "{err}");

    // Another format version.
    let future = copy("future");
    let mut state = std::fs::read(future.join("state")).unwrap();
    state[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(future.join("state"), &state).unwrap();
    let err = restore_fails(dir.path(), &future, &[]);
    assert!(err.contains("version 99"), "{err}");

    // Memory damaged.
    let mem = copy("memory");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(mem.join("memory"))
        .unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"\xff\xfe", 0x10_0000).unwrap();
    let err = restore_fails(dir.path(), &mem, &[]);
    assert!(err.contains("memory is corrupt"), "{err}");

    // Not a snapshot at all, and a missing one.
    let junk = vm.snapshot("junk");
    std::fs::create_dir(&junk).unwrap();
    std::fs::write(junk.join("state"), b"hello").unwrap();
    std::fs::write(junk.join("memory"), b"").unwrap();
    let err = restore_fails(dir.path(), &junk, &[]);
    assert!(err.contains("not a snapshot"), "{err}");
    let err = restore_fails(dir.path(), &vm.snapshot("absent"), &[]);
    assert!(err.contains("absent"), "{err}");

    // Another machine: more vCPUs than it was taken with.
    let err = restore_fails(dir.path(), &good, &["--vcpus", "2"]);
    assert!(err.contains("1 vCPUs (this VM: 2)"), "{err}");

    // The good one still restores.
    let ok = start(dir.path(), &["--restore", good.to_str().expect("UTF-8")]);
    assert!(
        ok.p.wait_until(0, T, |t| (letters_of(t).len() >= 3).then_some(()))
            .is_some(),
        "{}",
        ok.p.report()
    );
}

#[test]
fn a_paused_vm_is_restored_paused_and_goes_on_when_resumed() {
    let dir = TempDir::new("snap-tiny-paused");
    let mut vm = start(dir.path(), &[]);
    assert!(vm.p.wait_for("READY", T), "{}", vm.p.report());
    vm.ctl().ok(r#"{"cmd":"pause"}"#);
    vm.ctl().ok(r#"{"cmd":"snapshot","dir":"p","stop":true}"#);
    let snap = vm.snapshot("p");
    let _ = vm.p.child.kill();
    let _ = vm.p.wait_exit(T);
    let restored = start(dir.path(), &["--restore", snap.to_str().expect("UTF-8")]);
    let mut c = restored.ctl();
    let s = c.wait_status(T, |s| s["state"] == "paused");
    assert_eq!(s["state"], "paused", "{s}");
    assert!(
        letters_of(&restored.p.output()).is_empty(),
        "it ran while paused"
    );
    c.ok(r#"{"cmd":"resume"}"#);
    assert!(
        restored
            .p
            .wait_until(0, T, |t| (letters_of(t).len() >= 3).then_some(()))
            .is_some(),
        "{}",
        restored.p.report()
    );
}
