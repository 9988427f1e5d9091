//! `tollgate migrate`: moves a single node's SQLite database into an empty
//! PostgreSQL database, for an operator who outgrows one node (SPEC §8).
//!
//! This module owns the whole move: parsing `--from sqlite:<data_dir>` and
//! `--to postgres:<url>`, making sure no gateway still runs on the source,
//! applying the PostgreSQL store's own migrations, copying every table in
//! one PostgreSQL transaction, checking the counts, and the summary. It
//! reads the SQLite database through a read-only connection and never
//! merges: a target that holds any data is refused.
//!
//! Usage event numbers (`seq`) are copied as they are and the PostgreSQL
//! sequence is set past the largest: a `next` cursor a consumer got from
//! the single node, and the JSON Lines export's `usage.cursor`, stay valid
//! on the cluster, so nothing is missed or read twice. The ledger keeps its
//! numbers the same way. (Letting PostgreSQL number them afresh would
//! keep the order too, but would turn every saved cursor into a wrong one.)
//! Timestamps are cut to PostgreSQL's microseconds; decimals keep their
//! scale; SQLite's 0/1 become booleans. The JSON Lines files
//! (`<data_dir>/usage/*.jsonl`) are not part of the database and stay where
//! they are.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::future::try_join_all;
use jiff::civil::Date;
use jiff::{RoundMode, Timestamp, TimestampRound, Unit};
use rusqlite::{Connection, OpenFlags};
use rust_decimal::Decimal;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Transaction};

use super::StoreError;
use super::postgres::{LOCK_CHANGES, LOCK_EVENTS, migrate_schema, redact};

/// `tollgate migrate` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateArgs {
    /// The single node's data: `sqlite:<storage.data_dir>` (the directory
    /// holding `tollgate.db`). Stop the gateway first.
    #[arg(long, value_name = "sqlite:DATA_DIR")]
    pub from: String,
    /// The empty PostgreSQL database: `postgres:<url>`, e.g.
    /// `postgres:postgres://tollgate@db:5432/tollgate`.
    #[arg(long, value_name = "postgres:URL")]
    pub to: String,
}

/// Why a migration did not happen. Nothing is written to the target in
/// any of these cases (the copy is one transaction).
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("--from: expected sqlite:<data_dir>, got {0:?}")]
    BadFrom(String),
    /// Holds the redacted form only: the password is never shown.
    #[error("--to: expected postgres:<url> (e.g. postgres:postgres://user@host:5432/db), got {0}")]
    BadTo(String),
    #[error("no tollgate database at {0}: nothing to migrate")]
    NoSource(PathBuf),
    #[error("{0} is not a tollgate database: table {1} is missing")]
    NotTollgate(PathBuf, &'static str),
    #[error(
        "{0} is in use by another process (a gateway still running on it?): stop the gateway first"
    )]
    SourceInUse(PathBuf),
    #[error(
        "the target {target} already holds data ({tables}): tollgate migrate only fills an empty database and never merges into a live one"
    )]
    TargetNotEmpty { target: String, tables: String },
    #[error("reading {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{table}: {detail}")]
    BadValue { table: &'static str, detail: String },
    #[error("PostgreSQL at {target}: {source}")]
    Postgres {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("PostgreSQL schema at {target}: {source}")]
    Schema {
        target: String,
        #[source]
        source: StoreError,
    },
    #[error(
        "{table}: {read} rows read from SQLite but {stored} in PostgreSQL; nothing was committed"
    )]
    CountMismatch {
        table: &'static str,
        read: u64,
        stored: i64,
    },
}

impl MigrateError {
    /// 2 for a refusal (bad arguments, no source, source in use, target not
    /// empty): running it again unchanged cannot help. 1 for a failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::BadFrom(_)
            | Self::BadTo(_)
            | Self::NoSource(_)
            | Self::NotTollgate(..)
            | Self::SourceInUse(_)
            | Self::TargetNotEmpty { .. } => 2,
            _ => 1,
        }
    }
}

