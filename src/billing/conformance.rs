//! The behaviour every [`Quota`] owes admission, as one suite generic over
//! the implementation: the in-process [`Accounts`] runs it in unit tests,
//! the shared (Redis) quota against a real server.
//!
//! Each case builds the account's billing state in an [`Accounts`] (what a
//! replica loads from the store) and asks the factory for a quota over it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use rust_decimal::Decimal;

use super::{
    AccountBilling, Accounts, FREE_PACKAGE_SIZE, PackageKind, Quota, Refusal, Reservation,
    ResourcePackage, Source, prepaid_price,
};

pub trait Factory {
    fn make(&self, billing: Arc<Accounts>) -> impl Future<Output = Arc<dyn Quota>>;
}

impl<F, Fut> Factory for F
where
    F: Fn(Arc<Accounts>) -> Fut,
    Fut: Future<Output = Arc<dyn Quota>>,
{
    fn make(&self, billing: Arc<Accounts>) -> impl Future<Output = Arc<dyn Quota>> {
        self(billing)
    }
}

pub fn package(
    id: &str,
    account: &str,
    kind: PackageKind,
    size: u64,
    at: Timestamp,
) -> ResourcePackage {
    let price = prepaid_price(size).unwrap_or(Decimal::ZERO);
    ResourcePackage::new(id.into(), account, kind, size, price, at)
}

fn billing_with(account: &str, b: AccountBilling) -> Arc<Accounts> {
    let accounts = Arc::new(Accounts::new(Duration::from_secs(86_400)));
    accounts.insert(account, b);
    accounts
}

pub async fn run_all(f: &impl Factory, prefix: &str) {
    let a = |n: &str| format!("{prefix}{n}");
    no_overdraw_under_a_burst(f, &a("burst")).await;
    released_units_come_back(f, &a("release")).await;
    committed_units_stay_used(f, &a("commit")).await;
    deduction_order(f, &a("order")).await;
    arrears_refuse(f, &a("arrears")).await;
}

/// 60 calls at once against the 50 units of the free package: exactly 50
/// reservations, 10 `LowBalance`.
pub async fn no_overdraw_under_a_burst(f: &impl Factory, acct: &str) {
    let now = Timestamp::now();
    let billing = billing_with(
        acct,
        AccountBilling {
            packages: vec![package(
                "free",
                acct,
                PackageKind::Free,
                FREE_PACKAGE_SIZE,
                now,
            )],
            ..AccountBilling::default()
        },
    );
    let q = f.make(billing).await;
    let calls = (0..60).map(|_| {
        let q = q.clone();
        let acct = acct.to_string();
        tokio::spawn(async move { q.reserve(&acct, Timestamp::now()).await })
    });
    let mut held = Vec::new();
    let mut low = 0;
    for c in calls {
        match c.await.expect("no panic") {
            Ok(r) => held.push(r),
            Err(Refusal::LowBalance) => low += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!((held.len(), low), (50, 10));
}

pub async fn released_units_come_back(f: &impl Factory, acct: &str) {
    let now = Timestamp::now();
    let billing = billing_with(
        acct,
        AccountBilling {
            packages: vec![package("free", acct, PackageKind::Free, 5, now)],
            ..AccountBilling::default()
        },
    );
    let q = f.make(billing).await;
    let mut held: Vec<Reservation> = Vec::new();
    for _ in 0..5 {
        held.push(q.reserve(acct, now).await.expect("a unit"));
    }
    assert_eq!(q.reserve(acct, now).await.err(), Some(Refusal::LowBalance));
    held.truncate(2);
    // A shared quota gives units back asynchronously: bounded retries.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while held.len() < 5 {
        match q.reserve(acct, now).await {
            Ok(r) => held.push(r),
            Err(Refusal::LowBalance) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("the released units did not come back: {e:?}"),
        }
    }
    assert_eq!(q.reserve(acct, now).await.err(), Some(Refusal::LowBalance));
}

pub async fn committed_units_stay_used(f: &impl Factory, acct: &str) {
    let now = Timestamp::now();
    let billing = billing_with(
        acct,
        AccountBilling {
            packages: vec![package("free", acct, PackageKind::Free, 3, now)],
            ..AccountBilling::default()
        },
    );
    let q = f.make(billing.clone()).await;
    for _ in 0..3 {
        q.reserve(acct, now).await.expect("a unit").commit(None);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(q.reserve(acct, now).await.err(), Some(Refusal::LowBalance));
    assert_eq!(
        billing.with(acct, |b| b.packages[0].used),
        Some(3),
        "this replica's memory counts the used units"
    );
}

pub async fn deduction_order(f: &impl Factory, acct: &str) {
    let now = Timestamp::now();
    let later = now.checked_add(SignedDuration::from_hours(1)).unwrap();
    let mut late_prepaid = package("p-late", acct, PackageKind::Prepaid, 1_000, later);
    late_prepaid.effective_at = now;
    let mut b = AccountBilling {
        postpaid: true,
        packages: vec![
            late_prepaid,
            package("p-early", acct, PackageKind::Prepaid, 1_000, now),
            package("free", acct, PackageKind::Free, 1, now),
        ],
        ..AccountBilling::default()
    };
    b.packages[1].used = 999;
    let q = f.make(billing_with(acct, b)).await;
    let label = |r: &Reservation| r.source().label();
    let r1 = q.reserve(acct, now).await.expect("free");
    assert_eq!(label(&r1), "free");
    let r2 = q.reserve(acct, now).await.expect("prepaid expiring first");
    assert_eq!(label(&r2), "prepaid:p-early");
    let r3 = q.reserve(acct, now).await.expect("the other prepaid");
    assert_eq!(label(&r3), "prepaid:p-late");
    for _ in 0..999 {
        q.reserve(acct, now).await.expect("p-late").commit(None);
    }
    let r4 = q.reserve(acct, now).await.expect("postpaid");
    assert_eq!(*r4.source(), Source::Postpaid);
}

pub async fn arrears_refuse(f: &impl Factory, acct: &str) {
    let now = Timestamp::now();
    let b = AccountBilling {
        postpaid: true,
        balance: Decimal::from(-5),
        arrears_since: Some(now.checked_sub(SignedDuration::from_hours(48)).unwrap()),
        packages: vec![package("free", acct, PackageKind::Free, 50, now)],
    };
    let q = f.make(billing_with(acct, b)).await;
    assert_eq!(q.reserve(acct, now).await.err(), Some(Refusal::InArrears));
}
