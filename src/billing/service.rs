//! The billing service: every billing change (resource and concurrency
//! packages, the postpaid switch, top-ups, settlement) goes through here in
//! the order "check → commit → apply": decided by the rules of this module
//! over the account's state in memory, committed to the store (through the
//! `Store` trait: this module does no I/O of its own), then applied to
//! memory. Other replicas learn of each change through the store's change
//! feed (see `accounts::service`).

use std::collections::HashMap;
use std::sync::Arc;

use jiff::tz::TimeZone;
use rust_decimal::Decimal;

use crate::accounts::{AccountService, ChangeError};
use crate::clock::Clock;
use crate::entitlements::schedule::Schedule;
use crate::entitlements::{self, ConcurrencyPackage};
use crate::store::{MonthUsage, SettlementLine, Store, StoreError, Write, commit};

/// How often a balance change is recomputed after another replica's
/// change got there first.
const BALANCE_RETRIES: u32 = 20;

use super::{
    Accounts, Bill, Month, PackageKind, ResourcePackage, bill, check_prepaid_refund, prepaid_price,
};

/// One account's month: its calls by source, the bill, and what
/// settlements already charged.
#[derive(Debug)]
pub struct MonthReport {
    pub usage: MonthUsage,
    pub bill: Bill,
    pub settled: Option<Decimal>,
}

/// A short random pause before recomputing a balance change that lost to
/// another replica's, so replicas retrying together spread out.
async fn contention_pause() {
    let ms = rand::random_range(1..20);
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
}

pub struct BillingService {
    store: Arc<dyn Store>,
    billing: Arc<Accounts>,
    /// Reads an account fresh from a shared store before a change is
    /// checked against memory.
    accounts: Arc<AccountService>,
    schedule: Arc<Schedule>,
    clock: Arc<dyn Clock>,
    tz: TimeZone,
    /// Serializes this replica's balance changes (top-ups, settlements),
    /// which compute the new balance first and store it second.
    balances: tokio::sync::Mutex<()>,
}

impl BillingService {
    pub fn new(
        store: Arc<dyn Store>,
        billing: Arc<Accounts>,
        accounts: Arc<AccountService>,
        schedule: Arc<Schedule>,
        clock: Arc<dyn Clock>,
        tz: TimeZone,
    ) -> Self {
        Self {
            store,
            billing,
            accounts,
            schedule,
            clock,
            tz,
            balances: tokio::sync::Mutex::new(()),
        }
    }

    async fn known(&self, account: &str) -> Result<(), ChangeError> {
        self.accounts.root(account).await?;
        self.billing
            .with(account, |_| ())
            .ok_or_else(|| ChangeError::NotFound(format!("account {account}")))
    }

    /// Buys a prepaid package of one of the offered sizes.
    pub async fn buy_package(
        &self,
        account: &str,
        size: Option<u64>,
    ) -> Result<ResourcePackage, ChangeError> {
        self.known(account).await?;
        let (size, price) = size
            .and_then(|s| prepaid_price(s).map(|p| (s, p)))
            .ok_or_else(|| {
                let sizes: Vec<String> = super::PREPAID_PRICES
                    .iter()
                    .map(|(s, _)| s.to_string())
                    .collect();
                ChangeError::Invalid(format!("size: must be one of {}", sizes.join(", ")))
            })?;
        let pkg = ResourcePackage::new(
            format!("rp_{}", uuid::Uuid::now_v7().simple()),
            account,
            PackageKind::Prepaid,
            size,
            price,
            self.clock.now(),
        );
        commit(
            &*self.store,
            Write::CreateResourcePackage(Box::new(pkg.clone())),
        )
        .await?;
        // The change feed may have brought it in already.
        self.billing.with(account, |b| {
            if !b.packages.iter().any(|p| p.id == pkg.id) {
                b.packages.push(pkg.clone())
            }
        });
        Ok(pkg)
    }

