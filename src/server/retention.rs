//! `--retain-days`: stored sessions nobody wrote to for that long are deleted, at start and
//! then hourly. Sessions in memory are kept whatever their age: someone is in them.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::session::Registry;

/// Time between two sweeps.
const SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// Sweeps until `shutdown`.
pub async fn run(registry: Arc<Registry>, retain: Duration, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(SWEEP_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => sweep(&registry, retain).await,
        }
    }
}

async fn sweep(registry: &Registry, retain: Duration) {
    let cutoff = SystemTime::now()
        .checked_sub(retain)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let live = registry
        .handles()
        .iter()
        .map(|h| h.id.to_string())
        .collect();
    match registry.store().remove_untouched(cutoff, live).await {
        Ok(removed) if removed.is_empty() => {}
        Ok(removed) => info!(
            sessions = removed.len(),
            retain_days = retain.as_secs_f64() / 86_400.0,
            "deleted sessions untouched for longer than --retain-days"
        ),
        Err(e) => warn!(error = %e, "retention sweep failed"),
    }
}
