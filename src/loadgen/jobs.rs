//! Jobs mode: submits on the open or closed loop's schedule, and each
//! accepted job polled until it is final. Bounded: nothing new is submitted
//! after `--duration`, and submits still unanswered and jobs still not
//! final are given up `--drain-ms` after it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;

use super::driver::{Live, error_code, request};
use super::report::{JobOutcome, JobsTally, Tally};
use super::{JobsPlan, Mode, Plan};

/// A job in one of these does not change any more.
const FINAL: &[&str] = &["succeeded", "failed", "cancelled", "expired"];

/// Where jobs are when the submit's answer names no `Location` (the
/// gateway's default `jobs.path_prefix`).
const DEFAULT_PREFIX: &str = "/tollgate/jobs";

type Http = Client<HttpConnector, Full<Bytes>>;

enum Sample {
    Submit {
        latency: Duration,
        status: u16,
        error_code: Option<String>,
    },
    /// No answer (connection refused or reset).
    SubmitFailed,
    /// Unanswered when the drain ended.
    SubmitUnfinished,
    /// Due while `--max-outstanding` were outstanding: not sent.
    Dropped,
    Job(JobOutcome),
}

struct Ctx {
    plan: Arc<Plan>,
    poll: Duration,
    client: Http,
    start: Instant,
    drain_end: Instant,
    live: Arc<Live>,
    outstanding: Arc<AtomicUsize>,
    tx: UnboundedSender<Sample>,
}

/// One submit or job not yet done with; counted down on drop.
struct Outstanding(Arc<AtomicUsize>);

impl Outstanding {
    fn take(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Submitted {
    NotAccepted,
    /// 202; where to poll the job (`None`: the answer named none).
    Accepted(Option<Uri>),
}

/// Runs the plan in jobs mode: the mode's name, the submits' tally and
/// the jobs'.
pub async fn run(
    plan: Arc<Plan>,
    jobs: JobsPlan,
    start: Instant,
    live: Arc<Live>,
) -> (String, Tally, JobsTally) {
    let deadline = start + plan.duration;
    let client: Http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(plan.max_outstanding)
        .build_http();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Sample>();
    let collector = tokio::spawn(async move {
        let mut submits = Tally::default();
        let mut jobs = JobsTally::default();
        while let Some(s) = rx.recv().await {
            match s {
                Sample::Submit {
                    latency,
                    status,
                    error_code,
                } => submits.record(latency, status, error_code),
                Sample::SubmitFailed => submits.connection_errors += 1,
                Sample::SubmitUnfinished => submits.unfinished += 1,
                Sample::Dropped => submits.dropped += 1,
                Sample::Job(o) => jobs.record(&o),
            }
        }
        (submits, jobs)
    });
    let ctx = Arc::new(Ctx {
        plan: plan.clone(),
        poll: jobs.poll,
        client,
        start,
        drain_end: deadline + jobs.drain,
        live,
        outstanding: Arc::new(AtomicUsize::new(0)),
        tx,
    });
    let mode = match plan.mode {
        Mode::Open { rate } => {
            open_loop(&ctx, rate, deadline).await;
            format!("jobs, open loop, {rate:.0} submits/s")
        }
        Mode::Closed { connections } => {
            closed_loop(&ctx, connections, deadline).await;
            format!("jobs, closed loop, {connections} connections")
        }
    };
    // The collector ends once every task holding the context has.
    drop(ctx);
    let (submits, jobs) = collector.await.unwrap_or_default();
    (mode, submits, jobs)
}

async fn open_loop(ctx: &Arc<Ctx>, rate: f64, deadline: Instant) {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut n: usize = 0;
    loop {
        let due = ctx.start + interval.mul_f64(n as f64);
        if due >= deadline {
            break;
        }
        if due > Instant::now() {
            tokio::time::sleep_until(due).await;
        }
        n += 1;
        if ctx.outstanding.load(Ordering::Relaxed) >= ctx.plan.max_outstanding {
            let _ = ctx.tx.send(Sample::Dropped);
            continue;
        }
        let guard = Outstanding::take(&ctx.outstanding);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            // Measured from when the submit was due, not sent.
            if let Submitted::Accepted(uri) = submit(&ctx, n, due).await {
                let outcome = follow(&ctx, n, uri, due).await;
                let _ = ctx.tx.send(Sample::Job(outcome));
            }
            drop(guard);
        });
    }
}

