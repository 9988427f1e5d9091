//! The behaviour every [`Limiter`] owes the gateway, as one suite generic
//! over the implementation: the local limiter runs it in its unit tests,
//! the shared (Redis) one against a real server.
//!
//! Only what a caller can observe is asserted: permits handed out, errors,
//! and `stats` of the caller's own gate. A shared implementation grants
//! asynchronously, so "granted" means "resolves within [`GRANT_WITHIN`]" and
//! "not granted" means "still pending after [`QUIET_FOR`]"; every wait is
//! bounded.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use tokio::time::{Instant, timeout};

use super::{Acquire, GateStats, LimitError, Limiter, Permit, SubCap, Ticket};

/// How long a slot that should be free may take to arrive.
pub const GRANT_WITHIN: Duration = Duration::from_secs(3);
/// How long a task that should stay queued is watched for a wrong grant.
pub const QUIET_FOR: Duration = Duration::from_millis(150);

/// Makes a fresh limiter: `(default limit, max queue per account)`.
pub trait Factory {
    fn make(&self, default_limit: u32, max_queue: usize) -> impl Future<Output = Arc<dyn Limiter>>;
}

impl<F, Fut> Factory for F
where
    F: Fn(u32, usize) -> Fut,
    Fut: Future<Output = Arc<dyn Limiter>>,
{
    fn make(&self, default_limit: u32, max_queue: usize) -> impl Future<Output = Arc<dyn Limiter>> {
        self(default_limit, max_queue)
    }
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(600)
}

pub fn ticket(account: &str) -> Ticket {
    Ticket {
        account: Arc::from(account),
        sub_cap: None,
    }
}

pub fn capped(account: &str, sub: &str, cap: u32) -> Ticket {
    Ticket {
        account: Arc::from(account),
        sub_cap: Some(SubCap {
            sub_account: Arc::from(sub),
            max_concurrency: cap,
        }),
    }
}

/// A slot that must be granted.
pub async fn granted(l: &dyn Limiter, t: &Ticket) -> Permit {
    match timeout(GRANT_WITHIN, l.acquire(t, far())).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => panic!("expected a slot for {}, got {e:?}", t.account),
        Err(_) => panic!("no slot for {} within {GRANT_WITHIN:?}", t.account),
    }
}

/// An acquire that must stay queued; returned still pending, in the queue.
pub async fn queued(l: &dyn Limiter, t: &Ticket) -> Acquire {
    let before = l.stats(&t.account).queued;
    let mut a = l.acquire(t, far());
    if let Ok(r) = timeout(QUIET_FOR, &mut a).await {
        panic!("expected {} to queue, got {r:?}", t.account);
    }
    wait_for(l, &t.account, "the task to show as queued", |s| {
        s.queued > before
    })
    .await;
    a
}

