//! The source of a live migration: see the module above. Runs on a thread
//! of its own, taking the VM's lock for each step; the answer to `migrate`
//! and the `migration` events go out from here.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use devices::bus::lock;
use devices::virtio::{CopyReader, CopySource, COPY_CHUNK};
use protocol::{ControlError, DiskMigration, ErrorCode, Event, MigrationInfo};
use vm_memory::{Bytes, GuestAddress};

use super::budget::Budget;
use super::flow::{cancelled, Flow};
use super::wire::{self, Hello, HelloDisk, Kind, MAX_RUN};
use super::{bits, region_offsets, PAGE};
use crate::runtime::SharedVm;
use crate::throttle::Converge;
use crate::vm::migration::Stopped;
use crate::vm::Publish;

/// Passes while the guest runs, at most (a guest writing faster than the
/// link copies never converges: it is then stopped for what is left).
const MAX_PASSES: u32 = 30;
/// How long the target may take to answer.
const ANSWER: Duration = Duration::from_secs(120);
/// The same, while the guest is stopped.
const FINAL: Duration = Duration::from_secs(30);
/// The most the guest stays stopped for the last pass, the state and the
/// target's rebuild, all together; past it the guest runs on here.
const FINAL_PHASE: Duration = Duration::from_secs(60);

/// A connection whose every read and write ends by `until` (a deadline for
/// a whole phase, where the socket's own timeouts are per call).
struct Timed<'a> {
    conn: &'a mut TcpStream,
    until: Instant,
}

impl Timed<'_> {
    fn left(&self) -> std::io::Result<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the guest was stopped for {} s, the most allowed",
                    FINAL_PHASE.as_secs()
                ),
            ));
        }
        Ok(left)
    }
}

impl Write for Timed<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let left = self.left()?;
        self.conn.set_write_timeout(Some(left))?;
        self.conn.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.conn.flush()
    }
}

impl std::io::Read for Timed<'_> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        let left = self.left()?;
        self.conn.set_read_timeout(Some(left))?;
        self.conn.read(b)
    }
}

fn err(code: ErrorCode, what: impl Into<String>) -> ControlError {
    ControlError::new(code, what.into())
}

fn io_err(what: &str) -> impl Fn(std::io::Error) -> ControlError + '_ {
    move |e| err(ErrorCode::HostError, format!("migration: {what}: {e}"))
}

fn wire_err(what: &str) -> impl Fn(wire::WireError) -> ControlError + '_ {
    move |e| err(ErrorCode::HostError, format!("migration: {what}: {e}"))
}

/// Checks `to` (an address, not a name: the confined VMM resolves none).
pub fn parse_target(to: &str) -> Result<SocketAddr, ControlError> {
    to.parse().map_err(|_| {
        ControlError::bad_request(format!(
            "'{to}': give the target as IP:PORT (e.g. 192.0.2.7:4444 or [2001:db8::7]:4444)"
        ))
    })
}

/// Sends the pages set in `dirty` (per region, bit i: page i); returns
/// the bytes sent.
fn send_pages(
    conn: &mut impl Write,
    mem: &devices::virtio::GuestMemoryMmap,
    dirty: &[Vec<u64>],
    buf: &mut [u8],
    flow: &mut Flow,
) -> Result<u64, ControlError> {
    let mut sent = 0u64;
    for ((start, len, file_off), words) in region_offsets(mem).into_iter().zip(dirty) {
        // Runs of dirty pages, at most MAX_RUN bytes each.
        for (first, pages) in bits::runs(words, len / PAGE, MAX_RUN as u64 / PAGE) {
            let n = (pages * PAGE) as usize;
            let run = &mut buf[..n];
            mem.read_slice(run, GuestAddress(start.0 + first * PAGE))
                .map_err(|e| err(ErrorCode::HostError, format!("reading guest memory: {e}")))?;
            let off = file_off + first * PAGE;
            flow.before_send(n as u64)?;
            wire::write_frame(conn, Kind::Pages, &[&off.to_le_bytes(), run])
                .map_err(io_err("sending memory"))?;
            sent += n as u64;
        }
    }
    Ok(sent)
}

