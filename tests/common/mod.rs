//! Test harness: starts the real `tollgate` binary (gateway and simulator)
//! on loopback ports chosen by the OS, and talks to it over HTTP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// A child process killed (SIGKILL) when dropped, with its stderr captured.
pub struct Proc {
    child: Child,
    pub stderr: Arc<Mutex<String>>,
}

impl Proc {
    /// Starts `args`, waits for a stdout line containing `marker`, returns
    /// the process and every `http://` address printed until then.
    fn spawn(args: &[&str], env: &[(&str, String)], markers: usize) -> (Self, Vec<String>) {
        Self::spawn_via(&[], args, env, markers)
    }

    /// Like `spawn`, run through `prefix` (a program that execs the rest,
    /// such as `prlimit --nofile=256`), if not empty.
    fn spawn_via(
        prefix: &[&str],
        args: &[&str],
        env: &[(&str, String)],
        markers: usize,
    ) -> (Self, Vec<String>) {
        let mut cmd = match prefix.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("RUST_LOG", "info");
        for (k, v) in env {
            // An empty value unsets (`RUST_LOG` to let the config decide).
            if v.is_empty() {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        let mut child = cmd.spawn().expect("start tollgate");
        let stderr = Arc::new(Mutex::new(String::new()));
        let err_pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err_pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut addrs = Vec::new();
        let mut line = String::new();
        while addrs.len() < markers {
            line.clear();
            if out.read_line(&mut line).unwrap_or(0) == 0 {
                panic!(
                    "tollgate exited before listening; stderr:\n{}",
                    stderr.lock().unwrap()
                );
            }
            if let Some(i) = line.find("http://") {
                addrs.push(line[i..].trim().to_string());
            }
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while out.read_line(&mut sink).unwrap_or(0) > 0 {
                sink.clear();
            }
        });
        (Self { child, stderr }, addrs)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn sigterm_and_wait(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn logs(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The logs once they hold `needle` `count` times (bounded: 10 s). Log
    /// lines reach stderr through the gateway's writer thread, so a line
    /// may come a moment after the answer that caused it.
    pub async fn wait_log(&self, needle: &str, count: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let logs = self.logs();
            if logs.matches(needle).count() >= count {
                return logs;
            }
            assert!(
                Instant::now() < deadline,
                "never logged `{needle}` ×{count}:\n{logs}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGHUP: the gateway reloads its config file.
    pub fn hangup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Simulator {
    pub proc: Proc,
    pub url: String,
}

impl Simulator {
    pub fn start() -> Self {
        let (proc, addrs) = Proc::spawn(
            &[
                "simulate",
                "--listen",
                "127.0.0.1:0",
                "--latency-ms",
                "0",
                "--jitter-ms",
                "0",
            ],
            &[],
            1,
        );
        Self {
            proc,
            url: addrs[0].clone(),
        }
    }

    pub async fn stats(&self, client: &Http) -> Value {
        client
            .get_json(&format!("{}/_sim/stats", self.url), &[])
            .await
            .1
    }

    pub async fn max_in_flight(&self, client: &Http, account: &str) -> u64 {
        self.stats(client).await["accounts"][account]["max_in_flight"]
            .as_u64()
            .unwrap_or(0)
    }

    /// Requests that reached the simulator for `account`.
    pub async fn requests(&self, client: &Http, account: &str) -> u64 {
        self.stats(client).await["accounts"][account]["requests"]
            .as_u64()
            .unwrap_or(0)
    }
}

/// Gateway options a test may change; the rest is fixed for the tests.
#[derive(Clone, Default)]
pub struct Opts {
    pub extra_toml: String,
    pub env: Vec<(&'static str, String)>,
}

pub struct Gateway {
    pub proc: Proc,
    pub url: String,
    pub admin: String,
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
}

impl Gateway {
    pub fn start(dir: &Path, backend: &str, opts: &Opts) -> Self {
        Self::start_via(dir, backend, opts, &[])
    }

    /// Like `start`, with the gateway run through `prefix` (e.g.
    /// `["prlimit", "--nofile=256:256"]`).
    pub fn start_via(dir: &Path, backend: &str, opts: &Opts, prefix: &[&str]) -> Self {
        let data_dir = dir.join("data");
        let config_path = dir.join("tollgate.toml");
        let toml = format!(
            r#"
[server]
listen = "127.0.0.1:0"
instance = "test"
shutdown_grace_ms = 10000

[admin]
listen = "127.0.0.1:0"
token = "{ADMIN_TOKEN}"

[backend]
url = "{backend}"
timeout_ms = 10000

[storage]
data_dir = "{}"

[demo]
enabled = false

{}
"#,
            data_dir.display(),
            opts.extra_toml
        );
        std::fs::write(&config_path, toml).unwrap();
        Self::start_with_config_via(&config_path, &data_dir, opts, prefix)
    }

    /// `tollgate serve` with no config file: the embedded defaults (the
    /// README's first command), moved to free ports and a temp data dir.
    pub fn start_defaults(dir: &Path, env: &[(&str, String)]) -> Self {
        let data_dir = dir.join("data");
        let mut all = vec![
            ("TOLLGATE_SERVER_LISTEN", "127.0.0.1:0".to_string()),
            ("TOLLGATE_ADMIN_LISTEN", "127.0.0.1:0".to_string()),
            ("TOLLGATE_STORAGE_DATA_DIR", data_dir.display().to_string()),
        ];
        all.extend(env.iter().cloned());
        let (proc, addrs) = Proc::spawn(&["serve"], &all, 2);
        Self {
            proc,
            url: addrs[0].clone(),
            admin: addrs[1].clone(),
            data_dir,
            config_path: PathBuf::new(),
        }
    }

    /// Starts again on the same config and data (after a stop or a crash).
    pub fn restart(&mut self, opts: &Opts) {
        self.proc.kill9();
        *self = Self::start_with_config(&self.config_path.clone(), &self.data_dir.clone(), opts);
    }

    fn start_with_config(config_path: &Path, data_dir: &Path, opts: &Opts) -> Self {
        Self::start_with_config_via(config_path, data_dir, opts, &[])
    }

    fn start_with_config_via(
        config_path: &Path,
        data_dir: &Path,
        opts: &Opts,
        prefix: &[&str],
    ) -> Self {
        let (proc, addrs) = Proc::spawn_via(
            prefix,
            &["serve", "--config", config_path.to_str().unwrap()],
            &opts.env,
            2,
        );
        Self {
            proc,
            url: addrs[0].clone(),
            admin: addrs[1].clone(),
            data_dir: data_dir.to_path_buf(),
            config_path: config_path.to_path_buf(),
        }
    }
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn error_code(&self) -> String {
        self.json()["Response"]["Error"]["Code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// Whether this is a stored answer given again for an idempotency key.
    pub fn replayed(&self) -> bool {
        self.header("idempotent-replayed").as_deref() == Some("true")
    }
}

#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

impl Http {
    pub fn new() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(256)
                .build_http(),
        }
    }

    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Resp {
        self.try_send(method, url, headers, body)
            .await
            .unwrap_or_else(|e| panic!("request to {url} failed: {e}"))
    }

    /// Like `send`, but a connection failure is an error, not a panic.
    pub async fn try_send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Resp, String> {
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .client
            .request(req.body(Full::new(body.into())).unwrap())
            .await
            .map_err(|e| format!("{e:?}"))?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("{e:?}"))?
            .to_bytes();
        Ok(Resp {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    pub async fn get_json(&self, url: &str, headers: &[(&str, &str)]) -> (StatusCode, Value) {
        let r = self.send(Method::GET, url, headers, Bytes::new()).await;
        let v = r.json();
        (r.status, v)
    }
}

/// Admin calls with the test token.
pub struct Admin<'a> {
    pub http: &'a Http,
    pub base: &'a str,
}

impl Admin<'_> {
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Resp {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        self.call_raw(method, path, body).await
    }

    /// With any body text (declared JSON), for what a client may send wrong.
    pub async fn call_raw(&self, method: Method, path: &str, body: impl Into<Bytes>) -> Resp {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        self.http
            .send(
                method,
                &format!("{}{path}", self.base),
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                ],
                body,
            )
            .await
    }

    /// Creates an account with postpaid on, so the free quota never limits
    /// a test that is not about billing.
    pub async fn create_account(&self, id: &str) {
        self.create_plain_account(id).await;
        let r = self
            .call(
                Method::PUT,
                &format!("/v1/accounts/{id}/postpaid"),
                Some(json!({"enabled": true})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "postpaid {id}: {:?}", r.json());
    }

    /// Creates an account as the API does: postpaid off, 50 free units.
    pub async fn create_plain_account(&self, id: &str) {
        let r = self
            .call(Method::POST, "/v1/accounts", Some(json!({"id": id})))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "create {id}: {:?}", r.json());
    }

    pub async fn create_sub(&self, root: &str, id: &str, cap: Option<u32>) {
        let r = self
            .call(
                Method::POST,
                &format!("/v1/accounts/{root}/sub-accounts"),
                Some(json!({"id": id, "max_concurrency": cap})),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::CREATED,
            "create sub {id}: {:?}",
            r.json()
        );
    }

    /// Issues a key; returns (key_id, api_key).
    pub async fn issue_key(&self, root: &str, sub: Option<&str>) -> (String, String) {
        let body = match sub {
            Some(s) => json!({"sub_account": s}),
            None => json!({}),
        };
        let r = self
            .call(
                Method::POST,
                &format!("/v1/accounts/{root}/keys"),
                Some(body),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "issue key: {:?}", r.json());
        let v = r.json();
        (
            v["key_id"].as_str().unwrap().to_string(),
            v["api_key"].as_str().unwrap().to_string(),
        )
    }

    pub async fn account(&self, id: &str) -> Value {
        self.call(Method::GET, &format!("/v1/accounts/{id}"), None)
            .await
            .json()
    }

    /// Every usage event, following the cursor to the end.
    pub async fn all_events(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = String::new();
        for _ in 0..10_000 {
            let r = self
                .call(
                    Method::GET,
                    &format!("/v1/usage-events?after={after}&limit=1000"),
                    None,
                )
                .await;
            assert_eq!(r.status, StatusCode::OK);
            let v = r.json();
            let events = v["events"].as_array().unwrap().clone();
            after = v["next"].as_str().unwrap().to_string();
            if events.is_empty() {
                break;
            }
            out.extend(events);
        }
        out
    }

    /// Waits (bounded) until the account has nothing in flight or queued.
    pub async fn wait_idle(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let a = self.account(id).await;
            let c = &a["concurrency"];
            if (c["in_flight"] == 0 && c["queued"] == 0) || Instant::now() > deadline {
                return a;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A running simulator + gateway pair in a temp dir.
pub struct Stack {
    pub dir: tempfile::TempDir,
    pub sim: Simulator,
    pub gw: Gateway,
    pub http: Http,
}

impl Stack {
    pub fn start(opts: Opts) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sim = Simulator::start();
        let gw = Gateway::start(dir.path(), &sim.url, &opts);
        Self {
            dir,
            sim,
            gw,
            http: Http::new(),
        }
    }

    pub fn admin(&self) -> Admin<'_> {
        Admin {
            http: &self.http,
            base: &self.gw.admin,
        }
    }

    /// An account with one root key; returns the key.
    pub async fn account_with_key(&self, id: &str) -> String {
        let admin = self.admin();
        admin.create_account(id).await;
        admin.issue_key(id, None).await.1
    }

    /// A task through the gateway with the given key and extra headers.
    pub async fn task(&self, key: &str, headers: &[(&str, &str)]) -> Resp {
        self.client().task(key, headers).await
    }

    /// Starts `n` tasks of `delay_ms` at the backend (request ids `h0`, `h1`,
    /// …) and waits until the gateway reports them in flight.
    pub async fn hold_slots(
        &self,
        account: &str,
        key: &str,
        n: u64,
        delay_ms: u64,
    ) -> Vec<tokio::task::JoinHandle<Resp>> {
        let client = self.client();
        let held = (0..n)
            .map(|i| client.spawn(key, delay_ms, &format!("h{i}")))
            .collect();
        wait_for(&self.admin(), account, "slots held", |a| {
            a["concurrency"]["in_flight"] == n
        })
        .await;
        held
    }
}

/// A cheap, `'static` handle for sending tasks from spawned tokio tasks.
#[derive(Clone)]
pub struct TaskClient {
    pub http: Http,
    pub url: String,
}

/// The body of every task `TaskClient::task` sends.
pub const TASK_BODY: &str = r#"{"InputImage":"x"}"#;

impl TaskClient {
    pub async fn task(&self, key: &str, headers: &[(&str, &str)]) -> Resp {
        self.task_with_body(key, headers, TASK_BODY).await
    }

    /// A task of `body` (`POST /v1/style-transfer`).
    pub async fn task_with_body(&self, key: &str, headers: &[(&str, &str)], body: &str) -> Resp {
        let auth = format!("Bearer {key}");
        let mut all = vec![("authorization", auth.as_str())];
        all.extend_from_slice(headers);
        self.http
            .send(
                Method::POST,
                &format!("{}/v1/style-transfer", self.url),
                &all,
                body.to_string(),
            )
            .await
    }

    /// Spawns a task with the given delay and request id.
    pub fn spawn(
        &self,
        key: &str,
        delay_ms: u64,
        request_id: &str,
    ) -> tokio::task::JoinHandle<Resp> {
        let this = self.clone();
        let key = key.to_string();
        let rid = request_id.to_string();
        tokio::spawn(async move {
            let d = delay_ms.to_string();
            this.task(&key, &[("x-sim-delay-ms", &d), ("x-request-id", &rid)])
                .await
        })
    }
}

impl Stack {
    pub fn client(&self) -> TaskClient {
        TaskClient {
            http: self.http.clone(),
            url: self.gw.url.clone(),
        }
    }
}

/// Sends a raw HTTP/1.1 task request on its own connection and returns the
/// open socket (drop it to hang up).
pub async fn raw_task(
    gateway_url: &str,
    key: &str,
    extra_headers: &str,
    body: &str,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let addr = gateway_url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST /v1/style-transfer HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra_headers}\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s
}

/// Waits (bounded) until `check` holds for the account's view.
pub async fn wait_for(
    admin: &Admin<'_>,
    account: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = admin.account(account).await;
        if check(&a) {
            return a;
        }
        if Instant::now() > deadline {
            panic!("{account}: never {what}; last view {a}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Declares a body of `declared` bytes but sends only `sent` of them, like
/// a client in the middle of a large upload; returns the open socket.
pub async fn raw_partial_task(
    gateway_url: &str,
    key: &str,
    extra_headers: &str,
    declared: usize,
    sent: usize,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let addr = gateway_url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/style-transfer HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nContent-Length: {declared}\r\n{extra_headers}\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&vec![b'x'; sent]).await.unwrap();
    s
}

/// The events in the JSON Lines export under `data_dir/usage/`, in file
/// order. The newest file may end in a line still being written (the
/// export appends as it goes): that unterminated tail is left for the next
/// read. Every other line must be a whole event.
pub fn jsonl_events(data_dir: &Path) -> Vec<Value> {
    let mut files: Vec<_> = std::fs::read_dir(data_dir.join("usage"))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    files.retain(|p: &PathBuf| p.extension().is_some_and(|e| e == "jsonl"));
    files.sort();
    let newest = files.len().saturating_sub(1);
    let mut out = Vec::new();
    for (i, f) in files.into_iter().enumerate() {
        let text = std::fs::read_to_string(f).unwrap();
        let whole = match text.rfind('\n') {
            Some(end) if i == newest => &text[..=end],
            None if i == newest => "",
            _ => text.as_str(),
        };
        for line in whole.lines() {
            out.push(serde_json::from_str(line).expect("every line is a whole event"));
        }
    }
    out
}

/// Waits (bounded) until the export, which tails the store's event feed,
/// holds at least `n` events; returns what it holds then.
pub async fn wait_for_jsonl(data_dir: &Path, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = jsonl_events(data_dir);
        if events.len() >= n || Instant::now() > deadline {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The first complete HTTP/1.1 answer in `raw` (bytes read so far from a
/// socket), past any interim `1xx` heads (`100 Continue`): its status, head
/// (lower-cased) and `Content-Length` body; `None` until all of it is there.
pub fn complete_answer(mut raw: &[u8]) -> Option<(u16, String, &[u8])> {
    loop {
        let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())?;
        if (100..200).contains(&status) {
            raw = &raw[end + 4..];
            continue;
        }
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let body = raw.get(end + 4..end + 4 + len)?;
        return Some((status, head, body));
    }
}

/// Waits (bounded) for a `serve` that must refuse to start; its exit code
/// (`None` if it had to be killed because it went on) and its stderr.
pub fn refused_start(mut child: Child) -> (Option<i32>, String) {
    let mut status = None;
    for _ in 0..200 {
        if let Some(s) = child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if status.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    (
        status.and_then(|s| s.code()),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether `promtool` can run here. CI installs it, so there a missing one
/// fails the test; a developer machine without it skips the check.
pub fn has_promtool(what: &str) -> bool {
    if Command::new("promtool").arg("--version").output().is_ok() {
        return true;
    }
    assert!(
        std::env::var("CI").is_err(),
        "promtool must be installed in CI"
    );
    eprintln!("promtool not installed; {what} skipped");
    false
}

/// A gateway's state in process, without listeners: the config of the
/// embedded defaults plus `env` (`TOLLGATE_*`), its data under `dir`, its
/// store opened, nothing served (the backend is never called). For tests
/// that drive the services by hand around a read of the store.
pub async fn app_in_process(
    dir: &Path,
    env: &[(&str, String)],
) -> (Arc<tollgate::app::App>, Arc<dyn tollgate::store::Store>) {
    let mut vars = vec![(
        "TOLLGATE_STORAGE_DATA_DIR".to_string(),
        dir.join("data").display().to_string(),
    )];
    vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let config = tollgate::config::Config::from_toml_and_env("", vars).expect("a valid config");
    let store = tollgate::store::open(&config.storage, &config.server.instance)
        .await
        .expect("the store opens");
    let clock = Arc::new(tollgate::clock::SystemClock);
    let app = tollgate::app::App::build(config, "http://127.0.0.1:9", store.clone(), clock)
        .await
        .expect("the app builds");
    (app, store)
}

/// Reads from `s` until it holds one whole HTTP answer (bounded: 10 s);
/// returns the bytes read, to be parsed with [`complete_answer`].
pub async fn read_one_answer(s: &mut (impl tokio::io::AsyncRead + Unpin), what: &str) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    let deadline = Instant::now() + Duration::from_secs(10);
    while complete_answer(&raw).is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => raw.extend_from_slice(&chunk[..n]),
            other => panic!(
                "no whole answer to {what}: {other:?}, got {:?}",
                String::from_utf8_lossy(&raw)
            ),
        }
    }
    raw
}

/// Every message of a NATS JetStream stream through one durable
/// consumer (the tests' billing pipeline), until `n` arrived and none more
/// comes for a moment (bounded). Each: (subject, event JSON).
pub async fn consume_stream(
    url: &str,
    stream_name: &str,
    n: usize,
    within: Duration,
) -> Vec<(String, Value)> {
    let client = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let deadline = Instant::now() + within;
    let stream = loop {
        match js.get_stream(stream_name).await {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "no stream {stream_name}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let consumer: async_nats::jetstream::consumer::pull::Stream = stream
        .get_or_create_consumer(
            "test",
            async_nats::jetstream::consumer::pull::Config {
                durable_name: Some("test".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .messages()
        .await
        .unwrap();
    let mut consumer = consumer;
    let mut out = Vec::new();
    loop {
        let quiet = if out.len() >= n {
            Duration::from_millis(500)
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        match tokio::time::timeout(quiet, futures_util::StreamExt::next(&mut consumer)).await {
            Ok(Some(Ok(m))) => {
                let v: Value = serde_json::from_slice(&m.payload).unwrap();
                out.push((m.subject.to_string(), v));
                m.ack().await.unwrap();
            }
            Ok(Some(Err(e))) => panic!("consumer: {e}"),
            Ok(None) | Err(_) => break,
        }
    }
    out
}
