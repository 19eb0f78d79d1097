//! The snapshot's files, in a directory:
//!
//! * `state`: a 24-byte header, then the VM's state as JSON.
//!   The header is the magic `VMM-SNAP`, the format version (u32 LE), the
//!   body's CRC-32 (u32 LE) and its length (u64 LE). JSON because every
//!   part of the state is a serde type already (KVM's structures through
//!   kvm-bindings' `serde` feature, the devices' own), and an operator can
//!   read it; the checksum because a half-written or damaged file must be
//!   refused, not half-restored.
//! * `memory`: guest RAM, each region after the other in address order,
//!   as raw bytes (all-zero MiBs left as holes: the file is sparse). Its
//!   length, checksum and which MiBs hold data are in the state
//!   ([`MemoryInfo`]); a restore reads those MiBs only, to check the
//!   checksum, and then maps them into guest memory copy-on-write
//!   (`MAP_PRIVATE`, as Firecracker does): nothing is copied, the guest
//!   pages its memory in as it touches it, and its writes stay its own.
//!   The file must not be changed while a VM restored from it runs
//!   (deleting it is harmless: the mapping keeps it).
//!
//! A reader refuses another format version outright: the state's types
//! change with it, and a guest restored from a misread state would run on
//! with corrupt registers rather than fail.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use devices::virtio::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// First bytes of a `state` file.
pub const MAGIC: &[u8; 8] = b"VMM-SNAP";
/// The format this VMM writes and reads.
pub const VERSION: u32 = 1;
const HEADER_LEN: usize = 24;
/// A state larger than this is not ours (a few vCPUs' XSAVE areas and
/// device registers are well under a MiB).
pub const MAX_STATE_LEN: u64 = 64 << 20;
/// Memory is copied in pieces of this size.
const CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("not a snapshot state file (no VMM-SNAP header)")]
    NotASnapshot,
    #[error("snapshot format version {found}: this VMM reads version {VERSION} only")]
    Version { found: u32 },
    #[error("the snapshot's state is corrupt (checksum mismatch or truncated)")]
    Corrupt,
    #[error("the snapshot's memory is corrupt (checksum mismatch)")]
    MemoryCorrupt,
    #[error("the snapshot's memory is {found} bytes, the guest has {expected}")]
    MemorySize { found: u64, expected: u64 },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The `state` file's bytes for `body`.
pub fn encode_state(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// The body of a `state` file read from `r`, checked.
pub fn decode_state(r: &mut impl Read) -> Result<Vec<u8>, FormatError> {
    let mut header = [0u8; HEADER_LEN];
    r.read_exact(&mut header).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FormatError::NotASnapshot,
        _ => FormatError::Io(e),
    })?;
    if &header[..8] != MAGIC {
        return Err(FormatError::NotASnapshot);
    }
    let word = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let version = word(8);
    if version != VERSION {
        return Err(FormatError::Version { found: version });
    }
    let crc = word(12);
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&header[16..24]);
    let len = u64::from_le_bytes(len8);
    if len > MAX_STATE_LEN {
        return Err(FormatError::Corrupt);
    }
    let mut body = Vec::new();
    r.take(len).read_to_end(&mut body)?;
    // One byte more would mean a body longer than the header says.
    let mut extra = [0u8; 1];
    if body.len() as u64 != len || r.read(&mut extra)? != 0 || crc32fast::hash(&body) != crc {
        return Err(FormatError::Corrupt);
    }
    Ok(body)
}

/// What [`write_memory`] wrote: for the state, to check the file on restore.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryInfo {
    /// The file's length: all of guest RAM.
    pub bytes: u64,
    /// CRC-32 over every MiB that holds data (see `data`), in order, each
    /// as its file offset (u64 LE) then its bytes: a damaged, moved or
    /// zeroed MiB changes the sum. The holes are never read, so what lies
    /// there does not matter.
    pub crc32: u32,
    /// Which pieces hold data (bit i: the i-th piece of at most 1 MiB,
    /// regions in order, as `pieces` lists them): the reader reads
    /// those and nothing else, whatever the file system says of holes
    /// (9p and a copy made without `--sparse` report none).
    #[serde(default)]
    pub data: Vec<u64>,
}

fn has_data(data: &[u64], i: usize) -> bool {
    data.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
}

