//! The replica registry (`{prefix}:instances`, instance → liveness
//! deadline): claiming a unique instance name at start and counting the
//! live replicas, the divisor of the limit during a Redis outage.

use std::time::Duration;

use redis::FromRedisValue;
use tokio::time::Instant;

use super::coordinator::{ClusterError, Coordinator};
use super::health::Op;
use super::keys;
use super::scripts::INSTANCES;

/// How often a contested name is looked at while deciding whether its
/// holder is alive.
const CLAIM_POLL: Duration = Duration::from_millis(100);

impl Coordinator {
    pub(super) async fn instances_call<T: FromRedisValue>(
        &self,
        mode: &str,
    ) -> Result<T, ClusterError> {
        let mut inv = INSTANCES.prepare_invoke();
        inv.key(keys::instances(&self.prefix))
            .arg(&self.instance)
            .arg(self.lease_ms())
            .arg(mode);
        self.call(Op::Heartbeat, &inv).await
    }

    /// Takes the instance name. A live replica renews its entry every
    /// quarter lease, so an entry that is renewed while we watch belongs to
    /// a live twin (refused); one that lapses (the script drops entries past
    /// their deadline) belonged to a predecessor killed without leaving, and
    /// is taken. Watching until the entry lapses, not a fixed part of the
    /// lease, means a twin whose heartbeat is merely late is never taken
    /// over; a restart after a crash waits at most one lease for its name.
    pub(super) async fn claim_instance(&self) -> Result<(), ClusterError> {
        let first: i64 = self.instances_call("claim").await?;
        if first == 0 {
            return Ok(());
        }
        tracing::info!(instance = %self.instance, "a registry entry with this name is live: watching it");
        let until = Instant::now() + self.lease + Duration::from_secs(1);
        while Instant::now() < until {
            tokio::time::sleep(CLAIM_POLL).await;
            let seen: i64 = self.instances_call("claim").await?;
            if seen == 0 {
                tracing::warn!(instance = %self.instance, "took over a registry entry nobody renewed");
                return Ok(());
            }
            if seen != first {
                return Err(ClusterError::InstanceTaken {
                    instance: self.instance.clone(),
                });
            }
        }
        // Neither renewed nor lapsed within a lease: only a clock jump on
        // the Redis server does that. Refuse rather than guess.
        Err(ClusterError::InstanceTaken {
            instance: self.instance.clone(),
        })
    }

    /// Renews this replica's entry; returns how many replicas are live.
    pub(super) async fn beat_instance(&self) -> Result<u32, ClusterError> {
        let n: i64 = self.instances_call("beat").await?;
        Ok(u32::try_from(n).unwrap_or(1).max(1))
    }
}
