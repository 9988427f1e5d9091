//! The JSON Lines export as a sink tailing the store's event feed: it pages
//! [`Store::usage_events`] after its cursor, appends the lines, fsyncs them,
//! then records the cursor beside the directory (`<dir>.cursor`, e.g.
//! `<data_dir>/usage.cursor`, so the directory holds only the exported
//! files).
//!
//! It tails the feed rather than living in a store's writer so that every
//! store (and every replica sharing one) exports the same way, and so an
//! export failure never slows a commit. The lines may lag the commit by up
//! to [`POLL_EVERY`] plus [`GATHER`]; they are never written twice: the files' last event
//! id is the truth at start (the cursor file only says where to look for
//! it, and is what remains when an operator moved every file away).

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::{Store, StoreError, StoredEvent};

use super::event::EventHead;
use super::jsonl::{ExportedEvent, JsonlSink};

/// The longest the export waits for a new commit before looking anyway
/// (events committed by other replicas, or a missed poke).
pub const POLL_EVERY: Duration = Duration::from_millis(200);
/// After a commit's poke, how long the export lets further commits gather
/// before it reads them: under load a pass then carries hundreds of events
/// (one store read, one `write`, one fsync, one cursor rename) instead of
/// the two or three of one group commit. The events are already durable in
/// the store; only the files' lag grows, by at most this.
const GATHER: Duration = Duration::from_millis(100);
const PAGE: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("usage export files: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("usage export task failed")]
    Task,
}

fn head(e: &StoredEvent) -> Cow<'_, EventHead> {
    e.head().unwrap_or_default()
}

/// `<seq> <id>`: the last exported event.
fn read_cursor(dir: &Path) -> Option<(u64, String)> {
    let text = std::fs::read_to_string(dir.with_extension("cursor")).ok()?;
    let (seq, id) = text.trim().split_once(' ')?;
    Some((seq.parse().ok()?, id.to_string()))
}

fn write_cursor(dir: &Path, seq: u64, id: &str) -> std::io::Result<()> {
    // Write-then-rename, so a crash leaves the old cursor or the new one.
    let tmp = dir.with_extension("cursor.tmp");
    std::fs::write(&tmp, format!("{seq} {id}\n"))?;
    std::fs::rename(tmp, dir.with_extension("cursor"))
}

/// Opens the export and finds where it ends in the feed.
async fn recover(store: &dyn Store, dir: &Path) -> Result<JsonlSink, ExportError> {
    let owned = dir.to_path_buf();
    let (mut sink, last_id) = tokio::task::spawn_blocking(move || JsonlSink::open(&owned))
        .await
        .map_err(|_| ExportError::Task)??;
    let cursor = read_cursor(dir);
    let start = match (last_id, cursor) {
        (Some(id), Some((seq, cid))) if id == cid => seq,
        (Some(id), cursor) => {
            // The files got lines the cursor does not know of (a crash
            // between the fsync and the cursor write, or an export written
            // before the cursor file existed): find that event.
            let from = cursor.as_ref().map_or(0, |c| c.0);
            let mut found = find_seq(store, from, &id).await?;
            if found.is_none() && from > 0 {
                // Files cut back behind the cursor (by hand): look further.
                found = find_seq(store, 0, &id).await?;
            }
            match found {
                Some(seq) => seq,
                None => {
                    tracing::warn!(last_id = %id, "usage export: its last event is not in the store; continuing from the cursor");
                    from
                }
            }
        }
        (None, cursor) => cursor.map_or(0, |c| c.0),
    };
    sink.set_exported_up_to(start);
    Ok(sink)
}

async fn find_seq(store: &dyn Store, mut after: u64, id: &str) -> Result<Option<u64>, StoreError> {
    loop {
        let page = store.usage_events(after, PAGE).await?;
        let Some(last) = page.last() else {
            return Ok(None);
        };
        if let Some(e) = page.iter().find(|e| head(e).id == id) {
            return Ok(Some(e.seq));
        }
        after = last.seq;
    }
}

