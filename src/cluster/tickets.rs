//! This replica's limiter tickets: what each is (queued or holding a
//! slot), how its owner learns a grant or refusal, its share of the
//! heartbeat, and how it leaves the pool.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::future::join_all;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::coordinator::Coordinator;
use super::health::Op;
use super::keys;
use super::lease::{LeaseKind, LeaseState, Leased, apply_renewals, lapse_all};
use super::scripts::{LEAVE, POOL_BEAT};
use crate::limiter::LimitError;

pub(super) enum TicketState {
    Queued {
        account: Arc<str>,
        /// Taken by whoever answers first: the hint, the heartbeat, a
        /// refusal or shutdown.
        tx: Option<oneshot::Sender<Signal>>,
        /// Until when Redis keeps the ticket without a renewal (a
        /// conservative local estimate).
        live_until: Instant,
        /// The acquire script's reply said "queued". Until then the
        /// heartbeat leaves the ticket alone: it could reach Redis before
        /// the acquire and take the ticket for gone.
        confirmed: bool,
    },
    /// Holding a slot, under a lease.
    Held(LeaseState),
}

impl TicketState {
    fn account(&self) -> &Arc<str> {
        match self {
            Self::Queued { account, .. } => account,
            Self::Held(lease) => &lease.account,
        }
    }
}

impl Leased for TicketState {
    fn lease(&self) -> Option<&LeaseState> {
        match self {
            Self::Held(l) => Some(l),
            Self::Queued { .. } => None,
        }
    }

    fn lease_mut(&mut self) -> Option<&mut LeaseState> {
        match self {
            Self::Held(l) => Some(l),
            Self::Queued { .. } => None,
        }
    }
}

#[derive(Debug)]
pub(super) enum Signal {
    Granted,
    Refused(LimitError),
}

impl Coordinator {
    /// [`Self::signal`] after recording the pool counts the answer came
    /// with, so whoever wakes up sees counts at least as new.
    pub(super) fn signal_with(&self, ticket: &str, counts: &[i64], sig: Signal) {
        let account = self.tickets.get(ticket).map(|e| e.account().clone());
        if let Some(account) = account {
            self.note_pool(&account, counts);
            self.signal(ticket, sig);
        }
    }

    /// Answers a queued ticket of this replica; unknown tickets (left
    /// already, or of another boot) are ignored.
    pub(super) fn signal(&self, ticket: &str, sig: Signal) {
        let Some(mut entry) = self.tickets.get_mut(ticket) else {
            return;
        };
        let TicketState::Queued { account, tx, .. } = &mut *entry else {
            return;
        };
        let Some(tx) = tx.take() else { return };
        if let Signal::Granted = sig {
            // The heartbeat renews it from now on, even before the waiter
            // wakes up.
            *entry = TicketState::Held(LeaseState::new(account.clone(), self.lease));
        }
        let _ = tx.send(sig);
    }

    /// The acquire script queued the ticket: the heartbeat looks after it
    /// from now on.
    pub(super) fn confirm_queued(&self, ticket: &str) {
        if let Some(mut e) = self.tickets.get_mut(ticket)
            && let TicketState::Queued { confirmed, .. } = &mut *e
        {
            *confirmed = true;
        }
    }

    /// Every queued ticket of this replica is answered with `why`.
    pub(super) fn refuse_local(&self, why: LimitError) {
        for mut entry in self.tickets.iter_mut() {
            if let TicketState::Queued { tx, .. } = entry.value_mut()
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(Signal::Refused(why));
            }
        }
    }

    /// The ticket leaves its pool (released, cancelled, or granted to a
    /// waiter that went away): one round trip, spawned because `Drop`
    /// cannot await.
    pub(super) fn leave(self: &Arc<Self>, account: Arc<str>, ticket: Arc<str>, took_ms: u64) {
        self.tickets.remove(&ticket);
        let c = self.clone();
        self.spawn(async move {
            let mut inv = LEAVE.prepare_invoke();
            for k in keys::pool(&c.prefix, &account) {
                inv.key(k);
            }
            inv.arg(&*ticket)
                .arg(c.lease_ms())
                .arg(took_ms)
                .arg(&c.channel_prefix);
            if let Ok((_, stats)) = c.call::<(i64, Vec<i64>)>(Op::Release, &inv).await {
                c.note_pool(&account, &stats);
            }
        });
    }

    /// The limiter's share of the heartbeat: per pool one script renewing
    /// the leases of held tickets and the liveness of queued ones, and
    /// reporting grants and refusals whose hint was lost.
    pub(super) async fn beat_pools(&self) {
        // Per pool: (held, queued).
        type Mine = (Vec<Arc<str>>, Vec<Arc<str>>);
        let mut pools: HashMap<Arc<str>, Mine> = HashMap::new();
        for e in self.tickets.iter() {
            let slot = pools.entry(e.value().account().clone()).or_default();
            match e.value() {
                TicketState::Held(l) if !l.is_lost() => slot.0.push(e.key().clone()),
                TicketState::Held(_) => {}
                TicketState::Queued {
                    confirmed: true, ..
                } => slot.1.push(e.key().clone()),
                TicketState::Queued { .. } => {}
            }
        }
        // Pools used lately keep fresh stats even with nothing of ours in
        // them (the metrics scrape reads them).
        let recent = Instant::now() - self.lease * 4;
        for p in self.pools.iter() {
            if p.value().touched > recent {
                pools.entry(p.key().clone()).or_default();
            }
        }
        let started = Instant::now();
        let replies = join_all(
            pools
                .into_iter()
                .map(|(account, (held, queued))| async move {
                    let mut inv = POOL_BEAT.prepare_invoke();
                    for k in keys::pool(&self.prefix, &account) {
                        inv.key(k);
                    }
                    inv.arg(self.lease_ms())
                        .arg(&self.channel_prefix)
                        .arg(held.len());
                    for t in held.iter().chain(&queued) {
                        inv.arg(&**t);
                    }
                    let r = self
                        .call::<(Vec<i64>, Vec<i64>, Vec<i64>)>(Op::Heartbeat, &inv)
                        .await;
                    (account, held, queued, r)
                }),
        )
        .await;
        let renewed_until = started + self.lease;
        for (account, held, queued, r) in replies {
            let Ok((stats, held_ok, queued_st)) = r else {
                continue;
            };
            self.note_pool(&account, &stats);
            apply_renewals(
                &self.tickets,
                &held,
                &held_ok,
                renewed_until,
                &self.health,
                LeaseKind::Slot,
            );
            for (t, st) in queued.iter().zip(queued_st) {
                match st {
                    0 => {
                        if let Some(mut e) = self.tickets.get_mut(t)
                            && let TicketState::Queued { live_until, .. } = &mut *e
                        {
                            *live_until = renewed_until;
                        }
                    }
                    1 => self.signal(t, Signal::Granted),
                    _ => {
                        // Gone without a grant: refused, unless it expired
                        // because this replica could not renew it.
                        let lapsed = matches!(
                            self.tickets.get(t).as_deref(),
                            Some(TicketState::Queued { live_until, .. }) if *live_until <= started
                        );
                        let why = if lapsed {
                            LimitError::Unavailable
                        } else {
                            LimitError::Refused
                        };
                        self.signal(t, Signal::Refused(why));
                    }
                }
            }
        }
    }

    /// Held slots whose lease ran out before a renewal reached Redis
    /// (the honest edge of SPEC §8.9): counted once each, and logged.
    pub(super) fn check_lapsed_tickets(&self, now: Instant) {
        lapse_all(&self.tickets, now, &self.health, LeaseKind::Slot);
    }
}
