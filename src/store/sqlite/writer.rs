//! The writer thread: group commits, acknowledgements after the fsync, and
//! the JSON Lines export of what was committed.

use std::sync::mpsc;

use rusqlite::{Connection, params};

use crate::usage::jsonl::{ExportedEvent, JsonlSink};

use super::super::{Ack, Committed, StoreError, Write};
use super::{Job, apply, internal};

/// The most writes one transaction takes; more wait for the next.
const MAX_BATCH: usize = 4096;

pub(super) fn run(mut conn: Connection, jobs: mpsc::Receiver<Job>, mut sink: JsonlSink) {
    let mut recorded_watermark = sink.exported_up_to();
    while let Ok(first) = jobs.recv() {
        let mut closing = false;
        let mut batch = Vec::new();
        let mut next = Some(first);
        while let Some(job) = next {
            match job {
                Job::Write(w, ack) => batch.push((w, ack)),
                Job::Close => closing = true,
            }
            next = if batch.len() < MAX_BATCH {
                jobs.try_recv().ok()
            } else {
                None
            };
        }
        if !batch.is_empty() {
            commit_batch(&mut conn, &mut sink, &mut recorded_watermark, batch);
        }
        if closing {
            return;
        }
    }
}

/// A committed usage event, for the export.
pub(super) struct Pending {
    pub seq: u64,
    pub time: String,
    pub json: String,
}

/// Each write's result, and the committed events to export.
type BatchOutcome = (Vec<Result<Committed, StoreError>>, Vec<Pending>);

/// Runs the batch in one transaction. With `isolate`, each write gets its
/// own savepoint so a failing one fails alone; without, the first failure
/// abandons the whole transaction (returns `None`) so the caller can redo
/// the batch isolated. Savepoints cost a statement each way and a copy of
/// every page they touch, so the common all-good batch goes without.
fn run_batch(
    conn: &mut Connection,
    batch: &[(Write, Ack)],
    watermark: Option<u64>,
    isolate: bool,
) -> rusqlite::Result<Option<BatchOutcome>> {
    let mut results = Vec::with_capacity(batch.len());
    let mut exported = Vec::new();
    let mut tx = conn.transaction()?;
    for (write, _) in batch {
        if isolate {
            let mut sp = tx.savepoint()?;
            match apply::apply(&sp, write) {
                Ok((committed, pending)) => {
                    sp.commit()?;
                    results.push(Ok(committed));
                    exported.extend(pending);
                }
                Err(e) => {
                    sp.rollback()?;
                    results.push(Err(e));
                }
            }
        } else {
            match apply::apply(&tx, write) {
                Ok((committed, pending)) => {
                    results.push(Ok(committed));
                    exported.extend(pending);
                }
                // Dropping `tx` rolls the whole batch back.
                Err(_) => return Ok(None),
            }
        }
    }
    if let Some(w) = watermark {
        tx.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES ('jsonl_exported_seq', ?1)",
            params![w as i64],
        )?;
    }
    tx.commit()?;
    Ok(Some((results, exported)))
}

fn commit_batch(
    conn: &mut Connection,
    sink: &mut JsonlSink,
    recorded_watermark: &mut u64,
    batch: Vec<(Write, Ack)>,
) {
    let watermark = sink.exported_up_to();
    let changed = (watermark != *recorded_watermark).then_some(watermark);
    let outcome = match run_batch(conn, &batch, changed, false) {
        Ok(None) => run_batch(conn, &batch, changed, true)
            .map(|r| r.expect("isolated batches always finish")),
        Ok(Some(done)) => Ok(done),
        Err(e) => Err(e),
    };
    match outcome {
        Ok((results, exported)) => {
            *recorded_watermark = watermark;
            for ((_, ack), result) in batch.into_iter().zip(results) {
                let _ = ack.send(result);
            }
            let events = exported.iter().map(|p| ExportedEvent {
                seq: p.seq,
                time: &p.time,
                json: &p.json,
            });
            if let Err(e) = sink.append(events) {
                // The events are durable in the database; the export is
                // repaired from it at the next start.
                tracing::error!(error = %e, "usage JSON Lines export failed");
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
