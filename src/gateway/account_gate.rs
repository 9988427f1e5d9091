//! The account gate: may this account call at all?
//!
//! This is where the billing rules plug in (quota reservation before
//! queueing); today it checks the account's status.

use crate::accounts::{AccountStatus, Principal};

use super::error::GatewayError;

pub fn check(principal: &Principal) -> Result<(), GatewayError> {
    match principal.root.status() {
        AccountStatus::Active => Ok(()),
        AccountStatus::Deactivated => Err(GatewayError::StopUsing),
        AccountStatus::Suspended => Err(GatewayError::InArrears),
    }
}
