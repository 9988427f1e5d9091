//! The two values that own a ticket: [`Waiting`] while the acquire future
//! runs, then the [`RedisLease`] inside the permit. Each gives its ticket
//! back from `Drop`, on every path (grant, timeout, refusal, the client
//! hanging up, a panic).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::coordinator::Coordinator;
use super::lease::LeaseState;
use super::tickets::TicketState;
use crate::limiter::{Lease, Permit};

/// A ticket that may be queued in Redis. Dropped without [`Self::granted`]
/// or [`Self::forget`], it leaves the pool, and a grant that raced the drop
/// is released: no slot leaks.
pub(super) struct Waiting {
    coord: Arc<Coordinator>,
    account: Arc<str>,
    ticket: Arc<str>,
    armed: bool,
}

impl Waiting {
    pub(super) fn new(coord: Arc<Coordinator>, account: Arc<str>, ticket: Arc<str>) -> Self {
        Self {
            coord,
            account,
            ticket,
            armed: true,
        }
    }

    /// The ticket holds a slot: it becomes the permit's lease.
    pub(super) fn granted(mut self) -> Permit {
        self.armed = false;
        let coord = self.coord.clone();
        let held = || TicketState::Held(LeaseState::new(self.account.clone(), coord.lease));
        // A grant signal already made it `Held`, and the heartbeat may have
        // renewed or lost it since: keep that, never reset it.
        coord
            .tickets
            .entry(self.ticket.clone())
            .and_modify(|s| {
                if matches!(s, TicketState::Queued { .. }) {
                    *s = held();
                }
            })
            .or_insert_with(held);
        Permit::shared(Box::new(RedisLease {
            coord,
            account: self.account.clone(),
            ticket: self.ticket.clone(),
            took_ms: AtomicU64::new(0),
        }))
    }

    /// Redis holds nothing under this ticket (or will forget it by itself).
    pub(super) fn forget(mut self) {
        self.armed = false;
        self.coord.tickets.remove(&self.ticket);
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.armed {
            self.coord
                .leave(self.account.clone(), self.ticket.clone(), 0);
        }
    }
}

/// A slot in a Redis pool; dropping it releases the slot (one round trip,
/// which also grants the next waiter).
struct RedisLease {
    coord: Arc<Coordinator>,
    account: Arc<str>,
    ticket: Arc<str>,
    took_ms: AtomicU64,
}

impl Lease for RedisLease {
    fn record_service_time(&self, took: Duration) {
        let ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX).max(1);
        self.took_ms.store(ms, Ordering::Relaxed);
    }
}

impl Drop for RedisLease {
    fn drop(&mut self) {
        self.coord.leave(
            self.account.clone(),
            self.ticket.clone(),
            self.took_ms.load(Ordering::Relaxed),
        );
    }
}
