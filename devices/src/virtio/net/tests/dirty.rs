//! Dirty pages: frames the device delivers show up in the guest memory's
//! bitmap (live migration), whether the TAP wrote them straight into the
//! buffers or they came through the bounce buffer.

use super::*;
use crate::virtio::clear_dirty_pages;

#[test]
fn a_frame_read_straight_into_an_rx_buffer_marks_the_pages_it_filled_and_the_used_ring() {
    let (mut f, host) = Fixture::with_socket(VIRTIO_F_VERSION_1);
    // Two chains of two pages each; the frame fills a page and a half of
    // the first.
    let bufs = f.post_rx(2, 0x2000);
    f.settle();
    clear_dirty_pages(&f.mem);
    let frame = framed(&payload(6000 - VNET_HDR_LEN, 1));
    send(&host, &frame);
    f.settle();
    assert_eq!(f.rxq.used(&f.mem), vec![(u32::from(bufs[0].0), 6000)]);
    assert_eq!(
        take_dirty_addrs(&f.mem),
        pages_of(&[(bufs[0].1, 6000), f.rxq.used_ring()])
    );
    assert!(
        take_dirty_addrs(&f.mem).is_empty(),
        "taking them reset them"
    );
}

#[test]
fn a_mergeable_frame_read_in_place_marks_only_the_chains_it_used() {
    let (mut f, host) = Fixture::with_socket(VIRTIO_F_VERSION_1 | F_MRG_RXBUF);
    let bufs = f.post_rx(64, 0x1000);
    f.settle();
    clear_dirty_pages(&f.mem);
    // The first frame bigger than a chain goes into the front chain and
    // the bounce buffer (then copied on); the second is read wide, in
    // place over the chains for a maximal frame.
    let frame = framed(&payload(0x2100 - VNET_HDR_LEN, 2));
    for _ in 0..2 {
        send(&host, &frame);
    }
    f.settle();
    assert_eq!(f.rxq.used(&f.mem).len(), 6);
    assert_eq!(
        take_dirty_addrs(&f.mem),
        pages_of(&[(bufs[0].1, 0x2100), (bufs[3].1, 0x2100), f.rxq.used_ring()])
    );
}

#[test]
fn a_frame_read_partly_in_place_marks_the_pages_of_both_parts() {
    let (mut f, host) = Fixture::with_socket(VIRTIO_F_VERSION_1 | F_MRG_RXBUF);
    // Chains of two pages: the first frame fits its chain and fills one
    // page and a half of it (the TAP's write, which vm-memory never sees:
    // `num_buffers` alone would mark only the first page); the second
    // overflows its chain, its rest copied into the next.
    let bufs = f.post_rx(4, 0x2000);
    f.settle();
    clear_dirty_pages(&f.mem);
    send(&host, &framed(&payload(0x1800 - VNET_HDR_LEN, 3)));
    f.settle();
    assert_eq!(f.rxq.used(&f.mem), vec![(u32::from(bufs[0].0), 0x1800)]);
    assert_eq!(
        take_dirty_addrs(&f.mem),
        pages_of(&[(bufs[0].1, 0x1800), f.rxq.used_ring()])
    );
    send(&host, &framed(&payload(0x2800 - VNET_HDR_LEN, 4)));
    f.settle();
    assert_eq!(f.rxq.used(&f.mem).len(), 2);
    assert_eq!(
        take_dirty_addrs(&f.mem),
        pages_of(&[(bufs[1].1, 0x2800), f.rxq.used_ring()])
    );
}

#[test]
fn a_frame_delivered_through_the_bounce_buffer_marks_its_rx_buffers() {
    let (mut f, host) = Fixture::with_socket(VIRTIO_F_VERSION_1 | F_MRG_RXBUF);
    // One chain of a thousand 1-byte descriptors (indirect): more iovecs
    // than one readv takes, so the frame is read into the bounce buffer
    // and copied in.
    let table = TXBUF;
    let descs: Vec<(u64, u32, bool)> = (0..1100).map(|i| (RXBUF + i, 1, true)).collect();
    let head = f.rxq.add_indirect_chain(&f.mem, table, &descs);
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 0);
    f.settle();
    clear_dirty_pages(&f.mem);
    let frame = framed(&payload(100, 5));
    send(&host, &frame);
    f.settle();
    assert_eq!(f.rxq.used(&f.mem), vec![(u32::from(head), 112)]);
    assert_eq!(f.read_mem(RXBUF + 12, 100), frame[12..]);
    assert_eq!(
        take_dirty_addrs(&f.mem),
        pages_of(&[(RXBUF, 112), f.rxq.used_ring()])
    );
}

#[test]
fn without_mrg_rxbuf_a_frame_read_through_the_bounce_buffer_stays_in_its_one_chain() {
    let (mut f, host) = Fixture::with_socket(VIRTIO_F_VERSION_1);
    // Two such chains of 1,100 bytes; a frame of 2,000 would need both,
    // which only MRG_RXBUF allows: it is cut to its chain, as a direct
    // read into the chain would cut it.
    let a: Vec<(u64, u32, bool)> = (0..1100).map(|i| (RXBUF + i, 1, true)).collect();
    let b: Vec<(u64, u32, bool)> = (0..1100).map(|i| (RXBUF + 0x1000 + i, 1, true)).collect();
    let first = f.rxq.add_indirect_chain(&f.mem, TXBUF, &a);
    let second = f.rxq.add_indirect_chain(&f.mem, TXBUF + 0x10000, &b);
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 0);
    f.settle();
    send(&host, &framed(&payload(2000 - VNET_HDR_LEN, 6)));
    f.settle();
    assert_eq!(f.rxq.used(&f.mem), vec![(u32::from(first), 1100)]);
    let small = framed(&payload(100, 7));
    send(&host, &small);
    f.settle();
    assert_eq!(f.rxq.used(&f.mem), vec![(u32::from(second), 112)]);
    assert_eq!(f.read_mem(RXBUF + 0x1000 + 12, 100), small[12..]);
}

#[test]
fn a_transmitted_frame_marks_only_the_tx_used_ring() {
    let (mut f, host) = Fixture::with_socket(VIRTIO_F_VERSION_1);
    let frame = framed(&payload(3000, 4));
    f.mem.write_slice(&frame, GuestAddress(TXBUF)).unwrap();
    let head = f
        .txq
        .add_chain(&f.mem, &[(TXBUF, frame.len() as u32, false)]);
    clear_dirty_pages(&f.mem);
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 1);
    f.settle();
    assert_eq!(recv_timeout(&host, 1000).unwrap(), frame);
    assert_eq!(f.txq.used(&f.mem), vec![(u32::from(head), 0)]);
    assert_eq!(take_dirty_addrs(&f.mem), pages_of(&[f.txq.used_ring()]));
}
