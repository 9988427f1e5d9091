//! Hostile input and resource exhaustion (issue 11) against the real binary:
//! what is not a task never reaches the backend and is never charged, the
//! gateway's own headers cannot be forged, every task ends in exactly one
//! outcome count, and the listeners defend themselves.

mod common;

use std::time::{Duration, Instant};

use common::{Http, Opts, Stack, raw_task, wait_for};
use http::{Method, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An answer read off a raw socket: status and body.
struct RawAnswer {
    status: u16,
    body: Vec<u8>,
}

impl RawAnswer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    fn error_code(&self) -> String {
        self.json()["Response"]["Error"]["Code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

/// Sends `request` as is on a new connection and reads one answer (head and
/// `Content-Length` body), bounded in time.
async fn raw_exchange(addr: &str, request: &str) -> RawAnswer {
    let addr = addr.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                return RawAnswer {
                    status,
                    body: buf[end + 4..end + 4 + len].to_vec(),
                };
            }
        }
        let mut chunk = [0u8; 4096];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Err(_) => {
                panic!(
                    "no whole answer to {request:?}; got {:?}",
                    String::from_utf8_lossy(&buf)
                )
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => panic!("reading the answer failed: {e}"),
        }
    }
}

/// Backend requests the simulator has seen, over all accounts.
async fn backend_requests(stack: &Stack) -> u64 {
    let stats = stack.sim.stats(&stack.http).await;
    stats["accounts"]
        .as_object()
        .map(|a| {
            a.values()
                .map(|p| p["requests"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

/// One sample of the admin's `/metrics`, by its exact series name
/// (`name{labels}`); 0 when the series is absent.
async fn metric(http: &Http, admin: &str, series: &str) -> f64 {
    let r = http
        .send(Method::GET, &format!("{admin}/metrics"), &[], "")
        .await;
    let text = String::from_utf8_lossy(&r.body).to_string();
    text.lines()
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}

async fn requests_total(http: &Http, admin: &str) -> f64 {
    let mut sum = 0.0;
    for o in ["success", "failure", "rejected", "error"] {
        sum += metric(
            http,
            admin,
            &format!("tollgate_requests_total{{outcome=\"{o}\"}}"),
        )
        .await;
    }
    sum
}

fn assert_api_error(status: u16, body: &Value, what: &str) {
    assert!(
        body["Response"]["Error"]["Code"]
            .as_str()
            .is_some_and(|c| c.contains('.')),
        "{what}: {status} without an API 3.0 error: {body}"
    );
    assert!(
        body["Response"]["RequestId"].is_string(),
        "{what}: no RequestId: {body}"
    );
}

/// Bug 1: `OPTIONS *`, `CONNECT`, `TRACE` and upgrade requests are not tasks:
/// each gets a JSON error, nothing reaches the backend, nothing is reserved
/// or charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_are_not_tasks_never_reach_the_backend_nor_are_charged() {
    let stack = Stack::start(Opts::default());
    let admin = stack.admin();
    // Postpaid off: the 50 free units show any unit taken and not given back.
    admin.create_plain_account("acme").await;
    let key = admin.issue_key("acme", None).await.1;
    let addr = stack.gw.url.trim_start_matches("http://").to_string();
    let auth = format!("Authorization: Bearer {key}\r\n");

    let cases = [
        (
            "OPTIONS *",
            format!("OPTIONS * HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\n\r\n"),
            405,
        ),
        (
            "CONNECT",
            format!("CONNECT {addr} HTTP/1.1\r\nHost: {addr}\r\n{auth}\r\n"),
            405,
        ),
        (
            "TRACE",
            format!("TRACE /x HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\n\r\n"),
            405,
        ),
        (
            "websocket upgrade",
            format!(
                "POST /v1/style-transfer HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nContent-Length: 2\r\n\r\n{{}}"
            ),
            400,
        ),
    ];
    for (what, request, status) in cases {
        let answer = raw_exchange(&stack.gw.url, &request).await;
        assert_eq!(answer.status, status, "{what}: {:?}", answer.json());
        assert_api_error(answer.status, &answer.json(), what);
        if status == 405 {
            assert_eq!(answer.error_code(), "UnsupportedOperation.MethodNotAllowed");
        }
    }
    assert_eq!(
        backend_requests(&stack).await,
        0,
        "a request that is not a task reached the backend"
    );
    let account = admin.wait_idle("acme").await;
    assert_eq!(
        account["remaining_units"], 50,
        "a unit was taken: {account}"
    );
    assert!(admin.all_events().await.is_empty(), "something was charged");

    // A real task still goes through on the same gateway.
    let ok = stack.task(&key, &[]).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(admin.account("acme").await["remaining_units"], 49);
}

/// Bug 1, the backend side: a backend answering `101 Switching Protocols`
/// never gets the client's connection; the task fails (502, JSON) and is
/// not charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_protocol_switch_is_a_502_and_not_charged() {
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_url = format!("http://{}", backend.local_addr().unwrap());
    let switches = tokio::spawn(async move {
        let mut served = 0u32;
        while let Ok((mut s, _)) = backend.accept().await {
            served += 1;
            tokio::spawn(async move {
                // Read the request head, answer a protocol switch, and keep
                // the connection open as a tunnel would.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
                    )
                    .await;
                let _ = s.write_all(b"tunnelled bytes").await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            });
            if served > 100 {
                break;
            }
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let gw = common::Gateway::start(dir.path(), &backend_url, &Opts::default());
    let http = Http::new();
    let admin = common::Admin {
        http: &http,
        base: &gw.admin,
    };
    admin.create_plain_account("acme").await;
    let key = admin.issue_key("acme", None).await.1;
    let client = common::TaskClient {
        http: http.clone(),
        url: gw.url.clone(),
    };
    let r = client.task(&key, &[]).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{:?}", r.body);
    assert_eq!(r.error_code(), "FailedOperation.BackendUnavailable");
    assert!(
        !String::from_utf8_lossy(&r.body).contains("tunnelled"),
        "backend bytes reached the client"
    );
    let account = admin.wait_idle("acme").await;
    assert_eq!(account["remaining_units"], 50, "charged: {account}");
    assert!(admin.all_events().await.is_empty());
    switches.abort();
}

/// Bug 4: every `X-Tollgate-*` header is the gateway's own; a client's never
/// reaches the backend, and the account headers are the authenticated ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sent_x_tollgate_headers_never_reach_the_backend() {
    let stack = Stack::start(Opts::default());
    let key = stack.account_with_key("acme").await;
    let r = stack
        .task(
            &key,
            &[
                ("x-sim-echo", "1"),
                ("x-tollgate-charged-to", "free"),
                ("x-tollgate-anything", "forged"),
                ("X-Tollgate-Account", "someone-else"),
                ("x-tollgate-sub-account", "someone-else-dev"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let headers = r.json()["Response"]["Echo"]["Headers"].clone();
    assert!(headers.is_object(), "no echo: {}", r.json());
    let tollgate: Vec<(&String, &Value)> = headers
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("x-tollgate-"))
        .collect();
    for (name, value) in &tollgate {
        assert!(
            *name == "x-tollgate-account" || *name == "x-tollgate-sub-account",
            "client header {name}: {value} reached the backend"
        );
    }
    assert_eq!(headers["x-tollgate-account"], "acme");
    assert_eq!(headers["x-tollgate-sub-account"], "");
    let events = stack.admin().all_events().await;
    assert_eq!(events.len(), 1);
    assert_ne!(events[0]["data"]["charged_to"], "free-forged");
}

/// Bug 5, queued side: clients that sent their whole request and hang up
/// while queued each count once, as `FailedOperation.ClientGone`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_clients_that_hang_up_are_counted_once_each() {
    let stack = Stack::start(Opts::default());
    let admin = stack.admin();
    let key = stack.account_with_key("acme").await;
    let (http, base) = (&stack.http, stack.gw.admin.as_str());
    let gone = r#"tollgate_rejections_total{code="FailedOperation.ClientGone"}"#;
    let gone_before = metric(http, base, gone).await;
    let total_before = requests_total(http, base).await;

    let held = stack.hold_slots("acme", &key, 3, 1500).await;
    const N: u64 = 7;
    let mut sockets = Vec::new();
    for i in 0..N {
        sockets.push(
            raw_task(
                &stack.gw.url,
                &key,
                &format!("X-Request-Id: q{i}\r\n"),
                r#"{"InputImage":"x"}"#,
            )
            .await,
        );
    }
    wait_for(&admin, "acme", "all queued", |a| {
        a["concurrency"]["queued"] == N
    })
    .await;
    drop(sockets);
    wait_for(&admin, "acme", "queue emptied", |a| {
        a["concurrency"]["queued"] == 0
    })
    .await;
    for h in held {
        assert_eq!(h.await.unwrap().status, StatusCode::OK);
    }
    admin.wait_idle("acme").await;

    // The counters move after the queue empties; give them a bounded moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let gone_now = metric(http, base, gone).await - gone_before;
        let total_now = requests_total(http, base).await - total_before;
        if (gone_now == N as f64 && total_now == (N + 3) as f64) || Instant::now() > deadline {
            assert_eq!(gone_now, N as f64, "ClientGone rejections");
            assert_eq!(total_now, (N + 3) as f64, "requests: N gone + 3 held");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Bug 5, detached side: successes recorded after their client left are
/// counted, so successes in the metrics equal the usage events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn successes_after_the_client_left_are_counted() {
    let stack = Stack::start(Opts::default());
    let admin = stack.admin();
    let key = stack.account_with_key("acme").await;
    let (http, base) = (&stack.http, stack.gw.admin.as_str());
    // One ordinary success first, so the series exists.
    assert_eq!(stack.task(&key, &[]).await.status, StatusCode::OK);

    let mut sockets = Vec::new();
    for i in 0..3 {
        sockets.push(
            raw_task(
                &stack.gw.url,
                &key,
                &format!("X-Request-Id: d{i}\r\nX-Sim-Delay-Ms: 600\r\n"),
                r#"{"InputImage":"x"}"#,
            )
            .await,
        );
    }
    wait_for(&admin, "acme", "3 at the backend", |a| {
        a["concurrency"]["in_flight"] == 3
    })
    .await;
    drop(sockets);
    admin.wait_idle("acme").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = admin.all_events().await;
        let gone = events
            .iter()
            .filter(|e| e["data"]["client_gone"] == true)
            .count();
        let successes = metric(http, base, r#"tollgate_requests_total{outcome="success"}"#).await;
        if (events.len() == 4 && successes == 4.0) || Instant::now() > deadline {
            assert_eq!(events.len(), 4, "every detached task succeeded");
            assert_eq!(gone, 3, "three were recorded after their client left");
            assert_eq!(successes, events.len() as f64, "success count = events");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// RFC 9110: the auth scheme is case-insensitive, on both listeners.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive_on_both_listeners() {
    let stack = Stack::start(Opts::default());
    let key = stack.account_with_key("acme").await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let auth = format!("{scheme} {key}");
        let r = stack
            .http
            .send(
                Method::POST,
                &format!("{}/v1/style-transfer", stack.gw.url),
                &[("authorization", &auth)],
                r#"{"InputImage":"x"}"#,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "data plane, {scheme}");
        let auth = format!("{scheme} {}", common::ADMIN_TOKEN);
        let r = stack
            .http
            .send(
                Method::GET,
                &format!("{}/v1/accounts/acme", stack.gw.admin),
                &[("authorization", &auth)],
                "",
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "admin, {scheme}");
    }
    // Another scheme is still refused.
    let r = stack
        .http
        .send(
            Method::GET,
            &format!("{}/v1/accounts/acme", stack.gw.admin),
            &[("authorization", &format!("Basic {}", common::ADMIN_TOKEN))],
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

/// A revoked key's queued tasks are refused at once (401), never reach the
/// backend and are never charged; tasks already at the backend finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_keys_queued_tasks_never_run_nor_are_charged() {
    let stack = Stack::start(Opts::default());
    let admin = stack.admin();
    admin.create_account("acme").await;
    let holder = admin.issue_key("acme", None).await.1;
    let (doomed_id, doomed) = admin.issue_key("acme", None).await;
    let held = stack.hold_slots("acme", &holder, 3, 1500).await;
    let client = stack.client();
    let queued: Vec<_> = (0..6)
        .map(|i| client.spawn(&doomed, 0, &format!("revoked-{i}")))
        .collect();
    wait_for(&admin, "acme", "6 queued", |a| {
        a["concurrency"]["queued"] == 6
    })
    .await;
    let revoked_at = Instant::now();
    let r = admin
        .call(Method::DELETE, &format!("/v1/keys/{doomed_id}"), None)
        .await;
    assert!(r.status.is_success(), "revoke: {:?}", r.json());
    for q in queued {
        let r = q.await.unwrap();
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{:?}", r.json());
        assert_eq!(r.error_code(), "AuthFailure.InvalidAuthorization");
    }
    assert!(
        revoked_at.elapsed() < Duration::from_millis(1000),
        "the queued tasks waited for a slot instead of being refused at once"
    );
    for h in held {
        assert_eq!(h.await.unwrap().status, StatusCode::OK);
    }
    admin.wait_idle("acme").await;
    let stats = stack.sim.stats(&stack.http).await;
    let arrivals = stats["accounts"]["acme"]["arrivals"].to_string();
    assert!(
        !arrivals.contains("revoked-"),
        "a revoked task reached the backend: {arrivals}"
    );
    let events = admin.all_events().await;
    assert_eq!(events.len(), 3, "only the held tasks are charged");
    assert!(
        events
            .iter()
            .all(|e| !e["data"]["request_id"].to_string().contains("revoked-"))
    );
}
