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
        if let Some((status, _, body)) = common::complete_answer(&buf) {
            return RawAnswer {
                status,
                body: body.to_vec(),
            };
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
            .is_some_and(|c| !c.is_empty()),
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
                &format!("X-Request-Id: d{i}\r\nX-Sim-Delay-Ms: 3000\r\n"),
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

/// Like `raw_exchange`, but writes a large body while reading, so an early
/// answer (a 413 before the body is read) is seen, not a reset.
async fn raw_exchange_streaming(addr: &str, head: String, body: Vec<u8>) -> RawAnswer {
    let addr = addr.trim_start_matches("http://");
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(head.as_bytes()).await;
        let _ = wr.write_all(&body).await;
        wr
    });
    let buf = common::read_one_answer(&mut rd, "a streamed request").await;
    writer.abort();
    let (status, _, body) = common::complete_answer(&buf).expect("read whole");
    RawAnswer {
        status,
        body: body.to_vec(),
    }
}

/// Every admin error is the API's JSON error shape: axum's own 405 and the
/// body limit's 413 included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_405_and_413_are_json_errors() {
    let stack = Stack::start(Opts::default());
    let auth = format!("Bearer {}", common::ADMIN_TOKEN);
    for (method, path) in [
        (Method::GET, "/v1/billing/settle"),
        (Method::PATCH, "/v1/accounts"),
        (Method::DELETE, "/v1/accounts/acme/top-up"),
        (Method::POST, "/metrics"),
    ] {
        let r = stack
            .http
            .send(
                method.clone(),
                &format!("{}{path}", stack.gw.admin),
                &[("authorization", &auth)],
                "",
            )
            .await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_api_error(405, &r.json(), &format!("{method} {path}"));
        assert_eq!(r.error_code(), "UnsupportedOperation.MethodNotAllowed");
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/json")
        );
    }

    let addr = stack.gw.admin.trim_start_matches("http://").to_string();
    let body = {
        let mut b = br#"{"id":""#.to_vec();
        b.extend(std::iter::repeat_n(b'a', 3 << 20));
        b.extend_from_slice(br#""}"#);
        b
    };
    let head = format!(
        "POST /v1/accounts HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let r = raw_exchange_streaming(&stack.gw.admin, head, body).await;
    assert_eq!(r.status, 413);
    assert_api_error(413, &r.json(), "admin 413");
    assert_eq!(r.error_code(), "FailedOperation.RequestEntityTooLarge");
}

/// Admin bodies are JSON objects sent as `application/json`; a top-up
/// amount matches `^[0-9]+(\.[0-9]{1,2})?$` exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_input_is_strict() {
    let stack = Stack::start(Opts::default());
    let admin = stack.admin();
    let auth = format!("Bearer {}", common::ADMIN_TOKEN);
    let url = format!("{}/v1/accounts", stack.gw.admin);

    // Not declared JSON: 415, nothing created.
    for ct in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let mut headers = vec![("authorization", auth.as_str())];
        if let Some(ct) = ct {
            headers.push(("content-type", ct));
        }
        let r = stack
            .http
            .send(Method::POST, &url, &headers, r#"{"id":"typeless"}"#)
            .await;
        assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct:?}");
        assert_api_error(415, &r.json(), "415");
    }
    let r = admin.call(Method::GET, "/v1/accounts/typeless", None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "created without JSON");
    // `application/json; charset=utf-8` is JSON.
    let r = stack
        .http
        .send(
            Method::POST,
            &url,
            &[
                ("authorization", &auth),
                ("content-type", "Application/JSON; charset=utf-8"),
            ],
            r#"{"id":"acme"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());

    // A JSON array (serde would read a struct from it) is not an object.
    for body in [r#"["arr"]"#, r#""arr""#, "null", "42"] {
        let r = stack
            .http
            .send(
                Method::POST,
                &url,
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                ],
                body,
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert_api_error(400, &r.json(), body);
    }
    let r = admin.call(Method::GET, "/v1/accounts/arr", None).await;
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "an array created an account"
    );

    for bad in [" 5", "5 ", "5.", ".5", "+5", "5.001", "1e2", "0"] {
        let r = admin
            .call(
                Method::POST,
                "/v1/accounts/acme/top-up",
                Some(serde_json::json!({ "amount": bad })),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "amount {bad:?}");
        assert_api_error(400, &r.json(), bad);
    }
    for (good, balance) in [("5", "5"), ("5.5", "10.5"), ("0.25", "10.75")] {
        let r = admin
            .call(
                Method::POST,
                "/v1/accounts/acme/top-up",
                Some(serde_json::json!({ "amount": good })),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "amount {good:?}: {:?}", r.json());
        let got: f64 = r.json()["balance_usd"].as_str().unwrap().parse().unwrap();
        assert_eq!(got, balance.parse::<f64>().unwrap());
    }
}

