//! The one place a success becomes billable: the event is committed (and
//! fsync'd) before the caller may release the response.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::store::{Committed, Store, StoreError, Write, commit};

use super::UsageEvent;
use crate::billing::Source;
use crate::idempotency::IdempotencyRecord;
use crate::jobs::JobResult;

/// A recorded success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// Its sequence number (its cursor); `None` while it waits in the local
    /// spool of a shared store that is unreachable (durable either way).
    pub seq: Option<u64>,
    /// Who paid, when not the reserved payer (see `Committed::Usage`).
    pub fell_through: Option<Source>,
}

#[derive(Clone)]
pub struct UsageRecorder {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    committed: Arc<Notify>,
    /// The same for the stream publisher (each sink its own, so a poke
    /// one of them has not taken yet is not lost to the other).
    streamed: Arc<Notify>,
    /// Whether the last attempt to record failed (a full disk, a broken
    /// store): every success is then answered 503, and `/readyz` says so.
    failing: Arc<AtomicBool>,
}

impl UsageRecorder {
    pub fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            metrics,
            committed: Arc::new(Notify::new()),
            streamed: Arc::new(Notify::new()),
            failing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The store the events go to (idempotency records are read there).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// True while successes cannot be recorded (the last attempt failed).
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// Notified after each committed event: what the sinks tailing the
    /// event feed wait on (besides their timer).
    pub fn committed(&self) -> Arc<Notify> {
        self.committed.clone()
    }

    /// [`UsageRecorder::committed`] for the stream publisher.
    pub fn streamed(&self) -> Arc<Notify> {
        self.streamed.clone()
    }

    /// Durably stores the event together with its charge to `package` (if
    /// any, else postpaid; the store falls through to the next payer if the
    /// package can no longer pay) and the billing `month`'s counters. Pokes the
    /// event sinks (the JSON Lines export) after each commit.
    pub async fn record(
        &self,
        event: UsageEvent,
        package: Option<String>,
        month: String,
        idempotency: Option<Box<IdempotencyRecord>>,
        job: Option<Box<JobResult>>,
    ) -> Result<Recorded, StoreError> {
        let json =
            serde_json::to_string(&event).map_err(|e| StoreError::Internal(e.to_string()))?;
        let write = Write::AppendUsage {
            event: Box::new(event),
            json,
            package,
            month,
            idempotency,
            job,
        };
        let committed = commit(&*self.store, write).await;
        // Only a store that cannot record counts: a refusal of this one
        // event (a package's last unit taken by another replica, a
        // duplicate id) says nothing about the next success.
        let broken = matches!(
            committed,
            Err(StoreError::Unavailable { .. } | StoreError::Internal(_) | StoreError::Closed)
        );
        self.failing.store(broken, Ordering::Relaxed);
        match committed? {
            Committed::Usage { seq, fell_through } => {
                self.metrics.usage_events_total.inc();
                self.committed.notify_one();
                self.streamed.notify_one();
                if let Some(payer) = &fell_through {
                    tracing::info!(charged_to = %payer.label(), "the reserved unit could no longer pay: charged to the next payer");
                }
                Ok(Recorded { seq, fell_through })
            }
            Committed::Done | Committed::Purged(_) | Committed::JobsFull => Err(
                StoreError::Internal("usage append returned no sequence".into()),
            ),
        }
    }
}
