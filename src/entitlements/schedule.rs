//! Applies concurrency packages to the limiter at the exact instants they
//! start and end: one timer, set for the next change of any account, and
//! no scanning of packages on the request path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use jiff::Timestamp;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::limiter::Limiter;

use super::{ConcurrencyPackage, limit_at, next_change};

/// The longest the timer sleeps without looking again, so a wall-clock
/// step (NTP, a VM resume) is caught up within this time.
const MAX_SLEEP: Duration = Duration::from_secs(30);

/// Every account's unexpired, unrefunded packages.
#[derive(Debug, Default)]
pub struct Book {
    base: u32,
    by_account: HashMap<String, Vec<ConcurrencyPackage>>,
}

impl Book {
    pub fn new(base: u32) -> Self {
        Self {
            base,
            by_account: HashMap::new(),
        }
    }

    /// Adds a package, or replaces the one with its id (the change feed
    /// may deliver a package this replica has just added itself).
    pub fn insert(&mut self, pkg: ConcurrencyPackage) {
        let list = self.by_account.entry(pkg.account.clone()).or_default();
        list.retain(|p| p.id != pkg.id);
        list.push(pkg);
        list.sort_by_key(|p| (p.starts_at, p.id.clone()));
    }

    /// Replaces every package of the account (a refresh from the store).
    pub fn replace(&mut self, account: &str, mut packages: Vec<ConcurrencyPackage>) {
        if packages.is_empty() {
            self.by_account.remove(account);
            return;
        }
        packages.sort_by_key(|p| (p.starts_at, p.id.clone()));
        self.by_account.insert(account.to_string(), packages);
    }

    pub fn get(&self, account: &str, id: &str) -> Option<&ConcurrencyPackage> {
        self.packages(account).iter().find(|p| p.id == id)
    }

    pub fn remove(&mut self, account: &str, id: &str) -> Option<ConcurrencyPackage> {
        let list = self.by_account.get_mut(account)?;
        let pos = list.iter().position(|p| p.id == id)?;
        Some(list.remove(pos))
    }

    pub fn packages(&self, account: &str) -> &[ConcurrencyPackage] {
        self.by_account.get(account).map_or(&[], Vec::as_slice)
    }

    /// Accounts with packages in the book.
    pub fn accounts(&self) -> impl Iterator<Item = &str> {
        self.by_account.keys().map(String::as_str)
    }

    pub fn limit(&self, account: &str, t: Timestamp) -> u32 {
        limit_at(self.base, self.packages(account), t)
    }

    /// The account's next change after `t` and the limit from then on.
    pub fn next_change_of(&self, account: &str, t: Timestamp) -> Option<(Timestamp, u32)> {
        let at = next_change(self.packages(account), t)?;
        Some((at, self.limit(account, at)))
    }

    /// The next change of any account after `t`.
    pub fn next_change(&self, t: Timestamp) -> Option<Timestamp> {
        next_change(self.by_account.values().flatten(), t)
    }

    /// Accounts with a package starting or ending in `(after, until]`.
    pub fn changed_between(&self, after: Timestamp, until: Timestamp) -> Vec<String> {
        self.by_account
            .iter()
            .filter(|(_, ps)| {
                ps.iter()
                    .flat_map(|p| [p.starts_at, p.ends_at])
                    .any(|b| after < b && b <= until)
            })
            .map(|(a, _)| a.clone())
            .collect()
    }

    /// Forgets packages that ended before `t` (the store keeps them).
    pub fn prune(&mut self, t: Timestamp) {
        for list in self.by_account.values_mut() {
            list.retain(|p| p.ends_at > t);
        }
        self.by_account.retain(|_, l| !l.is_empty());
    }
}

pub struct Schedule {
    // A std mutex: held for map updates only, never across an await.
    book: Mutex<Book>,
    wake: Notify,
    clock: Arc<dyn Clock>,
    limiter: Arc<dyn Limiter>,
}

impl Schedule {
    pub fn new(base: u32, clock: Arc<dyn Clock>, limiter: Arc<dyn Limiter>) -> Self {
        Self {
            book: Mutex::new(Book::new(base)),
            wake: Notify::new(),
            clock,
            limiter,
        }
    }

    pub fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the account's limit to what its packages give it now.
    pub fn apply(&self, account: &str) {
        let limit = self.book().limit(account, self.clock.now());
        self.limiter.set_limit(account, limit);
    }

    /// A new `limits.default_concurrency`: every account's limit is the
    /// new base plus its packages from now on. `in_use` are the accounts
    /// the limiter holds a gate for (their limit is applied at once, so
    /// queued tasks may start); others get the new default when they are
    /// next used.
    pub fn set_base(&self, base: u32, in_use: Vec<String>) {
        self.limiter.set_default_limit(base);
        let accounts: Vec<String> = {
            let mut book = self.book();
            book.base = base;
            book.accounts().map(String::from).chain(in_use).collect()
        };
        for account in accounts {
            self.apply(&account);
        }
    }

    /// Adds a package (already stored) and applies it at once if valid now.
    pub fn add(&self, pkg: ConcurrencyPackage) {
        let account = pkg.account.clone();
        self.book().insert(pkg);
        self.apply(&account);
        self.wake.notify_one();
    }

    /// Replaces the account's packages with what the store holds (another
    /// replica bought or refunded one) and applies the limit they give.
    pub fn replace(&self, account: &str, packages: Vec<ConcurrencyPackage>) {
        self.book().replace(account, packages);
        self.apply(account);
        self.wake.notify_one();
    }

