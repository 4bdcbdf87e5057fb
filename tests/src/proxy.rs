//! A TCP forwarding proxy on 127.0.0.1 that tests own: the address peers are given before the
//! replica behind it exists, and the fault injector between replicas.
//!
//! Replicas must know each other's replication addresses when they start, but every process
//! binds port 0. So each directed link gets a [`Proxy`] bound first (its address is known up
//! front and goes into `OPENCLAW_PEERS`), and is pointed at the replica's real peer port once
//! the replica prints it ([`Proxy::set_target`]). One proxy per direction (`from -> to`) lets a
//! test cut exactly the links it wants: [`Proxy::partition`] closes every open connection and
//! refuses new ones (the sender sees its request fail, as with a reset), [`Proxy::heal`] lets
//! traffic through again. A restarted replica keeps its proxies: only the target changes.
//!
//! Plain threads and blocking sockets: a handful of long-lived keep-alive connections per link,
//! nothing here needs an async runtime. Dropping the proxy stops it and closes its connections.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the proxy waits for its target to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A forwarding proxy from a fixed loopback address to a changeable target.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    inner: Arc<Inner>,
    acceptor: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Inner {
    target: Mutex<Option<SocketAddr>>,
    /// Open connections, by id: (client side, upstream side), kept to close them on demand.
    /// The `blocked` flag lives under the same lock so a partition and a new connection
    /// cannot race.
    links: Mutex<Links>,
    stopped: AtomicBool,
    forwarded: AtomicU64,
    refused: AtomicU64,
}

#[derive(Debug, Default)]
struct Links {
    blocked: bool,
    next_id: u64,
    open: HashMap<u64, (TcpStream, TcpStream)>,
}

impl Inner {
    fn links(&self) -> MutexGuard<'_, Links> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn target(&self) -> Option<SocketAddr> {
        *self.target.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn close_all(links: &mut Links) {
        for (_, (client, upstream)) in links.open.drain() {
            let _ = client.shutdown(Shutdown::Both);
            let _ = upstream.shutdown(Shutdown::Both);
        }
    }
}

impl Proxy {
    /// Binds 127.0.0.1:0 and starts accepting. Until [`Proxy::set_target`], every connection
    /// is closed at once (like a peer that is not up yet).
    pub fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a proxy on 127.0.0.1:0");
        let addr = listener.local_addr().expect("proxy address");
        let inner = Arc::new(Inner::default());
        let acceptor = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name(format!("proxy-{}", addr.port()))
                .spawn(move || accept_loop(listener, inner))
                .expect("spawn the proxy thread")
        };
        Proxy {
            addr,
            inner,
            acceptor: Some(acceptor),
        }
    }

    /// The address to give peers (`host:port`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Forward new connections to `target`. Connections to a previous target are closed.
    pub fn set_target(&self, target: SocketAddr) {
        let mut slot = self.inner.target.lock().unwrap_or_else(|p| p.into_inner());
        if *slot != Some(target) {
            *slot = Some(target);
            drop(slot);
            Inner::close_all(&mut self.inner.links());
        }
    }

    /// Cut the link: close every open connection and refuse new ones until [`Proxy::heal`].
    pub fn partition(&self) {
        let mut links = self.inner.links();
        links.blocked = true;
        Inner::close_all(&mut links);
    }

    /// Let traffic through again.
    pub fn heal(&self) {
        self.inner.links().blocked = false;
    }

    /// Connections forwarded to the target so far.
    pub fn forwarded(&self) -> u64 {
        self.inner.forwarded.load(Ordering::Relaxed)
    }

    /// Connections closed on arrival (partitioned, no target, or target unreachable) so far.
    pub fn refused(&self) -> u64 {
        self.inner.refused.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        // Wake the blocking accept so the thread sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        Inner::close_all(&mut self.inner.links());
    }
}

fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    for stream in listener.incoming() {
        if inner.stopped.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = stream else { continue };
        let inner = inner.clone();
        // Connecting upstream may take a moment; do not hold up other links' accepts.
        let _ = std::thread::Builder::new()
            .name("proxy-link".into())
            .spawn(move || forward(client, &inner));
    }
}

/// Connect `client` to the current target and copy both ways until either side closes or the
/// link is cut.
fn forward(client: TcpStream, inner: &Inner) {
    let refuse = |client: TcpStream| {
        inner.refused.fetch_add(1, Ordering::Relaxed);
        let _ = client.shutdown(Shutdown::Both);
    };
    if inner.links().blocked {
        return refuse(client);
    }
    let Some(target) = inner.target() else {
        return refuse(client);
    };
    let Ok(upstream) = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) else {
        return refuse(client);
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (Ok(client_copy), Ok(upstream_copy)) = (client.try_clone(), upstream.try_clone()) else {
        return refuse(client);
    };
    let id = {
        let mut links = inner.links();
        // Partitioned (or retargeted) while we were connecting: refuse rather than leak.
        if links.blocked || inner.target() != Some(target) {
            drop(links);
            let _ = upstream.shutdown(Shutdown::Both);
            return refuse(client);
        }
        let id = links.next_id;
        links.next_id += 1;
        links.open.insert(id, (client_copy, upstream_copy));
        id
    };
    inner.forwarded.fetch_add(1, Ordering::Relaxed);
    let (Ok(mut client_read), Ok(mut upstream_write)) = (client.try_clone(), upstream.try_clone())
    else {
        inner.links().open.remove(&id);
        return;
    };
    let uplink = std::thread::Builder::new()
        .name("proxy-up".into())
        .spawn(move || pipe(&mut client_read, &mut upstream_write));
    let (mut upstream_read, mut client_write) = (upstream, client);
    pipe(&mut upstream_read, &mut client_write);
    if let Ok(uplink) = uplink {
        let _ = uplink.join();
    }
    if let Some((client, upstream)) = inner.links().open.remove(&id) {
        let _ = client.shutdown(Shutdown::Both);
        let _ = upstream.shutdown(Shutdown::Both);
    }
}

/// Copy until end of stream or error, then close both ends so the other direction ends too.
fn pipe(from: &mut TcpStream, to: &mut TcpStream) {
    let _: io::Result<u64> = io::copy(from, to);
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// An echo server on 127.0.0.1:0 that serves connections until the test ends.
    fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 || stream.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    fn round_trip(addr: SocketAddr, message: &[u8]) -> io::Result<Vec<u8>> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(message)?;
        let mut got = vec![0u8; message.len()];
        stream.read_exact(&mut got)?;
        Ok(got)
    }

    #[test]
    fn forwards_once_targeted_refuses_while_partitioned_and_forwards_again_after_heal() {
        let proxy = Proxy::start();
        assert!(
            round_trip(proxy.addr(), b"before").is_err(),
            "no target yet"
        );
        proxy.set_target(echo_server());
        assert_eq!(round_trip(proxy.addr(), b"hello").unwrap(), b"hello");

        let mut open = TcpStream::connect(proxy.addr()).unwrap();
        open.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        open.write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        open.read_exact(&mut one).unwrap();
        proxy.partition();
        // The open connection is closed: a read sees end of stream or a reset.
        let mut rest = [0u8; 1];
        assert!(matches!(open.read(&mut rest), Ok(0) | Err(_)));
        assert!(round_trip(proxy.addr(), b"cut").is_err());

        proxy.heal();
        assert_eq!(round_trip(proxy.addr(), b"again").unwrap(), b"again");
        assert!(proxy.refused() >= 2, "{}", proxy.refused());
        assert!(proxy.forwarded() >= 3, "{}", proxy.forwarded());
    }
}
