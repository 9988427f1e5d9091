//! The API key scheme: `Authorization: Bearer <key>` (scheme in any case)
//! or `X-Api-Key: <key>`.

use http::HeaderMap;
use http::header::{AUTHORIZATION, HeaderName};
use tokio_util::sync::CancellationToken;

use crate::accounts::{Principal, Registry, bearer_token};

pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// The key's principal and a token cancelled if the key is revoked while
/// the task waits; `None` for a missing, unknown or revoked key.
pub fn authenticate(
    registry: &Registry,
    headers: &HeaderMap,
) -> Option<(Principal, CancellationToken)> {
    let presented = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .or_else(|| headers.get(X_API_KEY).and_then(|v| v.to_str().ok()))
        .map(str::trim)?;
    registry.authenticate_watched(presented)
}
