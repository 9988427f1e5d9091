//! The account gate: may this account call at all, and who pays?
//!
//! Deactivated accounts are refused first, then suspended ones; then a unit
//! is reserved from the free or prepaid packages (or postpaid), before the
//! task queues, so concurrent tasks can never spend more than is left.

use super::Gateway;
use crate::accounts::{AccountStatus, Principal};
use crate::billing::{Refusal, Reservation};

use super::error::GatewayError;

pub async fn check(gw: &Gateway, principal: &Principal) -> Result<Reservation, GatewayError> {
    if principal.root.status() == AccountStatus::Deactivated {
        return Err(GatewayError::StopUsing);
    }
    gw.quota
        .reserve(&principal.root.id, gw.clock.now())
        .await
        .map_err(|r| match r {
            Refusal::InArrears => GatewayError::InArrears,
            Refusal::LowBalance => GatewayError::LowBalance,
            Refusal::Unavailable => GatewayError::CoordinationUnavailable,
        })
}
