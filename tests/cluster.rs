//! Cluster mode (SPEC §8), black-box: three replicas of the real binary
//! sharing one Redis (coordination) and one PostgreSQL (durable store) in
//! front of the simulator, which counts what reaches it per account. Each
//! promise of §8 is its own test.
//!
//! Every test uses its own PostgreSQL database and Redis key prefix on the
//! servers the machine runs (127.0.0.1:5432 and :6379), and never touches
//! what is not its own; the fault tests start private servers on free ports
//! so they can stop them. The tests run one at a time (they start several
//! processes each and assert "within 1 s" promises).

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Admin, Gateway, Http, Opts, Resp, Simulator, TaskClient};
use http::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::sync::Mutex;

/// One cluster test at a time (each test has its own runtime; this lock
/// does not care which).
static SERIAL: Mutex<()> = Mutex::const_new(());

fn unique(tag: &str) -> String {
    format!(
        "{tag}_{}",
        uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
    )
}

fn run(cmd: &mut Command) -> std::process::Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// A free TCP port on loopback.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_millis(200),
    )
    .is_ok()
}

fn wait_port(port: u16, open: bool, within: Duration) {
    let deadline = Instant::now() + within;
    while port_open(port) != open {
        assert!(
            Instant::now() < deadline,
            "port {port} never became {}",
            if open { "open" } else { "closed" }
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The machine's PostgreSQL and Redis, started if they are not running.
fn ensure_shared_servers() {
    if !port_open(5432) {
        let versions = std::fs::read_dir("/etc/postgresql")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        for v in versions {
            let _ = run(Command::new("pg_ctlcluster").args([
                "--skip-systemctl-redirect",
                &v,
                "main",
                "start",
            ]));
        }
        wait_port(5432, true, Duration::from_secs(20));
    }
    if !port_open(6379) {
        let _ = run(Command::new("redis-server").args([
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
        ]));
        wait_port(6379, true, Duration::from_secs(10));
    }
}

fn psql(port: u16, sql: &str) -> std::process::Output {
    run(Command::new("psql").args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-v",
        "ON_ERROR_STOP=1",
        "-qAtc",
        sql,
    ]))
}

/// A database of the test's own, dropped at the end.
struct Database {
    port: u16,
    name: String,
}

impl Database {
    fn create(port: u16) -> Self {
        let name = unique("tollgate_c");
        let out = psql(port, &format!("CREATE DATABASE {name}"));
        assert!(
            out.status.success(),
            "create database: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { port, name }
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.port, self.name)
    }

    fn count(&self, sql: &str) -> i64 {
        let out = run(Command::new("psql").args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "-d",
            &self.name,
            "-qAtc",
            sql,
        ]));
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(-1)
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let _ = psql(
            self.port,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// Deletes the test's own Redis keys (never a flush).
fn drop_redis_prefix(port: u16, prefix: &str) {
    let out = run(Command::new("redis-cli").args([
        "-p",
        &port.to_string(),
        "--scan",
        "--pattern",
        &format!("{prefix}:*"),
    ]));
    let keys: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    for chunk in keys.chunks(500) {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-p", &port.to_string(), "DEL"]).args(chunk);
        let _ = run(&mut cmd);
    }
}

/// A private `redis-server` on a free port, so a test can kill it.
struct PrivateRedis {
    port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    fn start() -> Self {
        let mut r = Self {
            port: free_port(),
            child: None,
        };
        r.restart();
        r
    }

    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
        wait_port(self.port, true, Duration::from_secs(10));
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        wait_port(self.port, false, Duration::from_secs(10));
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A private PostgreSQL cluster on a free port, run as the `postgres` user
/// (PostgreSQL refuses to run as root), so a test can stop it.
struct PrivatePostgres {
    port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

fn pg_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL binaries under /usr/lib/postgresql")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().expect("an initdb")
}

fn as_postgres(cmd: &str) -> std::process::Output {
    run(Command::new("runuser").args(["-u", "postgres", "--", "sh", "-c", cmd]))
}

impl PrivatePostgres {
    fn start() -> Self {
        let bin = pg_bin();
        let dir = std::env::temp_dir().join(unique("tollgate_pg"));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = run(Command::new("chown").args(["postgres:postgres", dir.to_str().unwrap()]));
        let out = as_postgres(&format!(
            "{}/initdb -D {}/data -U postgres -A trust >/dev/null",
            bin.display(),
            dir.display()
        ));
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pg = Self {
            port: free_port(),
            dir,
            bin,
        };
        pg.start_server();
        pg
    }

    fn start_server(&self) {
        let out = as_postgres(&format!(
            "{}/pg_ctl -D {d}/data -l {d}/log -w -o '-p {p} -k {d} -c listen_addresses=127.0.0.1 -c fsync=off' start >/dev/null",
            self.bin.display(),
            d = self.dir.display(),
            p = self.port
        ));
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_port(self.port, true, Duration::from_secs(20));
    }

    fn stop(&self) {
        let _ = as_postgres(&format!(
            "{}/pg_ctl -D {}/data -m immediate -w stop >/dev/null",
            self.bin.display(),
            self.dir.display()
        ));
        wait_port(self.port, false, Duration::from_secs(20));
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Three (or more) replicas in front of one simulator.
struct Cluster {
    _dirs: Vec<tempfile::TempDir>,
    sim: Simulator,
    replicas: Vec<Option<Gateway>>,
    http: Http,
    db: Database,
    prefix: String,
    redis_port: u16,
    lease_ms: u64,
    extra: String,
    env: Vec<(&'static str, String)>,
}

struct ClusterOpts {
    replicas: usize,
    /// Extra `TOLLGATE_*` variables for every replica.
    env: Vec<(&'static str, String)>,
    lease_ms: u64,
    pg_port: u16,
    redis_port: u16,
    extra_toml: String,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        Self {
            replicas: 3,
            env: Vec::new(),
            lease_ms: 2000,
            pg_port: 5432,
            redis_port: 6379,
            extra_toml: String::new(),
        }
    }
}

const NAMES: [&str; 4] = ["gw-a", "gw-b", "gw-c", "gw-d"];

impl Cluster {
    fn start(o: ClusterOpts) -> Self {
        ensure_shared_servers();
        let sim = Simulator::start();
        let db = Database::create(o.pg_port);
        let prefix = unique("tgtest");
        let mut c = Self {
            _dirs: Vec::new(),
            sim,
            replicas: Vec::new(),
            http: Http::new(),
            db,
            prefix,
            redis_port: o.redis_port,
            lease_ms: o.lease_ms,
            extra: o.extra_toml,
            env: o.env,
        };
        for name in NAMES.iter().take(o.replicas) {
            let gw = c.start_replica(name);
            c.replicas.push(Some(gw));
        }
        c
    }

    fn opts(&self, name: &str) -> Opts {
        let mut env = vec![
            ("TOLLGATE_SERVER_INSTANCE", name.to_string()),
            ("TOLLGATE_STORAGE_KIND", "postgres".to_string()),
            ("TOLLGATE_STORAGE_POSTGRES_URL", self.db.url()),
        ];
        env.extend(self.env.iter().cloned());
        Opts {
            extra_toml: format!(
                "[cluster]\nredis_url = \"redis://127.0.0.1:{}/0\"\nkey_prefix = \"{}\"\nlease_ms = {}\n{}\n",
                self.redis_port, self.prefix, self.lease_ms, self.extra
            ),
            env,
        }
    }

    fn start_replica(&mut self, name: &str) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let gw = Gateway::start(dir.path(), &self.sim.url, &self.opts(name));
        self._dirs.push(dir);
        gw
    }

    fn gw(&self, i: usize) -> &Gateway {
        self.replicas[i].as_ref().expect("replica running")
    }

    fn admin(&self, i: usize) -> Admin<'_> {
        Admin {
            http: &self.http,
            base: &self.gw(i).admin,
        }
    }

    fn client(&self, i: usize) -> TaskClient {
        TaskClient {
            http: self.http.clone(),
            url: self.gw(i).url.clone(),
        }
    }

    fn kill9(&mut self, i: usize) {
        if let Some(mut gw) = self.replicas[i].take() {
            gw.proc.kill9();
        }
    }

    /// An account (postpaid on) with one root key, made through replica 0
    /// and usable on every replica.
    async fn account_with_key(&self, id: &str) -> String {
        self.admin(0).create_account(id).await;
        let key = self.admin(0).issue_key(id, None).await.1;
        for i in 0..self.replicas.len() {
            if self.replicas[i].is_some() {
                self.until_authenticates(i, &key).await;
            }
        }
        key
    }

    /// Waits (bounded) until replica `i` knows the key. The probe is
    /// refused after authentication and before any unit or slot is taken
    /// (a malformed queue timeout), so it spends nothing.
    async fn until_authenticates(&self, i: usize, key: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let r = self
                .client(i)
                .task(key, &[("x-queue-timeout-ms", "not-a-number")])
                .await;
            if r.status != StatusCode::UNAUTHORIZED {
                assert_eq!(r.status, StatusCode::BAD_REQUEST);
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replica {i} never learned of the key"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn max_in_flight(&self, account: &str) -> u64 {
        self.sim.max_in_flight(&self.http, account).await
    }

    async fn arrivals(&self, account: &str) -> Vec<String> {
        self.sim.stats(&self.http).await["accounts"][account]["arrivals"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    }

    async fn reset_sim(&self) {
        self.http
            .send(
                Method::POST,
                &format!("{}/_sim/reset", self.sim.url),
                &[],
                "",
            )
            .await;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What the replicas said, to tell why the test failed.
            for (i, r) in self.replicas.iter().enumerate() {
                if let Some(gw) = r {
                    let logs = gw.proc.logs();
                    let noted: Vec<&str> = logs
                        .lines()
                        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                        .take(40)
                        .collect();
                    eprintln!("--- replica {i} warnings:\n{}", noted.join("\n"));
                }
            }
        }
        for r in self.replicas.iter_mut() {
            if let Some(mut gw) = r.take() {
                gw.proc.kill9();
            }
        }
        drop_redis_prefix(self.redis_port, &self.prefix);
    }
}

/// Waits (bounded) until replica `i`'s view of the account satisfies `ok`.
async fn view_until(
    c: &Cluster,
    i: usize,
    account: &str,
    within: Duration,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let path = format!("/v1/accounts/{account}");
    admin_get_until(c, i, &path, within, what, ok).await
}

/// Waits (bounded) until replica `i`'s answer to the admin `GET path`
/// satisfies `ok`.
async fn admin_get_until(
    c: &Cluster,
    i: usize,
    path: &str,
    within: Duration,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let v = c.admin(i).call(Method::GET, path, None).await.json();
        if ok(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "replica {i}: never {what} within {within:?}; last view {v}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (bounded) until a task on replica `i` gets `status` (and `code`).
async fn task_until(
    c: &Cluster,
    i: usize,
    key: &str,
    within: Duration,
    ok: impl Fn(&Resp) -> bool,
) -> Resp {
    task_until_with(c, i, key, &[("x-sim-delay-ms", "0")], within, ok).await
}

/// Like `task_until`, each try with `headers`.
async fn task_until_with(
    c: &Cluster,
    i: usize,
    key: &str,
    headers: &[(&str, &str)],
    within: Duration,
    ok: impl Fn(&Resp) -> bool,
) -> Resp {
    let deadline = Instant::now() + within;
    loop {
        let r = c.client(i).task(key, headers).await;
        if ok(&r) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "replica {i}: no fitting answer within {within:?}; last {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every usage event through replica `i`'s cursor API.
async fn events(c: &Cluster, i: usize) -> Vec<Value> {
    c.admin(i).all_events().await
}

fn event_ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_limit_summed_over_replicas() {
    let _s = SERIAL.lock().await;
    let c = Cluster::start(ClusterOpts::default());
    let key = c.account_with_key("acme").await;
    c.reset_sim().await;
    let mut tasks = Vec::new();
    for n in 0..24usize {
        let client = c.client(n % 3);
        tasks.push(client.spawn(&key, 150, &format!("t{n}")));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&r.body)
        );
    }
    let max = c.max_in_flight("acme").await;
    assert_eq!(
        max, 3,
        "the limit is reached and never exceeded across replicas"
    );
    let evs = events(&c, 2).await;
    let mine: Vec<_> = evs
        .iter()
        .filter(|e| {
            e["data"]["request_id"]
                .as_str()
                .unwrap_or("")
                .starts_with('t')
        })
        .collect();
    assert_eq!(mine.len(), 24, "one event per success");
    let sources: HashSet<&str> = mine.iter().filter_map(|e| e["source"].as_str()).collect();
    assert_eq!(
        sources,
        HashSet::from(["tollgate/gw-a", "tollgate/gw-b", "tollgate/gw-c"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_account_caps_hold_across_replicas() {
    let _s = SERIAL.lock().await;
    let c = Cluster::start(ClusterOpts::default());
    c.admin(0).create_account("acme").await;
    c.admin(1).create_sub("acme", "acme-dev", Some(1)).await;
    let key = c.admin(2).issue_key("acme", Some("acme-dev")).await.1;
    for i in 0..3 {
        c.until_authenticates(i, &key).await;
    }
    c.reset_sim().await;
    let tasks: Vec<_> = (0..9usize)
        .map(|n| c.client(n % 3).spawn(&key, 100, &format!("d{n}")))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().status, StatusCode::OK);
    }
    let stats = c.sim.stats(&c.http).await;
    assert_eq!(stats["accounts"]["sub:acme-dev"]["max_in_flight"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_fifo_queue_and_one_queue_bound_across_replicas() {
    let _s = SERIAL.lock().await;
    let c = Cluster::start(ClusterOpts::default());
    let key = c.account_with_key("acme").await;
    c.reset_sim().await;
    // Hold the 3 slots through replica 0, ending 300 ms apart, so slots
    // free up one at a time and the backend sees grants in grant order.
    let held: Vec<_> = (0..3u64)
        .map(|i| c.client(0).spawn(&key, 1500 + 300 * i, &format!("h{i}")))
        .collect();
    view_until(&c, 0, "acme", Duration::from_secs(5), "3 in flight", |v| {
        v["concurrency"]["in_flight"] == 3
    })
    .await;
    // Queue q0..q5 alternating replicas, each after the previous one is seen
    // queued, so the join order is known.
    let mut queued = Vec::new();
    for n in 0..6usize {
        let replica = n % 3;
        // Each queued task outlives the held ones, so q3..q5 also start
        // one at a time, as q0..q2 end.
        queued.push(c.client(replica).spawn(&key, 2000, &format!("q{n}")));
        view_until(
            &c,
            replica,
            "acme",
            Duration::from_secs(5),
            "the task queued",
            |v| v["concurrency"]["queued"].as_u64().unwrap_or(0) >= (n as u64 + 1),
        )
        .await;
    }
    for t in held.into_iter().chain(queued) {
        assert_eq!(t.await.unwrap().status, StatusCode::OK);
    }
    let order: Vec<String> = c
        .arrivals("acme")
        .await
        .into_iter()
        .filter(|r| r.starts_with('q'))
        .collect();
    assert_eq!(
        order,
        ["q0", "q1", "q2", "q3", "q4", "q5"],
        "FIFO across replicas"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_bound_is_cluster_wide() {
    let _s = SERIAL.lock().await;
    let c = Cluster::start(ClusterOpts {
        env: vec![("TOLLGATE_LIMITS_MAX_QUEUE_PER_ACCOUNT", "4".into())],
        ..ClusterOpts::default()
    });
    let key = c.account_with_key("acme").await;
    let held: Vec<_> = (0..3)
        .map(|i| c.client(0).spawn(&key, 3000, &format!("h{i}")))
        .collect();
    view_until(&c, 0, "acme", Duration::from_secs(5), "3 in flight", |v| {
        v["concurrency"]["in_flight"] == 3
    })
    .await;
    let mut waiting = Vec::new();
    for n in 0..4usize {
        let replica = n % 3;
        waiting.push(c.client(replica).spawn(&key, 0, &format!("q{n}")));
        view_until(
            &c,
            replica,
            "acme",
            Duration::from_secs(5),
            "the task queued",
            |v| v["concurrency"]["queued"].as_u64().unwrap_or(0) >= (n as u64 + 1),
        )
        .await;
    }
    // The 5th, on any replica, is refused.
    let r = task_until(&c, 1, &key, Duration::from_secs(10), |r| {
        r.status == StatusCode::TOO_MANY_REQUESTS
    })
    .await;
    assert_eq!(r.error_code(), "RequestLimitExceeded.JobNumExceed");
    assert!(r.header("retry-after").is_some());
    for t in held.into_iter().chain(waiting) {
        assert_eq!(t.await.unwrap().status, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_gives_its_slots_back_within_the_lease() {
    let _s = SERIAL.lock().await;
    let mut c = Cluster::start(ClusterOpts::default());
    let key = c.account_with_key("acme").await;
    // Replica 2 holds all 3 slots with long tasks, and is killed.
    let held: Vec<_> = (0..3)
        .map(|i| {
            let client = c.client(2);
            let auth = format!("Bearer {key}");
            tokio::spawn(async move {
                client
                    .http
                    .try_send(
                        Method::POST,
                        &format!("{}/v1/x", client.url),
                        &[
                            ("authorization", auth.as_str()),
                            ("x-sim-delay-ms", "30000"),
                            ("x-request-id", &format!("h{i}")),
                        ],
                        "{}",
                    )
                    .await
            })
        })
        .collect();
    view_until(&c, 2, "acme", Duration::from_secs(5), "3 in flight", |v| {
        v["concurrency"]["in_flight"] == 3
    })
    .await;
    // Meanwhile successes through the other replicas queue.
    let killed_at = Instant::now();
    c.kill9(2);
    for t in held {
        let r = t.await.unwrap();
        assert!(
            r.is_err(),
            "the killed replica's clients lose their connection"
        );
    }
    let r = c
        .client(0)
        .task(
            &key,
            &[("x-sim-delay-ms", "0"), ("x-queue-timeout-ms", "10000")],
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let took = killed_at.elapsed();
    assert!(
        took <= Duration::from_millis(c.lease_ms + 1000),
        "slots came back after {took:?} (lease {} ms)",
        c.lease_ms
    );
    // All 3 slots, not just one.
    let tasks: Vec<_> = (0..3)
        .map(|i| c.client(1).spawn(&key, 300, &format!("after{i}")))
        .collect();
    let started = Instant::now();
    for t in tasks {
        assert_eq!(t.await.unwrap().status, StatusCode::OK);
    }
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "ran side by side"
    );
    // No event from the killed replica's unfinished tasks, none duplicated.
    let evs = events(&c, 0).await;
    let ids = event_ids(&evs);
    assert_eq!(ids.len(), ids.iter().collect::<HashSet<_>>().len());
    assert!(evs.iter().all(|e| {
        !e["data"]["request_id"]
            .as_str()
            .unwrap_or("")
            .starts_with('h')
    }));
}

/// SPEC §8: a dead replica's units come back too, and its queued tasks
/// stop holding their places, without a restart. A free account (50
/// units): the killed replica holds 3 slots and 2 queued tasks, each with
/// a reserved unit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_reserved_units_and_queued_tasks_come_back() {
    let _s = SERIAL.lock().await;
    let mut c = Cluster::start(ClusterOpts::default());
    c.admin(0).create_plain_account("acme").await;
    let key = c.admin(0).issue_key("acme", None).await.1;
    for i in 0..3 {
        c.until_authenticates(i, &key).await;
    }
    let held: Vec<_> = (0..5)
        .map(|i| {
            let client = c.client(2);
            let auth = format!("Bearer {key}");
            tokio::spawn(async move {
                client
                    .http
                    .try_send(
                        Method::POST,
                        &format!("{}/v1/x", client.url),
                        &[
                            ("authorization", auth.as_str()),
                            ("x-sim-delay-ms", "30000"),
                            ("x-queue-timeout-ms", "30000"),
                            ("x-request-id", &format!("dead{i}")),
                        ],
                        "{}",
                    )
                    .await
            })
        })
        .collect();
    // Each of the 5 holds a unit (reserved in Redis at admission, before
    // queueing): 3 at the backend, 2 queued.
    view_until(
        &c,
        2,
        "acme",
        Duration::from_secs(5),
        "3 running, 2 queued",
        |v| v["concurrency"]["in_flight"] == 3 && v["concurrency"]["queued"] == 2,
    )
    .await;
    c.kill9(2);
    for t in held {
        assert!(
            t.await.unwrap().is_err(),
            "the killed replica's clients lose their connection"
        );
    }
    // Within the lease: the slots are free and no dead ticket is ahead of
    // a live replica's task.
    let r = c
        .client(0)
        .task(
            &key,
            &[("x-sim-delay-ms", "0"), ("x-queue-timeout-ms", "10000")],
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    // The dead replica's 5 units are given back: all 50 free units can be
    // used, then the account is out of units.
    let mut successes = 1;
    for _ in 0..60 {
        let r = c.client(1).task(&key, &[("x-sim-delay-ms", "0")]).await;
        if r.status != StatusCode::OK {
            assert_eq!(r.error_code(), "ResourceUnavailable.LowBalance");
            break;
        }
        successes += 1;
    }
    assert_eq!(
        successes, 50,
        "every free unit, none kept by the dead replica"
    );
    assert_eq!(
        events(&c, 0).await.len(),
        50,
        "one event per success, none from the killed replica's tasks"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_overdraw_across_replicas() {
    let _s = SERIAL.lock().await;
    let c = Cluster::start(ClusterOpts::default());
    c.admin(0).create_plain_account("frugal").await;
    let key = c.admin(0).issue_key("frugal", None).await.1;
    for i in 0..3 {
        c.until_authenticates(i, &key).await;
    }
    let tasks: Vec<_> = (0..60usize)
        .map(|n| c.client(n % 3).spawn(&key, 200, &format!("f{n}")))
        .collect();
    let mut ok = 0;
    let mut low = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            StatusCode::OK => ok += 1,
            StatusCode::FORBIDDEN => {
                assert_eq!(r.error_code(), "ResourceUnavailable.LowBalance");
                low += 1
            }
            s => panic!("unexpected {s}: {}", String::from_utf8_lossy(&r.body)),
        }
    }
    assert_eq!((ok, low), (50, 10));
    let evs = events(&c, 1).await;
    assert_eq!(evs.iter().filter(|e| e["subject"] == "frugal").count(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_reach_every_replica_within_a_second() {
    let _s = SERIAL.lock().await;
    let c = Cluster::start(ClusterOpts::default());
    let second = Duration::from_secs(1);
    // Create on 0, key on 1, use on 2.
    c.admin(0).create_account("acme").await;
    view_until(&c, 1, "acme", second, "the new account", |v| {
        v["id"] == "acme"
    })
    .await;
    let (key_id, key) = c.admin(1).issue_key("acme", None).await;
    task_until(&c, 2, &key, second, |r| r.status == StatusCode::OK).await;
    // A sub-account made on 2 is seen on 0.
    c.admin(2).create_sub("acme", "acme-dev", Some(1)).await;
    view_until(&c, 0, "acme", second, "the sub-account", |v| {
        v["sub_accounts"].as_array().is_some_and(|s| s.len() == 1)
    })
    .await;
    // A concurrency package bought on 0 raises the limit on 1 and 2.
    let today = c.admin(0).account("acme").await["created_at"]
        .as_str()
        .unwrap()[..10]
        .to_string();
    let r = c
        .admin(0)
        .call(
            Method::POST,
            "/v1/accounts/acme/concurrency-packages",
            Some(json!({"units": 2, "period": "daily", "start": today})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
    for i in 1..3 {
        view_until(&c, i, "acme", second, "limit 5", |v| {
            v["concurrency"]["limit"] == 5
        })
        .await;
    }
    // Postpaid and top-up on 1 are seen on 2.
    let r = c
        .admin(1)
        .call(
            Method::POST,
            "/v1/accounts/acme/top-up",
            Some(json!({"amount": "12.50"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    view_until(&c, 2, "acme", second, "the top-up", |v| {
        v["balance_usd"] == "12.50"
    })
    .await;
    // Deactivation on 1 stops the key on 0 and 2.
    let r = c
        .admin(1)
        .call(Method::POST, "/v1/accounts/acme/deactivate", None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    for i in [0, 2] {
        task_until(&c, i, &key, second, |r| {
            r.status == StatusCode::FORBIDDEN && r.error_code() == "ResourceUnavailable.StopUsing"
        })
        .await;
    }
    let r = c
        .admin(2)
        .call(Method::POST, "/v1/accounts/acme/activate", None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    task_until(&c, 0, &key, second, |r| r.status == StatusCode::OK).await;
    // Revocation on 0 stops the key on 1 and 2.
    let r = c
        .admin(0)
        .call(Method::DELETE, &format!("/v1/keys/{key_id}"), None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    for i in [1, 2] {
        task_until(&c, i, &key, second, |r| {
            r.status == StatusCode::UNAUTHORIZED
        })
        .await;
    }
    // A key issued on 1 can be revoked on 2 at once, before 2 has heard of
    // it (the store decides, not 2's memory); a second revocation is 404.
    let (fresh_id, fresh) = c.admin(1).issue_key("acme", None).await;
    let r = c
        .admin(2)
        .call(Method::DELETE, &format!("/v1/keys/{fresh_id}"), None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.json());
    task_until(&c, 1, &fresh, second, |r| {
        r.status == StatusCode::UNAUTHORIZED
    })
    .await;
    let r = c
        .admin(0)
        .call(Method::DELETE, &format!("/v1/keys/{fresh_id}"), None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_paging_during_a_burst_sees_every_event_once() {
    let _s = SERIAL.lock().await;
    let c = Cluster::start(ClusterOpts::default());
    let mut keys = Vec::new();
    for a in 0..4 {
        keys.push(c.account_with_key(&format!("acct{a}")).await);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = task_stream(&c, &keys, 12, 0, "b", 400, &stop);
    // The consumer follows `next` on replica 2 while replicas commit.
    let admin = c.admin(2);
    let mut seen: Vec<String> = Vec::new();
    let mut after = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut idle_pages = 0;
    loop {
        let r = admin
            .call(
                Method::GET,
                &format!("/v1/usage-events?after={after}&limit=50"),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
        let v = r.json();
        let page = v["events"].as_array().unwrap();
        seen.extend(event_ids(page));
        after = v["next"].as_str().unwrap().to_string();
        let done = load.iter().all(|t| t.is_finished());
        if page.is_empty() {
            if done {
                idle_pages += 1;
                if idle_pages > 20 {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(Instant::now() < deadline, "the load never ended");
        if Instant::now() > deadline - Duration::from_secs(40) {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let mut successes = 0;
    for t in load {
        successes += t
            .await
            .unwrap()
            .iter()
            .filter(|(_, r)| r.status == StatusCode::OK)
            .count() as u32;
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no event twice");
    let all = event_ids(&events(&c, 0).await);
    assert_eq!(seen, all, "the consumer saw every event, in commit order");
    assert_eq!(all.len() as u32, successes, "one event per success");
    assert!(successes > 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_live_replica_with_the_same_name_is_refused() {
    let _s = SERIAL.lock().await;
    let c = Cluster::start(ClusterOpts {
        replicas: 1,
        ..ClusterOpts::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("dup.toml");
    let opts = c.opts("gw-a");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[backend]\nurl = \"{}\"\n[storage]\ndata_dir = \"{}\"\n{}",
            c.sim.url,
            dir.path().join("data").display(),
            opts.extra_toml
        ),
    )
    .unwrap();
    let mut dup = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .envs(opts.env.iter().map(|(k, v)| (*k, v.clone())))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drained as it comes, so a chatty child never blocks on a full pipe.
    let mut pipe = dup.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(&mut pipe, &mut err);
        err
    });
    // Bounded: a twin that wrongly starts must not hang the test.
    let deadline = Instant::now() + Duration::from_millis(c.lease_ms + 5000);
    let status = loop {
        if let Some(s) = dup.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = dup.kill();
            let _ = dup.wait();
            panic!(
                "a second live gw-a was allowed to run: {}",
                stderr.join().unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let err = stderr.join().unwrap_or_default();
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("gw-a"), "{err}");
    // The live one still serves.
    let (status, _) = c
        .http
        .get_json(&format!("{}/readyz", c.gw(0).admin), &[])
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_successes_spool_and_are_delivered_once() {
    let _s = SERIAL.lock().await;
    ensure_shared_servers();
    let pg = PrivatePostgres::start();
    let mut c = Cluster::start(ClusterOpts {
        replicas: 2,
        pg_port: pg.port,
        ..ClusterOpts::default()
    });
    let key = c.account_with_key("acme").await;
    let before = events(&c, 0).await.len();
    let cursor = {
        let v = c
            .admin(1)
            .call(Method::GET, "/v1/usage-events?limit=1000", None)
            .await
            .json();
        v["next"].as_str().unwrap().to_string()
    };
    pg.stop();
    let mut ok = 0;
    for n in 0..20usize {
        let r = c
            .client(n % 2)
            .task(
                &key,
                &[
                    ("x-sim-delay-ms", "0"),
                    ("x-request-id", &format!("out{n}")),
                ],
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&r.body)
        );
        ok += 1;
    }
    // Admin writes are refused meanwhile.
    let r = c
        .admin(0)
        .call(Method::POST, "/v1/accounts", Some(json!({"id": "later"})))
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.error_code(), "FailedOperation.StoreUnavailable");
    // One replica is killed with events still spooled; it comes back on
    // the same data directory (its spool) once PostgreSQL is back.
    c.replicas[1].as_mut().unwrap().proc.kill9();
    pg.start_server();
    let opts = c.opts(NAMES[1]);
    c.replicas[1].as_mut().unwrap().restart(&opts);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n =
            c.db.count("SELECT count(*) FROM usage_events WHERE json::text LIKE '%\"out%'");
        if n == ok {
            break;
        }
        assert!(n <= ok, "duplicated: {n} > {ok}");
        assert!(Instant::now() < deadline, "only {n} of {ok} delivered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = events(&c, 0).await;
    assert_eq!(after.len(), before + ok as usize);
    let ids = event_ids(&after);
    assert_eq!(ids.len(), ids.iter().collect::<HashSet<_>>().len());
    // A cursor taken before the outage sees them.
    let v = c
        .admin(0)
        .call(
            Method::GET,
            &format!("/v1/usage-events?after={cursor}&limit=1000"),
            None,
        )
        .await
        .json();
    assert_eq!(v["events"].as_array().unwrap().len(), ok as usize);
    let _ = &c.db;
    drop(c);
    drop(pg);
}

async fn redis_outage(policy: &str) {
    ensure_shared_servers();
    let mut redis = PrivateRedis::start();
    let c = Cluster::start(ClusterOpts {
        replicas: 3,
        redis_port: redis.port,
        extra_toml: format!("on_redis_outage = \"{policy}\"\n"),
        ..ClusterOpts::default()
    });
    let key = c.account_with_key("acme").await;
    // The share under `local` divides by the live count each replica last
    // saw: let them all see the others first.
    wait_live(&c, 3).await;
    redis.kill();
    if policy == "reject" {
        let r = task_until(&c, 0, &key, Duration::from_secs(5), |r| {
            r.status == StatusCode::SERVICE_UNAVAILABLE
        })
        .await;
        assert_eq!(r.error_code(), "FailedOperation.CoordinationUnavailable");
        let (status, _) = c
            .http
            .get_json(&format!("{}/readyz", c.gw(0).admin), &[])
            .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    } else {
        // Each replica limits on its own to max(1, floor(3 / 3)) = 1.
        c.reset_sim().await;
        let tasks: Vec<_> = (0..12usize)
            .map(|n| c.client(n % 3).spawn(&key, 150, &format!("l{n}")))
            .collect();
        for t in tasks {
            let r = t.await.unwrap();
            assert_eq!(
                r.status,
                StatusCode::OK,
                "{}",
                String::from_utf8_lossy(&r.body)
            );
        }
        let (_, ready) = c
            .http
            .get_json(&format!("{}/readyz", c.gw(0).admin), &[])
            .await;
        let max = c.max_in_flight("acme").await;
        assert!(max <= 3, "{max} at once; replica 0: {ready}");
        let (status, _) = c
            .http
            .get_json(&format!("{}/readyz", c.gw(0).admin), &[])
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    // Redis back: shared limiting resumes within 10 s without a restart.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = c
            .http
            .get_json(&format!("{}/readyz", c.gw(0).admin), &[])
            .await;
        let r = c.client(0).task(&key, &[("x-sim-delay-ms", "0")]).await;
        if status == StatusCode::OK && r.status == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "shared limiting never resumed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Each replica finds Redis again on its own heartbeat: every one of
    // them is coordinated before the shared limit is checked.
    wait_coordinated_again(&c).await;
    c.reset_sim().await;
    let tasks: Vec<_> = (0..12usize)
        .map(|n| c.client(n % 3).spawn(&key, 150, &format!("r{n}")))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(c.max_in_flight("acme").await, 3, "one shared limit again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_under_local_keeps_serving_with_a_divided_limit() {
    let _s = SERIAL.lock().await;
    redis_outage("local").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_under_reject_refuses_and_resumes() {
    let _s = SERIAL.lock().await;
    redis_outage("reject").await;
}

/// Waits (bounded) until every running replica counts `n` live replicas.
async fn wait_live(c: &Cluster, n: u64) {
    let within = Duration::from_millis(c.lease_ms + 3000);
    wait_ready(c, within, &format!("{n} live replicas"), |r| {
        r["cluster"]["live_replicas"] == n
    })
    .await;
}

/// Waits (bounded) until every running replica's `/readyz` body satisfies
/// `ok`.
/// After Redis is back: every replica coordinated through it again (each
/// finds it on its own heartbeat), with all 3 live.
async fn wait_coordinated_again(c: &Cluster) {
    wait_ready(
        c,
        Duration::from_secs(10),
        "coordinated again with 3 live replicas",
        |r| r["cluster"]["coordinated"] == true && r["cluster"]["live_replicas"] == 3,
    )
    .await;
}

async fn wait_ready(c: &Cluster, within: Duration, what: &str, ok: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + within;
    for i in 0..c.replicas.len() {
        if c.replicas[i].is_none() {
            continue;
        }
        loop {
            let (_, ready) = c
                .http
                .get_json(&format!("{}/readyz", c.gw(i).admin), &[])
                .await;
            if ok(&ready) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica {i}: never {what} within {within:?}; {ready}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_count_each_other_and_a_clean_stop_leaves_at_once() {
    let _s = SERIAL.lock().await;
    let mut c = Cluster::start(ClusterOpts::default());
    wait_live(&c, 3).await;
    // SIGTERM: the replica leaves the registry as it stops.
    let mut gw = c.replicas[2].take().unwrap();
    assert!(
        gw.proc
            .sigterm_and_wait(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
    wait_live(&c, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_top_ups_through_different_replicas_all_count() {
    let _s = SERIAL.lock().await;
    let c = Cluster::start(ClusterOpts::default());
    c.admin(0).create_account("acme").await;
    view_until(&c, 1, "acme", Duration::from_secs(1), "the account", |v| {
        v["id"] == "acme"
    })
    .await;
    let calls: Vec<_> = (0..20usize)
        .map(|n| {
            let http = c.http.clone();
            let base = c.gw(n % 3).admin.clone();
            tokio::spawn(async move {
                let admin = Admin {
                    http: &http,
                    base: &base,
                };
                admin
                    .call(
                        Method::POST,
                        "/v1/accounts/acme/top-up",
                        Some(json!({"amount": "1.25"})),
                    )
                    .await
                    .status
            })
        })
        .collect();
    for t in calls {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    for i in 0..3 {
        view_until(&c, i, "acme", Duration::from_secs(1), "every top-up", |v| {
            v["balance_usd"] == "25.00"
        })
        .await;
    }
}

/// Sends `n` tasks one at a time, in turn over the replicas (request ids
/// `{tag}0`, `{tag}1`, …); each answer with its request id.
async fn tasks_in_turn(c: &Cluster, key: &str, tag: &str, n: usize) -> Vec<(String, Resp)> {
    let mut out = Vec::new();
    for k in 0..n {
        let rid = format!("{tag}{k}");
        let r = c
            .client(k % c.replicas.len())
            .task(key, &[("x-sim-delay-ms", "0"), ("x-request-id", &rid)])
            .await;
        out.push((rid, r));
    }
    out
}

/// `workers` clients, each sending tasks of `delay_ms` one after another
/// until `stop` (at most `max` each): worker `w` through replica `w` modulo
/// the replicas, with `keys[w % keys.len()]`, request ids `{tag}{w}-{n}`.
/// Each worker's answers with their request ids.
fn task_stream(
    c: &Cluster,
    keys: &[String],
    workers: usize,
    delay_ms: u64,
    tag: &str,
    max: usize,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<(String, Resp)>>> {
    (0..workers)
        .map(|w| {
            let client = c.client(w % c.replicas.len());
            let key = keys[w % keys.len()].clone();
            let stop = stop.clone();
            let tag = format!("{tag}{w}-");
            let delay = delay_ms.to_string();
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for n in 0..max {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let rid = format!("{tag}{n}");
                    let r = client
                        .task(&key, &[("x-sim-delay-ms", &delay), ("x-request-id", &rid)])
                        .await;
                    answers.push((rid, r));
                }
                answers
            })
        })
        .collect()
}

/// Every answer is a success; else the failures, each with its request id.
fn assert_all_succeeded<'a>(what: &str, answers: impl IntoIterator<Item = &'a (String, Resp)>) {
    let mut n = 0;
    let mut failed = Vec::new();
    for (rid, r) in answers {
        n += 1;
        if r.status != StatusCode::OK {
            failed.push(format!(
                "{rid}: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{what}: {} of {n} tasks failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

/// Issue 17: under `local`, the free package runs out during a Redis
/// outage, so Redis's quota, rebuilt when Redis is back, believes in free
/// units the store has already spent. The store refusing such a unit at
/// commit must not cost the client a finished task (503
/// `UsageRecordFailed`): the unit falls through to the next payer in the
/// deduction order, and the event says who paid. One task at a time, so
/// the commit order is the send order and the deduction order is strict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_never_answers_a_finished_task_503() {
    let _s = SERIAL.lock().await;
    ensure_shared_servers();
    let mut redis = PrivateRedis::start();
    let c = Cluster::start(ClusterOpts {
        replicas: 3,
        redis_port: redis.port,
        extra_toml: "on_redis_outage = \"local\"\n".to_string(),
        ..ClusterOpts::default()
    });
    // Postpaid on, 50 free units.
    let key = c.account_with_key("acme").await;
    wait_live(&c, 3).await;
    // 35 free units spent before the outage, the last 15 during it (20
    // tasks), then 30 tasks once the replicas coordinate again.
    let before = tasks_in_turn(&c, &key, "pre", 35).await;
    assert_all_succeeded("before the outage", &before);
    redis.kill();
    let during = tasks_in_turn(&c, &key, "out", 20).await;
    redis.restart();
    wait_coordinated_again(&c).await;
    let after = tasks_in_turn(&c, &key, "back", 30).await;
    assert_all_succeeded(
        "during the outage and after it",
        during.iter().chain(&after),
    );

    // One event per success, in the order sent.
    let sent: Vec<&str> = before
        .iter()
        .chain(&during)
        .chain(&after)
        .map(|(rid, _)| rid.as_str())
        .collect();
    let evs = events(&c, 0).await;
    let ids = event_ids(&evs);
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        ids.len(),
        "no event twice"
    );
    let committed: Vec<&str> = evs
        .iter()
        .map(|e| e["data"]["request_id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(committed, sent, "one event per success, in commit order");
    // Free first, all 50 of them and no more, then postpaid.
    let payers: Vec<&str> = evs
        .iter()
        .map(|e| e["data"]["charged_to"].as_str().unwrap_or("?"))
        .collect();
    let trace: String = payers
        .iter()
        .map(|p| match *p {
            "free" => 'F',
            "postpaid" => 'P',
            _ => '?',
        })
        .collect();
    let trace = format!("{} | {} | {}", &trace[..35], &trace[35..55], &trace[55..]);
    assert_eq!(
        payers.iter().filter(|p| **p == "free").count(),
        50,
        "the free package pays for exactly its 50 units: {trace}"
    );
    assert!(
        payers.iter().all(|p| *p == "free" || *p == "postpaid"),
        "{trace}"
    );
    assert!(
        payers
            .windows(2)
            .all(|w| !(w[0] == "postpaid" && w[1] == "free")),
        "no free unit charged after a postpaid one: {trace}"
    );
    for i in 0..3 {
        view_until(
            &c,
            i,
            "acme",
            Duration::from_secs(2),
            "the free package used up, not overdrawn",
            |v| {
                let free = v["resource_packages"]
                    .as_array()
                    .and_then(|ps| ps.iter().find(|p| p["kind"] == "free"));
                free.is_some_and(|p| p["used"] == 50 && p["size"] == 50)
                    && v["remaining_units"] == 0
            },
        )
        .await;
    }
}

/// Issue 17: a refund of a resource package was applied in a replica's
/// memory before its commit, and a concurrent read of the account (other
/// replicas commit usage all the time) could bring the package back for a
/// few milliseconds, long enough for a task to be charged to it; and a
/// unit of it reserved elsewhere before the refund could be charged after
/// it. Each round: an account with no free unit left (postpaid on), a
/// stream of tasks on all three replicas, a prepaid package bought through
/// one replica and at once refunded through another while the tasks run.
/// The stream is 30 clients of 20 ms tasks on a limit of 3: a task's unit
/// is reserved when it is admitted and charged ~200 ms later, after its
/// wait in the queue, so the units taken of the package just before and
/// during the refund are charged after it. A refund that answered 200
/// leaves the package never charged and unused on every replica; one
/// refused because the package was used is a 409, and the package is
/// charged exactly for its events. Every task succeeds (postpaid pays).
/// Each round has an account of its own: a package that was used is never
/// refunded and, expiring first, would pay before the next round's one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refunded_package_is_never_charged() {
    let _s = SERIAL.lock().await;
    let c = Cluster::start(ClusterOpts::default());
    let mut refunded = 0;
    let mut refusals = Vec::new();
    for round in 0..5usize {
        let account = format!("refund{round}");
        let key = c.account_with_key(&account).await;
        let spend: Vec<_> = (0..50usize)
            .map(|n| {
                c.client(n % 3)
                    .spawn(&key, 0, &format!("{account}-free{n}"))
            })
            .collect();
        for t in spend {
            assert_eq!(t.await.unwrap().status, StatusCode::OK);
        }
        for i in 0..3 {
            view_until(
                &c,
                i,
                &account,
                Duration::from_secs(2),
                "no free unit left",
                |v| v["remaining_units"] == 0,
            )
            .await;
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stream = task_stream(&c, &[key], 30, 20, &format!("{account}-w"), 2000, &stop);
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Bought through the next replica: the refunding one learns of
        // the package as it refunds it, so its own tasks have not taken a
        // unit of it before (they always had when it bought it itself).
        let r = c
            .admin((round + 1) % 3)
            .call(
                Method::POST,
                &format!("/v1/accounts/{account}/resource-packages"),
                Some(json!({"size": 1000})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
        let pkg = r.json()["id"].as_str().unwrap().to_string();
        let bought = Instant::now();
        let refund = c
            .admin(round % 3)
            .call(
                Method::POST,
                &format!("/v1/accounts/{account}/resource-packages/{pkg}/refund"),
                None,
            )
            .await;
        let refund_took = bought.elapsed();
        // The tasks right after the refund are the ones at risk.
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut answers = Vec::new();
        for t in stream {
            answers.extend(t.await.unwrap());
        }
        assert_all_succeeded(&format!("round {round}"), &answers);
        let charged_to = format!("prepaid:{pkg}");
        let charged = events(&c, 0)
            .await
            .iter()
            .filter(|e| e["data"]["charged_to"] == charged_to.as_str())
            .count();
        if refund.status == StatusCode::OK {
            assert_eq!(
                charged, 0,
                "round {round}: refunded package {pkg} charged {charged} times"
            );
            refunded += 1;
        } else {
            // Checked after every round has checked the charges.
            refusals.push(format!(
                "round {round}: {} {}",
                refund.status,
                String::from_utf8_lossy(&refund.body)
            ));
        }
        let path = format!("/v1/accounts/{account}/resource-packages");
        for i in 0..3 {
            admin_get_until(
                &c,
                i,
                &path,
                Duration::from_secs(2),
                "the package used as often as it was charged",
                |v| {
                    v["packages"]
                        .as_array()
                        .and_then(|ps| ps.iter().find(|p| p["id"] == pkg.as_str()))
                        .is_some_and(|p| {
                            p["used"] == charged
                                && p["refunded_at"].is_string() == (refund.status == StatusCode::OK)
                        })
                },
            )
            .await;
        }
        eprintln!(
            "round {round}: {} tasks, refund {} in {refund_took:?}, {charged} charged to the package",
            answers.len(),
            refund.status
        );
    }
    eprintln!(
        "{refunded} refunded, {} refused:\n{}",
        refusals.len(),
        refusals.join("\n")
    );
    assert!(
        refunded > 0,
        "no refund was ever allowed: nothing was tested"
    );
    // A refund refused because the package was used is a 409, whichever
    // replica used it.
    assert!(
        refusals
            .iter()
            .all(|r| r.contains("409") && r.contains("FailedOperation.RefundNotAllowed")),
        "refusals other than 409 RefundNotAllowed:\n{}",
        refusals.join("\n")
    );
}

// --- Idempotency keys across replicas (SPEC §10.1, issue 17) ---

/// A task with `Idempotency-Key: idem` through replica `i`.
async fn keyed_task(c: &Cluster, i: usize, key: &str, idem: &str, extra: &[(&str, &str)]) -> Resp {
    let mut headers = vec![("idempotency-key", idem)];
    headers.extend_from_slice(extra);
    c.client(i).task(key, &headers).await
}

/// Waits (bounded) until the cluster has stored `n` usage events.
async fn events_until(c: &Cluster, i: usize, n: usize, what: &str) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let evs = events(c, i).await;
        if evs.len() >= n {
            return evs;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} events of {n}",
            evs.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_through_another_replica_is_replayed_and_not_charged_again() {
    let _s = SERIAL.lock().await;
    let c = Cluster::start(ClusterOpts::default());
    let key = c.account_with_key("acme").await;
    let first = keyed_task(&c, 0, &key, "order-1", &[("x-sim-delay-ms", "0")]).await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(!first.replayed());
    for i in [1, 2, 0] {
        let again = keyed_task(&c, i, &key, "order-1", &[("x-sim-delay-ms", "0")]).await;
        assert_eq!(
            again.status,
            StatusCode::OK,
            "replica {i}: {}",
            String::from_utf8_lossy(&again.body)
        );
        assert!(again.replayed(), "replica {i}: {:?}", again.headers);
        assert_eq!(again.body, first.body, "replica {i}: the stored answer");
    }
    // The same key with another body is another request: refused anywhere.
    let reused = c
        .client(2)
        .task_with_body(
            &key,
            &[("idempotency-key", "order-1")],
            r#"{"InputImage":"y"}"#,
        )
        .await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reused.error_code(), "InvalidParameter.IdempotencyKeyReused");
    let evs = events(&c, 1).await;
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0]["data"]["idempotency"]["key"], "order-1");
    assert_eq!(c.sim.requests(&c.http, "acme").await, 1, "forwarded once");
}

/// The replica that ran and committed the first task is killed after the
/// commit and before its client saw the answer (the client hung up while
/// the task was at the backend); the retry through another replica gets
/// that answer, and the task is charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_kill_9_of_the_committing_replica_is_replayed_elsewhere() {
    let _s = SERIAL.lock().await;
    let mut c = Cluster::start(ClusterOpts::default());
    let key = c.account_with_key("acme").await;
    let socket = common::raw_task(
        &c.gw(2).url,
        &key,
        "Idempotency-Key: lost-1\r\nX-Sim-Delay-Ms: 3000\r\nX-Request-Id: lost-first\r\n",
        common::TASK_BODY,
    )
    .await;
    view_until(&c, 2, "acme", Duration::from_secs(5), "1 in flight", |v| {
        v["concurrency"]["in_flight"] == 1
    })
    .await;
    drop(socket);
    events_until(&c, 0, 1, "the detached success committed").await;
    c.kill9(2);
    let retry = keyed_task(&c, 0, &key, "lost-1", &[("x-sim-delay-ms", "0")]).await;
    assert_eq!(
        retry.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&retry.body)
    );
    assert!(retry.replayed());
    assert!(
        String::from_utf8_lossy(&retry.body).contains("lost-first"),
        "the first run's answer: {}",
        String::from_utf8_lossy(&retry.body)
    );
    let again = keyed_task(&c, 1, &key, "lost-1", &[("x-sim-delay-ms", "0")]).await;
    assert!(again.replayed());
    assert_eq!(again.body, retry.body);
    let evs = events(&c, 1).await;
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0]["data"]["client_gone"], true);
    assert_eq!(c.sim.requests(&c.http, "acme").await, 1);
}

/// Requests with one key sent at once through two replicas: one runs,
/// every other is refused as in progress (or, once it is done, replayed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_sent_at_once_through_two_replicas_reaches_the_backend_once() {
    let _s = SERIAL.lock().await;
    let c = Cluster::start(ClusterOpts::default());
    let key = c.account_with_key("acme").await;
    for round in 0..3 {
        let idem = format!("race-{round}");
        let sends: Vec<_> = (0..8)
            .map(|n| {
                let client = c.client(n % 2);
                let key = key.clone();
                let idem = idem.clone();
                tokio::spawn(async move {
                    client
                        .task(
                            &key,
                            &[("idempotency-key", &idem), ("x-sim-delay-ms", "300")],
                        )
                        .await
                })
            })
            .collect();
        let mut ran = 0;
        let mut ran_body = None;
        let mut replayed = Vec::new();
        for s in sends {
            let r = s.await.unwrap();
            match r.status {
                StatusCode::OK if !r.replayed() => {
                    ran += 1;
                    ran_body = Some(r.body.clone());
                }
                StatusCode::OK => replayed.push(r.body.clone()),
                StatusCode::CONFLICT => assert_eq!(
                    r.error_code(),
                    "FailedOperation.IdempotentRequestInProgress"
                ),
                other => panic!("{other}: {}", String::from_utf8_lossy(&r.body)),
            }
        }
        assert_eq!(ran, 1, "round {round}: exactly one ran");
        for b in replayed {
            assert_eq!(
                Some(b),
                ran_body,
                "a replay is the answer of the one that ran"
            );
        }
        assert_eq!(
            c.sim.requests(&c.http, "acme").await,
            round + 1,
            "round {round}: one request reached the backend"
        );
    }
    assert_eq!(events(&c, 2).await.len(), 3);
}

/// A replica dies while its keyed task is at the backend: its in-progress
/// marker is held with the task's lease, so another replica refuses the
/// key (409) until the lease lapses, then runs it as a new task (the first
/// never committed, so nothing was charged for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replicas_in_progress_marker_lapses_with_its_lease() {
    let _s = SERIAL.lock().await;
    let mut c = Cluster::start(ClusterOpts::default());
    let key = c.account_with_key("acme").await;
    let socket = common::raw_task(
        &c.gw(2).url,
        &key,
        "Idempotency-Key: dead-1\r\nX-Sim-Delay-Ms: 30000\r\n",
        common::TASK_BODY,
    )
    .await;
    view_until(&c, 0, "acme", Duration::from_secs(5), "1 in flight", |v| {
        v["concurrency"]["in_flight"] == 1
    })
    .await;
    let busy = keyed_task(&c, 0, &key, "dead-1", &[("x-sim-delay-ms", "0")]).await;
    assert_eq!(busy.status, StatusCode::CONFLICT);
    assert_eq!(
        busy.error_code(),
        "FailedOperation.IdempotentRequestInProgress"
    );
    assert!(busy.header("retry-after").is_some());
    let killed_at = Instant::now();
    c.kill9(2);
    drop(socket);
    let r = task_until_with(
        &c,
        1,
        &key,
        &[("idempotency-key", "dead-1"), ("x-sim-delay-ms", "0")],
        Duration::from_millis(c.lease_ms + 5000),
        |r| r.status != StatusCode::CONFLICT,
    )
    .await;
    let took = killed_at.elapsed();
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(!r.replayed(), "the first never committed: this one ran");
    // Bounded by the lease, with a second of slack for the heartbeat and
    // the retries' pace.
    assert!(
        took <= Duration::from_millis(c.lease_ms + 1000),
        "the marker lapsed after {took:?} (lease {} ms)",
        c.lease_ms
    );
    let evs = events(&c, 0).await;
    assert_eq!(evs.len(), 1, "only the second run is charged: {evs:?}");
    let after = keyed_task(&c, 0, &key, "dead-1", &[("x-sim-delay-ms", "0")]).await;
    assert!(after.replayed());
    assert_eq!(after.body, r.body);
}

// --- Operator polish across replicas (issue 21) ---

/// Appends `toml` to replica `i`'s config file and sends it SIGHUP.
fn reload_with(c: &Cluster, i: usize, toml: &str) {
    let gw = c.gw(i);
    let mut text = std::fs::read_to_string(&gw.config_path).unwrap();
    text.push_str(toml);
    std::fs::write(&gw.config_path, text).unwrap();
    gw.proc.hangup();
}

/// `limits.default_concurrency` raised on one replica's file and reloaded
/// there: every replica enforces the new default for the account (one
/// limit across the cluster), and a replica started later with the old
/// value in its file follows the cluster's and says so by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_default_limit_is_the_whole_clusters() {
    let _s = SERIAL.lock().await;
    let mut c = Cluster::start(ClusterOpts::default());
    let key = c.account_with_key("acme").await;
    reload_with(&c, 1, "\n[limits]\ndefault_concurrency = 5\n");
    for i in 0..3 {
        view_until(&c, i, "acme", Duration::from_secs(5), "limit 5", |v| {
            v["concurrency"]["limit"] == 5
        })
        .await;
    }
    // 7 tasks over replicas 0 and 2 (neither reloaded): 5 at once.
    let tasks: Vec<_> = (0..7)
        .map(|n| {
            let client = c.client(if n % 2 == 0 { 0 } else { 2 });
            let key = key.clone();
            tokio::spawn(async move {
                client
                    .task(
                        &key,
                        &[("x-sim-delay-ms", "600"), ("x-queue-timeout-ms", "10000")],
                    )
                    .await
            })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&r.body)
        );
    }
    assert_eq!(
        c.max_in_flight("acme").await,
        5,
        "the new default, summed over replicas"
    );
    // A replica whose file still says 3 joins: it enforces the cluster's 5
    // and warns, naming the key.
    c.kill9(0);
    let gw = c.start_replica(NAMES[0]);
    c.replicas[0] = Some(gw);
    c.until_authenticates(0, &key).await;
    let v = c.admin(0).account("acme").await;
    assert_eq!(v["concurrency"]["limit"], 5, "{v}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !c
        .gw(0)
        .proc
        .logs()
        .contains("limits.default_concurrency differs")
    {
        assert!(
            Instant::now() < deadline,
            "no warning naming the key:\n{}",
            c.gw(0).proc.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every replica's account view shows the cluster's in-flight and queued
/// tasks, not only its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_shows_the_clusters_in_flight_and_queued() {
    let _s = SERIAL.lock().await;
    let c = Cluster::start(ClusterOpts::default());
    let key = c.account_with_key("acme").await;
    // 3 running on replica 0, then 2 queued on replica 1.
    let mut tasks: Vec<_> = (0..3)
        .map(|n| c.client(0).spawn(&key, 1500, &format!("run{n}")))
        .collect();
    view_until(&c, 0, "acme", Duration::from_secs(5), "3 in flight", |v| {
        v["concurrency"]["in_flight"] == 3
    })
    .await;
    tasks.extend((0..2).map(|n| c.client(1).spawn(&key, 0, &format!("wait{n}"))));
    for i in 0..3 {
        view_until(
            &c,
            i,
            "acme",
            Duration::from_secs(1),
            "3 in flight, 2 queued",
            |v| v["concurrency"]["in_flight"] == 3 && v["concurrency"]["queued"] == 2,
        )
        .await;
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().status, StatusCode::OK);
    }
    for i in 0..3 {
        view_until(&c, i, "acme", Duration::from_secs(2), "idle", |v| {
            v["concurrency"]["in_flight"] == 0 && v["concurrency"]["queued"] == 0
        })
        .await;
    }
}

// --- Jobs across replicas (SPEC §10.2, issue 18) ---

async fn job_call(
    c: &Cluster,
    i: usize,
    method: Method,
    key: &str,
    rest: &str,
    headers: &[(&str, &str)],
) -> Resp {
    let auth = format!("Bearer {key}");
    let mut all = vec![("authorization", auth.as_str())];
    all.extend_from_slice(headers);
    c.http
        .send(
            method,
            &format!("{}/tollgate/jobs/{rest}", c.gw(i).url),
            &all,
            common::TASK_BODY.to_string(),
        )
        .await
}

/// Polls (bounded) replica `i`'s view of job `id` until `ok`.
async fn job_until(
    c: &Cluster,
    i: usize,
    key: &str,
    id: &str,
    within: Duration,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let v = job_call(c, i, Method::GET, key, id, &[]).await.json();
        if ok(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "job {id} never {what}: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The replica running a job is killed: once its lease lapses another
/// replica claims the job, runs it again, and it is charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_replica_dies_is_run_by_another_and_charged_once() {
    let _s = SERIAL.lock().await;
    let mut c = Cluster::start(ClusterOpts::default());
    let key = c.account_with_key("acme").await;
    let r = job_call(
        &c,
        2,
        Method::POST,
        &key,
        "v1/style-transfer",
        &[("x-sim-delay-ms", "2500")],
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::ACCEPTED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let id = r.json()["job_id"].as_str().unwrap().to_string();
    job_until(&c, 0, &key, &id, Duration::from_secs(5), "running", |v| {
        v["status"] == "running"
    })
    .await;
    // `running` is stored before the request is read back and forwarded:
    // killed only once the backend has it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.sim.requests(&c.http, "acme").await < 1 {
        assert!(
            Instant::now() < deadline,
            "the job never reached the backend"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.kill9(2);
    let within = Duration::from_millis(c.lease_ms * 3 + 10_000);
    let done = job_until(&c, 1, &key, &id, within, "run again", |v| {
        assert!(
            v["status"] == "running" || v["status"] == "queued" || v["status"] == "succeeded",
            "{v}"
        );
        v["status"] == "succeeded"
    })
    .await;
    assert_eq!(done["result"]["status"], 200, "{done}");
    let evs = events(&c, 0).await;
    let for_job: Vec<_> = evs
        .iter()
        .filter(|e| e["data"]["job_id"] == id.as_str())
        .collect();
    assert_eq!(for_job.len(), 1, "{evs:?}");
    assert_eq!(
        c.sim.requests(&c.http, "acme").await,
        2,
        "the killed run reached the backend, then the second"
    );
}

/// Jobs submitted through every replica share the account's one limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_through_every_replica_share_one_limit_and_run_once() {
    let _s = SERIAL.lock().await;
    let c = Cluster::start(ClusterOpts::default());
    let key = c.account_with_key("acme").await;
    let mut ids = Vec::new();
    for n in 0..12 {
        let r = job_call(
            &c,
            n % 3,
            Method::POST,
            &key,
            "v1/style-transfer",
            &[("x-sim-delay-ms", "150")],
        )
        .await;
        assert_eq!(
            r.status,
            StatusCode::ACCEPTED,
            "{}",
            String::from_utf8_lossy(&r.body)
        );
        ids.push(r.json()["job_id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        job_until(&c, 0, &key, id, Duration::from_secs(30), "succeeded", |v| {
            v["status"] == "succeeded"
        })
        .await;
    }
    assert!(c.max_in_flight("acme").await <= 3);
    assert_eq!(
        c.sim.requests(&c.http, "acme").await,
        12,
        "each job ran once"
    );
    let evs = events(&c, 1).await;
    assert_eq!(evs.len(), 12);
}

// --- Usage events on NATS JetStream across replicas (SPEC §11) ---

/// Every replica's events reach the stream once: one replica publishes
/// (it holds the publisher's claim) from the shared feed; when it is
/// killed, another takes over from the shared watermark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replicas_events_reach_the_stream_once() {
    let _s = SERIAL.lock().await;
    let id = unique("");
    let (subject, stream) = (format!("tgtest.{id}"), format!("TGTEST_{id}"));
    let mut c = Cluster::start(ClusterOpts {
        extra_toml: format!(
            "[events]\nstream = \"nats\"\nnats_url = \"nats://127.0.0.1:4222\"\nsubject = \"{subject}\"\nstream_name = \"{stream}\"\n"
        ),
        ..ClusterOpts::default()
    });
    let key = c.account_with_key("acme").await;
    let other = c.account_with_key("globex").await;
    let mut answers = tasks_in_turn(&c, &key, "a", 30).await;
    answers.extend(tasks_in_turn(&c, &other, "b", 30).await);
    assert_all_succeeded("before the kill", &answers);
    // Kill whichever replica publishes now; the rest goes on.
    let mut killed = None;
    for i in 0..3 {
        let text = c
            .http
            .send(Method::GET, &format!("{}/metrics", c.gw(i).admin), &[], "")
            .await;
        if String::from_utf8_lossy(&text.body).contains("tollgate_stream_publishing 1") {
            killed = Some(i);
        }
    }
    let killed = killed.expect("one replica publishes");
    c.kill9(killed);
    let alive: Vec<usize> = (0..3).filter(|i| *i != killed).collect();
    let mut more = Vec::new();
    for n in 0..30 {
        let i = alive[n % 2];
        let rid = format!("c{n}");
        let r = c
            .client(i)
            .task(&key, &[("x-sim-delay-ms", "0"), ("x-request-id", &rid)])
            .await;
        more.push((rid, r));
    }
    assert_all_succeeded("after the kill", &more);
    let stored = events(&c, alive[0]).await;
    assert_eq!(stored.len(), 90);
    let want: HashSet<String> = event_ids(&stored).into_iter().collect();

    let within = Duration::from_millis(c.lease_ms * 3 + 20_000);
    let seen: Vec<String> =
        common::consume_stream("nats://127.0.0.1:4222", &stream, want.len(), within)
            .await
            .into_iter()
            .map(|(_, v)| v["id"].as_str().unwrap().to_string())
            .collect();
    let unique_seen: HashSet<String> = seen.iter().cloned().collect();
    assert_eq!(unique_seen.len(), seen.len(), "an event seen twice");
    assert_eq!(unique_seen, want, "every replica's events, once");
    let client = async_nats::connect("nats://127.0.0.1:4222").await.unwrap();
    let _ = async_nats::jetstream::new(client)
        .delete_stream(&stream)
        .await;
}
