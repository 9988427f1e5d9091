//! The request loops: closed (one connection per worker) and open (due
//! times on a fixed schedule, a pooled client).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::report::{JobsSummary, Report, Tally};
use super::{Mode, Plan};

pub(super) fn request(plan: &Plan, n: usize) -> Request<Full<Bytes>> {
    let mut req = Request::post(plan.uri.clone())
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(plan.body.clone()))
        .expect("valid parts");
    let headers = req.headers_mut();
    if let Some(authority) = plan.uri.authority()
        && let Ok(v) = header::HeaderValue::from_str(authority.as_str())
    {
        headers.insert(header::HOST, v);
    }
    if !plan.keys.is_empty() {
        let key = &plan.keys[n % plan.keys.len()];
        if let Ok(v) = header::HeaderValue::from_str(&format!("Bearer {key}")) {
            headers.insert(header::AUTHORIZATION, v);
        }
    }
    for (k, v) in &plan.headers {
        headers.insert(k.clone(), v.clone());
    }
    req
}

/// The error code of a non-2xx answer in the service's error shape.
pub(super) fn error_code(status: u16, body: &[u8]) -> Option<String> {
    if (200..300).contains(&status) {
        return None;
    }
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["Response"]["Error"]["Code"].as_str().map(String::from))
        .or_else(|| Some(format!("HTTP {status}")))
}

