//! Requests: `{"cmd":"<name>", ...arguments}` lines and their typed form.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::ProtocolError;
use crate::types::{DiskMigration, WatchdogAction};
use crate::{MAX_IOPS, MAX_POLL_US, MAX_SPEED_MIB_S, MAX_STOP_TIMEOUT_S};

/// A typed control request. The wire form is one JSON object per line with the command name
/// in `cmd` and the arguments as further members; unknown arguments are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// `{"cmd":"status"}`: state, kernel, uptime, boot count, watchdog.
    Status,
    /// `{"cmd":"pause"}`: freeze the vCPUs.
    Pause,
    /// `{"cmd":"resume"}`: continue a paused VM.
    Resume,
    /// `{"cmd":"reset"}`: hard reset now.
    Reset,
    /// `{"cmd":"poweroff"}`: hard power-off now; the VM goes to `stopped`.
    Poweroff,
    /// `{"cmd":"start"}`: boot a `stopped` VM.
    Start,
    /// `{"cmd":"shutdown","timeout_s":60}`: graceful shutdown, power-off after the timeout.
    Shutdown {
        /// Seconds to wait before the hard power-off (default
        /// [`DEFAULT_STOP_TIMEOUT_S`](crate::DEFAULT_STOP_TIMEOUT_S)).
        #[serde(skip_serializing_if = "Option::is_none")]
        timeout_s: Option<u64>,
    },
    /// `{"cmd":"reboot","timeout_s":60}`: graceful reboot, hard reset after the timeout.
    Reboot {
        /// Seconds to wait before the hard reset (default
        /// [`DEFAULT_STOP_TIMEOUT_S`](crate::DEFAULT_STOP_TIMEOUT_S)).
        #[serde(skip_serializing_if = "Option::is_none")]
        timeout_s: Option<u64>,
    },
    /// `{"cmd":"kernels"}`: the kernel library.
    Kernels,
    /// `{"cmd":"set-kernel","name":"..."}`: the kernel for the next boot.
    SetKernel {
        /// Library entry name.
        name: String,
    },
    /// `{"cmd":"console","replay":true}`: switch the connection to the raw console.
    Console {
        /// Send the scrollback before the live output.
        #[serde(skip_serializing_if = "is_false")]
        replay: bool,
    },
    /// `{"cmd":"log","bytes":65536}`: the console scrollback.
    Log {
        /// Only the last `bytes` bytes.
        #[serde(skip_serializing_if = "Option::is_none")]
        bytes: Option<u64>,
    },
    /// `{"cmd":"subscribe"}`: receive event lines on this connection from now on.
    Subscribe,
    /// `{"cmd":"watchdog"}`: watchdog state.
    Watchdog,
    /// `{"cmd":"set-watchdog","action":"reset"}`: the watchdog expiry action.
    SetWatchdog {
        /// The new action.
        action: WatchdogAction,
    },
    /// `{"cmd":"sysrq","key":"b"}`: press Alt+SysRq+key on the guest's
    /// keyboard (b reboot, o power off, c crash, s sync, u remount ro, e, i).
    Sysrq {
        /// One letter.
        key: String,
    },
    /// `{"cmd":"set-disk","disk":"disk0","iops":500}`: changes a running disk's settings, one
    /// or more of them (operator only: they are what the host's CPU and disks are shared by);
    /// answers with the disk as `status` shows it.
    SetDisk {
        /// The disk: `disk0`, `disk1`... (as `status` lists them) or its `id=`.
        disk: String,
        /// Adaptive polling of the disk's thread up to this many µs after its last work (0:
        /// off), from its next wake-up on (`--disk ...,poll_us=N` at start-up).
        #[serde(skip_serializing_if = "Option::is_none")]
        poll_us: Option<u64>,
        /// At most this many requests a second (0: no limit; `--disk ...,iops=N`).
        #[serde(skip_serializing_if = "Option::is_none")]
        iops: Option<u64>,
        /// At most this many MiB of data a second (0: no limit; `--disk ...,mib_s=N`).
        #[serde(skip_serializing_if = "Option::is_none")]
        mib_s: Option<u64>,
    },
    /// `{"cmd":"backup","disk":"disk0","to":"/var/backups/vmm/web1/root.img"}`: a
    /// crash-consistent copy of a disk as it was when the request arrived, written while the
    /// guest runs (operator only; the answer comes when the copy is complete).
    Backup {
        /// The disk: `disk0`, `disk1`... (as `status` lists them) or its `id=`.
        disk: String,
        /// The copy's file: a new file in the VMM's `--backup-dir` (a bare name is taken as
        /// one there).
        to: String,
        /// At most this many MiB a second read by the background copy.
        #[serde(skip_serializing_if = "Option::is_none")]
        speed_mib_s: Option<u64>,
    },
    /// `{"cmd":"snapshot","dir":"web1-1204"}`: the whole running VM (memory, vCPUs, devices)
    /// written to a new directory in the VMM's `--snapshot-dir`, for `vmm --restore` (operator
    /// only). The guest is paused while it is written, then runs on, or with `"stop":true` is
    /// powered off.
    Snapshot {
        /// The new directory: a bare name is taken as one in `--snapshot-dir`.
        dir: String,
        /// Power the VM off once the snapshot is written (to continue it elsewhere).
        #[serde(skip_serializing_if = "is_false", default)]
        stop: bool,
    },
    /// `{"cmd":"migrate","to":"192.0.2.7:4444","token":"..."}`: live migration of the running
    /// VM to a VMM started with `--incoming 192.0.2.7:4444` (operator only). Memory is copied
    /// while the guest runs, then the guest stops for the rest and continues on the target; this
    /// VMM then exits. If anything fails before that, the guest runs on here.
    Migrate {
        /// The target's `--incoming` address, `HOST:PORT`.
        to: String,
        /// The target's `--incoming-token-file` contents.
        token: String,
        /// `"shared"` (the default: both hosts open the same images) or `"copy"` (every
        /// writable disk is copied into the target's own image of the same size).
        #[serde(skip_serializing_if = "is_shared", default)]
        disks: DiskMigration,
        /// The most MiB/s the copy sends while the guest runs (none: as fast as the link; the
        /// last pass, with the guest stopped, is never held back).
        #[serde(skip_serializing_if = "Option::is_none")]
        speed_mib_s: Option<u64>,
        /// Slow the guest's vCPUs down while the copy cannot catch up with its writes (a pass
        /// leaves more than half of what it sent, twice running): 20 % of their time taken, then
        /// 10 % more after each such pass, up to 99 %; none again when the migration ends,
        /// however it ends.
        #[serde(skip_serializing_if = "is_false", default)]
        auto_converge: bool,
        /// How long the guest may stand stopped for the last pass, in ms (none:
        /// [`DEFAULT_DOWNTIME_MS`](crate::DEFAULT_DOWNTIME_MS)): the passes go on while the guest
        /// runs until what is left would go over in that time at the rate the copy measured.
        #[serde(skip_serializing_if = "Option::is_none")]
        downtime_ms: Option<u64>,
    },
    /// `{"cmd":"migrate-cancel"}`: calls off the running `migrate` while the guest still runs
    /// at this host (operator only); its `migrate` answers `cancelled` and the guest runs on
    /// here. Once the guest has stopped for the last pass it is too late.
    MigrateCancel,
}

