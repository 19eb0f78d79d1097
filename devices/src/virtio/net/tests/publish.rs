//! A frame spread over several RX buffers (MRG_RXBUF) becomes visible to
//! the driver all at once: a driver polling the used ring while the
//! device writes (Linux's NAPI on its vCPU, while the VMM's thread
//! delivers) must never find a frame's first entry, which says how many
//! buffers the frame took, without the others. Linux drops such a frame
//! and takes its rest for frames of their own.

use std::sync::atomic::{AtomicBool, AtomicU16};

use super::*;

/// Frames of 1,400 bytes over 512-byte buffers: three buffers each.
const FRAME: usize = 1400;
const PER_FRAME: u16 = 3;
const FRAMES_PER_ROUND: usize = 85;
const ROUNDS: usize = 40;
/// Frames sent between event-loop passes.
const BATCH: usize = 17;

/// Follows the used ring as a polling driver does, from another thread,
/// until `stop`: at each frame's first entry, checks that the used index
/// it read already covers all of the frame's buffers. Returns the frames
/// seen, or the first frame seen half published.
fn watch(
    mem: Arc<GuestMemoryMmap>,
    q: (u64, u64, u16),
    seen: Arc<AtomicU16>,
    stop: Arc<AtomicBool>,
) -> Result<u64, String> {
    let (desc, used, size) = q;
    let (mut pos, mut left, mut frames) = (0u16, 0u16, 0u64);
    loop {
        let done = stop.load(Ordering::Acquire);
        let idx = u16::from_le(
            mem.load::<u16>(GuestAddress(used + 2), Ordering::Acquire)
                .map_err(|e| e.to_string())?,
        );
        while pos != idx {
            if left == 0 {
                let slot = u64::from(pos % size);
                let id: u32 = mem
                    .read_obj(GuestAddress(used + 4 + 8 * slot))
                    .map_err(|e| e.to_string())?;
                let addr: u64 = mem
                    .read_obj(GuestAddress(desc + 16 * u64::from(id)))
                    .map_err(|e| e.to_string())?;
                let n: u16 = mem
                    .read_obj(GuestAddress(addr + 10))
                    .map_err(|e| e.to_string())?;
                let published = idx.wrapping_sub(pos);
                if n == 0 || published < n {
                    return Err(format!(
                        "frame {frames} at used entry {pos}: num_buffers {n}, \
                         {published} entries published"
                    ));
                }
                left = n;
                frames += 1;
            }
            left -= 1;
            pos = pos.wrapping_add(1);
            seen.store(pos, Ordering::Release);
        }
        if done {
            return Ok(frames);
        }
        std::hint::spin_loop();
    }
}

#[test]
fn a_driver_polling_the_used_ring_never_sees_a_merged_frame_half_published() {
    let (mut f, host) = Fixture::with_socket(VIRTIO_F_VERSION_1 | F_MRG_RXBUF);
    let seen = Arc::new(AtomicU16::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (mem, seen, stop) = (f.mem.clone(), seen.clone(), stop.clone());
        let q = (f.rxq.desc, f.rxq.used, f.rxq.size);
        std::thread::spawn(move || watch(mem, q, seen, stop))
    };
    let mut want: u16 = 0;
    for round in 0..ROUNDS {
        // Every buffer of the last round is used and was looked at: the
        // same memory serves again.
        f.next_rx = RXBUF;
        f.post_rx(FRAMES_PER_ROUND * usize::from(PER_FRAME), 512);
        f.settle();
        let frame = framed(&payload(FRAME, round as u8));
        for _ in 0..FRAMES_PER_ROUND / BATCH {
            for _ in 0..BATCH {
                send(&host, &frame);
            }
            // The device delivers while the watcher reads.
            f.settle();
        }
        want = want.wrapping_add(FRAMES_PER_ROUND as u16 * PER_FRAME);
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.load(Ordering::Acquire) != want && !watcher.is_finished() {
            assert!(Instant::now() < deadline, "the watcher fell behind");
            std::thread::yield_now();
        }
        if watcher.is_finished() {
            break;
        }
    }
    stop.store(true, Ordering::Release);
    let frames = watcher.join().unwrap();
    assert_eq!(frames, Ok((ROUNDS * FRAMES_PER_ROUND) as u64));
    assert_eq!(f.stats().rx_packets, (ROUNDS * FRAMES_PER_ROUND) as u64);
}
