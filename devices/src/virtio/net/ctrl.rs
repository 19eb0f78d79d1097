//! The control queue (`VIRTIO_NET_F_CTRL_VQ`), offered with multi-queue
//! only: its one command is `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`, the driver
//! saying how many queue pairs it serves (Linux: one per online CPU, and
//! `ethtool -L combined N`). The device then steers frames to that many
//! TAP queues (the others are detached, so the kernel's flow steering
//! skips them) and serves that many pairs.
//!
//! A command is a chain: a two-byte header (class, command) and its data,
//! readable, then one writable byte for the answer (`VIRTIO_NET_OK` or
//! `VIRTIO_NET_ERR`). Anything else, and any other class (the device
//! offers no RX mode, MAC table, VLAN, announce or offload commands), is
//! answered `VIRTIO_NET_ERR`; a chain without room for the answer is
//! returned unused and counted as invalid. The queue is always the VMM's
//! to serve, under vhost-net too.

use std::sync::Arc;

use event_manager::EventOps;
use virtio_queue::{Queue, QueueT};

use super::{inc, Net};
use crate::virtio::iov::{parse_chain, read_segs, write_segs};
use crate::virtio::{GuestMemoryMmap, Interrupt};

/// `VIRTIO_NET_CTRL_MQ` and its `VQ_PAIRS_SET` command.
pub const CTRL_MQ: u8 = 4;
pub const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
pub const OK: u8 = 0;
pub const ERR: u8 = 1;
/// The most command bytes read (header and data): every command this
/// device knows is far shorter.
const MAX_COMMAND: usize = 64;
/// Commands served per wake-up at most.
const CTRL_BUDGET: u16 = 4;

/// The control queue while the device runs.
pub(super) struct Ctrl {
    /// Its queue index: after the pairs the driver negotiated.
    index: usize,
    mem: Arc<GuestMemoryMmap>,
    queue: Queue,
    interrupt: Interrupt,
}

impl Ctrl {
    pub(super) fn new(
        index: usize,
        mem: Arc<GuestMemoryMmap>,
        queue: Queue,
        interrupt: Interrupt,
    ) -> Self {
        Self {
            index,
            mem,
            queue,
            interrupt,
        }
    }

    pub(super) fn index(&self) -> usize {
        self.index
    }

    /// The queue's configuration and positions, for a snapshot.
    pub(super) fn state(&self) -> virtio_queue::QueueState {
        self.queue.state()
    }
}

/// A command as the driver wrote it: the header's class and command and
/// the data that follows.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Command {
    /// Serve this many queue pairs.
    PairsSet(u16),
    /// Anything else (an unknown class or command, or too short).
    Unsupported { class: u8, command: u8 },
}

/// Parses a command's readable bytes (header, data).
pub(super) fn parse_command(bytes: &[u8]) -> Command {
    match bytes {
        [CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, a, b, ..] => {
            Command::PairsSet(u16::from_le_bytes([*a, *b]))
        }
        [class, command, ..] => Command::Unsupported {
            class: *class,
            command: *command,
        },
        _ => Command::Unsupported {
            class: u8::MAX,
            command: u8::MAX,
        },
    }
}