/// Every page of `mem` that is not all zeros (the target's memory starts
/// zero): the first pass.
fn send_all(
    conn: &mut impl Write,
    mem: &devices::virtio::GuestMemoryMmap,
    buf: &mut [u8],
    flow: &mut Flow,
) -> Result<u64, ControlError> {
    let mut sent = 0u64;
    for (off, addr, n) in crate::snapshot::format::pieces(mem) {
        // Zero pieces send nothing: a cancel is looked for on each.
        flow.check()?;
        let piece = &mut buf[..n];
        mem.read_slice(piece, addr)
            .map_err(|e| err(ErrorCode::HostError, format!("reading guest memory: {e}")))?;
        if crate::snapshot::format::is_zero(piece) {
            continue;
        }
        flow.before_send(n as u64)?;
        wire::write_frame(conn, Kind::Pages, &[&off.to_le_bytes(), piece])
            .map_err(io_err("sending memory"))?;
        sent += n as u64;
    }
    Ok(sent)
}

/// The disks' readers, each with the disk's index.
type Readers = Vec<(u32, CopyReader)>;

/// What the passes while the guest ran leave: their count, the memory
/// sent, and the pages and disk chunks written during the last one.
type Precopied = (u32, u64, Vec<Vec<u64>>, Vec<Vec<u64>>);

fn disk_err(e: std::io::Error) -> ControlError {
    err(
        ErrorCode::HostError,
        format!("migration: reading a disk: {e}"),
    )
}

/// Sends `data` (read at `off` of disk `idx`) in runs of chunks that are
/// not all zeros (the target's image starts as zeros); returns the bytes
/// sent.
fn send_nonzero(
    conn: &mut impl Write,
    idx: u32,
    off: u64,
    data: &[u8],
    flow: &mut Flow,
) -> Result<u64, ControlError> {
    let mut sent = 0u64;
    let chunks: Vec<&[u8]> = data.chunks(COPY_CHUNK as usize).collect();
    let mut i = 0;
    while i < chunks.len() {
        if crate::snapshot::format::is_zero(chunks[i]) {
            i += 1;
            continue;
        }
        let first = i;
        while i < chunks.len() && !crate::snapshot::format::is_zero(chunks[i]) {
            i += 1;
        }
        let start = first * COPY_CHUNK as usize;
        let end = (start + (i - first) * COPY_CHUNK as usize).min(data.len());
        let at = off + start as u64;
        let run = &data[start..end];
        flow.before_send(run.len() as u64)?;
        wire::write_frame(
            conn,
            Kind::Disk,
            &[&idx.to_le_bytes(), &at.to_le_bytes(), run],
        )
        .map_err(io_err("sending a disk"))?;
        sent += run.len() as u64;
    }
    Ok(sent)
}

/// The first pass over the disks: everything that holds data (holes and
/// chunks of zeros are skipped).
fn send_disks_all(
    conn: &mut impl Write,
    readers: &mut Readers,
    flow: &mut Flow,
) -> Result<u64, ControlError> {
    let mut sent = 0u64;
    for (idx, r) in readers.iter_mut() {
        let size = r.size();
        let mut off = 0u64;
        while off < size {
            flow.check()?;
            let data = r.next_data(off).map_err(disk_err)?;
            if data >= size {
                break;
            }
            let start = (data / COPY_CHUNK * COPY_CHUNK).max(off);
            let n = (r.max() as u64).min(size - start) as usize;
            let bytes = r.read(start, n).map_err(disk_err)?;
            sent += send_nonzero(conn, *idx, start, bytes, flow)?;
            off = start + n as u64;
        }
    }
    Ok(sent)
}

/// The disks' chunks written since the last look (one bitmap per reader).
fn disk_dirty(disks: &[(u32, CopySource)]) -> Vec<Vec<u64>> {
    disks.iter().map(|(_, d)| d.log().take()).collect()
}

/// Sends the chunks set in `dirty` (one bitmap per reader), zeros too.
fn send_disk_chunks(
    conn: &mut impl Write,
    readers: &mut Readers,
    dirty: &[Vec<u64>],
    flow: &mut Flow,
) -> Result<u64, ControlError> {
    let mut sent = 0u64;
    for ((idx, r), words) in readers.iter_mut().zip(dirty) {
        let size = r.size();
        let runs = bits::runs(
            words,
            size.div_ceil(COPY_CHUNK),
            MAX_RUN as u64 / COPY_CHUNK,
        );
        for (first, chunks) in runs {
            let off = first * COPY_CHUNK;
            let n = (chunks * COPY_CHUNK).min(size - off) as usize;
            let bytes = r.read(off, n).map_err(disk_err)?;
            flow.before_send(n as u64)?;
            wire::write_frame(
                conn,
                Kind::Disk,
                &[&idx.to_le_bytes(), &off.to_le_bytes(), bytes],
            )
            .map_err(io_err("sending a disk"))?;
            sent += n as u64;
        }
    }
    Ok(sent)
}