/// True if the server closed the connection (EOF or reset) within `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// The admin listener closes silent, idle keep-alive and half-sent-header
/// connections after `admin.idle_timeout_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_connections_are_closed() {
    let stack = Stack::start(Opts {
        extra_toml: String::new(),
        env: vec![("TOLLGATE_ADMIN_IDLE_TIMEOUT_MS", "800".into())],
    });
    let addr = stack.gw.admin.trim_start_matches("http://").to_string();
    let started = Instant::now();
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    let mut half = TcpStream::connect(&addr).await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut keep_alive = TcpStream::connect(&addr).await.unwrap();
    keep_alive
        .write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = keep_alive.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    for (what, s) in [
        ("silent", &mut silent),
        ("half-sent headers", &mut half),
        ("idle keep-alive", &mut keep_alive),
    ] {
        assert!(
            closed_within(s, Duration::from_secs(5)).await,
            "{what} admin connection still open after 5 s"
        );
    }
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "closed before the timeout"
    );
}

/// Each listener has its own cap: the admin refuses its N+1st connection
/// at once, and the data plane still serves while the admin is full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_connection_cap_refuses_the_next_and_spares_the_data_plane() {
    const CAP: usize = 4;
    let stack = Stack::start(Opts {
        extra_toml: String::new(),
        env: vec![
            ("TOLLGATE_ADMIN_MAX_CONNECTIONS", CAP.to_string()),
            ("TOLLGATE_ADMIN_IDLE_TIMEOUT_MS", "3000".into()),
        ],
    });
    let key = stack.account_with_key("acme").await;
    let refused_before = metric(
        &stack.http,
        &stack.gw.admin,
        r#"tollgate_connections_refused_total{listener="admin"}"#,
    )
    .await;
    let addr = stack.gw.admin.trim_start_matches("http://").to_string();
    // The harness pools its admin connections: wait until the gateway has
    // closed them as idle (3 s), so the cap counts only the ones below.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let mut held = Vec::new();
    for _ in 0..CAP {
        held.push(TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    let mut extra = TcpStream::connect(&addr).await.unwrap();
    let _ = extra
        .write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await;
    assert!(
        closed_within(&mut extra, Duration::from_millis(1500)).await,
        "the connection over the cap was not closed"
    );
    assert!(t0.elapsed() < Duration::from_millis(1500));

    // The data plane is untouched by the admin's exhaustion.
    let client = common::TaskClient {
        http: Http::new(),
        url: stack.gw.url.clone(),
    };
    for _ in 0..3 {
        assert_eq!(client.task(&key, &[]).await.status, StatusCode::OK);
    }

    // Once the held ones time out, the admin serves again, and counted the
    // refusal.
    drop(held);
    let probe = Http::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        match probe
            .try_send(Method::GET, &format!("{}/metrics", stack.gw.admin), &[], "")
            .await
        {
            Ok(r) if r.status == StatusCode::OK => {
                break metric(
                    &probe,
                    &stack.gw.admin,
                    r#"tollgate_connections_refused_total{listener="admin"}"#,
                )
                .await;
            }
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("admin never served again: {:?}", other.err()),
        }
    };
    assert!(refused > refused_before, "the refusal was not counted");
}

