//! The writer thread: group commits, and acknowledgements (and change-feed
//! announcements) after the fsync.

use std::sync::mpsc;

use rusqlite::Connection;
use tokio::sync::broadcast;

use super::super::{Ack, Change, Committed, StoreError, UsageCounts, Write};
use super::{WriterMsg, apply, internal};

/// The most writes one transaction takes; more wait for the next.
const MAX_BATCH: usize = 4096;

pub(super) fn run(
    conn: Connection,
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
            let (n, started) = (batch.len(), std::time::Instant::now());
            commit_batch(&conn, &changes, batch);
            tracing::debug!(
                writes = n,
                took_us = started.elapsed().as_micros() as u64,
                "group commit"
            );
        }
        if closing {
            return;
        }
    }
}

/// Runs one of the writer's fixed statements (a transaction's or a
/// savepoint's), prepared once.
fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// The batch's transaction, its BEGIN and COMMIT prepared once: rusqlite's
/// `Transaction` runs them through `execute_batch`, which parses the SQL
/// again for every batch (about 5,000 instructions a commit, 2 % of a
/// task, `cargo bench --bench instructions`). Rolled back on drop unless
/// committed, as `Transaction` is.
struct Tx<'c> {
    conn: &'c Connection,
    open: bool,
}

impl<'c> Tx<'c> {
    /// IMMEDIATE: the write lock is taken (waiting up to the busy timeout)
    /// at BEGIN. A deferred transaction whose first statement reads (a
    /// job's submit counts its account's pending jobs) would otherwise fail
    /// with SQLITE_BUSY_SNAPSHOT when the checkpointer resets the WAL
    /// between that read and the first write.
    fn begin(conn: &'c Connection) -> rusqlite::Result<Self> {
        exec(conn, "BEGIN IMMEDIATE")?;
        Ok(Self { conn, open: true })
    }

    fn commit(mut self) -> rusqlite::Result<()> {
        exec(self.conn, "COMMIT")?;
        self.open = false;
        Ok(())
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if self.open {
            let _ = exec(self.conn, "ROLLBACK");
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
    conn: &Connection,
    batch: &[(Write, Ack)],
    isolate: bool,
) -> rusqlite::Result<Option<BatchOutcome>> {
    let mut results = Vec::with_capacity(batch.len());
    let mut changed = Vec::new();
    let mut counters = UsageCounts::default();
    let tx = Tx::begin(conn)?;
    for (write, _) in batch {
        if isolate {
            exec(conn, "SAVEPOINT write")?;
            let mut counted = UsageCounts::default();
            match apply::apply(conn, write, &mut counted) {
                Ok((committed, accounts)) => {
                    exec(conn, "RELEASE write")?;
                    counters.merge(counted);
                    results.push(Ok(committed));
                    changed.extend(accounts);
                }
                Err(e) => {
                    exec(conn, "ROLLBACK TO write")?;
                    exec(conn, "RELEASE write")?;
                    results.push(Err(e));
                }
            }
        } else {
            match apply::apply(conn, write, &mut counters) {
                Ok((committed, accounts)) => {
                    results.push(Ok(committed));
                    changed.extend(accounts);
                }
                // Dropping `tx` rolls the whole batch back.
                Err(_) => return Ok(None),
            }
        }
    }
    apply::write_counts(conn, &counters)?;
    tx.commit()?;
    Ok(Some((results, changed)))
}

fn commit_batch(conn: &Connection, changes: &broadcast::Sender<Change>, batch: Vec<(Write, Ack)>) {
    let outcome = match run_batch(conn, &batch, false) {
        Ok(None) => {
            run_batch(conn, &batch, true).map(|r| r.expect("isolated batches always finish"))
        }
        Ok(Some(done)) => Ok(done),
        Err(e) => Err(e),
    };
    match outcome {
        Ok((results, changed)) => {
            // One wake per waiting worker, not one per task.
            super::super::ack::send_all(batch.into_iter().map(|(_, ack)| ack).zip(results));
            for account in changed {
                // No subscriber is fine: one node applies its own changes.
                let _ = changes.send(Change::Account(account));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "store commit failed");
            super::super::ack::send_all(batch.into_iter().map(|(_, ack)| (ack, Err(internal(&e)))));
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot;

    use super::*;

    fn mark(name: &str, seq: u64) -> Write {
        Write::SetWatermark {
            name: name.into(),
            seq,
        }
    }

    /// The batch redone with a savepoint per write: the failing write's
    /// ack says why, the others commit, and no transaction is left open.
    #[test]
    fn a_failing_write_fails_alone_and_the_rest_of_its_batch_commits() {
        let dir = tempfile::tempdir().unwrap();
        let conn = super::super::open_connection(&dir.path().join("t.db")).unwrap();
        conn.execute_batch(super::super::SCHEMA).unwrap();
        conn.execute_batch(super::super::jobs::SCHEMA).unwrap();
        let (changes, _) = broadcast::channel(16);
        let missing = Write::StartJob {
            id: "job_missing".into(),
            at: jiff::Timestamp::UNIX_EPOCH,
        };
        let mut acks = Vec::new();
        let batch = [mark("a", 7), missing, mark("b", 9)]
            .into_iter()
            .map(|w| {
                let (tx, rx) = oneshot::channel();
                acks.push(rx);
                (w, Ack::new(tx))
            })
            .collect();
        commit_batch(&conn, &changes, batch);
        let results: Vec<_> = acks
            .into_iter()
            .map(|mut rx| rx.try_recv().expect("every write is answered"))
            .collect();
        assert!(results[0].is_ok(), "{:?}", results[0]);
        assert!(
            matches!(results[1], Err(StoreError::NotFound(_))),
            "{:?}",
            results[1]
        );
        assert!(results[2].is_ok(), "{:?}", results[2]);
        assert!(conn.is_autocommit(), "no transaction left open");
        let stored = |name: &str| -> i64 {
            conn.query_row(
                "SELECT value FROM meta WHERE key = ?1",
                [format!("watermark:{name}")],
                |r| r.get(0),
            )
            .unwrap()
        };
        assert_eq!((stored("a"), stored("b")), (7, 9));
        // The next batch begins and commits as usual.
        let (tx, mut rx) = oneshot::channel();
        commit_batch(&conn, &changes, vec![(mark("a", 8), Ack::new(tx))]);
        assert!(rx.try_recv().unwrap().is_ok());
        assert_eq!(stored("a"), 8);
    }
}
