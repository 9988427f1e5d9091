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
