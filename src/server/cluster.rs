//! A node's part in a cluster on PostgreSQL (issue 14, docs/scale-out.md):
//! its heartbeat, which keeps its lease and so its reservations alive, and
//! the reclaiming of what dead nodes held. Nothing runs on SQLite.

use super::Context;
use crate::state::StateError;
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};

/// Runs until aborted.
pub(super) async fn run(ctx: Arc<Context>) {
    let Some(c) = ctx.state.cluster().cloned() else {
        return;
    };
    // A quarter lease: a renewal later than that is refused (`Cluster::
    // heartbeat`), so two missed beats in a row still keep the lease.
    let beat = (c.lease() / 4).max(Duration::from_millis(250));
    let mut tick = tokio::time::interval(beat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut beats: u64 = 0;
    let mut down = false;
    loop {
        tick.tick().await;
        beats += 1;
        match c.heartbeat().await {
            Ok(true) => {
                if down {
                    info!(node = %c.node(), "the state database answers again; this node's lease is renewed");
                    down = false;
                }
            }
            Ok(false) => {
                warn!(node = %c.node(), "this node's lease had run out (its heartbeat was late): its reservations were dropped, so uploads in flight may fail; the lease is taken again");
                down = false;
            }
            Err(e @ StateError::Inconsistent(_)) => {
                // Another process serves under this node name; two would
                // share its temporary files and reservations.
                error!(node = %c.node(), error = %e, "stopping");
                std::process::exit(1);
            }
            Err(e) => {
                if !down {
                    warn!(node = %c.node(), error = %e, "the heartbeat cannot reach the state database; reservations wait, and aggregate caps fall back to cap ÷ server.cluster.nodes");
                }
                down = true;
                metrics::counter!(crate::metrics::CLUSTER_HEARTBEAT_FAILED).increment(1);
                continue;
            }
        }
        // Reclaiming once a lease is enough: holds of a dead node stopped
        // counting when its lease ran out; this only deletes their rows.
        if beats % 4 == 0 {
            match c.reclaim().await {
                Ok(0) => {}
                Ok(n) => info!(
                    holds = n,
                    "reclaimed the reservations of nodes whose lease ran out"
                ),
                Err(e) => warn!(error = %e, "reclaiming dead nodes' reservations failed"),
            }
        }
    }
}
