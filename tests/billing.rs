//! The billing rules over the real binary: no overdraw under concurrency,
//! prepaid packages and refunds, deactivation, postpaid usage, settlement,
//! arrears and top-up.

mod common;

use std::time::Duration;

use common::{Opts, Stack};
use futures_util::future::join_all;
use http::{Method, StatusCode};
use serde_json::{Value, json};

async fn plain_account_with_key(stack: &Stack, id: &str) -> String {
    let admin = stack.admin();
    admin.create_plain_account(id).await;
    admin.issue_key(id, None).await.1
}

async fn call(
    stack: &Stack,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let r = stack.admin().call(method, path, body).await;
    (r.status, r.json())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_simultaneous_calls_against_fifty_free_units() {
    let stack = Stack::start(Opts::default());
    let key = plain_account_with_key(&stack, "acme").await;
    let tasks = (0..60).map(|_| stack.task(&key, &[("x-sim-delay-ms", "20")]));
    let results = join_all(tasks).await;
    let ok = results
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    let low: Vec<_> = results
        .iter()
        .filter(|r| r.status == StatusCode::FORBIDDEN)
        .collect();
    assert_eq!(ok, 50);
    assert_eq!(low.len(), 10);
    assert!(
        low.iter()
            .all(|r| r.error_code() == "ResourceUnavailable.LowBalance")
    );
    let events = stack.admin().all_events().await;
    assert_eq!(events.len(), 50);
    assert!(events.iter().all(|e| e["data"]["charged_to"] == "free"));
    let a = stack.admin().account("acme").await;
    assert_eq!(a["remaining_units"], 0);
    assert_eq!(a["resource_packages"][0]["used"], 50);
    let r = stack.task(&key, &[]).await;
    assert_eq!(r.error_code(), "ResourceUnavailable.LowBalance");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_call_gives_its_unit_back() {
    let stack = Stack::start(Opts::default());
    let key = plain_account_with_key(&stack, "acme").await;
    for _ in 0..5 {
        assert_eq!(
            stack.task(&key, &[("x-sim-status", "500")]).await.status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
    assert_eq!(stack.admin().account("acme").await["remaining_units"], 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepaid_purchase_resumes_service_and_refunds_follow_the_rules() {
    let stack = Stack::start(Opts::default());
    let key = plain_account_with_key(&stack, "acme").await;
    join_all((0..50).map(|_| stack.task(&key, &[]))).await;
    assert_eq!(
        stack.task(&key, &[]).await.error_code(),
        "ResourceUnavailable.LowBalance"
    );

    let (status, pkg) = call(
        &stack,
        Method::POST,
        "/v1/accounts/acme/resource-packages",
        Some(json!({"size": 1000})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{pkg}");
    assert_eq!(pkg["price_usd"], "75");
    assert_eq!(pkg["kind"], "prepaid");
    let id = pkg["id"].as_str().unwrap().to_string();
    assert_eq!(stack.task(&key, &[]).await.status, StatusCode::OK);
    let events = stack.admin().all_events().await;
    assert_eq!(
        events.last().unwrap()["data"]["charged_to"],
        format!("prepaid:{id}")
    );

    let (_, list) = call(
        &stack,
        Method::GET,
        "/v1/accounts/acme/resource-packages",
        None,
    )
    .await;
    let packages = list["packages"].as_array().unwrap();
    assert_eq!(packages.len(), 2);
    let bought = packages.iter().find(|p| p["id"] == id.as_str()).unwrap();
    assert_eq!(bought["used"], 1);
    assert_eq!(bought["remaining"], 999);
    let free = packages.iter().find(|p| p["kind"] == "free").unwrap();
    assert_eq!(free["used"], 50);

    // Used: no refund. Free: never. Unused and recent: refunded.
    let (s, body) = call(
        &stack,
        Method::POST,
        &format!("/v1/accounts/acme/resource-packages/{id}/refund"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(
        body["Response"]["Error"]["Code"],
        "FailedOperation.RefundNotAllowed"
    );
    let free_id = free["id"].as_str().unwrap();
    let (s, _) = call(
        &stack,
        Method::POST,
        &format!("/v1/accounts/acme/resource-packages/{free_id}/refund"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (_, spare) = call(
        &stack,
        Method::POST,
        "/v1/accounts/acme/resource-packages",
        Some(json!({"size": 10000})),
    )
    .await;
    let spare_id = spare["id"].as_str().unwrap();
    let (s, body) = call(
        &stack,
        Method::POST,
        &format!("/v1/accounts/acme/resource-packages/{spare_id}/refund"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(body["refunded_at"].is_string());
    let (s, _) = call(
        &stack,
        Method::POST,
        &format!("/v1/accounts/acme/resource-packages/{spare_id}/refund"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "twice is not allowed");
    assert_eq!(stack.admin().account("acme").await["remaining_units"], 999);

    for bad in [
        json!({"size": 5000}),
        json!({"size": "1000"}),
        json!({"size": -1000}),
        json!({}),
    ] {
        let (s, body) = call(
            &stack,
            Method::POST,
            "/v1/accounts/acme/resource-packages",
            Some(bad.clone()),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");
        assert!(
            body["Response"]["Error"]["Message"]
                .as_str()
                .unwrap()
                .contains("size"),
            "{body}"
        );
    }
    let (_, list) = call(
        &stack,
        Method::GET,
        "/v1/accounts/acme/resource-packages",
        None,
    )
    .await;
    assert_eq!(
        list["packages"].as_array().unwrap().len(),
        3,
        "bad purchases stored nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deactivation_and_reactivation_keep_postpaid_and_grant_no_new_free_package() {
    let stack = Stack::start(Opts::default());
    let key = plain_account_with_key(&stack, "acme").await;
    let (s, _) = call(
        &stack,
        Method::PUT,
        "/v1/accounts/acme/postpaid",
        Some(json!({"enabled": true})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(&stack, Method::POST, "/v1/accounts/acme/deactivate", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        stack.task(&key, &[]).await.error_code(),
        "ResourceUnavailable.StopUsing"
    );
    let (s, view) = call(&stack, Method::POST, "/v1/accounts/acme/activate", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(view["postpaid"], true);
    let (_, list) = call(
        &stack,
        Method::GET,
        "/v1/accounts/acme/resource-packages",
        None,
    )
    .await;
    assert_eq!(
        list["packages"].as_array().unwrap().len(),
        1,
        "only the first activation's free package"
    );
    assert_eq!(stack.task(&key, &[]).await.status, StatusCode::OK);
    let (s, _) = call(
        &stack,
        Method::PUT,
        "/v1/accounts/acme/postpaid",
        Some(json!({"enabled": "yes"})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postpaid_usage_settlement_arrears_and_top_up() {
    let mut stack = Stack::start(Opts {
        env: vec![("TOLLGATE_BILLING_ARREARS_GRACE", "2s".into())],
        ..Opts::default()
    });
    let key = plain_account_with_key(&stack, "acme").await;
    call(
        &stack,
        Method::PUT,
        "/v1/accounts/acme/postpaid",
        Some(json!({"enabled": true})),
    )
    .await;
    join_all((0..55).map(|_| stack.task(&key, &[]))).await;
    let month = jiff::Timestamp::now().strftime("%Y-%m").to_string();

    let (s, usage) = call(
        &stack,
        Method::GET,
        &format!("/v1/accounts/acme/usage?month={month}"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{usage}");
    assert_eq!(usage["calls"], 55);
    assert_eq!(
        usage["by_source"],
        json!({"free": 50, "prepaid": 0, "postpaid": 5})
    );
    assert_eq!(usage["postpaid_units"], 5);
    assert_eq!(usage["tier"], 1);
    assert_eq!(usage["unit_price_usd"], "0.08");
    assert_eq!(usage["amount_usd"], "0.40");
    assert_eq!(usage["settled_usd"], Value::Null);

    let (s, first) = call(
        &stack,
        Method::POST,
        "/v1/billing/settle",
        Some(json!({"month": month})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{first}");
    assert_eq!(first["settled"][0]["charged_now_usd"], "0.40");
    assert_eq!(first["settled"][0]["balance_usd"], "-0.40");
    let (_, second) = call(
        &stack,
        Method::POST,
        "/v1/billing/settle",
        Some(json!({"month": month})),
    )
    .await;
    assert_eq!(
        second["settled"],
        json!([]),
        "settling twice changes nothing"
    );
    let a = stack.admin().account("acme").await;
    assert_eq!(a["balance_usd"], "-0.40");
    assert_eq!(a["status"], "active", "still in the grace period");
    assert!(a["arrears"]["suspends_at"].is_string());

    // After the grace: suspended, prepaid units included.
    call(
        &stack,
        Method::POST,
        "/v1/accounts/acme/resource-packages",
        Some(json!({"size": 1000})),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = stack.task(&key, &[]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.error_code(), "ResourceUnavailable.InArrears");
    assert_eq!(stack.admin().account("acme").await["status"], "suspended");

    // The state is rebuilt from the store after a restart.
    stack.gw.restart(&Opts {
        env: vec![("TOLLGATE_BILLING_ARREARS_GRACE", "2s".into())],
        ..Opts::default()
    });
    assert_eq!(
        stack.task(&key, &[]).await.error_code(),
        "ResourceUnavailable.InArrears"
    );

    let (_, t) = call(
        &stack,
        Method::POST,
        "/v1/accounts/acme/top-up",
        Some(json!({"amount": "0.10"})),
    )
    .await;
    assert_eq!(t["balance_usd"], "-0.30");
    assert_eq!(
        stack.task(&key, &[]).await.error_code(),
        "ResourceUnavailable.InArrears"
    );
    let (_, t) = call(
        &stack,
        Method::POST,
        "/v1/accounts/acme/top-up",
        Some(json!({"amount": "12.50"})),
    )
    .await;
    assert_eq!(t["balance_usd"], "12.20");
    let r = stack.task(&key, &[]).await;
    assert_eq!(r.status, StatusCode::OK, "service resumes at once");
    assert_eq!(stack.admin().account("acme").await["status"], "active");

    for bad in [
        json!({"amount": "-5"}),
        json!({"amount": 5}),
        json!({"amount": "1.234"}),
        json!({"amount": "abc"}),
        json!({}),
    ] {
        let (s, _) = call(
            &stack,
            Method::POST,
            "/v1/accounts/acme/top-up",
            Some(bad.clone()),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");
    }
    for bad in ["2026-13", "next", "2999-01"] {
        let (s, _) = call(
            &stack,
            Method::POST,
            "/v1/billing/settle",
            Some(json!({"month": bad})),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");
    }
    let (s, _) = call(
        &stack,
        Method::GET,
        "/v1/accounts/acme/usage?month=11-2026",
        None,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        stack.admin().account("acme").await["balance_usd"],
        "12.20",
        "bad calls changed nothing"
    );
}
