//! The hook launcher's request parser (`vmm::hooks::parse_launch`): the
//! only input of the one process that may run commands, sent by a VMM a
//! guest may have taken over.
//!
//! Checks: whatever it accepts names a known event, carries a time made
//! only of RFC 3339 characters (nothing a shell would read as syntax) and
//! no longer than 40 bytes, and reads back the same once written out
//! again; and it never accepts a line without exactly three tab-separated
//! fields and a final newline.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::hooks::{format_launch, parse_launch, EVENTS};

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let Some(run) = parse_launch(line) else {
        return;
    };
    assert!(line.ends_with('\n'));
    assert_eq!(
        line.trim_end_matches('\n').split('\t').count(),
        3,
        "{line:?}"
    );
    assert!(EVENTS.contains(&run.event), "{run:?}");
    assert!(!run.time.is_empty() && run.time.len() <= 40, "{run:?}");
    assert!(
        run.time
            .bytes()
            .all(|b| b.is_ascii_digit() || b"-:.+TZ".contains(&b)),
        "{run:?}"
    );
    assert_eq!(parse_launch(&format_launch(&run)), Some(run.clone()));
});
