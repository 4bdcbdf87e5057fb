//! The gRPC listener (`OPENCLAW_GRPC_LISTEN`, HTTP/2 cleartext): `RateLimitService` and the
//! standard `grpc.health.v1.Health` service, which reports SERVING only once the limiter is
//! ready (the same latch as `/ready`) and NOT_SERVING from the moment shutdown starts. The
//! configuration watcher reloads `OPENCLAW_RLS_CONFIG` when its files change, keeping the last
//! good rules when they do not validate.
//!
//! Connections are accepted on the process' runtime and each is served, from start to end, by
//! one of a set of worker threads with single-threaded runtimes (`Worker`; docs/rls.md,
//! "Threads"), so that the answers to a batch of calls leave in one write. hyper's HTTP/2 server
//! serves them and hands each call to the generated service of its path (`Routes`); tonic's own
//! server and router, which wrap every call in their layers, cost 12 % of the decisions a core
//! makes (docs/benchmarks.md section 7).

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::HealthService;
use tower::Service as _;
use tracing::Instrument;

use super::config::{RlsConfig, read_files};
use super::service::Rls;
use crate::listener::{Gate, IdleTimeout, Limits, Slot};

/// Largest `ShouldRateLimit` request accepted (a request is a few hundred bytes; Envoy's
/// descriptors are bounded by its route configuration).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// How often readiness is checked until the limiter is ready.
const READY_POLL: Duration = Duration::from_millis(50);

/// What the gRPC listener serves and watches.
#[derive(Debug)]
pub struct GrpcOptions {
    pub listener: TcpListener,
    pub rls: Arc<Rls>,
    /// `OPENCLAW_RLS_CONFIG`, watched for changes; `None`: no rules (every descriptor OK).
    pub config_path: Option<PathBuf>,
    /// The files as applied at start, so the watcher only reacts to changes.
    pub config_files: Option<Vec<(String, String)>>,
    pub reload_every: Duration,
    pub shutdown_grace: Duration,
    /// `OPENCLAW_API_KEY`: when set, `ShouldRateLimit` needs the metadata
    /// `authorization: Bearer <key>` (Envoy: `grpc_service.initial_metadata`), as `/rate` needs
    /// the header. Health stays open, like `/healthz`.
    pub api_key: Option<Arc<str>>,
    /// `OPENCLAW_GRPC_MAX_CONNECTIONS`, `..._PER_SOURCE` and `OPENCLAW_GRPC_IDLE_TIMEOUT_S`
    /// ([`DEFAULT_LIMITS`], "Connections" in docs/rls.md).
    pub limits: Limits,
}

/// The defaults of the gRPC listener's connection limits.
///
/// * 4096 connections: Envoy opens one connection per worker thread to each replica it
///   reaches, so a replica behind a ClusterIP holds about (Envoys x workers) / replicas; 4096
///   is 512 Envoys of 8 workers on one replica. An HTTP/2 connection here holds tens of KiB
///   of buffers while it is used.
/// * 256 from one address: one Envoy pod holds as many as its workers times the clusters that
///   point here, far fewer; an address that holds more is not one Envoy.
/// * 60 s idle: a connection on which nothing moved for that long (a client that never
///   finished its handshake, a peer that vanished, one that stopped reading) is closed. Live
///   idle connections are not: HTTP/2 PINGs every third of it keep them moving.
pub const DEFAULT_LIMITS: Limits = Limits {
    max_connections: 4096,
    max_connections_per_source: 256,
    idle_timeout: Duration::from_secs(60),
};

#[derive(Debug, Clone)]
struct Service {
    rls: Arc<Rls>,
    api_key: Option<Arc<str>>,
}

impl Service {
    fn authorized<T>(&self, request: &Request<T>) -> bool {
        let Some(expected) = &self.api_key else {
            return true;
        };
        request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|presented| constant_time_eq(presented.as_bytes(), expected.as_bytes()))
    }
}

/// Compares without an early exit, so the time taken does not reveal how much of a guess
/// matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[tonic::async_trait]
impl RateLimitService for Service {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        if !self.authorized(&request) {
            self.rls.count_unauthenticated();
            return Err(Status::unauthenticated(
                "missing or wrong `authorization: Bearer <OPENCLAW_API_KEY>` metadata",
            ));
        }
        self.rls
            .should_rate_limit_with_loans(request.get_ref())
            .await
            .map(Response::new)
            .map_err(|e| Status::invalid_argument(e.to_string()))
    }
}

