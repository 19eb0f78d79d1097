use super::*;

#[test]
fn every_filter_compiles_and_every_call_has_its_reason() {
    for kind in Kind::ALL {
        for mode in [Mode::On, Mode::Log] {
            assert!(!compile(kind, mode).unwrap().is_empty());
        }
        assert!(list(kind).all(|(_, why)| !why.is_empty()));
    }
    let sizes = allow_list_sizes();
    assert!(sizes.iter().all(|(_, n)| *n > 20 && *n < 90), "{sizes:?}");
}

#[test]
fn the_spawner_allows_everything_its_children_do() {
    for child in [
        Kind::Vcpu,
        Kind::Hook,
        Kind::Migration,
        Kind::Throttle,
        Kind::Snapshot,
    ] {
        for (nr, _) in list(child) {
            assert!(
                list(Kind::Spawner).any(|(n, _)| n == nr),
                "{} needs {}",
                child.name(),
                syscall_name(*nr)
            );
        }
    }
}

#[test]
fn no_thread_may_start_processes_and_guest_facing_ones_open_no_sockets() {
    for kind in Kind::ALL {
        for nr in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_ptrace,
            libc::SYS_setuid,
            libc::SYS_mount,
            libc::SYS_kexec_load,
            libc::SYS_bpf,
        ] {
            assert!(
                list(kind).all(|(n, _)| *n != nr),
                "{} may call {}",
                kind.name(),
                syscall_name(nr)
            );
        }
    }
    for kind in [Kind::Vcpu, Kind::Disk, Kind::Net] {
        for nr in [
            libc::SYS_execve,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_fork,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_ptrace,
            libc::SYS_setuid,
            libc::SYS_mount,
        ] {
            assert!(
                list(kind).all(|(n, _)| *n != nr),
                "{} may call {}",
                kind.name(),
                syscall_name(nr)
            );
        }
    }
    assert!(list(Kind::Disk).all(|(n, _)| *n != libc::SYS_openat));
    assert!(list(Kind::Disk).all(|(n, _)| *n != libc::SYS_ioctl));
    // A network interface's thread opens nothing either: its TAP's queues
    // were opened at start-up.
    assert!(list(Kind::Net).all(|(n, _)| *n != libc::SYS_openat));
    // The threads that run guest code open nothing (vhost-net's
    // instance is opened with its device, at start-up).
    assert!(list(Kind::Vcpu).all(|(n, _)| *n != libc::SYS_openat));
}

#[test]
fn modes_parse() {
    assert_eq!("on".parse::<Mode>(), Ok(Mode::On));
    assert_eq!("log".parse::<Mode>(), Ok(Mode::Log));
    assert_eq!("off".parse::<Mode>(), Ok(Mode::Off));
    assert!("yes"
        .parse::<Mode>()
        .unwrap_err()
        .contains("on, log or off"));
}