/// Connects, greets and is accepted by the target; from the connection
/// on, a cancel shuts it down.
fn connect(to: SocketAddr, hello: &Hello, flow: &Flow) -> Result<TcpStream, ControlError> {
    let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(10))
        .map_err(io_err(&format!("cannot reach {to}")))?;
    flow.watch(&conn);
    let _ = conn.set_nodelay(true);
    conn.set_read_timeout(Some(ANSWER))
        .map_err(io_err("socket"))?;
    conn.set_write_timeout(Some(ANSWER))
        .map_err(io_err("socket"))?;
    let hello_json = serde_json::to_vec(hello)
        .map_err(|e| err(ErrorCode::Internal, format!("migration: {e}")))?;
    wire::write_greeting(&mut conn).map_err(io_err("greeting"))?;
    wire::write_frame(&mut conn, Kind::Hello, &[&hello_json]).map_err(io_err("greeting"))?;
    let mut inbuf = Vec::new();
    wire::expect(&mut conn, &mut inbuf, Kind::Accepted).map_err(wire_err("the target refused"))?;
    Ok(conn)
}

/// What `migrate` asked for besides the target and the pace.
pub struct How {
    pub disks: DiskMigration,
    /// Throttle the vCPUs while the copy falls behind ([`crate::throttle`]).
    pub auto_converge: bool,
    /// How long the guest may stand stopped for the last pass
    /// ([`super::budget`]).
    pub downtime: Duration,
}

