//! The account gate: may this account call at all, and who pays?
//!
//! Deactivated accounts are refused first, then suspended ones; then a unit
//! is reserved from the free or prepaid packages (or postpaid), before the
//! task queues, so concurrent tasks can never spend more than is left.

use super::Gateway;
use crate::accounts::{AccountStatus, Principal};
use crate::billing::{Refusal, Reserve};

use super::error::GatewayError;

/// Refuses a deactivated account at once, else starts reserving a unit:
/// decided at once by the in-process quota, a round trip to Redis with the
/// shared one (the caller overlaps it with the slot request).
pub fn check(gw: &Gateway, principal: &Principal) -> Result<Reserve, GatewayError> {
    if principal.root.status() == AccountStatus::Deactivated {
        return Err(GatewayError::StopUsing);
    }
    Ok(gw.quota.reserve(&principal.root.id, gw.clock.now()))
}

pub fn refusal(r: Refusal) -> GatewayError {
    match r {
        Refusal::InArrears => GatewayError::InArrears,
        Refusal::LowBalance => GatewayError::LowBalance,
        Refusal::Unavailable => GatewayError::CoordinationUnavailable,
    }
}
