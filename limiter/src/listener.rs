//! The peer listener's connection limits: what one client can hold on the port before it has
//! proved anything (issue 12). The gRPC listener (`crate::rls::grpc`) has the same two caps,
//! through a [`Gate`] of its own, and the same idle timeout.
//!
//! `axum::serve` sets no timer on hyper, so a connection that never sends its headers, or
//! stops half-way, or sits idle between requests, is held for ever, and nothing caps how many
//! are held: anyone who can reach the port can exhaust the replica's file descriptors.
//! [`LimitedListener`] adds the two missing bounds, without changing what the handlers see:
//!
//! * **At most `max_connections` at once.** Beyond that the listener stops accepting until one
//!   closes: further connections wait in the kernel's backlog (peers retry; nothing is dropped
//!   that a peer has already sent), and the replica's memory and descriptors stay bounded.
//! * **At most `max_connections_per_source` at once from one source address**, so that one
//!   address cannot take every slot and starve the real peers. A connection beyond its
//!   source's cap is closed as soon as it is accepted: nothing is read from it and it holds no
//!   slot (the accept loop keeps the slot it waited for and takes the next connection). An IPv6
//!   address that maps an IPv4 one counts as that IPv4 address. The default, 64, is far above
//!   what an honest peer holds (see [`DEFAULT_MAX_CONNECTIONS_PER_SOURCE`]); peers behind one
//!   NAT address, or all replicas of a test on 127.0.0.1, share one source's cap.
//! * **An idle timeout.** A connection on which neither a read nor a write has made progress
//!   for `idle_timeout` is closed: a client that stops sending (headers or body) or stops
//!   reading, or a keep-alive connection nobody uses. It must be longer than the peer client's
//!   own idle limit for pooled connections (30 s, `Replicator::try_new`), so that a peer
//!   never sends a request on a connection this side is closing. The 10 s request-body deadline of the peer
//!   handlers is shorter and still applies within a request.
//!
//! They show in `/metrics`: `openclaw_peer_connections` (open now),
//! `openclaw_peer_messages_rejected_total{reason="per_source"}` (closed at accept, their source at
//! its cap; the source itself is logged, at most once a minute per source, never a label) and
//! `{reason="idle_connection"}` (closed by the idle timeout).
//!
//! With peer mutual TLS (`crate::peer_tls`) the TLS handshake runs inside the connection, on
//! top of the idle timeout: it takes a slot like any connection, a handshake that stalls is
//! closed by the same timeout, and it runs on the connection's own task (the accept loop never
//! waits for one). A handshake refused (no client certificate, one of another CA, plain HTTP)
//! is counted as `reason="tls_handshake"`; nothing reaches the peer routes without one.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// The defaults of `OPENCLAW_PEER_MAX_CONNECTIONS` and `OPENCLAW_PEER_IDLE_TIMEOUT_S`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The default of `OPENCLAW_PEER_MAX_CONNECTIONS_PER_SOURCE` (lowered to
/// `OPENCLAW_PEER_MAX_CONNECTIONS` when that is smaller).
///
/// What an honest peer holds here: its client (`Replicator::try_new`) speaks HTTP/1.1 only, so
/// it holds one connection per request in flight, and its pool keeps each for 30 s of idleness;
/// the count is the peak of its concurrent requests over the last 30 s. Replication sends one
/// request at a time (the sender loop's delta and anti-entropy rounds, paged, and a joining
/// peer's push, all in turn; the start-up pull, page by page, before that loop): 1 or 2. The
/// rest are `strict` loans: one per request of the peer's own clients that its share cannot
/// pay, waited for at most the loan timeout (25 ms), and one per evening out after a loan, one
/// peer at a time. Nothing in the client bounds those; at the full 25 ms, 64 is some 1,200 loans
/// a second to this one replica, at a LAN round trip of a millisecond tens of thousands. So an
/// honest peer stays well under 64, while one address still holds only 1/16 of the default
/// 1024. A peer that did reach it loses the request (a loan refused: never an over-admission;
/// a delta: sent again next round), and `reason="per_source"` counts it.
pub const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: usize = 64;

/// A source refused again within this long is not logged again (the counter still counts it).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);
/// However many sources are refused, at most one log line per this long.
const REFUSAL_LOG_GAP: Duration = Duration::from_secs(1);

