//! Concurrency packages over the admin API: buy and refund.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use bytes::Bytes;
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::App;
use crate::clock::rfc3339_millis;
use crate::entitlements::{self, ConcurrencyPackage};
use crate::store::{Write, commit};

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

pub fn package_view(app: &App, p: &ConcurrencyPackage) -> Value {
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
    State(app): State<Arc<App>>,
    Path(account): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    app.registry
        .root(&account)
        .ok_or_else(|| ApiError::not_found(format!("account {account}")))?;
    let req: Purchase = parse_json(&body)?;
    let now = app.clock.now();
    let (units, period, start, starts_at, ends_at, price_usd) = entitlements::plan_purchase(
        req.units.as_i64().unwrap_or(0),
        &req.period,
        &req.start,
        now,
        &app.tz,
    )
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let pkg = ConcurrencyPackage {
        id: format!("cp_{}", uuid::Uuid::now_v7().simple()),
        account: account.clone(),
        units,
        period,
        start,
        starts_at,
        ends_at,
        price_usd,
        bought_at: now,
    };
    commit(
        &*app.store,
        Write::CreateConcurrencyPackage(Box::new(pkg.clone())),
    )
    .await?;
    let view = package_view(&app, &pkg);
    app.schedule.add(pkg);
    tracing::info!(%account, units, period = period.as_str(), %start, "concurrency package bought");
    Ok((StatusCode::CREATED, Json(view)))
}

pub async fn refund(
    State(app): State<Arc<App>>,
    Path((account, id)): Path<(String, String)>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    app.registry
        .root(&account)
        .ok_or_else(|| ApiError::not_found(format!("account {account}")))?;
    let pkg = app
        .schedule
        .book()
        .get(&account, &id)
        .cloned()
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "concurrency package {id} of account {account} (unrefunded, not ended)"
            ))
        })?;
    let now = app.clock.now();
    entitlements::check_refund(&pkg, now, &app.tz)
        .map_err(|e| ApiError::conflict("FailedOperation.RefundNotAllowed", e.to_string()))?;
    commit(
        &*app.store,
        Write::RefundConcurrencyPackage {
            id: id.clone(),
            at: now,
        },
    )
    .await?;
    app.schedule.remove(&account, &id);
    tracing::info!(%account, package = %id, "concurrency package refunded");
    let mut view = package_view(&app, &pkg);
    view["refunded_at"] = json!(rfc3339_millis(now));
    Ok((StatusCode::OK, Json(view)))
}
