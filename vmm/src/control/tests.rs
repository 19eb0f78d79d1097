//! End-to-end tests of the control server over real Unix sockets, with a fake handler and a
//! real event-manager loop in a thread.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use protocol::{
    Client, ConsoleAttached, Event, KernelSelection, LogInfo, Reply, Request, ResetCause, Response,
    ServerLine, StatusInfo, StopOutcome, StopResult, VmState,
};

use super::*;
use crate::console::{ConsoleConfig, ConsoleHub};

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("vmm-control-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A handler with canned behaviour per command.
struct FakeHandler {
    seen: Arc<Mutex<Vec<Request>>>,
    events: EventBroadcaster,
}

fn status_info() -> StatusInfo {
    StatusInfo {
        name: "test-vm".into(),
        state: VmState::Running,
        kernel: "mini".into(),
        next_kernel: None,
        vcpus: 1,
        memory_mib: 128,
        uptime_ms: 42,
        boot_count: 1,
        last_reset: None,
        migrating: false,
        snapshotting: false,
        throttle_pct: 0,
        watchdog: None,
        on_panic: None,
        disks: vec![],
        nets: vec![],
    }
}

impl ControlHandler for FakeHandler {
    fn execute(&mut self, request: Request, responder: Responder) {
        self.seen.lock().unwrap().push(request.clone());
        match request {
            Request::Status => responder.ok(Reply::Status(status_info())),
            Request::Pause => {
                self.events.publish(Event::StateChanged {
                    state: VmState::Paused,
                    previous: VmState::Running,
                });
                responder.done();
            }
            Request::Reset => {
                self.events.publish(Event::Reset {
                    cause: ResetCause::Command,
                });
                responder.done();
            }
            // Deferred: answered from another thread after `timeout_s` *milliseconds*.
            Request::Shutdown { timeout_s } => {
                let ms = timeout_s.unwrap_or(0);
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(ms));
                    responder.ok(Reply::Stopped(StopOutcome {
                        result: StopResult::Graceful,
                        elapsed_ms: ms,
                    }));
                });
            }
            // Never answered: the dropped responder must produce an error.
            Request::Kernels => drop(responder),
            Request::SetKernel { name } if name == "bad" => {
                responder.error(protocol::ControlError::new(
                    protocol::ErrorCode::NotFound,
                    format!("no kernel named '{name}'"),
                ))
            }
            Request::SetKernel { name } => responder.ok(Reply::KernelSelected(KernelSelection {
                next: name,
                current: Some("mini".into()),
            })),
            other => responder.error(protocol::ControlError::internal(format!(
                "{} is not implemented in the fake",
                other.name()
            ))),
        }
    }
}

struct Harness {
    dir: TempDir,
    path: PathBuf,
    server: Arc<Mutex<ControlServer>>,
    events: EventBroadcaster,
    hub: Option<ConsoleHub>,
    seen: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

struct Options {
    console: bool,
    limits: ControlLimits,
    policy: AccessPolicy,
    console_config: ConsoleConfig,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            console: true,
            limits: ControlLimits::default(),
            // SAFETY: trivial getter.
            policy: AccessPolicy::owner_only(unsafe { libc::geteuid() }),
            console_config: ConsoleConfig::default(),
        }
    }
}

impl Harness {
    fn start() -> Self {
        Self::with(Options::default())
    }

