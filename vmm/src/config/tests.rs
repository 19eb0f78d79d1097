use super::*;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-cfg-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn cli_with_kernel(k: &Path) -> Cli {
    Cli {
        kernel: Some(k.to_path_buf()),
        ..Default::default()
    }
}

#[test]
fn defaults_apply_and_flags_override_the_file() {
    let d = tmpdir("merge");
    let k = d.join("bzImage");
    std::fs::write(&k, b"x").unwrap();
    let f = d.join("vm.toml");
    std::fs::write(
        &f,
        format!(
            "name = \"web1\"\nkernel = \"{}\"\nmemory = 512\nvcpus = 2\n",
            k.display()
        ),
    )
    .unwrap();
    let cli = Cli {
        config: Some(f.clone()),
        vcpus: Some(1),
        ..Default::default()
    };
    let c = VmConfig::resolve(cli, Some(4096)).unwrap();
    assert_eq!(c.name, "web1");
    assert_eq!(c.mem_mib, 512);
    assert_eq!(c.vcpus, 1, "the flag wins over the file");
    assert_eq!(c.kernel_choice(None).unwrap().cmdline, DEFAULT_CMDLINE);
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn bad_values_are_clear_errors() {
    let d = tmpdir("bad");
    let k = d.join("bzImage");
    std::fs::write(&k, b"x").unwrap();
    let mut cli = cli_with_kernel(&k);
    cli.memory = Some(0);
    assert_eq!(
        VmConfig::resolve(cli.clone(), None),
        Err(ConfigError::MemoryRange(0))
    );
    cli.memory = Some(8192);
    assert!(matches!(
        VmConfig::resolve(cli.clone(), Some(4096)),
        Err(ConfigError::MemoryHost { .. })
    ));
    cli.memory = None;
    cli.console_log_max = Some(0);
    assert_eq!(
        VmConfig::resolve(cli.clone(), None),
        Err(ConfigError::ConsoleLogMax(0))
    );
    cli.console_log_max = Some(u64::MAX);
    assert_eq!(
        VmConfig::resolve(cli.clone(), None),
        Err(ConfigError::ConsoleLogMax(u64::MAX))
    );
    cli.console_log_max = None;
    cli.vcpus = Some(0);
    assert_eq!(
        VmConfig::resolve(cli.clone(), None),
        Err(ConfigError::Vcpus(0))
    );
    cli.vcpus = Some(9);
    assert_eq!(
        VmConfig::resolve(cli.clone(), None),
        Err(ConfigError::Vcpus(9))
    );
    cli.vcpus = None;
    cli.name = Some("../etc".into());
    assert!(matches!(
        VmConfig::resolve(cli, None),
        Err(ConfigError::Name(_))
    ));
    let missing = cli_with_kernel(&d.join("nope"));
    let e = VmConfig::resolve(missing, None).unwrap_err();
    assert!(e.to_string().contains("not found"), "{e}");
    assert_eq!(
        VmConfig::resolve(Cli::default(), None),
        Err(ConfigError::NoKernel)
    );
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn unknown_or_malformed_file_keys_are_rejected() {
    let d = tmpdir("file");
    let f = d.join("vm.toml");
    std::fs::write(&f, "memroy = 5\n").unwrap();
    let e = VmConfig::resolve(
        Cli {
            config: Some(f.clone()),
            ..Default::default()
        },
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("memroy"), "{e}");
    std::fs::write(&f, "memory = \"lots\"\n").unwrap();
    assert!(VmConfig::resolve(
        Cli {
            config: Some(f),
            ..Default::default()
        },
        None
    )
    .is_err());
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn disk_and_net_specs_parse_and_bad_ones_say_why() {
    let d = parse_disk("path=/x.img,ro=on,id=data1").unwrap();
    assert_eq!(d.path, PathBuf::from("/x.img"));
    assert!(d.read_only);
    assert_eq!(d.id.as_deref(), Some("data1"));
    assert!(!d.direct);
    assert!(!parse_disk("path=/y").unwrap().read_only);
    assert!(parse_disk("path=/y,direct=on").unwrap().direct);
    assert_eq!(parse_disk("path=/y").unwrap().queues, None);
    assert_eq!(parse_disk("path=/y,queues=4").unwrap().queues, Some(4));
    for q in ["0", "17", "many"] {
        let e = parse_disk(&format!("path=/y,queues={q}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("queues={q}: use 1 to 16")), "{e}");
    }
    assert_eq!(parse_disk("path=/y").unwrap().poll_us, 0, "off by default");
    assert_eq!(parse_disk("path=/y,poll_us=50").unwrap().poll_us, 50);
    for p in ["1001", "-1", "soon"] {
        let e = parse_disk(&format!("path=/y,poll_us={p}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("poll_us={p}: use 0 (off) to 1000")),
            "{e}"
        );
    }
    for bad in [
        "ro=on",
        "path=/x,ro=maybe",
        "path=/x,direct=sometimes",
        "path=/x,size=3",
        "path",
        "path=/x,id=012345678901234567890",
    ] {
        let e = parse_disk(bad).unwrap_err().to_string();
        assert!(e.starts_with("--disk "), "{e}");
    }
    let n = parse_net("tap=tap0,mac=52:54:00:12:34:56").unwrap();
    assert_eq!(n.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
    assert!(parse_net("tap=tap0,mac=zz").is_err());
    assert!(parse_net("mac=52:54:00:12:34:56").is_err());
    assert!(parse_net("tap=aaaaaaaaaaaaaaaaaaaa").is_err());
    use devices::virtio::net::vhost::VhostMode;
    assert_eq!(parse_net("tap=t").unwrap().vhost, VhostMode::Auto);
    assert_eq!(parse_net("tap=t,vhost=off").unwrap().vhost, VhostMode::Off);
    assert_eq!(parse_net("tap=t,vhost=on").unwrap().vhost, VhostMode::On);
    assert_eq!(parse_net("tap=t").unwrap().queues, None);
    assert_eq!(parse_net("tap=t,queues=4").unwrap().queues, Some(4));
    for bad in ["queues=0", "queues=17", "queues=x"] {
        let e = parse_net(&format!("tap=t,{bad}")).unwrap_err().to_string();
        assert!(e.contains("use 1 to 16"), "{e}");
    }
    let e = parse_net("tap=t,vhost=yes").unwrap_err().to_string();
    assert!(e.contains("vhost=yes: expected auto, on or off"), "{e}");
}

#[test]
fn a_net_asks_vhost_net_to_busy_poll_and_refuses_polling_it_cannot_have() {
    assert_eq!(parse_net("tap=t").unwrap().poll_us, 0, "off by default");
    assert_eq!(parse_net("tap=t,poll_us=50").unwrap().poll_us, 50);
    assert_eq!(
        parse_net("tap=t,vhost=on,poll_us=1000").unwrap().poll_us,
        1000
    );
    // Off is off with either datapath.
    assert_eq!(parse_net("tap=t,vhost=off,poll_us=0").unwrap().poll_us, 0);
    for p in ["1001", "-1", "soon", ""] {
        let e = parse_net(&format!("tap=t,poll_us={p}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("poll_us={p}: use 0 (off) to 1000")),
            "{e}"
        );
    }
    // The userspace datapath does not poll: asking for both is a mistake
    // said at start-up, not a setting silently dropped.
    let e = parse_net("tap=t,vhost=off,poll_us=20")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("--net "), "{e}");
    assert!(
        e.contains("poll_us=20 is vhost-net's busy polling: it needs vhost=auto or vhost=on"),
        "{e}"
    );
}

#[test]
fn a_net_names_its_bridge_and_the_addresses_it_may_send_from() {
    let n = parse_net("tap=tap-web1,bridge=br0,ip=10.0.2.2,ip=2001:db8::/64").unwrap();
    assert_eq!(n.bridge.as_deref(), Some("br0"));
    let addrs: Vec<String> = n.addresses.iter().map(|a| a.to_string()).collect();
    assert_eq!(addrs, ["10.0.2.2/32", "2001:db8::/64"]);
    for (bad, why) in [
        ("tap=t,ip=10.0.2.2/24", "ip=10.0.2.2/24: host bits are set"),
        (
            "tap=t,ip=224.0.0.1",
            "ip=224.0.0.1: not an address a VM can be given",
        ),
        ("tap=t,bridge=br 0", "bridge=br 0: an interface name"),
    ] {
        let e = parse_net(bad).unwrap_err().to_string();
        assert!(e.contains(why), "{bad}: {e}");
    }
    let many = format!("tap=t{}", ",ip=10.0.2.2".repeat(65));
    let e = parse_net(&many).unwrap_err().to_string();
    assert!(e.contains("more than 64 ip= entries"), "{e}");
}

#[test]
fn two_interfaces_on_one_tap_are_refused() {
    let cli = Cli {
        name: Some("web1".into()),
        nets: vec!["tap=tap0".into(), "tap=tap0,mac=52:54:00:00:00:02".into()],
        ..Cli::default()
    };
    let e = resolve_nets(&cli).unwrap_err().to_string();
    assert!(e.contains("tap tap0 is already another interface's"), "{e}");
}

#[test]
fn watchdog_and_panic_actions_parse() {
    let d = tmpdir("actions");
    let k = d.join("bzImage");
    std::fs::write(&k, b"x").unwrap();
    let mut cli = cli_with_kernel(&k);
    cli.watchdog = Some("action=pause".into());
    cli.on_panic = Some("none".into());
    let c = VmConfig::resolve(cli.clone(), None).unwrap();
    assert_eq!(c.watchdog_action, protocol::WatchdogAction::Pause);
    assert_eq!(c.panic_action, protocol::PanicAction::None);
    cli.watchdog = Some("action=explode".into());
    let e = VmConfig::resolve(cli.clone(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--watchdog") && e.contains("reset"), "{e}");
    cli.watchdog = Some("reset".into());
    assert!(VmConfig::resolve(cli.clone(), None).is_err());
    cli.watchdog = None;
    cli.on_panic = Some("reboot".into());
    assert!(VmConfig::resolve(cli, None).is_err());
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn the_librarys_modules_disk_is_attached_unless_turned_off() {
    let d = tmpdir("modlib");
    std::fs::create_dir_all(d.join("mini")).unwrap();
    std::fs::write(d.join("mini").join("bzImage"), b"x").unwrap();
    let mut cli = Cli {
        kernel_dir: Some(d.clone()),
        kernel_name: Some("mini".into()),
        ..Default::default()
    };
    let c = VmConfig::resolve(cli.clone(), None).unwrap();
    assert_eq!(c.library_modules(), None, "no modules.img in the library");
    std::fs::write(d.join(MODULES_IMAGE), b"x").unwrap();
    assert_eq!(
        VmConfig::resolve(cli.clone(), None)
            .unwrap()
            .library_modules(),
        Some(d.join(MODULES_IMAGE))
    );
    assert_eq!(
        library_entries(&d),
        vec!["mini".to_string()],
        "modules.img is not an entry"
    );
    cli.library_modules = Some("off".into());
    assert_eq!(
        VmConfig::resolve(cli.clone(), None)
            .unwrap()
            .library_modules(),
        None
    );
    cli.library_modules = Some("maybe".into());
    assert!(VmConfig::resolve(cli, None).is_err());
    let k = d.join("mini").join("bzImage");
    let fixed = VmConfig::resolve(cli_with_kernel(&k), None).unwrap();
    assert_eq!(
        fixed.library_modules(),
        None,
        "a fixed kernel file has no library"
    );
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn library_entries_resolve_with_their_cmdline() {
    let d = tmpdir("lib");
    for n in ["mini", "debian-6.1"] {
        std::fs::create_dir_all(d.join(n)).unwrap();
        std::fs::write(d.join(n).join("bzImage"), b"x").unwrap();
    }
    std::fs::write(d.join("mini").join("cmdline"), "console=ttyS0 quiet\n").unwrap();
    std::fs::write(d.join("mini").join("initrd.img"), b"x").unwrap();
    let cli = Cli {
        kernel_dir: Some(d.clone()),
        kernel_name: Some("mini".into()),
        ..Default::default()
    };
    let c = VmConfig::resolve(cli, None).unwrap();
    let k = c.kernel_choice(None).unwrap();
    assert_eq!(k.cmdline, "console=ttyS0 quiet");
    assert!(k.initrd.is_some());
    let other = c.kernel_choice(Some("debian-6.1")).unwrap();
    assert_eq!(other.label, "debian-6.1");
    assert!(other.initrd.is_none());
    assert!(other.kernel.path().unwrap().ends_with("debian-6.1/bzImage"));
    // An entry's vmlinux (PVH) wins over its bzImage.
    std::fs::write(d.join("debian-6.1").join("vmlinux"), b"x").unwrap();
    let other = c.kernel_choice(Some("debian-6.1")).unwrap();
    assert!(other.kernel.path().unwrap().ends_with("debian-6.1/vmlinux"));
    let e = c.kernel_choice(Some("nope")).unwrap_err();
    assert!(e.to_string().contains("debian-6.1, mini"), "{e}");
    assert!(c.kernel_choice(Some("../mini")).is_err());
    assert_eq!(library_entries(&d), vec!["debian-6.1", "mini"]);
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn set_disk_and_the_command_line_allow_the_same_polling_limit() {
    // `set-disk` is checked by the protocol's parser, `--disk ...,poll_us=N`
    // here: one rule for the operator.
    assert_eq!(
        u128::from(protocol::MAX_POLL_US),
        devices::virtio::block::MAX_POLL.as_micros()
    );
    assert_eq!(protocol::MAX_IOPS, devices::virtio::block::MAX_IOPS);
}

#[test]
fn a_disk_takes_an_iops_and_a_bandwidth_limit() {
    let d = parse_disk("path=/y").unwrap();
    assert_eq!((d.iops, d.mib_s), (0, 0), "no limit by default");
    let d = parse_disk("path=/y,iops=500,mib_s=100").unwrap();
    assert_eq!((d.iops, d.mib_s), (500, 100));
    for (kv, why) in [
        (
            "iops=10000001",
            "iops=10000001: use 0 (no limit) to 10000000",
        ),
        ("iops=-1", "iops=-1: use 0 (no limit) to 10000000"),
        ("mib_s=lots", "mib_s=lots: use 0 (no limit) to 1048576"),
    ] {
        let e = parse_disk(&format!("path=/y,{kv}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(why), "{e}");
    }
}
