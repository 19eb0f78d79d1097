use super::*;
use event_manager::{EventManager, SubscriberOps};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::time::{Duration, Instant};

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors that we then own.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0);
    // SAFETY: fresh descriptors owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn hub_with(scrollback: usize, backlog: usize) -> ConsoleHub {
    ConsoleHub::new(ConsoleConfig {
        scrollback_bytes: scrollback,
        reader_backlog: backlog,
        ..ConsoleConfig::default()
    })
    .unwrap()
}

fn waker() -> Arc<EventFd> {
    Arc::new(EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap())
}

#[test]
fn defaults_meet_the_spec() {
    let c = ConsoleConfig::default();
    assert!(c.scrollback_bytes >= 1024 * 1024);
    assert_eq!(c.reader_backlog, 256 * 1024);
}

#[test]
fn scrollback_keeps_the_last_bytes_and_counts_all() {
    let hub = hub_with(10, 100);
    hub.output(b"0123456789");
    hub.output(b"abc");
    assert_eq!(hub.scrollback(), b"3456789abc");
    hub.output(b"this is longer than ten");
    assert_eq!(hub.scrollback(), b"r than ten");
    assert_eq!(hub.scrollback_tail(3), b"ten");
    assert_eq!(hub.scrollback_tail(100), b"r than ten");
    assert_eq!(hub.total_output(), 10 + 3 + 23);
}

#[test]
fn reader_gets_live_output_and_is_woken_once_per_batch() {
    let hub = hub_with(100, 100);
    hub.output(b"before");
    let w = waker();
    let (reader, replay) = hub.attach(w.clone(), true);
    assert_eq!(replay, b"before");
    assert!(w.read().is_err(), "no wake-up without output");
    hub.output(b"one");
    hub.output(b"two");
    assert_eq!(w.read().unwrap(), 1);
    assert_eq!(reader.take(4), b"onet");
    assert_eq!(reader.take(100), b"wo");
    assert!(reader.is_empty());
    hub.output(b"three");
    assert_eq!(w.read().unwrap(), 1);
    assert_eq!(reader.take(100), b"three");
}

#[test]
fn slow_reader_loses_oldest_bytes_and_gets_a_notice() {
    let hub = hub_with(1000, 8);
    let (reader, _) = hub.attach(waker(), false);
    hub.output(b"0123456789");
    hub.output(b"ab");
    let got = reader.take(100);
    assert_eq!(
        String::from_utf8(got).unwrap(),
        "\r\n[vmm: 4 bytes of console output dropped]\r\n456789ab"
    );
    hub.output(b"x");
    assert_eq!(reader.take(100), b"x", "the notice is delivered once");
    assert_eq!(hub.scrollback(), b"0123456789abx");
}

#[test]
fn replay_and_live_output_neither_lose_nor_repeat_bytes() {
    let hub = hub_with(1 << 20, 1 << 20);
    let writer = {
        let hub = hub.clone();
        std::thread::spawn(move || {
            for i in 0..20_000u32 {
                hub.output(format!("{i}\n").as_bytes());
            }
        })
    };
    std::thread::sleep(Duration::from_millis(2));
    let (reader, replay) = hub.attach(waker(), true);
    writer.join().unwrap();
    let mut all = replay;
    all.extend(reader.take(usize::MAX));
    let expected: String = (0..20_000u32).map(|i| format!("{i}\n")).collect();
    assert_eq!(String::from_utf8(all).unwrap(), expected);
}

#[test]
fn dropped_reader_detaches() {
    let hub = hub_with(10, 10);
    let (reader, _) = hub.attach(waker(), false);
    let (_r2, _) = hub.attach(waker(), false);
    assert_eq!(hub.reader_count(), 2);
    drop(reader);
    assert_eq!(hub.reader_count(), 1);
}

#[test]
fn output_with_a_stuck_reader_never_blocks() {
    let hub = hub_with(1 << 20, 256 * 1024);
    let (reader, _) = hub.attach(waker(), false);
    let start = Instant::now();
    let chunk = vec![b'x'; 4096];
    for _ in 0..(64 * 1024 * 1024 / chunk.len()) {
        hub.output(&chunk);
    }
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(reader.pending() <= 256 * 1024);
}

