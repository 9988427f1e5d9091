//! Every account's billing state in memory, and the reservation a task
//! holds from admission to its end.

use std::sync::{Arc, Mutex, MutexGuard};

use dashmap::DashMap;
use jiff::{SignedDuration, Timestamp};

use super::{AccountBilling, Refusal, Source};

type Shared = Arc<Mutex<AccountBilling>>;

fn lock(s: &Shared) -> MutexGuard<'_, AccountBilling> {
    // Every section leaves the state consistent, so a poisoned lock is
    // still usable.
    s.lock().unwrap_or_else(|e| e.into_inner())
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
            billing: shared,
            source,
            settled: false,
        })
    }
}

/// A unit held for one task. Dropping it gives the unit back (failure,
/// timeout, refusal, panic); [`Reservation::commit`] marks it used once the
/// success is durable.
pub struct Reservation {
    billing: Shared,
    source: Source,
    settled: bool,
}

impl Reservation {
    pub fn source(&self) -> &Source {
        &self.source
    }

    pub fn commit(mut self) {
        lock(&self.billing).commit(&self.source);
        self.settled = true;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            lock(&self.billing).release(&self.source);
        }
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("source", &self.source)
            .finish()
    }
}
