//! The driver side for the virtio targets: a small guest memory with a hole,
//! buffers placed from fuzz input, descriptor chains written as a driver (or
//! a hostile one) would, and a model of what the split ring promises.
//!
//! Guest memory: region A `[0, 0x10000)`, a hole, region B
//! `[0x20000, 0x40000)`. The rings of queue `i` sit at [`queue_base`]`(i)`
//! inside [`RING_AREA`]; buffers placed by [`Alloc`] go to region B.
//!
//! # What the model checks
//! A device that pops every available chain in order and returns each in
//! order (virtio-blk, virtio-net TX) must produce exactly: for the entries
//! between its `next_avail` and the ring's `idx`, when there are at most
//! `size` of them, one used entry per head below `size`, in ring order;
//! none when there are more (the ring index is bogus). Used lengths never
//! exceed the bytes the chain offers for writing. These hold only while the
//! device cannot itself overwrite the rings, the descriptor table or an
//! indirect table (a chain with a device-writable buffer over them), which
//! [`rings_protected`] checks before each run.

use arbitrary::Arbitrary;
use devices::virtio::test_utils::{TestQueue, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use devices::virtio::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

pub use devices::virtio::test_utils::VRING_DESC_F_WRITE;

pub const REGION_A: (u64, u64) = (0, 0x1_0000);
pub const REGION_B: (u64, u64) = (0x2_0000, 0x2_0000);
/// Where the rings of every queue live: `[0x1000, 0x7000)`.
pub const RING_AREA: (u64, u64) = (0x1000, 0x6000);

/// The guest memory every virtio target uses (fresh per input: all zeros).
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(REGION_A.0), REGION_A.1 as usize),
        (GuestAddress(REGION_B.0), REGION_B.1 as usize),
    ])
    .expect("map guest memory")
}

/// Base of queue `i`'s rings (descriptor table, then avail, then used).
pub fn queue_base(i: usize) -> u64 {
    RING_AREA.0 + QUEUE_AREA * i as u64
}

/// Room for one queue's rings at the largest size.
const QUEUE_AREA: u64 = 0x3000;

/// Queue `i` at `size`, its rings zeroed first, as a driver allocating
/// fresh rings after a reset does. Without the zeroing, a queue of another
/// size laid over the last one finds the old descriptors where its avail
/// and used rings now are: a device following them is right to, and the
/// model (which starts from empty rings) would report it as a bug.
pub fn fresh_queue(mem: &GuestMemoryMmap, i: usize, size: u16) -> TestQueue {
    let base = queue_base(i);
    mem.write_slice(&[0u8; QUEUE_AREA as usize], GuestAddress(base))
        .expect("the ring area is in guest memory");
    TestQueue::new(base, size)
}

/// A queue size from a fuzz byte: a power of two from 1 to `max`.
pub fn queue_size(sel: u8, max: u16) -> u16 {
    let size = 1u16 << (sel % 9);
    size.min(max)
}

/// A guest-physical address chosen by the fuzzer, biased to the edges.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Addr {
    /// Region A past the rings.
    A(u16),
    /// Anywhere in region B.
    B(u32),
    /// Just below the end of region A.
    EndOfA(u8),
    /// Just below the end of region B.
    EndOfB(u8),
    /// In the hole between the regions.
    Hole(u16),
    /// Over the rings and descriptor tables.
    Rings(u16),
    /// Anything.
    Raw(u64),
}

impl Addr {
    pub fn get(self) -> u64 {
        let a_data = RING_AREA.0 + RING_AREA.1;
        match self {
            Addr::A(x) => a_data + u64::from(x) % (REGION_A.1 - a_data),
            Addr::B(x) => REGION_B.0 + u64::from(x) % REGION_B.1,
            Addr::EndOfA(x) => REGION_A.1 - u64::from(x),
            Addr::EndOfB(x) => REGION_B.0 + REGION_B.1 - u64::from(x),
            Addr::Hole(x) => REGION_A.1 + u64::from(x),
            Addr::Rings(x) => RING_AREA.0 + u64::from(x) % RING_AREA.1,
            Addr::Raw(x) => x,
        }
    }
}