fn is_shared(d: &DiskMigration) -> bool {
    *d == DiskMigration::Shared
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Request {
    /// Every command name, in documentation order (for help texts and completion).
    pub const NAMES: &'static [&'static str] = &[
        "status",
        "pause",
        "resume",
        "reset",
        "poweroff",
        "start",
        "shutdown",
        "reboot",
        "kernels",
        "set-kernel",
        "console",
        "log",
        "subscribe",
        "watchdog",
        "set-watchdog",
        "sysrq",
        "set-disk",
        "backup",
        "snapshot",
        "migrate",
        "migrate-cancel",
    ];

    /// The command name (`cmd`) of this request.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Reset => "reset",
            Request::Poweroff => "poweroff",
            Request::Start => "start",
            Request::Shutdown { .. } => "shutdown",
            Request::Reboot { .. } => "reboot",
            Request::Kernels => "kernels",
            Request::SetKernel { .. } => "set-kernel",
            Request::Console { .. } => "console",
            Request::Log { .. } => "log",
            Request::Subscribe => "subscribe",
            Request::Watchdog => "watchdog",
            Request::SetWatchdog { .. } => "set-watchdog",
            Request::Sysrq { .. } => "sysrq",
            Request::SetDisk { .. } => "set-disk",
            Request::Backup { .. } => "backup",
            Request::Snapshot { .. } => "snapshot",
            Request::Migrate { .. } => "migrate",
            Request::MigrateCancel => "migrate-cancel",
        }
    }
}

