//! Persistence behind a trait: accounts, sub-accounts, keys and usage events.
//! No business rules live here.
//!
//! Every write goes through [`Store::submit`] and is acknowledged only once
//! it is durable. Implementations are free to batch writes (both commit
//! groups of them in one transaction). Two implementations: the embedded
//! SQLite one (one node) and PostgreSQL (many replicas sharing one
//! database, SPEC §8); [`open`] picks one from the config.

pub mod ack;
pub(crate) mod job_rows;
pub mod migrate;
mod postgres;
mod sqlite;

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use jiff::Timestamp;
use rust_decimal::Decimal;
use tokio::sync::{broadcast, oneshot};

use crate::accounts::{AccountStatus, KeyHash};
use crate::billing::{Bill, ResourcePackage, Source};
use crate::entitlements::ConcurrencyPackage;
use crate::idempotency::IdempotencyRecord;
use crate::jobs::{Job, JobEnd, JobRequest, JobResult, JobStatus};
use crate::usage::{EventHead, UsageEvent};

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

use crate::config::{StorageConfig, StorageKind};

#[derive(Debug, Clone)]
pub struct AccountRow {
    pub id: String,
    pub status: AccountStatus,
    pub created_at: Timestamp,
    pub postpaid: bool,
    pub balance_usd: Decimal,
    pub arrears_since: Option<Timestamp>,
}

/// One account's line of a month's settlement.
#[derive(Debug, Clone)]
pub struct SettlementLine {
    pub account: String,
    pub bill: Bill,
    /// What this settlement changes the balance by (the bill minus what
    /// earlier settlements of the month already charged).
    pub delta_usd: Decimal,
    /// The balance the line was computed from: the store refuses the line
    /// (`Conflict`) if the balance is no longer this, so two replicas never
    /// overwrite each other's balance changes.
    pub balance_before_usd: Decimal,
    pub balance_after_usd: Decimal,
    pub arrears_since: Option<Timestamp>,
}

/// A month's successful calls of one account, by charge source.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MonthUsage {
    pub account: String,
    pub calls: u64,
    pub free: u64,
    pub prepaid: u64,
    pub postpaid: u64,
}

#[derive(Debug, Clone)]
pub struct SubAccountRow {
    pub id: String,
    pub root: String,
    pub max_concurrency: Option<u32>,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone)]
pub struct KeyRow {
    pub key_id: String,
    pub hash: KeyHash,
    pub root: String,
    pub sub: Option<String>,
    pub created_at: Timestamp,
    /// A TC3 key's secret, sealed (`auth::sealed`); `None` for an API key.
    pub sealed_secret: Option<String>,
}

