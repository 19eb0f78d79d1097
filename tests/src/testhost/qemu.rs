//! The QEMU command line that boots the test host (built by
//! `resources/build-kernels.sh testhost`): software emulation of an AMD CPU
//! with SVM and nested paging, the outer root shared read-only over 9p, and
//! a user-mode network that only carries the agent's forwarded port.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::proto::AGENT_PORT;

/// The test host's files, as `resources/build-kernels.sh testhost` leaves
/// them (`build/testhost/`).
#[derive(Debug, Clone)]
pub struct Files {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The kernel's module tree (in the build cache).
    pub modules: String,
    pub release: String,
    /// The root of the unpacked QEMU (`usr/bin/qemu-system-x86_64`).
    pub qemu: PathBuf,
}

impl Files {
    pub fn locate(dir: &Path) -> Result<Files, String> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .map(|s| s.trim().to_string())
                .map_err(|e| {
                    format!(
                        "test host not built ({}: {e}): run resources/build-kernels.sh testhost",
                        dir.join(name).display()
                    )
                })
        };
        let modules = read("modules")?;
        let release = read("release")?;
        let qemu = PathBuf::from(read("qemu")?);
        let files = Files {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.img"),
            modules,
            release,
            qemu,
        };
        for p in [&files.kernel, &files.initrd, &files.binary()] {
            if !p.is_file() {
                return Err(format!(
                    "test host not built ({} missing): run resources/build-kernels.sh testhost",
                    p.display()
                ));
            }
        }
        if !Path::new(&files.modules)
            .join("lib/modules")
            .join(&files.release)
            .is_dir()
        {
            return Err(format!(
                "the test host's module tree {} is gone: run resources/build-kernels.sh testhost",
                files.modules
            ));
        }
        Ok(files)
    }

    pub fn binary(&self) -> PathBuf {
        self.qemu.join("usr/bin/qemu-system-x86_64")
    }
}

/// Where the test host's serial console goes.
#[derive(Debug, Clone)]
pub enum Serial {
    /// Appended to a file (the tests).
    File(PathBuf),
    /// This terminal, every byte passed through, Ctrl-C included
    /// (`./run.sh`).
    Stdio,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub cpus: u32,
    pub memory_mib: u32,
    /// The agent binary (`vmm-testhost`), by its path on the outer root.
    pub agent: PathBuf,
    /// A script run on the console after boot (then the test host powers off).
    pub run: Option<PathBuf>,
    pub serial: Serial,
    /// The loopback port of this machine forwarded to the agent.
    pub port: u16,
    /// A directory of this machine that the test host may write (at the
    /// same path inside).
    pub share: Option<PathBuf>,
    /// Boot it as an operator's host: systemd as PID 1, the agent one of
    /// its services (resources/testhost/init, `testhost.init=systemd`).
    pub systemd: bool,
}

pub fn command(files: &Files, opts: &Options) -> Command {
    // tsc=reliable: TCG's TSC is one clock for all vCPUs, but the kernel's
    // warp check across its threads calls it unsynchronized; KVM then
    // "catches up" each guest vCPU's TSC separately when its thread moves,
    // and guests hang early in boot. oops=panic: an oops (the emulator
    // fault's "stack guard page was hit") ends QEMU at once (panic=-1 with
    // -no-reboot) instead of leaving a half-dead test host.
    let mut append = format!(
        "console=ttyS0 panic=-1 oops=panic quiet loglevel=4 tsc=reliable testhost.agent={} testhost.modules={}",
        opts.agent.display(),
        files.modules
    );
    if let Some(run) = &opts.run {
        append.push_str(&format!(" testhost.run={}", run.display()));
    }
    if let Some(share) = &opts.share {
        append.push_str(&format!(" testhost.share={}", share.display()));
    }
    if opts.systemd {
        append.push_str(" testhost.init=systemd");
    }
    let mut c = match std::env::var_os("VMM_TESTHOST_QEMU") {
        Some(q) => Command::new(q),
        None => {
            let mut c = Command::new(files.binary());
            for data in ["usr/share/qemu", "usr/share/seabios"] {
                c.arg("-L").arg(files.qemu.join(data));
            }
            c
        }
    };
    c.args(["-accel", "tcg,thread=multi", "-cpu", "max"])
        .args(["-smp", &opts.cpus.to_string()])
        .args(["-m", &opts.memory_mib.to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-monitor", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(&files.kernel)
        .arg("-initrd")
        .arg(&files.initrd)
        .args(["-append", &append])
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .args([
            "-netdev",
            &format!(
                "user,id=agent,restrict=on,hostfwd=tcp:127.0.0.1:{}-:{AGENT_PORT}",
                opts.port
            ),
        ])
        .args(["-device", "virtio-net-pci,netdev=agent,romfile="]);
    if let Some(share) = &opts.share {
        c.arg("-virtfs").arg(format!(
            "local,path={},mount_tag=share,security_model=none,multidevs=remap",
            share.display()
        ));
    }
    match &opts.serial {
        Serial::File(p) => {
            c.args(["-serial", &format!("file:{}", p.display())]);
        }
        Serial::Stdio => {
            c.args(["-chardev", "stdio,id=console,signal=off"])
                .args(["-serial", "chardev:console"]);
        }
    }
    c
}
