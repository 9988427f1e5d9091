//! Noticing that a client went away while its task is queued.
//!
//! hyper does not read a connection while its request body is unread, and
//! the body is not read while queued, so hyper alone would not notice a
//! client that hangs up. A queued task duplicates its connection's socket
//! descriptor, registers the duplicate with the reactor and waits for the
//! peer's hang-up (`EPOLLRDHUP`), never reading a byte; the duplicate is
//! closed when the task leaves the queue.

use std::future::pending;
use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;

use tokio::io::Interest;
use tokio::net::TcpStream;

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
            // Cannot watch (out of descriptors): never fire; the queue
            // deadline still applies.
            Err(_) => pending().await,
        }
    }

    async fn watch(&self) -> io::Result<()> {
        // A second handle on the same socket, registered with the reactor
        // for as long as this task waits. It shares the socket's
        // non-blocking mode, and it only ever waits: it never reads.
        let fd = self.stream.as_fd().try_clone_to_owned()?;
        let socket = TcpStream::from_std(std::net::TcpStream::from(fd))?;
        loop {
            let ready = socket.ready(Interest::READABLE).await?;
            if ready.is_read_closed() || ready.is_error() {
                return Ok(());
            }
            // Only data arrived (the body, a pipelined request). Clear the
            // readiness so the next wait sleeps until a new event instead of
            // spinning: the reactor is edge-triggered.
            let _ = socket.try_io(Interest::READABLE, || {
                Err::<(), _>(io::ErrorKind::WouldBlock.into())
            });
        }
    }
}
