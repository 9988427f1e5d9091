//! Billing over the admin API: resource packages, the postpaid switch,
//! top-ups, monthly usage and settlement.
//!
//! Each change is decided by the rules in `billing`, stored, and only then
//! applied to memory (see the billing service).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use bytes::Bytes;
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::AdminState;
use crate::billing::{self, Month, MonthReport, PackageKind, ResourcePackage, Standing};
use crate::clock::rfc3339_millis;

use super::error::{ApiError, parse_json};

type Reply = Result<(StatusCode, Json<Value>), ApiError>;

/// 404 for an unknown account (read fresh from a shared store).
async fn ensure_account(app: &AdminState, id: &str) -> Result<(), ApiError> {
    app.accounts.root(id).await?;
    Ok(())
}

pub fn package_view(app: &AdminState, p: &ResourcePackage) -> Value {
    let refundable_until = (p.kind == PackageKind::Prepaid)
        .then(|| {
            billing::prepaid_refund_deadline(p, &app.tz)
                .ok()
                .map(rfc3339_millis)
        })
        .flatten();
    json!({
        "id": p.id,
        "kind": p.kind.as_str(),
        "size": p.size,
        "used": p.used,
        "remaining": if p.refunded_at.is_some() { 0 } else { p.size - p.used.min(p.size) },
        "effective_at": rfc3339_millis(p.effective_at),
        "expires_at": rfc3339_millis(p.expires_at),
        "price_usd": p.price_usd.to_string(),
        "refundable_until": refundable_until,
        "refunded_at": p.refunded_at.map(rfc3339_millis),
    })
}