/// Runs a migration to `to` to its end, its copy paced and called off as
/// `flow` says while the guest runs; the answer for `migrate`.
pub fn run(
    vm: SharedVm,
    to: SocketAddr,
    token: String,
    how: How,
    mut flow: Flow,
    publish: Publish,
) -> Result<MigrationInfo, ControlError> {
    let t0 = Instant::now();
    let copy = how.disks == DiskMigration::Copy;
    let hello = {
        let mut v = lock(&vm);
        if copy {
            // Before the target empties its images: a log that cannot be
            // allocated refuses the copy here, not half way (logging starts
            // with the first pass).
            let checked = v.disks_to_copy().and_then(|d| {
                d.iter().try_for_each(|(_, c)| {
                    c.log()
                        .prepare()
                        .map(|_| ())
                        .map_err(|e| err(ErrorCode::HostError, format!("cannot copy a disk: {e}")))
                })
            });
            if let Err(e) = checked {
                v.migration_abort(None);
                return Err(e);
            }
        }
        Hello {
            token,
            name: v.config.name.clone(),
            mem_mib: v.config.mem_mib,
            vcpus: v.config.vcpus,
            virtio: v.virtio_count(),
            disks: copy.then(|| {
                v.disks
                    .iter()
                    .map(|d| HelloDisk {
                        size: d.copy.size(),
                        copied: !d.read_only,
                    })
                    .collect()
            }),
        }
    };
    let connected = connect(to, &hello, &flow).and_then(|c| {
        // Called off while it connected: nothing has begun.
        flow.check().map(|()| c)
    });
    let mut conn = match connected {
        Ok(c) => c,
        Err(e) => {
            lock(&vm).migration_abort(None);
            let e = flow.or_cancelled(e);
            return Err(e);
        }
    };
    // Bound first: the guard of a `match` on `lock(..)` would live through
    // its arms, which lock again.
    let begun = lock(&vm).migration_begin(copy);
    let started = match begun {
        Ok(s) => s,
        Err(e) => {
            lock(&vm).migration_abort(None);
            give_up(&mut conn, &e.message);
            return Err(e);
        }
    };
    let mut buf = vec![0u8; MAX_RUN];
    let mut readers: Readers = started
        .disks
        .iter()
        .map(|(i, d)| (*i, d.reader(MAX_RUN)))
        .collect();
    let mut disk_bytes = 0u64;
    let mut converge = Converge::default();
    let mut budget = Budget::new(how.downtime);
    // The most the vCPUs were throttled (what held, not what was asked).
    let mut peak = 0u8;
    // Memory and disks, pass after pass: what each pass leaves (memory
    // pages, disk chunks) goes in the next.
    let mut precopy = |conn: &mut TcpStream,
                       buf: &mut [u8],
                       readers: &mut Readers,
                       flow: &mut Flow|
     -> Result<Precopied, ControlError> {
        let mut pass = 1u32;
        let mut t = Instant::now();
        let mut sent = send_all(conn, &started.mem, buf, flow)?;
        let mut total = sent;
        let on_disk = send_disks_all(conn, readers, flow)?;
        disk_bytes += on_disk;
        sent += on_disk;
        let mut throttle = 0u8;
        loop {
            // Wall time from one look at the dirty log to the next: the
            // look itself, the pacing's wait before the pass (the pacer
            // charges a frame's time to the send after it) and the sends
            // (QEMU measures its rate between its looks the same way).
            let now = Instant::now();
            let took = now.duration_since(t);
            t = now;
            budget.measured(sent, took);
            let dirty = lock(&vm).migration_dirty(started.boot_count)?;
            let disk = disk_dirty(&started.disks);
            let left = bits::count(&dirty) * PAGE + bits::count(&disk) * COPY_CHUNK;
            let stop_at = budget.stop_at();
            let last = left <= stop_at || pass >= MAX_PASSES;
            if how.auto_converge && !last {
                let want = converge.after_pass(sent, left, stop_at);
                if want != throttle {
                    throttle = lock(&vm).migration_throttle(started.boot_count, want)?;
                    peak = peak.max(throttle);
                }
            }
            publish(Event::Migration {
                pass,
                sent_bytes: sent,
                dirty_bytes: left,
                pass_ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
                throttle_pct: throttle,
            });
            if last {
                return Ok((pass, total, dirty, disk));
            }
            // Called off between passes too (a pass may send nothing).
            flow.before_send(0)?;
            pass += 1;
            sent = send_pages(conn, &started.mem, &dirty, buf, flow)?;
            total += sent;
            let on_disk = send_disk_chunks(conn, readers, &disk, flow)?;
            disk_bytes += on_disk;
            sent += on_disk;
        }
    };
    let copied = precopy(&mut conn, &mut buf, &mut readers, &mut flow);
    let (passes, mut memory_bytes, pending, pending_disk) = match copied {
        Ok(r) => r,
        Err(e) => {
            // A cancel shut the connection down: the error is its.
            let e = flow.or_cancelled(e);
            lock(&vm).migration_abort(None);
            give_up(&mut conn, &e.message);
            return Err(e);
        }
    };

    // The last pass: the guest stops; the VM's lock is held to the end,
    // and every send or answer now has a shorter limit (the guest, the
    // control socket and the console wait meanwhile).
    let _ = conn.set_read_timeout(Some(FINAL));
    let _ = conn.set_write_timeout(Some(FINAL));
    let mut g = lock(&vm);
    // A cancel that came after the last running pass, before this lock:
    // the guest has not stopped yet, so it still counts.
    if flow.is_cancelled() {
        g.migration_abort(None);
        drop(g);
        let e = cancelled();
        give_up(&mut conn, &e.message);
        return Err(e);
    }
    let stopped = match g.migration_stop(started.boot_count) {
        Ok(s) => s,
        Err(e) => {
            g.migration_abort(None);
            drop(g);
            give_up(&mut conn, &e.message);
            return Err(e);
        }
    };
    let finish = |g: &mut crate::vm::Vm,
                  conn: &mut TcpStream,
                  stopped: &Stopped,
                  buf: &mut [u8],
                  readers: &mut Readers|
     -> Result<(u64, u64), ControlError> {
        // What the devices wrote while they finished their requests, and
        // what was left from the running passes; up to the target's
        // rebuild, all within one deadline.
        let mut t = Timed {
            conn: &mut *conn,
            until: stopped.at + FINAL_PHASE,
        };
        // Downtime: neither paced nor to be called off.
        let mut flat_out = Flow::unlimited();
        let mut dirty = g.migration_dirty(started.boot_count)?;
        bits::or_into(&mut dirty, &pending);
        let last = send_pages(&mut t, &started.mem, &dirty, buf, &mut flat_out)?;
        let mut disk = disk_dirty(&started.disks);
        bits::or_into(&mut disk, &pending_disk);
        let last_disk = send_disk_chunks(&mut t, readers, &disk, &mut flat_out)?;
        let state = serde_json::to_vec(&stopped.captured.snapshot)
            .map_err(|e| err(ErrorCode::Internal, format!("migration: the state: {e}")))?;
        wire::write_frame(&mut t, Kind::State, &[&state]).map_err(io_err("sending the state"))?;
        let mut inbuf = Vec::new();
        wire::expect(&mut t, &mut inbuf, Kind::Restored)
            .map_err(wire_err("the target did not rebuild the machine"))?;
        let _ = conn.set_read_timeout(Some(FINAL));
        let _ = conn.set_write_timeout(Some(FINAL));
        // Shared storage: the target takes the images' locks; copied
        // disks are the target's own images, and these stay locked here.
        if !copy {
            g.release_images()?;
        }
        if let Err(e) = wire::write_frame(conn, Kind::Go, &[]).and_then(|()| conn.flush()) {
            // The target never heard it: it will not run the guest.
            if !copy {
                take_back(g)?;
            }
            return Err(io_err("the go-ahead")(e));
        }
        // The target takes the disks' locks and says it runs the guest.
        match wire::expect(conn, &mut inbuf, Kind::Running) {
            Ok(()) => Ok((last, last_disk)),
            Err(wire::WireError::Peer(why)) => {
                // It refused to run it (and let go of the disks): it runs
                // here again.
                if !copy {
                    take_back(g)?;
                }
                Err(err(
                    ErrorCode::HostError,
                    format!("migration: the target did not run the guest: {why}"),
                ))
            }
            Err(e) => Err(unknown(e)),
        }
    };
    match finish(&mut g, &mut conn, &stopped, &mut buf, &mut readers) {
        Err(e) if e.message.starts_with(UNKNOWN) => {
            // The target may run the guest or not: neither resume it here
            // nor let it be started again (two guests on one disk would
            // be worse than none); the operator looks at the target.
            g.migration_unknown();
            Err(e)
        }
        Ok((last, last_disk)) => {
            memory_bytes += last;
            disk_bytes += last_disk;
            let downtime = stopped.at.elapsed();
            g.migration_done();
            drop(g);
            Ok(MigrationInfo {
                to: to.to_string(),
                total_ms: u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
                downtime_ms: u64::try_from(downtime.as_millis()).unwrap_or(u64::MAX),
                passes,
                memory_bytes,
                last_pass_bytes: last,
                disk_bytes,
                throttle_pct: peak,
            })
        }
        Err(e) => {
            g.migration_abort(Some(stopped));
            drop(g);
            give_up(&mut conn, &e.message);
            Err(e)
        }
    }
}

