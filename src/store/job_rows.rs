//! A job's stored columns, the same in both stores: what a row is made of
//! and how one is read back into a [`Job`].

use jiff::Timestamp;

use super::{JobToRun, StoreError};
use crate::idempotency::StoredAnswer;
use crate::jobs::{Job, JobRequest, JobStatus};

/// The columns every job read selects, in this order (see [`JobCols`]).
pub(crate) const JOB_COLUMNS: &str = "id, account, sub_account, api, action, status, \
     created_at_ms, started_at_ms, finished_at_ms, request, result_status, result_headers, \
     result_body, error_code, charged_to";

/// One job row as read, column by column.
pub(crate) struct JobCols {
    pub id: String,
    pub account: String,
    pub sub_account: Option<String>,
    pub api: String,
    pub action: Option<String>,
    pub status: String,
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub request: String,
    pub result_status: Option<i64>,
    pub result_headers: Option<String>,
    pub result_body: Option<Vec<u8>>,
    pub error_code: Option<String>,
    pub charged_to: Option<String>,
}

fn at(ms: i64, what: &str, id: &str) -> Result<Timestamp, StoreError> {
    Timestamp::from_millisecond(ms)
        .map_err(|_| StoreError::Internal(format!("job {id}: bad {what}")))
}

impl JobCols {
    pub fn into_job(self) -> Result<Job, StoreError> {
        let bad = |what: &str| StoreError::Internal(format!("job {}: bad {what}", self.id));
        let status = JobStatus::parse(&self.status).ok_or_else(|| bad("status"))?;
        let request: JobRequest =
            serde_json::from_str(&self.request).map_err(|_| bad("request"))?;
        let result = match self.result_status {
            None => None,
            Some(status) => Some(StoredAnswer {
                status: u16::try_from(status).map_err(|_| bad("result status"))?,
                headers: serde_json::from_str(self.result_headers.as_deref().unwrap_or("[]"))
                    .map_err(|_| bad("result headers"))?,
                body: self.result_body.clone().unwrap_or_default(),
            }),
        };
        let opt_at = |ms: Option<i64>, what: &str| ms.map(|ms| at(ms, what, &self.id)).transpose();
        Ok(Job {
            created_at: at(self.created_at_ms, "created_at", &self.id)?,
            started_at: opt_at(self.started_at_ms, "started_at")?,
            finished_at: opt_at(self.finished_at_ms, "finished_at")?,
            status,
            request,
            result,
            id: self.id,
            account: self.account,
            sub_account: self.sub_account,
            api: self.api,
            action: self.action,
            error_code: self.error_code,
            charged_to: self.charged_to,
        })
    }
}

/// The columns [`JobToRun`] is read from, in this order.
pub(crate) const TO_RUN_COLUMNS: &str = "request, action, body";

/// A [`JobToRun`] from its columns; `None` without a body (it has run).
pub(crate) fn job_to_run(
    id: &str,
    request: String,
    action: Option<String>,
    body: Option<Vec<u8>>,
) -> Result<Option<JobToRun>, StoreError> {
    let Some(body) = body else { return Ok(None) };
    let request = serde_json::from_str(&request)
        .map_err(|_| StoreError::Internal(format!("job {id}: bad request")))?;
    Ok(Some(JobToRun {
        request,
        action,
        body,
    }))
}

/// A job's request as its column holds it.
pub(crate) fn request_column(job: &Job) -> String {
    serde_json::to_string(&job.request).unwrap_or_else(|_| "{}".into())
}

/// A result's status, headers (JSON) and body columns, all `None` when
/// the answer was not kept.
pub(crate) fn result_columns(
    answer: Option<&StoredAnswer>,
) -> (Option<i64>, Option<String>, Option<&[u8]>) {
    match answer {
        None => (None, None, None),
        Some(a) => (
            Some(i64::from(a.status)),
            Some(serde_json::to_string(&a.headers).unwrap_or_else(|_| "[]".into())),
            Some(&a.body),
        ),
    }
}

/// The statuses a write may move a job from, as SQL text for an `IN (…)`
/// list (the values are fixed names, never input).
pub(crate) fn status_list(from: &[JobStatus]) -> String {
    from.iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}
