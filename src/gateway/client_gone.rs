//! Noticing that a client went away while its task is queued.
//!
//! hyper does not read a connection while its request body is unread, and
//! the body is not read while queued, so hyper alone would not notice a
//! client that hangs up. Each connection keeps a duplicate of its socket's
//! descriptor; a queued task registers it with the reactor and waits for
//! the peer's hang-up (`EPOLLRDHUP`), never reading a byte.

use std::future::pending;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

pub struct ConnWatch {
    fd: Option<OwnedFd>,
}

impl ConnWatch {
    pub fn new(stream: &TcpStream) -> Self {
        // Without a duplicate the watch is simply off: queued tasks then
        // leave at their deadline instead of at the hang-up.
        let fd = stream.as_fd().try_clone_to_owned().ok();
        Self { fd }
    }

    /// Resolves once the peer has closed or reset the connection.
    pub async fn closed(&self) {
        match self.watch().await {
            Ok(()) => {}
            // Cannot watch: never fire; the queue deadline still applies.
            Err(_) => pending().await,
        }
    }

    async fn watch(&self) -> io::Result<()> {
        let fd = self.fd.as_ref().ok_or(io::ErrorKind::Unsupported)?;
        // A second handle on the same socket, registered with the reactor
        // for as long as this task waits. It shares the socket's
        // non-blocking mode, and it only ever waits: it never reads.
        let socket = TcpStream::from_std(std::net::TcpStream::from(fd.try_clone()?))?;
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
