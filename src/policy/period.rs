//! Report periods (CONFIG.md "Email reports"): each local day, Monday-to-
//! Sunday week, or calendar month in `server.timezone`, as the half-open
//! instant range `[start, end)` between two local midnights. A day is 23 or
//! 25 hours long across a DST change; the range is still exact.

use crate::config::Frequency;
use jiff::Timestamp;
use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;

/// One period: `[start, end)`, starting at a local midnight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Period {
    /// How long it is.
    pub frequency: Frequency,
    /// Its first local day.
    pub first_day: Date,
    /// The first instant in it.
    pub start: Timestamp,
    /// The first instant after it.
    pub end: Timestamp,
}

/// The local day that starts the period containing `day`.
fn first_day(frequency: Frequency, day: Date) -> Date {
    match frequency {
        Frequency::Daily => day,
        Frequency::Weekly => {
            let back = i64::from(day.weekday().to_monday_zero_offset());
            day.checked_sub(jiff::Span::new().days(back)).unwrap_or(day)
        }
        Frequency::Monthly => day.first_of_month(),
    }
}

/// The first day of the period after the one starting at `first`.
fn following(frequency: Frequency, first: Date) -> Date {
    let span = match frequency {
        Frequency::Daily => jiff::Span::new().days(1),
        Frequency::Weekly => jiff::Span::new().weeks(1),
        Frequency::Monthly => jiff::Span::new().months(1),
    };
    first.checked_add(span).unwrap_or(first)
}

/// Local midnight of `day` (DST gaps at midnight resolve forward).
fn midnight(tz: &TimeZone, day: Date) -> Timestamp {
    tz.to_timestamp(DateTime::from(day))
        .unwrap_or(Timestamp::UNIX_EPOCH)
}

impl Period {
    /// The period that begins on local day `first_day` (already aligned).
    fn starting(frequency: Frequency, tz: &TimeZone, first_day: Date) -> Period {
        Period {
            frequency,
            first_day,
            start: midnight(tz, first_day),
            end: midnight(tz, following(frequency, first_day)),
        }
    }

    /// The period that contains `at`.
    pub fn containing(frequency: Frequency, tz: &TimeZone, at: Timestamp) -> Period {
        let day = tz.to_datetime(at).date();
        Period::starting(frequency, tz, first_day(frequency, day))
    }

    /// The most recent period that has ended by `at`.
    pub fn last_complete(frequency: Frequency, tz: &TimeZone, at: Timestamp) -> Period {
        let current = Period::containing(frequency, tz, at);
        let before = current.start - jiff::SignedDuration::from_secs(1);
        Period::containing(frequency, tz, before)
    }

    /// The period right after this one.
    pub fn next(&self, tz: &TimeZone) -> Period {
        Period::starting(
            self.frequency,
            tz,
            following(self.frequency, self.first_day),
        )
    }

    /// A stable key for "this period was sent": its first local day.
    pub fn key(&self) -> String {
        self.first_day.to_string()
    }

    /// "2026-11-23 – 2026-11-29" (the last day is inclusive for people).
    pub fn label(&self) -> String {
        let last = self
            .first_day
            .checked_add(
                jiff::Span::new().days(
                    following(self.frequency, self.first_day)
                        .since(self.first_day)
                        .map(|s| s.get_days() as i64)
                        .unwrap_or(1)
                        - 1,
                ),
            )
            .unwrap_or(self.first_day);
        if last == self.first_day {
            self.first_day.to_string()
        } else {
            format!("{} – {}", self.first_day, last)
        }
    }
}