    /// Refunds a prepaid package if the rules allow it.
    pub async fn refund_package(
        &self,
        account: &str,
        pkg_id: &str,
    ) -> Result<ResourcePackage, ChangeError> {
        self.known(account).await?;
        let now = self.clock.now();
        // Checked against memory, committed, then applied, as every other
        // change: marked in memory before its commit, a concurrent read
        // of the account could undo the mark for a moment. A task that
        // reserves a unit of the package meanwhile is not charged to it:
        // the store never charges a refunded package and falls through to
        // the next payer.
        let pkg = self
            .billing
            .with(account, |b| {
                let p = b.packages.iter().find(|p| p.id == pkg_id)?;
                Some(check_prepaid_refund(p, now, &self.tz).map(|()| p.clone()))
            })
            .flatten()
            .ok_or_else(|| {
                ChangeError::NotFound(format!("resource package {pkg_id} of account {account}"))
            })?
            .map_err(|e| ChangeError::Conflict {
                code: "FailedOperation.RefundNotAllowed",
                message: e.to_string(),
            })?;
        let write = Write::RefundResourcePackage {
            id: pkg_id.to_string(),
            at: now,
        };
        match commit(&*self.store, write).await {
            Ok(_) => {}
            // The store's guard (unused, unrefunded) refused it: a task of
            // another replica was charged to the package meanwhile.
            Err(StoreError::NotFound(_)) => {
                return Err(ChangeError::Conflict {
                    code: "FailedOperation.RefundNotAllowed",
                    message: format!(
                        "resource package {pkg_id} was used meanwhile; only an unused package can be refunded"
                    ),
                });
            }
            Err(e) => return Err(e.into()),
        }
        let mut refunded = pkg;
        refunded.refunded_at = Some(now);
        self.billing.with(account, |b| {
            if let Some(p) = b.packages.iter_mut().find(|p| p.id == pkg_id) {
                p.refunded_at = Some(now);
                refunded = p.clone();
            }
        });
        Ok(refunded)
    }

    pub async fn set_postpaid(&self, account: &str, enabled: bool) -> Result<(), ChangeError> {
        self.known(account).await?;
        commit(
            &*self.store,
            Write::SetPostpaid {
                account: account.to_string(),
                enabled,
            },
        )
        .await?;
        self.billing.with(account, |b| b.postpaid = enabled);
        Ok(())
    }

