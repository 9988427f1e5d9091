//! Every way a task can fail, and the one place they become HTTP answers.
//!
//! Each error knows its source, which decides the status, the error code,
//! the `outcome` metric label, and that nothing is charged. Messages never
//! carry internals (store errors, backend addresses) or secrets.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

use crate::api_error::error_body;
use crate::auth::tc3::Tc3Error;
use crate::head_check::Refusal;
use crate::metrics::Outcome;

use super::path::InvalidPath;

#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    #[error("missing or unknown API key")]
    Unauthorized,
    #[error("the account is deactivated")]
    StopUsing,
    #[error("the account is suspended for arrears")]
    InArrears,
    #[error("the account has no free or prepaid units left and postpaid is off")]
    LowBalance,
    #[error("the account's queue is full")]
    QueueFull { retry_after: Duration },
    #[error("no slot became free within the queue wait time")]
    QueueTimeout { retry_after: Duration },
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    /// The client stopped sending its body for longer than allowed while
    /// its task held a slot.
    #[error("the request body stalled for more than {} ms", idle.as_millis())]
    BodyTimeout { idle: Duration },
    /// The body kept arriving, but slower on average than allowed.
    #[error("the request body arrived slower than {min_rate} bytes/s")]
    BodyTooSlow { min_rate: u64 },
    #[error("{0}")]
    BadRequest(String),
    #[error("{0} is not a task this gateway forwards")]
    MethodNotAllowed(http::Method),
    /// A path with a `..` above the root, an encoded separator, … (see
    /// `gateway::path`).
    #[error("{}", .0.message())]
    InvalidPath(InvalidPath),
    /// A request head refused before hyper read it (see `head_check`).
    #[error("{}", .0.message())]
    MalformedHead(Refusal),
    #[error("the backend is unavailable")]
    BackendUnavailable,
    #[error("the backend did not answer in time")]
    BackendTimeout,
    #[error("the task succeeded but its usage could not be recorded; it is not charged")]
    UsageRecordFailed,
    #[error("the gateway is shutting down")]
    ShuttingDown,
    /// The shared limiter (Redis) is unreachable and the outage policy is
    /// `reject`.
    #[error("the gateway cannot reach its coordination service; try again shortly")]
    CoordinationUnavailable,
    /// The client hung up while queued; nobody reads this answer, it only
    /// counts in the metrics.
    #[error("the client closed the connection while queued")]
    ClientGone,
    #[error("internal error")]
    Internal,
    /// An API 3.0 (TC3-HMAC-SHA256) request whose signature does not hold.
    #[error("{}", .0.message())]
    Tc3(Tc3Error),
    #[error("the action {0:?} is not offered here")]
    InvalidAction(String),
    #[error("X-TC-Version must be {0}")]
    InvalidVersion(String),
    /// Verified bodies waiting for a slot already hold
    /// `limits.max_buffered_bytes`.
    #[error("too many request bodies are waiting; try again shortly")]
    BuffersFull,
    /// Answers being read from the backend already hold
    /// `backend.max_buffered_response_bytes`.
    #[error("too many large backend answers are being read; the task is not charged")]
    AnswersFull,
    /// `limits.max_queued_tasks` tasks already wait, across accounts.
    #[error("the gateway already holds its maximum of queued tasks; try again shortly")]
    GatewayQueueFull,
    #[error(
        "a request with this idempotency key is still queued or running; retry when it has ended"
    )]
    IdempotentRequestInProgress { retry_after: Duration },
    #[error(
        "this idempotency key was used for another request (method, path, query or body differ)"
    )]
    IdempotencyKeyReused,
    #[error(
        "the request with this idempotency key succeeded, but its answer was too large to keep"
    )]
    IdempotentAnswerNotStored,
    /// Idempotency keys are checked in the store, which cannot be read.
    #[error("the gateway cannot check the idempotency key now; try again shortly")]
    StoreUnavailable,
    /// No job with this id belongs to the caller (or none exists).
    #[error("no such job")]
    JobNotFound,
    #[error("the job is {0}: only a queued job can be cancelled")]
    JobNotCancellable(&'static str),
    /// `jobs.max_pending_per_account` unfinished jobs already.
    #[error("the account already has {0} queued or running jobs")]
    TooManyJobs(u32),
    /// The store cannot take or read jobs now.
    #[error("jobs cannot be stored or read now; try again shortly")]
    JobsUnavailable,
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::StopUsing | Self::InArrears | Self::LowBalance => StatusCode::FORBIDDEN,
            Self::QueueFull { .. } | Self::QueueTimeout { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout { .. } | Self::BodyTooSlow { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::InvalidPath(_) => StatusCode::BAD_REQUEST,
            Self::MalformedHead(r) => r.status(),
            Self::BackendUnavailable => StatusCode::BAD_GATEWAY,
            Self::BackendTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::UsageRecordFailed | Self::ShuttingDown | Self::CoordinationUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::ClientGone => StatusCode::from_u16(499).expect("in range"),
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Tc3(_) => StatusCode::UNAUTHORIZED,
            Self::InvalidAction(_) | Self::InvalidVersion(_) => StatusCode::BAD_REQUEST,
            Self::BuffersFull | Self::GatewayQueueFull | Self::AnswersFull => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::IdempotentRequestInProgress { .. } | Self::IdempotentAnswerNotStored => {
                StatusCode::CONFLICT
            }
            Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::StoreUnavailable | Self::JobsUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::JobNotFound => StatusCode::NOT_FOUND,
            Self::JobNotCancellable(_) => StatusCode::CONFLICT,
            Self::TooManyJobs(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The service's error code (the `ImageToImage` action's where one fits).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized => "AuthFailure.InvalidAuthorization",
            Self::StopUsing => "ResourceUnavailable.StopUsing",
            Self::InArrears => "ResourceUnavailable.InArrears",
            Self::LowBalance => "ResourceUnavailable.LowBalance",
            Self::QueueFull { .. } => "RequestLimitExceeded.JobNumExceed",
            Self::QueueTimeout { .. } => "RequestLimitExceeded.QueueTimeout",
            Self::BodyTooLarge { .. } => "FailedOperation.RequestEntityTooLarge",
            Self::BodyTimeout { .. } | Self::BodyTooSlow { .. } => {
                "FailedOperation.RequestBodyTimeout"
            }
            Self::BadRequest(_) => "InvalidParameter.InvalidParameter",
            Self::MethodNotAllowed(_) => "UnsupportedOperation.MethodNotAllowed",
            Self::InvalidPath(_) => "InvalidParameter.InvalidPath",
            Self::MalformedHead(r) => r.code(),
            Self::BackendUnavailable => "FailedOperation.BackendUnavailable",
            Self::BackendTimeout => "FailedOperation.RequestTimeout",
            Self::UsageRecordFailed => "FailedOperation.UsageRecordFailed",
            Self::ShuttingDown => "FailedOperation.ServiceShuttingDown",
            Self::CoordinationUnavailable => "FailedOperation.CoordinationUnavailable",
            Self::ClientGone => "FailedOperation.ClientGone",
            Self::Internal => "InternalError",
            Self::Tc3(e) => e.code(),
            Self::InvalidAction(_) => "InvalidAction",
            Self::InvalidVersion(_) => "InvalidParameterValue",
            Self::BuffersFull | Self::GatewayQueueFull => "RequestLimitExceeded",
            Self::AnswersFull => "FailedOperation.GatewayBusy",
            Self::IdempotentRequestInProgress { .. } => {
                "FailedOperation.IdempotentRequestInProgress"
            }
            Self::IdempotencyKeyReused => "InvalidParameter.IdempotencyKeyReused",
            Self::IdempotentAnswerNotStored => "FailedOperation.IdempotentAnswerNotStored",
            Self::StoreUnavailable | Self::JobsUnavailable => "FailedOperation.StoreUnavailable",
            Self::JobNotFound => "ResourceNotFound.JobNotFound",
            Self::JobNotCancellable(_) => "FailedOperation.JobNotCancellable",
            Self::TooManyJobs(_) => "RequestLimitExceeded.JobNumExceed",
        }
    }

    pub fn outcome(&self) -> Outcome {
        match self {
            Self::BackendUnavailable
            | Self::BackendTimeout
            | Self::UsageRecordFailed
            | Self::AnswersFull
            | Self::Internal => Outcome::Error,
            _ => Outcome::Rejected,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::QueueFull { retry_after }
            | Self::QueueTimeout { retry_after }
            | Self::IdempotentRequestInProgress { retry_after } => Some(*retry_after),
            _ => None,
        }
    }

    pub fn into_response(self, request_id: &str) -> Response<Full<Bytes>> {
        let body = error_body(self.code(), &self.to_string(), request_id);
        let mut resp = Response::new(Full::new(body));
        *resp.status_mut() = self.status();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(after) = self.retry_after() {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(after.as_secs().max(1)),
            );
        }
        resp
    }

    /// The answer on the API 3.0 front: the same body and headers, with
    /// HTTP 200 as the service gives them (its SDKs raise the error code
    /// from the body only on a 200 with `application/json`).
    pub fn into_tc3_response(self, request_id: &str) -> Response<Full<Bytes>> {
        let mut resp = self.into_response(request_id);
        *resp.status_mut() = StatusCode::OK;
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_errors_carry_retry_after_in_seconds() {
        let r = GatewayError::QueueFull {
            retry_after: Duration::from_millis(2500),
        }
        .into_response("r1");
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        let r = GatewayError::QueueTimeout {
            retry_after: Duration::ZERO,
        }
        .into_response("r1");
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn every_error_has_a_code_and_a_non_500_status_unless_internal() {
        let all = [
            GatewayError::Unauthorized,
            GatewayError::StopUsing,
            GatewayError::InArrears,
            GatewayError::LowBalance,
            GatewayError::BodyTooLarge { limit: 1 },
            GatewayError::BodyTimeout {
                idle: Duration::from_secs(1),
            },
            GatewayError::BadRequest("x".into()),
            GatewayError::MethodNotAllowed(http::Method::TRACE),
            GatewayError::InvalidPath(InvalidPath::AboveRoot),
            GatewayError::MalformedHead(Refusal::LengthWithEncoding),
            GatewayError::MalformedHead(Refusal::TargetTooLong),
            GatewayError::MalformedHead(Refusal::HeadTooLarge),
            GatewayError::BackendUnavailable,
            GatewayError::BackendTimeout,
            GatewayError::UsageRecordFailed,
            GatewayError::ShuttingDown,
            GatewayError::CoordinationUnavailable,
            GatewayError::Tc3(Tc3Error::SignatureFailure),
            GatewayError::InvalidAction("Other".into()),
            GatewayError::InvalidVersion("2022-12-29".into()),
            GatewayError::BuffersFull,
            GatewayError::GatewayQueueFull,
            GatewayError::AnswersFull,
            GatewayError::BodyTooSlow { min_rate: 1 },
            GatewayError::IdempotentRequestInProgress {
                retry_after: Duration::from_secs(1),
            },
            GatewayError::IdempotencyKeyReused,
            GatewayError::IdempotentAnswerNotStored,
            GatewayError::StoreUnavailable,
            GatewayError::JobNotFound,
            GatewayError::JobNotCancellable("running"),
            GatewayError::TooManyJobs(1),
            GatewayError::JobsUnavailable,
        ];
        for e in all {
            assert!(
                e.code().starts_with(|c: char| c.is_ascii_uppercase()),
                "{e:?}"
            );
            assert_ne!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        }
    }
}
