//! Persistence behind a trait: accounts, sub-accounts, keys and usage events.
//! No business rules live here.
//!
//! Every write goes through [`Store::submit`] and is acknowledged only once
//! it is durable. Implementations are free to batch writes (the SQLite one
//! commits groups of them with one fsync).

mod sqlite;

use jiff::Timestamp;
use serde_json::value::RawValue;
use tokio::sync::oneshot;

use crate::accounts::{AccountStatus, KeyHash};
use crate::entitlements::ConcurrencyPackage;
use crate::usage::UsageEvent;

pub use sqlite::SqliteStore;

#[derive(Debug, Clone)]
pub struct AccountRow {
    pub id: String,
    pub status: AccountStatus,
    pub created_at: Timestamp,
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
    CreateAccount(AccountRow),
    SetAccountStatus { id: String, status: AccountStatus },
    CreateSubAccount(SubAccountRow),
    CreateKey(KeyRow),
    RevokeKey { key_id: String, at: Timestamp },
    AppendUsage(Box<UsageEvent>),
    CreateConcurrencyPackage(Box<ConcurrencyPackage>),
    RefundConcurrencyPackage { id: String, at: Timestamp },
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

    /// Commits what is queued, stops the writer and waits for it.
    fn close(&self);
}

/// Submits a write and waits until it is durable.
pub async fn commit(store: &dyn Store, write: Write) -> Result<Committed, StoreError> {
    let (tx, rx) = oneshot::channel();
    store.submit(write, tx);
    rx.await.unwrap_or(Err(StoreError::Closed))
}
