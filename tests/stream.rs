//! Usage events on NATS JetStream (SPEC §11), against the real binary and a
//! real NATS: the machine's (127.0.0.1:4222) with a stream and subject of
//! each test's own, or a private `nats-server -js` on a free port for the
//! tests that kill it. A durable consumer must see exactly the store's
//! events, each once, in per-account commit order, whatever NATS or the
//! gateway does in between.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::{Opts, Stack};
use http::StatusCode;
use serde_json::Value;

fn unique(tag: &str) -> String {
    format!(
        "{tag}{}{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn nats_server_bin() -> PathBuf {
    for p in ["/usr/sbin/nats-server", "/usr/bin/nats-server"] {
        if std::path::Path::new(p).exists() {
            return p.into();
        }
    }
    PathBuf::from("nats-server")
}

/// A `nats-server -js` of this test's own, on a free port, keeping its
/// JetStream data in a temp dir across restarts.
struct PrivateNats {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl PrivateNats {
    fn start() -> Self {
        let mut n = Self {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        n.run();
        n
    }

    fn run(&mut self) {
        let child = Command::new(nats_server_bin())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server runs");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.kill();
    }
}

struct StreamOpts {
    url: String,
    subject: String,
    stream: String,
}

impl StreamOpts {
    fn new(url: &str) -> Self {
        let id = unique("");
        Self {
            url: url.to_string(),
            subject: format!("tgtest.{id}"),
            stream: format!("TGTEST_{id}"),
        }
    }

    fn opts(&self) -> Opts {
        Opts {
            extra_toml: format!(
                "[events]\nstream = \"nats\"\nnats_url = \"{}\"\nsubject = \"{}\"\nstream_name = \"{}\"\n",
                self.url, self.subject, self.stream
            ),
            ..Opts::default()
        }
    }

    async fn consume(&self, n: usize, within: Duration) -> Vec<(String, Value)> {
        common::consume_stream(&self.url, &self.stream, n, within).await
    }

    async fn delete(&self) {
        if let Ok(client) = async_nats::connect(self.url.as_str()).await {
            let _ = jetstream::new(client).delete_stream(&self.stream).await;
        }
    }
}

/// The consumer saw exactly the store's events, once each, and each
/// account's in the store's commit order, on `<subject>.<account>`.
fn assert_matches_store(subject: &str, seen: &[(String, Value)], stored: &[Value]) {
    let ids: Vec<&str> = seen
        .iter()
        .map(|(_, v)| v["id"].as_str().unwrap())
        .collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "an event seen twice");
    let stored_ids: HashSet<&str> = stored.iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!(
        unique, stored_ids,
        "the stream holds exactly the store's events"
    );
    for (subj, v) in seen {
        assert_eq!(
            subj,
            &format!("{subject}.{}", v["subject"].as_str().unwrap())
        );
    }
    let order = |evs: &mut dyn Iterator<Item = &Value>| {
        let mut by: HashMap<String, Vec<String>> = HashMap::new();
        for v in evs {
            by.entry(v["subject"].as_str().unwrap().into())
                .or_default()
                .push(v["id"].as_str().unwrap().into());
        }
        by
    };
    assert_eq!(
        order(&mut seen.iter().map(|(_, v)| v)),
        order(&mut stored.iter()),
        "per-account order"
    );
}

async fn run_tasks(stack: &Stack, keys: &[String], n: usize) {
    let client = stack.client();
    let per = n / keys.len();
    let handles: Vec<_> = keys
        .iter()
        .map(|k| {
            let client = client.clone();
            let k = k.clone();
            tokio::spawn(async move {
                for _ in 0..per {
                    let r = client.task(&k, &[("x-sim-delay-ms", "0")]).await;
                    assert_eq!(
                        r.status,
                        StatusCode::OK,
                        "{}",
                        String::from_utf8_lossy(&r.body)
                    );
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
}

async fn accounts(stack: &Stack, n: usize) -> Vec<String> {
    let mut keys = Vec::new();
    for i in 0..n {
        keys.push(stack.account_with_key(&format!("acct{i}")).await);
    }
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_reaches_the_stream_once_in_per_account_order() {
    let s = StreamOpts::new("nats://127.0.0.1:4222");
    let stack = Stack::start(s.opts());
    let keys = accounts(&stack, 5).await;
    run_tasks(&stack, &keys, 500).await;
    let stored = stack.admin().all_events().await;
    assert_eq!(stored.len(), 500);
    let seen = s.consume(500, Duration::from_secs(30)).await;
    assert_matches_store(&s.subject, &seen, &stored);
    s.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_fails_no_task_and_loses_no_event() {
    let mut nats = PrivateNats::start();
    let s = StreamOpts::new(&nats.url());
    let stack = Stack::start(s.opts());
    let keys = accounts(&stack, 2).await;
    run_tasks(&stack, &keys, 60).await;
    nats.kill();
    // Tasks go on while NATS is away; the gateway stays ready.
    run_tasks(&stack, &keys, 60).await;
    let (status, ready) = stack
        .http
        .get_json(&format!("{}/readyz", stack.gw.admin), &[])
        .await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    nats.run();
    run_tasks(&stack, &keys, 20).await;
    let stored = stack.admin().all_events().await;
    assert_eq!(stored.len(), 140);
    let seen = s.consume(140, Duration::from_secs(40)).await;
    assert_matches_store(&s.subject, &seen, &stored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_publishing_loses_nothing_and_repeats_nothing() {
    let s = StreamOpts::new("nats://127.0.0.1:4222");
    let mut stack = Stack::start(s.opts());
    let keys = accounts(&stack, 4).await;
    run_tasks(&stack, &keys, 400).await;
    // Killed with events committed and (likely) not all published yet.
    stack.gw.proc.kill9();
    stack.gw.restart(&s.opts());
    run_tasks(&stack, &keys, 40).await;
    let stored = stack.admin().all_events().await;
    assert_eq!(stored.len(), 440);
    let seen = s.consume(440, Duration::from_secs(40)).await;
    assert_matches_store(&s.subject, &seen, &stored);
    s.delete().await;
}

/// A watermark far behind what the stream holds (a crash between many
/// acks and the watermark's write, made certain here by moving it back to
/// the start): the publisher sends every event again, the stream drops
/// them all as duplicates (its duplicate check comes before the
/// pipelined publishes' order check, so they go through at full speed),
/// and the consumer sees only the new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watermark_behind_the_stream_republishes_nothing_the_consumer_sees() {
    let s = StreamOpts::new("nats://127.0.0.1:4222");
    let mut stack = Stack::start(s.opts());
    let keys = accounts(&stack, 3).await;
    run_tasks(&stack, &keys, 300).await;
    let first = s.consume(300, Duration::from_secs(30)).await;
    assert_eq!(first.len(), 300);
    stack.gw.proc.kill9();
    let db = rusqlite::Connection::open(stack.gw.data_dir.join("tollgate.db")).unwrap();
    db.execute(
        "INSERT INTO meta(key, value) VALUES ('watermark:nats', 0)
         ON CONFLICT(key) DO UPDATE SET value = 0",
        [],
    )
    .unwrap();
    drop(db);
    stack.gw.restart(&s.opts());
    run_tasks(&stack, &keys, 30).await;
    let stored = stack.admin().all_events().await;
    assert_eq!(stored.len(), 330);
    let later = s.consume(30, Duration::from_secs(20)).await;
    let mut seen = first;
    seen.extend(later);
    assert_matches_store(&s.subject, &seen, &stored);
    s.delete().await;
}

#[test]
fn a_bad_nats_url_is_refused_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (url, key) in [
        ("localhost:4222", "events.nats_url"),
        ("nats://", "events.nats_url"),
    ] {
        let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["serve"])
            .env("TOLLGATE_SERVER_LISTEN", "127.0.0.1:0")
            .env("TOLLGATE_ADMIN_LISTEN", "127.0.0.1:0")
            .env("TOLLGATE_STORAGE_DATA_DIR", dir.path())
            .env("TOLLGATE_EVENTS_STREAM", "nats")
            .env("TOLLGATE_EVENTS_NATS_URL", url)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (code, out) = common::refused_start(child);
        assert_eq!(code, Some(2), "{out}");
        assert!(out.contains(key), "{out}");
    }
}

/// NATS that cannot be reached at start is an outage like any other: the
/// gateway serves, is ready, counts the errors, and publishes once NATS
/// is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_nats_at_start_is_an_outage_not_a_failure() {
    let port = free_port();
    let s = StreamOpts::new(&format!("nats://127.0.0.1:{port}"));
    let stack = Stack::start(s.opts());
    let keys = accounts(&stack, 1).await;
    run_tasks(&stack, &keys, 10).await;
    let text = stack
        .http
        .send(
            http::Method::GET,
            &format!("{}/metrics", stack.gw.admin),
            &[],
            "",
        )
        .await;
    let text = String::from_utf8_lossy(&text.body).to_string();
    let errors: f64 = text
        .lines()
        .find(|l| l.starts_with("tollgate_stream_errors_total"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(errors >= 1.0, "{text}");
    let mut nats = PrivateNats {
        port,
        dir: tempfile::tempdir().unwrap(),
        child: None,
    };
    nats.run();
    let seen = s.consume(10, Duration::from_secs(30)).await;
    assert_eq!(seen.len(), 10);
}
