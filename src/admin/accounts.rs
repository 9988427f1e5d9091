//! Accounts, sub-accounts and keys over the admin API. Each change is
//! committed to the store first and applied to memory after, so what the
//! data plane sees is always durable.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use bytes::Bytes;
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::accounts::{
    AccountStatus, SubAccount, generate_api_key, hash_key, new_key_id, validate_id,
};
use crate::app::App;
use crate::billing::Standing;
use crate::clock::rfc3339_millis;
use crate::store::{KeyRow, SubAccountRow, Write, commit};

use super::error::{ApiError, parse_json};

type Reply = Result<(StatusCode, Json<Value>), ApiError>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAccount {
    id: String,
}

pub async fn create_account(State(app): State<Arc<App>>, body: Bytes) -> Reply {
    let req: NewAccount = parse_json(&body)?;
    validate_id(&req.id).map_err(|r| ApiError::bad_request(format!("id: {r}")))?;
    if app.registry.root(&req.id).is_some() || app.registry.sub(&req.id).is_some() {
        return Err(ApiError::conflict(
            "ResourceInUse",
            format!("account {} already exists", req.id),
        ));
    }
    app.create_account(&req.id, false).await?;
    tracing::info!(account = %req.id, "account created");
    Ok((StatusCode::CREATED, Json(account_view(&app, &req.id)?)))
}

pub async fn get_account(State(app): State<Arc<App>>, Path(id): Path<String>) -> Reply {
    Ok((StatusCode::OK, Json(account_view(&app, &id)?)))
}

fn account_view(app: &App, id: &str) -> Result<Value, ApiError> {
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
    State(app): State<Arc<App>>,
    Path(root_id): Path<String>,
    body: Bytes,
) -> Reply {
    let req: NewSubAccount = parse_json(&body)?;
    app.registry
        .root(&root_id)
        .ok_or_else(|| ApiError::not_found(format!("account {root_id}")))?;
    validate_id(&req.id).map_err(|r| ApiError::bad_request(format!("id: {r}")))?;
    if let Some(cap) = req.max_concurrency {
        let limit = app.limiter.stats(&root_id).limit;
        if cap == 0 || cap > limit {
            return Err(ApiError::bad_request(format!(
                "max_concurrency: must be between 1 and the account's limit ({limit})"
            )));
        }
    }
    if app.registry.sub(&req.id).is_some() || app.registry.root(&req.id).is_some() {
        return Err(ApiError::conflict(
            "ResourceInUse",
            format!("account {} already exists", req.id),
        ));
    }
    let now = app.clock.now();
    commit(
        &*app.store,
        Write::CreateSubAccount(SubAccountRow {
            id: req.id.clone(),
            root: root_id.clone(),
            max_concurrency: req.max_concurrency,
            created_at: now,
        }),
    )
    .await?;
    app.registry.insert_sub(SubAccount {
        id: req.id.as_str().into(),
        root: root_id.as_str().into(),
        max_concurrency: req.max_concurrency,
        created_at: now,
    });
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": req.id, "account": root_id, "max_concurrency": req.max_concurrency})),
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NewKey {
    sub_account: Option<String>,
}

pub async fn issue_key(
    State(app): State<Arc<App>>,
    Path(root_id): Path<String>,
    body: Bytes,
) -> Reply {
    // An empty body is fine here: a key for the root account.
    let req: NewKey = if body.is_empty() {
        NewKey::default()
    } else {
        parse_json(&body)?
    };
    app.registry
        .root(&root_id)
        .ok_or_else(|| ApiError::not_found(format!("account {root_id}")))?;
    if let Some(sub) = &req.sub_account {
        match app.registry.sub(sub) {
            Some(s) if *s.root == *root_id => {}
            _ => {
                return Err(ApiError::not_found(format!(
                    "sub-account {sub} of account {root_id}"
                )));
            }
        }
    }
    let secret = generate_api_key();
    let row = KeyRow {
        key_id: new_key_id(),
        hash: hash_key(&secret),
        root: root_id.clone(),
        sub: req.sub_account.clone(),
        created_at: app.clock.now(),
    };
    commit(&*app.store, Write::CreateKey(row.clone())).await?;
    let key_id = row.key_id.clone();
    app.add_key(row);
    tracing::info!(account = %root_id, %key_id, "API key issued");
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "key_id": key_id,
            "api_key": secret,
            "account": root_id,
            "sub_account": req.sub_account,
        })),
    ))
}

pub async fn revoke_key(
    State(app): State<Arc<App>>,
    Path(key_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if app.registry.key(&key_id).is_none() {
        return Err(ApiError::not_found(format!("key {key_id}")));
    }
    commit(
        &*app.store,
        Write::RevokeKey {
            key_id: key_id.clone(),
            at: app.clock.now(),
        },
    )
    .await?;
    app.registry.revoke_key(&key_id);
    tracing::info!(%key_id, "API key revoked");
    Ok(StatusCode::NO_CONTENT)
}

pub async fn deactivate(State(app): State<Arc<App>>, Path(id): Path<String>) -> Reply {
    set_status(&app, &id, AccountStatus::Deactivated).await?;
    // Tasks already queued are refused too; running ones finish.
    app.limiter.refuse_queued(&id);
    Ok((StatusCode::OK, Json(account_view(&app, &id)?)))
}

pub async fn activate(State(app): State<Arc<App>>, Path(id): Path<String>) -> Reply {
    set_status(&app, &id, AccountStatus::Active).await?;
    Ok((StatusCode::OK, Json(account_view(&app, &id)?)))
}

async fn set_status(app: &App, id: &str, status: AccountStatus) -> Result<(), ApiError> {
    let root = app
        .registry
        .root(id)
        .ok_or_else(|| ApiError::not_found(format!("account {id}")))?;
    commit(
        &*app.store,
        Write::SetAccountStatus {
            id: id.to_string(),
            status,
        },
    )
    .await?;
    root.set_status(status);
    tracing::info!(account = %id, status = status.as_str(), "account status changed");
    Ok(())
}
