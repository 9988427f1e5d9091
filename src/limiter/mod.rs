//! Per-root-account concurrency gates: the limit, the tasks in flight, and
//! the FIFO queue of tasks waiting for a slot.
//!
//! [`Limiter`] is the seam every implementation fills: [`LocalLimiter`]
//! (in-process, the single-node default) and the shared one in
//! `cluster` (Redis, leases). A slot is a [`Permit`]: acquired once and
//! released by `Drop` on every path (success, error, panic, cancellation).
//! Asking for one is an [`Acquire`] future that queues until the deadline;
//! dropping it (client gone) leaves the queue at once.

mod acquire;
mod local;

#[cfg(test)]
pub(crate) mod conformance;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

pub use acquire::Acquire;
pub use local::LocalLimiter;

/// Who asks for a slot: the root account whose limit applies, and the
/// sub-account with its own cap, if it has one.
#[derive(Debug, Clone)]
pub struct Ticket {
    pub account: Arc<str>,
    pub sub_cap: Option<SubCap>,
}

/// A sub-account's own cap inside its root's limit.
#[derive(Debug, Clone)]
pub struct SubCap {
    pub sub_account: Arc<str>,
    pub max_concurrency: u32,
}

/// Why no slot was given. Each case carries what the gateway needs to
/// answer the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("the account's queue is full")]
    QueueFull { retry_after: Duration },
    #[error("no slot became free before the task's queue deadline")]
    QueueTimeout { retry_after: Duration },
    #[error("the account stopped accepting tasks while this one was queued")]
    Refused,
    #[error("the gateway is shutting down")]
    ShuttingDown,
    /// The shared limiter cannot be reached and the outage policy is to
    /// refuse rather than guess.
    #[error("the coordination service is unavailable")]
    Unavailable,
}

/// What an operator sees of one gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GateStats {
    pub limit: u32,
    pub in_flight: u32,
    pub queued: u32,
}

pub trait Limiter: Send + Sync + 'static {
    /// Takes a slot for the ticket if one is free, else waits in the
    /// account's FIFO queue until `deadline`. Fails at once if the queue is
    /// full or the limiter is shutting down. Dropping the future leaves the
    /// queue (and gives back a slot granted but not yet taken).
    fn acquire(&self, ticket: &Ticket, deadline: Instant) -> Acquire;

    /// Like [`Limiter::acquire`], but a ticket that must wait waits at the
    /// head of the queue, ahead of every waiter: a job whose run died with
    /// its replica goes back first (SPEC §10.2).
    fn acquire_first(&self, ticket: &Ticket, deadline: Instant) -> Acquire {
        self.acquire(ticket, deadline)
    }

    /// Sets an account's limit. Growing starts queued tasks at once;
    /// shrinking cancels nothing: new tasks wait until in-flight is below the
    /// new limit.
    fn set_limit(&self, account: &str, limit: u32);

    /// The account's gate as this replica knows it (cluster-wide for a
    /// shared limiter, as of its last exchange with the coordinator).
    fn stats(&self, account: &str) -> GateStats;

    /// The account's gate now, asked of the coordinator if the limiter is
    /// shared (the admin's account view; one round trip): every replica
    /// shows the same counts at the same moment. In process it is
    /// [`Limiter::stats`].
    fn fresh_stats<'a>(
        &'a self,
        account: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = GateStats> + Send + 'a>> {
        let stats = self.stats(account);
        Box::pin(std::future::ready(stats))
    }

    /// Refuses every task queued for the account (e.g. it was deactivated).
    fn refuse_queued(&self, account: &str);

    /// Refuses all queued tasks and every later acquire.
    fn shut_down(&self);

    /// `limits.max_queue_per_account` after a config reload: later
    /// arrivals see it; tasks already queued keep their places.
    fn set_max_queue(&self, max_queue: usize);

    /// `limits.default_concurrency` after a config reload: the limit of
    /// accounts without a package from now on. Accounts with a gate get
    /// theirs through [`Limiter::set_limit`] (the schedule re-applies them).
    fn set_default_limit(&self, limit: u32);
}

/// Every gate a limiter holds on this replica, for the metrics scrape.
/// Kept off [`Limiter`]: a scan is a reporting concern, not a limiting one.
pub trait GateReport: Send + Sync + 'static {
    fn for_each_gate(&self, f: &mut dyn FnMut(&str, GateStats));
}

/// A slot held by a shared limiter: releasing it is the lease's `Drop`.
pub trait Lease: Send + Sync + 'static {
    /// Feeds the implementation's task-duration estimate (`Retry-After`).
    fn record_service_time(&self, _took: Duration) {}
}

/// A held slot. Dropping it frees the slot and starts the next waiter.
pub struct Permit {
    inner: PermitInner,
}

enum PermitInner {
    // No allocation on the local path: the permit is the gate and the
    // sub-account.
    Local(local::LocalPermit),
    Shared(Box<dyn Lease>),
}

impl Permit {
    /// A slot granted by a shared limiter.
    pub fn shared(lease: Box<dyn Lease>) -> Self {
        Self {
            inner: PermitInner::Shared(lease),
        }
    }

    fn local(p: local::LocalPermit) -> Self {
        Self {
            inner: PermitInner::Local(p),
        }
    }

    /// Feeds the account's task-duration estimate used for `Retry-After`.
    pub fn record_service_time(&self, took: Duration) {
        match &self.inner {
            PermitInner::Local(p) => p.record_service_time(took),
            PermitInner::Shared(l) => l.record_service_time(took),
        }
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.inner {
            PermitInner::Local(_) => "Permit(local)",
            PermitInner::Shared(_) => "Permit(shared)",
        })
    }
}

/// `Retry-After` from a task-duration estimate and the queue ahead: tasks
/// ahead of a newcomer drain `limit` at a time, one task duration per round.
pub fn retry_after_estimate(task: Duration, stats: GateStats) -> Duration {
    if task.is_zero() {
        return Duration::from_secs(1);
    }
    let rounds = u64::from(stats.queued) / u64::from(stats.limit.max(1)) + 1;
    let secs = (task.as_secs_f64() * rounds as f64).ceil() as u64;
    Duration::from_secs(secs.clamp(1, 3600))
}

#[cfg(test)]
mod tests;
