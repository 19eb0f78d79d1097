//! Least privilege once start-up is done (issue 14, item 1).
//!
//! Start-up needs root: `/dev/kvm`, creating TAPs (`CAP_NET_ADMIN`),
//! binding the control socket in a root-owned run directory. Nothing after
//! it does: every boot re-reads the kernel and initrd, the console log
//! rotates, `set-kernel` rewrites the state file, `/proc/self/net/dev`
//! gives the TAP counters; every other descriptor is already open (each
//! vhost-net instance is opened with its device and kept: see
//! `devices::virtio::net::vhost`). So, before the
//! first thread is started (the console log writer, disk I/O threads,
//! vCPUs: Landlock and credentials are per thread and inherited), the
//! process
//!
//! 1. restricts its file access with Landlock (the `landlock` crate) to
//!    exactly that list, read-only where it only reads; execution is
//!    denied everywhere (best effort: the kernel's Landlock ABI decides
//!    which rights it can enforce, and the log says what it got);
//! 2. with `--user NAME`, becomes that user (its groups, then its gid,
//!    then its uid, all three of real, effective and saved);
//! 3. empties every capability set (effective, permitted, inheritable,
//!    ambient, bounding) and locks the secure bits, so neither root's
//!    uid nor an `execve` can give them back; `no_new_privs` is set too
//!    (Landlock requires it; the seccomp filters set it again).
//!
//! `--sandbox off` skips all three: a VMM running as root with every file
//! of the host open to it, which it says in its log. A failure at any
//! step ends the start-up: the VMM never runs a guest less confined than
//! configured.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    ABI,
};

use crate::config::{KernelSource, VmConfig};
use crate::control::supplementary_groups;

/// `--sandbox`: confine the VMM after start-up (the default) or not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    #[default]
    On,
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(Mode::On),
            "off" => Ok(Mode::Off),
            _ => Err("use on or off".into()),
        }
    }
}

/// Why the VMM could not confine itself.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("unknown user '{0}' in --user")]
    UnknownUser(String),
    #[error("--user {0}: {1}")]
    Lookup(String, String),
    #[error("--user needs the VMM started as root (it is uid {0})")]
    NotRoot(u32),
    #[error("--sandbox off and --user together: becoming another user is part of the sandbox")]
    UserWithoutSandbox,
    #[error("Landlock: {0}")]
    Landlock(String),
    #[error("{what}: {source}")]
    Sys {
        what: &'static str,
        source: io::Error,
    },
    #[error("{0}")]
    Check(String),
}

/// The user the VMM becomes: its ids and groups, looked up at start-up
/// (the user database is not reachable once confined).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, the primary one included.
    pub groups: Vec<u32>,
}

impl Identity {
    pub fn lookup(name: &str) -> Result<Identity, SandboxError> {
        let fail = |e: &dyn std::fmt::Display| SandboxError::Lookup(name.into(), e.to_string());
        let user = crate::control::lookup_user(name)
            .map_err(|e| fail(&e))?
            .ok_or_else(|| SandboxError::UnknownUser(name.into()))?;
        let mut groups = supplementary_groups(user.uid, user.gid).map_err(|e| fail(&e))?;
        if !groups.contains(&user.gid) {
            groups.push(user.gid);
        }
        Ok(Identity {
            name: name.into(),
            uid: user.uid,
            gid: user.gid,
            groups,
        })
    }

    /// Would this user's file mode bits let it open `path` read-write?
    /// (The owner's, the group's or the others' bits, as the kernel picks
    /// them; ACLs are not read.)
    pub fn may_open_rw(&self, path: &Path) -> bool {
        self.may(path, 0o6)
    }

    /// Do `path`'s mode bits give this user all of `want` (an `rwx` mask,
    /// e.g. `0o3` to create files in a directory), and may it pass through
    /// every directory above it?
    pub fn may(&self, path: &Path, want: u32) -> bool {
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        abs.ancestors().skip(1).all(|a| self.may_here(a, 0o1)) && self.may_here(&abs, want)
    }

