//! Package rules over fixed times (a manual clock's worth of instants).

use jiff::civil::date;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};

use super::*;

fn utc() -> TimeZone {
    TimeZone::UTC
}

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn pkg(units: u32, period: Period, start: Date, tz: &TimeZone) -> ConcurrencyPackage {
    let (starts_at, ends_at) = validity(start, period, tz).unwrap();
    ConcurrencyPackage {
        id: format!("cp-{start}-{units}"),
        account: "acme".into(),
        units,
        period,
        start,
        starts_at,
        ends_at,
        price_usd: price(units, period),
        bought_at: ts("2026-01-01T00:00:00Z"),
    }
}

#[test]
fn a_daily_package_starts_at_midnight_and_ends_at_the_next() {
    let p = pkg(2, Period::Daily, date(2026, 11, 27), &utc());
    assert_eq!(limit_at(3, [&p], ts("2026-11-26T23:59:59.999Z")), 3);
    assert_eq!(limit_at(3, [&p], ts("2026-11-27T00:00:00Z")), 5);
    assert_eq!(limit_at(3, [&p], ts("2026-11-27T23:59:59.999Z")), 5);
    assert_eq!(limit_at(3, [&p], ts("2026-11-28T00:00:00Z")), 3);
    assert_eq!(
        next_change([&p], ts("2026-11-26T12:00:00Z")),
        Some(ts("2026-11-27T00:00:00Z"))
    );
    assert_eq!(
        next_change([&p], ts("2026-11-27T00:00:00Z")),
        Some(ts("2026-11-28T00:00:00Z"))
    );
    assert_eq!(next_change([&p], ts("2026-11-28T00:00:00Z")), None);
}

#[test]
fn monthly_packages_run_one_calendar_month() {
    let cases = [
        // (start, end): 28-, 29-, 30- and 31-day months.
        (date(2026, 2, 1), date(2026, 3, 1)),
        (date(2028, 2, 1), date(2028, 3, 1)),
        (date(2026, 4, 15), date(2026, 5, 15)),
        (date(2026, 1, 1), date(2026, 2, 1)),
        (date(2026, 12, 10), date(2027, 1, 10)),
        // No such day next month: to the 1st after, never fewer days.
        (date(2026, 1, 31), date(2026, 3, 1)),
        (date(2026, 1, 29), date(2026, 3, 1)),
        (date(2028, 1, 29), date(2028, 2, 29)),
        (date(2026, 3, 31), date(2026, 5, 1)),
    ];
    for (start, end) in cases {
        let p = pkg(1, Period::Monthly, start, &utc());
        assert_eq!(
            p.ends_at,
            end.to_zoned(utc()).unwrap().timestamp(),
            "{start}"
        );
    }
    let feb = pkg(1, Period::Monthly, date(2026, 2, 1), &utc());
    assert_eq!(
        feb.ends_at.duration_since(feb.starts_at),
        SignedDuration::from_hours(28 * 24)
    );
}

#[test]
fn a_dst_day_is_23_or_25_hours_long() {
    let ny = TimeZone::get("America/New_York").unwrap();
    let spring = pkg(1, Period::Daily, date(2026, 3, 8), &ny);
    assert_eq!(
        spring.ends_at.duration_since(spring.starts_at),
        SignedDuration::from_hours(23)
    );
    assert_eq!(spring.starts_at, ts("2026-03-08T05:00:00Z"));
    let autumn = pkg(1, Period::Daily, date(2026, 11, 1), &ny);
    assert_eq!(
        autumn.ends_at.duration_since(autumn.starts_at),
        SignedDuration::from_hours(25)
    );
    // A monthly package across the change still runs midnight to midnight.
    let march = pkg(1, Period::Monthly, date(2026, 3, 1), &ny);
    assert_eq!(march.starts_at, ts("2026-03-01T05:00:00Z"));
    assert_eq!(march.ends_at, ts("2026-04-01T04:00:00Z"));
}

