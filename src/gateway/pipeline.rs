//! The path of one task: authenticate, gate the account, take a slot (or
//! queue for one), forward, classify, record, answer.
//!
//! Once forwarded, a task runs to its end even if the client's connection
//! goes away (see `detach`): the backend is working on it, so its slot stays
//! held until the backend answers and a success is recorded.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tracing::Instrument;

use super::Gateway;
use crate::accounts::Principal;
use crate::auth;
use crate::billing::{Month, Reservation};
use crate::config::Config;
use crate::head_check;
use crate::idempotency::StoredAnswer;
use crate::jobs::JobResult;
use crate::limiter::{LimitError, Permit, SubCap, Ticket};
use crate::metrics::Outcome;
use crate::usage::{UsageData, UsageEvent};

use super::access_log::AccessLine;
use super::account_gate;
use super::budget::Share;
use super::client_gone::ConnWatch;
use super::detach::DetachOnDrop;
use super::error::GatewayError;
use super::keyed::{self, Admission, Keyed};
use super::proxy::{Answer, TaskBody, X_QUEUE_TIMEOUT_MS, X_REQUEST_ID};
use super::tally::Tally;
use super::tc3_front;
use crate::store::StoreError;

const X_QUEUE_WAIT_MS: http::HeaderName = http::HeaderName::from_static("x-queue-wait-ms");
const MAX_REQUEST_ID_LEN: usize = 128;

/// What the forwarded task hands back to the connection that is waiting.
type TaskResult = Result<(Answer, Outcome), GatewayError>;

