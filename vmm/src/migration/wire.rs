//! The migration stream: after the source's 12-byte greeting (`VMM-MIGR`
//! and the version, u32 LE), frames of a kind byte, a length (u64 LE) and
//! the payload. The target checks every frame's kind and length before it
//! reads the payload: a stray or hostile connection gets one error line
//! and nothing of it reaches a guest.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 8] = b"VMM-MIGR";
pub const VERSION: u32 = 1;
/// Pages travel in runs of at most this many bytes.
pub const MAX_RUN: usize = 1 << 20;
/// Largest payload of any frame: a page run with its offset, or the state.
const MAX_PAYLOAD: u64 = crate::snapshot::format::MAX_STATE_LEN;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Source → target: [`Hello`] (JSON).
    Hello = 1,
    /// Target → source: the hello is accepted.
    Accepted = 2,
    /// Source → target: a run of guest memory: its offset in guest RAM
    /// laid out as in a snapshot's memory file (u64 LE), then the bytes.
    Pages = 3,
    /// Source → target: the stopped machine's state (a snapshot's JSON).
    State = 4,
    /// Target → source: the machine is rebuilt, its vCPUs wait.
    Restored = 5,
    /// Source → target: the source has let go (its guest stays stopped):
    /// run the guest.
    Go = 6,
    /// Either way: why the other side gives up (one line, UTF-8).
    Error = 7,
    /// Target → source: the target holds the disks' locks and runs the
    /// guest; the source may end.
    Running = 8,
    /// Source → target (`"disks":"copy"`): a run of a disk: the disk's
    /// index (u32 LE), the offset in it (u64 LE), then the bytes.
    Disk = 9,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Accepted,
            3 => Kind::Pages,
            4 => Kind::State,
            5 => Kind::Restored,
            6 => Kind::Go,
            7 => Kind::Error,
            8 => Kind::Running,
            9 => Kind::Disk,
            _ => return None,
        })
    }

    /// The largest payload this kind may carry.
    fn max_len(self) -> u64 {
        match self {
            Kind::Hello => 64 << 10,
            Kind::Pages => 8 + MAX_RUN as u64,
            Kind::Disk => 12 + MAX_RUN as u64,
            Kind::State => MAX_PAYLOAD,
            Kind::Error => 4 << 10,
            Kind::Accepted | Kind::Restored | Kind::Go | Kind::Running => 0,
        }
    }
}

/// What the source says first: who it is, and the machine's shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub token: String,
    pub name: String,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub virtio: usize,
    /// `"disks":"copy"`: every disk of the VM in order; absent for shared
    /// storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<HelloDisk>>,
}

/// A disk as the source describes it for a copy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloDisk {
    /// Its size in bytes: the target's image must have the same.
    pub size: u64,
    /// Sent (a writable disk); a read-only one is the target's own.
    pub copied: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("not a VMM migration stream")]
    NotMigration,
    #[error("migration stream version {0}: this VMM speaks version {VERSION}")]
    Version(u32),
    #[error("bad frame: kind {kind}, {len} bytes")]
    BadFrame { kind: u8, len: u64 },
    #[error("expected {expected:?}, got {got:?}")]
    Unexpected { expected: Kind, got: Kind },
    #[error("the other side gave up: {0}")]
    Peer(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

pub fn write_greeting(w: &mut impl Write) -> io::Result<()> {
    let mut g = [0u8; 12];
    g[..8].copy_from_slice(MAGIC);
    g[8..].copy_from_slice(&VERSION.to_le_bytes());
    w.write_all(&g)
}

pub fn read_greeting(r: &mut impl Read) -> Result<(), WireError> {
    let mut g = [0u8; 12];
    r.read_exact(&mut g).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => WireError::NotMigration,
        _ => WireError::Io(e),
    })?;
    if &g[..8] != MAGIC {
        return Err(WireError::NotMigration);
    }
    let v = u32::from_le_bytes([g[8], g[9], g[10], g[11]]);
    if v != VERSION {
        return Err(WireError::Version(v));
    }
    Ok(())
}

/// Writes one frame (the parts are concatenated as its payload).
pub fn write_frame(w: &mut impl Write, kind: Kind, parts: &[&[u8]]) -> io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut head = [0u8; 9];
    head[0] = kind as u8;
    head[1..].copy_from_slice(&(len as u64).to_le_bytes());
    w.write_all(&head)?;
    for p in parts {
        w.write_all(p)?;
    }
    Ok(())
}

/// Reads one frame; its payload goes into `buf` (reused).
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Kind, WireError> {
    read_frame_of(r, buf, None)
}