/// Limits for one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    /// Connections one source address may hold at once; at most `max_connections`.
    pub max_connections_per_source: usize,
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_source: DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// What the listener reports to `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// Connections open now.
    pub open: Gauge,
    /// Connections closed by the idle timeout.
    pub idle_closed: Counter,
    /// Connections refused at the TLS handshake (mutual TLS only).
    pub tls_refused: Counter,
    /// Connections closed at accept because their source held its cap already.
    pub per_source_refused: Counter,
}

/// A TCP listener that holds at most `max_connections` and closes idle ones (module docs).
#[derive(Debug)]
pub struct LimitedListener {
    inner: TcpListener,
    gate: Gate,
    idle_timeout: Duration,
    counters: Counters,
    /// Mutual TLS: every connection must complete this handshake first.
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl LimitedListener {
    pub fn new(inner: TcpListener, limits: Limits, counters: Counters) -> Self {
        Self {
            inner,
            gate: Gate::new(&limits, counters.clone()),
            idle_timeout: limits.idle_timeout,
            counters,
            tls: None,
        }
    }

    /// Serve TLS: each connection completes a handshake under `config` before anything else.
    pub fn with_tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(config);
        self
    }
}

impl axum::serve::Listener for LimitedListener {
    type Io = PeerIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.gate.accept(&self.inner).await {
                Ok((stream, address, slot)) => {
                    let _ = stream.set_nodelay(true);
                    let io = IdleTimeout::new(stream, self.idle_timeout, slot);
                    let io = match &self.tls {
                        None => PeerIo::Plain(io),
                        Some(config) => PeerIo::Tls(
                            Box::new(Tls::Handshaking(
                                TlsAcceptor::from(config.clone()).accept(io),
                                self.counters.tls_refused.clone(),
                            )),
                            ClientCertificate::default(),
                        ),
                    };
                    return (io, address);
                }
                Err(e) => {
                    // As axum's own listener: out of descriptors and the like pass; back off
                    // a little rather than spin.
                    tracing::warn!(error = %e, "accepting a peer connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// What a listener asks before it serves a connection: a place among its `max_connections`
/// and among its source's `max_connections_per_source` (module docs). The peer listener
/// ([`LimitedListener`]) and the gRPC listener (`crate::rls::grpc`) each have one.
#[derive(Debug)]
pub struct Gate {
    slots: Arc<Semaphore>,
    sources: Arc<Sources>,
    counters: Counters,
}

impl Gate {
    pub fn new(limits: &Limits, counters: Counters) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            sources: Arc::new(Sources::new(limits.max_connections_per_source.max(1))),
            counters,
        }
    }

    /// The next connection to serve, with its place. A free place first: at the cap,
    /// connections wait in the kernel's backlog, not in memory here. A connection whose source
    /// holds its cap already is closed unread and counted, and the place waits for the next
    /// one. An error of `accept` is returned as it is (the place is given back).
    pub async fn accept(
        &self,
        listener: &TcpListener,
    ) -> io::Result<(TcpStream, SocketAddr, Slot)> {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        loop {
            let (stream, address) = listener.accept().await?;
            match self.sources.admit(address.ip()) {
                Some(source) => {
                    return Ok((stream, address, Slot::new(permit, source, &self.counters)));
                }
                None => {
                    self.counters.per_source_refused.inc();
                    drop(stream);
                }
            }
        }
    }
}

/// A connection's place among the `max_connections` and among its source's, given back when
/// the connection closes.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    _source: SourceSlot,
    counters: Counters,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, source: SourceSlot, counters: &Counters) -> Self {
        counters.open.inc();
        Self {
            _permit: permit,
            _source: source,
            counters: counters.clone(),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.counters.open.dec();
    }
}

/// Connections open per source address. An entry lives while its source holds a connection,
/// so the table never holds more entries than the listener holds connections.
#[derive(Debug)]
struct Sources {
    cap: usize,
    table: Mutex<SourceTable>,
}

#[derive(Debug, Default)]
struct SourceTable {
    open: HashMap<IpAddr, Source>,
    /// When any refusal was last logged.
    logged: Option<Instant>,
}

#[derive(Debug, Default)]
struct Source {
    open: usize,
    /// When a refusal of this source was last logged (forgotten with the entry).
    logged: Option<Instant>,
}

impl Sources {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            table: Mutex::default(),
        }
    }

    /// One more connection from `address`, unless its source holds `cap` already.
    fn admit(self: &Arc<Self>, address: IpAddr) -> Option<SourceSlot> {
        let address = address.to_canonical();
        let now = Instant::now();
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let SourceTable { open, logged } = &mut *table;
        let source = open.entry(address).or_default();
        if source.open < self.cap {
            source.open += 1;
            return Some(SourceSlot {
                sources: self.clone(),
                address,
            });
        }
        let due = |last: Option<Instant>, every| last.is_none_or(|t| now >= t + every);
        let log = due(source.logged, REFUSAL_LOG_EVERY) && due(*logged, REFUSAL_LOG_GAP);
        if log {
            source.logged = Some(now);
            *logged = Some(now);
        }
        drop(table);
        if log {
            tracing::warn!(
                source = %address,
                cap = self.cap,
                "a source holds its cap of connections: closing its new ones unread \
                 (counted as reason=\"per_source\"; logged at most once a minute per source)"
            );
        }
        None
    }

    /// Open connections from `address` (a test's view).
    #[cfg(test)]
    fn open(&self, address: IpAddr) -> usize {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table
            .open
            .get(&address.to_canonical())
            .map_or(0, |s| s.open)
    }
}