    /// Removes a package (already refunded in the store).
    pub fn remove(&self, account: &str, id: &str) -> Option<ConcurrencyPackage> {
        let removed = self.book().remove(account, id);
        self.apply(account);
        self.wake.notify_one();
        removed
    }

    /// The timer loop: sleeps until the next change of any account, applies
    /// it, and goes back to sleep; purchases and refunds wake it early.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut last = self.clock.now();
        loop {
            let now = self.clock.now();
            let changed = self.book().changed_between(last, now);
            for account in changed {
                self.apply(&account);
            }
            last = now;
            let next = {
                let mut book = self.book();
                book.prune(now);
                book.next_change(now)
            };
            let sleep = next
                .and_then(|t| Duration::try_from(t.duration_since(now)).ok())
                .map_or(MAX_SLEEP, |d| d.min(MAX_SLEEP));
            tokio::select! {
                () = tokio::time::sleep(sleep) => {}
                () = self.wake.notified() => {}
                () = stop.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::task::{Context, Poll, Waker};

    use jiff::SignedDuration;
    use jiff::civil::date;
    use jiff::tz::TimeZone;

    use super::*;
    use crate::clock::ManualClock;
    use crate::entitlements::{Period, price, validity};
    use crate::limiter::{LocalLimiter, Ticket};

    fn daily(id: &str, units: u32, start: jiff::civil::Date) -> ConcurrencyPackage {
        let (starts_at, ends_at) = validity(start, Period::Daily, &TimeZone::UTC).unwrap();
        ConcurrencyPackage {
            id: id.into(),
            account: "acme".into(),
            units,
            period: Period::Daily,
            start,
            starts_at,
            ends_at,
            price_usd: price(units, Period::Daily),
            bought_at: starts_at,
        }
    }

    #[test]
    fn the_book_reports_the_next_change_and_the_limit_then() {
        let mut book = Book::new(3);
        book.insert(daily("a", 2, date(2026, 11, 27)));
        let t: Timestamp = "2026-11-26T12:00:00Z".parse().unwrap();
        assert_eq!(book.limit("acme", t), 3);
        let (at, limit) = book.next_change_of("acme", t).unwrap();
        assert_eq!(at.to_string(), "2026-11-27T00:00:00Z");
        assert_eq!(limit, 5);
        assert_eq!(book.changed_between(t, at), vec!["acme".to_string()]);
        assert!(book.changed_between(at, at).is_empty());
        book.prune("2026-11-28T00:00:00Z".parse().unwrap());
        assert!(book.packages("acme").is_empty());
    }

    #[tokio::test]
    async fn a_shrinking_limit_cancels_nothing_and_admits_only_below_it() {
        let clock = Arc::new(ManualClock::new("2026-11-26T12:00:00Z".parse().unwrap()));
        let limiter: Arc<dyn Limiter> = Arc::new(LocalLimiter::new(3, 10));
        let schedule = Schedule::new(3, clock.clone(), limiter.clone());
        schedule.add(daily("today", 2, date(2026, 11, 26)));
        assert_eq!(limiter.stats("acme").limit, 5);
        let t = Ticket {
            account: "acme".into(),
            sub_cap: None,
        };
        let far = tokio::time::Instant::now() + Duration::from_secs(3600);
        let mut held: Vec<_> = (0..5)
            .map(|_| match limiter.acquire(&t, far).take_ready() {
                Some(Ok(p)) => p,
                _ => panic!("5 slots today"),
            })
            .collect();
        // Midnight: the package ends, the limit drops back to 3.
        clock.advance(SignedDuration::from_hours(12));
        schedule.apply("acme");
        let s = limiter.stats("acme");
        assert_eq!(
            (s.limit, s.in_flight),
            (3, 5),
            "running tasks are not cancelled"
        );
        let mut w = limiter.acquire(&t, far);
        assert!(
            w.take_ready().is_none(),
            "no new task while in-flight is over the new limit"
        );
        let mut cx = Context::from_waker(Waker::noop());
        held.truncate(3);
        assert!(
            std::pin::Pin::new(&mut w).poll(&mut cx).is_pending(),
            "3 in flight = limit"
        );
        held.pop();
        assert!(matches!(
            std::pin::Pin::new(&mut w).poll(&mut cx),
            Poll::Ready(Ok(_))
        ));
    }

    #[tokio::test]
    async fn the_timer_applies_a_change_at_its_instant() {
        use crate::clock::SystemClock;
        // The package starts 50 ms from now; nothing else wakes the timer.
        let limiter: Arc<dyn Limiter> = Arc::new(LocalLimiter::new(3, 10));
        let schedule = Arc::new(Schedule::new(3, Arc::new(SystemClock), limiter.clone()));
        limiter.set_limit("acme", 3);
        let now = Timestamp::now();
        let mut p = daily("soon", 4, date(2026, 11, 26));
        p.starts_at = now + SignedDuration::from_millis(50);
        p.ends_at = now + SignedDuration::from_secs(3600);
        schedule.book().insert(p);
        let stop = CancellationToken::new();
        let task = tokio::spawn(schedule.clone().run(stop.clone()));
        tokio::task::yield_now().await;
        assert_eq!(limiter.stats("acme").limit, 3);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while limiter.stats("acme").limit != 7 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(limiter.stats("acme").limit, 7);
        stop.cancel();
        task.await.unwrap();
    }
}