/// The guest's RAM as the file lays it out: (file offset, guest address,
/// length) of each piece of at most [`CHUNK`] bytes, regions in order.
pub(crate) fn pieces(
    mem: &GuestMemoryMmap,
) -> impl Iterator<Item = (u64, GuestAddress, usize)> + '_ {
    let mut file_off = 0u64;
    mem.iter().flat_map(move |region| {
        let (start, len) = (region.start_addr().0, region.len());
        let base = file_off;
        file_off += len;
        (0..len.div_ceil(CHUNK as u64)).map(move |i| {
            let off = i * CHUNK as u64;
            let n = (len - off).min(CHUNK as u64) as usize;
            (base + off, GuestAddress(start + off), n)
        })
    })
}

pub(crate) fn is_zero(b: &[u8]) -> bool {
    // An OR over the bytes, which the compiler vectorizes.
    b.iter().fold(0u8, |a, &x| a | x) == 0
}

fn crc_piece(crc: &mut crc32fast::Hasher, file_off: u64, data: &[u8]) {
    crc.update(&file_off.to_le_bytes());
    crc.update(data);
}

/// Writes every region of `mem` to `out` (an empty file), in address order;
/// all-zero MiBs are left as holes.
pub fn write_memory(mem: &GuestMemoryMmap, out: &File) -> Result<MemoryInfo, FormatError> {
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut bytes = 0u64;
    let mut data = Vec::new();
    for (i, (file_off, addr, n)) in pieces(mem).enumerate() {
        let piece = &mut buf[..n];
        mem.read_slice(piece, addr)
            .map_err(|e| io::Error::other(e.to_string()))?;
        if data.len() <= i / 64 {
            data.push(0u64);
        }
        if !is_zero(piece) {
            crc_piece(&mut crc, file_off, piece);
            out.write_all_at(piece, file_off)?;
            data[i / 64] |= 1 << (i % 64);
        }
        bytes = file_off + n as u64;
    }
    out.set_len(bytes)?;
    Ok(MemoryInfo {
        bytes,
        crc32: crc.finalize(),
        data,
    })
}

/// Reads `mem`'s regions back from `input`, checking length and checksum.
/// Only the MiBs that held data are read; guest memory elsewhere is not
/// touched (a fresh guest's RAM is zero already, and stays unallocated).
pub fn read_memory(
    mem: &GuestMemoryMmap,
    input: &File,
    info: &MemoryInfo,
) -> Result<(), FormatError> {
    let expected: u64 = mem.iter().map(|r| r.len()).sum();
    if info.bytes != expected {
        return Err(FormatError::MemorySize {
            found: info.bytes,
            expected,
        });
    }
    if input.metadata()?.len() != expected {
        return Err(FormatError::MemoryCorrupt);
    }
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let read = |piece: &mut [u8], file_off: u64| {
        input
            .read_exact_at(piece, file_off)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => FormatError::MemoryCorrupt,
                _ => FormatError::Io(e),
            })
    };
    for (i, (file_off, _, n)) in pieces(mem).enumerate() {
        if !has_data(&info.data, i) {
            continue;
        }
        let piece = &mut buf[..n];
        read(piece, file_off)?;
        crc_piece(&mut crc, file_off, piece);
    }
    if crc.finalize() != info.crc32 {
        return Err(FormatError::MemoryCorrupt);
    }
    // Checked: now in guest memory, mapped where the file system allows it,
    // copied where not.
    for (i, (file_off, addr, n)) in pieces(mem).enumerate() {
        if !has_data(&info.data, i) {
            continue;
        }
        match map_piece(mem, input, file_off, addr, n)? {
            Mapped::Yes => continue,
            Mapped::CopyInstead => {}
        }
        let piece = &mut buf[..n];
        read(piece, file_off)?;
        mem.write_slice(piece, addr)
            .map_err(|e| io::Error::other(e.to_string()))?;
    }
    Ok(())
}

/// What [`map_piece`] did.
enum Mapped {
    Yes,
    /// The file cannot be mapped there; the guest memory is as it was
    /// (anonymous, zero): copy the piece in.
    CopyInstead,
}

