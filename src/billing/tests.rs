//! Billing rules over fixed times, including the service's worked examples.

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, ToSpan};
use proptest::prelude::*;
use rust_decimal::Decimal;

use super::*;

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn usd(s: &str) -> Decimal {
    s.parse().unwrap()
}

const GRACE: SignedDuration = SignedDuration::from_hours(24);

fn free(at: Timestamp) -> ResourcePackage {
    ResourcePackage::new(
        "free".into(),
        "acme",
        PackageKind::Free,
        FREE_PACKAGE_SIZE,
        Decimal::ZERO,
        at,
    )
}

fn prepaid(id: &str, size: u64, at: Timestamp) -> ResourcePackage {
    ResourcePackage::new(
        id.into(),
        "acme",
        PackageKind::Prepaid,
        size,
        prepaid_price(size).unwrap(),
        at,
    )
}

fn account(packages: Vec<ResourcePackage>) -> AccountBilling {
    AccountBilling {
        packages,
        ..AccountBilling::default()
    }
}

#[test]
fn prepaid_sizes_and_prices() {
    assert_eq!(prepaid_price(1_000), Some(usd("75")));
    assert_eq!(prepaid_price(10_000), Some(usd("550")));
    assert_eq!(prepaid_price(100_000), Some(usd("4500")));
    assert_eq!(prepaid_price(1_000_000), Some(usd("30000")));
    assert_eq!(prepaid_price(10_000_000), Some(usd("200000")));
    assert_eq!(prepaid_price(5_000), None);
    assert_eq!(prepaid_price(0), None);
}

#[test]
fn tier_boundaries_are_inclusive() {
    for (calls, price) in [
        (0, "0.08"),
        (10_000, "0.08"),
        (10_001, "0.06"),
        (100_000, "0.06"),
        (100_001, "0.05"),
        (1_000_000, "0.05"),
        (1_000_001, "0.04"),
    ] {
        assert_eq!(tier_for(calls).unit_price_usd, usd(price), "{calls}");
    }
}

#[test]
fn worked_example_10000_calls_with_50_free_units_left() {
    assert_eq!(bill(10_000, 10_000 - 50).amount_usd, usd("796"));
}

#[test]
fn worked_example_200000_postpaid_calls() {
    assert_eq!(bill(200_000, 200_000).amount_usd, usd("10000"));
}

#[test]
fn worked_example_30000_calls_a_year_with_three_10000_packages() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let mut a = account(vec![free(t0)]);
    let mut spent = Decimal::ZERO;
    for i in 0..3 {
        let p = prepaid(&format!("p{i}"), 10_000, t0);
        spent += p.price_usd;
        a.packages.push(p);
    }
    // 30,000 calls spread over the year, none of them postpaid.
    for n in 0..30_000i64 {
        let t = t0 + SignedDuration::from_secs(n * 1000);
        let s = a.reserve(t, GRACE).expect("covered by packages");
        assert_ne!(s, Source::Postpaid);
        a.commit(&s);
    }
    assert_eq!(spent, usd("1650"));
    assert_eq!(a.packages.iter().map(|p| p.used).sum::<u64>(), 30_000);
}

#[test]
fn deduction_order_is_free_then_earliest_expiring_prepaid_then_postpaid() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let later = prepaid("later", 1_000, t0 + SignedDuration::from_hours(48));
    let sooner = prepaid("sooner", 1_000, t0 + SignedDuration::from_hours(24));
    let mut a = account(vec![later, sooner, free(t0)]);
    a.postpaid = true;
    let now = t0 + SignedDuration::from_hours(72);
    let first = a.reserve(now, GRACE).unwrap();
    assert_eq!(first.label(), "free");
    a.packages
        .iter_mut()
        .find(|p| p.kind == PackageKind::Free)
        .unwrap()
        .used = FREE_PACKAGE_SIZE;
    a.release(&first);
    assert_eq!(a.reserve(now, GRACE).unwrap().label(), "prepaid:sooner");
    a.packages.iter_mut().for_each(|p| p.used = p.size);
    assert_eq!(a.reserve(now, GRACE).unwrap(), Source::Postpaid);
}

