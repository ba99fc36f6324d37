//! Tollgate guards a multi-tenant backup server: it decides which backup
//! clients may connect, how fast they may upload, and how much they may
//! store, for a hierarchy of server, resellers, customers and clients.
//!
//! Modules, one concern each:
//! - [`config`]: the TOML file of CONFIG.md, parsed and validated into a
//!   typed model, with every error located.
//! - [`policy`]: pure decisions (admission, throttle resolution, aggregate
//!   caps, space and MCAL arithmetic); no I/O.
//! - [`state`]: what tollgate remembers (clients, file index, usage,
//!   reservations, MCAL debits, sessions, refusals) on SQLite via sqlx.
//! - [`reports`]: e-mail reports and alerts, the outbox and its delivery.
//! - [`storage`]: files on disk, the crash-safe commit, per-path locks.
//! - [`limits`]: what a peer may cost before it proves anything: per-source
//!   penalties, connections per source, the argon2 pool.
//! - [`wire`]: frames, the codec and the JSON bodies of PROTOCOL.md.
//! - [`tls`]: certificates, the self-signed pair, ALPN, pinning.
//! - [`server`]: the listener, one task per session, shutdown.
//! - [`metrics`]: Prometheus `/metrics` and `/healthz`.
//! - [`throttle`]: per-session token buckets and shared aggregate caps.
//! - [`client`]: the reference client.
//! - [`clock`]: the wall clock, which tests may shift.
//! - [`cli`]: the `tollgate` subcommands built on the above.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod reports;
pub mod server;
pub mod state;
pub mod storage;
pub mod throttle;
pub mod tls;
pub mod web;
pub mod wire;
