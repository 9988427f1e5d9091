//! The in-process limiter: one mutex-guarded gate per root account.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::oneshot;

use tokio::time::Instant;

use super::acquire::Grant;
use super::{
    Acquire, GateReport, GateStats, LimitError, Limiter, Permit, Ticket, retry_after_estimate,
};

pub struct LocalLimiter {
    gates: DashMap<Arc<str>, Arc<Gate>>,
    /// `limits.default_concurrency`, changed live on a config reload.
    default_limit: AtomicU32,
    /// `limits.max_queue_per_account`, changed live on a config reload.
    max_queue: AtomicUsize,
    shutting_down: AtomicBool,
}

impl LocalLimiter {
    pub fn new(default_limit: u32, max_queue: usize) -> Self {
        Self {
            gates: DashMap::new(),
            default_limit: AtomicU32::new(default_limit),
            max_queue: AtomicUsize::new(max_queue),
            shutting_down: AtomicBool::new(false),
        }
    }

    fn gate(&self, account: &str) -> Arc<Gate> {
        if let Some(g) = self.gates.get(account) {
            return g.clone();
        }
        self.gates
            .entry(Arc::from(account))
            .or_insert_with(|| Arc::new(Gate::new(self.default_limit.load(Ordering::Acquire))))
            .clone()
    }
}

impl LocalLimiter {
    fn acquire_at(&self, ticket: &Ticket, deadline: Instant, first: bool) -> Acquire {
        if self.shutting_down.load(Ordering::Acquire) {
            return Acquire::ready(Err(LimitError::ShuttingDown));
        }
        let gate = self.gate(&ticket.account);
        let sub = ticket
            .sub_cap
            .as_ref()
            .map(|s| (s.sub_account.clone(), s.max_concurrency));
        let mut st = gate.lock();
        if st.in_flight < st.limit && st.sub_has_room(sub.as_ref()) {
            st.take_slot(sub.as_ref().map(|(id, _)| id));
            drop(st);
            let sub_id = sub.map(|(id, _)| id);
            return Acquire::ready(Ok(Permit::local(LocalPermit { gate, sub: sub_id })));
        }
        if st.queue.len() >= self.max_queue.load(Ordering::Relaxed) {
            let stats = st.stats();
            drop(st);
            return Acquire::ready(Err(LimitError::QueueFull {
                retry_after: gate.retry_after(stats),
            }));
        }
        let id = st.next_waiter_id;
        st.next_waiter_id += 1;
        let (tx, rx) = oneshot::channel();
        if first {
            st.queue.push_front(Entry { id, sub, tx });
        } else {
            st.queue.push_back(Entry { id, sub, tx });
        }
        drop(st);
        Acquire::local(
            LocalWaiter {
                gate,
                id,
                rx,
                done: false,
            },
            deadline,
        )
    }
}

impl Limiter for LocalLimiter {
    fn acquire(&self, ticket: &Ticket, deadline: Instant) -> Acquire {
        self.acquire_at(ticket, deadline, false)
    }

    fn acquire_first(&self, ticket: &Ticket, deadline: Instant) -> Acquire {
        self.acquire_at(ticket, deadline, true)
    }

    fn set_limit(&self, account: &str, limit: u32) {
        if limit == self.default_limit.load(Ordering::Acquire) && !self.gates.contains_key(account)
        {
            return;
        }
        let gate = self.gate(account);
        let grants = {
            let mut st = gate.lock();
            st.limit = limit;
            gate.collect_grants(&mut st)
        };
        send_grants(grants);
    }

    fn stats(&self, account: &str) -> GateStats {
        self.gates.get(account).map_or(
            GateStats {
                limit: self.default_limit.load(Ordering::Acquire),
                in_flight: 0,
                queued: 0,
            },
            |g| g.stats(),
        )
    }

    fn refuse_queued(&self, account: &str) {
        if let Some(gate) = self.gates.get(account).map(|g| g.clone()) {
            gate.refuse_all(LimitError::Refused);
        }
    }