/// One durable change.
#[derive(Debug)]
pub enum Write {
    /// A new account and the free package of its first activation, together.
    CreateAccount {
        account: AccountRow,
        free_package: Box<ResourcePackage>,
    },
    SetAccountStatus {
        id: String,
        status: AccountStatus,
    },
    CreateSubAccount(SubAccountRow),
    CreateKey(KeyRow),
    RevokeKey {
        key_id: String,
        at: Timestamp,
    },
    /// A success's event and its charge, in one transaction: the package it
    /// is charged to (if any) gets one more unit used.
    AppendUsage {
        event: Box<UsageEvent>,
        /// The event as JSON, serialized by the caller so the single
        /// writer thread does not have to.
        json: String,
        package: Option<String>,
        /// The billing month (`YYYY-MM` in the billing time zone) whose
        /// counters the success adds to.
        month: String,
        /// The task's idempotency key and its stored answer, committed
        /// with the event or not at all. Refused (`Conflict`) while
        /// another live record holds the key.
        idempotency: Option<Box<IdempotencyRecord>>,
        /// A job's success: its result, committed with the event or not at
        /// all. Refused (`Conflict`) unless the job is still unfinished,
        /// so a job is charged once whatever runs it twice.
        job: Option<Box<JobResult>>,
    },
    /// A new queued job and its request body (and, for a keyed submit, the
    /// key's record holding the submit's answer). Answers
    /// [`Committed::JobsFull`] instead when the account already has
    /// `max_pending` unfinished jobs.
    SubmitJob {
        job: Box<Job>,
        body: Vec<u8>,
        max_pending: u32,
        idempotency: Option<Box<IdempotencyRecord>>,
    },
    /// A queued job starts: `running` from `at`. `NotFound` unless it was
    /// queued (cancelled or run elsewhere meanwhile).
    StartJob {
        id: String,
        at: Timestamp,
    },
    /// A job ends without success (failed, cancelled, expired), or goes
    /// back to `queued` (a run given up before it reached the backend).
    /// Applied only if its status is one of `from`; else `NotFound`.
    EndJob {
        id: String,
        end: JobEnd,
        from: &'static [JobStatus],
        at: Timestamp,
    },
    /// Forgets at most `limit` finished jobs that finished before
    /// `before_ms` (Unix ms). Answers [`Committed::Purged`].
    PurgeJobs {
        before_ms: i64,
        limit: u32,
    },
    /// A sink of the event feed (the NATS stream) has everything up to
    /// `seq`: its watermark moves there, never back.
    SetWatermark {
        name: String,
        seq: u64,
    },
    CreateConcurrencyPackage(Box<ConcurrencyPackage>),
    RefundConcurrencyPackage {
        id: String,
        at: Timestamp,
    },
    CreateResourcePackage(Box<ResourcePackage>),
    RefundResourcePackage {
        id: String,
        at: Timestamp,
    },
    SetPostpaid {
        account: String,
        enabled: bool,
    },
    TopUp {
        account: String,
        amount_usd: Decimal,
        /// Compare-and-set: refused (`Conflict`) unless the balance is
        /// still this.
        balance_before_usd: Decimal,
        balance_after_usd: Decimal,
        arrears_since: Option<Timestamp>,
        at: Timestamp,
    },
    Settle {
        month: String,
        lines: Vec<SettlementLine>,
        at: Timestamp,
    },
    /// Forgets at most `limit` idempotency records that expired before
    /// `before_ms` (Unix ms): bounded work per pass. Answers
    /// [`Committed::Purged`].
    PurgeIdempotency {
        before_ms: i64,
        limit: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Committed {
    Done,
    Usage {
        /// The usage event's sequence number: its position in commit
        /// order. `None` when the shared store was unreachable and the
        /// event waits in the local spool (durable there; it gets its
        /// sequence number once delivered).
        seq: Option<u64>,
        /// The payer the commit charged instead of the reserved package,
        /// which could no longer pay (it ran out or was refunded since the
        /// reservation): the next one in the deduction order, postpaid
        /// last. The stored event's `charged_to` says the same. `None`:
        /// charged as reserved.
        fell_through: Option<Source>,
    },
    /// Idempotency records (or jobs) forgotten.
    Purged(u64),
    /// A job was not submitted: its account has `max_pending` unfinished.
    JobsFull,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("already exists: {0}")]
    Conflict(String),
    #[error("not found: {0}")]
    NotFound(String),
    /// The storage cannot be reached (or answered that it cannot serve).
    /// `retryable`: the same call may succeed later unchanged.
    #[error("storage unavailable: {reason}")]
    Unavailable { reason: String, retryable: bool },
    #[error("the store is closed")]
    Closed,
    #[error("storage failure: {0}")]
    Internal(String),
}

impl StoreError {
    /// Whether repeating the same call later may succeed.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable {
                retryable: true,
                ..
            }
        )
    }
}

/// Everything the gateway rebuilds its memory from at start.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub accounts: Vec<AccountRow>,
    pub sub_accounts: Vec<SubAccountRow>,
    /// Unrevoked keys only.
    pub keys: Vec<KeyRow>,
    /// Unrefunded packages that have not ended.
    pub concurrency_packages: Vec<ConcurrencyPackage>,
    /// Every resource package, refunded ones included.
    pub resource_packages: Vec<ResourcePackage>,
}

