//! The VM's configuration: command-line flags and an optional TOML file with
//! the same keys (flags win), validated into a `VmConfig`.

use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Deserialize;

use crate::layout::{MAX_MEMORY_MIB, MIN_MEMORY_MIB};

mod spec;
use spec::parse_bool;
pub use spec::{parse_disk, parse_net, DiskSpec, NetSpec};

pub const MAX_VCPUS: u8 = 8;
/// Largest console log file before rotation (1 TiB: a typo, not a choice, beyond).
pub const MAX_CONSOLE_LOG_MIB: u64 = 1 << 20;
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    ReadFile { path: String, reason: String },
    #[error("config file {path}: {reason}")]
    ParseFile { path: String, reason: String },
    #[error("no kernel given: use --kernel PATH, or --kernel-dir DIR with --kernel-name NAME")]
    NoKernel,
    #[error("--kernel and --kernel-name are mutually exclusive")]
    KernelTwice,
    #[error("--kernel-name needs --kernel-dir")]
    NoKernelDir,
    #[error("kernel {0} not found")]
    KernelMissing(String),
    #[error("kernel {0}: a kernel from the VM's disk needs a --disk (the first is read)")]
    DiskKernelWithoutDisk(String),
    #[error("kernel library entry '{name}' not found in {dir} (entries: {entries})")]
    LibraryEntryMissing {
        name: String,
        dir: String,
        entries: String,
    },
    #[error("initrd {0} not found")]
    InitrdMissing(String),
    #[error("--memory {0}: must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB")]
    MemoryRange(u64),
    #[error("--console-log-max {0}: must be between 1 and {MAX_CONSOLE_LOG_MIB} MiB")]
    ConsoleLogMax(u64),
    #[error("--memory {asked} MiB is more than this host has ({host} MiB)")]
    MemoryHost { asked: u64, host: u64 },
    #[error("--vcpus {0}: must be between 1 and {MAX_VCPUS}")]
    Vcpus(u64),
    #[error("--console {0}: must be 'stdio', 'none' or 'auto'")]
    Console(String),
    #[error("{flag} {spec}: {reason}")]
    Spec {
        flag: String,
        spec: String,
        reason: String,
    },
    #[error("too many virtio devices ({0}); at most {max}", max = crate::layout::MAX_VIRTIO_DEVICES)]
    TooManyDevices(usize),
    #[error("VM name '{0}' is invalid: use 1-64 letters, digits, '-', '_' or '.'")]
    Name(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleMode {
    /// stdio when stdin is a terminal, otherwise none.
    #[default]
    Auto,
    Stdio,
    None,
}

/// Command-line flags. Every field is optional so the TOML file can supply
/// it; `resolve` applies defaults and checks.
#[derive(Parser, Debug, Default, Clone)]
#[command(
    name = "vmm",
    version,
    about = "KVM virtual machine monitor: one process per guest"
)]
pub struct Cli {
    /// TOML file with the same keys as the flags (flags override it).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The VM's name (logs, events, the admin shell).
    #[arg(long)]
    pub name: Option<String>,
    /// Kernel image: bzImage, or an ELF vmlinux with a PVH entry.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (default: the library entry's, or a serial console).
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Kernel library directory (entries are DIR/NAME/{vmlinux or bzImage,initrd.img,cmdline}).
    #[arg(long, value_name = "DIR")]
    pub kernel_dir: Option<PathBuf>,
    /// Library entry to boot.
    #[arg(long, value_name = "NAME")]
    pub kernel_name: Option<String>,
    /// Guest memory in MiB (default 256).
    #[arg(long, value_name = "MIB")]
    pub memory: Option<u64>,
    /// Number of vCPUs (default 1).
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u64>,
    /// Append everything the guest prints to this file (O_APPEND).
    #[arg(long, value_name = "PATH")]
    pub console_log: Option<PathBuf>,
    /// Rotate the console log before it passes this size (MiB, default 64).
    #[arg(long, value_name = "MIB")]
    pub console_log_max: Option<u64>,
    /// Rotated console logs kept (PATH.1 ... PATH.N, default 2; 0 keeps none).
    #[arg(long, value_name = "N")]
    pub console_log_keep: Option<u32>,
    /// Where the serial console goes.
    #[arg(long, value_enum)]
    pub console: Option<ConsoleMode>,
    /// Exit the process when the guest powers off (default when there is no control socket).
    #[arg(long)]
    pub exit_on_poweroff: bool,
    /// Attach the kernel library's modules disk (`<kernel-dir>/modules.img`) when there is one
    /// (default on).
    #[arg(long, value_name = "on|off")]
    pub library_modules: Option<String>,
    /// seccomp filters on the vCPU and disk I/O threads: a forbidden system call ends the VMM
    /// (on, the default), is only logged by the kernel (log), or no filter (off).
    #[arg(long, value_name = "on|log|off")]
    pub seccomp: Option<String>,
    /// After start-up, confine the VMM: Landlock file access, no capabilities (on, the
    /// default), or keep root's everything (off, logged as such).
    #[arg(long, value_name = "on|off")]
    pub sandbox: Option<String>,
    /// After start-up, become this user (and its groups); needs a start as root.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Keep the VM's state (the customer's kernel choice) in DIR/state.json rather than
    /// beside the config file.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Where the operator's `backup` requests may write their copies (a directory of this
    /// VM's own; without it `backup` is refused).
    #[arg(long, value_name = "DIR")]
    pub backup_dir: Option<PathBuf>,
    /// Where the operator's `snapshot` requests may write (a directory of this VM's own;
    /// without it `snapshot` is refused).
    #[arg(long, value_name = "DIR")]
    pub snapshot_dir: Option<PathBuf>,
    /// Continue the VM saved in this snapshot directory instead of booting: give the flags
    /// it was started with (disk and TAP paths may differ; memory, vCPUs and devices must
    /// match).
    #[arg(long, value_name = "DIR")]
    pub restore: Option<PathBuf>,
    /// Receive a live migration on this TCP address (HOST:PORT) instead of booting: give the
    /// flags the VM runs with at its source (disk and TAP paths may differ).
    #[arg(long, value_name = "HOST:PORT")]
    pub incoming: Option<String>,
    /// The token a migration's source must present (`migrate`'s `token`), the file's first
    /// line; required with --incoming.
    #[arg(long, value_name = "FILE")]
    pub incoming_token_file: Option<PathBuf>,
    /// Listen for control requests on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// A Unix user allowed on the control socket (repeatable).
    #[arg(long = "allow-user", value_name = "USER")]
    pub allow_users: Vec<String>,
    /// A Unix group allowed on the control socket (repeatable).
    #[arg(long = "allow-group", value_name = "GROUP")]
    pub allow_groups: Vec<String>,
    /// Watchdog: action=reset|poweroff|pause|shutdown|none.
    #[arg(long, value_name = "action=ACTION")]
    pub watchdog: Option<String>,
    /// What a guest panic (pvpanic) does: reset, pause, poweroff or none.
    #[arg(long, value_name = "ACTION")]
    pub on_panic: Option<String>,
    /// Command run (by /bin/sh) on watchdog and panic events, with
    /// VMM_EVENT, VMM_NAME and VMM_TIME in its environment.
    #[arg(long, value_name = "CMD")]
    pub alert_hook: Option<String>,
    /// A virtio-block disk: path=FILE[,ro=on][,id=NAME][,direct=on][,io=auto|sync|io_uring]
    /// [,queues=N][,poll_us=N][,iops=N][,mib_s=N] (repeatable; queues=N offers N request
    /// queues, one per vCPU being the usual choice; poll_us=N lets the disk's thread poll for
    /// the guest's next request up to N µs, at most 1000, before it sleeps: lower latency for
    /// CPU; iops=N and mib_s=N limit the disk to N requests and N MiB a second).
    #[arg(long = "disk", value_name = "SPEC")]
    pub disks: Vec<String>,
    /// A virtio-net interface on a TAP: tap=NAME[,mac=MAC][,vhost=auto|on|off][,queues=N]
    /// [,bridge=BRIDGE][,ip=ADDR[/LEN]]... (repeatable; vhost-net where /dev/vhost-net opens,
    /// by default; one queue pair per vCPU by default, where the TAP is multi_queue; bridge and
    /// ip are for `vmm net up`).
    #[arg(long = "net", value_name = "SPEC")]
    pub nets: Vec<String>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    name: Option<String>,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    kernel_dir: Option<PathBuf>,
    kernel_name: Option<String>,
    memory: Option<u64>,
    vcpus: Option<u64>,
    console_log: Option<PathBuf>,
    console_log_max: Option<u64>,
    console_log_keep: Option<u32>,
    console: Option<ConsoleMode>,
    exit_on_poweroff: Option<bool>,
    library_modules: Option<String>,
    seccomp: Option<String>,
    sandbox: Option<String>,
    user: Option<String>,
    state_dir: Option<PathBuf>,
    backup_dir: Option<PathBuf>,
    snapshot_dir: Option<PathBuf>,
    control: Option<PathBuf>,
    #[serde(default)]
    allow_user: Vec<String>,
    #[serde(default)]
    allow_group: Vec<String>,
    watchdog: Option<String>,
    on_panic: Option<String>,
    alert_hook: Option<String>,
    #[serde(default)]
    disk: Vec<String>,
    #[serde(default)]
    net: Vec<String>,
}

