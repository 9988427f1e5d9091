//! Persistence behind a trait: accounts, sub-accounts, keys and usage events.
//! No business rules live here.
//!
//! Every write goes through [`Store::submit`] and is acknowledged only once
//! it is durable. Implementations are free to batch writes (the SQLite one
//! commits groups of them with one fsync).

mod sqlite;

use jiff::Timestamp;
use rust_decimal::Decimal;
use serde_json::value::RawValue;
use tokio::sync::oneshot;

use crate::accounts::{AccountStatus, KeyHash};
use crate::billing::{Bill, ResourcePackage};
use crate::entitlements::ConcurrencyPackage;
use crate::usage::UsageEvent;

pub use sqlite::SqliteStore;

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
        balance_after_usd: Decimal,
        arrears_since: Option<Timestamp>,
        at: Timestamp,
    },
    Settle {
        month: String,
        lines: Vec<SettlementLine>,
        at: Timestamp,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    Done,
    /// The usage event's sequence number: its position in commit order.
    Usage {
        seq: u64,
    },
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("already exists: {0}")]
    Conflict(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("the store is closed")]
    Closed,
    #[error("storage failure: {0}")]
    Internal(String),
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

/// A stored usage event with its cursor.
#[derive(Debug)]
pub struct StoredEvent {
    pub seq: u64,
    pub event: Box<RawValue>,
}

pub type Ack = oneshot::Sender<Result<Committed, StoreError>>;

pub trait Store: Send + Sync + 'static {
    /// Everything to rebuild memory from; packages that ended before `now`
    /// are left out.
    fn load(&self, now: Timestamp) -> Result<Snapshot, StoreError>;

    /// Queues a write; `ack` is answered once it is durable (or failed).
    fn submit(&self, write: Write, ack: Ack);

    /// Usage events with `seq > after`, in commit order, at most `limit`.
    /// Blocking: call from a blocking context.
    fn usage_events(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError>;

    /// A billing month's successful calls by account and charge source (all
    /// accounts, or one). Blocking.
    fn month_usage(
        &self,
        month: &str,
        account: Option<&str>,
    ) -> Result<Vec<MonthUsage>, StoreError>;

    /// What earlier settlements of `month` charged each account. Blocking.
    fn settled(&self, month: &str) -> Result<Vec<(String, Decimal)>, StoreError>;

    /// Commits what is queued, stops the writer and waits for it.
    fn close(&self);
}

/// Submits a write and waits until it is durable.
pub async fn commit(store: &dyn Store, write: Write) -> Result<Committed, StoreError> {
    let (tx, rx) = oneshot::channel();
    store.submit(write, tx);
    rx.await.unwrap_or(Err(StoreError::Closed))
}
