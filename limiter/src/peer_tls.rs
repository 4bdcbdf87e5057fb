//! Mutual TLS for peer traffic (issue 12): the peer listener serves TLS and requires a client
//! certificate chaining to a private CA; the replication client presents this replica's
//! certificate and trusts that CA only.
//!
//! What this module decides, and why (docs/crdt.md, "Peer authentication", says which to use
//! when):
//! - **Files, re-read on change.** Certificate chain, key and CA bundle are PEM files
//!   (`OPENCLAW_PEER_TLS_CERT`, `_KEY`, `_CA`: a cert-manager Secret mount). They are polled,
//!   not watched: Kubernetes swaps a Secret volume's `..data` symlink, which file-event
//!   watchers miss (the policies file is polled for the same reason). New handshakes, on both
//!   sides, use the newest good set; connections already open keep theirs. A changed set that
//!   does not load (half-written, key of another certificate, certificate the peers would
//!   refuse) keeps the previous one, logged once and counted in
//!   `openclaw_peer_tls_reloads_total{result="failure"}`.
//! - **One server name for every replica.** Peers are dialled by IP or pod name, which no
//!   certificate issued ahead of time can list. Every peer certificate carries one DNS name
//!   instead, `OPENCLAW_PEER_TLS_SERVER_NAME` (default `openclaw-peer`), and a client checks
//!   that name whatever address it dialled. What is proved is "holds a key the peer CA signed
//!   for the peer name", which is all membership means here: the CA must be dedicated to
//!   peers, or any certificate it signs with that name is a peer.
//! - **Optionally, a name per node too** (`OPENCLAW_PEER_TLS_BIND_NODE`): every certificate
//!   also carries `<node id>.<server name>` ([`node_name`]), and replication takes a message or
//!   an answer only from the node its certificate names (`crate::node_binding`). Membership
//!   alone lets any member speak as any other; this makes a member speak only as itself.
//! - **The certificate is checked before it is used.** At start (`--check-config` included)
//!   and at every reload, this replica's own certificate must pass the checks its peers will
//!   make (chain to the CA, the server name, its node's name when nodes are bound, client and
//!   server authentication usages): a mistake fails here, with the variable named, not as
//!   refused handshakes on every peer.
//! - **No session resumption.** A resumed session skips the certificate checks, so a client
//!   whose CA was rotated away could go on connecting; peer connections are pooled, so a full
//!   handshake per connection costs little.
//! - TLS 1.2 and 1.3, rustls on `ring` (no C build), HTTP/1.1 (what the peer routes speak).

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ResolvesServerCert, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};
use tokio::sync::watch;

use crate::metrics::ResultLabels;

/// The default of `OPENCLAW_PEER_TLS_SERVER_NAME`: the DNS name every peer certificate carries.
pub const DEFAULT_SERVER_NAME: &str = "openclaw-peer";
/// The default of `OPENCLAW_PEER_TLS_RELOAD_MS`.
pub const DEFAULT_RELOAD_MS: u64 = 5000;

const CERT_VAR: &str = "OPENCLAW_PEER_TLS_CERT";
const KEY_VAR: &str = "OPENCLAW_PEER_TLS_KEY";
const CA_VAR: &str = "OPENCLAW_PEER_TLS_CA";

/// Where this replica's peer certificate material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the leaf.
    pub key: PathBuf,
    /// PEM bundle of the CA(s) that sign peer certificates: the only trust roots, both ways.
    pub ca: PathBuf,
}

/// Peer mutual TLS, validated by `config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTlsSettings {
    pub files: PeerTlsFiles,
    /// The DNS name every peer certificate carries and every client checks.
    pub server_name: ServerName<'static>,
    /// How often the files are checked for changes.
    pub reload: Duration,
    /// `OPENCLAW_PEER_TLS_BIND_NODE`: this replica's node id, when every peer certificate must
    /// also name its own node ([`node_name`]) and messages are taken only from the node their
    /// certificate names.
    pub bind_node: Option<String>,
}

impl PeerTlsSettings {
    /// Reads and checks the files as a reload would; every problem names its variable and file.
    pub fn check(&self) -> Result<(), Vec<String>> {
        let pem = Pem::read(&self.files)?;
        Material::build(&provider(), &pem, self).map(|_| ())
    }
}

