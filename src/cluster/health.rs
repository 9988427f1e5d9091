//! Whether this replica can coordinate through Redis right now, and the
//! counters an operator needs to see when it could not.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// What a failed Redis exchange was doing: the `op` label of
/// `tollgate_coordination_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Acquire,
    Release,
    Heartbeat,
    Quota,
    Idempotency,
}

impl Op {
    pub const ALL: [Op; 5] = [
        Op::Acquire,
        Op::Release,
        Op::Heartbeat,
        Op::Quota,
        Op::Idempotency,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Op::Acquire => "acquire",
            Op::Release => "release",
            Op::Heartbeat => "heartbeat",
            Op::Quota => "quota",
            Op::Idempotency => "idempotency",
        }
    }
}

pub(crate) struct Health {
    coordinated: AtomicBool,
    /// Bumped by every failed exchange: units may be spent from here on
    /// that Redis does not count (the local fallback, settlements lost).
    outages: AtomicU64,
    /// The `outages` count the shared quota was last brought in line with
    /// the store at; reservations go through Redis only while it is
    /// current.
    quota_in_line: AtomicU64,
    errors: [AtomicU64; 5],
    leases_lost: AtomicU64,
    /// Replicas with an unexpired registry entry, as last seen; the divisor
    /// of the limit while Redis is unreachable.
    live_replicas: AtomicU32,
}

impl Health {
    pub(crate) fn new() -> Self {
        Self {
            coordinated: AtomicBool::new(true),
            outages: AtomicU64::new(0),
            quota_in_line: AtomicU64::new(0),
            errors: Default::default(),
            leases_lost: AtomicU64::new(0),
            live_replicas: AtomicU32::new(1),
        }
    }

    pub(crate) fn is_coordinated(&self) -> bool {
        self.coordinated.load(Ordering::Acquire)
    }

    /// A Redis exchange failed: new work takes the outage path until the
    /// heartbeat reaches Redis again.
    pub(crate) fn failed(&self, op: Op, err: &dyn std::fmt::Display) {
        self.errors[op as usize].fetch_add(1, Ordering::Relaxed);
        self.outages.fetch_add(1, Ordering::AcqRel);
        if self.coordinated.swap(false, Ordering::AcqRel) {
            tracing::warn!(op = op.label(), error = %err, "Redis unreachable: outage policy in force");
        } else {
            tracing::debug!(op = op.label(), error = %err, "Redis exchange failed");
        }
    }

    pub(crate) fn reached(&self) {
        if !self.coordinated.swap(true, Ordering::AcqRel) {
            tracing::info!("Redis reachable again: shared limiting resumed");
        }
    }

    /// Whether reservations may go through Redis: it is reachable and
    /// the quota was reconciled since it last was not.
    pub(crate) fn quota_usable(&self) -> bool {
        self.is_coordinated() && self.quota_outdated().is_none()
    }

    /// `Some(outages)` while the quota must be reconciled: pass it to
    /// [`Self::quota_reconciled`] once memory was read again after it.
    pub(crate) fn quota_outdated(&self) -> Option<u64> {
        let outages = self.outages.load(Ordering::Acquire);
        (self.quota_in_line.load(Ordering::Acquire) < outages).then_some(outages)
    }

    /// The store was read after `outages` failures: a failure since keeps
    /// the quota outdated.
    pub(crate) fn quota_reconciled(&self, outages: u64) {
        self.quota_in_line.fetch_max(outages, Ordering::AcqRel);
    }

    pub(crate) fn errors(&self) -> [(&'static str, u64); 5] {
        Op::ALL.map(|op| (op.label(), self.errors[op as usize].load(Ordering::Relaxed)))
    }

    pub(crate) fn lease_lost(&self) {
        self.leases_lost.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn leases_lost(&self) -> u64 {
        self.leases_lost.load(Ordering::Relaxed)
    }

    pub(crate) fn set_live_replicas(&self, n: u32) {
        self.live_replicas.store(n.max(1), Ordering::Relaxed);
    }

    pub(crate) fn live_replicas(&self) -> u32 {
        self.live_replicas.load(Ordering::Relaxed)
    }
}
