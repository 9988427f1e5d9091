//! A double of the style-transfer backend, for the demo, the tests and the
//! benches. Never on the gateway's hot path: it runs as its own server.
//!
//! It answers like the service's `ImageToImage` action after a latency drawn
//! from `latency_ms ± latency_jitter_ms`, fails `failure_rate` of requests
//! with a 500, and honours per-request overrides:
//! - `X-Sim-Delay-Ms: N`: answer after N ms;
//! - `X-Sim-Status: N`: answer with status N;
//! - `X-Sim-Error: Code`: answer 200 with a `Response.Error` of that code;
//! - `X-Sim-Echo: 1`: add the request's path and headers to the answer.
//!
//! `GET /_sim/stats` reports, per `X-Tollgate-Account` (and per
//! `sub:<X-Tollgate-Sub-Account>` when that is set), the requests now in
//! progress, the most ever seen at once, the total, and the order in which
//! request ids arrived; `POST /_sim/reset` clears it.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rand::Rng;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::SimulatorConfig;

/// Arrival order is kept for this many recent requests per account.
const ARRIVALS_KEPT: usize = 10_000;

#[derive(Default)]
struct Probe {
    in_flight: u64,
    max_in_flight: u64,
    requests: u64,
    arrivals: VecDeque<String>,
}

pub struct Simulator {
    config: SimulatorConfig,
    // A std mutex: held for a few counter updates, never across an await.
    probes: Mutex<HashMap<String, Probe>>,
}

/// Counts a request in flight until dropped, however the request ends.
struct InFlight<'a> {
    sim: &'a Simulator,
    probe: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.sim.probes().get_mut(&self.probe) {
            p.in_flight -= 1;
        }
    }
}

impl Simulator {
    pub fn new(config: SimulatorConfig) -> Self {
        Self {
            config,
            probes: Mutex::new(HashMap::new()),
        }
    }

    fn probes(&self) -> MutexGuard<'_, HashMap<String, Probe>> {
        self.probes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn enter(&self, probe: &str, request_id: &str) -> InFlight<'_> {
        let mut probes = self.probes();
        let p = probes.entry(probe.to_string()).or_default();
        p.in_flight += 1;
        p.requests += 1;
        p.max_in_flight = p.max_in_flight.max(p.in_flight);
        if p.arrivals.len() == ARRIVALS_KEPT {
            p.arrivals.pop_front();
        }
        p.arrivals.push_back(request_id.to_string());
        InFlight {
            sim: self,
            probe: probe.to_string(),
        }
    }

    fn stats(&self) -> serde_json::Value {
        let probes = self.probes();
        let accounts: serde_json::Map<String, serde_json::Value> = probes
            .iter()
            .map(|(a, p)| {
                (
                    a.clone(),
                    json!({
                        "in_flight": p.in_flight,
                        "max_in_flight": p.max_in_flight,
                        "requests": p.requests,
                        "arrivals": p.arrivals,
                    }),
                )
            })
            .collect();
        json!({ "accounts": accounts })
    }

    fn latency(&self) -> Duration {
        let mean = self.config.latency_ms;
        let jitter = self.config.latency_jitter_ms;
        let ms = if jitter == 0 {
            mean
        } else {
            rand::rng().random_range(mean - jitter..=mean + jitter)
        };
        Duration::from_millis(ms)
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&http::Method::GET, "/_sim/stats") => {
                return json_response(StatusCode::OK, &self.stats());
            }
            (&http::Method::POST, "/_sim/reset") => {
                self.probes().clear();
                return json_response(StatusCode::OK, &json!({"reset": true}));
            }
            _ => {}
        }
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let account = header("x-tollgate-account").unwrap_or_else(|| "-".into());
        let request_id = header("x-request-id").unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let delay = header("x-sim-delay-ms")
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or_else(|| self.latency());
        let status = header("x-sim-status").and_then(|v| v.parse::<u16>().ok());
        let error_code = header("x-sim-error");
        let echo = header("x-sim-echo").is_some().then(|| {
            let headers: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or("<binary>"))))
                .collect();
            json!({"Path": req.uri().to_string(), "Method": req.method().as_str(), "Headers": headers})
        });
        let _in_flight = self.enter(&account, &request_id);
        let _sub_in_flight = header("x-tollgate-sub-account")
            .filter(|s| !s.is_empty())
            .map(|sub| self.enter(&format!("sub:{sub}"), &request_id));
        // Read the whole upload, like the real service.
        if req.into_body().collect().await.is_err() {
            return json_response(StatusCode::BAD_REQUEST, &json!({"error": "body"}));
        }
        tokio::time::sleep(delay).await;
        let failed = status.is_none() && rand::rng().random_bool(self.config.failure_rate);
        let status = status
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(if failed {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::OK
            });
        let result_image;
        let (result, error) = match &error_code {
            Some(code) => (None, Some((code.as_str(), "simulated error"))),
            None if status.is_success() => {
                result_image = format!("https://simulator.invalid/result/{request_id}.jpg");
                (Some(result_image.as_str()), None)
            }
            None => (None, Some(("InternalError", "simulated failure"))),
        };
        let body = Answer {
            response: AnswerBody {
                echo,
                error: error.map(|(code, message)| SimError { code, message }),
                request_id: &request_id,
                result_image: result,
            },
        };
        // Serialized straight from borrowed fields: this runs once per task
        // of every bench that uses the simulator.
        let body = serde_json::to_vec(&body).unwrap_or_default();
        bytes_response(status, body)
    }
}

/// The service's answer: `{"Response": {...}}`, its fields in alphabetical
/// order (as the `json!` map this replaced wrote them).
#[derive(serde::Serialize)]
struct Answer<'a> {
    #[serde(rename = "Response")]
    response: AnswerBody<'a>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct AnswerBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    echo: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<SimError<'a>>,
    request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    result_image: Option<&'a str>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct SimError<'a> {
    code: &'a str,
    message: &'a str,
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    bytes_response(status, body.to_string().into_bytes())
}

fn bytes_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Serves until `stop` is cancelled.
pub async fn serve(sim: Arc<Simulator>, listener: TcpListener, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = stop.cancelled() => return,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let sim = sim.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let sim = sim.clone();
                async move { Ok::<_, Infallible>(sim.handle(req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
