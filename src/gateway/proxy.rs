//! Forwarding one admitted task to the backend and reading its answer.
//!
//! The request body streams through (bounded by `limits.max_body_bytes`);
//! the answer is read whole (bounded by `backend.max_response_bytes`)
//! because it must be classified, and a success recorded, before the client
//! sees any of it.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};

use super::budget::Budget;
use super::slow_body::{BodyStalled, BodyTooSlow, IdleTimeout};
use hyper::body::Incoming;

use super::backend_pool::{Pool, SendError};

use crate::accounts::Principal;
use crate::config::{BackendUrl, Config, SuccessMode};

use super::error::GatewayError;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_TOLLGATE_ACCOUNT: HeaderName = HeaderName::from_static("x-tollgate-account");
pub const X_TOLLGATE_SUB_ACCOUNT: HeaderName = HeaderName::from_static("x-tollgate-sub-account");
pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
pub const X_QUEUE_TIMEOUT_MS: HeaderName = HeaderName::from_static("x-queue-timeout-ms");

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("proxy-connection"),
];

/// A task's request body: streamed through as it arrives (Bearer), or
/// already read whole and verified (API 3.0, whose signature covers it).
pub enum TaskBody {
    Streaming(Incoming),
    Buffered(Bytes),
}

pub type UpstreamBody = Either<IdleTimeout<Limited<Incoming>>, Full<Bytes>>;

/// The backend's complete answer.
pub struct Answer {
    pub status: http::StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn is_success(&self, mode: SuccessMode) -> bool {
        if !self.status.is_success() {
            return false;
        }
        match mode {
            SuccessMode::Status => true,
            SuccessMode::TencentJson => {
                // A 2xx without a readable `Response` is not a confirmed
                // success, and an unconfirmed one is never charged.
                match serde_json::from_slice::<serde_json::Value>(&self.body) {
                    Ok(v) => v
                        .get("Response")
                        .is_some_and(|r| r.is_object() && r.get("Error").is_none()),
                    Err(_) => false,
                }
            }
        }
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        let mut resp = Response::new(Full::new(self.body));
        *resp.status_mut() = self.status;
        *resp.headers_mut() = self.headers;
        resp
    }
}

pub struct Backend {
    pool: Pool,
    base: BackendUrl,
    /// Bytes of answers being read now, against
    /// `backend.max_buffered_response_bytes`.
    answers: Budget,
    /// The config this backend was built from: its limits (`backend.*`,
    /// the body rules of `limits.*`), and the rules a task that forwards
    /// through it judges the answer by (`success`, `timeout_ms`,
    /// `api_name`), one snapshot for both even while a reload swaps them.
    config: Arc<Config>,
}

impl Backend {
    /// The backend as `config` describes it, at `url` (the configured one,
    /// or the embedded simulator's).
    pub fn new(config: &Arc<Config>, url: &str) -> Result<Self, String> {
        let base = BackendUrl::parse(url)?;
        let pool = Pool::new(
            &base.authority,
            config.backend.pool_max_idle,
            config.server.worker_count(),
        )
        .map_err(|e| format!("`{url}`: {e}"))?;
        Ok(Self {
            pool,
            base,
            answers: Budget::default(),
            config: config.clone(),
        })
    }

    /// The config snapshot this backend was built from.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// After a config reload: the same answers budget goes on (answers in
    /// flight on this backend still count against the new one's limit).
    /// With `keep_pool`, the next one also takes over this one's idle
    /// connections (same URL and pool settings).
    pub fn succeeded_by(&self, mut next: Self, keep_pool: bool) -> Self {
        next.answers = self.answers.clone();
        if keep_pool {
            next.pool = self.pool.share();
        }
        next
    }

    /// The URL this backend forwards to.
    pub fn authority(&self) -> &str {
        &self.base.authority
    }

    /// Whether the backend accepts a TCP connection now (for `/readyz`):
    /// a gateway whose backend refuses every connection cannot serve.
    pub async fn reachable(&self, within: Duration) -> bool {
        matches!(
            tokio::time::timeout(
                within,
                tokio::net::TcpStream::connect(self.pool.connect_to())
            )
            .await,
            Ok(Ok(_))
        )
    }