    fn may_here(&self, path: &Path, want: u32) -> bool {
        let Ok(meta) = std::fs::metadata(path) else {
            return false;
        };
        let mode = meta.mode();
        let bits = if meta.uid() == self.uid {
            (mode >> 6) & 0o7
        } else if self.groups.contains(&meta.gid()) {
            (mode >> 3) & 0o7
        } else {
            mode & 0o7
        };
        bits & want == want
    }
}

/// What one Landlock rule allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant {
    /// Read files (a file, or every file beneath a directory), list directories.
    Read,
    /// Read, write, create, truncate and remove regular files beneath a directory.
    ReadWriteDir,
    /// As `ReadWriteDir`, and make and remove directories beneath it.
    ReadWriteTree,
    /// Open a device node read-write and use its ioctls.
    Device,
}

impl Grant {
    fn access(self, abi: ABI) -> landlock::BitFlags<AccessFs> {
        let wanted: landlock::BitFlags<AccessFs> = match self {
            Grant::Read => AccessFs::ReadFile | AccessFs::ReadDir,
            Grant::ReadWriteDir => {
                AccessFs::ReadFile
                    | AccessFs::ReadDir
                    | AccessFs::WriteFile
                    | AccessFs::MakeReg
                    | AccessFs::RemoveFile
                    | AccessFs::Truncate
            }
            Grant::ReadWriteTree => {
                Grant::ReadWriteDir.access(abi) | AccessFs::MakeDir | AccessFs::RemoveDir
            }
            Grant::Device => AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev,
        };
        // Rights this ABI does not know are left to best effort.
        wanted & AccessFs::from_all(abi)
    }
}

/// What the VMM will do to itself after start-up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub mode: Mode,
    pub identity: Option<Identity>,
    /// The only paths a confined VMM may open, and how.
    pub rules: Vec<(PathBuf, Grant)>,
    /// What the confinement will cost this VM (said in the log and by `vmm check`).
    pub warnings: Vec<String>,
    /// Where `set-kernel` keeps the customer's choice (`actions::state_file_path`).
    pub state_file: Option<PathBuf>,
}

/// Landlock's newest ABI this build knows; older kernels get what they
/// support (best effort).
const ABI_WANTED: ABI = ABI::V5;

