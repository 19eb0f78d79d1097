//! The virtio-mmio driver as [`Guest`] helpers: probe, feature
//! negotiation, queue setup, descriptors, submission and virtio-blk
//! requests.

use super::{blk, reg, slot_base, status, Guest, VirtQueue, SCRATCH};
use super::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};

impl Guest {
    // ---- the virtio-mmio driver ----

    /// Prints `SLOT<i> MAGIC=.. VERSION=.. DEVICE=.. VENDOR=..`.
    pub fn virtio_probe(&mut self, slot: u32) -> &mut Self {
        let b = slot_base(slot);
        self.print(&format!("SLOT{slot} "))
            .print_u32_at("MAGIC", b + reg::MAGIC)
            .print_u32_at("VERSION", b + reg::VERSION)
            .print_u32_at("DEVICE", b + reg::DEVICE_ID)
            .print_u32_at("VENDOR", b + reg::VENDOR_ID)
            .print("\r\n")
    }

    /// Reset, ACKNOWLEDGE, DRIVER; checks the device offers VERSION_1
    /// (feature bit 32) and accepts `VERSION_1 | features_low`; sets
    /// FEATURES_OK and checks that it stuck. Prints the device's low and
    /// high feature words (`FEATURES=hi:lo`).
    pub fn virtio_init(&mut self, base: u32, features_low: u32) -> &mut Self {
        use status::*;
        self.mmio_write32(base + reg::STATUS, 0)
            .mmio_read32_to_eax(base + reg::STATUS)
            .expect_eax(0, "status after reset")
            .mmio_write32(base + reg::STATUS, ACKNOWLEDGE)
            .mmio_write32(base + reg::STATUS, ACKNOWLEDGE | DRIVER);
        self.mmio_write32(base + reg::DEVICE_FEATURES_SEL, 1)
            .mmio_read32_to_eax(base + reg::DEVICE_FEATURES)
            .store_eax(SCRATCH)
            .and_eax(1)
            .expect_eax(1, "VERSION_1 not offered");
        self.mmio_write32(base + reg::DEVICE_FEATURES_SEL, 0)
            .mmio_read32_to_eax(base + reg::DEVICE_FEATURES)
            .store_eax(SCRATCH + 4);
        self.print("FEATURES=")
            .mmio_read32_to_eax(SCRATCH)
            .print_eax_hex()
            .print(":")
            .mmio_read32_to_eax(SCRATCH + 4)
            .print_eax_hex()
            .print("\r\n");
        self.mmio_write32(base + reg::DRIVER_FEATURES_SEL, 1)
            .mmio_write32(base + reg::DRIVER_FEATURES, 1)
            .mmio_write32(base + reg::DRIVER_FEATURES_SEL, 0)
            .mmio_write32(base + reg::DRIVER_FEATURES, features_low)
            .mmio_write32(base + reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK)
            .mmio_read32_to_eax(base + reg::STATUS)
            .expect_eax(
                ACKNOWLEDGE | DRIVER | FEATURES_OK,
                "FEATURES_OK did not stick",
            )
            .print("FEATURES_OK\r\n")
    }

    /// Selects queue `q.index`, checks QueueNumMax >= `q.size` and that the
    /// queue is not ready yet, zeroes its rings, sets size and addresses,
    /// then QueueReady = 1 (checked).
    pub fn setup_queue(&mut self, q: &VirtQueue) -> &mut Self {
        let b = q.base;
        self.mem_fill(q.desc, 0, 0x300);
        self.mmio_write32(b + reg::QUEUE_SEL, q.index)
            .mmio_read32_to_eax(b + reg::QUEUE_READY)
            .expect_eax(0, "queue ready before setup")
            .print(&format!("QUEUE{}_MAX=", q.index))
            .mmio_read32_to_eax(b + reg::QUEUE_NUM_MAX)
            .print_eax_hex()
            .print("\r\n")
            .mmio_read32_to_eax(b + reg::QUEUE_NUM_MAX)
            .emit(&[0x3d])
            .emit32(u32::from(q.size)); // cmp eax, size
        let ok = self.label();
        self.emit(&[0x0f, 0x83]).rel32_to(ok); // jae ok
        self.fail("QueueNumMax below our queue size");
        self.bind(ok);
        self.mmio_write32(b + reg::QUEUE_NUM, u32::from(q.size))
            .mmio_write32(b + reg::QUEUE_DESC_LOW, q.desc)
            .mmio_write32(b + reg::QUEUE_DESC_HIGH, 0)
            .mmio_write32(b + reg::QUEUE_DRIVER_LOW, q.avail)
            .mmio_write32(b + reg::QUEUE_DRIVER_HIGH, 0)
            .mmio_write32(b + reg::QUEUE_DEVICE_LOW, q.used)
            .mmio_write32(b + reg::QUEUE_DEVICE_HIGH, 0)
            .mmio_write32(b + reg::QUEUE_READY, 1)
            .mmio_read32_to_eax(b + reg::QUEUE_READY)
            .expect_eax(1, "QueueReady did not stick")
    }

