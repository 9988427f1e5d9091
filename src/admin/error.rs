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
    let value = serde_json::from_slice::<NoDuplicateKeys>(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?
        .0;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// A JSON value read with every object's keys checked for repeats, at any
/// depth: serde_json keeps the last of `{"id":"a","id":"b"}` silently,
/// and a body that says two things is refused rather than guessed at.
struct NoDuplicateKeys(serde_json::Value);

impl<'de> serde::Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NoDuplicateKeysVisitor)
            .map(NoDuplicateKeys)
    }
}

struct NoDuplicateKeysVisitor;

impl<'de> serde::de::Visitor<'de> for NoDuplicateKeysVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        // JSON has no NaN or infinity, so this is always a number.
        Ok(serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(NoDuplicateKeys(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(items.into())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format_args!(
                    "duplicate key `{key}`"
                )));
            }
            let NoDuplicateKeys(v) = map.next_value()?;
            object.insert(key, v);
        }
        Ok(object.into())
    }
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

/// A paged list's query, as given.
pub struct PageQuery<'a> {
    /// `after`, if given (possibly empty).
    pub after: Option<&'a str>,
    /// `limit`, or [`DEFAULT_PAGE`].
    pub limit: usize,
}

/// The values of a query's parameters, in the order of `names`: no other
/// parameter, and each at most once (`?limit=1&limit=2` says two things
/// and is refused, not read as one of them).
pub fn query_params<'a, const N: usize>(
    q: &'a [(String, String)],
    names: [&str; N],
) -> Result<[Option<&'a str>; N], ApiError> {
    let mut values = [None; N];
    for (name, value) in q {
        let Some(i) = names.iter().position(|n| n == name) else {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter `{name}`"
            )));
        };
        if values[i].replace(value.as_str()).is_some() {
            return Err(ApiError::bad_request(format!(
                "query parameter `{name}` is given more than once"
            )));
        }
    }
    Ok(values)
}

/// The query of a paged list: `after` and `limit` only (see
/// [`query_params`]), and `limit` (if given) in 1 ..= [`MAX_PAGE`].
pub fn page_query(q: &[(String, String)]) -> Result<PageQuery<'_>, ApiError> {
    let [after, limit] = query_params(q, ["after", "limit"])?;
    let limit = match limit {
        None => DEFAULT_PAGE,
        Some(l) => l
            .parse()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!("limit: must be between 1 and {MAX_PAGE}"))
            })?,
    };
    Ok(PageQuery { after, limit })
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

    #[test]
    fn a_repeated_key_is_refused_at_any_depth_naming_it() {
        for (bad, key) in [
            (&br#"{"id":"a","id":"b"}"#[..], "id"),
            (br#"{"id":"a","x":{"k":1,"k":2}}"#, "k"),
            (br#"{"id":"a","x":[{"n":{"deep":1,"deep":1}}]}"#, "deep"),
        ] {
            let e = parse_json::<serde_json::Value>(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(
                e.message.contains(&format!("duplicate key `{key}`")),
                "{}",
                e.message
            );
        }
        // The same key in two objects is no repeat; values are kept as sent.
        let v: serde_json::Value =
            parse_json(br#"{"a":{"k":1},"b":{"k":-2.5},"c":[null,true,"s",18446744073709551615]}"#)
                .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"a":{"k":1},"b":{"k":-2.5},"c":[null,true,"s",18446744073709551615u64]})
        );
    }
}
