//! Accounts, sub-accounts and keys over the admin API: parsing and views;
//! every change is made by the account service (check → commit → apply),
//! so what the data plane sees is always durable.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use bytes::Bytes;
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::AdminState;
use crate::accounts::AccountStatus;
use crate::billing::Standing;
use crate::clock::rfc3339_millis;
use crate::config::StorageKind;

use super::error::{ApiError, page_query, parse_json};

type Reply = Result<(StatusCode, Json<Value>), ApiError>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAccount {
    id: String,
}

pub async fn create_account(State(app): State<Arc<AdminState>>, body: Bytes) -> Reply {
    let req: NewAccount = parse_json(&body)?;
    app.accounts.create_account(&req.id, false).await?;
    tracing::info!(account = %req.id, "account created");
    Ok((StatusCode::CREATED, Json(account_view(&app, &req.id)?)))
}

/// `GET /v1/accounts?limit=&after=`: root accounts in id order, paged.
pub async fn list_accounts(
    State(app): State<Arc<AdminState>>,
    Query(q): Query<Vec<(String, String)>>,
) -> Reply {
    let page = page_query(&q)?;
    let limit = page.limit;
    let after = page.after.filter(|a| !a.is_empty());
    let (page, more) = app.registry.roots_page(after, limit);
    let mut accounts = Vec::with_capacity(page.len());
    for root in &page {
        match account_view(&app, &root.id) {
            Ok(view) => accounts.push(view),
            // Deleted between the page and the view: not listed.
            Err(_) => continue,
        }
    }
    let next_after = if more {
        page.last().map(|r| Value::from(&*r.id))
    } else {
        None
    };
    Ok((
        StatusCode::OK,
        Json(json!({"accounts": accounts, "next_after": next_after})),
    ))
}

/// `GET /v1/accounts/{id}/jobs?status=&after=&limit=`: the account's jobs
/// in submission order, paged (bodies and results left out; a job's own
/// query on the data plane has its result).
pub async fn list_jobs(
    State(app): State<Arc<AdminState>>,
    Path(id): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
) -> Reply {
    let [status, after, limit] = super::error::query_params(&q, ["status", "after", "limit"])?;
    let page_pairs: Vec<(String, String)> = [("after", after), ("limit", limit)]
        .into_iter()
        .filter_map(|(n, v)| v.map(|v| (n.to_string(), v.to_string())))
        .collect();
    let page = page_query(&page_pairs)?;
    let status = match status {
        None | Some("") => None,
        Some(s) => Some(crate::jobs::JobStatus::parse(s).ok_or_else(|| {
            ApiError::bad_request(
                "status: must be queued, running, succeeded, failed, cancelled or expired",
            )
        })?),
    };
    if app.registry.root(&id).is_none() {
        return Err(ApiError::not_found(format!("account {id}")));
    }
    let after = page.after.unwrap_or_default();
    let found = app
        .store
        .jobs_of(&id, status, after, page.limit + 1)
        .await
        .map_err(ApiError::from)?;
    let more = found.len() > page.limit;
    let jobs: Vec<Value> = found
        .iter()
        .take(page.limit)
        .map(|j| {
            json!({
                "job_id": j.id,
                "status": j.status.as_str(),
                "sub_account": j.sub_account,
                "created_at": rfc3339_millis(j.created_at),
                "started_at": j.started_at.map(rfc3339_millis),
                "finished_at": j.finished_at.map(rfc3339_millis),
                "error_code": j.error_code,
                "charged_to": j.charged_to,
            })
        })
        .collect();
    let next_after = if more {
        found
            .get(page.limit - 1)
            .map(|j| Value::from(j.id.as_str()))
    } else {
        None
    };
    Ok((
        StatusCode::OK,
        Json(json!({"jobs": jobs, "next_after": next_after})),
    ))
}

/// `GET /v1/accounts/{id}/keys`: the account's unrevoked keys (its own and
/// its sub-accounts'), never a secret.
pub async fn list_keys(State(app): State<Arc<AdminState>>, Path(id): Path<String>) -> Reply {
    if app.registry.root(&id).is_none() {
        return Err(ApiError::not_found(format!("account {id}")));
    }
    let keys: Vec<Value> = app
        .registry
        .keys_of(&id)
        .iter()
        .map(|k| {
            json!({
                "key_id": k.key_id,
                "type": if k.tc3_secret.is_some() { "tc3" } else { "api_key" },
                "sub_account": k.principal.sub.as_ref().map(|s| &*s.id),
                "created_at": rfc3339_millis(k.created_at),
                "last_used_at": k.last_used.get().map(rfc3339_millis),
            })
        })
        .collect();
    Ok((StatusCode::OK, Json(json!({ "keys": keys }))))
}

pub async fn get_account(State(app): State<Arc<AdminState>>, Path(id): Path<String>) -> Reply {
    if app.config().storage.kind == StorageKind::Postgres {
        // Other replicas charge the account's packages without announcing
        // each success: read the durable counts before showing them. A
        // store outage leaves the last known view.
        if let Err(e) = app.accounts.refresh(&id).await {
            tracing::debug!(error = %e, "account view from memory: the store is unavailable");
        }
    }
    let mut view = account_view(&app, &id)?;
    // In cluster mode every replica shows the cluster's counts now, not
    // what it last saw of the account.
    let stats = app.limiter.fresh_stats(&id).await;
    view["concurrency"]["in_flight"] = json!(stats.in_flight);
    view["concurrency"]["queued"] = json!(stats.queued);
    Ok((StatusCode::OK, Json(view)))
}

