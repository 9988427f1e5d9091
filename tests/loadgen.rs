//! `tollgate loadgen` against a real gateway: its summary counts what the
//! gateway answered, by status and error code.

mod common;

use std::process::Command;

use common::{Opts, Stack};
use serde_json::Value;

fn loadgen(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("loadgen")
        .args(args)
        .arg("--json")
        .output()
        .expect("run loadgen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON summary")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_and_open_loop_summaries_count_what_the_gateway_answered() {
    let stack = Stack::start(Opts::default());
    let key = stack.account_with_key("acme").await;
    let url = format!("{}/v1/style-transfer", stack.gw.url);

    let closed = loadgen(&[
        "--url",
        &url,
        "--key",
        &key,
        "--connections",
        "4",
        "--duration",
        "1s",
    ]);
    let requests = closed["requests"].as_u64().unwrap();
    assert!(requests > 0);
    assert_eq!(closed["ok_2xx"].as_u64().unwrap(), requests);
    assert_eq!(closed["statuses"]["200"].as_u64().unwrap(), requests);
    assert!(
        closed["latency_ms"]["p99"].as_f64().unwrap()
            >= closed["latency_ms"]["p50"].as_f64().unwrap()
    );
    let events = stack.admin().all_events().await.len() as u64;
    assert_eq!(
        events, requests,
        "every success the generator saw was recorded once"
    );

    // Open loop: exactly rate x duration requests are due; a bad key's
    // refusals are counted by error code.
    let open = loadgen(&[
        "--url",
        &url,
        "--key",
        "tg_wrong",
        "--rate",
        "100",
        "--duration",
        "1s",
    ]);
    let due = open["requests"].as_u64().unwrap()
        + open["dropped"].as_u64().unwrap()
        + open["connection_errors"].as_u64().unwrap();
    assert_eq!(due, 100);
    assert_eq!(
        open["error_codes"]["AuthFailure.InvalidAuthorization"]
            .as_u64()
            .unwrap(),
        open["requests"].as_u64().unwrap()
    );

    // Bad arguments are refused with exit code 2 and a message.
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["loadgen", "--url", "ftp://x", "--duration", "1s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--url"));
}