/// A connection's place among its source's, given back when the connection closes.
#[derive(Debug)]
struct SourceSlot {
    sources: Arc<Sources>,
    address: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut table = self.sources.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(source) = table.open.get_mut(&self.address) {
            source.open -= 1;
            if source.open == 0 {
                table.open.remove(&self.address);
            }
        }
    }
}

/// A stream that fails with `TimedOut` once neither reading nor writing has made progress for
/// `idle`; hyper then closes the connection.
#[derive(Debug)]
pub struct IdleTimeout<S> {
    inner: S,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    /// Whether `timer` runs from the current stall; progress disarms it.
    armed: bool,
    timed_out: bool,
    slot: Slot,
}

impl<S> IdleTimeout<S> {
    pub fn new(inner: S, idle: Duration, slot: Slot) -> Self {
        Self {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            armed: false,
            timed_out: false,
            slot,
        }
    }

    /// Nothing moved: run the timer from the start of the stall, and fail once it fires.
    fn stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        if !self.armed {
            self.timer.as_mut().reset(Instant::now() + self.idle);
            self.armed = true;
        }
        match self.timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                if !self.timed_out {
                    self.timed_out = true;
                    self.slot.counters.idle_closed.inc();
                }
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection idle for too long",
                )))
            }
        }
    }

    /// A read or write completed (bytes moved, the end was reached, or an error).
    fn progressed<T>(&mut self, result: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        self.armed = false;
        result
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleTimeout<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending => this.stalled(cx),
            ready => this.progressed(ready),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, data) {
            Poll::Pending => this.stalled(cx),
            ready => this.progressed(ready),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // A flush that completes moves nothing by itself (hyper flushes after every read that
        // left a request incomplete): it must not restart the idle timer.
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.stalled(cx),
            ready => ready,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => this.stalled(cx),
            ready => this.progressed(ready),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A peer connection: plain, or TLS whose handshake runs on the first read or write (so on the
/// connection's task, under its idle timeout), with the client certificate it presented.
#[derive(Debug)]
pub enum PeerIo {
    Plain(IdleTimeout<TcpStream>),
    Tls(Box<Tls>, ClientCertificate),
}

/// The leaf certificate a peer connection's client presented, set when its TLS handshake
/// completes (so before any request on it is read); never set on a plain connection. The
/// peer routes get it as `ConnectInfo<ClientCertificate>`, to check that a message comes from
/// the node it says it comes from (`OPENCLAW_PEER_TLS_BIND_NODE`).
#[derive(Debug, Clone, Default)]
pub struct ClientCertificate(Arc<std::sync::OnceLock<rustls::pki_types::CertificateDer<'static>>>);

impl ClientCertificate {
    /// The certificate, once the handshake is done; `None` on a plain connection.
    pub fn get(&self) -> Option<&rustls::pki_types::CertificateDer<'static>> {
        self.0.get()
    }

    /// A connection whose client presented `certificate`. For tests.
    #[cfg(test)]
    pub(crate) fn presented(certificate: rustls::pki_types::CertificateDer<'static>) -> Self {
        let presented = Self::default();
        let _ = presented.0.set(certificate);
        presented
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, LimitedListener>>
    for ClientCertificate
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, LimitedListener>) -> Self {
        match stream.io() {
            PeerIo::Plain(_) => Self::default(),
            PeerIo::Tls(_, certificate) => certificate.clone(),
        }
    }
}

/// The TLS side of a [`PeerIo`].
pub enum Tls {
    Handshaking(tokio_rustls::Accept<IdleTimeout<TcpStream>>, Counter),
    Ready(TlsStream<IdleTimeout<TcpStream>>),
    Refused,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tls::Handshaking(..) => "Tls::Handshaking",
            Tls::Ready(_) => "Tls::Ready",
            Tls::Refused => "Tls::Refused",
        })
    }
}

