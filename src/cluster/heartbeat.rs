//! The replica's one background heartbeat, every quarter lease: renews its
//! registry entry, the leases of its slots and reservations and the
//! liveness of its queued tickets, in one batch of scripts sent together
//! over the multiplexed connection. While Redis is unreachable it probes
//! more often, so shared limiting resumes soon after Redis is back.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::coordinator::Coordinator;

/// The probe period while Redis is unreachable (SPEC §8.8: shared
/// limiting resumes within 10 s of Redis being back).
const PROBE_EVERY: Duration = Duration::from_millis(500);

pub(super) fn start(coord: &Arc<Coordinator>) {
    let weak = Arc::downgrade(coord);
    let stop = coord.stop.clone();
    let period = coord.lease / 4;
    tokio::spawn(async move {
        loop {
            let wait = match weak.upgrade() {
                Some(c) if c.is_coordinated() => period,
                Some(_) => period.min(PROBE_EVERY),
                None => return,
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            let Some(coord) = weak.upgrade() else { return };
            tokio::select! {
                () = stop.cancelled() => return,
                () = coord.beat() => {}
            }
        }
    });
}

impl Coordinator {
    async fn beat(&self) {
        match self.beat_instance().await {
            Ok(live) => {
                self.health.set_live_replicas(live);
                self.health.reached();
                tokio::join!(
                    self.beat_pools(),
                    self.beat_units(),
                    self.beat_markers(),
                    self.beat_default_limit()
                );
            }
            Err(e) => tracing::debug!(error = %e, "heartbeat failed"),
        }
        let now = Instant::now();
        self.check_lapsed_tickets(now);
        self.check_lapsed_units(now);
        self.check_lapsed_markers(now);
    }
}
