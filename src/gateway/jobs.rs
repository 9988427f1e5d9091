//! Jobs on the data plane (SPEC §10.2): `POST <jobs.path_prefix>/<backend
//! path>` submits a task that holds no connection, `GET` and `DELETE
//! <jobs.path_prefix>/<job id>` query and cancel it; and the runner that
//! takes each job through the account's one queue and limit, forwards it,
//! and commits its result with its usage event.
//!
//! A job is stored (committed) before its submit is answered; its body
//! stays in the store until it runs. Each job that waits has one small
//! task here, holding its place in the limiter's FIFO among the account's
//! synchronous tasks, and its claim: an in-progress marker (the lease
//! mechanism of idempotency keys), so in cluster mode exactly one replica
//! runs a job, and a dead replica's jobs are claimed by another once its
//! lease lapses.

use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::Gateway;
use super::access_log::AccessLine;
use super::account_gate;
use super::error::GatewayError;
use super::keyed::{self, Admission};
use super::pipeline::Task;
use super::proxy::{Answer, TaskBody, X_REQUEST_ID};
use super::tc3_front;
use crate::accounts::{AccountStatus, Principal};
use crate::auth;
use crate::config::Config;
use crate::idempotency::{IdempotencyKey, StoredAnswer};
use crate::jobs::{self, Job, JobEnd, JobRequest, JobStatus};
use crate::limiter::{Acquire, LimitError, Permit, SubCap, Ticket};
use crate::metrics::Outcome;
use crate::store::{Committed, StoreError, Write, commit};

/// How soon a job whose account's queue was full tries to enter it again.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(200);
/// How soon a job tries again after the shared limiter was unreachable.
const UNAVAILABLE_PAUSE: Duration = Duration::from_secs(1);

/// Headers of a submit that are not forwarded with its job: the
/// credentials, the submit's own key and framing (the stored body has its
/// own length).
const NOT_KEPT: &[&str] = &[
    "authorization",
    "x-api-key",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "idempotency-key",
    "x-request-id",
    "x-queue-timeout-ms",
];

/// The jobs this replica holds: queued ones in submission order per
/// account (their position), each with the token that cancels its wait.
#[derive(Default)]
pub struct JobBook {
    inner: Mutex<Book>,
}

#[derive(Default)]
struct Book {
    queued: HashMap<Arc<str>, BTreeSet<Arc<str>>>,
    cancels: HashMap<Arc<str>, CancellationToken>,
    running: usize,
}

/// A job held by this replica's book; leaves it on drop, whatever path
/// the run ends on.
struct Held {
    book: Arc<JobBook>,
    account: Arc<str>,
    id: Arc<str>,
    cancel: CancellationToken,
    running: bool,
}