impl Plan {
    /// The plan for `cfg`.
    pub fn for_config(cfg: &VmConfig) -> Result<Plan, SandboxError> {
        let state_file = crate::actions::state_file_path(
            cfg.state_dir.as_deref(),
            cfg.config_file.as_deref(),
            cfg.control.as_deref(),
            &cfg.name,
        );
        let identity = match (&cfg.user, cfg.sandbox) {
            (Some(_), Mode::Off) => return Err(SandboxError::UserWithoutSandbox),
            (Some(name), Mode::On) => {
                // SAFETY: geteuid has no failure modes.
                let euid = unsafe { libc::geteuid() };
                if euid != 0 {
                    return Err(SandboxError::NotRoot(euid));
                }
                Some(Identity::lookup(name)?)
            }
            (None, _) => None,
        };
        let mut rules = Vec::new();
        let mut warnings = Vec::new();
        // Absolute, so that a relative path never grants the working
        // directory (`/` under systemd).
        let parent = |p: &Path| -> PathBuf {
            let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
            abs.parent()
                .map_or_else(|| PathBuf::from("/"), Path::to_path_buf)
        };
        match &cfg.kernel {
            // `set-kernel` may pick any entry of the library at a reboot.
            KernelSource::Library { dir, .. } => rules.push((
                std::path::absolute(dir).unwrap_or_else(|_| dir.clone()),
                Grant::Read,
            )),
            // Their directories, read-only: a rule on a file follows its
            // inode, and an upgrade replaces the file with a new one.
            KernelSource::Path { kernel, initrd } => {
                rules.push((parent(kernel), Grant::Read));
                if let Some(i) = initrd {
                    rules.push((parent(i), Grant::Read));
                }
            }
        }
        // Rotation renames the log and creates a new one beside it: its
        // directory must be the VM's own (every file beneath it is open to
        // the VMM).
        if let Some(log) = &cfg.console_log {
            let dir = parent(log);
            if dir == Path::new("/") {
                return Err(SandboxError::Check(format!(
                    "console log {}: put it in a directory of its own, not /",
                    log.display()
                )));
            }
            rules.push((dir, Grant::ReadWriteDir));
        }
        // Written to a temporary file, then renamed over the old one: in
        // `--state-dir` (the VM's own) or beside the control socket (its run
        // directory), never beside the config file, where other VMs'
        // configs are.
        if let Some(state) = &state_file {
            let dir = parent(state);
            let beside_config = cfg.state_dir.is_none()
                && cfg.config_file.as_deref().is_some_and(|c| parent(c) == dir);
            if beside_config || dir == Path::new("/") {
                warnings.push(format!(
                    "the sandbox keeps the VMM out of {}: set-kernel cannot save the \
                     customer's choice there (give the VM --state-dir)",
                    dir.display()
                ));
            } else {
                rules.push((dir, Grant::ReadWriteDir));
            }
        }
        // `backup` creates its copy there, writes it, renames it into
        // place (or removes it when the copy failed).
        if let Some(dir) = &cfg.backup_dir {
            if !dir.is_dir() {
                return Err(SandboxError::Check(format!(
                    "--backup-dir {}: not a directory",
                    dir.display()
                )));
            }
            rules.push((
                std::path::absolute(dir).unwrap_or_else(|_| dir.clone()),
                Grant::ReadWriteDir,
            ));
        }
        // `snapshot` makes a directory there, writes its two files and
        // renames it into place (or removes it when it failed).
        if let Some(dir) = &cfg.snapshot_dir {
            if !dir.is_dir() {
                return Err(SandboxError::Check(format!(
                    "--snapshot-dir {}: not a directory",
                    dir.display()
                )));
            }
            rules.push((
                std::path::absolute(dir).unwrap_or_else(|_| dir.clone()),
                Grant::ReadWriteTree,
            ));
        }
        // Nothing else: the control socket stays behind at exit (the next
        // start removes it), `/proc/self/net/dev` is opened before (see
        // actions.rs), and peers' groups come from SO_PEERGROUPS.
        Ok(Plan {
            mode: cfg.sandbox,
            identity,
            rules,
            warnings,
            state_file,
        })
    }

    /// One line for the log and for `vmm check`.
    pub fn describe(&self) -> String {
        match (self.mode, &self.identity) {
            (Mode::Off, _) => {
                "sandbox off: the VMM keeps its user, capabilities and file access".into()
            }
            (Mode::On, Some(id)) => format!(
                "sandbox: user {} (uid {}, gid {}), no capabilities, Landlock over {} paths",
                id.name,
                id.uid,
                id.gid,
                self.rules.len()
            ),
            (Mode::On, None) => format!(
                "sandbox: own user (uid {}), no capabilities, Landlock over {} paths",
                // SAFETY: geteuid has no failure modes.
                unsafe { libc::geteuid() },
                self.rules.len()
            ),
        }
    }

    /// Confines the calling process; it must have a single thread (each
    /// later thread inherits the confinement). Returns how far Landlock
    /// is enforced by this kernel.
    pub fn apply(&self) -> Result<Option<RulesetStatus>, SandboxError> {
        if self.mode == Mode::Off {
            // SAFETY: geteuid has no failure modes.
            if unsafe { libc::geteuid() } == 0 {
                tracing::warn!(
                    "running as root without confinement (--sandbox off): every file and \
                     capability of the host is open to this VMM"
                );
            }
            return Ok(None);
        }
        // Landlock binds the calling thread (and those it starts later);
        // credentials change process-wide only through glibc's broadcast
        // to threads that might by then be filtered. One thread, or stop.
        let threads = thread_count();
        if threads != 1 {
            return Err(SandboxError::Check(format!(
                "{threads} threads before confinement: refusing to confine only some"
            )));
        }
        let status = self.landlock()?;
        drop_privileges(self.identity.as_ref(), true)?;
        Ok(Some(status))
    }

