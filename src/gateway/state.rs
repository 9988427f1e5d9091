//! What the data plane holds: everything a task needs on its way through
//! the gateway, and nothing the admin API alone uses.

use std::sync::Arc;

use arc_swap::ArcSwap;
use jiff::tz::TimeZone;
use tokio_util::task::TaskTracker;

use crate::accounts::Registry;
use crate::billing::Quota;
use crate::clock::Clock;
use crate::config::{Config, LiveConfig};
use crate::idempotency::InProgress;
use crate::limiter::Limiter;
use crate::metrics::Metrics;
use crate::usage::UsageRecorder;

use super::budget::Budget;
use super::proxy::Backend;

pub struct Gateway {
    /// The running config; a reload (SIGHUP) swaps it. Read it once per
    /// step ([`Gateway::config`]), not field by field across awaits.
    pub config: LiveConfig,
    pub clock: Arc<dyn Clock>,
    /// `billing.timezone`: a success's billing month is counted in it.
    pub tz: TimeZone,
    /// Keys → principals, kept in step with the store.
    pub registry: Arc<Registry>,
    /// Slots and queues: in process, or shared through Redis.
    pub limiter: Arc<dyn Limiter>,
    /// Where admission reserves a unit: in process, or shared through Redis.
    pub quota: Arc<dyn Quota>,
    pub recorder: UsageRecorder,
    /// Swapped by a reload that changes `backend.*` or the body limits; a
    /// task keeps the one it started with.
    pub backend: Arc<ArcSwap<Backend>>,
    pub metrics: Arc<Metrics>,
    /// Forwarded tasks, which outlive their client connections; shutdown
    /// waits for them.
    pub tasks: TaskTracker,
    /// Bytes of API 3.0 bodies held (read and verified before queueing).
    pub buffers: Budget,
    /// Tasks waiting for a slot, across accounts (`limits.max_queued_tasks`).
    pub waiting: Budget,
    /// Idempotency keys whose first request is queued or running: in
    /// process, or shared through Redis.
    pub markers: Arc<dyn InProgress>,
    /// The jobs this replica holds (queued here, or running).
    pub jobs: Arc<super::jobs::JobBook>,
}

impl Gateway {
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub fn backend(&self) -> Arc<Backend> {
        self.backend.load_full()
    }
}
