//! The API 3.0 front (SPEC §9) driven by the service's official Python SDK
//! (`tencentcloud-sdk-python-common`, `CommonClient.call_json`), unchanged,
//! against the real binary: success and its usage event, every error code
//! raised as the SDK's exception, the limit and the queue under parallel
//! SDK calls, revocation, a tampered body that never reaches the backend,
//! Bearer clients unaffected, and secrets that never show.
//!
//! The SDK is imported from the Python path if there (CI installs it), or
//! installed once under the target directory from PyPI.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use common::{Gateway, Opts, Simulator, Stack};
use http::{Method, StatusCode};
use serde_json::{Value, json};
use tollgate::auth::tc3::{SignedRequest, sign};

const ENCRYPTION_KEY: &str = "6f0c1d2e3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e4f";

/// The `PYTHONPATH` under which the SDK imports (`None`: already does).
fn sdk_path() -> &'static Option<PathBuf> {
    static PATH: OnceLock<Option<PathBuf>> = OnceLock::new();
    PATH.get_or_init(|| {
        let imports = |path: Option<&PathBuf>| {
            let mut c = Command::new("python3");
            c.args(["-c", "import tencentcloud.common.common_client"]);
            if let Some(p) = path {
                c.env("PYTHONPATH", p);
            }
            c.output().is_ok_and(|o| o.status.success())
        };
        if imports(None) {
            return None;
        }
        let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("python-sdk");
        if !imports(Some(&target)) {
            let out = Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--target"])
                .arg(&target)
                .arg("tencentcloud-sdk-python-common")
                .output()
                .expect("python3 runs");
            assert!(
                out.status.success(),
                "installing the SDK from PyPI failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Some(target)
    })
}

/// Runs one SDK job (see tests/sdk/call.py); one result per call.
async fn sdk(job: Value) -> Vec<Value> {
    tokio::task::spawn_blocking(move || {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/call.py");
        let mut c = Command::new("python3");
        c.arg(script).arg(job.to_string());
        if let Some(p) = sdk_path() {
            c.env("PYTHONPATH", p);
        }
        let out = c.output().expect("python3 runs");
        assert!(
            out.status.success(),
            "the SDK script failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    })
    .await
    .unwrap()
}

struct Pair {
    key_id: String,
    secret_id: String,
    secret_key: String,
}

async fn tc3_pair(stack: &Stack, account: &str, sub: Option<&str>) -> Pair {
    let mut body = json!({"type": "tc3"});
    if let Some(s) = sub {
        body["sub_account"] = json!(s);
    }
    let r = stack
        .admin()
        .call(
            Method::POST,
            &format!("/v1/accounts/{account}/keys"),
            Some(body),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
    let v = r.json();
    assert_eq!(v["type"], "tc3");
    Pair {
        key_id: v["key_id"].as_str().unwrap().into(),
        secret_id: v["secret_id"].as_str().unwrap().into(),
        secret_key: v["secret_key"].as_str().unwrap().into(),
    }
}

fn endpoint(stack: &Stack) -> String {
    stack.gw.url.trim_start_matches("http://").to_string()
}

fn job(stack: &Stack, pair: &Pair) -> Value {
    json!({
        "endpoint": endpoint(stack),
        "secret_id": pair.secret_id,
        "secret_key": pair.secret_key,
        "action": "ImageToImage",
        "params": {"InputUrl": "https://example.com/cat.png", "Styles": ["201"]},
    })
}

fn with(mut base: Value, changes: Value) -> Value {
    for (k, v) in changes.as_object().unwrap() {
        base[k] = v.clone();
    }
    base
}

fn start() -> Stack {
    Stack::start(Opts {
        env: vec![(
            "TOLLGATE_AUTH_SECRET_ENCRYPTION_KEY",
            ENCRYPTION_KEY.to_string(),
        )],
        ..Opts::default()
    })
}

#[tokio::test]
async fn the_official_sdk_succeeds_and_its_task_is_recorded_once() {
    let stack = start();
    stack.admin().create_account("acme").await;
    let pair = tc3_pair(&stack, "acme", None).await;

    let out = sdk(with(
        job(&stack, &pair),
        json!({"headers": {"X-Sim-Echo": "1"}}),
    ))
    .await;
    let response = &out[0]["response"]["Response"];
    assert!(response.is_object(), "{out:?}");
    // What the backend got: the X-TC-* headers, never the Authorization.
    let echoed = response["Echo"]["Headers"].to_string().to_lowercase();
    assert!(echoed.contains("x-tc-action"), "{echoed}");
    assert!(echoed.contains("x-tollgate-account"), "{echoed}");
    assert!(!echoed.contains("tc3-hmac-sha256"), "{echoed}");
    assert!(!echoed.contains(&pair.secret_id.to_lowercase()), "{echoed}");

    let events = stack.admin().all_events().await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["data"]["api"], "ImageToImage");
    assert_eq!(events[0]["data"]["account"], "acme");

    // The secret key never shows again: not in the logs, the metrics, the
    // account view, or any file of the data directory.
    let metrics = stack
        .http
        .send(Method::GET, &format!("{}/metrics", stack.gw.admin), &[], "")
        .await;
    let account = stack.admin().account("acme").await.to_string();
    for (what, text) in [
        ("logs", stack.gw.proc.logs()),
        (
            "metrics",
            String::from_utf8_lossy(&metrics.body).to_string(),
        ),
        ("account", account),
    ] {
        assert!(!text.contains(&pair.secret_key), "secret in {what}");
    }
    for entry in walk(&stack.gw.data_dir) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(&pair.secret_key),
            "secret in {}",
            entry.display()
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn code(result: &Value) -> &str {
    result["code"].as_str().unwrap_or("<no error>")
}

#[tokio::test]
async fn every_refusal_is_raised_by_the_sdk_with_the_services_code() {
    let stack = Stack::start(Opts {
        env: vec![(
            "TOLLGATE_AUTH_SECRET_ENCRYPTION_KEY",
            ENCRYPTION_KEY.to_string(),
        )],
        extra_toml: "[limits]\nmax_queue_per_account = 1\n".into(),
    });
    let admin = stack.admin();
    admin.create_account("acme").await;
    let pair = tc3_pair(&stack, "acme", None).await;
    let base = job(&stack, &pair);

    let cases = [
        (
            json!({"secret_key": "wrong-secret"}),
            "AuthFailure.SignatureFailure",
        ),
        (
            json!({"clock_offset_s": -900}),
            "AuthFailure.SignatureExpire",
        ),
        (
            json!({"clock_offset_s": 900}),
            "AuthFailure.SignatureExpire",
        ),
        (
            json!({"secret_id": "AKIDunknown0000000000000000000000000"}),
            "AuthFailure.SecretIdNotFound",
        ),
        (json!({"action": "TextToImage"}), "InvalidAction"),
        (json!({"version": "2020-01-01"}), "InvalidParameterValue"),
        (
            json!({"service": "cvm"}),
            "AuthFailure.InvalidAuthorization",
        ),
    ];
    for (change, want) in cases {
        let out = sdk(with(base.clone(), change.clone())).await;
        assert_eq!(code(&out[0]), want, "{change}: {out:?}");
        assert!(out[0]["request_id"].as_str().is_some_and(|r| !r.is_empty()));
    }

    // The queue: 3 run, 1 waits, the rest are refused with JobNumExceed.
    let out = sdk(with(
        base.clone(),
        json!({"parallel": 6, "headers": {"X-Sim-Delay-Ms": "1500"}}),
    ))
    .await;
    let refused = out
        .iter()
        .filter(|r| code(r) == "RequestLimitExceeded.JobNumExceed")
        .count();
    let ok = out.iter().filter(|r| r["response"].is_object()).count();
    assert_eq!((ok, refused), (4, 2), "{out:?}");

    // Deactivated: StopUsing.
    let r = admin
        .call(Method::POST, "/v1/accounts/acme/deactivate", None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());
    let out = sdk(base.clone()).await;
    assert_eq!(code(&out[0]), "ResourceUnavailable.StopUsing", "{out:?}");

    // Free units used up with postpaid off: LowBalance.
    admin.create_plain_account("thrifty").await;
    let thrifty = tc3_pair(&stack, "thrifty", None).await;
    let tjob = job(&stack, &thrifty);
    let mut used = 0;
    for _ in 0..20 {
        let out = sdk(with(tjob.clone(), json!({"parallel": 4}))).await;
        used += out.iter().filter(|r| r["response"].is_object()).count();
        if used >= 50 {
            break;
        }
    }
    assert_eq!(used, 50, "the free package pays for exactly 50");
    let out = sdk(tjob.clone()).await;
    assert_eq!(code(&out[0]), "ResourceUnavailable.LowBalance", "{out:?}");

    // A revoked key is unknown from then on.
    let r = admin
        .call(
            Method::DELETE,
            &format!("/v1/keys/{}", thrifty.key_id),
            None,
        )
        .await;
    assert!(r.status.is_success(), "{:?}", r.json());
    let out = sdk(tjob).await;
    assert_eq!(code(&out[0]), "AuthFailure.SecretIdNotFound", "{out:?}");
}

#[tokio::test]
async fn parallel_sdk_calls_never_exceed_the_limit_at_the_backend() {
    let stack = start();
    stack.admin().create_account("busy").await;
    let pair = tc3_pair(&stack, "busy", None).await;
    let out = sdk(with(
        job(&stack, &pair),
        json!({"parallel": 12, "headers": {"X-Sim-Delay-Ms": "200"}}),
    ))
    .await;
    assert_eq!(out.len(), 12);
    assert!(out.iter().all(|r| r["response"].is_object()), "{out:?}");
    assert_eq!(stack.sim.max_in_flight(&stack.http, "busy").await, 3);
    assert_eq!(stack.admin().all_events().await.len(), 12);
    stack.admin().wait_idle("busy").await;
}

/// `Authorization` and `X-TC-Timestamp` for `POST /` with `body`, signed
/// now as the SDK signs (content-type and host).
fn authorization_now(stack: &Stack, pair: &Pair, body: &[u8]) -> (String, String) {
    let ts = jiff::Timestamp::now().as_second().to_string();
    let mut headers = http::HeaderMap::new();
    headers.insert("content-type", "application/json".parse().unwrap());
    headers.insert("host", endpoint(stack).parse().unwrap());
    let auth = sign(
        &pair.secret_id,
        &pair.secret_key,
        "aiart",
        &SignedRequest {
            method: "POST",
            path: "/",
            query: "",
            headers: &headers,
            body,
            timestamp: &ts,
        },
    )
    .unwrap();
    (auth, ts)
}

/// A request signed as the SDK signs it (the signer is checked byte for
/// byte against the SDK in the unit tests), sent over HTTP.
async fn signed_task(
    stack: &Stack,
    pair: &Pair,
    signed_body: &str,
    sent_body: &str,
) -> common::Resp {
    let (auth, ts) = authorization_now(stack, pair, signed_body.as_bytes());
    stack
        .http
        .send(
            Method::POST,
            &format!("{}/", stack.gw.url),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
                ("x-tc-action", "ImageToImage"),
                ("x-tc-version", "2022-12-29"),
                ("x-tc-timestamp", &ts),
            ],
            sent_body.to_string(),
        )
        .await
}

#[tokio::test]
async fn a_tampered_body_is_refused_before_the_backend_and_bearer_is_unchanged() {
    let stack = start();
    stack.admin().create_account("acme").await;
    let pair = tc3_pair(&stack, "acme", None).await;

    let ok = signed_task(&stack, &pair, r#"{"Style":"201"}"#, r#"{"Style":"201"}"#).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert!(ok.json()["Response"]["Error"].is_null(), "{:?}", ok.json());

    let tampered = signed_task(&stack, &pair, r#"{"Style":"201"}"#, r#"{"Style":"999"}"#).await;
    // The service's way: HTTP 200, application/json, the error in the body.
    assert_eq!(tampered.status, StatusCode::OK);
    assert_eq!(
        tampered.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(tampered.error_code(), "AuthFailure.SignatureFailure");
    let stats = stack.sim.stats(&stack.http).await;
    assert_eq!(stats["accounts"]["acme"]["requests"], 1, "{stats}");
    assert_eq!(stack.admin().all_events().await.len(), 1);

    // Bearer clients keep their HTTP statuses.
    let key = stack.admin().issue_key("acme", None).await.1;
    assert_eq!(stack.task(&key, &[]).await.status, StatusCode::OK);
    let bad = stack.task("tg_not_a_key", &[]).await;
    assert_eq!(bad.status, StatusCode::UNAUTHORIZED);
    // A TC3 secret is no Bearer key.
    assert_eq!(
        stack.task(&pair.secret_key, &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn tc3_keys_need_the_encryption_key_and_a_start_without_it_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start();
    let http = common::Http::new();

    // Without a key: refused with a clear code, nothing stored.
    let gw = Gateway::start(dir.path(), &sim.url, &Opts::default());
    let admin = common::Admin {
        http: &http,
        base: &gw.admin,
    };
    admin.create_plain_account("acme").await;
    let r = admin
        .call(
            Method::POST,
            "/v1/accounts/acme/keys",
            Some(json!({"type":"tc3"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{:?}", r.json());
    assert_eq!(r.error_code(), "FailedOperation.EncryptionKeyMissing");
    // An unknown account is a 404 first, whatever the configuration.
    let r = admin
        .call(
            Method::POST,
            "/v1/accounts/nobody/keys",
            Some(json!({"type":"tc3"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{:?}", r.json());
    drop(gw);

    // With a key: issued. A restart without it, or with another key, is
    // refused with exit code 2 naming the key.
    let with_key = Opts {
        env: vec![(
            "TOLLGATE_AUTH_SECRET_ENCRYPTION_KEY",
            ENCRYPTION_KEY.to_string(),
        )],
        ..Opts::default()
    };
    let gw = Gateway::start(dir.path(), &sim.url, &with_key);
    let admin = common::Admin {
        http: &http,
        base: &gw.admin,
    };
    let r = admin
        .call(
            Method::POST,
            "/v1/accounts/acme/keys",
            Some(json!({"type":"tc3"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
    drop(gw);
    let other_key = "1".repeat(64);
    for env in [
        vec![],
        vec![("TOLLGATE_AUTH_SECRET_ENCRYPTION_KEY", other_key)],
    ] {
        let (code, stderr) = common::refused_start(
            Command::new(env!("CARGO_BIN_EXE_tollgate"))
                .args(["serve", "--config"])
                .arg(dir.path().join("tollgate.toml"))
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
        assert_eq!(code, Some(2), "the start must be refused: {stderr}");
        assert!(stderr.contains("auth.secret_encryption_key"), "{stderr}");
        assert!(!stderr.contains(&"1".repeat(64)), "the key is never echoed");
    }
}

#[tokio::test]
async fn bodies_waiting_to_be_verified_are_bounded_and_hold_no_slot() {
    let stack = Stack::start(Opts {
        env: vec![(
            "TOLLGATE_AUTH_SECRET_ENCRYPTION_KEY",
            ENCRYPTION_KEY.to_string(),
        )],
        extra_toml: "[limits]\nmax_body_bytes = 4000\nmax_buffered_bytes = 6000\nbody_idle_timeout_ms = 60000\n".into(),
    });
    stack.admin().create_account("acme").await;
    let pair = tc3_pair(&stack, "acme", None).await;

    // A client that declares 4,000 bytes and sends 10: its body is being
    // read (and books its 4,000 bytes), but it holds no slot.
    let (auth, ts) = authorization_now(&stack, &pair, b"{}");
    let head = format!(
        "POST / HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nAuthorization: {auth}\r\nX-TC-Action: ImageToImage\r\nX-TC-Version: 2022-12-29\r\nX-TC-Timestamp: {ts}\r\nContent-Length: 4000\r\n\r\n0123456789",
        endpoint(&stack)
    );
    let mut slow = tokio::net::TcpStream::connect(endpoint(&stack))
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut slow, head.as_bytes())
        .await
        .unwrap();
    // Let the gateway take the slow upload in (and book its share) before
    // anything else competes for the budget: a big body booked first would
    // rightly get the slow one refused instead. It must still be waiting.
    let mut early = [0u8; 1];
    assert!(
        tokio::time::timeout(
            std::time::Duration::from_millis(500),
            tokio::io::AsyncReadExt::read(&mut slow, &mut early),
        )
        .await
        .is_err(),
        "the slow upload was answered before its body came"
    );

    // Another 4,000-byte body would go over the 6,000-byte budget.
    let big = format!(r#"{{"Image":"{}"}}"#, "x".repeat(3000));
    let mut refused = None;
    let mut last = None;
    for _ in 0..300 {
        let r = signed_task(&stack, &pair, &big, &big).await;
        if r.error_code() == "RequestLimitExceeded" {
            refused = Some(r);
            break;
        }
        last = Some((r.status, r.json()));
        // The slow body may not have been booked yet.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    if refused.is_none() {
        let mut got = vec![0u8; 4096];
        let n = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            tokio::io::AsyncReadExt::read(&mut slow, &mut got),
        )
        .await;
        panic!(
            "the budget never refused a body it cannot hold; last answer {last:?}; the slow client got {:?}; logs: {}",
            n.map(|r| r.map(|n| String::from_utf8_lossy(&got[..n]).into_owned())),
            stack.gw.proc.logs()
        );
    }
    let refused = refused.unwrap();
    assert_eq!(refused.status, StatusCode::OK);
    // Small bodies still fit, and the slow upload holds no slot: all three
    // slots serve them.
    let a = stack.admin().account("acme").await;
    assert_eq!(a["concurrency"]["in_flight"], 0, "{a}");
    let small = signed_task(&stack, &pair, r#"{"Style":"201"}"#, r#"{"Style":"201"}"#).await;
    assert!(
        small.json()["Response"]["Error"].is_null(),
        "{:?}",
        small.json()
    );

    // An oversized body is refused at once.
    let huge = "x".repeat(5000);
    let r = signed_task(&stack, &pair, &huge, &huge).await;
    assert_eq!(r.error_code(), "FailedOperation.RequestEntityTooLarge");

    // Once the slow client goes, its share is given back.
    drop(slow);
    let mut fits = false;
    for _ in 0..100 {
        let r = signed_task(&stack, &pair, &big, &big).await;
        if r.json()["Response"]["Error"].is_null() {
            fits = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(fits, "the budget is given back when the upload ends");
}

/// SPEC §10.1 on the API 3.0 front: the SDK's `ClientToken` is the
/// idempotency key. A retry gets the first call's answer (the same
/// `Response`, its RequestId included) and is not charged again; the same
/// token with other parameters is refused with the service's code.
#[tokio::test]
async fn a_client_token_retry_through_the_sdk_is_replayed_and_charged_once() {
    let stack = start();
    stack.admin().create_account("acme").await;
    let pair = tc3_pair(&stack, "acme", None).await;
    let params = json!({"InputUrl": "https://example.com/cat.png", "Styles": ["201"], "ClientToken": "order-7"});
    let call = with(job(&stack, &pair), json!({"params": params}));
    let first = sdk(call.clone()).await;
    let second = sdk(call).await;
    assert!(first[0]["response"]["Response"].is_object(), "{first:?}");
    assert_eq!(
        first[0]["response"], second[0]["response"],
        "the retry is the first answer"
    );
    let events = stack.admin().all_events().await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["data"]["idempotency"]["key"], "order-7");

    let other = with(
        job(&stack, &pair),
        json!({"params": {"InputUrl": "https://example.com/dog.png", "ClientToken": "order-7"}}),
    );
    let reused = sdk(other).await;
    assert_eq!(
        reused[0]["code"], "InvalidParameter.IdempotencyKeyReused",
        "{reused:?}"
    );
    assert_eq!(stack.admin().all_events().await.len(), 1);
}

/// Jobs on the API 3.0 front (SPEC §10.2) through the official SDK:
/// `SubmitImageToImageJob` answers a job id, `QueryImageToImageJob`
/// answers its status and, once it succeeded, the action's own answer;
/// `CancelImageToImageJob` of a finished job is the service's error; one
/// usage event, named `ImageToImage`.
#[tokio::test]
async fn the_official_sdk_submits_and_queries_a_job() {
    let stack = start();
    stack.admin().create_account("acme").await;
    let pair = tc3_pair(&stack, "acme", None).await;
    let submit = with(
        job(&stack, &pair),
        json!({"action": "SubmitImageToImageJob"}),
    );
    let submitted = sdk(submit).await;
    let job_id = submitted[0]["response"]["Response"]["JobId"]
        .as_str()
        .unwrap_or_else(|| panic!("{submitted:?}"))
        .to_string();
    let query = with(
        job(&stack, &pair),
        json!({"action": "QueryImageToImageJob", "params": {"JobId": job_id}}),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let done = loop {
        let r = sdk(query.clone()).await;
        let status = r[0]["response"]["Response"]["Status"].clone();
        if status == "succeeded" {
            break r[0]["response"]["Response"].clone();
        }
        assert!(status == "queued" || status == "running", "{r:?}");
        assert!(std::time::Instant::now() < deadline, "{r:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(done["Result"].is_object(), "the action's answer: {done}");
    assert_eq!(done["JobId"], job_id.as_str());
    let cancel = with(
        job(&stack, &pair),
        json!({"action": "CancelImageToImageJob", "params": {"JobId": job_id}}),
    );
    let refused = sdk(cancel).await;
    assert_eq!(
        refused[0]["code"], "FailedOperation.JobNotCancellable",
        "{refused:?}"
    );
    // Another account's key cannot see it.
    stack.admin().create_account("globex").await;
    let other = tc3_pair(&stack, "globex", None).await;
    let peek = with(
        job(&stack, &other),
        json!({"action": "QueryImageToImageJob", "params": {"JobId": job_id}}),
    );
    assert_eq!(sdk(peek).await[0]["code"], "ResourceNotFound.JobNotFound");
    let events = stack.admin().all_events().await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["data"]["api"], "ImageToImage");
    assert_eq!(events[0]["data"]["job_id"], job_id.as_str());
}