    fn landlock(&self) -> Result<RulesetStatus, SandboxError> {
        let err = |e: &dyn std::fmt::Display| SandboxError::Landlock(e.to_string());
        let mut ruleset = Ruleset::default()
            .handle_access(AccessFs::from_all(ABI_WANTED))
            .map_err(|e| err(&e))?
            .create()
            .map_err(|e| err(&e))?;
        for (path, grant) in &self.rules {
            // A path that is not there (no vhost-net module, no nsswitch.conf)
            // needs no rule: nothing can be opened there later either way.
            let Ok(fd) = PathFd::new(path) else {
                continue;
            };
            let mut access = grant.access(ABI_WANTED);
            if !std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
                access &= AccessFs::from_file(ABI_WANTED);
            }
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd, access))
                .map_err(|e| SandboxError::Landlock(format!("{}: {e}", path.display())))?;
        }
        let status = ruleset.restrict_self().map_err(|e| err(&e))?;
        // SAFETY: geteuid has no failure modes.
        let euid = unsafe { libc::geteuid() };
        without_landlock(&status.ruleset, self.identity.is_some(), euid)?;
        Ok(status.ruleset)
    }
}

/// What a kernel without Landlock leaves: a VMM that becomes a user is
/// still confined by that user's rights (warned); one that stays root
/// would keep root's ownership of root's files (every config, `/etc`), so
/// it does not start: `--user`, or `--sandbox off` said out loud.
fn without_landlock(status: &RulesetStatus, has_user: bool, euid: u32) -> Result<(), SandboxError> {
    if *status != RulesetStatus::NotEnforced {
        return Ok(());
    }
    if !has_user && euid == 0 {
        return Err(SandboxError::Check(
            "this kernel has no Landlock, and a VMM that stays root would still own root's \
             files: give it --user (or --sandbox off to run unconfined)"
                .into(),
        ));
    }
    tracing::warn!(
        "this kernel has no Landlock: the VMM's file access is confined only by its user's rights"
    );
    Ok(())
}

/// This process's threads (0 if `/proc` cannot tell): what may be done
/// only while there is one (forking the hook launcher, confining).
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// `--state-dir`: created if missing (mode 0750), given to the user the
/// VMM becomes, so `set-kernel` can still write there after the drop. An
/// existing directory is left as the operator made it.
pub fn make_state_dir(dir: &Path, identity: Option<&Identity>) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    // Missing parents as `mkdir -p` makes them (0755: passable by the
    // user); the directory itself the user's alone.
    if let Some(parent) = dir.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)?;
    }
    std::fs::DirBuilder::new().mode(0o750).create(dir)?;
    if let Some(id) = identity {
        std::os::unix::fs::chown(dir, Some(id.uid), Some(id.gid))?;
    }
    Ok(())
}

/// Becomes `identity` (when given) and empties every capability set. Also
/// run by the forked hook launcher, so alert hooks run as the VM's user.
pub fn drop_privileges(
    identity: Option<&Identity>,
    no_new_privs: bool,
) -> Result<(), SandboxError> {
    let sys = |what: &'static str| {
        move |r: libc::c_int| {
            if r == 0 {
                Ok(())
            } else {
                Err(SandboxError::Sys {
                    what,
                    source: io::Error::last_os_error(),
                })
            }
        }
    };
    // SAFETY: a plain prctl with integer arguments (this block and the
    // ones below: system calls on this process with integer arguments or
    // pointers to live locals).
    let has_setpcap = unsafe { libc::prctl(libc::PR_CAPBSET_READ, CAP_SETPCAP) } == 1
        && capget()?.effective_has(CAP_SETPCAP);
    if has_setpcap {
        // Root's uid never brings capabilities back at an execve, ambient
        // ones cannot be raised, keep-caps stays off (so becoming the user
        // clears them all), and none of it can be undone.
        let bits = SECBIT_NOROOT
            | SECBIT_NOROOT_LOCKED
            | SECBIT_KEEP_CAPS_LOCKED
            | SECBIT_NO_CAP_AMBIENT_RAISE
            | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED;
        // SAFETY: see above.
        // SAFETY: see above.
        sys("PR_SET_SECUREBITS")(unsafe { libc::prctl(libc::PR_SET_SECUREBITS, bits) })?;
        for cap in 0..64 {
            // SAFETY: see above.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap) } != 0 {
                // EINVAL: past the kernel's last capability.
                break;
            }
        }
    }
    // SAFETY: see above.
    sys("PR_CAP_AMBIENT_CLEAR_ALL")(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    })?;
    if let Some(id) = identity {
        let groups: Vec<libc::gid_t> = id.groups.clone();
        // SAFETY: `groups` holds `groups.len()` entries.
        sys("setgroups")(unsafe { libc::setgroups(groups.len(), groups.as_ptr()) })?;
        // SAFETY: see above.
        sys("setresgid")(unsafe { libc::setresgid(id.gid, id.gid, id.gid) })?;
        // SAFETY: see above.
        sys("setresuid")(unsafe { libc::setresuid(id.uid, id.uid, id.uid) })?;
    }
    capset_empty()?;
    if no_new_privs {
        // SAFETY: see above.
        sys("PR_SET_NO_NEW_PRIVS")(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
    }
    verify(identity, has_setpcap, no_new_privs)
}