impl JobBook {
    fn hold(self: &Arc<Self>, account: Arc<str>, id: Arc<str>) -> Held {
        let cancel = CancellationToken::new();
        let mut b = self.lock();
        b.queued
            .entry(account.clone())
            .or_default()
            .insert(id.clone());
        b.cancels.insert(id.clone(), cancel.clone());
        Held {
            book: self.clone(),
            account,
            id,
            cancel,
            running: false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A queued job's place among its account's queued jobs (1: next).
    pub fn position(&self, account: &str, id: &str) -> Option<usize> {
        let b = self.lock();
        let ids = b.queued.get(account)?;
        ids.contains(id).then(|| {
            ids.range::<str, _>((Bound::Unbounded, Bound::Excluded(id)))
                .count()
                + 1
        })
    }

    /// This replica's queued jobs of one account.
    pub fn queued_of(&self, account: &str) -> usize {
        self.lock().queued.get(account).map_or(0, BTreeSet::len)
    }

    /// (queued, running) on this replica.
    pub fn counts(&self) -> (usize, usize) {
        let b = self.lock();
        (b.queued.values().map(BTreeSet::len).sum(), b.running)
    }

    /// Stops a cancelled job's wait (its cancel is committed already).
    fn cancel(&self, id: &str) {
        if let Some(t) = self.lock().cancels.get(id) {
            t.cancel();
        }
    }
}

impl Held {
    fn started(&mut self) {
        let mut b = self.book.lock();
        if let Some(ids) = b.queued.get_mut(&self.account) {
            ids.remove(&*self.id);
            if ids.is_empty() {
                b.queued.remove(&self.account);
            }
        }
        b.running += 1;
        self.running = true;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut b = self.book.lock();
        if self.running {
            b.running -= 1;
        } else if let Some(ids) = b.queued.get_mut(&self.account) {
            ids.remove(&*self.id);
            if ids.is_empty() {
                b.queued.remove(&self.account);
            }
        }
        b.cancels.remove(&*self.id);
    }
}

/// Whether `path` is under `jobs.path_prefix`.
pub fn is_jobs_path(config: &Config, path: &str) -> bool {
    let prefix = &config.jobs.path_prefix;
    path.strip_prefix(prefix.as_str())
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Answers one jobs request: under `jobs.path_prefix` on the Bearer front,
/// or a job action on the API 3.0 front (`tc3`: errors as the service
/// gives them, HTTP 200 with `Response.Error`).
pub async fn handle(
    gw: Arc<Gateway>,
    config: Arc<Config>,
    req: Request<Incoming>,
    request_id: HeaderValue,
    tc3: bool,
) -> Response<Full<Bytes>> {
    let mut line = AccessLine::new(&req, &request_id);
    let id = request_id.to_str().unwrap_or_default().to_string();
    let routed = if tc3 {
        route_tc3(&gw, &config, req, &id, &mut line).await
    } else {
        route(&gw, &config, req, &id, &mut line).await
    };
    let (mut resp, code) = match routed {
        Ok(resp) => (resp, None),
        Err(e) => {
            let code = e.code();
            gw.metrics.rejection(code);
            let resp = if tc3 {
                e.into_tc3_response(&id)
            } else {
                e.into_response(&id)
            };
            (resp, Some(code))
        }
    };
    let len = hyper::body::Body::size_hint(resp.body()).exact();
    line.write(resp.status(), code, len);
    resp.headers_mut().insert(X_REQUEST_ID, request_id);
    resp
}

async fn route(
    gw: &Arc<Gateway>,
    config: &Arc<Config>,
    req: Request<Incoming>,
    request_id: &str,
    line: &mut AccessLine,
) -> Result<Response<Full<Bytes>>, GatewayError> {
    let (principal, _revoked) = auth::api_key::authenticate(&gw.registry, req.headers())
        .ok_or(GatewayError::Unauthorized)?;
    line.principal(&principal);
    let rest = req.uri().path()[config.jobs.path_prefix.len()..].to_string();
    let one_segment = rest.len() > 1 && !rest[1..].contains('/');
    let id = rest.trim_start_matches('/');
    match *req.method() {
        Method::GET | Method::DELETE if one_segment && jobs::looks_like_job_id(id) => {
            let job = owned_job(gw, &principal, id).await?;
            if req.method() == Method::GET {
                Ok(json_response(StatusCode::OK, &view(gw, config, &job)))
            } else {
                cancel(gw, config, job).await
            }
        }
        Method::GET | Method::DELETE if one_segment => Err(GatewayError::JobNotFound),
        Method::POST if rest.len() > 1 => {
            submit(gw, config, principal, req, &rest, request_id).await
        }
        Method::POST => Err(GatewayError::BadRequest(format!(
            "submit a job to {}/<backend path>",
            config.jobs.path_prefix
        ))),
        ref m => Err(GatewayError::MethodNotAllowed(m.clone())),
    }
}

/// The caller's job: of its root account, and, for a sub-account's key,
/// its own. Anything else is not found (another account's ids are not
/// told apart from unknown ones).
async fn owned_job(gw: &Gateway, principal: &Principal, id: &str) -> Result<Job, GatewayError> {
    let job = gw
        .recorder
        .store()
        .job(id)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "a job could not be read");
            GatewayError::JobsUnavailable
        })?
        .ok_or(GatewayError::JobNotFound)?;
    let mine = *job.account == *principal.root.id
        && principal
            .sub
            .as_ref()
            .is_none_or(|s| job.sub_account.as_deref() == Some(&*s.id));
    if mine {
        Ok(job)
    } else {
        Err(GatewayError::JobNotFound)
    }
}