/// Where the kernel comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelSource {
    Path {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
    },
    Library {
        dir: PathBuf,
        name: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    pub name: String,
    pub kernel: KernelSource,
    /// Explicit command line; None means the library entry's or the default.
    pub cmdline: Option<String>,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub console_log: Option<PathBuf>,
    /// The console log's size cap and rotation.
    pub console_log_limits: crate::console::LogLimits,
    pub console: ConsoleMode,
    pub exit_on_poweroff: bool,
    /// Attach `<library>/modules.img` (see [`VmConfig::library_modules`]).
    pub library_modules: bool,
    /// `--seccomp`: the filters of the guest-facing threads.
    pub seccomp: crate::seccomp::Mode,
    /// `--sandbox`: confinement after start-up (sandbox.rs).
    pub sandbox: crate::sandbox::Mode,
    /// `--user`: who the VMM becomes after start-up.
    pub user: Option<String>,
    /// `--state-dir`: where the state file lives, if not beside the config file.
    pub state_dir: Option<PathBuf>,
    /// `--backup-dir`: where `backup` writes its copies.
    pub backup_dir: Option<PathBuf>,
    /// `--snapshot-dir`: where `snapshot` writes.
    pub snapshot_dir: Option<PathBuf>,
    /// `--restore`: the snapshot this process continues instead of booting.
    pub restore: Option<PathBuf>,
    /// `--incoming`: the address a migration arrives on, and its token.
    pub incoming: Option<String>,
    pub incoming_token: Option<String>,
    /// The config file, if any (its directory holds the VM's state file).
    pub config_file: Option<PathBuf>,
    pub control: Option<PathBuf>,
    pub disks: Vec<DiskSpec>,
    pub nets: Vec<NetSpec>,
    pub allow_users: Vec<String>,
    pub allow_groups: Vec<String>,
    pub watchdog_action: protocol::WatchdogAction,
    pub panic_action: protocol::PanicAction,
    pub alert_hook: Option<String>,
}

