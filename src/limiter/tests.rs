//! Limiter tests: every release path, FIFO order, caps, resize, and a
//! property test over random interleavings.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use proptest::prelude::*;

use std::future::Future;

use super::*;

fn ticket(account: &str) -> Ticket {
    Ticket {
        account: Arc::from(account),
        sub_cap: None,
    }
}

fn capped(account: &str, sub: &str, cap: u32) -> Ticket {
    Ticket {
        account: Arc::from(account),
        sub_cap: Some(SubCap {
            sub_account: Arc::from(sub),
            max_concurrency: cap,
        }),
    }
}

fn far() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(3600)
}

fn now(l: &LocalLimiter, t: &Ticket) -> Permit {
    match l.acquire(t, far()).take_ready() {
        Some(Ok(p)) => p,
        other => panic!("expected a free slot, got {other:?}"),
    }
}

fn queued(l: &LocalLimiter, t: &Ticket) -> Acquire {
    let mut a = l.acquire(t, far());
    if let Some(r) = a.take_ready() {
        panic!("expected to queue, got {r:?}");
    }
    a
}

fn refused(l: &LocalLimiter, t: &Ticket) -> LimitError {
    match l.acquire(t, far()).take_ready() {
        Some(Err(e)) => e,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn poll_once(w: &mut Acquire) -> Poll<Result<Permit, LimitError>> {
    Pin::new(w).poll(&mut Context::from_waker(Waker::noop()))
}

fn stats(l: &LocalLimiter, a: &str) -> GateStats {
    l.stats(a)
}

#[tokio::test]
async fn permits_up_to_the_limit_then_queue() {
    let l = LocalLimiter::new(3, 10);
    let t = ticket("acme");
    let held: Vec<_> = (0..3).map(|_| now(&l, &t)).collect();
    let _w = queued(&l, &t);
    assert_eq!(
        stats(&l, "acme"),
        GateStats {
            limit: 3,
            in_flight: 3,
            queued: 1
        }
    );
    drop(held);
    // The waiter was granted the first freed slot.
    assert_eq!(
        stats(&l, "acme"),
        GateStats {
            limit: 3,
            in_flight: 1,
            queued: 0
        }
    );
}

#[tokio::test]
async fn accounts_are_isolated() {
    let l = LocalLimiter::new(1, 10);
    let _a = now(&l, &ticket("a"));
    let _b = now(&l, &ticket("b"));
    assert_eq!(stats(&l, "a").in_flight, 1);
    assert_eq!(stats(&l, "b").in_flight, 1);
}

#[tokio::test]
async fn queue_bound_is_a_typed_error() {
    let l = LocalLimiter::new(1, 2);
    let t = ticket("acme");
    let _p = now(&l, &t);
    let _w1 = queued(&l, &t);
    let _w2 = queued(&l, &t);
    assert!(matches!(refused(&l, &t), LimitError::QueueFull { .. }));
}

#[tokio::test]
async fn zero_queue_refuses_at_once() {
    let l = LocalLimiter::new(1, 0);
    let t = ticket("acme");
    let _p = now(&l, &t);
    assert!(matches!(refused(&l, &t), LimitError::QueueFull { .. }));
}

#[tokio::test(start_paused = true)]
async fn waiters_are_served_in_fifo_order() {
    let l = Arc::new(LocalLimiter::new(1, 100));
    let t = ticket("acme");
    let first = now(&l, &t);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..5 {
        let w = queued(&l, &t);
        let tx = tx.clone();
        tokio::spawn(async move {
            let p = w.await.unwrap();
            tx.send(i).unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
            drop(p);
        });
    }
    drop(first);
    let mut order = Vec::new();
    for _ in 0..5 {
        order.push(rx.recv().await.unwrap());
    }
    assert_eq!(order, vec![0, 1, 2, 3, 4]);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        stats(&l, "acme"),
        GateStats {
            limit: 1,
            in_flight: 0,
            queued: 0
        }
    );
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_waiter_leaves_the_queue() {
    let l = LocalLimiter::new(1, 10);
    let t = ticket("acme");
    let p = now(&l, &t);
    let w = l.acquire(&t, tokio::time::Instant::now() + Duration::from_millis(50));
    assert_eq!(stats(&l, "acme").queued, 1);
    assert!(
        matches!(w.await, Err(LimitError::QueueTimeout { .. })),
        "should time out"
    );
    assert_eq!(stats(&l, "acme").queued, 0);
    drop(p);
    assert_eq!(stats(&l, "acme").in_flight, 0);
}

#[tokio::test]
async fn a_dropped_waiter_that_was_already_granted_frees_the_slot() {
    let l = LocalLimiter::new(1, 10);
    let t = ticket("acme");
    let p = now(&l, &t);
    let w = queued(&l, &t);
    drop(p); // grants the slot to `w`, which never polls it
    assert_eq!(stats(&l, "acme").in_flight, 1);
    drop(w);
    assert_eq!(
        stats(&l, "acme"),
        GateStats {
            limit: 1,
            in_flight: 0,
            queued: 0
        }
    );
}

#[tokio::test]
async fn a_panicking_task_releases_its_slot() {
    let l = Arc::new(LocalLimiter::new(1, 10));
    let t = ticket("acme");
    let l2 = l.clone();
    let r = std::thread::spawn(move || {
        let _p = now(&l2, &t);
        panic!("task blew up");
    })
    .join();
    assert!(r.is_err());
    assert_eq!(stats(&l, "acme").in_flight, 0);
}

#[tokio::test]
async fn growing_the_limit_starts_waiters_at_once() {
    let l = LocalLimiter::new(1, 10);
    let t = ticket("acme");
    let _p = now(&l, &t);
    let mut w1 = queued(&l, &t);
    let mut w2 = queued(&l, &t);
    l.set_limit("acme", 3);
    assert!(matches!(poll_once(&mut w1), Poll::Ready(Ok(_))));
    assert!(matches!(poll_once(&mut w2), Poll::Ready(Ok(_))));
    // The permits were dropped right after polling.
    assert_eq!(
        stats(&l, "acme"),
        GateStats {
            limit: 3,
            in_flight: 1,
            queued: 0
        }
    );
}

#[tokio::test]
async fn shrinking_cancels_nothing_and_admits_only_below_the_new_limit() {
    let l = LocalLimiter::new(3, 10);
    let t = ticket("acme");
    let mut held: Vec<_> = (0..3).map(|_| now(&l, &t)).collect();
    l.set_limit("acme", 1);
    assert_eq!(stats(&l, "acme").in_flight, 3);
    let mut w = queued(&l, &t);
    held.pop();
    assert!(poll_once(&mut w).is_pending(), "2 in flight > limit 1");
    held.pop();
    assert!(poll_once(&mut w).is_pending(), "1 in flight = limit 1");
    held.pop();
    let Poll::Ready(Ok(p)) = poll_once(&mut w) else {
        panic!("should be admitted below the new limit")
    };
    assert_eq!(stats(&l, "acme").in_flight, 1);
    drop(p);
}

#[tokio::test]
async fn sub_account_cap_holds_inside_the_root_limit() {
    let l = LocalLimiter::new(3, 10);
    let dev = capped("acme", "acme-dev", 1);
    let root = ticket("acme");
    let _d = now(&l, &dev);
    let mut dev_waiter = queued(&l, &dev);
    // The capped sub-account waits, but does not block the root's tasks.
    let _r = now(&l, &root);
    assert!(poll_once(&mut dev_waiter).is_pending());
    assert_eq!(stats(&l, "acme").in_flight, 2);
}

#[tokio::test]
async fn a_capped_head_of_queue_does_not_block_others() {
    let l = LocalLimiter::new(2, 10);
    let dev = capped("acme", "acme-dev", 1);
    let root = ticket("acme");
    let d = now(&l, &dev);
    let r = now(&l, &root);
    let mut dev_w = queued(&l, &dev);
    let mut root_w = queued(&l, &root);
    drop(r); // frees a root slot; the dev waiter is at its cap
    assert!(poll_once(&mut dev_w).is_pending());
    assert!(matches!(poll_once(&mut root_w), Poll::Ready(Ok(_))));
    drop(d);
    assert!(matches!(poll_once(&mut dev_w), Poll::Ready(Ok(_))));
}

#[tokio::test]
async fn refusing_queued_tasks_empties_the_queue() {
    let l = LocalLimiter::new(1, 10);
    let t = ticket("acme");
    let _p = now(&l, &t);
    let mut w = queued(&l, &t);
    l.refuse_queued("acme");
    assert!(matches!(
        poll_once(&mut w),
        Poll::Ready(Err(LimitError::Refused))
    ));
    assert_eq!(stats(&l, "acme").queued, 0);
}

#[tokio::test]
async fn shutdown_refuses_queued_and_new_tasks() {
    let l = LocalLimiter::new(1, 10);
    let t = ticket("acme");
    let _p = now(&l, &t);
    let mut w = queued(&l, &t);
    l.shut_down();
    assert!(matches!(
        poll_once(&mut w),
        Poll::Ready(Err(LimitError::ShuttingDown))
    ));
    assert!(matches!(refused(&l, &t), LimitError::ShuttingDown));
}

#[tokio::test]
async fn retry_after_follows_task_durations_and_queue_depth() {
    let l = LocalLimiter::new(2, 100);
    let t = ticket("acme");
    assert_eq!(l.retry_after("nobody"), Duration::from_secs(1));
    let p = now(&l, &t);
    p.record_service_time(Duration::from_secs(4));
    let _p2 = now(&l, &t);
    let _waiters: Vec<_> = (0..4).map(|_| queued(&l, &t)).collect();
    // 4 queued / limit 2 = 2 rounds ahead, +1 for the newcomer's own turn.
    assert_eq!(l.retry_after("acme"), Duration::from_secs(12));
}

#[derive(Debug, Clone)]
enum Op {
    Acquire { sub: Option<u8> },
    ReleaseHeld(usize),
    CancelWaiter(usize),
    PollWaiters,
    Resize(u32),
    RefuseQueued,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => proptest::option::of(0u8..3).prop_map(|sub| Op::Acquire { sub }),
        3 => any::<usize>().prop_map(Op::ReleaseHeld),
        2 => any::<usize>().prop_map(Op::CancelWaiter),
        3 => Just(Op::PollWaiters),
        1 => (0u32..6).prop_map(Op::Resize),
        1 => Just(Op::RefuseQueued),
    ]
}

proptest! {
    /// Random interleavings of acquire / cancel / release / resize never
    /// admit a task while in-flight is at the limit (or a capped sub at its
    /// cap), and leave nothing behind once everything is dropped.
    #[test]
    fn never_exceeds_the_limit_and_never_leaks(ops in proptest::collection::vec(op(), 1..200)) {
        // Queued acquires make their deadline timer on first poll, which
        // needs a runtime context.
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let _in_runtime = rt.enter();
        let l = LocalLimiter::new(2, 5);
        let caps = [1u32, 2, 3];
        let mut held: Vec<(Permit, Option<u8>)> = Vec::new();
        let mut waiting: Vec<(Acquire, Option<u8>)> = Vec::new();
        let mut limit = 2u32;
        let sub_count = |held: &Vec<(Permit, Option<u8>)>, s: u8| {
            held.iter().filter(|(_, x)| *x == Some(s)).count() as u32
        };
        for op in ops {
            let before = l.stats("acme").in_flight;
            let mut admitted_now = 0u32;
            match op {
                Op::Acquire { sub } => {
                    let t = match sub {
                        Some(s) => capped("acme", &format!("sub{s}"), caps[s as usize]),
                        None => ticket("acme"),
                    };
                    let mut a = l.acquire(&t, far());
                    match a.take_ready() {
                        Some(Ok(p)) => {
                            prop_assert!(before < limit, "admitted at the limit");
                            if let Some(s) = sub {
                                prop_assert!(sub_count(&held, s) < caps[s as usize]);
                            }
                            held.push((p, sub));
                            admitted_now += 1;
                        }
                        None => waiting.push((a, sub)),
                        Some(Err(LimitError::QueueFull { .. })) => prop_assert_eq!(waiting.len(), 5),
                        Some(Err(e)) => prop_assert!(false, "unexpected {e:?}"),
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
                    limit = n;
                    l.set_limit("acme", n);
                }
                Op::RefuseQueued => l.refuse_queued("acme"),
                _ => {}
            }
            // Collect everything granted to waiters so far.
            let mut still = Vec::new();
            for (mut w, sub) in waiting.drain(..) {
                match poll_once(&mut w) {
                    Poll::Ready(Ok(p)) => { held.push((p, sub)); admitted_now += 1; }
                    Poll::Ready(Err(_)) => {}
                    Poll::Pending => still.push((w, sub)),
                }
            }
            waiting = still;
            let s = l.stats("acme");
            prop_assert_eq!(s.in_flight as usize, held.len(), "in-flight matches held permits");
            prop_assert_eq!(s.queued as usize, waiting.len(), "queued matches live waiters");
            if admitted_now > 0 {
                prop_assert!(s.in_flight <= limit, "{} in flight over limit {}", s.in_flight, limit);
            }
            for (i, cap) in caps.iter().enumerate() {
                prop_assert!(sub_count(&held, i as u8) <= *cap);
            }
        }
        drop(waiting);
        drop(held);
        let s = l.stats("acme");
        prop_assert_eq!((s.in_flight, s.queued), (0, 0));
    }
}

mod conformance_local {
    use std::sync::Arc;

    use crate::limiter::conformance;
    use crate::limiter::{Limiter, LocalLimiter};

    async fn make(limit: u32, max_queue: usize) -> Arc<dyn Limiter> {
        Arc::new(LocalLimiter::new(limit, max_queue))
    }

    #[tokio::test]
    async fn local_limiter_passes_the_suite() {
        conformance::run_all(&make, "t-").await;
    }

    #[tokio::test]
    async fn local_limiter_passes_the_interleavings() {
        conformance::interleavings(&make, "t-", 64, 60).await;
    }
}
