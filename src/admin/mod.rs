//! The admin listener: the `/v1/` API (bearer token), `/metrics`,
//! `/healthz` and `/readyz`.

mod accounts;
mod billing;
mod concurrency;
mod error;
mod state;
mod usage;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use http::{HeaderValue, StatusCode, header};
use http_body_util::BodyExt;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::accounts::{bearer_token, secrets_match};
use crate::head_check::{self, HeadCheck};
use crate::listen::Acceptor;
use crate::store::StoreHealth;

pub use error::ApiError;
pub use state::AdminState;

pub fn router(app: Arc<AdminState>) -> Router {
    let v1 = Router::new()
        .route(
            "/accounts",
            post(accounts::create_account).get(accounts::list_accounts),
        )
        .route("/accounts/{id}", get(accounts::get_account))
        .route(
            "/accounts/{id}/sub-accounts",
            post(accounts::create_sub_account),
        )
        .route(
            "/accounts/{id}/keys",
            post(accounts::issue_key).get(accounts::list_keys),
        )
        .route("/accounts/{id}/deactivate", post(accounts::deactivate))
        .route("/accounts/{id}/activate", post(accounts::activate))
        .route(
            "/accounts/{id}/concurrency-packages",
            post(concurrency::buy),
        )
        .route(
            "/accounts/{id}/concurrency-packages/{pkg}",
            delete(concurrency::refund),
        )
        .route(
            "/accounts/{id}/resource-packages",
            post(billing::buy_package).get(billing::list_packages),
        )
        .route(
            "/accounts/{id}/resource-packages/{pkg}/refund",
            post(billing::refund_package),
        )
        .route("/accounts/{id}/postpaid", put(billing::set_postpaid))
        .route("/accounts/{id}/top-up", post(billing::top_up))
        .route("/accounts/{id}/usage", get(billing::usage))
        .route("/accounts/{id}/jobs", get(accounts::list_jobs))
        .route("/billing/settle", post(billing::settle))
        .route("/keys/{key_id}", delete(accounts::revoke_key))
        .route("/usage-events", get(usage::list))
        .fallback(|| async { no_such_endpoint() })
        // Inner first: the token is checked before the body is read. On
        // every `/v1/` request, unknown paths and wrong methods included,
        // so without the token nothing tells which routes exist.
        .layer(middleware::from_fn(strict_body))
        .layer(middleware::from_fn_with_state(app.clone(), require_token));
    Router::new()
        .route("/metrics", get(metrics))
        .route(
            "/healthz",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .nest("/v1", v1)
        .fallback(|| async { no_such_endpoint() })
        // Outermost: whatever axum or hyper-facing layers answer on their
        // own (405, body-limit 413, extractor rejections) leaves in the
        // API's error shape too.
        .layer(middleware::from_fn(json_errors))
        .with_state(app)
}

fn no_such_endpoint() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "UnsupportedOperation",
        "no such admin endpoint",
    )
}

/// Admin bodies are small JSON objects; anything larger is refused before
/// it is buffered.
const MAX_ADMIN_BODY: usize = 64 << 10;

/// Reads the body (at most [`MAX_ADMIN_BODY`]) and requires a non-empty one
/// to be declared `application/json`, so handlers only ever see a bounded
/// JSON candidate.
async fn strict_body(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_ADMIN_BODY as u64) {
        return too_large().into_response();
    }
    let (parts, body) = req.into_parts();
    let bytes = match http_body_util::Limited::new(body, MAX_ADMIN_BODY)
        .collect()
        .await
    {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return too_large().into_response();
        }
        Err(_) => {
            return ApiError::bad_request("the request body could not be read").into_response();
        }
    };
    if !bytes.is_empty() && !is_json(&parts.headers) {
        return ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "InvalidParameter.UnsupportedMediaType",
            "the request body must be sent with Content-Type: application/json",
        )
        .into_response();
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "FailedOperation.RequestEntityTooLarge",
        format!("admin request bodies are at most {MAX_ADMIN_BODY} bytes"),
    )
}

/// `application/json`, in any case, with or without parameters
/// (`; charset=utf-8`).
fn is_json(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

/// Gives every error answer without a JSON body the API's error shape.
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_error = status.is_client_error() || status.is_server_error();
    let already_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !is_error || already_json {
        return resp;
    }
    let (mut parts, _body) = resp.into_parts();
    let reason = status.canonical_reason().unwrap_or("error").to_lowercase();
    let mut fixed = ApiError::new(status, error::code_for_status(status), reason).into_response();
    // Keep what the original said beyond its body (`Allow` on a 405).
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::CONTENT_TYPE);
    for (name, value) in parts.headers.drain().filter_map(|(n, v)| n.map(|n| (n, v))) {
        fixed.headers_mut().entry(name).or_insert(value);
    }
    fixed
}

