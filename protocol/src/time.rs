//! UTC timestamps in RFC 3339 form, without a date-time dependency.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Converts days since 1970-01-01 to a (year, month, day) civil date (proleptic Gregorian).
/// Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32; // [1, 31]
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32; // [1, 12]
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn split(time: SystemTime) -> (i64, u32, u32, u64, u32) {
    // Times before 1970 do not occur on a host clock worth trusting; clamp them to the epoch.
    let since = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = since.as_secs();
    let days = (secs / 86_400) as i64;
    let (y, m, d) = civil_from_days(days);
    (y, m, d, secs % 86_400, since.subsec_millis())
}

/// `2026-11-25T02:10:00Z` (seconds precision).
pub fn rfc3339_seconds(time: SystemTime) -> String {
    let (y, mo, d, s, _) = split(time);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// `2026-11-25T02:10:00.123Z` (milliseconds precision), the form used in events.
pub fn rfc3339_millis(time: SystemTime) -> String {
    let (y, mo, d, s, ms) = split(time);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// The current time as [`rfc3339_millis`].
pub fn now_rfc3339() -> String {
    rfc3339_millis(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
    }

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339_seconds(at(0, 0)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_millis(at(0, 7)), "1970-01-01T00:00:00.007Z");
        // date -u -d @951782400 → 2000-02-29 (leap day of a year divisible by 400)
        assert_eq!(rfc3339_seconds(at(951_782_400, 0)), "2000-02-29T00:00:00Z");
        // date -u -d @1795832999 → Sat Nov 28 02:29:59 UTC 2026
        assert_eq!(
            rfc3339_seconds(at(1_795_832_999, 0)),
            "2026-11-28T02:29:59Z"
        );
        assert_eq!(
            rfc3339_millis(at(4_107_542_399, 999)),
            "2100-02-28T23:59:59.999Z"
        );
        assert_eq!(
            rfc3339_seconds(at(4_107_542_400, 0)),
            "2100-03-01T00:00:00Z"
        );
    }

    #[test]
    fn before_epoch_clamps() {
        let t = UNIX_EPOCH - Duration::from_secs(10);
        assert_eq!(rfc3339_seconds(t), "1970-01-01T00:00:00Z");
    }
}
