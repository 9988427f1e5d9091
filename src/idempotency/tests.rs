//! The key, fingerprint and retry rules, over a manual clock.

use std::time::Duration;

use jiff::Timestamp;

use super::*;
use crate::clock::{Clock, ManualClock};

fn key(s: &str) -> IdempotencyKey {
    IdempotencyKey::parse(s.as_bytes(), "Idempotency-Key").unwrap()
}

fn answer() -> StoredAnswer {
    StoredAnswer {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: b"{\"Response\":{}}".to_vec(),
    }
}

#[test]
fn keys_are_1_to_255_printable_ascii() {
    assert!(IdempotencyKey::parse(b"order-42 retry", "k").is_ok());
    assert!(IdempotencyKey::parse(&[b'a'; 255], "k").is_ok());
    for bad in [
        &b""[..],
        &[b'a'; 256][..],
        b"tab\there",
        b"nul\0",
        "caf\u{e9}".as_bytes(),
    ] {
        assert_eq!(IdempotencyKey::parse(bad, "k"), Err(BadKey("k")), "{bad:?}");
    }
}

#[test]
fn the_fingerprint_covers_method_path_query_and_body() {
    let base = Fingerprint::of("POST", "/v1/x", "a=1", b"{}");
    assert_eq!(base, Fingerprint::of("POST", "/v1/x", "a=1", b"{}"));
    for other in [
        Fingerprint::of("GET", "/v1/x", "a=1", b"{}"),
        Fingerprint::of("POST", "/v1/y", "a=1", b"{}"),
        Fingerprint::of("POST", "/v1/x", "a=2", b"{}"),
        Fingerprint::of("POST", "/v1/x", "a=1", b"{ }"),
        // Fields do not run into each other.
        Fingerprint::of("POST", "/v1/xa", "=1", b"{}"),
    ] {
        assert_ne!(base, other);
    }
}

#[test]
fn a_retry_replays_until_the_ttl_then_runs_again() {
    let clock = ManualClock::new("2026-12-01T00:00:00Z".parse().unwrap());
    let fp = Fingerprint::of("POST", "/v1/x", "", b"{}");
    let rec = IdempotencyRecord::new(
        "acme",
        &key("k1"),
        fp,
        Some(answer()),
        clock.now(),
        Duration::from_secs(24 * 3600),
    );
    assert_eq!(decide(None, &fp, clock.now()), Decision::Run);
    assert_eq!(
        decide(Some(&rec), &fp, clock.now()),
        Decision::Replay(&answer())
    );
    let other = Fingerprint::of("POST", "/v1/x", "", b"{\"a\":1}");
    assert_eq!(decide(Some(&rec), &other, clock.now()), Decision::Reused);
    clock.advance(jiff::SignedDuration::from_secs(24 * 3600 - 1));
    assert_eq!(
        decide(Some(&rec), &fp, clock.now()),
        Decision::Replay(&answer())
    );
    clock.advance(jiff::SignedDuration::from_secs(1));
    // Expired: forgotten, even for another request.
    assert_eq!(decide(Some(&rec), &fp, clock.now()), Decision::Run);
    assert_eq!(decide(Some(&rec), &other, clock.now()), Decision::Run);
}

#[test]
fn an_answer_over_the_bound_is_remembered_as_not_stored() {
    let now: Timestamp = "2026-12-01T00:00:00Z".parse().unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("image/png"));
    headers.insert("content-length", HeaderValue::from_static("4"));
    headers.insert("x-other", HeaderValue::from_static("v"));
    let body = Bytes::from_static(b"1234");
    assert!(StoredAnswer::of(StatusCode::OK, &headers, &body, 3).is_none());
    let stored = StoredAnswer::of(StatusCode::CREATED, &headers, &body, 4).unwrap();
    assert_eq!(stored.status, 201);
    assert_eq!(
        stored.headers,
        [("content-type".to_string(), "image/png".to_string())]
    );
    let fp = Fingerprint::of("POST", "/", "", b"");
    let rec = IdempotencyRecord::new("a", &key("k"), fp, None, now, Duration::from_secs(60));
    assert_eq!(decide(Some(&rec), &fp, now), Decision::NotStored);
}

#[test]
fn the_client_token_comes_from_a_json_body() {
    assert_eq!(
        client_token(b"{\"ClientToken\":\"t-1\",\"x\":1}").unwrap(),
        Some(key("t-1"))
    );
    assert_eq!(client_token(b"{\"x\":1}").unwrap(), None);
    assert_eq!(client_token(b"not json ClientToken").unwrap(), None);
    assert_eq!(client_token(b"{\"ClientToken\":null}").unwrap(), None);
    assert!(client_token(b"{\"ClientToken\":7}").is_err());
    assert!(client_token(b"{\"ClientToken\":\"\"}").is_err());
}

#[test]
fn a_local_marker_is_held_until_dropped() {
    let markers = LocalMarkers::default();
    let m = markers.take_now("acme", &key("k")).unwrap();
    assert_eq!(
        markers.take_now("acme", &key("k")).err(),
        Some(MarkerTaken::Held)
    );
    // Keys are scoped to the root account.
    let other = markers.take_now("other", &key("k")).unwrap();
    drop(m);
    assert!(markers.take_now("acme", &key("k")).is_ok());
    drop(other);
    assert_eq!(markers.held(), 0);
}
