//! [`RedisQuota`]: the shared [`Quota`] (SPEC §8.4, no overdraw across
//! replicas). The replica's memory says which packages could pay, in
//! deduction order, and how many units the store counts as used; Redis
//! counts per package the units taken (used + held by any replica) and
//! holds each reservation under a lease, so a dead replica's units come
//! back.
//!
//! While Redis is unreachable: `reject` refuses (`Refusal::Unavailable`);
//! `local` reserves in this replica's memory only, so replicas may then
//! together reserve more than is left; the store's commit never charges a
//! package past its size and falls through to the next payer (with
//! postpaid off and nothing left, such a success is answered 503,
//! uncharged). Once Redis is back the quota is reconciled with the store
//! before it hands out units again ([`RedisQuota::reconciling_with`]).

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use jiff::Timestamp;
use tokio::time::Instant;

use super::coordinator::Coordinator;
use super::health::Op;
use super::keys;
use super::lease::{self, LeaseKind, LeaseState, Leased};
use super::scripts::{QUOTA_BEAT, RESERVE, SETTLE};
use crate::billing::{Accounts, HeldUnit, Payer, Quota, Refusal, Reservation, Reserve, Source};
use crate::clock::Clock;
use crate::config::RedisOutagePolicy;
use crate::store::Store;

/// How often the quota's counts are brought in line with the store even
/// without an outage (a settlement lost with a replica, a unit whose lease
/// lapsed after its commit).
const RECONCILE_EVERY: Duration = Duration::from_secs(60);
/// How soon after Redis is back the reconcile notices.
const RECONCILE_POLL: Duration = Duration::from_millis(100);
/// The pause after a failed read of the store.
const RECONCILE_RETRY: Duration = Duration::from_secs(1);

pub struct RedisQuota {
    coord: Arc<Coordinator>,
    accounts: Arc<Accounts>,
    /// Reservations wait for the reconcile after an outage (see
    /// [`RedisQuota::reconciling_with`]).
    reconciles: bool,
}

pub(super) struct UnitState {
    lease: LeaseState,
    /// The success is durable: the next heartbeat drops the record (the
    /// unit stays taken). Until then it is renewed like any other, so it
    /// is never given back by a lapsing lease.
    committed: bool,
}

impl Leased for UnitState {
    fn lease(&self) -> Option<&LeaseState> {
        Some(&self.lease)
    }

    fn lease_mut(&mut self) -> Option<&mut LeaseState> {
        Some(&mut self.lease)
    }
}

impl RedisQuota {
    /// `accounts` is the replica's billing memory, kept in step with the
    /// store by the integrator.
    pub fn new(coord: Arc<Coordinator>, accounts: Arc<Accounts>) -> Self {
        Self {
            coord,
            accounts,
            reconciles: false,
        }
    }

    /// Starts the reconcile: after every outage, before reservations go
    /// through Redis again, and every [`RECONCILE_EVERY`], the durable
    /// `used` of every package is read from `store` into memory, which
    /// each reservation hands to Redis as the floor of its count
    /// (`lua/reserve.lua`). Units the local fallback spent while Redis
    /// could not count them are so known to the shared quota before it
    /// hands out units again.
    pub fn reconciling_with(mut self, store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        let weak = Arc::downgrade(&self.coord);
        let stop = self.coord.stop.clone();
        let billing = self.accounts.clone();
        tokio::spawn(async move {
            let mut last = Instant::now();
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(RECONCILE_POLL) => {}
                }
                let Some(coord) = weak.upgrade() else { return };
                let outdated = coord.health.quota_outdated();
                let due = (outdated.is_some() && coord.is_coordinated())
                    || last.elapsed() >= RECONCILE_EVERY;
                if !due {
                    continue;
                }
                match store.package_usage(clock.now()).await {
                    Ok(rows) => {
                        for r in &rows {
                            billing.note_used(&r.account, &r.package, r.used);
                        }
                        last = Instant::now();
                        if let Some(outages) = outdated {
                            coord.health.quota_reconciled(outages);
                            tracing::info!(
                                packages = rows.len(),
                                "shared quota reconciled with the store"
                            );
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "shared quota not reconciled: the store could not be read");
                        tokio::time::sleep(RECONCILE_RETRY).await;
                    }
                }
            }
        });
        self.reconciles = true;
        self
    }

    fn outage(&self, account: &str, now: Timestamp) -> Result<Reservation, Refusal> {
        match self.coord.policy {
            RedisOutagePolicy::Reject => Err(Refusal::Unavailable),
            RedisOutagePolicy::Local => self.accounts.reserve(account, now),
        }
    }
}

