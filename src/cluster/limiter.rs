//! [`RedisLimiter`]: the shared [`Limiter`]. One pool per root account in
//! Redis (see `lua/pool.lua`); acquire and release are one script round
//! trip each; a queued task waits for a grant hint, the heartbeat, or its
//! deadline. While Redis is unreachable the outage policy decides: a local
//! limiter with the limit divided among the live replicas, or
//! `Unavailable`.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use dashmap::DashMap;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

use super::coordinator::Coordinator;
use super::health::Op;
use super::keys;
use super::scripts::{ACQUIRE, POOL_STATS, REFUSE, SET_LIMIT};
use super::tickets::{Signal, TicketState};
use super::wait::Waiting;
use crate::config::RedisOutagePolicy;
use crate::limiter::{Acquire, GateReport, GateStats, LimitError, Limiter, LocalLimiter, Ticket};

type Grant = Result<crate::limiter::Permit, LimitError>;

pub struct RedisLimiter {
    core: Arc<Core>,
}

struct Core {
    coord: Arc<Coordinator>,
    /// `limits.default_concurrency` as the cluster agrees on it.
    default_limit: AtomicU32,
    /// `limits.max_queue_per_account`, changed live on a config reload.
    max_queue: AtomicUsize,
    /// Limits set through [`Limiter::set_limit`]: every acquire carries
    /// the one this replica knows, so a pool's limit heals itself (a
    /// flushed Redis, an ordering race with the `set_limit` script).
    limits: DashMap<Arc<str>, u32>,
    /// The outage path under `local`: limits divided among live replicas.
    fallback: LocalLimiter,
    shutting_down: AtomicBool,
    /// Refusals on their way to Redis, per account: this replica's acquires
    /// wait for them, so a task that joins after `refuse_queued` returned
    /// is never refused by it.
    refusing: DashMap<Arc<str>, Arc<Barrier>>,
    /// Accounts whose limit changed, written to Redis in order by one task
    /// that sends each account's newest limit: writes spawned one by one
    /// could land out of order and leave an older, larger limit in Redis.
    limit_writes: mpsc::UnboundedSender<Arc<str>>,
}

#[derive(Default)]
struct Barrier {
    pending: AtomicU32,
    done: Notify,
}

impl Barrier {
    fn finish(&self) {
        self.pending.fetch_sub(1, Ordering::AcqRel);
        self.done.notify_waiters();
    }

    async fn passed(&self) {
        loop {
            let done = self.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.pending.load(Ordering::Acquire) == 0 {
                return;
            }
            done.await;
        }
    }
}

impl RedisLimiter {
    /// `default_limit` is `limits.default_concurrency`, `max_queue`
    /// `limits.max_queue_per_account` (bounding the cluster-wide queue).
    pub fn new(coord: Arc<Coordinator>, default_limit: u32, max_queue: usize) -> Self {
        let (limit_writes, rx) = mpsc::unbounded_channel();
        let core = Arc::new(Core {
            coord,
            default_limit: AtomicU32::new(default_limit),
            max_queue: AtomicUsize::new(max_queue),
            limits: DashMap::new(),
            fallback: LocalLimiter::new(default_limit, max_queue),
            shutting_down: AtomicBool::new(false),
            refusing: DashMap::new(),
            limit_writes,
        });
        tokio::spawn(write_limits(Arc::downgrade(&core), rx));
        Self { core }
    }

    pub fn coordinator(&self) -> &Arc<Coordinator> {
        &self.core.coord
    }

    /// False while Redis is unreachable (`/readyz` answers 503 under
    /// `reject`).
    pub fn is_coordinated(&self) -> bool {
        self.core.coord.is_coordinated()
    }

    pub fn leases_lost(&self) -> u64 {
        self.core.coord.leases_lost()
    }

    pub fn coordination_errors(&self) -> [(&'static str, u64); 5] {
        self.core.coord.coordination_errors()
    }
}

impl Core {
    fn known_limit(&self, account: &str) -> (u32, bool) {
        match self.limits.get(account) {
            Some(l) => (*l, true),
            None => (self.default_limit.load(Ordering::Acquire), false),
        }
    }

    /// The outage path, decided by policy.
    fn fallback(&self, t: &Ticket, deadline: Instant, first: bool) -> Acquire {
        match self.coord.policy {
            RedisOutagePolicy::Reject => Acquire::ready(Err(LimitError::Unavailable)),
            RedisOutagePolicy::Local => {
                // What this replica was told wins over what it last saw.
                let limit = match self.limits.get(&*t.account) {
                    Some(l) => *l,
                    None => self
                        .coord
                        .pool_view(&t.account)
                        .map_or(self.default_limit.load(Ordering::Acquire), |v| {
                            v.stats.limit
                        }),
                };
                let share = (limit / self.coord.live_replicas()).max(1);
                self.fallback.set_limit(&t.account, share);
                if first {
                    self.fallback.acquire_first(t, deadline)
                } else {
                    self.fallback.acquire(t, deadline)
                }
            }
        }
    }