/// Serve until `stop` turns true, then drain for at most the grace period.
pub async fn serve(options: GrpcOptions, stop: watch::Receiver<bool>) {
    let GrpcOptions {
        listener,
        rls,
        config_path,
        config_files,
        reload_every,
        shutdown_grace,
        api_key,
        limits,
    } = options;
    let metrics = rls.limiter().metrics();
    let closed = |reason| {
        metrics
            .grpc_connections_closed
            .get_or_create(&crate::metrics::ReasonLabels { reason })
            .clone()
    };
    let counters = crate::listener::Counters {
        open: metrics.grpc_connections.clone(),
        idle_closed: closed("idle"),
        per_source_refused: closed("per_source"),
        tls_refused: Default::default(),
    };
    let keepalive_timeouts = closed("keepalive");
    let gate = Gate::new(&limits, counters);
    let health = tonic_health::server::HealthReporter::new();
    let health_service = HealthServer::new(HealthService::from_health_reporter(health.clone()));
    health
        .set_not_serving::<RateLimitServiceServer<Service>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let mut tasks = tokio::task::JoinSet::new();
    {
        let (rls, health, mut stop) = (rls.clone(), health.clone(), stop.clone());
        tasks.spawn(
            async move {
                let mut ticks = tokio::time::interval(READY_POLL);
                while !rls.limiter().is_ready() {
                    tokio::select! {
                        _ = ticks.tick() => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
                health
                    .set_serving::<RateLimitServiceServer<Service>>()
                    .await;
                health
                    .set_service_status("", tonic_health::ServingStatus::Serving)
                    .await;
                let _ = stop.wait_for(|s| *s).await;
                // Tell health-checking clients first, then drain.
                health
                    .set_not_serving::<RateLimitServiceServer<Service>>()
                    .await;
                health
                    .set_service_status("", tonic_health::ServingStatus::NotServing)
                    .await;
            }
            .instrument(tracing::info_span!("grpc_health")),
        );
    }
    if let Some(path) = config_path {
        let span = tracing::info_span!("rls_config_watcher", path = %path.display());
        tasks.spawn(
            watch_config(rls.clone(), path, config_files, reload_every, stop.clone())
                .instrument(span),
        );
    }
    let service = RateLimitServiceServer::from_arc(Arc::new(Service { rls, api_key }))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let routes = Routes {
        rls: service,
        health: health_service,
    };
    let connections = Connections {
        http2: http2_builder(limits.idle_timeout),
        idle_timeout: limits.idle_timeout,
        keepalive_timeouts,
    };
    let workers: Vec<Worker> = (0..worker_count())
        .filter_map(|index| {
            Worker::start(
                index,
                routes.clone(),
                connections.clone(),
                stop.clone(),
                shutdown_grace,
            )
            .inspect_err(|e| tracing::error!(index, error = %e, "cannot start a gRPC worker"))
            .ok()
        })
        .collect();
    if workers.is_empty() {
        tracing::error!("no gRPC worker could start: the gRPC listener is closed");
    } else {
        accept(&listener, &gate, &workers, stop.clone()).await;
    }
    // The workers drain their connections (each for at most the grace period); their channels
    // stay open until then, so that none mistakes the end of accepting for its own shutdown.
    for worker in workers {
        let _ = worker.done.await;
    }
    while tasks.join_next().await.is_some() {}
}

/// How many gRPC workers: one per core this process may use (what Tokio's main runtime sizes
/// itself by).
fn worker_count() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// Hands each accepted connection to the next worker in turn, until `stop`. The gate holds
/// connections beyond the listener's caps back (`OPENCLAW_GRPC_MAX_CONNECTIONS`, in the
/// backlog) or closes them (`..._PER_SOURCE`).
async fn accept(
    listener: &TcpListener,
    gate: &Gate,
    workers: &[Worker],
    mut stop: watch::Receiver<bool>,
) {
    let mut next = 0usize;
    loop {
        let accepted = tokio::select! {
            accepted = gate.accept(listener) => accepted,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (stream, slot) = match accepted {
            Ok((stream, _, slot)) => (stream, slot),
            // One connection that went away before it was accepted: the next one may not.
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors, most likely: say so and pause briefly rather than
                // spin on an error that persists.
                tracing::warn!(error = %e, "gRPC accept failed");
                tokio::select! {
                    _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                continue;
            }
        };
        // A connection reset before it is handed over is dropped; accepting goes on at once.
        let stream = match stream.set_nodelay(true).and_then(|()| stream.into_std()) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "a gRPC connection was dropped before it was served");
                continue;
            }
        };
        // A worker whose thread ended (it panicked) takes no more connections: the next one
        // does.
        let mut stream = Some((stream, slot));
        for _ in 0..workers.len() {
            let worker = &workers[next % workers.len()];
            next = next.wrapping_add(1);
            match stream.take().map(|s| worker.connections.send(s)) {
                Some(Err(tokio::sync::mpsc::error::SendError(back))) => stream = Some(back),
                _ => break,
            }
        }
    }
}

