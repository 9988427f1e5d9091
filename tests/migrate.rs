//! `tollgate migrate`, black-box: a single node's data, made through the
//! admin API and real tasks on SQLite, moved into a fresh PostgreSQL
//! database, then served by a gateway on PostgreSQL exactly as before.

mod common;
mod pg;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{Admin, Opts, Stack};
use http::{Method, StatusCode};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

fn migrate(from: &str, to: &str) -> Output {
    Command::new(BIN)
        .args(["migrate", "--from", from, "--to", to])
        .output()
        .expect("run tollgate migrate")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn from(data_dir: &Path) -> String {
    format!("sqlite:{}", data_dir.display())
}

/// The same database with a password in its URL (trust auth ignores it):
/// what the tool prints must never contain it.
fn with_password(url: &str) -> String {
    url.replace("postgres@", "postgres:s3cret-pw@")
}

/// What the operator sees of the accounts: views, packages, month usage.
async fn durable_state(admin: &Admin<'_>, month: &str) -> Value {
    let mut out = serde_json::Map::new();
    for id in ["acme", "beta", "gamma"] {
        let view = admin.wait_idle(id).await;
        let packages = admin
            .call(
                Method::GET,
                &format!("/v1/accounts/{id}/resource-packages"),
                None,
            )
            .await
            .json();
        let usage = admin
            .call(
                Method::GET,
                &format!("/v1/accounts/{id}/usage?month={month}"),
                None,
            )
            .await
            .json();
        out.insert(
            id.to_string(),
            json!({"view": view, "resource_packages": packages, "usage": usage}),
        );
    }
    Value::Object(out)
}

async fn admin_ok(admin: &Admin<'_>, method: Method, path: &str, body: Value) -> Value {
    let r = admin.call(method, path, Some(body)).await;
    assert!(r.status.is_success(), "{path}: {} {:?}", r.status, r.json());
    r.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_nodes_data_moves_to_postgres_and_serves_the_same() {
    let mut stack = Stack::start(Opts::default());
    let admin = stack.admin();
    admin.create_account("acme").await;
    admin.create_sub("acme", "acme-batch", Some(1)).await;
    let (_, root_key) = admin.issue_key("acme", None).await;
    let (_, sub_key) = admin.issue_key("acme", Some("acme-batch")).await;
    let (revoked_id, revoked_key) = admin.issue_key("acme", None).await;
    let r = admin
        .call(Method::DELETE, &format!("/v1/keys/{revoked_id}"), None)
        .await;
    assert!(r.status.is_success(), "revoke: {:?}", r.json());
    admin.create_plain_account("beta").await;
    let (_, beta_key) = admin.issue_key("beta", None).await;
    admin_ok(
        &admin,
        Method::POST,
        "/v1/accounts/acme/resource-packages",
        json!({"size": 1000}),
    )
    .await;
    let today = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date();
    admin_ok(
        &admin,
        Method::POST,
        "/v1/accounts/acme/concurrency-packages",
        json!({"units": 2, "period": "daily", "start": today.to_string()}),
    )
    .await;
    admin_ok(
        &admin,
        Method::POST,
        "/v1/accounts/acme/top-up",
        json!({"amount": "12.50"}),
    )
    .await;
    // 50 free units, then the prepaid package: its `used` must move too.
    for i in 0..53 {
        let key = if i % 2 == 0 { &root_key } else { &sub_key };
        assert_eq!(stack.task(key, &[]).await.status, StatusCode::OK);
        if i % 10 == 0 {
            assert_eq!(stack.task(&beta_key, &[]).await.status, StatusCode::OK);
        }
    }
    // Postpaid past the free units, then settled: a settlement, a negative
    // balance and an arrears date to move.
    let gamma_key = stack.account_with_key("gamma").await;
    for i in 0..52 {
        // One with an idempotency key: a retry after the move replays.
        let keyed = [("idempotency-key", "moved-1")];
        let headers: &[(&str, &str)] = if i == 0 { &keyed } else { &[] };
        assert_eq!(stack.task(&gamma_key, headers).await.status, StatusCode::OK);
    }
    // A finished job: queryable after the move, with its result.
    let job = job_call(&stack, Method::POST, &beta_key, "v1/style-transfer").await;
    assert_eq!(
        job.status,
        StatusCode::ACCEPTED,
        "{}",
        String::from_utf8_lossy(&job.body)
    );
    let job_id = job.json()["job_id"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let job_before = loop {
        let v = job_call(&stack, Method::GET, &beta_key, &job_id)
            .await
            .json();
        if v["status"] == "succeeded" {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let month = jiff::Timestamp::now().strftime("%Y-%m").to_string();
    admin_ok(
        &admin,
        Method::POST,
        "/v1/billing/settle",
        json!({"month": month}),
    )
    .await;
    let before = durable_state(&admin, &month).await;
    let acme = &before["acme"];
    assert_eq!(acme["view"]["balance_usd"], "12.50", "{acme}");
    let used: Vec<u64> = acme["resource_packages"]["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["used"].as_u64().unwrap())
        .collect();
    assert!(used.contains(&50) && used.contains(&3), "{used:?}");
    let gamma = &before["gamma"];
    assert_eq!(gamma["view"]["balance_usd"], "-0.16", "{gamma}");
    assert!(gamma["view"]["arrears"]["since"].is_string(), "{gamma}");
    assert_eq!(gamma["usage"]["settled_usd"], "0.16", "{gamma}");
    let events = admin.all_events().await;
    assert_eq!(events.len(), 112);
    let event_ids: Vec<Value> = events.iter().map(|e| e["id"].clone()).collect();
    let last_cursor = admin
        .call(Method::GET, "/v1/usage-events?limit=1000", None)
        .await
        .json()["next"]
        .clone();

    let db = pg::TestDb::create().await;
    let to = format!("postgres:{}", db.url);
    let data_dir = stack.gw.data_dir.clone();
    // While the gateway runs on it, the source is refused.
    let out = migrate(&from(&data_dir), &to);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("stop the gateway"), "{}", text(&out));
    assert_eq!(
        db.query_i64("SELECT count(*) FROM pg_tables WHERE tablename = 'accounts'")
            .await,
        0
    );

    let status = stack.gw.proc.sigterm_and_wait(Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let out = migrate(
        &from(&data_dir),
        &format!("postgres:{}", with_password(&db.url)),
    );
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(0), "{shown}");
    assert!(!shown.contains("s3cret-pw"), "password printed: {shown}");
    for line in [
        "accounts",
        "sub_accounts",
        "api_keys",
        "concurrency_packages",
        "resource_packages",
        "usage_events",
        "usage_counters",
        "settlements",
        "ledger",
        "idempotency_keys",
        "jobs",
    ] {
        assert!(
            shown.lines().any(|l| l.trim_start().starts_with(line)),
            "{line}: {shown}"
        );
    }
    let rows = |table: &str| {
        shown
            .lines()
            .find(|l| l.split_whitespace().next() == Some(table))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse::<u64>().ok())
    };
    assert_eq!(rows("accounts"), Some(3), "{shown}");
    assert_eq!(rows("api_keys"), Some(5), "revoked one too: {shown}");
    assert_eq!(rows("settlements"), Some(1), "{shown}");
    assert_eq!(rows("ledger"), Some(2), "a top-up, a settlement: {shown}");
    assert_eq!(rows("usage_events"), Some(112), "{shown}");
    assert_eq!(rows("idempotency_keys"), Some(1), "{shown}");
    assert_eq!(rows("jobs"), Some(1), "{shown}");
    assert!(shown.contains("usage/*.jsonl"), "{shown}");
    assert_eq!(
        db.query_i64("SELECT count(*) FROM api_keys WHERE revoked_at IS NOT NULL")
            .await,
        1
    );
    assert_eq!(
        db.query_i64(
            "SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END FROM usage_events_seq"
        )
        .await,
        db.query_i64("SELECT max(seq) + 1 FROM usage_events").await,
        "the sequence continues after the copied numbers"
    );

    // One gateway on PostgreSQL, same config and data dir (the export's
    // cursor carries on: event numbers were kept).
    stack.gw.restart(&Opts {
        env: vec![
            ("TOLLGATE_STORAGE_KIND", "postgres".to_string()),
            ("TOLLGATE_STORAGE_POSTGRES_URL", db.url.clone()),
        ],
        ..Opts::default()
    });
    let admin = stack.admin();
    assert_eq!(durable_state(&admin, &month).await, before);
    let after: Vec<Value> = admin
        .all_events()
        .await
        .iter()
        .map(|e| e["id"].clone())
        .collect();
    assert_eq!(after, event_ids, "same events, same order");
    assert_eq!(
        admin
            .call(Method::GET, "/v1/usage-events?limit=1000", None)
            .await
            .json()["next"],
        last_cursor,
        "a consumer's cursor stays valid"
    );
    for key in [&root_key, &sub_key, &beta_key, &gamma_key] {
        assert_eq!(stack.task(key, &[]).await.status, StatusCode::OK);
    }
    assert_eq!(
        stack.task(&revoked_key, &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
    let retry = stack
        .task(&gamma_key, &[("idempotency-key", "moved-1")])
        .await;
    assert_eq!(retry.status, StatusCode::OK);
    assert_eq!(retry.header("idempotent-replayed").as_deref(), Some("true"));
    let job_after = job_call(&stack, Method::GET, &beta_key, &job_id)
        .await
        .json();
    assert_eq!(job_after, job_before, "the job and its result moved");
    let page = admin
        .call(
            Method::GET,
            &format!("/v1/usage-events?after={}", last_cursor.as_str().unwrap()),
            None,
        )
        .await
        .json();
    assert_eq!(page["events"].as_array().unwrap().len(), 4, "{page}");
    let exported = common::wait_for_jsonl(&stack.gw.data_dir, 116).await;
    assert_eq!(exported.len(), 116, "each event exported once");

    // Never into a database that holds data.
    stack.gw.proc.sigterm_and_wait(Duration::from_secs(15));
    let out = migrate(
        &from(&data_dir),
        &format!("postgres:{}", with_password(&db.url)),
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("already holds data"), "{}", text(&out));
    assert!(!text(&out).contains("s3cret-pw"), "{}", text(&out));
    assert_eq!(db.query_i64("SELECT count(*) FROM usage_events").await, 116);
}

/// A call under `/tollgate/jobs/`: a submit (POST, `rest` the backend
/// path) or a job's query.
async fn job_call(stack: &Stack, method: Method, key: &str, rest: &str) -> common::Resp {
    let auth = format!("Bearer {key}");
    stack
        .http
        .send(
            method,
            &format!("{}/tollgate/jobs/{rest}", stack.gw.url),
            &[("authorization", auth.as_str())],
            common::TASK_BODY.to_string(),
        )
        .await
}

#[test]
fn bad_arguments_and_a_missing_source_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let url = "postgres:postgres://postgres:s3cret-pw@127.0.0.1:1/none";
    for (f, t) in [
        (from(dir.path()), url.to_string()),
        (dir.path().display().to_string(), url.to_string()),
        (from(dir.path()), "mysql://u:s3cret-pw@h/db".to_string()),
    ] {
        let out = migrate(&f, &t);
        assert_eq!(out.status.code(), Some(2), "{f} {t}: {}", text(&out));
        assert!(!text(&out).contains("s3cret-pw"), "{}", text(&out));
    }
    let out = migrate(&from(dir.path()), url);
    assert!(
        text(&out).contains("no tollgate database"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_nodes_data_moves_whole() {
    let mut stack = Stack::start(Opts::default());
    let key = stack.account_with_key("acme").await;
    for _ in 0..20 {
        assert_eq!(stack.task(&key, &[]).await.status, StatusCode::OK);
    }
    // kill -9: the WAL may hold commits not yet checkpointed into the file.
    stack.gw.proc.kill9();
    let db = pg::TestDb::create().await;
    let out = migrate(&from(&stack.gw.data_dir), &format!("postgres:{}", db.url));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(db.query_i64("SELECT count(*) FROM usage_events").await, 20);
    assert_eq!(
        db.query_i64("SELECT used FROM resource_packages WHERE kind = 'free'")
            .await,
        20
    );
}