/// The billing part of `GET /v1/accounts/{id}`.
pub fn account_billing_view(app: &AdminState, id: &str) -> Option<(Standing, Value)> {
    let now = app.clock.now();
    app.billing.with(id, |b| {
        let standing = b.standing(now, app.billing.grace());
        let arrears = match standing {
            Standing::Good => Value::Null,
            Standing::Overdue { suspends_at } => json!({"since": b.arrears_since.map(rfc3339_millis), "suspends_at": rfc3339_millis(suspends_at)}),
            Standing::Suspended { since } => json!({"since": b.arrears_since.map(rfc3339_millis), "suspended_at": rfc3339_millis(since)}),
        };
        let packages: Vec<Value> = b
            .packages
            .iter()
            .filter(|p| p.refunded_at.is_none() && p.expires_at > now)
            .map(|p| package_view(app, p))
            .collect();
        (
            standing,
            json!({
                "postpaid": b.postpaid,
                "balance_usd": b.balance.to_string(),
                "arrears": arrears,
                "remaining_units": b.remaining_units(now),
                "resource_packages": packages,
            }),
        )
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BuyPackage {
    size: Value,
}

pub async fn buy_package(
    State(app): State<Arc<AdminState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Reply {
    ensure_account(&app, &id).await?;
    let req: BuyPackage = parse_json(&body)?;
    let pkg = app
        .billing_service
        .buy_package(&id, req.size.as_u64())
        .await?;
    tracing::info!(account = %id, size = pkg.size, "prepaid package bought");
    Ok((StatusCode::CREATED, Json(package_view(&app, &pkg))))
}

pub async fn refund_package(
    State(app): State<Arc<AdminState>>,
    Path((id, pkg_id)): Path<(String, String)>,
) -> Reply {
    ensure_account(&app, &id).await?;
    let pkg = app.billing_service.refund_package(&id, &pkg_id).await?;
    tracing::info!(account = %id, package = %pkg_id, "prepaid package refunded");
    Ok((StatusCode::OK, Json(package_view(&app, &pkg))))
}

pub async fn list_packages(State(app): State<Arc<AdminState>>, Path(id): Path<String>) -> Reply {
    ensure_account(&app, &id).await?;
    let packages: Vec<Value> = app
        .billing
        .with(&id, |b| {
            b.packages.iter().map(|p| package_view(&app, p)).collect()
        })
        .unwrap_or_default();
    Ok((
        StatusCode::OK,
        Json(json!({"account": id, "packages": packages})),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Postpaid {
    enabled: bool,
}

pub async fn set_postpaid(
    State(app): State<Arc<AdminState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Reply {
    ensure_account(&app, &id).await?;
    let req: Postpaid = parse_json(&body)?;
    app.billing_service.set_postpaid(&id, req.enabled).await?;
    tracing::info!(account = %id, enabled = req.enabled, "postpaid switched");
    Ok((
        StatusCode::OK,
        Json(json!({"account": id, "postpaid": req.enabled})),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopUp {
    amount: Value,
}

pub async fn top_up(
    State(app): State<Arc<AdminState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Reply {
    ensure_account(&app, &id).await?;
    let req: TopUp = parse_json(&body)?;
    let amount = req
        .amount
        .as_str()
        .and_then(billing::parse_amount)
        .ok_or_else(|| ApiError::bad_request("amount: must be a positive USD amount as a string, at most 2 decimals, e.g. \"12.50\""))?;
    let max_balance = app.config().billing.max_balance_usd;
    let (balance, in_arrears) = app.billing_service.top_up(&id, amount, max_balance).await?;
    tracing::info!(account = %id, %amount, "balance topped up");
    Ok((
        StatusCode::OK,
        Json(json!({"account": id, "balance_usd": balance.to_string(), "in_arrears": in_arrears})),
    ))
}

fn parse_month(s: Option<&str>) -> Result<Month, ApiError> {
    s.and_then(Month::parse)
        .ok_or_else(|| ApiError::bad_request("month: must be YYYY-MM"))
}

pub async fn usage(
    State(app): State<Arc<AdminState>>,
    Path(id): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
) -> Reply {
    let [month] = super::error::query_params(&q, ["month"])?;
    ensure_account(&app, &id).await?;
    let month = parse_month(month)?;
    let MonthReport {
        usage,
        bill,
        settled,
    } = app.billing_service.month_report(&id, month).await?;
    Ok((
        StatusCode::OK,
        Json(json!({
            "account": id,
            "month": month.to_string(),
            "calls": usage.calls,
            "by_source": {"free": usage.free, "prepaid": usage.prepaid, "postpaid": usage.postpaid},
            "postpaid_units": usage.postpaid,
            "tier": bill.tier.tier,
            "tier_up_to_calls": bill.tier.up_to,
            "unit_price_usd": bill.tier.unit_price_usd.to_string(),
            "amount_usd": bill.amount_usd.to_string(),
            "settled_usd": settled.map(|d| d.to_string()),
        })),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settle {
    month: String,
}

/// Settles a month for every account (idempotent; see the billing
/// service).
pub async fn settle(State(app): State<Arc<AdminState>>, body: Bytes) -> Reply {
    let req: Settle = parse_json(&body)?;
    let month = parse_month(Some(&req.month))?;
    let lines = app.billing_service.settle(month).await?;
    let grace = app.billing.grace();
    let report: Vec<Value> = lines
        .iter()
        .map(|l| {
            json!({
                "account": l.account,
                "calls": l.bill.calls,
                "postpaid_units": l.bill.postpaid_units,
                "unit_price_usd": l.bill.tier.unit_price_usd.to_string(),
                "amount_usd": l.bill.amount_usd.to_string(),
                "charged_now_usd": l.delta_usd.to_string(),
                "balance_usd": l.balance_after_usd.to_string(),
                "suspends_at": l.arrears_since.and_then(|t| t.checked_add(grace).ok()).map(rfc3339_millis),
            })
        })
        .collect();
    tracing::info!(%month, changed = lines.len(), "month settled");
    Ok((
        StatusCode::OK,
        Json(json!({"month": month.to_string(), "settled": report})),
    ))
}
