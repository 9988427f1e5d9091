//! The API 3.0 front of the data plane (SPEC §9): a request signed with
//! TC3-HMAC-SHA256 is checked, its body read whole (the signature covers
//! it) within the per-request and total buffer bounds, and verified before
//! the task is gated or queued; nothing unverified takes a slot or a unit
//! or reaches the backend.

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_LENGTH};
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

use crate::accounts::Principal;
use crate::auth::tc3::{self, Expect, SignedRequest, Tc3Error};
use crate::config::Config;

use super::Gateway;
use super::budget::Share;
use super::error::GatewayError;
use super::proxy::TaskBody;
use super::slow_body::{BodyStalled, BodyTooSlow, IdleTimeout};

/// A request whose signature held.
pub struct Verified {
    pub principal: Principal,
    pub revoked: CancellationToken,
    pub request: Request<TaskBody>,
    /// `X-TC-Action`: the usage event's `api`.
    pub action: String,
    pub share: Share,
}

/// Whether a request is on the API 3.0 front.
pub fn is_tc3(headers: &HeaderMap) -> bool {
    headers
        .get(AUTHORIZATION)
        .is_some_and(|v| tc3::is_tc3(v.as_bytes()))
}

fn tc3_error(e: Tc3Error) -> GatewayError {
    GatewayError::Tc3(e)
}

/// Checks everything about a TC3 request before it may queue.
pub async fn verify(
    gw: &Gateway,
    config: &Config,
    req: Request<Incoming>,
) -> Result<Verified, GatewayError> {
    let actions = &config.backend.actions;
    verify_as(gw, config, req, config.limits.max_body_bytes, &|a| {
        actions.iter().any(|x| x == a)
    })
    .await
}

/// [`verify`] for the actions `allowed` accepts, with bodies up to
/// `max_body` (the job actions: `gateway::jobs`).
pub async fn verify_as(
    gw: &Gateway,
    config: &Config,
    req: Request<Incoming>,
    max_body: u64,
    allowed: &(dyn Fn(&str) -> bool + Sync),
) -> Result<Verified, GatewayError> {
    let headers = req.headers();
    let value = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| tc3_error(Tc3Error::InvalidAuthorization("not text".into())))?;
    let auth = tc3::parse_authorization(value).map_err(tc3_error)?;
    let entry = gw
        .registry
        .tc3_key(&auth.secret_id)
        .ok_or(GatewayError::Tc3(Tc3Error::SecretIdNotFound))?;
    let expect = Expect {
        service: &config.backend.service,
        now_unix_ms: gw.clock.now().as_millisecond(),
        max_skew_ms: config.auth.max_clock_skew_ms,
    };
    tc3::check_context(&auth, headers, &expect).map_err(tc3_error)?;

    let (parts, body, share) = read_whole_within(gw, config, req, max_body).await?;

    let timestamp = parts
        .headers
        .get("x-tc-timestamp")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let signed = SignedRequest {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or_default(),
        headers: &parts.headers,
        body: &body,
        timestamp,
    };
    let secret = entry
        .tc3_secret
        .as_ref()
        .ok_or(GatewayError::Tc3(Tc3Error::SecretIdNotFound))?;
    tc3::verify(&auth, &signed, secret.expose()).map_err(tc3_error)?;
    entry.last_used.mark();

    let backend = &config.backend;
    let action = parts
        .headers
        .get("x-tc-action")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if !allowed(&action) {
        return Err(GatewayError::InvalidAction(action));
    }
    if parts
        .headers
        .get("x-tc-version")
        .is_none_or(|v| v.as_bytes() != backend.api_version.as_bytes())
    {
        return Err(GatewayError::InvalidVersion(backend.api_version.clone()));
    }
    let (principal, revoked) = gw
        .registry
        .watch(entry.hash, entry.principal.clone())
        .ok_or(GatewayError::Tc3(Tc3Error::SecretIdNotFound))?;
    Ok(Verified {
        principal,
        revoked,
        request: Request::from_parts(parts, TaskBody::Buffered(body)),
        action,
        share,
    })
}

/// Reads a task's body whole before it is gated or queued, within
/// `limits.max_body_bytes` and its share of `limits.max_buffered_bytes`
/// (held by the returned [`Share`] until the task ends): API 3.0 bodies
/// (their signature covers them) and bodies of tasks with an idempotency
/// key (their fingerprint covers them).
pub async fn read_whole(
    gw: &Gateway,
    config: &Config,
    req: Request<Incoming>,
) -> Result<(http::request::Parts, Bytes, Share), GatewayError> {
    read_whole_within(gw, config, req, config.limits.max_body_bytes).await
}

/// [`read_whole`] with `max_body` in place of `limits.max_body_bytes`
/// (a job's submit: `jobs.max_body_bytes`).
pub async fn read_whole_within(
    gw: &Gateway,
    config: &Config,
    req: Request<Incoming>,
    max_body: u64,
) -> Result<(http::request::Parts, Bytes, Share), GatewayError> {
    let headers = req.headers();
    let limits = &config.limits;
    let declared: Option<u64> = match headers.get(CONTENT_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| GatewayError::BadRequest("Content-Length is not a number".into()))?,
        ),
    };
    if declared.is_some_and(|n| n > max_body) {
        return Err(GatewayError::BodyTooLarge { limit: max_body });
    }
    // A body of unknown length books the most it may grow to.
    let booked = declared.unwrap_or(max_body);
    let share = gw
        .buffers
        .take(booked, limits.max_buffered_bytes)
        .ok_or(GatewayError::BuffersFull)?;

    let (parts, body) = req.into_parts();
    let idle = std::time::Duration::from_millis(limits.body_idle_timeout_ms);
    let body: Bytes = IdleTimeout::new(Limited::new(body, max_body as usize), idle)
        .with_min_rate(limits.min_body_rate_bytes_per_s)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<BodyStalled>().is_some() {
                GatewayError::BodyTimeout { idle }
            } else if let Some(slow) = e.downcast_ref::<BodyTooSlow>() {
                GatewayError::BodyTooSlow { min_rate: slow.0 }
            } else if e.is::<http_body_util::LengthLimitError>() {
                GatewayError::BodyTooLarge { limit: max_body }
            } else {
                GatewayError::BadRequest("the request body could not be read".into())
            }
        })?
        .to_bytes();

    Ok((parts, body, share))
}