impl Snapshot {
    /// One snapshot per account, each with its own rows.
    pub fn into_accounts(self) -> Vec<AccountSnapshot> {
        fn by<T>(rows: Vec<T>, key: impl Fn(&T) -> &str) -> HashMap<String, Vec<T>> {
            let mut m: HashMap<String, Vec<T>> = HashMap::new();
            for r in rows {
                m.entry(key(&r).to_string()).or_default().push(r);
            }
            m
        }
        let mut subs = by(self.sub_accounts, |s| &s.root);
        let mut keys = by(self.keys, |k| &k.root);
        let mut cps = by(self.concurrency_packages, |p| &p.account);
        let mut rps = by(self.resource_packages, |p| &p.account);
        self.accounts
            .into_iter()
            .map(|a| AccountSnapshot {
                sub_accounts: subs.remove(&a.id).unwrap_or_default(),
                keys: keys.remove(&a.id).unwrap_or_default(),
                concurrency_packages: cps.remove(&a.id).unwrap_or_default(),
                resource_packages: rps.remove(&a.id).unwrap_or_default(),
                account: a,
            })
            .collect()
    }

    /// The one account a snapshot read for a single account holds.
    pub fn into_single(self) -> Option<AccountSnapshot> {
        self.into_accounts().into_iter().next()
    }
}

impl MonthUsage {
    /// Folds counter rows `(account, source, calls)`, ordered by account,
    /// into one line per account.
    pub fn fold(rows: impl IntoIterator<Item = (String, String, u64)>) -> Vec<Self> {
        let mut out: Vec<Self> = Vec::new();
        for (account, source, calls) in rows {
            let u = match out.last_mut() {
                Some(u) if u.account == account => u,
                _ => {
                    out.push(Self {
                        account,
                        ..Self::default()
                    });
                    out.last_mut().expect("just pushed")
                }
            };
            u.calls += calls;
            match source.as_str() {
                "free" => u.free += calls,
                "prepaid" => u.prepaid += calls,
                _ => u.postpaid += calls,
            }
        }
        out
    }
}

/// One root account's whole durable state, as [`Snapshot`] holds it for
/// every account: what a replica refreshes its memory of that account from.
#[derive(Debug)]
pub struct AccountSnapshot {
    pub account: AccountRow,
    pub sub_accounts: Vec<SubAccountRow>,
    /// Unrevoked keys only (of the root and of its sub-accounts).
    pub keys: Vec<KeyRow>,
    /// Unrefunded packages that have not ended.
    pub concurrency_packages: Vec<ConcurrencyPackage>,
    /// Every resource package, refunded ones included, with durable `used`.
    pub resource_packages: Vec<ResourcePackage>,
}

/// One resource package's durable count of units charged to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageUsage {
    pub account: String,
    pub package: String,
    pub used: u64,
}

/// What a job's run forwards ([`Store::job_to_run`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobToRun {
    pub request: JobRequest,
    pub action: Option<String>,
    pub body: Vec<u8>,
}

/// A stored usage event with its cursor.
#[derive(Debug)]
pub struct StoredEvent {
    pub seq: u64,
    /// The event's JSON as this gateway stored it. Not parsed on the way
    /// out: the export and the stream pass it on as it is (validating it
    /// was ~5,500 instructions a task in the export); where it is embedded
    /// in another JSON document (the admin feed), it is checked there.
    pub event: String,
    /// Its id, time and subject, where the store keeps them in columns
    /// written with the JSON (SQLite: read so, they cost no parse of the
    /// event, ~2,500 instructions a task in the export); `None`: read
    /// from `event` (see [`StoredEvent::head`]).
    pub columns: Option<EventHead>,
}

impl StoredEvent {
    /// The event's id, time and subject: the store's columns, or else the
    /// head of its JSON. `None`: not an event this gateway could have
    /// written (no JSON object with an id).
    pub fn head(&self) -> Option<Cow<'_, EventHead>> {
        match &self.columns {
            Some(h) => Some(Cow::Borrowed(h)),
            None => EventHead::of(&self.event).map(Cow::Owned),
        }
    }
}

