//! seccomp filters, one list per kind of thread (`seccompiler`, one BPF
//! program per kind, compiled once): the event loop (the control socket,
//! the console, every boot's set-up), each vCPU (guest MMIO and port I/O,
//! device activation), each disk's I/O thread (the guest's block
//! requests), each network interface's (virtio-net's userspace datapath
//! and control queue), the spawner (`spawner.rs`: it
//! starts the vCPU and hook threads after start-up), the console log's
//! writer and the alert hook's runner. Each thread installs its own filter
//! itself, first thing, before it runs a guest instruction or reads
//! anything a guest or client sent; the event loop installs its filter
//! once start-up is done, before the first boot.
//!
//! A system call outside a thread's list raises SIGSYS (`SECCOMP_RET_TRAP`);
//! the handler writes one line naming the thread and the call and ends the
//! process (exit status 159 = 128 + SIGSYS): a clear stop, not a hang, and a
//! VMM that lost a thread never goes on as if it had not. `--seccomp log`
//! lets such calls through and has the kernel log them (audit); `off`
//! installs nothing.
//!
//! Filters are inherited and stack: a thread's effective list is its own
//! intersected with its creator's. So threads created after start-up come
//! from the spawner, whose list holds theirs, and the alert hook's commands
//! run in the hook launcher, a helper process forked before any thread or
//! filter existed (`hooks.rs`): an operator's command needs whatever it
//! needs, which no list here could know.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// `--seccomp on|log|off`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// A call outside the list ends the VMM with a message naming it.
    #[default]
    On,
    /// Calls outside the list are allowed and logged by the kernel.
    Log,
    /// No filter.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(Mode::On),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            _ => Err(format!("--seccomp {s}: expected on, log or off")),
        }
    }
}

/// The kinds of filtered threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    EventLoop,
    Vcpu,
    Disk,
    Net,
    Spawner,
    ConsoleLog,
    Hook,
    Migration,
    Throttle,
    Snapshot,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::EventLoop,
        Kind::Vcpu,
        Kind::Disk,
        Kind::Net,
        Kind::Spawner,
        Kind::ConsoleLog,
        Kind::Hook,
        Kind::Migration,
        Kind::Throttle,
        Kind::Snapshot,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::EventLoop => "event-loop",
            Kind::Vcpu => "vcpu",
            Kind::Disk => "disk",
            Kind::Net => "net",
            Kind::Spawner => "spawner",
            Kind::ConsoleLog => "console-log",
            Kind::Hook => "alert-hook",
            Kind::Migration => "migration",
            Kind::Throttle => "throttle",
            Kind::Snapshot => "snapshot",
        }
    }
}

/// Exit status after a forbidden call: 128 + SIGSYS.
pub const EXIT_FORBIDDEN: i32 = 128 + libc::SIGSYS;

/// What every filtered thread needs: memory, locks, signals, time, the
/// panic policy (`fatal.rs`: a line on stderr, then SIGABRT) and the end.
const COMMON: &[(i64, &str)] = &[
    (libc::SYS_brk, "the allocator"),
    (libc::SYS_mmap, "the allocator, thread stacks"),
    (libc::SYS_munmap, "the allocator"),
    (libc::SYS_mremap, "the allocator (growing vectors)"),
    (libc::SYS_mprotect, "the allocator"),
    (libc::SYS_madvise, "the allocator returning memory"),
    (libc::SYS_futex, "mutexes, condition variables, parking"),
    (libc::SYS_sched_yield, "spin loops backing off"),
    (libc::SYS_sched_getaffinity, "std's thread start-up"),
    (libc::SYS_nanosleep, "short waits"),
    (libc::SYS_clock_nanosleep, "short waits"),
    (libc::SYS_clock_gettime, "time, where the vDSO falls back"),
    (libc::SYS_gettid, "logging, signal delivery"),
    (libc::SYS_getpid, "logging, signal delivery"),
    (libc::SYS_rt_sigprocmask, "std and abort() mask signals"),
    (libc::SYS_rt_sigreturn, "return from the vCPU kick signal"),
    (libc::SYS_sigaltstack, "std's stack-overflow guard"),
    (libc::SYS_tgkill, "abort() raising SIGABRT"),
    (libc::SYS_write, "eventfds, stderr"),
    (libc::SYS_writev, "stderr (tracing)"),
    (libc::SYS_close, "descriptors going out of scope"),
    (libc::SYS_rseq, "glibc's thread start-up"),
    (libc::SYS_set_robust_list, "glibc's thread start-up"),
    (libc::SYS_prctl, "thread names"),
    (libc::SYS_exit, "the thread ends (a vCPU at VM teardown)"),
    (libc::SYS_exit_group, "the process ends (fatal errors)"),
];

