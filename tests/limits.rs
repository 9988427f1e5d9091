//! The concurrency invariants, against the real binary over real sockets:
//! the limit is never exceeded at the backend and is reached, accounts are
//! isolated, FIFO order, queue bounds and deadlines, and no slot leaks when
//! clients give up.

mod common;

use std::time::Duration;

use common::{Opts, Stack, raw_partial_task, raw_task, wait_for};
use futures_util::future::join_all;
use http::StatusCode;
use serde_json::Value;

fn queued(n: u64) -> impl Fn(&Value) -> bool {
    move |a| a["concurrency"]["queued"] == n
}

fn in_flight(n: u64) -> impl Fn(&Value) -> bool {
    move |a| a["concurrency"]["in_flight"] == n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_is_shared_by_root_and_sub_accounts_never_exceeded_and_reached() {
    let stack = Stack::start(Opts::default());
    let admin = stack.admin();
    admin.create_account("acme").await;
    admin.create_sub("acme", "acme-dev", None).await;
    admin.create_sub("acme", "acme-ops", None).await;
    let keys = [
        admin.issue_key("acme", None).await.1,
        admin.issue_key("acme", Some("acme-dev")).await.1,
        admin.issue_key("acme", Some("acme-ops")).await.1,
    ];
    let tasks = (0..36).map(|i| stack.task(&keys[i % 3], &[("x-sim-delay-ms", "200")]));
    let results = join_all(tasks).await;
    assert!(results.iter().all(|r| r.status == StatusCode::OK));
    assert_eq!(
        stack.sim.max_in_flight(&stack.http, "acme").await,
        3,
        "limit 3, exactly reached"
    );
    let a = wait_for(&admin, "acme", "idle", in_flight(0)).await;
    assert_eq!(a["concurrency"]["limit"], 3);
    assert_eq!(a["concurrency"]["queued"], 0);
}

/// Four data-plane workers, each its own runtime and listening socket:
/// connections land on any of them, and the limit is still one limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_holds_across_data_plane_workers() {
    let stack = Stack::start(Opts {
        env: vec![("TOLLGATE_SERVER_WORKERS", "4".into())],
        ..Opts::default()
    });
    let admin = stack.admin();
    let keys = [
        stack.account_with_key("alpha").await,
        stack.account_with_key("beta").await,
    ];
    // Each task on a new connection, so the kernel spreads them over the
    // four sockets.
    let tasks = (0..40).map(|i| {
        let key = keys[i % 2].clone();
        let client = common::TaskClient {
            http: common::Http::new(),
            url: stack.gw.url.clone(),
        };
        async move { client.task(&key, &[("x-sim-delay-ms", "150")]).await.status }
    });
    let statuses = join_all(tasks).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    for account in ["alpha", "beta"] {
        assert_eq!(
            stack.sim.max_in_flight(&stack.http, account).await,
            3,
            "{account}: limit 3, reached and never exceeded"
        );
        wait_for(&admin, account, "idle", in_flight(0)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_account_cap_holds_inside_the_root_limit() {
    let stack = Stack::start(Opts::default());
    let admin = stack.admin();
    admin.create_account("acme").await;
    admin.create_sub("acme", "acme-dev", Some(1)).await;
    let root = admin.issue_key("acme", None).await.1;
    let dev = admin.issue_key("acme", Some("acme-dev")).await.1;
    let dev_tasks = (0..6).map(|_| stack.task(&dev, &[("x-sim-delay-ms", "200")]));
    let root_tasks = (0..6).map(|_| stack.task(&root, &[("x-sim-delay-ms", "200")]));
    let (a, b) = tokio::join!(join_all(dev_tasks), join_all(root_tasks));
    assert!(a.iter().chain(b.iter()).all(|r| r.status == StatusCode::OK));
    assert_eq!(
        stack.sim.max_in_flight(&stack.http, "sub:acme-dev").await,
        1
    );
    assert_eq!(stack.sim.max_in_flight(&stack.http, "acme").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_are_isolated() {
    let stack = Stack::start(Opts::default());
    let a = stack.account_with_key("alpha").await;
    let b = stack.account_with_key("beta").await;
    // Alpha floods its queue; beta still gets its own 3 slots at once.
    let alpha = (0..20).map(|_| stack.task(&a, &[("x-sim-delay-ms", "150")]));
    let beta = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        join_all((0..6).map(|_| stack.task(&b, &[("x-sim-delay-ms", "300")]))).await
    };
    let (ra, rb) = tokio::join!(join_all(alpha), beta);
    assert!(
        ra.iter()
            .chain(rb.iter())
            .all(|r| r.status == StatusCode::OK)
    );
    for r in &rb {
        let waited: u64 = r.header("x-queue-wait-ms").unwrap().parse().unwrap();
        assert!(
            waited < 1000,
            "beta waited {waited} ms behind alpha's queue"
        );
    }
    assert_eq!(stack.sim.max_in_flight(&stack.http, "alpha").await, 3);
    assert_eq!(stack.sim.max_in_flight(&stack.http, "beta").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_tasks_are_admitted_in_arrival_order() {
    let stack = Stack::start(Opts::default());
    let admin = stack.admin();
    let key = stack.account_with_key("acme").await;
    let client = stack.client();
    // Three holders that finish ~300 ms apart, so each release admits one
    // waiter and the backend sees the admissions in grant order; long
    // enough that all six are queued before the first ends, even on a
    // loaded machine.
    let mut handles = vec![
        client.spawn(&key, 2000, "hold-1"),
        client.spawn(&key, 2300, "hold-2"),
        client.spawn(&key, 2600, "hold-3"),
    ];
    wait_for(&admin, "acme", "3 in flight", in_flight(3)).await;
    for i in 0..6u64 {
        handles.push(client.spawn(&key, 250, &format!("q{i}")));
        wait_for(&admin, "acme", "queued", queued(i + 1)).await;
    }
    for h in handles {
        assert_eq!(h.await.unwrap().status, StatusCode::OK);
    }
    let stats = stack.sim.stats(&stack.http).await;
    let arrivals: Vec<&str> = stats["accounts"]["acme"]["arrivals"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .filter(|id| id.starts_with('q'))
        .collect();
    assert_eq!(arrivals, ["q0", "q1", "q2", "q3", "q4", "q5"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_job_num_exceed_with_retry_after() {
    let stack = Stack::start(Opts {
        extra_toml: "[limits]\nmax_queue_per_account = 2\n".into(),
        ..Opts::default()
    });
    let admin = stack.admin();
    let key = stack.account_with_key("acme").await;
    let client = stack.client();
    let mut handles = stack.hold_slots("acme", &key, 3, 3000).await;
    handles.push(client.spawn(&key, 10, "w0"));
    handles.push(client.spawn(&key, 10, "w1"));
    wait_for(&admin, "acme", "2 queued", queued(2)).await;
    let r = stack.task(&key, &[]).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.error_code(), "RequestLimitExceeded.JobNumExceed");
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!(retry >= 1);
    assert!(r.header("x-request-id").is_some());
    for h in handles {
        assert_eq!(h.await.unwrap().status, StatusCode::OK);
    }
    // Nothing was charged for the refused task.
    assert_eq!(admin.all_events().await.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_timeout_header_gives_queue_timeout() {
    let stack = Stack::start(Opts::default());
    let admin = stack.admin();
    let key = stack.account_with_key("acme").await;
    let holders = stack.hold_slots("acme", &key, 3, 1500).await;
    let r = stack.task(&key, &[("x-queue-timeout-ms", "150")]).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.error_code(), "RequestLimitExceeded.QueueTimeout");
    assert!(r.header("retry-after").is_some());
    let waited: u64 = r.header("x-queue-wait-ms").unwrap().parse().unwrap();
    assert!(waited >= 150, "waited {waited}");
    let a = admin.account("acme").await;
    assert_eq!(
        a["concurrency"]["queued"], 0,
        "the expired task left the queue"
    );
    // A malformed header is a clear 400, not a silent default.
    let bad = stack.task(&key, &[("x-queue-timeout-ms", "soon")]).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.error_code(), "InvalidParameter.InvalidParameter");
    for h in holders {
        assert_eq!(h.await.unwrap().status, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_while_queued_leaves_at_once_and_never_reaches_the_backend() {
    let stack = Stack::start(Opts::default());
    let admin = stack.admin();
    let key = stack.account_with_key("acme").await;
    let holders = stack.hold_slots("acme", &key, 3, 1500).await;
    // One client sent its whole (small) body; the other is still uploading
    // a large one when it hangs up, so the gateway has unread bytes on the
    // socket and must notice the hang-up without reading them.
    let ghost = raw_task(
        &stack.gw.url,
        &key,
        "X-Request-Id: ghost\r\n",
        r#"{"InputImage":"x"}"#,
    )
    .await;
    let uploading = raw_partial_task(
        &stack.gw.url,
        &key,
        "X-Request-Id: ghost-upload\r\n",
        1 << 20,
        64 << 10,
    )
    .await;
    wait_for(&admin, "acme", "2 queued", queued(2)).await;
    drop(ghost);
    drop(uploading);
    // Long before the holders finish (1.5 s), the ghost is out of the queue.
    let a = wait_for(&admin, "acme", "queue empty", queued(0)).await;
    assert_eq!(a["concurrency"]["in_flight"], 3);
    for h in holders {
        assert_eq!(h.await.unwrap().status, StatusCode::OK);
    }
    let stats = stack.sim.stats(&stack.http).await;
    let arrivals = stats["accounts"]["acme"]["arrivals"]
        .as_array()
        .unwrap()
        .clone();
    assert!(
        !arrivals
            .iter()
            .any(|v| v.as_str().unwrap().starts_with("ghost")),
        "{arrivals:?}"
    );
    let events = admin.all_events().await;
    assert_eq!(events.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_clients_giving_up_leaks_no_slot() {
    let stack = Stack::start(Opts::default());
    let admin = stack.admin();
    let key = stack.account_with_key("acme").await;
    // 60 clients, each on its own connection, hang up after 0..300 ms:
    // some while queued, some while their task is at the backend.
    let storm = (0..60u64).map(|i| {
        let url = stack.gw.url.clone();
        let key = key.clone();
        async move {
            let s = raw_task(&url, &key, "X-Sim-Delay-Ms: 100\r\n", "{}").await;
            tokio::time::sleep(Duration::from_millis((i * 37) % 300)).await;
            drop(s);
        }
    });
    join_all(storm).await;
    let a = wait_for(&admin, "acme", "idle", |a| {
        a["concurrency"]["in_flight"] == 0 && a["concurrency"]["queued"] == 0
    })
    .await;
    assert_eq!(a["concurrency"]["limit"], 3);
    assert!(stack.sim.max_in_flight(&stack.http, "acme").await <= 3);
    // All three slots are free: three new tasks start at once.
    let fresh = (0..3).map(|_| {
        stack.task(
            &key,
            &[("x-sim-delay-ms", "10"), ("x-queue-timeout-ms", "0")],
        )
    });
    for r in join_all(fresh).await {
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());
        assert_eq!(r.header("x-queue-wait-ms").as_deref(), Some("0"));
    }
    // Tasks that reached the backend ran to completion and were billed,
    // flagged client_gone; no event for a task that never got there.
    let events = admin.all_events().await;
    let sim_requests = stack.sim.stats(&stack.http).await["accounts"]["acme"]["requests"]
        .as_u64()
        .unwrap();
    assert_eq!(events.len() as u64, sim_requests);
    assert!(events.iter().any(|e| e["data"]["client_gone"] == true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_is_cut_off_and_frees_its_slot() {
    let stack = Stack::start(Opts {
        extra_toml: "[limits]\nbody_idle_timeout_ms = 300\n".into(),
        ..Opts::default()
    });
    let key = stack.account_with_key("acme").await;
    // Headers and half of the body, then silence: the task gets its slot
    // (a free one) and starts forwarding, then the body stalls.
    let mut s = raw_partial_task(&stack.gw.url, &key, "", 1000, 500).await;
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut answer),
    )
    .await;
    assert!(read.is_ok(), "the gateway answered a stalled upload");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.contains("FailedOperation.RequestBodyTimeout"),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // The slot and the unit came back: the whole limit runs at once.
    let idle = stack.admin().wait_idle("acme").await;
    assert_eq!(idle["concurrency"]["in_flight"], 0);
    let tasks: Vec<_> = (0..3)
        .map(|i| stack.client().spawn(&key, 200, &format!("after{i}")))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().status, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_upload_below_the_minimum_rate_is_cut_off_and_frees_its_slot() {
    let stack = Stack::start(Opts {
        extra_toml: "[limits]\nbody_idle_timeout_ms = 500\nmin_body_rate_bytes_per_s = 1000\n"
            .into(),
        ..Opts::default()
    });
    let key = stack.account_with_key("acme").await;
    // One byte every 100 ms: never idle for 500 ms, but ~10 bytes/s, far
    // below the 1,000 bytes/s minimum.
    let mut s = raw_partial_task(&stack.gw.url, &key, "", 100_000, 1).await;
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if tokio::io::AsyncWriteExt::write_all(&mut s, b"x")
            .await
            .is_err()
        {
            break;
        }
        let mut buf = [0u8; 4096];
        if let Ok(Ok(n)) = tokio::time::timeout(
            Duration::from_millis(1),
            tokio::io::AsyncReadExt::read(&mut s, &mut buf),
        )
        .await
        {
            answer.extend_from_slice(&buf[..n]);
            if n == 0 || !answer.is_empty() {
                break;
            }
        }
    }
    if answer.is_empty() {
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read_to_end(&mut s, &mut answer),
        )
        .await;
    }
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.contains("FailedOperation.RequestBodyTimeout"),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cut once the first idle window showed the rate"
    );
    let idle = stack.admin().wait_idle("acme").await;
    assert_eq!(idle["concurrency"]["in_flight"], 0);
}

/// Descriptors the process holds now.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_task_costs_one_descriptor_and_the_queue_across_accounts_is_capped() {
    let stack = Stack::start(Opts {
        extra_toml: "[limits]\nmax_queued_tasks = 40\nmax_queue_per_account = 100\n".into(),
        ..Opts::default()
    });
    let key = stack.account_with_key("acme").await;
    let held = stack.hold_slots("acme", &key, 3, 5_000).await;
    let before = open_fds(stack.gw.proc.pid());
    // 30 queued tasks, each on its own connection, bodies unread.
    let mut queued = Vec::new();
    for _ in 0..30 {
        queued.push(raw_partial_task(&stack.gw.url, &key, "", 10, 10).await);
    }
    wait_for(&stack.admin(), "acme", "30 queued", |a| {
        a["concurrency"]["queued"] == 30
    })
    .await;
    let added = open_fds(stack.gw.proc.pid()) - before;
    assert!(
        added <= 36,
        "30 queued tasks took {added} descriptors (one each expected, not two)"
    );
    // 10 more fit the 40 across accounts; past that, a clear refusal.
    let admin = stack.admin();
    admin.create_account("other").await;
    let other = admin.issue_key("other", None).await.1;
    let other_held = stack.hold_slots("other", &other, 3, 5_000).await;
    for _ in 0..10 {
        queued.push(raw_partial_task(&stack.gw.url, &other, "", 10, 10).await);
    }
    wait_for(&admin, "other", "10 queued", |a| {
        a["concurrency"]["queued"] == 10
    })
    .await;
    let r = stack.task(&other, &[]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.error_code(), "RequestLimitExceeded");
    // Hang-ups still leave the queue at once (no second descriptor needed).
    drop(queued);
    wait_for(&admin, "acme", "queue empty", |a| {
        a["concurrency"]["queued"] == 0
    })
    .await;
    for h in held.into_iter().chain(other_held) {
        assert_eq!(h.await.unwrap().status, StatusCode::OK);
    }
    let r = stack.task(&other, &[]).await;
    assert_eq!(r.status, StatusCode::OK);
}

/// `limits.default_concurrency` is live: raised by a SIGHUP from 3 to 5,
/// every account gets 5 at once and its queued tasks start without
/// waiting for the running ones; the backend sees 5 at once, never more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_default_concurrency_applies_to_every_account_at_once() {
    let stack = Stack::start(Opts {
        extra_toml: "[limits]\ndefault_concurrency = 3\n".into(),
        env: vec![("RUST_LOG", String::new())],
    });
    let key = stack.account_with_key("acme").await;
    let held = stack.hold_slots("acme", &key, 3, 2_500).await;
    let client = stack.client();
    let queued: Vec<_> = (0..3)
        .map(|i| client.spawn(&key, 2_500, &format!("q{i}")))
        .collect();
    wait_for(&stack.admin(), "acme", "3 queued", |a| {
        a["concurrency"]["queued"] == 3
    })
    .await;
    let original = std::fs::read_to_string(&stack.gw.config_path).unwrap();
    std::fs::write(
        &stack.gw.config_path,
        original.replace("default_concurrency = 3", "default_concurrency = 5"),
    )
    .unwrap();
    stack.gw.proc.hangup();
    // Two of the queued tasks start while the first three still run.
    let view = wait_for(&stack.admin(), "acme", "the new limit in force", |a| {
        a["concurrency"]["in_flight"] == 5
    })
    .await;
    assert_eq!(view["concurrency"]["limit"], 5, "{view}");
    assert_eq!(view["concurrency"]["queued"], 1, "{view}");
    // Another account, never used before, gets the new default too.
    stack.admin().create_account("other").await;
    assert_eq!(
        stack.admin().account("other").await["concurrency"]["limit"],
        5
    );
    for h in held.into_iter().chain(queued) {
        assert_eq!(h.await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(stack.sim.max_in_flight(&stack.http, "acme").await, 5);
    assert!(
        !stack.gw.proc.logs().contains("limits.default_concurrency"),
        "not named as a key that needs a restart:\n{}",
        stack.gw.proc.logs()
    );
}