    async fn acquire_shared(self: Arc<Self>, t: Ticket, deadline: Instant, first: bool) -> Grant {
        let coord = &self.coord;
        let barrier = self.refusing.get(&*t.account).map(|b| b.clone());
        if let Some(b) = barrier {
            b.passed().await;
        }
        let id = coord.new_ticket();
        let (tx, rx) = oneshot::channel();
        // Registered before the script runs: its grant hint may arrive
        // before its reply.
        coord.tickets.insert(
            id.clone(),
            TicketState::Queued {
                account: t.account.clone(),
                tx: Some(tx),
                live_until: Instant::now() + coord.lease,
                confirmed: false,
            },
        );
        let waiting = Waiting::new(coord.clone(), t.account.clone(), id.clone());
        let (limit, explicit) = self.known_limit(&t.account);
        let (sub, cap) = t
            .sub_cap
            .as_ref()
            .map_or(("", 0), |s| (&*s.sub_account, s.max_concurrency));
        let mut inv = ACQUIRE.prepare_invoke();
        for k in keys::pool(&coord.prefix, &t.account) {
            inv.key(k);
        }
        inv.arg(&*id)
            .arg(&coord.instance)
            .arg(limit)
            .arg(u8::from(explicit))
            .arg(self.max_queue.load(Ordering::Relaxed))
            .arg(coord.lease_ms())
            .arg(sub)
            .arg(cap)
            .arg(&coord.channel_prefix)
            .arg(u8::from(first));
        let (status, stats) = match coord.call::<(i64, Vec<i64>)>(Op::Acquire, &inv).await {
            Ok(r) => r,
            Err(_) => {
                // Whether the script ran is unknown (a timeout): the ticket
                // still tries to leave, or it could be granted a slot nobody
                // uses until its lease ends.
                drop(waiting);
                return self.fallback(&t, deadline, first).await;
            }
        };
        let view = coord.note_pool(&t.account, &stats);
        match status {
            1 => return Ok(waiting.granted()),
            2 => {
                waiting.forget();
                return Err(LimitError::QueueFull {
                    retry_after: view
                        .map_or(std::time::Duration::from_secs(1), |v| v.retry_after()),
                });
            }
            _ => coord.confirm_queued(&id),
        }
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(LimitError::ShuttingDown);
        }
        tokio::select! {
            // A grant that raced the deadline wins.
            biased;
            s = rx => match s {
                Ok(Signal::Granted) => Ok(waiting.granted()),
                Ok(Signal::Refused(e)) => Err(e),
                Err(_) => Err(LimitError::Refused),
            },
            () = tokio::time::sleep_until(deadline) => Err(LimitError::QueueTimeout {
                retry_after: coord.retry_after(&t.account),
            }),
        }
    }
}

impl RedisLimiter {
    fn acquire_at(&self, ticket: &Ticket, deadline: Instant, first: bool) -> Acquire {
        let core = &self.core;
        if core.shutting_down.load(Ordering::Acquire) {
            return Acquire::ready(Err(LimitError::ShuttingDown));
        }
        if !core.coord.is_coordinated() {
            return core.fallback(ticket, deadline, first);
        }
        let fut = core.clone().acquire_shared(ticket.clone(), deadline, first);
        Acquire::shared(fut)
    }
}

impl Limiter for RedisLimiter {
    fn acquire(&self, ticket: &Ticket, deadline: Instant) -> Acquire {
        self.acquire_at(ticket, deadline, false)
    }

    fn acquire_first(&self, ticket: &Ticket, deadline: Instant) -> Acquire {
        self.acquire_at(ticket, deadline, true)
    }

    fn set_limit(&self, account: &str, limit: u32) {
        let core = &self.core;
        if core.limits.get(account).is_some_and(|l| *l == limit) {
            return;
        }
        let account: Arc<str> = Arc::from(account);
        core.limits.insert(account.clone(), limit);
        // A local gate in use during an outage follows the change at once
        // (growing starts its waiters); others get it on their next acquire.
        let local = core.fallback.stats(&account);
        if local.in_flight > 0 || local.queued > 0 {
            let share = (limit / core.coord.live_replicas()).max(1);
            core.fallback.set_limit(&account, share);
        }
        let _ = core.limit_writes.send(account);
    }

