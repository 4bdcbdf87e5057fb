//! TLS serving for the aggregated API: the kube-aggregator, kubectl and the HPA controller only
//! talk HTTPS to an APIService backend.
//!
//! What this module decides, and why:
//! - The serving certificate comes from PEM files (a cert-manager or Secret mount) and is
//!   re-read on a poll: a rotated Secret takes effect for new handshakes without a restart, and
//!   a broken replacement (half-written file, key that does not match) keeps the previous pair
//!   and is logged, so a bad rotation never takes the adapter down. Without files a CA and a
//!   serving certificate are generated at start, as the Go apiservers do, and the CA can be
//!   written out for the APIService `caBundle` or a test client.
//! - Client certificates are *requested, never required* and the handshake does not judge who
//!   signed them: the two CAs of `extension-apiserver-authentication` mean different things
//!   (front proxy vs. end user) and rotate at run time, so `auth` verifies the chain per request
//!   against each. What the handshake does prove is that the client holds the certificate's
//!   private key. A certificate from an unknown CA therefore does not break the connection and a
//!   bearer token on the same request still works (kube-apiserver's `RequestClientCert` does the
//!   same). No CA names are sent as hints: Go clients withhold a certificate that matches none.
//! - HTTP/1.1 and HTTP/2 (ALPN), handshakes bounded in time, graceful shutdown bounded in time.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;
use tracing::{Instrument as _, debug, info, info_span, warn};

use openclaw_common::tls::parse_pair;

/// Errors of TLS setup and serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Only one of `--tls-cert-file` / `--tls-private-key-file` was given.
    #[error("--tls-cert-file and --tls-private-key-file go together: {0}")]
    IncompleteFiles(&'static str),
    /// The certificate or key file could not be read or parsed, or they do not match.
    #[error("serving certificate {cert} / key {key}: {reason}")]
    Load {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// Generating the self-signed certificate failed.
    #[error("generating the self-signed serving certificate: {0}")]
    SelfSigned(String),
    /// Writing the generated CA certificate to `--tls-self-signed-ca-out` failed.
    #[error("writing the self-signed CA certificate to {path}: {source}")]
    WriteCa {
        /// Target file.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// rustls refused the server configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The listener failed in a way that is not about one connection.
    #[error("accepting connections: {0}")]
    Accept(std::io::Error),
}

/// Parses `10s`, `500ms`, `1m30s` (the spelling of Go's duration flags).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write e.g. 500ms, 10s, 1m)"))
}

/// Flags of the secure port. Flatten into the binary's clap struct.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate chain (leaf first) served on the secure port; re-read when it changes.
    /// Without it, a CA and serving certificate are generated at start.
    #[arg(long, env = "OPENCLAW_ADAPTER_TLS_CERT_FILE", value_name = "FILE")]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `--tls-cert-file`.
    #[arg(
        long,
        env = "OPENCLAW_ADAPTER_TLS_PRIVATE_KEY_FILE",
        value_name = "FILE"
    )]
    pub tls_private_key_file: Option<PathBuf>,

    /// Extra DNS names or IP addresses of the generated certificate, besides localhost and
    /// 127.0.0.1: the Service name the aggregator dials, e.g. `openclaw-metrics-adapter.monitoring.svc`.
    #[arg(
        long = "tls-self-signed-name",
        env = "OPENCLAW_ADAPTER_TLS_SELF_SIGNED_NAMES",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub tls_self_signed_names: Vec<String>,

    /// Write the generated CA certificate (PEM) here, for a `caBundle` or a client's trust store.
    #[arg(
        long,
        env = "OPENCLAW_ADAPTER_TLS_SELF_SIGNED_CA_OUT",
        value_name = "FILE"
    )]
    pub tls_self_signed_ca_out: Option<PathBuf>,

    /// How often the certificate and key files are checked for changes.
    #[arg(long, env = "OPENCLAW_ADAPTER_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub tls_reload_interval: Duration,

    /// A TLS handshake not finished within this is dropped (slow or stuck clients).
    #[arg(long, env = "OPENCLAW_ADAPTER_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub tls_handshake_timeout: Duration,

    /// After the shutdown signal, in-flight requests get this long before connections are closed.
    #[arg(long, env = "OPENCLAW_ADAPTER_SHUTDOWN_GRACE_PERIOD", default_value = "15s", value_parser = parse_duration)]
    pub shutdown_grace_period: Duration,
}