/// Arguments of one request, consumed one by one; whatever is left is an unknown argument.
struct Args {
    cmd: &'static str,
    map: Map<String, Value>,
}

impl Args {
    fn take(&mut self, arg: &'static str) -> Option<Value> {
        // `null` means "not given": handy for clients that serialize absent options as null.
        self.map.remove(arg).filter(|v| !v.is_null())
    }

    fn invalid(&self, arg: &'static str, expected: impl Into<String>) -> ProtocolError {
        ProtocolError::InvalidArgument {
            cmd: self.cmd,
            arg,
            expected: expected.into(),
        }
    }

    fn opt_u64(&mut self, arg: &'static str, max: u64) -> Result<Option<u64>, ProtocolError> {
        self.opt_in(arg, 0, max)
    }

    /// An optional integer from `min` to `max`.
    fn opt_in(
        &mut self,
        arg: &'static str,
        min: u64,
        max: u64,
    ) -> Result<Option<u64>, ProtocolError> {
        match self.take(arg) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
                _ if min == 0 && max == u64::MAX => {
                    Err(self.invalid(arg, "a non-negative integer"))
                }
                _ => Err(self.invalid(arg, format!("an integer from {min} to {max}"))),
            },
        }
    }

    fn opt_bool(&mut self, arg: &'static str) -> Result<Option<bool>, ProtocolError> {
        match self.take(arg) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(self.invalid(arg, "true or false")),
        }
    }

    fn string(&mut self, arg: &'static str) -> Result<String, ProtocolError> {
        match self.take(arg) {
            None => Err(ProtocolError::MissingArgument { cmd: self.cmd, arg }),
            Some(Value::String(s)) if !s.is_empty() => Ok(s),
            Some(_) => Err(self.invalid(arg, "a non-empty string")),
        }
    }

    fn parsed<T: std::str::FromStr>(
        &mut self,
        arg: &'static str,
        names: &str,
    ) -> Result<T, ProtocolError> {
        match self.take(arg) {
            None => Err(ProtocolError::MissingArgument { cmd: self.cmd, arg }),
            Some(Value::String(s)) => s
                .parse()
                .map_err(|_| self.invalid(arg, format!("one of {names}"))),
            Some(_) => Err(self.invalid(arg, format!("one of {names}"))),
        }
    }

    fn finish(self) -> Result<(), ProtocolError> {
        // Report in a stable order (serde_json's map is sorted).
        match self.map.into_iter().next() {
            None => Ok(()),
            Some((arg, _)) => Err(ProtocolError::UnknownArgument { cmd: self.cmd, arg }),
        }
    }
}

