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
//! - past [`RESTART_AT`], a PASSIVE checkpoint copies what it can while
//!   commits go on, then a RESTART checkpoint copies the rest and waits
//!   (busy handler) for readers to leave the WAL, holding off the writer
//!   meanwhile, so the writer's next transaction starts the WAL over (and
//!   `journal_size_limit` cuts the file back); the writer waits for that
//!   copy once per [`RESTART_AT`] of log. Not TRUNCATE here: a WAL file
//!   rewritten in place costs each commit's fsync less than one that grows
//!   again from zero (file size changes are metadata to sync too);
//! - otherwise a PASSIVE one every [`PASSIVE_EVERY`], as before;
//! - when a checkpoint finds everything copied and nothing written since
//!   the last one, the gateway is idle: TRUNCATE empties the file.
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
        let over = size > RESTART_AT;
        if !over && !ticks.is_multiple_of(PASSIVE_EVERY) {
            continue;
        }
        // PASSIVE copies what it can without waiting for, or blocking, the
        // writer. Before a RESTART too: the RESTART holds the writer off
        // from its start (it takes the write lock first) to its end, so
        // the bulk of the copy and the database file's big fsync are done
        // here while commits go on, and the RESTART is left the frames
        // committed meanwhile (see BENCHMARKS.md: a RESTART alone held
        // commits for 14 to 188 ms, and under an open loop that stall
        // turned into a backlog of connections the gateway never caught up
        // with).
        if over && let Err(e) = checkpoint(&conn, "PASSIVE") {
            tracing::warn!(error = %e, mode = "PASSIVE", "WAL checkpoint failed");
        }
        let started = Instant::now();
        let mode = if over { "RESTART" } else { "PASSIVE" };
        let (frames, copied) = match checkpoint(&conn, mode) {
            Ok((busy, frames, copied)) => {
                if over {
                    // `took_ms` includes waiting for the writer's batch in
                    // progress; the writer itself waits only for the copy.
                    tracing::debug!(
                        wal_bytes = size,
                        busy,
                        took_ms = started.elapsed().as_millis() as u64,
                        "WAL restart checkpoint"
                    );
                }
                (frames, copied)
            }
            Err(e) => {
                tracing::warn!(error = %e, mode, "WAL checkpoint failed");
                continue;
            }
        };
        let idle = frames > 0 && frames == copied && frames == last_frames;
        last_frames = frames;
        if idle && size > 0 {
            // Nothing written since the last checkpoint and everything
            // copied: give the disk space back.
            if let Err(e) = checkpoint(&conn, "TRUNCATE") {
                tracing::warn!(error = %e, "WAL truncate checkpoint failed");
            }
            last_frames = -1;
        }
    }
    // Closing: leave an empty WAL behind (the last connection to close
    // would checkpoint anyway; this makes it explicit and cheap).
    let _ = checkpoint(&conn, "TRUNCATE");
}
