//! Nothing is lost on `kill -9`, nothing is duplicated, state survives a
//! restart, and SIGTERM drains in-flight tasks and refuses queued ones.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Opts, Stack, wait_for};
use http::{Method, StatusCode};
use tokio::sync::Mutex;

/// The export's event ids once it holds `n` events (it tails the store and
/// may lag a commit briefly).
async fn jsonl_ids(stack: &Stack, n: usize) -> Vec<String> {
    common::wait_for_jsonl(&stack.gw.data_dir, n)
        .await
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_success_and_duplicates_nothing() {
    let mut stack = Stack::start(Opts::default());
    let mut keys = Vec::new();
    for i in 0..4 {
        keys.push(stack.account_with_key(&format!("acct{i}")).await);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let succeeded = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for w in 0..16usize {
        let client = stack.client();
        let key = keys[w % 4].clone();
        let stop = stop.clone();
        let succeeded = succeeded.clone();
        workers.push(tokio::spawn(async move {
            // Bounded: at most 2,000 tasks per worker, and it stops at the
            // first refused connection (the gateway is dead).
            for n in 0..2000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let rid = format!("w{w}-{n}");
                let auth = format!("Bearer {key}");
                let r = client
                    .http
                    .try_send(
                        Method::POST,
                        &format!("{}/v1/x", client.url),
                        &[
                            ("authorization", &auth),
                            ("x-request-id", &rid),
                            ("x-sim-delay-ms", "2"),
                        ],
                        "{}",
                    )
                    .await;
                match r {
                    Ok(r) if r.status == StatusCode::OK => succeeded.lock().await.push(rid),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    stack.gw.proc.kill9();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let succeeded = succeeded.lock().await.clone();
    assert!(
        succeeded.len() > 50,
        "the load ran ({} successes)",
        succeeded.len()
    );
    eprintln!("kill -9 after {} successes", succeeded.len());

    stack.gw.restart(&Opts::default());
    let events = stack.admin().all_events().await;
    let event_ids: HashSet<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(event_ids.len(), events.len(), "no event stored twice");
    let charged: Vec<&str> = events
        .iter()
        .map(|e| e["data"]["request_id"].as_str().unwrap())
        .collect();
    let charged_set: HashSet<&str> = charged.iter().copied().collect();
    assert_eq!(charged_set.len(), charged.len(), "no task charged twice");
    for rid in &succeeded {
        assert!(
            charged_set.contains(rid.as_str()),
            "success {rid} lost in the crash"
        );
    }
    // Events may exist for tasks whose answer the crash cut off (stored,
    // then killed before the client read it), never more than the workers
    // had in flight.
    assert!(events.len() - succeeded.len() <= 16);
    // The JSON Lines export was repaired at restart: every event, once.
    let lines = jsonl_ids(&stack, events.len()).await;
    assert_eq!(lines.len(), events.len());
    assert_eq!(lines.iter().collect::<HashSet<_>>().len(), lines.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_accounts_sub_accounts_and_keys() {
    let mut stack = Stack::start(Opts::default());
    let admin = stack.admin();
    admin.create_account("acme").await;
    admin.create_sub("acme", "acme-dev", Some(2)).await;
    let (_, dev) = admin.issue_key("acme", Some("acme-dev")).await;
    let (revoked_id, revoked) = admin.issue_key("acme", None).await;
    assert_eq!(
        admin
            .call(Method::DELETE, &format!("/v1/keys/{revoked_id}"), None)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(stack.task(&dev, &[]).await.status, StatusCode::OK);
    let status = stack.gw.proc.sigterm_and_wait(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "clean exit on SIGTERM: {status:?}"
    );

    stack.gw.restart(&Opts::default());
    let admin = stack.admin();
    let a = admin.account("acme").await;
    assert_eq!(a["status"], "active");
    assert_eq!(a["sub_accounts"][0]["id"], "acme-dev");
    assert_eq!(a["sub_accounts"][0]["max_concurrency"], 2);
    assert_eq!(stack.task(&dev, &[]).await.status, StatusCode::OK);
    assert_eq!(
        stack.task(&revoked, &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(admin.all_events().await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_tasks_refuses_queued_ones_and_exits_0() {
    let mut stack = Stack::start(Opts::default());
    let admin = stack.admin();
    let key = stack.account_with_key("acme").await;
    let client = stack.client();
    let running: Vec<_> = (0..3)
        .map(|i| client.spawn(&key, 3000, &format!("run{i}")))
        .collect();
    wait_for(&admin, "acme", "3 in flight", |a| {
        a["concurrency"]["in_flight"] == 3
    })
    .await;
    let queued = client.spawn(&key, 10, "queued");
    wait_for(&admin, "acme", "1 queued", |a| {
        a["concurrency"]["queued"] == 1
    })
    .await;

    let pid = stack.gw.proc.pid();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let q = queued.await.unwrap();
    assert_eq!(q.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(q.error_code(), "FailedOperation.ServiceShuttingDown");
    for h in running {
        assert_eq!(h.await.unwrap().status, StatusCode::OK);
    }
    let status = stack.gw.proc.sigterm_and_wait(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");

    stack.gw.restart(&Opts::default());
    assert_eq!(stack.admin().all_events().await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_that_lost_its_database_is_refused() {
    let mut stack = Stack::start(Opts::default());
    let key = stack.account_with_key("acme").await;
    assert_eq!(stack.task(&key, &[]).await.status, StatusCode::OK);
    // The export has the success's line before the gateway stops.
    common::wait_for_jsonl(&stack.gw.data_dir, 1).await;
    assert!(
        stack
            .gw
            .proc
            .sigterm_and_wait(Duration::from_secs(10))
            .is_some()
    );
    let data = stack.gw.data_dir.clone();
    // Emptied (a failed restore, a full disk): not a fresh start.
    std::fs::write(data.join("tollgate.db"), b"").unwrap();
    for side in ["tollgate.db-wal", "tollgate.db-shm"] {
        let _ = std::fs::remove_file(data.join(side));
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config", stack.gw.config_path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tollgate.db is empty"), "{err}");
    assert!(err.contains("has held data"), "{err}");
    assert_eq!(
        std::fs::metadata(data.join("tollgate.db")).unwrap().len(),
        0,
        "nothing was created in its place"
    );
}
