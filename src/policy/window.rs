//! When a time-bound setting is in force: hours plus the weekend rule, read in
//! `server.timezone`, and the next instant that can change the answer.
//!
//! Local wall-clock time decides (CONFIG.md "Units": hours are local time).
//! Around DST changes this means a window edge that falls into a skipped
//! hour takes effect when the clocks jump past it, and a repeated hour is
//! evaluated twice, exactly as a wall clock reads.

use crate::config::Hours;
use jiff::Timestamp;
use jiff::civil::{Date, DateTime, Time, Weekday};
use jiff::tz::TimeZone;

/// How many local days ahead `next_change` looks. A setting whose answer
/// changes at all changes within a week plus a day.
const HORIZON_DAYS: usize = 9;

/// Whether a setting with `hours` and `weekends_unthrottled` applies at the
/// local time `local`.
pub fn active_at(hours: Hours, weekends_unthrottled: bool, local: DateTime) -> bool {
    if weekends_unthrottled && matches!(local.weekday(), Weekday::Saturday | Weekday::Sunday) {
        return false;
    }
    hours.contains(local.hour() as u16 * 60 + local.minute() as u16)
}

/// Whether the setting applies at instant `t`.
pub fn active(hours: Hours, weekends_unthrottled: bool, tz: &TimeZone, t: Timestamp) -> bool {
    active_at(hours, weekends_unthrottled, tz.to_datetime(t))
}

