//! The target of a live migration (`--incoming HOST:PORT`): see the module
//! above. Runs at start-up, before the VMM confines itself, on the only
//! thread; hands the received machine to the first "boot" as a
//! [`RestoreSource`], which finishes the handshake (`Restored`, `Go`).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::region_offsets;
use super::wire::{self, Hello, HelloDisk, Kind, WireError};
use crate::config::VmConfig;
use crate::snapshot::{RestoreSource, VmSnapshot};

/// How long the source may stay silent before the target gives up on it
/// (and listens again).
const SILENCE: Duration = Duration::from_secs(120);
/// How long a connection may take over each read of its greeting and hello.
const HELLO: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("--incoming {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// What the machine must be for a migration to land here.
pub struct Expect<'a> {
    pub token: &'a str,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub virtio: usize,
    /// The VM's disks here, in order (a `"disks":"copy"` migration writes
    /// into the writable ones).
    pub disks: Vec<TargetDisk>,
}

/// A disk of the target's VM, as a copy needs it.
pub struct TargetDisk {
    pub path: PathBuf,
    pub read_only: bool,
    /// The guest's capacity, in bytes.
    pub size: u64,
    /// The device's image lock, taken for the copy (so that a source on
    /// the same image, on shared storage, is refused); `None` in tests.
    pub lock: Option<devices::virtio::ImageLock>,
}

/// The images a copy writes into, locked until the machine is received;
/// any failure before lets go of the locks.
struct Copies<'a> {
    disks: Vec<Option<Copy<'a>>>,
    keep: bool,
}

/// One image being written.
struct Copy<'a> {
    file: File,
    disk: &'a TargetDisk,
    /// Written since the last sync.
    unsynced: u64,
}

/// Written data is synced every this many bytes, so that the last sync
/// (before `Restored`, while the guest is stopped) is short.
const SYNC_EVERY: u64 = 256 << 20;

impl Drop for Copies<'_> {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        for c in self.disks.iter().flatten() {
            if let Some(l) = &c.disk.lock {
                let _ = l.release();
            }
        }
    }
}

fn refused(why: String) -> TargetError {
    TargetError::Refused(why)
}

/// Checks the source's disks against ours, locks and empties the images
/// the copy writes into (its first pass skips what is zero).
fn prepare_copies<'a>(
    here: &'a [TargetDisk],
    there: &[HelloDisk],
) -> Result<Copies<'a>, TargetError> {
    if here.len() != there.len() {
        return Err(refused(format!(
            "{} disks to copy (here: {})",
            there.len(),
            here.len()
        )));
    }
    let mut copies = Copies {
        disks: Vec::new(),
        keep: false,
    };
    for (i, (t, s)) in here.iter().zip(there).enumerate() {
        let p = t.path.display();
        if !s.copied {
            // Read-only there: it must be read-only here too (the
            // target's own copy of it serves).
            if !t.read_only {
                return Err(refused(format!(
                    "disk{i} is read-only at the source and {p} is writable here"
                )));
            }
            copies.disks.push(None);
            continue;
        }
        if t.read_only {
            return Err(refused(format!(
                "disk{i} ({p}) is read-only here: it cannot take a copy"
            )));
        }
        if t.size != s.size {
            return Err(refused(format!(
                "disk{i} is {} bytes, {p} here is {} bytes: the copy needs an image of the same size",
                s.size, t.size
            )));
        }
        if let Some(l) = &t.lock {
            l.acquire().map_err(|e| {
                refused(format!(
                    "{e}: with \"disks\":\"copy\" the target needs an image of its own"
                ))
            })?;
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&t.path);
        let f = match f {
            // The path may name another file than the device's by now.
            Ok(f) if t.lock.as_ref().is_none_or(|l| l.same_file(&f)) => Ok(f),
            Ok(_) => Err(format!("{p} is no longer the image this VMM opened")),
            Err(e) => Err(format!("{p}: {e}")),
        };
        let f = match f {
            Ok(f) => f,
            Err(e) => {
                // Locked above but not in `copies` yet.
                if let Some(l) = &t.lock {
                    let _ = l.release();
                }
                return Err(refused(e));
            }
        };
        copies.disks.push(Some(Copy {
            file: f,
            disk: t,
            unsynced: 0,
        }));
        let Some(Some(c)) = copies.disks.last() else {
            continue;
        };
        empty(&c.file).map_err(|e| refused(format!("cannot empty {p} for the copy: {e}")))?;
    }
    Ok(copies)
}

