//! The local spool (SPEC §8.7): usage events that could not reach
//! PostgreSQL, one JSON line each in `<data_dir>/spool/events.jsonl`,
//! fsync'd before the task's success is acknowledged, and delivered later
//! exactly once (the event id is the key: redelivery inserts nothing).

use std::fs::OpenOptions;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, MutexGuard};

use super::apply::UsageRow;
use crate::idempotency::IdempotencyRecord;
use crate::jobs::JobResult;

/// One spooled usage append: the event and what its commit needs.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct SpooledEvent {
    pub id: String,
    pub account: String,
    pub time: String,
    pub charged_to: String,
    pub json: String,
    pub package: Option<String>,
    pub month: String,
    /// The task's idempotency record, delivered with its event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<Box<IdempotencyRecord>>,
    /// A job's result, delivered with its event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<Box<JobResult>>,
}

impl SpooledEvent {
    pub fn row(&self) -> UsageRow<'_> {
        UsageRow {
            id: &self.id,
            account: &self.account,
            time: &self.time,
            charged_to: &self.charged_to,
            json: &self.json,
            package: self.package.as_deref(),
            month: &self.month,
            idempotency: self.idempotency.as_deref(),
            job: self.job.as_deref(),
        }
    }
}

pub(super) struct Spool {
    path: PathBuf,
    count: AtomicU64,
    // An async lock: delivery holds it across its PostgreSQL transaction so
    // it never clears lines appended meanwhile. The file I/O under it is
    // small and only happens during an outage or right after one.
    file: Mutex<()>,
}

/// The lock held while reading, appending or clearing the spool.
pub(super) struct Locked<'a> {
    spool: &'a Spool,
    _guard: MutexGuard<'a, ()>,
}

impl Spool {
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let spool = Self {
            path: dir.join("events.jsonl"),
            count: AtomicU64::new(0),
            file: Mutex::new(()),
        };
        cut_torn_tail(&spool.path)?;
        let n = read(&spool.path)?.len() as u64;
        spool.count.store(n, Ordering::Relaxed);
        Ok(spool)
    }

    /// Events waiting (for `tollgate_spooled_events`).
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub async fn lock(&self) -> Locked<'_> {
        Locked {
            spool: self,
            _guard: self.file.lock().await,
        }
    }
}

impl Locked<'_> {
    /// Appends and fsyncs: once this returns, the events survive `kill -9`.
    pub fn append(&self, events: &[SpooledEvent]) -> io::Result<()> {
        let mut buf = Vec::new();
        for e in events {
            serde_json::to_writer(&mut buf, e)?;
            buf.push(b'\n');
        }
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.spool.path)?;
        f.write_all(&buf)?;
        f.sync_data()?;
        self.spool
            .count
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    pub fn read(&self) -> io::Result<Vec<SpooledEvent>> {
        read(&self.spool.path)
    }

    /// Forgets every spooled event (all delivered).
    pub fn clear(&self) -> io::Result<()> {
        match std::fs::remove_file(&self.spool.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.spool.count.store(0, Ordering::Relaxed);
        Ok(())
    }
}

/// Cuts a last line left without its newline by a crash mid-append (never
/// acknowledged: the fsync comes after the whole line). Left in place, the
/// next append would glue a new, acknowledged event onto it and make that
/// line unreadable.
fn cut_torn_tail(path: &Path) -> io::Result<()> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if bytes.is_empty() || bytes.ends_with(b"\n") {
        return Ok(());
    }
    let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    tracing::warn!(
        bytes = bytes.len() - keep,
        "a torn last line of the usage spool cut"
    );
    let f = OpenOptions::new().write(true).open(path)?;
    f.set_len(keep as u64)?;
    f.sync_data()
}

/// The spooled events; a torn last line (a crash mid-append, before the
/// fsync, so never acknowledged) is skipped.
fn read(path: &Path) -> io::Result<Vec<SpooledEvent>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for line in text.split_inclusive('\n') {
        if !line.ends_with('\n') {
            break;
        }
        match serde_json::from_str(line.trim_end()) {
            Ok(e) => out.push(e),
            Err(e) => tracing::error!(error = %e, "unreadable line in the usage spool skipped"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> SpooledEvent {
        SpooledEvent {
            id: id.into(),
            account: "acme".into(),
            time: "2026-11-27T00:00:00Z".into(),
            charged_to: "postpaid".into(),
            json: "{}".into(),
            package: None,
            month: "2026-11".into(),
            idempotency: None,
            job: None,
        }
    }

    #[tokio::test]
    async fn an_append_after_a_torn_line_is_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path()).unwrap();
            spool.lock().await.append(&[event("e1")]).unwrap();
        }
        // A crash in the middle of the next append.
        let path = dir.path().join("events.jsonl");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"id":"torn","acc"#).unwrap();
        drop(f);

        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.count(), 1);
        spool.lock().await.append(&[event("e2")]).unwrap();
        let ids: Vec<String> = spool
            .lock()
            .await
            .read()
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(
            ids,
            ["e1", "e2"],
            "the acknowledged event after the tear is kept"
        );
    }
}