fn json_response(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(v.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn rfc3339(t: jiff::Timestamp) -> String {
    t.round(jiff::Unit::Millisecond)
        .unwrap_or(t)
        .strftime("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

/// What a query answers about a job.
pub fn view(gw: &Gateway, config: &Config, job: &Job) -> Value {
    let mut v = json!({
        "job_id": job.id,
        "status": job.status.as_str(),
        "account": job.account,
        "sub_account": job.sub_account,
        "created_at": rfc3339(job.created_at),
        "started_at": job.started_at.map(rfc3339),
        "finished_at": job.finished_at.map(rfc3339),
    });
    match job.status {
        JobStatus::Queued => {
            v["position"] = json!(gw.jobs.position(&job.account, &job.id));
            v["expires_at"] = json!(rfc3339(job.deadline(config.jobs.max_wait)));
        }
        JobStatus::Succeeded => {
            v["charged_to"] = json!(job.charged_to);
            v["result"] = match &job.result {
                Some(a) => result_view(a),
                None => json!({"stored": false}),
            };
        }
        JobStatus::Failed | JobStatus::Expired => v["error"] = json!({"code": job.error_code}),
        JobStatus::Running | JobStatus::Cancelled => {}
    }
    v
}

/// A stored answer as JSON: the body itself when it is JSON, else base64.
fn result_view(a: &StoredAnswer) -> Value {
    let content_type = a
        .headers
        .iter()
        .find(|(n, _)| n == "content-type")
        .map(|(_, v)| v.clone());
    let mut v = json!({"stored": true, "status": a.status, "content_type": content_type});
    match serde_json::from_slice::<Value>(&a.body) {
        Ok(body) => v["body"] = body,
        Err(_) => {
            use base64::Engine;
            v["body_base64"] = json!(base64::engine::general_purpose::STANDARD.encode(&a.body));
        }
    }
    v
}

async fn cancel(
    gw: &Gateway,
    config: &Config,
    job: Job,
) -> Result<Response<Full<Bytes>>, GatewayError> {
    let job = cancelled(gw, job).await?;
    Ok(json_response(StatusCode::OK, &view(gw, config, &job)))
}

/// Cancels a queued job; returns it as it is now.
async fn cancelled(gw: &Gateway, job: Job) -> Result<Job, GatewayError> {
    if !job.status.cancellable() {
        return Err(GatewayError::JobNotCancellable(job.status.as_str()));
    }
    let write = Write::EndJob {
        id: job.id.clone(),
        end: JobEnd {
            status: JobStatus::Cancelled,
            error_code: None,
        },
        from: &[JobStatus::Queued],
        at: gw.clock.now(),
    };
    match commit(&**gw.recorder.store(), write).await {
        Ok(_) => {}
        // It started (or ended) between the read and the write.
        Err(StoreError::NotFound(_)) => {
            let now = owned_status(gw, &job.id).await;
            return Err(GatewayError::JobNotCancellable(now.as_str()));
        }
        Err(e) => {
            tracing::warn!(error = %e, "a job could not be cancelled");
            return Err(GatewayError::JobsUnavailable);
        }
    }
    gw.jobs.cancel(&job.id);
    gw.metrics
        .jobs
        .ended
        .with_label_values(&["cancelled"])
        .inc();
    Ok(gw
        .recorder
        .store()
        .job(&job.id)
        .await
        .ok()
        .flatten()
        .unwrap_or(job))
}

async fn owned_status(gw: &Gateway, id: &str) -> JobStatus {
    match gw.recorder.store().job(id).await {
        Ok(Some(j)) => j.status,
        _ => JobStatus::Running,
    }
}

async fn submit(
    gw: &Arc<Gateway>,
    config: &Arc<Config>,
    principal: Principal,
    req: Request<Incoming>,
    backend_path: &str,
    request_id: &str,
) -> Result<Response<Full<Bytes>>, GatewayError> {
    if principal.root.status() == AccountStatus::Deactivated {
        return Err(GatewayError::StopUsing);
    }
    let key = keyed::key_of(req.headers(), None)?;
    let (parts, body, _share) =
        tc3_front::read_whole_within(gw, config, req, config.jobs.max_body_bytes).await?;
    let submitted = Submitted {
        principal,
        parts,
        body,
        backend_path: backend_path.to_string(),
        action: None,
        key,
    };
    let location = |job: &Job| format!("{}/{}", config.jobs.path_prefix, job.id);
    let answer_of = |job: &Job| {
        let body = json!({"job_id": job.id, "status": "queued", "request_id": request_id});
        let mut a = json_answer(StatusCode::ACCEPTED, &body);
        if let Ok(v) = HeaderValue::from_str(&location(job)) {
            a.headers.insert(header::LOCATION, v);
        }
        a
    };
    Ok(submit_job(gw, config, submitted, &answer_of)
        .await?
        .into_response())
}

/// A submit on either front, authenticated and read.
struct Submitted {
    principal: Principal,
    parts: http::request::Parts,
    body: Bytes,
    /// What the job forwards to (the path the synchronous call would have).
    backend_path: String,
    /// API 3.0: the action the job runs (`X` of `SubmitXJob`).
    action: Option<String>,
    key: Option<IdempotencyKey>,
}

/// An answer of a JSON body (an idempotency key stores it like any).
fn json_answer(status: StatusCode, v: &Value) -> Answer {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Answer {
        status,
        headers,
        body: Bytes::from(v.to_string()),
    }
}

/// Stores a job and starts it; `answer_of` is the front's answer to its
/// submit (what a retry with the same idempotency key gets again).
async fn submit_job(
    gw: &Arc<Gateway>,
    config: &Arc<Config>,
    s: Submitted,
    answer_of: &(dyn Fn(&Job) -> Answer + Sync),
) -> Result<Answer, GatewayError> {
    if !config.backend.methods.iter().any(|m| m == "POST") {
        return Err(GatewayError::MethodNotAllowed(Method::POST));
    }
    super::path::normalize(&s.backend_path).map_err(GatewayError::InvalidPath)?;
    let principal = &s.principal;
    let keyed = match s.key {
        None => None,
        Some(key) => {
            match keyed::admit(gw, principal, key, &s.parts.method, &s.parts.uri, &s.body).await? {
                Admission::Replay(answer) => return Ok(answer),
                Admission::Run(k) => Some(k),
            }
        }
    };
    // The billing gate at submit (the same codes as a task's): a unit is
    // reserved and given back; the job reserves its own when it runs.
    let reservation = account_gate::check(gw, principal)?
        .await
        .map_err(account_gate::refusal)?;
    drop(reservation);

    let path_and_query = match s.parts.uri.query() {
        Some(q) => format!("{}?{q}", s.backend_path),
        None => s.backend_path.clone(),
    };
    let mut headers: Vec<(String, String)> = s
        .parts
        .headers
        .iter()
        .filter(|(n, _)| !NOT_KEPT.contains(&n.as_str()))
        .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    if let Some(action) = &s.action {
        // The backend runs the synchronous action.
        for (n, v) in headers.iter_mut() {
            if n == "x-tc-action" {
                *v = action.clone();
            }
        }
    }
    let job = Job {
        id: jobs::new_job_id(),
        account: principal.root.id.to_string(),
        sub_account: principal.sub.as_ref().map(|s| s.id.to_string()),
        api: s
            .action
            .clone()
            .unwrap_or_else(|| config.backend.api_name.clone()),
        action: s.action.clone(),
        status: JobStatus::Queued,
        created_at: gw.clock.now(),
        started_at: None,
        finished_at: None,
        request: JobRequest {
            method: "POST".into(),
            path_and_query,
            headers,
        },
        result: None,
        error_code: None,
        charged_to: None,
    };
    let answer = answer_of(&job);
    let record = keyed
        .as_ref()
        .map(|k| k.record(&job.account, &answer, config, gw));
    let write = Write::SubmitJob {
        job: Box::new(job.clone()),
        body: s.body.to_vec(),
        max_pending: config.jobs.max_pending_per_account,
        idempotency: record,
    };
    match commit(&**gw.recorder.store(), write).await {
        Ok(Committed::JobsFull) => {
            return Err(GatewayError::TooManyJobs(
                config.jobs.max_pending_per_account,
            ));
        }
        Ok(_) => {}
        Err(StoreError::Conflict(why)) if keyed.is_some() => {
            let k = keyed.as_ref().expect("checked");
            return match k.answer_of_the_first(gw, &job.account).await {
                Some(first) => Ok(first),
                None => {
                    tracing::warn!(%why, "a job could not be stored");
                    Err(GatewayError::JobsUnavailable)
                }
            };
        }
        Err(e) => {
            tracing::warn!(error = %e, "a job could not be stored");
            return Err(GatewayError::JobsUnavailable);
        }
    }
    drop(keyed);
    tracing::debug!(job = %job.id, "job submitted");
    start(gw, job).await;
    Ok(answer)
}

/// What an API 3.0 job action asks.
enum Tc3Op {
    Submit(String),
    Query,
    Cancel,
}

/// `Submit<A>Job`, `Query<A>Job`, `Cancel<A>Job` for an action `A` of
/// `backend.actions`.
fn tc3_op(config: &Config, name: &str) -> Option<Tc3Op> {
    let inner = name.strip_suffix("Job")?;
    let (op, action): (fn(String) -> Tc3Op, &str) = if let Some(a) = inner.strip_prefix("Submit") {
        (Tc3Op::Submit, a)
    } else if let Some(a) = inner.strip_prefix("Query") {
        (|_| Tc3Op::Query, a)
    } else if let Some(a) = inner.strip_prefix("Cancel") {
        (|_| Tc3Op::Cancel, a)
    } else {
        return None;
    };
    config
        .backend
        .actions
        .iter()
        .any(|a| a == action)
        .then(|| op(action.to_string()))
}

/// Whether an API 3.0 request names a job action (`X-TC-Action`).
pub fn is_tc3_job(config: &Config, headers: &http::HeaderMap) -> bool {
    headers
        .get("x-tc-action")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| tc3_op(config, a).is_some())
}

async fn route_tc3(
    gw: &Arc<Gateway>,
    config: &Arc<Config>,
    req: Request<Incoming>,
    request_id: &str,
    line: &mut AccessLine,
) -> Result<Response<Full<Bytes>>, GatewayError> {
    let name = req
        .headers()
        .get("x-tc-action")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let op = tc3_op(config, &name).ok_or_else(|| GatewayError::InvalidAction(name.clone()))?;
    let max_body = match op {
        Tc3Op::Submit(_) => config.jobs.max_body_bytes,
        Tc3Op::Query | Tc3Op::Cancel => config.limits.max_body_bytes,
    };
    let v = tc3_front::verify_as(gw, config, req, max_body, &|a| a == name).await?;
    line.principal(&v.principal);
    let (parts, body) = v.request.into_parts();
    let TaskBody::Buffered(body) = body else {
        return Err(GatewayError::Internal);
    };
    let tc3_ok = |response: Value| {
        let mut response = response;
        response["RequestId"] = json!(request_id);
        json_response(StatusCode::OK, &json!({ "Response": response }))
    };
    match op {
        Tc3Op::Submit(action) => {
            if v.principal.root.status() == AccountStatus::Deactivated {
                return Err(GatewayError::StopUsing);
            }
            let key = keyed::key_of(&parts.headers, Some(&body))?;
            let backend_path = parts.uri.path().to_string();
            let submitted = Submitted {
                principal: v.principal,
                parts,
                body,
                backend_path,
                action: Some(action),
                key,
            };
            let answer_of = |job: &Job| {
                json_answer(
                    StatusCode::OK,
                    &json!({"Response": {"JobId": job.id, "RequestId": request_id}}),
                )
            };
            Ok(submit_job(gw, config, submitted, &answer_of)
                .await?
                .into_response())
        }
        Tc3Op::Query | Tc3Op::Cancel => {
            let job_id = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|b| b["JobId"].as_str().map(str::to_string))
                .ok_or_else(|| GatewayError::BadRequest("JobId: a job id is required".into()))?;
            if !jobs::looks_like_job_id(&job_id) {
                return Err(GatewayError::JobNotFound);
            }
            let job = owned_job(gw, &v.principal, &job_id).await?;
            let job = match op {
                Tc3Op::Cancel => cancelled(gw, job).await?,
                _ => job,
            };
            Ok(tc3_ok(tc3_view(gw, config, &job)))
        }
    }
}

/// A job as the API 3.0 front shows it (the service's field names).
fn tc3_view(gw: &Gateway, config: &Config, job: &Job) -> Value {
    let v = view(gw, config, job);
    let mut out = json!({
        "JobId": v["job_id"],
        "Status": v["status"],
        "CreatedAt": v["created_at"],
        "StartedAt": v["started_at"],
        "FinishedAt": v["finished_at"],
        "Position": v.get("position").cloned().unwrap_or(Value::Null),
        "ErrorCode": v["error"]["code"],
        "Result": Value::Null,
    });
    if let Some(result) = job.result.as_ref() {
        // The action's own answer: its `Response` object, as the
        // synchronous call would have given it.
        if let Ok(body) = serde_json::from_slice::<Value>(&result.body) {
            out["Result"] = body.get("Response").cloned().unwrap_or(body);
        }
    }
    out
}

/// The claim a replica holds on a job while it waits or runs here.
fn claim_key(id: &str) -> IdempotencyKey {
    IdempotencyKey::internal(&format!("job:{id}"))
}

/// Runs a stored, unfinished job on this replica (if no other holds it).
/// Returns once the job holds its claim and its place in the account's
/// queue (so a submit answered after this keeps its FIFO order with the
/// tasks that arrive after it); the run goes on in its own task.
pub async fn start(gw: &Arc<Gateway>, job: Job) {
    let died = job.status == JobStatus::Running;
    let job = JobRef {
        id: Arc::from(job.id),
        account: Arc::from(job.account),
        sub_account: job.sub_account,
        created_at: job.created_at,
    };
    if let Some(ready) = claim(gw, job, died).await {
        tokio::spawn(run(gw.clone(), ready));
    }
}

/// What a job keeps in memory until it runs: its request (headers, path,
/// body) stays in the store and is read when its slot comes.
struct JobRef {
    id: Arc<str>,
    account: Arc<str>,
    sub_account: Option<String>,
    created_at: jiff::Timestamp,
}

/// A job claimed by this replica, in the account's queue (its id and
/// account are the book's, in `held`).
struct Claimed {
    created_at: jiff::Timestamp,
    _claim: crate::idempotency::Marker,
    held: Held,
    principal: Principal,
    ticket: Ticket,
    acquire: Acquire,
}

/// `died`: the job's run died with its replica before it ended.
async fn claim(gw: &Arc<Gateway>, job: JobRef, died: bool) -> Option<Claimed> {
    // Held by another run (here or on another replica), or the shared
    // markers cannot be reached: that run, or a later pass, has it.
    let claim = gw
        .markers
        .take(&job.account, &claim_key(&job.id))
        .await
        .ok()?;
    let held = gw.jobs.hold(job.account.clone(), job.id.clone());
    if died {
        // Its run died with its replica before it ended: back to queued.
        end(gw, &job.id, JobStatus::Queued, None, RUNNING).await;
    }
    let Some(root) = gw.registry.root(&job.account) else {
        end(
            gw,
            &job.id,
            JobStatus::Failed,
            Some("ResourceNotFound.Account"),
            UNFINISHED,
        )
        .await;
        return None;
    };
    let sub = job.sub_account.as_deref().and_then(|s| gw.registry.sub(s));
    let principal = Principal { root, sub };
    let ticket = Ticket {
        account: job.account,
        sub_cap: principal.sub.as_ref().and_then(|s| {
            s.max_concurrency.map(|cap| SubCap {
                sub_account: s.id.clone(),
                max_concurrency: cap,
            })
        }),
    };
    let left = jobs::wait_left(job.created_at, gw.config().jobs.max_wait, gw.clock.now());
    if left.is_zero() {
        // It waited its whole `jobs.max_wait` (through a restart, say).
        end(
            gw,
            &job.id,
            JobStatus::Expired,
            Some("FailedOperation.JobExpired"),
            QUEUED,
        )
        .await;
        return None;
    }
    let deadline = tokio::time::Instant::now() + left;
    // A job whose run died goes back to the head of its account's queue.
    let acquire = if died {
        gw.limiter.acquire_first(&ticket, deadline)
    } else {
        gw.limiter.acquire(&ticket, deadline)
    };
    Some(Claimed {
        created_at: job.created_at,
        _claim: claim,
        held,
        principal,
        ticket,
        acquire,
    })
}

/// In cluster mode, how often unfinished jobs are read again even when no
/// replica was seen to leave (a claim that lapsed otherwise: Redis lost
/// it, say).
const RESCAN_EVERY: Duration = Duration::from_secs(30);

/// How a replica notices that another left (cluster mode): the number of
/// live replicas, checked every lease.
pub struct Rescan {
    pub every: Duration,
    pub live_replicas: Box<dyn Fn() -> u32 + Send + Sync>,
}

/// Takes every unfinished job no replica holds: at start, and in cluster
/// mode again whenever the number of live replicas drops (a dead
/// replica's jobs, once its claims lapse with its lease) and every
/// [`RESCAN_EVERY`]. Jobs this replica holds are skipped without asking
/// Redis.
pub async fn resume(gw: Arc<Gateway>, rescan: Option<Rescan>, stop: CancellationToken) {
    let mut live = rescan.as_ref().map_or(0, |r| (r.live_replicas)());
    let mut last = tokio::time::Instant::now();
    loop {
        match gw.recorder.store().unfinished_jobs().await {
            Ok(found) => {
                for job in found {
                    if gw.jobs.lock().cancels.contains_key(job.id.as_str()) {
                        continue;
                    }
                    start(&gw, job).await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "unfinished jobs could not be read; the next pass retries")
            }
        }
        last = last.max(tokio::time::Instant::now());
        let Some(r) = &rescan else { return };
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(r.every) => {}
            }
            let now_live = (r.live_replicas)();
            let left = now_live < live;
            live = now_live;
            if left {
                // The claims of the one that left lapse with its lease:
                // one more lease and they are free.
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(r.every) => {}
                }
                break;
            }
            if last.elapsed() >= RESCAN_EVERY {
                break;
            }
        }
        last = tokio::time::Instant::now();
    }
}

