//! The writer task: drains the queue and commits each batch in one
//! transaction (group commit), acknowledging every write after the commit.
//! When PostgreSQL cannot be reached, the batch's usage appends go to the
//! local spool (acknowledged once fsync'd there) and its admin writes fail
//! with `Unavailable`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Client;
use tokio::sync::mpsc;

use super::super::{Ack, Committed, StoreError, UsageCounts, Write};
use super::spool::SpooledEvent;
use super::{LOCK_CHANGES, LOCK_EVENTS, Shared, apply, client, pg_error};

/// The most writes one transaction takes; more wait for the next.
const MAX_BATCH: usize = 4096;
/// A batch that has not committed by then is treated as an outage (its
/// usage appends are spooled; a commit that did land makes their later
/// delivery insert nothing).
const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) enum Job {
    Write(Write, Ack),
    Close(std::sync::mpsc::Sender<()>),
}

pub(super) async fn run(shared: Arc<Shared>, mut jobs: mpsc::UnboundedReceiver<Job>) {
    while let Some(first) = jobs.recv().await {
        let mut closed = None;
        let mut batch = Vec::new();
        let mut next = Some(first);
        while let Some(job) = next {
            match job {
                Job::Write(w, ack) => batch.push((w, ack)),
                Job::Close(done) => closed = Some(done),
            }
            next = if batch.len() < MAX_BATCH {
                jobs.try_recv().ok()
            } else {
                None
            };
        }
        if !batch.is_empty() {
            commit_batch(&shared, batch).await;
        }
        if let Some(done) = closed {
            let _ = done.send(());
            return;
        }
    }
}

/// Each write's result, the accounts the batch changed, and those of them
/// changed by admin writes (not usage appends).
type BatchOutcome = (
    Vec<Result<Committed, StoreError>>,
    BTreeSet<String>,
    BTreeSet<String>,
);

async fn commit_batch(shared: &Shared, batch: Vec<(Write, Ack)>) {
    let outcome = if shared.recently_down() {
        // Each try during an outage may wait for a connect timeout; spool
        // at once and leave probing to the spool's delivery.
        Err(StoreError::Unavailable {
            reason: "PostgreSQL is unreachable".into(),
            retryable: true,
        })
    } else {
        match tokio::time::timeout(COMMIT_TIMEOUT, try_commit(shared, &batch)).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable {
                reason: "PostgreSQL did not answer in time".into(),
                retryable: true,
            }),
        }
    };
    match outcome {
        Ok((results, _, admin_changed)) => {
            shared.mark_available();
            // Before the acks: the caller applies its change to memory
            // after its ack, and no refresh read earlier may undo it.
            shared.note_local_changes(&admin_changed);
            // One wake per waiting worker, not one per task.
            super::super::ack::send_all(batch.into_iter().map(|(_, ack)| ack).zip(results));
        }
        Err(e @ StoreError::Unavailable { .. }) => {
            shared.mark_down(&e);
            spool_or_fail(shared, batch, e).await;
        }
        Err(e) => {
            tracing::error!(error = %e, "store commit failed");
            for (_, ack) in batch {
                ack.send(Err(e.clone()));
            }
        }
    }
}

/// During an outage: usage appends are made durable in the spool and
/// acknowledged; admin writes fail (nothing was changed, or, if the commit
/// landed unseen, the change feed still announces it).
async fn spool_or_fail(shared: &Shared, batch: Vec<(Write, Ack)>, e: StoreError) {
    let mut spooled = Vec::new();
    let mut acks = Vec::new();
    for (write, ack) in batch {
        match write {
            Write::AppendUsage {
                event,
                json,
                package,
                month,
                idempotency,
                job,
            } => {
                spooled.push(SpooledEvent {
                    id: event.id,
                    account: event.subject,
                    time: event.time,
                    charged_to: event.data.charged_to,
                    json,
                    package,
                    month,
                    idempotency,
                    job,
                });
                acks.push(ack);
            }
            _ => {
                ack.send(Err(e.clone()));
            }
        }
    }
    if spooled.is_empty() {
        return;
    }
    let result = shared.spool.lock().await.append(&spooled);
    match result {
        Ok(()) => {
            for ack in acks {
                ack.send(Ok(Committed::Usage {
                    seq: None,
                    fell_through: None,
                }));
            }
        }
        Err(io) => {
            tracing::error!(error = %io, "usage spool append failed; tasks are not charged");
            for ack in acks {
                ack.send(Err(StoreError::Unavailable {
                    reason: format!("PostgreSQL unreachable and the spool failed: {io}"),
                    retryable: false,
                }));
            }
        }
    }
}

