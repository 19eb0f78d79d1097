//! A disk's limits (`iops`, `mib_s`): what they hold back goes later, in
//! order, and nothing is lost; the limits change while the disk runs.

use std::time::{Duration, Instant};

use super::*;

/// Publishes `n` GET_ID requests (sharing their buffers) without a kick.
fn publish_get_ids(f: &mut Fixture, n: usize) -> Vec<u32> {
    f.hdr(T_GET_ID, 0);
    let bufs = [
        (HDR, 16, false),
        (DATA, ID_BYTES as u32, true),
        (STATUS, 1, true),
    ];
    (0..n)
        .map(|_| u32::from(f.q.add_chain(&f.mem, &bufs)))
        .collect()
}

fn limit_iops(f: &Fixture, iops: u64) {
    f.blk.lock().unwrap().throttle_control().set(IoLimits {
        iops,
        bytes_per_s: 0,
    });
}

#[test]
fn requests_over_the_iops_limit_wait_for_the_timer_and_all_complete_in_order() {
    let mut f = Fixture::new(false);
    // Five a second: a full bucket takes five at once, then one per 200 ms.
    limit_iops(&f, 5);
    let heads = publish_get_ids(&mut f, 7);
    let t0 = Instant::now();
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 0);
    f.run();
    let first = f.q.used(&f.mem);
    assert_eq!(first.len(), 5, "a second's worth at once: {first:?}");
    assert!(f.stats().throttled >= 1);
    // No kick from the guest: the limits' timer brings the rest.
    let mut all = first;
    all.extend(f.run_until_used(2));
    let waited = t0.elapsed();
    let want: Vec<(u32, u32)> = heads.iter().map(|&h| (h, 21)).collect();
    assert_eq!(all, want, "every request once, in order");
    // The seventh could go no earlier than 400 ms after the first five.
    assert!(waited >= Duration::from_millis(390), "{waited:?}");
    assert_eq!(f.stats().other_requests, 7);
}

#[test]
fn lifting_the_limit_while_requests_wait_serves_them_at_the_next_wake_up() {
    let mut f = Fixture::new(false);
    limit_iops(&f, 1);
    let heads = publish_get_ids(&mut f, 4);
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 0);
    f.run();
    assert_eq!(f.q.used(&f.mem).len(), 1);
    limit_iops(&f, 0);
    // The guest kicks again (a new request); the held ones go with it.
    let more = publish_get_ids(&mut f, 1);
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 0);
    f.run();
    let rest = f.q.used(&f.mem);
    let want: Vec<(u32, u32)> = heads[1..].iter().chain(&more).map(|&h| (h, 21)).collect();
    assert_eq!(rest, want);
}

#[test]
fn a_byte_limit_counts_the_data_of_each_request() {
    let mut f = Fixture::new(false);
    // 1 KiB a second: a request goes while the bucket is out of debt, so
    // three 512-byte reads at once (the third takes it 512 into debt),
    // the fourth waits.
    f.blk.lock().unwrap().throttle_control().set(IoLimits {
        iops: 0,
        bytes_per_s: 1024,
    });
    f.hdr(T_IN, 0);
    let bufs = [(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)];
    for _ in 0..4 {
        f.q.add_chain(&f.mem, &bufs);
    }
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 0);
    f.run();
    assert_eq!(f.q.used(&f.mem).len(), 3);
    assert_eq!(f.stats().throttled, 1, "one wait, counted once");
}

#[test]
fn a_limit_lifted_while_requests_wait_serves_them_without_another_kick() {
    let mut f = Fixture::new(false);
    limit_iops(&f, 2);
    let heads = publish_get_ids(&mut f, 4);
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 0);
    f.run();
    assert_eq!(f.q.used(&f.mem).len(), 2);
    limit_iops(&f, 0);
    // The guest sends nothing more (it was told not to kick: the device
    // is busy with its queue); lifting the limit wakes the disk's thread,
    // which serves them at once, long before the old timer (500 ms).
    let t0 = Instant::now();
    let rest = f.run_until_used(2);
    assert!(
        t0.elapsed() < Duration::from_millis(400),
        "{:?}",
        t0.elapsed()
    );
    let want: Vec<(u32, u32)> = heads[2..].iter().map(|&h| (h, 21)).collect();
    assert_eq!(rest, want);
}

#[test]
fn under_a_limit_a_backlog_on_one_queue_does_not_starve_another() {
    let mut f = super::queues::two_queues(IoEngine::Sync);
    // Ten a second, burst spent on queue 0's backlog first.
    limit_iops(&f, 10);
    publish_get_ids(&mut f, 30);
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 0);
    f.run();
    assert_eq!(f.q.used(&f.mem).len(), 10);
    // Queue 1 gets one request now, while queue 0 still has 20 waiting.
    let bufs = [
        (HDR, 16, false),
        (DATA, ID_BYTES as u32, true),
        (STATUS, 1, true),
    ];
    let head = f.more[0].add_chain(&f.mem, &bufs);
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 1);
    // Passes take turns starting at each queue: queue 1's request goes
    // within the next few tokens, not after queue 0's 20 (2 s).
    let t0 = Instant::now();
    let mut got = Vec::new();
    while got.is_empty() && t0.elapsed() < Duration::from_secs(5) {
        f.run();
        got = f.more[0].used(&f.mem);
    }
    assert_eq!(got, vec![(u32::from(head), 21)]);
    assert!(
        t0.elapsed() < Duration::from_millis(1000),
        "{:?}",
        t0.elapsed()
    );
}