/// Maps `n` bytes of `input` at `file_off` over guest memory at `addr`,
/// copy-on-write. The guest memory there is fresh (never touched), so
/// nothing is lost; KVM follows the new mapping (its MMU notifier).
fn map_piece(
    mem: &GuestMemoryMmap,
    input: &File,
    file_off: u64,
    addr: GuestAddress,
    n: usize,
) -> Result<Mapped, FormatError> {
    let host = mem
        .get_slice(addr, n)
        .map_err(|e| io::Error::other(e.to_string()))?
        .ptr_guard_mut()
        .as_ptr();
    let Ok(off) = libc::off_t::try_from(file_off) else {
        return Ok(Mapped::CopyInstead);
    };
    // SAFETY: `host..host+n` lies inside one region of `mem` (get_slice
    // checked it), a mapping `mem` owns and keeps until it is dropped (its
    // munmap covers whatever is mapped there then). MAP_FIXED replaces
    // those pages, which nothing has touched yet, with private pages of
    // the file: the same size, readable and writable as before.
    let p = unsafe {
        libc::mmap(
            host.cast(),
            n,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED,
            input.as_raw_fd(),
            off,
        )
    };
    if p != libc::MAP_FAILED {
        // A new mapping keeps none of guest RAM's advice (huge pages, no
        // core dumps): given again.
        devices::virtio::advise(host, n);
        return Ok(Mapped::Yes);
    }
    let e = io::Error::last_os_error();
    // A failed MAP_FIXED may have unmapped the range already: fresh
    // anonymous memory goes back there (the caller copies the piece in),
    // or the restore fails rather than leave a hole in guest memory.
    // SAFETY: as above, with anonymous memory: what the region had.
    let back = unsafe {
        libc::mmap(
            host.cast(),
            n,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if back == libc::MAP_FAILED {
        return Err(FormatError::Io(io::Error::other(format!(
            "cannot map the snapshot's memory ({e}) nor give the guest its memory back: {}",
            io::Error::last_os_error()
        ))));
    }
    devices::virtio::advise(host, n);
    Ok(Mapped::CopyInstead)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn a_state_round_trips_through_its_header() {
        let file = encode_state(b"{\"a\":1}");
        assert_eq!(decode_state(&mut Cursor::new(file)).unwrap(), b"{\"a\":1}");
    }

    #[test]
    fn a_flipped_bit_in_the_state_is_refused_as_corrupt() {
        let mut file = encode_state(b"{\"vcpus\":[1,2,3]}");
        let last = file.len() - 2;
        file[last] ^= 0x04;
        assert!(matches!(
            decode_state(&mut Cursor::new(file)),
            Err(FormatError::Corrupt)
        ));
    }

    #[test]
    fn a_truncated_or_extended_state_is_refused_as_corrupt() {
        let file = encode_state(b"0123456789");
        let short = file[..file.len() - 1].to_vec();
        assert!(matches!(
            decode_state(&mut Cursor::new(short)),
            Err(FormatError::Corrupt)
        ));
        let mut long = file.clone();
        long.push(b'x');
        assert!(matches!(
            decode_state(&mut Cursor::new(long)),
            Err(FormatError::Corrupt)
        ));
    }

    #[test]
    fn another_format_version_is_refused_by_number() {
        let mut file = encode_state(b"{}");
        file[8..12].copy_from_slice(&7u32.to_le_bytes());
        let e = decode_state(&mut Cursor::new(file)).unwrap_err();
        assert!(matches!(e, FormatError::Version { found: 7 }));
        assert!(e.to_string().contains("version 7"), "{e}");
    }

    #[test]
    fn a_file_that_is_not_a_snapshot_is_refused() {
        for bytes in [
            &b""[..],
            b"hello",
            b"ELF\x7f and more than twenty-four bytes",
        ] {
            assert!(matches!(
                decode_state(&mut Cursor::new(bytes.to_vec())),
                Err(FormatError::NotASnapshot)
            ));
        }
    }

    #[test]
    fn a_huge_length_is_refused_without_reading_it() {
        let mut file = encode_state(b"{}");
        file[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode_state(&mut Cursor::new(file)),
            Err(FormatError::Corrupt)
        ));
    }

    fn guest(mib: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), mib << 20),
            (GuestAddress(16 << 20), 1 << 20),
        ])
        .unwrap()
    }

    fn temp_file(tag: &str) -> (std::path::PathBuf, File) {
        let p = std::env::temp_dir().join(format!("vmm-mem-{tag}-{}", std::process::id()));
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        (p, f)
    }

    #[test]
    fn memory_round_trips_with_its_zero_mibs_as_holes_that_are_not_read() {
        let src = guest(3);
        src.write_slice(b"first", GuestAddress(0x1000)).unwrap();
        src.write_slice(b"second region", GuestAddress(16 << 20))
            .unwrap();
        let (p, file) = temp_file("round");
        let info = write_memory(&src, &file).unwrap();
        assert_eq!(info.bytes, 4 << 20);
        assert_eq!(file.metadata().unwrap().len(), info.bytes);
        let dst = guest(3);
        read_memory(&dst, &file, &info).unwrap();
        let mut b = [0u8; 13];
        dst.read_slice(&mut b, GuestAddress(16 << 20)).unwrap();
        assert_eq!(&b, b"second region");
        dst.read_slice(&mut b[..5], GuestAddress(0x1000)).unwrap();
        assert_eq!(&b[..5], b"first");
        std::fs::remove_file(p).unwrap();
    }

    /// The `VmFlags` of the mapping that holds host address `addr`.
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for l in smaps.lines() {
            let range = l
                .split(' ')
                .next()
                .and_then(|w| w.split_once('-'))
                .and_then(|(a, b)| {
                    Some((
                        usize::from_str_radix(a, 16).ok()?,
                        usize::from_str_radix(b, 16).ok()?,
                    ))
                });
            if let Some((a, b)) = range {
                inside = a <= addr && addr < b;
            } else if inside {
                if let Some(f) = l.strip_prefix("VmFlags:") {
                    return f.trim().to_string();
                }
            }
        }
        panic!("{addr:#x} is not mapped");
    }

    #[test]
    fn memory_mapped_from_the_file_stays_out_of_core_dumps_as_the_rest_does() {
        let src = guest(3);
        src.write_slice(b"data", GuestAddress(0x1000)).unwrap();
        let (p, file) = temp_file("advice");
        let info = write_memory(&src, &file).unwrap();
        let dst = devices::virtio::guest_ram(&[
            (GuestAddress(0), 3 << 20),
            (GuestAddress(16 << 20), 1 << 20),
        ])
        .unwrap();
        read_memory(&dst, &file, &info).unwrap();
        let mut b = [0u8; 4];
        dst.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"data");
        let mapped = dst.get_host_address(GuestAddress(0x1000)).unwrap() as usize;
        let flags = vm_flags(mapped);
        assert!(
            flags.split(' ').any(|f| f == "dd"),
            "the file's piece lost MADV_DONTDUMP: {flags}"
        );
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn damaged_zeroed_filled_in_or_mis_sized_memory_is_refused() {
        let src = guest(2);
        src.write_slice(b"x", GuestAddress(5)).unwrap();
        let (p, file) = temp_file("damaged");
        let info = write_memory(&src, &file).unwrap();
        // A byte of data changed.
        file.write_all_at(b"y", 5).unwrap();
        assert!(matches!(
            read_memory(&guest(2), &file, &info),
            Err(FormatError::MemoryCorrupt)
        ));
        // The data MiB zeroed.
        file.write_all_at(&[0u8; 8], 0).unwrap();
        assert!(matches!(
            read_memory(&guest(2), &file, &info),
            Err(FormatError::MemoryCorrupt)
        ));
        // Restored; a hole filled in is not read: the guest's memory
        // there stays as it was saved, zero.
        file.write_all_at(b"x", 5).unwrap();
        file.write_all_at(b"z", (1 << 20) + 7).unwrap();
        let back = guest(2);
        read_memory(&back, &file, &info).unwrap();
        let mut z = [1u8; 1];
        back.read_slice(&mut z, GuestAddress((1 << 20) + 7))
            .unwrap();
        assert_eq!(z, [0]);
        // Cut short, and a guest of another size.
        file.set_len(info.bytes - 1).unwrap();
        assert!(matches!(
            read_memory(&guest(2), &file, &info),
            Err(FormatError::MemoryCorrupt)
        ));
        assert!(matches!(
            read_memory(&guest(1), &file, &info),
            Err(FormatError::MemorySize { .. })
        ));
        std::fs::remove_file(p).unwrap();
    }
}