/// An accept error that concerns one connection, not the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionRefused
    )
}

/// A pause after a failed accept.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// One thread running a single-threaded Tokio runtime that serves the connections handed to
/// it, each from start to end (docs/rls.md, "Threads").
///
/// Why not the process' multi-threaded runtime: there, the task that answers one call wakes
/// its connection's task, which runs next (Tokio's LIFO slot) and writes that one answer
/// before the next call is decided. Envoy sends a batch of calls in one segment and got back
/// one segment per answer. On a single-threaded runtime every call of a batch is decided
/// before the connection's task runs again, and their answers leave in one write:
/// `scripts/bench-rls.sh` measured 30 % more decisions per CPU-second (docs/benchmarks.md).
struct Worker {
    /// Each connection with its place among the listener's (given back when it closes).
    connections: tokio::sync::mpsc::UnboundedSender<(std::net::TcpStream, Slot)>,
    done: tokio::sync::oneshot::Receiver<()>,
}

/// How every connection is served: the same for all workers.
#[derive(Clone)]
struct Connections {
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    idle_timeout: Duration,
    /// `openclaw_grpc_connections_closed_total{reason="keepalive"}`.
    keepalive_timeouts: prometheus_client::metrics::counter::Counter,
}

impl Worker {
    fn start(
        index: usize,
        routes: Routes,
        connections: Connections,
        stop: watch::Receiver<bool>,
        shutdown_grace: Duration,
    ) -> std::io::Result<Worker> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (sender, mut incoming) = tokio::sync::mpsc::unbounded_channel();
        let (finished, done) = tokio::sync::oneshot::channel();
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name(format!("openclaw-grpc-{index}"))
            .spawn(move || {
                let _span = span.entered();
                runtime.block_on(async move {
                    let mut served = tokio::task::JoinSet::new();
                    let mut signal = stop.clone();
                    loop {
                        let stream = tokio::select! {
                            stream = incoming.recv() => stream,
                            _ = signal.wait_for(|s| *s) => None,
                            // Reap finished connections as they end.
                            Some(_) = served.join_next() => continue,
                        };
                        let Some((stream, slot)) = stream else { break };
                        match tokio::net::TcpStream::from_std(stream) {
                            Ok(stream) => {
                                // The idle timer belongs to this worker's runtime.
                                let io = IdleTimeout::new(stream, connections.idle_timeout, slot);
                                served.spawn(serve_connection(
                                    io,
                                    connections.clone(),
                                    routes.clone(),
                                    stop.clone(),
                                ));
                            }
                            Err(e) => tracing::warn!(error = %e, "a gRPC connection was dropped"),
                        }
                    }
                    // Every connection was told to finish its streams and close (GOAWAY);
                    // wait for them, for at most the grace period.
                    tokio::select! {
                        _ = async { while served.join_next().await.is_some() {} } => {}
                        _ = tokio::time::sleep(shutdown_grace) => tracing::warn!(
                            grace_s = shutdown_grace.as_secs(),
                            "gRPC grace period over: closing remaining streams"
                        ),
                    }
                });
                // Closes what is left (streams past the grace period) before saying so.
                drop(runtime);
                let _ = finished.send(());
            })?;
        Ok(Worker {
            connections: sender,
            done,
        })
    }
}

/// hyper's HTTP/2 server settings for the gRPC connections: hyper's defaults, except that a
/// connection may carry any number of concurrent calls, as under tonic's server (Envoy opens one
/// connection per worker thread and multiplexes every call of that worker on it), and that a
/// connection on which nothing was read for a third of `idle_timeout` gets a PING, to be
/// answered within another third or the connection is closed. The answers keep a live idle
/// connection moving, so the idle timeout only closes the dead and the stalled. Among hyper's
/// defaults is a bound tonic's server lifted: a connection on which the client's protocol
/// errors made the server reset 1024 streams is closed (RUSTSEC-2024-0003; calls the client
/// cancels do not count).
fn http2_builder(idle_timeout: Duration) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(None)
        .keep_alive_interval(idle_timeout / 3)
        .keep_alive_timeout(idle_timeout / 3);
    builder
}

/// How long, once shutdown starts, a connection that never carried a call may take to end.
const UNUSED_CONNECTION_DRAIN: Duration = Duration::from_secs(1);

