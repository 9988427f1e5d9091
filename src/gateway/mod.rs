//! The data-plane server: accepts connections, serves HTTP/1.1 on hyper, and
//! runs each request through the admission pipeline.
//!
//! It runs on `server.workers` workers, each a tokio runtime of one thread
//! with its own listening socket (`SO_REUSEPORT`) and its own idle
//! backend connections: a connection, its requests and the backend
//! exchanges they make stay on one thread, with no work stealing and no
//! hand-off between threads. What must hold across them (the per-account
//! limiter, the registry, billing, the connection cap) is shared state,
//! the same as with any multi-threaded runtime.

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
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::head_check::HeadCheck;
use crate::listen::{Acceptor, ListenerLimits};
use client_gone::ConnWatch;
use shared_stream::SharedStream;
pub use state::Gateway;

/// The data-plane threads (see the module doc).
pub struct Workers {
    served: Vec<oneshot::Receiver<()>>,
    release: CancellationToken,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    /// A worker (a one-thread runtime, and a thread that holds it) per
    /// listening socket, each serving until `stop` (see [`serve`]); the
    /// connection cap (`server.max_connections`) is shared.
    pub fn spawn(
        gw: &Arc<Gateway>,
        listeners: Vec<std::net::TcpListener>,
        stop: &CancellationToken,
        grace: Duration,
    ) -> std::io::Result<Self> {
        let limits = ListenerLimits::new(gw.config().server.max_connections);
        let release = CancellationToken::new();
        let mut workers = Self {
            served: Vec::new(),
            release: release.clone(),
            threads: Vec::new(),
        };
        for (i, listener) in listeners.into_iter().enumerate() {
            // A one-thread multi-threaded runtime, not a current-thread one:
            // the latter wakes its driver with an eventfd write on every
            // wake from another thread and on every earlier timer (hyper
            // re-arms the header-read timer once a request: ~0.8 writes a
            // task, `strace -f`), where this one checks first whether its
            // thread is parked at all.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name(format!("tollgate-data-{i}"))
                .enable_all()
                .build()?;
            // Built here, so that a failure is the caller's error; moved to
            // its thread at once (a runtime dropped inside an async caller
            // panics).
            let (served, served_rx) = oneshot::channel();
            let (gw, limits, stop, release) =
                (gw.clone(), limits.clone(), stop.clone(), release.clone());
            let (hand_over, runtime_rx) = std::sync::mpsc::channel();
            let thread = std::thread::Builder::new()
                .name(format!("tollgate-hold-{i}"))
                .spawn(move || {
                    let Ok(runtime) = runtime_rx.recv() else {
                        return;
                    };
                    let runtime: tokio::runtime::Runtime = runtime;
                    runtime.block_on(async move {
                        // Spawned, so that the accept loop, the connections
                        // and the thread-locals they use (the idle backend
                        // connections, the commit inbox) are on the
                        // runtime's one worker thread.
                        let serving = tokio::spawn(async move {
                            // Commits made here are answered in one wake
                            // per group commit (`store::ack`).
                            tokio::spawn(crate::store::ack::Inbox::install());
                            match TcpListener::from_std(listener) {
                                Ok(listener) => serve(gw, listener, &limits, stop, grace).await,
                                Err(e) => tracing::error!(error = %e, "a data-plane worker cannot use its socket"),
                            }
                        });
                        let _ = serving.await;
                        let _ = served.send(());
                        // Tasks this runtime still runs (a task finishing
                        // for a client that left, a job, a store or Redis
                        // connection's driver) live until the gateway is
                        // done with them.
                        release.cancelled().await;
                    });
                    runtime.shutdown_timeout(Duration::from_secs(1));
                });
            let thread = match thread {
                Ok(t) => t,
                Err(e) => {
                    // Dropped off the async caller's thread (see above).
                    std::thread::spawn(move || drop(runtime));
                    return Err(e);
                }
            };
            let _ = hand_over.send(runtime);
            workers.served.push(served_rx);
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// Waits until every worker has stopped accepting and its connections
    /// have closed (or `grace` ran out).
    pub async fn served(&mut self) {
        for served in self.served.drain(..) {
            let _ = served.await;
        }
    }

    /// Ends the workers' runtimes (after [`Self::served`] and the gateway's
    /// own drain) and waits for their threads.
    pub async fn finish(mut self) {
        self.release.cancel();
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

/// Workers dropped without [`Workers::finish`] (a start that failed after
/// some of them began) end with their threads.
impl Drop for Workers {
    fn drop(&mut self) {
        self.release.cancel();
    }
}

/// Serves until `stop` is cancelled, then lets open connections finish
/// their current request within `grace`.
pub async fn serve(
    gw: Arc<Gateway>,
    listener: TcpListener,
    limits: &ListenerLimits,
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
    let mut acceptor = Acceptor::sharing(listener, "data", limits, &gw.metrics);
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