    fn with(options: Options) -> Self {
        let dir = TempDir::new();
        let path = dir.0.join("vm").join("control.sock");
        let events = EventBroadcaster::new("test-vm");
        let hub = options
            .console
            .then(|| ConsoleHub::new(options.console_config.clone()).unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler = FakeHandler {
            seen: seen.clone(),
            events: events.clone(),
        };
        let mut config = ControlConfig::new(&path, options.policy);
        config.limits = options.limits;
        let server = Arc::new(Mutex::new(
            ControlServer::new(config, Box::new(handler), &events, hub.clone()).unwrap(),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let server = server.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut em =
                    EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
                em.add_subscriber(server);
                while !stop.load(Ordering::SeqCst) {
                    em.run_with_timeout(50).unwrap();
                }
            })
        };
        Harness {
            dir,
            path,
            server,
            events,
            hub,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn client(&self) -> Client<UnixStream> {
        let c = Client::connect(&self.path).unwrap();
        c.get_ref()
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        c
    }

    fn raw(&self) -> UnixStream {
        let s = UnixStream::connect(&self.path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }

    fn stats(&self) -> ControlStats {
        self.server.lock().unwrap().stats()
    }

    fn hub(&self) -> &ConsoleHub {
        self.hub.as_ref().unwrap()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn read_lines(reader: &mut BufReader<UnixStream>, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            line
        })
        .collect()
}

fn error_of(line: &str) -> String {
    control_error_of(line).message
}

fn control_error_of(line: &str) -> protocol::ControlError {
    match protocol::parse_response_line(line).unwrap() {
        ServerLine::Response(Response::Error(e)) => e,
        other => panic!("expected an error response, got {other:?}"),
    }
}

fn read_until_eof(mut s: UnixStream) -> Vec<u8> {
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    all
}

#[test]
fn status_round_trip() {
    let h = Harness::start();
    let mut c = h.client();
    let info: StatusInfo = c.request(&Request::Status).unwrap();
    assert_eq!(info, status_info());
    let sel: KernelSelection = c
        .request(&Request::SetKernel {
            name: "debian".into(),
        })
        .unwrap();
    assert_eq!(sel.next, "debian");
    assert_eq!(
        c.request::<KernelSelection>(&Request::SetKernel { name: "bad".into() })
            .unwrap_err()
            .to_string(),
        "no kernel named 'bad'"
    );
}

#[test]
fn many_concurrent_clients_are_all_answered() {
    let h = Harness::start();
    let clients: Vec<_> = (0..50)
        .map(|_| {
            let mut c = h.client();
            std::thread::spawn(move || {
                for _ in 0..100 {
                    let info: StatusInfo = c.request(&Request::Status).unwrap();
                    assert_eq!(info.name, "test-vm");
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(h.seen.lock().unwrap().len(), 5000);
    wait_for("connections to close", || h.stats().connections == 0);
}

#[test]
fn malformed_lines_are_answered_and_the_connection_stays_usable() {
    let h = Harness::start();
    let mut s = h.raw();
    s.write_all(
        b"garbage\n{}\n{\"cmd\":\"nope\"}\n\n   \r\n[1]\n{\"cmd\":\"set-kernel\"}\n\xff\xfe\n{\"cmd\":\"status\",\"x\":1}\n{\"cmd\":\"status\"}\r\n",
    )
    .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let lines = read_lines(&mut r, 8);
    for l in &lines[..7] {
        assert_eq!(
            control_error_of(l).code,
            Some(protocol::ErrorCode::BadRequest),
            "{l}"
        );
    }
    assert!(error_of(&lines[0]).starts_with("malformed JSON: "));
    assert_eq!(error_of(&lines[1]), "missing 'cmd' in request");
    assert_eq!(error_of(&lines[2]), "unknown command 'nope'");
    assert!(error_of(&lines[3]).starts_with("a request must be a JSON object"));
    assert_eq!(
        error_of(&lines[4]),
        "missing argument 'name' for set-kernel"
    );
    assert_eq!(error_of(&lines[5]), "request is not valid UTF-8");
    assert_eq!(error_of(&lines[6]), "unknown argument 'x' for status");
    assert!(
        lines[7].starts_with("{\"ok\":true,\"name\":\"test-vm\""),
        "{}",
        lines[7]
    );
    // Blank lines got no answer, and only the two valid requests reached the handler.
    assert_eq!(h.seen.lock().unwrap().len(), 1);
}

#[test]
fn huge_line_is_refused_with_bounded_memory_and_the_connection_recovers() {
    let h = Harness::start();
    let s = h.raw();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'a'; 1024 * 1024];
        for _ in 0..32 {
            w.write_all(&chunk).unwrap();
        }
        w.write_all(b"\n{\"cmd\":\"status\"}\n").unwrap();
    });
    let mut r = BufReader::new(s);
    let lines = read_lines(&mut r, 2);
    writer.join().unwrap();
    assert_eq!(error_of(&lines[0]), "request line longer than 65536 bytes");
    assert!(lines[1].starts_with("{\"ok\":true"), "{}", lines[1]);
    let max = h.stats().max_input_buffered;
    assert!(max <= 2 * 64 * 1024 + 64, "buffered {max} bytes");
}

#[test]
fn deferred_answers_keep_request_order() {
    let h = Harness::start();
    let mut s = h.raw();
    let start = Instant::now();
    s.write_all(
        b"{\"cmd\":\"shutdown\",\"timeout_s\":300}\n{\"cmd\":\"status\"}\n{\"cmd\":\"set-kernel\",\"name\":\"bad\"}\n{\"cmd\":\"shutdown\",\"timeout_s\":0}\n",
    )
    .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let lines = read_lines(&mut r, 4);
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        lines[0],
        "{\"ok\":true,\"result\":\"graceful\",\"elapsed_ms\":300}\n"
    );
    assert!(lines[1].starts_with("{\"ok\":true,\"name\":"));
    assert_eq!(error_of(&lines[2]), "no kernel named 'bad'");
    assert_eq!(
        lines[3],
        "{\"ok\":true,\"result\":\"graceful\",\"elapsed_ms\":0}\n"
    );
}

#[test]
fn other_clients_are_served_while_one_waits_for_a_deferred_answer() {
    let h = Harness::start();
    let mut slow = h.client();
    slow.send(&Request::Shutdown {
        timeout_s: Some(1000),
    })
    .unwrap();
    let mut fast = h.client();
    let start = Instant::now();
    for _ in 0..20 {
        fast.request::<StatusInfo>(&Request::Status).unwrap();
    }
    assert!(start.elapsed() < Duration::from_millis(900));
    let outcome: StopOutcome = slow.read_response().unwrap().decode().unwrap();
    assert_eq!(outcome.elapsed_ms, 1000);
}

#[test]
fn a_dropped_responder_answers_with_an_error() {
    let h = Harness::start();
    let mut c = h.client();
    let err = c.call(&Request::Kernels).unwrap();
    assert_eq!(
        err,
        Response::Error(protocol::ControlError::internal(
            "internal error: kernels was not answered"
        ))
    );
    c.request::<StatusInfo>(&Request::Status).unwrap();
}

#[test]
fn subscribers_receive_published_events_and_others_do_not() {
    let h = Harness::start();
    let mut sub = h.client();
    sub.call(&Request::Subscribe).unwrap().into_unit().unwrap();
    let mut other = h.client();

    let events = h.events.clone();
    std::thread::spawn(move || {
        events.publish(Event::Watchdog {
            action: protocol::WatchdogAction::Reset,
            expiries: 1,
        })
    })
    .join()
    .unwrap();
    match sub.next_event().unwrap() {
        ServerLine::Event(m) => {
            assert_eq!(m.vm, "test-vm");
            assert!(matches!(m.event, Event::Watchdog { expiries: 1, .. }));
        }
        other => panic!("{other:?}"),
    }
    // Events published by the handler while answering arrive too; requests still work.
    sub.call(&Request::Pause).unwrap().into_unit().unwrap();
    match sub.next_event().unwrap() {
        ServerLine::Event(m) => assert!(matches!(
            m.event,
            Event::StateChanged {
                state: VmState::Paused,
                ..
            }
        )),
        other => panic!("{other:?}"),
    }
    // The other connection saw no event line before its answer.
    let mut raw = BufReader::new(other.get_ref().try_clone().unwrap());
    other.send(&Request::Status).unwrap();
    let line = read_lines(&mut raw, 1).remove(0);
    assert!(line.starts_with("{\"ok\":true"), "{line}");
}

#[test]
fn half_closed_client_gets_all_its_answers_then_eof() {
    let h = Harness::start();
    let mut s = h.raw();
    s.write_all(b"{\"cmd\":\"shutdown\",\"timeout_s\":100}\n{\"cmd\":\"status\"}\n")
        .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let all = String::from_utf8(read_until_eof(s)).unwrap();
    let lines: Vec<_> = all.lines().collect();
    assert_eq!(lines.len(), 2, "{all}");
    assert!(lines[0].contains("\"result\":\"graceful\""));
    assert!(lines[1].contains("\"name\":\"test-vm\""));
    wait_for("the connection to close", || h.stats().connections == 0);
}

#[test]
fn half_closed_subscriber_keeps_receiving_events() {
    let h = Harness::start();
    let mut s = h.raw();
    s.write_all(b"{\"cmd\":\"subscribe\"}\n").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut r = BufReader::new(s);
    assert_eq!(read_lines(&mut r, 1)[0], "{\"ok\":true}\n");
    h.events.publish(Event::Reset {
        cause: ResetCause::Guest,
    });
    let line = read_lines(&mut r, 1).remove(0);
    assert!(
        line.starts_with("{\"event\":\"reset\",\"cause\":\"guest\""),
        "{line}"
    );
}

#[test]
fn fire_and_forget_requests_are_executed() {
    let h = Harness::start();
    let mut s = h.raw();
    s.write_all(b"{\"cmd\":\"reset\"}\n").unwrap();
    drop(s);
    wait_for("the reset", || {
        h.seen.lock().unwrap().contains(&Request::Reset)
    });
    wait_for("the connection to close", || h.stats().connections == 0);
}

#[test]
fn a_client_that_vanishes_before_its_deferred_answer_is_cleaned_up() {
    let h = Harness::start();
    let mut c = h.client();
    c.send(&Request::Shutdown {
        timeout_s: Some(200),
    })
    .unwrap();
    drop(c);
    wait_for("the connection to close", || h.stats().connections == 0);
    std::thread::sleep(Duration::from_millis(300));
    let mut c = h.client();
    c.request::<StatusInfo>(&Request::Status).unwrap();
}

#[test]
fn a_subscriber_that_never_reads_is_disconnected_without_blocking_anyone() {
    let h = Harness::start();
    let mut s = h.raw();
    s.write_all(b"{\"cmd\":\"subscribe\"}\n").unwrap();
    let mut ok = [0u8; 12];
    s.read_exact(&mut ok).unwrap();
    assert_eq!(&ok, b"{\"ok\":true}\n");
    // Publish in batches the loop can take (its own queue is bounded too), until the
    // subscriber's unsent backlog passes the cap.
    let start = Instant::now();
    let mut i = 0u64;
    while h.stats().slow_disconnects == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "never disconnected"
        );
        for _ in 0..1000 {
            h.events.publish(Event::Watchdog {
                action: protocol::WatchdogAction::None,
                expiries: i,
            });
            i += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        i * 100 > 1024 * 1024,
        "disconnected before the cap: {i} events"
    );
    let mut c = h.client();
    c.request::<StatusInfo>(&Request::Status).unwrap();
    wait_for("the slow subscriber to be dropped", || {
        h.stats().slow_disconnects == 1
    });
    // It got a prefix of the event stream, then EOF.
    let data = read_until_eof(s);
    assert!(data.starts_with(b"{\"event\":\"watchdog\""));
}

#[test]
fn console_round_trips_bytes_with_replay() {
    let h = Harness::start();
    h.hub().output(b"boot log\r\n");
    let mut s = h.raw();
    s.write_all(b"{\"cmd\":\"console\",\"replay\":true}\nearly")
        .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let reply = read_lines(&mut r, 1).remove(0);
    let ServerLine::Response(resp) = protocol::parse_response_line(&reply).unwrap() else {
        panic!("{reply}")
    };
    let attached: ConsoleAttached = resp.decode().unwrap();
    assert_eq!(attached.replay_bytes, 10);
    let mut replay = [0u8; 10];
    r.read_exact(&mut replay).unwrap();
    assert_eq!(&replay, b"boot log\r\n");

    h.hub().output(b"live \x00\xff bytes");
    let mut live = [0u8; 13];
    r.read_exact(&mut live).unwrap();
    assert_eq!(&live, b"live \x00\xff bytes");

    s.write_all(b" typed\n{\"cmd\":\"status\"}\n").unwrap();
    let mut input = Vec::new();
    let want: &[u8] = b"early typed\n{\"cmd\":\"status\"}\n";
    wait_for("console input", || {
        input.extend(h.hub().take_input(1000));
        input.len() >= want.len()
    });
    assert_eq!(input, want, "after the console reply, lines are raw input");
    assert!(h.seen.lock().unwrap().is_empty());
}

#[test]
fn several_consoles_at_once_all_see_the_output() {
    let h = Harness::start();
    let mut readers: Vec<_> = (0..5)
        .map(|_| {
            let mut s = h.raw();
            s.write_all(b"{\"cmd\":\"console\"}\n").unwrap();
            let mut r = BufReader::new(s);
            assert_eq!(
                read_lines(&mut r, 1)[0],
                "{\"ok\":true,\"replay_bytes\":0}\n"
            );
            r
        })
        .collect();
    h.hub().output(b"hello all");
    for r in &mut readers {
        let mut buf = [0u8; 9];
        r.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello all");
    }
}

#[test]
fn a_console_reader_that_never_reads_blocks_neither_output_nor_the_loop() {
    let h = Harness::start();
    let mut stuck = h.raw();
    stuck.write_all(b"{\"cmd\":\"console\"}\n").unwrap();
    let mut r = BufReader::new(stuck.try_clone().unwrap());
    assert_eq!(
        read_lines(&mut r, 1)[0],
        "{\"ok\":true,\"replay_bytes\":0}\n"
    );

    let hub = h.hub().clone();
    let start = Instant::now();
    let flood = std::thread::spawn(move || {
        let chunk = vec![b'z'; 4096];
        for _ in 0..(64 * 1024 * 1024 / 4096) {
            hub.output(&chunk);
        }
        hub.output(b"THE END");
    });
    // The loop stays responsive meanwhile.
    let mut c = h.client();
    for _ in 0..20 {
        let t = Instant::now();
        c.request::<StatusInfo>(&Request::Status).unwrap();
        assert!(t.elapsed() < Duration::from_secs(1));
    }
    flood.join().unwrap();
    assert!(start.elapsed() < Duration::from_secs(15), "output blocked");

    // The stuck reader lost its oldest bytes with a notice and still gets the end.
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    while !got.ends_with(b"THE END") {
        let n = r.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.contains("bytes of console output dropped]\r\n"),
        "no notice"
    );
    assert!(
        got.len() < 8 * 1024 * 1024,
        "backlog was not capped: {}",
        got.len()
    );
}

#[test]
fn log_returns_the_scrollback() {
    let h = Harness::start();
    h.hub().output(b"line one\r\nline two\r\n");
    let mut c = h.client();
    let log: LogInfo = c.request(&Request::Log { bytes: None }).unwrap();
    assert_eq!(log.data, "line one\r\nline two\r\n");
    assert_eq!((log.bytes, log.total_bytes), (20, 20));
    let tail: LogInfo = c.request(&Request::Log { bytes: Some(5) }).unwrap();
    assert_eq!(tail.data, "two\r\n");
}

#[test]
fn a_full_megabyte_log_is_delivered() {
    let h = Harness::start();
    let chunk: Vec<u8> = (0..1024u32).map(|i| b'a' + (i % 26) as u8).collect();
    for _ in 0..1024 {
        h.hub().output(&chunk);
    }
    let mut c = h.client();
    let log: LogInfo = c.request(&Request::Log { bytes: None }).unwrap();
    assert_eq!(log.bytes, 1024 * 1024);
    assert_eq!(log.data.len(), 1024 * 1024);
}

#[test]
fn clients_that_ask_for_logs_and_never_read_cannot_pin_unbounded_memory() {
    let h = Harness::start();
    // A megabyte of control characters: six bytes each in the JSON answer.
    for _ in 0..1024 {
        h.hub().output(&[1u8; 1024]);
    }
    let mut hogs = Vec::new();
    let mut refused = None;
    for _ in 0..8 {
        let mut s = h.raw();
        s.write_all(b"{\"cmd\":\"log\"}\n").unwrap();
        // The first byte of the answer: the server has handled this request.
        let mut first = [0u8; 1];
        s.read_exact(&mut first).unwrap();
        if first[0] == b'{' {
            let mut rest = [0u8; 11];
            s.read_exact(&mut rest).unwrap();
            if &rest == b"\"ok\":false," {
                let mut line = String::new();
                BufReader::new(&mut s).read_line(&mut line).unwrap();
                refused = Some(line);
                break;
            }
        }
        hogs.push(s);
    }
    let refused = refused.expect("every megabyte answer was queued");
    assert!(
        refused.contains("too much unread output on this VM's control socket"),
        "{refused}"
    );
    assert!(hogs.len() <= 3, "{} answers of 6 MiB queued", hogs.len());
    // Everything else is still answered, and once the hogs are gone, so is `log`.
    h.client().request::<StatusInfo>(&Request::Status).unwrap();
    drop(hogs);
    wait_for("the hogs' answers to be dropped", || {
        h.stats().connections == 0
    });
    let log: LogInfo = h.client().request(&Request::Log { bytes: None }).unwrap();
    assert_eq!(log.bytes, 1024 * 1024);
}

#[test]
fn console_and_log_without_a_console_are_errors() {
    let h = Harness::with(Options {
        console: false,
        ..Options::default()
    });
    let mut c = h.client();
    for r in [
        Request::Console { replay: false },
        Request::Log { bytes: None },
    ] {
        assert_eq!(
            c.call(&r).unwrap(),
            Response::Error(protocol::ControlError::new(
                protocol::ErrorCode::Unsupported,
                "this VM has no console"
            ))
        );
    }
    c.request::<StatusInfo>(&Request::Status).unwrap();
}

#[test]
fn connections_beyond_the_limit_are_refused_with_a_message() {
    let h = Harness::with(Options {
        limits: ControlLimits {
            max_connections: 2,
            ..ControlLimits::default()
        },
        ..Options::default()
    });
    let mut a = h.client();
    let mut b = h.client();
    a.request::<StatusInfo>(&Request::Status).unwrap();
    b.request::<StatusInfo>(&Request::Status).unwrap();
    let mut c = h.client();
    let err = c.request::<StatusInfo>(&Request::Status).unwrap_err();
    assert_eq!(
        err.to_string(),
        "too many connections to this VM; try again later"
    );
    drop(a);
    wait_for("a free slot", || h.stats().connections == 1);
    h.client().request::<StatusInfo>(&Request::Status).unwrap();
}

#[test]
fn socket_and_directory_get_their_modes_and_group() {
    let dir = TempDir::new();
    let path = dir.0.join("new-vm").join("control.sock");
    let events = EventBroadcaster::new("x");
    let mut policy = AccessPolicy::owner_only(0);
    policy.socket_gid = Some(65534);
    let handler = FakeHandler {
        seen: Arc::default(),
        events: events.clone(),
    };
    let server = ControlServer::new(
        ControlConfig::new(&path, policy),
        Box::new(handler),
        &events,
        None,
    )
    .unwrap();
    let d = std::fs::metadata(path.parent().unwrap()).unwrap();
    assert_eq!(d.mode() & 0o7777, DIR_MODE);
    let s = std::fs::symlink_metadata(&path).unwrap();
    assert_eq!(s.mode() & 0o7777, SOCKET_MODE);
    // SAFETY: trivial getter.
    if unsafe { libc::geteuid() } == 0 {
        assert_eq!((d.gid(), s.gid()), (65534, 65534));
    }
    drop(server);
    assert!(!path.exists(), "socket removed on drop");
    assert!(path.parent().unwrap().is_dir(), "directory kept");
}

fn fake_server(path: &Path) -> Result<ControlServer, ControlError> {
    let events = EventBroadcaster::new("x");
    let handler = FakeHandler {
        seen: Arc::default(),
        events: events.clone(),
    };
    ControlServer::new(
        ControlConfig::new(path, AccessPolicy::owner_only(0)),
        Box::new(handler),
        &events,
        None,
    )
}

#[test]
fn stale_socket_is_replaced_but_a_live_one_or_a_file_is_not() {
    let dir = TempDir::new();
    let path = dir.0.join("control.sock");
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists(), "a dead VMM's socket file");
    let live = fake_server(&path).unwrap();
    let err = fake_server(&path).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("another VMM is already listening on {}", path.display())
    );
    assert!(path.exists(), "the live socket is untouched");
    drop(live);

    let file = dir.0.join("not-a-socket");
    std::fs::write(&file, b"precious").unwrap();
    let err = fake_server(&file).unwrap_err();
    assert!(matches!(err, ControlError::NotASocket(_)), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
}

/// Runs `f` in a forked child that switched to `uid`/`gid` and returns what it wrote to
/// stdout-like pipe. The child only makes async-signal-safe calls.
fn as_other_user(uid: u32, gid: u32, socket: &Path, request: &[u8]) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: a zeroed sockaddr_un is valid; we fill family and path below.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = socket.as_os_str().as_bytes();
    assert!(bytes.len() < addr.sun_path.len());
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let mut fds = [0; 2];
    // SAFETY: pipe fills two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the child only calls async-signal-safe functions and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: child side of fork; raw syscalls on valid buffers; never returns.
        unsafe {
            libc::close(fds[0]);
            let fail = |code: u8| {
                libc::write(fds[1], [code].as_ptr().cast(), 1);
                libc::_exit(1)
            };
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                fail(b'U');
            }
            let sock = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            if sock < 0 {
                fail(b'S');
            }
            if libc::connect(
                sock,
                (&addr as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            ) != 0
            {
                fail(b'C');
            }
            libc::write(sock, request.as_ptr().cast(), request.len());
            let mut buf = [0u8; 4096];
            loop {
                let n = libc::read(sock, buf.as_mut_ptr().cast(), buf.len());
                if n <= 0 {
                    break;
                }
                libc::write(fds[1], buf.as_ptr().cast(), n as usize);
                if buf[..n as usize].contains(&b'\n') {
                    break;
                }
            }
            libc::_exit(0);
        }
    }
    // SAFETY: parent closes its copy of the write end.
    unsafe { libc::close(fds[1]) };
    // SAFETY: we own the read end.
    let mut out = std::fs::File::from(unsafe { std::os::fd::OwnedFd::from_raw_fd(fds[0]) });
    let mut got = Vec::new();
    out.read_to_end(&mut got).unwrap();
    let mut status = 0;
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if got == b"U" {
        return None; // no privilege to switch users here
    }
    Some(got)
}

