//! Live migration between two VMM processes on this machine's KVM, with a
//! tiny guest that prints the alphabet, its letter in a register: the
//! target goes on at the next letter and the source ends; a target that
//! breaks off mid-copy, a wrong token, the operator's cancel or a
//! customer's request leave the guest running at its source.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tests::control::Ctl;
use tests::tiny::{alphabet, contiguous, letters_of, vmm_command_sized};
use tests::{TempDir, VmmProcess};

mod converge;

const T: Duration = Duration::from_secs(60);
const TOKEN: &str = "a-token-of-32-characters-or-more";

struct Vm {
    sock: PathBuf,
    p: VmmProcess,
}

impl Vm {
    fn ctl(&self) -> Ctl {
        Ctl::connect(&self.sock)
    }
    fn letters(&self) -> String {
        letters_of(&self.p.output())
    }
    /// Waits until `n` more letters than now were printed.
    fn runs_on(&self, n: usize) -> bool {
        let before = self.letters().len();
        self.p
            .wait_until(0, T, |t| (letters_of(t).len() >= before + n).then_some(()))
            .is_some()
    }
}

fn start(dir: &Path, name: &str, extra: &[&str]) -> Vm {
    start_sized(dir, name, 64, extra)
}

fn start_sized(dir: &Path, name: &str, mib: u32, extra: &[&str]) -> Vm {
    start_guest(dir, name, &alphabet(), mib, extra)
}

