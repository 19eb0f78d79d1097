//! Serving the request queues: popping chains, handing their I/O to the
//! engine, and returning completions to the guest.

use super::*;
use virtio_queue::QueueOwnedT;

/// The longest one wake-up keeps serving what polling finds.
const POLL_SPAN: Duration = Duration::from_micros(500);

impl Block {
    /// Serves the available requests of every ready queue, at most a
    /// budget's worth of each (see the module's documentation), then
    /// signals the guest if it wants an interrupt. Called from the event
    /// loop on a queue notification. Returns how many chains it took.
    pub fn process_queue(&mut self) -> usize {
        self.serve_queues(true)
    }

    /// [`process_queue`](Self::process_queue); `rearm` turns the guest's
    /// kicks back on once a queue is empty and looks once more (what a
    /// wake-up must do before the thread sleeps). Polling passes `false`:
    /// its kicks stay off until it ends (see [`Self::suppress_kicks`]).
    fn serve_queues(&mut self, rearm: bool) -> usize {
        let Some(active) = self.active.as_mut() else {
            return 0;
        };
        let mut taken = 0;
        let mem = active.mem.clone();
        let mut notify = false;
        // The limits held a request back: the other queues wait too (the
        // limits are the disk's), and no self-kick; the timer comes back.
        let mut held = false;
        let n = active.queues.len();
        let start = if self.throttle.limited() && n > 0 {
            self.next_queue = (self.next_queue + 1) % n;
            self.next_queue
        } else {
            0
        };
        for qi in (0..n).map(|k| (start + k) % n) {
            let Some(queue) = active.queues.get_mut(qi) else {
                continue;
            };
            if held {
                break;
            }
            if !queue.ready() {
                continue;
            }
            let budget = self.budget.unwrap_or_else(|| queue.size()).max(1);
            let mut served: u16 = 0;
            let mut used_any = false;
            let mut more = false;
            let mut rechecked = false;
            'wake: loop {
                if rearm {
                    if let Err(e) = queue.disable_notification(&*mem) {
                        tracing::debug!("virtio-blk: disable_notification: {e}");
                    }
                }
                let mut popped = false;
                while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
                    if self.throttle.limited()
                        && !admit(
                            &mut self.throttle,
                            &mut self.throttle_timer,
                            &mut self.throttle_waiting,
                            &self.disk,
                        )
                    {
                        // Back on the avail ring, for the timer's wake-up.
                        queue.go_to_previous_position();
                        held = true;
                        break 'wake;
                    }
                    popped = true;
                    taken += 1;
                    let head = chain.head_index();
                    let len = match self.disk.handle(&mem, chain) {
                        Handled::Done(len) => len,
                        Handled::Io { status_addr, op } => {
                            if op.kind != IoKind::Flush {
                                // What the disk will move, as parsed.
                                self.throttle.charge(op.len);
                            }
                            let req = InFlight {
                                queue: qi,
                                head,
                                status_addr,
                                op,
                                mem: mem.clone(),
                            };
                            let fd = self.disk.file.as_raw_fd();
                            // Buffers O_DIRECT cannot take go through the bounce buffer here.
                            let direct_ok = req.op.kind == IoKind::Flush
                                || self
                                    .disk
                                    .dio
                                    .is_none_or(|d| d.allows(&req.op.iovs, req.op.off));
                            let req = match self.ring.as_mut().filter(|_| direct_ok) {
                                Some(ring) => match ring.push(fd, req) {
                                    Ok(()) => {
                                        served = served.saturating_add(1);
                                        if served >= budget {
                                            more = true;
                                            break 'wake;
                                        }
                                        continue;
                                    }
                                    Err(req) => req,
                                },
                                None => req,
                            };
                            let mut op = req.op;
                            let r = self.disk.run_io(&mem, &mut op);
                            self.disk.complete(&mem, req.status_addr, &op, r)
                        }
                    };
                    match queue.add_used(&*mem, head, len) {
                        Ok(()) => used_any = true,
                        // Only a head index out of range gets here; the chain
                        // was already counted as invalid.
                        Err(e) => tracing::debug!("virtio-blk: cannot return chain {head}: {e}"),
                    }
                    served = served.saturating_add(1);
                    if served >= budget {
                        // Notifications stay off: the self-kick below brings
                        // the event loop back, the guest need not.
                        more = true;
                        break 'wake;
                    }
                }
                if !rearm {
                    break;
                }
                #[cfg(test)]
                if let Some(hook) = self.before_rearm.take() {
                    hook();
                }
                if !rearm_and_recheck(queue, &mem, popped, &mut rechecked, "virtio-blk") {
                    break;
                }
            }
            if used_any && queue.needs_notification(&*mem).unwrap_or(true) {
                notify = true;
            }
            if more && !held {
                if let Some(evt) = self.queue_evts.get(qi) {
                    if let Err(e) = evt.write(1) {
                        tracing::warn!("virtio-blk: cannot re-arm its queue: {e}");
                    }
                }
            }
        }
        if let Some(ring) = self.ring.as_mut() {
            submit(ring, &self.disk);
        }
        if notify {
            active.interrupt.signal_used_queue();
        }
        taken
    }

    /// Completes what io_uring finished (status, used ring, interrupt);
    /// with `wait_until`, waits for every request in flight until then at
    /// most. Returns how many it completed.
    pub(super) fn complete_ring(&mut self, wait_until: Option<std::time::Instant>) -> usize {
        let (Some(ring), Some(active)) = (self.ring.as_mut(), self.active.as_mut()) else {
            return 0;
        };
        let disk = &self.disk;
        let mut completed = 0;
        // The queues that got a chain back.
        let mut used = vec![false; active.queues.len()];
        let mut done = |mut req: InFlight, res| {
            completed += 1;
            let r = disk.async_result(&req.mem, &mut req.op, res);
            let len = disk.complete(&req.mem, req.status_addr, &req.op, r);
            let Some(queue) = active.queues.get_mut(req.queue) else {
                return;
            };
            match queue.add_used(&*req.mem, req.head, len) {
                Ok(()) => used[req.queue] = true,
                Err(e) => tracing::debug!("virtio-blk: cannot return chain {}: {e}", req.head),
            }
        };
        if let Some(deadline) = wait_until {
            ring.wait_all_until(deadline, &mut done);
        } else {
            ring.reap(&mut done);
        }
        // Requests a full completion queue held back (EBUSY) go now: the
        // guest may be waiting on them and never kick again.
        submit(ring, disk);
        let mem = &*active.mem;
        let notify = active
            .queues
            .iter_mut()
            .zip(used)
            .any(|(q, u)| u && q.needs_notification(mem).unwrap_or(true));
        if notify {
            active.interrupt.signal_used_queue();
        }
        completed
    }

    /// Polls up to `max` from the first wake-up on, without waiting for
    /// the window to grow (tests, fuzzing).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn force_poll(&mut self, max: Duration) {
        self.poll = PollWindow::new(max);
        self.poll.force(max);
        self.poll_control.set_duration(max);
    }

    /// Requests io_uring has in flight (tests).
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.ring.as_ref().map_or(0, Uring::in_flight)
    }

    /// Overrides the per-wake-up budget (tests).
    #[cfg(test)]
    pub(crate) fn set_budget(&mut self, n: u16) {
        self.budget = Some(n);
    }

    /// What the event loop does on a queue kick: serves the queues, then
    /// polls for more (`poll_us`) before the thread sleeps.
    pub fn serve_kick(&mut self) {
        self.follow_controls();
        let woke = self.poll.enabled().then(Instant::now);
        let served = self.process_queue();
        self.after_wake(woke, served);
    }

    /// What the event loop does when io_uring posted completions.
    pub(super) fn serve_completions(&mut self) {
        self.follow_controls();
        let woke = self.poll.enabled().then(Instant::now);
        let completed = self.complete_ring(None);
        self.after_wake(woke, completed);
    }

    /// Takes up a `poll_us` or limits the operator changed while the disk
    /// runs (`set-disk`).
    fn follow_controls(&mut self) {
        let want = self.poll_control.max();
        if want != self.poll.max() {
            self.poll.set_max(want);
        }
        let generation = self.throttle_control.generation();
        if generation != self.throttle_seen {
            self.throttle_seen = generation;
            // A timer armed for a request held back stays armed: `set`
            // also woke this thread through the control's eventfd, whose
            // wake-up serves the queues under the new limits (this one may
            // be a completion's, which does not look at them).
            self.throttle
                .set(self.throttle_control.get(), Instant::now());
            // A wait under the new limits is a new one (`throttled`).
            self.throttle_waiting = false;
        }
    }

    /// After a wake-up at `woke` that served `found` requests or
    /// completions: how long after the last work they came adapts the
    /// polling window, then the thread polls. A wake-up that found nothing
    /// (the edge of a kick or completion polling already served) says
    /// nothing about the guest's pace, and polling after it would only
    /// spin again: it changes nothing.
    fn after_wake(&mut self, woke: Option<Instant>, found: usize) {
        let Some(woke) = woke else {
            return;
        };
        if found == 0 {
            return;
        }
        if let Some(since) = self.idle_since.take() {
            self.poll.observe(woke.saturating_duration_since(since));
        }
        self.poll_for_work();
    }

    /// Before the thread sleeps, keeps looking for the guest's next request
    /// and io_uring's next completion for the polling window (see
    /// [`poll`](super::poll)); serves what comes, each find restarting the
    /// window. Stops finding after [`POLL_SPAN`] (so at most that plus one
    /// window and one batch in all), so the thread's other events (backups,
    /// the VMM stopping) and the device's lock (config reads, `status`) are
    /// not kept waiting; the kicks and completions left bring it back.
    ///
    /// The guest is told not to kick meanwhile (each kick is an exit for
    /// the guest and a stale edge for this thread); when polling ends the
    /// kicks are turned back on and the queues looked at once more, so a
    /// request published in between is served, not left for a kick the
    /// guest was told not to send.
    fn poll_for_work(&mut self) {
        let began = Instant::now();
        let mut idle_from = began;
        if self.poll.current().is_zero() {
            self.idle_since = Some(idle_from);
            return;
        }
        self.suppress_kicks();
        while !self.poll.current().is_zero() {
            let now = Instant::now();
            let mut found = 0;
            let mut broken = false;
            if self.ring.as_mut().is_some_and(Uring::has_completions) {
                found += self.complete_ring(None);
            }
            if self.requests_ready() {
                let taken = self.serve_queues(false);
                // The avail index moved but nothing could be taken (a
                // broken ring): spinning on it would only burn CPU.
                broken = taken == 0;
                found += taken;
            }
            if found > 0 {
                inc(&self.disk.counters.polled, found as u64);
                self.poll.observe(now.saturating_duration_since(idle_from));
                idle_from = Instant::now();
                if broken || idle_from.saturating_duration_since(began) >= POLL_SPAN {
                    break;
                }
            } else if broken || now.saturating_duration_since(idle_from) >= self.poll.current() {
                break;
            } else {
                std::hint::spin_loop();
            }
        }
        let taken = self.process_queue();
        if taken > 0 {
            inc(&self.disk.counters.polled, taken as u64);
            idle_from = Instant::now();
        }
        self.idle_since = Some(idle_from);
    }

    /// Asks the guest not to kick its ready queues: `VRING_USED_F_NO_NOTIFY`,
    /// or with EVENT_IDX an `avail_event` the guest has already passed.
    /// (virtio-queue's `disable_notification` leaves `avail_event` alone
    /// with EVENT_IDX, where it still asks for a kick at the next request.)
    /// [`Self::process_queue`] turns them back on.
    fn suppress_kicks(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &*active.mem;
        for q in active.queues.iter_mut().filter(|q| q.ready()) {
            if !q.event_idx_enabled() {
                if let Err(e) = q.disable_notification(mem) {
                    tracing::debug!("virtio-blk: disable_notification: {e}");
                }
                continue;
            }
            // avail_event follows the used ring's flags, index and entries.
            let Some(addr) = q.used_ring().checked_add(4 + 8 * u64::from(q.size())) else {
                continue;
            };
            let passed = q.next_avail().wrapping_sub(1);
            if let Err(e) = mem.store(passed.to_le(), GuestAddress(addr), Ordering::Release) {
                tracing::debug!("virtio-blk: cannot write avail_event: {e}");
            }
        }
    }

    /// A ready queue whose avail index is past what the device took.
    fn requests_ready(&self) -> bool {
        let Some(active) = self.active.as_ref() else {
            return false;
        };
        active.queues.iter().any(|q| {
            q.ready()
                && q.avail_idx(&*active.mem, std::sync::atomic::Ordering::Acquire)
                    .is_ok_and(|i| i.0 != q.next_avail())
        })
    }
}

/// Hands io_uring what is queued. A failure is logged (rate-limited); the
/// requests stay queued for the next submit.
fn submit(ring: &mut Uring, disk: &Disk) {
    if let Err(e) = ring.submit() {
        crate::limited!(
            warn,
            "virtio-blk {}: io_uring submit: {e}",
            disk.path.display()
        );
    }
}

/// Whether the disk's limits let the next request through now (its token
/// taken); if not, the timer is armed for when they will, and the caller
/// puts the request back. A timer that cannot be armed lets it through:
/// better over the limit than a queue nothing would wake.
fn admit(throttle: &mut Throttle, timer: &mut TimerFd, waiting: &mut bool, disk: &Disk) -> bool {
    match throttle.admit(Instant::now()) {
        Ok(()) => {
            *waiting = false;
            true
        }
        Err(wait) => {
            if let Err(e) = timer.reset(wait, None) {
                crate::limited!(
                    warn,
                    "virtio-blk {}: cannot arm the limits' timer ({e}); the request goes over the limit",
                    disk.path.display()
                );
                *waiting = false;
                return true;
            }
            if !*waiting {
                inc(&disk.counters.throttled, 1);
                *waiting = true;
            }
            false
        }
    }
}
