//! The usage-event cursor feed: `GET /v1/usage-events?after=&limit=`.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, header};
use serde_json::value::RawValue;

use super::AdminState;

use super::error::{ApiError, page_query};

#[derive(serde::Serialize)]
struct Page<'a> {
    events: Vec<&'a RawValue>,
    /// Pass as `after` to continue; equal to `after` when nothing is new.
    next: String,
}

pub async fn list(
    State(app): State<Arc<AdminState>>,
    Query(q): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let page = page_query(&q)?;
    let limit = page.limit;
    let after: u64 = match page.after {
        None | Some("") => 0,
        Some(c) => c
            .parse()
            .map_err(|_| ApiError::bad_request("after: not a cursor returned by this API"))?,
    };
    let events = app.store.usage_events(after, limit).await?;
    let next = events.last().map_or(after, |e| e.seq).to_string();
    let events = events
        .iter()
        .map(|e| serde_json::from_str::<&RawValue>(&e.event))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::from(crate::store::StoreError::Internal(e.to_string())))?;
    let page = Page { events, next };
    let body = serde_json::to_vec(&page)
        .map_err(|e| ApiError::from(crate::store::StoreError::Internal(e.to_string())))?;
    let mut resp = body.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}
