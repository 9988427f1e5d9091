//! The embedded store: SQLite in WAL mode with `synchronous = FULL`.
//!
//! One writer thread owns the write connection and commits every queued
//! write in one transaction (group commit): one fsync covers a whole batch,
//! and each write is acknowledged only after that fsync. Each write runs in
//! its own savepoint, so one failing write (a duplicate id) does not fail the
//! others in its batch. Reads use a second connection, which WAL lets run
//! beside the writer. Checkpoints (copying the WAL into the database file,
//! with an fsync of its own) run on a third connection in their own thread,
//! so they never stall a group commit. Reads run on the blocking pool.

mod apply;
mod checkpoint;
mod jobs;
mod load;
mod writer;

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use jiff::Timestamp;
use rusqlite::{Connection, params};
use rust_decimal::Decimal;

use tokio::sync::broadcast;

use crate::idempotency::IdempotencyRecord;
use crate::jobs::{Job, JobStatus};
use crate::usage::EventHead;

use super::{
    AccountSnapshot, Ack, BoxFuture, Change, JobToRun, MonthUsage, PackageUsage, Snapshot, Store,
    StoreError, StoreHealth, StoredEvent, Write,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS accounts (
    id            TEXT PRIMARY KEY,
    status        TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    postpaid      INTEGER NOT NULL DEFAULT 0,
    balance_usd   TEXT NOT NULL DEFAULT '0',
    arrears_since TEXT
);
CREATE TABLE IF NOT EXISTS sub_accounts (
    id              TEXT PRIMARY KEY,
    root            TEXT NOT NULL REFERENCES accounts(id),
    max_concurrency INTEGER,
    created_at      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id     TEXT PRIMARY KEY,
    hash       BLOB NOT NULL UNIQUE,
    root       TEXT NOT NULL REFERENCES accounts(id),
    sub        TEXT REFERENCES sub_accounts(id),
    created_at TEXT NOT NULL,
    revoked_at TEXT,
    sealed_secret TEXT
);
-- seq: the rowid, max + 1 at each insert. No event is ever deleted, so
-- that is AUTOINCREMENT's order without its sqlite_sequence row, which
-- every group commit rewrote: one WAL page of ~7 per commit. (Databases
-- made before keep AUTOINCREMENT; both read the same.)
CREATE TABLE IF NOT EXISTS usage_events (
    seq        INTEGER PRIMARY KEY,
    id         TEXT NOT NULL UNIQUE,
    account    TEXT NOT NULL,
    time       TEXT NOT NULL,
    charged_to TEXT NOT NULL,
json       TEXT NOT NULL
);
-- Per account, month and charge source: what bills and usage reports read.
-- Events carry no secondary index: an index by account would dirty a page
-- per account in every group commit (random insert positions), which is
-- most of what an fsync'd batch would write.
CREATE TABLE IF NOT EXISTS usage_counters (
    account TEXT NOT NULL,
    month   TEXT NOT NULL,
    source  TEXT NOT NULL,
    calls   INTEGER NOT NULL,
    PRIMARY KEY (account, month, source)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS concurrency_packages (
    id          TEXT PRIMARY KEY,
    account     TEXT NOT NULL REFERENCES accounts(id),
    units       INTEGER NOT NULL,
    period      TEXT NOT NULL,
    start_date  TEXT NOT NULL,
    starts_at   TEXT NOT NULL,
    ends_at     TEXT NOT NULL,
    price_usd   TEXT NOT NULL,
    bought_at   TEXT NOT NULL,
    refunded_at TEXT
);
CREATE TABLE IF NOT EXISTS resource_packages (
    id           TEXT PRIMARY KEY,
    account      TEXT NOT NULL REFERENCES accounts(id),
    kind         TEXT NOT NULL,
    size         INTEGER NOT NULL,
    used         INTEGER NOT NULL DEFAULT 0,
    effective_at TEXT NOT NULL,
    expires_at   TEXT NOT NULL,
    price_usd    TEXT NOT NULL,
    refunded_at  TEXT
);
-- The commit's fall-through to the next payer reads an account's packages.
CREATE INDEX IF NOT EXISTS resource_packages_account ON resource_packages(account);
CREATE TABLE IF NOT EXISTS settlements (
    account        TEXT NOT NULL REFERENCES accounts(id),
    month          TEXT NOT NULL,
    calls          INTEGER NOT NULL,
    postpaid_units INTEGER NOT NULL,
    unit_price_usd TEXT NOT NULL,
    amount_usd     TEXT NOT NULL,
    settled_at     TEXT NOT NULL,
    PRIMARY KEY (account, month)
);
CREATE TABLE IF NOT EXISTS ledger (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    account    TEXT NOT NULL REFERENCES accounts(id),
    kind       TEXT NOT NULL,
    amount_usd TEXT NOT NULL,
    balance_after_usd TEXT NOT NULL,
    memo       TEXT NOT NULL,
    at         TEXT NOT NULL
);
-- Idempotency keys (SPEC §10.1): a record is written in the transaction
-- of its task's usage event; status NULL: the answer was too large to keep.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    account       TEXT NOT NULL,
    idem_key      TEXT NOT NULL,
    fingerprint   BLOB NOT NULL,
    status        INTEGER,
    headers       TEXT,
    body          BLOB,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    PRIMARY KEY (account, idem_key)
);
-- The purge's bounded passes read the oldest first, never the whole table.
CREATE INDEX IF NOT EXISTS idempotency_keys_expiry ON idempotency_keys(expires_at_ms);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
";

enum WriterMsg {
    Write(Write, Ack),
    Close,
}

pub struct SqliteStore {
    writes: mpsc::Sender<WriterMsg>,
    checkpointer: Mutex<Option<(mpsc::Sender<()>, JoinHandle<()>)>>,
    // Reads are rare (admin calls, start) and short; one connection behind a
    // std mutex is enough and keeps them off the writer.
    reader: Arc<Mutex<Connection>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    changes: broadcast::Sender<Change>,
}

fn internal(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(e.to_string())
}

fn parse_ts(s: &str) -> Result<Timestamp, StoreError> {
    s.parse()
        .map_err(|e| internal(format!("bad timestamp {s}: {e}")))
}

fn parse_usd(s: &str) -> Result<Decimal, StoreError> {
    s.parse()
        .map_err(|e| internal(format!("bad amount {s}: {e}")))
}

fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL in WAL mode: every commit fsyncs the log. This is what makes a
    // success the client saw survive `kill -9` and power loss.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // A WAL that starts over is cut back to this size on disk, so a burst
    // does not leave its peak size behind (see `checkpoint`).
    conn.pragma_update(
        None,
        "journal_size_limit",
        checkpoint::JOURNAL_SIZE_LIMIT as i64,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

/// Brings a database made by an earlier version up to [`SCHEMA`] (columns
/// `CREATE TABLE IF NOT EXISTS` cannot add).
fn upgrade(conn: &Connection) -> rusqlite::Result<()> {
    let has_sealed: bool = conn.query_row(
        "SELECT count(*) FROM pragma_table_info('api_keys') WHERE name = 'sealed_secret'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !has_sealed {
        conn.execute_batch("ALTER TABLE api_keys ADD COLUMN sealed_secret TEXT")?;
    }
    Ok(())
}

/// A data directory that has held data (its usage export has lines, or
/// its export cursor exists) but whose database is missing or empty lost
/// its database: starting fresh there would silently drop every account
/// and key. Refused, naming what to do.
fn refuse_lost_database(data_dir: &Path, db: &Path) -> Result<(), StoreError> {
    let db_len = std::fs::metadata(db).map(|m| m.len()).ok();
    if db_len.is_some_and(|n| n > 0) {
        return Ok(());
    }
    let exported = std::fs::read_dir(data_dir.join("usage"))
        .map(|d| {
            d.filter_map(Result::ok)
                .any(|e| e.metadata().is_ok_and(|m| m.is_file() && m.len() > 0))
        })
        .unwrap_or(false);
    let cursor = data_dir.join("usage.cursor").exists();
    if exported || cursor {
        let state = if db_len.is_some() {
            "is empty"
        } else {
            "is missing"
        };
        return Err(StoreError::Internal(format!(
            "{} {state}, but {} has held data (usage export or its cursor): \
             restore the database from a backup, or start on a new storage.data_dir",
            db.display(),
            data_dir.display()
        )));
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (or creates) `<data_dir>/tollgate.db` and starts the writer.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| internal(format!("cannot create {}: {e}", data_dir.display())))?;
        let db = data_dir.join("tollgate.db");
        refuse_lost_database(data_dir, &db)?;
        let conn = open_connection(&db).map_err(internal)?;
        conn.execute_batch(SCHEMA).map_err(internal)?;
        conn.execute_batch(jobs::SCHEMA).map_err(internal)?;
        upgrade(&conn).map_err(internal)?;
        // The writer never checkpoints; the checkpointer thread does.
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(internal)?;
        // Room for every statement the writes run, so none is parsed again
        // (rusqlite's default cache holds 16).
        conn.set_prepared_statement_cache_capacity(128);
        let reader = open_connection(&db).map_err(internal)?;
        let (writes, rx) = mpsc::channel();
        let (changes, _) = broadcast::channel(1024);
        let feed = changes.clone();
        let writer = std::thread::Builder::new()
            .name("tollgate-store".into())
            .spawn(move || writer::run(conn, rx, feed))
            .map_err(internal)?;
        let checkpoint_conn = open_connection(&db).map_err(internal)?;
        let (stop_checkpoints, stopped) = mpsc::channel::<()>();
        let wal = data_dir.join("tollgate.db-wal");
        let checkpointer = std::thread::Builder::new()
            .name("tollgate-checkpoint".into())
            .spawn(move || checkpoint::run(checkpoint_conn, wal, stopped))
            .map_err(internal)?;
        Ok(Self {
            writes,
            checkpointer: Mutex::new(Some((stop_checkpoints, checkpointer))),
            reader: Arc::new(Mutex::new(reader)),
            writer: Mutex::new(Some(writer)),
            changes,
        })
    }

    /// Runs `f` on the read connection in the blocking pool.
    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> BoxFuture<'static, Result<T, StoreError>> {
        let reader = self.reader.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let conn = reader.lock().unwrap_or_else(|e| e.into_inner());
                f(&conn)
            })
            .await
            .map_err(|_| internal("reader task failed"))?
        })
    }

    /// A point lookup by primary key: run on the calling thread when the
    /// reader is free (a few microseconds on cached pages, where a hop to
    /// the blocking pool and back costs two thread wake-ups), else as
    /// [`Self::read`] does.
    fn read_point<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> BoxFuture<'static, Result<T, StoreError>> {
        if let Ok(conn) = self.reader.try_lock() {
            let result = f(&conn);
            return Box::pin(std::future::ready(result));
        }
        self.read(f)
    }
}