pub async fn handle(
    gw: Arc<Gateway>,
    conn: Arc<ConnWatch>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let request_id = request_id_of(&req);
    if let Some(refusal) = head_check::refusal_of(&req) {
        // A head refused before hyper read it: nothing else is done, and
        // hyper closes the connection after this answer.
        let mut resp = GatewayError::MalformedHead(refusal)
            .into_response(request_id.to_str().unwrap_or_default());
        let headers = resp.headers_mut();
        headers.insert(X_REQUEST_ID, request_id);
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    if req.uri().path() == "/healthz" && req.method() == http::Method::GET {
        return healthz(&request_id);
    }
    // Errors on the API 3.0 front are answered as the service does.
    let tc3 = tc3_front::is_tc3(req.headers());
    // One config snapshot for the whole request (a reload may swap it).
    let config = gw.config();
    let is_job = if tc3 {
        super::jobs::is_tc3_job(&config, req.headers())
    } else {
        super::jobs::is_jobs_path(&config, req.uri().path())
    };
    if is_job {
        return super::jobs::handle(gw, config, req, request_id, tc3).await;
    }
    // At info level so warnings and errors inside the task carry its id.
    let span = tracing::info_span!("task", request_id = %request_id.to_str().unwrap_or_default());
    let mut queue_wait = Duration::ZERO;
    // Counted once: here, by the forwarded task, or on drop (hang-up).
    let mut tally = Some(Tally::new(
        gw.metrics.clone(),
        AccessLine::new(&req, &request_id),
    ));
    let result = run(
        &gw,
        config,
        &conn,
        req,
        tc3,
        &request_id,
        &mut queue_wait,
        &mut tally,
    )
    .instrument(span.clone())
    .await;
    let mut resp = match result {
        Ok((answer, outcome)) => {
            if let Some(t) = tally.take() {
                t.outcome(outcome, answer.status, answer.body.len());
            }
            answer.into_response()
        }
        Err(err) => {
            if let Some(t) = tally.take() {
                t.error(&err, if tc3 { StatusCode::OK } else { err.status() });
            }
            span.in_scope(|| tracing::debug!(code = err.code(), "task refused or failed"));
            let id = request_id.to_str().unwrap_or_default();
            if tc3 {
                err.into_tc3_response(id)
            } else {
                err.into_response(id)
            }
        }
    };
    let headers = resp.headers_mut();
    headers.insert(X_REQUEST_ID, request_id);
    headers.insert(
        X_QUEUE_WAIT_MS,
        HeaderValue::from(queue_wait.as_millis() as u64),
    );
    resp
}

#[allow(clippy::too_many_arguments)] // the request's own values, each read once in `handle`
async fn run(
    gw: &Arc<Gateway>,
    config: Arc<Config>,
    conn: &ConnWatch,
    req: Request<Incoming>,
    tc3: bool,
    request_id: &HeaderValue,
    queue_wait: &mut Duration,
    tally: &mut Option<Tally>,
) -> TaskResult {
    check_task_shape(&config, &req)?;
    let (principal, revoked, req, action, buffer, key) = if tc3 {
        let v = tc3_front::verify(gw, &config, req).await?;
        let key = match v.request.body() {
            TaskBody::Buffered(body) => keyed::key_of(v.request.headers(), Some(body))?,
            TaskBody::Streaming(_) => None,
        };
        (
            v.principal,
            v.revoked,
            v.request,
            Some(v.action),
            Some(v.share),
            key,
        )
    } else {
        let (principal, revoked) = auth::api_key::authenticate(&gw.registry, req.headers())
            .ok_or(GatewayError::Unauthorized)?;
        check_declared_length(&config, &req)?;
        match keyed::key_of(req.headers(), None)? {
            // The fingerprint covers the body: read before the task queues.
            Some(key) => {
                let (parts, body, share) = tc3_front::read_whole(gw, &config, req).await?;
                let req = Request::from_parts(parts, TaskBody::Buffered(body));
                (principal, revoked, req, None, Some(share), Some(key))
            }
            None => (
                principal,
                revoked,
                req.map(TaskBody::Streaming),
                None,
                None,
                None,
            ),
        }
    };
    if let Some(t) = tally.as_mut() {
        t.line.principal(&principal);
    }
    let keyed = match key {
        None => None,
        Some(key) => {
            let body: &[u8] = match req.body() {
                TaskBody::Buffered(b) => b,
                TaskBody::Streaming(_) => &[],
            };
            match keyed::admit(gw, &principal, key, req.method(), req.uri(), body).await? {
                Admission::Replay(answer) => return Ok((answer, Outcome::Replayed)),
                Admission::Run(k) => Some(k),
            }
        }
    };
    let wait_limit = queue_wait_limit(&config, &req)?;
    let mut reserve = account_gate::check(gw, &principal)?;

    let ticket = Ticket {
        account: principal.root.id.clone(),
        sub_cap: principal.sub.as_ref().and_then(|s| {
            s.max_concurrency.map(|cap| SubCap {
                sub_account: s.id.clone(),
                max_concurrency: cap,
            })
        }),
    };
    // Decided at once (the in-process quota): a refusal never touches the
    // limiter.
    let reserved_now = match reserve.take_ready() {
        Some(Err(r)) => return Err(account_gate::refusal(r)),
        decided => decided,
    };
    let queued_at = tokio::time::Instant::now();
    // A far deadline for a wait too long to add (a huge configured wait).
    let deadline = queued_at
        .checked_add(wait_limit)
        .unwrap_or_else(|| queued_at + Duration::from_secs(86_400 * 365));
    let mut acquire = gw.limiter.acquire(&ticket, deadline);
    // Otherwise the unit and the slot are asked for together: with the
    // shared quota and limiter both scripts leave on one write to Redis
    // (one round trip, not two). A slot that comes before the unit is
    // refused is given back by the drop.
    let mut early_grant = None;
    // Held while the task waits (for the shared quota and slot, or in the
    // queue): bounds waiting tasks across accounts.
    let mut waiting = None;
    let reserved = match reserved_now {
        Some(decided) => decided,
        None => {
            waiting = Some(wait_share(gw, &config)?);
            tokio::select! {
            biased;
            r = &mut reserve => r,
            g = &mut acquire => {
                *queue_wait = queued_at.elapsed();
                // A refusal of the slot answers at once; dropping `reserve`
                // gives back the unit it may hold.
                let g = g.map_err(limit_error)?;
                early_grant = Some(Ok(g));
                tokio::select! {
                    r = &mut reserve => r,
                    () = conn.closed() => return Err(GatewayError::ClientGone),
                }
            }
            () = conn.closed() => return Err(GatewayError::ClientGone),
            }
        }
    };
    // Held until the task ends: dropped (unit given back) on every path but
    // a recorded success.
    let reservation = reserved.map_err(account_gate::refusal)?;
    let granted = match early_grant.or_else(|| acquire.take_ready()) {
        Some(decided) => decided,
        None => {
            if waiting.is_none() {
                waiting = Some(wait_share(gw, &config)?);
            }
            let waited = tokio::select! {
                r = &mut acquire => r,
                // The response will never be read; leaving here drops the
                // acquire, which takes the task out of the queue.
                () = conn.closed() => return Err(GatewayError::ClientGone),
                // The key was revoked while the task waited: it must not run
                // (nor be charged), like a deactivated account's tasks.
                () = revoked.cancelled() => return Err(GatewayError::Unauthorized),
            };
            *queue_wait = queued_at.elapsed();
            waited
        }
    };
    drop(waiting);
    let permit = granted.map_err(limit_error)?;
    if revoked.is_cancelled() {
        // Revoked between the grant and here: the permit and the
        // reservation are dropped, freeing the slot and the unit.
        return Err(GatewayError::Unauthorized);
    }
    gw.metrics.observe_queue_wait(*queue_wait);
    if let Some(t) = tally.as_mut() {
        t.line.queue_wait(*queue_wait);
    }

    let task = Task {
        gw: gw.clone(),
        principal,
        request_id: request_id.clone(),
        queue_wait: *queue_wait,
        tally: tally.take(),
        action,
        keyed,
        job: None,
        _buffer: buffer,
    };
    DetachOnDrop::new(
        gw.tasks.clone(),
        || Err(GatewayError::Internal),
        move |client_gone| task.run(req, permit, reservation, client_gone),
    )
    .await
}

/// A place among the tasks waiting across accounts
/// (`limits.max_queued_tasks`): each holds a connection and its descriptor.
fn wait_share(gw: &Gateway, config: &Config) -> Result<Share, GatewayError> {
    gw.waiting
        .take(1, config.limits.max_queued_tasks)
        .ok_or(GatewayError::GatewayQueueFull)
}

fn limit_error(e: LimitError) -> GatewayError {
    match e {
        LimitError::QueueFull { retry_after } => GatewayError::QueueFull { retry_after },
        LimitError::QueueTimeout { retry_after } => GatewayError::QueueTimeout { retry_after },
        LimitError::Refused => GatewayError::StopUsing,
        LimitError::ShuttingDown => GatewayError::ShuttingDown,
        LimitError::Unavailable => GatewayError::CoordinationUnavailable,
    }
}

pub(super) struct Task {
    pub gw: Arc<Gateway>,
    pub principal: Principal,
    pub request_id: HeaderValue,
    pub queue_wait: Duration,
    /// The task's outcome count, which goes with it if it is detached.
    pub tally: Option<Tally>,
    /// API 3.0: the action, which names the usage event's `api`.
    pub action: Option<String>,
    /// A task with an idempotency key: its marker, held until the task
    /// ends, and what its success stores with the event.
    pub keyed: Option<Keyed>,
    /// A job's run: its id, whose result its success commits with the
    /// event (and which the event names).
    pub job: Option<String>,
    /// API 3.0: the body's share of `limits.max_buffered_bytes`, held until
    /// the task ends.
    pub _buffer: Option<Share>,
}

impl Task {
    async fn run(
        mut self,
        req: Request<TaskBody>,
        permit: Permit,
        reservation: Reservation,
        client_gone: Arc<AtomicBool>,
    ) -> TaskResult {
        let mut tally = self.tally.take();
        let tc3 = self.action.is_some();
        let gone = client_gone.clone();
        let result = self
            .forward(req, permit, reservation, client_gone, tally.as_mut())
            .await;
        if let Some(t) = tally {
            // A detached task's client left: it got nothing, whatever the
            // backend answered (the usage event says `client_gone`).
            let sent = |status| {
                if gone.load(Ordering::Acquire) {
                    super::tally::client_closed()
                } else {
                    status
                }
            };
            match &result {
                Ok((answer, outcome)) => {
                    t.outcome(*outcome, sent(answer.status), answer.body.len());
                }
                Err(e) => t.error(e, sent(if tc3 { StatusCode::OK } else { e.status() })),
            }
        }
        result
    }

    pub(super) async fn forward(
        self,
        req: Request<TaskBody>,
        permit: Permit,
        reservation: Reservation,
        client_gone: Arc<AtomicBool>,
        mut tally: Option<&mut Tally>,
    ) -> TaskResult {
        let gw = &self.gw;
        let backend = gw.backend();
        // The rules the answer is judged by come with the backend: one
        // snapshot for both, whatever a reload does meanwhile.
        let config = backend.config();
        let started = Instant::now();
        let answer = tokio::time::timeout(
            Duration::from_millis(config.backend.timeout_ms),
            backend.forward(req, &self.principal, &self.request_id),
        )
        .await;
        let upstream = started.elapsed();
        if let Some(t) = tally.as_mut() {
            t.line.upstream(upstream);
        }
        // The backend has answered (or failed): the slot is free from here
        // on, before the usage event's fsync.
        permit.record_service_time(upstream);
        drop(permit);
        gw.metrics.observe_upstream(upstream);

        let answer = match answer {
            Ok(result) => result?,
            Err(_elapsed) => return Err(GatewayError::BackendTimeout),
        };
        if !answer.is_success(config.backend.success) {
            return Ok((answer, Outcome::Failure));
        }
        let now = gw.clock.now();
        let month = Month::of(now, &gw.tz).to_string();
        let account = &*self.principal.root.id;
        let record = self
            .keyed
            .as_ref()
            .map(|k| k.record(account, &answer, config, gw));
        let event = UsageEvent::new(
            &config.server.instance,
            now,
            UsageData {
                account: self.principal.root.id.to_string(),
                sub_account: self.principal.sub.as_ref().map(|s| s.id.to_string()),
                api: self
                    .action
                    .clone()
                    .unwrap_or_else(|| config.backend.api_name.clone()),
                units: 1,
                request_id: self.request_id.to_str().unwrap_or_default().to_string(),
                status: answer.status.as_u16(),
                queue_wait_ms: self.queue_wait.as_millis() as u64,
                upstream_ms: upstream.as_millis() as u64,
                charged_to: reservation.source().label(),
                client_gone: client_gone.load(Ordering::Acquire),
                idempotency: self
                    .keyed
                    .as_ref()
                    .zip(record.as_ref())
                    .map(|(k, r)| k.event_part(r.answer.is_some())),
                job_id: self.job.clone(),
            },
        );
        let package = reservation.source().package_id().map(String::from);
        let job = self.job.as_ref().map(|id| {
            Box::new(JobResult {
                id: id.clone(),
                answer: StoredAnswer::of(
                    answer.status,
                    &answer.headers,
                    &answer.body,
                    config.jobs.max_result_bytes,
                ),
                at_ms: now.as_millisecond(),
            })
        });
        match gw.recorder.record(event, package, month, record, job).await {
            Ok(recorded) => {
                let charged = recorded.fell_through.as_ref();
                if let Some(t) = tally {
                    t.line
                        .charged_to(charged.unwrap_or(reservation.source()).label());
                }
                reservation.commit(charged);
                Ok((answer, Outcome::Success))
            }
            Err(StoreError::Conflict(why)) if self.job.is_some() => {
                // Only a second run of one job can meet a finished job: the
                // first is the one charged.
                tracing::warn!(%why, "this job finished already in another run; this run is not charged");
                Err(GatewayError::UsageRecordFailed)
            }
            Err(StoreError::Conflict(why)) if self.keyed.is_some() => {
                let keyed = self.keyed.as_ref().expect("checked");
                match keyed.answer_of_the_first(gw, account).await {
                    Some(first) => {
                        tracing::warn!(%why, "another run of this idempotency key committed first; its answer is returned and this run is not charged");
                        Ok((first, Outcome::Replayed))
                    }
                    None => {
                        tracing::error!(%why, "usage event could not be stored; the task is not charged");
                        Err(GatewayError::UsageRecordFailed)
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "usage event could not be stored; the task is not charged");
                Err(GatewayError::UsageRecordFailed)
            }
        }
    }
}

fn request_id_of(req: &Request<Incoming>) -> HeaderValue {
    req.headers()
        .get(X_REQUEST_ID)
        .filter(|v| {
            let b = v.as_bytes();
            !b.is_empty() && b.len() <= MAX_REQUEST_ID_LEN && b.iter().all(|c| c.is_ascii_graphic())
        })
        .cloned()
        .unwrap_or_else(|| {
            let mut buf = uuid::Uuid::encode_buffer();
            HeaderValue::from_str(uuid::Uuid::now_v7().hyphenated().encode_lower(&mut buf))
                .expect("a UUID is a valid header")
        })
}

/// A task is one request in origin form (`/path?query`, or absolute form
/// naming a path) with one of `backend.methods`. `OPTIONS *`, CONNECT
/// (authority form), TRACE and upgrades are refused before anything is
/// reserved.
fn check_task_shape<B>(config: &Config, req: &Request<B>) -> Result<(), GatewayError> {
    let method = req.method();
    if !config.backend.methods.iter().any(|m| m == method.as_str()) {
        return Err(GatewayError::MethodNotAllowed(method.clone()));
    }
    if !req.uri().path().starts_with('/') {
        return Err(GatewayError::BadRequest(
            "the request target must be a path such as /v1/style-transfer".into(),
        ));
    }
    // Forwarded normalised (proxy.rs); refused here, before any unit is
    // reserved, if it climbs above the root or could be made to.
    super::path::normalize(req.uri().path()).map_err(GatewayError::InvalidPath)?;
    if req.headers().contains_key(header::UPGRADE) {
        return Err(GatewayError::BadRequest(
            "protocol upgrades are not forwarded".into(),
        ));
    }
    Ok(())
}

/// Refuses a body declared too large before the task takes a queue place;
/// an undeclared (chunked) one is cut off while it streams.
fn check_declared_length<B>(config: &Config, req: &Request<B>) -> Result<(), GatewayError> {
    let Some(value) = req.headers().get(header::CONTENT_LENGTH) else {
        return Ok(());
    };
    let len: u64 = value
        .to_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| GatewayError::BadRequest("Content-Length is not a number".into()))?;
    let limit = config.limits.max_body_bytes;
    if len > limit {
        return Err(GatewayError::BodyTooLarge { limit });
    }
    Ok(())
}

/// `limits.max_queue_wait_ms`, lowered by `X-Queue-Timeout-Ms` if sent.
fn queue_wait_limit<B>(config: &Config, req: &Request<B>) -> Result<Duration, GatewayError> {
    let max = config.max_queue_wait();
    let Some(value) = req.headers().get(X_QUEUE_TIMEOUT_MS) else {
        return Ok(max);
    };
    let ms: u64 = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| {
            GatewayError::BadRequest(
                "X-Queue-Timeout-Ms must be a whole number of milliseconds".into(),
            )
        })?;
    Ok(max.min(Duration::from_millis(ms)))
}

fn healthz(request_id: &HeaderValue) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(b"{\"status\":\"ok\"}")));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(X_REQUEST_ID, request_id.clone());
    resp
}
