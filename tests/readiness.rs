//! `/readyz` tells a load balancer the truth: not ready while the backend
//! refuses every connection, ready again once it is back.

mod common;

use std::time::{Duration, Instant};

use common::{Gateway, Http, Opts};
use http::StatusCode;

async fn ready(http: &Http, gw: &Gateway) -> (StatusCode, serde_json::Value) {
    http.get_json(&format!("{}/readyz", gw.admin), &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_while_the_backend_refuses_connections() {
    // A port nobody listens on: bind, note it, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(
        dir.path(),
        &format!("http://127.0.0.1:{port}"),
        &Opts::default(),
    );
    let http = Http::new();
    let (status, body) = ready(&http, &gw).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "backend unreachable");

    // The backend comes up on that port: ready within a probe or two.
    let backend = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = ready(&http, &gw).await;
        if status == StatusCode::OK {
            assert_eq!(body["status"], "ready");
            assert_eq!(body["store"]["status"], "ok");
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(backend);
}