fn postpaid() -> Reservation {
    Reservation::shared(Box::new(Unit {
        held: None,
        source: Source::Postpaid,
    }))
}

impl Quota for RedisQuota {
    fn reserve(&self, account: &str, now: Timestamp) -> Reserve {
        let grace = self.accounts.grace();
        let picked = self
            .accounts
            .with(account, |b| b.payers(now, grace).map(|p| (p, b.postpaid)));
        let (payers, is_postpaid) = match picked {
            None => return Reserve::ready(Err(Refusal::LowBalance)),
            Some(Err(e)) => return Reserve::ready(Err(e)),
            Some(Ok(p)) => p,
        };
        if payers.is_empty() {
            // Nothing countable is left: no need to ask Redis.
            return Reserve::ready(if is_postpaid {
                Ok(postpaid())
            } else {
                Err(Refusal::LowBalance)
            });
        }
        let usable = if self.reconciles {
            self.coord.health.quota_usable()
        } else {
            self.coord.is_coordinated()
        };
        if !usable {
            // Redis is unreachable, or back but not yet told of the units
            // spent meanwhile.
            return Reserve::ready(self.outage(account, now));
        }
        let this = RedisQuota {
            coord: self.coord.clone(),
            accounts: self.accounts.clone(),
            reconciles: self.reconciles,
        };
        let account: Arc<str> = Arc::from(account);
        Reserve::shared(async move { this.reserve_shared(account, payers, is_postpaid, now).await })
    }
}

impl RedisQuota {
    async fn reserve_shared(
        self,
        account: Arc<str>,
        payers: Vec<Payer>,
        is_postpaid: bool,
        now: Timestamp,
    ) -> Result<Reservation, Refusal> {
        let coord = &self.coord;
        let id = coord.new_ticket();
        let mut inv = RESERVE.prepare_invoke();
        for k in keys::quota(&coord.prefix, &account) {
            inv.key(k);
        }
        inv.arg(&*id).arg(coord.lease_ms());
        for p in &payers {
            inv.arg(&p.id).arg(p.size).arg(p.used);
        }
        // Dropped mid-call (the client hung up), the unit Redis may have
        // taken is given back.
        let mut pending = Some(Held {
            coord: coord.clone(),
            accounts: self.accounts.clone(),
            account: account.clone(),
            id: id.clone(),
            committed: false,
        });
        let picked = match coord.call::<i64>(Op::Quota, &inv).await {
            Ok(i) => i,
            Err(_) => {
                // Whether the script ran is unknown (a timeout): `pending`
                // gives back a unit it may have taken.
                drop(pending);
                return self.outage(&account, now);
            }
        };
        let Some(payer) = usize::try_from(picked - 1).ok().and_then(|i| payers.get(i)) else {
            if let Some(p) = pending.as_mut() {
                p.committed = true;
            }
            return if is_postpaid {
                Ok(postpaid())
            } else {
                Err(Refusal::LowBalance)
            };
        };
        coord.units.insert(
            id,
            UnitState {
                lease: LeaseState::new(account, coord.lease),
                committed: false,
            },
        );
        Ok(Reservation::shared(Box::new(Unit {
            held: pending.take(),
            source: Source::Package {
                id: payer.id.clone(),
                kind: payer.kind,
            },
        })))
    }
}

