//! The wall clock the daemon and the commands read.
//!
//! `TOLLGATE_FAKE_NOW=<RFC 3339 instant>` starts the process's clock at that
//! instant, and it runs on from there at the real pace. Tests use it to put
//! sessions, licence months and report periods at chosen instants without
//! waiting, and an operator can use it to rehearse reports on a copy of the
//! state. Everything that stamps or judges time (sessions, MCAL months,
//! throttle windows, report periods, alerts) reads this clock.

use jiff::{SignedDuration, Timestamp};
use std::sync::OnceLock;

/// The variable that shifts the clock.
pub const FAKE_NOW: &str = "TOLLGATE_FAKE_NOW";

static OFFSET: OnceLock<SignedDuration> = OnceLock::new();

fn offset() -> SignedDuration {
    *OFFSET.get_or_init(|| {
        std::env::var(FAKE_NOW)
            .ok()
            .and_then(|v| v.parse::<Timestamp>().ok())
            .map(|fake| fake.duration_since(Timestamp::now()))
            .unwrap_or(SignedDuration::ZERO)
    })
}

/// Now, shifted when `TOLLGATE_FAKE_NOW` is set.
pub fn now() -> Timestamp {
    Timestamp::now() + offset()
}

/// Whether the clock is shifted (the daemon logs it at start).
pub fn is_shifted() -> bool {
    offset() != SignedDuration::ZERO
}