    fn shut_down(&self) {
        self.shutting_down.store(true, Ordering::Release);
        let gates: Vec<Arc<Gate>> = self.gates.iter().map(|e| e.value().clone()).collect();
        for gate in gates {
            gate.refuse_all(LimitError::ShuttingDown);
        }
    }

    fn set_max_queue(&self, max_queue: usize) {
        self.max_queue.store(max_queue, Ordering::Relaxed);
    }

    fn set_default_limit(&self, limit: u32) {
        self.default_limit.store(limit, Ordering::Release);
    }
}

impl GateReport for LocalLimiter {
    fn for_each_gate(&self, f: &mut dyn FnMut(&str, GateStats)) {
        for entry in self.gates.iter() {
            f(entry.key(), entry.value().stats());
        }
    }
}

impl LocalLimiter {
    /// The `Retry-After` hint for a newcomer to the account's queue.
    pub fn retry_after(&self, account: &str) -> Duration {
        self.gates
            .get(account)
            .map(|g| g.clone())
            .map_or(Duration::from_secs(1), |g| g.retry_after(g.stats()))
    }
}

struct Gate {
    // A std mutex, not a tokio one: every critical section is a few field
    // updates, never held across an await, and a std mutex is several times
    // cheaper uncontended.
    state: Mutex<GateState>,
    /// Exponentially weighted mean task duration, in microseconds; 0 until
    /// the first task finishes. Only a hint for `Retry-After`.
    service_ewma_micros: AtomicU64,
}

struct GateState {
    limit: u32,
    in_flight: u32,
    /// Waiters in arrival order; ids increase along the queue.
    queue: VecDeque<Entry>,
    /// In-flight tasks per capped sub-account (uncapped ones are not counted).
    sub_in_flight: HashMap<Arc<str>, u32>,
    next_waiter_id: u64,
}

struct Entry {
    id: u64,
    sub: Option<(Arc<str>, u32)>,
    tx: oneshot::Sender<Grant>,
}

impl GateState {
    fn stats(&self) -> GateStats {
        GateStats {
            limit: self.limit,
            in_flight: self.in_flight,
            queued: self.queue.len() as u32,
        }
    }

    fn sub_has_room(&self, sub: Option<&(Arc<str>, u32)>) -> bool {
        match sub {
            None => true,
            Some((id, cap)) => self.sub_in_flight.get(id).copied().unwrap_or(0) < *cap,
        }
    }

    fn take_slot(&mut self, sub: Option<&Arc<str>>) {
        self.in_flight += 1;
        if let Some(id) = sub {
            *self.sub_in_flight.entry(id.clone()).or_insert(0) += 1;
        }
    }

    fn give_back(&mut self, sub: Option<&Arc<str>>) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(id) = sub
            && let Some(n) = self.sub_in_flight.get_mut(id)
        {
            *n -= 1;
            if *n == 0 {
                self.sub_in_flight.remove(id);
            }
        }
    }
}

