//! Idempotency keys (SPEC §10.1): a retried task is charged once.
//!
//! Owns what a key is (1–255 printable ASCII, scoped to the root account),
//! the request's fingerprint, the answer stored with the usage event of
//! the first success (the store commits both in one transaction), the
//! decision a retry gets from the stored record, and the in-progress
//! marker ([`InProgress`]) that keeps a second request with the same key
//! from running while the first is queued or running. Pure rules over
//! values and times; the gateway does the I/O.

mod in_progress;
pub mod purge;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use in_progress::{InProgress, LocalMarkers, Marker, MarkerTaken, TakeMarker};

/// The request header that carries the key (on both fronts).
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Set on an answer that is a stored one, not a new task's.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// The API 3.0 front's body field for the key (the service's own).
pub const CLIENT_TOKEN: &str = "ClientToken";
pub const MAX_KEY_LEN: usize = 255;

/// A key as a client sent it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} must be 1 to 255 printable ASCII characters")]
pub struct BadKey(pub &'static str);

impl IdempotencyKey {
    /// `what` names where it came from, for the error.
    pub fn parse(raw: &[u8], what: &'static str) -> Result<Self, BadKey> {
        let ok = !raw.is_empty()
            && raw.len() <= MAX_KEY_LEN
            && raw.iter().all(|b| (0x20..=0x7e).contains(b));
        match std::str::from_utf8(raw) {
            Ok(s) if ok => Ok(Self(s.to_string())),
            _ => Err(BadKey(what)),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A key tollgate holds for itself (a job's claim, `gateway::jobs`):
    /// it starts with a control character no client key may carry, so it
    /// never meets one.
    pub(crate) fn internal(name: &str) -> Self {
        Self(format!("\u{1}{name}"))
    }
}

/// SHA-256 over the method, path, query and the SHA-256 of the body: the
/// same key with another request is a reuse, not a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint(#[serde(with = "hex::serde")] pub [u8; 32]);

impl Fingerprint {
    pub fn of(method: &str, path: &str, query: &str, body: &[u8]) -> Self {
        let mut h = Sha256::new();
        // Lengths first, so no two requests hash the same fields alike.
        for part in [method.as_bytes(), path.as_bytes(), query.as_bytes()] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        h.update(Sha256::digest(body));
        Self(h.finalize().into())
    }
}

/// What a success answered: replayed as it was to every retry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredAnswer {
    pub status: u16,
    /// The answer's `Content-*` headers (its length is the body's).
    pub headers: Vec<(String, String)>,
    #[serde(with = "hex::serde")]
    pub body: Vec<u8>,
}

impl StoredAnswer {
    /// The answer to store, or `None` when its body is over `max_bytes`
    /// (the event and the record then say it was not stored).
    pub fn of(
        status: StatusCode,
        headers: &HeaderMap,
        body: &Bytes,
        max_bytes: u64,
    ) -> Option<Self> {
        if body.len() as u64 > max_bytes {
            return None;
        }
        let headers = headers
            .iter()
            .filter(|(n, _)| {
                n.as_str().starts_with("content-") && *n != http::header::CONTENT_LENGTH
            })
            .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect();
        Some(Self {
            status: status.as_u16(),
            headers,
            body: body.to_vec(),
        })
    }

    /// The stored headers, as they can be sent again.
    pub fn header_map(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (n, v) in &self.headers {
            if let (Ok(n), Ok(v)) = (
                HeaderName::try_from(n.as_str()),
                HeaderValue::try_from(v.as_str()),
            ) {
                map.append(n, v);
            }
        }
        map
    }
}

/// One remembered key: committed with the usage event of its first
/// success.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    pub account: String,
    pub key: String,
    pub fingerprint: Fingerprint,
    /// `None`: the answer was over `idempotency.max_stored_answer_bytes`.
    pub answer: Option<StoredAnswer>,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
}

impl IdempotencyRecord {
    pub fn new(
        account: &str,
        key: &IdempotencyKey,
        fingerprint: Fingerprint,
        answer: Option<StoredAnswer>,
        now: Timestamp,
        ttl: std::time::Duration,
    ) -> Self {
        let created = now.as_millisecond();
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        Self {
            account: account.to_string(),
            key: key.as_str().to_string(),
            fingerprint,
            answer,
            created_at_ms: created,
            expires_at_ms: created.saturating_add(ttl_ms),
        }
    }

    pub fn live_at(&self, now: Timestamp) -> bool {
        now.as_millisecond() < self.expires_at_ms
    }
}

/// What a request with a key gets, given what the store remembers.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision<'a> {
    /// Nothing remembered (or expired): the task runs, once.
    Run,
    /// A retry of a success: its stored answer, nothing else.
    Replay(&'a StoredAnswer),
    /// A retry of a success whose answer was too large to keep.
    NotStored,
    /// The key was used for another request.
    Reused,
}

pub fn decide<'a>(
    stored: Option<&'a IdempotencyRecord>,
    fingerprint: &Fingerprint,
    now: Timestamp,
) -> Decision<'a> {
    match stored {
        Some(r) if r.live_at(now) => {
            if r.fingerprint != *fingerprint {
                Decision::Reused
            } else {
                match &r.answer {
                    Some(a) => Decision::Replay(a),
                    None => Decision::NotStored,
                }
            }
        }
        _ => Decision::Run,
    }
}

/// The `ClientToken` of an API 3.0 body, if it is a JSON object with one.
/// A `ClientToken` that is not a string is a bad key.
pub fn client_token(body: &[u8]) -> Result<Option<IdempotencyKey>, BadKey> {
    if !body
        .windows(CLIENT_TOKEN.len())
        .any(|w| w == CLIENT_TOKEN.as_bytes())
    {
        return Ok(None);
    }
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(body)
    else {
        return Ok(None);
    };
    match map.get(CLIENT_TOKEN) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => {
            IdempotencyKey::parse(s.as_bytes(), CLIENT_TOKEN).map(Some)
        }
        Some(_) => Err(BadKey(CLIENT_TOKEN)),
    }
}

#[cfg(test)]
mod tests;
