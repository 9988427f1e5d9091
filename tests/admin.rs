//! The admin API's guard and its answers to bad input, secrets kept out of
//! logs and metrics, the metrics format, and bad config files.

mod common;

use std::process::Command;

use common::{ADMIN_TOKEN, Opts, Stack};
use http::{Method, StatusCode};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_needs_the_token_and_health_does_not() {
    let stack = Stack::start(Opts::default());
    let url = |p: &str| format!("{}{p}", stack.gw.admin);
    for auth in [
        None,
        Some("Bearer wrong-token-wrong-token"),
        Some("Basic abc"),
        Some(ADMIN_TOKEN),
    ] {
        let headers: Vec<(&str, &str)> =
            auth.map(|a| vec![("authorization", a)]).unwrap_or_default();
        let r = stack
            .http
            .send(
                Method::POST,
                &url("/v1/accounts"),
                &headers,
                json!({"id": "acme"}).to_string(),
            )
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{auth:?}");
        assert_eq!(r.error_code(), "AuthFailure.InvalidAuthorization");
    }
    assert_eq!(
        stack
            .admin()
            .call(Method::GET, "/v1/accounts/acme", None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    for open in ["/metrics", "/healthz", "/readyz"] {
        let r = stack.http.send(Method::GET, &url(open), &[], "").await;
        assert_eq!(r.status, StatusCode::OK, "{open}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_admin_input_gets_a_clear_error_and_changes_nothing() {
    let stack = Stack::start(Opts::default());
    let admin = stack.admin();
    admin.create_account("acme").await;
    let cases: Vec<(Method, &str, Option<&str>, StatusCode)> = vec![
        (
            Method::POST,
            "/v1/accounts",
            Some(r#"{"id": "bad id"}"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v1/accounts",
            Some(r#"{"id": ""}"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v1/accounts",
            Some(r#"{"id": 7}"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v1/accounts",
            Some(r#"{"id": "x", "extra": 1}"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v1/accounts",
            Some(r#"{"id": "#),
            StatusCode::BAD_REQUEST,
        ),
        (Method::POST, "/v1/accounts", None, StatusCode::BAD_REQUEST),
        (
            Method::POST,
            "/v1/accounts",
            Some(r#"{"id": "acme"}"#),
            StatusCode::CONFLICT,
        ),
        (
            Method::GET,
            "/v1/accounts/nobody",
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            "/v1/accounts/nobody/sub-accounts",
            Some(r#"{"id": "s"}"#),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            "/v1/accounts/acme/sub-accounts",
            Some(r#"{"id": "s", "max_concurrency": 0}"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v1/accounts/acme/sub-accounts",
            Some(r#"{"id": "s", "max_concurrency": 99}"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v1/accounts/acme/sub-accounts",
            Some(r#"{"id": "acme"}"#),
            StatusCode::CONFLICT,
        ),
        (
            Method::POST,
            "/v1/accounts/acme/keys",
            Some(r#"{"sub_account": "ghost"}"#),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            "/v1/accounts/nobody/keys",
            Some("{}"),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::DELETE,
            "/v1/keys/key_nope",
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            "/v1/accounts/nobody/deactivate",
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            "/v1/usage-events?after=abc",
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/v1/usage-events?limit=0",
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/v1/usage-events?limit=100000",
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/v1/usage-events?cursor=1",
            None,
            StatusCode::BAD_REQUEST,
        ),
        (Method::GET, "/v1/nothing-here", None, StatusCode::NOT_FOUND),
    ];
    for (method, path, body, want) in cases {
        // Declared JSON: what is checked here is the content (an
        // undeclared body is a 415, see tests/hardening.rs).
        let r = stack
            .admin()
            .call_raw(method.clone(), path, body.unwrap_or("").to_string())
            .await;
        assert_eq!(r.status, want, "{method} {path} {body:?}: {:?}", r.json());
        let v = r.json();
        let code = v["Response"]["Error"]["Code"].as_str().unwrap_or("");
        let message = v["Response"]["Error"]["Message"].as_str().unwrap_or("");
        assert!(
            !code.is_empty() && !message.is_empty(),
            "{path}: error shape {v}"
        );
    }
    // Nothing half-made: acme has no sub-accounts, no other account exists.
    let a = admin.account("acme").await;
    assert_eq!(a["sub_accounts"], json!([]));
    assert_eq!(
        admin.call(Method::GET, "/v1/accounts/x", None).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        admin.call(Method::GET, "/v1/accounts/s", None).await.status,
        StatusCode::NOT_FOUND
    );
}

/// The error message of an answer.
fn message(r: &common::Resp) -> String {
    r.json()["Response"]["Error"]["Message"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_with_a_repeated_key_is_refused_naming_it_and_changes_nothing() {
    let stack = Stack::start(Opts::default());
    let admin = stack.admin();
    admin.create_plain_account("acme").await;
    let cases = [
        ("/v1/accounts", r#"{"id":"a","id":"b"}"#, "id"),
        ("/v1/accounts", r#"{"id":"c","id":"c"}"#, "id"),
        // Nested: refused for the repeat (before the unknown field).
        ("/v1/accounts", r#"{"id":"d","x":{"k":1,"k":2}}"#, "k"),
        (
            "/v1/accounts/acme/sub-accounts",
            r#"{"id":"s","max_concurrency":1,"max_concurrency":2}"#,
            "max_concurrency",
        ),
        (
            "/v1/accounts/acme/keys",
            r#"{"type":"api_key","type":"tc3"}"#,
            "type",
        ),
        (
            "/v1/accounts/acme/top-up",
            r#"{"amount":"5","amount":"6"}"#,
            "amount",
        ),
        (
            "/v1/accounts/acme/resource-packages",
            r#"{"size":1000,"size":10000}"#,
            "size",
        ),
        (
            "/v1/accounts/acme/concurrency-packages",
            r#"{"units":1,"units":2,"period":"daily","start":"2999-01-01"}"#,
            "units",
        ),
        (
            "/v1/billing/settle",
            r#"{"month":"2026-01","month":"2026-02"}"#,
            "month",
        ),
    ];
    for (path, body, key) in cases {
        let r = admin.call_raw(Method::POST, path, body.to_string()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path} {body}");
        assert_eq!(r.error_code(), "InvalidParameterValue", "{path} {body}");
        assert!(
            message(&r).contains(&format!("duplicate key `{key}`")),
            "{path} {body}: {}",
            message(&r)
        );
    }
    let r = admin
        .call_raw(
            Method::PUT,
            "/v1/accounts/acme/postpaid",
            r#"{"enabled":true,"enabled":false}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        message(&r).contains("duplicate key `enabled`"),
        "{}",
        message(&r)
    );

    // Nothing was made or changed.
    for id in ["a", "b", "c", "d", "s"] {
        let r = admin
            .call(Method::GET, &format!("/v1/accounts/{id}"), None)
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{id} exists");
    }
    let a = admin.account("acme").await;
    assert_eq!(a["sub_accounts"], json!([]), "{a}");
    assert_eq!(a["balance_usd"], "0", "{a}");
    assert_eq!(a["postpaid"], false, "{a}");
    assert_eq!(a["concurrency_packages"], json!([]), "{a}");
    assert_eq!(a["resource_packages"].as_array().unwrap().len(), 1, "{a}");
    let r = admin
        .call(Method::GET, "/v1/accounts/acme/keys", None)
        .await;
    assert_eq!(r.json()["keys"], json!([]), "a key was issued");
    // The same key in two sibling objects is no repeat.
    let r = admin
        .call_raw(Method::POST, "/v1/accounts", r#"{"id":"e"}"#)
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_query_parameter_is_refused_naming_it() {
    let stack = Stack::start(Opts::default());
    let admin = stack.admin();
    admin.create_plain_account("acme").await;
    for (query, name) in [
        ("/v1/usage-events?limit=1&limit=2", "limit"),
        ("/v1/usage-events?limit=5&limit=5", "limit"),
        ("/v1/usage-events?after=0&after=1", "after"),
        ("/v1/usage-events?after=&limit=1&after=", "after"),
        ("/v1/accounts?limit=1&limit=2", "limit"),
        ("/v1/accounts?after=a&after=acme", "after"),
        (
            "/v1/accounts/acme/usage?month=2026-01&month=2026-02",
            "month",
        ),
        (
            "/v1/accounts/acme/usage?month=2026-01&month=2026-01",
            "month",
        ),
    ] {
        let r = admin.call(Method::GET, query, None).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(r.error_code(), "InvalidParameterValue", "{query}");
        assert!(
            message(&r).contains(&format!("query parameter `{name}` is given more than once")),
            "{query}: {}",
            message(&r)
        );
    }
    // Each once is fine.
    for ok in [
        "/v1/usage-events?after=0&limit=2",
        "/v1/accounts?limit=1&after=",
        "/v1/accounts/acme/usage?month=2026-01",
    ] {
        assert_eq!(
            admin.call(Method::GET, ok, None).await.status,
            StatusCode::OK,
            "{ok}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_up_past_the_max_balance_is_refused_and_changes_nothing() {
    let stack = Stack::start(Opts {
        extra_toml: "[billing]\nmax_balance_usd = \"100\"\n".into(),
        ..Opts::default()
    });
    let admin = stack.admin();
    admin.create_plain_account("acme").await;
    let top_up = |amount: &'static str| {
        let admin = stack.admin();
        async move {
            admin
                .call(
                    Method::POST,
                    "/v1/accounts/acme/top-up",
                    Some(json!({ "amount": amount })),
                )
                .await
        }
    };
    let r = top_up("60").await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());
    // Up to the max exactly is allowed.
    let r = top_up("40.00").await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());
    assert_eq!(r.json()["balance_usd"], "100.00");
    for past in ["0.01", "1000000000"] {
        let r = top_up(past).await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{past}: {:?}", r.json());
        assert_eq!(r.error_code(), "FailedOperation.BalanceLimitExceeded");
        assert!(
            message(&r).contains("billing.max_balance_usd (100 USD)"),
            "{}",
            message(&r)
        );
        assert!(
            message(&r).contains("nothing was changed"),
            "{}",
            message(&r)
        );
    }
    assert_eq!(admin.account("acme").await["balance_usd"], "100.00");
    // After a restart (billing is read at start) the balance is the same:
    // no refused top-up was stored.
    let mut stack = stack;
    stack.gw.restart(&Opts::default());
    assert_eq!(stack.admin().account("acme").await["balance_usd"], "100.00");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_logs_or_metrics() {
    let stack = Stack::start(Opts {
        env: vec![("RUST_LOG", "debug".into())],
        ..Opts::default()
    });
    let admin = stack.admin();
    admin.create_account("acme").await;
    let (_, key) = admin.issue_key("acme", None).await;
    assert_eq!(stack.task(&key, &[]).await.status, StatusCode::OK);
    assert_eq!(
        stack.task(&format!("{key}x"), &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
    let _ = stack
        .http
        .send(
            Method::GET,
            &format!("{}/v1/accounts/acme", stack.gw.admin),
            &[("authorization", "Bearer not-the-token-at-all")],
            "",
        )
        .await;
    let metrics = stack
        .http
        .send(Method::GET, &format!("{}/metrics", stack.gw.admin), &[], "")
        .await;
    let metrics = String::from_utf8_lossy(&metrics.body).to_string();
    let logs = stack.gw.proc.wait_log("API key issued", 1).await;
    for secret in [key.as_str(), ADMIN_TOKEN, &key[3..20]] {
        assert!(!logs.contains(secret), "a secret is in the logs");
        assert!(!metrics.contains(secret), "a secret is in the metrics");
    }
    // The key is stored hashed: its text is nowhere in the data directory.
    for entry in walk(&stack.gw.data_dir) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(&key[3..]),
            "{entry:?} holds the key"
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_name_the_spec_series_and_pass_promtool() {
    let stack = Stack::start(Opts::default());
    let key = stack.account_with_key("acme").await;
    assert_eq!(stack.task(&key, &[]).await.status, StatusCode::OK);
    assert_eq!(
        stack.task("bad", &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
    let r = stack
        .http
        .send(Method::GET, &format!("{}/metrics", stack.gw.admin), &[], "")
        .await;
    let text = String::from_utf8_lossy(&r.body).to_string();
    for series in [
        r#"tollgate_requests_total{outcome="success"} 1"#,
        r#"tollgate_requests_total{outcome="rejected"} 1"#,
        r#"tollgate_in_flight{account="acme"} 0"#,
        r#"tollgate_queued{account="acme"} 0"#,
        r#"tollgate_concurrency_limit{account="acme"} 3"#,
        "tollgate_queue_wait_seconds_bucket",
        "tollgate_upstream_seconds_bucket",
        "tollgate_usage_events_total 1",
        r#"tollgate_rejections_total{code="AuthFailure.InvalidAuthorization"} 1"#,
    ] {
        assert!(text.contains(series), "missing {series} in\n{text}");
    }
    if !common::has_promtool("format check") {
        return;
    }
    let path = stack.dir.path().join("metrics.txt");
    std::fs::write(&path, &text).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("promtool check metrics < {}", path.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_bad_config_is_refused_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[limits]\ndefault_concurrency = 0\n",
            "limits.default_concurrency",
        ),
        (
            "[limits]\nmax_queue_wait_ms = \"long\"\n",
            "limits.max_queue_wait_ms",
        ),
        (
            "[billing]\narrears_grace = \"tomorrow\"\n",
            "billing.arrears_grace",
        ),
        (
            "[billing]\nmax_balance_usd = 5000\n",
            "billing.max_balance_usd",
        ),
        (
            "[billing]\nmax_balance_usd = \"0\"\n",
            "billing.max_balance_usd",
        ),
        ("[backend]\nurl = \"https://x\"\n", "backend.url"),
        ("[server]\nlisten = \"nowhere\"\n", "server.listen"),
        ("[sever]\n", "sever"),
    ];
    for (toml, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, toml).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["serve", "--config", path.to_str().unwrap()])
            .env("TOLLGATE_STORAGE_DATA_DIR", dir.path().join("data"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{toml}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{toml}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config", "/nonexistent/tollgate.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/tollgate.toml"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_defaults_serve_the_demo_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let gw = common::Gateway::start_defaults(
        dir.path(),
        &[
            ("TOLLGATE_SIMULATOR_LATENCY_MS", "20".into()),
            ("TOLLGATE_SIMULATOR_LATENCY_JITTER_MS", "0".into()),
        ],
    );
    let http = common::Http::new();
    let r = http
        .send(
            Method::POST,
            &format!("{}/v1/style-transfer", gw.url),
            &[(
                "authorization",
                &format!("Bearer {}", tollgate::config::DEMO_API_KEY),
            )],
            r#"{"InputImage":"https://example.invalid/cat.jpg","Style":"ukiyo-e"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());
    assert!(r.json()["Response"]["ResultImage"].is_string());
    // With no admin token configured, the admin API is closed, not open.
    let r = http
        .send(
            Method::GET,
            &format!("{}/v1/accounts/demo", gw.admin),
            &[("authorization", "Bearer ")],
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}
