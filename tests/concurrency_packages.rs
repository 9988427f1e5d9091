//! Concurrency packages over the real binary: the limit the backend sees
//! grows at once, refunds follow the cut-off, bad purchases store nothing,
//! and packages survive a restart.

mod common;

use common::{Opts, Stack};
use futures_util::future::join_all;
use http::{Method, StatusCode};
use jiff::ToSpan;
use jiff::tz::TimeZone;
use serde_json::{Value, json};

fn today() -> jiff::civil::Date {
    jiff::Timestamp::now().to_zoned(TimeZone::UTC).date()
}

async fn buy(
    stack: &Stack,
    account: &str,
    units: i64,
    period: &str,
    start: jiff::civil::Date,
) -> (StatusCode, Value) {
    let r = stack
        .admin()
        .call(
            Method::POST,
            &format!("/v1/accounts/{account}/concurrency-packages"),
            Some(json!({"units": units, "period": period, "start": start.to_string()})),
        )
        .await;
    (r.status, r.json())
}

/// `n` tasks at once, each long enough (300 ms) that the limit's worth of
/// them overlap at the backend even when their forwards spread out on a
/// loaded machine.
async fn burst(stack: &Stack, key: &str, n: usize) {
    let tasks = (0..n).map(|_| stack.task(key, &[("x-sim-delay-ms", "300")]));
    assert!(
        join_all(tasks)
            .await
            .iter()
            .all(|r| r.status == StatusCode::OK)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_package_valid_today_raises_the_limit_the_backend_sees_at_once() {
    let stack = Stack::start(Opts::default());
    let key = stack.account_with_key("acme").await;
    burst(&stack, &key, 15).await;
    assert_eq!(stack.sim.max_in_flight(&stack.http, "acme").await, 3);

    let (status, pkg) = buy(&stack, "acme", 2, "daily", today()).await;
    assert_eq!(status, StatusCode::CREATED, "{pkg}");
    assert_eq!(pkg["units"], 2);
    assert_eq!(pkg["price_usd"], "400");
    assert!(pkg["id"].as_str().unwrap().starts_with("cp_"));
    assert_eq!(pkg["valid_from"], format!("{}T00:00:00.000Z", today()));
    assert_eq!(
        pkg["valid_until"],
        format!("{}T00:00:00.000Z", today().tomorrow().unwrap())
    );
    let a = stack.admin().account("acme").await;
    assert_eq!(a["concurrency"]["limit"], 5);
    assert_eq!(a["concurrency"]["next_change"]["limit"], 3);
    assert_eq!(a["concurrency_packages"].as_array().unwrap().len(), 1);

    stack
        .http
        .send(
            Method::POST,
            &format!("{}/_sim/reset", stack.sim.url),
            &[],
            "",
        )
        .await;
    burst(&stack, &key, 25).await;
    assert_eq!(stack.sim.max_in_flight(&stack.http, "acme").await, 5);
    let metrics = stack
        .http
        .send(Method::GET, &format!("{}/metrics", stack.gw.admin), &[], "")
        .await;
    assert!(
        String::from_utf8_lossy(&metrics.body)
            .contains(r#"tollgate_concurrency_limit{account="acme"} 5"#)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_follow_the_cut_off() {
    let stack = Stack::start(Opts::default());
    stack.account_with_key("acme").await;
    let admin = stack.admin();
    // Starts in 3 days: its cut-off (22:00 the day before) is 2 days away.
    let (_, later) = buy(
        &stack,
        "acme",
        4,
        "monthly",
        today().checked_add(3.days()).unwrap(),
    )
    .await;
    assert_eq!(later["price_usd"], "16000");
    let a = admin.account("acme").await;
    assert_eq!(a["concurrency"]["limit"], 3);
    assert_eq!(a["concurrency"]["next_change"]["limit"], 7);
    let id = later["id"].as_str().unwrap();
    let path = format!("/v1/accounts/acme/concurrency-packages/{id}");
    let r = admin.call(Method::DELETE, &path, None).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());
    assert!(r.json()["refunded_at"].is_string());
    assert_eq!(
        admin.account("acme").await["concurrency"]["next_change"],
        Value::Null
    );
    assert_eq!(
        admin.call(Method::DELETE, &path, None).await.status,
        StatusCode::NOT_FOUND
    );

    // Valid already: never refundable.
    let (_, now) = buy(&stack, "acme", 1, "daily", today()).await;
    let r = admin
        .call(
            Method::DELETE,
            &format!(
                "/v1/accounts/acme/concurrency-packages/{}",
                now["id"].as_str().unwrap()
            ),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.error_code(), "FailedOperation.RefundNotAllowed");
    assert_eq!(admin.account("acme").await["concurrency"]["limit"], 4);
    // Another account's package is not this account's to refund.
    stack.account_with_key("other").await;
    let r = admin
        .call(
            Method::DELETE,
            &format!(
                "/v1/accounts/other/concurrency-packages/{}",
                now["id"].as_str().unwrap()
            ),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_purchases_name_the_field_and_store_nothing() {
    let stack = Stack::start(Opts::default());
    stack.account_with_key("acme").await;
    let admin = stack.admin();
    let tomorrow = today().tomorrow().unwrap().to_string();
    let yesterday = today().yesterday().unwrap().to_string();
    let cases = [
        (
            json!({"units": 0, "period": "daily", "start": tomorrow}),
            "units",
        ),
        (
            json!({"units": -2, "period": "daily", "start": tomorrow}),
            "units",
        ),
        (
            json!({"units": 1.5, "period": "daily", "start": tomorrow}),
            "units",
        ),
        (
            json!({"units": "2", "period": "daily", "start": tomorrow}),
            "units",
        ),
        (
            json!({"units": 5000, "period": "daily", "start": tomorrow}),
            "units",
        ),
        (
            json!({"units": 1, "period": "weekly", "start": tomorrow}),
            "period",
        ),
        (
            json!({"units": 1, "period": "daily", "start": "2026-13-01"}),
            "start",
        ),
        (
            json!({"units": 1, "period": "daily", "start": "tomorrow"}),
            "start",
        ),
        (
            json!({"units": 1, "period": "daily", "start": yesterday}),
            "start",
        ),
        (json!({"units": 1, "period": "daily"}), "start"),
        (
            json!({"units": 1, "period": "daily", "start": tomorrow, "price": 0}),
            "price",
        ),
    ];
    for (body, field) in cases {
        let r = admin
            .call(
                Method::POST,
                "/v1/accounts/acme/concurrency-packages",
                Some(body.clone()),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        let message = r.json()["Response"]["Error"]["Message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(message.contains(field), "{body}: {message}");
    }
    let r = admin
        .call(
            Method::POST,
            "/v1/accounts/nobody/concurrency-packages",
            Some(json!({"units": 1, "period": "daily", "start": tomorrow})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let a = admin.account("acme").await;
    assert_eq!(a["concurrency_packages"], json!([]));
    assert_eq!(a["concurrency"]["limit"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packages_survive_a_restart() {
    let mut stack = Stack::start(Opts::default());
    stack.account_with_key("acme").await;
    buy(&stack, "acme", 2, "daily", today()).await;
    buy(
        &stack,
        "acme",
        3,
        "monthly",
        today().checked_add(5.days()).unwrap(),
    )
    .await;
    let before = stack.admin().account("acme").await;
    stack.gw.restart(&Opts::default());
    let after = stack.admin().account("acme").await;
    assert_eq!(after["concurrency"]["limit"], 5);
    assert_eq!(
        after["concurrency"]["next_change"],
        before["concurrency"]["next_change"]
    );
    assert_eq!(
        after["concurrency_packages"],
        before["concurrency_packages"]
    );
}
