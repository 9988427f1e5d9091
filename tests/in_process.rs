//! A whole gateway in process through `app::run(config, shutdown)`: the
//! embedded defaults (simulator, demo key) answer a task, and cancelling
//! the token shuts it down cleanly.

mod common;

use std::time::Duration;

use common::Http;
use http::{Method, StatusCode};
use tokio_util::sync::CancellationToken;
use tollgate::config::{Config, DEMO_API_KEY};

/// Two distinct free ports: both are held while the second is picked (a
/// port let go at once can come back from the next bind).
fn two_free_ports() -> (u16, u16) {
    let bind = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (a, b) = (bind(), bind());
    let port = |l: &std::net::TcpListener| l.local_addr().unwrap().port();
    (port(&a), port(&b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_runs_in_process_and_stops_on_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let (data, admin) = two_free_ports();
    let env = [
        ("TOLLGATE_SERVER_LISTEN", format!("127.0.0.1:{data}")),
        ("TOLLGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin}")),
        (
            "TOLLGATE_STORAGE_DATA_DIR",
            dir.path().join("data").display().to_string(),
        ),
        ("TOLLGATE_SIMULATOR_LATENCY_MS", "0".to_string()),
        ("TOLLGATE_SIMULATOR_LATENCY_JITTER_MS", "0".to_string()),
    ]
    .map(|(k, v)| (k.to_string(), v));
    let config = Config::from_toml_and_env("", env).expect("a valid config");
    let shutdown = CancellationToken::new();
    let gateway = tokio::spawn(tollgate::app::run(config, shutdown.clone()));

    let http = Http::new();
    let url = format!("http://127.0.0.1:{data}/v1/style-transfer");
    let auth = format!("Bearer {DEMO_API_KEY}");
    let mut answer = None;
    for _ in 0..100 {
        match http
            .try_send(Method::POST, &url, &[("authorization", &auth)], "{}")
            .await
        {
            Ok(r) => {
                answer = Some(r);
                break;
            }
            // Not listening yet.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let r = answer.expect("the gateway listens");
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );

    shutdown.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(10), gateway)
        .await
        .expect("the gateway stops on the token");
    assert!(ended.unwrap().is_ok());
    assert!(
        http.try_send(Method::POST, &url, &[("authorization", &auth)], "{}")
            .await
            .is_err(),
        "nothing listens after shutdown"
    );
}
