//! Parsing and printing of the value syntaxes of CONFIG.md "Units": sizes,
//! rates, durations and hours. Pure string functions; every error is a
//! sentence a person can act on, usually with the corrected spelling.

use std::fmt;
use std::time::Duration;

/// Decimal size units (powers of 1000), CONFIG.md "Units".
const DECIMAL: [(&str, u64); 5] = [
    ("B", 1),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
];
/// Binary size units (powers of 1024).
const BINARY: [(&str, u64); 4] = [
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
];
/// Bit rate units (powers of 1000 bits per second).
const BITS: [(&str, u64); 4] = [
    ("bit/s", 1),
    ("kbit/s", 1_000),
    ("Mbit/s", 1_000_000),
    ("Gbit/s", 1_000_000_000),
];

fn size_unit(unit: &str) -> Option<u64> {
    // "kB" is the SI spelling of KB; accept it, it cannot be mistaken for bits.
    let unit = if unit == "kB" { "KB" } else { unit };
    DECIMAL
        .iter()
        .chain(BINARY.iter())
        .find(|(u, _)| *u == unit)
        .map(|&(_, m)| m)
}

/// Splits "1.5 TB" into ("1.5", "TB"); the space is optional.
fn split_number(s: &str) -> (&str, &str) {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(s.len());
    (&s[..end], s[end..].trim_start())
}

/// Multiplies a decimal number written as text by `mult`, exactly.
/// Returns `None` when the result is not a whole number or overflows.
fn scale_decimal(num: &str, mult: u128) -> Result<u128, String> {
    let num = num.replace('_', "");
    if num.is_empty() {
        return Err("a number is missing".into());
    }
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num.as_str(), ""),
    };
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{num:?} is not a number"));
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) || frac.len() > 18 {
        return Err(format!("{num:?} is not a number"));
    }
    let int: u128 = int.parse().map_err(|_| format!("{num:?} is too large"))?;
    let frac_val: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse()
            .map_err(|_| format!("{num:?} is not a number"))?
    };
    let denom = 10u128.pow(frac.len() as u32);
    let whole = int.checked_mul(mult).ok_or("the value is too large")?;
    let part = frac_val * mult;
    if part % denom != 0 {
        return Err("the value is not a whole number of bytes".into());
    }
    whole
        .checked_add(part / denom)
        .ok_or_else(|| "the value is too large".into())
}

/// Parses a size string such as `"500 GiB"` or `"1.5TB"` into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (num, unit) = split_number(s);
    if num.is_empty() {
        return Err(format!(
            "{s:?} is not a size: it must start with a number, e.g. \"500 GiB\""
        ));
    }
    if unit.is_empty() {
        return Err(format!(
            "{s:?} has no unit; write a TOML integer for bytes ({n}) or add a unit such as \"{n} GiB\"",
            n = num
        ));
    }
    let Some(mult) = size_unit(unit) else {
        return Err(format!(
            "unknown size unit {unit:?}; use B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)"
        ));
    };
    let bytes = scale_decimal(num, mult as u128)?;
    u64::try_from(bytes).map_err(|_| "the value is too large".to_string())
}

/// Parses a rate string into bytes per second. A unit is mandatory.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let (num, unit) = split_number(s);
    if num.is_empty() {
        return Err(format!(
            "{s:?} is not a rate: it must start with a number, e.g. \"20 MiB/s\""
        ));
    }
    let unit_l = unit.to_ascii_lowercase();
    if unit.is_empty() {
        return Err(bare_rate_message(num));
    }
    if let Some(&(_, m)) = BITS
        .iter()
        .find(|(u, _)| *u == unit || u.eq_ignore_ascii_case(unit))
    {
        let bits = scale_decimal(num, m as u128)?;
        if bits % 8 != 0 {
            return Err("the rate is not a whole number of bytes per second".into());
        }
        return u64::try_from(bits / 8).map_err(|_| "the rate is too large".into());
    }
    if let Some(size) = unit.strip_suffix("/s")
        && let Some(m) = size_unit(size.trim_end())
    {
        let bytes = scale_decimal(num, m as u128)?;
        return u64::try_from(bytes).map_err(|_| "the rate is too large".into());
    }
    // The classic confusions get a pointed hint (burp's users mixed MB/s and Mbit/s).
    let hint = match unit_l.as_str() {
        "mbps" | "mb/s" | "mbit" | "mbits" | "mb" => {
            format!(
                "write \"{num} Mbit/s\" for megabits or \"{num} MB/s\" for megabytes per second"
            )
        }
        "kbps" | "kbit" | "kb" => {
            format!(
                "write \"{num} kbit/s\" for kilobits or \"{num} KB/s\" for kilobytes per second"
            )
        }
        "gbps" | "gbit" | "gb" => {
            format!(
                "write \"{num} Gbit/s\" for gigabits or \"{num} GB/s\" for gigabytes per second"
            )
        }
        _ => "use a size unit followed by /s (\"20 MiB/s\", \"500 KB/s\") or bits (\"100 Mbit/s\")"
            .to_string(),
    };
    Err(format!("unknown rate unit {unit:?}; {hint}"))
}