    fn stats(&self, account: &str) -> GateStats {
        let core = &self.core;
        if !core.coord.is_coordinated() && core.coord.policy == RedisOutagePolicy::Local {
            return core.fallback.stats(account);
        }
        core.coord.pool_view(account).map_or(
            GateStats {
                limit: core.known_limit(account).0,
                in_flight: 0,
                queued: 0,
            },
            |v| v.stats,
        )
    }

    fn fresh_stats<'a>(
        &'a self,
        account: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = GateStats> + Send + 'a>> {
        Box::pin(async move {
            let core = &self.core;
            if core.coord.is_coordinated() {
                let mut inv = POOL_STATS.prepare_invoke();
                for k in keys::pool(&core.coord.prefix, account) {
                    inv.key(k);
                }
                // `{version, limit, holders, queued, ewma_ms}`; the limit is
                // the one this replica knows (a pool never used has none).
                if let Ok(raw) = core.coord.call::<Vec<i64>>(Op::Acquire, &inv).await
                    && let [_, _, holders, queued, _] = raw[..]
                {
                    let count = |v: i64| u32::try_from(v.max(0)).unwrap_or(u32::MAX);
                    return GateStats {
                        limit: core.known_limit(account).0,
                        in_flight: count(holders),
                        queued: count(queued),
                    };
                }
            }
            // Unreachable: what this replica last saw (or its outage gate).
            self.stats(account)
        })
    }

    fn refuse_queued(&self, account: &str) {
        let core = &self.core;
        core.fallback.refuse_queued(account);
        let account: Arc<str> = Arc::from(account);
        let barrier = core.refusing.entry(account.clone()).or_default().clone();
        barrier.pending.fetch_add(1, Ordering::AcqRel);
        let coord = core.coord.clone();
        // Lifted when the task ends, or when it is dropped unrun.
        let done = Finish(barrier);
        core.coord.spawn(async move {
            let _done = done;
            let mut inv = REFUSE.prepare_invoke();
            for k in keys::pool(&coord.prefix, &account) {
                inv.key(k);
            }
            inv.arg(&coord.channel_prefix);
            // Waiters are answered only once the script has run (from its
            // reply, or its hint), so a task queued after they hear of it
            // is never refused by it.
            if let Ok((stats, refused)) = coord
                .call::<(Vec<i64>, Vec<String>)>(Op::Acquire, &inv)
                .await
            {
                coord.note_pool(&account, &stats);
                for t in refused {
                    coord.signal(&t, Signal::Refused(LimitError::Refused));
                }
            }
        });
    }

    fn shut_down(&self) {
        let core = &self.core;
        core.shutting_down.store(true, Ordering::Release);
        core.coord.refuse_local(LimitError::ShuttingDown);
        core.fallback.shut_down();
    }

    fn set_max_queue(&self, max_queue: usize) {
        self.core.max_queue.store(max_queue, Ordering::Relaxed);
        self.core.fallback.set_max_queue(max_queue);
    }

    fn set_default_limit(&self, limit: u32) {
        self.core.default_limit.store(limit, Ordering::Release);
        self.core.fallback.set_default_limit(limit);
    }
}

/// Writes limit changes to Redis one after the other, each with the
/// account's newest limit at the time it is sent, until the limiter is
/// dropped.
async fn write_limits(core: Weak<Core>, mut changed: mpsc::UnboundedReceiver<Arc<str>>) {
    while let Some(account) = changed.recv().await {
        let Some(core) = core.upgrade() else { return };
        let Some(limit) = core.limits.get(&account).map(|l| *l) else {
            continue;
        };
        let coord = &core.coord;
        let mut inv = SET_LIMIT.prepare_invoke();
        for k in keys::pool(&coord.prefix, &account) {
            inv.key(k);
        }
        let source = if limit == core.default_limit.load(Ordering::Acquire) {
            "default"
        } else {
            "set"
        };
        inv.arg(limit)
            .arg(coord.lease_ms())
            .arg(&coord.channel_prefix)
            .arg(source);
        if let Ok((_, stats)) = coord.call::<(i64, Vec<i64>)>(Op::Acquire, &inv).await {
            coord.note_pool(&account, &stats);
        }
    }
}

/// Lifts the barrier however the refusal ends (reply, error, or the
/// runtime dropping the task).
struct Finish(Arc<Barrier>);

impl Drop for Finish {
    fn drop(&mut self) {
        self.0.finish();
    }
}

impl GateReport for RedisLimiter {
    fn for_each_gate(&self, f: &mut dyn FnMut(&str, GateStats)) {
        for e in self.core.coord.pools.iter() {
            f(e.key(), e.value().stats);
        }
    }
}