/// Bug 2: once the load stops, the SQLite WAL is emptied (it used to keep
/// its peak size for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_is_truncated_once_the_load_stops() {
    let stack = Stack::start(Opts::default());
    let admin = stack.admin();
    let mut keys = Vec::new();
    for i in 0..20 {
        keys.push(stack.account_with_key(&format!("acct-{i}")).await);
    }
    let client = stack.client();
    let load: Vec<_> = (0..600)
        .map(|i| {
            let key = keys[i % keys.len()].clone();
            let client = client.clone();
            tokio::spawn(async move { client.task(&key, &[]).await.status })
        })
        .collect();
    for t in load {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    let wal = stack.gw.data_dir.join("tollgate.db-wal");
    let size = || std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert_eq!(admin.all_events().await.len(), 600);
    let peak = size();
    let deadline = Instant::now() + Duration::from_secs(10);
    while size() > 0 {
        assert!(
            Instant::now() < deadline,
            "the WAL still holds {} bytes 10 s after the load stopped (peak seen {peak})",
            size()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The issue's reproduction: with 256 descriptors, 300 idle admin
/// connections used to stop the data plane from accepting anything. Now the
/// admin's own cap keeps it from taking them all; and when the data plane
/// itself runs out, it backs off and warns at most once a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_neither_starves_the_data_plane_nor_floods_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let sim = common::Simulator::start();
    let gw = common::Gateway::start_via(
        dir.path(),
        &sim.url,
        &Opts::default(),
        &["prlimit", "--nofile=256:256"],
    );
    let http = Http::new();
    let admin = common::Admin {
        http: &http,
        base: &gw.admin,
    };
    admin.create_account("acme").await;
    let key = admin.issue_key("acme", None).await.1;
    let task = |key: String, url: String| async move {
        // A fresh client: a new connection the gateway must accept.
        let client = common::TaskClient {
            http: Http::new(),
            url,
        };
        tokio::time::timeout(Duration::from_secs(5), client.task(&key, &[]))
            .await
            .map(|r| r.status)
    };

    let admin_addr = gw.admin.trim_start_matches("http://").to_string();
    let mut idle_admin = Vec::new();
    for _ in 0..300 {
        if let Ok(s) = TcpStream::connect(&admin_addr).await {
            idle_admin.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        assert_eq!(
            task(key.clone(), gw.url.clone()).await,
            Ok(StatusCode::OK),
            "the data plane stopped accepting while the admin was flooded"
        );
    }
    drop(idle_admin);

    // Now exhaust the descriptors through the data plane itself.
    let data_addr = gw.url.trim_start_matches("http://").to_string();
    let mut idle_data = Vec::new();
    for _ in 0..400 {
        // Once the gateway is out of descriptors it stops accepting, the
        // kernel's backlog fills, and a connect waits for SYN retries.
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(&data_addr)).await
        {
            Ok(Ok(s)) => idle_data.push(s),
            _ => break,
        }
    }
    let warnings = || {
        gw.proc
            .logs()
            .lines()
            .filter(|l| l.contains("accept failed"))
            .count()
    };
    // Out of descriptors for a while: the gateway keeps failing to accept.
    let before = warnings();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let during = warnings() - before;
    assert!(
        during <= 4,
        "{during} accept warnings in 3 s out of descriptors (at most one a second):\n{}",
        gw.proc.logs()
    );
    assert!(
        warnings() >= 1,
        "running out of descriptors was never logged"
    );
    drop(idle_data);
    // Descriptors back: both listeners serve again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if task(key.clone(), gw.url.clone()).await == Ok(StatusCode::OK) {
            break;
        }
        assert!(Instant::now() < deadline, "the data plane never recovered");
    }
    let errors = metric(
        &Http::new(),
        &gw.admin,
        r#"tollgate_accept_errors_total{listener="data"}"#,
    )
    .await;
    assert!(errors > 0.0, "accept errors were not counted");
    let logs = gw.proc.logs();
    assert!(
        logs.contains("suppressed"),
        "no count of held-back warnings"
    );
}