    /// Adds to the balance; a balance that is no longer negative ends the
    /// arrears at once. Returns the new balance and whether arrears remain.
    ///
    /// The store sets the balance only if it is still the one the new one
    /// was computed from; if another replica changed it meanwhile, the
    /// account is read again and the top-up computed again.
    ///
    /// A top-up that would leave more than `max_balance` is refused with
    /// `FailedOperation.BalanceLimitExceeded`, nothing changed (checked
    /// against the balance it would be added to, read fresh each attempt).
    pub async fn top_up(
        &self,
        account: &str,
        amount: Decimal,
        max_balance: Decimal,
    ) -> Result<(Decimal, bool), ChangeError> {
        let _serial = self.balances.lock().await;
        let mut attempt = 0;
        loop {
            self.known(account).await?;
            let now = self.clock.now();
            let (before, (balance, arrears_since)) = self
                .billing
                .with(account, |b| (b.balance, b.after_top_up(amount)))
                .ok_or_else(|| ChangeError::NotFound(format!("account {account}")))?;
            if balance > max_balance {
                return Err(ChangeError::Conflict {
                    code: "FailedOperation.BalanceLimitExceeded",
                    message: format!(
                        "the balance would be {balance} USD, over billing.max_balance_usd ({max_balance} USD); nothing was changed"
                    ),
                });
            }
            let write = Write::TopUp {
                account: account.to_string(),
                amount_usd: amount,
                balance_before_usd: before,
                balance_after_usd: balance,
                arrears_since,
                at: now,
            };
            match commit(&*self.store, write).await {
                Ok(_) => {
                    self.billing
                        .with(account, |b| b.set_balance((balance, arrears_since)));
                    return Ok((balance, arrears_since.is_some()));
                }
                Err(StoreError::Conflict(_)) if attempt < BALANCE_RETRIES => {
                    attempt += 1;
                    contention_pause().await;
                    self.accounts.refresh(account).await?;
                }
                Err(StoreError::Conflict(what)) => return Err(balance_contention(what)),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// One account's month from the store (every replica's calls).
    pub async fn month_report(
        &self,
        account: &str,
        month: Month,
    ) -> Result<MonthReport, ChangeError> {
        self.known(account).await?;
        let label = month.to_string();
        let usage = self
            .store
            .month_usage(&label, Some(account))
            .await?
            .pop()
            .unwrap_or_default();
        let settled = self
            .store
            .settled(&label)
            .await?
            .into_iter()
            .find(|(a, _)| a == account)
            .map(|(_, d)| d);
        let bill = bill(usage.calls, usage.postpaid);
        Ok(MonthReport {
            usage,
            bill,
            settled,
        })
    }

    /// Settles a month for every account: each account's balance is charged
    /// its bill minus what earlier settlements of that month charged, so
    /// settling twice changes nothing, and settling again after late calls
    /// (of the current month) charges only the difference. Returns the lines
    /// that changed something.
    pub async fn settle(&self, month: Month) -> Result<Vec<SettlementLine>, ChangeError> {
        let now = self.clock.now();
        if month.first_day > Month::of(now, &self.tz).first_day {
            return Err(ChangeError::Invalid(format!(
                "month: {month} has not started"
            )));
        }
        let _serial = self.balances.lock().await;
        let mut attempt = 0;
        loop {
            let lines = self.settlement_lines(month, now).await?;
            if lines.is_empty() {
                return Ok(lines);
            }
            let write = Write::Settle {
                month: month.to_string(),
                lines: lines.clone(),
                at: now,
            };
            match commit(&*self.store, write).await {
                Ok(_) => {
                    for l in &lines {
                        self.billing.with(&l.account, |b| {
                            b.set_balance((l.balance_after_usd, l.arrears_since))
                        });
                    }
                    return Ok(lines);
                }
                // A balance changed meanwhile (a top-up through another
                // replica): read those accounts again and recompute.
                Err(StoreError::Conflict(_)) if attempt < BALANCE_RETRIES => {
                    attempt += 1;
                    contention_pause().await;
                    for l in &lines {
                        self.accounts.refresh(&l.account).await?;
                    }
                }
                Err(StoreError::Conflict(what)) => return Err(balance_contention(what)),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// What settling `month` would change, account by account.
    async fn settlement_lines(
        &self,
        month: Month,
        now: jiff::Timestamp,
    ) -> Result<Vec<SettlementLine>, ChangeError> {
        let label = month.to_string();
        let usage = self.store.month_usage(&label, None).await?;
        let settled: HashMap<String, Decimal> =
            self.store.settled(&label).await?.into_iter().collect();
        let mut lines = Vec::new();
        for u in usage {
            let bill = bill(u.calls, u.postpaid);
            let before = settled.get(&u.account).copied().unwrap_or(Decimal::ZERO);
            let delta = bill.amount_usd - before;
            // Unchanged since the last settlement of the month (or nothing
            // to bill and never settled): nothing to write.
            if delta.is_zero() {
                continue;
            }
            let Some((balance_before, (balance, arrears_since))) = self
                .billing
                .with(&u.account, |b| (b.balance, b.after_settlement(delta, now)))
            else {
                continue;
            };
            lines.push(SettlementLine {
                account: u.account,
                bill,
                delta_usd: delta,
                balance_before_usd: balance_before,
                balance_after_usd: balance,
                arrears_since,
            });
        }
        Ok(lines)
    }

    /// Buys concurrency: `units` for a day or a calendar month from `start`.
    pub async fn buy_concurrency(
        &self,
        account: &str,
        units: i64,
        period: &str,
        start: &str,
    ) -> Result<ConcurrencyPackage, ChangeError> {
        self.known(account).await?;
        let now = self.clock.now();
        let (units, period, start, starts_at, ends_at, price_usd) =
            entitlements::plan_purchase(units, period, start, now, &self.tz)
                .map_err(|e| ChangeError::Invalid(e.to_string()))?;
        let pkg = ConcurrencyPackage {
            id: format!("cp_{}", uuid::Uuid::now_v7().simple()),
            account: account.to_string(),
            units,
            period,
            start,
            starts_at,
            ends_at,
            price_usd,
            bought_at: now,
        };
        commit(
            &*self.store,
            Write::CreateConcurrencyPackage(Box::new(pkg.clone())),
        )
        .await?;
        self.schedule.add(pkg.clone());
        Ok(pkg)
    }

    /// Refunds a concurrency package if it is not valid yet and the cut-off
    /// (22:00 the day before its start) has not passed.
    pub async fn refund_concurrency(
        &self,
        account: &str,
        id: &str,
    ) -> Result<ConcurrencyPackage, ChangeError> {
        self.known(account).await?;
        let pkg = self
            .schedule
            .book()
            .get(account, id)
            .cloned()
            .ok_or_else(|| {
                ChangeError::NotFound(format!(
                    "concurrency package {id} of account {account} (unrefunded, not ended)"
                ))
            })?;
        let now = self.clock.now();
        entitlements::check_refund(&pkg, now, &self.tz).map_err(|e| ChangeError::Conflict {
            code: "FailedOperation.RefundNotAllowed",
            message: e.to_string(),
        })?;
        commit(
            &*self.store,
            Write::RefundConcurrencyPackage {
                id: id.to_string(),
                at: now,
            },
        )
        .await?;
        self.schedule.remove(account, id);
        Ok(pkg)
    }
}

/// A balance kept changing under a top-up or settlement (other replicas'
/// writes) past every retry: nothing was changed, the call may be repeated.
fn balance_contention(what: String) -> ChangeError {
    ChangeError::Conflict {
        code: "FailedOperation.ConcurrentUpdate",
        message: format!("{what} on every attempt; nothing was changed, retry the call"),
    }
}
