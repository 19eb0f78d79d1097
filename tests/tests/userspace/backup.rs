//! The operator's `backup` of a running guest's disk: the copy is the disk
//! as it was at one instant although the guest keeps writing, its file
//! system is clean once its journal is replayed, and the guest never
//! notices.

use std::time::Duration;

use serde_json::Value;
use tests::guest::{scenario, Guest, HostDir, Spec, ROOT_OK};

use crate::disk::root_image;

/// The first line of what `script` prints on the host.
fn host_line(h: &tests::Host, script: &str) -> String {
    h.sh(script)
        .ok(script)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[test]
fn a_backup_taken_while_the_guest_writes_is_clean_and_holds_the_disk_as_it_was_when_it_began() {
    scenario(|h| {
        let dir = HostDir::new(h, "backup");
        let img = root_image(h, &dir);
        let backups = dir.join("backups");
        h.sh(&format!("mkdir {backups}")).ok("mkdir");
        let spec = Spec::new("mini").cmdline("root=/dev/vda rw").args(&[
            "--disk",
            &format!("path={img},id=root"),
            "--backup-dir",
            &backups,
        ]);
        let mut g = Guest::start_in(h, spec, dir);
        g.wait_shell(ROOT_OK);
        // What the copy must hold as it was: 4 MiB, synced.
        g.run("dd if=/dev/urandom of=/before bs=64k count=64 2>/dev/null && sync");
        let before = g
            .run("sha256sum /before | cut -d' ' -f1")
            .trim()
            .to_string();
        // And a writer that never stops: a counter, synced at each step.
        g.run("(i=0; while :; do i=$((i+1)); echo $i > /counter.new; mv /counter.new /counter; sync; done) >/dev/null 2>&1 &");
        let mut sub = g.ctl();
        sub.ok(r#"{"cmd":"subscribe"}"#);
        let at_least: u64 = g.run("cat /counter").trim().parse().expect("a counter");

        // 2 MiB/s: the copy takes seconds, and the guest rewrites /before
        // meanwhile.
        let mut c = g.ctl();
        c.send_line(r#"{"cmd":"backup","disk":"root","to":"root.img","speed_mib_s":2}"#);
        let ev = sub
            .wait_event("backup_started", Duration::from_secs(60))
            .expect("backup_started");
        assert_eq!(ev["disk"], "disk0", "{ev}");
        g.run("dd if=/dev/urandom of=/before bs=64k count=64 2>/dev/null && sync");
        let r: Value = loop {
            let v = c.read_value();
            if v.get("ok").is_some() {
                break v;
            }
        };
        assert_eq!(r["ok"], true, "{r}\n{}", g.report());
        let at_most: u64 = g.run("cat /counter").trim().parse().expect("a counter");
        eprintln!("backup of a 64 MiB ext4 root while the guest writes (test host, 2 MiB/s): {r}");
        assert!(
            r["chunks_before_writes"].as_u64().unwrap_or(0) > 0,
            "the guest's writes during the copy were copied first: {r}"
        );

        // The guest went on: its writer still counts, its disk is its own.
        let later: u64 = g
            .run("sleep 1; cat /counter")
            .trim()
            .parse()
            .expect("a counter");
        assert!(later > at_most, "the writer stopped: {later} <= {at_most}");
        assert_ne!(
            g.run("sha256sum /before | cut -d' ' -f1").trim(),
            before,
            "the guest's rewrite is on its disk"
        );

        // The copy: clean once its journal is replayed, and as it was.
        let copy = format!("{backups}/root.img");
        let fsck = h.sh(&format!(
            "cp --sparse=always {copy} {copy}.fsck && e2fsck -fy {copy}.fsck"
        ));
        let code = fsck.status.code();
        assert!(
            matches!(code, Some(0) | Some(1)),
            "e2fsck -fy: {code:?}\n{}\n{}",
            fsck.stdout,
            fsck.stderr
        );
        h.sh(&format!("e2fsck -fn {copy}.fsck"))
            .ok("the copy's file system is clean after its journal");
        let held = host_line(
            h,
            &format!(
                "debugfs -R 'cat /before' {copy}.fsck 2>/dev/null | sha256sum | cut -d' ' -f1"
            ),
        );
        assert_eq!(
            held, before,
            "the copy holds /before as it was at the instant"
        );
        let counted: u64 = host_line(
            h,
            &format!("debugfs -R 'cat /counter' {copy}.fsck 2>/dev/null"),
        )
        .parse()
        .expect("the copy's counter");
        assert!(
            at_least.saturating_sub(1) <= counted && counted <= at_most,
            "the copy's counter {counted} is between what was synced before the request \
             ({at_least} - 1) and what the guest had written when it was answered ({at_most})"
        );
    });
}