/// What was copied, for the summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub source: PathBuf,
    /// The target URL without its password.
    pub target: String,
    /// `(table, rows copied)`, in copy order.
    pub tables: Vec<(&'static str, u64)>,
    /// The largest usage event number copied (0: none).
    pub last_event_seq: i64,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "tollgate migrate: copied {} into {}",
            self.source.display(),
            self.target
        )?;
        for (table, rows) in &self.tables {
            writeln!(f, "  {table:<22}{rows:>10} rows")?;
        }
        writeln!(
            f,
            "usage event numbers kept (last {}): cursors from the single node stay valid.",
            self.last_event_seq
        )?;
        writeln!(
            f,
            "not moved: the JSON Lines export ({}/usage/*.jsonl) stays where it is.",
            self.source.parent().unwrap_or(Path::new(".")).display()
        )?;
        writeln!(
            f,
            "next: start the gateway(s) with storage.kind = \"postgres\" and this URL."
        )
    }
}

/// The source and target, checked.
#[derive(Debug)]
struct Plan {
    db: PathBuf,
    url: String,
    shown: String,
}

fn plan(args: &MigrateArgs) -> Result<Plan, MigrateError> {
    let dir = args
        .from
        .strip_prefix("sqlite:")
        .filter(|d| !d.is_empty())
        .ok_or_else(|| MigrateError::BadFrom(args.from.clone()))?;
    let url = args
        .to
        .strip_prefix("postgres:")
        .filter(|u| !u.is_empty())
        .ok_or_else(|| MigrateError::BadTo(redact(&args.to)))?;
    // `--to postgres://u@h/db` (the URL alone) is taken as it is written.
    let url = if url.starts_with("//") {
        args.to.as_str()
    } else {
        url
    };
    let shown = redact(url);
    url.parse::<tokio_postgres::Config>()
        .map_err(|_| MigrateError::BadTo(shown.clone()))?;
    let db = Path::new(dir).join("tollgate.db");
    if !db.is_file() {
        return Err(MigrateError::NoSource(db));
    }
    Ok(Plan {
        db,
        url: url.to_string(),
        shown,
    })
}

/// Refuses when another connection has the database open. In WAL mode
/// every open connection (the gateway keeps three) holds a shared lock on
/// the file for its whole life, so an exclusive lock is only granted when
/// nobody else has it open, idle or not; `BEGIN IMMEDIATE` alone would
/// only catch a write in progress. This connection is read-write because
/// SQLite grants that lock to no read-only one; it changes no row (if a
/// crash left a WAL behind, closing it folds the WAL into the file).
fn ensure_unused(db: &Path) -> Result<(), MigrateError> {
    let err = |source| MigrateError::Sqlite {
        path: db.to_path_buf(),
        source,
    };
    // No CREATE flag: never makes a database where there was none.
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(err)?;
    conn.busy_timeout(Duration::from_millis(500)).map_err(err)?;
    conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
        .map_err(err)?;
    match conn.execute_batch("BEGIN EXCLUSIVE; ROLLBACK;") {
        Ok(()) => {}
        Err(rusqlite::Error::SqliteFailure(f, _))
            if matches!(
                f.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ) =>
        {
            return Err(MigrateError::SourceInUse(db.to_path_buf()));
        }
        Err(e) => return Err(err(e)),
    }
    conn.close().map_err(|(_, e)| err(e))
}

/// One table's rows: how to read one from SQLite and write it to
/// PostgreSQL. `SELECT` and `INSERT` name the same columns in the same
/// order; values are converted to the PostgreSQL store's types (TEXT
/// RFC 3339 to timestamptz, decimal text to numeric with its scale,
/// INTEGER 0/1 to boolean).
trait CopyRow: Sized {
    const TABLE: &'static str;
    const SELECT: &'static str;
    const INSERT: &'static str;
    /// The query for this source: `SELECT`, unless the source was made by
    /// an earlier version that lacks a column (which then reads as NULL).
    fn select(_src: &rusqlite::Connection) -> String {
        Self::SELECT.to_string()
    }
    fn read(row: &rusqlite::Row<'_>) -> Result<Self, ReadError>;
    fn params(&self) -> Vec<&(dyn ToSql + Sync)>;
}

/// A row that could not be read or converted (before the table is known).
enum ReadError {
    Sqlite(rusqlite::Error),
    Value(String),
}

impl From<rusqlite::Error> for ReadError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Sqlite(e)
    }
}

/// An RFC 3339 timestamp, cut to PostgreSQL's microseconds. Cut, not
/// rounded (the driver would round): rounding could move a time into the
/// next millisecond, and the API shows milliseconds, so a view would
/// change across the move.
fn ts(s: &str) -> Result<Timestamp, ReadError> {
    let t: Timestamp = s
        .parse()
        .map_err(|e| ReadError::Value(format!("bad timestamp {s:?}: {e}")))?;
    t.round(
        TimestampRound::new()
            .smallest(Unit::Microsecond)
            .mode(RoundMode::Trunc),
    )
    .map_err(|e| ReadError::Value(format!("timestamp {s:?}: {e}")))
}

