//! Responses: `{"ok":true, ...}` / `{"ok":false,"error":"..."}` lines and typed bodies.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::client::ClientError;
use crate::error::{ControlError, ErrorCode};
use crate::types::{PanicAction, ResetCause, VmState, WatchdogAction};

/// `status`: `{"ok":true,"name":"web1","state":"running",...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// VM name.
    pub name: String,
    /// `running`, `paused` or `stopped`.
    pub state: VmState,
    /// Kernel library entry of the current (or last) boot.
    pub kernel: String,
    /// Kernel selected for the next boot, when it differs from `kernel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_kernel: Option<String>,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Milliseconds since the current boot (0 when stopped).
    pub uptime_ms: u64,
    /// Boots since the VMM process started (first boot = 1).
    pub boot_count: u64,
    /// Cause of the last reset, `null` if the guest was never reset.
    #[serde(default)]
    pub last_reset: Option<ResetCause>,
    /// Watchdog state, `null` without a watchdog device.
    #[serde(default)]
    pub watchdog: Option<WatchdogInfo>,
    /// What a guest panic does, `null` without a panic device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_panic: Option<PanicAction>,
    /// The VM's disks, in the guest's order (`vda` first); absent without disks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskInfo>,
    /// The VM's network interfaces, in the guest's order; absent without.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetInfo>,
    /// A live migration of this VM is running (`migrate-cancel` can call
    /// it off while the guest runs here); absent otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub migrating: bool,
    /// A `snapshot`'s files are being written (the guest is paused and power
    /// requests are refused until it is answered); absent otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub snapshotting: bool,
    /// How much of its vCPUs' time a migration's `auto_converge` takes from
    /// the guest right now, in percent; absent: none.
    #[serde(default, skip_serializing_if = "is_zero_u8")]
    pub throttle_pct: u8,
}

/// One network interface in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInfo {
    /// The TAP on the host.
    pub tap: String,
    /// The guest's MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Who moves the frames: `vhost-net` (the host kernel) or `userspace`.
    pub datapath: String,
    /// Bytes the guest received and sent, as the TAP counted them (either
    /// datapath); `null` where the host would not say.
    #[serde(default)]
    pub rx_bytes: Option<u64>,
    #[serde(default)]
    pub tx_bytes: Option<u64>,
    /// Queue pairs offered (one per vCPU by default, where the TAP is
    /// `multi_queue`) and how many the guest's driver uses.
    #[serde(default)]
    pub queue_pairs: u64,
    #[serde(default)]
    pub queue_pairs_enabled: u64,
    /// Frames `[received, sent]` per queue pair on the userspace datapath
    /// (vhost-net's frames never pass through the VMM: zeros there).
    #[serde(default)]
    pub pair_frames: Vec<[u64; 2]>,
    /// How long (µs) vhost-net's worker busy-polls before it sleeps, as
    /// the host kernel holds it (`--net ...,poll_us=N`); 0 where it does
    /// not poll, on the userspace datapath, or before the guest's driver
    /// started the device.
    #[serde(default)]
    pub poll_us: u64,
    /// The running queues as guest memory holds them (RX 0, TX 0, RX 1,
    /// ..., then the control queue); empty before the driver started the
    /// device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<QueueInfo>,
    /// The transport's INTERRUPT_STATUS: bit 0 used buffers, bit 1 a
    /// configuration change, raised and not yet taken by the driver
    /// (acknowledged; for bit 0, whose acknowledgement KVM completes
    /// without the VMM, read).
    #[serde(default)]
    pub interrupt_status: u32,
}

/// Where one running virtqueue stands (split ring, indices wrap at 2^16):
/// what places a stalled device. The driver posted `avail_idx - used_idx`
/// buffers the device has not returned; a used index past `used_event`
/// means the driver asked for an interrupt it has not yet caught up with
/// (still pending if `interrupt_status` is set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueInfo {
    /// The queue's index on the device.
    pub queue: u16,
    /// Descriptors in the ring.
    pub size: u16,
    /// Buffers the driver has posted.
    pub avail_idx: u16,
    /// Buffers the device has returned.
    pub used_idx: u16,
    /// With EVENT_IDX: the driver wants an interrupt once the used index
    /// passes this.
    #[serde(default)]
    pub used_event: Option<u16>,
    /// With EVENT_IDX: the device wants a notification once the avail
    /// index passes this.
    #[serde(default)]
    pub avail_event: Option<u16>,
}

