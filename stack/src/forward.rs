//! Peer addresses that exist before the replicas do.
//!
//! A limiter learns its peers from `OPENCLAW_PEERS` at start and only ever sends to those
//! addresses (it does not learn peers from the messages it receives), while every replica binds
//! its peer listener on port 0 and prints the port only once started. So each replica gets a
//! [`Forwarder`]: a TCP relay bound on 127.0.0.1:0 *before* any replica starts, whose address
//! goes into the other replicas' `OPENCLAW_PEERS`, and which is pointed at the replica's real
//! peer listener once that prints its `listening peer=` line. No port is ever guessed or
//! released and re-bound. Until a target is set, and after the replica behind it died, a
//! connection is closed at once: the sender sees the peer down, as it would in a cluster.
//! (`tests/src/proxy.rs` does the same for the e2e tests, one relay per directed link so that
//! tests can cut links; the stack needs one per replica.)

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinSet};

use crate::{Error, Result};

/// A relay from a fixed loopback address to a settable target; stopped on drop.
#[derive(Debug)]
pub struct Forwarder {
    addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    task: AbortHandle,
}

impl Forwarder {
    /// Binds 127.0.0.1:0 and starts relaying (to nowhere until [`Forwarder::set_target`]).
    pub async fn start() -> Result<Forwarder> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Error::Other(format!("cannot bind a peer relay on 127.0.0.1:0: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Other(format!("peer relay address: {e}")))?;
        let target: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let shared = target.clone();
        let task = tokio::spawn(async move {
            // Connections live in this set: aborting the acceptor drops it, which aborts them.
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((inbound, _)) = accepted else { continue };
                        let to = *shared.lock().unwrap_or_else(|p| p.into_inner());
                        if let Some(to) = to {
                            connections.spawn(relay(inbound, to));
                        }
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        })
        .abort_handle();
        Ok(Forwarder { addr, target, task })
    }

    /// The address peers are given.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Points the relay at `to` (new connections only).
    pub fn set_target(&self, to: SocketAddr) {
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = Some(to);
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(mut inbound: TcpStream, to: SocketAddr) {
    let Ok(mut outbound) = TcpStream::connect(to).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_relay_closes_connections_until_it_has_a_target_then_forwards_both_ways() {
        let relay = Forwarder::start().await.unwrap();
        let mut early = TcpStream::connect(relay.addr()).await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(early.read(&mut buf).await.unwrap(), 0, "closed at once");

        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut b = [0u8; 5];
            s.read_exact(&mut b).await.unwrap();
            s.write_all(&b).await.unwrap();
        });
        relay.set_target(echo_addr);
        let mut c = TcpStream::connect(relay.addr()).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let mut b = [0u8; 5];
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"hello");
    }
}