fn opt_ts(s: Option<String>) -> Result<Option<Timestamp>, ReadError> {
    s.as_deref().map(ts).transpose()
}

fn usd(s: &str) -> Result<Decimal, ReadError> {
    s.parse()
        .map_err(|e| ReadError::Value(format!("bad amount {s:?}: {e}")))
}

struct Account {
    id: String,
    status: String,
    created_at: Timestamp,
    postpaid: bool,
    balance_usd: Decimal,
    arrears_since: Option<Timestamp>,
}

impl CopyRow for Account {
    const TABLE: &'static str = "accounts";
    const SELECT: &'static str = "SELECT id, status, created_at, postpaid, balance_usd, arrears_since FROM accounts ORDER BY id";
    const INSERT: &'static str =
        "INSERT INTO accounts(id, status, created_at, postpaid, balance_usd, arrears_since)
         VALUES ($1, $2, $3, $4, $5, $6)";
    fn read(r: &rusqlite::Row<'_>) -> Result<Self, ReadError> {
        Ok(Self {
            id: r.get(0)?,
            status: r.get(1)?,
            created_at: ts(&r.get::<_, String>(2)?)?,
            postpaid: r.get::<_, i64>(3)? != 0,
            balance_usd: usd(&r.get::<_, String>(4)?)?,
            arrears_since: opt_ts(r.get(5)?)?,
        })
    }
    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.id,
            &self.status,
            &self.created_at,
            &self.postpaid,
            &self.balance_usd,
            &self.arrears_since,
        ]
    }
}

struct SubAccount {
    id: String,
    root: String,
    max_concurrency: Option<i64>,
    created_at: Timestamp,
}

impl CopyRow for SubAccount {
    const TABLE: &'static str = "sub_accounts";
    const SELECT: &'static str =
        "SELECT id, root, max_concurrency, created_at FROM sub_accounts ORDER BY id";
    const INSERT: &'static str = "INSERT INTO sub_accounts(id, root, max_concurrency, created_at)
         VALUES ($1, $2, $3, $4)";
    fn read(r: &rusqlite::Row<'_>) -> Result<Self, ReadError> {
        Ok(Self {
            id: r.get(0)?,
            root: r.get(1)?,
            max_concurrency: r.get(2)?,
            created_at: ts(&r.get::<_, String>(3)?)?,
        })
    }
    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.id,
            &self.root,
            &self.max_concurrency,
            &self.created_at,
        ]
    }
}

struct ApiKey {
    key_id: String,
    hash: Vec<u8>,
    root: String,
    sub: Option<String>,
    created_at: Timestamp,
    revoked_at: Option<Timestamp>,
    sealed_secret: Option<String>,
}

impl CopyRow for ApiKey {
    const TABLE: &'static str = "api_keys";
    const SELECT: &'static str =
        "SELECT key_id, hash, root, sub, created_at, revoked_at, sealed_secret
         FROM api_keys ORDER BY key_id";
    const INSERT: &'static str =
        "INSERT INTO api_keys(key_id, hash, root, sub, created_at, revoked_at, sealed_secret)
         VALUES ($1, $2, $3, $4, $5, $6, $7)";
    fn select(src: &rusqlite::Connection) -> String {
        let has_sealed = src
            .query_row(
                "SELECT count(*) FROM pragma_table_info('api_keys') WHERE name = 'sealed_secret'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .is_ok_and(|n| n > 0);
        if has_sealed {
            Self::SELECT.to_string()
        } else {
            Self::SELECT.replace(", sealed_secret", ", NULL")
        }
    }
    fn read(r: &rusqlite::Row<'_>) -> Result<Self, ReadError> {
        let key_id: String = r.get(0)?;
        let hash: Vec<u8> = r.get(1)?;
        // Both stores refuse to load a key whose hash is not a SHA-256.
        if hash.len() != 32 {
            return Err(ReadError::Value(format!(
                "key {key_id}: hash is {} bytes, not 32",
                hash.len()
            )));
        }
        Ok(Self {
            key_id,
            hash,
            root: r.get(2)?,
            sub: r.get(3)?,
            created_at: ts(&r.get::<_, String>(4)?)?,
            revoked_at: opt_ts(r.get(5)?)?,
            sealed_secret: r.get(6)?,
        })
    }
    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.key_id,
            &self.hash,
            &self.root,
            &self.sub,
            &self.created_at,
            &self.revoked_at,
            &self.sealed_secret,
        ]
    }
}

