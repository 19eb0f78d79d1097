//! Dirty pages: what a request writes into guest memory shows up in the
//! guest memory's bitmap (live migration), and nothing else does.

use std::collections::BTreeSet;

use super::*;
use crate::virtio::clear_dirty_pages;

/// Two data buffers with an untouched gap of 14 pages between them.
const SEG_A: (u64, u32) = (DATA + 0x800, 0x1000);
const SEG_B: (u64, u32) = (DATA + 0x1_0000, 0x2000);

/// Publishes a request whose data are `SEG_A` and `SEG_B`, forgets what the
/// driver side wrote so far, serves it and returns the pages it dirtied.
fn serve_split_request(f: &mut Fixture, req_type: u32, writable: bool) -> BTreeSet<u64> {
    f.hdr(req_type, 4);
    f.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let head = f.q.add_chain(
        &f.mem,
        &[
            (HDR, 16, false),
            (SEG_A.0, SEG_A.1, writable),
            (SEG_B.0, SEG_B.1, writable),
            (STATUS, 1, true),
        ],
    );
    // The test wrote the header, descriptors and avail ring as the driver:
    // not the device's doing.
    clear_dirty_pages(&f.mem);
    let want_len = if writable { SEG_A.1 + SEG_B.1 + 1 } else { 1 };
    assert_eq!(f.notify_and_wait(head), want_len);
    assert_eq!(f.status(), S_OK);
    take_dirty_addrs(&f.mem)
}

/// The status byte's page and the used ring's.
fn completion_pages(f: &Fixture) -> Vec<(u64, u64)> {
    vec![(STATUS, 1), f.q.used_ring()]
}

fn a_read_marks_exactly_its_data_status_and_used_ring_pages(mut f: Fixture) {
    let dirty = serve_split_request(&mut f, T_IN, true);
    let mut want = completion_pages(&f);
    want.extend([(SEG_A.0, u64::from(SEG_A.1)), (SEG_B.0, u64::from(SEG_B.1))]);
    assert_eq!(dirty, pages_of(&want));
    assert!(!dirty.contains(&(DATA + 0x2000)), "the gap stays clean");
    // The data did arrive (sector 4 onwards: byte value = sector number).
    let mut b = [0u8; 1];
    f.mem.read_slice(&mut b, GuestAddress(SEG_B.0)).unwrap();
    assert_eq!(b[0], 4 + (SEG_A.1 / 512) as u8);
    assert!(
        take_dirty_addrs(&f.mem).is_empty(),
        "taking them reset them"
    );
}

#[test]
fn a_read_served_by_the_sync_engine_marks_its_data_status_and_used_ring_pages_and_no_others() {
    a_read_marks_exactly_its_data_status_and_used_ring_pages(Fixture::new(false));
}

#[test]
fn a_read_served_by_io_uring_marks_its_data_status_and_used_ring_pages_and_no_others() {
    a_read_marks_exactly_its_data_status_and_used_ring_pages(Fixture::uring());
}

#[test]
fn a_read_through_the_o_direct_bounce_buffer_marks_its_data_pages() {
    let mut f = Fixture::direct();
    // An odd address O_DIRECT cannot take: the bounce buffer serves it.
    f.hdr(T_IN, 2);
    let head = f.q.add_chain(
        &f.mem,
        &[
            (HDR, 16, false),
            (DATA + 0xfff, 1024, true),
            (STATUS, 1, true),
        ],
    );
    clear_dirty_pages(&f.mem);
    assert_eq!(f.notify_and_wait(head), 1025);
    let mut want = completion_pages(&f);
    want.push((DATA + 0xfff, 1024));
    assert_eq!(take_dirty_addrs(&f.mem), pages_of(&want));
}

#[test]
fn a_write_request_marks_only_its_status_and_used_ring_pages() {
    let mut f = Fixture::new(false);
    let dirty = serve_split_request(&mut f, T_OUT, false);
    assert_eq!(dirty, pages_of(&completion_pages(&f)));
}

#[test]
fn a_get_id_request_marks_its_buffer() {
    let mut f = Fixture::new(false);
    f.hdr(T_GET_ID, 0);
    let head = f.q.add_chain(
        &f.mem,
        &[
            (HDR, 16, false),
            (DATA + 0x5000, 20, true),
            (STATUS, 1, true),
        ],
    );
    clear_dirty_pages(&f.mem);
    assert_eq!(f.notify_and_wait(head), 21);
    let mut want = completion_pages(&f);
    want.push((DATA + 0x5000, 20));
    assert_eq!(take_dirty_addrs(&f.mem), pages_of(&want));
}

#[test]
fn reads_io_uring_has_in_flight_at_a_reset_still_mark_their_buffers() {
    let mut f = Fixture::uring();
    for i in 0..16 {
        f.publish(i, T_IN, i, Some((&[0u8; 512], true)));
    }
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(f.run(), 1);
    assert_eq!(f.blk.lock().unwrap().in_flight(), 16);
    // Nothing is reaped before the next wake-up, so nothing is marked yet.
    clear_dirty_pages(&f.mem);
    write_reg(&mut f.t, reg::STATUS, 0);
    assert_eq!(f.blk.lock().unwrap().in_flight(), 0);
    // The kernel filled the buffers; no status or used entry was written.
    assert_eq!(take_dirty_addrs(&f.mem), pages_of(&[(DATA, 16 * 512)]));
}
