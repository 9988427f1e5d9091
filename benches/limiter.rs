//! Limiter microbenches: uncontended acquire + release, and acquire +
//! release on an account with 1,000 tasks queued behind a capped
//! sub-account (the worst case for the grant scan).
//!
//! Run: `cargo bench --bench limiter`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use tollgate::limiter::{Limiter, LocalLimiter, SubCap, Ticket};

/// A deadline no bench reaches (the queue wait is not what is measured).
fn far() -> tokio::time::Instant {
    tokio::time::Instant::now() + std::time::Duration::from_secs(3600)
}

fn ticket(account: &str) -> Ticket {
    Ticket {
        account: Arc::from(account),
        sub_cap: None,
    }
}

fn uncontended(c: &mut Criterion) {
    let limiter = LocalLimiter::new(3, 100);
    let t = ticket("acme");
    c.bench_function("limiter/acquire+release uncontended", |b| {
        b.iter(
            || match limiter.acquire(black_box(&t), far()).take_ready() {
                Some(Ok(permit)) => drop(permit),
                _ => unreachable!("a slot is always free"),
            },
        )
    });

    // 100,000 accounts registered: the lookup is a hash map probe.
    let many = LocalLimiter::new(3, 100);
    for i in 0..100_000 {
        many.set_limit(&format!("acct-{i}"), 3);
    }
    let t = ticket("acct-77777");
    c.bench_function("limiter/acquire+release with 100k accounts", |b| {
        b.iter(|| match many.acquire(black_box(&t), far()).take_ready() {
            Some(Ok(permit)) => drop(permit),
            _ => unreachable!("a slot is always free"),
        })
    });
}

fn with_queue(c: &mut Criterion) {
    // One slot for a capped sub-account that is at its cap, 1,000 of its
    // tasks queued; the root's other slots cycle through acquire + release
    // with the whole queue scanned on every release.
    let limiter = LocalLimiter::new(4, 2_000);
    let capped = Ticket {
        account: Arc::from("acme"),
        sub_cap: Some(SubCap {
            sub_account: Arc::from("acme-batch"),
            max_concurrency: 1,
        }),
    };
    let _holder = match limiter.acquire(&capped, far()).take_ready() {
        Some(Ok(p)) => p,
        _ => unreachable!(),
    };
    let _waiters: Vec<_> = (0..1_000)
        .map(|_| {
            let mut w = limiter.acquire(&capped, far());
            assert!(w.take_ready().is_none(), "queued");
            w
        })
        .collect();
    let root = ticket("acme");
    c.bench_function("limiter/acquire+release with 1000 queued", |b| {
        b.iter(
            || match limiter.acquire(black_box(&root), far()).take_ready() {
                Some(Ok(permit)) => drop(permit),
                _ => unreachable!("root slots are free"),
            },
        )
    });
}

criterion_group!(benches, uncontended, with_queue);
criterion_main!(benches);