impl Gate {
    fn new(limit: u32) -> Self {
        Self {
            state: Mutex::new(GateState {
                limit,
                in_flight: 0,
                queue: VecDeque::new(),
                sub_in_flight: HashMap::new(),
                next_waiter_id: 0,
            }),
            service_ewma_micros: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        // The state stays consistent across a panic elsewhere (no section
        // panics midway), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stats(&self) -> GateStats {
        self.lock().stats()
    }

    fn retry_after(&self, stats: GateStats) -> Duration {
        let task = Duration::from_micros(self.service_ewma_micros.load(Ordering::Relaxed));
        retry_after_estimate(task, stats)
    }

    /// Hands free slots to waiters, first come first served among those
    /// whose sub-account has room (a capped sub-account at its cap does not
    /// block the tasks behind it). Returns the grants to send once the lock
    /// is released: a permit must never be dropped under the lock.
    fn collect_grants(
        self: &Arc<Self>,
        st: &mut GateState,
    ) -> Vec<(oneshot::Sender<Grant>, Permit)> {
        let mut grants = Vec::new();
        // Sub-accounts found at their cap in this pass: later entries of the
        // same sub-account (the same `Arc`) are skipped without a map lookup,
        // so a queue full of one capped sub-account costs a pointer compare
        // per entry.
        let mut full: Vec<Arc<str>> = Vec::new();
        while st.in_flight < st.limit {
            let Some(pos) = st.queue.iter().position(|e| match &e.sub {
                None => true,
                Some((id, _)) if full.iter().any(|f| Arc::ptr_eq(f, id)) => false,
                Some(sub) => {
                    let room = st.sub_has_room(Some(sub));
                    if !room {
                        full.push(sub.0.clone());
                    }
                    room
                }
            }) else {
                break;
            };
            let entry = st.queue.remove(pos).expect("position is in range");
            let sub = entry.sub.map(|(id, _)| id);
            st.take_slot(sub.as_ref());
            grants.push((
                entry.tx,
                Permit::local(LocalPermit {
                    gate: self.clone(),
                    sub,
                }),
            ));
        }
        grants
    }

    fn release(self: &Arc<Self>, sub: Option<&Arc<str>>) {
        let grants = {
            let mut st = self.lock();
            st.give_back(sub);
            self.collect_grants(&mut st)
        };
        send_grants(grants);
    }

    fn cancel(&self, id: u64) {
        let mut st = self.lock();
        if let Ok(pos) = st.queue.binary_search_by_key(&id, |e| e.id) {
            st.queue.remove(pos);
        }
    }

    fn refuse_all(&self, why: LimitError) {
        let refused: Vec<Entry> = self.lock().queue.drain(..).collect();
        for entry in refused {
            let _ = entry.tx.send(Err(why));
        }
    }
}

/// Sends grants outside the gate's lock. A waiter that went away in the
/// meantime hands its permit back, which frees the slot again.
fn send_grants(grants: Vec<(oneshot::Sender<Grant>, Permit)>) {
    for (tx, permit) in grants {
        // On failure the permit comes back inside the error and is dropped
        // here, releasing its slot.
        let _ = tx.send(Ok(permit));
    }
}

pub(super) struct LocalPermit {
    gate: Arc<Gate>,
    sub: Option<Arc<str>>,
}

impl LocalPermit {
    pub(super) fn record_service_time(&self, took: Duration) {
        let sample = took.as_micros().min(u128::from(u64::MAX / 8)) as u64;
        let ewma = &self.gate.service_ewma_micros;
        let old = ewma.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            (old * 7 + sample) / 8
        };
        // A lost update under a race only makes the hint slightly staler.
        ewma.store(new.max(1), Ordering::Relaxed);
    }
}

impl Drop for LocalPermit {
    fn drop(&mut self) {
        self.gate.release(self.sub.as_ref());
    }
}

pub(super) struct LocalWaiter {
    gate: Arc<Gate>,
    id: u64,
    rx: oneshot::Receiver<Grant>,
    done: bool,
}

impl LocalWaiter {
    pub(super) fn retry_after(&self) -> Duration {
        self.gate.retry_after(self.gate.stats())
    }
}

impl Future for LocalWaiter {
    type Output = Grant;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Grant> {
        let grant = match Pin::new(&mut self.rx).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(grant)) => grant,
            // The sender is only dropped without a send if the gate itself
            // went away; treat it as a refusal.
            Poll::Ready(Err(_)) => Err(LimitError::Refused),
        };
        self.done = true;
        Poll::Ready(grant)
    }
}

impl Drop for LocalWaiter {
    fn drop(&mut self) {
        if !self.done {
            // Still queued: leave the queue. Already granted but not yet
            // polled: the permit inside the channel is dropped with `rx`,
            // which releases the slot.
            self.gate.cancel(self.id);
        }
    }
}
