//! Per-root-account concurrency gates: the limit, the tasks in flight, and
//! the FIFO queue of tasks waiting for a slot.
//!
//! A slot is a [`Permit`]: a value acquired once and released by `Drop` on
//! every path (success, error, panic, cancellation). Waiting is a [`Waiter`]
//! future; dropping it (timeout, client gone) leaves the queue at once.
//!
//! [`Limiter`] is the seam for other implementations (a shared limit in Redis
//! with leases, later); [`LocalLimiter`] is the in-process one.

mod local;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("the account's queue is full")]
    QueueFull,
    #[error("the account stopped accepting tasks while this one was queued")]
    Refused,
    #[error("the gateway is shutting down")]
    ShuttingDown,
}

/// The outcome of asking for a slot.
pub enum Admission {
    /// A slot was free.
    Now(Permit),
    /// Queued: await the waiter for the slot.
    Queued(Waiter),
}

/// What an operator sees of one gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GateStats {
    pub limit: u32,
    pub in_flight: u32,
    pub queued: u32,
}

pub trait Limiter: Send + Sync + 'static {
    /// Takes a slot if one is free for the ticket, else joins the account's
    /// queue (or fails if the queue is full or the limiter is shut down).
    fn acquire(&self, ticket: &Ticket) -> Result<Admission, LimitError>;

    /// Sets an account's limit. Growing starts queued tasks at once;
    /// shrinking cancels nothing: new tasks wait until in-flight is below the
    /// new limit. A gate is made on first use, or here for a limit other
    /// than the default, so idle accounts cost no gate.
    fn set_limit(&self, account: &str, limit: u32);

    /// The account's gate; an account that has never been used and has
    /// the default limit has no gate yet and reports the default limit.
    fn stats(&self, account: &str) -> GateStats;

    /// Calls `f` for every account's gate (for metrics).
    fn for_each_gate(&self, f: &mut dyn FnMut(&str, GateStats));

    /// A hint for `Retry-After`: how long until a slot is likely free,
    /// from the account's recent task durations and its queue.
    fn retry_after(&self, account: &str) -> Duration;

    /// Refuses every task queued for the account (e.g. it was deactivated).
    fn refuse_queued(&self, account: &str);

    /// Refuses all queued tasks and every later acquire.
    fn shut_down(&self);
}

/// A held slot. Dropping it frees the slot and starts the next waiter.
pub struct Permit {
    inner: local::LocalPermit,
}

impl Permit {
    /// Feeds the account's task-duration estimate used for `Retry-After`.
    pub fn record_service_time(&self, took: Duration) {
        self.inner.record_service_time(took);
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Permit")
    }
}

/// A queued task. Resolves to a permit; dropping it leaves the queue.
pub struct Waiter {
    inner: local::LocalWaiter,
}

impl Future for Waiter {
    type Output = Result<Permit, LimitError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.inner).poll(cx)
    }
}

#[cfg(test)]
mod tests;
