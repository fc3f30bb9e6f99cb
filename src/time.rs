//! Time values without a clock: RFC 3339 timestamps and human durations (`90s`, `5m`, `1h30m`).
//!
//! Pure: nothing here reads the system clock except [`now`], which callers at the edges use and
//! then pass the value down (DESIGN.md: the token engine and policy never read the clock).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds and microseconds since the Unix epoch, UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnixMicros(pub i64);

impl UnixMicros {
    /// Whole seconds (floor).
    pub fn secs(self) -> i64 {
        self.0.div_euclid(1_000_000)
    }

    /// From whole seconds.
    pub fn from_secs(secs: i64) -> Self {
        Self(secs.saturating_mul(1_000_000))
    }

    /// Adds a duration, saturating.
    pub fn plus(self, d: Duration) -> Self {
        Self(self.0.saturating_add(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)))
    }

    /// Subtracts a duration, saturating.
    pub fn minus(self, d: Duration) -> Self {
        Self(self.0.saturating_sub(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)))
    }

    /// RFC 3339 in UTC with second precision, e.g. `2030-01-01T00:00:00Z`.
    pub fn to_rfc3339(self) -> String {
        format_rfc3339(self.secs(), None)
    }

    /// RFC 3339 in UTC with microseconds, e.g. `2030-01-01T00:00:00.000001Z`.
    pub fn to_rfc3339_micros(self) -> String {
        format_rfc3339(self.secs(), Some(self.0.rem_euclid(1_000_000) as u32))
    }
}

/// Reads the system clock. Only the I/O edges call this.
pub fn now() -> UnixMicros {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    UnixMicros(i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Why a timestamp or duration did not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimeError(String);

impl fmt::Display for TimeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TimeError {}

fn err(msg: impl Into<String>) -> TimeError {
    TimeError(msg.into())
}

// Days since 1970-01-01 for a proleptic Gregorian date (Hinnant's algorithm).
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
    (if m <= 2 { yoe + era * 400 + 1 } else { yoe + era * 400 }, m, d)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// Formats Unix seconds as RFC 3339 UTC, with optional microseconds.
pub fn format_rfc3339(secs: i64, micros: Option<u32>) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (rem / 3600, rem % 3600 / 60, rem % 60);
    match micros {
        Some(us) => format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{us:06}Z"),
        None => format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z"),
    }
}

/// Formats Unix seconds in a fixed UTC offset (seconds east), e.g. for "local time" displays.
pub fn format_rfc3339_offset(secs: i64, offset_secs: i32) -> String {
    let local = secs + offset_secs as i64;
    let base = format_rfc3339(local, None);
    if offset_secs == 0 {
        return base;
    }
    let sign = if offset_secs < 0 { '-' } else { '+' };
    let o = offset_secs.unsigned_abs();
    format!("{}{sign}{:02}:{:02}", &base[..base.len() - 1], o / 3600, o % 3600 / 60)
}

fn digits(s: &[u8], at: usize, n: usize, what: &str) -> Result<u32, TimeError> {
    let part = s.get(at..at + n).ok_or_else(|| err(format!("timestamp too short: missing {what}")))?;
    if !part.iter().all(u8::is_ascii_digit) {
        return Err(err(format!("timestamp: {what} must be {n} digits")));
    }
    Ok(part.iter().fold(0u32, |acc, b| acc * 10 + u32::from(b - b'0')))
}

/// Parses an RFC 3339 timestamp (`2030-01-01T00:00:00Z`, `...T01:00:00+01:00`, optional fraction)
/// into Unix microseconds. Fractions beyond microseconds are truncated.
pub fn parse_rfc3339(input: &str) -> Result<UnixMicros, TimeError> {
    let s = input.as_bytes();
    if s.len() < 20 || s.len() > 40 {
        return Err(err(format!("not an RFC 3339 timestamp: {input:?}")));
    }
    let y = digits(s, 0, 4, "year")? as i64;
    let sep = |i: usize, c: u8| -> Result<(), TimeError> {
        if s[i] == c { Ok(()) } else { Err(err(format!("timestamp: expected {:?} at byte {i}", c as char))) }
    };
    sep(4, b'-')?;
    let mo = digits(s, 5, 2, "month")?;
    sep(7, b'-')?;
    let d = digits(s, 8, 2, "day")?;
    if !matches!(s[10], b'T' | b't') {
        return Err(err("timestamp: expected 'T' between date and time"));
    }
    let hh = digits(s, 11, 2, "hour")?;
    sep(13, b':')?;
    let mi = digits(s, 14, 2, "minute")?;
    sep(16, b':')?;
    let ss = digits(s, 17, 2, "second")?;
    if !(1..=12).contains(&mo) || d == 0 || d > days_in_month(y, mo) || hh > 23 || mi > 59 || ss > 59 {
        return Err(err(format!("timestamp out of range: {input:?}")));
    }
    let mut i = 19;
    let mut micros = 0u32;
    if s[i] == b'.' {
        i += 1;
        let start = i;
        while i < s.len() && s[i].is_ascii_digit() {
            if i - start < 6 {
                micros = micros * 10 + u32::from(s[i] - b'0');
            }
            i += 1;
        }
        let n = i - start;
        if n == 0 {
            return Err(err("timestamp: empty fraction"));
        }
        for _ in n..6 {
            micros *= 10;
        }
    }
    let offset: i64 = match s.get(i) {
        Some(b'Z' | b'z') if i + 1 == s.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == s.len() => {
            let oh = digits(s, i + 1, 2, "offset hours")? as i64;
            if s[i + 3] != b':' {
                return Err(err("timestamp: offset must be ±hh:mm"));
            }
            let om = digits(s, i + 4, 2, "offset minutes")? as i64;
            if oh > 23 || om > 59 {
                return Err(err("timestamp: offset out of range"));
            }
            let o = oh * 3600 + om * 60;
            if *sign == b'+' { o } else { -o }
        }
        _ => {
            return Err(err(format!("timestamp needs a 'Z' or ±hh:mm offset: {input:?}")));
        }
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + (hh * 3600 + mi * 60 + ss) as i64 - offset;
    Ok(UnixMicros(secs * 1_000_000 + micros as i64))
}

/// Parses a duration: one or more `<number><unit>` groups, units `ms`, `s`, `m`, `h`, `d`
/// (e.g. `30s`, `5m`, `1h30m`). A bare number is rejected: units are required.
pub fn parse_duration(input: &str) -> Result<Duration, TimeError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(err("empty duration"));
    }
    let bytes = s.as_bytes();
    let mut total: u128 = 0;
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if start == i {
            return Err(err(format!("duration {input:?}: expected a number at {:?}", &s[i..])));
        }
        let n: u128 = s[start..i].parse().map_err(|_| err(format!("duration {input:?}: number too large")))?;
        let ustart = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let ms_per = match &s[ustart..i] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => {
                return Err(err(format!("duration {input:?}: missing unit (use ms, s, m, h or d)")));
            }
            u => {
                return Err(err(format!("duration {input:?}: unknown unit {u:?} (use ms, s, m, h or d)")));
            }
        };
        total = total.saturating_add(n.saturating_mul(ms_per));
        if total > u64::MAX as u128 / 2 {
            return Err(err(format!("duration {input:?} is too large")));
        }
    }
    Ok(Duration::from_millis(total as u64))
}