/// A vCPU thread: KVM_RUN, and what a guest's register write may start on
/// it (device activation, the watchdog's timer, reset waits).
const VCPU: &[(i64, &str)] = &[
    (
        libc::SYS_ioctl,
        "KVM_RUN and the vCPU's state; at DRIVER_OK TUNSETOFFLOAD and the VHOST_* calls",
    ),
    (
        libc::SYS_fcntl,
        "duplicating the TAP's and the vhost-net instance's descriptors at DRIVER_OK",
    ),
    (libc::SYS_read, "draining eventfds"),
    (
        libc::SYS_timerfd_settime,
        "ib700 watchdog programmed by the guest",
    ),
    (libc::SYS_timerfd_gettime, "ib700 watchdog's remaining time"),
    (
        libc::SYS_io_uring_enter,
        "a disk reset waits for its requests in flight",
    ),
    (
        libc::SYS_newfstatat,
        "the panic policy's backtrace (RUST_BACKTRACE)",
    ),
    (libc::SYS_getrandom, "hash maps' seeds"),
];

/// A disk's I/O thread: its queue's eventfd, the image, io_uring.
const DISK: &[(i64, &str)] = &[
    (libc::SYS_epoll_wait, "its event loop"),
    (libc::SYS_epoll_pwait, "its event loop"),
    (libc::SYS_epoll_ctl, "its event loop"),
    (libc::SYS_read, "draining eventfds"),
    (libc::SYS_pread64, "reading the image (synchronous engine)"),
    (libc::SYS_pwrite64, "writing the image (synchronous engine)"),
    (libc::SYS_preadv, "reading the image (synchronous engine)"),
    (libc::SYS_pwritev, "writing the image (synchronous engine)"),
    (libc::SYS_preadv2, "reading the image (synchronous engine)"),
    (libc::SYS_pwritev2, "writing the image (synchronous engine)"),
    (libc::SYS_fdatasync, "FLUSH (synchronous engine)"),
    (libc::SYS_fsync, "FLUSH (synchronous engine)"),
    (libc::SYS_fallocate, "DISCARD and WRITE_ZEROES"),
    (
        libc::SYS_io_uring_enter,
        "submitting and reaping (io_uring engine)",
    ),
    (
        libc::SYS_lseek,
        "a backup skipping the image's holes (SEEK_DATA)",
    ),
    (
        libc::SYS_timerfd_settime,
        "a backup's next share of copying",
    ),
    (libc::SYS_ftruncate, "sizing a backup's copy at its instant"),
    (libc::SYS_rename, "a complete backup taking its name"),
    (libc::SYS_renameat, "a complete backup taking its name"),
    (libc::SYS_renameat2, "a complete backup taking its name"),
    (libc::SYS_unlink, "removing a failed backup's part"),
    (libc::SYS_unlinkat, "removing a failed backup's part"),
    (
        libc::SYS_fcntl,
        "closing a backup's copy (std checks the descriptor, F_GETFD)",
    ),
    (libc::SYS_getrandom, "hash maps' seeds"),
];

