//! Every task ends in exactly one outcome count, one end-to-end duration
//! and one access-log line.
//!
//! A [`Tally`] is made when a request arrives and travels with the task: the
//! connection counts it when it answers, a forwarded task that outlives its
//! client (detached) counts it when it ends, and if it is dropped uncounted
//! (the client hung up while queued, so hyper dropped the request's future)
//! its `Drop` counts the hang-up. Counting by hand at each exit is what
//! loses outcomes; a value that counts on drop cannot.

use std::sync::Arc;

use http::StatusCode;

use crate::metrics::{Metrics, Outcome};

use super::access_log::AccessLine;
use super::error::GatewayError;

/// nginx's status for a client that closed its connection before the
/// answer; no answer was sent.
pub fn client_closed() -> StatusCode {
    StatusCode::from_u16(499).expect("499 is a valid status code")
}

pub struct Tally {
    metrics: Arc<Metrics>,
    counted: bool,
    /// Filled in as the task goes (account, waits, where it was charged).
    pub line: AccessLine,
}

impl Tally {
    pub fn new(metrics: Arc<Metrics>, line: AccessLine) -> Self {
        Self {
            metrics,
            counted: false,
            line,
        }
    }

    /// The task got an answer from the backend, passed on with `status`.
    pub fn outcome(mut self, outcome: Outcome, status: StatusCode, bytes_out: usize) {
        self.count(outcome);
        self.line.write(status, None, Some(bytes_out as u64));
    }

    /// The task ended in a tollgate error, answered with `status` (HTTP
    /// 200 on the API 3.0 front); a client that hung up got nothing (499).
    pub fn error(mut self, err: &GatewayError, status: StatusCode) {
        self.metrics.rejection(err.code());
        self.count(err.outcome());
        let status = if matches!(err, GatewayError::ClientGone) {
            client_closed()
        } else {
            status
        };
        self.line.write(status, Some(err.code()), None);
    }

    fn count(&mut self, outcome: Outcome) {
        self.metrics.request(outcome);
        self.metrics
            .task_ended(outcome, self.line.elapsed(), self.line.account());
        self.counted = true;
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        if self.counted {
            return;
        }
        let (err, status) = if std::thread::panicking() {
            (GatewayError::Internal, StatusCode::INTERNAL_SERVER_ERROR)
        } else {
            (GatewayError::ClientGone, client_closed())
        };
        self.metrics.rejection(err.code());
        self.count(err.outcome());
        self.line.write(status, Some(err.code()), None);
    }
}