#[test]
fn boot_marker_goes_to_scrollback_and_readers() {
    let hub = hub_with(1000, 1000);
    let (reader, _) = hub.attach(waker(), false);
    hub.mark_boot(2, "reset: watchdog");
    let text = String::from_utf8(hub.scrollback()).unwrap();
    assert!(
        text.starts_with("\r\n--- vmm: boot 2 (reset: watchdog) at "),
        "{text}"
    );
    assert!(text.ends_with("Z ---\r\n"));
    assert_eq!(reader.take(1000), text.as_bytes());
    let fixed = boot_marker(
        2,
        "reset: watchdog",
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_832_999),
    );
    assert_eq!(
        fixed,
        "\r\n--- vmm: boot 2 (reset: watchdog) at 2026-11-28T02:29:59Z ---\r\n"
    );
}

fn temp_path(name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("vmm-console-{}-{n}-{name}", std::process::id()))
}

#[test]
fn log_file_is_appended_created_0640_and_gets_markers() {
    use std::os::unix::fs::PermissionsExt;
    let path = temp_path("log");
    std::fs::write(&path, b"old\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    {
        let hub = ConsoleHub::new(ConsoleConfig {
            log_path: Some(path.clone()),
            ..ConsoleConfig::default()
        })
        .unwrap();
        hub.output(b"hello ");
        hub.mark_boot(1, "power-on");
        hub.output(b"world");
    }
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.starts_with("old\nhello \r\n--- vmm: boot 1 (power-on) at "),
        "{text}"
    );
    assert!(text.ends_with("---\r\nworld"));
    std::fs::remove_file(&path).unwrap();

    let fresh = temp_path("fresh");
    drop(
        ConsoleHub::new(ConsoleConfig {
            log_path: Some(fresh.clone()),
            ..ConsoleConfig::default()
        })
        .unwrap(),
    );
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
    // The umask may only remove bits.
    assert_eq!(mode & !0o640, 0, "mode {mode:o}");
    std::fs::remove_file(&fresh).unwrap();
}

#[test]
fn unopenable_log_is_a_clear_error() {
    let err = ConsoleHub::new(ConsoleConfig {
        log_path: Some("/nonexistent-dir/x.log".into()),
        ..ConsoleConfig::default()
    })
    .unwrap_err();
    assert!(err
        .to_string()
        .starts_with("cannot open console log /nonexistent-dir/x.log:"));
}

#[test]
fn input_is_bounded_signalled_and_taken_in_order() {
    let hub = ConsoleHub::new(ConsoleConfig {
        input_capacity: 8,
        ..ConsoleConfig::default()
    })
    .unwrap();
    assert!(!hub.has_input());
    assert_eq!(hub.push_input(b"hello"), 5);
    assert_eq!(hub.input_eventfd().read().unwrap(), 1);
    let w = waker();
    assert_eq!(hub.push_input_or_notify(b" world", &w), 3);
    assert!(
        hub.input_eventfd().read().is_err(),
        "signalled on the empty edge only"
    );
    assert!(w.read().is_err());
    assert_eq!(hub.take_input(3), b"hel");
    assert_eq!(w.read().unwrap(), 1, "waiter told that there is room");
    assert_eq!(hub.take_input(100), b"lo wo");
    assert!(!hub.has_input());
    hub.ack_input_event();
}

#[test]
fn raw_mode_is_entered_and_restored_on_a_pty() {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty fills two descriptors; the name/termios/winsize pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0);
    // SAFETY: fresh descriptors we own.
    let (_master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let get = || {
        // SAFETY: termios is plain data filled by tcgetattr.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and pointer.
        assert_eq!(unsafe { libc::tcgetattr(slave.as_raw_fd(), &mut t) }, 0);
        t
    };
    let before = get();
    assert_ne!(before.c_lflag & libc::ICANON, 0);
    enter_raw_mode(slave.as_raw_fd()).unwrap();
    let raw = get();
    assert_eq!(raw.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG), 0);
    assert_ne!(raw.c_oflag & libc::OPOST, 0, "output processing kept");
    restore_terminal();
    let after = get();
    assert_eq!(after.c_lflag, before.c_lflag);
    assert_eq!(after.c_iflag, before.c_iflag);
    restore_terminal(); // idempotent
}

