//! Noticing that a client went away while its task is queued.
//!
//! hyper does not read a connection while its request body is unread, and
//! the body is not read while queued, so hyper alone would not notice a
//! client that hangs up. A queued task waits on the connection's own
//! socket (shared with hyper, see `shared_stream`) for the peer's hang-up
//! (`EPOLLRDHUP`), never reading a byte and never taking a second
//! descriptor: a queued task costs one descriptor, its connection's.
//!
//! The readiness the reactor records is shared with hyper, so it is never
//! cleared here (hyper would then wait for a new edge while the body sits
//! in the kernel's buffer). When data is waiting (the body, a pipelined
//! request), the readiness stays set and the watcher looks again every
//! [`RECHECK`]: a hang-up after data is noticed within that, a hang-up on
//! an idle socket at once.

use std::future::pending;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

/// How often a watcher whose socket holds unread data looks again.
pub const RECHECK: Duration = Duration::from_millis(100);

pub struct ConnWatch {
    stream: Arc<TcpStream>,
}

impl ConnWatch {
    pub fn new(stream: Arc<TcpStream>) -> Self {
        Self { stream }
    }

    /// Resolves once the peer has closed or reset the connection.
    pub async fn closed(&self) {
        match self.watch().await {
            Ok(()) => {}
            // The socket cannot be watched: never fire; the queue deadline
            // still applies.
            Err(_) => pending().await,
        }
    }

    async fn watch(&self) -> io::Result<()> {
        loop {
            let ready = self.stream.ready(Interest::READABLE).await?;
            if ready.is_read_closed() || ready.is_error() {
                return Ok(());
            }
            tokio::time::sleep(RECHECK).await;
        }
    }
}
