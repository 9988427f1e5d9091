//! One replica's membership in the cluster: the Redis connections, its
//! identity (instance name, boot id, ticket ids), the registries of what it
//! holds and waits for, and the background tasks that keep them alive.
//!
//! [`RedisLimiter`](super::RedisLimiter) and [`RedisQuota`](super::RedisQuota)
//! are views over one `Coordinator`, so the replica sends one batched
//! heartbeat for both.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, ScriptInvocation};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::health::{Health, Op};
use super::markers::MarkerState;
use super::pool::PoolView;
use super::quota::UnitState;
use super::tickets::TicketState;
use super::{heartbeat, keys, pubsub};
use crate::config::{ClusterConfig, RedisOutagePolicy, redact_url};

/// What a replica needs to join the cluster.
#[derive(Clone)]
pub struct ClusterSettings {
    pub redis_url: String,
    pub key_prefix: String,
    /// A dead replica's slots, tickets and reservations return within this;
    /// live ones renew theirs every quarter of it.
    pub lease: Duration,
    pub on_outage: RedisOutagePolicy,
    /// `server.instance`: unique among live replicas.
    pub instance: String,
}

impl ClusterSettings {
    pub fn from_config(cluster: &ClusterConfig, instance: &str) -> Self {
        Self {
            redis_url: cluster.redis_url.clone(),
            key_prefix: cluster.key_prefix.clone(),
            lease: Duration::from_millis(cluster.lease_ms),
            on_outage: cluster.on_redis_outage,
            instance: instance.to_string(),
        }
    }
}

// Hand-written so a password in the URL never reaches a log line.
impl std::fmt::Debug for ClusterSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSettings")
            .field("redis_url", &redact_url(&self.redis_url))
            .field("key_prefix", &self.key_prefix)
            .field("lease", &self.lease)
            .field("on_outage", &self.on_outage)
            .field("instance", &self.instance)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Redis could not be reached at start. The URL is redacted.
    #[error("cannot connect to Redis at {url}: {source}")]
    Connect {
        url: String,
        source: redis::RedisError,
    },
    /// Another live replica renews a registry entry with this name: the
    /// integrator exits with code 2 (SPEC §8.9).
    #[error("another live replica is named {instance:?} (server.instance must be unique)")]
    InstanceTaken { instance: String },
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
}

pub struct Coordinator {
    pub(super) conn: ConnectionManager,
    pub(super) client: redis::Client,
    pub(super) prefix: String,
    pub(super) instance: String,
    /// `<instance>:<boot id>:`: a restarted replica never mistakes the
    /// tickets of its previous life for its own.
    ticket_base: String,
    next_ticket: AtomicU64,
    pub(super) lease: Duration,
    /// Bounds every Redis exchange, so an unreachable Redis turns into the
    /// outage policy instead of a hang.
    op_timeout: Duration,
    pub(super) policy: RedisOutagePolicy,
    pub(super) channel_prefix: String,
    pub(super) health: Health,
    /// Limiter tickets of this replica, queued or holding a slot.
    pub(super) tickets: DashMap<Arc<str>, TicketState>,
    /// Quota reservations of this replica.
    pub(super) units: DashMap<Arc<str>, UnitState>,
    /// Idempotency keys' in-progress markers this replica holds.
    pub(super) markers: DashMap<Arc<str>, MarkerState>,
    /// `limits.default_concurrency` as the cluster applies it (0 until
    /// agreed at start).
    pub(super) default_limit: tokio::sync::watch::Sender<u32>,
    /// Every pool this replica has touched, as last seen.
    pub(super) pools: DashMap<Arc<str>, PoolView>,
    /// Releases and cancels spawned from `Drop`; `close` awaits them.
    tasks: TaskTracker,
    /// `Drop` may run outside the runtime's context: spawns go through
    /// the handle taken at start.
    runtime: Handle,
    pub(super) stop: CancellationToken,
    aborted: AtomicBool,
}

