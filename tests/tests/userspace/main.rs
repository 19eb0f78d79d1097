//! Real guests with real user space: the library's kernels boot to their
//! initramfs shell under real KVM (this machine's when it is hardware KVM,
//! else the test host's: see `tests::host`), and the tests type commands
//! into the guest's console as a customer would, checking what the guest
//! and the host see. One test host serves every test of this binary; tests
//! run two at a time.

mod addresses;
mod backup;
mod boot;
mod connection;
mod console;
mod disk;
mod disk_kernel;
mod kernel_upgrade;
mod lifecycle;
mod migration;
mod net;
mod net_mq;
mod panic;
mod server;
mod snapshot;
mod watchdog;

use tests::guest::{Guest, Spec, INIT_OK};
use tests::Host;

/// Starts a guest and waits for its console shell.
pub fn boot(h: &'static Host, spec: Spec) -> Guest {
    let mut g = Guest::start(h, spec);
    g.wait_shell(INIT_OK);
    g
}

/// The sha256 of a file on the host.
pub fn sha256(h: &Host, path: &str) -> String {
    h.sh(&format!("sha256sum '{path}'"))
        .ok("sha256sum")
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}