async fn try_commit(shared: &Shared, batch: &[(Write, Ack)]) -> Result<BatchOutcome, StoreError> {
    let mut client = client(&shared.pool).await?;
    match run_batch(&mut client, batch, false).await? {
        Some(done) => Ok(done),
        None => run_batch(&mut client, batch, true)
            .await?
            .ok_or_else(|| StoreError::Internal("an isolated batch did not finish".into())),
    }
}

/// Runs the batch in one transaction. With `isolate`, each write gets its
/// own savepoint so a failing one fails alone; without, the first failure
/// abandons the transaction (returns `None`) so the caller redoes the batch
/// isolated: savepoints cost two round trips a write, so the common
/// all-good batch goes without. An outage fails the whole batch (`Err`).
async fn run_batch(
    client: &mut Client,
    batch: &[(Write, Ack)],
    isolate: bool,
) -> Result<Option<BatchOutcome>, StoreError> {
    let tx = client.transaction().await.map_err(pg_error)?;
    let has_usage = batch
        .iter()
        .any(|(w, _)| matches!(w, Write::AppendUsage { .. }));
    let has_admin = batch
        .iter()
        .any(|(w, _)| !matches!(w, Write::AppendUsage { .. }));
    // Gap-free cursors with many writers: nextval alone hands out numbers
    // in call order, not commit order, so a reader could see seq 8 before
    // another replica commits seq 7 and skip it for good. Holding one lock
    // from before the first nextval to the commit makes seq order commit
    // order. The same for the change feed's rows. Always events first, then
    // changes, so two batches never wait on each other in a cycle.
    if has_usage {
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_EVENTS])
            .await
            .map_err(pg_error)?;
    }
    if has_admin {
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_CHANGES])
            .await
            .map_err(pg_error)?;
    }
    let mut results = Vec::with_capacity(batch.len());
    let mut changed = BTreeSet::new();
    let mut admin_changed = BTreeSet::new();
    let mut counts = UsageCounts::default();
    for (write, _) in batch {
        if isolate {
            tx.batch_execute("SAVEPOINT w").await.map_err(pg_error)?;
        }
        // Isolated, a write's counts wait for its savepoint's release; in
        // one transaction they go straight to the batch's.
        let mut counted = UsageCounts::default();
        let into = if isolate { &mut counted } else { &mut counts };
        match apply::apply(&tx, write, into).await {
            Ok((committed, accounts)) => {
                if isolate {
                    tx.batch_execute("RELEASE SAVEPOINT w")
                        .await
                        .map_err(pg_error)?;
                    counts.merge(counted);
                }
                results.push(Ok(committed));
                if !matches!(write, Write::AppendUsage { .. }) {
                    admin_changed.extend(accounts.iter().cloned());
                }
                changed.extend(accounts);
            }
            Err(e @ StoreError::Unavailable { .. }) => return Err(e),
            Err(e) => {
                if !isolate {
                    // Dropping `tx` rolls the whole batch back.
                    return Ok(None);
                }
                tx.batch_execute("ROLLBACK TO SAVEPOINT w")
                    .await
                    .map_err(pg_error)?;
                results.push(Err(e));
            }
        }
    }
    // Not one write's failure: the batch fails (or is spooled) whole.
    apply::write_counts(&tx, &counts)
        .await
        .map_err(|e| match e {
            e @ StoreError::Unavailable { .. } => e,
            other => StoreError::Internal(other.to_string()),
        })?;
    if !changed.is_empty() {
        let accounts: Vec<&String> = changed.iter().collect();
        tx.execute(
            "INSERT INTO changes(account) SELECT unnest($1::text[])",
            &[&accounts],
        )
        .await
        .map_err(pg_error)?;
        // Delivered at commit; the feed's poll is the safety net.
        tx.batch_execute("NOTIFY tollgate_changes")
            .await
            .map_err(pg_error)?;
    }
    tx.commit().await.map_err(pg_error)?;
    Ok(Some((results, changed, admin_changed)))
}
