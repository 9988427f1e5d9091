//! The service's billing rules at the door: free and prepaid resource
//! packages, the deduction order, reservations against overdraw, postpaid
//! monthly tiers, settlement and arrears.
//!
//! Pure rules over values and times: no I/O. The gateway reserves a unit at
//! admission through [`Accounts`]; the store persists what these rules
//! decide; the admin API calls them for purchases, refunds, top-ups and
//! settlement.

mod account;
mod reservation;
mod service;

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use rust_decimal::Decimal;
use serde::Serialize;

pub use account::{AccountBilling, Payer, Refusal, Standing};
pub use reservation::{Accounts, HeldUnit, Quota, Reservation, Reserve};
pub use service::{BillingService, MonthReport};

/// Pictures in the free package granted at the first activation.
pub const FREE_PACKAGE_SIZE: u64 = 50;

/// Prepaid package sizes and their prices in USD.
pub const PREPAID_PRICES: [(u64, u64); 5] = [
    (1_000, 75),
    (10_000, 550),
    (100_000, 4_500),
    (1_000_000, 30_000),
    (10_000_000, 200_000),
];

pub fn prepaid_price(size: u64) -> Option<Decimal> {
    PREPAID_PRICES
        .iter()
        .find(|(s, _)| *s == size)
        .map(|(_, p)| Decimal::from(*p))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PackageKind {
    Free,
    Prepaid,
}

impl PackageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Free => "free",
            Self::Prepaid => "prepaid",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "free" => Some(Self::Free),
            "prepaid" => Some(Self::Prepaid),
            _ => None,
        }
    }
}

/// A package of pictures: the free one or a prepaid one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourcePackage {
    pub id: String,
    pub account: String,
    pub kind: PackageKind,
    pub size: u64,
    /// Units charged to it, durable.
    pub used: u64,
    /// Units held by admitted tasks that have not finished; memory only.
    pub reserved: u64,
    /// Pays for calls made in `[effective_at, expires_at)`.
    pub effective_at: Timestamp,
    pub expires_at: Timestamp,
    pub price_usd: Decimal,
    pub refunded_at: Option<Timestamp>,
}

impl ResourcePackage {
    /// A package valid one year from `at`.
    pub fn new(
        id: String,
        account: &str,
        kind: PackageKind,
        size: u64,
        price_usd: Decimal,
        at: Timestamp,
    ) -> Self {
        Self {
            id,
            account: account.to_string(),
            kind,
            size,
            used: 0,
            reserved: 0,
            effective_at: at,
            expires_at: one_year_after(at),
            price_usd,
            refunded_at: None,
        }
    }

    pub fn remaining(&self) -> u64 {
        self.size.saturating_sub(self.used + self.reserved)
    }

    pub fn pays_at(&self, t: Timestamp) -> bool {
        self.refunded_at.is_none()
            && self.effective_at <= t
            && t < self.expires_at
            && self.remaining() > 0
    }
}

/// One year later, on the calendar in UTC (Feb 29 → Feb 28).
fn one_year_after(t: Timestamp) -> Timestamp {
    t.to_zoned(TimeZone::UTC)
        .checked_add(1.year())
        .map(|z| z.timestamp())
        .unwrap_or(Timestamp::MAX)
}

/// The deduction order among packages that can pay (SPEC §5): the free
/// package first, then prepaid ones by earliest expiry; the id breaks ties
/// so every replica and the store pick the same one.
pub fn deduction_key(
    kind: PackageKind,
    expires_at: Timestamp,
    id: &str,
) -> (bool, Timestamp, &str) {
    (kind == PackageKind::Prepaid, expires_at, id)
}

/// A package the store may charge a success to at commit, as it reads it
/// inside the commit's transaction (unrefunded, a unit left).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeCandidate {
    pub id: String,
    pub kind: PackageKind,
    pub effective_at: Timestamp,
    pub expires_at: Timestamp,
}

/// The packages that may pay for a call made `at`, in deduction order: what
/// the commit tries, one after the other, when the unit reserved at
/// admission is refused (the package ran out or was refunded meanwhile),
/// before it falls through to postpaid.
pub fn charge_order(mut candidates: Vec<ChargeCandidate>, at: Timestamp) -> Vec<ChargeCandidate> {
    candidates.retain(|c| c.effective_at <= at && at < c.expires_at);
    candidates.sort_by(|a, b| {
        deduction_key(a.kind, a.expires_at, &a.id).cmp(&deduction_key(b.kind, b.expires_at, &b.id))
    });
    candidates
}

/// Where one success is charged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Package { id: String, kind: PackageKind },
    Postpaid,
}

impl Source {
    /// The usage event's `charged_to`.
    pub fn label(&self) -> String {
        match self {
            Self::Package {
                kind: PackageKind::Free,
                ..
            } => "free".into(),
            Self::Package { id, .. } => format!("prepaid:{id}"),
            Self::Postpaid => "postpaid".into(),
        }
    }