impl Net {
    /// Serves every command on the control queue.
    pub(super) fn process_ctrl(&mut self, ops: &mut EventOps) {
        let Some(mut ctrl) = self.ctrl.take() else {
            return;
        };
        let mem = ctrl.mem.clone();
        let mut used = false;
        // A few commands per wake-up (one that changes the pair count costs
        // a TUNSETQUEUE per TAP queue, each taking the host's RTNL lock): a
        // driver that refills the ring as fast comes back after the other
        // events, through a kick of its own. Linux sends one at a time.
        let mut served = 0;
        while served < CTRL_BUDGET {
            let Some(chain) = ctrl.queue.pop_descriptor_chain(&*mem) else {
                break;
            };
            served += 1;
            let head = chain.head_index();
            let mut written = 0;
            match parse_chain(chain) {
                Ok(p) if !p.writable.is_empty() => {
                    let len = usize::try_from(p.readable_len())
                        .unwrap_or(usize::MAX)
                        .min(MAX_COMMAND);
                    let mut bytes = vec![0u8; len];
                    let answer = match read_segs(&mem, &p.readable, 0, &mut bytes) {
                        Some(()) => self.run_command(parse_command(&bytes), ops),
                        None => ERR,
                    };
                    if write_segs(&mem, &p.writable, 0, &[answer]).is_some() {
                        written = 1;
                    } else {
                        inc(&self.counters.invalid_chains, 1);
                    }
                }
                _ => inc(&self.counters.invalid_chains, 1),
            }
            match ctrl.queue.add_used(&*mem, head, written) {
                Ok(()) => used = true,
                Err(e) => tracing::debug!("virtio-net: cannot return control chain {head}: {e}"),
            }
        }
        if served == CTRL_BUDGET {
            if let Some(evt) = self.queue_evts.get(ctrl.index) {
                if let Err(e) = evt.write(1) {
                    tracing::warn!("virtio-net: cannot re-arm its control queue: {e}");
                }
            }
        }
        if used && ctrl.queue.needs_notification(&*mem).unwrap_or(true) {
            ctrl.interrupt.signal_used_queue();
        }
        self.ctrl = Some(ctrl);
    }

    fn run_command(&mut self, cmd: Command, ops: &mut EventOps) -> u8 {
        match cmd {
            Command::PairsSet(n) => match self.enable_pairs(n) {
                Ok(()) => {
                    // Pairs turned off stop polling their TAP queue now;
                    // those turned on start at their RX kick.
                    for p in usize::from(n)..self.taps.len() {
                        self.set_tap_polling(p, ops, false);
                    }
                    OK
                }
                Err(why) => {
                    tracing::debug!("virtio-net {}: {why}", self.tap_name());
                    ERR
                }
            },
            Command::Unsupported { class, command } => {
                tracing::debug!(
                    "virtio-net {}: control command {class}.{command} not supported",
                    self.tap_name()
                );
                ERR
            }
        }
    }

    /// Serves `n` queue pairs from now on: the first `n` TAP queues get
    /// the frames, the first `n` pairs are served.
    pub(super) fn enable_pairs(&mut self, n: u16) -> Result<(), String> {
        let serving = if self.vhost.is_empty() {
            self.active.len()
        } else {
            self.vhost.len()
        };
        let want = usize::from(n);
        if want == 0 || want > serving {
            return Err(format!(
                "{n} queue pairs asked, {serving} set up by the driver"
            ));
        }
        if !self.steer_to(want) {
            // Back to what it was: frames keep going where they are served.
            self.steer_to(self.enabled());
            return Err(format!("the TAP cannot steer to {n} queues"));
        }
        self.set_enabled(n);
        for p in 0..self.active.len() {
            if let Some(evt) = self.queue_evts.get(super::rx_index(p)) {
                if let Err(e) = evt.write(1) {
                    tracing::warn!("virtio-net: cannot kick a queue: {e}");
                }
            }
        }
        Ok(())
    }

    /// Kicks the control queue (commands queued before an activation).
    pub(super) fn kick_ctrl(&self) {
        let Some(c) = &self.ctrl else { return };
        if let Some(evt) = self.queue_evts.get(c.index) {
            if let Err(e) = evt.write(1) {
                tracing::warn!("virtio-net: cannot kick the control queue: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pairs_set_command_reads_its_little_endian_count() {
        assert_eq!(parse_command(&[4, 0, 3, 0, 0xff]), Command::PairsSet(3));
        assert_eq!(parse_command(&[4, 0, 0, 1]), Command::PairsSet(256));
    }

    #[test]
    fn short_or_unknown_commands_are_unsupported() {
        assert_eq!(
            parse_command(&[4, 0, 3]),
            Command::Unsupported {
                class: 4,
                command: 0
            }
        );
        assert_eq!(
            parse_command(&[0, 1, 1]),
            Command::Unsupported {
                class: 0,
                command: 1
            }
        );
        assert!(matches!(parse_command(&[]), Command::Unsupported { .. }));
    }
}
