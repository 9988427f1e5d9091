//! TC3-HMAC-SHA256 (Cloud API 3.0) signatures, as the service and its
//! official SDKs compute them: pure functions over the request's parts, no
//! I/O, so the verifier is tested against fixed vectors and properties.
//!
//! Canonical request = method, path, query, the signed headers (names and
//! values lower-cased and trimmed, in `SignedHeaders` order), the
//! `SignedHeaders` list, and the hex SHA-256 of the body; string to sign =
//! algorithm, `X-TC-Timestamp`, credential scope, hex SHA-256 of the
//! canonical request; key chain `"TC3"+SecretKey` → date → service →
//! `tc3_request`.

use hmac::{Hmac, Mac};
use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const ALGORITHM: &str = "TC3-HMAC-SHA256";
/// Longest `Authorization` value looked at; longer is malformed.
const MAX_AUTHORIZATION_LEN: usize = 2048;

/// Why a TC3 request is refused, in the service's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tc3Error {
    /// Malformed header, date not matching the timestamp, `host` or
    /// `content-type` unsigned, an unsigned payload, a wrong service.
    InvalidAuthorization(String),
    SignatureFailure,
    SignatureExpire,
    SecretIdNotFound,
}

impl Tc3Error {
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidAuthorization(_) => "AuthFailure.InvalidAuthorization",
            Self::SignatureFailure => "AuthFailure.SignatureFailure",
            Self::SignatureExpire => "AuthFailure.SignatureExpire",
            Self::SecretIdNotFound => "AuthFailure.SecretIdNotFound",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Self::InvalidAuthorization(why) => {
                format!("the Authorization header is invalid: {why}")
            }
            Self::SignatureFailure => "the request signature does not match".into(),
            Self::SignatureExpire => {
                "the request timestamp is too far from the gateway's clock".into()
            }
            Self::SecretIdNotFound => "the SecretId is unknown or revoked".into(),
        }
    }
}

fn invalid(why: &str) -> Tc3Error {
    Tc3Error::InvalidAuthorization(why.to_string())
}

/// The parts of `Authorization: TC3-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tc3Authorization {
    pub secret_id: String,
    /// `YYYY-MM-DD` (UTC) from the credential scope.
    pub date: String,
    pub service: String,
    /// Lower-case header names, as listed.
    pub signed_headers: Vec<String>,
    pub signature: [u8; 32],
}

/// Whether an `Authorization` value uses this scheme (the SDKs send it
/// exactly so; any other value goes to the Bearer front).
pub fn is_tc3(value: &[u8]) -> bool {
    value.starts_with(ALGORITHM.as_bytes())
}

/// Parses the header value. Never panics, whatever the bytes.
pub fn parse_authorization(value: &str) -> Result<Tc3Authorization, Tc3Error> {
    if value.len() > MAX_AUTHORIZATION_LEN {
        return Err(invalid("too long"));
    }
    let rest = value
        .strip_prefix(ALGORITHM)
        .ok_or_else(|| invalid("the algorithm must be TC3-HMAC-SHA256"))?;
    if !rest.starts_with(' ') {
        return Err(invalid("the algorithm must be followed by a space"));
    }
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (name, v) = part
            .trim()
            .split_once('=')
            .ok_or_else(|| invalid("expected Name=value pairs"))?;
        let slot = match name {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed,
            "Signature" => &mut signature,
            _ => return Err(invalid("unknown field")),
        };
        if slot.replace(v).is_some() {
            return Err(invalid("a field is repeated"));
        }
    }
    let credential = credential.ok_or_else(|| invalid("Credential is missing"))?;
    let signed = signed.ok_or_else(|| invalid("SignedHeaders is missing"))?;
    let signature = signature.ok_or_else(|| invalid("Signature is missing"))?;

    let mut scope = credential.split('/');
    let (Some(secret_id), Some(date), Some(service), Some("tc3_request"), None) = (
        scope.next(),
        scope.next(),
        scope.next(),
        scope.next(),
        scope.next(),
    ) else {
        return Err(invalid(
            "Credential must be SecretId/YYYY-MM-DD/service/tc3_request",
        ));
    };
    if secret_id.is_empty() || service.is_empty() {
        return Err(invalid("Credential has an empty part"));
    }
    if !is_date(date) {
        return Err(invalid("the credential date must be YYYY-MM-DD"));
    }
    let signed_headers: Vec<String> = signed.split(';').map(str::to_string).collect();
    if signed_headers.iter().any(|h| {
        h.is_empty()
            || h.bytes()
                .any(|b| !(b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
    }) {
        return Err(invalid(
            "SignedHeaders must list lower-case header names separated by ';'",
        ));
    }
    for required in ["content-type", "host"] {
        if !signed_headers.iter().any(|h| h == required) {
            return Err(invalid("content-type and host must be signed"));
        }
    }
    let mut sig = [0u8; 32];
    if signature.len() != 64 || hex::decode_to_slice(signature, &mut sig).is_err() {
        return Err(invalid("Signature must be 64 hex digits"));
    }
    Ok(Tc3Authorization {
        secret_id: secret_id.to_string(),
        date: date.to_string(),
        service: service.to_string(),
        signed_headers,
        signature: sig,
    })
}

fn is_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

/// The request as signed.
pub struct SignedRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a str,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
    /// `X-TC-Timestamp` as sent.
    pub timestamp: &'a str,
}

