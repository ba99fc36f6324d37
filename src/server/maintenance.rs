//! The daemon's housekeeping: refusals noted in memory are written once a
//! second and session starts ten times a second (when admin commands'
//! client moves and removals are applied too), expired penalties are
//! swept, and old history is pruned daily
//! (CONFIG.md `[server.retention]`).

use super::Context;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// How often noted refusals are written and penalties swept.
pub const TICK: Duration = Duration::from_secs(1);
/// How often noted session starts are written.
pub const STARTS_TICK: Duration = Duration::from_millis(100);
/// How often history is pruned.
pub const PRUNE_EVERY: Duration = Duration::from_secs(86_400);
/// How long one node's claim of a day's pruning runs (PostgreSQL): longer
/// than any pruning pass, shorter than a day.
pub const PRUNE_CLAIM: Duration = Duration::from_secs(3 * 3600);
/// The first pruning pass runs this long after start, off the start-up path.
pub const FIRST_PRUNE: Duration = Duration::from_secs(60);
/// How often today's usage snapshot (the console's charts) is refreshed;
/// the last one of a day stands for it.
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(600);

/// Runs until aborted.
pub(super) async fn run(ctx: Arc<Context>) {
    let prune = tokio::spawn(prune_daily(ctx.clone()));
    let _abort = AbortOnDrop(prune);
    let snapshots = tokio::spawn(snapshot_usage(ctx.clone()));
    let _abort_snapshots = AbortOnDrop(snapshots);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut starts = tokio::time::interval(STARTS_TICK);
    starts.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = starts.tick() => {
                if let Err(e) = ctx.state.flush_session_starts().await {
                    warn!(error = %e, "recording session starts failed; they are kept for the next try");
                }
                super::requests::serve(&ctx).await;
                continue;
            }
        }
        if let Err(e) = ctx.state.flush_refusals().await {
            warn!(error = %e, "writing refusals failed; they are kept for the next try");
        }
        ctx.limits.sweep(tokio::time::Instant::now());
    }
}

pub(super) struct AbortOnDrop(pub(super) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps today's row of each customer's daily usage current. On several
/// nodes each writes the same figures (the committed usage is shared).
async fn snapshot_usage(ctx: Arc<Context>) {
    let mut tick = tokio::time::interval(SNAPSHOT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = crate::clock::now();
        let tz = ctx.cfg.load().server.timezone.clone();
        let day = tz.to_datetime(now).date().to_string();
        if let Err(e) = ctx.state.snapshot_usage(&day, now).await {
            warn!(error = %e, "recording today's usage snapshot failed; trying again later");
        }
    }
}

async fn prune_daily(ctx: Arc<Context>) {
    tokio::time::sleep(FIRST_PRUNE).await;
    loop {
        let retention = ctx.cfg.load().server.retention;
        let now = crate::clock::now();
        // On several nodes, one prunes each day (`Cluster::claim_run`).
        let claim = match ctx.state.cluster() {
            None => None,
            Some(c) => {
                let day = now.strftime("%Y-%m-%d").to_string();
                match c.claim_run("prune", &day, PRUNE_CLAIM).await {
                    Ok(Some(claim)) => Some((c.clone(), claim)),
                    Ok(None) => {
                        tokio::time::sleep(PRUNE_EVERY).await;
                        continue;
                    }
                    Err(e) => {
                        warn!(error = %e, "claiming today's pruning failed; trying again tomorrow");
                        tokio::time::sleep(PRUNE_EVERY).await;
                        continue;
                    }
                }
            }
        };
        let pruned = ctx.state.prune(&retention, now).await;
        match &pruned {
            Ok(p) => {
                metrics::counter!(crate::metrics::PRUNED_ROWS).increment(p.total());
                if p.total() > 0 {
                    info!(
                        refusals = p.refusals,
                        sessions = p.sessions,
                        client_events = p.client_events,
                        sent_mail = p.sent_mail,
                        alerts = p.alerts,
                        usage_snapshots = p.usage,
                        "pruned old history"
                    );
                }
            }
            Err(e) => warn!(error = %e, "pruning old history failed; trying again tomorrow"),
        }
        // A failed pass is not done: another node may take the day over
        // once the claim runs out.
        if let Some((c, claim)) = claim.filter(|_| pruned.is_ok())
            && let Err(e) = c.finish_run_now(&claim).await
        {
            warn!(error = %e, "recording today's pruning as done failed");
        }
        tokio::time::sleep(PRUNE_EVERY).await;
    }
}
