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
//!   length and CRC-32 are in the state.
//!
//! A reader refuses another format version outright: the state's types
//! change with it, and a guest restored from a misread state would run on
//! with corrupt registers rather than fail.

use std::io::{self, Read, Seek, SeekFrom, Write};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

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
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryInfo {
    pub bytes: u64,
    pub crc32: u32,
}

/// Writes every region of `mem` to `out`, in address order.
pub fn write_memory<W: Write + Seek>(
    mem: &GuestMemoryMmap,
    out: &mut W,
) -> Result<MemoryInfo, FormatError> {
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut bytes = 0u64;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    for region in mem.iter() {
        let start = region.start_addr();
        let len = region.len();
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(CHUNK as u64) as usize;
            let piece = &mut buf[..n];
            mem.read_slice(piece, GuestAddress(start.0 + off))
                .map_err(|e| io::Error::other(e.to_string()))?;
            crc.update(piece);
            bytes += n as u64;
            // Zero MiBs become holes, except the very last piece, which
            // gives the file its length.
            if bytes < total && piece.iter().all(|&b| b == 0) {
                out.seek(SeekFrom::Current(n as i64))?;
            } else {
                out.write_all(piece)?;
            }
            off += n as u64;
        }
    }
    Ok(MemoryInfo {
        bytes,
        crc32: crc.finalize(),
    })
}

/// Reads `mem`'s regions back from `input`, checking length and checksum.
pub fn read_memory<R: Read>(
    mem: &GuestMemoryMmap,
    input: &mut R,
    info: MemoryInfo,
) -> Result<(), FormatError> {
    let expected: u64 = mem.iter().map(|r| r.len()).sum();
    if info.bytes != expected {
        return Err(FormatError::MemorySize {
            found: info.bytes,
            expected,
        });
    }
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    for region in mem.iter() {
        let start = region.start_addr();
        let len = region.len();
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(CHUNK as u64) as usize;
            let piece = &mut buf[..n];
            input.read_exact(piece).map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => FormatError::MemoryCorrupt,
                _ => FormatError::Io(e),
            })?;
            crc.update(piece);
            mem.write_slice(piece, GuestAddress(start.0 + off))
                .map_err(|e| io::Error::other(e.to_string()))?;
            off += n as u64;
        }
    }
    let mut extra = [0u8; 1];
    if crc.finalize() != info.crc32 || input.read(&mut extra)? != 0 {
        return Err(FormatError::MemoryCorrupt);
    }
    Ok(())
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

    #[test]
    fn memory_round_trips_with_its_zero_pages_as_holes() {
        let src = guest(3);
        src.write_slice(b"first", GuestAddress(0x1000)).unwrap();
        src.write_slice(b"second region", GuestAddress(16 << 20))
            .unwrap();
        let mut file = Cursor::new(Vec::new());
        let info = write_memory(&src, &mut file).unwrap();
        assert_eq!(info.bytes, 4 << 20);
        assert_eq!(file.get_ref().len() as u64, info.bytes);
        let dst = guest(3);
        read_memory(&dst, &mut Cursor::new(file.into_inner()), info).unwrap();
        let mut b = [0u8; 13];
        dst.read_slice(&mut b, GuestAddress(16 << 20)).unwrap();
        assert_eq!(&b, b"second region");
        dst.read_slice(&mut b[..5], GuestAddress(0x1000)).unwrap();
        assert_eq!(&b[..5], b"first");
    }

    #[test]
    fn damaged_or_mis_sized_memory_is_refused() {
        let src = guest(1);
        src.write_slice(b"x", GuestAddress(5)).unwrap();
        let mut file = Cursor::new(Vec::new());
        let info = write_memory(&src, &mut file).unwrap();
        let mut bytes = file.into_inner();
        bytes[5] = b'y';
        assert!(matches!(
            read_memory(&guest(1), &mut Cursor::new(bytes.clone()), info),
            Err(FormatError::MemoryCorrupt)
        ));
        assert!(matches!(
            read_memory(&guest(2), &mut Cursor::new(bytes), info),
            Err(FormatError::MemorySize { .. })
        ));
    }
}