struct ConcurrencyPackage {
    id: String,
    account: String,
    units: i64,
    period: String,
    start_date: Date,
    starts_at: Timestamp,
    ends_at: Timestamp,
    price_usd: Decimal,
    bought_at: Timestamp,
    refunded_at: Option<Timestamp>,
}

impl CopyRow for ConcurrencyPackage {
    const TABLE: &'static str = "concurrency_packages";
    const SELECT: &'static str =
        "SELECT id, account, units, period, start_date, starts_at, ends_at, price_usd,
         bought_at, refunded_at FROM concurrency_packages ORDER BY id";
    const INSERT: &'static str = "INSERT INTO concurrency_packages
         (id, account, units, period, start_date, starts_at, ends_at, price_usd, bought_at, refunded_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";
    fn read(r: &rusqlite::Row<'_>) -> Result<Self, ReadError> {
        let start: String = r.get(4)?;
        Ok(Self {
            id: r.get(0)?,
            account: r.get(1)?,
            units: r.get(2)?,
            period: r.get(3)?,
            start_date: start
                .parse()
                .map_err(|e| ReadError::Value(format!("bad date {start:?}: {e}")))?,
            starts_at: ts(&r.get::<_, String>(5)?)?,
            ends_at: ts(&r.get::<_, String>(6)?)?,
            price_usd: usd(&r.get::<_, String>(7)?)?,
            bought_at: ts(&r.get::<_, String>(8)?)?,
            refunded_at: opt_ts(r.get(9)?)?,
        })
    }
    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.id,
            &self.account,
            &self.units,
            &self.period,
            &self.start_date,
            &self.starts_at,
            &self.ends_at,
            &self.price_usd,
            &self.bought_at,
            &self.refunded_at,
        ]
    }
}

struct ResourcePackage {
    id: String,
    account: String,
    kind: String,
    size: i64,
    used: i64,
    effective_at: Timestamp,
    expires_at: Timestamp,
    price_usd: Decimal,
    refunded_at: Option<Timestamp>,
}

impl CopyRow for ResourcePackage {
    const TABLE: &'static str = "resource_packages";
    const SELECT: &'static str =
        "SELECT id, account, kind, size, used, effective_at, expires_at, price_usd,
         refunded_at FROM resource_packages ORDER BY id";
    const INSERT: &'static str = "INSERT INTO resource_packages
         (id, account, kind, size, used, effective_at, expires_at, price_usd, refunded_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
    fn read(r: &rusqlite::Row<'_>) -> Result<Self, ReadError> {
        Ok(Self {
            id: r.get(0)?,
            account: r.get(1)?,
            kind: r.get(2)?,
            size: r.get(3)?,
            used: r.get(4)?,
            effective_at: ts(&r.get::<_, String>(5)?)?,
            expires_at: ts(&r.get::<_, String>(6)?)?,
            price_usd: usd(&r.get::<_, String>(7)?)?,
            refunded_at: opt_ts(r.get(8)?)?,
        })
    }
    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.id,
            &self.account,
            &self.kind,
            &self.size,
            &self.used,
            &self.effective_at,
            &self.expires_at,
            &self.price_usd,
            &self.refunded_at,
        ]
    }
}

struct UsageEvent {
    seq: i64,
    id: String,
    account: String,
    time: Timestamp,
    charged_to: String,
    /// Copied byte for byte: the feed serves the event as recorded.
    json: String,
}

impl CopyRow for UsageEvent {
    const TABLE: &'static str = "usage_events";
    // In seq order: the cursor order on PostgreSQL is the old one.
    const SELECT: &'static str =
        "SELECT seq, id, account, time, charged_to, json FROM usage_events ORDER BY seq";
    const INSERT: &'static str =
        "INSERT INTO usage_events(seq, id, account, time, charged_to, json)
         VALUES ($1, $2, $3, $4, $5, $6)";
    fn read(r: &rusqlite::Row<'_>) -> Result<Self, ReadError> {
        Ok(Self {
            seq: r.get(0)?,
            id: r.get(1)?,
            account: r.get(2)?,
            time: ts(&r.get::<_, String>(3)?)?,
            charged_to: r.get(4)?,
            json: r.get(5)?,
        })
    }
    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.seq,
            &self.id,
            &self.account,
            &self.time,
            &self.charged_to,
            &self.json,
        ]
    }
}