/// A network interface's I/O thread: its queues' eventfds and its TAP's
/// queues (the userspace datapath), the control queue's steering, and
/// the kicks and interrupts around them. It opens nothing and talks to no
/// socket: the TAP's descriptors were opened at start-up.
const NET: &[(i64, &str)] = &[
    (libc::SYS_epoll_wait, "its event loop"),
    (libc::SYS_epoll_pwait, "its event loop"),
    (
        libc::SYS_epoll_ctl,
        "the TAP's and the queues' polling, as the guest's buffers come and go",
    ),
    (libc::SYS_read, "draining eventfds"),
    (libc::SYS_readv, "TAP frames into guest buffers"),
    (
        libc::SYS_ioctl,
        "the control queue's TUNSETQUEUE (queue pairs enabled by the guest), and nothing else (an argument rule)",
    ),
    (libc::SYS_getrandom, "hash maps' seeds"),
];

/// The event loop after start-up: epoll, the control socket's clients
/// (whose groups it looks up), the console, timers, and every boot's set-up (guest memory, the kernel
/// files, KVM's VM and vCPU ioctls, device resets).
const EVENT_LOOP: &[(i64, &str)] = &[
    (libc::SYS_epoll_wait, "the event loop"),
    (libc::SYS_epoll_pwait, "the event loop"),
    (libc::SYS_epoll_ctl, "clients and timers come and go"),
    (libc::SYS_poll, "waiting on one descriptor (terminal, glibc NSS)"),
    (libc::SYS_ppoll, "waiting on one descriptor"),
    (libc::SYS_read, "eventfds, timerfds, sockets, stdin, files"),
    (libc::SYS_pread64, "kernel and initrd files at each boot"),
    (libc::SYS_recvfrom, "control clients"),
    (libc::SYS_recvmsg, "control clients, glibc NSS"),
    (libc::SYS_sendto, "control clients, systemd's notify socket"),
    (libc::SYS_sendmsg, "control clients, glibc NSS"),
    (libc::SYS_accept4, "control clients"),
    (libc::SYS_getsockopt, "a client's credentials (SO_PEERCRED)"),
    (libc::SYS_getsockname, "glibc NSS"),
    (libc::SYS_shutdown, "closing a refused client"),
    (
        libc::SYS_socket,
        "glibc NSS (nscd, sssd), sd_notify: Unix sockets only (see `only_unix_sockets`)",
    ),
    (libc::SYS_connect, "glibc NSS, systemd's notify socket"),
    (libc::SYS_openat, "kernel files at each boot, the state file, /proc, NSS"),
    (libc::SYS_newfstatat, "file sizes, std's metadata"),
    (libc::SYS_fstat, "file sizes"),
    (libc::SYS_statx, "std's metadata"),
    (libc::SYS_lseek, "reading files"),
    (libc::SYS_getdents64, "listing the kernel library (`kernels`)"),
    (libc::SYS_readlink, "resolving paths"),
    (libc::SYS_access, "glibc NSS"),
    (libc::SYS_rename, "replacing the state file atomically"),
    (libc::SYS_renameat, "replacing the state file atomically"),
    (libc::SYS_unlink, "removing the control socket at exit"),
    (libc::SYS_unlinkat, "removing the control socket at exit"),
    (libc::SYS_flock, "a migration's target taking its disks' image locks"),
    (libc::SYS_fsync, "the state file"),
    (libc::SYS_fdatasync, "the state file"),
    (libc::SYS_fcntl, "descriptor flags (nonblocking, close-on-exec)"),
    (libc::SYS_dup, "duplicating eventfds"),
    (
        libc::SYS_ioctl,
        "KVM's VM and vCPU set-up each boot, irqfds, ioeventfds, TUN offloads, vhost-net reset, the terminal",
    ),
    (libc::SYS_eventfd2, "eventfds of each boot's devices"),
    (libc::SYS_timerfd_create, "timers of each boot"),
    (libc::SYS_timerfd_settime, "watchdog, graceful-stop and nudge timers"),
    (libc::SYS_timerfd_gettime, "the watchdog's remaining time"),
    (libc::SYS_io_uring_enter, "a disk reset waits for its requests in flight"),
    (libc::SYS_rt_sigaction, "abort() resetting SIGABRT (the panic policy)"),
    (libc::SYS_getrandom, "hash maps' seeds"),
    (libc::SYS_getuid, "access checks"),
    (libc::SYS_geteuid, "access checks"),
    (libc::SYS_getgid, "access checks"),
    (libc::SYS_getegid, "access checks"),
    (libc::SYS_uname, "glibc"),
];

