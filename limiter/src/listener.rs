//! The peer listener's connection limits: what one client can hold on the port before it has
//! proved anything (issue 12).
//!
//! `axum::serve` sets no timer on hyper, so a connection that never sends its headers, or
//! stops half-way, or sits idle between requests, is held for ever, and nothing caps how many
//! are held: anyone who can reach the port can exhaust the replica's file descriptors.
//! [`LimitedListener`] adds the two missing bounds, without changing what the handlers see:
//!
//! * **At most `max_connections` at once.** Beyond that the listener stops accepting until one
//!   closes: further connections wait in the kernel's backlog (peers retry; nothing is dropped
//!   that a peer has already sent), and the replica's memory and descriptors stay bounded.
//! * **An idle timeout.** A connection on which neither a read nor a write has made progress
//!   for `idle_timeout` is closed: a client that stops sending (headers or body) or stops
//!   reading, or a keep-alive connection nobody uses. It must be longer than the peer client's
//!   own idle limit for pooled connections (30 s, `Replicator::try_new`), so that a peer
//!   never sends a request on a connection this side is closing. The 10 s request-body deadline of the peer
//!   handlers is shorter and still applies within a request.
//!
//! Both show in `/metrics`: `openclaw_peer_connections` (open now) and
//! `openclaw_peer_messages_rejected_total{reason="idle_connection"}` (closed by the idle timeout).
//!
//! With peer mutual TLS (`crate::peer_tls`) the TLS handshake runs inside the connection, on
//! top of the idle timeout: it takes a slot like any connection, a handshake that stalls is
//! closed by the same timeout, and it runs on the connection's own task (the accept loop never
//! waits for one). A handshake refused (no client certificate, one of another CA, plain HTTP)
//! is counted as `reason="tls_handshake"`; nothing reaches the peer routes without one.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
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

/// Limits for one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
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
}

/// A TCP listener that holds at most `max_connections` and closes idle ones (module docs).
#[derive(Debug)]
pub struct LimitedListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    idle_timeout: Duration,
    counters: Counters,
    /// Mutual TLS: every connection must complete this handshake first.
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl LimitedListener {
    pub fn new(inner: TcpListener, limits: Limits, counters: Counters) -> Self {
        Self {
            inner,
            slots: Arc::new(Semaphore::new(limits.max_connections.max(1))),
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
        // A free slot first: at the cap, connections wait in the backlog, not in memory here.
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        loop {
            match self.inner.accept().await {
                Ok((stream, address)) => {
                    let _ = stream.set_nodelay(true);
                    let io = IdleTimeout::new(
                        stream,
                        self.idle_timeout,
                        Slot::new(slot, &self.counters),
                    );
                    let io = match &self.tls {
                        None => PeerIo::Plain(io),
                        Some(config) => PeerIo::Tls(Box::new(Tls::Handshaking(
                            TlsAcceptor::from(config.clone()).accept(io),
                            self.counters.tls_refused.clone(),
                        ))),
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

/// A connection's place among the `max_connections`, given back when the connection closes.
#[derive(Debug)]
struct Slot {
    _permit: OwnedSemaphorePermit,
    counters: Counters,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, counters: &Counters) -> Self {
        counters.open.inc();
        Self {
            _permit: permit,
            counters: counters.clone(),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.counters.open.dec();
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
    fn new(inner: S, idle: Duration, slot: Slot) -> Self {
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
                    "peer connection idle for too long",
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
/// connection's task, under its idle timeout).
#[derive(Debug)]
pub enum PeerIo {
    Plain(IdleTimeout<TcpStream>),
    Tls(Box<Tls>),
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
    ) -> Poll<io::Result<&mut TlsStream<IdleTimeout<TcpStream>>>> {
        if let Tls::Handshaking(accept, refused) = self {
            match Pin::new(accept).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(stream)) => *self = Tls::Ready(stream),
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
            PeerIo::Tls(tls) => match tls.poll_stream($cx) {
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
            PeerIo::Tls(tls) => match tls.as_mut() {
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
            PeerIo::Tls(tls) => match tls.as_ref() {
                Tls::Ready(stream) => stream.is_write_vectored(),
                _ => false,
            },
        }
    }
}