/// One disk in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// `disk0`, `disk1`, ... (also the name of its I/O thread).
    pub id: String,
    /// The image on the host.
    pub path: String,
    pub read_only: bool,
    /// How requests reach the image: `io_uring` or `sync`.
    pub engine: String,
    /// The disk's `poll_us` (0: its thread sleeps as soon as it is idle).
    #[serde(default)]
    pub poll_us: u32,
    /// Requests and completions its thread found while polling.
    #[serde(default)]
    pub polled: u64,
    /// Its limits: requests and MiB a second (0: none).
    #[serde(default)]
    pub iops: u64,
    #[serde(default)]
    pub mib_s: u64,
    /// Times a request waited for those limits.
    #[serde(default)]
    pub throttled: u64,
    /// Bytes the guest read and wrote since the VMM started.
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Requests that failed on the host side (the guest saw an I/O error).
    pub io_errors: u64,
    /// The running queues as guest memory holds them (see [`NetInfo`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<QueueInfo>,
    /// The transport's INTERRUPT_STATUS (see [`NetInfo`]).
    #[serde(default)]
    pub interrupt_status: u32,
}

/// `watchdog` and `set-watchdog`: `{"ok":true,"armed":true,"timeout_s":30,...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchdogInfo {
    /// The guest started the timer and has not stopped it.
    pub armed: bool,
    /// Timeout the guest programmed (seconds), `null` if never programmed.
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// Seconds of guest running time left before expiry, `null` when not armed.
    #[serde(default)]
    pub seconds_left: Option<u64>,
    /// Action taken on expiry.
    pub action: WatchdogAction,
    /// Number of expiries since the VMM process started.
    pub expiries: u64,
}

/// One kernel library entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelEntry {
    /// Name used by `set-kernel`.
    pub name: String,
    /// Kernel release (`uname -r`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Free text from the library.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// `kernels`: `{"ok":true,"kernels":[...],"current":"a","next":"b"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelList {
    /// Library entries.
    pub kernels: Vec<KernelEntry>,
    /// Entry of the current (or last) boot.
    #[serde(default)]
    pub current: Option<String>,
    /// Entry the next boot will use.
    #[serde(default)]
    pub next: Option<String>,
}

/// `set-kernel`: `{"ok":true,"next":"b","current":"a"}`; it takes effect at the next boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelSelection {
    /// Entry the next boot will use.
    pub next: String,
    /// Entry of the current (or last) boot.
    #[serde(default)]
    pub current: Option<String>,
}

/// How a `shutdown` or `reboot` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopResult {
    /// The guest complied in time.
    Graceful,
    /// The timeout expired and the hard action was taken.
    Forced,
    /// Another power action (`poweroff`, `reset`, `start`, a newer
    /// `shutdown`/`reboot`) came first; this request's deadline is void.
    Superseded,
}

/// `shutdown`/`reboot`: `{"ok":true,"result":"graceful","elapsed_ms":5210}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopOutcome {
    /// `graceful`, `forced` or `superseded`.
    pub result: StopResult,
    /// Milliseconds from the request to the guest stopping (or being reset).
    pub elapsed_ms: u64,
}

/// `backup`: `{"ok":true,"disk":"disk0","path":"...","size":..,"data_bytes":..,...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupInfo {
    /// The disk copied (`disk0`...).
    pub disk: String,
    /// The complete copy.
    pub path: String,
    /// The disk's size in bytes (the copy's size).
    pub size: u64,
    /// Bytes of data written (holes and zero chunks of the disk are left holes).
    pub data_bytes: u64,
    /// Microseconds from the request to the instant the copy stands for
    /// (the disk's thread takes it between two guest requests; the vCPUs
    /// run on).
    pub pause_us: u64,
    /// Chunks (64 KiB) copied just before a guest write to them.
    pub chunks_before_writes: u64,
    /// What those copies added to the guest's writes, in all, in microseconds.
    pub write_delay_us: u64,
    /// From the instant to the synced, renamed copy, in milliseconds.
    pub duration_ms: u64,
}

