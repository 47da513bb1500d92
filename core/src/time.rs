//! Time arithmetic shared by the runner and the backends, and RFC 3339
//! timestamps (the CloudEvents `time` attribute).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// `now + d`, saturating a century ahead instead of panicking on overflow, so a
/// caller's `Duration::MAX` (a deadline, a delay, an ack deadline) is "never".
pub fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// `t` as an RFC 3339 timestamp in UTC with millisecond precision, e.g.
/// `2018-04-05T03:56:24.123Z`. Times before 1970 are written as the epoch.
pub fn to_rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Parses an RFC 3339 timestamp (`2018-04-05T03:56:24Z`, with optional
/// fractional seconds and a `Z` or `±hh:mm` offset; `t` and `z` accepted in
/// lower case). `None` for anything else, or a time before 1970.
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let b = text.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut i = 19;
    let mut nanos: u64 = 0;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        let mut end = start;
        while end < b.len() && b[end].is_ascii_digit() {
            end += 1;
        }
        if end == start {
            return None;
        }
        let digits = &text[start..end.min(start + 9)];
        nanos = digits.parse::<u64>().ok()? * 10u64.pow(9 - digits.len() as u32);
        i = end;
    }
    let offset_secs = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if b.len() == i + 6 && b[i + 3] == b':' => {
            let secs = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
            if *sign == b'+' { secs } else { -secs }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month as u32, day as u32);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    let secs = u64::try_from(secs).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_nanos(nanos))
}

// Howard Hinnant's days-from-civil algorithms (public domain), proleptic Gregorian.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_and_reads_offsets() {
        let t = UNIX_EPOCH + Duration::from_millis(1_522_900_584_123);
        assert_eq!(to_rfc3339(t), "2018-04-05T03:56:24.123Z");
        assert_eq!(parse_rfc3339("2018-04-05T03:56:24.123Z"), Some(t));
        assert_eq!(
            parse_rfc3339("2018-04-05T05:56:24.123+02:00"),
            Some(t),
            "an offset is applied"
        );
        assert_eq!(
            parse_rfc3339("2018-04-05T03:56:24Z"),
            Some(UNIX_EPOCH + Duration::from_secs(1_522_900_584))
        );
        assert_eq!(
            parse_rfc3339("2024-02-29t00:00:00.000000001z"),
            Some(UNIX_EPOCH + Duration::from_secs(1_709_164_800) + Duration::from_nanos(1))
        );
        assert_eq!(
            to_rfc3339(UNIX_EPOCH + Duration::from_secs(1_709_164_800)),
            "2024-02-29T00:00:00.000Z"
        );
        for bad in [
            "",
            "2018-04-05",
            "2018-04-05T03:56:24",
            "2018-13-05T03:56:24Z",
            "2018-04-05T03:56:24.Z",
            "yesterday",
            "2018-04-05T03:56:24+0200",
            "1969-12-31T23:59:59Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn saturates_instead_of_overflowing() {
        let now = Instant::now();
        assert_eq!(later(now, Duration::from_secs(1)), now + Duration::from_secs(1));
        assert!(later(now, Duration::MAX) > now + Duration::from_secs(365 * 24 * 3600));
    }
}