#[test]
fn escape_parser_handles_quit_literal_ctrl_a_and_split_reads() {
    let mut p = EscapeParser::default();
    let mut g = Vec::new();
    assert_eq!(p.feed(b"ab\x01\x01c", &mut g), (None, 5));
    assert_eq!(g, b"ab\x01c");
    g.clear();
    assert_eq!(p.feed(b"z\x01", &mut g), (None, 2));
    assert_eq!(p.feed(b"xrest", &mut g), (Some(EscapeCommand::Quit), 1));
    assert_eq!(g, b"z");
    g.clear();
    assert_eq!(
        p.feed(b"\x01q\x01h!", &mut g),
        (Some(EscapeCommand::Help), 4)
    );
    assert_eq!(g, b"\x01q");
    g.clear();
    assert_eq!(p.feed(b"\x01?", &mut g), (Some(EscapeCommand::Help), 2));
}

struct Loop {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Loop {
    fn start<S: MutEventSubscriber + Send + 'static>(sub: S) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
            em.add_subscriber(Arc::new(Mutex::new(sub)));
            while !stop2.load(Ordering::SeqCst) {
                em.run_with_timeout(20).unwrap();
            }
        });
        Loop {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn stdio_console_moves_bytes_both_ways_and_quits_on_ctrl_a_x() {
    let hub = hub_with(1 << 16, 1 << 16);
    let quit = QuitRequested::new().unwrap();
    let (in_r, in_w) = pipe();
    let (out_r, out_w) = pipe();
    let console =
        StdioConsole::with_fds(hub.clone(), quit.clone(), Some(in_r), out_w, true).unwrap();
    let _loop = Loop::start(console);

    hub.output(b"guest says hi\r\n");
    let mut out = File::from(out_r);
    let mut got = vec![0u8; 15];
    out.read_exact(&mut got).unwrap();
    assert_eq!(got, b"guest says hi\r\n");

    let mut input = File::from(in_w);
    input.write_all(b"ls\x01\x01\r").unwrap();
    let mut typed = Vec::new();
    wait_for("input", || {
        typed.extend(hub.take_input(100));
        typed.len() >= 4
    });
    assert_eq!(typed, b"ls\x01\r");
    assert!(!quit.is_requested());

    input.write_all(b"\x01").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    input.write_all(b"x").unwrap();
    wait_for("quit", || quit.is_requested());
    assert_eq!(quit.eventfd().read().unwrap(), 1);
    assert!(hub.take_input(100).is_empty());
}

#[test]
fn stdio_console_with_a_stuck_stdout_drops_oldest_and_never_blocks_output() {
    let hub = hub_with(1 << 16, 64 * 1024);
    let quit = QuitRequested::new().unwrap();
    let (out_r, out_w) = pipe();
    let console = StdioConsole::with_fds(hub.clone(), quit, None, out_w, false).unwrap();
    let _loop = Loop::start(console);
    let start = Instant::now();
    let chunk = vec![b'y'; 1024];
    for _ in 0..(16 * 1024) {
        hub.output(&chunk);
    }
    hub.output(b"END");
    assert!(start.elapsed() < Duration::from_secs(10));
    // Now drain the pipe: we see a drop notice and the final bytes.
    let mut out = File::from(out_r);
    set_nonblocking(out.as_raw_fd()).unwrap();
    let mut all = Vec::new();
    wait_for("the end of the output", || {
        let mut buf = [0u8; 65536];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
        }
        all.ends_with(b"END")
    });
    let text = String::from_utf8_lossy(&all);
    assert!(text.contains("bytes of console output dropped]"));
    assert!(all.len() < 1024 * 1024);
}

#[test]
fn stdio_console_input_waits_for_room_instead_of_dropping() {
    let hub = ConsoleHub::new(ConsoleConfig {
        input_capacity: 4,
        ..ConsoleConfig::default()
    })
    .unwrap();
    let quit = QuitRequested::new().unwrap();
    let (in_r, in_w) = pipe();
    let (_out_r, out_w) = pipe();
    let console = StdioConsole::with_fds(hub.clone(), quit, Some(in_r), out_w, false).unwrap();
    let _loop = Loop::start(console);
    File::from(in_w).write_all(b"0123456789").unwrap();
    let mut got = Vec::new();
    wait_for("all input", || {
        got.extend(hub.take_input(3));
        got.len() == 10
    });
    assert_eq!(got, b"0123456789");
}
