//! [`NetNs`]: a network namespace with a TAP or a bridge for a guest's
//! network, and the addresses tests give its two sides.

use std::time::Duration;

use crate::host::Host;

/// A network namespace on a host with a TAP (`tap0`, 10.0.2.1/24 on the
/// host side) for a guest's `--net tap=tap0`; removed on drop.
pub struct NetNs {
    host: &'static Host,
    pub name: String,
}

/// The host side of a [`NetNs`]'s TAP.
pub const HOST_IP: &str = "10.0.2.1";
/// What tests give the guest's eth0.
pub const GUEST_IP: &str = "10.0.2.2";
/// The host side's IPv6 address in a [`NetNs::bridged`].
pub const HOST_IP6: &str = "fd00:2::1";

impl NetNs {
    pub fn new(host: &'static Host, tag: &str) -> NetNs {
        Self::create(
            host,
            tag,
            "a TAP",
            &format!(
                "ip -n $ns tuntap add dev tap0 mode tap multi_queue; \
                 ip -n $ns addr add {HOST_IP}/24 dev tap0; ip -n $ns link set tap0 up"
            ),
        )
    }

    /// As [`NetNs::new`] with a single-queue TAP: QEMU with one queue pair
    /// opens its TAP without `IFF_MULTI_QUEUE`, which the kernel refuses
    /// on a multi-queue TAP (the side-by-side benchmarks; our VMM takes
    /// either).
    pub fn single_queue(host: &'static Host, tag: &str) -> NetNs {
        Self::create(
            host,
            tag,
            "a TAP",
            &format!(
                "ip -n $ns tuntap add dev tap0 mode tap; \
                 ip -n $ns addr add {HOST_IP}/24 dev tap0; ip -n $ns link set tap0 up"
            ),
        )
    }

    /// A namespace standing for a host whose VMs are on a bridge: `br0`
    /// with [`HOST_IP`]/24 and [`HOST_IP6`]/64, no TAP (`vmm net up`
    /// makes the VMs' TAPs).
    pub fn bridged(host: &'static Host, tag: &str) -> NetNs {
        Self::create(
            host,
            tag,
            "a bridge",
            &format!(
                "ip -n $ns link add br0 type bridge; \
                 ip -n $ns addr add {HOST_IP}/24 dev br0; \
                 ip -n $ns addr add {HOST_IP6}/64 dev br0 nodad; ip -n $ns link set br0 up"
            ),
        )
    }

    /// A fresh namespace with its loopback up, then `setup` (a shell
    /// script, the namespace's name in `$ns`) to give it `what`.
    fn create(host: &'static Host, tag: &str, what: &str, setup: &str) -> NetNs {
        let name = format!("vmm-{tag}-{}", crate::rand_u64() % 1_000_000);
        host.sh(&format!(
            "set -e; ns={name}; ip netns add $ns; ip -n $ns link set lo up; {setup}"
        ))
        .ok(&format!("create a network namespace with {what}"));
        NetNs { host, name }
    }

    /// Runs `script` inside the namespace.
    pub fn sh(&self, script: &str) -> crate::host::Output {
        self.host.sh(&format!(
            "ip netns exec {} sh -c '{}'",
            self.name,
            script.replace('\'', "'\\''")
        ))
    }

    /// Starts `argv` inside the namespace, in the background.
    pub fn spawn(&self, argv: &[&str]) -> std::io::Result<crate::host::Proc> {
        let prefix = self.exec_prefix();
        let full: Vec<&str> = prefix
            .iter()
            .map(String::as_str)
            .chain(argv.iter().copied())
            .collect();
        self.host.spawn(&full, &[])
    }

    /// A command line prefix that runs inside the namespace.
    pub fn exec_prefix(&self) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.name.clone(),
        ]
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = self.host.try_sh(
            &format!("ip netns del {}", self.name),
            Duration::from_secs(60),
        );
    }
}
