//! What the admin API holds: the services that change accounts and
//! billing, and what its views and health checks read. It changes nothing
//! itself: every change goes through a service (check → commit → apply).

use std::sync::Arc;

use jiff::tz::TimeZone;
use tokio_util::sync::CancellationToken;

use crate::accounts::{AccountService, Registry};
use crate::billing::{self, BillingService};
use crate::clock::Clock;
use crate::cluster::Coordinator;
use crate::config::{Config, LiveConfig, RedisOutagePolicy};
use crate::entitlements::schedule::Schedule;
use crate::gateway::proxy::Backend;
use crate::limiter::{GateReport, Limiter};
use crate::metrics::Metrics;
use crate::store::Store;
use crate::usage::UsageRecorder;

pub struct AdminState {
    /// The running config, shared with the data plane; a reload swaps it.
    pub config: LiveConfig,
    pub clock: Arc<dyn Clock>,
    /// `billing.timezone`: days, months and cut-offs are counted in it.
    pub tz: TimeZone,
    /// Account changes (check → commit → apply).
    pub accounts: Arc<AccountService>,
    /// Billing changes (check → commit → apply).
    pub billing_service: Arc<BillingService>,
    /// Read for the account views.
    pub registry: Arc<Registry>,
    pub billing: Arc<billing::Accounts>,
    pub schedule: Arc<Schedule>,
    /// Read for `concurrency` in the account view.
    pub limiter: Arc<dyn Limiter>,
    /// The same limiter, seen by the metrics scrape.
    pub gates: Arc<dyn GateReport>,
    /// Usage reads (the event cursor) and health.
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    /// Read by `/readyz`: whether successes can be recorded.
    pub recorder: UsageRecorder,
    /// Probed by `/readyz`.
    pub backend: Arc<arc_swap::ArcSwap<Backend>>,
    /// Cluster mode: this replica's membership; `None` on a single node.
    pub coordinator: Option<Arc<Coordinator>>,
    /// Cancelled when shutdown begins (readiness turns false).
    pub stopping: CancellationToken,
    /// The jobs this replica holds (the account view's `jobs_queued`).
    pub jobs: Arc<crate::gateway::jobs::JobBook>,
}

impl AdminState {
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Why this replica cannot serve tasks for lack of coordination, if it
    /// cannot (cluster mode under `on_redis_outage = "reject"` with Redis
    /// unreachable).
    pub fn coordination_unready(&self) -> Option<&'static str> {
        let coord = self.coordinator.as_ref()?;
        (self.config().cluster.on_redis_outage == RedisOutagePolicy::Reject
            && !coord.is_coordinated())
        .then_some("coordination unavailable")
    }
}