/// Parses one request line (without its newline; surrounding whitespace is ignored).
///
/// A pure function: the server answers its error with `{"ok":false,"error":"<Display>"}` and
/// keeps the connection open.
pub fn parse_request(line: &str) -> Result<Request, ProtocolError> {
    let value: Value =
        serde_json::from_str(line).map_err(|e| ProtocolError::MalformedJson(e.to_string()))?;
    let Value::Object(mut map) = value else {
        return Err(ProtocolError::NotAnObject);
    };
    let name = match map.remove("cmd") {
        None | Some(Value::Null) => return Err(ProtocolError::MissingCommand),
        Some(Value::String(s)) => s,
        Some(_) => return Err(ProtocolError::CommandNotString),
    };
    let Some(cmd) = Request::NAMES.iter().copied().find(|n| *n == name) else {
        return Err(ProtocolError::UnknownCommand(truncate_for_message(&name)));
    };
    let mut args = Args { cmd, map };
    let request = match cmd {
        "status" => Request::Status,
        "pause" => Request::Pause,
        "resume" => Request::Resume,
        "reset" => Request::Reset,
        "poweroff" => Request::Poweroff,
        "start" => Request::Start,
        "shutdown" => Request::Shutdown {
            timeout_s: args.opt_u64("timeout_s", MAX_STOP_TIMEOUT_S)?,
        },
        "reboot" => Request::Reboot {
            timeout_s: args.opt_u64("timeout_s", MAX_STOP_TIMEOUT_S)?,
        },
        "kernels" => Request::Kernels,
        "set-kernel" => Request::SetKernel {
            name: args.string("name")?,
        },
        "console" => Request::Console {
            replay: args.opt_bool("replay")?.unwrap_or(false),
        },
        "log" => Request::Log {
            bytes: args.opt_u64("bytes", u64::MAX)?,
        },
        "subscribe" => Request::Subscribe,
        "watchdog" => Request::Watchdog,
        "set-watchdog" => Request::SetWatchdog {
            action: args.parsed("action", WatchdogAction::NAMES)?,
        },
        "sysrq" => Request::Sysrq {
            key: args.string("key")?,
        },
        "set-disk" => {
            let disk = args.string("disk")?;
            let poll_us = args.opt_u64("poll_us", MAX_POLL_US)?;
            let iops = args.opt_u64("iops", MAX_IOPS)?;
            let mib_s = args.opt_u64("mib_s", MAX_SPEED_MIB_S)?;
            if poll_us.is_none() && iops.is_none() && mib_s.is_none() {
                return Err(ProtocolError::MissingArgument {
                    cmd: "set-disk",
                    arg: "poll_us, iops or mib_s",
                });
            }
            Request::SetDisk {
                disk,
                poll_us,
                iops,
                mib_s,
            }
        }
        "backup" => Request::Backup {
            disk: args.string("disk")?,
            to: args.string("to")?,
            speed_mib_s: args.opt_u64("speed_mib_s", MAX_SPEED_MIB_S)?,
        },
        "snapshot" => Request::Snapshot {
            dir: args.string("dir")?,
            stop: args.opt_bool("stop")?.unwrap_or(false),
        },
        "migrate" => Request::Migrate {
            to: args.string("to")?,
            token: args.string("token")?,
            disks: match args.take("disks") {
                None => DiskMigration::Shared,
                Some(Value::String(s)) => s.parse().map_err(|_| {
                    args.invalid("disks", format!("one of {}", DiskMigration::NAMES))
                })?,
                Some(_) => {
                    return Err(args.invalid("disks", format!("one of {}", DiskMigration::NAMES)))
                }
            },
            speed_mib_s: args.opt_u64("speed_mib_s", MAX_SPEED_MIB_S)?,
            auto_converge: args.opt_bool("auto_converge")?.unwrap_or(false),
            downtime_ms: args.opt_in("downtime_ms", 1, crate::MAX_DOWNTIME_MS)?,
        },
        "migrate-cancel" => Request::MigrateCancel,
        // `cmd` comes from `Request::NAMES`, all of which are handled above.
        other => return Err(ProtocolError::UnknownCommand(other.to_string())),
    };
    args.finish()?;
    Ok(request)
}

/// [`parse_request`] for a raw line as framed by [`LineBuffer`](crate::LineBuffer).
pub fn parse_request_bytes(line: &[u8]) -> Result<Request, ProtocolError> {
    let line = std::str::from_utf8(line).map_err(|_| ProtocolError::InvalidUtf8)?;
    parse_request(line)
}

