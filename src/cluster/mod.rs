//! Cluster mode (SPEC §8): what N replicas must share *now* goes through
//! Redis — the per-account slots and FIFO queue ([`RedisLimiter`]) and the
//! quota reservations ([`RedisQuota`]) — as short leases that one batched
//! heartbeat per replica renews, so a crashed replica's share returns
//! within a lease. [`Coordinator`] is the replica's membership: the
//! connections, its unique instance name, the heartbeat, and the outage
//! state that switches to the configured policy while Redis is unreachable.
//!
//! Every decision is a Lua script (`lua/`) that reads the server's clock,
//! purges what expired, then decides: one round trip per acquire, per
//! release and per reservation.
//!
//! Wiring, when `cluster.redis_url` is set:
//!
//! ```ignore
//! let coord = Coordinator::start(ClusterSettings::from_config(&cfg.cluster, &cfg.server.instance))
//!     .await?; // ClusterError::InstanceTaken → exit code 2
//! let limiter = Arc::new(RedisLimiter::new(
//!     coord.clone(),
//!     cfg.limits.default_concurrency,
//!     cfg.limits.max_queue_per_account,
//! ));
//! let quota = RedisQuota::new(coord.clone(), accounts.clone());
//! // /readyz under `reject`: coord.is_coordinated();
//! // metrics: coord.coordination_errors(), coord.leases_lost();
//! // shutdown: limiter.shut_down(), then coord.close().await.
//! ```
//!
//! The heartbeat and the grant-hint listener are started by
//! [`Coordinator::start`] and stop with [`Coordinator::close`] (or when the
//! last handle is dropped).

mod coordinator;
mod default_limit;
mod health;
mod heartbeat;
mod keys;
mod lease;
mod limiter;
mod markers;
mod pool;
mod pubsub;
mod quota;
mod registry;
mod scripts;
mod tickets;
mod wait;

pub use coordinator::{ClusterError, ClusterSettings, Coordinator};
pub use health::Op;
pub use limiter::RedisLimiter;
pub use markers::RedisMarkers;
pub use quota::RedisQuota;

#[cfg(test)]
mod tests;