    pub fn package_id(&self) -> Option<&str> {
        match self {
            Self::Package { id, .. } => Some(id),
            Self::Postpaid => None,
        }
    }
}

/// A month's postpaid price tier, reached by the month's total successful
/// calls (all sources), applied to all of its postpaid units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Tier {
    pub tier: u8,
    /// Inclusive upper bound of calls; `None` for the last tier.
    pub up_to: Option<u64>,
    pub unit_price_usd: Decimal,
}

pub fn tier_for(calls: u64) -> Tier {
    let (tier, up_to, cents) = match calls {
        0..=10_000 => (1, Some(10_000), 8),
        10_001..=100_000 => (2, Some(100_000), 6),
        100_001..=1_000_000 => (3, Some(1_000_000), 5),
        _ => (4, None, 4),
    };
    Tier {
        tier,
        up_to,
        unit_price_usd: Decimal::new(cents, 2),
    }
}

/// A month's postpaid bill for one account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bill {
    pub calls: u64,
    pub postpaid_units: u64,
    pub tier: Tier,
    pub amount_usd: Decimal,
}

pub fn bill(calls: u64, postpaid_units: u64) -> Bill {
    let tier = tier_for(calls);
    Bill {
        calls,
        postpaid_units,
        tier,
        amount_usd: tier.unit_price_usd * Decimal::from(postpaid_units),
    }
}

/// A billing month, `YYYY-MM`, in the billing time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Month {
    pub first_day: Date,
}

impl Month {
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        // Digits only: `parse` would also take a sign (`2026-+1`).
        let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
        if b.len() != 7 || b[4] != b'-' || !digits(0..4) || !digits(5..7) {
            return None;
        }
        let year: i16 = s[..4].parse().ok()?;
        let month: i8 = s[5..].parse().ok()?;
        Date::new(year, month, 1)
            .ok()
            .map(|first_day| Self { first_day })
    }

    pub fn of(t: Timestamp, tz: &TimeZone) -> Self {
        let d = t.to_zoned(tz.clone()).date();
        Self {
            first_day: d.first_of_month(),
        }
    }

    /// `[start, end)` of the month in the time zone.
    pub fn bounds(&self, tz: &TimeZone) -> Result<(Timestamp, Timestamp), jiff::Error> {
        let start = self.first_day.to_zoned(tz.clone())?.timestamp();
        let next = self.first_day.checked_add(1.month())?;
        let end = next.to_zoned(tz.clone())?.timestamp();
        Ok((start, end))
    }
}

impl std::fmt::Display for Month {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:04}-{:02}",
            self.first_day.year(),
            self.first_day.month()
        )
    }
}

/// Prepaid refunds end at 00:00 of the 8th day after the purchase date
/// (bought May 1: through May 8, not from May 9 00:00).
pub fn prepaid_refund_deadline(
    pkg: &ResourcePackage,
    tz: &TimeZone,
) -> Result<Timestamp, jiff::Error> {
    let bought = pkg.effective_at.to_zoned(tz.clone()).date();
    Ok(bought
        .checked_add(8.days())?
        .to_zoned(tz.clone())?
        .timestamp())
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackageRefundError {
    #[error("the free package is never refundable")]
    Free,
    #[error("the package has been used ({used} units) and can no longer be refunded")]
    Used { used: u64 },
    #[error("refunds end 7 days after the purchase date (at {deadline})")]
    TooLate { deadline: Timestamp },
    #[error("the package was already refunded")]
    AlreadyRefunded,
}

pub fn check_prepaid_refund(
    pkg: &ResourcePackage,
    now: Timestamp,
    tz: &TimeZone,
) -> Result<(), PackageRefundError> {
    if pkg.kind == PackageKind::Free {
        return Err(PackageRefundError::Free);
    }
    if pkg.refunded_at.is_some() {
        return Err(PackageRefundError::AlreadyRefunded);
    }
    if pkg.used + pkg.reserved > 0 {
        return Err(PackageRefundError::Used {
            used: pkg.used + pkg.reserved,
        });
    }
    let deadline = prepaid_refund_deadline(pkg, tz).unwrap_or(pkg.effective_at);
    if now >= deadline {
        return Err(PackageRefundError::TooLate { deadline });
    }
    Ok(())
}

/// A top-up amount: a positive USD amount with at most 2 decimals.
pub fn parse_amount(s: &str) -> Option<Decimal> {
    // Exactly `^[0-9]+(\.[0-9]{1,2})?$`: no spaces, sign, exponent, or a
    // dot without digits on both sides (" 5", "5.", ".5" are typos, and a
    // typo in an amount of money is refused, not guessed at).
    let (whole, cents) = match s.split_once('.') {
        Some((w, c)) => (w, Some(c)),
        None => (s, None),
    };
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || cents.is_some_and(|c| !digits(c) || c.len() > 2) {
        return None;
    }
    let d: Decimal = s.parse().ok()?;
    (d > Decimal::ZERO && d <= Decimal::from(1_000_000_000u64)).then_some(d)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
pub(crate) mod conformance;