fn progress_bar(plan: &Plan, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(plan.duration.as_millis() as u64);
    pb.set_style(
        ProgressStyle::with_template("{bar:40} {elapsed}/{duration} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

/// Counters the progress bar reads while the run goes.
#[derive(Default)]
pub struct Live {
    /// Requests answered (any status) or failed.
    done: AtomicU64,
    /// Of those: not 2xx, or no answer at all.
    errors: AtomicU64,
    /// Jobs mode: jobs seen final.
    jobs_final: AtomicU64,
}

impl Live {
    pub(super) fn job_final(&self) {
        self.jobs_final.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn finished(&self, ok: bool) {
        self.done.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

pub async fn run(plan: Plan, show_progress: bool) -> Report {
    let plan = Arc::new(plan);
    let done = Arc::new(Live::default());
    let pb = progress_bar(&plan, show_progress);
    let start = Instant::now();
    let deadline = start + plan.duration;
    let plan_is_jobs = plan.jobs.is_some();
    let ticker = {
        let pb = pb.clone();
        let done = done.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let elapsed = start.elapsed();
                pb.set_position(elapsed.as_millis() as u64);
                let n = done.done.load(Ordering::Relaxed);
                let errors = done.errors.load(Ordering::Relaxed);
                let jobs = done.jobs_final.load(Ordering::Relaxed);
                let jobs = match plan_is_jobs {
                    true => format!(", {jobs} jobs final"),
                    false => String::new(),
                };
                pb.set_message(format!(
                    "{n} requests, {:.0} req/s, {errors} errors{jobs}",
                    n as f64 / elapsed.as_secs_f64()
                ));
            }
        })
    };
    if let Some(jobs) = plan.jobs {
        let (mode, tally, jobs_tally) = super::jobs::run(plan.clone(), jobs, start, done).await;
        let elapsed = start.elapsed();
        ticker.abort();
        pb.finish_and_clear();
        let mut report = Report::from_tally(mode, plan.duration, elapsed, &tally);
        report.jobs = Some(JobsSummary::from_tally(jobs.poll, jobs.drain, &jobs_tally));
        return report;
    }
    let (mode, tally) = match plan.mode {
        Mode::Closed { connections } => (
            format!("closed loop, {connections} connections"),
            closed_loop(plan.clone(), connections, deadline, done).await,
        ),
        Mode::Open { rate } => (
            format!("open loop, {rate:.0} req/s"),
            open_loop(plan.clone(), rate, start, deadline, done).await,
        ),
    };
    let elapsed = start.elapsed();
    ticker.abort();
    pb.finish_and_clear();
    Report::from_tally(mode, plan.duration, elapsed, &tally)
}

async fn closed_loop(
    plan: Arc<Plan>,
    connections: usize,
    deadline: Instant,
    done: Arc<Live>,
) -> Tally {
    let counter = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            let plan = plan.clone();
            let counter = counter.clone();
            let done = done.clone();
            tokio::spawn(async move { closed_worker(&plan, deadline, &counter, &done).await })
        })
        .collect();
    let mut total = Tally::default();
    for w in workers {
        if let Ok(t) = w.await {
            total.merge(&t);
        }
    }
    total
}

async fn closed_worker(
    plan: &Plan,
    deadline: Instant,
    counter: &AtomicUsize,
    done: &Live,
) -> Tally {
    let mut tally = Tally::default();
    let authority = plan
        .uri
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_default();
    'reconnect: while Instant::now() < deadline {
        // Bounded by the run's end too: a host that never answers a SYN
        // would otherwise hold the worker for the OS's connect timeout.
        let Ok(Ok(stream)) =
            tokio::time::timeout_at(deadline, TcpStream::connect(&authority)).await
        else {
            if Instant::now() >= deadline {
                break;
            }
            tally.connection_errors += 1;
            done.finished(false);
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Ok(Ok((mut sender, conn))) = tokio::time::timeout_at(
            deadline,
            hyper::client::conn::http1::handshake(TokioIo::new(stream)),
        )
        .await
        else {
            tally.connection_errors += 1;
            done.finished(false);
            continue;
        };
        tokio::spawn(conn);
        while Instant::now() < deadline {
            let n = counter.fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            let exchange = async {
                let resp = sender.send_request(request(plan, n)).await?;
                let status = resp.status().as_u16();
                let body = resp.into_body().collect().await?;
                Ok::<_, hyper::Error>((status, body.to_bytes()))
            };
            // The run ends at --duration: a request still unanswered then
            // is abandoned and counted apart, not waited for.
            let Ok(answered) = tokio::time::timeout_at(deadline, exchange).await else {
                tally.unfinished += 1;
                break 'reconnect;
            };
            let Ok((status, body)) = answered else {
                tally.connection_errors += 1;
                done.finished(false);
                continue 'reconnect;
            };
            tally.record(started.elapsed(), status, error_code(status, &body));
            done.finished((200..300).contains(&status));
            match tokio::time::timeout_at(deadline, sender.ready()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => continue 'reconnect,
                Err(_) => break 'reconnect,
            }
        }
    }
    tally
}

/// One answered (or failed) request of the open loop.
struct Sample {
    latency: Duration,
    status: u16,
    error_code: Option<String>,
    failed: bool,
    /// Still unanswered at the end of the run.
    unfinished: bool,
}

async fn open_loop(
    plan: Arc<Plan>,
    rate: f64,
    start: Instant,
    deadline: Instant,
    done: Arc<Live>,
) -> Tally {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(plan.max_outstanding)
        .build_http();
    let outstanding = Arc::new(AtomicUsize::new(0));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Sample>();
    // One histogram, fed by a collector, instead of one per request.
    let collector = tokio::spawn(async move {
        let mut tally = Tally::default();
        while let Some(s) = rx.recv().await {
            if s.unfinished {
                tally.unfinished += 1;
            } else if s.failed {
                tally.connection_errors += 1;
            } else {
                tally.record(s.latency, s.status, s.error_code);
            }
        }
        tally
    });
    let mut dropped = 0u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut n: usize = 0;
    loop {
        let due = start + interval.mul_f64(n as f64);
        if due >= deadline {
            break;
        }
        if due > Instant::now() {
            tokio::time::sleep_until(due).await;
        }
        n += 1;
        if outstanding.load(Ordering::Relaxed) >= plan.max_outstanding {
            dropped += 1;
            continue;
        }
        outstanding.fetch_add(1, Ordering::Relaxed);
        let req = request(&plan, n);
        let client = client.clone();
        let tx = tx.clone();
        let outstanding = outstanding.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let exchange = async {
                let resp = client.request(req).await.map_err(|_| 0u16)?;
                let status = resp.status().as_u16();
                let body = resp.into_body().collect().await.map_err(|_| status)?;
                Ok::<_, u16>((status, body.to_bytes()))
            };
            let sample = match tokio::time::timeout_at(deadline, exchange).await {
                // Measured from when the request was due, not sent.
                Ok(Ok((status, body))) => Sample {
                    latency: due.elapsed(),
                    status,
                    error_code: error_code(status, &body),
                    failed: false,
                    unfinished: false,
                },
                Ok(Err(status)) => Sample {
                    latency: Duration::ZERO,
                    status,
                    error_code: None,
                    failed: true,
                    unfinished: false,
                },
                Err(_) => Sample {
                    latency: Duration::ZERO,
                    status: 0,
                    error_code: None,
                    failed: false,
                    unfinished: true,
                },
            };
            if !sample.unfinished {
                done.finished(!sample.failed && (200..300).contains(&sample.status));
            }
            outstanding.fetch_sub(1, Ordering::Relaxed);
            let _ = tx.send(sample);
        });
    }
    drop(tx);
    let mut total = collector.await.unwrap_or_default();
    total.dropped = dropped;
    total
}
