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

/// Installs `kind`'s filter in a forked child, which then makes `call`:
/// whether the child was ended by SIGSYS (the filter refused the call).
fn refused_in_child(kind: Kind, call: impl FnOnce()) -> bool {
    // Compiled before the fork: the child only installs it and calls.
    let prog = compile(kind, Mode::On).unwrap();
    // SAFETY: the child runs only async-signal-safe work (installing a
    // compiled filter, one system call, `_exit`) before it ends.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        // SIGSYS's default action ends the child, which is the answer.
        let code = if seccompiler::apply_filter(&prog).is_ok() {
            call();
            0
        } else {
            2
        };
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked; `status` outlives the call.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFSIGNALED(status) || libc::WEXITSTATUS(status) == 0,
        "the child could not install the filter: {status:#x}"
    );
    libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
}

#[test]
fn a_network_interfaces_thread_may_make_tunsetqueue_and_no_other_ioctl() {
    let ifr = [0u8; 40];
    let tunsetqueue = refused_in_child(Kind::Net, || {
        // SAFETY: an ioctl on a descriptor that is not open (EBADF); `ifr`
        // outlives the call.
        unsafe { libc::ioctl(-1, libc::TUNSETQUEUE, ifr.as_ptr()) };
    });
    assert!(!tunsetqueue, "TUNSETQUEUE refused");
    let fionread = refused_in_child(Kind::Net, || {
        let mut n: libc::c_int = 0;
        // SAFETY: an ioctl on a descriptor that is not open; `n` outlives it.
        unsafe { libc::ioctl(-1, libc::FIONREAD, &mut n) };
    });
    assert!(fionread, "another ioctl let through");
    // The event loop may make any (KVM, TUN offloads, vhost-net resets).
    assert!(!refused_in_child(Kind::EventLoop, || {
        let mut n: libc::c_int = 0;
        // SAFETY: as above.
        unsafe { libc::ioctl(-1, libc::FIONREAD, &mut n) };
    }));
}
