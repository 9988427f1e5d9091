//! Forwarding, classification, charging and authentication against the real
//! binary: failures are proxied and never charged, each success has exactly
//! one event, credentials never reach the backend, bad input gets a clear
//! error.

mod common;

use std::collections::HashSet;

use common::{Opts, Stack, wait_for};
use futures_util::future::join_all;
use http::{Method, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_is_proxied_and_not_charged() {
    let stack = Stack::start(Opts::default());
    let key = stack.account_with_key("acme").await;
    for status in ["500", "404", "429"] {
        let r = stack.task(&key, &[("x-sim-status", status)]).await;
        assert_eq!(r.status.as_str(), status);
        // The backend's own answer reaches the client.
        assert!(r.json()["Response"]["RequestId"].is_string());
    }
    assert!(stack.admin().all_events().await.is_empty());
    let ok = stack.task(&key, &[]).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(stack.admin().all_events().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tencent_json_mode_does_not_charge_an_error_in_a_200() {
    let stack = Stack::start(Opts {
        extra_toml: "".into(),
        env: vec![("TOLLGATE_BACKEND_SUCCESS", "tencent-json".into())],
    });
    let key = stack.account_with_key("acme").await;
    let r = stack
        .task(
            &key,
            &[("x-sim-error", "FailedOperation.ImageDecodeFailed")],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.error_code(), "FailedOperation.ImageDecodeFailed");
    assert!(stack.admin().all_events().await.is_empty());
    assert_eq!(stack.task(&key, &[]).await.status, StatusCode::OK);
    assert_eq!(stack.admin().all_events().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_success_has_exactly_one_event_and_failures_none() {
    let stack = Stack::start(Opts::default());
    let admin = stack.admin();
    admin.create_account("acme").await;
    admin.create_sub("acme", "acme-dev", None).await;
    let root = admin.issue_key("acme", None).await.1;
    let dev = admin.issue_key("acme", Some("acme-dev")).await.1;
    let tasks = (0..90).map(|i| {
        let key = if i % 2 == 0 { &root } else { &dev };
        let status = if i % 3 == 0 { "500" } else { "200" };
        let rid = format!("req-{i}");
        let stack = &stack;
        async move {
            let r = stack
                .task(
                    key,
                    &[
                        ("x-sim-status", status),
                        ("x-request-id", &rid),
                        ("x-sim-delay-ms", "5"),
                    ],
                )
                .await;
            (rid, r.status)
        }
    });
    let results = join_all(tasks).await;
    let succeeded: HashSet<String> = results
        .iter()
        .filter(|(_, s)| *s == StatusCode::OK)
        .map(|(rid, _)| rid.clone())
        .collect();
    let statuses: Vec<_> = results.iter().map(|(_, s)| s.as_u16()).collect();
    assert_eq!(succeeded.len(), 60, "{statuses:?}");
    let events = admin.all_events().await;
    assert_eq!(events.len(), 60);
    let ids: HashSet<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 60, "event ids are unique");
    let charged: HashSet<String> = events
        .iter()
        .map(|e| e["data"]["request_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(charged, succeeded);
    for e in &events {
        assert_eq!(e["specversion"], "1.0");
        assert_eq!(e["type"], "tollgate.usage.v1");
        assert_eq!(e["source"], "tollgate/test");
        assert_eq!(e["subject"], "acme");
        assert_eq!(e["data"]["units"], 1);
        assert_eq!(e["data"]["status"], 200);
        assert_eq!(e["data"]["client_gone"], false);
        let n: u64 = e["data"]["request_id"].as_str().unwrap()[4..]
            .parse()
            .unwrap();
        let expected_sub = if n.is_multiple_of(2) {
            Value::Null
        } else {
            Value::from("acme-dev")
        };
        assert_eq!(e["data"]["sub_account"], expected_sub);
    }
    // The JSON Lines export holds the same events, once each.
    let exported = common::wait_for_jsonl(&stack.gw.data_dir, 60).await;
    for v in &exported {
        assert!(ids.contains(v["id"].as_str().unwrap()));
    }
    assert_eq!(exported.len(), 60);
    // The cursor pages without gaps or repeats.
    let first = admin
        .call(Method::GET, "/v1/usage-events?limit=25", None)
        .await
        .json();
    assert_eq!(first["events"].as_array().unwrap().len(), 25);
    let next = first["next"].as_str().unwrap().to_string();
    let rest = admin
        .call(
            Method::GET,
            &format!("/v1/usage-events?after={next}&limit=1000"),
            None,
        )
        .await
        .json();
    assert_eq!(rest["events"].as_array().unwrap().len(), 35);
    assert_eq!(rest["events"][0]["id"], events[25]["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_forwarded_without_credentials() {
    let stack = Stack::start(Opts::default());
    let admin = stack.admin();
    admin.create_account("acme").await;
    admin.create_sub("acme", "acme-dev", None).await;
    let dev = admin.issue_key("acme", Some("acme-dev")).await.1;
    let url = format!("{}/v1/images/style?variant=oil", stack.gw.url);
    let r = stack
        .http
        .send(
            Method::POST,
            &url,
            &[
                ("x-api-key", &dev),
                ("x-sim-echo", "1"),
                ("x-request-id", "client-chosen-id"),
                ("connection", "x-private"),
                ("x-private", "secret-hop"),
                ("x-tollgate-account", "spoofed"),
                ("content-type", "application/json"),
            ],
            r#"{"InputImage":"x"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.header("x-request-id").as_deref(),
        Some("client-chosen-id")
    );
    assert!(r.header("x-queue-wait-ms").is_some());
    let body = r.json();
    let echo = &body["Response"]["Echo"];
    assert!(echo.is_object(), "{body}");
    assert_eq!(echo["Path"], "/v1/images/style?variant=oil");
    let h = &echo["Headers"];
    assert_eq!(h["x-request-id"], "client-chosen-id");
    assert_eq!(h["x-tollgate-account"], "acme");
    assert_eq!(h["x-tollgate-sub-account"], "acme-dev");
    assert_eq!(h["content-type"], "application/json");
    assert!(h.get("x-api-key").is_none());
    assert!(h.get("authorization").is_none());
    assert!(
        h.get("x-private").is_none(),
        "hop-by-hop header named in Connection"
    );
    // A root key: the sub-account header is present and empty; a request
    // id is generated when the client sends none.
    let root = admin.issue_key("acme", None).await.1;
    let r = stack.task(&root, &[("x-sim-echo", "1")]).await;
    let h = &r.json()["Response"]["Echo"]["Headers"];
    assert_eq!(h["x-tollgate-sub-account"], "");
    assert_eq!(
        Some(h["x-request-id"].as_str().unwrap().to_string()),
        r.header("x-request-id")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_checked_and_revocation_is_immediate() {
    let stack = Stack::start(Opts::default());
    let admin = stack.admin();
    admin.create_account("acme").await;
    let (key_id, key) = admin.issue_key("acme", None).await;
    let none = stack
        .http
        .send(Method::POST, &format!("{}/v1/x", stack.gw.url), &[], "{}")
        .await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert_eq!(none.error_code(), "AuthFailure.InvalidAuthorization");
    assert_eq!(
        stack.task("tg_not_a_key", &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        stack.task(&"x".repeat(5000), &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(stack.task(&key, &[]).await.status, StatusCode::OK);
    let r = admin
        .call(Method::DELETE, &format!("/v1/keys/{key_id}"), None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = stack.task(&key, &[]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(stack.admin().all_events().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deactivation_refuses_every_key_and_the_queue() {
    let stack = Stack::start(Opts::default());
    let admin = stack.admin();
    admin.create_account("acme").await;
    admin.create_sub("acme", "acme-dev", None).await;
    let root = admin.issue_key("acme", None).await.1;
    let dev = admin.issue_key("acme", Some("acme-dev")).await.1;
    let client = stack.client();
    let running: Vec<_> = (0..3)
        .map(|i| client.spawn(&root, 3000, &format!("run{i}")))
        .collect();
    wait_for(&admin, "acme", "3 in flight", |a| {
        a["concurrency"]["in_flight"] == 3
    })
    .await;
    let waiting = client.spawn(&dev, 10, "waiting");
    wait_for(&admin, "acme", "1 queued", |a| {
        a["concurrency"]["queued"] == 1
    })
    .await;
    let r = admin
        .call(Method::POST, "/v1/accounts/acme/deactivate", None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["status"], "deactivated");
    let w = waiting.await.unwrap();
    assert_eq!(w.status, StatusCode::FORBIDDEN);
    assert_eq!(w.error_code(), "ResourceUnavailable.StopUsing");
    for key in [&root, &dev] {
        let r = stack.task(key, &[]).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert_eq!(r.error_code(), "ResourceUnavailable.StopUsing");
    }
    // Tasks already at the backend finish and are billed.
    for h in running {
        assert_eq!(h.await.unwrap().status, StatusCode::OK);
    }
    let r = admin
        .call(Method::POST, "/v1/accounts/acme/activate", None)
        .await;
    assert_eq!(r.json()["status"], "active");
    assert_eq!(stack.task(&dev, &[]).await.status, StatusCode::OK);
    assert_eq!(admin.all_events().await.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_refused_with_413() {
    let stack = Stack::start(Opts {
        extra_toml: "[limits]\nmax_body_bytes = 1024\n".into(),
        ..Opts::default()
    });
    let key = stack.account_with_key("acme").await;
    let auth = format!("Bearer {key}");
    let big = "x".repeat(2048);
    let r = stack
        .http
        .send(
            Method::POST,
            &format!("{}/v1/x", stack.gw.url),
            &[("authorization", &auth)],
            big.clone(),
        )
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.error_code(), "FailedOperation.RequestEntityTooLarge");
    // A chunked body declares no length; it is cut off while it streams.
    let addr = stack.gw.url.trim_start_matches("http://").to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/x HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..4 {
        s.write_all(format!("200\r\n{}\r\n", "y".repeat(512)).as_bytes())
            .await
            .unwrap();
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        s.read_to_end(&mut answer),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("FailedOperation.RequestEntityTooLarge"));
    assert!(stack.admin().all_events().await.is_empty());
    let a = stack.admin().wait_idle("acme").await;
    assert_eq!(a["concurrency"]["in_flight"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_timeout_is_504_and_frees_the_slot() {
    let stack = Stack::start(Opts {
        env: vec![("TOLLGATE_BACKEND_TIMEOUT_MS", "200".into())],
        ..Opts::default()
    });
    let key = stack.account_with_key("acme").await;
    let r = stack.task(&key, &[("x-sim-delay-ms", "2000")]).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.error_code(), "FailedOperation.RequestTimeout");
    let a = stack.admin().wait_idle("acme").await;
    assert_eq!(a["concurrency"]["in_flight"], 0);
    assert!(stack.admin().all_events().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_backend_is_502_and_frees_the_slot() {
    let dir = tempfile::tempdir().unwrap();
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gw = common::Gateway::start(
        dir.path(),
        &format!("http://127.0.0.1:{port}"),
        &Opts::default(),
    );
    let http = common::Http::new();
    let admin = common::Admin {
        http: &http,
        base: &gw.admin,
    };
    admin.create_account("acme").await;
    let key = admin.issue_key("acme", None).await.1;
    let auth = format!("Bearer {key}");
    for _ in 0..5 {
        let r = http
            .send(
                Method::POST,
                &format!("{}/v1/x", gw.url),
                &[("authorization", &auth)],
                "{}",
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
        assert_eq!(r.error_code(), "FailedOperation.BackendUnavailable");
    }
    let a = admin.wait_idle("acme").await;
    assert_eq!(a["concurrency"]["in_flight"], 0);
    assert!(admin.all_events().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_and_health_is_open() {
    let stack = Stack::start(Opts::default());
    let key = stack.account_with_key("acme").await;
    let addr = stack.gw.url.trim_start_matches("http://").to_string();
    // Garbage on the wire: hyper answers 400 itself and closes.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"NOT HTTP AT ALL\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        s.read_to_end(&mut answer),
    )
    .await;
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 400"));
    let r = stack
        .http
        .send(Method::GET, &format!("{}/healthz", stack.gw.url), &[], "")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    // The gateway is still serving.
    assert_eq!(stack.task(&key, &[]).await.status, StatusCode::OK);
}