/// What the change feed announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// This root account's durable state (anything but usage counts and
    /// packages' `used`) changed: reload it with [`Store::load_account`].
    Account(String),
    /// Changes may have been missed (the feed was cut off, or the receiver
    /// lagged): reload everything.
    All,
}

/// The store's state, cheap to read, for `/readyz` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreHealth {
    Ok,
    /// Tasks are still recorded, but usage events wait in the local spool
    /// for the shared store to come back; admin writes fail meanwhile.
    Degraded {
        spooled: u64,
    },
    /// Nothing can be recorded (closed, or neither the store nor the spool
    /// accepts writes).
    Unavailable,
}

pub use ack::Ack;

/// A boxed, sendable future: what the trait's async methods return, so the
/// trait stays usable as `dyn Store`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The durable store.
///
/// Contract, for every implementation (the conformance suite in
/// `tests/store_conformance.rs` checks it):
///
/// - A write is acknowledged once it is durable, never before. Writes are
///   applied in submission order per caller; one failing write (a duplicate
///   id: [`StoreError::Conflict`]; a missing row: [`StoreError::NotFound`])
///   never fails another.
/// - A usage append and its charge stand or fall together. The reserved
///   package is charged only while it has a unit left (`used < size`) and
///   is not refunded; otherwise the commit charges the next payer in the
///   deduction order (other packages valid at the event's time, then
///   postpaid if the account has it on), rewrites the event's
///   `charged_to` and says so in [`Committed::Usage`]; with no payer left
///   the append is refused (`NotFound`). A duplicate event id is a
///   `Conflict`.
/// - Usage events are numbered in commit order: a consumer paging
///   [`Store::usage_events`] with the last `seq` it saw never misses nor
///   repeats an event, however many writers commit at once.
/// - Every committed change of an account's durable state (all but usage
///   counts and `used`), by any process sharing the store, is announced on
///   [`Store::changes`] — within 1 s for another process, and also for the
///   caller's own writes (applying a change twice must be harmless).
/// - Reads see every acknowledged write of this process.
/// - [`StoreError::Unavailable`] means the storage cannot be reached; a
///   shared store then still takes usage appends into a local fsync'd spool
///   (`Committed::Usage { seq: None }`) and delivers them exactly once later.
pub trait Store: Send + Sync + 'static {
    /// Everything to rebuild memory from; packages that ended before `now`
    /// are left out.
    fn load(&self, now: Timestamp) -> BoxFuture<'_, Result<Snapshot, StoreError>>;

    /// One root account's whole durable state (`None`: no such account);
    /// packages that ended before `now` are left out.
    fn load_account<'a>(
        &'a self,
        id: &'a str,
        now: Timestamp,
    ) -> BoxFuture<'a, Result<Option<AccountSnapshot>, StoreError>>;

    /// Queues a write; `ack` is answered once it is durable (or failed).
    fn submit(&self, write: Write, ack: Ack);

    /// Usage events with `seq > after`, in commit order, at most `limit`.
    fn usage_events(
        &self,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<StoredEvent>, StoreError>>;

    /// A billing month's successful calls by account and charge source (all
    /// accounts, or one).
    fn month_usage<'a>(
        &'a self,
        month: &'a str,
        account: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<MonthUsage>, StoreError>>;

    /// Every unrefunded resource package's durable `used`, for the ones
    /// not expired before `now`: what a shared quota is brought back in
    /// line with after an outage (units spent while it could not count).
    fn package_usage(&self, now: Timestamp)
    -> BoxFuture<'_, Result<Vec<PackageUsage>, StoreError>>;

    /// The idempotency record of `key` in root account `account`, expired
    /// or not (the caller decides with the clock).
    fn idempotency_record<'a>(
        &'a self,
        account: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<IdempotencyRecord>, StoreError>>;

    /// A sink's watermark: the last event seq it has (0: none yet).
    fn watermark<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// The seq of the last committed usage event (0: none).
    fn feed_end(&self) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// One job, without its body (`None`: no such job).
    fn job<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Job>, StoreError>>;

    /// What a job's run forwards, read when its slot comes (a queued job
    /// keeps none of it in memory): its request, action and body in one
    /// read (`None` once it has run, or no such job).
    fn job_to_run<'a>(&'a self, id: &'a str)
    -> BoxFuture<'a, Result<Option<JobToRun>, StoreError>>;

    /// Every queued or running job, oldest first: what a start runs again.
    fn unfinished_jobs(&self) -> BoxFuture<'_, Result<Vec<Job>, StoreError>>;

    /// An account's jobs with ids after `after`, by id (submission order),
    /// at most `limit`, of one status if given.
    fn jobs_of<'a>(
        &'a self,
        account: &'a str,
        status: Option<JobStatus>,
        after: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Job>, StoreError>>;

    /// What earlier settlements of `month` charged each account.
    fn settled<'a>(
        &'a self,
        month: &'a str,
    ) -> BoxFuture<'a, Result<Vec<(String, Decimal)>, StoreError>>;

    /// A new subscription to the change feed (see the contract above). A
    /// receiver that lags gets `RecvError::Lagged`: treat it as
    /// [`Change::All`].
    fn changes(&self) -> broadcast::Receiver<Change>;

    /// Cheap, synchronous: for `/readyz` and metrics.
    fn health(&self) -> StoreHealth;

    /// Usage events waiting in the local spool (`tollgate_spooled_events`).
    fn spooled(&self) -> u64 {
        0
    }

    /// A shared store: a fresh mark to take before reading an account,
    /// from the same sequence as this process's own committed account
    /// changes (usage appends aside). Later reads get greater marks.
    fn read_mark(&self) -> u64 {
        0
    }

    /// Whether this process committed a change to `account` (not a usage
    /// append) after `mark` was taken: a read with that mark may predate
    /// it, and the change's own entry in the feed brings a fresh one.
    fn changed_locally_since(&self, _account: &str, _mark: u64) -> bool {
        false
    }

    /// Commits what is queued, stops the writer and waits for it. May
    /// block: call from a blocking context.
    fn close(&self);
}

