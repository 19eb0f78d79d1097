//! The VMM library: configuration, guest memory layout, boot, vCPUs, the
//! PVM fallback, and the VM lifecycle.

pub mod acpi;
pub mod actions;
pub mod backup;
pub mod boot;
pub mod config;
pub mod console;
pub mod control;
pub mod cpu;
pub mod disk_kernels;
pub mod emulate;
pub mod events;
pub mod fallback;
pub mod fatal;
pub mod hooks;
pub mod hostnet;
pub mod layout;
pub mod lifecycle;
pub mod machine;
pub mod migration;
pub mod netcmd;
pub mod platform;
pub mod runtime;
pub mod sandbox;
pub mod seccomp;
pub mod service;
pub mod snapshot;
pub mod spawner;
pub mod throttle;
pub mod timer;
pub mod vcpu;
pub mod vm;
pub mod watchdog;

pub use runtime::run;
