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
    /// quarter lease, so watching it for half a lease tells a live twin
    /// (refused) from a predecessor killed without leaving (taken over;
    /// its tickets expire with their leases, and carry another boot id).
    pub(super) async fn claim_instance(&self) -> Result<(), ClusterError> {
        let first: i64 = self.instances_call("claim").await?;
        if first == 0 {
            return Ok(());
        }
        tracing::info!(instance = %self.instance, "a registry entry with this name is live: watching it");
        let until = Instant::now() + self.lease / 2;
        while Instant::now() < until {
            tokio::time::sleep(CLAIM_POLL).await;
            let seen: i64 = self.instances_call("claim").await?;
            if seen == 0 {
                return Ok(());
            }
            if seen != first {
                return Err(ClusterError::InstanceTaken {
                    instance: self.instance.clone(),
                });
            }
        }
        tracing::warn!(instance = %self.instance, "taking over a registry entry nobody renews");
        self.instances_call::<i64>("take").await?;
        Ok(())
    }

    /// Renews this replica's entry; returns how many replicas are live.
    pub(super) async fn beat_instance(&self) -> Result<u32, ClusterError> {
        let n: i64 = self.instances_call("beat").await?;
        Ok(u32::try_from(n).unwrap_or(1).max(1))
    }
}
