//! Serving the request queues: popping chains, handing their I/O to the
//! engine, and returning completions to the guest.

use super::*;

impl Block {
    /// Serves the available requests of every ready queue, at most a
    /// budget's worth of each (see the module's documentation), then
    /// signals the guest if it wants an interrupt. Called from the event
    /// loop on a queue notification.
    pub fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let mut notify = false;
        for (qi, queue) in active.queues.iter_mut().enumerate() {
            if !queue.ready() {
                continue;
            }
            let budget = self.budget.unwrap_or_else(|| queue.size()).max(1);
            let mut served: u16 = 0;
            let mut used_any = false;
            let mut more = false;
            'wake: loop {
                if let Err(e) = queue.disable_notification(&*mem) {
                    tracing::debug!("virtio-blk: disable_notification: {e}");
                }
                let mut popped = false;
                while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
                    popped = true;
                    let head = chain.head_index();
                    let len = match self.disk.handle(&mem, chain) {
                        Handled::Done(len) => len,
                        Handled::Io { status_addr, op } => {
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
                match queue.enable_notification(&*mem) {
                    // More arrived meanwhile; but if nothing could be popped the
                    // avail ring is broken and looping would spin.
                    Ok(true) if popped => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::debug!("virtio-blk: enable_notification: {e}");
                        break;
                    }
                }
            }
            if used_any && queue.needs_notification(&*mem).unwrap_or(true) {
                notify = true;
            }
            if more {
                if let Some(evt) = self.queue_evts.get(qi) {
                    if let Err(e) = evt.write(1) {
                        tracing::warn!("virtio-blk: cannot re-arm its queue: {e}");
                    }
                }
            }
        }
        if let Some(ring) = self.ring.as_mut() {
            if let Err(e) = ring.submit() {
                crate::limited!(
                    warn,
                    "virtio-blk {}: io_uring submit: {e}",
                    self.disk.path.display()
                );
            }
        }
        if notify {
            active.interrupt.signal_used_queue();
        }
    }

    /// Completes the requests io_uring finished (`wait_all`: every request
    /// in flight, waiting for them): status, used ring, interrupt.
    /// Completes what io_uring finished; with `wait_until`, waits for every
    /// request in flight until then at most.
    pub(super) fn complete_ring(&mut self, wait_until: Option<std::time::Instant>) {
        let (Some(ring), Some(active)) = (self.ring.as_mut(), self.active.as_mut()) else {
            return;
        };
        let disk = &self.disk;
        // The queues that got a chain back.
        let mut used = vec![false; active.queues.len()];
        let mut done = |mut req: InFlight, res| {
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
        let mem = &*active.mem;
        let notify = active
            .queues
            .iter_mut()
            .zip(used)
            .any(|(q, u)| u && q.needs_notification(mem).unwrap_or(true));
        if notify {
            active.interrupt.signal_used_queue();
        }
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
}