#[test]
fn peers_outside_the_policy_are_refused_by_credentials() {
    // SAFETY: trivial getter.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to switch to another uid");
        return;
    }
    let h = Harness::with(Options {
        policy: AccessPolicy {
            owner_uid: 0,
            uids: vec![4001],
            gids: vec![4242],
            socket_gid: None,
        },
        ..Options::default()
    });
    // Let everyone through the file permissions so SO_PEERCRED is what decides.
    std::fs::set_permissions(&h.path, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(
        h.path.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let _ = &h.dir;

    let Some(refused) = as_other_user(65534, 65534, &h.path, b"{\"cmd\":\"status\"}\n") else {
        eprintln!("skipped: cannot setuid here");
        return;
    };
    assert_eq!(
        String::from_utf8_lossy(&refused),
        "{\"ok\":false,\"error\":\"permission denied: uid 65534 may not control this VM\",\"code\":\"forbidden\"}\n"
    );
    assert_eq!(h.stats().refused, 1);
    assert!(
        h.seen.lock().unwrap().is_empty(),
        "no request reached the handler"
    );

    let by_uid = as_other_user(4001, 65534, &h.path, b"{\"cmd\":\"status\"}\n").unwrap();
    assert!(by_uid.starts_with(b"{\"ok\":true,\"name\":\"test-vm\""));
    let by_gid = as_other_user(65534, 4242, &h.path, b"{\"cmd\":\"status\"}\n").unwrap();
    assert!(by_gid.starts_with(b"{\"ok\":true,\"name\":\"test-vm\""));
}

/// The `docs/protocol.md` socat examples, run against the real server (skipped without socat).
mod socat_examples {
    use super::*;
    use std::process::{Command, Stdio};

    fn have_socat() -> bool {
        Command::new("socat")
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn sh(script: &str, socket: &Path) -> String {
        let out = Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("S", socket)
            .output()
            .unwrap();
        assert!(out.status.success(), "{script}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn one_shot_requests_and_error_table() {
        if !have_socat() {
            eprintln!("skipped: socat not installed");
            return;
        }
        let h = Harness::start();
        let out = sh(
            r#"echo '{"cmd":"status"}' | socat - UNIX-CONNECT:$S"#,
            &h.path,
        );
        assert!(
            out.starts_with(r#"{"ok":true,"name":"test-vm","state":"running""#),
            "{out}"
        );

        let out = sh(
            r#"printf '%s\n' hello '[1]' '{}' '{"cmd":1}' '{"cmd":"x"}' '{"cmd":"set-kernel"}' '{"cmd":"reboot","timeout_s":"5"}' '{"cmd":"status","verbose":true}' | socat - UNIX-CONNECT:$S"#,
            &h.path,
        );
        let errors: Vec<String> = out.lines().map(error_of).collect();
        assert_eq!(
            errors,
            [
                "malformed JSON: expected value at line 1 column 1",
                "a request must be a JSON object like {\"cmd\":\"status\"}",
                "missing 'cmd' in request",
                "'cmd' must be a string",
                "unknown command 'x'",
                "missing argument 'name' for set-kernel",
                "invalid argument 'timeout_s' for reboot: expected an integer from 0 to 86400",
                "unknown argument 'verbose' for status",
            ]
        );
    }

    #[test]
    fn slow_answers_with_a_raised_timeout() {
        if !have_socat() {
            eprintln!("skipped: socat not installed");
            return;
        }
        let h = Harness::start();
        // The fake answers shutdown after `timeout_s` milliseconds: 1500 ms > socat's 0.5 s.
        let out = sh(
            r#"echo '{"cmd":"shutdown","timeout_s":1500}' | socat -t 60 - UNIX-CONNECT:$S"#,
            &h.path,
        );
        assert_eq!(
            out,
            "{\"ok\":true,\"result\":\"graceful\",\"elapsed_ms\":1500}\n"
        );
    }

    #[test]
    fn log_through_jq() {
        if !have_socat() || Command::new("jq").arg("--version").output().is_err() {
            eprintln!("skipped: socat or jq not installed");
            return;
        }
        let h = Harness::start();
        h.hub().output(b"Linux version 6.1\r\nlogin: ");
        let out = sh(
            r#"echo '{"cmd":"log","bytes":200}' | socat - UNIX-CONNECT:$S | jq -r .data"#,
            &h.path,
        );
        assert_eq!(out, "Linux version 6.1\r\nlogin: \n");
    }

    #[test]
    fn subscribe_and_console_streams_over_half_closed_socat() {
        if !have_socat() {
            eprintln!("skipped: socat not installed");
            return;
        }
        let h = Harness::start();
        for (request, expect_first) in [
            (r#"{"cmd":"subscribe"}"#, "{\"ok\":true}\n"),
            (
                r#"{"cmd":"console","replay":true}"#,
                // The subscribe round printed "guest output\n" already.
                "{\"ok\":true,\"replay_bytes\":13}\n",
            ),
        ] {
            let mut child = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "echo '{request}' | exec socat -t 1000000 - UNIX-CONNECT:$S"
                ))
                .env("S", &h.path)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut out = BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            assert_eq!(line, expect_first);
            // Well past socat's default 0.5 s: the stream must still be open.
            std::thread::sleep(Duration::from_millis(800));
            h.events.publish(Event::Reset {
                cause: ResetCause::Watchdog,
            });
            let console = request.contains("console");
            if console {
                line.clear();
                out.read_line(&mut line).unwrap();
                assert_eq!(line, "guest output\n", "the replay");
            }
            h.hub().output(if console {
                b"live output\n"
            } else {
                b"guest output\n"
            });
            line.clear();
            out.read_line(&mut line).unwrap();
            if !console {
                assert!(line.starts_with("{\"event\":\"reset\",\"cause\":\"watchdog\",\"vm\":\"test-vm\",\"time\":\""), "{line}");
            } else {
                assert_eq!(line, "live output\n");
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `status` round trips through the transport (fake handler): run with
/// `cargo test --release -p vmm --lib -- --ignored status_latency --nocapture`.
#[test]
#[ignore]
fn status_latency() {
    let h = Harness::start();
    for clients in [1usize, 50] {
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                let mut c = h.client();
                std::thread::spawn(move || {
                    let mut times = Vec::with_capacity(2000);
                    for _ in 0..2000 {
                        let t = Instant::now();
                        c.request::<StatusInfo>(&Request::Status).unwrap();
                        times.push(t.elapsed());
                    }
                    times
                })
            })
            .collect();
        let mut all: Vec<Duration> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        all.sort();
        let p = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
        eprintln!(
            "{clients} client(s): p50 {:?}, p99 {:?}, max {:?} over {} requests",
            p(0.50),
            p(0.99),
            all[all.len() - 1],
            all.len()
        );
    }
}