/// A live migration's source: a TCP connection to the target, the guest's
/// memory and KVM's dirty log read under the VM's lock, and at the end the
/// guest stopped (vCPUs kicked, devices quiesced and, on failure, started
/// again: what a vCPU's device activation calls, see `VCPU`).
const MIGRATION: &[(i64, &str)] = &[
    (
        libc::SYS_socket,
        "the TCP connection to the target (AF_INET/AF_INET6 only)",
    ),
    (libc::SYS_connect, "the TCP connection to the target"),
    (libc::SYS_setsockopt, "its timeouts and TCP_NODELAY"),
    (libc::SYS_getsockopt, "its connect's outcome (SO_ERROR)"),
    (libc::SYS_poll, "its connect's timeout"),
    (libc::SYS_ppoll, "its connect's timeout"),
    (libc::SYS_sendto, "sending memory and state"),
    (libc::SYS_recvfrom, "the target's answers"),
    (libc::SYS_shutdown, "ending the connection"),
    (libc::SYS_flock, "handing the disks' image locks over"),
    (
        libc::SYS_pread64,
        "reading the disks it copies (\"disks\":\"copy\")",
    ),
    (
        libc::SYS_lseek,
        "finding the data of the disks it copies (SEEK_DATA)",
    ),
    (
        libc::SYS_kill,
        "ending its own process once the guest runs on the target",
    ),
];

/// A snapshot's writer: its directory and files (the event loop captured
/// the machine), then, under the VM's lock, the devices started again and
/// the vCPUs resumed or the VM powered off (what a vCPU's device activation
/// calls, see `VCPU`).
const SNAPSHOT: &[(i64, &str)] = &[
    (
        libc::SYS_openat,
        "creating the files; opening directories to sync them",
    ),
    (libc::SYS_mkdir, "the snapshot's directory"),
    (libc::SYS_mkdirat, "the snapshot's directory"),
    (
        libc::SYS_ftruncate,
        "the memory file taking its length (its zero MiBs are holes)",
    ),
    (libc::SYS_pwrite64, "guest memory, MiB by MiB"),
    (
        libc::SYS_fsync,
        "the files and directories, before the answer",
    ),
    (libc::SYS_rename, "the finished directory taking its name"),
    (libc::SYS_renameat, "the finished directory taking its name"),
    (
        libc::SYS_renameat2,
        "the finished directory taking its name",
    ),
    (libc::SYS_unlink, "removing a failed snapshot's files"),
    (libc::SYS_unlinkat, "removing a failed snapshot's files"),
    (libc::SYS_rmdir, "removing a failed snapshot's directory"),
];