/// Checks what [`drop_privileges`] promised, from the kernel's side.
fn verify(
    identity: Option<&Identity>,
    had_setpcap: bool,
    no_new_privs: bool,
) -> Result<(), SandboxError> {
    let caps = capget()?;
    if caps != CapSets::default() {
        return Err(SandboxError::Check(format!(
            "capabilities left after dropping them: {caps:?}"
        )));
    }
    // SAFETY: plain prctl queries.
    let (bounding_left, ambient_left, nnp, bits) = unsafe {
        (
            (0..64).any(|c| libc::prctl(libc::PR_CAPBSET_READ, c) == 1),
            (0..64).any(|c| {
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_IS_SET,
                    c as libc::c_ulong,
                    0,
                    0,
                ) == 1
            }),
            libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0),
            libc::prctl(libc::PR_GET_SECUREBITS),
        )
    };
    if had_setpcap && bounding_left {
        return Err(SandboxError::Check(
            "capabilities left in the bounding set".into(),
        ));
    }
    if ambient_left {
        return Err(SandboxError::Check("ambient capabilities left".into()));
    }
    if no_new_privs && nnp != 1 {
        return Err(SandboxError::Check("no_new_privs is not set".into()));
    }
    if had_setpcap && (bits as libc::c_ulong) & SECBIT_NOROOT_LOCKED == 0 {
        return Err(SandboxError::Check("the secure bits are not locked".into()));
    }
    if let Some(id) = identity {
        let (mut r, mut e, mut s) = (0, 0, 0);
        // SAFETY: three live locals for the three ids.
        unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
        if [r, e, s] != [id.uid; 3] {
            return Err(SandboxError::Check(format!(
                "still uid {r}/{e}/{s} after becoming {}",
                id.name
            )));
        }
        // SAFETY: an attempt that must fail; nothing to clean up if it does.
        if id.uid != 0 && unsafe { libc::setuid(0) } == 0 {
            return Err(SandboxError::Check(
                "could become root again after dropping privileges".into(),
            ));
        }
    }
    Ok(())
}

/// `CAP_SETPCAP` (linux/capability.h): changing the bounding set and the secure bits.
const CAP_SETPCAP: libc::c_int = 8;
const SECBIT_NOROOT: libc::c_ulong = 1 << 0;
const SECBIT_NOROOT_LOCKED: libc::c_ulong = 1 << 1;
const SECBIT_KEEP_CAPS_LOCKED: libc::c_ulong = 1 << 5;
const SECBIT_NO_CAP_AMBIENT_RAISE: libc::c_ulong = 1 << 6;
const SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED: libc::c_ulong = 1 << 7;

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The three capability sets of this thread, 64 bits each.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CapSets {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
}

impl CapSets {
    fn effective_has(&self, cap: libc::c_int) -> bool {
        u32::try_from(cap).is_ok_and(|c| c < 64 && self.effective & (1 << c) != 0)
    }
}