async fn end(
    gw: &Gateway,
    id: &str,
    status: JobStatus,
    code: Option<&str>,
    from: &'static [JobStatus],
) {
    let write = Write::EndJob {
        id: id.to_string(),
        end: JobEnd {
            status,
            error_code: code.map(str::to_string),
        },
        from,
        at: gw.clock.now(),
    };
    match commit(&**gw.recorder.store(), write).await {
        Ok(_) => {
            if status.is_final() {
                gw.metrics
                    .jobs
                    .ended
                    .with_label_values(&[status.as_str()])
                    .inc();
            }
        }
        Err(StoreError::NotFound(_)) => {}
        Err(e) => {
            tracing::warn!(job = %id, error = %e, "a job's end could not be stored; it runs again after a restart")
        }
    }
}

const UNFINISHED: &[JobStatus] = &[JobStatus::Queued, JobStatus::Running];
const QUEUED: &[JobStatus] = &[JobStatus::Queued];
const RUNNING: &[JobStatus] = &[JobStatus::Running];

// The async fn clippy asks for would store `claimed` twice (see below).
#[allow(clippy::manual_async_fn)]
fn run(gw: Arc<Gateway>, mut claimed: Claimed) -> impl Future<Output = ()> + Send {
    // An async block, not an async fn: `claimed` is stored once (an async
    // fn keeps its argument and what it is moved or destructured into,
    // rust-lang/rust#62958), and what is not needed while queued is boxed.
    async move {
        loop {
            let Some(permit) = wait_for_slot(
                &gw,
                &claimed.held.id,
                claimed.created_at,
                &claimed.ticket,
                claimed.acquire,
                &claimed.held.cancel,
            )
            .await
            else {
                return;
            };
            // Boxed: the run's own state (the forward's futures, a few KiB)
            // is allocated once the job has its slot, not by every queued job.
            let granted = run_granted(
                gw.clone(),
                claimed.created_at,
                claimed.held,
                claimed.principal,
                permit,
            );
            let Some(again) = Box::pin(granted).await else {
                return;
            };
            // Its start could not be stored: its claim goes back too, and
            // after a pause it waits again (at the head: it had waited its
            // turn).
            drop(claimed._claim);
            match Box::pin(wait_again(&gw, again)).await {
                Some(c) => claimed = c,
                None => return,
            }
        }
    }
}