/// The answer to a head `head_check` refused.
fn refused_head(refusal: Option<head_check::Refusal>) -> Response {
    let refusal = refusal.unwrap_or(head_check::Refusal::Malformed);
    let mut resp =
        ApiError::new(refusal.status(), refusal.code(), refusal.message()).into_response();
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// How long open admin connections may finish their current call once the
/// gateway stops.
const ADMIN_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves the admin API on hyper directly (not `axum::serve`, which has no
/// header-read or idle timeout): every connection is bounded in time by
/// `admin.idle_timeout_ms` and in number by `admin.max_connections`.
pub async fn serve(app: Arc<AdminState>, listener: TcpListener, stop: CancellationToken) {
    let router = router(app.clone());
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        // Also the keep-alive idle timeout: the timer runs whenever the
        // connection waits for a request head.
        .header_read_timeout(Duration::from_millis(app.config().admin.idle_timeout_ms));
    let mut acceptor = Acceptor::new(
        listener,
        "admin",
        app.config().admin.max_connections,
        &app.metrics,
    );
    while let Some((stream, slot)) = acceptor.next(&stop).await {
        let routes = TowerToHyperService::new(router.clone());
        // Heads are checked before hyper reads them, as on the data plane:
        // a malformed one gets the JSON error and the connection closes.
        let service =
            hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let refused = head_check::refusal_of(&req);
                let routed = refused
                    .is_none()
                    .then(|| hyper::service::Service::call(&routes, req));
                async move {
                    match (refused, routed) {
                        (_, Some(routed)) => routed.await,
                        (refusal, None) => Ok(refused_head(refusal)),
                    }
                }
            });
        let io = TokioIo::new(HeadCheck::new(stream));
        let conn = graceful.watch(http.serve_connection(io, service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(acceptor);
    if tokio::time::timeout(ADMIN_SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("admin connections still open at shutdown");
    }
}

async fn require_token(State(app): State<Arc<AdminState>>, req: Request, next: Next) -> Response {
    let config = app.config();
    let expected = &config.admin.token;
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    match presented {
        // An unset token disables the API rather than opening it.
        Some(p) if !expected.is_empty() && secrets_match(p, expected) => next.run(req).await,
        _ => ApiError::unauthorized().into_response(),
    }
}

async fn metrics(State(app): State<Arc<AdminState>>) -> Response {
    app.metrics.spooled_events.set(app.store.spooled() as i64);
    let (queued, running) = app.jobs.counts();
    app.metrics.jobs.set_now(queued, running);
    if let Some(coord) = &app.coordinator {
        app.metrics
            .observe_cluster(coord.leases_lost(), &coord.coordination_errors());
    }
    let text = app.metrics.render(&*app.gates);
    let mut resp = text.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// How long `/readyz` waits for the backend to accept a connection.
const BACKEND_PROBE: std::time::Duration = std::time::Duration::from_millis(500);

/// Tells a load balancer whether this replica can serve tasks now: not
/// while stopping, not while its store can record nothing. A store that
/// spools (PostgreSQL down) still serves tasks: ready, and says so.
async fn readyz(State(app): State<Arc<AdminState>>) -> Response {
    let store = app.store.health();
    let (status, reason) = if app.stopping.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "stopping")
    } else if store == StoreHealth::Unavailable {
        (StatusCode::SERVICE_UNAVAILABLE, "store unavailable")
    } else if app.recorder.failing() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "usage events cannot be recorded",
        )
    } else if let Some(reason) = app.coordination_unready() {
        (StatusCode::SERVICE_UNAVAILABLE, reason)
    } else if !app.backend.load_full().reachable(BACKEND_PROBE).await {
        (StatusCode::SERVICE_UNAVAILABLE, "backend unreachable")
    } else {
        (StatusCode::OK, "ready")
    };
    let store = match store {
        StoreHealth::Ok => json!({"status": "ok"}),
        StoreHealth::Degraded { spooled } => {
            json!({"status": "degraded", "spooled_events": spooled})
        }
        StoreHealth::Unavailable => json!({"status": "unavailable"}),
    };
    let mut body =
        json!({"status": reason, "store": store, "instance": app.config().server.instance});
    if let Some(coord) = &app.coordinator {
        body["cluster"] = json!({
            "coordinated": coord.is_coordinated(),
            "live_replicas": coord.live_replicas(),
            "on_redis_outage": match app.config().cluster.on_redis_outage {
                crate::config::RedisOutagePolicy::Local => "local",
                crate::config::RedisOutagePolicy::Reject => "reject",
            },
        });
    }
    let mut resp = (status, body.to_string()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