impl Store for SqliteStore {
    fn load(&self, now: Timestamp) -> BoxFuture<'_, Result<Snapshot, StoreError>> {
        self.read(move |c| load::snapshot(c, now, None))
    }

    fn load_account<'a>(
        &'a self,
        id: &'a str,
        now: Timestamp,
    ) -> BoxFuture<'a, Result<Option<AccountSnapshot>, StoreError>> {
        let id = id.to_string();
        self.read(move |c| {
            let snap = load::snapshot(c, now, Some(&id))?;
            Ok(snap.into_single())
        })
    }

    fn submit(&self, write: Write, ack: Ack) {
        if let Err(mpsc::SendError(WriterMsg::Write(_, ack))) =
            self.writes.send(WriterMsg::Write(write, ack))
        {
            ack.send(Err(StoreError::Closed));
        }
    }

    fn usage_events(
        &self,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<StoredEvent>, StoreError>> {
        self.read(move |conn| {
            let mut st = conn
                .prepare_cached(
                    "SELECT seq, json, id, time, account FROM usage_events
                     WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                )
                .map_err(internal)?;
            let rows = st
                .query_map(params![after as i64, limit as i64], |r| {
                    // Written with the JSON from the same event's fields
                    // (`apply`), so they are its head.
                    let head = EventHead {
                        id: r.get(2)?,
                        time: r.get(3)?,
                        subject: r.get(4)?,
                    };
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, head))
                })
                .map_err(internal)?;
            rows.map(|row| {
                let (seq, json, head) = row.map_err(internal)?;
                Ok(StoredEvent {
                    seq: seq as u64,
                    event: json,
                    columns: Some(head),
                })
            })
            .collect()
        })
    }

    fn month_usage<'a>(
        &'a self,
        month: &'a str,
        account: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<MonthUsage>, StoreError>> {
        let (month, account) = (month.to_string(), account.map(String::from));
        self.read(move |c| load::month_usage(c, &month, account.as_deref()))
    }

    fn settled<'a>(
        &'a self,
        month: &'a str,
    ) -> BoxFuture<'a, Result<Vec<(String, Decimal)>, StoreError>> {
        let month = month.to_string();
        self.read(move |c| load::settled(c, &month))
    }

    fn package_usage(
        &self,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<Vec<PackageUsage>, StoreError>> {
        self.read(move |c| load::package_usage(c, now))
    }

    fn idempotency_record<'a>(
        &'a self,
        account: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<IdempotencyRecord>, StoreError>> {
        let (account, key) = (account.to_string(), key.to_string());
        self.read_point(move |c| load::idempotency_record(c, &account, &key))
    }

    fn watermark<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<u64, StoreError>> {
        let key = format!("watermark:{name}");
        self.read(move |c| {
            use rusqlite::OptionalExtension;
            c.prepare_cached("SELECT value FROM meta WHERE key = ?1")
                .and_then(|mut st| {
                    st.query_row(params![key], |r| r.get::<_, i64>(0))
                        .optional()
                })
                .map(|v| v.unwrap_or(0) as u64)
                .map_err(internal)
        })
    }

    fn feed_end(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.read(|c| {
            c.prepare_cached("SELECT coalesce(max(seq), 0) FROM usage_events")
                .and_then(|mut st| st.query_row([], |r| r.get::<_, i64>(0)))
                .map(|v| v as u64)
                .map_err(internal)
        })
    }

    fn job<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Job>, StoreError>> {
        let id = id.to_string();
        self.read_point(move |c| jobs::job(c, &id))
    }

    fn job_to_run<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<JobToRun>, StoreError>> {
        let id = id.to_string();
        self.read(move |c| jobs::to_run(c, &id))
    }

    fn unfinished_jobs(&self) -> BoxFuture<'_, Result<Vec<Job>, StoreError>> {
        self.read(jobs::unfinished)
    }

    fn jobs_of<'a>(
        &'a self,
        account: &'a str,
        status: Option<JobStatus>,
        after: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Job>, StoreError>> {
        let (account, after) = (account.to_string(), after.to_string());
        self.read(move |c| jobs::of_account(c, &account, status, &after, limit))
    }

    fn changes(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    fn health(&self) -> StoreHealth {
        let running = self
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|h| !h.is_finished());
        if running {
            StoreHealth::Ok
        } else {
            StoreHealth::Unavailable
        }
    }

    fn close(&self) {
        let handle = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            let _ = self.writes.send(WriterMsg::Close);
            let _ = handle.join();
        }
        let checkpointer = self
            .checkpointer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((stop, handle)) = checkpointer {
            let _ = stop.send(());
            let _ = handle.join();
        }
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests;
