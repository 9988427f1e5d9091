//! Several replicas in one process on one prefix: one limit, one FIFO
//! queue, one queue bound, crash recovery, one quota, unique names.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use jiff::Timestamp;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

use super::{LEASE, SHARED_URL, cleanup, eventually, prefix, replica, settings, shared_redis};
use crate::billing::conformance::package;
use crate::billing::{AccountBilling, Accounts, PackageKind, Quota, Refusal};
use crate::cluster::{ClusterError, Coordinator, RedisLimiter, RedisQuota};
use crate::config::RedisOutagePolicy;
use crate::limiter::conformance::{granted, queued, ticket};
use crate::limiter::{LimitError, Limiter};

fn far() -> Instant {
    Instant::now() + Duration::from_secs(600)
}

/// Recovery must be seen within a lease and one second (SPEC §8.3).
const RECOVERY: Duration = Duration::from_millis(2000);

async fn limiters(prefix: &str, n: usize, limit: u32, max_queue: usize) -> Vec<Arc<RedisLimiter>> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(Arc::new(RedisLimiter::new(
            replica(prefix).await,
            limit,
            max_queue,
        )));
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_holds_summed_over_replicas() {
    let p = prefix();
    let ls = limiters(&p, 3, 3, 100).await;
    let running = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let l = ls[i % 3].clone();
            let (running, peak) = (running.clone(), peak.clone());
            tokio::spawn(async move {
                let permit = timeout(Duration::from_secs(20), l.acquire(&ticket("acme"), far()))
                    .await
                    .expect("granted in time")
                    .expect("a slot");
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(15)).await;
                // Counted out before the slot is given back.
                running.fetch_sub(1, Ordering::SeqCst);
                drop(permit);
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("no panic");
    }
    assert!(peak.load(Ordering::SeqCst) <= 3, "peak {peak:?}");
    assert_eq!(peak.load(Ordering::SeqCst), 3, "the limit was used");
    cleanup(&p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_across_replicas() {
    let p = prefix();
    let ls = limiters(&p, 2, 1, 100).await;
    let (a, b) = (&ls[0], &ls[1]);
    let t = ticket("acme");
    let first = granted(&**a, &t).await;
    let mut joined = Vec::new();
    for l in [a, b, a, b] {
        joined.push(queued(&**l, &t).await);
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    for (i, w) in joined.into_iter().enumerate() {
        let tx = tx.clone();
        tokio::spawn(async move {
            let permit = w.await.expect("granted in turn");
            let _ = tx.send(i);
            tokio::time::sleep(Duration::from_millis(30)).await;
            drop(permit);
        });
    }
    drop(first);
    let mut order = Vec::new();
    for _ in 0..4 {
        order.push(
            timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("the next grant in time")
                .expect("a grant"),
        );
    }
    assert_eq!(order, [0, 1, 2, 3]);
    cleanup(&p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_bound_is_cluster_wide() {
    let p = prefix();
    let ls = limiters(&p, 3, 1, 2).await;
    let t = ticket("acme");
    let _held = granted(&*ls[0], &t).await;
    let _w1 = queued(&*ls[0], &t).await;
    let _w2 = queued(&*ls[1], &t).await;
    match timeout(Duration::from_secs(3), ls[2].acquire(&t, far())).await {
        Ok(Err(LimitError::QueueFull { retry_after })) => {
            assert!(retry_after >= Duration::from_secs(1))
        }
        other => panic!("expected QueueFull, got {other:?}"),
    }
    cleanup(&p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_replica_gives_back_slots_tickets_and_units() {
    let p = prefix();
    let ls = limiters(&p, 2, 2, 10).await;
    let (a, b) = (&ls[0], &ls[1]);
    let t = ticket("acme");
    // B holds the whole limit and has a task queued; A queues behind it.
    let b1 = granted(&**b, &t).await;
    let b2 = granted(&**b, &t).await;
    let b_waiting = queued(&**b, &t).await;
    let mut a_waiting = queued(&**a, &t).await;

    // B also holds every unit of the account's quota.
    let now = Timestamp::now();
    let load = || {
        let accounts = Arc::new(Accounts::new(Duration::from_secs(86_400)));
        accounts.insert(
            "acme",
            AccountBilling {
                packages: vec![package("free", "acme", PackageKind::Free, 3, now)],
                ..AccountBilling::default()
            },
        );
        accounts
    };
    let qa = RedisQuota::new(a.coordinator().clone(), load());
    let qb = RedisQuota::new(b.coordinator().clone(), load());
    let mut units = Vec::new();
    for _ in 0..3 {
        units.push(qb.reserve("acme", now).await.expect("a unit"));
    }
    assert_eq!(
        qa.reserve("acme", now).await.err(),
        Some(Refusal::LowBalance)
    );

    b.coordinator().abort();
    let crashed = Instant::now();
    drop((b1, b2, b_waiting, units));

    let p1 = timeout(RECOVERY, &mut a_waiting)
        .await
        .expect("B's slots come back within lease + 1 s")
        .expect("a slot");
    let p2 = timeout(RECOVERY, a.acquire(&t, far()))
        .await
        .expect("the second slot too")
        .expect("a slot");
    // B's queued ticket is gone as well.
    let s = a.stats("acme");
    assert_eq!((s.in_flight, s.queued), (2, 0), "{s:?}");
    drop((p1, p2));

    let mut got = Vec::new();
    while got.len() < 3 {
        match qa.reserve("acme", now).await {
            Ok(r) => got.push(r),
            Err(Refusal::LowBalance) if crashed.elapsed() < RECOVERY => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("B's units did not come back: {e:?}"),
        }
    }
    assert_eq!(
        qa.reserve("acme", now).await.err(),
        Some(Refusal::LowBalance)
    );
    // B's registry entry expires: A divides by one replica again.
    eventually("B to leave the registry", RECOVERY, || {
        a.coordinator().live_replicas() == 1
    })
    .await;
    cleanup(&p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_overdraw_across_replicas() {
    let p = prefix();
    let now = Timestamp::now();
    let mut quotas: Vec<Arc<dyn Quota>> = Vec::new();
    for _ in 0..3 {
        let accounts = Arc::new(Accounts::new(Duration::from_secs(86_400)));
        accounts.insert(
            "acme",
            AccountBilling {
                packages: vec![package("free", "acme", PackageKind::Free, 50, now)],
                ..AccountBilling::default()
            },
        );
        quotas.push(Arc::new(RedisQuota::new(replica(&p).await, accounts)));
    }
    let calls: Vec<_> = (0..60)
        .map(|i| {
            let q = quotas[i % 3].clone();
            tokio::spawn(async move { q.reserve("acme", Timestamp::now()).await })
        })
        .collect();
    let (mut ok, mut low) = (Vec::new(), 0);
    for c in calls {
        match c.await.expect("no panic") {
            Ok(r) => ok.push(r),
            Err(Refusal::LowBalance) => low += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!((ok.len(), low), (50, 10));
    cleanup(&p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_name_is_unique_among_live_replicas() {
    shared_redis().await;
    let p = prefix();
    let start = || {
        Coordinator::start(settings(
            SHARED_URL,
            &p,
            "gw-twin",
            RedisOutagePolicy::Local,
        ))
    };
    let first = start().await.expect("the first one starts");
    match start().await {
        Err(ClusterError::InstanceTaken { instance }) => assert_eq!(instance, "gw-twin"),
        Err(e) => panic!("expected InstanceTaken, got {e}"),
        Ok(_) => panic!("a live twin was allowed to start"),
    }
    // Killed without leaving: a restart under the same name comes back
    // within the lease and a second.
    first.abort();
    let killed = Instant::now();
    let again = timeout(LEASE + Duration::from_secs(1), start())
        .await
        .expect("back within lease + 1 s")
        .expect("the name is taken over");
    assert!(killed.elapsed() < LEASE + Duration::from_secs(1));
    again.close().await;
    // Left cleanly: the name is free at once.
    let third = timeout(Duration::from_millis(300), start())
        .await
        .expect("no wait after a clean close")
        .expect("starts");
    third.close().await;
    cleanup(&p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_account_caps_hold_across_replicas() {
    let p = prefix();
    let ls = limiters(&p, 2, 3, 10).await;
    let (a, b) = (&ls[0], &ls[1]);
    let dev = crate::limiter::conformance::capped("acme", "acme-dev", 1);
    let root = ticket("acme");
    let d = granted(&**a, &dev).await;
    // The sub-account's second task waits on the other replica, without
    // blocking the root's tasks behind it.
    let mut dev_w = queued(&**b, &dev).await;
    let r = granted(&**b, &root).await;
    assert!(
        timeout(Duration::from_millis(150), &mut dev_w)
            .await
            .is_err(),
        "the cap was exceeded across replicas"
    );
    drop(d);
    let d2 = timeout(Duration::from_secs(3), dev_w)
        .await
        .expect("the sub-account's turn")
        .expect("a slot");
    drop((d2, r));
    cleanup(&p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_shutdown_reach_across_replicas() {
    let p = prefix();
    let ls = limiters(&p, 2, 1, 10).await;
    let (a, b) = (&ls[0], &ls[1]);
    let t = ticket("acme");
    let held = granted(&**a, &t).await;
    let mut on_a = queued(&**a, &t).await;
    let mut on_b = queued(&**b, &t).await;
    // Deactivated through A: B's queued task is refused too.
    a.refuse_queued("acme");
    for w in [&mut on_a, &mut on_b] {
        assert!(matches!(
            timeout(Duration::from_secs(3), w).await,
            Ok(Err(LimitError::Refused))
        ));
    }
    // B shuts down: its own queued task is told so, A's stays queued and
    // gets the slot next.
    let mut on_a = queued(&**a, &t).await;
    let mut on_b = queued(&**b, &t).await;
    b.shut_down();
    assert!(matches!(
        timeout(Duration::from_secs(3), &mut on_b).await,
        Ok(Err(LimitError::ShuttingDown))
    ));
    drop(held);
    let next = timeout(Duration::from_secs(3), &mut on_a)
        .await
        .expect("A's task is next")
        .expect("a slot");
    drop(next);
    cleanup(&p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_slot_leaks_when_tasks_give_up_across_replicas() {
    let p = prefix();
    let ls = limiters(&p, 3, 2, 100).await;
    let t = ticket("acme");
    let tasks: Vec<_> = (0..60u64)
        .map(|i| {
            let l = ls[(i % 3) as usize].clone();
            let t = t.clone();
            tokio::spawn(async move {
                // A third time out in the queue, a third hang up while
                // queued, the rest run.
                let deadline = match i % 3 {
                    0 => Instant::now() + Duration::from_millis(5 + i % 7),
                    _ => far(),
                };
                let wait = Duration::from_millis(if i % 3 == 1 { 3 + i % 5 } else { 10_000 });
                if let Ok(Ok(permit)) = timeout(wait, l.acquire(&t, deadline)).await {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    drop(permit);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("no panic");
    }
    for l in &ls {
        crate::limiter::conformance::wait_for(&**l, "acme", "an empty pool", |s| {
            s.in_flight == 0 && s.queued == 0
        })
        .await;
    }
    // Nothing leaked: the whole limit can be taken, from any replica.
    let _a = granted(&*ls[1], &t).await;
    let _b = granted(&*ls[2], &t).await;
    cleanup(&p).await;
}

/// A success's unit is settled by the heartbeat, not by a round trip of
/// its own: until then it is renewed, so it never comes back when its
/// first lease would have lapsed, nor after its record is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_units_stay_taken_past_their_lease() {
    let p = prefix();
    let now = Timestamp::now();
    let load = || {
        let accounts = Arc::new(Accounts::new(Duration::from_secs(86_400)));
        accounts.insert(
            "acme",
            AccountBilling {
                packages: vec![package("free", "acme", PackageKind::Free, 2, now)],
                ..AccountBilling::default()
            },
        );
        accounts
    };
    let a = replica(&p).await;
    let qa = RedisQuota::new(a.clone(), load());
    let qb = RedisQuota::new(replica(&p).await, load());
    qa.reserve("acme", now).await.expect("a unit").commit(None);
    qa.reserve("acme", now).await.expect("a unit").commit(None);
    // Three leases later, on another replica: both units are still taken.
    tokio::time::sleep(LEASE * 3).await;
    assert_eq!(
        qb.reserve("acme", now).await.err(),
        Some(Refusal::LowBalance)
    );
    assert!(
        a.units.is_empty(),
        "the heartbeat settled the committed units"
    );
    cleanup(&p).await;
}

/// Idempotency markers (SPEC §10.1): one key's marker is held by one task
/// across replicas, renewed past its lease while held, given back when
/// the task ends, and a crashed replica's marker lapses like its slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_marker_is_held_once_across_replicas_and_lapses_with_its_replica() {
    use crate::cluster::RedisMarkers;
    use crate::idempotency::{IdempotencyKey, InProgress, MarkerTaken};
    let p = prefix();
    let (a, b) = (replica(&p).await, replica(&p).await);
    let (ma, mb) = (RedisMarkers::new(a.clone()), RedisMarkers::new(b.clone()));
    let key = IdempotencyKey::parse(b"order-1", "k").unwrap();
    let held = ma.take("acme", &key).await.expect("the first takes it");
    assert_eq!(mb.take("acme", &key).await.err(), Some(MarkerTaken::Held));
    // Scoped to the root account.
    let other = mb.take("other", &key).await.expect("another account's key");
    // Held longer than a lease: the heartbeat renews it.
    tokio::time::sleep(LEASE * 2).await;
    assert_eq!(mb.take("acme", &key).await.err(), Some(MarkerTaken::Held));
    drop(held);
    let next = take_within(&mb, &key, "the released marker to be free").await;
    drop((next, other));
    // A crashed replica's marker lapses within the lease.
    let crashing = take_within(&ma, &key, "the marker to be free again").await;
    a.abort();
    let _ = take_within(&mb, &key, "the crashed replica's marker to lapse").await;
    drop(crashing);
    cleanup(&p).await;
}

/// Takes `key`'s marker in account acme, retrying while another holds it,
/// for at most [`RECOVERY`].
async fn take_within(
    markers: &crate::cluster::RedisMarkers,
    key: &crate::idempotency::IdempotencyKey,
    what: &str,
) -> crate::idempotency::Marker {
    use crate::idempotency::{InProgress, MarkerTaken};
    let since = Instant::now();
    loop {
        match markers.take("acme", key).await {
            Ok(m) => return m,
            Err(MarkerTaken::Held) if since.elapsed() < RECOVERY => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("timed out waiting for {what}: {e:?}"),
        }
    }
}