async fn wait_again(gw: &Arc<Gateway>, again: JobRef) -> Option<Claimed> {
    tokio::time::sleep(UNAVAILABLE_PAUSE).await;
    claim(gw, again, true).await
}

/// The rest of a job's run, from its slot on.
/// `Some(job)`: its start could not be stored; it is to wait again.
async fn run_granted(
    gw: Arc<Gateway>,
    created_at: jiff::Timestamp,
    mut held: Held,
    principal: Principal,
    permit: Permit,
) -> Option<JobRef> {
    let id = held.id.clone();
    let waited = Duration::try_from(gw.clock.now().duration_since(created_at)).unwrap_or_default();
    // A unit only once the job has its slot: a job that waits for hours
    // does not hold one.
    let reservation = match account_gate::check(&gw, &principal) {
        Ok(reserve) => reserve.await.map_err(account_gate::refusal),
        Err(e) => Err(e),
    };
    let reservation = match reservation {
        Ok(r) => r,
        Err(e) => {
            end(&gw, &id, JobStatus::Failed, Some(e.code()), QUEUED).await;
            return None;
        }
    };
    let started = Write::StartJob {
        id: id.to_string(),
        at: gw.clock.now(),
    };
    match commit(&**gw.recorder.store(), started).await {
        Ok(_) => {}
        // Cancelled meanwhile: the permit and the unit are dropped.
        Err(StoreError::NotFound(_)) => return None,
        Err(e) => {
            tracing::warn!(job = %id, error = %e, "a job could not be started; it waits again");
            let again = JobRef {
                id,
                account: held.account.clone(),
                sub_account: principal.sub.as_ref().map(|s| s.id.to_string()),
                created_at,
            };
            // Its slot and unit go back (dropped here) before it waits.
            drop((permit, reservation, held));
            return Some(again);
        }
    }
    held.started();
    gw.metrics.jobs.wait.observe(waited.as_secs_f64());
    // Read now, not kept while it waited.
    let job = match gw.recorder.store().job_to_run(&id).await {
        Ok(Some(job)) => Some(job),
        other => {
            tracing::warn!(job = %id, "a job's request could not be read: {:?}", other.err());
            None
        }
    };
    let Some(job) = job else {
        end(&gw, &id, JobStatus::Failed, Some("InternalError"), RUNNING).await;
        return None;
    };
    let Some(req) = request_of(&job.request, job.body) else {
        end(
            &gw,
            &id,
            JobStatus::Failed,
            Some("InvalidParameter.InvalidPath"),
            RUNNING,
        )
        .await;
        return None;
    };
    // Shutdown waits for a job at the backend, as for any forwarded task.
    let _tracked = gw.tasks.token();
    let task = Task {
        gw: gw.clone(),
        principal,
        request_id: HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("job")),
        queue_wait: waited,
        tally: None,
        action: job.action,
        keyed: None,
        job: Some(id.to_string()),
        _buffer: None,
    };
    let result = task
        .forward(
            req,
            permit,
            reservation,
            Arc::new(AtomicBool::new(false)),
            None,
        )
        .await;
    match result {
        Ok((_, Outcome::Success)) => {
            gw.metrics
                .jobs
                .ended
                .with_label_values(&["succeeded"])
                .inc();
        }
        Ok((answer, _)) => {
            let code = backend_code(&answer);
            end(&gw, &id, JobStatus::Failed, Some(&code), RUNNING).await;
        }
        Err(e) => end(&gw, &id, JobStatus::Failed, Some(e.code()), RUNNING).await,
    }
    None
}

