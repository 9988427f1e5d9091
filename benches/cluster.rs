//! The shared limiter's cost (SPEC §8.10): acquire + release of one slot
//! through Redis on loopback, against the in-process limiter's nanoseconds.
//! Needs Redis on `TOLLGATE_BENCH_REDIS` (default `redis://127.0.0.1:6379/0`);
//! without one it says so and measures nothing.
//!
//! Run: `cargo bench --bench cluster`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use tollgate::cluster::{ClusterSettings, Coordinator, RedisLimiter};
use tollgate::config::RedisOutagePolicy;
use tollgate::limiter::{Limiter, Ticket};

fn far() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(3600)
}

fn round_trip(c: &mut Criterion) {
    let url = std::env::var("TOLLGATE_BENCH_REDIS")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379/0".to_string());
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cluster bench skipped: no runtime: {e}");
            return;
        }
    };
    let prefix = format!("tgbench-{}", uuid::Uuid::new_v4().simple());
    let settings = ClusterSettings {
        redis_url: url.clone(),
        key_prefix: prefix,
        lease: Duration::from_secs(10),
        on_outage: RedisOutagePolicy::Reject,
        instance: format!("bench-{}", std::process::id()),
    };
    let coord = match rt.block_on(Coordinator::start(settings)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cluster bench skipped: {e}");
            return;
        }
    };
    // A limit no bench reaches: every acquire is granted at once. The
    // release is spawned by the permit's drop and shares the connection
    // with the next acquire, so in steady state an iteration costs both
    // round trips.
    let limiter = Arc::new(RedisLimiter::new(coord.clone(), 1_000_000, 100));
    let t = Ticket {
        account: Arc::from("acme"),
        sub_cap: None,
    };
    c.bench_function("cluster/acquire+release through Redis", |b| {
        b.iter(|| {
            rt.block_on(async {
                match limiter.acquire(&t, far()).await {
                    Ok(permit) => drop(permit),
                    Err(e) => panic!("no slot: {e}"),
                }
            })
        })
    });
    rt.block_on(coord.close());
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(5));
    targets = round_trip
}
criterion_main!(benches);