async fn closed_loop(ctx: &Arc<Ctx>, connections: usize, deadline: Instant) {
    let counter = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            let ctx = ctx.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    if ctx.outstanding.load(Ordering::Relaxed) >= ctx.plan.max_outstanding {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                    let guard = Outstanding::take(&ctx.outstanding);
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let started = Instant::now();
                    // The next submit goes once this one is answered; its
                    // job is polled beside it.
                    if let Submitted::Accepted(uri) = submit(&ctx, n, started).await {
                        let ctx = ctx.clone();
                        tokio::spawn(async move {
                            let outcome = follow(&ctx, n, uri, started).await;
                            let _ = ctx.tx.send(Sample::Job(outcome));
                            drop(guard);
                        });
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
}

async fn submit(ctx: &Ctx, n: usize, since: Instant) -> Submitted {
    let req = request(&ctx.plan, n);
    let exchange = async {
        let resp = ctx.client.request(req).await.map_err(|_| ())?;
        let status = resp.status().as_u16();
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let body = resp.into_body().collect().await.map_err(|_| ())?;
        Ok::<_, ()>((status, location, body.to_bytes()))
    };
    match tokio::time::timeout_at(ctx.drain_end, exchange).await {
        Err(_) => {
            let _ = ctx.tx.send(Sample::SubmitUnfinished);
            Submitted::NotAccepted
        }
        Ok(Err(())) => {
            ctx.live.finished(false);
            let _ = ctx.tx.send(Sample::SubmitFailed);
            Submitted::NotAccepted
        }
        Ok(Ok((status, location, body))) => {
            let _ = ctx.tx.send(Sample::Submit {
                latency: since.elapsed(),
                status,
                error_code: error_code(status, &body),
            });
            ctx.live.finished((200..300).contains(&status));
            if status == StatusCode::ACCEPTED.as_u16() {
                Submitted::Accepted(job_uri(&ctx.plan.uri, location.as_deref(), &body))
            } else {
                Submitted::NotAccepted
            }
        }
    }
}

/// Polls one job every `--poll-ms` until it is final, it is gone (404),
/// or the drain is over.
async fn follow(ctx: &Ctx, n: usize, uri: Option<Uri>, since: Instant) -> JobOutcome {
    let mut o = JobOutcome {
        last_status: None,
        finished: false,
        lost: false,
        to_result: None,
        server_time: None,
        final_at: None,
        polls: 0,
        poll_errors: 0,
    };
    let Some(uri) = uri else {
        o.lost = true;
        return o;
    };
    loop {
        let next = Instant::now() + ctx.poll;
        if next >= ctx.drain_end {
            return o;
        }
        tokio::time::sleep_until(next).await;
        o.polls += 1;
        let req = poll_request(&ctx.plan, n, &uri);
        let exchange = async {
            let resp = ctx.client.request(req).await.map_err(|_| ())?;
            let status = resp.status();
            let body = resp.into_body().collect().await.map_err(|_| ())?;
            Ok::<_, ()>((status, body.to_bytes()))
        };
        let Ok(answered) = tokio::time::timeout_at(ctx.drain_end, exchange).await else {
            return o;
        };
        match answered {
            Ok((StatusCode::OK, body)) => match parse_view(&body) {
                Some(view) => {
                    o.finished = view.finished;
                    o.last_status = Some(view.status);
                    if view.finished {
                        o.to_result = Some(since.elapsed());
                        o.server_time = view.server_time;
                        o.final_at = Some(ctx.start.elapsed());
                        ctx.live.job_final();
                        return o;
                    }
                }
                None => o.poll_errors += 1,
            },
            Ok((StatusCode::NOT_FOUND, _)) => {
                o.lost = true;
                return o;
            }
            Ok(_) | Err(()) => o.poll_errors += 1,
        }
    }
}

fn poll_request(plan: &Plan, n: usize, uri: &Uri) -> Request<Full<Bytes>> {
    let mut req = Request::get(uri.clone())
        .body(Full::new(Bytes::new()))
        .expect("valid parts");
    let headers = req.headers_mut();
    if let Some(authority) = uri.authority()
        && let Ok(v) = header::HeaderValue::from_str(authority.as_str())
    {
        headers.insert(header::HOST, v);
    }
    // The key that submitted it: a job is its account's only.
    if !plan.keys.is_empty() {
        let key = &plan.keys[n % plan.keys.len()];
        if let Ok(v) = header::HeaderValue::from_str(&format!("Bearer {key}")) {
            headers.insert(header::AUTHORIZATION, v);
        }
    }
    req
}

/// Where a submitted job is polled: its `Location` (a path on the submit
/// URL's host, or a whole http:// URL), else `/tollgate/jobs/<job_id>`.
fn job_uri(submit: &Uri, location: Option<&str>, body: &[u8]) -> Option<Uri> {
    let path = match location {
        Some(l) if l.starts_with("http://") => return l.parse().ok(),
        Some(l) if l.starts_with('/') => l.to_string(),
        _ => {
            let v: Value = serde_json::from_slice(body).ok()?;
            format!("{DEFAULT_PREFIX}/{}", v["job_id"].as_str()?)
        }
    };
    Uri::builder()
        .scheme("http")
        .authority(submit.authority()?.clone())
        .path_and_query(path)
        .build()
        .ok()
}

/// What a poll's answer says.
#[derive(Debug, PartialEq)]
struct View {
    status: String,
    finished: bool,
    /// `finished_at - created_at`, when both are there.
    server_time: Option<Duration>,
}

fn parse_view(body: &[u8]) -> Option<View> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let status = v["status"].as_str()?.to_string();
    let at = |k: &str| v[k].as_str()?.parse::<jiff::Timestamp>().ok();
    let server_time = match (at("created_at"), at("finished_at")) {
        (Some(c), Some(f)) => Duration::try_from(f.duration_since(c)).ok(),
        _ => None,
    };
    Some(View {
        finished: FINAL.contains(&status.as_str()),
        status,
        server_time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_is_polled_at_its_location_else_under_the_default_prefix() {
        let submit: Uri = "http://127.0.0.1:8080/tollgate/jobs/v1/style-transfer"
            .parse()
            .unwrap();
        let body = br#"{"job_id":"job_abc","status":"queued"}"#;
        assert_eq!(
            job_uri(&submit, Some("/jobs/job_1"), body).unwrap(),
            "http://127.0.0.1:8080/jobs/job_1"
        );
        assert_eq!(
            job_uri(&submit, Some("http://other:9/x/job_1"), body).unwrap(),
            "http://other:9/x/job_1"
        );
        assert_eq!(
            job_uri(&submit, None, body).unwrap(),
            "http://127.0.0.1:8080/tollgate/jobs/job_abc"
        );
        assert_eq!(job_uri(&submit, None, b"not json"), None);
    }

    #[test]
    fn a_view_says_whether_the_job_is_final_and_how_long_it_took() {
        let v = parse_view(
            br#"{"job_id":"job_1","status":"succeeded","created_at":"2026-01-01T00:00:00.100Z",
                 "started_at":"2026-01-01T00:00:00.200Z","finished_at":"2026-01-01T00:00:01.350Z"}"#,
        )
        .unwrap();
        assert_eq!(
            v,
            View {
                status: "succeeded".into(),
                finished: true,
                server_time: Some(Duration::from_millis(1250)),
            }
        );
        let v = parse_view(
            br#"{"status":"queued","created_at":"2026-01-01T00:00:00.100Z","finished_at":null}"#,
        )
        .unwrap();
        assert!(!v.finished);
        assert_eq!(v.server_time, None);
        for s in ["failed", "cancelled", "expired"] {
            assert!(
                parse_view(format!(r#"{{"status":"{s}"}}"#).as_bytes())
                    .unwrap()
                    .finished
            );
        }
        assert!(!parse_view(br#"{"status":"running"}"#).unwrap().finished);
        assert_eq!(parse_view(br#"{"no":"status"}"#), None);
    }

    /// A stand-in for the jobs front: a submit is 202 with a `Location`;
    /// a job is `queued` on its first poll, then `succeeded`, but every
    /// fourth job stays `queued` for ever and every tenth submit is 429.
    async fn fake_front() -> std::net::SocketAddr {
        use std::collections::HashMap;
        use std::sync::Mutex;

        use hyper::service::service_fn;
        use hyper_util::rt::TokioIo;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let polls: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let submits = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let polls = polls.clone();
                let submits = submits.clone();
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let polls = polls.clone();
                    let submits = submits.clone();
                    async move {
                        assert_eq!(req.headers()[header::AUTHORIZATION], "Bearer k1");
                        let mut resp = http::Response::new(Full::new(Bytes::new()));
                        if req.method() == http::Method::POST {
                            let n = submits.fetch_add(1, Ordering::Relaxed) + 1;
                            if n.is_multiple_of(10) {
                                *resp.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                                *resp.body_mut() = Full::new(Bytes::from_static(
                                    br#"{"Response":{"Error":{"Code":"RequestLimitExceeded.JobNumExceed"}}}"#,
                                ));
                            } else {
                                *resp.status_mut() = StatusCode::ACCEPTED;
                                resp.headers_mut().insert(
                                    header::LOCATION,
                                    format!("/j/job_{n}").parse().unwrap(),
                                );
                            }
                            return Ok::<_, std::convert::Infallible>(resp);
                        }
                        let id = req.uri().path().trim_start_matches("/j/").to_string();
                        let n: usize = id.trim_start_matches("job_").parse().unwrap();
                        let seen = {
                            let mut p = polls.lock().unwrap();
                            let c = p.entry(id).or_default();
                            *c += 1;
                            *c
                        };
                        let status = if seen == 1 || n.is_multiple_of(4) {
                            "queued"
                        } else {
                            "succeeded"
                        };
                        *resp.body_mut() = Full::new(Bytes::from(format!(
                            r#"{{"status":"{status}","created_at":"2026-01-01T00:00:00.000Z","finished_at":"2026-01-01T00:00:00.042Z"}}"#
                        )));
                        Ok(resp)
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        addr
    }

    fn plan(addr: std::net::SocketAddr, mode: Mode) -> Plan {
        Plan {
            uri: format!("http://{addr}/submit").parse().unwrap(),
            keys: vec!["k1".into()],
            headers: Vec::new(),
            body: Bytes::from_static(b"{}"),
            duration: Duration::from_millis(500),
            mode,
            max_outstanding: 1000,
            jobs: Some(JobsPlan {
                poll: Duration::from_millis(20),
                drain: Duration::from_millis(300),
            }),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_accepted_job_is_followed_and_the_drain_bounds_the_run() {
        let addr = fake_front().await;
        for mode in [Mode::Open { rate: 100.0 }, Mode::Closed { connections: 2 }] {
            let started = std::time::Instant::now();
            let report = super::super::run(plan(addr, mode), false).await;
            let took = started.elapsed();
            // 0.5 s of submits, at most 0.3 s of drain (and a little slack).
            assert!(took < Duration::from_millis(1500), "{mode:?}: {took:?}");
            let jobs = report.jobs.as_ref().expect("a jobs section");
            assert!(report.requests > 10, "{report:?}");
            let accepted = report.statuses[&202];
            assert_eq!(jobs.accepted, accepted, "{report:?}");
            assert_eq!(
                report.error_codes["RequestLimitExceeded.JobNumExceed"],
                report.statuses[&429]
            );
            // The ones that never finish are counted as unfinished, queued.
            assert_eq!(jobs.finished + jobs.unfinished + jobs.lost, accepted);
            assert_eq!(jobs.lost, 0);
            assert_eq!(jobs.by_status.keys().collect::<Vec<_>>(), ["succeeded"]);
            assert!(jobs.unfinished > 0, "{report:?}");
            assert_eq!(jobs.unfinished, jobs.unfinished_by_status["queued"]);
            // Two polls at least (queued, then succeeded), 20 ms apart.
            assert!(jobs.to_result_ms.p50 >= 40.0, "{jobs:?}");
            assert!((jobs.server_ms.p50 - 42.0).abs() < 0.5, "{jobs:?}");
            assert!(jobs.finished_per_s > 0.0);
            assert_eq!(jobs.poll_errors, 0);
        }
    }
}