/// Makes an image all zeros, keeping its size (and a file's
/// preallocation where the file system punches holes): its blocks are
/// punched out; where that is not supported, a file is cut to nothing and
/// grown back, and a block device has its range zeroed.
fn empty(f: &File) -> std::io::Result<()> {
    let meta = f.metadata()?;
    let size = {
        use std::io::{Seek, SeekFrom};
        let mut g = f;
        g.seek(SeekFrom::End(0))?
    };
    let n = libc::off_t::try_from(size).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let fallocate = |mode: libc::c_int| {
        // SAFETY: fallocate on a descriptor we own, inside its size; it
        // touches no memory of ours.
        if unsafe { libc::fallocate(f.as_raw_fd(), mode, 0, n) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    match fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            if meta.is_file() {
                f.set_len(0)?;
                f.set_len(size)
            } else {
                fallocate(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
            }
        }
        r => r,
    }
}

/// A run of a disk: written into its image, if it lies inside it.
fn write_disk_run(copies: &mut Copies, payload: &[u8]) -> Result<(), TargetError> {
    let bad = || refused("a disk run outside the disks copied".to_string());
    let (idx, rest) = payload.split_at_checked(4).ok_or_else(bad)?;
    let (off, data) = rest.split_at_checked(8).ok_or_else(bad)?;
    let idx = u32::from_le_bytes(idx.try_into().map_err(|_| bad())?);
    let off = u64::from_le_bytes(off.try_into().map_err(|_| bad())?);
    let Some(Some(c)) = copies.disks.get_mut(idx as usize) else {
        return Err(refused(format!("a run of disk{idx}, which is not copied")));
    };
    let d = c.disk;
    if off
        .checked_add(data.len() as u64)
        .is_none_or(|e| e > d.size)
    {
        return Err(refused(format!(
            "a run of disk{idx} at {off:#x} of {} bytes lies outside it",
            data.len()
        )));
    }
    c.file
        .write_all_at(data, off)
        .map_err(|e| refused(format!("writing {}: {e}", d.path.display())))?;
    c.unsynced += data.len() as u64;
    if c.unsynced >= SYNC_EVERY {
        c.unsynced = 0;
        c.file
            .sync_data()
            .map_err(|e| refused(format!("syncing {}: {e}", d.path.display())))?;
    }
    Ok(())
}

/// Listens on `addr` until a source sends a whole machine; a connection
/// that is refused or breaks off is logged and the next one is waited for.
pub fn receive(
    config: &VmConfig,
    addr: &str,
    expect: &Expect,
) -> Result<RestoreSource, TargetError> {
    let listener = TcpListener::bind(addr).map_err(|source| TargetError::Listen {
        addr: addr.to_string(),
        source,
    })?;
    tracing::info!("waiting for a migration of {} on {addr}", config.name);
    loop {
        let (mut conn, peer) = listener.accept().map_err(|source| TargetError::Listen {
            addr: addr.to_string(),
            source,
        })?;
        match serve(&mut conn, peer, expect) {
            Ok((snapshot, mem)) => {
                return Ok(RestoreSource::received(
                    PathBuf::from(format!("migration from {peer}")),
                    snapshot,
                    mem,
                    conn,
                ));
            }
            Err(e) => {
                tracing::warn!("migration from {peer} refused or broken off: {e}");
                eprintln!("vmm: migration from {peer} refused or broken off: {e}");
                wire::send_error(&mut conn, &e.to_string());
            }
        }
    }
}

fn serve(
    conn: &mut TcpStream,
    peer: SocketAddr,
    expect: &Expect,
) -> Result<(VmSnapshot, devices::virtio::GuestMemoryMmap), TargetError> {
    // Set now: the confined VMM may not set socket options. A stranger
    // gets little time to say who it is.
    conn.set_read_timeout(Some(HELLO))
        .and_then(|()| conn.set_write_timeout(Some(HELLO)))
        .map_err(|e| TargetError::Wire(e.into()))?;
    let _ = conn.set_nodelay(true);
    serve_stream(conn, &peer.to_string(), expect, |c| {
        let _ = c.set_read_timeout(Some(SILENCE));
        let _ = c.set_write_timeout(Some(SILENCE));
    })
}

/// The target's side of the stream up to the machine's state, over any
/// byte stream (`fuzz/fuzz_targets/migration_stream.rs` feeds it hostile
/// bytes): the greeting, the hello checked (token first, then the
/// machine's shape) before any guest memory is allocated, then page runs
/// that must each lie inside one memory region, then the state.
pub fn serve_stream<S: Read + Write>(
    conn: &mut S,
    peer: &str,
    expect: &Expect,
    on_accepted: impl FnOnce(&mut S),
) -> Result<(VmSnapshot, devices::virtio::GuestMemoryMmap), TargetError> {
    wire::read_greeting(conn)?;
    let mut buf = Vec::new();
    wire::expect(conn, &mut buf, Kind::Hello)?;
    let hello: Hello = serde_json::from_slice(&buf)
        .map_err(|e| TargetError::Refused(format!("unreadable hello: {e}")))?;
    if !wire::token_matches(&hello.token, expect.token) {
        return Err(TargetError::Refused(format!("{peer}: wrong token")));
    }
    let mut wrong = Vec::new();
    if hello.mem_mib != expect.mem_mib {
        wrong.push(format!(
            "memory {} MiB (here: {})",
            hello.mem_mib, expect.mem_mib
        ));
    }
    if hello.vcpus != expect.vcpus {
        wrong.push(format!("{} vCPUs (here: {})", hello.vcpus, expect.vcpus));
    }
    if hello.virtio != expect.virtio {
        wrong.push(format!(
            "{} virtio devices (here: {})",
            hello.virtio, expect.virtio
        ));
    }
    if !wrong.is_empty() {
        return Err(TargetError::Refused(format!(
            "{} is another machine: {}",
            hello.name,
            wrong.join(", ")
        )));
    }
    let mut copies = match &hello.disks {
        Some(there) => prepare_copies(&expect.disks, there)?,
        None => Copies {
            disks: Vec::new(),
            keep: false,
        },
    };
    let mem = crate::machine::guest_memory(expect.mem_mib)
        .map_err(|e| TargetError::Refused(e.to_string()))?;
    let regions = region_offsets(&mem);
    let total: u64 = regions.iter().map(|r| r.1).sum();
    wire::write_frame(conn, Kind::Accepted, &[]).map_err(WireError::from)?;
    on_accepted(conn);
    loop {
        match wire::read_frame(conn, &mut buf)? {
            Kind::Pages => {
                let (off, data) = buf.split_at(8.min(buf.len()));
                let off = u64::from_le_bytes(off.try_into().unwrap_or([0xff; 8]));
                let end = off.checked_add(data.len() as u64).filter(|&e| e <= total);
                // The run must lie in one region (the source never sends
                // one across two).
                let at = regions
                    .iter()
                    .find(|(_, len, base)| off >= *base && end.is_some_and(|e| e <= base + len));
                let (Some(_), Some((start, _, base))) = (end, at) else {
                    return Err(TargetError::Refused(format!(
                        "a page run at {off:#x} of {} bytes lies outside the guest's memory",
                        data.len()
                    )));
                };
                mem.write_slice(data, GuestAddress(start.0 + (off - base)))
                    .map_err(|e| TargetError::Refused(format!("guest memory: {e}")))?;
            }
            Kind::Disk => write_disk_run(&mut copies, &buf)?,
            Kind::State => {
                let snapshot: VmSnapshot = serde_json::from_slice(&buf)
                    .map_err(|e| TargetError::Refused(format!("unreadable state: {e}")))?;
                // The copies are whole: on the disk before the source
                // lets go of the guest.
                for c in copies.disks.iter().flatten() {
                    c.file.sync_all().map_err(|e| {
                        refused(format!("cannot sync {}: {e}", c.disk.path.display()))
                    })?;
                }
                copies.keep = true;
                return Ok((snapshot, mem));
            }
            other => {
                return Err(TargetError::Wire(WireError::Unexpected {
                    expected: Kind::State,
                    got: other,
                }))
            }
        }
    }
}

/// After the machine is rebuilt (vCPUs parked, devices checked but not
/// started): tells the source, and waits for its go-ahead. An error means
/// the guest must not run here.
pub fn handshake(conn: &mut TcpStream) -> Result<(), WireError> {
    wire::write_frame(conn, Kind::Restored, &[])?;
    let mut buf = Vec::new();
    wire::expect(conn, &mut buf, Kind::Go)
}

/// The disks are locked here and the guest is about to run: the source
/// may end. (If it never hears this, it stays stopped rather than guess.)
pub fn running(conn: &mut TcpStream) -> Result<(), WireError> {
    wire::write_frame(conn, Kind::Running, &[])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    const TOKEN: &str = "0123456789abcdef-token";

    /// What a source would send: the greeting, a hello, then `frames`.
    fn stream(token: &str, mem_mib: u64, frames: &[(Kind, Vec<u8>)]) -> Vec<u8> {
        stream_with_disks(token, mem_mib, None, frames)
    }

    fn stream_with_disks(
        token: &str,
        mem_mib: u64,
        disks: Option<Vec<HelloDisk>>,
        frames: &[(Kind, Vec<u8>)],
    ) -> Vec<u8> {
        let mut out = Vec::new();
        wire::write_greeting(&mut out).unwrap();
        let hello = Hello {
            token: token.into(),
            name: "web1".into(),
            mem_mib,
            vcpus: 1,
            virtio: 0,
            disks,
        };
        wire::write_frame(
            &mut out,
            Kind::Hello,
            &[&serde_json::to_vec(&hello).unwrap()],
        )
        .unwrap();
        for (k, p) in frames {
            wire::write_frame(&mut out, *k, &[p]).unwrap();
        }
        out
    }

    /// A connection: reads from `input`, keeps what is written.
    struct Conn {
        input: Cursor<Vec<u8>>,
        sent: Vec<u8>,
    }

    impl Read for Conn {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(b)
        }
    }

    impl Write for Conn {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.sent.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn serve_bytes(bytes: Vec<u8>) -> (Served, Vec<u8>) {
        serve_bytes_to(bytes, Vec::new())
    }

    fn serve_bytes_to(bytes: Vec<u8>, disks: Vec<TargetDisk>) -> (Served, Vec<u8>) {
        let mut c = Conn {
            input: Cursor::new(bytes),
            sent: Vec::new(),
        };
        let expect = Expect {
            token: TOKEN,
            mem_mib: 4,
            vcpus: 1,
            virtio: 0,
            disks,
        };
        let r = serve_stream(&mut c, "test", &expect, |_| {});
        (r, c.sent)
    }

    type Served = Result<(VmSnapshot, devices::virtio::GuestMemoryMmap), TargetError>;

    fn err_of(r: Served) -> String {
        match r {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

    fn page(off: u64, data: &[u8]) -> (Kind, Vec<u8>) {
        let mut p = off.to_le_bytes().to_vec();
        p.extend_from_slice(data);
        (Kind::Pages, p)
    }

    #[test]
    fn a_wrong_token_is_refused_before_anything_is_accepted() {
        let (r, sent) = serve_bytes(stream("someone-else-entirely", 4, &[]));
        assert!(err_of(r).contains("wrong token"));
        assert!(sent.is_empty(), "no Accepted for a stranger");
    }

    #[test]
    fn another_machine_is_refused_naming_what_differs() {
        let (r, _) = serve_bytes(stream(TOKEN, 8, &[]));
        let e = err_of(r);
        assert!(e.contains("memory 8 MiB (here: 4)"), "{e}");
    }

    #[test]
    fn a_page_run_outside_the_guests_memory_is_refused() {
        for (off, len) in [(4 << 20, 1usize), ((4 << 20) - 2, 4), (u64::MAX - 1, 4)] {
            let (r, sent) = serve_bytes(stream(TOKEN, 4, &[page(off, &vec![1u8; len])]));
            let e = err_of(r);
            assert!(e.contains("outside the guest's memory"), "{off:#x}: {e}");
            assert_eq!(sent[0], Kind::Accepted as u8, "accepted before the pages");
        }
    }

    #[test]
    fn pages_land_in_guest_memory_and_an_unreadable_state_is_refused() {
        let (r, _) = serve_bytes(stream(
            TOKEN,
            4,
            &[page(0x1000, b"hello"), (Kind::State, b"{not json".to_vec())],
        ));
        assert!(err_of(r).contains("unreadable state"));
    }

    /// A 1 MiB image full of 0xee (what the target's image held before).
    fn image(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("vmm-target-{name}-{}", std::process::id()));
        std::fs::write(&p, vec![0xeeu8; 1 << 20]).unwrap();
        p
    }

    fn disk(path: &std::path::Path, read_only: bool) -> TargetDisk {
        TargetDisk {
            path: path.to_path_buf(),
            read_only,
            size: 1 << 20,
            lock: None,
        }
    }

    fn run(idx: u32, off: u64, data: &[u8]) -> (Kind, Vec<u8>) {
        let mut p = idx.to_le_bytes().to_vec();
        p.extend_from_slice(&off.to_le_bytes());
        p.extend_from_slice(data);
        (Kind::Disk, p)
    }

    fn copied(size: u64) -> Option<Vec<HelloDisk>> {
        Some(vec![HelloDisk { size, copied: true }])
    }

    #[test]
    fn a_copied_disk_lands_in_the_targets_image_and_the_rest_of_it_reads_as_zeros() {
        let p = image("copy");
        let frames = [
            run(0, 0x1_0000, b"the guest's data"),
            (Kind::State, b"{not json".to_vec()),
        ];
        let (r, _) = serve_bytes_to(
            stream_with_disks(TOKEN, 4, copied(1 << 20), &frames),
            vec![disk(&p, false)],
        );
        // The state is refused, but the run was written before.
        assert!(err_of(r).contains("unreadable state"));
        let img = std::fs::read(&p).unwrap();
        assert_eq!(img.len(), 1 << 20, "the image keeps its size");
        assert_eq!(&img[0x1_0000..0x1_0010], b"the guest's data");
        assert!(
            img[..0x1_0000].iter().all(|&b| b == 0),
            "emptied before the copy"
        );
        assert!(img[0x1_0010..].iter().all(|&b| b == 0));
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn a_copy_into_a_read_only_or_other_sized_image_or_outside_it_is_refused() {
        let p = image("refuse");
        let (r, sent) = serve_bytes_to(
            stream_with_disks(TOKEN, 4, copied(2 << 20), &[]),
            vec![disk(&p, false)],
        );
        let e = err_of(r);
        assert!(
            e.contains("2097152 bytes") && e.contains("1048576 bytes"),
            "{e}"
        );
        assert!(sent.is_empty(), "refused before Accepted");
        assert_eq!(std::fs::read(&p).unwrap()[0], 0xee, "untouched");
        let (r, _) = serve_bytes_to(
            stream_with_disks(TOKEN, 4, copied(1 << 20), &[]),
            vec![disk(&p, true)],
        );
        assert!(err_of(r).contains("read-only here"));
        let (r, _) = serve_bytes_to(
            stream_with_disks(
                TOKEN,
                4,
                Some(vec![HelloDisk {
                    size: 1 << 20,
                    copied: false,
                }]),
                &[],
            ),
            vec![disk(&p, false)],
        );
        assert!(err_of(r).contains("read-only at the source"));
        for (frame, what) in [
            (run(0, (1 << 20) - 2, b"abcd"), "lies outside it"),
            (run(0, u64::MAX - 1, b"abcd"), "lies outside it"),
            (run(1, 0, b"abcd"), "not copied"),
            ((Kind::Disk, vec![0, 0, 0]), "outside the disks copied"),
        ] {
            let (r, _) = serve_bytes_to(
                stream_with_disks(TOKEN, 4, copied(1 << 20), &[frame]),
                vec![disk(&p, false)],
            );
            let e = err_of(r);
            assert!(e.contains(what), "{e}");
        }
        // A shared-storage migration never sends disk runs.
        let (r, _) = serve_bytes_to(
            stream(TOKEN, 4, &[run(0, 0, b"abcd")]),
            vec![disk(&p, false)],
        );
        assert!(err_of(r).contains("not copied"));
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn a_stray_client_or_a_frame_out_of_order_is_refused() {
        let (r, _) = serve_bytes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec());
        assert!(matches!(r, Err(TargetError::Wire(WireError::NotMigration))));
        let (r, _) = serve_bytes(stream(TOKEN, 4, &[(Kind::Go, Vec::new())]));
        assert!(matches!(
            r,
            Err(TargetError::Wire(WireError::Unexpected { .. }))
        ));
        // Cut short mid-stream.
        let mut s = stream(TOKEN, 4, &[page(0, &[7u8; 4096])]);
        s.truncate(s.len() - 100);
        assert!(serve_bytes(s).0.is_err());
    }
}