/// Formats a duration compactly (`1h30m`, `45s`, `250ms`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    if !ms.is_multiple_of(1000) && ms < 60_000 {
        return format!("{ms}ms");
    }
    let mut secs = (ms / 1000) as u64;
    let mut out = String::new();
    for (unit, size) in [("d", 86_400u64), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_known_instants() {
        for (text, secs) in [
            ("1970-01-01T00:00:00Z", 0),
            ("2030-01-01T00:00:00Z", 1_893_456_000),
            ("2000-02-29T12:34:56Z", 951_827_696),
            ("1969-12-31T23:59:59Z", -1),
        ] {
            let t = parse_rfc3339(text).unwrap();
            assert_eq!(t.secs(), secs, "{text}");
            assert_eq!(t.to_rfc3339(), text);
        }
    }

    #[test]
    fn rfc3339_offsets_and_fractions() {
        let a = parse_rfc3339("2030-01-01T01:00:00+01:00").unwrap();
        assert_eq!(a, parse_rfc3339("2030-01-01T00:00:00Z").unwrap());
        let b = parse_rfc3339("2030-01-01T00:00:00.1234567Z").unwrap();
        assert_eq!(b.0 % 1_000_000, 123_456);
        assert_eq!(b.to_rfc3339_micros(), "2030-01-01T00:00:00.123456Z");
        assert_eq!(format_rfc3339_offset(0, -5 * 3600), "1969-12-31T19:00:00-05:00");
    }

    #[test]
    fn rfc3339_rejects_malformed() {
        for bad in [
            "",
            "2030-01-01",
            "2030-01-01T00:00:00",
            "2030-13-01T00:00:00Z",
            "2030-02-30T00:00:00Z",
            "2030-01-01T24:00:00Z",
            "2030-01-01 00:00:00Z",
            "2030-01-01T00:00:00.Z",
            "2030-01-01T00:00:00+0100",
            "2030-01-01T00:00:00Zjunk",
            "+030-01-01T00:00:00Z",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
        for bad in ["", "30", "5x", "m", "-5m", "1.5h", "99999999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should fail");
        }
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
    }
}