fn capget() -> Result<CapSets, SandboxError> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: the header and two data structs, as capget(2) wants for version 3.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    if r != 0 {
        return Err(SandboxError::Sys {
            what: "capget",
            source: io::Error::last_os_error(),
        });
    }
    let join = |f: fn(&CapData) -> u32| u64::from(f(&data[0])) | u64::from(f(&data[1])) << 32;
    Ok(CapSets {
        effective: join(|d| d.effective),
        permitted: join(|d| d.permitted),
        inheritable: join(|d| d.inheritable),
    })
}

fn capset_empty() -> Result<(), SandboxError> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: the header and two data structs, as capset(2) wants for version 3.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    if r != 0 {
        return Err(SandboxError::Sys {
            what: "capset",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Fault injection for the sandbox tests: `VMM_TEST_OPEN=r:PATH` (read) or
/// `w:PATH` (create and write) makes the confined VMM try that once,
/// right after confining itself, and say on stderr whether it could.
/// Only whoever starts the VMM sets its environment.
pub fn probe_open_for_tests() {
    let Some(spec) = std::env::var_os("VMM_TEST_OPEN") else {
        return;
    };
    let spec = spec.to_string_lossy().into_owned();
    let (write, path) = match spec.split_once(':') {
        Some(("r", p)) => (false, p),
        Some(("w", p)) => (true, p),
        _ => {
            eprintln!("vmm: test: VMM_TEST_OPEN wants r:PATH or w:PATH");
            return;
        }
    };
    let r = std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .create(write)
        .truncate(false)
        .open(path);
    match r {
        Ok(_) => eprintln!("vmm: test: open {spec}: allowed"),
        Err(e) => eprintln!("vmm: test: open {spec}: denied ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_landlock_a_root_vmm_does_not_start_and_a_user_vmm_does() {
        let e = without_landlock(&RulesetStatus::NotEnforced, false, 0).unwrap_err();
        assert!(e.to_string().contains("give it --user"), "{e}");
        assert!(without_landlock(&RulesetStatus::NotEnforced, true, 0).is_ok());
        assert!(without_landlock(&RulesetStatus::NotEnforced, false, 1000).is_ok());
        assert!(without_landlock(&RulesetStatus::PartiallyEnforced, false, 0).is_ok());
        assert!(without_landlock(&RulesetStatus::FullyEnforced, false, 0).is_ok());
    }

    #[test]
    fn sandbox_mode_parses_on_and_off_only() {
        assert_eq!("on".parse::<Mode>(), Ok(Mode::On));
        assert_eq!("off".parse::<Mode>(), Ok(Mode::Off));
        assert!("yes".parse::<Mode>().is_err());
        assert_eq!(Mode::default(), Mode::On);
    }

    #[test]
    fn an_unknown_user_is_a_one_line_error() {
        let e = Identity::lookup("no-such-user-vmm-test").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown user 'no-such-user-vmm-test' in --user"
        );
    }

    #[test]
    fn nobody_has_its_own_ids_and_group() {
        let id = Identity::lookup("nobody").unwrap();
        assert_ne!(id.uid, 0);
        assert!(id.groups.contains(&id.gid));
    }

    #[test]
    fn mode_bits_decide_who_may_open_a_device() {
        let dir = std::env::temp_dir().join(format!("vmm-sandbox-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("node");
        std::fs::write(&f, b"").unwrap();
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(&f).unwrap();
        let owner = Identity {
            name: "owner".into(),
            uid: meta.uid(),
            gid: 4_000_000,
            groups: vec![4_000_000],
        };
        let member = Identity {
            name: "member".into(),
            uid: 4_000_001,
            gid: meta.gid(),
            groups: vec![meta.gid()],
        };
        let other = Identity {
            name: "other".into(),
            uid: 4_000_002,
            gid: 4_000_002,
            groups: vec![4_000_002],
        };
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(owner.may_open_rw(&f));
        assert!(!member.may_open_rw(&f));
        assert!(!other.may_open_rw(&f));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o660)).unwrap();
        assert!(member.may_open_rw(&f));
        assert!(!other.may_open_rw(&f));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o664)).unwrap();
        assert!(
            !other.may_open_rw(&f),
            "read-only for others is not read-write"
        );
        assert!(!owner.may_open_rw(&dir.join("missing")));
        std::fs::remove_dir_all(&dir).ok();
    }
}
