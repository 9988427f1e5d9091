use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;

use super::*;

const SECRET_ID: &str = "AKIDz8krbsJ5yKBZQpn74WFkmLPx3EXAMPLE";
const SECRET_KEY: &str = "Gu5t9xGARNpq86cd98joQYCN3EXAMPLE";
const BODY: &str = r#"{"InputUrl": "https://example.com/a.png", "Style": "201"}"#;
/// What the official Python SDK (tencentcloud-sdk-python-common 3.1.195)
/// sent for `ImageToImage` with the parameters above at Unix time
/// 1551113065 (the timestamp of the service's own documented example, whose
/// published secret is masked, so the SDK's output stands in for it).
const SDK_AUTHORIZATION: &str = "TC3-HMAC-SHA256 Credential=AKIDz8krbsJ5yKBZQpn74WFkmLPx3EXAMPLE/2019-02-25/aiart/tc3_request, SignedHeaders=content-type;host, Signature=2e62db3a9f15fe19abf6683adf0a3337fd109ed9aa6c62753a524db8716fe01a";

fn sdk_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("content-type", "application/json"),
        ("host", "127.0.0.1:8080"),
        ("x-tc-action", "ImageToImage"),
        ("x-tc-timestamp", "1551113065"),
        ("x-tc-version", "2022-12-29"),
        ("x-tc-region", "ap-guangzhou"),
        ("authorization", SDK_AUTHORIZATION),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    h
}

fn request<'a>(headers: &'a HeaderMap, body: &'a [u8]) -> SignedRequest<'a> {
    SignedRequest {
        method: "POST",
        path: "/",
        query: "",
        headers,
        body,
        timestamp: "1551113065",
    }
}

const NOW_MS: i64 = 1_551_113_065_000;

fn expect() -> Expect<'static> {
    Expect {
        service: "aiart",
        now_unix_ms: NOW_MS,
        max_skew_ms: 300_000,
    }
}

#[test]
fn the_official_sdks_signature_verifies() {
    let headers = sdk_headers();
    let auth = parse_authorization(SDK_AUTHORIZATION).unwrap();
    assert_eq!(auth.secret_id, SECRET_ID);
    assert_eq!(auth.date, "2019-02-25");
    assert_eq!(auth.service, "aiart");
    check_context(&auth, &headers, &expect()).unwrap();
    verify(&auth, &request(&headers, BODY.as_bytes()), SECRET_KEY).unwrap();
    // And our signer produces the SDK's header byte for byte.
    assert_eq!(
        sign(
            SECRET_ID,
            SECRET_KEY,
            "aiart",
            &request(&headers, BODY.as_bytes())
        )
        .unwrap(),
        SDK_AUTHORIZATION
    );
}

#[test]
fn a_wrong_secret_or_a_tampered_body_fails() {
    let headers = sdk_headers();
    let auth = parse_authorization(SDK_AUTHORIZATION).unwrap();
    assert_eq!(
        verify(&auth, &request(&headers, BODY.as_bytes()), "another-secret"),
        Err(Tc3Error::SignatureFailure)
    );
    let tampered = BODY.replace("201", "202");
    assert_eq!(
        verify(&auth, &request(&headers, tampered.as_bytes()), SECRET_KEY),
        Err(Tc3Error::SignatureFailure)
    );
}

#[test]
fn the_timestamp_must_be_recent_and_match_the_date() {
    let headers = sdk_headers();
    let auth = parse_authorization(SDK_AUTHORIZATION).unwrap();
    let late = Expect {
        now_unix_ms: NOW_MS + 300_001,
        ..expect()
    };
    assert_eq!(
        check_context(&auth, &headers, &late),
        Err(Tc3Error::SignatureExpire)
    );
    let early = Expect {
        now_unix_ms: NOW_MS - 300_001,
        ..expect()
    };
    assert_eq!(
        check_context(&auth, &headers, &early),
        Err(Tc3Error::SignatureExpire)
    );
    let mut other_day = headers.clone();
    other_day.insert("x-tc-timestamp", HeaderValue::from_static("1551200000"));
    let far = Expect {
        now_unix_ms: 1_551_200_000_000,
        ..expect()
    };
    assert!(matches!(
        check_context(&auth, &other_day, &far),
        Err(Tc3Error::InvalidAuthorization(_))
    ));
    let mut unsigned = headers.clone();
    unsigned.insert(
        "x-tc-content-sha256",
        HeaderValue::from_static("UNSIGNED-PAYLOAD"),
    );
    assert!(matches!(
        check_context(&auth, &unsigned, &expect()),
        Err(Tc3Error::InvalidAuthorization(_))
    ));
    let other_service = Expect {
        service: "cvm",
        ..expect()
    };
    assert!(matches!(
        check_context(&auth, &headers, &other_service),
        Err(Tc3Error::InvalidAuthorization(_))
    ));
}

