//! The data-plane server: accepts connections, serves HTTP/1.1 on hyper, and
//! runs each request through the admission pipeline.

pub mod access_log;
mod account_gate;
mod backend_pool;
pub mod budget;
pub mod client_gone;
mod detach;
pub mod error;
pub mod jobs;
mod keyed;
mod path;
mod pipeline;
pub mod proxy;
mod shared_stream;
mod slow_body;
mod state;
mod tally;
pub mod tc3_front;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::head_check::HeadCheck;
use crate::listen::Acceptor;
use client_gone::ConnWatch;
use shared_stream::SharedStream;
pub use state::Gateway;

/// Serves until `stop` is cancelled, then lets open connections finish
/// their current request within `grace`.
pub async fn serve(
    gw: Arc<Gateway>,
    listener: TcpListener,
    stop: CancellationToken,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    // Read at start: the listener's settings need a restart to change.
    let config = gw.config();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        // A client that never finishes its headers holds no task, but it
        // holds a connection: bound that. The same timer runs while a
        // keep-alive connection waits for its next request, so it is also
        // the idle timeout.
        .header_read_timeout(Duration::from_millis(config.server.idle_timeout_ms));
    let mut acceptor = Acceptor::new(listener, "data", config.server.max_connections, &gw.metrics);
    drop(config);
    while let Some((stream, slot)) = acceptor.next(&stop).await {
        let _ = stream.set_nodelay(true);
        let stream = Arc::new(stream);
        let watch = Arc::new(ConnWatch::new(stream.clone()));
        let gw = gw.clone();
        let service = service_fn(move |req| {
            let gw = gw.clone();
            let watch = watch.clone();
            async move { Ok::<_, Infallible>(pipeline::handle(gw, watch, req).await) }
        });
        // Heads are checked before hyper reads them: a malformed one gets
        // the JSON error, not hyper's bare answer.
        let io = TokioIo::new(HeadCheck::new(SharedStream(stream)));
        let conn = graceful.watch(http.serve_connection(io, service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(acceptor);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("grace period over with connections still open");
    }
}