/// The DNS name a peer certificate carries for node `node` when nodes are bound
/// (`OPENCLAW_PEER_TLS_BIND_NODE`): `<node>.<server name>`, e.g.
/// `openclaw-limiter-7d4b9-x2kq8.openclaw-peer` for a pod of that name. Under the server name,
/// so that one CA-issued name space holds both, and one label per node, so that a wildcard
/// (`*.openclaw-peer`) would name every node (never issue one: it undoes the binding).
pub fn node_name(node: &str, server_name: &ServerName<'_>) -> Result<ServerName<'static>, String> {
    let name = format!("{node}.{}", server_name.to_str());
    ServerName::try_from(name.clone())
        .map_err(|e| format!("`{name}` is not a DNS name: {e}"))
        .and_then(|name| match name {
            ServerName::DnsName(_) => Ok(name),
            _ => Err(format!("`{name:?}` is not a DNS name")),
        })
}

/// Whether `certificate` carries the DNS name of node `node` ([`node_name`]). Only the name is
/// checked: the chain was checked at the handshake that presented it.
pub fn certifies(
    certificate: &CertificateDer<'_>,
    node: &str,
    server_name: &ServerName<'_>,
) -> bool {
    let Ok(name) = node_name(node, server_name) else {
        return false;
    };
    rustls::server::ParsedCertificate::try_from(certificate)
        .and_then(|parsed| rustls::client::verify_server_name(&parsed, &name))
        .is_ok()
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The three files' contents, as read.
#[derive(Clone, PartialEq, Eq)]
struct Pem {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
}

impl fmt::Debug for Pem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key's bytes in a log.
        f.debug_struct("Pem").finish_non_exhaustive()
    }
}

impl Pem {
    fn read(files: &PeerTlsFiles) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let mut read = |var: &str, path: &PathBuf| {
            std::fs::read(path)
                .map_err(|e| errors.push(format!("{var}={}: cannot read: {e}", path.display())))
                .unwrap_or_default()
        };
        let pem = Self {
            cert: read(CERT_VAR, &files.cert),
            key: read(KEY_VAR, &files.key),
            ca: read(CA_VAR, &files.ca),
        };
        if errors.is_empty() {
            Ok(pem)
        } else {
            Err(errors)
        }
    }
}

/// One consistent set: what handshakes started now use, on both sides.
#[derive(Debug)]
struct Material {
    key: Arc<CertifiedKey>,
    clients: Arc<dyn ClientCertVerifier>,
    servers: Arc<WebPkiServerVerifier>,
}

impl Material {
    fn build(
        provider: &Arc<CryptoProvider>,
        pem: &Pem,
        settings: &PeerTlsSettings,
    ) -> Result<Self, Vec<String>> {
        let (files, name) = (&settings.files, &settings.server_name);
        let mut errors = Vec::new();
        let key = openclaw_common::tls::parse_pair(provider, &pem.cert, &pem.key)
            .map_err(|e| {
                errors.push(format!(
                    "{CERT_VAR}={} / {KEY_VAR}={}: {e}",
                    files.cert.display(),
                    files.key.display()
                ))
            })
            .ok();
        let ca = |e: String| format!("{CA_VAR}={}: {e}", files.ca.display());
        let verifiers = openclaw_common::tls::parse_ca_bundle(&pem.ca)
            .and_then(|roots| {
                let roots = Arc::new(roots);
                let clients =
                    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                        .build()
                        .map_err(|e| e.to_string())?;
                let servers = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| e.to_string())?;
                Ok((clients, servers))
            })
            .map_err(|e| errors.push(ca(e)))
            .ok();
        let (Some(key), Some((clients, servers))) = (key, verifiers) else {
            return Err(errors);
        };
        // The checks every peer will make of this certificate, made here first.
        let (leaf, intermediates) = key.cert.split_first().expect("parse_pair refuses empty");
        let now = UnixTime::now();
        let as_client = clients.verify_client_cert(leaf, intermediates, now);
        let as_server = servers.verify_server_cert(leaf, intermediates, name, &[], now);
        if let Err(e) = as_client.map(|_| ()).and(as_server.map(|_| ())) {
            return Err(vec![format!(
                "{CERT_VAR}={}: peers would refuse this certificate: {e} (it must chain to \
                 {CA_VAR}={}, carry the DNS name `{}` (OPENCLAW_PEER_TLS_SERVER_NAME) and allow \
                 client and server authentication)",
                files.cert.display(),
                files.ca.display(),
                name.to_str()
            )]);
        }
        if let Some(node) = &settings.bind_node
            && !certifies(leaf, node, name)
        {
            return Err(vec![format!(
                "{CERT_VAR}={}: with OPENCLAW_PEER_TLS_BIND_NODE=true this replica's certificate \
                 must also carry the DNS name `{node}.{}` (its node id, OPENCLAW_NODE_ID, under \
                 the server name): peers would refuse its messages as another node's",
                files.cert.display(),
                name.to_str()
            )]);
        }
        Ok(Self {
            key: Arc::new(key),
            clients,
            servers,
        })
    }
}