impl Tls {
    /// Drives the handshake to its end; then the stream.
    fn poll_stream(
        &mut self,
        cx: &mut Context<'_>,
        certificate: &ClientCertificate,
    ) -> Poll<io::Result<&mut TlsStream<IdleTimeout<TcpStream>>>> {
        if let Tls::Handshaking(accept, refused) = self {
            match Pin::new(accept).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(stream)) => {
                    if let Some(leaf) = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                    {
                        let _ = certificate.0.set(leaf.clone().into_owned());
                    }
                    *self = Tls::Ready(stream);
                }
                Poll::Ready(Err(e)) => {
                    // The idle timeout's own error is counted as such, not as a refusal.
                    if e.kind() != io::ErrorKind::TimedOut {
                        refused.inc();
                        tracing::debug!(error = %e, "peer TLS handshake refused");
                    }
                    *self = Tls::Refused;
                    return Poll::Ready(Err(e));
                }
            }
        }
        match self {
            Tls::Ready(stream) => Poll::Ready(Ok(stream)),
            _ => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "peer TLS handshake refused",
            ))),
        }
    }
}

/// `poll_*` of the stream under a [`PeerIo`], once its handshake (if any) is done.
macro_rules! peer_io {
    ($self:ident, $cx:ident, |$stream:ident| $call:expr) => {
        match $self.get_mut() {
            PeerIo::Plain(plain) => {
                let $stream = Pin::new(plain);
                $call
            }
            PeerIo::Tls(tls, certificate) => match tls.poll_stream($cx, certificate) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Ready(Ok(stream)) => {
                    let $stream = Pin::new(stream);
                    $call
                }
            },
        }
    };
}

impl AsyncRead for PeerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        peer_io!(self, cx, |s| s.poll_read(cx, buf))
    }
}

impl AsyncWrite for PeerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        peer_io!(self, cx, |s| s.poll_write(cx, data))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        peer_io!(self, cx, |s| s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerIo::Plain(plain) => Pin::new(plain).poll_shutdown(cx),
            PeerIo::Tls(tls, _) => match tls.as_mut() {
                Tls::Ready(stream) => Pin::new(stream).poll_shutdown(cx),
                // Nothing to close politely: dropping the connection closes it.
                _ => Poll::Ready(Ok(())),
            },
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        peer_io!(self, cx, |s| s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            PeerIo::Plain(plain) => plain.is_write_vectored(),
            PeerIo::Tls(tls, _) => match tls.as_ref() {
                Tls::Ready(stream) => stream.is_write_vectored(),
                _ => false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_source_gets_its_cap_and_no_more_until_one_closes() {
        let sources = Arc::new(Sources::new(2));
        let first = sources.admit(ip("10.0.0.1")).unwrap();
        let _second = sources.admit(ip("10.0.0.1")).unwrap();
        assert!(sources.admit(ip("10.0.0.1")).is_none());
        let _other = sources.admit(ip("10.0.0.2")).unwrap();
        drop(first);
        assert_eq!(sources.open(ip("10.0.0.1")), 1);
        assert!(sources.admit(ip("10.0.0.1")).is_some());
    }

    #[test]
    fn an_ipv4_mapped_ipv6_address_counts_as_its_ipv4_address() {
        let sources = Arc::new(Sources::new(2));
        let _v4 = sources.admit(ip("192.0.2.7")).unwrap();
        let _mapped = sources.admit(ip("::ffff:192.0.2.7")).unwrap();
        assert_eq!(sources.open(ip("192.0.2.7")), 2);
        assert!(sources.admit(ip("::ffff:192.0.2.7")).is_none());
        assert!(sources.admit(ip("192.0.2.7")).is_none());
        // A real IPv6 address is its own source.
        assert!(sources.admit(ip("2001:db8::7")).is_some());
    }

    #[test]
    fn the_table_forgets_a_source_once_its_last_connection_closes() {
        let sources = Arc::new(Sources::new(4));
        let held: Vec<_> = (1..=3)
            .map(|n| sources.admit(ip(&format!("10.0.0.{n}"))).unwrap())
            .collect();
        assert_eq!(sources.table.lock().unwrap().open.len(), 3);
        drop(held);
        assert!(sources.table.lock().unwrap().open.is_empty());
    }
}
