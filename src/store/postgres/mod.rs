//! PostgreSQL: the durable store many replicas share (SPEC §8).
//!
//! Writes go through one writer task per process (group commit, see
//! `writer`); reads use a connection pool; the change feed listens on a
//! connection of its own (`feed`). During an outage usage appends are
//! spooled locally (`spool`) and delivered later (`deliver`).

mod apply;
mod deliver;
mod feed;
mod jobs;
mod read;
mod schema;
mod spool;
mod writer;

// For `tollgate migrate` (`store::migrate`): the same schema, the same locks.
pub(super) use schema::migrate as migrate_schema;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use jiff::Timestamp;
use rust_decimal::Decimal;
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;

use crate::idempotency::IdempotencyRecord;
use crate::jobs::{Job, JobStatus};

use super::{
    AccountSnapshot, Ack, BoxFuture, Change, JobToRun, MonthUsage, PackageUsage, Snapshot, Store,
    StoreError, StoreHealth, StoredEvent, Write,
};

/// Advisory lock keys (`pg_advisory_xact_lock`), one per thing serialized
/// across replicas. "tollgate" in ASCII, then a number.
const LOCK_MIGRATIONS: i64 = 0x746f_6c6c_6761_0001;
pub(super) const LOCK_EVENTS: i64 = 0x746f_6c6c_6761_0002;
pub(super) const LOCK_CHANGES: i64 = 0x746f_6c6c_6761_0003;

/// How long the writer spools without trying PostgreSQL after a failure.
const DOWN_BACKOFF: Duration = Duration::from_millis(500);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

fn internal(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(e.to_string())
}

/// Whether an error means the database cannot be reached (or cannot serve
/// now), rather than a refused statement.
fn is_outage(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        // No SQL state: I/O, a closed connection, a timeout.
        None => true,
        Some(c) => {
            c.code().starts_with("08")
                || *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
                || *c == SqlState::TOO_MANY_CONNECTIONS
        }
    }
}

fn unavailable(reason: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable {
        reason: reason.to_string(),
        retryable: true,
    }
}

fn pg_error(e: tokio_postgres::Error) -> StoreError {
    if is_outage(&e) {
        unavailable(e)
    } else {
        internal(e)
    }
}

/// A failed write: duplicates are conflicts, missing parents not-found.
fn pg_write_error(e: tokio_postgres::Error, what: &str) -> StoreError {
    match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => StoreError::Conflict(what.to_string()),
        Some(c) if *c == SqlState::FOREIGN_KEY_VIOLATION => StoreError::NotFound(what.to_string()),
        _ => pg_error(e),
    }
}

async fn client(pool: &Pool) -> Result<deadpool_postgres::Client, StoreError> {
    pool.get().await.map_err(|e| match e {
        deadpool_postgres::PoolError::Backend(e) => pg_error(e),
        other => unavailable(other),
    })
}

/// The URL with its password replaced, for messages and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<postgres url>".into();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_string();
    };
    let user = userinfo.split(':').next().unwrap_or("");
    if userinfo.contains(':') {
        format!("{scheme}://{user}:***@{host}")
    } else {
        format!("{scheme}://{user}@{host}")
    }
}

/// What the writer, the delivery task and the store share.
struct Shared {
    pool: Pool,
    spool: spool::Spool,
    spool_wake: Notify,
    available: AtomicBool,
    /// Milliseconds after `epoch` of the last failure to reach PostgreSQL.
    down_at_ms: AtomicU64,
    epoch: Instant,
    /// One sequence for this process's committed account changes (not
    /// usage) and its reads of accounts, so they can be ordered.
    local_seq: AtomicU64,
    /// Account → the `local_seq` of this process's last commit changing it.
    local_changes: Mutex<std::collections::HashMap<String, u64>>,
}

impl Shared {
    fn note_local_changes(&self, accounts: &std::collections::BTreeSet<String>) {
        if accounts.is_empty() {
            return;
        }
        let mut map = self.local_changes.lock().unwrap_or_else(|e| e.into_inner());
        for account in accounts {
            let seq = self.local_seq.fetch_add(1, Ordering::SeqCst) + 1;
            map.insert(account.clone(), seq);
        }
    }

    fn mark_available(&self) {
        if !self.available.swap(true, Ordering::Relaxed) {
            tracing::info!("PostgreSQL reachable again");
        }
    }

