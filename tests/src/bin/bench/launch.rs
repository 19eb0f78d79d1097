//! The tiny guests and the command lines that boot them in our `vmm` and in
//! QEMU with comparable settings (1 vCPU, same guest memory, no disk/net).

use std::path::{Path, PathBuf};
use std::process::Command;

use tests::tiny::{write_guest, Asm};

/// QEMU's isa-debug-exit port: QEMU exits with status (v << 1) | 1; our vmm
/// has nothing there and goes on to the ACPI S5 write.
pub const QEMU_EXIT_PORT: u16 = 0xf4;
pub const QEMU_EXIT_VALUE: u8 = 0x10;
pub const QEMU_EXIT_STATUS: i32 = ((QEMU_EXIT_VALUE as i32) << 1) | 1;

/// Marker the idle guest prints on COM1 once it runs.
pub const UP: &str = "BENCH-UP";

pub struct Guests {
    /// Powers off at once (QEMU debug-exit, then ACPI S5).
    pub exit_now: PathBuf,
    /// Prints `UP`, then `cli; hlt` forever (idle, never woken).
    pub idle: PathBuf,
}

pub fn write_guests(dir: &Path) -> Result<Guests, String> {
    let exit_now = dir.join("exit-now.elf");
    let mut a = Asm::new();
    a.outb(QEMU_EXIT_PORT, QEMU_EXIT_VALUE)
        .outb(0x600, 0x34)
        .cli_hlt_forever();
    write_guest(&exit_now, &a).map_err(|e| format!("cannot write {}: {e}", exit_now.display()))?;
    let idle = dir.join("idle.elf");
    let mut a = Asm::new();
    a.print(&format!("{UP}\r\n")).cli_hlt_forever();
    write_guest(&idle, &a).map_err(|e| format!("cannot write {}: {e}", idle.display()))?;
    Ok(Guests { exit_now, idle })
}

/// How to start one of the two VMMs.
#[derive(Clone, Debug)]
pub enum Vmm {
    Ours(PathBuf),
    Qemu { bin: PathBuf, machine: String },
}

pub struct Boot<'a> {
    pub kernel: &'a Path,
    pub memory_mib: u64,
    /// Serial console on stdout (otherwise discarded).
    pub serial: bool,
    /// Control socket (ours) or QMP socket (QEMU).
    pub control: Option<&'a Path>,
    pub log_info: bool,
}

impl Vmm {
    pub fn label(&self) -> String {
        match self {
            Vmm::Ours(_) => "vmm".into(),
            Vmm::Qemu { machine, .. } => {
                format!("QEMU -M {}", machine.split(',').next().unwrap_or(machine))
            }
        }
    }

    pub fn command(&self, b: &Boot) -> Command {
        match self {
            Vmm::Ours(bin) => {
                let mut c = Command::new(bin);
                c.arg("--kernel")
                    .arg(b.kernel)
                    .args(["--memory", &b.memory_mib.to_string(), "--vcpus", "1"])
                    .args(["--console", if b.serial { "stdio" } else { "none" }]);
                if let Some(s) = b.control {
                    c.args(["--name", "bench"]).arg("--control").arg(s);
                }
                c.env("VMM_LOG", if b.log_info { "info" } else { "warn" });
                c.env("NO_COLOR", "1");
                c
            }
            Vmm::Qemu { bin, machine } => {
                let mut c = Command::new(bin);
                c.args(["-accel", "kvm", "-M", machine])
                    .args(["-m", &b.memory_mib.to_string(), "-smp", "1"])
                    .args(["-nodefaults", "-no-user-config", "-display", "none"])
                    .args(["-serial", if b.serial { "stdio" } else { "null" }])
                    .args([
                        "-device",
                        &format!("isa-debug-exit,iobase={QEMU_EXIT_PORT:#x},iosize=1"),
                    ])
                    .arg("-kernel")
                    .arg(b.kernel);
                if let Some(s) = b.control {
                    c.arg("-qmp")
                        .arg(format!("unix:{},server=on,wait=off", s.display()));
                }
                c
            }
        }
    }

    /// The exit status a tiny guest's immediate power-off gives.
    pub fn poweroff_status(&self) -> i32 {
        match self {
            Vmm::Ours(_) => 0,
            Vmm::Qemu { .. } => QEMU_EXIT_STATUS,
        }
    }
}

/// `qemu-system-x86_64 --version`, first line.
pub fn qemu_version(bin: &Path) -> Result<String, String> {
    let o = Command::new(bin)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let s = String::from_utf8_lossy(&o.stdout);
    Ok(s.lines().next().unwrap_or("unknown version").to_string())
}

/// Finds a program in PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
