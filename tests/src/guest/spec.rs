//! How a guest is described before it starts: [`Spec`], the scratch
//! [`HostDir`] it runs in, and the kernel library's entries.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::NetNs;
use crate::host::Host;

/// A scratch directory on a host, removed on drop.
pub struct HostDir {
    host: &'static Host,
    path: PathBuf,
}

impl HostDir {
    pub fn new(host: &'static Host, tag: &str) -> HostDir {
        let out = host
            .sh(&format!("mktemp -d /tmp/vmm-e2e-{tag}-XXXXXX"))
            .ok("mktemp");
        HostDir {
            host,
            path: PathBuf::from(out.trim()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `name` inside it, as a string for command lines.
    pub fn join(&self, name: &str) -> String {
        self.path.join(name).display().to_string()
    }
}

impl Drop for HostDir {
    fn drop(&mut self) {
        let _ = self.host.try_sh(
            &format!("rm -rf '{}'", self.path.display()),
            Duration::from_secs(60),
        );
    }
}

/// How to start a guest.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    /// Library entry (`build/kernels/<kernel>`).
    pub kernel: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Appended to the entry's command line.
    pub cmdline: String,
    /// More `vmm` arguments (disks, nets, actions).
    pub args: Vec<String>,
    /// Run the VMM in this network namespace (see [`NetNs`]).
    pub netns: Option<String>,
    /// Pass the library's own command line of each entry (no `--cmdline`):
    /// for a guest that switches kernels.
    pub entry_cmdline: bool,
    /// `--kernel-name` when it is not `kernel` (e.g. `disk`: the kernel in
    /// the guest's own /boot; `kernel` then still gives the command line).
    pub kernel_name: Option<String>,
}

impl Spec {
    pub fn new(kernel: &str) -> Spec {
        Spec {
            name: format!("g-{kernel}"),
            kernel: kernel.to_string(),
            vcpus: 1,
            memory_mib: 256,
            cmdline: String::new(),
            args: Vec::new(),
            netns: None,
            entry_cmdline: false,
            kernel_name: None,
        }
    }

    /// Boots `name` (`--kernel-name`) with `kernel`'s command line.
    pub fn kernel_name(mut self, name: &str) -> Spec {
        self.kernel_name = Some(name.to_string());
        self
    }

    pub fn name(mut self, name: &str) -> Spec {
        self.name = name.to_string();
        self
    }

    /// Runs the VMM inside `ns` (its TAPs are there).
    pub fn netns(mut self, ns: &NetNs) -> Spec {
        self.netns = Some(ns.name.clone());
        self
    }

    /// Each library entry boots with its own command line (no extra words).
    pub fn entry_cmdline(mut self) -> Spec {
        self.entry_cmdline = true;
        self
    }

    pub fn vcpus(mut self, n: u32) -> Spec {
        self.vcpus = n;
        self
    }

    pub fn memory(mut self, mib: u32) -> Spec {
        self.memory_mib = mib;
        self
    }

    pub fn cmdline(mut self, extra: &str) -> Spec {
        if !self.cmdline.is_empty() {
            self.cmdline.push(' ');
        }
        self.cmdline.push_str(extra);
        self
    }

    pub fn arg(mut self, a: &str) -> Spec {
        self.args.push(a.to_string());
        self
    }

    pub fn args(mut self, a: &[&str]) -> Spec {
        self.args.extend(a.iter().map(|s| s.to_string()));
        self
    }
}

/// The kernel library (`build/kernels`), by its path on every host.
pub fn kernel_dir() -> PathBuf {
    crate::kernel_dir()
}

/// A file of a library entry (`cmdline`, `release`), trimmed.
fn entry_file(kernel: &str, name: &str) -> String {
    let p = kernel_dir().join(kernel).join(name);
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run resources/build-kernels.sh {kernel})",
                p.display()
            )
        })
        .trim()
        .to_string()
}

/// The default command line of a library entry.
pub fn entry_cmdline(kernel: &str) -> String {
    entry_file(kernel, "cmdline")
}

/// The `uname -r` of a library entry.
pub fn entry_release(kernel: &str) -> String {
    entry_file(kernel, "release")
}
