//! Snapshots (`state.rs`): TX chains queued at the save are sent once, RX
//! chains the device held are offered again.

use super::*;

/// What a new process does: a copy of guest memory in a new device (on a
/// new socket standing for the same TAP) and transport; the state is not
/// restored yet. The driver's side carries on.
fn reopen(f: Fixture) -> (Fixture, OwnedFd) {
    let Fixture {
        net,
        t,
        mem,
        rxq,
        txq,
        em,
        next_rx,
    } = f;
    drop((em, t, net));
    let mut bytes = vec![0u8; MEM_SIZE];
    mem.read_slice(&mut bytes, GuestAddress(0)).unwrap();
    let copy = guest_memory();
    copy.write_slice(&bytes, GuestAddress(0)).unwrap();
    let handle = GuestMemoryHandle::new(copy);
    let mem = handle.get().unwrap();
    let (dev, host) = seqpacket_pair();
    let net = Arc::new(Mutex::new(Net::with_fd(dev, MAC)));
    let t = MmioTransport::new(net.clone(), handle).unwrap();
    let mut em = Manager::new().unwrap();
    em.add_subscriber(net.clone());
    let f = Fixture {
        net,
        t,
        mem,
        rxq,
        txq,
        em,
        next_rx,
    };
    (f, host)
}

#[test]
fn queued_tx_frames_are_sent_once_by_a_new_device_restored_from_the_state() {
    let (mut f, host) = Fixture::with_socket(VIRTIO_F_VERSION_1);
    let frames: Vec<Vec<u8>> = (0..3).map(|i| framed(&payload(100, i))).collect();
    for (i, fr) in frames.iter().enumerate() {
        f.mem
            .write_slice(fr, GuestAddress(TXBUF + 0x1000 * i as u64))
            .unwrap();
    }
    let first = f.transmit(&[(TXBUF, 112, false)]);
    assert_eq!(recv_timeout(&host, 1000).as_deref(), Some(&frames[0][..]));
    assert_eq!(f.txq.used(&f.mem), vec![(u32::from(first), 0)]);
    // Two more queued, not kicked.
    let heads: Vec<u16> = (1..3)
        .map(|i| f.txq.add_chain(&f.mem, &[(TXBUF + 0x1000 * i, 112, false)]))
        .collect();
    let s = f.t.save_state().unwrap();
    assert_eq!((s.queues[1].next_avail, s.queues[1].next_used), (1, 1));
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 1);
    f.settle();
    assert!(
        recv_timeout(&host, 50).is_none(),
        "the old device is stopped"
    );

    let (mut f, host) = reopen(f);
    f.t.restore_state(&s).unwrap();
    f.settle();
    for fr in &frames[1..] {
        assert_eq!(recv_timeout(&host, 1000).as_deref(), Some(&fr[..]));
    }
    assert!(recv_timeout(&host, 50).is_none(), "sent once");
    let used = f.txq.used(&f.mem);
    let want: Vec<(u32, u32)> = heads.iter().map(|&h| (u32::from(h), 0)).collect();
    assert_eq!(used, want);
    assert_eq!(f.stats().tx_packets, 2);
}

#[test]
fn rx_buffers_the_device_held_are_offered_again_after_a_restore() {
    let (mut f, host) = Fixture::with_socket(VIRTIO_F_VERSION_1 | F_MRG_RXBUF);
    // Too little for a maximal frame: the device holds all of them.
    let bufs = f.post_rx(8, 512);
    f.settle();
    send(&host, &framed(&payload(100, 1)));
    f.settle();
    assert_eq!(f.rxq.used(&f.mem), vec![(u32::from(bufs[0].0), 112)]);
    let s = f.t.save_state().unwrap();
    // The seven unused chains go back to the avail ring.
    assert_eq!((s.queues[0].next_avail, s.queues[0].next_used), (1, 1));
    assert!(f.rxq.used(&f.mem).is_empty());

    let (mut f, host) = reopen(f);
    f.t.restore_state(&s).unwrap();
    f.settle();
    let frame = framed(&payload(600, 2));
    send(&host, &frame);
    f.settle();
    assert_eq!(
        f.rxq.used(&f.mem),
        vec![(u32::from(bufs[1].0), 512), (u32::from(bufs[2].0), 100)]
    );
    let mut got = f.read_mem(bufs[1].1, 512);
    got.extend(f.read_mem(bufs[2].1, 100));
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2, "num_buffers");
    assert_eq!(&got[12..], &frame[12..]);
}

#[test]
fn held_rx_buffers_behind_an_invalid_one_are_returned_empty() {
    let (mut f, host) = Fixture::with_socket(VIRTIO_F_VERSION_1 | F_MRG_RXBUF);
    // A frame bigger than a chain first: the device then takes chains for
    // a maximal frame before each read, so it holds several.
    let first = f.post_rx(2, 2048);
    send(&host, &framed(&payload(3000, 4)));
    f.settle();
    assert_eq!(
        f.rxq.used(&f.mem),
        vec![(u32::from(first[0].0), 2048), (u32::from(first[1].0), 964)]
    );
    let _ = f.t.interrupt_event().read();
    write_reg(&mut f.t, reg::INTERRUPT_ACK, 1);
    let a = f.rxq.add_chain(&f.mem, &[(RXBUF + 0x10000, 2048, true)]);
    let bad = f.rxq.add_chain(&f.mem, &[(RXBUF + 0x11000, 2048, false)]);
    let c = f.rxq.add_chain(&f.mem, &[(RXBUF + 0x12000, 2048, true)]);
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 0);
    f.settle();
    assert_eq!(f.rxq.used(&f.mem), vec![(u32::from(bad), 0)]);
    let _ = f.t.interrupt_event().read();
    write_reg(&mut f.t, reg::INTERRUPT_ACK, 1);
    let s = f.t.save_state().unwrap();
    // `c`, the last one taken, goes back to the ring; `a` cannot (the
    // ring would give `bad` again) and is returned empty, with an
    // interrupt.
    assert_eq!(f.rxq.used(&f.mem), vec![(u32::from(a), 0)]);
    assert_eq!((s.queues[0].next_avail, s.queues[0].next_used), (4, 4));
    assert_eq!(s.interrupt_status, crate::virtio::INT_USED_RING);

    f.t.restore_state(&s).unwrap();
    f.settle();
    send(&host, &framed(&payload(64, 3)));
    f.settle();
    assert_eq!(f.rxq.used(&f.mem), vec![(u32::from(c), 76)]);
}

#[test]
fn a_frame_waiting_for_rx_buffers_is_dropped_at_the_save_and_counted() {
    let (mut f, host) = Fixture::with_socket(VIRTIO_F_VERSION_1 | F_MRG_RXBUF);
    let bufs = f.post_rx(1, 512);
    f.settle();
    // Too big for the one buffer: read ahead, it waits for more.
    send(&host, &framed(&payload(3000, 4)));
    f.settle();
    assert!(f.rxq.used(&f.mem).is_empty());
    let s = f.t.save_state().unwrap();
    assert_eq!(f.stats().rx_dropped, 1);
    assert_eq!(s.queues[0].next_avail, 0, "the buffer is offered again");
    f.t.restore_state(&s).unwrap();
    f.settle();
    let small = framed(&payload(50, 5));
    send(&host, &small);
    f.settle();
    assert_eq!(f.rxq.used(&f.mem), vec![(u32::from(bufs[0].0), 62)]);
    assert_eq!(&f.read_mem(bufs[0].1, 62)[12..], &small[12..]);
}