#[test]
fn a_package_bought_after_a_call_does_not_pay_for_it() {
    let t0 = ts("2026-03-01T00:00:00Z");
    let mut a = account(vec![]);
    a.postpaid = true;
    let call = a.reserve(t0, GRACE).unwrap();
    a.packages
        .push(prepaid("p", 1_000, t0 + SignedDuration::from_secs(1)));
    a.commit(&call);
    assert_eq!(call, Source::Postpaid);
    assert_eq!(a.packages[0].used, 0);
    // Nor does one that takes effect later than the call.
    a.postpaid = false;
    assert_eq!(a.reserve(t0, GRACE), Err(Refusal::LowBalance));
}

#[test]
fn an_expired_package_pays_for_nothing() {
    let t0 = ts("2025-01-01T00:00:00Z");
    let mut a = account(vec![prepaid("old", 1_000, t0)]);
    let expiry = a.packages[0].expires_at;
    assert_eq!(expiry, ts("2026-01-01T00:00:00Z"));
    assert!(
        a.reserve(expiry - SignedDuration::from_secs(1), GRACE)
            .is_ok()
    );
    assert_eq!(a.reserve(expiry, GRACE), Err(Refusal::LowBalance));
}

#[test]
fn no_overdraw_60_calls_against_50_free_units() {
    let t0 = ts("2026-01-01T00:00:00Z");
    let mut a = account(vec![free(t0)]);
    let results: Vec<_> = (0..60).map(|_| a.reserve(t0, GRACE)).collect();
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 50);
    assert_eq!(
        results
            .iter()
            .filter(|r| **r == Err(Refusal::LowBalance))
            .count(),
        10
    );
    // A failed call gives its unit back for the next one.
    a.release(results[0].as_ref().unwrap());
    assert!(a.reserve(t0, GRACE).is_ok());
    assert_eq!(a.remaining_units(t0), 0);
}

#[test]
fn prepaid_refunds_end_on_the_8th_day_after_purchase() {
    let tz = TimeZone::UTC;
    let p = prepaid("p", 1_000, ts("2026-05-01T10:00:00Z"));
    assert_eq!(
        check_prepaid_refund(&p, ts("2026-05-08T23:59:59Z"), &tz),
        Ok(())
    );
    assert!(matches!(
        check_prepaid_refund(&p, ts("2026-05-09T00:00:00Z"), &tz),
        Err(PackageRefundError::TooLate { .. })
    ));
    let mut used = p.clone();
    used.used = 1;
    assert_eq!(
        check_prepaid_refund(&used, ts("2026-05-02T00:00:00Z"), &tz),
        Err(PackageRefundError::Used { used: 1 })
    );
    let mut held = p.clone();
    held.reserved = 1;
    assert!(
        check_prepaid_refund(&held, ts("2026-05-02T00:00:00Z"), &tz).is_err(),
        "a unit in use counts"
    );
    let f = free(ts("2026-05-01T10:00:00Z"));
    assert_eq!(
        check_prepaid_refund(&f, ts("2026-05-01T11:00:00Z"), &tz),
        Err(PackageRefundError::Free)
    );
    // The purchase date is the billing time zone's.
    let la = TimeZone::get("America/Los_Angeles").unwrap();
    let evening = prepaid("e", 1_000, ts("2026-05-02T03:00:00Z")); // May 1, 20:00 in LA
    assert_eq!(
        check_prepaid_refund(&evening, ts("2026-05-09T06:59:59Z"), &la),
        Ok(())
    );
    assert!(check_prepaid_refund(&evening, ts("2026-05-09T07:00:00Z"), &la).is_err());
}

#[test]
fn arrears_suspend_after_the_grace_and_a_top_up_resumes() {
    let t0 = ts("2026-12-01T00:00:00Z");
    let mut a = account(vec![prepaid("p", 1_000, t0)]);
    a.balance = usd("10");
    a.settle(usd("796"), t0);
    assert_eq!(a.balance, usd("-786"));
    assert_eq!(
        a.standing(t0, GRACE),
        Standing::Overdue {
            suspends_at: t0 + GRACE
        }
    );
    assert!(
        a.reserve(t0 + SignedDuration::from_hours(23), GRACE)
            .is_ok(),
        "still in grace"
    );
    // Suspended: refused even with prepaid units left.
    assert_eq!(a.reserve(t0 + GRACE, GRACE), Err(Refusal::InArrears));
    a.top_up(usd("700"));
    assert_eq!(
        a.reserve(t0 + GRACE, GRACE),
        Err(Refusal::InArrears),
        "still negative"
    );
    a.top_up(usd("86"));
    assert_eq!(a.balance, Decimal::ZERO);
    assert_eq!(a.standing(t0 + GRACE, GRACE), Standing::Good);
    assert!(a.reserve(t0 + GRACE, GRACE).is_ok());
}

