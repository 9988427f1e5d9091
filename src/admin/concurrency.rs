//! Concurrency packages over the admin API: buy and refund.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use bytes::Bytes;
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::AdminState;
use crate::clock::rfc3339_millis;
use crate::entitlements::{self, ConcurrencyPackage};

use super::error::{ApiError, parse_json};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Purchase {
    // Read as any JSON value so that "1.5" or "2" gets the field's own
    // message rather than a parser's.
    units: Value,
    period: String,
    start: String,
}

pub fn package_view(app: &AdminState, p: &ConcurrencyPackage) -> Value {
    let refundable_until = entitlements::refund_deadline(p, &app.tz)
        .map(|z| rfc3339_millis(z.timestamp()))
        .ok();
    json!({
        "id": p.id,
        "account": p.account,
        "units": p.units,
        "period": p.period.as_str(),
        "start": p.start.to_string(),
        "valid_from": rfc3339_millis(p.starts_at),
        "valid_until": rfc3339_millis(p.ends_at),
        "price_usd": p.price_usd.to_string(),
        "refundable_until": refundable_until,
        "bought_at": rfc3339_millis(p.bought_at),
    })
}

pub async fn buy(
    State(app): State<Arc<AdminState>>,
    Path(account): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    app.accounts.root(&account).await?;
    let req: Purchase = parse_json(&body)?;
    let pkg = app
        .billing_service
        .buy_concurrency(
            &account,
            req.units.as_i64().unwrap_or(0),
            &req.period,
            &req.start,
        )
        .await?;
    tracing::info!(%account, units = pkg.units, period = pkg.period.as_str(), start = %pkg.start, "concurrency package bought");
    Ok((StatusCode::CREATED, Json(package_view(&app, &pkg))))
}

pub async fn refund(
    State(app): State<Arc<AdminState>>,
    Path((account, id)): Path<(String, String)>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    app.accounts.root(&account).await?;
    let pkg = app
        .billing_service
        .refund_concurrency(&account, &id)
        .await?;
    tracing::info!(%account, package = %id, "concurrency package refunded");
    let mut view = package_view(&app, &pkg);
    view["refunded_at"] = json!(rfc3339_millis(app.clock.now()));
    Ok((StatusCode::OK, Json(view)))
}