/// Reads one frame, which must be of kind `only` (or an Error) if given:
/// checked before its payload is read, so that a stranger cannot make the
/// target take in a big payload of another kind.
fn read_frame_of(
    r: &mut impl Read,
    buf: &mut Vec<u8>,
    only: Option<Kind>,
) -> Result<Kind, WireError> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head)?;
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&head[1..]);
    let len = u64::from_le_bytes(len8);
    let kind = Kind::from_byte(head[0])
        .filter(|k| len <= k.max_len())
        .ok_or(WireError::BadFrame { kind: head[0], len })?;
    if let Some(expected) = only {
        if kind != expected && kind != Kind::Error {
            return Err(WireError::Unexpected {
                expected,
                got: kind,
            });
        }
    }
    buf.clear();
    r.take(len).read_to_end(buf)?;
    if buf.len() as u64 != len {
        return Err(WireError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    if kind == Kind::Error {
        return Err(WireError::Peer(String::from_utf8_lossy(buf).into_owned()));
    }
    Ok(kind)
}

/// Reads a frame that must be of kind `expected`.
pub fn expect(r: &mut impl Read, buf: &mut Vec<u8>, expected: Kind) -> Result<(), WireError> {
    let got = read_frame_of(r, buf, Some(expected))?;
    if got != expected {
        return Err(WireError::Unexpected { expected, got });
    }
    Ok(())
}

/// Tells the other side why this one gives up (best effort: it may be gone).
pub fn send_error(w: &mut impl Write, why: &str) {
    let why = &why.as_bytes()[..why.len().min(4000)];
    let _ = write_frame(w, Kind::Error, &[why]);
}

/// Compares tokens in time independent of where they differ.
pub fn token_matches(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn frames_round_trip_and_an_error_frame_reads_as_the_peers_reason() {
        let mut out = Vec::new();
        write_greeting(&mut out).unwrap();
        write_frame(&mut out, Kind::Pages, &[&7u64.to_le_bytes(), b"data"]).unwrap();
        write_frame(&mut out, Kind::Go, &[]).unwrap();
        send_error(&mut out, "no room");
        let mut r = Cursor::new(out);
        read_greeting(&mut r).unwrap();
        let mut buf = Vec::new();
        assert_eq!(read_frame(&mut r, &mut buf).unwrap(), Kind::Pages);
        assert_eq!(&buf[8..], b"data");
        expect(&mut r, &mut buf, Kind::Go).unwrap();
        let e = read_frame(&mut r, &mut buf).unwrap_err();
        assert_eq!(e.to_string(), "the other side gave up: no room");
    }

    #[test]
    fn a_stray_connection_or_another_version_is_refused_at_the_greeting() {
        assert!(matches!(
            read_greeting(&mut Cursor::new(b"GET / HTTP/1.1\r\n".to_vec())),
            Err(WireError::NotMigration)
        ));
        let mut g = MAGIC.to_vec();
        g.extend_from_slice(&9u32.to_le_bytes());
        assert!(matches!(
            read_greeting(&mut Cursor::new(g)),
            Err(WireError::Version(9))
        ));
    }

    #[test]
    fn an_unknown_kind_or_an_oversized_frame_is_refused_before_its_payload_is_read() {
        let mut buf = Vec::new();
        let mut f = vec![99u8];
        f.extend_from_slice(&0u64.to_le_bytes());
        assert!(matches!(
            read_frame(&mut Cursor::new(f), &mut buf),
            Err(WireError::BadFrame { kind: 99, .. })
        ));
        let mut f = vec![Kind::Pages as u8];
        f.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            read_frame(&mut Cursor::new(f), &mut buf),
            Err(WireError::BadFrame { .. })
        ));
        let mut f = vec![Kind::Go as u8];
        f.extend_from_slice(&1u64.to_le_bytes());
        f.push(0);
        assert!(read_frame(&mut Cursor::new(f), &mut buf).is_err());
    }

    #[test]
    fn a_truncated_frame_is_an_error_not_a_short_payload() {
        let mut out = Vec::new();
        write_frame(&mut out, Kind::State, &[b"{\"a\":1}"]).unwrap();
        out.truncate(out.len() - 2);
        assert!(read_frame(&mut Cursor::new(out), &mut Vec::new()).is_err());
    }

    #[test]
    fn tokens_match_only_when_equal() {
        assert!(token_matches("s3cret", "s3cret"));
        assert!(!token_matches("s3cret", "s3creT"));
        assert!(!token_matches("s3cret", "s3cret "));
        assert!(!token_matches("", "x"));
    }
}
