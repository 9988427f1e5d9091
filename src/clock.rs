//! Wall-clock time for every time rule, behind a trait so rules can be tested
//! with a manual clock instead of sleeping.
//!
//! Durations measured for latency (queue wait, upstream time) use
//! `std::time::Instant` / tokio time directly: they are not business rules.

use std::sync::Mutex;

use jiff::{SignedDuration, Timestamp};

/// The source of "now" for business rules (usage event times, package
/// validity, billing months).
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that only moves when told to; for unit tests of time rules.
#[derive(Debug)]
pub struct ManualClock {
    // A std mutex: the critical section is a copy of 12 bytes and is never
    // held across an await.
    now: Mutex<Timestamp>,
}

impl ManualClock {
    pub fn new(start: Timestamp) -> Self {
        Self {
            now: Mutex::new(start),
        }
    }

    pub fn set(&self, to: Timestamp) {
        *self.now.lock().unwrap_or_else(|e| e.into_inner()) = to;
    }

    pub fn advance(&self, by: SignedDuration) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now = now
            .checked_add(by)
            .expect("manual clock advanced out of range");
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Formats a timestamp the way usage events and the admin API show times:
/// RFC 3339, UTC, millisecond precision (`2026-11-26T02:40:00.123Z`).
pub fn rfc3339_millis(ts: Timestamp) -> String {
    format!("{ts:.3}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let start: Timestamp = "2026-11-26T00:00:00Z".parse().unwrap();
        let clock = ManualClock::new(start);
        assert_eq!(clock.now(), start);
        clock.advance(SignedDuration::from_secs(90));
        assert_eq!(rfc3339_millis(clock.now()), "2026-11-26T00:01:30.000Z");
    }
}