/// The material new handshakes use; swapped by the poller.
#[derive(Debug)]
struct Current(ArcSwap<Material>);

/// This replica's peer TLS: the rustls configurations of both sides and the file poller.
#[derive(Debug)]
pub struct PeerTls {
    settings: PeerTlsSettings,
    provider: Arc<CryptoProvider>,
    current: Arc<Current>,
    /// What was last read, good or not: the poller acts on changes only.
    last_read: Mutex<Option<Pem>>,
    /// The last problem logged, so a file that stays broken is logged and counted once.
    last_error: Mutex<Option<Vec<String>>>,
    counters: ReloadCounters,
}

/// What the poller reports to `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct ReloadCounters {
    /// `openclaw_peer_tls_reloads_total`, by result.
    pub reloads: Family<ResultLabels, Counter>,
    /// `openclaw_peer_tls_last_reload_successful`.
    pub last_ok: Gauge,
}

impl PeerTls {
    /// Loads the files; fails as [`PeerTlsSettings::check`] does.
    pub fn try_new(
        settings: PeerTlsSettings,
        counters: ReloadCounters,
    ) -> Result<Self, Vec<String>> {
        let provider = provider();
        let pem = Pem::read(&settings.files)?;
        let material = Material::build(&provider, &pem, &settings)?;
        for result in ["success", "failure"] {
            let _ = counters.reloads.get_or_create(&ResultLabels { result });
        }
        counters.last_ok.set(1);
        Ok(Self {
            settings,
            provider,
            current: Arc::new(Current(ArcSwap::from_pointee(material))),
            last_read: Mutex::new(Some(pem)),
            last_error: Mutex::new(None),
            counters,
        })
    }

    /// The peer listener's configuration: a client certificate chaining to the CA is required.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, rustls::Error> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_client_cert_verifier(Arc::new(CurrentClients(self.current.clone())))
            .with_cert_resolver(Arc::new(CurrentKey(self.current.clone())));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }

    /// The replication client's configuration: this replica's certificate as its identity, the
    /// CA as the only root, the peer server name checked whatever address was dialled.
    pub fn client_config(&self) -> Result<ClientConfig, rustls::Error> {
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PeerName {
                current: self.current.clone(),
                name: self.settings.server_name.clone(),
            }))
            .with_client_cert_resolver(Arc::new(CurrentKey(self.current.clone())));
        config.resumption = Resumption::disabled();
        Ok(config)
    }

    /// Whether messages are taken only from the node their certificate names
    /// (`OPENCLAW_PEER_TLS_BIND_NODE`).
    pub fn binds_nodes(&self) -> bool {
        self.settings.bind_node.is_some()
    }

    /// Whether `certificate`, presented by a peer, names node `node` ([`certifies`]).
    pub fn names_node(&self, certificate: &CertificateDer<'_>, node: &str) -> bool {
        certifies(certificate, node, &self.settings.server_name)
    }

    /// Re-reads the files once. `Some(true)`: a changed set was installed; `Some(false)`: a
    /// changed set was refused (the previous one stays); `None`: nothing changed.
    pub fn poll_files(&self) -> Option<bool> {
        let read = Pem::read(&self.settings.files);
        let mut last_read = self
            .last_read
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let built = match read {
            Ok(pem) if last_read.as_ref() == Some(&pem) => return None,
            Ok(pem) => {
                let built = Material::build(&self.provider, &pem, &self.settings);
                *last_read = Some(pem);
                built
            }
            Err(problems) => {
                // Unreadable (mid-swap, deleted): read again next time, whatever the bytes.
                *last_read = None;
                Err(problems)
            }
        };
        drop(last_read);
        let mut last_error = self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match built {
            Ok(material) => {
                self.current.0.store(Arc::new(material));
                *last_error = None;
                self.counters
                    .reloads
                    .get_or_create(&ResultLabels { result: "success" })
                    .inc();
                self.counters.last_ok.set(1);
                tracing::info!(cert = %self.settings.files.cert.display(), "peer TLS certificate reloaded; new connections use it");
                Some(true)
            }
            Err(problems) => {
                self.counters.last_ok.set(0);
                if last_error.as_ref() != Some(&problems) {
                    self.counters
                        .reloads
                        .get_or_create(&ResultLabels { result: "failure" })
                        .inc();
                    tracing::error!(
                        problems = %problems.join("; "),
                        "peer TLS files changed but cannot be used; keeping the previous certificate"
                    );
                    *last_error = Some(problems);
                }
                Some(false)
            }
        }
    }

    /// Polls the files every reload interval until `stop`.
    pub async fn watch(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(self.settings.reload);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stop.wait_for(|stopped| *stopped) => return,
            }
            let this = self.clone();
            // Tiny blocking reads, kept off the reactor.
            if let Err(e) = tokio::task::spawn_blocking(move || this.poll_files()).await {
                tracing::warn!(error = %e, "peer TLS poll task failed");
            }
        }
    }
}

