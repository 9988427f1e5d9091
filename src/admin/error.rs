//! Admin API errors in the service's error shape, with fitting statuses.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use crate::accounts::ChangeError;
use crate::api_error::error_body;
use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "InvalidParameterValue", message)
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            format!("{} does not exist", what.into()),
        )
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "AuthFailure.InvalidAuthorization",
            "missing or wrong admin token",
        )
    }
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> Self {
        match e {
            ChangeError::NotFound(what) => Self::not_found(what),
            ChangeError::Conflict { code, message } => Self::conflict(code, message),
            ChangeError::Invalid(message) => Self::bad_request(message),
            ChangeError::Store(e) => e.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(what) => {
                Self::conflict("ResourceInUse", format!("{what} already exists"))
            }
            StoreError::NotFound(what) => Self::not_found(what),
            StoreError::Closed => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "FailedOperation.ServiceShuttingDown",
                "the gateway is shutting down",
            ),
            StoreError::Unavailable { reason, .. } => {
                tracing::warn!(error = %reason, "admin call failed: the store is unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "FailedOperation.StoreUnavailable",
                    "the store is unavailable; nothing was changed",
                )
            }
            StoreError::Internal(detail) => {
                // The detail is for the operator's log, not the caller.
                tracing::error!(error = %detail, "admin call failed in the store");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "FailedOperation.StoreUnavailable",
                    "the change could not be stored; nothing was changed",
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let request_id = uuid::Uuid::now_v7().to_string();
        let mut resp = (
            self.status,
            error_body(self.code, &self.message, &request_id),
        )
            .into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp
    }
}

/// Parses a JSON body into `T`, with an error that names what is wrong.
/// The body must be a JSON object: serde would otherwise read a struct from
/// an array of its fields in order (`["acme"]` creating account `acme`).
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// The error code for a status an admin answer got without an error body
/// of ours (axum's own 405, a body-limit 413, …).
pub fn code_for_status(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED => "AuthFailure.InvalidAuthorization",
        StatusCode::NOT_FOUND => "UnsupportedOperation",
        StatusCode::METHOD_NOT_ALLOWED => "UnsupportedOperation.MethodNotAllowed",
        StatusCode::PAYLOAD_TOO_LARGE => "FailedOperation.RequestEntityTooLarge",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "InvalidParameter.UnsupportedMediaType",
        s if s.is_client_error() => "InvalidParameterValue",
        StatusCode::SERVICE_UNAVAILABLE => "FailedOperation.ServiceUnavailable",
        _ => "InternalError",
    }
}

/// Largest page of a paged list (`GET /v1/accounts`, `GET /v1/usage-events`).
pub const MAX_PAGE: usize = 1000;
/// A page without `limit`.
pub const DEFAULT_PAGE: usize = 100;

/// The query of a paged list: no parameter but `after` and `limit`, and
/// `limit` (if given) in 1 ..= [`MAX_PAGE`]. Returns the page size.
pub fn page_limit(q: &std::collections::HashMap<String, String>) -> Result<usize, ApiError> {
    if let Some(unknown) = q.keys().find(|k| *k != "after" && *k != "limit") {
        return Err(ApiError::bad_request(format!(
            "unknown query parameter `{unknown}`"
        )));
    }
    match q.get("limit") {
        None => Ok(DEFAULT_PAGE),
        Some(l) => l
            .parse()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!("limit: must be between 1 and {MAX_PAGE}"))
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct NewAccount {
        id: String,
    }

    #[test]
    fn only_json_objects_are_bodies() {
        assert!(parse_json::<NewAccount>(br#"{"id":"acme"}"#).is_ok());
        for bad in [&br#"["acme"]"#[..], b"\"acme\"", b"null", b"", b"{"] {
            let e = parse_json::<NewAccount>(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad:?}");
        }
    }
}