/// Keeps error messages short when a client sends a huge name (a command, a disk): at most
/// 64 bytes, then `...`.
pub fn truncate_for_message(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Encodes a request as one line, newline included.
pub fn encode_request(request: &Request) -> String {
    // Serializing these plain types into a string cannot fail; fall back to the bare command
    // rather than panicking.
    let mut line = serde_json::to_string(request)
        .unwrap_or_else(|_| format!("{{\"cmd\":\"{}\"}}", request.name()));
    line.push('\n');
    line
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn err(line: &str) -> String {
        parse_request(line).unwrap_err().to_string()
    }

    fn all_requests() -> Vec<Request> {
        vec![
            Request::Status,
            Request::Pause,
            Request::Resume,
            Request::Reset,
            Request::Poweroff,
            Request::Start,
            Request::Shutdown { timeout_s: None },
            Request::Shutdown { timeout_s: Some(5) },
            Request::Reboot { timeout_s: None },
            Request::Reboot { timeout_s: Some(0) },
            Request::Kernels,
            Request::SetKernel {
                name: "mini-6.1 \"quoted\" ü".into(),
            },
            Request::Console { replay: false },
            Request::Console { replay: true },
            Request::Log { bytes: None },
            Request::Log {
                bytes: Some(u64::MAX),
            },
            Request::Subscribe,
            Request::Watchdog,
            Request::SetWatchdog {
                action: WatchdogAction::None,
            },
            Request::SetWatchdog {
                action: WatchdogAction::Shutdown,
            },
            Request::Sysrq { key: "b".into() },
            Request::SetDisk {
                disk: "disk0".into(),
                poll_us: Some(0),
                iops: None,
                mib_s: None,
            },
            Request::SetDisk {
                disk: "root".into(),
                poll_us: Some(1000),
                iops: Some(500),
                mib_s: Some(0),
            },
            Request::SetDisk {
                disk: "root".into(),
                poll_us: None,
                iops: None,
                mib_s: Some(100),
            },
            Request::Backup {
                disk: "disk0".into(),
                to: "/var/backups/vmm/web1/root.img".into(),
                speed_mib_s: None,
            },
            Request::Backup {
                disk: "root".into(),
                to: "root.img".into(),
                speed_mib_s: Some(64),
            },
            Request::Snapshot {
                dir: "web1-1204".into(),
                stop: false,
            },
            Request::Snapshot {
                dir: "/srv/snapshots/web1/x".into(),
                stop: true,
            },
            Request::Migrate {
                to: "192.0.2.7:4444".into(),
                token: "s3cret".into(),
                disks: DiskMigration::Shared,
                speed_mib_s: None,
                auto_converge: false,
                downtime_ms: None,
            },
            Request::Migrate {
                to: "[2001:db8::7]:4444".into(),
                token: "s3cret".into(),
                disks: DiskMigration::Copy,
                speed_mib_s: Some(100),
                auto_converge: true,
                downtime_ms: Some(50),
            },
            Request::MigrateCancel,
        ]
    }

    #[test]
    fn every_request_round_trips_through_encode_and_parse() {
        for r in all_requests() {
            let line = encode_request(&r);
            assert!(line.ends_with('\n'));
            assert_eq!(line.matches('\n').count(), 1, "{line}");
            assert_eq!(parse_request(line.trim_end()).unwrap(), r, "{line}");
        }
    }

    #[test]
    fn every_name_is_parsed_and_named_back() {
        let mut seen = Vec::new();
        for r in all_requests() {
            assert!(Request::NAMES.contains(&r.name()));
            if !seen.contains(&r.name()) {
                seen.push(r.name());
            }
        }
        assert_eq!(seen, Request::NAMES);
    }

    #[test]
    fn simple_commands_parse() {
        assert_eq!(
            parse_request(r#"{"cmd":"status"}"#).unwrap(),
            Request::Status
        );
        assert_eq!(
            parse_request(r#"  {"cmd":"pause"}  "#).unwrap(),
            Request::Pause
        );
        assert_eq!(
            parse_request(r#"{"cmd":"shutdown","timeout_s":30}"#).unwrap(),
            Request::Shutdown {
                timeout_s: Some(30)
            }
        );
        assert_eq!(
            parse_request(r#"{"timeout_s":null,"cmd":"reboot"}"#).unwrap(),
            Request::Reboot { timeout_s: None }
        );
        assert_eq!(
            parse_request(r#"{"cmd":"console"}"#).unwrap(),
            Request::Console { replay: false }
        );
        assert_eq!(
            parse_request(r#"{"cmd":"set-watchdog","action":"pause"}"#).unwrap(),
            Request::SetWatchdog {
                action: WatchdogAction::Pause
            }
        );
    }

    #[test]
    fn malformed_json_is_reported_with_position() {
        assert!(err("{").starts_with("malformed JSON: "), "{}", err("{"));
        assert!(err("").starts_with("malformed JSON: "));
        assert!(err("status").starts_with("malformed JSON: "));
        assert!(err(r#"{"cmd":"status"} trailing"#).starts_with("malformed JSON: "));
        assert!(err(r#"{"cmd":"status",}"#).starts_with("malformed JSON: "));
        assert!(err("{\"cmd\":\"st\u{0}atus\"}").starts_with("malformed JSON: "));
        assert!(err("\u{feff}{\"cmd\":\"status\"}").starts_with("malformed JSON: "));
    }

    #[test]
    fn non_objects_are_refused() {
        for line in [
            "[]",
            "1",
            "\"status\"",
            "null",
            "true",
            r#"[{"cmd":"status"}]"#,
        ] {
            assert_eq!(
                parse_request(line),
                Err(ProtocolError::NotAnObject),
                "{line}"
            );
        }
    }

    #[test]
    fn missing_or_mistyped_cmd_is_refused() {
        assert_eq!(err("{}"), "missing 'cmd' in request");
        assert_eq!(err(r#"{"cmd":null}"#), "missing 'cmd' in request");
        assert_eq!(err(r#"{"command":"status"}"#), "missing 'cmd' in request");
        assert_eq!(err(r#"{"cmd":1}"#), "'cmd' must be a string");
        assert_eq!(err(r#"{"cmd":["status"]}"#), "'cmd' must be a string");
    }

    #[test]
    fn unknown_command_is_named() {
        assert_eq!(err(r#"{"cmd":"x"}"#), "unknown command 'x'");
        assert_eq!(err(r#"{"cmd":"STATUS"}"#), "unknown command 'STATUS'");
        assert_eq!(
            err(r#"{"cmd":"set_kernel"}"#),
            "unknown command 'set_kernel'"
        );
        assert_eq!(err(r#"{"cmd":""}"#), "unknown command ''");
        let long = "y".repeat(1000);
        let msg = err(&format!(r#"{{"cmd":"{long}"}}"#));
        assert!(msg.len() < 100, "{msg}");
        let wide = "é".repeat(100);
        assert!(err(&format!(r#"{{"cmd":"{wide}"}}"#)).ends_with("...'"));
    }

    #[test]
    fn missing_arguments_are_named() {
        assert_eq!(
            err(r#"{"cmd":"set-kernel"}"#),
            "missing argument 'name' for set-kernel"
        );
        assert_eq!(
            err(r#"{"cmd":"set-kernel","name":null}"#),
            "missing argument 'name' for set-kernel"
        );
        assert_eq!(
            err(r#"{"cmd":"set-watchdog"}"#),
            "missing argument 'action' for set-watchdog"
        );
        assert_eq!(
            err(r#"{"cmd":"set-disk","disk":"disk0"}"#),
            "missing argument 'poll_us, iops or mib_s' for set-disk"
        );
        assert_eq!(
            err(r#"{"cmd":"set-disk","poll_us":5}"#),
            "missing argument 'disk' for set-disk"
        );
    }

    #[test]
    fn invalid_arguments_say_what_is_expected() {
        assert_eq!(
            err(r#"{"cmd":"migrate","to":"192.0.2.7:1","token":"t","auto_converge":"yes"}"#),
            "invalid argument 'auto_converge' for migrate: expected true or false"
        );
        for bad in ["0", "30001", "-5", "1.5", "\"300\""] {
            assert_eq!(
                err(&format!(
                    r#"{{"cmd":"migrate","to":"192.0.2.7:1","token":"t","downtime_ms":{bad}}}"#
                )),
                "invalid argument 'downtime_ms' for migrate: expected an integer from 1 to 30000",
                "{bad}"
            );
        }
        assert_eq!(
            err(r#"{"cmd":"migrate","to":"192.0.2.7:1","token":"t","disks":"rsync"}"#),
            "invalid argument 'disks' for migrate: expected one of shared, copy"
        );
        assert_eq!(
            err(r#"{"cmd":"migrate","to":"192.0.2.7:1","token":"t","disks":true}"#),
            "invalid argument 'disks' for migrate: expected one of shared, copy"
        );
        assert_eq!(
            err(r#"{"cmd":"migrate","to":"192.0.2.7:1","token":"t","speed_mib_s":-1}"#),
            "invalid argument 'speed_mib_s' for migrate: expected an integer from 0 to 1048576"
        );
        for bad in ["1001", "-1", "2.5", "\"50\"", "true"] {
            assert_eq!(
                err(&format!(
                    r#"{{"cmd":"set-disk","disk":"disk0","poll_us":{bad}}}"#
                )),
                "invalid argument 'poll_us' for set-disk: expected an integer from 0 to 1000",
                "{bad}"
            );
        }
        assert_eq!(
            err(r#"{"cmd":"set-disk","disk":"disk0","iops":10000001}"#),
            "invalid argument 'iops' for set-disk: expected an integer from 0 to 10000000"
        );
        assert_eq!(
            err(r#"{"cmd":"set-disk","disk":"disk0","mib_s":-1}"#),
            "invalid argument 'mib_s' for set-disk: expected an integer from 0 to 1048576"
        );
        assert_eq!(
            err(r#"{"cmd":"set-disk","disk":"disk0","poll_us":5,"bps":100}"#),
            "unknown argument 'bps' for set-disk"
        );
        assert_eq!(
            err(r#"{"cmd":"migrate-cancel","now":true}"#),
            "unknown argument 'now' for migrate-cancel"
        );
        assert_eq!(
            err(r#"{"cmd":"shutdown","timeout_s":-1}"#),
            "invalid argument 'timeout_s' for shutdown: expected an integer from 0 to 86400"
        );
        assert_eq!(
            err(r#"{"cmd":"reboot","timeout_s":"10"}"#),
            "invalid argument 'timeout_s' for reboot: expected an integer from 0 to 86400"
        );
        assert_eq!(
            err(r#"{"cmd":"reboot","timeout_s":1.5}"#),
            "invalid argument 'timeout_s' for reboot: expected an integer from 0 to 86400"
        );
        assert_eq!(
            err(r#"{"cmd":"reboot","timeout_s":86401}"#),
            "invalid argument 'timeout_s' for reboot: expected an integer from 0 to 86400"
        );
        assert_eq!(
            err(r#"{"cmd":"log","bytes":-5}"#),
            "invalid argument 'bytes' for log: expected a non-negative integer"
        );
        assert_eq!(
            err(r#"{"cmd":"log","bytes":1e30}"#),
            "invalid argument 'bytes' for log: expected a non-negative integer"
        );
        assert_eq!(
            err(r#"{"cmd":"console","replay":"yes"}"#),
            "invalid argument 'replay' for console: expected true or false"
        );
        assert_eq!(
            err(r#"{"cmd":"set-kernel","name":""}"#),
            "invalid argument 'name' for set-kernel: expected a non-empty string"
        );
        assert_eq!(
            err(r#"{"cmd":"set-kernel","name":7}"#),
            "invalid argument 'name' for set-kernel: expected a non-empty string"
        );
        assert_eq!(
            err(r#"{"cmd":"set-watchdog","action":"explode"}"#),
            "invalid argument 'action' for set-watchdog: expected one of reset, poweroff, pause, shutdown, none"
        );
        assert_eq!(
            err(r#"{"cmd":"set-watchdog","action":{"a":1}}"#),
            "invalid argument 'action' for set-watchdog: expected one of reset, poweroff, pause, shutdown, none"
        );
    }

    #[test]
    fn unknown_arguments_are_refused() {
        assert_eq!(
            err(r#"{"cmd":"status","verbose":true}"#),
            "unknown argument 'verbose' for status"
        );
        assert_eq!(
            err(r#"{"cmd":"shutdown","timeout":5}"#),
            "unknown argument 'timeout' for shutdown"
        );
        assert_eq!(
            err(r#"{"cmd":"set-kernel","name":"a","b":1}"#),
            "unknown argument 'b' for set-kernel"
        );
    }

    #[test]
    fn invalid_utf8_is_refused() {
        assert_eq!(
            parse_request_bytes(b"{\"cmd\":\"\xff\"}"),
            Err(ProtocolError::InvalidUtf8)
        );
        assert_eq!(
            parse_request_bytes(br#"{"cmd":"status"}"#),
            Ok(Request::Status)
        );
    }

    #[test]
    fn deeply_nested_json_is_an_error_not_a_crash() {
        let line = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(err(&line).starts_with("malformed JSON: "));
        let line = format!(
            r#"{{"cmd":"status","x":{}1{}}}"#,
            "[".repeat(5000),
            "]".repeat(5000)
        );
        assert!(err(&line).starts_with("malformed JSON: "));
    }
}