/// Both sides present the current certificate.
#[derive(Debug)]
struct CurrentKey(Arc<Current>);

impl ResolvesServerCert for CurrentKey {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.0.load().key.clone())
    }
}

impl ResolvesClientCert for CurrentKey {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.0.load().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Requires a client certificate and checks it against the current CA.
#[derive(Debug)]
struct CurrentClients(Arc<Current>);

impl ClientCertVerifier for CurrentClients {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The hints would borrow from material the poller swaps; peers (rustls, `CurrentKey`)
        // send their one certificate regardless.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .0
            .load()
            .clients
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .0
            .load()
            .clients
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .0
            .load()
            .clients
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.0.load().clients.supported_verify_schemes()
    }
}

/// Checks a peer's certificate against the current CA for the peer server name, not for the
/// address dialled (module docs).
#[derive(Debug)]
struct PeerName {
    current: Arc<Current>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for PeerName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.current.0.load().servers.verify_server_cert(
            end_entity,
            intermediates,
            &self.name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .0
            .load()
            .servers
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .0
            .load()
            .servers
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current.0.load().servers.supported_verify_schemes()
    }
}

/// Certificates for tests: a CA and leaves it signs, as cert-manager would issue them.
#[cfg(test)]
pub(crate) mod test_certs {
    use std::path::Path;

    /// A CA that signs peer certificates.
    pub struct Ca {
        pub pem: String,
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    }

    impl Ca {
        pub fn new(name: &str) -> Self {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::default();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            params.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
            ];
            let cert = params.self_signed(&key).unwrap();
            Self {
                pem: cert.pem(),
                issuer: rcgen::Issuer::new(params, key),
            }
        }

        /// (certificate PEM, key PEM) for `dns_name`, usable as client and server.
        pub fn leaf(&self, dns_name: &str) -> (String, String) {
            self.leaf_for(&[dns_name])
        }

        /// [`Ca::leaf`] carrying every one of `dns_names`.
        pub fn leaf_for(&self, dns_names: &[&str]) -> (String, String) {
            let key = rcgen::KeyPair::generate().unwrap();
            let names = dns_names
                .iter()
                .map(|n| (*n).to_owned())
                .collect::<Vec<_>>();
            let mut params = rcgen::CertificateParams::new(names).unwrap();
            params.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        }