/// Makes every thread allocate from glibc's main arena. A thread's own
/// arena, the first time it gives memory back (`shrink_heap`), has glibc
/// read `/proc/sys/vm/overcommit_memory`: an `openat` that the vCPU, disk
/// and migration threads' filters refuse, so the VMM died with SIGSYS at
/// the end of a 4 GiB guest's migration (its bitmaps are large enough to
/// be freed back). The main arena grows and trims with `brk` and never
/// reads it. Call first thing in `main`, before any thread.
pub fn one_malloc_arena() {
    // SAFETY: mallopt changes an allocator setting; no thread exists yet
    // and no memory is handed out by it.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}

/// The spawner's own calls: thread creation. Its list is these plus its
/// children's (vCPU and hook runner: see [`list`]), since a child's filter
/// only narrows the one it inherits.
const SPAWNER: &[(i64, &str)] = &[
    (libc::SYS_clone, "creating threads"),
    (libc::SYS_clone3, "creating threads"),
    (
        libc::SYS_seccomp,
        "its children installing their own (narrower) filters",
    ),
];

/// The console log's writer: appends, and rotates the file at its cap.
const CONSOLE_LOG: &[(i64, &str)] = &[
    (libc::SYS_read, "its wake-up eventfd"),
    (
        libc::SYS_openat,
        "opening the next log file at rotation (O_NOFOLLOW)",
    ),
    (libc::SYS_rename, "rotating FILE to FILE.1"),
    (libc::SYS_renameat, "rotating FILE to FILE.1"),
    (libc::SYS_unlink, "deleting the oldest rotated file"),
    (libc::SYS_unlinkat, "deleting the oldest rotated file"),
    (libc::SYS_newfstatat, "the file's size"),
    (libc::SYS_fstat, "the file's size"),
    (libc::SYS_statx, "the file's size"),
    (libc::SYS_lseek, "the file's size"),
    (libc::SYS_fcntl, "descriptor flags"),
    (libc::SYS_getrandom, "hash maps' seeds"),
];

/// An alert-hook run: it hands the run to the hook launcher process over a
/// socket and waits for it.
const HOOK: &[(i64, &str)] = &[
    (libc::SYS_read, "the launcher's answer"),
    (libc::SYS_recvfrom, "the launcher's answer"),
    (libc::SYS_sendto, "the run, to the launcher"),
    (libc::SYS_poll, "waiting for the launcher with a timeout"),
    (libc::SYS_setsockopt, "the answer's timeout"),
];

fn list(kind: Kind) -> impl Iterator<Item = &'static (i64, &'static str)> {
    let own: &[&[(i64, &str)]] = match kind {
        Kind::EventLoop => &[EVENT_LOOP],
        Kind::Vcpu => &[VCPU],
        Kind::Disk => &[DISK],
        Kind::Net => &[NET],
        Kind::Spawner => &[SPAWNER, VCPU, HOOK, MIGRATION, SNAPSHOT],
        Kind::ConsoleLog => &[CONSOLE_LOG],
        Kind::Hook => &[HOOK],
        Kind::Migration => &[MIGRATION, VCPU],
        // Sleeps and signals the vCPUs: nothing beyond what all need.
        Kind::Throttle => &[],
        Kind::Snapshot => &[SNAPSHOT, VCPU],
    };
    COMMON.iter().chain(own.iter().flat_map(|l| l.iter()))
}

/// The number of system calls each kind may make (for the notes).
pub fn allow_list_sizes() -> Vec<(&'static str, usize)> {
    Kind::ALL
        .into_iter()
        .map(|k| {
            let mut v: Vec<i64> = list(k).map(|(n, _)| *n).collect();
            v.sort_unstable();
            v.dedup();
            (k.name(), v.len())
        })
        .collect()
}

static PROGRAMS: OnceLock<Option<Vec<(Kind, BpfProgram)>>> = OnceLock::new();

/// `ioctl(fd, TUNSETQUEUE, ...)` and no other request: all a network
/// interface's thread asks of the kernel (the rest of its device's ioctls,
/// TUNSETOFFLOAD and vhost-net's, come with activation and reset, on other
/// threads).
fn only_tunsetqueue() -> Result<Vec<seccompiler::SeccompRule>, seccompiler::BackendError> {
    use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
    // The request number fits 32 bits; the kernel takes the low 32 (an
    // `unsigned int cmd` in `tun_chr_ioctl`).
    Ok(vec![SeccompRule::new(vec![SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        u64::from(libc::TUNSETQUEUE as u32),
    )?])?])
}

/// `socket(AF_UNIX, ...)` and nothing else: the event loop talks to no
/// network.
fn only_unix_sockets() -> Result<Vec<seccompiler::SeccompRule>, seccompiler::BackendError> {
    sockets_of(&[libc::AF_UNIX])
}

/// `socket(family, ...)` for these families only.
fn sockets_of(
    families: &[i32],
) -> Result<Vec<seccompiler::SeccompRule>, seccompiler::BackendError> {
    use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
    families
        .iter()
        .map(|&f| {
            SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                f as u64,
            )?])
        })
        .collect()
}

