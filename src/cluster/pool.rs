//! What this replica last saw of each account's pool: every script reply
//! carries the pool's counts, stamped with a version the pool bumps on
//! every script, so an older reply processed late never overwrites a newer
//! one.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::coordinator::Coordinator;
use crate::limiter::{GateStats, retry_after_estimate};

#[derive(Debug, Clone, Copy)]
pub(super) struct PoolView {
    version: i64,
    pub(super) stats: GateStats,
    /// Mean task duration across the cluster, for `Retry-After`.
    task: Duration,
    pub(super) touched: Instant,
}

impl PoolView {
    pub(super) fn retry_after(&self) -> Duration {
        retry_after_estimate(self.task, self.stats)
    }
}

fn clamp_u32(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

impl Coordinator {
    /// Records a script's `{version, limit, holders, queued, ewma_ms}`.
    pub(super) fn note_pool(&self, account: &Arc<str>, raw: &[i64]) -> Option<PoolView> {
        let &[version, limit, in_flight, queued, ewma_ms] = raw else {
            tracing::warn!(?raw, "unexpected pool counts from Redis");
            return None;
        };
        let seen = PoolView {
            version,
            stats: GateStats {
                limit: clamp_u32(limit),
                in_flight: clamp_u32(in_flight),
                queued: clamp_u32(queued),
            },
            task: Duration::from_millis(ewma_ms.max(0) as u64),
            touched: Instant::now(),
        };
        let mut entry = self.pools.entry(account.clone()).or_insert(seen);
        if entry.version < version {
            *entry = seen;
        }
        Some(*entry)
    }

    pub(super) fn pool_view(&self, account: &str) -> Option<PoolView> {
        self.pools.get(account).map(|v| *v)
    }

    pub(super) fn retry_after(&self, account: &str) -> Duration {
        self.pool_view(account)
            .map_or(Duration::from_secs(1), |v| v.retry_after())
    }
}