/// A mode flag's value (`--seccomp`, `--sandbox`), its default when not given.
fn parse_mode<T>(flag: &str, value: Option<String>) -> Result<T, ConfigError>
where
    T: std::str::FromStr<Err = String> + Default,
{
    match value {
        None => Ok(T::default()),
        Some(v) => v.parse().map_err(|reason| ConfigError::Spec {
            flag: flag.into(),
            spec: v,
            reason,
        }),
    }
}

/// `p` made absolute against the working directory (as it is, if that fails).
fn absolute(p: PathBuf) -> PathBuf {
    std::path::absolute(&p).unwrap_or(p)
}

/// A resolved kernel: what one boot loads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelChoice {
    pub label: String,
    pub kernel: crate::boot::Image,
    pub initrd: Option<crate::boot::Image>,
    pub cmdline: String,
}

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The VM's name: the flag over the file's, `vm` when neither gives one.
fn vm_name(flag: Option<String>, file: Option<String>) -> Result<String, ConfigError> {
    let name = flag.or(file).unwrap_or_else(|| "vm".to_string());
    if !valid_name(&name) {
        return Err(ConfigError::Name(name));
    }
    Ok(name)
}

/// The `--net` specs (the flags over the file's `net`), parsed; no TAP twice.
fn parse_nets(flags: &[String], file: &[String]) -> Result<Vec<NetSpec>, ConfigError> {
    let specs = if flags.is_empty() { file } else { flags };
    let nets = specs
        .iter()
        .map(|s| parse_net(s))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, n) in nets.iter().enumerate() {
        if nets[..i].iter().any(|m| m.tap == n.tap) {
            return Err(ConfigError::Spec {
                flag: "--net".into(),
                spec: specs.get(i).cloned().unwrap_or_default(),
                reason: format!("tap {} is already another interface's", n.tap),
            });
        }
    }
    Ok(nets)
}

