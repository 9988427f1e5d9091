//! Redis going away and coming back, on private servers: `local` keeps
//! serving with the limit divided among the replicas last seen live,
//! `reject` answers `Unavailable`, and shared limiting resumes within 10 s
//! of Redis being back.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use tokio::time::{Instant, timeout};

use super::{PrivateRedis, eventually, instance_name, prefix, settings};
use crate::billing::conformance::package;
use crate::billing::{AccountBilling, Accounts, PackageKind, Quota, Refusal};
use crate::cluster::{Coordinator, RedisLimiter, RedisQuota};
use crate::config::RedisOutagePolicy;
use crate::limiter::conformance::{QUIET_FOR, granted, ticket};
use crate::limiter::{LimitError, Limiter};

fn far() -> Instant {
    Instant::now() + Duration::from_secs(600)
}

async fn join(srv: &PrivateRedis, prefix: &str, policy: RedisOutagePolicy) -> Arc<Coordinator> {
    Coordinator::start(settings(&srv.url(), prefix, &instance_name(), policy))
        .await
        .expect("joins the private Redis")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_policies_and_recovery() {
    let mut srv = PrivateRedis::start().await;
    let p = prefix();
    let local = RedisLimiter::new(join(&srv, &p, RedisOutagePolicy::Local).await, 4, 10);
    let reject = RedisLimiter::new(join(&srv, &p, RedisOutagePolicy::Reject).await, 4, 10);
    let t = ticket("acme");
    // Both replicas are seen live: under `local` each gets half the limit.
    eventually("two live replicas", Duration::from_secs(3), || {
        local.coordinator().live_replicas() == 2
    })
    .await;
    let held = granted(&local, &t).await;

    srv.kill();
    eventually("the outage to be noticed", Duration::from_secs(5), || {
        !local.is_coordinated() && !reject.is_coordinated()
    })
    .await;

    // `local`: max(1, floor(4 / 2)) = 2 slots on this replica alone.
    let l1 = granted(&local, &t).await;
    let l2 = granted(&local, &t).await;
    let mut third = local.acquire(&t, far());
    assert!(
        timeout(QUIET_FOR, &mut third).await.is_err(),
        "a third local slot was granted"
    );
    // `reject`: refused at once.
    assert!(matches!(
        timeout(Duration::from_secs(1), reject.acquire(&t, far())).await,
        Ok(Err(LimitError::Unavailable))
    ));
    // Quota: `reject` cannot tell whether a unit is left; `local` counts
    // in its own memory.
    let now = Timestamp::now();
    let accounts = Arc::new(Accounts::new(Duration::from_secs(86_400)));
    accounts.insert(
        "acme",
        AccountBilling {
            packages: vec![package("free", "acme", PackageKind::Free, 50, now)],
            ..AccountBilling::default()
        },
    );
    let q_reject = RedisQuota::new(reject.coordinator().clone(), accounts.clone());
    let q_local = RedisQuota::new(local.coordinator().clone(), accounts);
    assert_eq!(
        q_reject.reserve("acme", now).await.err(),
        Some(Refusal::Unavailable)
    );
    assert!(q_local.reserve("acme", now).await.is_ok());
    assert!(reject.coordination_errors().iter().any(|(_, n)| *n > 0));
    // The permit taken before the outage is still held; its lease lapses.
    eventually(
        "the lost lease to be counted",
        Duration::from_secs(5),
        || local.leases_lost() >= 1,
    )
    .await;
    drop(held);

    srv.restart().await;
    let back = Instant::now();
    eventually("shared limiting to resume", Duration::from_secs(10), || {
        local.is_coordinated() && reject.is_coordinated()
    })
    .await;
    assert!(back.elapsed() < Duration::from_secs(10));
    drop((l1, l2, third));

    // Shared again: the two replicas fill one limit of 4 between them.
    let mut shared = Vec::new();
    for l in [&local, &reject, &local, &reject] {
        shared.push(granted(l, &t).await);
    }
    let mut fifth = reject.acquire(&t, far());
    assert!(
        timeout(QUIET_FOR, &mut fifth).await.is_err(),
        "the shared limit was exceeded"
    );
    eventually(
        "the shared count on both replicas",
        Duration::from_secs(3),
        || local.stats("acme").in_flight == 4 && reject.stats("acme").in_flight == 4,
    )
    .await;
}