#[test]
fn malformed_headers_are_invalid_authorization() {
    for bad in [
        "",
        "TC3-HMAC-SHA256",
        "TC3-HMAC-SHA256 Credential=a/2019-02-25/aiart/tc3_request",
        "TC3-HMAC-SHA256 Credential=a/2019-02-25/aiart/tc3_request, SignedHeaders=host, Signature=00",
        "TC3-HMAC-SHA256 Credential=a/2019-02-25/aiart/tc3_request, SignedHeaders=content-type;host, Signature=zz",
        "TC3-HMAC-SHA256 Credential=a/2019-2-25/aiart/tc3_request, SignedHeaders=content-type;host, Signature=2e62db3a9f15fe19abf6683adf0a3337fd109ed9aa6c62753a524db8716fe01a",
        "TC3-HMAC-SHA256 Credential=a/2019-02-25/aiart/x, SignedHeaders=content-type;host, Signature=2e62db3a9f15fe19abf6683adf0a3337fd109ed9aa6c62753a524db8716fe01a",
        "TC3-HMAC-SHA256 Credential=a/2019-02-25/aiart/tc3_request, Credential=b/2019-02-25/aiart/tc3_request, SignedHeaders=content-type;host, Signature=2e62db3a9f15fe19abf6683adf0a3337fd109ed9aa6c62753a524db8716fe01a",
        "TC3-HMAC-SHA256 Credential=a/2019-02-25/aiart/tc3_request, SignedHeaders=Content-Type;host, Signature=2e62db3a9f15fe19abf6683adf0a3337fd109ed9aa6c62753a524db8716fe01a",
    ] {
        assert!(
            matches!(
                parse_authorization(bad),
                Err(Tc3Error::InvalidAuthorization(_))
            ),
            "{bad:?}"
        );
    }
}

proptest! {
    /// Any change to the method, path, query, a signed header, the body or
    /// the timestamp breaks the signature.
    #[test]
    fn any_change_breaks_the_signature(
        which in 0usize..6,
        noise in "[a-z0-9]{1,8}",
        body in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut headers = sdk_headers();
        let base = request(&headers, &body);
        let header = sign(SECRET_ID, SECRET_KEY, "aiart", &base).unwrap();
        let auth = parse_authorization(&header).unwrap();
        prop_assert!(verify(&auth, &base, SECRET_KEY).is_ok());
        let mut changed_body = body.clone();
        let (method, path, query, ts) = ("POST".to_string(), "/".to_string(), String::new(), "1551113065".to_string());
        let (mut method, mut path, mut query, mut ts) = (method, path, query, ts);
        match which {
            0 => method = "GET".into(),
            1 => path = format!("/{noise}"),
            2 => query = format!("a={noise}"),
            3 => { headers.insert("host", HeaderValue::from_str(&format!("{noise}.example")).unwrap()); }
            4 => changed_body.extend_from_slice(noise.as_bytes()),
            _ => ts = "1551113066".into(),
        }
        let changed = SignedRequest { method: &method, path: &path, query: &query, headers: &headers, body: &changed_body, timestamp: &ts };
        prop_assert_eq!(verify(&auth, &changed, SECRET_KEY), Err(Tc3Error::SignatureFailure));
    }

    /// The parser never panics, whatever it is given.
    #[test]
    fn the_parser_never_panics(s in ".{0,300}", tail in "[ -~]{0,200}") {
        let _ = parse_authorization(&s);
        let _ = parse_authorization(&format!("TC3-HMAC-SHA256 {tail}"));
        let _ = parse_authorization(&format!("TC3-HMAC-SHA256 Credential={tail}, SignedHeaders=content-type;host, Signature={tail}"));
    }
}