fn compile(kind: Kind, mode: Mode) -> Result<BpfProgram, String> {
    let err =
        |e: seccompiler::BackendError| format!("seccomp filter for {} threads: {e}", kind.name());
    let mut rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        list(kind).map(|(nr, _)| (*nr, Vec::new())).collect();
    if let Some(r) = rules.get_mut(&libc::SYS_socket) {
        *r = match kind {
            // The migration's thread, and the spawner that starts it.
            Kind::Migration | Kind::Spawner => {
                sockets_of(&[libc::AF_INET, libc::AF_INET6]).map_err(err)?
            }
            _ => only_unix_sockets().map_err(err)?,
        };
    }
    if kind == Kind::Net {
        if let Some(r) = rules.get_mut(&libc::SYS_ioctl) {
            *r = only_tunsetqueue().map_err(err)?;
        }
    }
    let mismatch = match mode {
        Mode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(err)?;
    filter.try_into().map_err(err)
}

/// Compiles the filters and installs the SIGSYS handler; call once, in
/// `main`, before any thread starts.
pub fn init(mode: Mode) -> Result<(), String> {
    let programs = if mode == Mode::Off {
        None
    } else {
        install_sigsys_handler()?;
        Some(
            Kind::ALL
                .into_iter()
                .map(|k| compile(k, mode).map(|p| (k, p)))
                .collect::<Result<Vec<_>, String>>()?,
        )
    };
    PROGRAMS
        .set(programs)
        .map_err(|_| "seccomp initialised twice".to_string())
}

thread_local! {
    /// The kind of the calling thread's filter, for the SIGSYS message.
    static KIND: Cell<&'static str> = const { Cell::new("") };
}

/// Installs the calling thread's filter (nothing with `--seccomp off`, or
/// when `init` never ran: unit tests). A thread that cannot be confined as
/// configured ends the process.
pub fn install(kind: Kind) {
    let Some(Some(programs)) = PROGRAMS.get() else {
        return;
    };
    let Some((_, prog)) = programs.iter().find(|(k, _)| *k == kind) else {
        return;
    };
    KIND.with(|k| k.set(kind.name()));
    if let Err(e) = seccompiler::apply_filter(prog) {
        eprintln!(
            "vmm: cannot install the seccomp filter of a {} thread: {e} (--seccomp off runs without)",
            kind.name()
        );
        std::process::exit(1);
    }
    crate::fatal::inject_forbidden_syscall(kind.name());
}

fn install_sigsys_handler() -> Result<(), String> {
    // SAFETY: a zeroed sigaction is valid; the handler is async-signal-safe
    // (it only formats into a stack buffer, writes and exits).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(format!(
                "cannot install the SIGSYS handler: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// A tiny formatter over a stack buffer (no allocation in a signal handler).
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn push_num(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// Set by the first forbidden call's handler: one line, however many
/// threads trip at once.
static REPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    if REPORTED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        // Another thread is reporting and ending the process: wait for it
        // with a call every filter allows.
        loop {
            // SAFETY: sched_yield takes no arguments.
            unsafe { libc::sched_yield() };
        }
    }
    // siginfo_t for SIGSYS (x86_64): the union starts at byte 16 with
    // `_call_addr` (8 bytes), then `_syscall` (int) at 24.
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers.
    let nr = unsafe {
        (info as *const u8)
            .add(24)
            .cast::<libc::c_int>()
            .read_unaligned()
    };
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    line.push(b"vmm: seccomp: a ");
    let kind = KIND.with(|k| k.get());
    line.push(kind.as_bytes());
    line.push(b" thread made the forbidden system call ");
    line.push(syscall_name(i64::from(nr)).as_bytes());
    line.push(b" (");
    line.push_num(u64::try_from(nr).unwrap_or(0));
    line.push(b"); the VM is stopped\n");
    // SAFETY: write and _exit are async-signal-safe; the buffer is live.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(EXIT_FORBIDDEN);
    }
}

