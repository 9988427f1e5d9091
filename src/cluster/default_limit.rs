//! `limits.default_concurrency` across replicas: one value in Redis, so two
//! replicas never enforce different limits for one account. The first
//! replica's value (or a reload's) is the cluster's; a replica whose own
//! config says otherwise is warned by name and follows the cluster. The
//! heartbeat reads it, so a reload on one replica reaches every replica
//! within a quarter lease.

use tokio::sync::watch;

use super::coordinator::Coordinator;
use super::health::Op;
use super::keys;
use super::scripts::DEFAULT_CONCURRENCY;

impl Coordinator {
    async fn default_script(&self, value: u32, set: bool) -> Result<u32, super::ClusterError> {
        let mut inv = DEFAULT_CONCURRENCY.prepare_invoke();
        inv.key(keys::default_concurrency(&self.prefix))
            .arg(value)
            .arg(if set { "1" } else { "0" });
        let v: i64 = self.call(Op::Heartbeat, &inv).await?;
        Ok(u32::try_from(v).unwrap_or(value).max(1))
    }

    /// At start: the cluster's value (this replica's `mine` if it is the
    /// first), logged when it differs from `mine`.
    pub async fn agree_default_limit(&self, mine: u32) -> Result<u32, super::ClusterError> {
        let agreed = self.default_script(mine, false).await?;
        if agreed != mine {
            tracing::warn!(
                config = mine,
                cluster = agreed,
                "limits.default_concurrency differs from the cluster's: the cluster's value is in force (a reload of any replica with a new value changes it for all)"
            );
        }
        self.default_limit.send_replace(agreed);
        Ok(agreed)
    }

    /// A reload changed the value: it becomes the cluster's. Spawned (the
    /// reload does not wait for Redis); this replica applies it once Redis
    /// has it, through [`Coordinator::default_limit_changes`].
    pub fn publish_default_limit(self: &std::sync::Arc<Self>, value: u32) {
        let c = self.clone();
        self.spawn(async move {
            match c.default_script(value, true).await {
                Ok(v) => {
                    c.default_limit.send_replace(v);
                }
                Err(e) => tracing::warn!(error = %e, "limits.default_concurrency not published: the next reload or start retries"),
            }
        });
    }

    /// The value in force, changed by any replica's reload.
    pub fn default_limit_changes(&self) -> watch::Receiver<u32> {
        self.default_limit.subscribe()
    }

    /// The heartbeat's share: the cluster's value (set again if Redis lost
    /// it).
    pub(super) async fn beat_default_limit(&self) {
        let known = *self.default_limit.borrow();
        if known == 0 {
            return;
        }
        if let Ok(v) = self.default_script(known, false).await
            && v != known
        {
            tracing::info!(
                limit = v,
                "limits.default_concurrency changed across the cluster"
            );
            self.default_limit.send_replace(v);
        }
    }
}