impl Default for TlsArgs {
    fn default() -> Self {
        Self {
            tls_cert_file: None,
            tls_private_key_file: None,
            tls_self_signed_names: Vec::new(),
            tls_self_signed_ca_out: None,
            tls_reload_interval: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(10),
            shutdown_grace_period: Duration::from_secs(15),
        }
    }
}

/// The client certificate chain a connection presented (leaf first), put into every request's
/// extensions.
///
/// Unverified by design: the handshake proved the client holds the leaf's private key, but not
/// who issued it. `auth` verifies it against the CA that matters for each use.
#[derive(Debug, Clone)]
pub struct PeerCertificates(Arc<[CertificateDer<'static>]>);

impl PeerCertificates {
    /// Wraps a chain, leaf first. Empty chains are not represented (`None` instead).
    pub fn new(chain: Vec<CertificateDer<'static>>) -> Option<Self> {
        (!chain.is_empty()).then(|| Self(chain.into()))
    }

    /// The leaf certificate.
    pub fn end_entity(&self) -> &CertificateDer<'static> {
        &self.0[0]
    }

    /// Certificates after the leaf.
    pub fn intermediates(&self) -> &[CertificateDer<'static>] {
        &self.0[1..]
    }
}

/// Counters of the certificate file poller, for logs, metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadStatus {
    /// Successful loads after the initial one.
    pub reloads: u64,
    /// Changed files that could not be loaded (the previous pair stayed in use).
    pub failures: u64,
    /// The last failure, cleared by the next successful load.
    pub last_error: Option<String>,
}

/// A ready-to-serve TLS configuration: the current certificate and how to keep it fresh.
///
/// Cheap to clone; clones share the certificate, so a test or `/metrics` can watch what the
/// server serves.
#[derive(Clone)]
pub struct TlsConfig {
    inner: Arc<Inner>,
}

