//! Request hygiene (issue 21, items 4 to 6) against the real binary over
//! raw sockets: the forwarded path never leaves `backend.url`'s prefix, the
//! backend sees exactly one framing, and the requests hyper's parser used to
//! answer itself with an empty body get the JSON error with a code, and
//! their connection is closed after it. None of them is forwarded or
//! charged.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Http, Opts, Simulator, Stack};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One answer read off a raw socket.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    fn code(&self) -> String {
        self.json()["Response"]["Error"]["Code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

/// Sends `bytes` on a new connection (written by a task of its own, so a
/// server that answers before reading all of it is seen) and reads until
/// the server closes, bounded in time: the answers in order, and whether
/// the connection was closed.
async fn exchange(addr: &str, bytes: Vec<u8>) -> (Vec<Answer>, bool) {
    let addr = addr.trim_start_matches("http://");
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&bytes).await;
        // Keep the write side open: hyper drops a request whose client
        // half-closes.
        tokio::time::sleep(Duration::from_secs(15)).await;
        drop(wr);
    });
    let mut raw = Vec::new();
    let mut chunk = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(10);
    let closed = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rd.read(&mut chunk)).await {
            Ok(Ok(0)) => break true,
            Ok(Ok(n)) => raw.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => panic!("reading failed (a reset before the answer?): {e}"),
            Err(_) => break false,
        }
    };
    writer.abort();
    let mut answers = Vec::new();
    let mut rest = &raw[..];
    while let Some((status, head, body)) = common::complete_answer(rest) {
        let used = rest.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4 + body.len();
        answers.push(Answer {
            status,
            head,
            body: body.to_vec(),
        });
        rest = &rest[used..];
    }
    (answers, closed)
}

/// One request on its own connection, answered once (the connection may
/// stay open).
async fn one(addr: &str, request: String) -> Answer {
    let addr = addr.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let raw = common::read_one_answer(&mut s, &format!("{request:?}")).await;
    let (status, head, body) = common::complete_answer(&raw).expect("read whole");
    Answer {
        status,
        head,
        body: body.to_vec(),
    }
}