/// The message for a rate written without a unit (CONFIG.md "Units").
pub fn bare_rate_message(num: &str) -> String {
    format!(
        "a rate needs a unit, because MB/s and Mbit/s differ eightfold: write \"{num} MB/s\" (bytes) or \"{num} Mbit/s\" (bits)"
    )
}

/// Parses a duration such as `"250ms"`, `"10s"`, `"5m"`, `"1h"`, `"90d"` or
/// `"1h30m"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err("the duration is empty; write e.g. \"10s\"".into());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "{s:?} is not a duration; write a whole number and a unit: \"250ms\", \"10s\", \"5m\" or \"1h\""
            ));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{s:?} is too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = rest[..unit_len].trim();
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" | "min" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            "" => {
                return Err(format!(
                    "{s:?} has no unit; write \"{n}s\" for seconds (ms, s, m, h and d are accepted)"
                ));
            }
            other => {
                return Err(format!(
                    "unknown duration unit {other:?} in {s:?}; use ms, s, m, h or d"
                ));
            }
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

/// Hours during which a setting applies, in local time (CONFIG.md "Units").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hours {
    /// Every minute of every day.
    Always,
    /// From `start` (inclusive) to `end` (exclusive), minutes after local
    /// midnight; `end < start` means the window wraps midnight.
    Window {
        /// Minute of the day the window opens, 0..1440.
        start: u16,
        /// Minute of the day the window closes, 0..1440.
        end: u16,
    },
}

impl Hours {
    /// Whether `minute_of_day` (0..1440) lies inside these hours.
    pub fn contains(self, minute_of_day: u16) -> bool {
        match self {
            Hours::Always => true,
            Hours::Window { start, end } if start < end => (start..end).contains(&minute_of_day),
            Hours::Window { start, end } => minute_of_day >= start || minute_of_day < end,
        }
    }
}

impl fmt::Display for Hours {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Hours::Always => f.write_str("always"),
            Hours::Window { start, end } => write!(
                f,
                "{:02}:{:02}-{:02}:{:02}",
                start / 60,
                start % 60,
                end / 60,
                end % 60
            ),
        }
    }
}

fn parse_hhmm(s: &str, allow_24: bool) -> Option<u16> {
    let (h, m) = s.trim().split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let h: u16 = h.parse().ok()?;
    let m: u16 = m.parse().ok()?;
    if m > 59 {
        return None;
    }
    match h {
        0..=23 => Some(h * 60 + m),
        24 if allow_24 && m == 0 => Some(0),
        _ => None,
    }
}

/// Parses `"always"` or `"HH:MM-HH:MM"`; `"24:00"` is accepted as an end.
pub fn parse_hours(s: &str) -> Result<Hours, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("always") {
        return Ok(Hours::Always);
    }
    let bad = || {
        format!(
            "{s:?} is not an hours value; write \"always\" or \"HH:MM-HH:MM\" in 24-hour local time, e.g. \"22:00-06:00\""
        )
    };
    let (a, b) = t.split_once('-').ok_or_else(bad)?;
    let start = parse_hhmm(a, false).ok_or_else(bad)?;
    let end = parse_hhmm(b, true).ok_or_else(bad)?;
    if start == end {
        return Err(format!(
            "{s:?} starts and ends at the same minute; for the whole day write \"always\""
        ));
    }
    Ok(Hours::Window { start, end })
}