    /// Sets DRIVER_OK and checks the status reads back as a running device.
    pub fn driver_ok(&mut self, base: u32) -> &mut Self {
        use status::*;
        let all = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
        self.mmio_write32(base + reg::STATUS, all)
            .mmio_read32_to_eax(base + reg::STATUS)
            .expect_eax(all, "DRIVER_OK did not stick")
            .print("DRIVER_OK\r\n")
    }

    /// Writes descriptor `i` of `q`.
    pub fn write_desc(
        &mut self,
        q: &VirtQueue,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> &mut Self {
        self.write_desc_at(q.desc_addr(i), addr, len, flags, next)
    }

    /// Writes a descriptor at `d` (in a queue's table or an indirect one).
    pub fn write_desc_at(
        &mut self,
        d: u32,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> &mut Self {
        self.mem_write32(d, addr as u32)
            .mem_write32(d + 4, (addr >> 32) as u32)
            .mem_write32(d + 8, len)
            .mem_write32(d + 12, u32::from(flags) | (u32::from(next) << 16))
    }

    /// Makes `head` available and notifies: avail.ring[idx % size] = head,
    /// avail.idx += 1, QueueNotify = queue index. Returns (through `q`) the
    /// new avail index, which is also the used index to wait for when
    /// requests complete in order.
    pub fn submit(&mut self, q: &mut VirtQueue, head: u16) -> &mut Self {
        let slot = q.next_avail % q.size;
        q.next_avail = q.next_avail.wrapping_add(1);
        self.mem_write16(q.avail + 4 + 2 * u32::from(slot), head)
            .mem_write16(q.avail + 2, q.next_avail)
            .mmio_write32(q.base + reg::QUEUE_NOTIFY, q.index)
    }

    /// Makes several heads available at once with one notification.
    pub fn submit_many(&mut self, q: &mut VirtQueue, heads: &[u16]) -> &mut Self {
        for &head in heads {
            let slot = q.next_avail % q.size;
            q.next_avail = q.next_avail.wrapping_add(1);
            self.mem_write16(q.avail + 4 + 2 * u32::from(slot), head);
        }
        self.mem_write16(q.avail + 2, q.next_avail)
            .mmio_write32(q.base + reg::QUEUE_NOTIFY, q.index)
    }

    /// Waits until the used index reaches `q.next_avail` (every submitted
    /// chain returned).
    pub fn wait_used(&mut self, q: &VirtQueue, what: &str) -> &mut Self {
        self.poll_u16_until_eq(q.used_idx_addr(), q.next_avail, what)
    }

    /// Writes a virtio-blk request header (`type, reserved, sector`) at `at`.
    pub fn blk_header(&mut self, at: u32, req_type: u32, sector: u64) -> &mut Self {
        self.mem_write32(at, req_type)
            .mem_write32(at + 4, 0)
            .mem_write32(at + 8, sector as u32)
            .mem_write32(at + 12, (sector >> 32) as u32)
    }

    /// Builds a three-descriptor block request in descriptors
    /// `first..first+3` (or two when `data` is `None`): header (readable),
    /// data (readable for OUT, writable otherwise), status byte (writable,
    /// preset to 0xff), submits it and waits for completion.
    #[allow(clippy::too_many_arguments)]
    pub fn blk_request(
        &mut self,
        q: &mut VirtQueue,
        first: u16,
        hdr: u32,
        req_type: u32,
        sector: u64,
        data: Option<(u64, u32)>,
        status_at: u32,
    ) -> &mut Self {
        self.blk_request_submit(q, first, hdr, req_type, sector, data, status_at);
        let what = format!("block request type {req_type} sector {sector}");
        self.wait_used(q, &what)
    }

    /// [`Guest::blk_request`] without the wait.
    #[allow(clippy::too_many_arguments)]
    pub fn blk_request_submit(
        &mut self,
        q: &mut VirtQueue,
        first: u16,
        hdr: u32,
        req_type: u32,
        sector: u64,
        data: Option<(u64, u32)>,
        status_at: u32,
    ) -> &mut Self {
        self.blk_chain(q, first, hdr, req_type, sector, data, status_at)
            .submit(q, first)
    }

    /// Writes the header and descriptors of a block request (see
    /// [`Guest::blk_request`]) without making it available.
    #[allow(clippy::too_many_arguments)]
    pub fn blk_chain(
        &mut self,
        q: &VirtQueue,
        first: u16,
        hdr: u32,
        req_type: u32,
        sector: u64,
        data: Option<(u64, u32)>,
        status_at: u32,
    ) -> &mut Self {
        self.blk_header(hdr, req_type, sector)
            .mem_write8(status_at, 0xff);
        self.write_desc(q, first, u64::from(hdr), 16, VIRTQ_DESC_F_NEXT, first + 1);
        let mut st = first + 1;
        if let Some((addr, len)) = data {
            let dir = if req_type == blk::T_OUT {
                0
            } else {
                VIRTQ_DESC_F_WRITE
            };
            self.write_desc(q, first + 1, addr, len, dir | VIRTQ_DESC_F_NEXT, first + 2);
            st = first + 2;
        }
        self.write_desc(q, st, u64::from(status_at), 1, VIRTQ_DESC_F_WRITE, 0)
    }
}