/// Waits (bounded) until the gate satisfies `ok`.
pub async fn wait_for(l: &dyn Limiter, account: &str, what: &str, ok: impl Fn(GateStats) -> bool) {
    let deadline = Instant::now() + GRANT_WITHIN;
    loop {
        let s = l.stats(account);
        if ok(s) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn resolves(a: &mut Acquire) -> Result<Permit, LimitError> {
    timeout(GRANT_WITHIN, a)
        .await
        .unwrap_or_else(|_| panic!("the queued task got no answer within {GRANT_WITHIN:?}"))
}

async fn stays_pending(a: &mut Acquire) {
    if let Ok(r) = timeout(QUIET_FOR, a).await {
        panic!("expected the task to stay queued, got {r:?}");
    }
}

/// Every case of the suite, each on its own account (a shared limiter's
/// cases may share a server).
pub async fn run_all(f: &impl Factory, prefix: &str) {
    let a = |name: &str| format!("{prefix}{name}");
    up_to_the_limit_then_queue(&*f.make(3, 10).await, &a("limit")).await;
    fifo_order(&*f.make(1, 100).await, &a("fifo")).await;
    first_goes_ahead(&*f.make(1, 100).await, &a("first")).await;
    queue_bound(&*f.make(1, 2).await, &a("bound")).await;
    queue_timeout(&*f.make(1, 10).await, &a("timeout")).await;
    dropped_waiter_leaves(&*f.make(1, 10).await, &a("drop")).await;
    sub_caps(&*f.make(2, 10).await, &a("subs")).await;
    refuse_and_resize(&*f.make(1, 10).await, &a("resize")).await;
    shut_down(&*f.make(1, 10).await, &a("shutdown")).await;
}

pub async fn up_to_the_limit_then_queue(l: &dyn Limiter, acct: &str) {
    let t = ticket(acct);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(granted(l, &t).await);
    }
    let mut w = queued(l, &t).await;
    wait_for(l, acct, "3 in flight, 1 queued", |s| {
        s == GateStats {
            limit: 3,
            in_flight: 3,
            queued: 1,
        }
    })
    .await;
    held.pop();
    let p = resolves(&mut w)
        .await
        .expect("the freed slot goes to the waiter");
    drop(p);
    drop(held);
    wait_for(l, acct, "everything back", |s| {
        s.in_flight == 0 && s.queued == 0
    })
    .await;
    // Nothing leaked: the whole limit can be taken again.
    let mut again = Vec::new();
    for _ in 0..3 {
        again.push(granted(l, &t).await);
    }
}

pub async fn fifo_order(l: &dyn Limiter, acct: &str) {
    let t = ticket(acct);
    let first = granted(l, &t).await;
    let mut waiters = Vec::new();
    for _ in 0..5 {
        waiters.push(queued(l, &t).await);
    }
    drop(first);
    // Each waiter must be the next one granted: the ones behind it stay
    // pending while it holds the only slot.
    for i in 0..waiters.len() {
        let p = resolves(&mut waiters[i])
            .await
            .unwrap_or_else(|e| panic!("waiter {i}: {e:?}"));
        for later in waiters.iter_mut().skip(i + 1).take(1) {
            stays_pending(later).await;
        }
        drop(p);
    }
    wait_for(l, acct, "an empty gate", |s| {
        s.in_flight == 0 && s.queued == 0
    })
    .await;
}

/// `acquire_first` waits ahead of every waiter; the others keep their
/// order behind it.
pub async fn first_goes_ahead(l: &dyn Limiter, acct: &str) {
    let t = ticket(acct);
    let held = granted(l, &t).await;
    let mut a = queued(l, &t).await;
    let mut b = queued(l, &t).await;
    let mut first = l.acquire_first(&t, far());
    if let Ok(r) = timeout(QUIET_FOR, &mut first).await {
        panic!("expected the first to queue, got {r:?}");
    }
    wait_for(l, acct, "three queued", |s| s.queued == 3).await;
    drop(held);
    let p = resolves(&mut first).await.expect("the head of the queue");
    stays_pending(&mut a).await;
    drop(p);
    let p = resolves(&mut a).await.expect("then the first in line");
    stays_pending(&mut b).await;
    drop(p);
    drop(resolves(&mut b).await.expect("then the next"));
    wait_for(l, acct, "an empty gate", |s| {
        s.in_flight == 0 && s.queued == 0
    })
    .await;
}

pub async fn queue_bound(l: &dyn Limiter, acct: &str) {
    let t = ticket(acct);
    let _p = granted(l, &t).await;
    let _w1 = queued(l, &t).await;
    let _w2 = queued(l, &t).await;
    match timeout(GRANT_WITHIN, l.acquire(&t, far())).await {
        Ok(Err(LimitError::QueueFull { retry_after })) => {
            assert!(retry_after >= Duration::from_secs(1), "{retry_after:?}")
        }
        other => panic!("expected QueueFull, got {other:?}"),
    }
}

pub async fn queue_timeout(l: &dyn Limiter, acct: &str) {
    let t = ticket(acct);
    let p = granted(l, &t).await;
    let started = Instant::now();
    let r = timeout(
        GRANT_WITHIN,
        l.acquire(&t, Instant::now() + Duration::from_millis(200)),
    )
    .await
    .expect("the deadline ends the wait");
    assert!(
        matches!(r, Err(LimitError::QueueTimeout { retry_after }) if retry_after >= Duration::from_secs(1)),
        "{r:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(190));
    wait_for(l, acct, "the timed-out task out of the queue", |s| {
        s.queued == 0
    })
    .await;
    drop(p);
    drop(granted(l, &t).await);
}

pub async fn dropped_waiter_leaves(l: &dyn Limiter, acct: &str) {
    let t = ticket(acct);
    let p = granted(l, &t).await;
    let w = queued(l, &t).await;
    drop(w);
    wait_for(l, acct, "the dropped task out of the queue", |s| {
        s.queued == 0
    })
    .await;
    drop(p);
    // The slot did not go to the task that left.
    let again = granted(l, &t).await;
    // A waiter granted in the same instant it is dropped gives the slot back.
    let w = queued(l, &t).await;
    drop(again);
    drop(w);
    drop(granted(l, &t).await);
    wait_for(l, acct, "an empty gate", |s| {
        s.in_flight == 0 && s.queued == 0
    })
    .await;
}

pub async fn sub_caps(l: &dyn Limiter, acct: &str) {
    let dev = capped(acct, &format!("{acct}-dev"), 1);
    let root = ticket(acct);
    let d = granted(l, &dev).await;
    let mut dev_w = queued(l, &dev).await;
    // The capped sub-account waits, but does not block the root's tasks.
    let r = granted(l, &root).await;
    let mut root_w = queued(l, &root).await;
    drop(r);
    // The freed slot skips the capped head of the queue.
    let r2 = resolves(&mut root_w)
        .await
        .expect("root task behind a capped one");
    stays_pending(&mut dev_w).await;
    drop(d);
    drop(r2);
    let d2 = resolves(&mut dev_w).await.expect("the sub-account's turn");
    drop(d2);
    wait_for(l, acct, "an empty gate", |s| {
        s.in_flight == 0 && s.queued == 0
    })
    .await;
}

pub async fn refuse_and_resize(l: &dyn Limiter, acct: &str) {
    let t = ticket(acct);
    let p = granted(l, &t).await;
    let mut w = queued(l, &t).await;
    l.refuse_queued(acct);
    assert!(matches!(resolves(&mut w).await, Err(LimitError::Refused)));

    let mut w1 = queued(l, &t).await;
    let mut w2 = queued(l, &t).await;
    l.set_limit(acct, 3);
    let g1 = resolves(&mut w1).await.expect("growing admits at once");
    let g2 = resolves(&mut w2).await.expect("growing admits at once");
    // Shrinking cancels nothing; new tasks wait until in-flight is below it.
    l.set_limit(acct, 1);
    let mut w3 = queued(l, &t).await;
    drop(g1);
    stays_pending(&mut w3).await;
    drop(g2);
    stays_pending(&mut w3).await;
    drop(p);
    drop(
        resolves(&mut w3)
            .await
            .expect("admitted below the new limit"),
    );
    l.set_limit(acct, 1);
}

pub async fn shut_down(l: &dyn Limiter, acct: &str) {
    let t = ticket(acct);
    let _p = granted(l, &t).await;
    let mut w = queued(l, &t).await;
    l.shut_down();
    assert!(matches!(
        resolves(&mut w).await,
        Err(LimitError::ShuttingDown)
    ));
    assert!(matches!(
        timeout(GRANT_WITHIN, l.acquire(&t, far())).await,
        Ok(Err(LimitError::ShuttingDown))
    ));
}

#[derive(Debug, Clone)]
pub enum Op {
    Acquire { sub: Option<u8> },
    ReleaseHeld(usize),
    CancelWaiter(usize),
    Resize(u32),
    RefuseQueued,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => proptest::option::of(0u8..3).prop_map(|sub| Op::Acquire { sub }),
        3 => any::<usize>().prop_map(Op::ReleaseHeld),
        2 => any::<usize>().prop_map(Op::CancelWaiter),
        1 => (1u32..5).prop_map(Op::Resize),
        1 => Just(Op::RefuseQueued),
    ]
}

/// Random interleavings of acquire / cancel / release / resize / refuse:
/// the permits held never exceed the limit (nor a sub-account's cap), and
/// once everything is dropped the whole limit can be taken again.
/// `cases` and `len` are kept small for implementations behind a network.
pub async fn interleavings(f: &impl Factory, prefix: &str, cases: u32, len: usize) {
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let strategy = proptest::collection::vec(op(), 1..len);
    for case in 0..cases {
        let ops = strategy
            .new_tree(&mut runner)
            .expect("a random case")
            .current();
        let l = f.make(2, 5).await;
        let acct = format!("{prefix}prop{case}");
        if let Err(msg) = run_ops(&*l, &acct, &ops).await {
            panic!("{msg}\nops: {ops:?}");
        }
    }
}

async fn run_ops(l: &dyn Limiter, acct: &str, ops: &[Op]) -> Result<(), String> {
    let caps = [1u32, 2, 3];
    let mut limit = 2u32;
    let mut held: Vec<(Permit, Option<u8>)> = Vec::new();
    let mut waiting: Vec<(Acquire, Option<u8>)> = Vec::new();
    let make = |sub: Option<u8>| match sub {
        Some(s) => capped(acct, &format!("{acct}-sub{s}"), caps[s as usize]),
        None => ticket(acct),
    };
    for op in ops {
        match op {
            Op::Acquire { sub } => {
                let mut a = l.acquire(&make(*sub), far());
                match timeout(Duration::from_millis(20), &mut a).await {
                    Ok(Ok(p)) => held.push((p, *sub)),
                    Ok(Err(LimitError::QueueFull { .. })) => {}
                    Ok(Err(e)) => return Err(format!("unexpected {e:?}")),
                    Err(_) => waiting.push((a, *sub)),
                }
            }
            Op::ReleaseHeld(i) if !held.is_empty() => {
                let i = i % held.len();
                held.swap_remove(i);
            }
            Op::CancelWaiter(i) if !waiting.is_empty() => {
                let i = i % waiting.len();
                waiting.swap_remove(i);
            }
            Op::Resize(n) => {
                // Growing is checked against the new limit at once;
                // shrinking only bounds later grants, so keep the larger
                // bound until in-flight has drained below it.
                limit = limit.max(*n);
                l.set_limit(acct, *n);
            }
            Op::RefuseQueued => l.refuse_queued(acct),
            _ => {}
        }
        // Collect what was granted meanwhile.
        let mut still = Vec::new();
        for (mut a, sub) in waiting.drain(..) {
            match timeout(Duration::from_millis(5), &mut a).await {
                Ok(Ok(p)) => held.push((p, sub)),
                Ok(Err(_)) => {}
                Err(_) => still.push((a, sub)),
            }
        }
        waiting = still;
        if held.len() as u32 > limit {
            return Err(format!("{} permits held over limit {limit}", held.len()));
        }
        for (i, cap) in caps.iter().enumerate() {
            let n = held.iter().filter(|(_, s)| *s == Some(i as u8)).count() as u32;
            if n > *cap {
                return Err(format!("sub{i}: {n} permits over its cap {cap}"));
            }
        }
        // A grant decided under the old limit may still be on its way
        // from a shared limiter: lower the bound only once nothing waits.
        if let Op::Resize(n) = op
            && held.len() as u32 <= *n
            && waiting.is_empty()
        {
            limit = *n;
        }
    }
    drop(waiting);
    drop(held);
    l.set_limit(acct, 2);
    let deadline = Instant::now() + GRANT_WITHIN;
    loop {
        let s = l.stats(acct);
        if s.in_flight == 0 && s.queued == 0 {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!("left behind: {s:?}"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = ticket(acct);
    let mut again = Vec::new();
    for _ in 0..2 {
        match timeout(GRANT_WITHIN, l.acquire(&t, far())).await {
            Ok(Ok(p)) => again.push(p),
            other => return Err(format!("the limit is not whole again: {other:?}")),
        }
    }
    Ok(())
}
