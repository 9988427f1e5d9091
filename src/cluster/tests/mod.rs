//! Tests against a real Redis: the shared one on 127.0.0.1:6379 (each test
//! with its own key prefix, deleted at the end) and, for outages, private
//! servers this process starts and kills.

mod conformance;
mod outage;
mod replicas;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::OnceCell;
use tokio::time::Instant;

use super::{ClusterSettings, Coordinator};
use crate::config::RedisOutagePolicy;

pub(super) const SHARED_URL: &str = "redis://127.0.0.1:6379/0";
/// Short leases, so crash recovery is seen within a test's patience.
pub(super) const LEASE: Duration = Duration::from_millis(1000);

static SHARED_UP: OnceCell<()> = OnceCell::const_new();

async fn ping(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let attempt = async {
        let mut c = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut c).await
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Ok(_))
    )
}

/// The shared Redis; started once if nobody runs it yet.
pub(super) async fn shared_redis() {
    SHARED_UP
        .get_or_init(|| async {
            if ping(SHARED_URL).await {
                return;
            }
            let _ = Command::new("redis-server")
                .args([
                    "--daemonize",
                    "yes",
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    "6379",
                ])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while !ping(SHARED_URL).await {
                assert!(
                    Instant::now() < deadline,
                    "no Redis on 127.0.0.1:6379 and none could be started"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
}

/// A key prefix of one's own: tests never touch each other's keys.
pub(super) fn prefix() -> String {
    format!("tgtest-{}", uuid::Uuid::new_v4().simple())
}

pub(super) fn instance_name() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("gw-{}", N.fetch_add(1, Ordering::Relaxed))
}

pub(super) fn settings(
    url: &str,
    prefix: &str,
    instance: &str,
    on_outage: RedisOutagePolicy,
) -> ClusterSettings {
    ClusterSettings {
        redis_url: url.to_string(),
        key_prefix: prefix.to_string(),
        lease: LEASE,
        on_outage,
        instance: instance.to_string(),
    }
}

/// A replica on the shared Redis under a fresh instance name.
pub(super) async fn replica(prefix: &str) -> Arc<Coordinator> {
    shared_redis().await;
    Coordinator::start(settings(
        SHARED_URL,
        prefix,
        &instance_name(),
        RedisOutagePolicy::Local,
    ))
    .await
    .expect("a replica joins")
}

/// Deletes every key under the prefix.
pub(super) async fn cleanup(prefix: &str) {
    let Ok(client) = redis::Client::open(SHARED_URL) else {
        return;
    };
    let Ok(mut c) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut c)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: Result<i64, _> = redis::cmd("DEL").arg(keys).query_async(&mut c).await;
    }
}

/// Polls `ok` until it holds, failing after `within`.
pub(super) async fn eventually(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A `redis-server` of this test alone, on a free port, killed on drop.
pub(super) struct PrivateRedis {
    pub(super) port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    pub(super) async fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut s = Self { port, child: None };
        s.restart().await;
        s
    }

    pub(super) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub(super) async fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !ping(&self.url()).await {
            assert!(Instant::now() < deadline, "the private Redis did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(super) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
