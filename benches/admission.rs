//! What admission costs per request, without the network: authenticating
//! the key (SHA-256 + lookup), reserving a billing unit and giving it back,
//! and the two together with a limiter slot.
//!
//! Run: `cargo bench --bench admission`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use jiff::Timestamp;
use rust_decimal::Decimal;
use tollgate::accounts::{
    AccountStatus, KeyEntry, Principal, Registry, RootAccount, generate_api_key, hash_key,
};
use tollgate::billing::{AccountBilling, Accounts, PackageKind, ResourcePackage};
use tollgate::limiter::{Limiter, LocalLimiter, Ticket};

/// A deadline no bench reaches (the queue wait is not what is measured).
fn far() -> tokio::time::Instant {
    tokio::time::Instant::now() + std::time::Duration::from_secs(3600)
}

fn setup(accounts: usize) -> (Registry, Accounts, LocalLimiter, Vec<String>) {
    let registry = Registry::new();
    let billing = Accounts::new(Duration::from_secs(86_400));
    let limiter = LocalLimiter::new(3, 100);
    let now = Timestamp::now();
    let mut keys = Vec::new();
    for i in 0..accounts {
        let id = format!("acct-{i}");
        let root = registry.insert_root(RootAccount::new(&id, AccountStatus::Active, now));
        let key = generate_api_key();
        registry.insert_key(KeyEntry {
            key_id: format!("k{i}"),
            hash: hash_key(&key),
            principal: Principal { root, sub: None },
            tc3_secret: None,
            created_at: jiff::Timestamp::UNIX_EPOCH,
            last_used: Default::default(),
        });
        billing.insert(
            &id,
            AccountBilling {
                packages: vec![
                    ResourcePackage::new(
                        "free".into(),
                        &id,
                        PackageKind::Free,
                        u64::MAX / 2,
                        Decimal::ZERO,
                        now,
                    ),
                    ResourcePackage::new(
                        "p".into(),
                        &id,
                        PackageKind::Prepaid,
                        1_000_000,
                        Decimal::from(30_000),
                        now,
                    ),
                ],
                ..AccountBilling::default()
            },
        );
        limiter.set_limit(&id, 3);
        keys.push(key);
    }
    (registry, billing, limiter, keys)
}

fn admission(c: &mut Criterion) {
    let (registry, billing, limiter, keys) = setup(10_000);
    let key = keys[4242].clone();
    let now = Timestamp::now();
    c.bench_function("admission/authenticate", |b| {
        b.iter(|| registry.authenticate(black_box(&key)).expect("valid key"))
    });
    c.bench_function("admission/reserve+release", |b| {
        b.iter(|| {
            drop(
                billing
                    .reserve(black_box("acct-4242"), now)
                    .expect("units left"),
            )
        })
    });
    let ticket = Ticket {
        account: Arc::from("acct-4242"),
        sub_cap: None,
    };
    c.bench_function("admission/authenticate+reserve+slot, released", |b| {
        b.iter(|| {
            let p = registry.authenticate(black_box(&key)).expect("valid key");
            let r = billing
                .reserve(&p.root.id, Timestamp::now())
                .expect("units left");
            let Some(Ok(permit)) = limiter.acquire(&ticket, far()).take_ready() else {
                unreachable!("a slot is free")
            };
            drop(permit);
            drop(r);
        })
    });
}

criterion_group!(benches, admission);
criterion_main!(benches);