/// The periods to send at `now`: every complete period after the one last
/// sent (`last_sent`, its first day). With none sent yet, only the most
/// recent complete period: a report switched on today covers yesterday (or
/// last week or month), not all of history. At most `cap` are returned,
/// oldest first, so a very long outage cannot flood a mailbox.
pub fn due(
    frequency: Frequency,
    tz: &TimeZone,
    last_sent: Option<Date>,
    now: Timestamp,
    cap: usize,
) -> Vec<Period> {
    let last_complete = Period::last_complete(frequency, tz, now);
    let mut p = match last_sent {
        None => return vec![last_complete],
        Some(d) => Period::starting(frequency, tz, first_day(frequency, d)).next(tz),
    };
    let mut out = Vec::new();
    while p.end <= now && out.len() < cap {
        let n = p.next(tz);
        out.push(p);
        p = n;
    }
    // Keep the newest ones when capped.
    if out.len() == cap && p.end <= now {
        let mut newest = Vec::new();
        let mut q = last_complete;
        while newest.len() < cap {
            newest.push(q.clone());
            q = Period::containing(frequency, tz, q.start - jiff::SignedDuration::from_secs(1));
        }
        newest.reverse();
        return newest;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use Frequency::*;

    fn ts(s: &str, tz: &str) -> Timestamp {
        let tz = TimeZone::get(tz).unwrap();
        tz.to_timestamp(s.parse::<DateTime>().unwrap()).unwrap()
    }

    #[test]
    fn periods_run_from_local_midnight_to_local_midnight() {
        // (frequency, zone, instant, start, end), all local.
        let cases = [
            (
                Weekly,
                "Europe/Berlin",
                "2026-11-29T23:59:59",
                "2026-11-23T00:00",
                "2026-11-30T00:00",
            ),
            (
                Weekly,
                "Europe/Berlin",
                "2026-11-30T00:00:00",
                "2026-11-30T00:00",
                "2026-12-07T00:00",
            ),
            (
                Weekly,
                "Europe/Berlin",
                "2026-11-23T00:00:00",
                "2026-11-23T00:00",
                "2026-11-30T00:00",
            ),
            (
                Daily,
                "UTC",
                "2026-02-28T12:00",
                "2026-02-28T00:00",
                "2026-03-01T00:00",
            ),
            (
                Monthly,
                "UTC",
                "2028-02-29T23:59",
                "2028-02-01T00:00",
                "2028-03-01T00:00",
            ),
            (
                Monthly,
                "America/New_York",
                "2026-12-31T23:59:59",
                "2026-12-01T00:00",
                "2027-01-01T00:00",
            ),
            // A 23-hour day and a 25-hour day.
            (
                Daily,
                "Europe/Berlin",
                "2026-03-29T12:00",
                "2026-03-29T00:00",
                "2026-03-30T00:00",
            ),
            (
                Daily,
                "Europe/Berlin",
                "2026-10-25T12:00",
                "2026-10-25T00:00",
                "2026-10-26T00:00",
            ),
        ];
        for (f, zone, at, start, end) in cases {
            let tz = TimeZone::get(zone).unwrap();
            let p = Period::containing(f, &tz, ts(at, zone));
            assert_eq!(p.start, ts(start, zone), "{f:?} {zone} {at}");
            assert_eq!(p.end, ts(end, zone), "{f:?} {zone} {at}");
        }
        let tz = TimeZone::get("Europe/Berlin").unwrap();
        let short = Period::containing(Daily, &tz, ts("2026-03-29T12:00", "Europe/Berlin"));
        assert_eq!(short.end.duration_since(short.start).as_secs(), 23 * 3600);
        let long = Period::containing(Daily, &tz, ts("2026-10-25T12:00", "Europe/Berlin"));
        assert_eq!(long.end.duration_since(long.start).as_secs(), 25 * 3600);
    }

    #[test]
    fn the_last_complete_period_and_labels() {
        let tz = TimeZone::get("Europe/Berlin").unwrap();
        let p = Period::last_complete(Weekly, &tz, ts("2026-11-30T00:00:00", "Europe/Berlin"));
        assert_eq!(p.key(), "2026-11-23");
        assert_eq!(p.label(), "2026-11-23 – 2026-11-29");
        let p = Period::last_complete(Weekly, &tz, ts("2026-11-29T23:59:59", "Europe/Berlin"));
        assert_eq!(p.key(), "2026-11-16");
        let p = Period::last_complete(Monthly, &tz, ts("2026-03-01T00:00:01", "Europe/Berlin"));
        assert_eq!(p.label(), "2026-02-01 – 2026-02-28");
        let p = Period::last_complete(Daily, &tz, ts("2026-03-01T00:00:01", "Europe/Berlin"));
        assert_eq!(p.label(), "2026-02-28");
    }

    #[test]
    fn due_periods_catch_up_once_each() {
        let tz = TimeZone::get("Europe/Berlin").unwrap();
        let now = ts("2026-12-16T10:00", "Europe/Berlin");
        let d = |s: &str| s.parse::<Date>().unwrap();
        // Nothing sent yet: only last week.
        let keys = |v: Vec<Period>| v.iter().map(Period::key).collect::<Vec<_>>();
        assert_eq!(keys(due(Weekly, &tz, None, now, 10)), ["2026-12-07"]);
        // Last sent the week of Nov 23: two weeks were missed.
        assert_eq!(
            keys(due(Weekly, &tz, Some(d("2026-11-23")), now, 10)),
            ["2026-11-30", "2026-12-07"]
        );
        // Up to date: nothing.
        assert!(due(Weekly, &tz, Some(d("2026-12-07")), now, 10).is_empty());
        // Capped: the newest ones.
        assert_eq!(
            keys(due(Daily, &tz, Some(d("2026-12-01")), now, 3)),
            ["2026-12-13", "2026-12-14", "2026-12-15"]
        );
        // Exactly at the end of a period, it is due.
        let edge = ts("2026-11-30T00:00", "Europe/Berlin");
        assert_eq!(
            keys(due(Weekly, &tz, Some(d("2026-11-16")), edge, 10)),
            ["2026-11-23"]
        );
    }
}
