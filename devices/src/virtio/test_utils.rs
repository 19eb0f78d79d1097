//! A minimal virtio driver for tests and the fuzz targets (feature
//! `fuzzing`): programs the transport through its registers and writes
//! split-ring descriptor chains into guest memory.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::mmio::{reg, status};
use super::{take_dirty_pages, GuestMemoryMmap, MmioTransport, DIRTY_PAGE_SIZE};
use crate::BusDevice;

pub const MEM_SIZE: usize = 16 << 20;
pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
pub const VRING_DESC_F_INDIRECT: u16 = 4;

pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// Guest-physical addresses of the pages marked dirty since the last call
/// (which clears them), ascending.
pub fn take_dirty_addrs(mem: &GuestMemoryMmap) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for (region, words) in mem.iter().zip(take_dirty_pages(mem)) {
        for (w, word) in words.iter().enumerate() {
            for bit in 0..64 {
                if word & (1 << bit) != 0 {
                    let page = (w * 64 + bit) as u64;
                    out.insert(region.start_addr().0 + page * DIRTY_PAGE_SIZE);
                }
            }
        }
    }
    out
}

/// Addresses of the pages that the `(address, length)` ranges touch.
pub fn pages_of(ranges: &[(u64, u64)]) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for &(addr, len) in ranges.iter().filter(|r| r.1 > 0) {
        let mut p = addr / DIRTY_PAGE_SIZE * DIRTY_PAGE_SIZE;
        while p < addr + len {
            out.insert(p);
            p += DIRTY_PAGE_SIZE;
        }
    }
    out
}

pub fn read_reg(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

pub fn write_reg(t: &mut MmioTransport, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

pub fn write_features(t: &mut MmioTransport, features: u64) {
    write_reg(t, reg::DRIVER_FEATURES_SEL, 0);
    write_reg(t, reg::DRIVER_FEATURES, features as u32);
    write_reg(t, reg::DRIVER_FEATURES_SEL, 1);
    write_reg(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
}

/// ACKNOWLEDGE, DRIVER, features, FEATURES_OK. Returns the status read back.
pub fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
    use status::*;
    write_reg(t, reg::STATUS, ACKNOWLEDGE);
    write_reg(t, reg::STATUS, ACKNOWLEDGE | DRIVER);
    write_features(t, features);
    write_reg(t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    read_reg(t, reg::STATUS)
}

/// Negotiates, sets up `queues` and sets DRIVER_OK. Returns the status.
pub fn start(t: &mut MmioTransport, features: u64, queues: &[&TestQueue]) -> u32 {
    negotiate(t, features);
    for (i, q) in queues.iter().enumerate() {
        q.setup(t, i as u32);
    }
    write_reg(t, reg::STATUS, 0xf);
    read_reg(t, reg::STATUS)
}

/// Driver side of one split virtqueue.
pub struct TestQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl TestQueue {
    pub fn new(base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        Self {
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    pub fn setup(&self, t: &mut MmioTransport, index: u32) {
        write_reg(t, reg::QUEUE_SEL, index);
        write_reg(t, reg::QUEUE_NUM, u32::from(self.size));
        write_reg(t, reg::QUEUE_DESC_LOW, self.desc as u32);
        write_reg(t, reg::QUEUE_DESC_HIGH, (self.desc >> 32) as u32);
        write_reg(t, reg::QUEUE_DRIVER_LOW, self.avail as u32);
        write_reg(t, reg::QUEUE_DRIVER_HIGH, (self.avail >> 32) as u32);
        write_reg(t, reg::QUEUE_DEVICE_LOW, self.used as u32);
        write_reg(t, reg::QUEUE_DEVICE_HIGH, (self.used >> 32) as u32);
        write_reg(t, reg::QUEUE_READY, 1);
    }

    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        write_desc_at(mem, self.desc, index, addr, len, flags, next);
    }

    /// Makes `head` available.
    pub fn push_avail(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Allocates descriptor indices (wrapping) without publishing anything.
    pub fn alloc(&mut self, n: u16) -> Vec<u16> {
        (0..n)
            .map(|_| {
                let i = self.next_desc;
                self.next_desc = (self.next_desc + 1) % self.size;
                i
            })
            .collect()
    }

    /// Writes a well-linked chain of `(addr, len, writable)` buffers and
    /// makes it available. Returns the head index.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let idx = self.alloc(bufs.len() as u16);
        write_linked(mem, self.desc, &idx, bufs);
        self.push_avail(mem, idx[0]);
        idx[0]
    }

    /// Writes the `(addr, len, writable)` buffers as an indirect table at
    /// `table` and makes a one-descriptor chain pointing at it available.
    /// Returns the head index.
    pub fn add_indirect_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        table: u64,
        bufs: &[(u64, u32, bool)],
    ) -> u16 {
        let idx: Vec<u16> = (0..bufs.len() as u16).collect();
        write_linked(mem, table, &idx, bufs);
        let head = self.alloc(1)[0];
        let table_len = u32::try_from(16 * bufs.len()).unwrap();
        self.write_desc(mem, head, table, table_len, VRING_DESC_F_INDIRECT, 0);
        self.push_avail(mem, head);
        head
    }

    /// New used-ring entries `(id, len)` since the last call.
    pub fn used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % self.size);
            let a = GuestAddress(self.used + 4 + 8 * slot);
            let id: u32 = mem.read_obj(a).unwrap();
            let len: u32 = mem.read_obj(a.unchecked_add(4)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// The used ring's bytes (flags, idx, entries, avail_event).
    pub fn used_ring(&self) -> (u64, u64) {
        (self.used, 6 + 8 * u64::from(self.size))
    }

    /// The device side of this ring, without a transport: a ready
    /// virtio-queue `Queue` at its addresses (tests of the queue helpers).
    pub fn device_queue(&self, event_idx: bool) -> virtio_queue::Queue {
        use virtio_queue::QueueT;
        let mut q = virtio_queue::Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some(0));
        q.set_avail_ring_address(Some(self.avail as u32), Some(0));
        q.set_used_ring_address(Some(self.used as u32), Some(0));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q
    }

    /// Sets `used_event` (for EVENT_IDX tests).
    pub fn set_used_event(&self, mem: &GuestMemoryMmap, v: u16) {
        mem.write_obj(v, GuestAddress(self.avail + 4 + 2 * u64::from(self.size)))
            .unwrap();
    }
}

/// Writes descriptor `index` of the table at `table`.
fn write_desc_at(
    mem: &GuestMemoryMmap,
    table: u64,
    index: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    let a = GuestAddress(table + 16 * u64::from(index));
    mem.write_obj(addr, a).unwrap();
    mem.write_obj(len, a.unchecked_add(8)).unwrap();
    mem.write_obj(flags, a.unchecked_add(12)).unwrap();
    mem.write_obj(next, a.unchecked_add(14)).unwrap();
}

/// Writes `bufs` as descriptors `idx` (one each, in order) of the table at
/// `table`, each linked to the next.
fn write_linked(mem: &GuestMemoryMmap, table: u64, idx: &[u16], bufs: &[(u64, u32, bool)]) {
    for (k, (&(addr, len, w), &i)) in bufs.iter().zip(idx).enumerate() {
        let mut flags = if w { VRING_DESC_F_WRITE } else { 0 };
        let next = match idx.get(k + 1) {
            Some(&n) => {
                flags |= VRING_DESC_F_NEXT;
                n
            }
            None => 0,
        };
        write_desc_at(mem, table, i, addr, len, flags, next);
    }
}
