//! Every account's billing state in memory, the [`Quota`] seam that
//! reserves a unit at admission, and the [`Reservation`] a task holds from
//! admission to its end.
//!
//! [`Accounts`] is the single-node quota: reservations are counted in this
//! process. A shared quota (cluster mode, Redis) implements [`Quota`] with
//! its own [`HeldUnit`], so no replica can overdraw what another reserved.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use dashmap::DashMap;
use jiff::{SignedDuration, Timestamp};

use super::{AccountBilling, Refusal, Source};

type Shared = Arc<Mutex<AccountBilling>>;

fn lock(s: &Shared) -> MutexGuard<'_, AccountBilling> {
    // Every section leaves the state consistent, so a poisoned lock is
    // still usable.
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reserves the unit a call will be charged to, before the call queues, so
/// concurrent calls can never spend more than is left.
pub trait Quota: Send + Sync + 'static {
    /// Picks who pays for a call made `now` (free, then prepaid by earliest
    /// expiry, then postpaid) and holds one unit of it until the
    /// reservation is committed or dropped.
    fn reserve(&self, account: &str, now: Timestamp) -> Reserve;
}

type Outcome = Result<Reservation, Refusal>;

/// The future of one reservation: a plain value when decided in process,
/// a boxed wait only for a shared quota.
pub struct Reserve {
    state: ReserveState,
}

enum ReserveState {
    Ready(Option<Outcome>),
    Shared(Pin<Box<dyn Future<Output = Outcome> + Send>>),
}

impl Reserve {
    pub fn ready(outcome: Outcome) -> Self {
        Self {
            state: ReserveState::Ready(Some(outcome)),
        }
    }

    pub fn shared(fut: impl Future<Output = Outcome> + Send + 'static) -> Self {
        Self {
            state: ReserveState::Shared(Box::pin(fut)),
        }
    }

    /// The outcome, if it was decided without a round trip.
    pub fn take_ready(&mut self) -> Option<Outcome> {
        match &mut self.state {
            ReserveState::Ready(o) => o.take(),
            ReserveState::Shared(_) => None,
        }
    }
}

impl Future for Reserve {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        match &mut self.state {
            ReserveState::Ready(o) => Poll::Ready(o.take().unwrap_or(Err(Refusal::Unavailable))),
            ReserveState::Shared(f) => f.as_mut().poll(cx),
        }
    }
}

/// Billing state per root account, in step with the store: admission reads
/// and reserves here and never touches the database.
pub struct Accounts {
    map: DashMap<Arc<str>, Shared>,
    grace: SignedDuration,
}

impl Accounts {
    pub fn new(arrears_grace: std::time::Duration) -> Self {
        Self {
            map: DashMap::new(),
            grace: SignedDuration::try_from(arrears_grace).unwrap_or(SignedDuration::MAX),
        }
    }

    pub fn grace(&self) -> SignedDuration {
        self.grace
    }

    pub fn insert(&self, account: &str, billing: AccountBilling) {
        self.map
            .insert(Arc::from(account), Arc::new(Mutex::new(billing)));
    }

    /// Replaces an account's durable state with what the store holds now,
    /// keeping the units this process has reserved.
    pub fn refresh(&self, account: &str, mut billing: AccountBilling) {
        let Some(shared) = self.map.get(account).map(|s| s.clone()) else {
            self.insert(account, billing);
            return;
        };
        let mut state = lock(&shared);
        for p in &mut billing.packages {
            if let Some(old) = state.packages.iter().find(|o| o.id == p.id) {
                p.reserved = old.reserved;
                // Commits of this replica may not have reached the read.
                p.used = p.used.max(old.used);
            }
        }
        *state = billing;
    }

    /// The store counts `used` units of an account's package: memory never
    /// counts fewer (a shared quota starts its count from it).
    pub fn note_used(&self, account: &str, package: &str, used: u64) {
        self.with(account, |b| {
            if let Some(p) = b.packages.iter_mut().find(|p| p.id == package) {
                p.used = p.used.max(used);
            }
        });
    }

    /// Runs `f` on the account's state under its lock.
    pub fn with<R>(&self, account: &str, f: impl FnOnce(&mut AccountBilling) -> R) -> Option<R> {
        let shared = self.map.get(account)?.clone();
        let mut state = lock(&shared);
        Some(f(&mut state))
    }

    /// Reserves a unit for a call made now (see [`AccountBilling::reserve`]).
    pub fn reserve(&self, account: &str, now: Timestamp) -> Result<Reservation, Refusal> {
        let shared = self
            .map
            .get(account)
            .map(|s| s.clone())
            .ok_or(Refusal::LowBalance)?;
        let source = lock(&shared).reserve(now, self.grace)?;
        Ok(Reservation {
            held: Held::Local {
                billing: shared,
                source,
                settled: false,
            },
        })
    }
}

impl Quota for Accounts {
    fn reserve(&self, account: &str, now: Timestamp) -> Reserve {
        Reserve::ready(Accounts::reserve(self, account, now))
    }
}

/// A unit held by a shared quota. Dropping it without [`HeldUnit::commit`]
/// gives the unit back.
pub trait HeldUnit: Send + Sync + 'static {
    fn source(&self) -> &Source;
    /// The success is durable and `charged` paid for it (the reserved
    /// source, or the next payer the commit fell through to): the unit is
    /// used, never given back.
    fn commit(&mut self, charged: &Source);
}

/// A unit held for one task. Dropping it gives the unit back (failure,
/// timeout, refusal, panic); [`Reservation::commit`] marks it used once the
/// success is durable.
pub struct Reservation {
    held: Held,
}

enum Held {
    Local {
        billing: Shared,
        source: Source,
        settled: bool,
    },
    Shared(Box<dyn HeldUnit>),
}

impl Reservation {
    pub fn shared(unit: Box<dyn HeldUnit>) -> Self {
        Self {
            held: Held::Shared(unit),
        }
    }

    pub fn source(&self) -> &Source {
        match &self.held {
            Held::Local { source, .. } => source,
            Held::Shared(u) => u.source(),
        }
    }

    /// The success is durable. `fell_through`: the payer the store's
    /// commit charged instead of the reserved one, if it could not pay.
    pub fn commit(mut self, fell_through: Option<&Source>) {
        match &mut self.held {
            Held::Local {
                billing,
                source,
                settled,
            } => {
                lock(billing).commit_to(source, fell_through.unwrap_or(source));
                *settled = true;
            }
            Held::Shared(u) => {
                let charged = fell_through.unwrap_or(u.source()).clone();
                u.commit(&charged);
            }
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Held::Local {
            billing,
            source,
            settled: false,
        } = &self.held
        {
            lock(billing).release(source);
        }
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("source", self.source())
            .finish()
    }
}
