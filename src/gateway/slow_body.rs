//! A request body that has to keep arriving once it is being forwarded.
//!
//! The body is read only after the task holds a slot (and its unit), so a
//! client that sends its headers and then trickles its body, or stops,
//! would pin its account's slot until `backend.timeout_ms`. Each frame must
//! come within `limits.body_idle_timeout_ms` of the previous one (HAProxy's
//! `timeout http-request` idea, applied to the body); a stalled body fails
//! the task with `408`, which frees the slot and gives the unit back.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// The error a stalled body ends with; found in the send error's chain.
#[derive(Debug, thiserror::Error)]
#[error("the request body stalled for more than {0:?}")]
pub struct BodyStalled(pub Duration);

/// The error a body trickling in below the minimum rate ends with.
#[derive(Debug, thiserror::Error)]
#[error("the request body arrived slower than {0} bytes/s")]
pub struct BodyTooSlow(pub u64);

pub struct IdleTimeout<B> {
    inner: B,
    idle: Duration,
    // Made on the first poll (inside the runtime), reset on every frame.
    timer: Option<Pin<Box<Sleep>>>,
    /// `limits.min_body_rate_bytes_per_s` (0: off), averaged from the first
    /// poll and enforced once `idle` has passed: a client sending one byte
    /// just inside every idle window would otherwise hold its slot for as
    /// long as it likes.
    min_rate: u64,
    started: Option<Instant>,
    received: u64,
}

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            timer: None,
            min_rate: 0,
            started: None,
            received: 0,
        }
    }

    /// Also fails the body when its average rate falls below `bytes_per_s`
    /// after the first idle window.
    pub fn with_min_rate(mut self, bytes_per_s: u64) -> Self {
        self.min_rate = bytes_per_s;
        self
    }

    fn too_slow(&self, now: Instant) -> bool {
        let Some(started) = self.started else {
            return false;
        };
        let elapsed = now.saturating_duration_since(started);
        self.min_rate > 0
            && elapsed > self.idle
            && (self.received as f64) < self.min_rate as f64 * elapsed.as_secs_f64()
    }
}

impl<B> Body for IdleTimeout<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let now = Instant::now();
        this.started.get_or_insert(now);
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                }
                if this.too_slow(now) && !this.inner.is_end_stream() {
                    return Poll::Ready(Some(Err(Box::new(BodyTooSlow(this.min_rate)))));
                }
                let next = now + this.idle;
                match this.timer.as_mut() {
                    Some(t) => t.as_mut().reset(next),
                    None => this.timer = Some(Box::pin(tokio::time::sleep_until(next))),
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let idle = this.idle;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                if timer.as_mut().poll(cx).is_ready() {
                    Poll::Ready(Some(Err(Box::new(BodyStalled(idle)))))
                } else {
                    Poll::Pending
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
