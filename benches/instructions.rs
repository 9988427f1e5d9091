//! Instructions per task through the real pipeline, counted by callgrind:
//! a guard against CPU regressions that a noisy, shared machine can afford
//! (instruction counts repeat where timings do not).
//!
//! `cargo bench --bench instructions` runs this binary twice under
//! `valgrind --tool=callgrind`, once pushing `FEW` tasks and once `MANY`,
//! and divides the difference of the two totals by `MANY - FEW`, so start-up
//! and shutdown cancel out. Each run is a whole gateway in process
//! (`app::run`: key auth, account gate, limiter, billing reservation on a
//! postpaid account, proxying, a durable usage event in SQLite, the JSON
//! Lines export) in front of the built-in simulator (its share is counted
//! too, as the pinned bench counts the backend's), driven over one
//! keep-alive loopback connection, one task at a time. Every thread of the
//! process is counted; the kernel's share is not (see `benches/pinned.sh`).
//!
//! The figure is compared with `benches/instructions.budget`: more than
//! `TOLERANCE` above it fails (exit code 1). When a change lowers the count
//! for good, lower the budget with it (and say so in BENCHMARKS.md).
//!
//! Then the same drive runs once more in this process, without valgrind,
//! under a counting allocator: allocations and bytes allocated per task
//! (reported, not budgeted; all threads, the bench's own client and the
//! simulator included).

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tollgate::config::Config;

/// The system allocator (the gateway binary's), counting.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static ALLOCATED: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        ALLOCATED.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        ALLOCATED.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const FEW: u64 = 100;
const MANY: u64 = 600;
const TOLERANCE: f64 = 0.10;
const TASKS_VAR: &str = "INSTRUCTIONS_BENCH_TASKS";
const ADMIN_TOKEN: &str = "instructions-bench-admin-token-0123";

