use std::process::ExitCode;

use clap::Parser;
use vmm::config::{Cli, VmConfig};

fn main() -> ExitCode {
    vmm::seccomp::one_malloc_arena();
    vmm::fatal::install_panic_policy();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // `vmm net up|down [flags as for a start]`: the host side of its network.
    if args.get(1).is_some_and(|a| a == "net") {
        return match vmm::netcmd::run(args.split_off(2)) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vmm net: {e}");
                ExitCode::from(2)
            }
        };
    }
    // `vmm check [flags as for a start]`: the operator's dry run.
    let check = args.get(1).is_some_and(|a| a == "check");
    if check {
        args.remove(1);
    }
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            // One line, like every other error: clap's first line.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("vmm: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
        Err(e) => {
            // --help, --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let cfg = match VmConfig::resolve(cli, vmm::config::host_memory_mib()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmm: {e}");
            return ExitCode::from(2);
        }
    };
    if check {
        return match vmm::service::check(&cfg) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vmm: {e}");
                ExitCode::from(2)
            }
        };
    }
    if let Err(e) = vmm::seccomp::init(cfg.seccomp) {
        eprintln!("vmm: {e}");
        return ExitCode::from(1);
    }
    match vmm::run(cfg) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("vmm: {e}");
            ExitCode::from(1)
        }
    }
}