/// Formats bytes for people: "12.3 GiB", "500 GiB", "0 B".
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    let mut value = bytes as f64;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if (value.round() - value).abs() < 0.05 {
        format!("{:.0} {}", value.round(), UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Formats a rate in bytes per second for people: binary units when the
/// rate is a whole number of KiB/s, else bits when that is round
/// ("100 Mbit/s"), else decimal bytes.
pub fn format_rate(bytes_per_sec: u64) -> String {
    if bytes_per_sec % 1024 != 0 {
        let bits = bytes_per_sec.saturating_mul(8);
        if let Some((unit, m)) = BITS.iter().rev().find(|(_, m)| *m > 1 && bits % m == 0) {
            return format!("{} {unit}", bits / m);
        }
    }
    format!("{}/s", format_size(bytes_per_sec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        let ok: &[(&str, u64)] = &[
            ("500 GiB", 500 << 30),
            ("1.5TB", 1_500_000_000_000),
            ("1 TiB", 1 << 40),
            ("20 TiB", 20 << 40),
            ("1.5 KiB", 1536),
            ("10B", 10),
            ("64 kB", 64_000),
            ("1_000 MB", 1_000_000_000),
            ("0 B", 0),
        ];
        for (s, want) in ok {
            assert_eq!(parse_size(s), Ok(*want), "{s}");
        }
        let bad: &[(&str, &str)] = &[
            ("500", "no unit"),
            ("5 GB/s", "unknown size unit"),
            ("5 gb", "unknown size unit"),
            ("abc GiB", "must start with a number"),
            ("0.5 B", "whole number"),
            ("-5 GiB", "must start with a number"),
            ("99999999999 TiB", "too large"),
            ("1..5 GB", "not a number"),
        ];
        for (s, want) in bad {
            let e = parse_size(s).unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
        }
    }

    #[test]
    fn rates() {
        let ok: &[(&str, u64)] = &[
            ("20 MiB/s", 20 << 20),
            ("500 KB/s", 500_000),
            ("100 Mbit/s", 12_500_000),
            ("1 Gbit/s", 125_000_000),
            ("200 Mbit/s", 25_000_000),
            ("64 kbit/s", 8_000),
            ("2MiB/s", 2 << 20),
            ("8 bit/s", 1),
            ("1.5 MB/s", 1_500_000),
        ];
        for (s, want) in ok {
            assert_eq!(parse_rate(s), Ok(*want), "{s}");
        }
        let bad: &[(&str, &str)] = &[
            ("10", "needs a unit"),
            ("10 Mbps", "\"10 Mbit/s\" for megabits or \"10 MB/s\""),
            ("10 MB", "\"10 MB/s\""),
            ("10 furlongs/s", "unknown rate unit"),
            ("1 bit/s", "whole number"),
            ("x MB/s", "must start with a number"),
        ];
        for (s, want) in bad {
            let e = parse_rate(s).unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
        }
    }

    #[test]
    fn durations() {
        let ok: &[(&str, Duration)] = &[
            ("250ms", Duration::from_millis(250)),
            ("10s", Duration::from_secs(10)),
            ("5m", Duration::from_secs(300)),
            ("1h", Duration::from_secs(3600)),
            ("1h30m", Duration::from_secs(5400)),
            ("2 s", Duration::from_secs(2)),
            ("90d", Duration::from_secs(90 * 86_400)),
        ];
        for (s, want) in ok {
            assert_eq!(parse_duration(s), Ok(*want), "{s}");
        }
        for (s, want) in [
            ("10", "no unit"),
            ("", "empty"),
            ("s", "not a duration"),
            ("3 days", "unknown duration unit"),
        ] {
            let e = parse_duration(s).unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
        }
    }

    #[test]
    fn hours() {
        use Hours::*;
        let ok: &[(&str, Hours)] = &[
            ("always", Always),
            (
                "08:00-18:00",
                Window {
                    start: 480,
                    end: 1080,
                },
            ),
            (
                "22:00-06:00",
                Window {
                    start: 1320,
                    end: 360,
                },
            ),
            (
                "20:00-24:00",
                Window {
                    start: 1200,
                    end: 0,
                },
            ),
            ("00:00-00:01", Window { start: 0, end: 1 }),
        ];
        for (s, want) in ok {
            assert_eq!(parse_hours(s), Ok(*want), "{s}");
            if *want != Always {
                assert_eq!(want.to_string(), s.replace("24:00", "00:00"));
            }
        }
        for (s, want) in [
            ("08:00-08:00", "same minute"),
            ("8:00-18:00", "not an hours value"),
            ("25:00-06:00", "not an hours value"),
            ("08:60-09:00", "not an hours value"),
            ("24:00-06:00", "not an hours value"),
            ("sometimes", "not an hours value"),
        ] {
            let e = parse_hours(s).unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
        }
    }

    #[test]
    fn hours_contains_wraps_midnight() {
        let w = parse_hours("22:00-06:00").unwrap();
        let cases = [
            (21 * 60 + 59, false),
            (22 * 60, true),
            (23 * 60 + 59, true),
            (0, true),
            (5 * 60 + 59, true),
            (6 * 60, false),
            (12 * 60, false),
        ];
        for (m, want) in cases {
            assert_eq!(w.contains(m), want, "minute {m}");
        }
        let day = parse_hours("08:00-18:00").unwrap();
        assert!(
            !day.contains(479) && day.contains(480) && day.contains(1079) && !day.contains(1080)
        );
    }

    #[test]
    fn formatting() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(500 << 30), "500 GiB");
        assert_eq!(format_size((123u64 << 30) / 10), "12.3 GiB");
        assert_eq!(format_rate(12_500_000), "100 Mbit/s");
        assert_eq!(format_rate(2 << 20), "2 MiB/s");
    }
}
