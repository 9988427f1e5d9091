//! Concurrency packages: purchased extra concurrency, daily or monthly, and
//! the limit they give an account at any instant.
//!
//! Pure rules over values and times (no I/O): validity windows in the
//! billing time zone, the limit at a time, the next instant the limit
//! changes, prices and the refund cut-off. [`schedule`] applies them to the
//! limiter at the exact instants they change.

pub mod schedule;

use jiff::civil::{Date, Time};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan, Zoned};
use rust_decimal::Decimal;
use serde::Serialize;

/// Most units one package may carry; more is a typo, not a purchase.
pub const MAX_UNITS: u32 = 1_000;
pub const DAILY_UNIT_PRICE_USD: u32 = 200;
pub const MONTHLY_UNIT_PRICE_USD: u32 = 4_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Daily,
    Monthly,
}

impl Period {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "daily" => Some(Self::Daily),
            "monthly" => Some(Self::Monthly),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Daily => "daily",
            Self::Monthly => "monthly",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConcurrencyPackage {
    pub id: String,
    pub account: String,
    pub units: u32,
    pub period: Period,
    /// The first day, in the billing time zone.
    pub start: Date,
    /// Valid in `[starts_at, ends_at)`.
    pub starts_at: Timestamp,
    pub ends_at: Timestamp,
    pub price_usd: Decimal,
    pub bought_at: Timestamp,
}

impl ConcurrencyPackage {
    pub fn is_valid_at(&self, t: Timestamp) -> bool {
        self.starts_at <= t && t < self.ends_at
    }
}

/// Why a purchase request is refused; each names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PurchaseError {
    #[error("units: must be between 1 and {MAX_UNITS}")]
    Units,
    #[error("period: must be \"daily\" or \"monthly\"")]
    Period,
    #[error("start: must be a date YYYY-MM-DD")]
    StartFormat,
    #[error("start: must be today or later ({today} in the billing time zone)")]
    StartInPast { today: Date },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefundError {
    #[error("the package is already valid and can no longer be refunded")]
    AlreadyValid,
    #[error("refunds end at 22:00 of the day before the package starts ({deadline})")]
    PastDeadline { deadline: Zoned },
}

/// The validity window of a package starting on `start`.
///
/// Daily: 00:00 of `start` to 00:00 of the next day (23 or 25 hours across a
/// DST change). Monthly: 00:00 of `start` to 00:00 of the same day of the
/// next month; when that month has no such day (a start on the 29th to 31st),
/// to 00:00 of the 1st of the month after, so the buyer never loses days.
pub fn validity(
    start: Date,
    period: Period,
    tz: &TimeZone,
) -> Result<(Timestamp, Timestamp), jiff::Error> {
    let end_date = match period {
        Period::Daily => start.tomorrow()?,
        Period::Monthly => {
            let next = start.checked_add(1.month())?;
            if next.day() == start.day() {
                next
            } else {
                // Clamped (Jan 31 -> Feb 28): run to the 1st after instead.
                next.last_of_month().tomorrow()?
            }
        }
    };
    let begin = start.to_zoned(tz.clone())?.timestamp();
    let end = end_date.to_zoned(tz.clone())?.timestamp();
    Ok((begin, end))
}

pub fn price(units: u32, period: Period) -> Decimal {
    let unit = match period {
        Period::Daily => DAILY_UNIT_PRICE_USD,
        Period::Monthly => MONTHLY_UNIT_PRICE_USD,
    };
    Decimal::from(u64::from(units) * u64::from(unit))
}

/// Checks a purchase and builds the package (without an id or buyer time).
pub fn plan_purchase(
    units: i64,
    period: &str,
    start: &str,
    now: Timestamp,
    tz: &TimeZone,
) -> Result<(u32, Period, Date, Timestamp, Timestamp, Decimal), PurchaseError> {
    let units = u32::try_from(units)
        .ok()
        .filter(|u| (1..=MAX_UNITS).contains(u))
        .ok_or(PurchaseError::Units)?;
    let period = Period::parse(period).ok_or(PurchaseError::Period)?;
    let start: Date = parse_date(start).ok_or(PurchaseError::StartFormat)?;
    let today = now.to_zoned(tz.clone()).date();
    if start < today {
        return Err(PurchaseError::StartInPast { today });
    }
    let (starts_at, ends_at) =
        validity(start, period, tz).map_err(|_| PurchaseError::StartFormat)?;
    Ok((
        units,
        period,
        start,
        starts_at,
        ends_at,
        price(units, period),
    ))
}

/// Strictly `YYYY-MM-DD`.
fn parse_date(s: &str) -> Option<Date> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    s.parse().ok()
}

/// The refund cut-off: 22:00 of the day before the package starts.
pub fn refund_deadline(pkg: &ConcurrencyPackage, tz: &TimeZone) -> Result<Zoned, jiff::Error> {
    pkg.start
        .yesterday()?
        .to_datetime(Time::constant(22, 0, 0, 0))
        .to_zoned(tz.clone())
}

pub fn check_refund(
    pkg: &ConcurrencyPackage,
    now: Timestamp,
    tz: &TimeZone,
) -> Result<(), RefundError> {
    if now >= pkg.starts_at {
        return Err(RefundError::AlreadyValid);
    }
    let deadline = refund_deadline(pkg, tz).map_err(|_| RefundError::AlreadyValid)?;
    if now >= deadline.timestamp() {
        return Err(RefundError::PastDeadline { deadline });
    }
    Ok(())
}

/// `base + units of the packages valid at t`.
pub fn limit_at<'a>(
    base: u32,
    packages: impl IntoIterator<Item = &'a ConcurrencyPackage>,
    t: Timestamp,
) -> u32 {
    packages
        .into_iter()
        .filter(|p| p.is_valid_at(t))
        .fold(base, |acc, p| acc.saturating_add(p.units))
}

/// The next instant after `t` at which some package starts or ends.
pub fn next_change<'a>(
    packages: impl IntoIterator<Item = &'a ConcurrencyPackage>,
    t: Timestamp,
) -> Option<Timestamp> {
    packages
        .into_iter()
        .flat_map(|p| [p.starts_at, p.ends_at])
        .filter(|x| *x > t)
        .min()
}

#[cfg(test)]
mod tests;