        /// Writes `cert.pem`, `key.pem` and `ca.pem` (this CA) into `dir`.
        pub fn write(&self, dir: &Path, (cert, key): &(String, String)) -> super::PeerTlsFiles {
            let files = super::PeerTlsFiles {
                cert: dir.join("cert.pem"),
                key: dir.join("key.pem"),
                ca: dir.join("ca.pem"),
            };
            std::fs::write(&files.cert, cert).unwrap();
            std::fs::write(&files.key, key).unwrap();
            std::fs::write(&files.ca, &self.pem).unwrap();
            files
        }
    }

    pub fn path_str(path: &Path) -> &str {
        path.to_str().unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::test_certs::Ca;
    use super::*;

    fn settings(files: PeerTlsFiles) -> PeerTlsSettings {
        PeerTlsSettings {
            files,
            server_name: ServerName::try_from(DEFAULT_SERVER_NAME).unwrap(),
            reload: Duration::from_millis(10),
            bind_node: None,
        }
    }

    fn leaf_der(pem: &str) -> CertificateDer<'static> {
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    /// With nodes bound, this replica's own certificate must name its node as well as the
    /// server name, checked at start as its peers will check it; and a certificate names the
    /// nodes whose `<node>.<server name>` it carries, no others.
    #[test]
    fn with_nodes_bound_a_certificate_must_name_its_node() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("peers");
        let shared_only = ca.write(dir.path(), &ca.leaf(DEFAULT_SERVER_NAME));
        let bound = |files: PeerTlsFiles| PeerTlsSettings {
            bind_node: Some("node-a".into()),
            ..settings(files)
        };
        let errors = bound(shared_only.clone()).check().unwrap_err();
        assert!(
            errors[0].starts_with("OPENCLAW_PEER_TLS_CERT=")
                && errors[0].contains("OPENCLAW_PEER_TLS_BIND_NODE")
                && errors[0].contains("`node-a.openclaw-peer`"),
            "{errors:?}"
        );
        assert_eq!(settings(shared_only).check(), Ok(()), "unbound, as before");

        let (cert, key) = ca.leaf_for(&[DEFAULT_SERVER_NAME, "node-a.openclaw-peer"]);
        let named = ca.write(dir.path(), &(cert.clone(), key));
        assert_eq!(bound(named).check(), Ok(()));
        let name = ServerName::try_from(DEFAULT_SERVER_NAME).unwrap();
        let der = leaf_der(&cert);
        assert!(certifies(&der, "node-a", &name));
        assert!(!certifies(&der, "node-b", &name));
        assert!(!certifies(&der, "node-a.openclaw-peer", &name));
        assert!(!certifies(&der, "not a name", &name));
        // The shared name alone names no node.
        let (shared, _) = ca.leaf(DEFAULT_SERVER_NAME);
        assert!(!certifies(&leaf_der(&shared), "node-a", &name));
    }

    fn count(tls: &PeerTls, result: &'static str) -> u64 {
        tls.counters
            .reloads
            .get_or_create(&ResultLabels { result })
            .get()
    }

    #[test]
    fn a_certificate_the_peers_would_refuse_is_refused_first_with_the_variable_named() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("peers");
        let good = ca.write(dir.path(), &ca.leaf(DEFAULT_SERVER_NAME));
        assert_eq!(settings(good.clone()).check(), Ok(()));

        // Another certificate's key.
        let (_, other_key) = ca.leaf(DEFAULT_SERVER_NAME);
        std::fs::write(&good.key, other_key).unwrap();
        let errors = settings(good.clone()).check().unwrap_err();
        assert!(
            errors[0].starts_with("OPENCLAW_PEER_TLS_CERT=")
                && errors[0].contains("OPENCLAW_PEER_TLS_KEY=")
                && errors[0].contains("do not fit together"),
            "{errors:?}"
        );

        // Signed by another CA, or without the peer server name.
        let other = Ca::new("elsewhere");
        let (cert, key) = other.leaf(DEFAULT_SERVER_NAME);
        std::fs::write(&good.cert, cert).unwrap();
        std::fs::write(&good.key, key).unwrap();
        let errors = settings(good.clone()).check().unwrap_err();
        assert!(
            errors[0].contains("peers would refuse this certificate"),
            "{errors:?}"
        );
        let (cert, key) = ca.leaf("somebody-else");
        std::fs::write(&good.cert, cert).unwrap();
        std::fs::write(&good.key, key).unwrap();
        let errors = settings(good.clone()).check().unwrap_err();
        assert!(errors[0].contains("`openclaw-peer`"), "{errors:?}");

        // Missing files: each one named.
        std::fs::remove_file(&good.key).unwrap();
        std::fs::remove_file(&good.ca).unwrap();
        let errors = settings(good).check().unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].starts_with("OPENCLAW_PEER_TLS_KEY="),
            "{errors:?}"
        );
        assert!(errors[1].starts_with("OPENCLAW_PEER_TLS_CA="), "{errors:?}");
    }

    #[test]
    fn a_bad_rotation_keeps_the_last_good_certificate_and_is_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("peers");
        let files = ca.write(dir.path(), &ca.leaf(DEFAULT_SERVER_NAME));
        let tls = PeerTls::try_new(settings(files.clone()), ReloadCounters::default()).unwrap();
        let first = tls.current.0.load().key.cert[0].clone();
        assert_eq!(tls.poll_files(), None, "nothing changed");

        // Half a rotation: the new certificate, the old key.
        let (cert, key) = ca.leaf(DEFAULT_SERVER_NAME);
        std::fs::write(&files.cert, &cert).unwrap();
        assert_eq!(tls.poll_files(), Some(false));
        assert_eq!(tls.poll_files(), None, "the same bad files again");
        assert_eq!(tls.current.0.load().key.cert[0], first);
        assert_eq!((count(&tls, "success"), count(&tls, "failure")), (0, 1));
        assert_eq!(tls.counters.last_ok.get(), 0);

        // The key follows: installed.
        std::fs::write(&files.key, &key).unwrap();
        assert_eq!(tls.poll_files(), Some(true));
        assert_ne!(tls.current.0.load().key.cert[0], first);
        assert_eq!((count(&tls, "success"), count(&tls, "failure")), (1, 1));
        assert_eq!(tls.counters.last_ok.get(), 1);
    }
}