struct UsageCounter {
    account: String,
    month: String,
    source: String,
    calls: i64,
}

impl CopyRow for UsageCounter {
    const TABLE: &'static str = "usage_counters";
    const SELECT: &'static str =
        "SELECT account, month, source, calls FROM usage_counters ORDER BY account, month, source";
    const INSERT: &'static str =
        "INSERT INTO usage_counters(account, month, source, calls) VALUES ($1, $2, $3, $4)";
    fn read(r: &rusqlite::Row<'_>) -> Result<Self, ReadError> {
        Ok(Self {
            account: r.get(0)?,
            month: r.get(1)?,
            source: r.get(2)?,
            calls: r.get(3)?,
        })
    }
    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![&self.account, &self.month, &self.source, &self.calls]
    }
}

struct Settlement {
    account: String,
    month: String,
    calls: i64,
    postpaid_units: i64,
    unit_price_usd: Decimal,
    amount_usd: Decimal,
    settled_at: Timestamp,
}

impl CopyRow for Settlement {
    const TABLE: &'static str = "settlements";
    const SELECT: &'static str =
        "SELECT account, month, calls, postpaid_units, unit_price_usd, amount_usd, settled_at
         FROM settlements ORDER BY account, month";
    const INSERT: &'static str = "INSERT INTO settlements
         (account, month, calls, postpaid_units, unit_price_usd, amount_usd, settled_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)";
    fn read(r: &rusqlite::Row<'_>) -> Result<Self, ReadError> {
        Ok(Self {
            account: r.get(0)?,
            month: r.get(1)?,
            calls: r.get(2)?,
            postpaid_units: r.get(3)?,
            unit_price_usd: usd(&r.get::<_, String>(4)?)?,
            amount_usd: usd(&r.get::<_, String>(5)?)?,
            settled_at: ts(&r.get::<_, String>(6)?)?,
        })
    }
    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.account,
            &self.month,
            &self.calls,
            &self.postpaid_units,
            &self.unit_price_usd,
            &self.amount_usd,
            &self.settled_at,
        ]
    }
}

struct LedgerEntry {
    seq: i64,
    account: String,
    kind: String,
    amount_usd: Decimal,
    balance_after_usd: Decimal,
    memo: String,
    at: Timestamp,
}

impl CopyRow for LedgerEntry {
    const TABLE: &'static str = "ledger";
    const SELECT: &'static str =
        "SELECT seq, account, kind, amount_usd, balance_after_usd, memo, at
         FROM ledger ORDER BY seq";
    const INSERT: &'static str =
        "INSERT INTO ledger(seq, account, kind, amount_usd, balance_after_usd, memo, at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)";
    fn read(r: &rusqlite::Row<'_>) -> Result<Self, ReadError> {
        Ok(Self {
            seq: r.get(0)?,
            account: r.get(1)?,
            kind: r.get(2)?,
            amount_usd: usd(&r.get::<_, String>(3)?)?,
            balance_after_usd: usd(&r.get::<_, String>(4)?)?,
            memo: r.get(5)?,
            at: ts(&r.get::<_, String>(6)?)?,
        })
    }
    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.seq,
            &self.account,
            &self.kind,
            &self.amount_usd,
            &self.balance_after_usd,
            &self.memo,
            &self.at,
        ]
    }
}

/// A remembered idempotency key: a retry after the move still replays.
struct IdempotencyKeyRow {
    account: String,
    idem_key: String,
    fingerprint: Vec<u8>,
    status: Option<i64>,
    headers: Option<String>,
    body: Option<Vec<u8>>,
    created_at_ms: i64,
    expires_at_ms: i64,
}

impl CopyRow for IdempotencyKeyRow {
    const TABLE: &'static str = "idempotency_keys";
    const SELECT: &'static str = "SELECT account, idem_key, fingerprint, status, headers, body,
         created_at_ms, expires_at_ms FROM idempotency_keys ORDER BY account, idem_key";
    const INSERT: &'static str = "INSERT INTO idempotency_keys
         (account, idem_key, fingerprint, status, headers, body, created_at_ms, expires_at_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
    fn read(r: &rusqlite::Row<'_>) -> Result<Self, ReadError> {
        Ok(Self {
            account: r.get(0)?,
            idem_key: r.get(1)?,
            fingerprint: r.get(2)?,
            status: r.get(3)?,
            headers: r.get(4)?,
            body: r.get(5)?,
            created_at_ms: r.get(6)?,
            expires_at_ms: r.get(7)?,
        })
    }
    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.account,
            &self.idem_key,
            &self.fingerprint,
            &self.status,
            &self.headers,
            &self.body,
            &self.created_at_ms,
            &self.expires_at_ms,
        ]
    }
}