/// A backend that answers every request with `Content-Length: 3000` and
/// only 10 bytes of it, then holds the connection open.
async fn stalling_backend() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3000\r\n\r\n0123456789")
                    .await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_being_read_share_one_budget_and_past_it_nothing_is_charged() {
    let backend = stalling_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = common::Gateway::start(
        dir.path(),
        &backend,
        &Opts {
            extra_toml: "".into(),
            env: vec![
                ("TOLLGATE_BACKEND_MAX_RESPONSE_BYTES", "4096".into()),
                (
                    "TOLLGATE_BACKEND_MAX_BUFFERED_RESPONSE_BYTES",
                    "5000".into(),
                ),
                ("TOLLGATE_BACKEND_TIMEOUT_MS", "3000".into()),
            ],
        },
    );
    let http = Http::new();
    let admin = common::Admin {
        http: &http,
        base: &gw.admin,
    };
    admin.create_account("acme").await;
    let key = admin.issue_key("acme", None).await.1;
    let url = format!("{}/v1/style-transfer", gw.url);
    let auth = format!("Bearer {key}");
    // The first answer books its declared 3,000 bytes while it trickles.
    let first = {
        let (http, url, auth) = (http.clone(), url.clone(), auth.clone());
        tokio::spawn(async move {
            http.send(Method::POST, &url, &[("authorization", &auth)], "{}")
                .await
        })
    };
    wait_for(&admin, "acme", "first in flight", |a| {
        a["concurrency"]["in_flight"] == 1
    })
    .await;
    // In flight counts from the slot; the answer's head (and its booking)
    // comes a moment later: well within the backend timeout of 3 s.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // A second 3,000 would pass the 5,000-byte budget: refused at once,
    // not charged.
    let started = Instant::now();
    let second = http
        .send(Method::POST, &url, &[("authorization", &auth)], "{}")
        .await;
    assert_eq!(second.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(second.error_code(), "FailedOperation.GatewayBusy");
    assert!(started.elapsed() < Duration::from_secs(2));
    // The first ends at the backend timeout, also uncharged; no event.
    assert_eq!(first.await.unwrap().status, StatusCode::GATEWAY_TIMEOUT);
    assert!(admin.all_events().await.is_empty());
    let a = admin.wait_idle("acme").await;
    assert_eq!(a["concurrency"]["in_flight"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_demo_key_stops_working_once_the_demo_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let http = Http::new();
    let auth = format!("Bearer {}", tollgate::config::DEMO_API_KEY);
    // First `tollgate serve` with no config: the demo answers.
    let mut demo = common::Gateway::start_defaults(
        dir.path(),
        &[
            ("TOLLGATE_SIMULATOR_LATENCY_MS", "0".into()),
            ("TOLLGATE_SIMULATOR_LATENCY_JITTER_MS", "0".into()),
        ],
    );
    let url = format!("{}/v1/style-transfer", demo.url);
    let r = http
        .send(Method::POST, &url, &[("authorization", &auth)], "{}")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    demo.proc.kill9();
    // Then a real backend in the same directory, demo off.
    let sim = common::Simulator::start();
    let real = common::Gateway::start(dir.path(), &sim.url, &Opts::default());
    let url = format!("{}/v1/style-transfer", real.url);
    let r = http
        .send(Method::POST, &url, &[("authorization", &auth)], "{}")
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    real.proc.wait_log("public demo key was revoked", 1).await;
    let stats = sim.stats(&http).await;
    assert!(stats["accounts"]["demo"].is_null(), "{stats}");
}

/// `tollgate serve --config <path>`, which must refuse to start.
fn refused_start(config: &std::path::Path) -> (Option<i32>, String) {
    common::refused_start(
        std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["serve", "--config"])
            .arg(config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_data_directory_serves_one_process_and_ports_come_before_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let sim = common::Simulator::start();
    // Three data-plane workers: three sockets on the port with
    // SO_REUSEPORT, which another gateway setting it too must not join.
    let workers = Opts {
        env: vec![("TOLLGATE_SERVER_WORKERS", "3".into())],
        ..Opts::default()
    };
    let first = common::Gateway::start(dir.path(), &sim.url, &workers);
    // The same directory again (its own free ports): refused, exit 2.
    let (code, stderr) = refused_start(&first.config_path);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("in use by another tollgate"), "{stderr}");
    // The first still serves.
    let r = Http::new()
        .send(Method::GET, &format!("{}/healthz", first.url), &[], "")
        .await;
    assert_eq!(r.status, StatusCode::OK);

    // A port already taken: refused before the store is touched (no
    // database is created in the new directory).
    let other = tempfile::tempdir().unwrap();
    let data_dir = other.path().join("data");
    let taken = first.url.trim_start_matches("http://");
    let config = other.path().join("tollgate.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"{taken}\"\nworkers = 3\n[admin]\nlisten = \"127.0.0.1:0\"\n[backend]\nurl = \"{}\"\n[storage]\ndata_dir = \"{}\"\n",
            sim.url,
            data_dir.display()
        ),
    )
    .unwrap();
    let (code, stderr) = refused_start(&config);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("cannot listen"), "{stderr}");
    assert!(
        !data_dir.join("tollgate.db").exists(),
        "the store was opened before the ports were bound"
    );
}