/// A buffer length chosen by the fuzzer.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Len {
    Small(u8),
    /// Whole 512-byte sectors.
    Sectors(u8),
    Medium(u16),
    Raw(u32),
}

impl Len {
    pub fn get(self) -> u32 {
        match self {
            Len::Small(x) => u32::from(x),
            Len::Sectors(x) => u32::from(x) * 512,
            Len::Medium(x) => u32::from(x),
            Len::Raw(x) => x,
        }
    }
}

/// Where a buffer goes: the next free place in region B, or an address
/// the fuzzer picked (which may overlap anything, or be outside memory).
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Place {
    Next,
    At(Addr),
}

/// One buffer of a chain.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct BufSpec {
    pub place: Place,
    pub len: Len,
    pub write: bool,
}

/// Bump allocator over region B: buffers it places do not overlap each
/// other (until it wraps) nor the rings.
pub struct Alloc {
    next: u64,
    /// Times it started again from the bottom (older buffers may overlap
    /// newer ones from then on).
    pub wraps: u32,
}

impl Default for Alloc {
    fn default() -> Self {
        Self {
            next: REGION_B.0,
            wraps: 0,
        }
    }
}

impl Alloc {
    pub fn place(&mut self, len: u64) -> u64 {
        let end = REGION_B.0 + REGION_B.1;
        if self.next.saturating_add(len) > end {
            self.next = REGION_B.0;
            self.wraps += 1;
        }
        let at = self.next;
        self.next = (at.saturating_add(len).saturating_add(15) & !15).min(end);
        at
    }

    /// The address of `spec`'s buffer.
    pub fn resolve(&mut self, spec: &BufSpec) -> (u64, u32, bool) {
        let len = spec.len.get();
        let addr = match spec.place {
            Place::Next => self.place(u64::from(len)),
            Place::At(a) => a.get(),
        };
        (addr, len, spec.write)
    }
}

/// Writes `data` as a stream over `bufs` (the parts outside memory are
/// skipped): what a driver puts in a request before publishing it.
pub fn fill_stream(mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)], data: &[u8]) {
    let mut off = 0usize;
    for &(addr, len, _) in bufs {
        if off >= data.len() {
            return;
        }
        let n = (len as usize).min(data.len() - off);
        // Outside memory: a hostile driver's buffer, nothing to fill.
        let _ = mem.write_slice(&data[off..off + n], GuestAddress(addr));
        off += n;
    }
}

/// Publishes `bufs` as one chain through an indirect table placed by
/// `alloc`. Returns the head index.
pub fn add_indirect_chain(
    q: &mut TestQueue,
    mem: &GuestMemoryMmap,
    alloc: &mut Alloc,
    bufs: &[(u64, u32, bool)],
) -> u16 {
    let n = bufs.len() as u64;
    let table = alloc.place(16 * n.max(1));
    for (i, &(addr, len, w)) in bufs.iter().enumerate() {
        let mut flags = if w { VRING_DESC_F_WRITE } else { 0 };
        if i + 1 < bufs.len() {
            flags |= VRING_DESC_F_NEXT;
        }
        let at = GuestAddress(table + 16 * i as u64);
        let _ = mem.write_slice(&raw_desc(addr, len, flags, i as u16 + 1), at);
    }
    let head = q.alloc(1)[0];
    q.write_desc(mem, head, table, 16 * n as u32, VRING_DESC_F_INDIRECT, 0);
    q.push_avail(mem, head);
    head
}

fn raw_desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

/// One descriptor as read back from guest memory.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    pub fn writable(&self) -> bool {
        self.flags & VRING_DESC_F_WRITE != 0
    }
}

pub fn read_desc(mem: &GuestMemoryMmap, at: u64) -> Option<Desc> {
    let mut d = [0u8; 16];
    mem.read_slice(&mut d, GuestAddress(at)).ok()?;
    Some(parse_desc(&d))
}

