//! The VMM control protocol: newline-delimited JSON over a Unix socket.
//!
//! This crate is shared by the VMM (server side) and the admin shell (client side). It has no
//! KVM dependency and performs no I/O except in the small blocking [`Client`].
//!
//! * A **request** is one line `{"cmd":"<name>", ...arguments}`; [`parse_request`] turns it into a
//!   typed [`Request`] (a pure function), [`encode_request`] does the opposite.
//! * A **response** is one line, exactly one per request and in request order:
//!   `{"ok":true, ...fields}` or `{"ok":false,"error":"<message>","code":"<code>"}`
//!   ([`Response`], typed bodies in [`Reply`], the codes in [`ErrorCode`]).
//! * An **event** is one line `{"event":"<name>", ...fields, "vm":"<name>","time":"<RFC 3339>"}`
//!   sent to connections that issued `subscribe` ([`EventMessage`], [`Event`]).
//! * [`LineBuffer`] frames a byte stream into lines with a bounded length.
//!
//! The full wire description with `socat` examples is in `docs/protocol.md`.

mod client;
mod error;
mod event;
mod framing;
mod request;
mod response;
pub mod time;
mod types;

pub use client::{parse_response_line, Client, ClientError, ServerLine};
pub use error::{ControlError, ErrorCode, ProtocolError};
pub use event::{Event, EventMessage};
pub use framing::{FrameError, LineBuffer};
pub use request::{
    encode_request, parse_request, parse_request_bytes, truncate_for_message, Request,
};
pub use response::{
    BackupInfo, ConsoleAttached, DiskInfo, KernelEntry, KernelList, KernelSelection, LogInfo,
    MigrationInfo, NetInfo, QueueInfo, Reply, Response, SnapshotInfo, StatusInfo, StopOutcome,
    StopResult, WatchdogInfo,
};
pub use types::{DiskMigration, PanicAction, ParseEnumError, ResetCause, VmState, WatchdogAction};

/// Longest request line the server accepts, in bytes (without the newline).
pub const MAX_LINE: usize = 64 * 1024;

/// Longest response or event line a client should accept, in bytes. Larger than [`MAX_LINE`]
/// because a `log` response carries the whole console scrollback (JSON-escaped).
pub const MAX_RESPONSE_LINE: usize = 16 * 1024 * 1024;

/// Default `timeout_s` of `shutdown` and `reboot`: seconds to wait for the guest before the hard
/// action is taken.
pub const DEFAULT_STOP_TIMEOUT_S: u64 = 60;

/// Largest accepted `timeout_s` (one day).
pub const MAX_STOP_TIMEOUT_S: u64 = 86_400;

/// Largest accepted `speed_mib_s` of `backup` and `migrate` (1 TiB/s: no limit in practice).
pub const MAX_SPEED_MIB_S: u64 = 1 << 20;

/// `migrate`'s downtime budget when the request names none, in ms: QEMU's `downtime-limit`
/// default, so that a VM moves with the stop its operators know from QEMU.
pub const DEFAULT_DOWNTIME_MS: u64 = 300;

/// Largest accepted `downtime_ms` of `migrate`: half the 60 s deadline of the final phase,
/// which also carries the machine's state and waits for the target's rebuild.
pub const MAX_DOWNTIME_MS: u64 = 30_000;

/// The most `poll_us` a disk may be given (`set-disk`, `--disk ...,poll_us=N`): a millisecond
/// of spinning after every request is already a host core per busy disk.
pub const MAX_POLL_US: u64 = 1000;

/// The highest `iops` limit a disk may be given (`set-disk`, `--disk ...,iops=N`); its `mib_s`
/// goes up to [`MAX_SPEED_MIB_S`].
pub const MAX_IOPS: u64 = 10_000_000;