/// `snapshot`: `{"ok":true,"dir":"...","memory_bytes":..,"state_bytes":..,"paused_us":..,
/// "stopped":false}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The snapshot's directory (give it to `vmm --restore`).
    pub dir: String,
    /// Guest memory written.
    pub memory_bytes: u64,
    /// The state file's size (vCPUs, KVM's and the VMM's devices).
    pub state_bytes: u64,
    /// Microseconds the guest was paused for it (all of the writing).
    pub paused_us: u64,
    /// The VM was powered off after it (`"stop":true`).
    pub stopped: bool,
}

/// `migrate`: `{"ok":true,"to":"...","total_ms":..,"downtime_ms":..,"passes":..,...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationInfo {
    /// The target's address.
    pub to: String,
    /// From the request to the target running the guest, in milliseconds.
    pub total_ms: u64,
    /// How long the guest was stopped: from its pause here to the target's go-ahead.
    pub downtime_ms: u64,
    /// Copy passes while the guest ran (the first copies all memory).
    pub passes: u32,
    /// Guest memory sent in all, and in the last (stopped) pass, in bytes.
    pub memory_bytes: u64,
    pub last_pass_bytes: u64,
    /// Disk data sent in all, in bytes (`"disks":"copy"`; 0 for shared storage).
    #[serde(default)]
    pub disk_bytes: u64,
    /// The most the guest's vCPUs were slowed down, in percent of their time
    /// (`auto_converge`; absent: never).
    #[serde(default, skip_serializing_if = "is_zero_u8")]
    pub throttle_pct: u8,
}

pub(crate) fn is_zero_u8(v: &u8) -> bool {
    *v == 0
}

/// `log`: `{"ok":true,"data":"...","bytes":1234,"total_bytes":99999}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogInfo {
    /// The scrollback as text (invalid UTF-8 replaced by U+FFFD).
    pub data: String,
    /// Number of raw console bytes in `data`.
    pub bytes: u64,
    /// Console bytes the guest printed since the VMM started (so `total_bytes - bytes` is the
    /// stream offset of `data`).
    pub total_bytes: u64,
}

/// `console`: `{"ok":true,"replay_bytes":N}`; then N bytes of scrollback, then live output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleAttached {
    /// Raw scrollback bytes that follow the reply line before the live output.
    pub replay_bytes: u64,
}

/// A successful result, as produced by the server. Serializes to the fields that follow
/// `"ok":true` on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `{"ok":true}` (pause, resume, reset, poweroff, start, subscribe).
    Done,
    /// `status`.
    Status(StatusInfo),
    /// `kernels`.
    Kernels(KernelList),
    /// `set-kernel`.
    KernelSelected(KernelSelection),
    /// `shutdown`, `reboot`.
    Stopped(StopOutcome),
    /// `watchdog`, `set-watchdog`.
    Watchdog(WatchdogInfo),
    /// `log`.
    Log(LogInfo),
    /// `console`.
    Console(ConsoleAttached),
    /// `set-disk`: the disk as `status` shows it.
    Disk(DiskInfo),
    /// `backup`.
    Backup(BackupInfo),
    /// `snapshot`.
    Snapshot(SnapshotInfo),
    /// `migrate`.
    Migrated(MigrationInfo),
}

impl Serialize for Reply {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Reply::Done => Map::new().serialize(serializer),
            Reply::Status(v) => v.serialize(serializer),
            Reply::Kernels(v) => v.serialize(serializer),
            Reply::KernelSelected(v) => v.serialize(serializer),
            Reply::Stopped(v) => v.serialize(serializer),
            Reply::Watchdog(v) => v.serialize(serializer),
            Reply::Log(v) => v.serialize(serializer),
            Reply::Console(v) => v.serialize(serializer),
            Reply::Disk(v) => v.serialize(serializer),
            Reply::Backup(v) => v.serialize(serializer),
            Reply::Snapshot(v) => v.serialize(serializer),
            Reply::Migrated(v) => v.serialize(serializer),
        }
    }
}

#[derive(Serialize)]
struct OkLine<'a> {
    ok: bool,
    #[serde(flatten)]
    body: &'a Reply,
}