    fn mark_down(&self, e: &StoreError) {
        self.down_at_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        if self.available.swap(false, Ordering::Relaxed) {
            tracing::error!(error = %e, "PostgreSQL unreachable: usage events go to the local spool, admin writes fail");
        }
        self.spool_wake.notify_one();
    }

    fn recently_down(&self) -> bool {
        !self.available.load(Ordering::Relaxed)
            && self.epoch.elapsed().as_millis() as u64
                <= self.down_at_ms.load(Ordering::Relaxed) + DOWN_BACKOFF.as_millis() as u64
    }
}

pub struct PostgresStore {
    jobs: mpsc::UnboundedSender<writer::Job>,
    shared: Arc<Shared>,
    changes: broadcast::Sender<Change>,
    /// Stops the change feed and the spool delivery.
    stop: CancellationToken,
    closed: Mutex<bool>,
}

impl PostgresStore {
    /// Connects, applies migrations, delivers what an earlier run left in
    /// `<data_dir>/spool/`, and starts the writer, the change feed and the
    /// spool delivery. Needs a tokio runtime.
    pub async fn open(
        url: &str,
        data_dir: &Path,
        instance: &str,
    ) -> Result<Arc<dyn Store>, StoreError> {
        let shown = redact(url);
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|e| StoreError::Unavailable {
                reason: format!("storage.postgres_url {shown}: {e}"),
                retryable: false,
            })?;
        config
            .application_name(format!("tollgate/{instance}"))
            .connect_timeout(CONNECT_TIMEOUT);
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(8)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(internal)?;
        let last_change: i64 = {
            let mut c = client(&pool).await.map_err(|e| match e {
                StoreError::Unavailable { reason, retryable } => StoreError::Unavailable {
                    reason: format!("cannot reach PostgreSQL at {shown}: {reason}"),
                    retryable,
                },
                other => other,
            })?;
            schema::migrate(&mut c).await?;
            c.query_one("SELECT coalesce(max(seq), 0) FROM changes", &[])
                .await
                .map_err(pg_error)?
                .get(0)
        };
        let spool = spool::Spool::open(&data_dir.join("spool"))
            .map_err(|e| internal(format!("usage spool in {}: {e}", data_dir.display())))?;
        let shared = Arc::new(Shared {
            pool,
            spool,
            spool_wake: Notify::new(),
            available: AtomicBool::new(true),
            down_at_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            local_seq: AtomicU64::new(0),
            local_changes: Mutex::new(Default::default()),
        });
        if shared.spool.count() > 0 {
            // Before the caller loads: packages' `used` then include these.
            if let Err(e) = deliver::deliver(&shared).await {
                tracing::warn!(error = %e, "spooled usage events of an earlier run not delivered yet");
            }
        }
        let (changes, _) = broadcast::channel(4096);
        let stop = CancellationToken::new();
        let (jobs, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer::run(shared.clone(), rx));
        tokio::spawn(feed::run(
            config,
            changes.clone(),
            last_change,
            stop.clone(),
        ));
        tokio::spawn(deliver::run(shared.clone(), stop.clone()));
        Ok(Arc::new(Self {
            jobs,
            shared,
            changes,
            stop,
            closed: Mutex::new(false),
        }))
    }
}