const UNKNOWN: &str = "migration: outcome unknown";

fn unknown(e: wire::WireError) -> ControlError {
    err(
        ErrorCode::HostError,
        format!(
            "{UNKNOWN}: the target was told to run the guest but did not confirm ({e}); \
             this VM stays stopped and will not start here: check the target"
        ),
    )
}

/// Takes the disks' locks back after the go-ahead came to nothing; if
/// that fails, someone else has a disk: the guest must not run here
/// either (the unknown outcome's path).
fn take_back(g: &mut crate::vm::Vm) -> Result<(), ControlError> {
    g.acquire_images().map_err(|e| {
        err(
            ErrorCode::HostError,
            format!(
                "{UNKNOWN}: the target did not run the guest, and this VMM cannot take its \
                 disks back ({}); this VM stays stopped",
                e.message
            ),
        )
    })
}

/// Tells the target why, without holding anything (the guest runs again
/// first): a short limit, then the connection is closed.
fn give_up(conn: &mut TcpStream, why: &str) {
    let _ = conn.set_write_timeout(Some(Duration::from_secs(2)));
    wire::send_error(conn, why);
    let _ = conn.shutdown(std::net::Shutdown::Both);
}

/// The process ends once the answer is out: its guest runs elsewhere, and
/// its disks are the target's now.
pub fn end_process() {
    // SAFETY: raising a signal at our own process touches no memory; the
    // VMM's SIGTERM handler ends it as `systemctl stop` would (the guest is
    // powered off already, so at once).
    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
}