#[derive(Serialize)]
struct ErrLine<'a> {
    ok: bool,
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<ErrorCode>,
}

impl Reply {
    /// The response line `{"ok":true, ...}` including its newline.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(&OkLine {
            ok: true,
            body: self,
        })
        // Plain structs with string keys always serialize; never panic in the server.
        .unwrap_or_else(|e| {
            error_line_inner(&ControlError::internal(format!("internal error: {e}")))
        });
        line.push('\n');
        line
    }
}

fn error_line_inner(e: &ControlError) -> String {
    serde_json::to_string(&ErrLine {
        ok: false,
        error: &e.message,
        code: e.code,
    })
    .unwrap_or_else(|_| r#"{"ok":false,"error":"internal error","code":"internal"}"#.to_string())
}

/// The response line `{"ok":false,"error":"<message>","code":"<code>"}`
/// including its newline.
pub fn error_line(e: &ControlError) -> String {
    let mut line = error_line_inner(e);
    line.push('\n');
    line
}

/// A response as read by a client: `Ok` with the fields after `"ok":true`, or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// `{"ok":true, ...fields}`: the fields without `ok`.
    Ok(Map<String, Value>),
    /// `{"ok":false,"error":"...","code":"..."}`: the message and code.
    Error(ControlError),
}

impl Response {
    /// The line for a server-side result, newline included.
    pub fn line_for(result: &Result<Reply, ControlError>) -> String {
        match result {
            Ok(reply) => reply.to_line(),
            Err(e) => error_line(e),
        }
    }

    /// The error line for `e`, newline included.
    pub fn error_line(e: &ControlError) -> String {
        error_line(e)
    }

    /// Whether this is an `ok:true` response.
    pub fn is_ok(&self) -> bool {
        matches!(self, Response::Ok(_))
    }

    /// Decodes the fields of a successful response into `T` (e.g. [`StatusInfo`]); an error
    /// response becomes [`ClientError::Remote`].
    pub fn decode<T: DeserializeOwned>(self) -> Result<T, ClientError> {
        match self {
            Response::Ok(map) => serde_json::from_value(Value::Object(map))
                .map_err(|e| ClientError::UnexpectedResponse(e.to_string())),
            Response::Error(e) => Err(ClientError::Remote(e)),
        }
    }

    /// `Ok(())` for a successful response, [`ClientError::Remote`] otherwise.
    pub fn into_unit(self) -> Result<(), ClientError> {
        match self {
            Response::Ok(_) => Ok(()),
            Response::Error(e) => Err(ClientError::Remote(e)),
        }
    }

