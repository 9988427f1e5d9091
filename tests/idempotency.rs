//! Idempotency keys on one node (SPEC §10.1), against the real binary: a
//! retry of a success gets the stored answer and is not charged again
//! (also after `kill -9`), a retry while the first is queued is refused, a
//! failure is retried as a new task, a reused key and an answer too large
//! to keep are refused, and concurrent requests with one key run once.

mod common;

use common::{Opts, Stack, wait_for};
use futures_util::future::join_all;
use http::{Method, StatusCode};

const BODY: &str = r#"{"InputImage":"x"}"#;

async fn keyed(
    stack: &Stack,
    key: &str,
    idem: &str,
    body: &str,
    extra: &[(&str, &str)],
) -> common::Resp {
    let auth = format!("Bearer {key}");
    let mut headers = vec![("authorization", auth.as_str()), ("idempotency-key", idem)];
    headers.extend_from_slice(extra);
    stack
        .http
        .send(
            Method::POST,
            &format!("{}/v1/style-transfer", stack.gw.url),
            &headers,
            body.to_string(),
        )
        .await
}

/// Requests the simulator saw for `account`.
async fn forwarded(stack: &Stack, account: &str) -> u64 {
    stack.sim.requests(&stack.http, account).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_a_success_is_the_same_answer_and_is_not_charged_again() {
    let stack = Stack::start(Opts::default());
    let key = stack.account_with_key("acme").await;
    let first = keyed(&stack, &key, "order-1", BODY, &[]).await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(!first.replayed());
    for _ in 0..3 {
        let again = keyed(&stack, &key, "order-1", BODY, &[]).await;
        assert_eq!(again.status, StatusCode::OK);
        assert!(again.replayed(), "{:?}", again.headers);
        assert_eq!(again.body, first.body, "the stored answer, byte for byte");
        assert_eq!(again.header("content-type"), first.header("content-type"));
        // A new request id of its own: the replay is a new request.
        assert_ne!(again.header("x-request-id"), first.header("x-request-id"));
    }
    let events = stack.admin().all_events().await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["data"]["idempotency"]["key"], "order-1");
    assert_eq!(events[0]["data"]["idempotency"]["answer_stored"], true);
    assert_eq!(
        forwarded(&stack, "acme").await,
        1,
        "nothing forwarded for a replay"
    );
    let free = stack.admin().account("acme").await;
    let used: u64 = free["resource_packages"]
        .as_array()
        .map(|ps| ps.iter().filter_map(|p| p["used"].as_u64()).sum())
        .unwrap_or(0);
    assert_eq!(used, 1, "one unit charged: {free}");
    // Keys are scoped to the root account: another account's same key runs.
    let other = stack.account_with_key("other").await;
    let r = keyed(&stack, &other, "order-1", BODY, &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(!r.replayed());
    assert_eq!(stack.admin().all_events().await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_while_the_first_is_queued_is_refused_and_then_replayed() {
    let stack = Stack::start(Opts::default());
    let key = stack.account_with_key("acme").await;
    let held = stack.hold_slots("acme", &key, 3, 1500).await;
    let first = {
        let s = stack.client();
        let key = key.clone();
        tokio::spawn(async move {
            let auth = format!("Bearer {key}");
            s.http
                .send(
                    Method::POST,
                    &format!("{}/v1/style-transfer", s.url),
                    &[("authorization", &auth), ("idempotency-key", "q-1")],
                    BODY,
                )
                .await
        })
    };
    wait_for(&stack.admin(), "acme", "the keyed task queued", |a| {
        a["concurrency"]["queued"] == 1
    })
    .await;
    let retry = keyed(&stack, &key, "q-1", BODY, &[]).await;
    assert_eq!(retry.status, StatusCode::CONFLICT);
    assert_eq!(
        retry.error_code(),
        "FailedOperation.IdempotentRequestInProgress"
    );
    assert!(retry.header("retry-after").is_some());
    for h in held {
        assert_eq!(h.await.unwrap().status, StatusCode::OK);
    }
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::OK);
    let after = keyed(&stack, &key, "q-1", BODY, &[]).await;
    assert!(after.replayed());
    assert_eq!(after.body, first.body);
    assert_eq!(
        stack.admin().all_events().await.len(),
        4,
        "3 held + the keyed one"
    );
    let idle = stack.admin().wait_idle("acme").await;
    assert_eq!(idle["concurrency"]["in_flight"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_is_not_remembered_and_its_retry_runs() {
    let stack = Stack::start(Opts::default());
    let key = stack.account_with_key("acme").await;
    let failed = keyed(&stack, &key, "f-1", BODY, &[("x-sim-status", "500")]).await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(stack.admin().all_events().await.is_empty());
    // The fingerprint is the method, path, query and body: the retry is
    // the same request.
    let retry = keyed(&stack, &key, "f-1", BODY, &[]).await;
    assert_eq!(retry.status, StatusCode::OK);
    assert!(!retry.replayed(), "a failure is not replayed");
    let third = keyed(&stack, &key, "f-1", BODY, &[]).await;
    assert!(third.replayed());
    assert_eq!(stack.admin().all_events().await.len(), 1);
    assert_eq!(forwarded(&stack, "acme").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reused_for_another_request_is_refused_and_changes_nothing() {
    let stack = Stack::start(Opts::default());
    let key = stack.account_with_key("acme").await;
    assert_eq!(
        keyed(&stack, &key, "r-1", BODY, &[]).await.status,
        StatusCode::OK
    );
    let reused = keyed(&stack, &key, "r-1", r#"{"InputImage":"y"}"#, &[]).await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reused.error_code(), "InvalidParameter.IdempotencyKeyReused");
    assert_eq!(stack.admin().all_events().await.len(), 1);
    assert_eq!(forwarded(&stack, "acme").await, 1);
    // Bad keys: a clear 400, nothing forwarded.
    let long = "k".repeat(256);
    for bad in ["", long.as_str()] {
        let r = keyed(&stack, &key, bad, BODY, &[]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad:?}");
        assert_eq!(r.error_code(), "InvalidParameter.InvalidParameter");
    }
    assert_eq!(forwarded(&stack, "acme").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_too_large_to_keep_is_charged_once_and_never_run_again() {
    let stack = Stack::start(Opts {
        extra_toml: "[idempotency]\nmax_stored_answer_bytes = 16\n".into(),
        ..Opts::default()
    });
    let key = stack.account_with_key("acme").await;
    assert_eq!(
        keyed(&stack, &key, "big", BODY, &[]).await.status,
        StatusCode::OK
    );
    let events = stack.admin().all_events().await;
    assert_eq!(events[0]["data"]["idempotency"]["answer_stored"], false);
    let retry = keyed(&stack, &key, "big", BODY, &[]).await;
    assert_eq!(retry.status, StatusCode::CONFLICT);
    assert_eq!(
        retry.error_code(),
        "FailedOperation.IdempotentAnswerNotStored"
    );
    assert_eq!(stack.admin().all_events().await.len(), 1);
    assert_eq!(forwarded(&stack, "acme").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_with_one_key_run_once() {
    let stack = Stack::start(Opts::default());
    let key = stack.account_with_key("acme").await;
    let answers =
        join_all((0..12).map(|_| keyed(&stack, &key, "c-1", BODY, &[("x-sim-delay-ms", "300")])))
            .await;
    let ran: Vec<_> = answers
        .iter()
        .filter(|r| r.status == StatusCode::OK && !r.replayed())
        .collect();
    assert_eq!(ran.len(), 1, "exactly one runs");
    for r in &answers {
        let ok = (r.status == StatusCode::OK && (r.replayed() || r.body == ran[0].body))
            || r.error_code() == "FailedOperation.IdempotentRequestInProgress";
        assert!(ok, "{} {}", r.status, String::from_utf8_lossy(&r.body));
    }
    assert_eq!(stack.admin().all_events().await.len(), 1);
    assert_eq!(forwarded(&stack, "acme").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_kill_9_of_the_gateway_is_replayed() {
    let mut stack = Stack::start(Opts::default());
    let key = stack.account_with_key("acme").await;
    let first = keyed(&stack, &key, "crash-1", BODY, &[]).await;
    assert_eq!(first.status, StatusCode::OK);
    stack.gw.restart(&Opts::default());
    let retry = keyed(&stack, &key, "crash-1", BODY, &[]).await;
    assert_eq!(retry.status, StatusCode::OK);
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(stack.admin().all_events().await.len(), 1);
    assert_eq!(forwarded(&stack, "acme").await, 1);
}

/// The client's connection dies after the task was forwarded (it never
/// sees the answer); the gateway commits the success anyway, then is
/// killed. The client's retry, on the restarted gateway, gets the answer
/// it never received, and pays once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_lost_answer_and_kill_9_is_the_answer_it_never_got() {
    let mut stack = Stack::start(Opts::default());
    let key = stack.account_with_key("acme").await;
    let socket = common::raw_task(
        &stack.gw.url,
        &key,
        "Idempotency-Key: lost-1\r\nX-Sim-Delay-Ms: 3000\r\nX-Request-Id: lost-first\r\n",
        BODY,
    )
    .await;
    wait_for(&stack.admin(), "acme", "the task at the backend", |a| {
        a["concurrency"]["in_flight"] == 1
    })
    .await;
    drop(socket);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while stack.admin().all_events().await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the detached success was not recorded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stack.gw.restart(&Opts::default());
    let retry = keyed(&stack, &key, "lost-1", BODY, &[]).await;
    assert_eq!(retry.status, StatusCode::OK);
    assert!(retry.replayed());
    assert!(
        String::from_utf8_lossy(&retry.body).contains("lost-first"),
        "the first run's answer: {}",
        String::from_utf8_lossy(&retry.body)
    );
    let events = stack.admin().all_events().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["data"]["client_gone"], true);
    assert_eq!(forwarded(&stack, "acme").await, 1);
}
