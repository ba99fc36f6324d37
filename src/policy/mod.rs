//! The product's decisions as pure functions: "may this client in?"
//! (admission), "what rate now?" (throttle resolution and aggregate caps),
//! and the space and MCAL arithmetic behind quotas and snapshots.
//!
//! Nothing here does I/O or reads a clock: every function takes the config,
//! a snapshot of what `state` knows and an instant. That keeps each decision
//! testable with a table of cases, and lets `state` run it inside the very
//! transaction that applies it.

pub mod admission;
pub mod period;
pub mod shares;
pub mod space;
pub mod throttle;
pub mod window;

pub use admission::{Admitted, Hello, Intent, RejectCode, Rejection, Snapshot, admit};
pub use space::{Month, Node, Usage};
pub use throttle::{Level, RateDecision};
