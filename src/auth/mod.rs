//! Authentication on the data plane: one authenticator per scheme, each
//! ending in the same [`Principal`] (and a token cancelled if its key is
//! revoked), so admission does not change per scheme.
//!
//! - [`api_key`]: `Authorization: Bearer <key>` or `X-Api-Key`, keys stored
//!   as SHA-256 hashes.
//! - [`tc3`]: TC3-HMAC-SHA256 signatures of the service's API 3.0, whose
//!   secrets are stored sealed ([`sealed`]).

pub mod api_key;
pub mod sealed;
pub mod tc3;

pub use crate::accounts::Principal;
