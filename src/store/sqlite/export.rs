//! Bringing the JSON Lines export up to date with the database at start.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension};

use crate::usage::jsonl::{ExportedEvent, JsonlSink};

use super::super::StoreError;
use super::internal;

/// Brings the JSON Lines export up to date with the database: finds where
/// the files (or the recorded watermark) end and appends what follows.
pub(super) fn recover(conn: &mut Connection, dir: &Path) -> Result<JsonlSink, StoreError> {
    let (mut sink, last_id) = JsonlSink::open(dir).map_err(internal)?;
    // The files are the truth where they have lines (they may have lost a
    // few unsynced lines to a power cut); the recorded watermark only
    // matters once an operator has moved every file away.
    let from_files: Option<u64> = match last_id {
        Some(id) => conn
            .query_row("SELECT seq FROM usage_events WHERE id = ?1", [id], |r| {
                r.get::<_, i64>(0)
            })
            .optional()
            .map_err(internal)?
            .map(|s| s as u64),
        None => None,
    };
    let from_meta = || -> Result<u64, StoreError> {
        Ok(conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'jsonl_exported_seq'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map_err(internal)?
            .unwrap_or(0) as u64)
    };
    let start = match from_files {
        Some(seq) => seq,
        None => from_meta()?,
    };
    sink.set_exported_up_to(start);
    loop {
        let after = sink.exported_up_to();
        let rows: Vec<(u64, String, String)> = conn
            .prepare(
                "SELECT seq, time, json FROM usage_events WHERE seq > ?1 ORDER BY seq LIMIT 10000",
            )
            .and_then(|mut st| {
                st.query_map([after as i64], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?))
                })?
                .collect()
            })
            .map_err(internal)?;
        if rows.is_empty() {
            break;
        }
        sink.append(rows.iter().map(|(seq, time, json)| ExportedEvent {
            seq: *seq,
            time,
            json,
        }))
        .map_err(internal)?;
    }
    Ok(sink)
}
