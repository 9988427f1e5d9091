//! Delivers the spool to PostgreSQL once it is reachable again: each event
//! exactly once (`ON CONFLICT (id) DO NOTHING`, the charge and counters only
//! when the insert happened), then clears the spool.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::super::{StoreError, UsageCounts};
use super::{LOCK_EVENTS, Shared, apply, client, pg_error};

/// How often delivery is tried while events wait: well within SPEC §8.7's
/// 30 s of PostgreSQL being back.
const RETRY_EVERY: Duration = Duration::from_secs(1);
const CHUNK: usize = 500;

pub(super) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = shared.spool_wake.notified() => {}
            _ = tokio::time::sleep(RETRY_EVERY) => {}
            _ = stop.cancelled() => return,
        }
        if shared.spool.count() > 0 {
            let _ = deliver(&shared).await;
        }
    }
}

/// One delivery attempt of everything spooled.
pub(super) async fn deliver(shared: &Shared) -> Result<u64, StoreError> {
    // Reach PostgreSQL before taking the spool's lock: the writer appends
    // under the same lock, and while PostgreSQL is down each attempt here
    // would otherwise hold it for a whole connect timeout, stalling every
    // success behind it.
    drop(client(&shared.pool).await?);
    let locked = shared.spool.lock().await;
    let events = locked
        .read()
        .map_err(|e| StoreError::Internal(format!("usage spool: {e}")))?;
    if events.is_empty() {
        let _ = locked.clear();
        return Ok(0);
    }
    let mut delivered = 0u64;
    for chunk in events.chunks(CHUNK) {
        match deliver_chunk(shared, chunk).await {
            Ok(n) => delivered += n,
            Err(e) => {
                tracing::debug!(error = %e, "spooled usage events not delivered yet");
                return Err(e);
            }
        }
    }
    // Only now: a crash before this line redelivers, which inserts nothing.
    locked
        .clear()
        .map_err(|e| StoreError::Internal(format!("usage spool: {e}")))?;
    shared.mark_available();
    tracing::info!(
        events = events.len(),
        inserted = delivered,
        "spooled usage events delivered to PostgreSQL"
    );
    Ok(delivered)
}

async fn deliver_chunk(
    shared: &Shared,
    chunk: &[super::spool::SpooledEvent],
) -> Result<u64, StoreError> {
    let mut client = client(&shared.pool).await?;
    let tx = client.transaction().await.map_err(pg_error)?;
    // The same lock as the writer's: seq order stays commit order.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_EVENTS])
        .await
        .map_err(pg_error)?;
    let mut inserted = 0;
    let mut counts = UsageCounts::default();
    for e in chunk {
        if apply::append_usage(&tx, &e.row(), true, &mut counts)
            .await?
            .0
            .is_some()
        {
            inserted += 1;
        }
    }
    apply::write_counts(&tx, &counts).await?;
    tx.commit().await.map_err(pg_error)?;
    Ok(inserted)
}
