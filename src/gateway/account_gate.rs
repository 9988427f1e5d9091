//! The account gate: may this account call at all, and who pays?
//!
//! Deactivated accounts are refused first, then suspended ones; then a unit
//! is reserved from the free or prepaid packages (or postpaid), before the
//! task queues, so concurrent tasks can never spend more than is left.

use crate::accounts::{AccountStatus, Principal};
use crate::app::App;
use crate::billing::{Refusal, Reservation};

use super::error::GatewayError;

pub async fn check(app: &App, principal: &Principal) -> Result<Reservation, GatewayError> {
    if principal.root.status() == AccountStatus::Deactivated {
        return Err(GatewayError::StopUsing);
    }
    app.quota
        .reserve(&principal.root.id, app.clock.now())
        .await
        .map_err(|r| match r {
            Refusal::InArrears => GatewayError::InArrears,
            Refusal::LowBalance => GatewayError::LowBalance,
            Refusal::Unavailable => GatewayError::CoordinationUnavailable,
        })
}