/// Serve one connection until the client closes it or, once `stop` turns true, until its
/// calls in flight are answered (a GOAWAY tells the client to open no more).
///
/// hyper can say GOAWAY only once the connection's HTTP/2 handshake is done, so a client that
/// connected and never sent its preface would hold the drain for the whole grace period. A
/// connection that never carried a call has nothing to drain: it gets
/// [`UNUSED_CONNECTION_DRAIN`], then is closed.
async fn serve_connection(
    io: IdleTimeout<tokio::net::TcpStream>,
    connections: Connections,
    routes: Routes,
    mut stop: watch::Receiver<bool>,
) {
    let called = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let routes = Noted {
        routes,
        called: called.clone(),
    };
    let connection = connections.http2.serve_connection(TokioIo::new(io), routes);
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => Some(result),
        _ = stop.wait_for(|s| *s) => None,
    };
    let result = match result {
        Some(result) => result,
        None => {
            connection.as_mut().graceful_shutdown();
            if called.load(std::sync::atomic::Ordering::Relaxed) {
                connection.await
            } else {
                match tokio::time::timeout(UNUSED_CONNECTION_DRAIN, connection.as_mut()).await {
                    Ok(result) => result,
                    // A call came in meanwhile: it drains like any other.
                    Err(_) if called.load(std::sync::atomic::Ordering::Relaxed) => connection.await,
                    Err(_) => return,
                }
            }
        }
    };
    if let Err(e) = result {
        // hyper's own timeout is the keep-alive PING's (the idle timeout is an I/O error).
        if e.is_timeout() {
            connections.keepalive_timeouts.inc();
        }
        tracing::debug!(error = %e, "a gRPC connection ended with an error");
    }
}

/// The two services of the gRPC listener, chosen by the path's service name. What tonic's
/// router does for them, without its per-call layers (a call's future is boxed once, by the
/// service itself; docs/benchmarks.md section 7).
#[derive(Clone)]
struct Routes {
    rls: RateLimitServiceServer<Service>,
    health: HealthServer<HealthService>,
}

type CallFuture = std::pin::Pin<
    Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, Infallible>> + Send>,
>;

impl hyper::service::Service<http::Request<hyper::body::Incoming>> for Routes {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = CallFuture;

    fn call(&self, request: http::Request<hyper::body::Incoming>) -> CallFuture {
        let request = request.map(tonic::body::Body::new);
        match service_of(request.uri().path()) {
            // Both are always ready (generated servers): `call` needs no `poll_ready` first.
            Some(RateLimitServiceServer::<Service>::NAME) => self.rls.clone().call(request),
            Some(HealthServer::<HealthService>::NAME) => self.health.clone().call(request),
            _ => Box::pin(std::future::ready(Ok(unimplemented()))),
        }
    }
}

/// One connection's [`Routes`], noting whether any call came in on it.
struct Noted {
    routes: Routes,
    called: Arc<std::sync::atomic::AtomicBool>,
}

impl hyper::service::Service<http::Request<hyper::body::Incoming>> for Noted {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = CallFuture;

    fn call(&self, request: http::Request<hyper::body::Incoming>) -> CallFuture {
        self.called
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.routes.call(request)
    }
}

/// `package.Service` of a gRPC path, `/package.Service/Method`.
fn service_of(path: &str) -> Option<&str> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!method.is_empty() && !method.contains('/')).then_some(service)
}

/// The answer to a call of a service this listener does not serve: UNIMPLEMENTED, as gRPC
/// servers say it (HTTP 200 with the status in the headers).
fn unimplemented() -> http::Response<tonic::body::Body> {
    tonic::Status::unimplemented("no such service on this listener").into_http()
}

/// Polls the files' contents (robust to ConfigMap symlink swaps) and applies a changed set if
/// it validates; otherwise logs every problem once and keeps the rules in force.
async fn watch_config(
    rls: Arc<Rls>,
    path: PathBuf,
    mut applied: Option<Vec<(String, String)>>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let read = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || read_files(&path)).await
        };
        let result = match read {
            Ok(Ok(files)) if applied.as_ref() == Some(&files) => continue,
            Ok(Ok(files)) => RlsConfig::from_files(&files).map(|config| (config, files)),
            Ok(Err(problems)) => Err(problems),
            Err(e) => {
                tracing::error!(error = %e, "reading the rate limit configuration failed");
                continue;
            }
        };
        match result {
            Ok((config, files)) => {
                let rules = config.rules().len();
                rls.reload(config);
                tracing::info!(rules, "rate limit configuration reloaded");
                applied = Some(files);
                last_error = None;
            }
            Err(problems) => {
                let message = problems.to_string();
                if last_error.as_deref() != Some(message.as_str()) {
                    rls.reload_failed();
                    tracing::error!(
                        "rate limit configuration rejected, keeping the last good rules: {message}"
                    );
                    last_error = Some(message);
                }
            }
        }
    }
}