    /// Builds a response from a parsed JSON object that has an `ok` member.
    pub(crate) fn from_object(mut map: Map<String, Value>) -> Result<Self, ClientError> {
        match map.remove("ok") {
            Some(Value::Bool(true)) => Ok(Response::Ok(map)),
            Some(Value::Bool(false)) => match map.remove("error") {
                Some(Value::String(message)) => Ok(Response::Error(ControlError {
                    // An unknown code (a newer VMM's) reads as none.
                    code: map
                        .remove("code")
                        .and_then(|c| serde_json::from_value(c).ok()),
                    message,
                })),
                _ => Err(ClientError::UnexpectedResponse(
                    "error response without an 'error' message".into(),
                )),
            },
            _ => Err(ClientError::UnexpectedResponse(
                "'ok' must be true or false".into(),
            )),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::client::{parse_response_line, ServerLine};

    fn status() -> StatusInfo {
        StatusInfo {
            name: "web1".into(),
            state: VmState::Running,
            kernel: "mini".into(),
            next_kernel: None,
            vcpus: 2,
            memory_mib: 512,
            uptime_ms: 1234,
            boot_count: 2,
            last_reset: Some(ResetCause::Watchdog),
            migrating: true,
            snapshotting: true,
            throttle_pct: 50,
            watchdog: Some(WatchdogInfo {
                armed: true,
                timeout_s: Some(30),
                seconds_left: Some(12),
                action: WatchdogAction::Reset,
                expiries: 1,
            }),
            on_panic: Some(PanicAction::Pause),
            disks: vec![],
            nets: vec![],
        }
    }

    fn all_replies() -> Vec<Reply> {
        vec![
            Reply::Done,
            Reply::Status(status()),
            Reply::Kernels(KernelList {
                kernels: vec![
                    KernelEntry {
                        name: "mini".into(),
                        version: Some("6.1.0".into()),
                        description: None,
                    },
                    KernelEntry {
                        name: "debian".into(),
                        version: None,
                        description: Some("Debian generic".into()),
                    },
                ],
                current: Some("mini".into()),
                next: Some("debian".into()),
            }),
            Reply::KernelSelected(KernelSelection {
                next: "debian".into(),
                current: None,
            }),
            Reply::Stopped(StopOutcome {
                result: StopResult::Forced,
                elapsed_ms: 60_000,
            }),
            Reply::Watchdog(WatchdogInfo {
                armed: false,
                timeout_s: None,
                seconds_left: None,
                action: WatchdogAction::None,
                expiries: 0,
            }),
            Reply::Log(LogInfo {
                data: "line1\r\nline2 \u{1b}[0m \"q\"\n".into(),
                bytes: 22,
                total_bytes: 1 << 40,
            }),
            Reply::Console(ConsoleAttached { replay_bytes: 77 }),
            Reply::Disk(DiskInfo {
                id: "disk0".into(),
                path: "/srv/vms/web1/root.img".into(),
                read_only: false,
                engine: "io_uring".into(),
                poll_us: 50,
                polled: 7,
                iops: 500,
                mib_s: 100,
                throttled: 3,
                read_bytes: 1 << 20,
                write_bytes: 4096,
                io_errors: 0,
                queues: vec![],
                interrupt_status: 0,
            }),
            Reply::Backup(BackupInfo {
                disk: "disk0".into(),
                path: "/var/backups/vmm/web1/root.img".into(),
                size: 1 << 33,
                data_bytes: 1 << 30,
                pause_us: 12,
                chunks_before_writes: 3,
                write_delay_us: 900,
                duration_ms: 4_000,
            }),
            Reply::Snapshot(SnapshotInfo {
                dir: "/srv/snapshots/web1/x".into(),
                memory_bytes: 1 << 28,
                state_bytes: 90_000,
                paused_us: 1_500_000,
                stopped: true,
            }),
            Reply::Migrated(MigrationInfo {
                to: "192.0.2.7:4444".into(),
                total_ms: 9_000,
                downtime_ms: 120,
                passes: 4,
                memory_bytes: 300 << 20,
                last_pass_bytes: 1 << 20,
                disk_bytes: 16 << 20,
                throttle_pct: 40,
            }),
        ]
    }

    #[test]
    fn done_is_just_ok_true() {
        assert_eq!(Reply::Done.to_line(), "{\"ok\":true}\n");
    }

    #[test]
    fn ok_comes_first_and_fields_keep_struct_order() {
        let line = Reply::Status(status()).to_line();
        assert!(
            line.starts_with(
                r#"{"ok":true,"name":"web1","state":"running","kernel":"mini","vcpus":2"#
            ),
            "{line}"
        );
        assert!(line.contains(r#""last_reset":"watchdog""#));
        assert!(line.contains(r#""watchdog":{"armed":true,"timeout_s":30,"seconds_left":12,"action":"reset","expiries":1}"#), "{line}");
        assert!(!line.contains("next_kernel"));
        assert!(line.ends_with("}\n"));
        assert_eq!(line.matches('\n').count(), 1);
    }

    #[test]
    fn error_line_escapes_the_message() {
        let line = error_line(&ControlError::bad_request("bad \"thing\"\nhere"));
        assert_eq!(
            line,
            "{\"ok\":false,\"error\":\"bad \\\"thing\\\"\\nhere\",\"code\":\"bad_request\"}\n"
        );
        assert_eq!(
            Response::line_for(&Err(ControlError::invalid_state("x"))),
            "{\"ok\":false,\"error\":\"x\",\"code\":\"invalid_state\"}\n"
        );
    }

    #[test]
    fn replies_decode_on_the_client_side() {
        for reply in all_replies() {
            let line = reply.to_line();
            assert_eq!(line.matches('\n').count(), 1, "{line}");
            let ServerLine::Response(resp) = parse_response_line(&line).unwrap() else {
                panic!("not a response: {line}");
            };
            assert!(resp.is_ok());
            match &reply {
                Reply::Done => resp.into_unit().unwrap(),
                Reply::Status(v) => assert_eq!(&resp.decode::<StatusInfo>().unwrap(), v),
                Reply::Kernels(v) => assert_eq!(&resp.decode::<KernelList>().unwrap(), v),
                Reply::KernelSelected(v) => {
                    assert_eq!(&resp.decode::<KernelSelection>().unwrap(), v)
                }
                Reply::Stopped(v) => assert_eq!(&resp.decode::<StopOutcome>().unwrap(), v),
                Reply::Watchdog(v) => assert_eq!(&resp.decode::<WatchdogInfo>().unwrap(), v),
                Reply::Log(v) => assert_eq!(&resp.decode::<LogInfo>().unwrap(), v),
                Reply::Console(v) => assert_eq!(&resp.decode::<ConsoleAttached>().unwrap(), v),
                Reply::Disk(v) => assert_eq!(&resp.decode::<DiskInfo>().unwrap(), v),
                Reply::Backup(v) => assert_eq!(&resp.decode::<BackupInfo>().unwrap(), v),
                Reply::Snapshot(v) => assert_eq!(&resp.decode::<SnapshotInfo>().unwrap(), v),
                Reply::Migrated(v) => assert_eq!(&resp.decode::<MigrationInfo>().unwrap(), v),
            }
        }
    }

    #[test]
    fn no_body_uses_the_reserved_keys() {
        for reply in all_replies() {
            let value: Value = serde_json::to_value(&reply).unwrap();
            let map = value.as_object().unwrap();
            assert!(
                !map.contains_key("ok") && !map.contains_key("error") && !map.contains_key("event")
            );
        }
    }

    #[test]
    fn error_response_decodes_to_remote_error() {
        let ServerLine::Response(resp) =
            parse_response_line(r#"{"ok":false,"error":"VM is stopped"}"#).unwrap()
        else {
            panic!()
        };
        // A VMM from before error codes: no code.
        let e = ControlError {
            code: None,
            message: "VM is stopped".into(),
        };
        assert_eq!(resp, Response::Error(e));
        let err = resp.decode::<StatusInfo>().unwrap_err();
        assert_eq!(err.to_string(), "VM is stopped");
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::InvalidState,
            ErrorCode::NotFound,
            ErrorCode::Forbidden,
            ErrorCode::Unsupported,
            ErrorCode::Overloaded,
            ErrorCode::HostError,
            ErrorCode::Cancelled,
            ErrorCode::Internal,
        ] {
            let line = error_line(&ControlError::new(code, "m"));
            assert!(
                line.contains(&format!("\"code\":\"{}\"", code.as_str())),
                "{line}"
            );
            let ServerLine::Response(Response::Error(e)) = parse_response_line(&line).unwrap()
            else {
                panic!("{line}")
            };
            assert_eq!(e, ControlError::new(code, "m"));
        }
        // A code this client does not know (a newer VMM's) reads as none.
        let ServerLine::Response(Response::Error(e)) =
            parse_response_line(r#"{"ok":false,"error":"m","code":"brand_new"}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!(e.code, None);
    }

    #[test]
    fn mismatched_body_is_an_unexpected_response() {
        let ServerLine::Response(resp) = parse_response_line(r#"{"ok":true}"#).unwrap() else {
            panic!()
        };
        assert!(matches!(
            resp.decode::<StatusInfo>(),
            Err(ClientError::UnexpectedResponse(_))
        ));
    }

    #[test]
    fn status_from_an_older_server_without_optional_fields_decodes() {
        let line = r#"{"ok":true,"name":"a","state":"stopped","kernel":"k","vcpus":1,"memory_mib":64,"uptime_ms":0,"boot_count":0}"#;
        let ServerLine::Response(resp) = parse_response_line(line).unwrap() else {
            panic!()
        };
        let s: StatusInfo = resp.decode().unwrap();
        assert_eq!(s.last_reset, None);
        assert_eq!(s.watchdog, None);
    }
}