fn main() -> ExitCode {
    if let Ok(n) = std::env::var(TASKS_VAR) {
        let n: u64 = n.parse().expect("a task count");
        return match drive(n) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("instructions bench: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if std::env::args().any(|a| a == "--list") {
        return ExitCode::SUCCESS;
    }
    let out = tempfile::tempdir().expect("a temporary directory");
    let (few, many) = match (count(out.path(), FEW), count(out.path(), MANY)) {
        (Ok(f), Ok(m)) => (f, m),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("instructions bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let per_task = many.saturating_sub(few) as f64 / (MANY - FEW) as f64;
    println!(
        "instructions per task: {per_task:.0} ({few} for {FEW} tasks, {many} for {MANY}; all threads, user space)"
    );
    match drive(MANY) {
        Ok((allocations, bytes)) => println!(
            "allocations per task: {:.1} ({:.0} bytes; all threads, the bench's client and the simulator included)",
            allocations as f64 / MANY as f64,
            bytes as f64 / MANY as f64
        ),
        Err(e) => {
            eprintln!("instructions bench: counting allocations: {e}");
            return ExitCode::FAILURE;
        }
    }
    let budget_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/instructions.budget");
    let budget: f64 = match std::fs::read_to_string(&budget_file)
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
    {
        Some(b) => b,
        None => {
            eprintln!("instructions bench: no number in {}", budget_file.display());
            return ExitCode::FAILURE;
        }
    };
    let limit = budget * (1.0 + TOLERANCE);
    if per_task > limit {
        eprintln!(
            "instructions bench: {per_task:.0} per task is over the budget {budget:.0} + {:.0} % = {limit:.0}",
            TOLERANCE * 100.0
        );
        return ExitCode::FAILURE;
    }
    println!(
        "within the budget {budget:.0} + {:.0} % ({:+.1} %)",
        TOLERANCE * 100.0,
        (per_task / budget - 1.0) * 100.0
    );
    ExitCode::SUCCESS
}

/// Runs this binary under callgrind pushing `tasks` tasks; its total.
fn count(dir: &Path, tasks: u64) -> Result<u64, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let file = dir.join(format!("callgrind.{tasks}"));
    let status = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", file.display()))
        .arg("--quiet")
        .arg(&exe)
        .env(TASKS_VAR, tasks.to_string())
        .status()
        .map_err(|e| format!("cannot run valgrind (install Debian's valgrind): {e}"))?;
    if !status.success() {
        return Err(format!(
            "the run of {tasks} tasks under callgrind failed: {status}"
        ));
    }
    let text = std::fs::read_to_string(&file).map_err(|e| e.to_string())?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary: ")
                .or_else(|| l.strip_prefix("totals: "))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no total in {}", file.display()))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A whole gateway in process, `tasks` tasks through it, then a clean stop;
/// the allocations made (and their bytes) while the tasks ran.
fn drive(tasks: u64) -> Result<(u64, u64), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let (data, admin) = (free_port(), free_port());
        let env = [
            ("TOLLGATE_SERVER_LISTEN", format!("127.0.0.1:{data}")),
            ("TOLLGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin}")),
            ("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
            (
                "TOLLGATE_STORAGE_DATA_DIR",
                dir.path().join("data").display().to_string(),
            ),
            ("TOLLGATE_SIMULATOR_LATENCY_MS", "0".to_string()),
            ("TOLLGATE_SIMULATOR_LATENCY_JITTER_MS", "0".to_string()),
            ("TOLLGATE_LOG_LEVEL", "warn".to_string()),
        ]
        .map(|(k, v)| (k.to_string(), v));
        let config = Config::from_toml_and_env("", env).map_err(|e| e.to_string())?;
        let shutdown = CancellationToken::new();
        let gateway = tokio::spawn(tollgate::app::run(config, shutdown.clone()));

        let mut admin_conn = connect(admin).await?;
        let bearer = format!("Bearer {ADMIN_TOKEN}");
        let admin_call = |method: Method, path: &str, body: &'static str| {
            Request::builder()
                .method(method)
                .uri(path.to_string())
                .header("host", "127.0.0.1")
                .header("authorization", &bearer)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .expect("a valid request")
        };
        send(
            &mut admin_conn,
            admin_call(Method::POST, "/v1/accounts", r#"{"id":"bench"}"#),
            StatusCode::CREATED,
        )
        .await?;
        send(
            &mut admin_conn,
            admin_call(
                Method::PUT,
                "/v1/accounts/bench/postpaid",
                r#"{"enabled":true}"#,
            ),
            StatusCode::OK,
        )
        .await?;
        let key = send(
            &mut admin_conn,
            admin_call(Method::POST, "/v1/accounts/bench/keys", "{}"),
            StatusCode::CREATED,
        )
        .await?;
        let key: serde_json::Value = serde_json::from_slice(&key).map_err(|e| e.to_string())?;
        let key = key["api_key"]
            .as_str()
            .ok_or("no api_key in the answer")?
            .to_string();

        let mut conn = connect(data).await?;
        let body = Bytes::from(format!(
            r#"{{"Image":"{}","Style":"ink"}}"#,
            "x".repeat(180)
        ));
        let before = (
            ALLOCATIONS.load(Ordering::Relaxed),
            ALLOCATED.load(Ordering::Relaxed),
        );
        for _ in 0..tasks {
            let req = Request::builder()
                .method(Method::POST)
                .uri("/v1/style-transfer")
                .header("host", "127.0.0.1")
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .body(Full::new(body.clone()))
                .expect("a valid request");
            send(&mut conn, req, StatusCode::OK).await?;
        }
        let counted = (
            ALLOCATIONS.load(Ordering::Relaxed) - before.0,
            ALLOCATED.load(Ordering::Relaxed) - before.1,
        );
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), gateway)
            .await
            .map_err(|_| "the gateway did not stop".to_string())?
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        Ok(counted)
    })
}

async fn connect(port: u16) -> Result<SendRequest<Full<Bytes>>, String> {
    for _ in 0..200 {
        if let Ok(stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            return Ok(sender);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("nothing listens on port {port}"))
}

async fn send(
    conn: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
    want: StatusCode,
) -> Result<Bytes, String> {
    let path = req.uri().to_string();
    conn.ready().await.map_err(|e| e.to_string())?;
    let resp = conn.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if status != want {
        return Err(format!(
            "{path}: {status} {}",
            String::from_utf8_lossy(&body)
        ));
    }
    Ok(body)
}
