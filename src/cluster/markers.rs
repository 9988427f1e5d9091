//! [`RedisMarkers`]: idempotency keys' in-progress markers shared across
//! replicas (SPEC §10.1: two requests with one key on two replicas, exactly
//! one runs). Each marker is a Redis key taken with `SET NX` under a lease
//! the replica's heartbeat renews (the lease mechanism slots and units
//! use), given back when the task ends; a dead replica's marker lapses
//! with its other leases.
//!
//! While Redis is unreachable: `local` keeps markers in this replica's
//! memory (a retry on another replica may then run again, as the limit may
//! then be exceeded: SPEC §8.8), `reject` refuses the task.

use std::sync::Arc;

use futures_util::future::join_all;
use tokio::time::Instant;

use super::coordinator::Coordinator;
use super::health::Op;
use super::keys;
use super::lease::{self, LeaseKind, LeaseState, Leased};
use super::scripts::{MARKER_BEAT, MARKER_RELEASE, MARKER_TAKE};
use crate::config::RedisOutagePolicy;
use crate::idempotency::{
    IdempotencyKey, InProgress, LocalMarkers, Marker, MarkerTaken, TakeMarker,
};

pub struct RedisMarkers {
    coord: Arc<Coordinator>,
    /// The outage fallback under `local`.
    local: LocalMarkers,
}

pub(super) struct MarkerState {
    lease: LeaseState,
    redis_key: String,
}

impl Leased for MarkerState {
    fn lease(&self) -> Option<&LeaseState> {
        Some(&self.lease)
    }

    fn lease_mut(&mut self) -> Option<&mut LeaseState> {
        Some(&mut self.lease)
    }
}

impl RedisMarkers {
    pub fn new(coord: Arc<Coordinator>) -> Self {
        Self {
            coord,
            local: LocalMarkers::default(),
        }
    }

    fn outage(&self, account: &str, key: &IdempotencyKey) -> Result<Marker, MarkerTaken> {
        match self.coord.policy {
            RedisOutagePolicy::Reject => Err(MarkerTaken::Unavailable),
            RedisOutagePolicy::Local => self.local.take_now(account, key),
        }
    }

    async fn take_shared(
        &self,
        account: &str,
        key: &IdempotencyKey,
    ) -> Result<Marker, MarkerTaken> {
        let coord = &self.coord;
        let id = coord.new_ticket();
        let redis_key = keys::marker(&coord.prefix, account, key.as_str());
        let mut inv = MARKER_TAKE.prepare_invoke();
        inv.key(&redis_key).arg(&*id).arg(coord.lease_ms());
        // Registered before the call: dropped mid-call (the client hung
        // up), the release still runs.
        coord.markers.insert(
            id.clone(),
            MarkerState {
                lease: LeaseState::new(Arc::from(account), coord.lease),
                redis_key: redis_key.clone(),
            },
        );
        let mut held = SharedMarker {
            coord: coord.clone(),
            id,
            redis_key,
            armed: true,
        };
        match coord.call::<i64>(Op::Idempotency, &inv).await {
            Ok(1) => Ok(Marker::new(held)),
            Ok(_) => {
                // Another task holds the key: nothing of ours to release.
                held.armed = false;
                Err(MarkerTaken::Held)
            }
            Err(_) => {
                // Whether it was set is unknown: `held` releases it.
                drop(held);
                self.outage(account, key)
            }
        }
    }
}

impl InProgress for RedisMarkers {
    fn take<'a>(&'a self, account: &'a str, key: &'a IdempotencyKey) -> TakeMarker<'a> {
        if !self.coord.is_coordinated() {
            return Box::pin(std::future::ready(self.outage(account, key)));
        }
        Box::pin(self.take_shared(account, key))
    }
}

/// A marker this replica holds in Redis: dropped, it is released.
struct SharedMarker {
    coord: Arc<Coordinator>,
    id: Arc<str>,
    redis_key: String,
    /// Whether the key in Redis may be ours (taken, or unknown).
    armed: bool,
}

impl Drop for SharedMarker {
    fn drop(&mut self) {
        self.coord.markers.remove(&self.id);
        if !self.armed {
            return;
        }
        let c = self.coord.clone();
        let (id, key) = (self.id.clone(), std::mem::take(&mut self.redis_key));
        self.coord.spawn(async move {
            let mut inv = MARKER_RELEASE.prepare_invoke();
            inv.key(&key).arg(&*id);
            let _ = c.call::<i64>(Op::Idempotency, &inv).await;
        });
    }
}

impl Coordinator {
    /// The markers' share of the heartbeat: one script per account.
    pub(super) async fn beat_markers(&self) {
        let by_account = lease::by_account(&self.markers, |_| true);
        let started = Instant::now();
        let replies = join_all(by_account.into_values().map(|ids| async move {
            let mut inv = MARKER_BEAT.prepare_invoke();
            inv.arg(self.lease_ms());
            let mut live = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(m) = self.markers.get(&id) {
                    inv.key(&m.redis_key).arg(&*id);
                    live.push(id.clone());
                }
            }
            let r = self.call::<Vec<i64>>(Op::Heartbeat, &inv).await;
            (live, r)
        }))
        .await;
        for (ids, r) in replies {
            if let Ok(flags) = r {
                lease::apply_renewals(
                    &self.markers,
                    &ids,
                    &flags,
                    started + self.lease,
                    &self.health,
                    LeaseKind::Marker,
                );
            }
        }
    }

    pub(super) fn check_lapsed_markers(&self, now: Instant) {
        lease::lapse_all(&self.markers, now, &self.health, LeaseKind::Marker);
    }
}
