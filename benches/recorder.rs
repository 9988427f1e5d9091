//! Usage recorder throughput: events made durable per second through the
//! group-commit writer (SQLite WAL, `synchronous = FULL`, one fsync per
//! batch), with many tasks recording at once as the gateway does.
//!
//! Run: `cargo bench --bench recorder`. Criterion reports elements/s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use jiff::Timestamp;
use rust_decimal::Decimal;
use tollgate::accounts::AccountStatus;
use tollgate::billing::{PackageKind, ResourcePackage};
use tollgate::metrics::Metrics;
use tollgate::store::{AccountRow, SqliteStore, Store, Write, commit};
use tollgate::usage::{UsageData, UsageEvent, UsageRecorder};

fn event(n: u64) -> UsageEvent {
    UsageEvent::new(
        "bench",
        Timestamp::now(),
        UsageData {
            account: format!("acct-{}", n % 100),
            sub_account: None,
            api: "ImageStyleTransfer".into(),
            units: 1,
            request_id: format!("req-{n}"),
            status: 200,
            queue_wait_ms: 0,
            upstream_ms: 12,
            charged_to: "postpaid".into(),
            client_gone: false,
        },
    )
}

fn recorder(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).expect("store"));
    rt.block_on(async {
        for i in 0..100 {
            let id = format!("acct-{i}");
            commit(
                &*store,
                Write::CreateAccount {
                    account: AccountRow {
                        id: id.clone(),
                        status: AccountStatus::Active,
                        created_at: Timestamp::now(),
                        postpaid: true,
                        balance_usd: Decimal::ZERO,
                        arrears_since: None,
                    },
                    free_package: Box::new(ResourcePackage::new(
                        format!("free-{id}"),
                        &id,
                        PackageKind::Free,
                        50,
                        Decimal::ZERO,
                        Timestamp::now(),
                    )),
                },
            )
            .await
            .expect("account");
        }
    });
    let rec = UsageRecorder::new(store.clone(), Arc::new(Metrics::new(false)));
    const CONCURRENT: u64 = 512;
    let mut group = c.benchmark_group("recorder");
    group.throughput(Throughput::Elements(CONCURRENT));
    group.measurement_time(Duration::from_secs(8));
    let mut n = 0u64;
    group.bench_function("512 concurrent durable events", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                rt.block_on(async {
                    let handles: Vec<_> = (0..CONCURRENT)
                        .map(|_| {
                            n += 1;
                            let rec = rec.clone();
                            let ev = event(n);
                            tokio::spawn(async move {
                                rec.record(ev, None, "2026-11".into())
                                    .await
                                    .expect("stored")
                            })
                        })
                        .collect();
                    for h in handles {
                        h.await.expect("task");
                    }
                });
                total += start.elapsed();
            }
            total
        })
    });
    group.finish();
    store.close();
}

criterion_group!(benches, recorder);
criterion_main!(benches);
