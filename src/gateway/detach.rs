//! Running a forwarded task on its connection, and handing it off when the
//! connection goes away.
//!
//! A forwarded task must run to its end even if its client disconnects (the
//! backend is working on it: the slot stays held, a success is recorded).
//! Spawning every task costs a task and a channel per request; instead the
//! task runs inline, boxed, and only if the connection's future is dropped
//! before it finishes is the box moved into a detached tokio task.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio_util::task::TaskTracker;
use tracing::Instrument;

type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send>>;

pub struct DetachOnDrop<T: Send + 'static> {
    task: Option<Boxed<T>>,
    detached: Arc<AtomicBool>,
    tracker: TaskTracker,
    /// What a task that panicked answers.
    on_panic: fn() -> T,
}

impl<T: Send + 'static> DetachOnDrop<T> {
    /// `make` gets a flag that turns true if the task is detached (its
    /// client is gone).
    pub fn new<F>(
        tracker: TaskTracker,
        on_panic: fn() -> T,
        make: impl FnOnce(Arc<AtomicBool>) -> F,
    ) -> Self
    where
        F: Future<Output = T> + Send + 'static,
    {
        let detached = Arc::new(AtomicBool::new(false));
        Self {
            task: Some(Box::pin(make(detached.clone()))),
            detached,
            tracker,
            on_panic,
        }
    }
}

impl<T: Send + 'static> Future for DetachOnDrop<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let Some(task) = self.task.as_mut() else {
            return Poll::Ready((self.on_panic)());
        };
        // A panic is contained here, as it would be in a spawned task: the
        // task's permit and reservation are dropped by the unwind, and the
        // client gets an error answer instead of a dropped connection.
        match catch_unwind(AssertUnwindSafe(|| task.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(out)) => {
                self.task = None;
                Poll::Ready(out)
            }
            Err(_) => {
                self.task = None;
                tracing::error!("a task panicked; its slot and reservation were released");
                Poll::Ready((self.on_panic)())
            }
        }
    }
}

impl<T: Send + 'static> Drop for DetachOnDrop<T> {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            self.detached.store(true, Ordering::Release);
            // Outside a runtime (the process is exiting) there is nothing
            // left to hand the task to; dropping it releases its slot.
            if tokio::runtime::Handle::try_current().is_err() {
                return;
            }
            self.tracker.spawn(
                async move {
                    let _ = task.await;
                }
                .instrument(tracing::Span::current()),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_dropped_task_finishes_detached_and_knows_it() {
        let tracker = TaskTracker::new();
        let finished = Arc::new(AtomicBool::new(false));
        let saw_detached = Arc::new(AtomicBool::new(false));
        let (f, s) = (finished.clone(), saw_detached.clone());
        let task = DetachOnDrop::new(
            tracker.clone(),
            || (),
            move |detached| async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                s.store(detached.load(Ordering::Acquire), Ordering::Release);
                f.store(true, Ordering::Release);
            },
        );
        // The client gives up after 10 ms.
        assert!(
            tokio::time::timeout(Duration::from_millis(10), task)
                .await
                .is_err()
        );
        tracker.close();
        tracker.wait().await;
        assert!(finished.load(Ordering::Acquire));
        assert!(saw_detached.load(Ordering::Acquire));
    }

    #[tokio::test]
    async fn a_task_that_completes_inline_is_not_detached() {
        let tracker = TaskTracker::new();
        let out = DetachOnDrop::new(
            tracker.clone(),
            || false,
            |detached| async move { detached.load(Ordering::Acquire) },
        )
        .await;
        assert!(!out);
        assert!(tracker.is_empty());
    }

    #[tokio::test]
    async fn a_panic_becomes_the_fallback_answer() {
        let tracker = TaskTracker::new();
        let out =
            DetachOnDrop::new(tracker, || "internal error", |_| async { panic!("bug") }).await;
        assert_eq!(out, "internal error");
    }

    #[tokio::test]
    async fn a_panicking_task_releases_its_slot_and_its_unit() {
        use std::time::Duration as StdDuration;

        use jiff::Timestamp;
        use rust_decimal::Decimal;

        use crate::billing::{AccountBilling, Accounts, PackageKind, ResourcePackage};
        use crate::limiter::{Limiter, LocalLimiter, Ticket};

        let limiter = LocalLimiter::new(1, 10);
        let ticket = Ticket {
            account: Arc::from("acme"),
            sub_cap: None,
        };
        let far = tokio::time::Instant::now() + StdDuration::from_secs(60);
        let Some(Ok(permit)) = limiter.acquire(&ticket, far).take_ready() else {
            panic!("a free slot")
        };
        let billing = Accounts::new(StdDuration::from_secs(60));
        let now = Timestamp::now();
        billing.insert(
            "acme",
            AccountBilling {
                packages: vec![ResourcePackage::new(
                    "free".into(),
                    "acme",
                    PackageKind::Free,
                    1,
                    Decimal::ZERO,
                    now,
                )],
                ..AccountBilling::default()
            },
        );
        let reservation = billing.reserve("acme", now).expect("one unit");
        let out = DetachOnDrop::new(
            TaskTracker::new(),
            || "internal error",
            move |_| async move {
                let _held = (permit, reservation);
                panic!("bug while forwarding");
            },
        )
        .await;
        assert_eq!(out, "internal error");
        assert_eq!(limiter.stats("acme").in_flight, 0, "the slot came back");
        assert_eq!(
            billing.with("acme", |b| b.remaining_units(now)),
            Some(1),
            "the unit came back"
        );
    }
}
