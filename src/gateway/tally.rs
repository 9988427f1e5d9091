//! Every task ends in exactly one outcome count.
//!
//! A [`Tally`] is made when a request arrives and travels with the task: the
//! connection counts it when it answers, a forwarded task that outlives its
//! client (detached) counts it when it ends, and if it is dropped uncounted
//! (the client hung up while queued, so hyper dropped the request's future)
//! its `Drop` counts the hang-up. Counting by hand at each exit is what
//! loses outcomes; a value that counts on drop cannot.

use std::sync::Arc;

use crate::metrics::{Metrics, Outcome};

use super::error::GatewayError;

pub struct Tally {
    metrics: Arc<Metrics>,
    counted: bool,
}

impl Tally {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            counted: false,
        }
    }

    pub fn outcome(mut self, outcome: Outcome) {
        self.metrics.request(outcome);
        self.counted = true;
    }

    pub fn error(mut self, err: &GatewayError) {
        self.metrics.request(err.outcome());
        self.metrics.rejection(err.code());
        self.counted = true;
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        if self.counted {
            return;
        }
        let err = if std::thread::panicking() {
            GatewayError::Internal
        } else {
            GatewayError::ClientGone
        };
        self.metrics.request(err.outcome());
        self.metrics.rejection(err.code());
    }
}