/// The first instant after `t` at which [`active`] gives another answer, or
/// `None` when it never changes.
pub fn next_change(
    hours: Hours,
    weekends_unthrottled: bool,
    tz: &TimeZone,
    t: Timestamp,
) -> Option<Timestamp> {
    if hours == Hours::Always && !weekends_unthrottled {
        return None;
    }
    let now = active(hours, weekends_unthrottled, tz, t);
    let mut minutes: [u16; 3] = [0; 3];
    let mut n = 0;
    if let Hours::Window { start, end } = hours {
        minutes[0] = start;
        minutes[1] = end;
        n = 2;
    }
    if weekends_unthrottled && !minutes[..n].contains(&0) {
        minutes[n] = 0;
        n += 1;
    }
    let minutes = &mut minutes[..n];
    minutes.sort_unstable();

    // Offset changes can move an edge (a window opening inside a skipped
    // hour opens when the clocks jump), so they are candidates too.
    let mut transitions = tz
        .following(t)
        .take(2)
        .map(|tr| tr.timestamp())
        .collect::<Vec<_>>()
        .into_iter()
        .peekable();

    let mut day: Date = tz.to_datetime(t).date();
    let mut cands: Vec<Timestamp> = Vec::with_capacity(8);
    for _ in 0..HORIZON_DAYS {
        cands.clear();
        for &m in minutes.iter() {
            let dt =
                DateTime::from_parts(day, Time::new((m / 60) as i8, (m % 60) as i8, 0, 0).ok()?);
            let amb = tz.to_ambiguous_timestamp(dt);
            for ts in [amb.earlier(), amb.later()].into_iter().flatten() {
                if ts > t {
                    cands.push(ts);
                }
            }
        }
        let next_day = day.tomorrow().ok()?;
        let day_end = tz
            .to_ambiguous_timestamp(next_day.to_datetime(Time::midnight()))
            .later()
            .ok()?;
        while let Some(&tr) = transitions.peek() {
            if tr >= day_end {
                break;
            }
            if tr > t {
                cands.push(tr);
            }
            transitions.next();
        }
        cands.sort_unstable();
        cands.dedup();
        for &c in &cands {
            if active(hours, weekends_unthrottled, tz, c) != now {
                return Some(c);
            }
        }
        day = next_day;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::units::parse_hours;

    fn at(tz: &str, local: &str) -> (TimeZone, Timestamp) {
        let tz = TimeZone::get(tz).unwrap();
        let dt: DateTime = local.parse().unwrap();
        let ts = tz.to_ambiguous_timestamp(dt).compatible().unwrap();
        (tz, ts)
    }

    fn local(tz: &TimeZone, ts: Timestamp) -> String {
        let dt = tz.to_datetime(ts);
        format!("{dt} {}", tz.to_offset(ts))
    }

    #[test]
    fn next_change_table() {
        // (zone, now (local), hours, weekends, expected next change (local, offset))
        let cases: &[(&str, &str, &str, bool, Option<&str>)] = &[
            (
                "UTC",
                "2026-11-25T12:00",
                "22:00-06:00",
                false,
                Some("2026-11-25T22:00:00 +00"),
            ),
            (
                "UTC",
                "2026-11-25T23:59",
                "22:00-06:00",
                false,
                Some("2026-11-26T06:00:00 +00"),
            ),
            (
                "UTC",
                "2026-11-26T00:00",
                "22:00-06:00",
                false,
                Some("2026-11-26T06:00:00 +00"),
            ),
            (
                "UTC",
                "2026-11-26T05:59",
                "22:00-06:00",
                false,
                Some("2026-11-26T06:00:00 +00"),
            ),
            (
                "UTC",
                "2026-11-26T06:00",
                "22:00-06:00",
                false,
                Some("2026-11-26T22:00:00 +00"),
            ),
            ("UTC", "2026-11-25T12:00", "always", false, None),
            // Friday 2026-11-27: the weekend starts at Saturday 00:00, ends Monday 00:00.
            (
                "UTC",
                "2026-11-27T23:59",
                "always",
                true,
                Some("2026-11-28T00:00:00 +00"),
            ),
            (
                "UTC",
                "2026-11-28T00:00",
                "always",
                true,
                Some("2026-11-30T00:00:00 +00"),
            ),
            // Inside a night window on Friday: the weekend cuts it at midnight,
            // and Sunday night's window opens at Monday 00:00.
            (
                "UTC",
                "2026-11-27T23:00",
                "22:00-06:00",
                true,
                Some("2026-11-28T00:00:00 +00"),
            ),
            (
                "UTC",
                "2026-11-28T12:00",
                "22:00-06:00",
                true,
                Some("2026-11-30T00:00:00 +00"),
            ),
            // Berlin spring forward, 2026-03-29 02:00 CET -> 03:00 CEST.
            (
                "Europe/Berlin",
                "2026-03-29T01:00",
                "02:30-05:00",
                false,
                Some("2026-03-29T03:00:00 +02"),
            ),
            (
                "Europe/Berlin",
                "2026-03-28T12:00",
                "20:00-06:00",
                false,
                Some("2026-03-28T20:00:00 +01"),
            ),
            (
                "Europe/Berlin",
                "2026-03-29T01:00",
                "20:00-06:00",
                false,
                Some("2026-03-29T06:00:00 +02"),
            ),
            // Berlin fall back, 2026-10-25 03:00 CEST -> 02:00 CET: 02:30 occurs twice.
            (
                "Europe/Berlin",
                "2026-10-25T01:00",
                "02:30-03:00",
                false,
                Some("2026-10-25T02:30:00 +02"),
            ),
            // New York spring forward 2026-03-08 02:00 EST -> 03:00 EDT.
            (
                "America/New_York",
                "2026-03-08T00:00",
                "01:00-02:30",
                false,
                Some("2026-03-08T01:00:00 -05"),
            ),
            (
                "America/New_York",
                "2026-03-08T01:30",
                "01:00-02:30",
                false,
                Some("2026-03-08T03:00:00 -04"),
            ),
            // New York fall back 2026-11-01 02:00 EDT -> 01:00 EST.
            (
                "America/New_York",
                "2026-10-31T23:00",
                "22:00-06:00",
                false,
                Some("2026-11-01T06:00:00 -05"),
            ),
        ];
        for (zone, now, hours, weekends, want) in cases {
            let (tz, t) = at(zone, now);
            let h = parse_hours(hours).unwrap();
            let got = next_change(h, *weekends, &tz, t).map(|ts| local(&tz, ts));
            assert_eq!(
                got.as_deref(),
                *want,
                "{zone} {now} {hours} weekends={weekends}"
            );
        }
    }

    #[test]
    fn fall_back_repeats_an_hour_in_both_offsets() {
        // 02:30-03:00 on the fall-back day is in force during both 02:30s.
        let (tz, t) = at("Europe/Berlin", "2026-10-25T02:45");
        let h = parse_hours("02:30-03:00").unwrap();
        assert!(active(h, false, &tz, t));
        let end = next_change(h, false, &tz, t).unwrap();
        assert_eq!(local(&tz, end), "2026-10-25T02:00:00 +01");
        let again = next_change(h, false, &tz, end).unwrap();
        assert_eq!(local(&tz, again), "2026-10-25T02:30:00 +01");
    }

    #[test]
    fn next_change_agrees_with_active_minute_by_minute() {
        // Walk two days around each DST change and check that nothing
        // changes between the reported edges.
        for (zone, start) in [
            ("Europe/Berlin", "2026-03-28T00:00"),
            ("Europe/Berlin", "2026-10-24T00:00"),
            ("America/New_York", "2026-03-07T00:00"),
            ("America/New_York", "2026-10-31T00:00"),
        ] {
            for hours in ["22:00-06:00", "02:30-03:00", "01:00-02:30", "always"] {
                let h = parse_hours(hours).unwrap();
                let (tz, mut t) = at(zone, start);
                let end = t + jiff::SignedDuration::from_hours(72);
                let mut state = active(h, true, &tz, t);
                let mut edge = next_change(h, true, &tz, t);
                while t < end {
                    t += jiff::SignedDuration::from_mins(1);
                    let now = active(h, true, &tz, t);
                    if now != state {
                        assert_eq!(edge, Some(t), "{zone} {hours}: change at {t} not predicted");
                        state = now;
                        edge = next_change(h, true, &tz, t);
                    } else if let Some(e) = edge {
                        assert!(
                            e > t,
                            "{zone} {hours}: predicted {e} but nothing changed by {t}"
                        );
                    }
                }
            }
        }
    }
}