/// What `vmm net` needs of a VM's flags and config file: its name and
/// interfaces, nothing else checked (it runs after a VMM has stopped too,
/// when a kernel may be gone).
pub fn resolve_nets(cli: &Cli) -> Result<(String, Vec<NetSpec>), ConfigError> {
    let file = match &cli.config {
        Some(p) => load_file(p)?,
        None => FileConfig::default(),
    };
    let name = vm_name(cli.name.clone(), file.name)?;
    let nets = parse_nets(&cli.nets, &file.net)?;
    Ok((name, nets))
}

impl VmConfig {
    /// Merges flags over the file and validates everything that can be
    /// checked before touching KVM. `host_mib` is the host's memory.
    pub fn resolve(cli: Cli, host_mib: Option<u64>) -> Result<VmConfig, ConfigError> {
        let file = match &cli.config {
            Some(p) => load_file(p)?,
            None => FileConfig::default(),
        };
        let name = vm_name(cli.name, file.name)?;
        let kernel = cli.kernel.or(file.kernel);
        let initrd = cli.initrd.or(file.initrd);
        let kernel_dir = cli.kernel_dir.or(file.kernel_dir);
        let kernel_name = cli.kernel_name.or(file.kernel_name);
        let kernel = match (kernel, kernel_name) {
            (Some(_), Some(_)) => return Err(ConfigError::KernelTwice),
            (Some(k), None) => KernelSource::Path { kernel: k, initrd },
            (None, Some(n)) => KernelSource::Library {
                dir: kernel_dir.ok_or(ConfigError::NoKernelDir)?,
                name: n,
            },
            (None, None) => return Err(ConfigError::NoKernel),
        };
        let mem_mib = cli.memory.or(file.memory).unwrap_or(256);
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mem_mib) {
            return Err(ConfigError::MemoryRange(mem_mib));
        }
        if let Some(host) = host_mib {
            if mem_mib > host {
                return Err(ConfigError::MemoryHost {
                    asked: mem_mib,
                    host,
                });
            }
        }
        let vcpus = cli.vcpus.or(file.vcpus).unwrap_or(1);
        if vcpus == 0 || vcpus > u64::from(MAX_VCPUS) {
            return Err(ConfigError::Vcpus(vcpus));
        }
        let disk_specs = if cli.disks.is_empty() {
            file.disk
        } else {
            cli.disks
        };
        let disks = disk_specs
            .iter()
            .map(|s| parse_disk(s))
            .collect::<Result<Vec<_>, _>>()?;
        let nets = parse_nets(&cli.nets, &file.net)?;
        if disks.len() + nets.len() > crate::layout::MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(disks.len() + nets.len()));
        }
        let watchdog_action = match cli.watchdog.or(file.watchdog) {
            None => protocol::WatchdogAction::default(),
            Some(spec) => {
                let bad = |reason: String| ConfigError::Spec {
                    flag: "--watchdog".into(),
                    spec: spec.clone(),
                    reason,
                };
                let v = spec
                    .strip_prefix("action=")
                    .ok_or_else(|| bad("expected action=ACTION".into()))?;
                v.parse()
                    .map_err(|e: protocol::ParseEnumError| bad(e.to_string()))?
            }
        };
        let panic_action = match cli.on_panic.or(file.on_panic) {
            None => protocol::PanicAction::default(),
            Some(v) => v
                .parse()
                .map_err(|e: protocol::ParseEnumError| ConfigError::Spec {
                    flag: "--on-panic".into(),
                    spec: v.clone(),
                    reason: e.to_string(),
                })?,
        };
        let console_log_limits = {
            use crate::console::LogLimits;
            let mib = cli
                .console_log_max
                .or(file.console_log_max)
                .unwrap_or(LogLimits::DEFAULT_MAX_MIB);
            let max_bytes = mib
                .checked_mul(1 << 20)
                .filter(|_| (1..=MAX_CONSOLE_LOG_MIB).contains(&mib))
                .ok_or(ConfigError::ConsoleLogMax(mib))?;
            LogLimits {
                max_bytes,
                keep: cli
                    .console_log_keep
                    .or(file.console_log_keep)
                    .unwrap_or(LogLimits::DEFAULT_KEEP),
            }
        };
        let library_modules = match cli.library_modules.or(file.library_modules) {
            None => true,
            Some(v) => parse_bool(&v).ok_or_else(|| ConfigError::Spec {
                flag: "--library-modules".into(),
                spec: v.clone(),
                reason: "use on or off".into(),
            })?,
        };
        let incoming_token = match (&cli.incoming, &cli.incoming_token_file) {
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => {
                return Err(ConfigError::Spec {
                    flag: "--incoming".into(),
                    spec: cli.incoming.clone().unwrap_or_default(),
                    reason: "--incoming and --incoming-token-file go together".into(),
                })
            }
            (Some(_), Some(f)) => {
                let text = std::fs::read_to_string(f).map_err(|e| ConfigError::Spec {
                    flag: "--incoming-token-file".into(),
                    spec: f.display().to_string(),
                    reason: e.to_string(),
                })?;
                let token = text.lines().next().unwrap_or_default().trim().to_string();
                if token.len() < 16 {
                    return Err(ConfigError::Spec {
                        flag: "--incoming-token-file".into(),
                        spec: f.display().to_string(),
                        reason: "the token must be at least 16 characters".into(),
                    });
                }
                Some(token)
            }
        };
        let seccomp = parse_mode("--seccomp", cli.seccomp.or(file.seccomp))?;
        let sandbox = parse_mode("--sandbox", cli.sandbox.or(file.sandbox))?;
        let cfg = VmConfig {
            name,
            kernel,
            cmdline: cli.cmdline.or(file.cmdline),
            mem_mib,
            vcpus: vcpus as u8,
            console_log: cli.console_log.or(file.console_log),
            console_log_limits,
            console: cli.console.or(file.console).unwrap_or_default(),
            exit_on_poweroff: cli.exit_on_poweroff || file.exit_on_poweroff.unwrap_or(false),
            library_modules,
            seccomp,
            sandbox,
            user: cli.user.or(file.user),
            state_dir: cli.state_dir.or(file.state_dir),
            // Absolute now: a confined VMM cannot ask for its working
            // directory (getcwd is outside its seccomp lists).
            backup_dir: cli.backup_dir.or(file.backup_dir).map(absolute),
            snapshot_dir: cli.snapshot_dir.or(file.snapshot_dir).map(absolute),
            restore: cli.restore,
            incoming: cli.incoming,
            incoming_token,
            config_file: cli.config,
            control: cli.control.or(file.control),
            disks,
            nets,
            allow_users: if cli.allow_users.is_empty() {
                file.allow_user
            } else {
                cli.allow_users
            },
            allow_groups: if cli.allow_groups.is_empty() {
                file.allow_group
            } else {
                cli.allow_groups
            },
            watchdog_action,
            panic_action,
            alert_hook: cli.alert_hook.or(file.alert_hook),
        };
        // Fail early on a missing kernel rather than at first boot. A
        // kernel from the VM's disk is found at each boot (disk_kernels).
        match &cfg.kernel {
            KernelSource::Library { name, .. } if crate::disk_kernels::is_disk_name(name) => {
                if cfg.disks.is_empty() {
                    return Err(ConfigError::DiskKernelWithoutDisk(name.clone()));
                }
            }
            _ => {
                cfg.kernel_choice(None)?;
            }
        }
        Ok(cfg)
    }

    /// The kernel for the next boot: the library entry `override_name` if
    /// given (a customer's `set-kernel`), else the configured one.
    pub fn kernel_choice(&self, override_name: Option<&str>) -> Result<KernelChoice, ConfigError> {
        match (&self.kernel, override_name) {
            (KernelSource::Library { dir, .. }, Some(n)) if !n.is_empty() => {
                library_entry(dir, n, self.cmdline.as_deref())
            }
            (KernelSource::Library { dir, name }, _) => {
                library_entry(dir, name, self.cmdline.as_deref())
            }
            (KernelSource::Path { kernel, initrd }, _) => {
                if !kernel.is_file() {
                    return Err(ConfigError::KernelMissing(kernel.display().to_string()));
                }
                if let Some(i) = initrd {
                    if !i.is_file() {
                        return Err(ConfigError::InitrdMissing(i.display().to_string()));
                    }
                }
                Ok(KernelChoice {
                    label: kernel.display().to_string(),
                    kernel: crate::boot::Image::File(kernel.clone()),
                    initrd: initrd.clone().map(crate::boot::Image::File),
                    cmdline: self
                        .cmdline
                        .clone()
                        .unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
                })
            }
        }
    }

    pub fn library_dir(&self) -> Option<&Path> {
        match &self.kernel {
            KernelSource::Library { dir, .. } => Some(dir),
            KernelSource::Path { .. } => None,
        }
    }
}

fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::ReadFile {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::ParseFile {
        path: path.display().to_string(),
        reason: e.message().to_string(),
    })
}

/// The entries of a kernel library: subdirectories holding a kernel.
/// The serial of the kernel library's modules disk (what the initramfs looks for).
pub const MODULES_DISK_SERIAL: &str = "vmm-modules";
/// The modules image in a kernel library directory.
pub const MODULES_IMAGE: &str = "modules.img";

impl VmConfig {
    /// `<library>/modules.img`, when the VM boots library kernels, the library has one and
    /// `--library-modules off` was not given.
    pub fn library_modules(&self) -> Option<PathBuf> {
        match &self.kernel {
            KernelSource::Library { dir, .. } if self.library_modules => {
                Some(dir.join(MODULES_IMAGE)).filter(|p| p.is_file())
            }
            _ => None,
        }
    }
}

pub fn library_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| {
                    e.path().join("bzImage").is_file() || e.path().join("vmlinux").is_file()
                })
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

pub fn library_entry(
    dir: &Path,
    name: &str,
    cmdline: Option<&str>,
) -> Result<KernelChoice, ConfigError> {
    let entry = dir.join(name);
    // The uncompressed ELF (PVH entry) when the entry has one: no
    // decompressor to run at every boot (mini under kvm_pvm: "Run /init"
    // after 45 s instead of 64 s). Otherwise the bzImage.
    let kernel = ["vmlinux", "bzImage"]
        .iter()
        .map(|f| entry.join(f))
        .find(|k| k.is_file())
        .unwrap_or_else(|| entry.join("bzImage"));
    if !valid_name(name) || !kernel.is_file() {
        return Err(ConfigError::LibraryEntryMissing {
            name: name.to_string(),
            dir: dir.display().to_string(),
            entries: library_entries(dir).join(", "),
        });
    }
    let initrd = Some(entry.join("initrd.img")).filter(|p| p.is_file());
    let cmdline = match cmdline {
        Some(c) => c.to_string(),
        None => std::fs::read_to_string(entry.join("cmdline"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| DEFAULT_CMDLINE.to_string()),
    };
    Ok(KernelChoice {
        label: name.to_string(),
        kernel: crate::boot::Image::File(kernel),
        initrd: initrd.map(crate::boot::Image::File),
        cmdline,
    })
}

/// MemTotal of the host in MiB.
pub fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests;