/// Submits a write and waits until it is durable.
pub async fn commit(store: &dyn Store, write: Write) -> Result<Committed, StoreError> {
    let (tx, rx) = oneshot::channel();
    store.submit(write, Ack::new(tx));
    rx.await.unwrap_or(Err(StoreError::Closed))
}

/// Opens the store `storage.kind` names. `instance` names this process to
/// a shared store (PostgreSQL's `application_name`).
pub async fn open(storage: &StorageConfig, instance: &str) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match storage.kind {
        StorageKind::Sqlite => Arc::new(SqliteStore::open(&storage.data_dir)?),
        StorageKind::Postgres => {
            PostgresStore::open(&storage.postgres_url, &storage.data_dir, instance).await?
        }
    })
}

/// The root accounts a write changes the durable state of (usage appends
/// change none: counts are not announced). Writes that name only a key or
/// package id get their account from the row they update.
pub(crate) fn changed_accounts(write: &Write) -> Vec<String> {
    match write {
        Write::CreateAccount { account, .. } => vec![account.id.clone()],
        Write::SetAccountStatus { id, .. } => vec![id.clone()],
        Write::CreateSubAccount(s) => vec![s.root.clone()],
        Write::CreateKey(k) => vec![k.root.clone()],
        Write::CreateConcurrencyPackage(p) => vec![p.account.clone()],
        Write::CreateResourcePackage(p) => vec![p.account.clone()],
        Write::SetPostpaid { account, .. } | Write::TopUp { account, .. } => {
            vec![account.clone()]
        }
        Write::Settle { lines, .. } => lines.iter().map(|l| l.account.clone()).collect(),
        Write::RevokeKey { .. }
        | Write::RefundConcurrencyPackage { .. }
        | Write::RefundResourcePackage { .. }
        | Write::AppendUsage { .. }
        | Write::PurgeIdempotency { .. }
        | Write::SubmitJob { .. }
        | Write::StartJob { .. }
        | Write::EndJob { .. }
        | Write::PurgeJobs { .. }
        | Write::SetWatermark { .. } => Vec::new(),
    }
}

