//! The backend's keep-alive connections: hyper's bare HTTP/1 client
//! (`client::conn::http1`), with each worker thread keeping its own idle
//! connections, so a request takes one from its own thread's list with no
//! lock and no hand-off, and gives it back the same way.
//!
//! hyper-util's pooled client did more per request than a gateway with one
//! backend needs: a shared pool behind a mutex keyed by scheme and
//! authority, a checkout future racing a connect, an absolute URI turned
//! into origin form, about 12,000 instructions a task in all
//! (`cargo bench --bench instructions`, callgrind). What it did that
//! matters is kept: a request that a closing keep-alive connection never
//! sent is sent again on a new one; connections idle too long, or closed
//! by the backend, are not used; a connect is bounded in time.

use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::proxy::UpstreamBody;

/// How long a connection may wait idle before it is not used again.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Pools made so far: a pool's connections carry its number, so the idle
/// lists (per thread) never hand one pool's connection to another.
static POOLS: AtomicU64 = AtomicU64::new(0);

struct Idle {
    pool: u64,
    sender: SendRequest<UpstreamBody>,
    since: Instant,
}

thread_local! {
    static IDLE: RefCell<Vec<Idle>> = const { RefCell::new(Vec::new()) };
}

/// Why a request did not get an answer's head.
#[derive(Debug)]
pub enum SendError {
    /// No connection to the backend could be made.
    Connect(io::Error),
    /// The connection failed before or while the request was sent, or the
    /// answer's head could not be read.
    Http(hyper::Error),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "connecting to the backend: {e}"),
            Self::Http(e) => write!(f, "{e}"),
        }
    }
}

/// A connection checked out for one request; [`Pool::give_back`] returns
/// it once its answer is read whole (dropping it closes it instead).
pub struct Checkout {
    pool: u64,
    sender: SendRequest<UpstreamBody>,
}

pub struct Pool {
    id: u64,
    /// `host:port` to connect to (port 80 when the URL names none).
    connect_to: String,
    /// The `Host` every request carries: the URL's authority, without
    /// `:80` (as clients write it).
    host: http::HeaderValue,
    /// Idle connections kept per thread.
    max_idle: usize,
}

impl Pool {
    /// `authority` as in the backend URL; `max_idle` is
    /// `backend.pool_max_idle`, shared out over the `threads` data-plane
    /// workers (a job run on the admin runtime's threads keeps its own
    /// share there too).
    pub fn new(authority: &str, max_idle: usize, threads: usize) -> Result<Self, String> {
        let parsed: http::uri::Authority = authority
            .parse()
            .map_err(|_| format!("`{authority}` is not a host and port"))?;
        let (connect_to, host) = match parsed.port_u16() {
            None => (format!("{authority}:80"), authority),
            Some(80) => (authority.to_string(), parsed.host()),
            Some(_) => (authority.to_string(), authority),
        };
        Ok(Self {
            id: POOLS.fetch_add(1, Ordering::Relaxed),
            connect_to,
            host: http::HeaderValue::from_str(host)
                .map_err(|_| format!("`{authority}` is not a valid Host header"))?,
            max_idle: max_idle.div_ceil(threads.max(1)),
        })
    }

    /// The same connections, for a backend that replaces this one with the
    /// same URL (a reload).
    pub fn share(&self) -> Self {
        Self {
            id: self.id,
            connect_to: self.connect_to.clone(),
            host: self.host.clone(),
            max_idle: self.max_idle,
        }
    }

    /// Where connections go: the URL's authority, with port 80 if it names
    /// none.
    pub fn connect_to(&self) -> &str {
        &self.connect_to
    }

    pub fn host(&self) -> &http::HeaderValue {
        &self.host
    }

    /// Sends `req` (origin-form URI, `Host` set) and waits for the
    /// answer's head.
    pub async fn send(
        &self,
        req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Checkout), SendError> {
        let (mut sender, reused) = match self.idle().await {
            Some(s) => (s, true),
            None => (self.connect().await?, false),
        };
        match sender.try_send_request(req).await {
            Ok(resp) => Ok((
                resp,
                Checkout {
                    pool: self.id,
                    sender,
                },
            )),
            // A kept-alive connection the backend closed as we took it:
            // the request never left, so it goes again on a new one.
            Err(mut e) if reused && e.message().is_some() => {
                let req = e.take_message().expect("checked above");
                let mut sender = self.connect().await?;
                let resp = sender.send_request(req).await.map_err(SendError::Http)?;
                Ok((
                    resp,
                    Checkout {
                        pool: self.id,
                        sender,
                    },
                ))
            }
            Err(e) => Err(SendError::Http(e.into_error())),
        }
    }

    /// Keeps the connection for the next request on this thread, once it
    /// can take one: an answer can be read whole while the request's body
    /// is still being sent (a backend that answers early), and the next
    /// task must not wait behind that upload.
    pub fn give_back(&self, c: Checkout) {
        if c.pool != self.id || c.sender.is_closed() {
            return;
        }
        let max_idle = self.max_idle;
        if c.sender.is_ready() {
            keep_idle(c, max_idle);
            return;
        }
        tokio::spawn(async move {
            let mut c = c;
            if c.sender.ready().await.is_ok() {
                keep_idle(c, max_idle);
            }
        });
    }

    /// The most recently used idle connection of this pool on this thread
    /// that is still open; closed ones, ones idle too long and another
    /// pool's are dropped on the way. It was ready when it was kept; the
    /// wait covers a connection the backend is closing just now.
    async fn idle(&self) -> Option<SendRequest<UpstreamBody>> {
        loop {
            let mut sender = IDLE.with_borrow_mut(|idle| {
                while let Some(c) = idle.pop() {
                    if c.pool == self.id
                        && !c.sender.is_closed()
                        && c.since.elapsed() < IDLE_TIMEOUT
                    {
                        return Some(c.sender);
                    }
                }
                None
            })?;
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    async fn connect(&self) -> Result<SendRequest<UpstreamBody>, SendError> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.connect_to))
            .await
            .map_err(|_| SendError::Connect(io::ErrorKind::TimedOut.into()))?
            .map_err(SendError::Connect)?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Http)?;
        tokio::spawn(async move {
            // The connection's end (the backend closed it, or it broke) is
            // seen by the request using it, or by `is_closed` when idle.
            let _ = conn.await;
        });
        Ok(sender)
    }
}

fn keep_idle(c: Checkout, max_idle: usize) {
    IDLE.with_borrow_mut(|idle| {
        if idle.len() < max_idle {
            idle.push(Idle {
                pool: c.pool,
                sender: c.sender,
                since: Instant::now(),
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_and_the_host_header_come_from_the_url_authority() {
        let cases = [
            ("backend", "backend:80", "backend"),
            ("backend:80", "backend:80", "backend"),
            ("127.0.0.1:9000", "127.0.0.1:9000", "127.0.0.1:9000"),
            ("[::1]:8080", "[::1]:8080", "[::1]:8080"),
        ];
        for (authority, connect_to, host) in cases {
            let pool = Pool::new(authority, 8, 2).unwrap();
            assert_eq!(pool.connect_to(), connect_to, "{authority}");
            assert_eq!(pool.host(), host, "{authority}");
        }
        assert!(Pool::new("bad host", 8, 2).is_err());
    }
}
