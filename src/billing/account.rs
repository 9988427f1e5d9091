//! One account's billing state and the rules that change it.

use jiff::{SignedDuration, Timestamp};
use rust_decimal::Decimal;

use super::{PackageKind, ResourcePackage, Source, deduction_key};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct AccountBilling {
    pub postpaid: bool,
    /// USD; negative after a settlement the balance could not cover.
    pub balance: Decimal,
    /// When a settlement left the balance negative; cleared when a top-up
    /// makes it non-negative again.
    pub arrears_since: Option<Timestamp>,
    pub packages: Vec<ResourcePackage>,
}

/// Why a call may not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    InArrears,
    LowBalance,
    /// A shared quota could not be reached (cluster mode): nobody can
    /// tell whether a unit is left.
    Unavailable,
}

/// A package that could pay for a call, as a shared quota needs it: the
/// durable count of units used is only where counting starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payer {
    pub id: String,
    pub kind: PackageKind,
    pub size: u64,
    pub used: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Good,
    /// Negative balance; service continues until `suspends_at`.
    Overdue {
        suspends_at: Timestamp,
    },
    Suspended {
        since: Timestamp,
    },
}

impl AccountBilling {
    pub fn standing(&self, now: Timestamp, grace: SignedDuration) -> Standing {
        match self.arrears_since {
            Some(since) if self.balance < Decimal::ZERO => {
                let suspends_at = since.checked_add(grace).unwrap_or(Timestamp::MAX);
                if now >= suspends_at {
                    Standing::Suspended { since: suspends_at }
                } else {
                    Standing::Overdue { suspends_at }
                }
            }
            _ => Standing::Good,
        }
    }

    /// Picks who pays for a call made now and holds a unit of it: the free
    /// package, then prepaid ones (earliest expiry first), then postpaid.
    pub fn reserve(&mut self, now: Timestamp, grace: SignedDuration) -> Result<Source, Refusal> {
        if let Standing::Suspended { .. } = self.standing(now, grace) {
            return Err(Refusal::InArrears);
        }
        let pick = self
            .packages
            .iter_mut()
            .filter(|p| p.pays_at(now))
            .min_by(|a, b| {
                deduction_key(a.kind, a.expires_at, &a.id).cmp(&deduction_key(
                    b.kind,
                    b.expires_at,
                    &b.id,
                ))
            });
        match pick {
            Some(p) => {
                p.reserved += 1;
                Ok(Source::Package {
                    id: p.id.clone(),
                    kind: p.kind,
                })
            }
            None if self.postpaid => Ok(Source::Postpaid),
            None => Err(Refusal::LowBalance),
        }
    }

    /// The packages that could pay for a call made now, in deduction order
    /// (free, then prepaid by earliest expiry), ignoring this replica's
    /// reservations: a shared quota counts those itself.
    pub fn payers(&self, now: Timestamp, grace: SignedDuration) -> Result<Vec<Payer>, Refusal> {
        if let Standing::Suspended { .. } = self.standing(now, grace) {
            return Err(Refusal::InArrears);
        }
        let mut v: Vec<&ResourcePackage> = self
            .packages
            .iter()
            .filter(|p| {
                p.refunded_at.is_none()
                    && p.effective_at <= now
                    && now < p.expires_at
                    && p.used < p.size
            })
            .collect();
        v.sort_by(|a, b| {
            deduction_key(a.kind, a.expires_at, &a.id).cmp(&deduction_key(
                b.kind,
                b.expires_at,
                &b.id,
            ))
        });
        Ok(v.into_iter()
            .map(|p| Payer {
                id: p.id.clone(),
                kind: p.kind,
                size: p.size,
                used: p.used,
            })
            .collect())
    }

    fn package_mut(&mut self, id: &str) -> Option<&mut ResourcePackage> {
        self.packages.iter_mut().find(|p| p.id == id)
    }

    /// Gives a held unit back (the call failed or never ran).
    pub fn release(&mut self, source: &Source) {
        if let Some(p) = source.package_id().and_then(|id| self.package_mut(id)) {
            p.reserved = p.reserved.saturating_sub(1);
        }
    }

    /// Turns a held unit into a used one (the success is recorded).
    pub fn commit(&mut self, source: &Source) {
        self.commit_to(source, source);
    }

    /// The success is recorded and `charged` paid for it: the store's
    /// commit decides the payer, and charges the next one in the deduction
    /// order when the `reserved` package could no longer pay (it ran out,
    /// counted by another replica, or was refunded meanwhile).
    pub fn commit_to(&mut self, reserved: &Source, charged: &Source) {
        if let Some(p) = reserved.package_id().and_then(|id| self.package_mut(id)) {
            p.reserved = p.reserved.saturating_sub(1);
        }
        if let Some(p) = charged.package_id().and_then(|id| self.package_mut(id)) {
            p.used += 1;
        }
    }

    /// Free and prepaid units that could pay for a call made now.
    pub fn remaining_units(&self, now: Timestamp) -> u64 {
        self.packages
            .iter()
            .filter(|p| p.pays_at(now))
            .map(|p| p.remaining())
            .sum()
    }

    /// The balance and arrears clock a top-up would leave, without changing
    /// anything (the caller stores them first, then [`Self::set_balance`]).
    pub fn after_top_up(&self, amount: Decimal) -> (Decimal, Option<Timestamp>) {
        let balance = self.balance + amount;
        let arrears = if balance >= Decimal::ZERO {
            None
        } else {
            self.arrears_since
        };
        (balance, arrears)
    }

    /// The balance and arrears clock after charging (or, if the bill fell,
    /// crediting) a settlement's difference, without changing anything.
    pub fn after_settlement(&self, delta: Decimal, now: Timestamp) -> (Decimal, Option<Timestamp>) {
        let balance = self.balance - delta;
        let arrears = if balance < Decimal::ZERO {
            Some(self.arrears_since.unwrap_or(now))
        } else {
            None
        };
        (balance, arrears)
    }

    pub fn set_balance(&mut self, (balance, arrears_since): (Decimal, Option<Timestamp>)) {
        self.balance = balance;
        self.arrears_since = arrears_since;
    }

    pub fn top_up(&mut self, amount: Decimal) {
        self.set_balance(self.after_top_up(amount));
    }

    pub fn settle(&mut self, delta: Decimal, now: Timestamp) {
        self.set_balance(self.after_settlement(delta, now));
    }
}
