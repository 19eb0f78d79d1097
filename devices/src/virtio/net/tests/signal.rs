//! Interrupts during a long wake-up: the device signals the guest every
//! [`SIGNAL_BATCH`] used entries, not only at the end, so the driver
//! recycles buffers while the device goes on; EVENT_IDX still decides.

use super::*;
use crate::virtio::VIRTIO_RING_F_EVENT_IDX;

/// Interrupts the device has asked for. (The irqfd counts fewer: without
/// KVM keeping acknowledgements, as here, it is written only when
/// INTERRUPT_STATUS goes from clear to set, and nobody acknowledges during
/// a pass here.)
fn asked(f: &Fixture) -> u64 {
    f.t.interrupt().asked()
}

/// `n` TX chains of one small frame each, one kick, one event-loop pass;
/// the interrupts that pass signalled.
fn one_tx_pass(f: &mut Fixture, n: usize) -> u64 {
    let frame = framed(&payload(60, 3));
    f.mem.write_slice(&frame, GuestAddress(TXBUF)).unwrap();
    for _ in 0..n {
        f.txq
            .add_chain(&f.mem, &[(TXBUF, frame.len() as u32, false)]);
    }
    let before = asked(f);
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 1);
    assert_eq!(used_per_pass(f, true), vec![n], "one wake-up");
    asked(f) - before
}

#[test]
fn a_long_tx_wake_up_signals_the_guest_every_batch_not_only_at_its_end() {
    let (mut f, _host) = Fixture::with_socket(VIRTIO_F_VERSION_1);
    let n = 2 * usize::from(SIGNAL_BATCH) + 2;
    // After the 64th, the 128th, and the last.
    assert_eq!(one_tx_pass(&mut f, n), 3);
}

#[test]
fn a_long_rx_wake_up_signals_the_guest_every_batch_not_only_at_its_end() {
    let (mut f, host) = Fixture::with_socket(VIRTIO_F_VERSION_1);
    let n = 2 * usize::from(SIGNAL_BATCH) + 2;
    f.post_rx(n + 10, 2048);
    f.settle();
    for i in 0..n {
        send(&host, &framed(&payload(100, i as u8)));
    }
    let before = asked(&f);
    assert_eq!(used_per_pass(&mut f, false), vec![n], "one wake-up");
    assert_eq!(asked(&f) - before, 3);
    assert_eq!(f.stats().rx_packets, n as u64);
}

#[test]
fn with_event_idx_a_long_wake_up_signals_no_more_than_the_guest_asked_for() {
    let (mut f, _host) = Fixture::with_socket(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
    // The driver wants an interrupt once entry 99 is used: one, which
    // the batch that ends at 128 gives (ignoring EVENT_IDX would give 3).
    f.txq.set_used_event(&f.mem, 99);
    let n = 2 * usize::from(SIGNAL_BATCH) + 2;
    assert_eq!(one_tx_pass(&mut f, n), 1);
}

#[test]
fn rx_counts_the_buffers_a_merged_frame_takes_towards_the_next_interrupt() {
    let (mut f, host) = Fixture::with_socket(VIRTIO_F_VERSION_1 | F_MRG_RXBUF);
    // Frames of two 1 KiB buffers each: 40 frames use 80 entries.
    f.post_rx(200, 1024);
    f.settle();
    for i in 0..40 {
        send(&host, &framed(&payload(1500, i as u8)));
    }
    let before = asked(&f);
    assert_eq!(used_per_pass(&mut f, false), vec![80], "one wake-up");
    // After the 64th entry (frame 32), and at the end.
    assert_eq!(asked(&f) - before, 2);
    assert_eq!(f.stats().rx_packets, 40);
}
