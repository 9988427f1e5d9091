//! Jobs on one node (SPEC §10.2), against the real binary: jobs and
//! synchronous tasks share one FIFO and one limit, each succeeded job has
//! exactly one usage event, a job survives `kill -9` right after its 202,
//! cancel, ownership, billing at submit, and bad requests.

mod common;

use std::time::{Duration, Instant};

use common::{Opts, Resp, Stack};
use futures_util::future::join_all;
use http::{Method, StatusCode};
use serde_json::Value;

const PREFIX: &str = "/tollgate/jobs";

async fn submit(stack: &Stack, key: &str, extra: &[(&str, &str)]) -> Resp {
    let auth = format!("Bearer {key}");
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    headers.extend_from_slice(extra);
    stack
        .http
        .send(
            Method::POST,
            &format!("{}{PREFIX}/v1/style-transfer", stack.gw.url),
            &headers,
            common::TASK_BODY.to_string(),
        )
        .await
}

async fn job_call(stack: &Stack, method: Method, key: &str, id: &str) -> Resp {
    let auth = format!("Bearer {key}");
    stack
        .http
        .send(
            method,
            &format!("{}{PREFIX}/{id}", stack.gw.url),
            &[("authorization", auth.as_str())],
            "",
        )
        .await
}

fn job_id(r: &Resp) -> String {
    assert_eq!(
        r.status,
        StatusCode::ACCEPTED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()["job_id"].as_str().expect("a job id").to_string()
}

/// Polls (bounded) until the job is in a final state; returns its view.
async fn finished(stack: &Stack, key: &str, id: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let r = job_call(stack, Method::GET, key, id).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&r.body)
        );
        let v = r.json();
        let status = v["status"].as_str().unwrap_or_default().to_string();
        if !matches!(status.as_str(), "queued" | "running") {
            return v;
        }
        assert!(Instant::now() < deadline, "job {id} still {status}: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_and_tasks_share_one_fifo_and_one_limit_and_each_job_is_charged_once() {
    let stack = Stack::start(Opts::default());
    let key = stack.account_with_key("acme").await;
    // 3 synchronous tasks hold the account's 3 slots.
    let held = stack.hold_slots("acme", &key, 3, 4000).await;
    // 10 jobs, then a synchronous task, then 10 more jobs: all queued.
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(job_id(
            &submit(&stack, &key, &[("x-sim-delay-ms", "100")]).await,
        ));
    }
    let middle = stack.client().spawn(&key, 100, "sync-middle");
    common::wait_for(
        &stack.admin(),
        "acme",
        "the task queued behind 10 jobs",
        |a| a["concurrency"]["queued"] == 11,
    )
    .await;
    for _ in 0..10 {
        ids.push(job_id(
            &submit(&stack, &key, &[("x-sim-delay-ms", "100")]).await,
        ));
    }
    let queued = job_call(&stack, Method::GET, &key, &ids[4]).await.json();
    assert_eq!(queued["status"], "queued", "{queued}");
    assert_eq!(queued["position"], 5, "{queued}");
    assert_eq!(
        stack.admin().account("acme").await["concurrency"]["jobs_queued"],
        20
    );
    for h in held {
        assert_eq!(h.await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(middle.await.unwrap().status, StatusCode::OK);
    for id in &ids {
        let v = finished(&stack, &key, id, Duration::from_secs(30)).await;
        assert_eq!(v["status"], "succeeded", "{v}");
        assert_eq!(v["result"]["status"], 200, "{v}");
        assert!(
            v["result"]["body"].is_object(),
            "the backend's JSON answer: {v}"
        );
    }
    assert_eq!(stack.sim.max_in_flight(&stack.http, "acme").await, 3);
    // FIFO: the backend saw the first 10 jobs, the task, then the rest.
    let arrivals: Vec<String> = stack.sim.stats(&stack.http).await["accounts"]["acme"]["arrivals"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .filter(|r| r.starts_with("job_") || r == "sync-middle")
        .collect();
    let mut expected = ids[..10].to_vec();
    expected.push("sync-middle".into());
    expected.extend_from_slice(&ids[10..]);
    let mut seen = arrivals.clone();
    seen.sort();
    let mut all = expected.clone();
    all.sort();
    assert_eq!(seen, all, "every job and the task reached the backend once");
    // Slots are granted in that order; up to the limit (3) start together
    // and may reach the backend in either order.
    for (i, id) in expected.iter().enumerate() {
        let at = arrivals.iter().position(|a| a == id).unwrap();
        assert!(
            at.abs_diff(i) < 3,
            "{id} arrived {at}th, queued {i}th:\n{arrivals:?}"
        );
    }
    // One event per job, naming it; none twice.
    let events = stack.admin().all_events().await;
    let mut job_events: Vec<String> = events
        .iter()
        .filter_map(|e| e["data"]["job_id"].as_str().map(str::to_owned))
        .collect();
    job_events.sort();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(job_events, sorted);
    assert_eq!(events.len(), 24, "20 jobs, 3 held tasks, 1 in the middle");
    let idle = stack.admin().wait_idle("acme").await;
    assert_eq!(idle["concurrency"]["jobs_queued"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_survives_kill_9_right_after_its_202() {
    let mut stack = Stack::start(Opts::default());
    let key = stack.account_with_key("acme").await;
    let held = stack.hold_slots("acme", &key, 3, 30_000).await;
    let id = job_id(&submit(&stack, &key, &[("x-sim-delay-ms", "0")]).await);
    stack.gw.restart(&Opts::default());
    drop(held);
    let v = finished(&stack, &key, &id, Duration::from_secs(20)).await;
    assert_eq!(v["status"], "succeeded", "{v}");
    let events = stack.admin().all_events().await;
    let for_job: Vec<_> = events
        .iter()
        .filter(|e| e["data"]["job_id"] == id.as_str())
        .collect();
    assert_eq!(for_job.len(), 1, "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_job_is_cancelled_uncharged_and_a_finished_one_is_not_cancellable() {
    let stack = Stack::start(Opts::default());
    let key = stack.account_with_key("acme").await;
    let held = stack.hold_slots("acme", &key, 3, 3000).await;
    let id = job_id(&submit(&stack, &key, &[]).await);
    let r = job_call(&stack, Method::DELETE, &key, &id).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.json()["status"], "cancelled");
    // It left the queue at once.
    common::wait_for(
        &stack.admin(),
        "acme",
        "the cancelled job off the queue",
        |a| a["concurrency"]["queued"] == 0 && a["concurrency"]["jobs_queued"] == 0,
    )
    .await;
    let again = job_call(&stack, Method::DELETE, &key, &id).await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert_eq!(again.error_code(), "FailedOperation.JobNotCancellable");
    for h in held {
        assert_eq!(h.await.unwrap().status, StatusCode::OK);
    }
    let done = job_id(&submit(&stack, &key, &[]).await);
    finished(&stack, &key, &done, Duration::from_secs(10)).await;
    let r = job_call(&stack, Method::DELETE, &key, &done).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.error_code(), "FailedOperation.JobNotCancellable");
    let events = stack.admin().all_events().await;
    assert!(events.iter().all(|e| e["data"]["job_id"] != id.as_str()));
    assert_eq!(events.len(), 4, "3 held tasks and the finished job");
    assert_eq!(stack.sim.requests(&stack.http, "acme").await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_is_not_cancellable_and_a_failure_is_stored_uncharged() {
    let stack = Stack::start(Opts::default());
    let key = stack.account_with_key("acme").await;
    let id = job_id(&submit(&stack, &key, &[("x-sim-delay-ms", "800")]).await);
    common::wait_for(&stack.admin(), "acme", "the job at the backend", |a| {
        a["concurrency"]["in_flight"] == 1
    })
    .await;
    let r = job_call(&stack, Method::DELETE, &key, &id).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.error_code(), "FailedOperation.JobNotCancellable");
    assert_eq!(
        finished(&stack, &key, &id, Duration::from_secs(10)).await["status"],
        "succeeded"
    );
    let failing = job_id(&submit(&stack, &key, &[("x-sim-status", "500")]).await);
    let v = finished(&stack, &key, &failing, Duration::from_secs(10)).await;
    assert_eq!(v["status"], "failed", "{v}");
    assert!(
        v["error"]["code"].as_str().is_some_and(|c| !c.is_empty()),
        "{v}"
    );
    let events = stack.admin().all_events().await;
    assert_eq!(events.len(), 1, "only the success is charged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sub_account_sees_only_its_jobs_and_another_account_none() {
    let stack = Stack::start(Opts::default());
    let root_key = stack.account_with_key("acme").await;
    stack.admin().create_sub("acme", "acme-dev", None).await;
    stack.admin().create_sub("acme", "acme-ops", None).await;
    let dev = stack.admin().issue_key("acme", Some("acme-dev")).await.1;
    let ops = stack.admin().issue_key("acme", Some("acme-ops")).await.1;
    let other = stack.account_with_key("globex").await;
    let id = job_id(&submit(&stack, &dev, &[]).await);
    finished(&stack, &dev, &id, Duration::from_secs(10)).await;
    assert_eq!(
        job_call(&stack, Method::GET, &root_key, &id).await.status,
        StatusCode::OK
    );
    for (who, key) in [("a sibling sub-account", &ops), ("another account", &other)] {
        let r = job_call(&stack, Method::GET, key, &id).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{who}");
        assert_eq!(r.error_code(), "ResourceNotFound.JobNotFound", "{who}");
        let r = job_call(&stack, Method::DELETE, key, &id).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{who}");
    }
    let unknown = job_call(
        &stack,
        Method::GET,
        &root_key,
        "job_0123456789abcdef0123456789abcdef",
    )
    .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let malformed = job_call(&stack, Method::GET, &root_key, "not-a-job").await;
    assert_eq!(malformed.status, StatusCode::NOT_FOUND);
    let none = job_call(&stack, Method::GET, "tg_nope", &id).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_checks_billing_bounds_and_keys_and_stores_nothing_when_refused() {
    let stack = Stack::start(Opts {
        extra_toml: "[jobs]\nmax_pending_per_account = 2\nmax_body_bytes = 1000\n".into(),
        ..Opts::default()
    });
    // An account without postpaid whose free units are gone: LowBalance
    // at submit, and nothing stored.
    stack.admin().create_plain_account("broke").await;
    let broke = stack.admin().issue_key("broke", None).await.1;
    let mut spent = 0;
    while spent < 60 {
        let r = stack.task(&broke, &[("x-sim-delay-ms", "0")]).await;
        if r.status != StatusCode::OK {
            assert_eq!(r.error_code(), "ResourceUnavailable.LowBalance");
            break;
        }
        spent += 1;
    }
    assert_eq!(spent, 50, "the free package's units");
    let r = submit(&stack, &broke, &[]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.error_code(), "ResourceUnavailable.LowBalance");
    let listed = stack
        .admin()
        .call(Method::GET, "/v1/accounts/broke/jobs", None)
        .await
        .json();
    assert_eq!(listed["jobs"], serde_json::json!([]), "{listed}");
    let key = stack.account_with_key("acme").await;
    let held = stack.hold_slots("acme", &key, 3, 3000).await;
    let a = job_id(&submit(&stack, &key, &[]).await);
    let b = job_id(&submit(&stack, &key, &[]).await);
    let third = submit(&stack, &key, &[]).await;
    assert_eq!(third.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(third.error_code(), "RequestLimitExceeded.JobNumExceed");
    let big = "x".repeat(2000);
    let auth = format!("Bearer {key}");
    let r = stack
        .http
        .send(
            Method::POST,
            &format!("{}{PREFIX}/v1/style-transfer", stack.gw.url),
            &[("authorization", auth.as_str())],
            big,
        )
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    // An idempotency key on a submit: the retry gets the same job.
    for h in held {
        assert_eq!(h.await.unwrap().status, StatusCode::OK);
    }
    finished(&stack, &key, &a, Duration::from_secs(10)).await;
    finished(&stack, &key, &b, Duration::from_secs(10)).await;
    let first = submit(&stack, &key, &[("idempotency-key", "order-7")]).await;
    let again = submit(&stack, &key, &[("idempotency-key", "order-7")]).await;
    assert_eq!(job_id(&first), job_id(&again));
    assert!(again.replayed());
    // Bad requests: uncharged, nothing stored.
    let r = stack
        .http
        .send(
            Method::POST,
            &format!("{}{PREFIX}/../../etc/passwd", stack.gw.url),
            &[("authorization", auth.as_str())],
            "{}",
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::BAD_REQUEST,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let r = stack
        .http
        .send(
            Method::PUT,
            &format!("{}{PREFIX}/v1/style-transfer", stack.gw.url),
            &[("authorization", auth.as_str())],
            "{}",
        )
        .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_jobs_submitted_at_once_all_run_once() {
    let stack = Stack::start(Opts::default());
    let key = stack.account_with_key("acme").await;
    let submits =
        join_all((0..30).map(|_| submit(&stack, &key, &[("x-sim-delay-ms", "20")]))).await;
    let ids: Vec<String> = submits.iter().map(job_id).collect();
    for id in &ids {
        assert_eq!(
            finished(&stack, &key, id, Duration::from_secs(30)).await["status"],
            "succeeded"
        );
    }
    assert_eq!(stack.admin().all_events().await.len(), 30);
    assert!(stack.sim.max_in_flight(&stack.http, "acme").await <= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_queued_past_max_wait_expires_uncharged() {
    let stack = Stack::start(Opts {
        extra_toml: "[jobs]\nmax_wait = \"1s\"\n".into(),
        ..Opts::default()
    });
    let key = stack.account_with_key("acme").await;
    let held = stack.hold_slots("acme", &key, 3, 2000).await;
    let id = job_id(&submit(&stack, &key, &[]).await);
    let v = finished(&stack, &key, &id, Duration::from_secs(10)).await;
    assert_eq!(v["status"], "expired", "{v}");
    assert_eq!(v["error"]["code"], "FailedOperation.JobExpired");
    for h in held {
        assert_eq!(h.await.unwrap().status, StatusCode::OK);
    }
    let events = stack.admin().all_events().await;
    assert_eq!(events.len(), 3, "the held tasks only");
    assert_eq!(stack.sim.requests(&stack.http, "acme").await, 3);
}

/// The job belongs to the account, not to the key that submitted it: a
/// key revoked while its job waits does not stop the job (a deactivated
/// account does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_job_runs_after_its_key_is_revoked_and_fails_when_its_account_is_deactivated() {
    let stack = Stack::start(Opts::default());
    stack.admin().create_account("acme").await;
    let (key_id, key) = stack.admin().issue_key("acme", None).await;
    let holder = stack.admin().issue_key("acme", None).await.1;
    let held = stack.hold_slots("acme", &holder, 3, 800).await;
    let id = job_id(&submit(&stack, &key, &[]).await);
    let r = stack
        .admin()
        .call(Method::DELETE, &format!("/v1/keys/{key_id}"), None)
        .await;
    assert!(
        r.status.is_success(),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    for h in held {
        assert_eq!(h.await.unwrap().status, StatusCode::OK);
    }
    let v = finished(&stack, &holder, &id, Duration::from_secs(10)).await;
    assert_eq!(v["status"], "succeeded", "{v}");

    let held = stack.hold_slots("acme", &holder, 3, 3000).await;
    let queued = job_id(&submit(&stack, &holder, &[]).await);
    let r = stack
        .admin()
        .call(Method::POST, "/v1/accounts/acme/deactivate", None)
        .await;
    assert!(
        r.status.is_success(),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    for h in held {
        let _ = h.await;
    }
    stack
        .admin()
        .call(Method::POST, "/v1/accounts/acme/activate", None)
        .await;
    let v = finished(&stack, &holder, &queued, Duration::from_secs(10)).await;
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["error"]["code"], "ResourceUnavailable.StopUsing", "{v}");
}

/// SIGTERM leaves a queued job queued; the next start runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_leaves_queued_jobs_for_the_next_start() {
    let mut stack = Stack::start(Opts::default());
    let key = stack.account_with_key("acme").await;
    let held = stack.hold_slots("acme", &key, 3, 1500).await;
    let id = job_id(&submit(&stack, &key, &[]).await);
    let status = stack.gw.proc.sigterm_and_wait(Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    for h in held {
        assert_eq!(
            h.await.unwrap().status,
            StatusCode::OK,
            "in-flight tasks drain"
        );
    }
    stack.gw.restart(&Opts::default());
    let v = finished(&stack, &key, &id, Duration::from_secs(10)).await;
    assert_eq!(v["status"], "succeeded", "{v}");
    let events = stack.admin().all_events().await;
    assert_eq!(events.len(), 4);
}
