//! Client moves and removals, applied beside the reservations of uploads in
//! flight: by the daemon for an admin command's request, or by the command
//! itself when no daemon runs (`state::requests`).

use super::Context;
use crate::config::Config;
use crate::state::requests::{Change, Outcome};
use crate::state::{State, StateError};
use crate::storage;
use jiff::Timestamp;
use tracing::{info, warn};

/// Runs file work that may take long (a copy across filesystems) without
/// stalling the other tasks of a worker thread.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Applies `change` with `cfg`, moving or deleting the client's files.
pub async fn apply_change(
    st: &State,
    cfg: &Config,
    change: &Change,
    at: Timestamp,
) -> Result<Outcome, StateError> {
    Ok(match change {
        Change::Move { client, to } => {
            let r = st
                .move_client(cfg, client, to, at, |id, from, to| {
                    blocking(|| storage::move_client_files(cfg, id, from, to))
                })
                .await?;
            match r {
                Ok(()) => Outcome::Moved,
                Err(why) => Outcome::Refused {
                    reason: why.to_string(),
                },
            }
        }
        Change::Remove { client, purge } => {
            let r = st
                .remove_client(cfg, client, *purge, at, |id, customer| {
                    blocking(|| storage::purge_client_files(cfg, id, customer))
                })
                .await?;
            match r {
                None => Outcome::NoSuchClient,
                Some(r) => r.into(),
            }
        }
    })
}

/// Applies the admin commands' waiting requests, one by one.
pub(super) async fn serve(ctx: &Context) {
    loop {
        let at = crate::clock::now();
        let req = match ctx.state.claim_request(at).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                warn!(error = %e, "reading the admin commands' requests failed");
                return;
            }
        };
        let cfg = ctx.cfg.load_full();
        let outcome = match apply_change(&ctx.state, &cfg, &req.change, at).await {
            Ok(o) => o,
            Err(e) => {
                warn!(request = req.id, error = %e, "an admin command's change failed");
                Outcome::Failed {
                    error: e.to_string(),
                }
            }
        };
        info!(request = req.id, change = ?req.change, outcome = ?outcome, "applied an admin command's change");
        if let Err(e) = ctx.state.finish_request(req.id, &outcome, at).await {
            warn!(request = req.id, error = %e, "recording an admin command's outcome failed");
        }
    }
}