fn start_guest(dir: &Path, name: &str, asm: &tests::tiny::Asm, mib: u32, extra: &[&str]) -> Vm {
    let sock = dir.join(format!("run/{name}/control.sock"));
    let mut cmd = vmm_command_sized(dir, "vm1", asm, &sock, mib);
    cmd.args(extra);
    Vm {
        sock,
        p: VmmProcess::spawn_cmd(&mut cmd),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn target(dir: &Path, port: u16) -> Vm {
    target_with(dir, port, &[])
}

fn target_with(dir: &Path, port: u16, extra: &[&str]) -> Vm {
    target_sized(dir, port, 64, extra)
}

fn target_sized(dir: &Path, port: u16, mib: u32, extra: &[&str]) -> Vm {
    let tok = dir.join("token");
    std::fs::write(&tok, format!("{TOKEN}\n")).unwrap();
    let addr = format!("127.0.0.1:{port}");
    let mut args = vec![
        "--incoming",
        &addr,
        "--incoming-token-file",
        tok.to_str().expect("UTF-8"),
    ];
    args.extend_from_slice(extra);
    start_sized(dir, "target", mib, &args)
}

/// Asks for a migration to `port` once the target listens.
fn migrate(src: &Vm, port: u16, token: &str) -> serde_json::Value {
    migrate_with(src, port, token, "")
}

/// The same, with more arguments (`,"disks":"copy"`).
fn migrate_with(src: &Vm, port: u16, token: &str, more: &str) -> serde_json::Value {
    wait_listening(port);
    ask(src, port, token, more)
}

/// Waits (at most 5 s) until a target listens on `port`.
fn wait_listening(port: u16) {
    for _ in 0..500 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Asks for a migration to `port` at once (a fake target accepts one
/// connection only: no probe first).
fn ask(src: &Vm, port: u16, token: &str, more: &str) -> serde_json::Value {
    src.ctl().call(&format!(
        r#"{{"cmd":"migrate","to":"127.0.0.1:{port}","token":"{token}"{more}}}"#
    ))
}

/// The answer is a refusal that says `why`.
fn assert_refused(r: &serde_json::Value, why: &str) {
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap_or_default().contains(why), "{r}");
}

#[test]
fn a_migrated_tiny_guest_goes_on_at_the_next_letter_in_the_target_and_the_source_ends() {
    let d = TempDir::new("migr-tiny");
    let src_dir = d.path().join("src");
    let dst_dir = d.path().join("dst");
    std::fs::create_dir_all(&src_dir).unwrap();
    std::fs::create_dir_all(&dst_dir).unwrap();
    let mut src = start(&src_dir, "src", &[]);
    assert!(src.p.wait_for("READY", T), "{}", src.p.report());
    assert!(src.runs_on(20), "{}", src.p.report());
    let boot_count = src.ctl().status()["boot_count"].clone();
    let port = free_port();
    let dst = target(&dst_dir, port);
    let mut sub = src.ctl();
    sub.ok(r#"{"cmd":"subscribe"}"#);

    let r = migrate(&src, port, TOKEN);
    assert_eq!(r["ok"], true, "{r}\n{}\n{}", src.p.report(), dst.p.report());
    eprintln!("migration of a 64 MiB tiny guest: {r}");
    assert!(r["passes"].as_u64().unwrap_or(0) >= 1, "{r}");
    assert!(r["downtime_ms"].as_u64().is_some(), "{r}");
    let ev = sub.wait_event("migration", T).expect("a migration event");
    assert_eq!(ev["pass"], 1, "{ev}");

    // The source ends; what it printed is whole once it has.
    let st = src.p.wait_exit(T);
    assert!(
        st.is_some_and(|s| s.success()),
        "{st:?}\n{}",
        src.p.report()
    );
    let printed = src.letters();
    assert!(contiguous(&printed), "{printed}");
    let last = printed.chars().last().expect("letters");

    assert!(dst.runs_on(5), "{}", dst.p.report());
    let out = dst.p.output();
    assert!(!out.contains("READY"), "the target booted the guest: {out}");
    assert!(out.contains("restored from migration"), "{out}");
    let went_on = letters_of(&out);
    let want = if last == 'z' {
        'a'
    } else {
        (last as u8 + 1) as char
    };
    assert_eq!(
        went_on.chars().next(),
        Some(want),
        "after '{last}' (source: ...{})",
        &printed[printed.len().saturating_sub(10)..]
    );
    assert!(contiguous(&went_on), "{went_on}");
    let s = dst.ctl().status();
    assert_eq!(s["state"], "running", "{s}");
    assert_eq!(s["boot_count"], boot_count, "{s}");
}

#[test]
fn a_4_gib_guest_split_around_the_pci_hole_migrates_and_its_source_answers() {
    // Two memory regions, and bitmaps big enough that the migration's
    // thread gives heap memory back (glibc then read a /proc file, which
    // its seccomp filter refused: the source died without an answer).
    let d = TempDir::new("migr-tiny-4g");
    let src_dir = d.path().join("src");
    let dst_dir = d.path().join("dst");
    std::fs::create_dir_all(&src_dir).unwrap();
    std::fs::create_dir_all(&dst_dir).unwrap();
    let mut src = start_sized(&src_dir, "src", 4096, &[]);
    assert!(src.p.wait_for("READY", T), "{}", src.p.report());
    assert!(src.runs_on(10), "{}", src.p.report());
    let port = free_port();
    let dst = target_sized(&dst_dir, port, 4096, &[]);
    let r = migrate(&src, port, TOKEN);
    assert_eq!(r["ok"], true, "{r}\n{}\n{}", src.p.report(), dst.p.report());
    eprintln!("migration of a 4 GiB tiny guest: {r}");
    let st = src.p.wait_exit(T);
    assert!(
        st.is_some_and(|s| s.success()),
        "{st:?}\n{}",
        src.p.report()
    );
    assert!(dst.runs_on(5), "{}", dst.p.report());
    let printed = src.letters();
    let went_on = dst.letters();
    assert!(
        contiguous(&format!("{printed}{went_on}")),
        "{printed} | {went_on}"
    );
}

/// An 8 MiB image: data at its start and at 3 MiB, holes elsewhere.
fn source_image(p: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(p).unwrap();
    f.set_len(8 << 20).unwrap();
    f.write_all_at(&[0x5a; 100_000], 0).unwrap();
    f.write_all_at(b"three MiB in", 3 << 20).unwrap();
}

#[test]
fn a_copied_disk_arrives_whole_in_the_targets_own_image_and_the_sources_own_image_is_refused() {
    let d = TempDir::new("migr-tiny-copy");
    let src_dir = d.path().join("src");
    let dst_dir = d.path().join("dst");
    std::fs::create_dir_all(&src_dir).unwrap();
    std::fs::create_dir_all(&dst_dir).unwrap();
    let src_img = src_dir.join("disk.img");
    let dst_img = dst_dir.join("disk.img");
    source_image(&src_img);
    // What the target's image held before: none of it may remain.
    std::fs::write(&dst_img, vec![0xeeu8; 8 << 20]).unwrap();
    let disk = |p: &Path| format!("path={}", p.display());
    let copy = r#","disks":"copy""#;
    let src = start(&src_dir, "src", &["--disk", &disk(&src_img)]);
    assert!(src.p.wait_for("READY", T), "{}", src.p.report());

    // A target given the source's own image (shared storage) cannot take
    // a copy: refused, and the guest runs on at its source.
    let port = free_port();
    let same = target_with(&dst_dir, port, &["--disk", &disk(&src_img)]);
    let r = migrate_with(&src, port, TOKEN, copy);
    assert_refused(&r, "needs an image of its own");
    assert!(src.runs_on(5), "{}", src.p.report());
    assert!(contiguous(&src.letters()), "{}", src.letters());
    drop(same);

    let port = free_port();
    let dst = target_with(&dst_dir, port, &["--disk", &disk(&dst_img)]);
    let r = migrate_with(&src, port, TOKEN, copy);
    assert_eq!(r["ok"], true, "{r}\n{}\n{}", src.p.report(), dst.p.report());
    eprintln!("migration of a 64 MiB tiny guest with an 8 MiB disk copied: {r}");
    let sent = r["disk_bytes"].as_u64().unwrap_or(0);
    assert!(
        (100_000..(1 << 20)).contains(&sent),
        "the data, not the holes: {r}"
    );
    let mut src = src;
    assert!(src.p.wait_exit(T).is_some_and(|s| s.success()));
    assert!(dst.runs_on(3), "{}", dst.p.report());
    assert!(
        std::fs::read(&dst_img).unwrap() == std::fs::read(&src_img).unwrap(),
        "the target's image is the source's, byte for byte"
    );
    assert_eq!(dst.ctl().status()["state"], "running");
}

#[test]
fn a_target_that_breaks_off_mid_copy_leaves_the_guest_running_at_its_source() {
    let d = TempDir::new("migr-tiny-break");
    let src = start(d.path(), "src", &[]);
    assert!(src.p.wait_for("READY", T), "{}", src.p.report());
    // A target that accepts, takes a little memory, and goes away.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let fake = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut head = [0u8; 12 + 9];
        c.read_exact(&mut head).unwrap();
        let len = u64::from_le_bytes(head[13..21].try_into().unwrap());
        let mut hello = vec![0u8; len as usize];
        c.read_exact(&mut hello).unwrap();
        let mut accepted = vec![2u8];
        accepted.extend_from_slice(&0u64.to_le_bytes());
        c.write_all(&accepted).unwrap();
        let mut some = vec![0u8; 64 << 10];
        c.read_exact(&mut some).unwrap();
        // Dropped: the connection closes mid-copy.
    });
    let r = ask(&src, port, TOKEN, "");
    fake.join().unwrap();
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["code"], "host_error", "{r}");
    assert!(src.runs_on(10), "the guest runs on\n{}", src.p.report());
    assert!(contiguous(&src.letters()), "{}", src.letters());
    let s = src.ctl().status();
    assert_eq!(s["state"], "running", "{s}");
}

#[test]
fn a_wrong_token_is_refused_by_the_target_which_listens_on_and_takes_the_right_one() {
    let d = TempDir::new("migr-tiny-token");
    let src_dir = d.path().join("src");
    let dst_dir = d.path().join("dst");
    std::fs::create_dir_all(&src_dir).unwrap();
    std::fs::create_dir_all(&dst_dir).unwrap();
    let mut src = start(&src_dir, "src", &[]);
    assert!(src.p.wait_for("READY", T), "{}", src.p.report());
    let port = free_port();
    let dst = target(&dst_dir, port);
    let r = migrate(&src, port, "not-the-token-not-the-token-not");
    assert_refused(&r, "wrong token");
    assert!(src.runs_on(5), "{}", src.p.report());
    assert!(!dst.p.output().contains('a'), "the target ran nothing");
    let r = migrate(&src, port, TOKEN);
    assert_eq!(r["ok"], true, "{r}\n{}", dst.p.report());
    assert!(src.p.wait_exit(T).is_some());
    assert!(dst.runs_on(3), "{}", dst.p.report());
}

#[test]
fn a_paced_migration_can_be_cancelled_and_the_next_one_keeps_to_its_speed_limit_and_completes() {
    let d = TempDir::new("migr-tiny-cancel");
    let src_dir = d.path().join("src");
    let dst_dir = d.path().join("dst");
    std::fs::create_dir_all(&src_dir).unwrap();
    std::fs::create_dir_all(&dst_dir).unwrap();
    // 6 MiB of data on a copied disk, besides ~2 MiB of memory: seconds at
    // 1 MiB/s, where the same copy unpaced takes a fraction of one.
    let (src_img, dst_img) = (src_dir.join("disk.img"), dst_dir.join("disk.img"));
    let f = std::fs::File::create(&src_img).unwrap();
    f.set_len(8 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0x5a; 6 << 20], 0).unwrap();
    std::fs::write(&dst_img, vec![0xeeu8; 8 << 20]).unwrap();
    let disk = |p: &Path| format!("path={}", p.display());
    let mut src = start(&src_dir, "src", &["--disk", &disk(&src_img)]);
    assert!(src.p.wait_for("READY", T), "{}", src.p.report());
    let port = free_port();
    let dst = target_with(&dst_dir, port, &["--disk", &disk(&dst_img)]);
    let mut ctl = src.ctl();
    // Nothing to call off yet.
    assert_eq!(ctl.status()["migrating"], serde_json::Value::Null);
    let e = ctl.call(r#"{"cmd":"migrate-cancel"}"#);
    assert_eq!(e["code"], "invalid_state", "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap_or_default()
            .contains("no migration"),
        "{e}"
    );

    // Called off while it goes.
    let paced = r#","disks":"copy","speed_mib_s":1"#;
    wait_listening(port);
    let line = format!(r#"{{"cmd":"migrate","to":"127.0.0.1:{port}","token":"{TOKEN}"{paced}}}"#);
    let sock = src.sock.clone();
    let (answer, cancel) = std::thread::scope(|s| {
        let asked = s.spawn(|| Ctl::connect(&sock).call(&line));
        // `status` says when the `migrate` line has been taken.
        let deadline = std::time::Instant::now() + T;
        while ctl.status()["migrating"] != true
            && !asked.is_finished()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let r = ctl.call(r#"{"cmd":"migrate-cancel"}"#);
        (asked.join().expect("the migrate call"), r)
    });
    assert_eq!(cancel["ok"], true, "{cancel}\n{answer}");
    assert_eq!(answer["ok"], false, "{answer}");
    assert_eq!(answer["code"], "cancelled", "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap_or_default()
            .contains("runs on here"),
        "{answer}"
    );
    // The guest never noticed but for its letters going on.
    assert!(src.runs_on(10), "{}", src.p.report());
    assert!(contiguous(&src.letters()), "{}", src.letters());
    let s = ctl.status();
    assert_eq!(s["state"], "running", "{s}");
    assert_eq!(s["migrating"], serde_json::Value::Null, "{s}");
    let e = ctl.call(r#"{"cmd":"migrate-cancel"}"#);
    assert_eq!(e["code"], "invalid_state", "{e}");
    assert!(
        letters_of(&dst.p.output()).is_empty(),
        "the target ran nothing: {}",
        dst.p.output()
    );

    // The target listens on; the next migration keeps to its limit while
    // the guest runs (the last pass, with the guest stopped, does not).
    let mut sub = src.ctl();
    sub.ok(r#"{"cmd":"subscribe"}"#);
    let r = migrate_with(&src, port, TOKEN, paced);
    assert_eq!(r["ok"], true, "{r}\n{}", dst.p.report());
    let ev = sub.wait_event("migration", T).expect("a migration event");
    let n = |k: &str| ev[k].as_u64().unwrap_or_else(|| panic!("{k} in {ev}"));
    assert_eq!(n("pass"), 1, "{ev}");
    let sent = n("sent_bytes");
    assert!(
        sent >= 6 << 20,
        "the disk's data went in the first pass: {ev}"
    );
    // Paced from its first byte, one frame (at most 1 MiB) ahead at most.
    let least_ms = (sent - (1 << 20)) * 1000 / (1 << 20);
    assert!(n("pass_ms") >= least_ms, "faster than 1 MiB/s: {ev}\n{r}");
    assert!(
        src.p.wait_exit(T).is_some_and(|s| s.success()),
        "{}",
        src.p.report()
    );
    assert!(dst.runs_on(3), "{}", dst.p.report());
    assert!(
        std::fs::read(&dst_img).unwrap() == std::fs::read(&src_img).unwrap(),
        "the target's image is the source's, byte for byte"
    );
    let e = Ctl::connect(&dst.sock).call(r#"{"cmd":"migrate-cancel"}"#);
    assert_eq!(e["code"], "invalid_state", "{e}");
}

#[test]
fn a_cancel_ends_at_once_a_migration_waiting_on_a_target_that_never_answers() {
    let d = TempDir::new("migr-tiny-silent");
    let src = start(d.path(), "src", &[]);
    assert!(src.p.wait_for("READY", T), "{}", src.p.report());
    // A target that takes the connection and the greeting and says
    // nothing: the source would wait two minutes for its answer.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (greeted, heard) = std::sync::mpsc::channel();
    let silent = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut greeting = [0u8; 12];
        c.read_exact(&mut greeting).unwrap();
        greeted.send(()).unwrap();
        // Until the source lets go of the connection.
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
    });
    let line = format!(r#"{{"cmd":"migrate","to":"127.0.0.1:{port}","token":"{TOKEN}"}}"#);
    let sock = src.sock.clone();
    let answer = std::thread::scope(|s| {
        let asked = s.spawn(|| Ctl::connect(&sock).call(&line));
        heard.recv_timeout(T).expect("the source connects");
        let r = src.ctl().call(r#"{"cmd":"migrate-cancel"}"#);
        assert_eq!(r["ok"], true, "{r}");
        // Within the test client's 90 s, not after the source's 120 s.
        asked.join().expect("the migrate call")
    });
    assert_eq!(answer["code"], "cancelled", "{answer}");
    silent.join().expect("the source closed the connection");
    assert!(src.runs_on(5), "{}", src.p.report());
    assert_eq!(src.ctl().status()["state"], "running");
}

#[test]
fn migrate_is_the_operators_and_wants_an_address() {
    let d = TempDir::new("migr-tiny-refused");
    let src = start(d.path(), "src", &["--allow-user", "65534"]);
    assert!(src.p.wait_for("READY", T), "{}", src.p.report());
    let e = src.ctl().call(&format!(
        r#"{{"cmd":"migrate","to":"target.example:4444","token":"{TOKEN}"}}"#
    ));
    assert_eq!(e["code"], "bad_request", "{e}");
    let e = src.ctl().call(r#"{"cmd":"migrate","to":"127.0.0.1:1"}"#);
    assert_eq!(e["code"], "bad_request", "{e}");
    // Nobody listens there: refused at once, the guest runs on.
    let e = src.ctl().call(&format!(
        r#"{{"cmd":"migrate","to":"127.0.0.1:1","token":"{TOKEN}"}}"#
    ));
    assert_eq!(e["code"], "host_error", "{e}");
    for line in [
        format!(r#"{{"cmd":"migrate","to":"127.0.0.1:9","token":"{TOKEN}"}}"#),
        r#"{"cmd":"migrate-cancel"}"#.to_string(),
    ] {
        let (text, _) = tests::control::send_as_nobody(&src.sock, Some(&line));
        assert!(text.contains("\"code\":\"forbidden\""), "{line}: {text}");
    }
    assert!(src.runs_on(3), "{}", src.p.report());
}

/// A target of our own that speaks the stream up to the machine's state
/// (frame: kind byte, u64 LE length, payload), then does `at_state`.
fn fake_target(at_state: fn(&mut TcpStream)) -> (u16, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut greeting = [0u8; 12];
        c.read_exact(&mut greeting).unwrap();
        loop {
            let mut head = [0u8; 9];
            if c.read_exact(&mut head).is_err() {
                return;
            }
            let len = u64::from_le_bytes(head[1..].try_into().unwrap());
            let mut payload = vec![0u8; len as usize];
            c.read_exact(&mut payload).unwrap();
            match head[0] {
                1 => c.write_all(&frame(2, b"")).unwrap(),
                4 => return at_state(&mut c),
                _ => {}
            }
        }
    });
    (port, t)
}

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![kind];
    f.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

#[test]
fn a_target_that_refuses_the_stopped_machine_leaves_the_guest_running_at_its_source() {
    let d = TempDir::new("migr-tiny-final");
    let src = start(d.path(), "src", &[]);
    assert!(src.p.wait_for("READY", T), "{}", src.p.report());
    assert!(src.runs_on(5), "{}", src.p.report());
    let (port, fake) = fake_target(|c| {
        c.write_all(&frame(7, b"no room for it here")).unwrap();
    });
    let r = ask(&src, port, TOKEN, "");
    fake.join().unwrap();
    assert_refused(&r, "no room for it here");
    // Stopped for the last pass, then on again: not a letter lost or doubled.
    assert!(src.runs_on(10), "the guest runs on\n{}", src.p.report());
    assert!(contiguous(&src.letters()), "{}", src.letters());
    assert_eq!(src.ctl().status()["state"], "running");
    // And it may migrate again.
    let (port, fake) = fake_target(|c| {
        c.write_all(&frame(7, b"still no room")).unwrap();
    });
    let r = ask(&src, port, TOKEN, "");
    fake.join().unwrap();
    assert_refused(&r, "still no room");
    assert!(src.runs_on(3), "{}", src.p.report());
}

#[test]
fn a_target_that_takes_the_go_ahead_and_goes_silent_leaves_the_source_stopped_for_good() {
    let d = TempDir::new("migr-tiny-unknown");
    let src = start(d.path(), "src", &[]);
    assert!(src.p.wait_for("READY", T), "{}", src.p.report());
    let (port, fake) = fake_target(|c| {
        // Rebuilt, it says; then it reads the go-ahead and is gone.
        c.write_all(&frame(5, b"")).unwrap();
        let mut go = [0u8; 9];
        c.read_exact(&mut go).unwrap();
        assert_eq!(go[0], 6, "the go-ahead");
    });
    let r = ask(&src, port, TOKEN, "");
    fake.join().unwrap();
    assert_refused(&r, "outcome unknown");
    // The guest may be running there: not here, and not again.
    let mut c = src.ctl();
    assert_eq!(c.status()["state"], "stopped");
    let e = c.call(r#"{"cmd":"start"}"#);
    assert_eq!(e["ok"], false, "{e}");
    assert!(
        e["error"].as_str().unwrap_or_default().contains("migrated"),
        "{e}"
    );
    assert_eq!(c.status()["state"], "stopped");
}

#[test]
fn a_target_that_refuses_after_the_go_ahead_gives_the_guest_back_to_its_source() {
    let d = TempDir::new("migr-tiny-refused-after-go");
    let src = start(d.path(), "src", &[]);
    assert!(src.p.wait_for("READY", T), "{}", src.p.report());
    let (port, fake) = fake_target(|c| {
        c.write_all(&frame(5, b"")).unwrap();
        let mut go = [0u8; 9];
        c.read_exact(&mut go).unwrap();
        c.write_all(&frame(7, b"cannot lock the disk here"))
            .unwrap();
    });
    let r = ask(&src, port, TOKEN, "");
    fake.join().unwrap();
    assert_refused(&r, "cannot lock the disk here");
    assert!(src.runs_on(10), "the guest runs on\n{}", src.p.report());
    assert!(contiguous(&src.letters()), "{}", src.letters());
    assert_eq!(src.ctl().status()["state"], "running");
}

#[test]
fn a_guest_powered_off_while_the_target_answers_ends_the_migration_and_the_vmm_still_answers() {
    let d = TempDir::new("migr-tiny-gone");
    let src = start(d.path(), "src", &[]);
    assert!(src.p.wait_for("READY", T), "{}", src.p.report());
    // A target that takes its time to accept: the guest is powered off
    // meanwhile, so the migration cannot begin.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let fake = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut head = [0u8; 12 + 9];
        c.read_exact(&mut head).unwrap();
        let len = u64::from_le_bytes(head[13..21].try_into().unwrap());
        let mut hello = vec![0u8; len as usize];
        c.read_exact(&mut hello).unwrap();
        let _ = rx.recv();
        let _ = c.write_all(&frame(2, b""));
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
    });
    let mut c = src.ctl();
    c.send_line(&format!(
        r#"{{"cmd":"migrate","to":"127.0.0.1:{port}","token":"{TOKEN}"}}"#
    ));
    src.ctl().ok(r#"{"cmd":"poweroff"}"#);
    tx.send(()).unwrap();
    let r = loop {
        let v = c.read_value();
        if v.get("ok").is_some() {
            break v;
        }
    };
    fake.join().unwrap();
    assert_eq!(r["ok"], false, "{r}");
    // Not wedged, and free for the next request.
    let mut c = src.ctl();
    assert_eq!(c.status()["state"], "stopped");
    c.ok(r#"{"cmd":"start"}"#);
    assert!(src.p.wait_for_count("READY", 2, T), "{}", src.p.report());
}