/// The event charged to `payer` instead of the payer it was reserved for:
/// its `charged_to` label and its JSON, written again (the commit decided
/// another payer; the stored event says who paid). Rare, so the JSON is
/// parsed again rather than carried as a value.
/// The calls a batch adds per account, month and charge source, written
/// once per row when the batch commits instead of one upsert per event:
/// the events of a group commit mostly fall on a few rows, and each upsert
/// is a B-tree seek and a statement run (in PostgreSQL, a round trip).
/// The same transaction, so a bill never sees an event without its count.
#[derive(Default)]
pub(crate) struct UsageCounts {
    /// `account \0 month \0 source` -> calls.
    calls: std::collections::HashMap<String, i64>,
    scratch: String,
}

impl UsageCounts {
    pub(crate) fn add(&mut self, account: &str, month: &str, source: &str) {
        self.scratch.clear();
        for (i, part) in [account, month, source].into_iter().enumerate() {
            if i > 0 {
                self.scratch.push('\0');
            }
            self.scratch.push_str(part);
        }
        match self.calls.get_mut(self.scratch.as_str()) {
            Some(n) => *n += 1,
            None => {
                self.calls.insert(self.scratch.clone(), 1);
            }
        }
    }

    /// Takes over what a write that committed (its savepoint released)
    /// counted.
    pub(crate) fn merge(&mut self, other: UsageCounts) {
        for (key, n) in other.calls {
            *self.calls.entry(key).or_default() += n;
        }
    }

    /// `(account, month, source, calls)`, each row once.
    pub(crate) fn rows(&self) -> impl Iterator<Item = (&str, &str, &str, i64)> {
        self.calls.iter().filter_map(|(key, n)| {
            let mut parts = key.split('\0');
            Some((parts.next()?, parts.next()?, parts.next()?, *n))
        })
    }
}

pub(crate) fn relabel(json: &str, payer: &Source) -> Result<(String, String), StoreError> {
    let bad = |e: serde_json::Error| StoreError::Internal(format!("usage event JSON: {e}"));
    let mut event: UsageEvent = serde_json::from_str(json).map_err(bad)?;
    event.data.charged_to = payer.label();
    let json = serde_json::to_string(&event).map_err(bad)?;
    Ok((event.data.charged_to, json))
}

/// An idempotency record from its stored columns (both stores keep the
/// same ones).
#[allow(clippy::too_many_arguments)]
pub(crate) fn idempotency_row(
    account: &str,
    key: &str,
    fingerprint: &[u8],
    status: Option<i64>,
    headers: Option<String>,
    body: Option<Vec<u8>>,
    created_at_ms: i64,
    expires_at_ms: i64,
) -> Result<IdempotencyRecord, StoreError> {
    let bad = |what: &str| {
        StoreError::Internal(format!("idempotency record {account}/{key}: bad {what}"))
    };
    let fingerprint =
        crate::idempotency::Fingerprint(fingerprint.try_into().map_err(|_| bad("fingerprint"))?);
    let answer = match status {
        None => None,
        Some(status) => Some(crate::idempotency::StoredAnswer {
            status: u16::try_from(status).map_err(|_| bad("status"))?,
            headers: serde_json::from_str(headers.as_deref().unwrap_or("[]"))
                .map_err(|_| bad("headers"))?,
            body: body.unwrap_or_default(),
        }),
    };
    Ok(IdempotencyRecord {
        account: account.to_string(),
        key: key.to_string(),
        fingerprint,
        answer,
        created_at_ms,
        expires_at_ms,
    })
}

/// The stored columns of an idempotency record's answer: status, headers
/// (JSON) and body, all `None` when the answer was not kept.
pub(crate) fn answer_columns(
    r: &IdempotencyRecord,
) -> (Option<i64>, Option<String>, Option<&[u8]>) {
    job_rows::result_columns(r.answer.as_ref())
}