/// The canonical request; `None` when a signed header is absent or not text.
pub fn canonical_request(req: &SignedRequest<'_>, signed_headers: &[String]) -> Option<String> {
    let mut out = String::with_capacity(256);
    out.push_str(req.method);
    out.push('\n');
    out.push_str(req.path);
    out.push('\n');
    out.push_str(req.query);
    out.push('\n');
    for name in signed_headers {
        let value = req.headers.get(name.as_str())?.to_str().ok()?;
        out.push_str(name);
        out.push(':');
        out.push_str(&value.trim().to_ascii_lowercase());
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&signed_headers.join(";"));
    out.push('\n');
    out.push_str(&hex::encode(Sha256::digest(req.body)));
    Some(out)
}

pub fn string_to_sign(timestamp: &str, date: &str, service: &str, canonical: &str) -> String {
    format!(
        "{ALGORITHM}\n{timestamp}\n{date}/{service}/tc3_request\n{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    )
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

pub fn signature(secret_key: &str, date: &str, service: &str, to_sign: &str) -> [u8; 32] {
    let k_date = hmac(format!("TC3{secret_key}").as_bytes(), date.as_bytes());
    let k_service = hmac(&k_date, service.as_bytes());
    let k_signing = hmac(&k_service, b"tc3_request");
    hmac(&k_signing, to_sign.as_bytes())
}

/// The UTC date (`YYYY-MM-DD`) of a Unix timestamp in seconds.
pub fn utc_date(unix_seconds: i64) -> Option<String> {
    let t = jiff::Timestamp::from_second(unix_seconds).ok()?;
    Some(t.strftime("%Y-%m-%d").to_string())
}

/// What the verifier checks the request against.
pub struct Expect<'a> {
    pub service: &'a str,
    pub now_unix_ms: i64,
    pub max_skew_ms: u64,
}

/// Checks everything but the secret: the service, the timestamp against the
/// clock and against the credential's date, no unsigned payload.
pub fn check_context(
    auth: &Tc3Authorization,
    headers: &HeaderMap,
    expect: &Expect<'_>,
) -> Result<(), Tc3Error> {
    if auth.service != expect.service {
        return Err(invalid("the credential names another service"));
    }
    if headers
        .get("x-tc-content-sha256")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"UNSIGNED-PAYLOAD"))
    {
        return Err(invalid("unsigned payloads are not accepted"));
    }
    let ts: i64 = headers
        .get("x-tc-timestamp")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| invalid("X-TC-Timestamp must be a Unix time in seconds"))?;
    if utc_date(ts).as_deref() != Some(auth.date.as_str()) {
        return Err(invalid("the credential date does not match X-TC-Timestamp"));
    }
    let skew = (ts.saturating_mul(1000)).abs_diff(expect.now_unix_ms);
    if skew > expect.max_skew_ms {
        return Err(Tc3Error::SignatureExpire);
    }
    Ok(())
}

/// Verifies the signature with the key's secret, in constant time.
pub fn verify(
    auth: &Tc3Authorization,
    req: &SignedRequest<'_>,
    secret_key: &str,
) -> Result<(), Tc3Error> {
    let canonical = canonical_request(req, &auth.signed_headers)
        .ok_or_else(|| invalid("a signed header is missing or not text"))?;
    let to_sign = string_to_sign(req.timestamp, &auth.date, &auth.service, &canonical);
    let expected = signature(secret_key, &auth.date, &auth.service, &to_sign);
    if bool::from(expected.ct_eq(&auth.signature)) {
        Ok(())
    } else {
        Err(Tc3Error::SignatureFailure)
    }
}

/// Signs a request as the SDKs do (`content-type;host` signed): the value
/// of its `Authorization` header. For tests and examples.
pub fn sign(
    secret_id: &str,
    secret_key: &str,
    service: &str,
    req: &SignedRequest<'_>,
) -> Option<String> {
    let ts: i64 = req.timestamp.parse().ok()?;
    let date = utc_date(ts)?;
    let signed = vec!["content-type".to_string(), "host".to_string()];
    let canonical = canonical_request(req, &signed)?;
    let to_sign = string_to_sign(req.timestamp, &date, service, &canonical);
    let sig = signature(secret_key, &date, service, &to_sign);
    Some(format!(
        "{ALGORITHM} Credential={secret_id}/{date}/{service}/tc3_request, SignedHeaders=content-type;host, Signature={}",
        hex::encode(sig)
    ))
}

#[cfg(test)]
mod tests;
