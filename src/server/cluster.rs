//! A node's part in a cluster on PostgreSQL (issue 14, docs/scale-out.md):
//! its heartbeat, which keeps its lease and so its reservations alive; the
//! reclaiming of what dead nodes held; and its shares of the aggregate
//! caps its sessions are under. Nothing runs on SQLite.

use super::Context;
use crate::policy::space::Node;
use crate::state::StateError;
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};

/// How often a node asks for its shares of the caps its sessions are
/// under.
pub const SHARE_EVERY: Duration = Duration::from_secs(1);
/// How long a granted share runs unless asked for again: three asks, so
/// one late or lost ask keeps it.
pub const SHARE_LEASE: Duration = Duration::from_secs(3);

/// Runs until aborted.
pub(super) async fn run(ctx: Arc<Context>) {
    let Some(c) = ctx.state.cluster().cloned() else {
        return;
    };
    ctx.throttles.cluster(ctx.cfg.load().server.cluster.nodes);
    let shares = tokio::spawn(share_caps(ctx.clone(), c.clone()));
    let _shares = super::maintenance::AbortOnDrop(shares);
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

/// The name a cap goes by in `cap_shares`: the same on every node.
fn cap_name(cfg: &crate::config::Config, node: Node) -> String {
    match node {
        Node::Server => "server".into(),
        Node::Reseller(r) => format!("reseller:{}", cfg.reseller(r).name.to_lowercase()),
        Node::Customer(c) => format!("customer:{}", cfg.customer(c).name.to_lowercase()),
    }
}

/// Every [`SHARE_EVERY`], asks for this node's share of each cap it has
/// sessions under (`Cluster::refresh_share`, the Doorman way) and sets
/// the cap's bucket to it. A cap this node has no sessions under is not
/// asked for: its grant runs out and the other nodes take it. When the
/// database cannot be reached, a cap falls back to cap ÷
/// `server.cluster.nodes`.
async fn share_caps(ctx: Arc<Context>, c: crate::state::postgres::Cluster) {
    let mut tick = tokio::time::interval(SHARE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut asked: Vec<Node> = Vec::new();
    loop {
        tick.tick().await;
        let cfg = ctx.cfg.load_full();
        ctx.throttles.cluster(cfg.server.cluster.nodes);
        let live = ctx.throttles.live_caps();
        // Shares of caps without sessions here lapse; a session that
        // comes back starts at the fallback until the next ask.
        for n in asked.iter().filter(|n| !live.iter().any(|(l, _)| l == *n)) {
            ctx.throttles.set_share(*n, None);
        }
        asked = live.iter().map(|(n, _)| *n).collect();
        for (node, rate) in live {
            let name = cap_name(&cfg, node);
            // A node under a cap wants all of it: the cap is split evenly
            // among the nodes with sessions under it.
            // An answer later than half a grant would be used past its
            // expiry: fall back instead.
            let asked = tokio::time::timeout(
                SHARE_LEASE / 2,
                c.refresh_share(&name, rate, rate, SHARE_LEASE),
            )
            .await
            .unwrap_or_else(|_| {
                Err(StateError::Inconsistent(
                    "no answer within half a grant".into(),
                ))
            });
            match asked {
                Ok(share) => ctx.throttles.set_share(node, Some(share.granted)),
                Err(e) => {
                    warn!(cap = %name, error = %e, "asking for this node's share of an aggregate cap failed; it falls back to cap ÷ server.cluster.nodes");
                    ctx.throttles.set_share(node, None);
                }
            }
        }
    }
}