/// A job, queued or finished: it runs (or is queried) after the move.
struct JobRow {
    /// id, account, sub_account, api, action, status.
    cols: [Option<String>; 6],
    /// created_at_ms, started_at_ms, finished_at_ms, result_status.
    times: [Option<i64>; 4],
    /// body, result_body.
    blobs: [Option<Vec<u8>>; 2],
    /// request, result_headers, error_code, charged_to.
    extra: [Option<String>; 4],
}

impl CopyRow for JobRow {
    const TABLE: &'static str = "jobs";
    const SELECT: &'static str = "SELECT id, account, sub_account, api, action, status,
         created_at_ms, started_at_ms, finished_at_ms, result_status, body, result_body,
         request, result_headers, error_code, charged_to FROM jobs ORDER BY id";
    const INSERT: &'static str = "INSERT INTO jobs
         (id, account, sub_account, api, action, status, created_at_ms, started_at_ms,
          finished_at_ms, result_status, body, result_body, request, result_headers, error_code,
          charged_to)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)";
    fn read(r: &rusqlite::Row<'_>) -> Result<Self, ReadError> {
        Ok(Self {
            cols: [
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ],
            times: [r.get(6)?, r.get(7)?, r.get(8)?, r.get(9)?],
            blobs: [r.get(10)?, r.get(11)?],
            extra: [r.get(12)?, r.get(13)?, r.get(14)?, r.get(15)?],
        })
    }
    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        let mut p: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(16);
        p.extend(self.cols.iter().map(|c| c as &(dyn ToSql + Sync)));
        p.extend(self.times.iter().map(|c| c as &(dyn ToSql + Sync)));
        p.extend(self.blobs.iter().map(|c| c as &(dyn ToSql + Sync)));
        p.extend(self.extra.iter().map(|c| c as &(dyn ToSql + Sync)));
        p
    }
}

/// Tables a database made by an earlier version may lack: copied when
/// present (a missing one has no rows to carry).
const LATER_TABLES: [&str; 2] = ["idempotency_keys", "jobs"];

/// Every table the copy fills, parents before children (foreign keys).
/// The SQLite `meta` table is not copied: the store never reads it.
const TABLES: [&str; 11] = [
    "accounts",
    "sub_accounts",
    "api_keys",
    "concurrency_packages",
    "resource_packages",
    "usage_events",
    "usage_counters",
    "settlements",
    "ledger",
    "idempotency_keys",
    "jobs",
];

/// Rows sent to PostgreSQL at once: the inserts of a chunk are pipelined
/// on the connection, so a chunk costs about one round trip.
const CHUNK: usize = 1000;

/// The PostgreSQL side of a copy, for error messages.
struct Target<'a> {
    tx: &'a Transaction<'a>,
    shown: &'a str,
}

impl Target<'_> {
    fn pg(&self, source: tokio_postgres::Error) -> MigrateError {
        MigrateError::Postgres {
            target: self.shown.to_string(),
            source,
        }
    }
}

/// Copies one table in chunks; returns the rows copied.
async fn copy<R: CopyRow>(
    src: &Connection,
    db: &Path,
    to: &Target<'_>,
) -> Result<u64, MigrateError> {
    let sqlite = |source| MigrateError::Sqlite {
        path: db.to_path_buf(),
        source,
    };
    if !has_table(src, R::TABLE).map_err(sqlite)? {
        return Ok(0);
    }
    let insert = to.tx.prepare(R::INSERT).await.map_err(|e| to.pg(e))?;
    let mut st = src.prepare(&R::select(src)).map_err(sqlite)?;
    let mut rows = st.query([]).map_err(sqlite)?;
    let mut copied = 0u64;
    loop {
        let mut chunk = Vec::with_capacity(CHUNK);
        while chunk.len() < CHUNK {
            let Some(row) = rows.next().map_err(sqlite)? else {
                break;
            };
            chunk.push(R::read(row).map_err(|e| match e {
                ReadError::Sqlite(e) => sqlite(e),
                ReadError::Value(detail) => MigrateError::BadValue {
                    table: R::TABLE,
                    detail,
                },
            })?);
        }
        if chunk.is_empty() {
            return Ok(copied);
        }
        let insert = &insert;
        try_join_all(chunk.iter().map(|row| {
            let params = row.params();
            async move { to.tx.execute(insert, &params).await }
        }))
        .await
        .map_err(|e| to.pg(e))?;
        copied += chunk.len() as u64;
    }
}

