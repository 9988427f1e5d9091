//! The admin listener: the `/v1/` API (bearer token), `/metrics`,
//! `/healthz` and `/readyz`.

mod accounts;
mod billing;
mod concurrency;
mod error;
mod usage;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use http::{HeaderValue, StatusCode, header};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::accounts::{bearer_token, secrets_match};
use crate::app::App;

pub use error::ApiError;

pub fn router(app: Arc<App>) -> Router {
    let v1 = Router::new()
        .route("/accounts", post(accounts::create_account))
        .route("/accounts/{id}", get(accounts::get_account))
        .route(
            "/accounts/{id}/sub-accounts",
            post(accounts::create_sub_account),
        )
        .route("/accounts/{id}/keys", post(accounts::issue_key))
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
        .route("/billing/settle", post(billing::settle))
        .route("/keys/{key_id}", delete(accounts::revoke_key))
        .route("/usage-events", get(usage::list))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_token));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { r#"{"status":"ok"}"# }))
        .route("/readyz", get(readyz))
        .nest("/v1", v1)
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "UnsupportedOperation",
                "no such admin endpoint",
            )
        })
        .with_state(app)
}

pub async fn serve(app: Arc<App>, listener: TcpListener, stop: CancellationToken) {
    let router = router(app);
    if let Err(e) = axum::serve(listener, router)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "admin server failed");
    }
}

async fn require_token(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let expected = &app.config.admin.token;
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

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let text = app.metrics.render(&*app.gates);
    let mut resp = text.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.stopping.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"stopping"}"#).into_response()
    } else {
        r#"{"status":"ready"}"#.into_response()
    }
}
