//! `tollgate loadgen` against a real gateway: its summary counts what the
//! gateway answered, by status and error code.

mod common;

use std::process::Command;

use common::{Opts, Stack};
use serde_json::Value;

/// Runs loadgen with `--json`: the summary and the exit code.
fn loadgen_exit(args: &[&str]) -> (Value, Option<i32>) {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("loadgen")
        .args(args)
        .arg("--json")
        .output()
        .expect("run loadgen");
    let summary = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON summary ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (summary, out.status.code())
}

fn loadgen(args: &[&str]) -> Value {
    let (summary, code) = loadgen_exit(args);
    assert_eq!(code, Some(0), "{summary}");
    summary
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
    let unfinished = closed["unfinished"].as_u64().unwrap();
    assert!(
        events >= requests && events <= requests + unfinished,
        "every success the generator saw was recorded once: {events} events, {closed}"
    );
    assert_eq!(closed["duration_s"].as_f64().unwrap(), 1.0);
    assert_eq!(closed["non_2xx"].as_u64().unwrap(), 0);

    // Open loop: exactly rate x duration requests are due; a bad key's
    // refusals are counted by error code, and a run where every request
    // failed exits non-zero.
    let (open, code) = loadgen_exit(&[
        "--url",
        &url,
        "--key",
        "tg_wrong",
        "--rate",
        "100",
        "--duration",
        "1s",
    ]);
    assert_eq!(code, Some(1), "every request failed: {open}");
    let due = open["requests"].as_u64().unwrap()
        + open["dropped"].as_u64().unwrap()
        + open["connection_errors"].as_u64().unwrap()
        + open["unfinished"].as_u64().unwrap();
    assert_eq!(due, 100);
    assert_eq!(open["non_2xx"], open["requests"]);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_ends_at_its_duration_even_with_answers_outstanding() {
    let stack = Stack::start(Opts::default());
    let key = stack.account_with_key("acme").await;
    let url = format!("{}/v1/style-transfer", stack.gw.url);
    for mode in [["--connections", "2"], ["--rate", "20"]] {
        let started = std::time::Instant::now();
        // Every answer takes 5 s; the run is 1 s long.
        let (summary, code) = loadgen_exit(&[
            "--url",
            &url,
            "--key",
            &key,
            mode[0],
            mode[1],
            "--duration",
            "1s",
            "--header",
            "X-Sim-Delay-Ms: 5000",
        ]);
        let took = started.elapsed();
        assert!(
            took < std::time::Duration::from_secs(4),
            "{mode:?}: ran {took:?} for --duration 1s: {summary}"
        );
        assert!(summary["unfinished"].as_u64().unwrap() > 0, "{summary}");
        assert_eq!(summary["requests"], 0, "{summary}");
        assert_eq!(code, Some(1), "nothing answered: {summary}");
    }
}
