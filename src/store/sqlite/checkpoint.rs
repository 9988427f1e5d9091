//! The checkpointer thread: keeps the WAL small under any load and empty
//! when idle.
//!
//! SQLite can only start its WAL over from the beginning when every frame
//! in it has been copied into the database and no reader still uses it.
//! PASSIVE checkpoints alone never get there under sustained load (the
//! writer appends while they copy, readers pin old frames), so the WAL grew
//! without bound (428 MB in 12 s at 8,100 req/s) and, with no size limit,
//! never shrank. So, from this thread, on its own connection:
//! - every [`TICK`], the WAL file's size is read (one `stat`);
//! - past [`RESTART_AT`], a RESTART checkpoint copies everything and waits
//!   (busy handler) for readers to leave the WAL, holding off the writer
//!   meanwhile, so the writer's next transaction starts the WAL over; the
//!   writer waits for that copy once per [`RESTART_AT`] of log;
//! - otherwise a PASSIVE one every [`PASSIVE_EVERY`], as before;
//! - when a PASSIVE one finds everything copied and nothing written since
//!   the last, the gateway is idle: TRUNCATE empties the file.
//!
//! `journal_size_limit` (set on every connection, see `open_connection`)
//! makes a WAL that starts over shrink back to that size on disk.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rusqlite::Connection;

/// How often the WAL's size is looked at.
const TICK: Duration = Duration::from_millis(100);

/// How often a PASSIVE checkpoint runs while the WAL is below
/// [`RESTART_AT`].
const PASSIVE_EVERY: u32 = 5;

/// WAL size past which the checkpointer holds the writer off to let the
/// log start over. 16 MiB is copied in a few tens of ms; at the heaviest
/// load measured the WAL grows ~4 MB per [`TICK`], so it stays far below
/// the 64 MiB target (see BENCHMARKS.md).
pub(super) const RESTART_AT: u64 = 16 << 20;

/// What `open_connection` sets as `journal_size_limit`: a WAL that starts
/// over is cut back to this on disk.
pub(super) const JOURNAL_SIZE_LIMIT: u64 = RESTART_AT;

/// One `PRAGMA wal_checkpoint` result: (busy, frames in the log, frames
/// copied).
fn checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<(bool, i64, i64)> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        Ok((r.get::<_, i64>(0)? != 0, r.get(1)?, r.get(2)?))
    })
}

pub(super) fn run(conn: Connection, wal: PathBuf, stop: mpsc::Receiver<()>) {
    let wal_size = || std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    let mut ticks = 0u32;
    // Frames in the log at the last PASSIVE checkpoint, to tell idle.
    let mut last_frames = -1i64;
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(TICK) {
        ticks = ticks.wrapping_add(1);
        let size = wal_size();
        if size > RESTART_AT {
            let started = Instant::now();
            match checkpoint(&conn, "RESTART") {
                Ok((busy, _, _)) => tracing::debug!(
                    wal_bytes = size,
                    busy,
                    took_ms = started.elapsed().as_millis() as u64,
                    "WAL restart checkpoint"
                ),
                Err(e) => tracing::warn!(error = %e, "WAL restart checkpoint failed"),
            }
            last_frames = -1;
            continue;
        }
        if ticks % PASSIVE_EVERY != 0 {
            continue;
        }
        // PASSIVE: copies what it can without waiting for, or blocking,
        // the writer.
        match checkpoint(&conn, "PASSIVE") {
            Ok((_, frames, copied)) => {
                let idle = frames > 0 && frames == copied && frames == last_frames;
                last_frames = frames;
                if idle && size > 0 {
                    // Nothing written for a whole period and everything
                    // copied: give the disk space back.
                    if let Err(e) = checkpoint(&conn, "TRUNCATE") {
                        tracing::warn!(error = %e, "WAL truncate checkpoint failed");
                    }
                    last_frames = -1;
                }
            }
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
        }
    }
    // Closing: leave an empty WAL behind (the last connection to close
    // would checkpoint anyway; this makes it explicit and cheap).
    let _ = checkpoint(&conn, "TRUNCATE");
}