/// Names of the calls a VMM thread might plausibly make (the message's
/// number is exact either way).
fn syscall_name(nr: i64) -> &'static str {
    const NAMES: &[(i64, &str)] = &[
        (libc::SYS_read, "read"),
        (libc::SYS_write, "write"),
        (libc::SYS_open, "open"),
        (libc::SYS_openat, "openat"),
        (libc::SYS_close, "close"),
        (libc::SYS_stat, "stat"),
        (libc::SYS_fstat, "fstat"),
        (libc::SYS_newfstatat, "newfstatat"),
        (libc::SYS_statx, "statx"),
        (libc::SYS_lseek, "lseek"),
        (libc::SYS_mmap, "mmap"),
        (libc::SYS_ioctl, "ioctl"),
        (libc::SYS_socket, "socket"),
        (libc::SYS_connect, "connect"),
        (libc::SYS_accept4, "accept4"),
        (libc::SYS_sendto, "sendto"),
        (libc::SYS_recvfrom, "recvfrom"),
        (libc::SYS_sendmsg, "sendmsg"),
        (libc::SYS_recvmsg, "recvmsg"),
        (libc::SYS_bind, "bind"),
        (libc::SYS_listen, "listen"),
        (libc::SYS_clone, "clone"),
        (libc::SYS_clone3, "clone3"),
        (libc::SYS_fork, "fork"),
        (libc::SYS_vfork, "vfork"),
        (libc::SYS_execve, "execve"),
        (libc::SYS_execveat, "execveat"),
        (libc::SYS_kill, "kill"),
        (libc::SYS_wait4, "wait4"),
        (libc::SYS_pipe2, "pipe2"),
        (libc::SYS_dup, "dup"),
        (libc::SYS_dup3, "dup3"),
        (libc::SYS_fcntl, "fcntl"),
        (libc::SYS_flock, "flock"),
        (libc::SYS_rename, "rename"),
        (libc::SYS_renameat2, "renameat2"),
        (libc::SYS_unlink, "unlink"),
        (libc::SYS_unlinkat, "unlinkat"),
        (libc::SYS_mkdir, "mkdir"),
        (libc::SYS_getdents64, "getdents64"),
        (libc::SYS_readlink, "readlink"),
        (libc::SYS_ptrace, "ptrace"),
        (libc::SYS_setuid, "setuid"),
        (libc::SYS_setgid, "setgid"),
        (libc::SYS_mount, "mount"),
        (libc::SYS_epoll_wait, "epoll_wait"),
        (libc::SYS_epoll_ctl, "epoll_ctl"),
        (libc::SYS_eventfd2, "eventfd2"),
        (libc::SYS_timerfd_create, "timerfd_create"),
        (libc::SYS_io_uring_setup, "io_uring_setup"),
        (libc::SYS_io_uring_enter, "io_uring_enter"),
        (libc::SYS_io_uring_register, "io_uring_register"),
        (libc::SYS_statfs, "statfs"),
        (libc::SYS_fstatfs, "fstatfs"),
        (libc::SYS_getrandom, "getrandom"),
        (libc::SYS_prlimit64, "prlimit64"),
        (libc::SYS_rt_sigaction, "rt_sigaction"),
        (libc::SYS_memfd_create, "memfd_create"),
        (libc::SYS_personality, "personality"),
        (libc::SYS_uname, "uname"),
        (libc::SYS_kexec_load, "kexec_load"),
        (libc::SYS_bpf, "bpf"),
        (libc::SYS_setsockopt, "setsockopt"),
        (libc::SYS_poll, "poll"),
        (libc::SYS_ppoll, "ppoll"),
        (libc::SYS_pread64, "pread64"),
        (libc::SYS_pwrite64, "pwrite64"),
        (libc::SYS_readv, "readv"),
        (libc::SYS_writev, "writev"),
        (libc::SYS_chmod, "chmod"),
        (libc::SYS_chown, "chown"),
        (libc::SYS_fchmod, "fchmod"),
        (libc::SYS_fchown, "fchown"),
        (libc::SYS_access, "access"),
        (libc::SYS_faccessat2, "faccessat2"),
        (libc::SYS_getsockopt, "getsockopt"),
        (libc::SYS_getsockname, "getsockname"),
        (libc::SYS_shutdown, "shutdown"),
        (libc::SYS_renameat, "renameat"),
        (libc::SYS_timerfd_settime, "timerfd_settime"),
        (libc::SYS_timerfd_gettime, "timerfd_gettime"),
        (libc::SYS_epoll_pwait, "epoll_pwait"),
        (libc::SYS_epoll_create1, "epoll_create1"),
        (libc::SYS_setpgid, "setpgid"),
        (libc::SYS_pipe, "pipe"),
        (libc::SYS_socketpair, "socketpair"),
        (libc::SYS_sched_setaffinity, "sched_setaffinity"),
        (libc::SYS_setsid, "setsid"),
        (libc::SYS_fsync, "fsync"),
        (libc::SYS_fdatasync, "fdatasync"),
        (libc::SYS_fallocate, "fallocate"),
        (libc::SYS_sysinfo, "sysinfo"),
        (libc::SYS_getcwd, "getcwd"),
        (libc::SYS_chdir, "chdir"),
        (libc::SYS_dup2, "dup2"),
        (libc::SYS_getpid, "getpid"),
        (libc::SYS_getppid, "getppid"),
        (libc::SYS_getuid, "getuid"),
        (libc::SYS_geteuid, "geteuid"),
        (libc::SYS_getgid, "getgid"),
        (libc::SYS_getegid, "getegid"),
        (libc::SYS_getgroups, "getgroups"),
        (libc::SYS_prctl, "prctl"),
        (libc::SYS_arch_prctl, "arch_prctl"),
        (libc::SYS_set_tid_address, "set_tid_address"),
        (libc::SYS_mlock, "mlock"),
        (libc::SYS_mlockall, "mlockall"),
        (libc::SYS_mincore, "mincore"),
        (libc::SYS_msync, "msync"),
        (libc::SYS_truncate, "truncate"),
        (libc::SYS_ftruncate, "ftruncate"),
        (libc::SYS_link, "link"),
        (libc::SYS_linkat, "linkat"),
        (libc::SYS_symlink, "symlink"),
        (libc::SYS_symlinkat, "symlinkat"),
        (libc::SYS_mkdirat, "mkdirat"),
        (libc::SYS_rmdir, "rmdir"),
        (libc::SYS_inotify_init1, "inotify_init1"),
        (libc::SYS_signalfd4, "signalfd4"),
        (libc::SYS_tkill, "tkill"),
        (libc::SYS_waitid, "waitid"),
        (libc::SYS_times, "times"),
        (libc::SYS_getrusage, "getrusage"),
        (libc::SYS_umask, "umask"),
        (libc::SYS_capget, "capget"),
        (libc::SYS_capset, "capset"),
        (libc::SYS_setgroups, "setgroups"),
        (libc::SYS_setresuid, "setresuid"),
        (libc::SYS_setresgid, "setresgid"),
        (libc::SYS_unshare, "unshare"),
        (libc::SYS_setns, "setns"),
        (libc::SYS_pivot_root, "pivot_root"),
        (libc::SYS_chroot, "chroot"),
        (libc::SYS_landlock_create_ruleset, "landlock_create_ruleset"),
        (libc::SYS_seccomp, "seccomp"),
        (libc::SYS_process_vm_readv, "process_vm_readv"),
        (libc::SYS_process_vm_writev, "process_vm_writev"),
        (libc::SYS_perf_event_open, "perf_event_open"),
        (libc::SYS_userfaultfd, "userfaultfd"),
        (libc::SYS_memfd_secret, "memfd_secret"),
        (libc::SYS_pidfd_open, "pidfd_open"),
        (libc::SYS_pidfd_send_signal, "pidfd_send_signal"),
        (libc::SYS_init_module, "init_module"),
        (libc::SYS_finit_module, "finit_module"),
        (libc::SYS_delete_module, "delete_module"),
        (libc::SYS_reboot, "reboot"),
        (libc::SYS_swapon, "swapon"),
        (libc::SYS_settimeofday, "settimeofday"),
        (libc::SYS_clock_settime, "clock_settime"),
        (libc::SYS_add_key, "add_key"),
        (libc::SYS_keyctl, "keyctl"),
        (libc::SYS_mknod, "mknod"),
        (libc::SYS_mknodat, "mknodat"),
        (libc::SYS_open_by_handle_at, "open_by_handle_at"),
        (libc::SYS_name_to_handle_at, "name_to_handle_at"),
    ];
    NAMES
        .iter()
        .find(|(n, _)| *n == nr)
        .map_or("(unnamed)", |(_, s)| *s)
}

#[cfg(test)]
mod tests;
