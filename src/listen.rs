//! Accepting connections, for both listeners: a connection cap per
//! listener, a back-off when `accept` fails, and warnings about it that
//! cannot flood the log.
//!
//! Each listener has its own cap so that one of them running out (say, an
//! operator script leaking admin connections) cannot take every descriptor
//! from the other. Past the cap a connection is accepted and closed at once,
//! as HAProxy does with `maxconn` reached on a frontend with no queue: the
//! client learns at once, instead of waiting in the kernel's backlog.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntGauge};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How long to wait after a failed `accept` before the next: out of
/// descriptors, an immediate retry would fail again and spin a core.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// At most one warning about failed accepts per this period, per listener.
const WARN_EVERY: Duration = Duration::from_secs(1);

/// Held by a connection's task for as long as it is open: gives the slot
/// back and lowers the open-connections gauge when dropped.
pub struct ConnSlot {
    _permit: OwnedSemaphorePermit,
    open: IntGauge,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

pub struct Acceptor {
    listener: TcpListener,
    name: &'static str,
    slots: Arc<Semaphore>,
    refused: IntCounter,
    errors: IntCounter,
    open: IntGauge,
    warn: Arc<Mutex<WarnLimiter>>,
}

/// What the sockets of one listener share (one socket per data-plane
/// worker): its connection cap, and the rate of its warnings.
#[derive(Clone)]
pub struct ListenerLimits {
    slots: Arc<Semaphore>,
    warn: Arc<Mutex<WarnLimiter>>,
}

impl ListenerLimits {
    pub fn new(max_connections: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_connections)),
            warn: Arc::new(Mutex::new(WarnLimiter::new(WARN_EVERY))),
        }
    }
}

impl Acceptor {
    /// `name` labels the listener in metrics and logs (`data`, `admin`).
    pub fn new(
        listener: TcpListener,
        name: &'static str,
        max_connections: usize,
        metrics: &Metrics,
    ) -> Self {
        Self::sharing(
            listener,
            name,
            &ListenerLimits::new(max_connections),
            metrics,
        )
    }

    /// An acceptor for one of the sockets of a listener whose `limits` the
    /// others share.
    pub fn sharing(
        listener: TcpListener,
        name: &'static str,
        limits: &ListenerLimits,
        metrics: &Metrics,
    ) -> Self {
        Self {
            listener,
            name,
            slots: limits.slots.clone(),
            warn: limits.warn.clone(),
            refused: metrics.connections_refused.with_label_values(&[name]),
            errors: metrics.accept_errors.with_label_values(&[name]),
            open: metrics.open_connections.with_label_values(&[name]),
        }
    }

    /// The next connection within the cap, or `None` once `stop` is
    /// cancelled. Connections over the cap are closed here and not returned.
    pub async fn next(&mut self, stop: &CancellationToken) -> Option<(TcpStream, ConnSlot)> {
        loop {
            let accepted = tokio::select! {
                r = self.listener.accept() => r,
                () = stop.cancelled() => return None,
            };
            let stream = match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    self.errors.inc();
                    let allowed = self
                        .warn
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .allow(Instant::now());
                    if let Some(suppressed) = allowed {
                        tracing::warn!(
                            listener = self.name,
                            error = %e,
                            suppressed,
                            "accept failed; backing off (`suppressed` counts the same warning held back since the last)"
                        );
                    }
                    tokio::select! {
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                        () = stop.cancelled() => return None,
                    }
                    continue;
                }
            };
            match self.slots.clone().try_acquire_owned() {
                Ok(permit) => {
                    self.open.inc();
                    return Some((
                        stream,
                        ConnSlot {
                            _permit: permit,
                            open: self.open.clone(),
                        },
                    ));
                }
                Err(_) => {
                    // Dropping the stream closes it: the descriptor comes
                    // back at once.
                    self.refused.inc();
                    drop(stream);
                }
            }
        }
    }
}

/// Lets one event through per period and counts the ones it holds back.
struct WarnLimiter {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl WarnLimiter {
    fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(number held back since the last one)` if this event may be
    /// logged now, else `None` (and it is counted).
    fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.duration_since(last) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_are_rate_limited_and_count_what_they_hold_back() {
        let mut w = WarnLimiter::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(w.allow(t0), Some(0));
        for i in 1..=47 {
            assert_eq!(w.allow(t0 + Duration::from_millis(i * 20)), None);
        }
        assert_eq!(w.allow(t0 + Duration::from_millis(1000)), Some(47));
        assert_eq!(w.allow(t0 + Duration::from_millis(1001)), None);
        assert_eq!(w.allow(t0 + Duration::from_millis(2500)), Some(1));
    }
}
