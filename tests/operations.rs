//! What an operator relies on from day one, against the real binary:
//! SIGHUP reloads the config without dropping a task, the access log has a
//! line per task, the metrics an exporter is expected to have, the admin
//! lists, the API description matches the routes, and the deploy/ alert
//! rules and dashboard only name series that exist.

#[path = "common/api_examples.rs"]
mod api_examples;
mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{ADMIN_TOKEN, Opts, Stack};
use http::{Method, StatusCode};
use serde_json::{Value, json};

/// The access log on, the log filter left to the config (not `RUST_LOG`),
/// and limits a reload will change.
fn reloadable() -> Opts {
    Opts {
        extra_toml: "[limits]\nmax_body_bytes = 100000\n[log]\naccess = true\n".into(),
        env: vec![("RUST_LOG", String::new())],
    }
}

/// Waits (bounded) until the gateway's stderr holds `needle` `count` times.
async fn wait_for_log(stack: &Stack, needle: &str, count: usize) -> String {
    stack.gw.proc.wait_log(needle, count).await
}

/// An admin GET with `token` (the reload test rotates it).
async fn admin_get(stack: &Stack, token: &str, path: &str) -> common::Resp {
    let auth = format!("Bearer {token}");
    stack
        .http
        .send(
            Method::GET,
            &format!("{}{path}", stack.gw.admin),
            &[("authorization", &auth)],
            "",
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_live_keys_without_dropping_a_task_and_refuses_a_bad_file() {
    let stack = Stack::start(reloadable());
    let key = stack.account_with_key("acme").await;
    let body_50 = "x".repeat(50);
    let auth = format!("Bearer {key}");
    let send_50 = || async {
        stack
            .http
            .send(
                Method::POST,
                &format!("{}/v1/style-transfer", stack.gw.url),
                &[("authorization", &auth)],
                body_50.clone(),
            )
            .await
    };
    assert_eq!(send_50().await.status, StatusCode::OK);
    let held = stack.hold_slots("acme", &key, 1, 1_500).await;

    let original = std::fs::read_to_string(&stack.gw.config_path).unwrap();
    let new_token = "rotated-admin-token-0123456789";
    let edited = original
        .replace("max_body_bytes = 100000", "max_body_bytes = 10")
        .replace("access = true", "access = false")
        .replace(ADMIN_TOKEN, new_token)
        .replace("instance = \"test\"", "instance = \"renamed\"");
    assert_ne!(edited, original);
    std::fs::write(&stack.gw.config_path, &edited).unwrap();
    stack.gw.proc.hangup();
    let logs = wait_for_log(&stack, "configuration reloaded", 1).await;
    assert!(
        logs.contains("server.instance"),
        "a key that needs a restart is named: {logs}"
    );

    // The task in flight during the reload finished normally.
    for h in held {
        assert_eq!(h.await.unwrap().status, StatusCode::OK);
    }
    // Limits changed live.
    let r = send_50().await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{:?}", r.json());
    // The admin token too.
    assert_eq!(
        admin_get(&stack, ADMIN_TOKEN, "/v1/accounts/acme")
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        admin_get(&stack, new_token, "/v1/accounts/acme")
            .await
            .status,
        StatusCode::OK
    );
    // The access log is off now: a task adds no line.
    let lines_before = stack.gw.proc.logs().matches("tollgate::access").count();
    assert!(lines_before >= 1, "{}", stack.gw.proc.logs());
    let small = stack
        .http
        .send(
            Method::POST,
            &format!("{}/v1/style-transfer", stack.gw.url),
            &[("authorization", &auth)],
            "{}",
        )
        .await;
    assert_eq!(small.status, StatusCode::OK, "{:?}", small.json());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        stack.gw.proc.logs().matches("tollgate::access").count(),
        lines_before
    );
    // The restart-only key kept its running value: events still carry it.
    let events = admin_get(&stack, new_token, "/v1/usage-events?limit=1000")
        .await
        .json();
    let last = events["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["source"], "tollgate/test", "{last}");

    // A file that does not load is refused; the running config stays.
    std::fs::write(&stack.gw.config_path, "[limits\nmax_body_bytes = ").unwrap();
    stack.gw.proc.hangup();
    let logs = wait_for_log(&stack, "reload refused", 1).await;
    assert!(logs.contains("config"), "the reason is given: {logs}");
    // A valid file with a bad value is refused with the key named.
    std::fs::write(
        &stack.gw.config_path,
        edited.replace("max_body_bytes = 10", "max_body_bytes = 0"),
    )
    .unwrap();
    stack.gw.proc.hangup();
    let logs = wait_for_log(&stack, "reload refused", 2).await;
    assert!(logs.contains("limits.max_body_bytes"), "{logs}");
    assert_eq!(send_50().await.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        admin_get(&stack, new_token, "/v1/accounts/acme")
            .await
            .status,
        StatusCode::OK,
        "still serving on the last good config"
    );
}

/// The JSON access lines of a gateway's stderr.
fn access_lines(logs: &str) -> Vec<Value> {
    logs.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "tollgate::access")
        .map(|v| v["fields"].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_task_gets_one_access_line_and_no_secret_is_logged() {
    let stack = Stack::start(Opts {
        extra_toml: "[log]\nformat = \"json\"\nlevel = \"warn\"\n".into(),
        env: vec![("RUST_LOG", String::new())],
    });
    let key = stack.account_with_key("acme").await;
    let ok = stack.task(&key, &[("x-request-id", "ok-1")]).await;
    assert_eq!(ok.status, StatusCode::OK);
    let refused = stack
        .task("tg_not_a_key", &[("x-request-id", "bad-1")])
        .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    let failed = stack
        .task(&key, &[("x-request-id", "fail-1"), ("x-sim-status", "500")])
        .await;

    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let lines = access_lines(&stack.gw.proc.logs());
        if lines.len() >= 3 || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(lines.len(), 3, "one line per task: {lines:?}");
    let by_id = |id: &str| {
        lines
            .iter()
            .find(|l| l["request_id"] == id)
            .unwrap_or_else(|| panic!("no line for {id}: {lines:?}"))
            .clone()
    };
    let ok_line = by_id("ok-1");
    assert_eq!(ok_line["account"], "acme");
    assert_eq!(ok_line["status"], 200);
    assert_eq!(ok_line["method"], "POST");
    assert_eq!(ok_line["path"], "/v1/style-transfer");
    assert!(ok_line["charged_to"].is_string(), "{ok_line}");
    assert!(ok_line["upstream_ms"].as_f64().is_some(), "{ok_line}");
    assert!(ok_line["total_ms"].as_f64().unwrap() >= 0.0);
    assert!(ok_line["bytes_out"].as_u64().unwrap() > 0);
    let bad_line = by_id("bad-1");
    assert_eq!(bad_line["status"], 401);
    assert!(
        bad_line["code"]
            .as_str()
            .unwrap()
            .starts_with("AuthFailure")
    );
    assert!(bad_line.get("account").is_none(), "{bad_line}");
    let fail_line = by_id("fail-1");
    assert_eq!(fail_line["status"], failed.status.as_u16());
    assert!(fail_line.get("charged_to").is_none(), "{fail_line}");
    let logs = stack.gw.proc.logs();
    assert!(!logs.contains(&key), "an API key reached the log");
    assert!(
        !logs.contains(ADMIN_TOKEN),
        "the admin token reached the log"
    );
}

async fn scrape(stack: &Stack) -> String {
    let r = stack
        .http
        .send(Method::GET, &format!("{}/metrics", stack.gw.admin), &[], "")
        .await;
    String::from_utf8_lossy(&r.body).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_process_build_end_to_end_and_per_account_series() {
    let stack = Stack::start(Opts {
        extra_toml: "[metrics]\nduration_buckets = [0.5, 1.16, 3.0]\n".into(),
        ..Opts::default()
    });
    let key = stack.account_with_key("acme").await;
    assert_eq!(stack.task(&key, &[]).await.status, StatusCode::OK);
    let text = scrape(&stack).await;
    for series in [
        "process_cpu_seconds_total ",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "process_max_fds ",
        "process_start_time_seconds ",
        "tollgate_build_info{version=\"",
        "tollgate_max_queued_tasks 10000",
        // The configured buckets, not the defaults.
        "tollgate_task_duration_seconds_bucket{outcome=\"success\",le=\"1.16\"} 1",
        "tollgate_upstream_seconds_bucket{le=\"1.16\"} 1",
        "tollgate_task_duration_seconds_count{outcome=\"success\"} 1",
        "tollgate_account_requests_total{account=\"acme\",outcome=\"success\"} 1",
    ] {
        assert!(text.contains(series), "missing {series} in\n{text}");
    }
}

/// Metric names (families) an expression file mentions.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (i, _) in text.match_indices(['t', 'p']) {
        let rest = &text[i..];
        if !(rest.starts_with("tollgate_") || rest.starts_with("process_")) {
            continue;
        }
        if i > 0
            && text.as_bytes()[i - 1].is_ascii_alphanumeric() | (text.as_bytes()[i - 1] == b'_')
        {
            continue;
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if name.ends_with('_') {
            // Prose such as "process_*", not a name.
            continue;
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name)
            .to_string();
        names.insert(family);
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alert_rules_and_dashboard_name_only_series_tollgate_exports() {
    let root = env!("CARGO_MANIFEST_DIR");
    let rules = std::fs::read_to_string(format!("{root}/deploy/prometheus/alerts.yml")).unwrap();
    let dashboard =
        std::fs::read_to_string(format!("{root}/deploy/grafana/tollgate.json")).unwrap();
    let _: Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let mut wanted = metric_names(&rules);
    wanted.extend(metric_names(&dashboard));
    assert!(wanted.len() > 10, "{wanted:?}");

    let stack = Stack::start(Opts::default());
    let key = stack.account_with_key("acme").await;
    assert_eq!(stack.task(&key, &[]).await.status, StatusCode::OK);
    assert_eq!(
        stack.task("tg_nope", &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
    let text = scrape(&stack).await;
    let exported: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    // Series that exist only in cluster mode or once something happened
    // (a labelled counter has no line before its first label).
    let conditional = [
        "tollgate_coordination_errors_total",
        "tollgate_connections_refused_total",
        "tollgate_accept_errors_total",
    ];
    for name in &wanted {
        assert!(
            exported.contains(name) || conditional.contains(&name.as_str()),
            "deploy/ names {name}, which /metrics does not export:\n{text}"
        );
    }
    for name in conditional {
        let source = std::fs::read_to_string(format!("{root}/src/metrics.rs")).unwrap();
        assert!(source.contains(&format!("\"{name}\"")), "{name} is defined");
    }
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    if !common::has_promtool("rule checks") {
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    for args in [
        ["check", "rules", "deploy/prometheus/alerts.yml"],
        ["test", "rules", "deploy/prometheus/alerts_test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_are_listed_in_pages_and_keys_without_secrets() {
    let stack = Stack::start(Opts::default());
    let admin = stack.admin();
    for id in ["c-3", "a-1", "b-2", "d-4", "e-5"] {
        admin.create_plain_account(id).await;
    }
    let mut seen = Vec::new();
    let mut after = String::new();
    for _ in 0..10 {
        let r = admin
            .call(
                Method::GET,
                &format!("/v1/accounts?limit=2&after={after}"),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());
        let page = r.json();
        let accounts = page["accounts"].as_array().unwrap();
        assert!(accounts.len() <= 2);
        seen.extend(
            accounts
                .iter()
                .map(|a| a["id"].as_str().unwrap().to_string()),
        );
        match page["next_after"].as_str() {
            Some(next) => after = next.to_string(),
            None => break,
        }
    }
    assert_eq!(seen, ["a-1", "b-2", "c-3", "d-4", "e-5"]);
    for bad in ["limit=0", "limit=1001", "limit=x", "color=red"] {
        let r = admin
            .call(Method::GET, &format!("/v1/accounts?{bad}"), None)
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(
            r.json()["Response"]["Error"]["Code"],
            "InvalidParameterValue"
        );
    }

    admin.create_sub("a-1", "a-1-sub", None).await;
    let (root_key_id, root_key) = admin.issue_key("a-1", None).await;
    let (sub_key_id, _) = admin.issue_key("a-1", Some("a-1-sub")).await;
    let revoked = admin.issue_key("a-1", None).await.0;
    let r = admin
        .call(Method::DELETE, &format!("/v1/keys/{revoked}"), None)
        .await;
    assert!(r.status.is_success());
    assert_eq!(stack.task(&root_key, &[]).await.status, StatusCode::OK);

    let r = admin.call(Method::GET, "/v1/accounts/a-1/keys", None).await;
    assert_eq!(r.status, StatusCode::OK);
    let keys = r.json()["keys"].as_array().unwrap().clone();
    let ids: Vec<&str> = keys.iter().map(|k| k["key_id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        [root_key_id.as_str(), sub_key_id.as_str()],
        "revoked keys are not listed"
    );
    assert_eq!(keys[0]["type"], "api_key");
    assert!(keys[0]["sub_account"].is_null());
    assert!(keys[0]["last_used_at"].is_string(), "used: {}", keys[0]);
    assert_eq!(keys[1]["sub_account"], "a-1-sub");
    assert!(keys[1]["last_used_at"].is_null(), "never used: {}", keys[1]);
    assert!(
        !r.body
            .windows(root_key.len())
            .any(|w| w == root_key.as_bytes())
    );
    // The listed id is the one revocation takes.
    let r = admin
        .call(Method::DELETE, &format!("/v1/keys/{}", ids[1]), None)
        .await;
    assert!(r.status.is_success());

    let r = admin
        .call(Method::GET, "/v1/accounts/nobody/keys", None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.json()["Response"]["Error"]["Code"].is_string());
    // A wrong method is the JSON error shape too.
    let r = admin
        .call(Method::PATCH, "/v1/accounts", Some(json!({})))
        .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(
        r.json()["Response"]["Error"]["Code"].is_string(),
        "{:?}",
        r.body
    );
}

/// Every `(method, path)` of the OpenAPI description is a route, and every
/// admin route is described: the documented methods are answered, the
/// others get 405, and the router's paths are the described ones. And
/// docs/API.md's examples, replayed in order on a fresh gateway, get the
/// answers the document shows (tests/common/api_examples.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_description_matches_the_admin_routes() {
    let root = env!("CARGO_MANIFEST_DIR");
    let spec: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/docs/openapi.json")).unwrap(),
    )
    .expect("docs/openapi.json is JSON");
    assert!(spec["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = spec["paths"].as_object().unwrap();

    // The router's paths, read from its source.
    let source = std::fs::read_to_string(format!("{root}/src/admin/mod.rs")).unwrap();
    let mut routed = BTreeSet::new();
    for (i, _) in source.match_indices(".route(") {
        let rest = source[i + 7..].trim_start();
        let path = rest
            .strip_prefix('"')
            .and_then(|r| r.split('"').next())
            .unwrap();
        let path = if ["/metrics", "/healthz", "/readyz"].contains(&path) {
            path.to_string()
        } else {
            format!("/v1{path}")
        };
        routed.insert(path);
    }
    let described: BTreeSet<String> = paths.keys().cloned().collect();
    assert_eq!(described, routed, "docs/openapi.json vs src/admin/mod.rs");

    // The examples' gateway: the default instance name (shown in events and
    // /readyz) and a key to seal TC3 secrets with.
    let stack = Stack::start(Opts {
        env: vec![
            ("TOLLGATE_SERVER_INSTANCE", "local".into()),
            ("TOLLGATE_AUTH_SECRET_ENCRYPTION_KEY", "ab".repeat(32)),
        ],
        ..Opts::default()
    });
    let doc = std::fs::read_to_string(format!("{root}/docs/API.md")).unwrap();
    let replayed = api_examples::replay(&doc, &stack.http, &stack.gw.admin, &stack.gw.url).await;
    assert!(
        replayed.answers >= 18 && replayed.requests >= 80,
        "the examples were found: {} answers, {} requests",
        replayed.answers,
        replayed.requests
    );
    let admin = stack.admin();
    let methods = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
    ];
    for (path, item) in paths {
        let concrete = path
            .replace("{id}", "nobody")
            .replace("{pkg}", "nothing")
            .replace("{key_id}", "nokey");
        for m in &methods {
            let documented = item.get(m.as_str().to_lowercase()).is_some();
            let r = admin.call(m.clone(), &concrete, None).await;
            if documented {
                assert_ne!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{m} {path}");
                // 404 only as "no such account" (a routed call), never as
                // "no such endpoint".
                if r.status == StatusCode::NOT_FOUND {
                    assert_ne!(
                        r.json()["Response"]["Error"]["Code"],
                        "UnsupportedOperation",
                        "{m} {path} is not routed"
                    );
                }
                let declared: BTreeSet<String> = item[m.as_str().to_lowercase()]["responses"]
                    .as_object()
                    .unwrap()
                    .keys()
                    .cloned()
                    .collect();
                assert!(
                    declared.contains(r.status.as_str()) || declared.contains("default"),
                    "{m} {path} answered {} (documented: {declared:?})",
                    r.status
                );
            } else {
                assert_eq!(
                    r.status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{m} {path} is not documented but answered"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moves_new_tasks_to_a_new_backend_while_old_ones_finish() {
    let stack = Stack::start(reloadable());
    let key = stack.account_with_key("acme").await;
    let held = stack.hold_slots("acme", &key, 1, 1_000).await;
    let second = common::Simulator::start();
    let original = std::fs::read_to_string(&stack.gw.config_path).unwrap();
    std::fs::write(
        &stack.gw.config_path,
        original.replace(&stack.sim.url, &second.url),
    )
    .unwrap();
    stack.gw.proc.hangup();
    wait_for_log(&stack, "configuration reloaded", 1).await;
    assert_eq!(stack.task(&key, &[]).await.status, StatusCode::OK);
    assert_eq!(second.max_in_flight(&stack.http, "acme").await, 1);
    for h in held {
        assert_eq!(
            h.await.unwrap().status,
            StatusCode::OK,
            "the old backend's task"
        );
    }
    assert_eq!(stack.sim.max_in_flight(&stack.http, "acme").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_token_every_v1_request_is_refused_alike() {
    let stack = Stack::start(Opts::default());
    for (method, path) in [
        (Method::GET, "/v1/accounts"),
        (Method::GET, "/v1/no-such-route"),
        (Method::PATCH, "/v1/accounts"),
        (Method::GET, "/v1/keys/x/y/z"),
    ] {
        let r = stack
            .http
            .send(
                method.clone(),
                &format!("{}{path}", stack.gw.admin),
                &[],
                "",
            )
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{method} {path}");
        assert!(r.json()["Response"]["Error"]["Code"].is_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_follows_log_access_under_rust_log_and_logs_hang_ups_as_499() {
    // RUST_LOG stands in for log.level; log.access still decides.
    let stack = Stack::start(Opts {
        extra_toml: "[log]\nformat = \"json\"\n".into(),
        env: vec![("RUST_LOG", "warn".to_string())],
    });
    let key = stack.account_with_key("acme").await;
    let held = stack.hold_slots("acme", &key, 3, 4_000).await;
    let socket = common::raw_task(&stack.gw.url, &key, "X-Request-Id: gone-1\r\n", "{}").await;
    common::wait_for(&stack.admin(), "acme", "one queued", |a| {
        a["concurrency"]["queued"] == 1
    })
    .await;
    drop(socket);
    for h in held {
        assert_eq!(h.await.unwrap().status, StatusCode::OK);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let gone = loop {
        let lines = access_lines(&stack.gw.proc.logs());
        if let Some(l) = lines.iter().find(|l| l["request_id"] == "gone-1") {
            break l.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no access line for the hang-up: {lines:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(gone["status"], 499, "{gone}");
    assert_eq!(gone["code"], "FailedOperation.ClientGone", "{gone}");
    // The held tasks' lines too (written by the log thread, so waited for).
    loop {
        let ok = access_lines(&stack.gw.proc.logs())
            .into_iter()
            .filter(|l| l["status"] == 200)
            .count();
        if ok == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{ok} of 3 lines for the held tasks"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `tollgate serve --config <file>` with `env`, `RUST_LOG` unset: must
/// refuse to start. Its exit code and stderr.
fn refused_serve(config_toml: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tollgate.toml");
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[storage]\ndata_dir = \"{}\"\n{config_toml}",
        dir.path().join("data").display()
    );
    std::fs::write(&config, toml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.args(["serve", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .env_remove("TOLLGATE_LOG_LEVEL")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    common::refused_start(cmd.spawn().unwrap())
}

const LEVELS: &str = "error, warn, info, debug, trace, off";

#[test]
fn a_log_level_that_is_not_a_level_stops_the_start_naming_the_key_or_variable() {
    // A typo would be read as a target name and silence every log line.
    for typo in ["inf0", "warnn", "info,warnn"] {
        let (code, stderr) = refused_serve(&format!("[log]\nlevel = \"{typo}\"\n"), &[]);
        assert_eq!(code, Some(2), "{typo}: {stderr}");
        assert!(stderr.contains("log.level"), "{typo}: {stderr}");
        assert!(stderr.contains(LEVELS), "the levels are listed: {stderr}");
    }
    let (code, stderr) = refused_serve("", &[("TOLLGATE_LOG_LEVEL", "warnn")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("TOLLGATE_LOG_LEVEL"), "{stderr}");
    assert!(stderr.contains("`warnn`"), "{stderr}");
    assert!(stderr.contains(LEVELS), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_log_directive_starts_and_is_obeyed() {
    let stack = Stack::start(Opts {
        extra_toml: "[log]\nlevel = \"info,tollgate::access=off\"\naccess = false\n".into(),
        env: vec![("RUST_LOG", String::new())],
    });
    let key = stack.account_with_key("acme").await;
    assert_eq!(stack.task(&key, &[]).await.status, StatusCode::OK);
    let logs = wait_for_log(&stack, "tollgate serving", 1).await;
    assert!(!logs.contains("tollgate::access"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_bad_log_level_is_refused_in_the_log_and_later_warnings_still_appear() {
    let stack = Stack::start(Opts {
        env: vec![
            ("RUST_LOG", String::new()),
            ("TOLLGATE_LIMITS_MAX_QUEUE_PER_ACCOUNT", "7".into()),
            ("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN.into()),
        ],
        ..reloadable()
    });
    let original = std::fs::read_to_string(&stack.gw.config_path).unwrap();
    let typo = original.replace("access = true", "access = true\nlevel = \"warnn\"");
    assert_ne!(typo, original);
    std::fs::write(&stack.gw.config_path, &typo).unwrap();
    stack.gw.proc.hangup();
    // Refused, and the refusal is logged under the running filter.
    let logs = wait_for_log(&stack, "reload refused", 1).await;
    assert!(logs.contains("log.level"), "{logs}");
    assert!(logs.contains("`warnn`"), "{logs}");
    assert!(!logs.contains("configuration reloaded"), "{logs}");

    // The old filter stays: a later reload's warning and info lines appear.
    // Its line names the keys the environment sets, never their values.
    std::fs::write(
        &stack.gw.config_path,
        original
            .replace("instance = \"test\"", "instance = \"renamed\"")
            .replace("[limits]", "[limits]\nmax_queue_per_account = 1"),
    )
    .unwrap();
    stack.gw.proc.hangup();
    let logs = wait_for_log(&stack, "configuration reloaded", 1).await;
    assert!(
        logs.contains("WARN") && logs.contains("take effect only at restart"),
        "{logs}"
    );
    assert!(
        logs.contains(
            "limits.max_queue_per_account is set by TOLLGATE_LIMITS_MAX_QUEUE_PER_ACCOUNT; \
             the file's value is not used"
        ),
        "{logs}"
    );
    assert!(
        logs.contains("admin.token is set by TOLLGATE_ADMIN_TOKEN"),
        "{logs}"
    );
    assert!(!logs.contains(ADMIN_TOKEN), "{logs}");
    // And the variable did win: 7 queued, not 1.
    let key = stack.account_with_key("acme").await;
    let held = stack.hold_slots("acme", &key, 3, 4_000).await;
    let queued: Vec<_> = (0..2)
        .map(|_| {
            let c = stack.client();
            let key = key.clone();
            tokio::spawn(async move { c.task(&key, &[]).await })
        })
        .collect();
    common::wait_for(&stack.admin(), "acme", "two queued", |a| {
        a["concurrency"]["queued"] == 2
    })
    .await;
    for t in queued {
        assert_eq!(t.await.unwrap().status, StatusCode::OK);
    }
    for h in held {
        assert_eq!(h.await.unwrap().status, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_with_a_word_that_is_not_a_level_starts_with_a_warning() {
    // RUST_LOG is the escape hatch: used as given, but said.
    let stack = Stack::start(Opts {
        env: vec![("RUST_LOG", "warnn".into())],
        ..Opts::default()
    });
    let logs = wait_for_log(&stack, "RUST_LOG", 1).await;
    let line = logs.lines().find(|l| l.contains("RUST_LOG")).unwrap();
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("`warnn` is not a level"), "{line}");
    let key = stack.account_with_key("acme").await;
    assert_eq!(stack.task(&key, &[]).await.status, StatusCode::OK);
}
