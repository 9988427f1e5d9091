//! Usage recorder throughput: events made durable per second through the
//! group-commit writer, with many tasks recording at once as the gateway
//! does. Two stores:
//!
//! - `recorder/…`: SQLite (WAL, `synchronous = FULL`, one fsync per batch);
//! - `recorder-postgres/…`: the PostgreSQL store (one transaction per batch,
//!   the server's own `fsync` and `synchronous_commit`), only when
//!   `TOLLGATE_BENCH_POSTGRES` names a database URL (its tables are created
//!   if missing; use a database of your own, `benches/cluster.sh` makes and
//!   drops one). Without it that group says so and measures nothing.
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
use tollgate::store::{AccountRow, PostgresStore, SqliteStore, Store, Write, commit};
use tollgate::usage::{UsageData, UsageEvent, UsageRecorder};

const CONCURRENT: u64 = 512;

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
            idempotency: None,
            job_id: None,
        },
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// 100 postpaid accounts, as the events name them.
fn seed(rt: &tokio::runtime::Runtime, store: &dyn Store) {
    rt.block_on(async {
        for i in 0..100 {
            let id = format!("acct-{i}");
            commit(
                store,
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
}

/// `CONCURRENT` tasks each record one event and wait for its commit.
fn measure(c: &mut Criterion, group: &str, rt: &tokio::runtime::Runtime, store: Arc<dyn Store>) {
    let rec = UsageRecorder::new(
        store,
        Arc::new(Metrics::new(&tollgate::config::MetricsConfig {
            per_account_labels: false,
            ..Default::default()
        })),
    );
    let mut group = c.benchmark_group(group);
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
                                rec.record(ev, None, "2026-11".into(), None, None)
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
}

fn recorder(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).expect("store"));
    seed(&rt, &*store);
    measure(c, "recorder", &rt, store.clone());
    store.close();
}

fn recorder_postgres(c: &mut Criterion) {
    let Ok(url) = std::env::var("TOLLGATE_BENCH_POSTGRES") else {
        eprintln!("recorder-postgres skipped: set TOLLGATE_BENCH_POSTGRES to a database URL");
        return;
    };
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = match rt.block_on(PostgresStore::open(&url, dir.path(), "bench")) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("recorder-postgres skipped: {e}");
            return;
        }
    };
    seed(&rt, &*store);
    measure(c, "recorder-postgres", &rt, store.clone());
    store.close();
}

criterion_group!(benches, recorder, recorder_postgres);
criterion_main!(benches);