/// Waits for the job's slot in the account's FIFO, until the job's
/// `jobs.max_wait` is over (then it ends `expired`) or it is cancelled.
/// `None`: the job does not run now (ended, cancelled, or shutting down:
/// it stays queued for the next start).
async fn wait_for_slot(
    gw: &Gateway,
    id: &str,
    created_at: jiff::Timestamp,
    ticket: &Ticket,
    mut acquire: Acquire,
    cancel: &CancellationToken,
) -> Option<Permit> {
    loop {
        let pause = tokio::select! {
            () = cancel.cancelled() => return None,
            r = &mut acquire => match r {
                Ok(permit) => return Some(permit),
                // The queue holds this many already: the job keeps its
                // place in the store and tries again shortly.
                Err(LimitError::QueueFull { .. }) => QUEUE_FULL_PAUSE,
                Err(LimitError::Unavailable) => UNAVAILABLE_PAUSE,
                Err(LimitError::QueueTimeout { .. }) => Duration::ZERO,
                Err(LimitError::ShuttingDown) => return None,
                Err(LimitError::Refused) => {
                    Box::pin(end(gw, id, JobStatus::Failed, Some("ResourceUnavailable.StopUsing"), QUEUED)).await;
                    return None;
                }
            },
        };
        // The rare paths are boxed: every queued job's future is as large
        // as its largest state, and the wait above is the common one.
        let pause = Box::pin(tokio::time::sleep(pause));
        tokio::select! {
            () = cancel.cancelled() => return None,
            () = pause => {}
        }
        let left = jobs::wait_left(created_at, gw.config().jobs.max_wait, gw.clock.now());
        if left.is_zero() {
            Box::pin(end(
                gw,
                id,
                JobStatus::Expired,
                Some("FailedOperation.JobExpired"),
                QUEUED,
            ))
            .await;
            return None;
        }
        acquire = gw
            .limiter
            .acquire(ticket, tokio::time::Instant::now() + left);
    }
}

