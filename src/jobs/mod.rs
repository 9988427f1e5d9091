//! Jobs (SPEC §10.2): a task that does not hold the client's connection.
//! The client submits it, gets a job id at once, and asks for the result
//! later.
//!
//! Owns what a job is (its states and the moves between them), the stored
//! request it runs from, the result or error it ends with, and the rules
//! over times: when a queued job has waited too long, when a finished
//! job's result is purged. Pure code over values and times; the gateway
//! runs jobs (`gateway::jobs`) and the store keeps them.

use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::idempotency::StoredAnswer;

/// Where a job is in its life. `Queued` and `Running` are unfinished; the
/// rest are final and never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Expired,
}

impl JobStatus {
    pub const ALL: [JobStatus; 6] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
        JobStatus::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        !matches!(self, JobStatus::Queued | JobStatus::Running)
    }

    /// Only a job still waiting may be cancelled: a running one is at the
    /// backend already (its work will be done and charged), a finished one
    /// is history.
    pub fn cancellable(self) -> bool {
        self == JobStatus::Queued
    }
}

/// A job id as clients see it: `job_` and a UUIDv7 (time-ordered, so ids
/// sort in submission order).
pub fn new_job_id() -> String {
    format!("job_{}", uuid::Uuid::now_v7().simple())
}

/// Whether `s` could be a job id (checked before any lookup, so a
/// malformed id is a plain not-found without touching the store).
pub fn looks_like_job_id(s: &str) -> bool {
    s.len() == 36 && s.starts_with("job_") && s[4..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// The request a job runs: what the synchronous call would have
/// forwarded. The body stays in the store until the job runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRequest {
    pub method: String,
    /// The backend path and query, without `jobs.path_prefix`.
    pub path_and_query: String,
    /// The headers forwarded with it (hop-by-hop and the credentials
    /// left out), in order.
    pub headers: Vec<(String, String)>,
}

/// A job as the store keeps it (without its request body).
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: String,
    pub account: String,
    pub sub_account: Option<String>,
    /// The usage event's `api` when it succeeds.
    pub api: String,
    /// The API 3.0 action it was submitted as (`SubmitXJob` runs `X`), or
    /// `None` on the Bearer front.
    pub action: Option<String>,
    pub status: JobStatus,
    pub created_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub request: JobRequest,
    /// A success's answer (absent when over `jobs.max_result_bytes`).
    pub result: Option<StoredAnswer>,
    /// A failure's error code (the one a synchronous call would have got).
    pub error_code: Option<String>,
    /// Who paid, when it succeeded.
    pub charged_to: Option<String>,
}

impl Job {
    /// A queued job waits at most `max_wait` from its submission.
    pub fn deadline(&self, max_wait: Duration) -> Timestamp {
        deadline(self.created_at, max_wait)
    }
}

/// When a job submitted at `created_at` expires if it has not started.
pub fn deadline(created_at: Timestamp, max_wait: Duration) -> Timestamp {
    let wait = jiff::SignedDuration::try_from(max_wait).unwrap_or(jiff::SignedDuration::MAX);
    created_at.checked_add(wait).unwrap_or(Timestamp::MAX)
}

/// How long a job still may wait at `now` (zero once it is due to expire).
pub fn wait_left(created_at: Timestamp, max_wait: Duration, now: Timestamp) -> Duration {
    let left = deadline(created_at, max_wait).duration_since(now);
    Duration::try_from(left).unwrap_or(Duration::ZERO)
}

/// Finished jobs whose `finished_at` is at or before this are purged.
pub fn purge_before(now: Timestamp, result_ttl: Duration) -> Timestamp {
    let ttl = jiff::SignedDuration::try_from(result_ttl).unwrap_or(jiff::SignedDuration::MAX);
    now.checked_sub(ttl).unwrap_or(Timestamp::MIN)
}

/// How a job ended, when it did not succeed (a success is committed with
/// its usage event instead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEnd {
    pub status: JobStatus,
    pub error_code: Option<String>,
}

/// The result stored with a succeeded job's usage event, in one commit
/// (spooled with it during a PostgreSQL outage).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    pub id: String,
    pub answer: Option<StoredAnswer>,
    /// When it finished (Unix ms).
    pub at_ms: i64,
}

#[cfg(test)]
mod tests;