/// Item 4: the backend gets the normalised path under `backend.url`'s
/// prefix, the query untouched; a path that climbs above the root (plain
/// or percent-encoded) or could be made to is `400
/// InvalidParameter.InvalidPath`, forwarded nowhere and not charged. On the
/// API 3.0 front the signature is over the path as the client sent it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_sees_the_normalised_path_under_its_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start();
    let gw = common::Gateway::start(
        dir.path(),
        &format!("{}/base", sim.url),
        &Opts {
            env: vec![("TOLLGATE_AUTH_SECRET_ENCRYPTION_KEY", "5f".repeat(32))],
            ..Opts::default()
        },
    );
    let http = Http::new();
    let admin = common::Admin {
        http: &http,
        base: &gw.admin,
    };
    admin.create_plain_account("acme").await;
    let key = admin.issue_key("acme", None).await.1;
    let get = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nX-Sim-Echo: 1\r\n\r\n"
        )
    };

    let forwarded = [
        (
            "/a/./b/../c?q=%2e%2e/../x&y=//z",
            "/base/a/c?q=%2e%2e/../x&y=//z",
        ),
        ("//evil.example/x", "/base/evil.example/x"),
        ("/v1/%2E/style-transfer/", "/base/v1/style-transfer/"),
        ("/a/%2e%2E/b", "/base/b"),
        ("/a/b/..", "/base/a/"),
        ("/", "/base/"),
    ];
    for (sent, seen) in forwarded {
        let r = one(&gw.url, get(sent)).await;
        assert_eq!(
            r.status,
            200,
            "{sent}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["Response"]["Echo"]["Path"], seen, "{sent}");
    }

    let refused = [
        "/../../etc/passwd",
        "/a/../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/%2E%2e/etc",
        "/a/.%2E/%2e./etc",
        "/..%2f..%2fetc%2fpasswd",
        "/a%5c..%5c..%5cetc",
        "/..;/etc",
    ];
    for sent in refused {
        let r = one(&gw.url, get(sent)).await;
        assert_eq!(
            r.status,
            400,
            "{sent}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.code(), "InvalidParameter.InvalidPath", "{sent}");
        assert!(r.head.contains("x-request-id:"), "{sent}: {}", r.head);
    }

    // API 3.0: signed over the path as sent, forwarded normalised.
    let r = admin
        .call(
            http::Method::POST,
            "/v1/accounts/acme/keys",
            Some(serde_json::json!({"type": "tc3"})),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.json());
    let pair = r.json();
    let host = gw.url.trim_start_matches("http://").to_string();
    let signed = |path: &str| {
        let body = r#"{"Style":"201"}"#;
        let ts = jiff::Timestamp::now().as_second().to_string();
        let mut headers = http::HeaderMap::new();
        headers.insert("content-type", "application/json".parse().unwrap());
        headers.insert("host", host.parse().unwrap());
        let auth = tollgate::auth::tc3::sign(
            pair["secret_id"].as_str().unwrap(),
            pair["secret_key"].as_str().unwrap(),
            "aiart",
            &tollgate::auth::tc3::SignedRequest {
                method: "POST",
                path,
                query: "",
                headers: &headers,
                body: body.as_bytes(),
                timestamp: &ts,
            },
        )
        .unwrap();
        format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nAuthorization: {auth}\r\nX-TC-Action: ImageToImage\r\nX-TC-Version: 2022-12-29\r\nX-TC-Timestamp: {ts}\r\nX-Sim-Echo: 1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let r = one(&gw.url, signed("/x/./y/../z")).await;
    assert_eq!(r.status, 200);
    assert!(r.json()["Response"]["Error"].is_null(), "{:?}", r.json());
    assert_eq!(r.json()["Response"]["Echo"]["Path"], "/base/x/z");
    let r = one(&gw.url, signed("/x/../../etc")).await;
    // The API 3.0 front's way: HTTP 200 with the code.
    assert_eq!(r.status, 200);
    assert_eq!(r.code(), "InvalidParameter.InvalidPath");

    // Only the forwarded ones reached the backend and were charged.
    let ok = forwarded.len() as u64 + 1;
    let stats = common::Simulator::stats(&sim, &http).await;
    assert_eq!(stats["accounts"]["acme"]["requests"], ok, "{stats}");
    let account = admin.wait_idle("acme").await;
    assert_eq!(account["remaining_units"], 50 - ok, "{account}");
    assert_eq!(admin.all_events().await.len() as u64, ok);
}

/// What a backend received, one request each: the raw head and the body
/// as it came on the wire.
type Recorded = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A backend that records the raw bytes of every request and answers each
/// `200 {"Response":{…}}`, keeping the connection alive.
async fn recording_backend() -> (String, Recorded) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen: Recorded = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    // The head.
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    buf.drain(..end);
                    let length: Option<usize> = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok());
                    let chunked = head.contains("transfer-encoding: chunked");
                    // The body, by the framing the head declares.
                    let body_len = loop {
                        let have = if chunked {
                            buf.windows(5)
                                .position(|w| w == b"0\r\n\r\n")
                                .map(|i| i + 5)
                        } else {
                            let n = length.unwrap_or(0);
                            (buf.len() >= n).then_some(n)
                        };
                        if let Some(n) = have {
                            break n;
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let body: Vec<u8> = buf.drain(..body_len).collect();
                    record.lock().unwrap().push((head, body));
                    let answer = br#"{"Response":{"RequestId":"r"}}"#;
                    let out = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                        answer.len()
                    );
                    if s.write_all(out.as_bytes()).await.is_err()
                        || s.write_all(answer).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (url, seen)
}

fn count_lines(head: &str, name: &str) -> usize {
    head.lines().filter(|l| l.starts_with(name)).count()
}

/// Item 5: a request with both `Content-Length` and `Transfer-Encoding:
/// chunked` (either order) is `400 InvalidParameter.MalformedRequest`,
/// forwarded nowhere, not charged, and its connection closed after the
/// answer. Every request that is forwarded reaches the backend with
/// exactly one framing (or none without a body), never both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_sees_exactly_one_framing() {
    let (backend, seen) = recording_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = common::Gateway::start(dir.path(), &backend, &Opts::default());
    let http = Http::new();
    let admin = common::Admin {
        http: &http,
        base: &gw.admin,
    };
    admin.create_plain_account("acme").await;
    let key = admin.issue_key("acme", None).await.1;
    let head = |framing: &str| {
        format!("POST /t HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n{framing}\r\n")
    };

    for both in [
        "Content-Length: 20\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 20\r\n",
    ] {
        let mut req = head(both).into_bytes();
        req.extend_from_slice(b"5\r\nhello\r\n0\r\n\r\n");
        // A second request behind it on the same connection never runs.
        req.extend_from_slice(head("Content-Length: 5\r\n").as_bytes());
        req.extend_from_slice(b"hello");
        let (answers, closed) = exchange(&gw.url, req).await;
        assert_eq!(answers.len(), 1, "{answers:?}");
        assert_eq!(answers[0].status, 400);
        assert_eq!(answers[0].code(), "InvalidParameter.MalformedRequest");
        assert!(
            answers[0].head.contains("connection: close"),
            "{}",
            answers[0].head
        );
        assert!(closed, "the connection stayed open after the refusal");
    }
    assert!(
        seen.lock().unwrap().is_empty(),
        "a refused request was forwarded"
    );

    // Content-Length only, chunked only, no body: one keep-alive connection.
    let mut reqs = head("Content-Length: 5\r\n").into_bytes();
    reqs.extend_from_slice(b"hello");
    reqs.extend_from_slice(head("Transfer-Encoding: chunked\r\n").as_bytes());
    reqs.extend_from_slice(b"3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n");
    reqs.extend_from_slice(
        format!(
            "GET /t HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    let (answers, _) = exchange(&gw.url, reqs).await;
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [200, 200, 200], "{answers:?}");

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    for (head, body) in &seen {
        let lengths = count_lines(head, "content-length:");
        let chunked = count_lines(head, "transfer-encoding:");
        assert!(
            lengths + chunked <= 1,
            "two framings reached the backend:\n{head}"
        );
        if head.starts_with("post") {
            assert_eq!(lengths + chunked, 1, "no framing:\n{head}");
        }
        if lengths == 1 {
            assert_eq!(body, b"hello", "{head}");
        }
        if chunked == 1 {
            assert!(head.contains("transfer-encoding: chunked"), "{head}");
            let text = String::from_utf8_lossy(body);
            let data: String = text
                .split("\r\n")
                .collect::<Vec<_>>()
                .chunks(2)
                .filter_map(|c| c.get(1).copied())
                .collect();
            assert_eq!(data, "hello", "{text:?}");
        }
    }
    assert!(seen[0].0.contains("content-length: 5"), "{}", seen[0].0);
    assert!(seen[2].0.starts_with("get "), "{}", seen[2].0);
    let account = admin.wait_idle("acme").await;
    assert_eq!(account["remaining_units"], 47, "{account}");
}

/// Item 6: the heads hyper used to answer with an empty `400`/`414`/`431`
/// get the JSON error with a code (and a request id), on both listeners;
/// the connection is closed after the answer, and the client reads it
/// (not a reset), even one still sending a 500 KB header. Nothing is
/// forwarded or charged. A good request pipelined before a refused one
/// gets its own answer first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_heads_get_the_json_error_and_the_connection_closes() {
    let stack = Stack::start(Opts::default());
    let admin = stack.admin();
    admin.create_plain_account("acme").await;
    let key = admin.issue_key("acme", None).await.1;
    let auth = format!("Authorization: Bearer {key}\r\n");
    let many_headers: String = (0..2000).map(|i| format!("X-H-{i}: v\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "two different Content-Length values",
            format!("POST /t HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 2\r\nContent-Length: 3\r\n\r\nabc").into_bytes(),
            400,
            "InvalidParameter.MalformedRequest",
        ),
        (
            "two equal Content-Length values",
            format!("POST /t HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc").into_bytes(),
            400,
            "InvalidParameter.MalformedRequest",
        ),
        (
            "a Content-Length that is not a number",
            format!("POST /t HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 3x\r\n\r\nabc").into_bytes(),
            400,
            "InvalidParameter.MalformedRequest",
        ),
        (
            "a header line without a colon",
            format!("POST /t HTTP/1.1\r\nHost: x\r\n{auth}not a header\r\n\r\n").into_bytes(),
            400,
            "InvalidParameter.MalformedRequest",
        ),
        (
            "a 500 KB header",
            format!("POST /t HTTP/1.1\r\nHost: x\r\n{auth}X-Big: {}\r\n\r\n", "a".repeat(500_000)).into_bytes(),
            431,
            "InvalidParameter.HeaderTooLarge",
        ),
        (
            "2,000 headers",
            format!("POST /t HTTP/1.1\r\nHost: x\r\n{auth}{many_headers}\r\n").into_bytes(),
            431,
            "InvalidParameter.HeaderTooLarge",
        ),
        (
            "a 70 KB request target",
            format!("GET /{} HTTP/1.1\r\nHost: x\r\n{auth}\r\n", "a".repeat(70_000)).into_bytes(),
            414,
            "InvalidParameter.UriTooLong",
        ),
    ];
    let check = |what: &str, answers: &[Answer], closed: bool, status: u16, code: &str| {
        let a = answers
            .last()
            .unwrap_or_else(|| panic!("{what}: no answer"));
        assert_eq!(a.status, status, "{what}: {a:?}");
        assert_eq!(a.code(), code, "{what}: {a:?}");
        assert!(
            a.json()["Response"]["RequestId"].is_string(),
            "{what}: {a:?}"
        );
        assert!(
            a.head.contains("content-type: application/json"),
            "{what}: {}",
            a.head
        );
        assert!(a.head.contains("connection: close"), "{what}: {}", a.head);
        assert!(closed, "{what}: the connection stayed open");
    };
    for (what, bytes, status, code) in &cases {
        let (answers, closed) = exchange(&stack.gw.url, bytes.clone()).await;
        assert_eq!(answers.len(), 1, "{what}: {answers:?}");
        check(what, &answers, closed, *status, code);
        assert!(answers[0].head.contains("x-request-id:"), "{what}");
    }

    // Pipelined behind a good request: its answer first, then the refusal.
    let mut pipelined =
        format!("POST /t HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 2\r\n\r\n{{}}").into_bytes();
    pipelined.extend_from_slice(&cases[0].1);
    let (answers, closed) = exchange(&stack.gw.url, pipelined).await;
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert_eq!(answers[0].status, 200, "{answers:?}");
    check(
        "pipelined",
        &answers,
        closed,
        400,
        "InvalidParameter.MalformedRequest",
    );

    // The admin listener answers them the same way.
    for (what, bytes, status, code) in [&cases[0], &cases[4], &cases[6]] {
        let (answers, closed) = exchange(&stack.gw.admin, bytes.clone()).await;
        check(&format!("admin: {what}"), &answers, closed, *status, code);
    }

    // Only the good pipelined task reached the backend and was charged.
    let stats = stack.sim.stats(&stack.http).await;
    assert_eq!(stats["accounts"]["acme"]["requests"], 1, "{stats}");
    let account = admin.wait_idle("acme").await;
    assert_eq!(account["remaining_units"], 49, "{account}");
    // The gateway is fine afterwards.
    assert_eq!(stack.task(&key, &[]).await.status, 200);
}
