//! [`Acquire`]: the future a limiter hands out for one slot request.
//!
//! One concrete type for every implementation, so the gateway holds no
//! boxed trait future on the hot path: a decision made at once (a free
//! slot, a full queue) is a plain value, a local wait is the gate's waiter
//! plus the deadline, and only a shared limiter boxes its own future.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

use super::local::LocalWaiter;
use super::{LimitError, Permit};

pub type Grant = Result<Permit, LimitError>;

pub struct Acquire {
    state: State,
}

enum State {
    Ready(Option<Grant>),
    Local {
        waiter: LocalWaiter,
        deadline: Instant,
        // Made on the first poll (inside the runtime); boxed because
        // `Sleep` is not `Unpin`. Only queued tasks pay for it.
        timer: Option<Pin<Box<Sleep>>>,
    },
    Shared(Pin<Box<dyn Future<Output = Grant> + Send>>),
}

impl Acquire {
    /// An outcome decided without waiting.
    pub fn ready(grant: Grant) -> Self {
        Self {
            state: State::Ready(Some(grant)),
        }
    }

    /// A shared limiter's own wait; it must honour the deadline itself.
    pub fn shared(fut: impl Future<Output = Grant> + Send + 'static) -> Self {
        Self {
            state: State::Shared(Box::pin(fut)),
        }
    }

    pub(super) fn local(waiter: LocalWaiter, deadline: Instant) -> Self {
        Self {
            state: State::Local {
                waiter,
                deadline,
                timer: None,
            },
        }
    }

    /// The outcome, if it was decided without waiting (a free slot, a full
    /// queue): the caller then needs no machinery for a long wait.
    pub fn take_ready(&mut self) -> Option<Grant> {
        match &mut self.state {
            State::Ready(g) => g.take(),
            _ => None,
        }
    }
}

impl Future for Acquire {
    type Output = Grant;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Grant> {
        let out = match &mut self.state {
            // Taken already: the future was polled after completion.
            State::Ready(g) => g.take().unwrap_or(Err(LimitError::Refused)),
            State::Shared(fut) => return fut.as_mut().poll(cx),
            State::Local {
                waiter,
                deadline,
                timer,
            } => {
                // The waiter first: a grant that raced the deadline wins.
                if let Poll::Ready(g) = Pin::new(&mut *waiter).poll(cx) {
                    g
                } else if timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(*deadline)))
                    .as_mut()
                    .poll(cx)
                    .is_ready()
                {
                    Err(LimitError::QueueTimeout {
                        retry_after: waiter.retry_after(),
                    })
                } else {
                    return Poll::Pending;
                }
            }
        };
        // Drops the waiter now, so a timed-out task leaves the queue at once.
        self.state = State::Ready(None);
        Poll::Ready(out)
    }
}