impl Store for PostgresStore {
    fn load(&self, now: Timestamp) -> BoxFuture<'_, Result<Snapshot, StoreError>> {
        Box::pin(read::snapshot(&self.shared.pool, now, None))
    }

    fn load_account<'a>(
        &'a self,
        id: &'a str,
        now: Timestamp,
    ) -> BoxFuture<'a, Result<Option<AccountSnapshot>, StoreError>> {
        Box::pin(async move {
            let snap = read::snapshot(&self.shared.pool, now, Some(id)).await?;
            Ok(snap.into_single())
        })
    }

    fn submit(&self, write: Write, ack: Ack) {
        if let Err(mpsc::error::SendError(writer::Job::Write(_, ack))) =
            self.jobs.send(writer::Job::Write(write, ack))
        {
            ack.send(Err(StoreError::Closed));
        }
    }

    fn usage_events(
        &self,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<StoredEvent>, StoreError>> {
        Box::pin(read::usage_events(&self.shared.pool, after, limit))
    }

    fn month_usage<'a>(
        &'a self,
        month: &'a str,
        account: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<MonthUsage>, StoreError>> {
        Box::pin(read::month_usage(&self.shared.pool, month, account))
    }

    fn settled<'a>(
        &'a self,
        month: &'a str,
    ) -> BoxFuture<'a, Result<Vec<(String, Decimal)>, StoreError>> {
        Box::pin(read::settled(&self.shared.pool, month))
    }

    fn package_usage(
        &self,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<Vec<PackageUsage>, StoreError>> {
        Box::pin(read::package_usage(&self.shared.pool, now))
    }

    fn idempotency_record<'a>(
        &'a self,
        account: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<IdempotencyRecord>, StoreError>> {
        Box::pin(async move {
            // A success spooled during an outage holds its key before it
            // reaches PostgreSQL: a retry meanwhile must replay it, not
            // run again (and be charged twice once the spool is
            // delivered). Delivery clears the spool only after its commit.
            if self.shared.spool.count() > 0 {
                let spooled = self
                    .shared
                    .spool
                    .lock()
                    .await
                    .read()
                    .map_err(|e| internal(format!("usage spool: {e}")))?;
                let found = spooled.into_iter().rev().find_map(|e| {
                    e.idempotency
                        .filter(|r| r.account == account && r.key == key)
                });
                if let Some(r) = found {
                    return Ok(Some(*r));
                }
            }
            read::idempotency_record(&self.shared.pool, account, key).await
        })
    }

    fn watermark<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let client = client(&self.shared.pool).await?;
            let row = client
                .query_opt("SELECT seq FROM watermarks WHERE name = $1", &[&name])
                .await
                .map_err(pg_error)?;
            Ok(row.map_or(0, |r| r.get::<_, i64>(0) as u64))
        })
    }

    fn feed_end(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let client = client(&self.shared.pool).await?;
            let row = client
                .query_one("SELECT coalesce(max(seq), 0) FROM usage_events", &[])
                .await
                .map_err(pg_error)?;
            Ok(row.get::<_, i64>(0) as u64)
        })
    }

    fn job<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Job>, StoreError>> {
        Box::pin(jobs::job(&self.shared.pool, id))
    }

    fn job_to_run<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<JobToRun>, StoreError>> {
        Box::pin(jobs::to_run(&self.shared.pool, id))
    }

    fn unfinished_jobs(&self) -> BoxFuture<'_, Result<Vec<Job>, StoreError>> {
        Box::pin(jobs::unfinished(&self.shared.pool))
    }

    fn jobs_of<'a>(
        &'a self,
        account: &'a str,
        status: Option<JobStatus>,
        after: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Job>, StoreError>> {
        Box::pin(jobs::of_account(
            &self.shared.pool,
            account,
            status,
            after,
            limit,
        ))
    }

    fn changes(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    fn health(&self) -> StoreHealth {
        if *self.closed.lock().unwrap_or_else(|e| e.into_inner()) {
            return StoreHealth::Unavailable;
        }
        let spooled = self.shared.spool.count();
        if spooled > 0 || !self.shared.available.load(Ordering::Relaxed) {
            StoreHealth::Degraded { spooled }
        } else {
            StoreHealth::Ok
        }
    }

    fn spooled(&self) -> u64 {
        self.shared.spool.count()
    }

    fn read_mark(&self) -> u64 {
        self.shared.local_seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn changed_locally_since(&self, account: &str, mark: u64) -> bool {
        let map = self
            .shared
            .local_changes
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        map.get(account).is_some_and(|seq| *seq > mark)
    }

    fn close(&self) {
        let mut closed = self.closed.lock().unwrap_or_else(|e| e.into_inner());
        if *closed {
            return;
        }
        *closed = true;
        let (done, wait) = std::sync::mpsc::channel();
        if self.jobs.send(writer::Job::Close(done)).is_ok() {
            // Bounded: a batch gives up after the writer's commit timeout.
            let _ = wait.recv_timeout(Duration::from_secs(30));
        }
        self.stop.cancel();
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // Never block in drop: the writer finishes what it has on its own.
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn urls_lose_their_password() {
        assert_eq!(
            redact("postgres://u:s3cret@db:5432/x"),
            "postgres://u:***@db:5432/x"
        );
        assert_eq!(redact("postgres://u@db/x"), "postgres://u@db/x");
        assert_eq!(redact("host=db password=x"), "<postgres url>");
    }
}