#[test]
fn a_settlement_credit_can_clear_arrears() {
    let t0 = ts("2026-12-01T00:00:00Z");
    let mut a = account(vec![]);
    a.settle(usd("100"), t0);
    assert!(a.arrears_since.is_some());
    a.settle(usd("-100"), t0);
    assert_eq!(a.arrears_since, None);
}

#[test]
fn months_are_counted_in_the_billing_time_zone() {
    let m = Month::parse("2026-11").unwrap();
    assert_eq!(m.to_string(), "2026-11");
    let (s, e) = m.bounds(&TimeZone::UTC).unwrap();
    assert_eq!(
        (s, e),
        (ts("2026-11-01T00:00:00Z"), ts("2026-12-01T00:00:00Z"))
    );
    let tokyo = TimeZone::get("Asia/Tokyo").unwrap();
    assert_eq!(m.bounds(&tokyo).unwrap().0, ts("2026-10-31T15:00:00Z"));
    assert_eq!(Month::of(ts("2026-10-31T15:00:00Z"), &tokyo), m);
    for bad in [
        "2026-13",
        "2026-1",
        "26-11",
        "2026/11",
        "2026-11-01",
        "",
        "2026-+1",
        "+202-01",
        "-202-01",
    ] {
        assert!(Month::parse(bad).is_none(), "{bad}");
    }
    assert_eq!(
        Month::parse("2027-02").unwrap().first_day,
        jiff::civil::date(2027, 2, 1)
    );
    let _ = 1.month();
}

#[test]
fn amounts_are_positive_with_cents_at_most() {
    assert_eq!(parse_amount("12.50"), Some(usd("12.50")));
    assert_eq!(parse_amount("7"), Some(usd("7")));
    assert_eq!(parse_amount("0.05"), Some(usd("0.05")));
    assert_eq!(parse_amount("1000000000"), Some(usd("1000000000")));
    for bad in [
        "0",
        "-5",
        "1.234",
        "abc",
        "",
        "1e3",
        "NaN",
        " 5",
        "5 ",
        "5.",
        ".5",
        "+5",
        "1.2.3",
        "0.00",
        "1000000000.01",
        "١",
    ] {
        assert_eq!(parse_amount(bad), None, "{bad}");
    }
}

#[derive(Debug, Clone)]
enum Op {
    Buy(usize),
    Call,
    Succeed(usize),
    Fail(usize),
    Refund(usize),
    Advance(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (0usize..2).prop_map(Op::Buy),
        6 => Just(Op::Call),
        4 => any::<usize>().prop_map(Op::Succeed),
        2 => any::<usize>().prop_map(Op::Fail),
        1 => any::<usize>().prop_map(Op::Refund),
        1 => (1u32..200).prop_map(Op::Advance),
    ]
}

