//! Forgetting expired keys (and finished jobs, `gateway::jobs`): bounded passes in the background, never a scan
//! on a request's path (a request reads one record by its primary key and
//! ignores it if expired).

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::store::{Committed, Store, Write, commit};

/// Between passes.
pub const PURGE_EVERY: Duration = Duration::from_secs(60);
/// Records forgotten per write: one write holds the store's writer only
/// this long.
pub const PURGE_BATCH: u32 = 500;
/// Writes per pass at most: a pass that finds more leaves them to the next.
pub const PURGE_BATCHES_PER_PASS: u32 = 20;

/// One pass: forgets up to `PURGE_BATCH × PURGE_BATCHES_PER_PASS` expired
/// records; returns how many.
pub async fn purge_pass(store: &dyn Store, clock: &dyn Clock) -> u64 {
    purge_pass_with(store, clock, "idempotency keys", &|now, limit| {
        Write::PurgeIdempotency {
            before_ms: now.as_millisecond(),
            limit,
        }
    })
    .await
}

/// One bounded pass of the purge `make` writes (given the time and a
/// batch size): expired idempotency keys, finished jobs.
pub async fn purge_pass_with(
    store: &dyn Store,
    clock: &dyn Clock,
    what: &str,
    make: &(dyn Fn(Timestamp, u32) -> Write + Send + Sync),
) -> u64 {
    let mut total = 0;
    for _ in 0..PURGE_BATCHES_PER_PASS {
        match commit(store, make(clock.now(), PURGE_BATCH)).await {
            Ok(Committed::Purged(n)) => {
                total += n;
                if n < u64::from(PURGE_BATCH) {
                    break;
                }
            }
            Ok(_) => break,
            Err(e) => {
                tracing::debug!(error = %e, "expired {what} not purged; the next pass retries");
                break;
            }
        }
    }
    total
}

/// After a pass that reached its bound: more keys expire than a pass a
/// minute forgets (over ~166 keyed tasks a second), so the next pass comes
/// this soon, each still bounded.
pub const PURGE_AGAIN_AFTER_FULL: Duration = Duration::from_secs(1);

/// Runs [`purge_pass`] every [`PURGE_EVERY`] (sooner while passes come
/// back full) until `stop`.
pub async fn run(store: Arc<dyn Store>, clock: Arc<dyn Clock>, stop: CancellationToken) {
    run_with(store, clock, stop, "idempotency keys", |now, limit| {
        Write::PurgeIdempotency {
            before_ms: now.as_millisecond(),
            limit,
        }
    })
    .await;
}

/// The loop of [`run`] for any purge `make` writes.
pub async fn run_with(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    stop: CancellationToken,
    what: &str,
    make: impl Fn(Timestamp, u32) -> Write + Send + Sync,
) {
    let mut pause = PURGE_EVERY;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
        let n = purge_pass_with(&*store, &*clock, what, &make).await;
        pause = if n >= u64::from(PURGE_BATCH * PURGE_BATCHES_PER_PASS) {
            PURGE_AGAIN_AFTER_FULL
        } else {
            PURGE_EVERY
        };
        if n > 0 {
            tracing::debug!(purged = n, "expired {what} forgotten");
        }
    }
}
