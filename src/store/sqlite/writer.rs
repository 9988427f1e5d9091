//! The writer thread: group commits, and acknowledgements (and change-feed
//! announcements) after the fsync.

use std::sync::mpsc;

use rusqlite::Connection;
use tokio::sync::broadcast;

use super::super::{Ack, Change, Committed, StoreError, Write};
use super::{WriterMsg, apply, internal};

/// The most writes one transaction takes; more wait for the next.
const MAX_BATCH: usize = 4096;

pub(super) fn run(
    mut conn: Connection,
    writes: mpsc::Receiver<WriterMsg>,
    changes: broadcast::Sender<Change>,
) {
    while let Ok(first) = writes.recv() {
        // The first write wakes this thread, which the kernel tends to run
        // at once, ahead of the runtime worker that holds the other
        // finished tasks: a commit would then carry one or two events and
        // cost its own fsync, WAL frames and locks. Yielding once lets the
        // worker hand over what its round finishes, so one commit carries
        // them all (pinned bench: see BENCHMARKS.md). Where cores are idle
        // the yield returns at once.
        std::thread::yield_now();
        let mut closing = false;
        let mut batch = Vec::new();
        let mut next = Some(first);
        while let Some(job) = next {
            match job {
                WriterMsg::Write(w, ack) => batch.push((w, ack)),
                WriterMsg::Close => closing = true,
            }
            next = if batch.len() < MAX_BATCH {
                writes.try_recv().ok()
            } else {
                None
            };
        }
        if !batch.is_empty() {
            commit_batch(&mut conn, &changes, batch);
        }
        if closing {
            return;
        }
    }
}

/// Each write's result, and the accounts the batch changed.
type BatchOutcome = (Vec<Result<Committed, StoreError>>, Vec<String>);

/// Runs the batch in one transaction. With `isolate`, each write gets its
/// own savepoint so a failing one fails alone; without, the first failure
/// abandons the whole transaction (returns `None`) so the caller can redo
/// the batch isolated. Savepoints cost a statement each way and a copy of
/// every page they touch, so the common all-good batch goes without.
fn run_batch(
    conn: &mut Connection,
    batch: &[(Write, Ack)],
    isolate: bool,
) -> rusqlite::Result<Option<BatchOutcome>> {
    let mut results = Vec::with_capacity(batch.len());
    let mut changed = Vec::new();
    // IMMEDIATE: the write lock is taken (waiting up to the busy timeout)
    // at BEGIN. A deferred transaction whose first statement reads (a job's
    // submit counts its account's pending jobs) would otherwise fail with
    // SQLITE_BUSY_SNAPSHOT when the checkpointer resets the WAL between
    // that read and the first write.
    let mut tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for (write, _) in batch {
        if isolate {
            let mut sp = tx.savepoint()?;
            match apply::apply(&sp, write) {
                Ok((committed, accounts)) => {
                    sp.commit()?;
                    results.push(Ok(committed));
                    changed.extend(accounts);
                }
                Err(e) => {
                    sp.rollback()?;
                    results.push(Err(e));
                }
            }
        } else {
            match apply::apply(&tx, write) {
                Ok((committed, accounts)) => {
                    results.push(Ok(committed));
                    changed.extend(accounts);
                }
                // Dropping `tx` rolls the whole batch back.
                Err(_) => return Ok(None),
            }
        }
    }
    tx.commit()?;
    Ok(Some((results, changed)))
}

fn commit_batch(
    conn: &mut Connection,
    changes: &broadcast::Sender<Change>,
    batch: Vec<(Write, Ack)>,
) {
    let outcome = match run_batch(conn, &batch, false) {
        Ok(None) => {
            run_batch(conn, &batch, true).map(|r| r.expect("isolated batches always finish"))
        }
        Ok(Some(done)) => Ok(done),
        Err(e) => Err(e),
    };
    match outcome {
        Ok((results, changed)) => {
            for ((_, ack), result) in batch.into_iter().zip(results) {
                let _ = ack.send(result);
            }
            for account in changed {
                // No subscriber is fine: one node applies its own changes.
                let _ = changes.send(Change::Account(account));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "store commit failed");
            for (_, ack) in batch {
                let _ = ack.send(Err(internal(&e)));
            }
        }
    }
}
