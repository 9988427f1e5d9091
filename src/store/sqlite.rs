//! The embedded store: SQLite in WAL mode with `synchronous = FULL`.
//!
//! One writer thread owns the write connection and commits every queued
//! write in one transaction (group commit): one fsync covers a whole batch,
//! and each write is acknowledged only after that fsync. Each write runs in
//! its own savepoint, so one failing write (a duplicate id) does not fail the
//! others in its batch. Reads use a second connection, which WAL lets run
//! beside the writer.

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;

use jiff::Timestamp;
use rusqlite::{Connection, ErrorCode, OptionalExtension, params};
use serde_json::value::RawValue;

use crate::accounts::AccountStatus;
use crate::entitlements::{ConcurrencyPackage, Period};
use crate::usage::jsonl::{ExportedEvent, JsonlSink};

use super::{
    AccountRow, Ack, Committed, KeyRow, Snapshot, Store, StoreError, StoredEvent, SubAccountRow,
    Write,
};

/// The most writes one transaction takes; more wait for the next.
const MAX_BATCH: usize = 4096;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS accounts (
    id         TEXT PRIMARY KEY,
    status     TEXT NOT NULL,
    created_at TEXT NOT NULL
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
    revoked_at TEXT
);
CREATE TABLE IF NOT EXISTS usage_events (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    id      TEXT NOT NULL UNIQUE,
    account TEXT NOT NULL,
    time    TEXT NOT NULL,
    json    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_events_account_time ON usage_events(account, time);
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
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
";

enum Job {
    Write(Write, Ack),
    Close,
}

pub struct SqliteStore {
    jobs: mpsc::Sender<Job>,
    // Reads are rare (admin calls) and short; one connection behind a std
    // mutex is enough and keeps them off the writer.
    reader: Mutex<Connection>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

fn internal(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(e.to_string())
}

fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL in WAL mode: every commit fsyncs the log. This is what makes a
    // success the client saw survive `kill -9` and power loss.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (or creates) `<data_dir>/tollgate.db` and the usage export
    /// under `<data_dir>/usage/`, repairs the export, and starts the writer.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| internal(format!("cannot create {}: {e}", data_dir.display())))?;
        let db = data_dir.join("tollgate.db");
        let mut conn = open_connection(&db).map_err(internal)?;
        conn.execute_batch(SCHEMA).map_err(internal)?;
        let sink = recover_export(&mut conn, &data_dir.join("usage"))?;
        let reader = open_connection(&db).map_err(internal)?;
        let (jobs, rx) = mpsc::channel();
        let writer = std::thread::Builder::new()
            .name("tollgate-store".into())
            .spawn(move || run_writer(conn, rx, sink))
            .map_err(internal)?;
        Ok(Self {
            jobs,
            reader: Mutex::new(reader),
            writer: Mutex::new(Some(writer)),
        })
    }

    fn reader(&self) -> MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Store for SqliteStore {
    fn load(&self, now: Timestamp) -> Result<Snapshot, StoreError> {
        let conn = self.reader();
        let accounts = conn
            .prepare("SELECT id, status, created_at FROM accounts ORDER BY id")
            .and_then(|mut st| {
                st.query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()
            })
            .map_err(internal)?
            .into_iter()
            .map(|(id, status, created)| {
                Ok(AccountRow {
                    status: AccountStatus::parse(&status)
                        .ok_or_else(|| internal(format!("account {id}: bad status {status}")))?,
                    created_at: parse_ts(&created)?,
                    id,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let sub_accounts = conn
            .prepare("SELECT id, root, max_concurrency, created_at FROM sub_accounts ORDER BY id")
            .and_then(|mut st| {
                st.query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Option<u32>>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()
            })
            .map_err(internal)?
            .into_iter()
            .map(|(id, root, max_concurrency, created)| {
                Ok(SubAccountRow {
                    id,
                    root,
                    max_concurrency,
                    created_at: parse_ts(&created)?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let keys = conn
            .prepare(
                "SELECT key_id, hash, root, sub, created_at FROM api_keys
                 WHERE revoked_at IS NULL ORDER BY key_id",
            )
            .and_then(|mut st| {
                st.query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, Vec<u8>>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Option<String>>(3)?,
                        r.get::<_, String>(4)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()
            })
            .map_err(internal)?
            .into_iter()
            .map(|(key_id, hash, root, sub, created)| {
                Ok(KeyRow {
                    hash: hash
                        .try_into()
                        .map_err(|_| internal(format!("key {key_id}: hash is not 32 bytes")))?,
                    key_id,
                    root,
                    sub,
                    created_at: parse_ts(&created)?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let concurrency_packages = load_packages(&conn, now)?;
        Ok(Snapshot {
            accounts,
            sub_accounts,
            keys,
            concurrency_packages,
        })
    }

    fn submit(&self, write: Write, ack: Ack) {
        if let Err(mpsc::SendError(Job::Write(_, ack))) = self.jobs.send(Job::Write(write, ack)) {
            let _ = ack.send(Err(StoreError::Closed));
        }
    }

    fn usage_events(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let conn = self.reader();
        let mut st = conn
            .prepare_cached(
                "SELECT seq, json FROM usage_events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(internal)?;
        let rows = st
            .query_map(params![after as i64, limit as i64], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(internal)?;
        rows.map(|row| {
            let (seq, json) = row.map_err(internal)?;
            Ok(StoredEvent {
                seq: seq as u64,
                event: RawValue::from_string(json).map_err(internal)?,
            })
        })
        .collect()
    }

    fn close(&self) {
        let handle = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            let _ = self.jobs.send(Job::Close);
            let _ = handle.join();
        }
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.close();
    }
}

fn load_packages(conn: &Connection, now: Timestamp) -> Result<Vec<ConcurrencyPackage>, StoreError> {
    type Raw = (
        String,
        String,
        u32,
        String,
        String,
        String,
        String,
        String,
        String,
    );
    let rows: Vec<Raw> = conn
        .prepare(
            "SELECT id, account, units, period, start_date, starts_at, ends_at, price_usd, bought_at
             FROM concurrency_packages WHERE refunded_at IS NULL ORDER BY starts_at, id",
        )
        .and_then(|mut st| {
            st.query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                ))
            })?
            .collect()
        })
        .map_err(internal)?;
    let mut out = Vec::new();
    for (id, account, units, period, start, starts_at, ends_at, price, bought_at) in rows {
        let pkg = ConcurrencyPackage {
            period: Period::parse(&period)
                .ok_or_else(|| internal(format!("package {id}: bad period")))?,
            start: start
                .parse()
                .map_err(|e| internal(format!("package {id}: {e}")))?,
            starts_at: parse_ts(&starts_at)?,
            ends_at: parse_ts(&ends_at)?,
            price_usd: price
                .parse()
                .map_err(|e| internal(format!("package {id}: {e}")))?,
            bought_at: parse_ts(&bought_at)?,
            id,
            account,
            units,
        };
        if pkg.ends_at > now {
            out.push(pkg);
        }
    }
    Ok(out)
}

fn parse_ts(s: &str) -> Result<Timestamp, StoreError> {
    s.parse()
        .map_err(|e| internal(format!("bad timestamp {s}: {e}")))
}

fn run_writer(mut conn: Connection, jobs: mpsc::Receiver<Job>, mut sink: JsonlSink) {
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

struct Pending {
    seq: u64,
    id: String,
    time: String,
    json: String,
}

fn commit_batch(
    conn: &mut Connection,
    sink: &mut JsonlSink,
    recorded_watermark: &mut u64,
    batch: Vec<(Write, Ack)>,
) {
    let mut results = Vec::with_capacity(batch.len());
    let mut exported = Vec::new();
    let watermark = sink.exported_up_to();
    let outcome = (|| -> rusqlite::Result<()> {
        let mut tx = conn.transaction()?;
        for (write, _) in &batch {
            let mut sp = tx.savepoint()?;
            match apply(&sp, write) {
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
        }
        if watermark != *recorded_watermark {
            tx.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('jsonl_exported_seq', ?1)",
                params![watermark as i64],
            )?;
        }
        tx.commit()
    })();
    match outcome {
        Ok(()) => {
            *recorded_watermark = watermark;
            for ((_, ack), result) in batch.into_iter().zip(results) {
                let _ = ack.send(result);
            }
            let events = exported.iter().map(|p| ExportedEvent {
                seq: p.seq,
                id: &p.id,
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

fn map_write_error(e: rusqlite::Error, what: &str) -> StoreError {
    if let rusqlite::Error::SqliteFailure(f, _) = &e
        && f.code == ErrorCode::ConstraintViolation
    {
        return if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY {
            StoreError::NotFound(what.to_string())
        } else {
            StoreError::Conflict(what.to_string())
        };
    }
    internal(e)
}

fn apply(conn: &Connection, write: &Write) -> Result<(Committed, Option<Pending>), StoreError> {
    let done = Ok((Committed::Done, None));
    match write {
        Write::CreateAccount(a) => {
            conn.prepare_cached("INSERT INTO accounts(id, status, created_at) VALUES (?1, ?2, ?3)")
                .and_then(|mut st| {
                    st.execute(params![a.id, a.status.as_str(), a.created_at.to_string()])
                })
                .map_err(|e| map_write_error(e, &format!("account {}", a.id)))?;
            done
        }
        Write::SetAccountStatus { id, status } => {
            let n = conn
                .prepare_cached("UPDATE accounts SET status = ?2 WHERE id = ?1")
                .and_then(|mut st| st.execute(params![id, status.as_str()]))
                .map_err(internal)?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("account {id}")));
            }
            done
        }
        Write::CreateSubAccount(s) => {
            conn.prepare_cached(
                "INSERT INTO sub_accounts(id, root, max_concurrency, created_at) VALUES (?1, ?2, ?3, ?4)",
            )
            .and_then(|mut st| {
                st.execute(params![s.id, s.root, s.max_concurrency, s.created_at.to_string()])
            })
            .map_err(|e| map_write_error(e, &format!("sub-account {}", s.id)))?;
            done
        }
        Write::CreateKey(k) => {
            conn.prepare_cached(
                "INSERT INTO api_keys(key_id, hash, root, sub, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut st| {
                st.execute(params![k.key_id, &k.hash[..], k.root, k.sub, k.created_at.to_string()])
            })
            .map_err(|e| map_write_error(e, &format!("key {}", k.key_id)))?;
            done
        }
        Write::RevokeKey { key_id, at } => {
            let n = conn
                .prepare_cached(
                    "UPDATE api_keys SET revoked_at = ?2 WHERE key_id = ?1 AND revoked_at IS NULL",
                )
                .and_then(|mut st| st.execute(params![key_id, at.to_string()]))
                .map_err(internal)?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("key {key_id}")));
            }
            done
        }
        Write::CreateConcurrencyPackage(p) => {
            conn.prepare_cached(
                "INSERT INTO concurrency_packages
                 (id, account, units, period, start_date, starts_at, ends_at, price_usd, bought_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    p.id,
                    p.account,
                    p.units,
                    p.period.as_str(),
                    p.start.to_string(),
                    p.starts_at.to_string(),
                    p.ends_at.to_string(),
                    p.price_usd.to_string(),
                    p.bought_at.to_string()
                ])
            })
            .map_err(|e| map_write_error(e, &format!("concurrency package {}", p.id)))?;
            done
        }
        Write::RefundConcurrencyPackage { id, at } => {
            let n = conn
                .prepare_cached(
                    "UPDATE concurrency_packages SET refunded_at = ?2 WHERE id = ?1 AND refunded_at IS NULL",
                )
                .and_then(|mut st| st.execute(params![id, at.to_string()]))
                .map_err(internal)?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("concurrency package {id}")));
            }
            done
        }
        Write::AppendUsage(ev) => {
            let json = serde_json::to_string(ev).map_err(internal)?;
            conn.prepare_cached(
                "INSERT INTO usage_events(id, account, time, json) VALUES (?1, ?2, ?3, ?4)",
            )
            .and_then(|mut st| st.execute(params![ev.id, ev.subject, ev.time, json]))
            .map_err(|e| map_write_error(e, &format!("usage event {}", ev.id)))?;
            let seq = conn.last_insert_rowid() as u64;
            Ok((
                Committed::Usage { seq },
                Some(Pending {
                    seq,
                    id: ev.id.clone(),
                    time: ev.time.clone(),
                    json,
                }),
            ))
        }
    }
}

/// Brings the JSON Lines export up to date with the database: finds where
/// the files (or the recorded watermark) end and appends what follows.
fn recover_export(conn: &mut Connection, dir: &Path) -> Result<JsonlSink, StoreError> {
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
        let rows: Vec<(u64, String, String, String)> = conn
            .prepare("SELECT seq, id, time, json FROM usage_events WHERE seq > ?1 ORDER BY seq LIMIT 10000")
            .and_then(|mut st| {
                st.query_map([after as i64], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?, r.get(3)?))
                })?
                .collect()
            })
            .map_err(internal)?;
        if rows.is_empty() {
            break;
        }
        sink.append(rows.iter().map(|(seq, id, time, json)| ExportedEvent {
            seq: *seq,
            id,
            time,
            json,
        }))
        .map_err(internal)?;
    }
    Ok(sink)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::commit;
    use crate::usage::{UsageData, UsageEvent};

    fn event(account: &str) -> UsageEvent {
        UsageEvent::new(
            "t",
            Timestamp::now(),
            UsageData {
                account: account.into(),
                sub_account: None,
                api: "ImageStyleTransfer".into(),
                units: 1,
                request_id: "r".into(),
                status: 200,
                queue_wait_ms: 0,
                upstream_ms: 1,
                charged_to: "postpaid".into(),
                client_gone: false,
            },
        )
    }

    fn account(id: &str) -> Write {
        Write::CreateAccount(AccountRow {
            id: id.into(),
            status: AccountStatus::Active,
            created_at: Timestamp::now(),
        })
    }

    #[tokio::test]
    async fn writes_persist_and_conflicts_are_typed() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        commit(&store, account("acme")).await.unwrap();
        let dup = commit(&store, account("acme")).await;
        assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
        let orphan = commit(
            &store,
            Write::CreateSubAccount(SubAccountRow {
                id: "x".into(),
                root: "nobody".into(),
                max_concurrency: None,
                created_at: Timestamp::now(),
            }),
        )
        .await;
        assert!(matches!(orphan, Err(StoreError::NotFound(_))), "{orphan:?}");
        let Committed::Usage { seq: s1 } =
            commit(&store, Write::AppendUsage(Box::new(event("acme"))))
                .await
                .unwrap()
        else {
            panic!()
        };
        let Committed::Usage { seq: s2 } =
            commit(&store, Write::AppendUsage(Box::new(event("acme"))))
                .await
                .unwrap()
        else {
            panic!()
        };
        assert!(s2 > s1);
        store.close();
        drop(store);

        let store = SqliteStore::open(dir.path()).unwrap();
        let snap = store.load(Timestamp::now()).unwrap();
        assert_eq!(snap.accounts.len(), 1);
        let evs = store.usage_events(0, 10).unwrap();
        assert_eq!(evs.len(), 2);
        assert_eq!(store.usage_events(s1, 10).unwrap().len(), 1);
        let lines = std::fs::read_dir(dir.path().join("usage"))
            .unwrap()
            .map(|e| {
                std::fs::read_to_string(e.unwrap().path())
                    .unwrap()
                    .lines()
                    .count()
            })
            .sum::<usize>();
        assert_eq!(lines, 2, "each event exported exactly once");
    }

    #[tokio::test]
    async fn a_lost_export_is_rebuilt_without_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        commit(&store, account("acme")).await.unwrap();
        for _ in 0..3 {
            commit(&store, Write::AppendUsage(Box::new(event("acme"))))
                .await
                .unwrap();
        }
        store.close();
        drop(store);
        // Simulate a crash that lost the last export line.
        let usage = dir.path().join("usage");
        let file = std::fs::read_dir(&usage)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let text = std::fs::read_to_string(&file).unwrap();
        let kept: Vec<&str> = text.lines().take(1).collect();
        std::fs::write(&file, format!("{}\n", kept.join("\n"))).unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        store.close();
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(text.lines().count(), 3);
    }
}