/// A reservation in Redis: dropped uncommitted, its unit comes back.
struct Held {
    coord: Arc<Coordinator>,
    accounts: Arc<Accounts>,
    account: Arc<str>,
    id: Arc<str>,
    committed: bool,
}

impl Held {
    /// A committed unit is settled by the next heartbeat, batched with the
    /// account's renewals: no round trip per success on the way out.
    fn commit(&self) {
        let lost = match self.coord.units.get_mut(&self.id) {
            Some(mut u) => {
                u.committed = true;
                u.lease.is_lost()
            }
            // Not registered (cannot happen for a held unit): settle now.
            None => return self.settle(true),
        };
        // Already lost (its lease lapsed: Redis gave the unit back and the
        // heartbeat no longer renews it): nothing will settle it, so it
        // must not stay in the map.
        if lost {
            self.coord.units.remove(&self.id);
        }
    }

    fn settle(&self, commit: bool) {
        self.coord.units.remove(&self.id);
        let c = self.coord.clone();
        let account = self.account.clone();
        let id = self.id.clone();
        self.coord.spawn(async move {
            let mut inv = SETTLE.prepare_invoke();
            for k in keys::quota(&c.prefix, &account) {
                inv.key(k);
            }
            inv.arg(&*id).arg(u8::from(commit));
            let _ = c.call::<i64>(Op::Quota, &inv).await;
        });
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.committed {
            self.settle(false);
        }
    }
}

struct Unit {
    /// None for postpaid: nothing in Redis to hold.
    held: Option<Held>,
    source: Source,
}

impl HeldUnit for Unit {
    fn source(&self) -> &Source {
        &self.source
    }

    fn commit(&mut self, charged: &Source) {
        let Some(h) = self.held.as_mut() else { return };
        if h.committed {
            return;
        }
        h.committed = true;
        h.commit();
        // This replica's admin views count the unit at once; the store
        // catches up when the usage event is recorded.
        if let Some(id) = charged.package_id() {
            h.accounts.with(&h.account, |b| {
                if let Some(p) = b.packages.iter_mut().find(|p| p.id == id) {
                    p.used += 1;
                }
            });
        }
    }
}

impl Coordinator {
    /// The quota's share of the heartbeat: one script per account renewing
    /// this replica's reservations and settling the committed ones.
    pub(super) async fn beat_units(&self) {
        let by_account = lease::by_account(&self.units, |_| true);
        let started = Instant::now();
        let replies = join_all(by_account.into_iter().map(|(account, ids)| async move {
            let committed: Vec<bool> = ids
                .iter()
                .map(|id| self.units.get(id).is_some_and(|u| u.committed))
                .collect();
            let mut inv = QUOTA_BEAT.prepare_invoke();
            for k in keys::quota(&self.prefix, &account) {
                inv.key(k);
            }
            inv.arg(self.lease_ms());
            for (id, committed) in ids.iter().zip(&committed) {
                if *committed {
                    inv.arg(format!("+{id}"));
                } else {
                    inv.arg(&**id);
                }
            }
            let r = self.call::<Vec<i64>>(Op::Heartbeat, &inv).await;
            (account, ids, committed, r)
        }))
        .await;
        for (account, ids, committed, r) in replies {
            let Ok(flags) = r else { continue };
            let mut renew = (Vec::new(), Vec::new());
            for ((id, committed), ok) in ids.iter().zip(committed).zip(flags) {
                if committed {
                    // Settled: the record goes, the unit stays taken.
                    self.units.remove(id);
                    if ok != 1 {
                        self.health.lease_lost();
                        tracing::warn!(%account, reservation = %id, "a committed unit's reservation had expired before it was settled");
                    }
                } else {
                    renew.0.push(id.clone());
                    renew.1.push(ok);
                }
            }
            lease::apply_renewals(
                &self.units,
                &renew.0,
                &renew.1,
                started + self.lease,
                &self.health,
                LeaseKind::Unit,
            );
        }
    }

    pub(super) fn check_lapsed_units(&self, now: Instant) {
        lease::lapse_all(&self.units, now, &self.health, LeaseKind::Unit);
    }
}