fn has_table(src: &Connection, table: &str) -> rusqlite::Result<bool> {
    src.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
        [table],
        |r| r.get(0),
    )
}

/// Tables of the target that already hold a row.
async fn nonempty_tables(to: &Target<'_>) -> Result<Vec<&'static str>, MigrateError> {
    let mut found = Vec::new();
    for table in TABLES {
        let sql = format!("SELECT EXISTS (SELECT 1 FROM {table})");
        let any: bool = to
            .tx
            .query_one(&sql, &[])
            .await
            .map_err(|e| to.pg(e))?
            .get(0);
        if any {
            found.push(table);
        }
    }
    Ok(found)
}

/// Runs the migration: see the module doc.
pub async fn run(args: &MigrateArgs) -> Result<Summary, MigrateError> {
    let plan = plan(args)?;
    let sqlite = |source| MigrateError::Sqlite {
        path: plan.db.clone(),
        source,
    };
    ensure_unused(&plan.db)?;
    let src = Connection::open_with_flags(
        &plan.db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sqlite)?;
    for table in TABLES {
        if LATER_TABLES.contains(&table) {
            continue;
        }
        if !has_table(&src, table).map_err(sqlite)? {
            return Err(MigrateError::NotTollgate(plan.db.clone(), table));
        }
    }

    let pg = |source| MigrateError::Postgres {
        target: plan.shown.clone(),
        source,
    };
    let mut config: tokio_postgres::Config = plan
        .url
        .parse()
        .map_err(|_| MigrateError::BadTo(plan.shown.clone()))?;
    config
        .application_name("tollgate/migrate")
        .connect_timeout(Duration::from_secs(5));
    let (mut client, connection) = config.connect(NoTls).await.map_err(pg)?;
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "migrate: PostgreSQL connection ended");
        }
    });
    migrate_schema(&mut client)
        .await
        .map_err(|source| MigrateError::Schema {
            target: plan.shown.clone(),
            source,
        })?;

    let tx = client.transaction().await.map_err(pg)?;
    // The writer's locks, in the writer's order: no replica (nor another
    // migrate) numbers events or changes while this copy runs, and a second
    // migrate waits here, then finds the data and refuses.
    for lock in [LOCK_EVENTS, LOCK_CHANGES] {
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock])
            .await
            .map_err(pg)?;
    }
    let to = Target {
        tx: &tx,
        shown: &plan.shown,
    };
    let found = nonempty_tables(&to).await?;
    if !found.is_empty() {
        return Err(MigrateError::TargetNotEmpty {
            target: plan.shown.clone(),
            tables: found.join(", "),
        });
    }

    // One read transaction: every table from the same moment.
    src.execute_batch("BEGIN").map_err(sqlite)?;
    let db = plan.db.as_path();
    let tables = vec![
        ("accounts", copy::<Account>(&src, db, &to).await?),
        ("sub_accounts", copy::<SubAccount>(&src, db, &to).await?),
        ("api_keys", copy::<ApiKey>(&src, db, &to).await?),
        (
            "concurrency_packages",
            copy::<ConcurrencyPackage>(&src, db, &to).await?,
        ),
        (
            "resource_packages",
            copy::<ResourcePackage>(&src, db, &to).await?,
        ),
        ("usage_events", copy::<UsageEvent>(&src, db, &to).await?),
        ("usage_counters", copy::<UsageCounter>(&src, db, &to).await?),
        ("settlements", copy::<Settlement>(&src, db, &to).await?),
        ("ledger", copy::<LedgerEntry>(&src, db, &to).await?),
        (
            "idempotency_keys",
            copy::<IdempotencyKeyRow>(&src, db, &to).await?,
        ),
        ("jobs", copy::<JobRow>(&src, db, &to).await?),
    ];
    // Counted in the same read transaction: a row the copy skipped or read
    // twice would show here.
    for (table, copied) in &tables {
        let sql = format!("SELECT count(*) FROM {table}");
        let read: i64 = if has_table(&src, table).map_err(sqlite)? {
            src.query_row(&sql, [], |r| r.get(0)).map_err(sqlite)?
        } else {
            0
        };
        let stored: i64 = tx.query_one(&sql, &[]).await.map_err(pg)?.get(0);
        if read as u64 != *copied || stored != read {
            return Err(MigrateError::CountMismatch {
                table,
                read: read as u64,
                stored,
            });
        }
    }
    src.execute_batch("COMMIT").map_err(sqlite)?;

    // Seqs were copied, so the sequences must continue after them: the
    // next event a replica records sorts after every migrated one.
    let last_event_seq: i64 = tx
        .query_one("SELECT coalesce(max(seq), 0) FROM usage_events", &[])
        .await
        .map_err(pg)?
        .get(0);
    if last_event_seq > 0 {
        tx.execute("SELECT setval('usage_events_seq', $1)", &[&last_event_seq])
            .await
            .map_err(pg)?;
    }
    tx.execute(
        "SELECT setval(pg_get_serial_sequence('ledger', 'seq'), max(seq)) FROM ledger HAVING count(*) > 0",
        &[],
    )
    .await
    .map_err(pg)?;
    // Announce every account on the change feed: a replica that was
    // already running on the empty database loads them without a restart.
    tx.execute(
        "INSERT INTO changes(account) SELECT id FROM accounts ORDER BY id",
        &[],
    )
    .await
    .map_err(pg)?;
    tx.batch_execute("NOTIFY tollgate_changes")
        .await
        .map_err(pg)?;

    // A gateway started on the source while we read could have written
    // after our snapshot: check again before anything becomes visible.
    drop(src);
    ensure_unused(&plan.db)?;
    tx.commit().await.map_err(pg)?;
    drop(client);
    let _ = driver.await;
    Ok(Summary {
        source: plan.db.clone(),
        target: plan.shown.clone(),
        tables,
        last_event_seq,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(from: &str, to: &str) -> MigrateArgs {
        MigrateArgs {
            from: from.into(),
            to: to.into(),
        }
    }

    #[test]
    fn bad_forms_are_refused_with_exit_code_2() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tollgate.db"), b"").unwrap();
        let from = format!("sqlite:{}", dir.path().display());
        for (f, t) in [
            ("/var/lib/tollgate", "postgres:postgres://u@h/db"),
            ("sqlite:", "postgres:postgres://u@h/db"),
            ("postgres:x", "postgres:postgres://u@h/db"),
            (from.as_str(), "mysql://u:pw@h/db"),
            (from.as_str(), "postgres:"),
            (from.as_str(), "postgres:postgres://u:pw@h:notaport/db"),
        ] {
            let e = plan(&args(f, t)).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{f} {t}: {e}");
            assert!(!e.to_string().contains("pw"), "password shown: {e}");
        }
    }

    #[test]
    fn both_url_spellings_are_taken() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tollgate.db"), b"").unwrap();
        let from = format!("sqlite:{}", dir.path().display());
        for t in [
            "postgres:postgres://u:pw@h:5432/db",
            "postgres://u:pw@h:5432/db",
            "postgres:host=h user=u dbname=db",
        ] {
            let p = plan(&args(&from, t)).unwrap();
            assert!(!p.shown.contains("pw"), "{}", p.shown);
        }
    }

    #[test]
    fn timestamps_are_cut_to_microseconds_never_rounded_up() {
        let Ok(t) = ts("2026-03-01T12:00:00.123999999Z") else {
            panic!("a valid timestamp");
        };
        assert_eq!(t.to_string(), "2026-03-01T12:00:00.123999Z");
        assert!(ts("yesterday").is_err());
    }

    #[test]
    fn a_missing_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = plan(&args(
            &format!("sqlite:{}", dir.path().display()),
            "postgres:postgres://u@h/db",
        ))
        .unwrap_err();
        assert!(matches!(e, MigrateError::NoSource(_)), "{e}");
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn an_open_database_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("tollgate.db");
        let open = Connection::open(&db).unwrap();
        open.pragma_update(None, "journal_mode", "WAL").unwrap();
        open.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .unwrap();
        // Idle, as a gateway between commits is.
        let e = ensure_unused(&db).unwrap_err();
        assert!(matches!(e, MigrateError::SourceInUse(_)), "{e}");
        drop(open);
        ensure_unused(&db).unwrap();
    }
}