    /// Sends the task and reads the whole answer. The caller bounds the time.
    pub async fn forward(
        &self,
        req: Request<TaskBody>,
        principal: &Principal,
        request_id: &HeaderValue,
    ) -> Result<Answer, GatewayError> {
        let (parts, body) = req.into_parts();
        // The path normalised (no dot segment, no `//`: it cannot leave
        // the prefix), the query as sent.
        let path = super::path::normalize(parts.uri.path()).map_err(GatewayError::InvalidPath)?;
        // Origin form: the connection is the backend's already.
        let prefix = &self.base.path_prefix;
        let uri: http::Uri = match parts.uri.query() {
            Some(query) => format!("{prefix}{path}?{query}"),
            None => format!("{prefix}{path}"),
        }
        .parse()
        .map_err(|_| GatewayError::BadRequest("the request path is not valid".into()))?;
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        for name in [
            header::AUTHORIZATION,
            X_API_KEY,
            header::HOST,
            X_QUEUE_TIMEOUT_MS,
        ] {
            headers.remove(name);
        }
        // Every X-Tollgate-* header is the gateway's to set: a client's own
        // (`X-Tollgate-Charged-To: free`, say) must never reach the backend.
        let forged: Vec<HeaderName> = headers
            .keys()
            .filter(|n| n.as_str().starts_with("x-tollgate-"))
            .cloned()
            .collect();
        for name in forged {
            headers.remove(name);
        }
        headers.insert(header::HOST, self.pool.host().clone());
        headers.insert(X_REQUEST_ID, request_id.clone());
        headers.insert(X_TOLLGATE_ACCOUNT, header_value(&principal.root.id));
        headers.insert(
            X_TOLLGATE_SUB_ACCOUNT,
            principal
                .sub
                .as_ref()
                .map_or(HeaderValue::from_static(""), |s| header_value(&s.id)),
        );
        let body = match body {
            TaskBody::Streaming(body) => Either::Left(
                IdleTimeout::new(
                    Limited::new(body, self.config.limits.max_body_bytes as usize),
                    Duration::from_millis(self.config.limits.body_idle_timeout_ms),
                )
                .with_min_rate(self.config.limits.min_body_rate_bytes_per_s),
            ),
            TaskBody::Buffered(bytes) => Either::Right(Full::new(bytes)),
        };
        let mut upstream = Request::new(body);
        *upstream.method_mut() = parts.method;
        *upstream.uri_mut() = uri;
        *upstream.version_mut() = Version::HTTP_11;
        *upstream.headers_mut() = headers;

        let (resp, conn) = self
            .pool
            .send(upstream)
            .await
            .map_err(|e| self.map_send_error(&e))?;
        if resp.status().is_informational() {
            // A 101 would hand the client's connection to the backend (an
            // upgrade): a task is one request and one answer, never a tunnel.
            tracing::warn!(status = %resp.status(), "the backend answered with a protocol switch; refused");
            return Err(GatewayError::BackendUnavailable);
        }
        let (parts, body) = resp.into_parts();
        let body = self.read_answer(&parts.headers, body).await?;
        // Read whole: the connection can take the next request.
        self.pool.give_back(conn);
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        // The length is set again from the buffered body.
        headers.remove(header::CONTENT_LENGTH);
        Ok(Answer {
            status: parts.status,
            headers,
            body,
        })
    }