/// The descriptors of the chain at `head` as virtio-queue 0.18 walks them
/// (at most a queue's worth, one level of indirection, at most 4 GiB), or
/// `None` when the walk stops early (what the devices count as an invalid
/// chain).
pub fn walk_chain(mem: &GuestMemoryMmap, table: u64, size: u16, head: u16) -> Option<Vec<Desc>> {
    let (mut table, mut qsize, mut next, mut ttl) = (table, size, head, size);
    let mut indirect = false;
    let mut yielded = 0u32;
    let mut out = Vec::new();
    let mut last_has_next = false;
    loop {
        if ttl == 0 || next >= qsize {
            break;
        }
        let Some(d) = table
            .checked_add(u64::from(next) * 16)
            .and_then(|a| read_desc(mem, a))
        else {
            break;
        };
        if d.flags & VRING_DESC_F_INDIRECT != 0 {
            if indirect || d.len % 16 != 0 || d.len / 16 > u32::from(u16::MAX) {
                break;
            }
            table = d.addr;
            qsize = (d.len / 16) as u16;
            next = 0;
            ttl = qsize;
            indirect = true;
            continue;
        }
        match yielded.checked_add(d.len) {
            Some(y) => yielded = y,
            None => break,
        }
        if d.flags & VRING_DESC_F_NEXT != 0 {
            next = d.next;
            ttl -= 1;
        } else {
            ttl = 0;
        }
        last_has_next = d.flags & VRING_DESC_F_NEXT != 0;
        out.push(d);
    }
    (!out.is_empty() && !last_has_next).then_some(out)
}

/// Total device-writable bytes of a chain.
pub fn writable_len(chain: &[Desc]) -> u64 {
    chain
        .iter()
        .filter(|d| d.writable())
        .map(|d| u64::from(d.len))
        .sum()
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    // (start, len) ranges; empty ranges overlap nothing.
    a.1 > 0 && b.1 > 0 && a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
}

/// Whether no descriptor the device could follow (in the tables of
/// `queues`, `(table, size)`, and the indirect tables they point to) lets
/// it write over the rings, a descriptor table or an indirect table: then
/// a run of the device cannot change what the ring model reads.
pub fn rings_protected(mem: &GuestMemoryMmap, queues: &[(u64, u16)]) -> bool {
    let mut descs = Vec::new();
    let mut tables = vec![RING_AREA];
    for &(table, size) in queues {
        for d in read_table(mem, table, u64::from(size)) {
            if d.flags & VRING_DESC_F_INDIRECT != 0 && d.len % 16 == 0 {
                tables.push((d.addr, u64::from(d.len)));
                descs.extend(read_table(mem, d.addr, u64::from(d.len / 16)));
            } else {
                descs.push(d);
            }
        }
    }
    descs.iter().filter(|d| d.writable()).all(|d| {
        tables
            .iter()
            .all(|&t| !overlaps((d.addr, u64::from(d.len)), t))
    })
}

/// The descriptors of a table of `n` entries, as far as it is in memory.
fn read_table(mem: &GuestMemoryMmap, at: u64, n: u64) -> Vec<Desc> {
    // A table never has more entries than memory has bytes for.
    let n = n.min(REGION_B.1 / 16);
    let mut raw = vec![0u8; 16 * n as usize];
    if mem.read_slice(&mut raw, GuestAddress(at)).is_err() {
        // Partly outside memory: entry by entry, up to the first gap.
        return (0..n)
            .map_while(|i| at.checked_add(16 * i).and_then(|a| read_desc(mem, a)))
            .collect();
    }
    raw.chunks_exact(16).map(parse_desc).collect()
}

fn parse_desc(d: &[u8]) -> Desc {
    let b = |r: std::ops::Range<usize>| &d[r];
    Desc {
        addr: u64::from_le_bytes(b(0..8).try_into().unwrap_or_default()),
        len: u32::from_le_bytes(b(8..12).try_into().unwrap_or_default()),
        flags: u16::from_le_bytes(b(12..14).try_into().unwrap_or_default()),
        next: u16::from_le_bytes(b(14..16).try_into().unwrap_or_default()),
    }
}