/// Appends every event after the sink's cursor. The sink moves through
/// the blocking pool for the file I/O; it is `None` afterwards only if that
/// task panicked (the caller then reopens it).
async fn catch_up(
    store: &dyn Store,
    dir: &Path,
    slot: &mut Option<JsonlSink>,
) -> Result<(), ExportError> {
    while let Some(mut sink) = slot.take() {
        let page = match store.usage_events(sink.exported_up_to(), PAGE).await {
            Ok(p) => p,
            Err(e) => {
                *slot = Some(sink);
                return Err(e.into());
            }
        };
        if page.is_empty() {
            *slot = Some(sink);
            return Ok(());
        }
        // A short page reached the end of the feed as it was: stop there
        // rather than chase the few events committed meanwhile (under load
        // that chase never ends and each round trip carries a handful).
        let caught_up = page.len() < PAGE;
        let dir = dir.to_path_buf();
        let (s, r) = tokio::task::spawn_blocking(move || {
            let r = append_page(&mut sink, &dir, &page);
            (sink, r)
        })
        .await
        .map_err(|_| ExportError::Task)?;
        *slot = Some(s);
        r?;
        if caught_up {
            break;
        }
    }
    Ok(())
}

fn append_page(sink: &mut JsonlSink, dir: &Path, page: &[StoredEvent]) -> std::io::Result<()> {
    let heads: Vec<Cow<'_, EventHead>> = page.iter().map(head).collect();
    sink.append(page.iter().zip(&heads).map(|(e, h)| ExportedEvent {
        seq: e.seq,
        id: &h.id,
        time: &h.time,
        json: &e.event,
    }))?;
    sink.sync()?;
    if let Some(id) = sink.last_id() {
        write_cursor(dir, sink.exported_up_to(), id)?;
    }
    Ok(())
}

/// The longest wait between two tries while the store is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Runs the export of `<dir>` until `stop`, then catches up one last time.
/// `committed` is poked after each local commit.
pub async fn run(
    store: Arc<dyn Store>,
    dir: PathBuf,
    committed: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut sink = None;
    // After a failure (the store unreachable), wait this long before the
    // next try instead of retrying on every commit: one log line per try,
    // growing to a few seconds, not one per success.
    let mut backoff = Duration::ZERO;
    loop {
        let stopping = stop.is_cancelled();
        let mut failed = false;
        if sink.is_none() {
            match recover(&*store, &dir).await {
                Ok(s) => sink = Some(s),
                Err(e) => {
                    failed = true;
                    tracing::error!(error = %e, "usage JSON Lines export cannot start; retrying")
                }
            }
        }
        if sink.is_some()
            && let Err(e) = catch_up(&*store, &dir, &mut sink).await
        {
            // The events stay in the store; the next pass retries.
            failed = true;
            tracing::error!(error = %e, "usage JSON Lines export failed; retrying with back-off");
        }
        if stopping {
            return;
        }
        if failed {
            backoff = (backoff * 2).clamp(POLL_EVERY, MAX_BACKOFF);
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => {}
            }
            continue;
        }
        backoff = Duration::ZERO;
        tokio::select! {
            _ = committed.notified() => {}
            _ = tokio::time::sleep(POLL_EVERY) => {}
            _ = stop.cancelled() => continue,
        }
        tokio::select! {
            _ = tokio::time::sleep(GATHER) => {}
            _ = stop.cancelled() => {}
        }
    }
}

/// The running export of `<data_dir>/usage/`.
pub struct ExportTask {
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

/// Starts the export of `<data_dir>/usage/` (what `serve` runs).
pub fn spawn(store: Arc<dyn Store>, data_dir: &Path, committed: Arc<Notify>) -> ExportTask {
    let stop = CancellationToken::new();
    let dir = data_dir.join("usage");
    let handle = tokio::spawn(run(store, dir, committed, stop.clone()));
    ExportTask { stop, handle }
}

impl ExportTask {
    /// Exports what is committed, then stops.
    pub async fn finish(self) {
        self.stop.cancel();
        let _ = self.handle.await;
    }
}

#[cfg(test)]
mod tests;
