//! One lease mechanism for everything a replica holds in Redis until a
//! deadline its heartbeat renews: a limiter ticket's slot, a quota unit,
//! an idempotency key's in-progress marker. Each is given back by `Drop`
//! (a spawned release script) and lapsed by anyone after its deadline on
//! Redis's clock; this side keeps one state machine per lease (renewed
//! until / lost), one lapse check and one way of reading a heartbeat's
//! reply, which each user parameterises with its own script and
//! [`LeaseKind`].

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use super::health::Health;

/// What a lease holds, for the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LeaseKind {
    Slot,
    Unit,
    Marker,
}

impl LeaseKind {
    fn what(self) -> &'static str {
        match self {
            Self::Slot => "the slot",
            Self::Unit => "the quota reservation",
            Self::Marker => "the idempotency key's in-progress marker",
        }
    }
}

/// One lease this replica holds in Redis.
#[derive(Debug, Clone)]
pub(super) struct LeaseState {
    pub(super) account: Arc<str>,
    /// Until when Redis keeps it without another renewal (a conservative
    /// local estimate: renewals count from when the heartbeat started).
    renewed_until: Instant,
    /// It expired before a renewal reached Redis: counted in
    /// `tollgate_leases_lost_total` once, never renewed again.
    lost: bool,
}

impl LeaseState {
    pub(super) fn new(account: Arc<str>, lease: Duration) -> Self {
        Self {
            account,
            renewed_until: Instant::now() + lease,
            lost: false,
        }
    }

    pub(super) fn is_lost(&self) -> bool {
        self.lost
    }

    /// One heartbeat's reply for this lease: `renewed` (until `until`), or
    /// gone from Redis (it had expired: lost).
    pub(super) fn renewal(
        &mut self,
        renewed: bool,
        until: Instant,
        health: &Health,
        kind: LeaseKind,
        id: &str,
    ) {
        if renewed {
            self.renewed_until = until;
        } else {
            self.mark_lost(health, kind, id, "it expired before it was renewed");
        }
    }

    /// Past its deadline with no renewal (Redis unreachable): lost.
    pub(super) fn lapse(&mut self, now: Instant, health: &Health, kind: LeaseKind, id: &str) {
        if self.renewed_until <= now {
            self.mark_lost(health, kind, id, "Redis unreachable past the lease");
        }
    }

    fn mark_lost(&mut self, health: &Health, kind: LeaseKind, id: &str, why: &str) {
        if self.lost {
            return;
        }
        self.lost = true;
        health.lease_lost();
        tracing::warn!(account = %self.account, lease = %id, "lease lost: {} ({why})", kind.what());
    }
}

/// A registry entry that may hold a lease (a queued ticket holds none).
pub(super) trait Leased {
    fn lease(&self) -> Option<&LeaseState>;
    fn lease_mut(&mut self) -> Option<&mut LeaseState>;
}

/// The lapse check, for every lease of one registry.
pub(super) fn lapse_all<S: Leased>(
    map: &DashMap<Arc<str>, S>,
    now: Instant,
    health: &Health,
    kind: LeaseKind,
) {
    for mut e in map.iter_mut() {
        let id = e.key().clone();
        if let Some(l) = e.value_mut().lease_mut() {
            l.lapse(now, health, kind, &id);
        }
    }
}

/// A heartbeat's reply for `ids` of one registry: one flag per id (1:
/// renewed), applied to those still registered.
pub(super) fn apply_renewals<S: Leased>(
    map: &DashMap<Arc<str>, S>,
    ids: &[Arc<str>],
    flags: &[i64],
    until: Instant,
    health: &Health,
    kind: LeaseKind,
) {
    for (id, ok) in ids.iter().zip(flags) {
        if let Some(mut e) = map.get_mut(id)
            && let Some(l) = e.value_mut().lease_mut()
        {
            l.renewal(*ok == 1, until, health, kind, id);
        }
    }
}

/// The live leases of one registry, by account: what one heartbeat script
/// per account renews.
pub(super) fn by_account<S: Leased>(
    map: &DashMap<Arc<str>, S>,
    mut include: impl FnMut(&S) -> bool,
) -> std::collections::HashMap<Arc<str>, Vec<Arc<str>>> {
    let mut out: std::collections::HashMap<Arc<str>, Vec<Arc<str>>> = Default::default();
    for e in map.iter() {
        if let Some(l) = e.value().lease()
            && !l.is_lost()
            && include(e.value())
        {
            out.entry(l.account.clone())
                .or_default()
                .push(e.key().clone());
        }
    }
    out
}
