//! A task with an idempotency key at the door (SPEC §10.1): a retry of a
//! success gets the stored answer and nothing else; a retry while the
//! first is queued or running, a reused key, or a success whose answer was
//! not kept, are refused; otherwise the task runs once, holding the key's
//! in-progress marker until it ends, and its success stores the answer in
//! the commit of its usage event.

use std::time::Duration;

use http::header::HeaderValue;
use http::{HeaderMap, StatusCode};

use super::Gateway;
use super::error::GatewayError;
use super::proxy::Answer;
use crate::accounts::{AccountStatus, Principal};
use crate::config::Config;
use crate::idempotency::{
    self, Decision, Fingerprint, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, IdempotencyKey,
    IdempotencyRecord, Marker, MarkerTaken, StoredAnswer,
};
use crate::usage::EventIdempotency;

/// How soon a client refused because its key's first request still runs
/// is told to try again.
const IN_PROGRESS_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The key of a task, from the `Idempotency-Key` header or (API 3.0 front)
/// the body's `ClientToken`; the header wins.
pub fn key_of(
    headers: &HeaderMap,
    tc3_body: Option<&[u8]>,
) -> Result<Option<IdempotencyKey>, GatewayError> {
    let bad = |e: idempotency::BadKey| GatewayError::BadRequest(e.to_string());
    if let Some(v) = headers.get(IDEMPOTENCY_KEY) {
        return IdempotencyKey::parse(v.as_bytes(), "Idempotency-Key")
            .map(Some)
            .map_err(bad);
    }
    match tc3_body {
        Some(body) => idempotency::client_token(body).map_err(bad),
        None => Ok(None),
    }
}

/// A keyed task allowed to run: it holds the key's marker until it ends.
pub struct Keyed {
    key: IdempotencyKey,
    fingerprint: Fingerprint,
    _marker: Marker,
}

pub enum Admission {
    Run(Keyed),
    Replay(Answer),
}

/// Decides what a keyed request gets. The store is read before and again
/// after the marker is taken: the first request may have committed and
/// let its marker go in between.
pub async fn admit(
    gw: &Gateway,
    principal: &Principal,
    key: IdempotencyKey,
    method: &http::Method,
    uri: &http::Uri,
    body: &[u8],
) -> Result<Admission, GatewayError> {
    // A deactivated account gets nothing, replays included (SPEC §5).
    if principal.root.status() == AccountStatus::Deactivated {
        return Err(GatewayError::StopUsing);
    }
    let account = &*principal.root.id;
    let fingerprint = Fingerprint::of(
        method.as_str(),
        uri.path(),
        uri.query().unwrap_or_default(),
        body,
    );
    if let Some(done) = lookup(gw, account, &key, &fingerprint).await? {
        return Ok(done);
    }
    let marker = match gw.markers.take(account, &key).await {
        Ok(m) => m,
        Err(MarkerTaken::Held) => {
            return Err(GatewayError::IdempotentRequestInProgress {
                retry_after: IN_PROGRESS_RETRY_AFTER,
            });
        }
        Err(MarkerTaken::Unavailable) => return Err(GatewayError::CoordinationUnavailable),
    };
    if let Some(done) = lookup(gw, account, &key, &fingerprint).await? {
        return Ok(done);
    }
    Ok(Admission::Run(Keyed {
        key,
        fingerprint,
        _marker: marker,
    }))
}

/// `Some` when the store's record decides the request without running it.
async fn lookup(
    gw: &Gateway,
    account: &str,
    key: &IdempotencyKey,
    fingerprint: &Fingerprint,
) -> Result<Option<Admission>, GatewayError> {
    let stored = gw
        .recorder
        .store()
        .idempotency_record(account, key.as_str())
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "idempotency key could not be checked; the task is refused");
            GatewayError::StoreUnavailable
        })?;
    match idempotency::decide(stored.as_ref(), fingerprint, gw.clock.now()) {
        Decision::Run => Ok(None),
        Decision::Replay(answer) => Ok(Some(Admission::Replay(replay(answer)))),
        Decision::NotStored => Err(GatewayError::IdempotentAnswerNotStored),
        Decision::Reused => Err(GatewayError::IdempotencyKeyReused),
    }
}

fn replay(stored: &StoredAnswer) -> Answer {
    let mut headers = stored.header_map();
    headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    Answer {
        status: StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK),
        headers,
        body: bytes::Bytes::from(stored.body.clone()),
    }
}

impl Keyed {
    /// What the usage event says of the key.
    pub fn event_part(&self, answer_stored: bool) -> EventIdempotency {
        EventIdempotency {
            key: self.key.as_str().to_string(),
            answer_stored,
        }
    }

    /// The record committed with the success's event.
    pub fn record(
        &self,
        account: &str,
        answer: &Answer,
        config: &Config,
        gw: &Gateway,
    ) -> Box<IdempotencyRecord> {
        let stored = StoredAnswer::of(
            answer.status,
            &answer.headers,
            &answer.body,
            config.idempotency.max_stored_answer_bytes,
        );
        Box::new(IdempotencyRecord::new(
            account,
            &self.key,
            self.fingerprint,
            stored,
            gw.clock.now(),
            config.idempotency.ttl,
        ))
    }

    /// The commit refused the record: a live one holds the key (this
    /// task's marker lapsed and another run of the key committed first).
    /// Its client gets that run's answer; this run is not charged.
    pub async fn answer_of_the_first(&self, gw: &Gateway, account: &str) -> Option<Answer> {
        match lookup(gw, account, &self.key, &self.fingerprint).await {
            Ok(Some(Admission::Replay(a))) => Some(a),
            _ => None,
        }
    }
}