/// The stored request, ready to forward.
fn request_of(r: &JobRequest, body: Vec<u8>) -> Option<Request<TaskBody>> {
    let mut req = Request::new(TaskBody::Buffered(Bytes::from(body)));
    *req.method_mut() = Method::from_bytes(r.method.as_bytes()).ok()?;
    *req.uri_mut() = r.path_and_query.parse().ok()?;
    for (n, v) in &r.headers {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::try_from(n.as_str()),
            HeaderValue::try_from(v.as_str()),
        ) {
            req.headers_mut().append(n, v);
        }
    }
    Some(req)
}

/// A backend failure's code: the service's own (`Response.Error.Code`)
/// when its answer carries one, else one naming the status.
fn backend_code(answer: &Answer) -> String {
    serde_json::from_slice::<Value>(&answer.body)
        .ok()
        .and_then(|v| v["Response"]["Error"]["Code"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("FailedOperation.BackendStatus{}", answer.status.as_u16()))
}

/// Forgets finished jobs past `jobs.result_ttl`, in bounded passes.
pub async fn purge(gw: Arc<Gateway>, stop: CancellationToken) {
    crate::idempotency::purge::run_with(
        gw.recorder.store().clone(),
        gw.clock.clone(),
        stop,
        "finished jobs",
        move |now, limit| Write::PurgeJobs {
            before_ms: jobs::purge_before(now, gw.config().jobs.result_ttl).as_millisecond(),
            limit,
        },
    )
    .await;
}