#[test]
fn the_refund_cut_off_is_22_00_the_day_before() {
    let p = pkg(1, Period::Daily, date(2026, 5, 10), &utc());
    assert_eq!(check_refund(&p, ts("2026-05-09T21:59:59Z"), &utc()), Ok(()));
    assert!(matches!(
        check_refund(&p, ts("2026-05-09T22:00:00Z"), &utc()),
        Err(RefundError::PastDeadline { .. })
    ));
    assert_eq!(
        check_refund(&p, ts("2026-05-10T00:00:00Z"), &utc()),
        Err(RefundError::AlreadyValid)
    );
    // In the billing time zone, not UTC.
    let tokyo = TimeZone::get("Asia/Tokyo").unwrap();
    let p = pkg(1, Period::Daily, date(2026, 5, 10), &tokyo);
    assert_eq!(check_refund(&p, ts("2026-05-09T12:59:59Z"), &tokyo), Ok(()));
    assert!(check_refund(&p, ts("2026-05-09T13:00:00Z"), &tokyo).is_err());
}

#[test]
fn overlapping_packages_add_up() {
    let tz = utc();
    let month = pkg(2, Period::Monthly, date(2026, 11, 1), &tz);
    let day = pkg(5, Period::Daily, date(2026, 11, 26), &tz);
    let day2 = pkg(1, Period::Daily, date(2026, 11, 26), &tz);
    let all = [&month, &day, &day2];
    assert_eq!(limit_at(3, all, ts("2026-11-25T12:00:00Z")), 5);
    assert_eq!(limit_at(3, all, ts("2026-11-26T12:00:00Z")), 11);
    assert_eq!(limit_at(3, all, ts("2026-11-27T00:00:00Z")), 5);
    assert_eq!(limit_at(3, all, ts("2026-12-01T00:00:00Z")), 3);
    assert_eq!(
        next_change(all, ts("2026-11-26T12:00:00Z")),
        Some(ts("2026-11-27T00:00:00Z"))
    );
}

#[test]
fn prices_are_per_unit_and_period() {
    assert_eq!(price(3, Period::Daily), Decimal::from(600));
    assert_eq!(price(2, Period::Monthly), Decimal::from(8000));
}

#[test]
fn purchases_are_validated_field_by_field() {
    let now = ts("2026-11-26T10:00:00Z");
    let tz = utc();
    assert!(
        plan_purchase(2, "daily", "2026-11-26", now, &tz).is_ok(),
        "today is fine"
    );
    assert_eq!(
        plan_purchase(0, "daily", "2026-11-27", now, &tz).unwrap_err(),
        PurchaseError::Units
    );
    assert_eq!(
        plan_purchase(-1, "daily", "2026-11-27", now, &tz).unwrap_err(),
        PurchaseError::Units
    );
    assert_eq!(
        plan_purchase(1_001, "daily", "2026-11-27", now, &tz).unwrap_err(),
        PurchaseError::Units
    );
    assert_eq!(
        plan_purchase(1, "weekly", "2026-11-27", now, &tz).unwrap_err(),
        PurchaseError::Period
    );
    for bad in [
        "2026-13-01",
        "2026-11-31",
        "26-11-27",
        "2026/11/27",
        "",
        "2026-11-27T00:00",
    ] {
        assert_eq!(
            plan_purchase(1, "daily", bad, now, &tz).unwrap_err(),
            PurchaseError::StartFormat,
            "{bad}"
        );
    }
    assert!(matches!(
        plan_purchase(1, "daily", "2026-11-25", now, &tz),
        Err(PurchaseError::StartInPast { .. })
    ));
    // "Today" is the billing time zone's: at 12:00 UTC it is already the
    // 27th in Auckland (UTC+13 in November).
    let akl = TimeZone::get("Pacific/Auckland").unwrap();
    assert!(matches!(
        plan_purchase(1, "daily", "2026-11-26", ts("2026-11-26T12:00:00Z"), &akl),
        Err(PurchaseError::StartInPast { .. })
    ));
}