struct Inner {
    provider: Arc<CryptoProvider>,
    resolver: Arc<CurrentCert>,
    files: Option<(PathBuf, PathBuf)>,
    /// The certificate and key bytes the initial load used.
    loaded_files: Option<PemPair>,
    /// PEM of the generated CA when self-signed.
    self_signed_ca_pem: Option<String>,
    reload_interval: Duration,
    handshake_timeout: Duration,
    shutdown_grace: Duration,
    reloads: AtomicU64,
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("files", &self.inner.files)
            .field("self_signed", &self.inner.self_signed_ca_pem.is_some())
            .field("reload_interval", &self.inner.reload_interval)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Loads the certificate files, or generates a CA and serving certificate when none are given.
    pub fn from_args(args: &TlsArgs) -> Result<Self, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (key, files, loaded_files, ca_pem) = match (
            &args.tls_cert_file,
            &args.tls_private_key_file,
        ) {
            (Some(cert), Some(key)) => {
                let (certified, bytes) = load_pair(&provider, cert, key)?;
                info!(cert = %cert.display(), key = %key.display(), "serving certificate loaded from files");
                (
                    certified,
                    Some((cert.clone(), key.clone())),
                    Some(bytes),
                    None,
                )
            }
            (Some(_), None) => {
                return Err(Error::IncompleteFiles("--tls-private-key-file is missing"));
            }
            (None, Some(_)) => return Err(Error::IncompleteFiles("--tls-cert-file is missing")),
            (None, None) => {
                let (certified, ca_pem) = self_signed(&provider, &args.tls_self_signed_names)?;
                if let Some(path) = &args.tls_self_signed_ca_out {
                    std::fs::write(path, &ca_pem).map_err(|source| Error::WriteCa {
                        path: path.clone(),
                        source,
                    })?;
                }
                warn!(
                    names = ?args.tls_self_signed_names,
                    ca_out = ?args.tls_self_signed_ca_out,
                    "no --tls-cert-file: serving a certificate from a CA generated at start; \
                     clients must trust that CA (APIService caBundle) or skip verification"
                );
                (certified, None, None, Some(ca_pem))
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                provider,
                resolver: Arc::new(CurrentCert(RwLock::new(Arc::new(key)))),
                files,
                loaded_files,
                self_signed_ca_pem: ca_pem,
                reload_interval: args.tls_reload_interval,
                handshake_timeout: args.tls_handshake_timeout,
                shutdown_grace: args.shutdown_grace_period,
                reloads: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                last_error: Mutex::new(None),
            }),
        })
    }

    /// The leaf certificate new handshakes get.
    pub fn current_certificate(&self) -> CertificateDer<'static> {
        self.inner.resolver.get().cert[0].clone()
    }

    /// PEM of the CA generated at start, when no certificate files were given.
    pub fn self_signed_ca_pem(&self) -> Option<&str> {
        self.inner.self_signed_ca_pem.as_deref()
    }

    /// What the file poller has done so far.
    pub fn reload_status(&self) -> ReloadStatus {
        ReloadStatus {
            reloads: self.inner.reloads.load(Ordering::Relaxed),
            failures: self.inner.failures.load(Ordering::Relaxed),
            last_error: self
                .inner
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }

    /// The rustls server configuration: current certificate, optional client certificates,
    /// ALPN `h2` then `http/1.1`.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, Error> {
        let mut config = ServerConfig::builder_with_provider(self.inner.provider.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(Arc::new(RequestClientCert {
                provider: self.inner.provider.clone(),
            }))
            .with_cert_resolver(self.inner.resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Re-reads the files once; `true` when a new pair was installed. The poller calls this.
    fn poll_files(&self, last_seen: &mut Option<PemPair>) -> bool {
        let Some((cert_path, key_path)) = &self.inner.files else {
            return false;
        };
        let read = std::fs::read(cert_path).and_then(|c| Ok((c, std::fs::read(key_path)?)));
        let (cert_pem, key_pem) = match read {
            Ok(pair) => pair,
            Err(e) => {
                let reason = format!(
                    "reading {} / {}: {e}",
                    cert_path.display(),
                    key_path.display()
                );
                self.record_failure(reason);
                *last_seen = None;
                return false;
            }
        };
        if last_seen
            .as_ref()
            .is_some_and(|(c, k)| *c == cert_pem && *k == key_pem)
        {
            return false;
        }
        let result = parse_pair(&self.inner.provider, &cert_pem, &key_pem);
        *last_seen = Some((cert_pem, key_pem));
        match result {
            Ok(certified) => {
                self.inner.resolver.set(Arc::new(certified));
                self.inner.reloads.fetch_add(1, Ordering::Relaxed);
                *self
                    .inner
                    .last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = None;
                info!(cert = %cert_path.display(), "serving certificate reloaded");
                true
            }
            Err(reason) => {
                self.record_failure(reason);
                false
            }
        }
    }

    fn record_failure(&self, reason: String) {
        let mut last = self
            .inner
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // One log line per distinct problem, not one per poll.
        if last.as_deref() != Some(reason.as_str()) {
            warn!(%reason, "serving certificate files changed but cannot be used; keeping the previous certificate");
            self.inner.failures.fetch_add(1, Ordering::Relaxed);
        }
        *last = Some(reason);
    }

    async fn poll_until(self, mut stop: watch::Receiver<bool>) {
        // Start from the bytes of the initial load, so a change made since is still noticed.
        let mut last_seen = self.inner.loaded_files.clone();
        let mut tick = tokio::time::interval(self.inner.reload_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let this = self.clone();
            let mut seen = last_seen.take();
            // File reads are blocking; they are tiny, but keep them off the reactor.
            match tokio::task::spawn_blocking(move || {
                this.poll_files(&mut seen);
                seen
            })
            .await
            {
                Ok(seen) => last_seen = seen,
                Err(e) => warn!(error = %e, "certificate poll task failed"),
            }
        }
    }
}

/// The certificate new handshakes get; swapped by the poller.
#[derive(Debug)]
struct CurrentCert(RwLock<Arc<CertifiedKey>>);

impl CurrentCert {
    fn get(&self) -> Arc<CertifiedKey> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, key: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = key;
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// Certificate and key file contents, as read.
type PemPair = (Vec<u8>, Vec<u8>);

/// Loads a pair from files; also returns the bytes read, so the poller knows what it has.
fn load_pair(
    provider: &CryptoProvider,
    cert: &Path,
    key: &Path,
) -> Result<(CertifiedKey, PemPair), Error> {
    let err = |reason: String| Error::Load {
        cert: cert.to_owned(),
        key: key.to_owned(),
        reason,
    };
    let cert_pem =
        std::fs::read(cert).map_err(|e| err(format!("reading {}: {e}", cert.display())))?;
    let key_pem = std::fs::read(key).map_err(|e| err(format!("reading {}: {e}", key.display())))?;
    let certified = parse_pair(provider, &cert_pem, &key_pem).map_err(err)?;
    Ok((certified, (cert_pem, key_pem)))
}

/// A CA and a serving certificate signed by it, like the Go apiservers' `--cert-dir` default:
/// clients trust the CA; the served chain is leaf + CA.
fn self_signed(
    provider: &CryptoProvider,
    names: &[String],
) -> Result<(CertifiedKey, String), Error> {
    let e = |e: rcgen::Error| Error::SelfSigned(e.to_string());
    let now = time::OffsetDateTime::now_utc();
    let not_before = now - time::Duration::hours(1);
    let not_after = now + time::Duration::days(365);

    let ca_key = rcgen::KeyPair::generate().map_err(e)?;
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca_params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("openclaw-metrics-adapter-ca@{}", now.unix_timestamp()),
    );
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    ca_params.not_before = not_before;
    ca_params.not_after = not_after;
    let ca_cert = ca_params.self_signed(&ca_key).map_err(e)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let mut sans = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    for name in names {
        if !name.is_empty() && !sans.contains(name) {
            sans.push(name.clone());
        }
    }
    let mut params = rcgen::CertificateParams::new(sans).map_err(e)?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("openclaw-metrics-adapter@{}", now.unix_timestamp()),
    );
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = not_before;
    params.not_after = not_after;
    let leaf_key = rcgen::KeyPair::generate().map_err(e)?;
    let leaf = params.signed_by(&leaf_key, &issuer).map_err(e)?;

    let chain = vec![leaf.der().clone(), ca_cert.der().clone()];
    let key = PrivateKeyDer::try_from(leaf_key.serialize_der())
        .map_err(|m| Error::SelfSigned(m.to_owned()))?;
    let certified = CertifiedKey::from_der(chain, key, provider)?;
    Ok((certified, ca_cert.pem()))
}

/// Asks for a client certificate, does not require one, and accepts any chain whose key the
/// client proves it holds; trust is decided per request by `auth` (see the module docs).
#[derive(Debug)]
struct RequestClientCert {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for RequestClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Serves `app` over TLS on `listener` until `shutdown` completes, then lets in-flight requests
/// finish within the grace period.
///
/// Every request carries `ConnectInfo<SocketAddr>` and, when the client sent one,
/// [`PeerCertificates`] in its extensions. Certificate files are polled while serving.
pub async fn serve<F>(
    listener: TcpListener,
    tls: TlsConfig,
    app: Router,
    shutdown: F,
) -> Result<(), Error>
where
    F: Future<Output = ()> + Send,
{
    let acceptor = TlsAcceptor::from(tls.server_config()?);
    let (stop_tx, stop_rx) = watch::channel(false);
    let poller = tls.inner.files.is_some().then(|| {
        tokio::spawn(
            tls.clone()
                .poll_until(stop_rx)
                .instrument(info_span!("tls_cert_poller")),
        )
    });
    let graceful = GracefulShutdown::new();
    let handshake_timeout = tls.inner.handshake_timeout;
    let mut shutdown = std::pin::pin!(shutdown);

    let result = loop {
        let (tcp, remote) = tokio::select! {
            () = &mut shutdown => break Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) if is_per_connection(&e) => {
                    debug!(error = %e, "accept failed for one connection");
                    continue;
                }
                Err(e) => {
                    // EMFILE and friends: back off rather than spin; the listener stays.
                    warn!(error = %e, "accept failed; retrying in 100ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        let watcher = graceful.watcher();
        tokio::spawn(
            async move {
                let _ = tcp.set_nodelay(true);
                let stream =
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => return debug!(error = %e, "TLS handshake failed"),
                        Err(_) => return debug!("TLS handshake timed out"),
                    };
                let peer = stream.get_ref().1.peer_certificates().and_then(|chain| {
                    PeerCertificates::new(chain.iter().map(|c| c.clone().into_owned()).collect())
                });
                let service = app.map_request(move |mut req: http::Request<Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(remote));
                    if let Some(peer) = &peer {
                        req.extensions_mut().insert(peer.clone());
                    }
                    req
                });
                let builder = auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection_with_upgrades(
                    TokioIo::new(stream),
                    TowerToHyperService::new(service),
                );
                if let Err(e) = watcher.watch(conn).await {
                    debug!(error = %e, "connection ended with an error");
                }
            }
            .instrument(info_span!("conn", %remote)),
        );
    };

    drop(listener);
    let _ = stop_tx.send(true);
    if let Some(poller) = poller {
        let _ = poller.await;
    }
    let grace = tls.inner.shutdown_grace;
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(
            ?grace,
            "grace period over; closing the remaining connections"
        );
    }
    result
}

/// Errors that concern one incoming connection, not the listener.
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    )
}
