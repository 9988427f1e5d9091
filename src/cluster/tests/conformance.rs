//! The limiter and quota conformance suites against Redis.

use std::sync::Arc;

use super::{cleanup, prefix, replica};
use crate::billing::{Accounts, Quota};
use crate::cluster::{RedisLimiter, RedisQuota};
use crate::limiter::Limiter;

fn limiter_factory(
    prefix: String,
) -> impl Fn(u32, usize) -> std::pin::Pin<Box<dyn Future<Output = Arc<dyn Limiter>>>> {
    move |limit, max_queue| {
        let prefix = prefix.clone();
        Box::pin(async move {
            let c = replica(&prefix).await;
            Arc::new(RedisLimiter::new(c, limit, max_queue)) as Arc<dyn Limiter>
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_conformance() {
    let p = prefix();
    crate::limiter::conformance::run_all(&limiter_factory(p.clone()), "acct-").await;
    cleanup(&p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_interleavings() {
    let p = prefix();
    crate::limiter::conformance::interleavings(&limiter_factory(p.clone()), "acct-", 8, 30).await;
    cleanup(&p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_conformance() {
    let p = prefix();
    let make = |accounts: Arc<Accounts>| {
        let p = p.clone();
        async move { Arc::new(RedisQuota::new(replica(&p).await, accounts)) as Arc<dyn Quota> }
    };
    crate::billing::conformance::run_all(&make, "acct-").await;
    cleanup(&p).await;
}