proptest! {
    /// Over random purchases, calls, successes, failures and refunds:
    /// units charged + units remaining + units held = units granted, every
    /// charge is one success, and nothing is charged twice.
    #[test]
    fn units_are_conserved_and_never_charged_twice(ops in proptest::collection::vec(op(), 1..300), postpaid: bool) {
        let tz = TimeZone::UTC;
        let mut now = ts("2026-01-01T00:00:00Z");
        let mut a = account(vec![free(now)]);
        a.postpaid = postpaid;
        let mut held: Vec<Source> = Vec::new();
        let mut successes_on_packages = 0u64;
        let mut bought = 0;
        for op in ops {
            match op {
                Op::Buy(i) => {
                    bought += 1;
                    a.packages.push(prepaid(&format!("p{bought}"), [1_000, 10_000][i], now));
                }
                Op::Call => match a.reserve(now, GRACE) {
                    Ok(s) => held.push(s),
                    Err(r) => {
                        prop_assert_eq!(r, Refusal::LowBalance);
                        prop_assert!(!postpaid, "postpaid never refuses for quota");
                        prop_assert_eq!(a.remaining_units(now), 0);
                    }
                },
                Op::Succeed(i) if !held.is_empty() => {
                    let s = held.swap_remove(i % held.len());
                    if s != Source::Postpaid { successes_on_packages += 1; }
                    a.commit(&s);
                }
                Op::Fail(i) if !held.is_empty() => {
                    let s = held.swap_remove(i % held.len());
                    a.release(&s);
                }
                Op::Refund(i) if !a.packages.is_empty() => {
                    let idx = i % a.packages.len();
                    if check_prepaid_refund(&a.packages[idx], now, &tz).is_ok() {
                        prop_assert_eq!(a.packages[idx].used + a.packages[idx].reserved, 0);
                        a.packages[idx].refunded_at = Some(now);
                    }
                }
                Op::Advance(h) => now += SignedDuration::from_hours(i64::from(h)),
                _ => {}
            }
            let granted: u64 = a.packages.iter().filter(|p| p.refunded_at.is_none()).map(|p| p.size).sum();
            let charged: u64 = a.packages.iter().map(|p| p.used).sum();
            let reserved: u64 = a.packages.iter().map(|p| p.reserved).sum();
            let remaining: u64 = a.packages.iter().filter(|p| p.refunded_at.is_none()).map(|p| p.remaining()).sum();
            prop_assert_eq!(charged + reserved + remaining, granted);
            prop_assert_eq!(charged, successes_on_packages, "each charge is one success");
            let held_on_packages = held.iter().filter(|s| **s != Source::Postpaid).count() as u64;
            prop_assert_eq!(reserved, held_on_packages);
            for p in &a.packages {
                prop_assert!(p.used + p.reserved <= p.size, "overdrawn package {}", p.id);
            }
        }
    }
}

mod conformance_local {
    use std::sync::Arc;

    use crate::billing::conformance;
    use crate::billing::{Accounts, Quota};

    async fn make(billing: Arc<Accounts>) -> Arc<dyn Quota> {
        billing
    }

    #[tokio::test]
    async fn the_in_process_quota_passes_the_suite() {
        conformance::run_all(&make, "t-").await;
    }
}

#[test]
fn the_commit_tries_payers_in_the_deduction_order_at_the_calls_time() {
    let t0 = ts("2026-01-10T00:00:00Z");
    let c = |id: &str, kind, from: &str, to: &str| ChargeCandidate {
        id: id.into(),
        kind,
        effective_at: ts(from),
        expires_at: ts(to),
    };
    let candidates = vec![
        c(
            "late",
            PackageKind::Prepaid,
            "2026-01-01T00:00:00Z",
            "2027-03-01T00:00:00Z",
        ),
        c(
            "soon",
            PackageKind::Prepaid,
            "2026-01-01T00:00:00Z",
            "2026-06-01T00:00:00Z",
        ),
        c(
            "free",
            PackageKind::Free,
            "2025-02-01T00:00:00Z",
            "2026-02-01T00:00:00Z",
        ),
        // Bought after the call was made: it does not pay for it.
        c(
            "future",
            PackageKind::Prepaid,
            "2026-01-11T00:00:00Z",
            "2026-02-01T00:00:00Z",
        ),
        c(
            "expired",
            PackageKind::Prepaid,
            "2025-01-01T00:00:00Z",
            "2026-01-10T00:00:00Z",
        ),
    ];
    let order: Vec<String> = charge_order(candidates, t0)
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(order, ["free", "soon", "late"]);
}

#[test]
fn a_unit_charged_to_another_payer_frees_the_reserved_one() {
    let t0 = ts("2026-01-10T00:00:00Z");
    let mut b = AccountBilling {
        postpaid: true,
        packages: vec![free(t0), prepaid("p1", 1_000, t0)],
        ..Default::default()
    };
    let reserved = b.reserve(t0 + 1.second(), GRACE).unwrap();
    assert_eq!(reserved.package_id(), Some("free"));
    // The store found the free package used up (another replica's units).
    let charged = Source::Package {
        id: "p1".into(),
        kind: PackageKind::Prepaid,
    };
    b.commit_to(&reserved, &charged);
    assert_eq!((b.packages[0].reserved, b.packages[0].used), (0, 0));
    assert_eq!((b.packages[1].reserved, b.packages[1].used), (0, 1));
    b.commit_to(&Source::Postpaid, &Source::Postpaid);
    assert_eq!(b.packages[1].used, 1);
}