/// Reads the ring indices and entries the model needs.
pub struct Rings<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub q: &'a TestQueue,
}

impl Rings<'_> {
    pub fn avail_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.q.avail + 2)).unwrap()
    }

    pub fn avail_entry(&self, pos: u16) -> u16 {
        let slot = u64::from(pos % self.q.size);
        self.mem
            .read_obj(GuestAddress(self.q.avail + 4 + 2 * slot))
            .unwrap()
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.q.used + 2)).unwrap()
    }

    pub fn used_entry(&self, pos: u16) -> (u32, u32) {
        let slot = u64::from(pos % self.q.size);
        let a = GuestAddress(self.q.used + 4 + 8 * slot);
        let id = self.mem.read_obj(a).unwrap();
        let len = self.mem.read_obj(GuestAddress(a.0 + 4)).unwrap();
        (id, len)
    }
}

/// The model of an in-order device's ring positions.
#[derive(Default)]
pub struct InOrderModel {
    pub next_avail: u16,
    pub next_used: u16,
    /// False once the device may have written over its rings: from then on
    /// its positions are unknown and nothing is checked.
    pub valid: bool,
}

/// What one run of an in-order device should have done.
pub struct Expected {
    /// Every head the device pops, in ring order.
    pub popped: Vec<u16>,
    /// Heads (below `size`) in the order their used entries must appear.
    pub heads: Vec<u16>,
    /// Used index before the run.
    pub used_before: u16,
}

impl InOrderModel {
    pub fn new() -> Self {
        Self {
            next_avail: 0,
            next_used: 0,
            valid: true,
        }
    }

    /// Before a run that serves everything available: the used entries it
    /// must add. `None` when the model is no longer valid.
    pub fn before_run(
        &mut self,
        mem: &GuestMemoryMmap,
        q: &TestQueue,
        queues: &[(u64, u16)],
    ) -> Option<Expected> {
        if !self.valid {
            return None;
        }
        if !rings_protected(mem, queues) {
            self.valid = false;
            return None;
        }
        let r = Rings { mem, q };
        let avail = r.avail_idx();
        let pending = avail.wrapping_sub(self.next_avail);
        let mut popped = Vec::new();
        if pending <= q.size {
            popped = (0..pending)
                .map(|i| r.avail_entry(self.next_avail.wrapping_add(i)))
                .collect();
            self.next_avail = avail;
        }
        let heads = popped.iter().copied().filter(|&h| h < q.size).collect();
        Some(Expected {
            popped,
            heads,
            used_before: r.used_idx(),
        })
    }

    /// After the run: checks the used ring against `exp`, with `max_len`
    /// bounding each used length. Returns the used entries.
    pub fn after_run(
        &mut self,
        mem: &GuestMemoryMmap,
        q: &TestQueue,
        exp: &Expected,
        max_len: impl Fn(u16) -> u64,
    ) -> Vec<(u32, u32)> {
        let r = Rings { mem, q };
        let used = r.used_idx();
        if exp.heads.is_empty() {
            assert_eq!(
                used, exp.used_before,
                "used index moved with nothing to serve"
            );
            return Vec::new();
        }
        let n = exp.heads.len() as u16;
        assert_eq!(
            used,
            self.next_used.wrapping_add(n),
            "used index {used} after serving {n} chains from {}",
            self.next_used
        );
        let mut entries = Vec::new();
        for (i, &head) in exp.heads.iter().enumerate() {
            let (id, len) = r.used_entry(self.next_used.wrapping_add(i as u16));
            assert_eq!(id, u32::from(head), "used entry {i} out of order");
            let bound = max_len(head);
            assert!(
                u64::from(len) <= bound,
                "used length {len} of chain {head} exceeds its {bound} writable bytes"
            );
            entries.push((id, len));
        }
        self.next_used = used;
        entries
    }
}
