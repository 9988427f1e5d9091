//! Memory of the gateway's in-memory state, measured as the process's
//! resident set before and after building it:
//! - per registered idle account: registry entry, key, billing state with its
//!   free package, limiter gate;
//! - per queued task in the limiter (the waiter and its channel; the
//!   connection's own buffers are measured end to end by `benches/e2e.sh`).
//!
//! Run: `cargo bench --bench memory` (prints bytes per item; not criterion).

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use rust_decimal::Decimal;
use tollgate::accounts::{
    AccountStatus, KeyEntry, Principal, Registry, RootAccount, generate_api_key, hash_key,
};
use tollgate::billing::{self, AccountBilling, Accounts, PackageKind, ResourcePackage};
use tollgate::limiter::{Limiter, LocalLimiter, Ticket};

/// A deadline no bench reaches (the queue wait is not what is measured).
fn far() -> tokio::time::Instant {
    tokio::time::Instant::now() + std::time::Duration::from_secs(3600)
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn main() {
    // `cargo test --benches` runs this with `--bench` absent; do the work
    // only when benchmarking.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    const ACCOUNTS: usize = 100_000;
    let now = Timestamp::now();
    let before = rss_bytes();
    let registry = Registry::new();
    let billing = Accounts::new(Duration::from_secs(86_400));
    let limiter = LocalLimiter::new(3, 20_000);
    for i in 0..ACCOUNTS {
        let id = format!("account-{i:06}");
        let root = registry.insert_root(RootAccount::new(&id, AccountStatus::Active, now));
        registry.insert_key(KeyEntry {
            key_id: format!("key_{i:032}"),
            hash: hash_key(&generate_api_key()),
            principal: Principal { root, sub: None },
            tc3_secret: None,
            created_at: jiff::Timestamp::UNIX_EPOCH,
            last_used: Default::default(),
        });
        billing.insert(
            &id,
            AccountBilling {
                packages: vec![ResourcePackage::new(
                    format!("free_{i:032}"),
                    &id,
                    PackageKind::Free,
                    billing::FREE_PACKAGE_SIZE,
                    Decimal::ZERO,
                    now,
                )],
                ..AccountBilling::default()
            },
        );
        limiter.set_limit(&id, 3);
    }
    let after_accounts = rss_bytes();
    println!(
        "memory/idle account: {} bytes per account ({ACCOUNTS} accounts, RSS +{} KiB)",
        (after_accounts - before) / ACCOUNTS as u64,
        (after_accounts - before) / 1024
    );

    const QUEUED: usize = 10_000;
    let ticket = Ticket {
        account: Arc::from("account-000001"),
        sub_cap: None,
    };
    let held: Vec<_> = (0..3)
        .map(|_| match limiter.acquire(&ticket, far()).take_ready() {
            Some(Ok(p)) => p,
            _ => unreachable!("3 free slots"),
        })
        .collect();
    let before_queue = rss_bytes();
    let waiters: Vec<_> = (0..QUEUED)
        .map(|_| {
            let mut w = limiter.acquire(&ticket, far());
            assert!(w.take_ready().is_none(), "the slots are taken");
            w
        })
        .collect();
    let after_queue = rss_bytes();
    println!(
        "memory/queued task (limiter only): {} bytes per task ({QUEUED} queued)",
        (after_queue - before_queue) / QUEUED as u64
    );
    drop(waiters);
    drop(held);
}