impl Coordinator {
    /// Connects, claims the instance name (waiting up to half a lease to
    /// tell a crashed predecessor from a live twin), subscribes to grant
    /// hints and starts the heartbeat. Must run inside a tokio runtime.
    pub async fn start(settings: ClusterSettings) -> Result<Arc<Self>, ClusterError> {
        let url = redact_url(&settings.redis_url);
        let connect_err = |source| ClusterError::Connect {
            url: url.clone(),
            source,
        };
        let client = redis::Client::open(settings.redis_url.as_str()).map_err(connect_err)?;
        let op_timeout =
            (settings.lease / 2).clamp(Duration::from_millis(200), Duration::from_secs(2));
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(op_timeout)
            .set_response_timeout(op_timeout)
            .set_number_of_retries(1)
            .set_max_delay(500);
        let conn = match tokio::time::timeout(
            op_timeout * 2,
            ConnectionManager::new_with_config(client.clone(), config),
        )
        .await
        {
            Ok(r) => r.map_err(connect_err)?,
            Err(_) => return Err(ClusterError::Timeout(op_timeout * 2)),
        };
        let boot: u64 = rand::random();
        let coord = Arc::new(Self {
            conn,
            client,
            channel_prefix: keys::grant_channel_prefix(&settings.key_prefix),
            prefix: settings.key_prefix,
            ticket_base: format!("{}:{boot:016x}:", settings.instance),
            instance: settings.instance,
            next_ticket: AtomicU64::new(0),
            lease: settings.lease,
            op_timeout,
            policy: settings.on_outage,
            health: Health::new(),
            tickets: DashMap::new(),
            units: DashMap::new(),
            markers: DashMap::new(),
            default_limit: tokio::sync::watch::Sender::new(0),
            pools: DashMap::new(),
            tasks: TaskTracker::new(),
            runtime: Handle::current(),
            stop: CancellationToken::new(),
            aborted: AtomicBool::new(false),
        });
        coord.claim_instance().await?;
        let live = coord.beat_instance().await?;
        coord.health.set_live_replicas(live);
        pubsub::start(&coord).await?;
        heartbeat::start(&coord);
        tracing::info!(instance = %coord.instance, redis = %url, "joined the cluster");
        Ok(coord)
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// False while Redis is unreachable (`/readyz` under `reject`).
    pub fn is_coordinated(&self) -> bool {
        self.health.is_coordinated()
    }

    /// Failed Redis exchanges per `op` label, for
    /// `tollgate_coordination_errors_total{op}`.
    pub fn coordination_errors(&self) -> [(&'static str, u64); 5] {
        self.health.errors()
    }

    /// Slots and reservations whose lease expired before it could be
    /// renewed (`tollgate_leases_lost_total`).
    pub fn leases_lost(&self) -> u64 {
        self.health.leases_lost()
    }

    /// Replicas with a live registry entry, as last seen.
    pub fn live_replicas(&self) -> u32 {
        self.health.live_replicas()
    }

    /// Stops the background tasks, waits for the releases already spawned
    /// and leaves the replica registry, so a restart need not wait.
    pub async fn close(&self) {
        self.stop.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(self.op_timeout * 2, self.tasks.wait()).await;
        // Committed units not yet settled by a heartbeat: settle them now,
        // or their lapsing leases would hand their units out again.
        let _ = tokio::time::timeout(self.op_timeout * 2, self.beat_units()).await;
        if let Err(e) = self.instances_call::<i64>("leave").await {
            tracing::debug!(error = %e, "could not leave the replica registry");
        }
    }

    /// A crash, for tests: the heartbeat stops and nothing held is given
    /// back; Redis must find out through the leases.
    #[cfg(test)]
    pub(crate) fn abort(&self) {
        self.aborted.store(true, Ordering::Release);
        self.stop.cancel();
        self.tickets.clear();
        self.units.clear();
    }

    pub(super) fn aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }

    pub(super) fn new_ticket(&self) -> Arc<str> {
        let n = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        Arc::from(format!("{}{n}", self.ticket_base))
    }

    pub fn lease_ms(&self) -> u64 {
        self.lease.as_millis() as u64
    }

    /// One script round trip, bounded; a failure feeds the outage state.
    pub(super) async fn call<T: FromRedisValue>(
        &self,
        op: Op,
        inv: &ScriptInvocation<'_>,
    ) -> Result<T, ClusterError> {
        let mut conn = self.conn.clone();
        let err = match tokio::time::timeout(self.op_timeout, inv.invoke_async(&mut conn)).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => ClusterError::Redis(e),
            Err(_) => ClusterError::Timeout(self.op_timeout),
        };
        self.health.failed(op, &err);
        Err(err)
    }

    /// Runs cleanup that `Drop` cannot await. False if the replica was
    /// aborted (nothing runs any more).
    pub(super) fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) -> bool {
        if self.aborted() {
            return false;
        }
        self.tasks.spawn_on(fut, &self.runtime);
        true
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
