//! `vmm net up|down [--dhcp-dir DIR] [the VM's flags or --config]`: the
//! host side of a VM's interfaces ([`crate::hostnet`]), from the same
//! config as the VM itself. Run as root: the unit runs `up` before the VMM
//! starts and on `systemctl reload` (a live address change), `down` after
//! it stops.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;

use crate::config::{Cli, ConfigError, NetSpec};
use crate::hostnet::{self, apply::NetError, Port};

/// Where dnsmasq's `dhcp-hostsdir` points (resources/network/dnsmasq.conf).
pub const DEFAULT_DHCP_DIR: &str = "/run/vmm-dhcp";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Action {
    /// Create the TAPs, put them on their bridges, install (or update) their
    /// filtering and write the VM's DHCP leases.
    Up,
    /// Remove the filtering and the leases (the TAPs stay).
    Down,
}

#[derive(Parser, Debug)]
#[command(
    name = "vmm net",
    about = "The host side of a VM's network: TAPs, bridge, anti-spoofing, DHCP leases"
)]
struct NetCli {
    #[arg(value_enum)]
    action: Action,
    /// dnsmasq's dhcp-hostsdir: the VM's leases go to DIR/NAME.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DHCP_DIR)]
    dhcp_dir: PathBuf,
    #[command(flatten)]
    vm: Cli,
}

#[derive(Debug, thiserror::Error)]
pub enum NetCmdError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{name}: tap {tap}: {source}")]
    Port {
        name: String,
        tap: String,
        source: NetError,
    },
    #[error("{name}: DHCP leases: {source}")]
    Leases { name: String, source: NetError },
    #[error("{name}: tap={tap}: {reason}")]
    BadTap {
        name: String,
        tap: String,
        reason: &'static str,
    },
}

fn port(spec: &NetSpec) -> Port {
    Port {
        tap: spec.tap.clone(),
        mac: spec
            .mac
            .unwrap_or_else(|| devices::virtio::net::mac_from_name(&spec.tap)),
        addresses: spec.addresses.clone(),
    }
}

/// Whether `vmm net` filters the interface: it names a bridge or addresses.
fn filtered(spec: &NetSpec) -> bool {
    spec.bridge.is_some() || !spec.addresses.is_empty()
}

/// Parses `args` (the words after `vmm net`) and carries the action out:
/// the one-line summary, or the first problem.
pub fn run(args: Vec<OsString>) -> Result<String, NetCmdError> {
    let cli = NetCli::try_parse_from(std::iter::once(OsString::from("vmm net")).chain(args));
    let cli = match cli {
        Ok(c) => c,
        // --help
        Err(e) if !e.use_stderr() => return Ok(e.to_string().trim_end().to_string()),
        Err(e) => {
            // clap's message up to its usage line, on one line (a missing
            // argument is named on the line after the first).
            let text = e.to_string();
            let words: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            return Err(NetCmdError::Usage(
                words.join(" ").trim_start_matches("error: ").to_string(),
            ));
        }
    };
    let (name, nets) = crate::config::resolve_nets(&cli.vm)?;
    for n in &nets {
        if !hostnet::valid_ifname(&n.tap) {
            return Err(NetCmdError::BadTap {
                name,
                tap: n.tap.clone(),
                reason: "vmm net takes TAP names of letters, digits, '-', '_' and '.'",
            });
        }
    }
    let ports: Vec<Port> = nets.iter().map(port).collect();
    let port_err = |tap: &str, source| NetCmdError::Port {
        name: name.clone(),
        tap: tap.to_string(),
        source,
    };
    let leases_err = |source| NetCmdError::Leases {
        name: name.clone(),
        source,
    };
    match cli.action {
        Action::Up => {
            // The filtered interfaces are the ones with leases.
            let mut leased = Vec::new();
            for (spec, p) in nets.iter().zip(ports) {
                let filter = filtered(spec);
                hostnet::apply::up(&p, spec.bridge.as_deref(), filter)
                    .map_err(|e| port_err(&p.tap, e))?;
                if filter {
                    leased.push(p);
                } else {
                    // No longer filtered: what an earlier `up` installed goes.
                    hostnet::apply::down(&p.tap).map_err(|e| port_err(&p.tap, e))?;
                }
            }
            hostnet::apply::write_leases(&cli.dhcp_dir, &name, &hostnet::dhcp_hosts(&leased))
                .map_err(leases_err)?;
        }
        Action::Down => {
            for p in &ports {
                hostnet::apply::down(&p.tap).map_err(|e| port_err(&p.tap, e))?;
            }
            hostnet::apply::write_leases(&cli.dhcp_dir, &name, "").map_err(leases_err)?;
        }
    }
    Ok(summary(&name, cli.action, &nets))
}

fn summary(name: &str, action: Action, nets: &[NetSpec]) -> String {
    let what = match action {
        Action::Up => "up",
        Action::Down => "down",
    };
    if nets.is_empty() {
        return format!("{name}: net {what}: no interfaces");
    }
    let ports: Vec<String> = nets
        .iter()
        .map(|n| {
            let mut s = n.tap.clone();
            if let Some(b) = &n.bridge {
                s.push_str(&format!(" on {b}"));
            }
            if action == Action::Up && filtered(n) {
                let addrs: Vec<String> = n.addresses.iter().map(|a| a.to_string()).collect();
                s.push_str(&format!(
                    ", sends from {}",
                    if addrs.is_empty() {
                        "no address".to_string()
                    } else {
                        addrs.join(" ")
                    }
                ));
            }
            s
        })
        .collect();
    format!("{name}: net {what}: {}", ports.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    #[test]
    fn a_bad_tap_name_for_nftables_is_refused_before_anything_is_done() {
        let e = run(args(&["up", "--name", "web1", "--net", "tap=tap web1"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tap=tap web1"), "{e}");
    }

    #[test]
    fn an_unknown_action_is_a_one_line_usage_error() {
        let e = run(args(&["sideways"])).unwrap_err().to_string();
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.contains("sideways"), "{e}");
    }

    #[test]
    fn a_missing_action_is_named_on_the_one_line() {
        let e = run(args(&["--name", "web1"])).unwrap_err().to_string();
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.contains("<ACTION>"), "{e}");
    }

    #[test]
    fn a_vm_without_interfaces_has_nothing_to_do() {
        let dir = std::env::temp_dir().join(format!("vmm-netcmd-{}", std::process::id()));
        let out = run(args(&[
            "down",
            "--name",
            "web1",
            "--dhcp-dir",
            dir.to_str().unwrap_or("/nonexistent"),
        ]))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out, "web1: net down: no interfaces");
    }

    #[test]
    fn the_summary_names_each_tap_its_bridge_and_addresses() {
        let nets = vec![
            crate::config::parse_net("tap=tap-web1,bridge=br0,ip=10.0.2.2,ip=2001:db8::/64")
                .unwrap_or_else(|e| panic!("{e}")),
            crate::config::parse_net("tap=tap-web1b").unwrap_or_else(|e| panic!("{e}")),
        ];
        assert_eq!(
            summary("web1", Action::Up, &nets),
            "web1: net up: tap-web1 on br0, sends from 10.0.2.2/32 2001:db8::/64; tap-web1b"
        );
    }
}