    /// Reads a whole answer within `backend.max_response_bytes`, and all
    /// answers being read at once within `backend.max_buffered_response_bytes`
    /// (a declared length is booked up front, an undeclared one as it
    /// arrives); past either, the task fails uncharged.
    async fn read_answer(
        &self,
        headers: &HeaderMap,
        mut body: Incoming,
    ) -> Result<Bytes, GatewayError> {
        let max = self.config.backend.max_response_bytes as u64;
        let declared: u64 = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let too_large = || {
            tracing::warn!(
                limit = max,
                "the backend's answer is larger than backend.max_response_bytes"
            );
            GatewayError::BackendUnavailable
        };
        if declared > max {
            return Err(too_large());
        }
        let mut booked = self
            .answers
            .take(declared, self.config.backend.max_buffered_response_bytes)
            .ok_or(GatewayError::AnswersFull)?;
        // An answer that comes in one frame (most: hyper reads a small body
        // with its head) is kept as that frame, not copied; more frames are
        // gathered in one buffer.
        let mut first: Option<Bytes> = None;
        let mut buf = BytesMut::new();
        let mut total = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                tracing::warn!(error = %e, "reading the backend's answer failed");
                GatewayError::BackendUnavailable
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let len = total + data.len() as u64;
            if len > max {
                return Err(too_large());
            }
            let short = len.saturating_sub(booked.amount());
            if short > 0
                && !self.answers.grow(
                    &mut booked,
                    short,
                    self.config.backend.max_buffered_response_bytes,
                )
            {
                return Err(GatewayError::AnswersFull);
            }
            total = len;
            match first.take() {
                None if buf.is_empty() => first = Some(data),
                None => buf.extend_from_slice(&data),
                Some(one) => {
                    buf.reserve((declared.max(len)) as usize);
                    buf.extend_from_slice(&one);
                    buf.extend_from_slice(&data);
                }
            }
        }
        Ok(match first {
            Some(one) => one,
            None => buf.freeze(),
        })
    }

    fn map_send_error(&self, e: &SendError) -> GatewayError {
        let mut chain: Vec<&(dyn std::error::Error + 'static)> = Vec::new();
        let mut next: Option<&(dyn std::error::Error + 'static)> = match e {
            SendError::Connect(e) => Some(e),
            SendError::Http(e) => Some(e),
        };
        while let Some(s) = next {
            chain.push(s);
            next = s.source();
        }
        if let Some(stalled) = chain.iter().find_map(|s| s.downcast_ref::<BodyStalled>()) {
            return GatewayError::BodyTimeout { idle: stalled.0 };
        }
        if let Some(slow) = chain.iter().find_map(|s| s.downcast_ref::<BodyTooSlow>()) {
            return GatewayError::BodyTooSlow { min_rate: slow.0 };
        }
        if chain.iter().any(|s| s.is::<LengthLimitError>()) {
            return GatewayError::BodyTooLarge {
                limit: self.config.limits.max_body_bytes,
            };
        }
        if chain.iter().any(|s| {
            s.downcast_ref::<hyper::Error>()
                .is_some_and(|h| h.is_user())
        }) {
            // Reading the client's body failed: the client went away or sent
            // a broken body. The backend did not get a whole task.
            return GatewayError::BadRequest("the request body could not be read".into());
        }
        let connect = matches!(e, SendError::Connect(_));
        tracing::warn!(error = %e, connect, "forwarding to the backend failed");
        GatewayError::BackendUnavailable
    }
}

fn header_value(s: &str) -> HeaderValue {
    // Account ids are validated to header-safe characters.
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one look at each of their few names costs
    // less than a removal (a name hashed and probed) per hop-by-hop name,
    // twice a task (about 2,800 instructions).
    if !headers.keys().any(|n| HOP_BY_HOP.contains(n)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status: http::StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn classification() {
        let ok = r#"{"Response":{"ResultImage":"x","RequestId":"r"}}"#;
        let err = r#"{"Response":{"Error":{"Code":"X","Message":"m"},"RequestId":"r"}}"#;
        assert!(answer(200, ok).is_success(SuccessMode::Status));
        assert!(answer(200, ok).is_success(SuccessMode::TencentJson));
        assert!(answer(200, err).is_success(SuccessMode::Status));
        assert!(!answer(200, err).is_success(SuccessMode::TencentJson));
        assert!(!answer(200, "not json").is_success(SuccessMode::TencentJson));
        assert!(!answer(500, ok).is_success(SuccessMode::Status));
        assert!(!answer(302, ok).is_success(SuccessMode::Status));
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn a_lone_hop_by_hop_header_goes_and_a_message_without_any_is_untouched() {
        let mut h = HeaderMap::new();
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }
}
