//! The service's API 3.0 error shape, shared by the data plane and the admin
//! API:
//! `{"Response": {"Error": {"Code", "Message"}, "RequestId"}}`.

use bytes::Bytes;
use serde::Serialize;

#[derive(Serialize)]
struct Envelope<'a> {
    #[serde(rename = "Response")]
    response: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    #[serde(rename = "Error")]
    error: ErrorBody<'a>,
    #[serde(rename = "RequestId")]
    request_id: &'a str,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    #[serde(rename = "Code")]
    code: &'a str,
    #[serde(rename = "Message")]
    message: &'a str,
}

/// Serializes one error body. Never fails: the shape holds only strings.
///
/// ```
/// let body = tollgate::api_error::error_body("RequestLimitExceeded.JobNumExceed", "queue full", "r-1");
/// let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
/// assert_eq!(v["Response"]["Error"]["Code"], "RequestLimitExceeded.JobNumExceed");
/// assert_eq!(v["Response"]["RequestId"], "r-1");
/// ```
pub fn error_body(code: &str, message: &str, request_id: &str) -> Bytes {
    let envelope = Envelope {
        response: Inner {
            error: ErrorBody { code, message },
            request_id,
        },
    };
    Bytes::from(serde_json::to_vec(&envelope).unwrap_or_else(|_| b"{}".to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_matches_the_service() {
        let body = error_body("RequestLimitExceeded.JobNumExceed", "queue \"full\"", "r-1");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v["Response"]["Error"]["Code"],
            "RequestLimitExceeded.JobNumExceed"
        );
        assert_eq!(v["Response"]["Error"]["Message"], "queue \"full\"");
        assert_eq!(v["Response"]["RequestId"], "r-1");
    }
}