fn account_view(app: &AdminState, id: &str) -> Result<Value, ApiError> {
    let root = app
        .registry
        .root(id)
        .ok_or_else(|| ApiError::not_found(format!("account {id}")))?;
    let stats = app.limiter.stats(id);
    let subs: Vec<Value> = app
        .registry
        .subs_of(id)
        .iter()
        .map(|s| json!({"id": &*s.id, "max_concurrency": s.max_concurrency}))
        .collect();
    let (packages, next_change) = {
        let book = app.schedule.book();
        let now = app.clock.now();
        let packages: Vec<Value> = book
            .packages(id)
            .iter()
            .map(|p| super::concurrency::package_view(app, p))
            .collect();
        let next = book
            .next_change_of(id, now)
            .map(|(at, limit)| json!({"at": rfc3339_millis(at), "limit": limit}));
        (packages, next)
    };
    let (standing, billing) =
        super::billing::account_billing_view(app, id).unwrap_or((Standing::Good, Value::Null));
    // Deactivation is the operator's; suspension follows from the balance.
    let status = match (root.status(), standing) {
        (AccountStatus::Active, Standing::Suspended { .. }) => AccountStatus::Suspended,
        (s, _) => s,
    };
    let mut view = json!({
        "id": &*root.id,
        "status": status.as_str(),
        "created_at": rfc3339_millis(root.created_at),
        "concurrency": {
            "limit": stats.limit,
            "in_flight": stats.in_flight,
            "queued": stats.queued,
            "jobs_queued": app.jobs.queued_of(id),
            "next_change": next_change,
        },
        "concurrency_packages": packages,
        "sub_accounts": subs,
    });
    if let (Value::Object(view), Value::Object(billing)) = (&mut view, billing) {
        view.extend(billing);
    }
    Ok(view)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewSubAccount {
    id: String,
    max_concurrency: Option<u32>,
}

pub async fn create_sub_account(
    State(app): State<Arc<AdminState>>,
    Path(root_id): Path<String>,
    body: Bytes,
) -> Reply {
    let req: NewSubAccount = parse_json(&body)?;
    let row = app
        .accounts
        .create_sub_account(&root_id, &req.id, req.max_concurrency)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": row.id, "account": root_id, "max_concurrency": row.max_concurrency})),
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NewKey {
    sub_account: Option<String>,
    #[serde(rename = "type", default)]
    kind: KeyKind,
}

/// `"api_key"` (a Bearer key, the default) or `"tc3"` (an API 3.0 key pair).
#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum KeyKind {
    #[default]
    ApiKey,
    Tc3,
}

pub async fn issue_key(
    State(app): State<Arc<AdminState>>,
    Path(root_id): Path<String>,
    body: Bytes,
) -> Reply {
    // An empty body is fine here: a key for the root account.
    let req: NewKey = if body.is_empty() {
        NewKey::default()
    } else {
        parse_json(&body)?
    };
    if let KeyKind::Tc3 = req.kind {
        let issued = app
            .accounts
            .issue_tc3_key(&root_id, req.sub_account.as_deref())
            .await?;
        tracing::info!(account = %root_id, key_id = %issued.key_id, "TC3 key pair issued");
        return Ok((
            StatusCode::CREATED,
            Json(json!({
                "key_id": issued.key_id,
                "type": "tc3",
                "secret_id": issued.secret_id,
                "secret_key": issued.secret_key,
                "account": root_id,
                "sub_account": req.sub_account,
            })),
        ));
    }
    let issued = app
        .accounts
        .issue_key(&root_id, req.sub_account.as_deref())
        .await?;
    let key_id = issued.key_id;
    let secret = issued.api_key;
    tracing::info!(account = %root_id, %key_id, "API key issued");
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "key_id": key_id,
            "type": "api_key",
            "api_key": secret,
            "account": root_id,
            "sub_account": req.sub_account,
        })),
    ))
}

pub async fn revoke_key(
    State(app): State<Arc<AdminState>>,
    Path(key_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    app.accounts.revoke_key(&key_id).await?;
    tracing::info!(%key_id, "API key revoked");
    Ok(StatusCode::NO_CONTENT)
}

pub async fn deactivate(State(app): State<Arc<AdminState>>, Path(id): Path<String>) -> Reply {
    // Tasks already queued are refused too; running ones finish.
    app.accounts
        .set_status(&id, AccountStatus::Deactivated)
        .await?;
    tracing::info!(account = %id, "account deactivated");
    Ok((StatusCode::OK, Json(account_view(&app, &id)?)))
}

pub async fn activate(State(app): State<Arc<AdminState>>, Path(id): Path<String>) -> Reply {
    app.accounts.set_status(&id, AccountStatus::Active).await?;
    tracing::info!(account = %id, "account activated");
    Ok((StatusCode::OK, Json(account_view(&app, &id)?)))
}
