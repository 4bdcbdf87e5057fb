//! Membership: the set of peers (their replication listeners) this replica talks to.
//!
//! Replication needs to know who the other replicas are; it does not care how they are found.
//! This module turns one of five sources into a `watch` channel of peer addresses, sorted and
//! without duplicates, that changes only when the set changes:
//!
//! * [`Discovery::None`]: a single node; nothing is ever published.
//! * [`Discovery::Static`]: `OPENCLAW_PEERS`, `host:port` entries. Names go through DNS on every
//!   refresh, so `limiter-0.limiter:8081` style names that do not resolve yet (the pod is still
//!   being scheduled) are retried until they do, and an entry that stops resolving keeps the
//!   addresses it last had.
//! * [`Discovery::File`]: `OPENCLAW_PEERS_FILE`, a file of `host:port` lines that something
//!   else rewrites as replicas come and go (VMs, systemd, Nomad, `openclaw-stack`); polled every
//!   [`file::FILE_POLL`], and a file that does not parse keeps the last good set (see [`file`]).
//! * [`Discovery::Dns`]: `OPENCLAW_PEER_DNS`, the `host:port` of a headless Service; every A and
//!   AAAA record is a peer. Set `publishNotReadyAddresses: true` on that Service: DNS otherwise
//!   lists only ready pods, and a restarting replica must sync from its peers *before* it
//!   becomes ready.
//! * [`Discovery::Kubernetes`]: the `discovery.k8s.io/v1` EndpointSlices of a Service, listed
//!   through `kube` with the selector `kubernetes.io/service-name=<service>`. Every endpoint that
//!   is not terminating is a peer, ready or not (same reason as above), on the slice's port named
//!   `peer`. Only the first address of an endpoint is used: the API defines no meaning for the
//!   others and kube-proxy ignores them. `FQDN` slices (deprecated) are ignored. A dual-stack
//!   Service has one slice per family, so each peer then appears once per family.
//!
//! Every source is re-read every `refresh` (default [`DEFAULT_REFRESH`]). A refresh that fails
//! keeps the last known set (a DNS or API server hiccup must not make a replica forget its
//! peers and over-admit), is logged once per distinct error, and shows in [`DiscoveryStatus`]
//! for `/status`. Nothing here ever ends the process.
//!
//! This replica is left out of the set: see [`SelfAddrs`]. In Kubernetes give it `POD_IP`
//! (downward API, `status.podIP`); outside, the bound listener address is enough when the peer
//! list names it, and a listener on `0.0.0.0` counts loopback addresses on its port as itself.
//!
//! # RBAC for the `kubernetes` mode
//!
//! The pod's ServiceAccount needs to read EndpointSlices in its own namespace (`watch` is not
//! used today, granting it lets a later version switch to a watch without a new Role):
//!
//! ```yaml
//! apiVersion: rbac.authorization.k8s.io/v1
//! kind: Role
//! metadata: {name: openclaw-limiter-peers}
//! rules:
//!   - apiGroups: ["discovery.k8s.io"]
//!     resources: ["endpointslices"]
//!     verbs: ["get", "list", "watch"]
//! ---
//! apiVersion: rbac.authorization.k8s.io/v1
//! kind: RoleBinding
//! metadata: {name: openclaw-limiter-peers}
//! roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: openclaw-limiter-peers}
//! subjects:
//!   - {kind: ServiceAccount, name: openclaw-limiter}
//! ```
//!
//! Without it every refresh fails with `403 Forbidden`, which `/status` shows as the last error.

mod dns;
pub mod file;
mod kubernetes;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;

use self::dns::{DnsSource, Resolver, StaticSource};
use self::file::{FILE_POLL, FileSource};
use self::kubernetes::KubeSource;

/// How often peers are re-read when `refresh` is not configured.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(10);

/// The name of the Service port (and so of the EndpointSlice port) of the peer listener.
pub const DEFAULT_PORT_NAME: &str = "peer";

/// The longest a single DNS lookup or API call may take, whatever the refresh interval: a
/// resolver or API server that hangs must not stop the refreshes behind it.
const MAX_LOOKUP_TIME: Duration = Duration::from_secs(30);
/// The shortest: short refresh intervals (tests) must not turn slow answers into failures.
const MIN_LOOKUP_TIME: Duration = Duration::from_secs(2);

/// Where peers come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// A single node: no peers.
    None,
    /// `host:port` entries, each resolved through DNS on every refresh.
    Static(Vec<String>),
    /// A file of `host:port` lines, re-read when it changes.
    File(PathBuf),
    /// `host:port` of a headless Service: every A/AAAA record is a peer on `port`.
    Dns { name: String },
    /// The EndpointSlices of `namespace/service`, on the port named `port_name`.
    Kubernetes {
        namespace: String,
        service: String,
        port_name: String,
    },
}

impl Discovery {
    /// Build from the configuration's values: `OPENCLAW_DISCOVERY` (`kind`), `OPENCLAW_PEERS`,
    /// `OPENCLAW_PEERS_FILE`, `OPENCLAW_PEER_DNS`, `OPENCLAW_KUBE_SERVICE` and `POD_NAMESPACE`. Returns every problem,
    /// one line each, naming the variable. Values that are empty or blank count as unset, so a
    /// manifest may keep `OPENCLAW_PEERS: ""`; a value for another kind is an error, since it
    /// is almost always a forgotten `OPENCLAW_DISCOVERY`. `POD_NAMESPACE` is exempt (the
    /// downward API sets it everywhere). The peers file is not read here (see
    /// [`file::check_peers_file`]).
    pub fn try_from_parts(
        kind: &str,
        peers: Option<&str>,
        peers_file: Option<&str>,
        dns: Option<&str>,
        kube_service: Option<&str>,
        namespace: Option<&str>,
    ) -> Result<Self, Vec<String>> {
        fn given(value: Option<&str>) -> Option<&str> {
            value.map(str::trim).filter(|v| !v.is_empty())
        }
        let (peers, peers_file, dns, kube_service, namespace) = (
            given(peers),
            given(peers_file),
            given(dns),
            given(kube_service),
            given(namespace),
        );
        let kind = kind.trim().to_ascii_lowercase();
        let mut errors = Vec::new();

        // Syntax first, whatever the kind, so one run reports everything.
        let peer_list = peers.map(|list| parse_peer_list(list, &mut errors));
        if let Some(name) = dns
            && let Err(e) = check_host_port(name)
        {
            errors.push(format!("OPENCLAW_PEER_DNS={name:?}: {e}"));
        }
        if let Some(service) = kube_service
            && let Err(e) = check_dns_label(service, true)
        {
            errors.push(format!(
                "OPENCLAW_KUBE_SERVICE={service:?}: not a Service name: {e}"
            ));
        }

        // Each kind's own variable; any other one set is almost always a forgotten
        // OPENCLAW_DISCOVERY. (An unknown kind gets its own error below instead.)
        let sources = [
            ("OPENCLAW_PEERS", peers, "static"),
            ("OPENCLAW_PEERS_FILE", peers_file, "file"),
            ("OPENCLAW_PEER_DNS", dns, "dns"),
            ("OPENCLAW_KUBE_SERVICE", kube_service, "kubernetes"),
        ];
        let known = matches!(
            kind.as_str(),
            "none" | "" | "static" | "file" | "dns" | "kubernetes"
        );
        for (var, value, wants) in sources {
            if known && value.is_some() && wants != kind {
                errors.push(format!(
                    "{var} is set but OPENCLAW_DISCOVERY={kind} does not use it \
                     (set OPENCLAW_DISCOVERY={wants}, or unset {var})"
                ));
            }
        }
        let discovery = match kind.as_str() {
            "none" | "" => Some(Discovery::None),
            "static" => {
                if peer_list.is_none() {
                    errors.push(
                        "OPENCLAW_PEERS is required with OPENCLAW_DISCOVERY=static \
                         (comma-separated host:port of the peers' peer listeners)"
                            .into(),
                    );
                }
                peer_list.map(Discovery::Static)
            }
            "file" => {
                if peers_file.is_none() {
                    errors.push(
                        "OPENCLAW_PEERS_FILE is required with OPENCLAW_DISCOVERY=file \
                         (a file of host:port lines, the peers' peer listeners)"
                            .into(),
                    );
                }
                peers_file.map(|path| Discovery::File(PathBuf::from(path)))
            }
            "dns" => {
                if dns.is_none() {
                    errors.push(
                        "OPENCLAW_PEER_DNS is required with OPENCLAW_DISCOVERY=dns \
                         (host:port of a headless Service, e.g. openclaw-limiter-peers:8081)"
                            .into(),
                    );
                }
                dns.map(|name| Discovery::Dns {
                    name: name.to_owned(),
                })
            }
            "kubernetes" => {
                if kube_service.is_none() {
                    errors.push(
                        "OPENCLAW_KUBE_SERVICE is required with OPENCLAW_DISCOVERY=kubernetes \
                         (the Service whose EndpointSlices list the replicas)"
                            .into(),
                    );
                }
                match namespace {
                    None => errors.push(
                        "POD_NAMESPACE is required with OPENCLAW_DISCOVERY=kubernetes \
                         (set it from the downward API: fieldRef metadata.namespace)"
                            .into(),
                    ),
                    Some(ns) => {
                        if let Err(e) = check_dns_label(ns, false) {
                            errors.push(format!("POD_NAMESPACE={ns:?}: not a namespace name: {e}"));
                        }
                    }
                }
                match (kube_service, namespace) {
                    (Some(service), Some(namespace)) => Some(Discovery::Kubernetes {
                        namespace: namespace.to_owned(),
                        service: service.to_owned(),
                        port_name: DEFAULT_PORT_NAME.to_owned(),
                    }),
                    _ => None,
                }
            }
            other => {
                errors.push(format!(
                    "OPENCLAW_DISCOVERY={other:?} is not one of none, static, file, dns, kubernetes"
                ));
                None
            }
        };
        match discovery {
            Some(discovery) if errors.is_empty() => Ok(discovery),
            _ => Err(errors),
        }
    }

    /// `none`, `static`, `file`, `dns` or `kubernetes`, as `OPENCLAW_DISCOVERY` spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            Discovery::None => "none",
            Discovery::Static(_) => "static",
            Discovery::File(_) => "file",
            Discovery::Dns { .. } => "dns",
            Discovery::Kubernetes { .. } => "kubernetes",
        }
    }

    /// What is being read, for logs and `/status`.
    pub fn source(&self) -> String {
        match self {
            Discovery::None => String::new(),
            Discovery::Static(entries) => entries.join(","),
            Discovery::File(path) => path.display().to_string(),
            Discovery::Dns { name } => name.clone(),
            Discovery::Kubernetes {
                namespace,
                service,
                port_name,
            } => format!("{namespace}/{service} port {port_name}"),
        }
    }
}

fn parse_peer_list(list: &str, errors: &mut Vec<String>) -> Vec<String> {
    let mut entries: Vec<String> = Vec::new();
    for (i, entry) in list.split(',').enumerate() {
        let entry = entry.trim();
        let n = i + 1;
        if entry.is_empty() {
            errors.push(format!(
                "OPENCLAW_PEERS entry {n} is empty (stray comma in {list:?}?)"
            ));
        } else if let Err(e) = check_host_port(entry) {
            errors.push(format!("OPENCLAW_PEERS entry {n} ({entry:?}): {e}"));
        } else if entries.iter().any(|seen| seen == entry) {
            errors.push(format!(
                "OPENCLAW_PEERS entry {n} ({entry:?}) is listed twice"
            ));
        } else {
            entries.push(entry.to_owned());
        }
    }
    entries
}

/// `host:port` where host is an IPv4 address, a bracketed IPv6 address or a DNS name.
fn check_host_port(value: &str) -> Result<(), String> {
    const EXAMPLE: &str = "expected host:port, e.g. limiter-0.limiter:8081 or [fd00::1]:8081";
    if value.contains("://") {
        return Err(format!("a URL, not host:port ({EXAMPLE})"));
    }
    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        let Some((ip, port)) = rest.split_once("]:") else {
            return Err(format!(
                "missing \"]:port\" after the IPv6 address ({EXAMPLE})"
            ));
        };
        if ip.parse::<Ipv6Addr>().is_err() {
            return Err(format!("{ip:?} is not an IPv6 address"));
        }
        (None, port)
    } else {
        let Some((host, port)) = value.rsplit_once(':') else {
            return Err(format!("missing \":port\" ({EXAMPLE})"));
        };
        if host.contains(':') {
            return Err(format!("IPv6 addresses need brackets ({EXAMPLE})"));
        }
        (Some(host), port)
    };
    let mut problems = Vec::new();
    if let Some(host) = host
        && host.parse::<std::net::Ipv4Addr>().is_err()
        && let Err(e) = check_dns_name(host)
    {
        problems.push(e);
    }
    match port.parse::<u16>() {
        Ok(0) => problems.push("port 0 cannot be dialled".to_owned()),
        Ok(_) => {}
        Err(_) => problems.push(format!("port {port:?} is not a number from 1 to 65535")),
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// A host name as resolvers accept it (RFC 1123 labels; `_` tolerated, a trailing dot too).
fn check_dns_name(host: &str) -> Result<(), String> {
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() {
        return Err("the host is empty".into());
    }
    if name.len() > 253 {
        return Err("the host name is longer than 253 bytes".into());
    }
    for label in name.split('.') {
        let ok_chars = label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if label.is_empty()
            || label.len() > 63
            || !ok_chars
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return Err(format!(
                "{host:?} is not a host name (labels of 1 to 63 letters, digits and '-')"
            ));
        }
    }
    Ok(())
}

/// A Kubernetes object name that must be a DNS label: RFC 1035 for Services (starts with a
/// letter), RFC 1123 for namespaces.
fn check_dns_label(value: &str, must_start_with_letter: bool) -> Result<(), String> {
    let valid_chars = value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let first_ok = value
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || (!must_start_with_letter && b.is_ascii_digit()));
    if value.len() > 63 || !valid_chars || !first_ok || value.ends_with('-') {
        Err(format!(
            "expected at most 63 lowercase letters, digits and '-', starting with a {} and not \
             ending with '-'",
            if must_start_with_letter {
                "letter"
            } else {
                "letter or digit"
            }
        ))
    } else {
        Ok(())
    }
}

/// What identifies this replica among the discovered addresses, so it never peers with itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SelfAddrs {
    /// Addresses peers reach this replica at (`POD_IP`, or both of `POD_IPS` when dual-stack).
    pub ips: Vec<IpAddr>,
    /// The port peers dial this replica's peer listener on.
    pub port: u16,
    /// The address the peer listener is bound to, possibly `0.0.0.0:port`.
    pub listener: Option<SocketAddr>,
}

impl SelfAddrs {
    /// The bound peer listener plus the IPs this replica is known by (may be empty).
    pub fn new(listener: SocketAddr, ips: impl IntoIterator<Item = IpAddr>) -> Self {
        Self {
            ips: ips.into_iter().collect(),
            port: listener.port(),
            listener: Some(listener),
        }
    }

    /// Whether `addr` is this replica: the listener itself, one of `ips` on `port`, or (for a
    /// listener on an unspecified address) a loopback address on `port`.
    pub fn is_self(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip().to_canonical();
        if self
            .listener
            .is_some_and(|l| l.port() == addr.port() && l.ip().to_canonical() == ip)
        {
            return true;
        }
        addr.port() == self.port
            && (self.ips.iter().any(|own| own.to_canonical() == ip)
                || self
                    .listener
                    .is_some_and(|l| l.ip().is_unspecified() && ip.is_loopback()))
    }
}

/// What membership looks like right now, shared with `/status`.
#[derive(Debug)]
pub struct DiscoveryStatus {
    kind: &'static str,
    source: String,
    inner: Mutex<StatusInner>,
}

#[derive(Debug, Default)]
struct StatusInner {
    peers: Vec<SocketAddr>,
    healthy: bool,
    refreshes: u64,
    failed_refreshes: u64,
    last_success: Option<SystemTime>,
    last_error: Option<(String, SystemTime)>,
}

/// [`DiscoveryStatus`] at one instant, ready to serialize into `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiscoveryReport {
    /// `none`, `static`, `file`, `dns` or `kubernetes`.
    pub kind: &'static str,
    /// The peer list, peers file, DNS name, or `namespace/service port name` being read.
    pub source: String,
    /// The peers currently published (this replica excluded).
    pub peers: Vec<String>,
    /// Whether the latest refresh read everything it should have.
    pub healthy: bool,
    /// Refreshes done since start, and how many of them failed (fully or partly).
    pub refreshes: u64,
    pub failed_refreshes: u64,
    /// When a refresh last read everything, in milliseconds since the Unix epoch.
    pub last_success_unix_ms: Option<u64>,
    /// The most recent failure and when it happened; kept after recovery, for the post-mortem.
    pub last_error: Option<String>,
    pub last_error_unix_ms: Option<u64>,
}

impl DiscoveryStatus {
    pub fn new(discovery: &Discovery) -> Self {
        Self {
            kind: discovery.kind(),
            source: discovery.source(),
            inner: Mutex::default(),
        }
    }

    pub fn report(&self) -> DiscoveryReport {
        let unix_ms = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0)
        };
        let inner = self.lock();
        DiscoveryReport {
            kind: self.kind,
            source: self.source.clone(),
            peers: inner.peers.iter().map(SocketAddr::to_string).collect(),
            healthy: inner.healthy,
            refreshes: inner.refreshes,
            failed_refreshes: inner.failed_refreshes,
            last_success_unix_ms: inner.last_success.map(unix_ms),
            last_error: inner.last_error.as_ref().map(|(e, _)| e.clone()),
            last_error_unix_ms: inner.last_error.as_ref().map(|(_, t)| unix_ms(*t)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StatusInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, peers: Option<&[SocketAddr]>, error: Option<&str>) {
        let now = SystemTime::now();
        let mut inner = self.lock();
        if let Some(peers) = peers {
            inner.peers = peers.to_vec();
        }
        inner.refreshes += 1;
        inner.healthy = error.is_none();
        match error {
            None => inner.last_success = Some(now),
            Some(e) => {
                inner.failed_refreshes += 1;
                inner.last_error = Some((e.to_owned(), now));
            }
        }
    }
}

/// One refresh's result: `addrs` is `None` when nothing trustworthy was read (keep the last
/// set); `error` is set when anything failed, even if `addrs` still holds a usable set.
#[derive(Debug, Default)]
struct Outcome {
    addrs: Option<Vec<SocketAddr>>,
    error: Option<String>,
}

impl Outcome {
    fn ok(addrs: Vec<SocketAddr>) -> Self {
        Self {
            addrs: Some(addrs),
            error: None,
        }
    }

    fn failed(error: impl Into<String>) -> Self {
        Self {
            addrs: None,
            error: Some(error.into()),
        }
    }
}

enum Source {
    Static(StaticSource),
    File(FileSource),
    Dns(DnsSource),
    Kubernetes(KubeSource),
}

impl Source {
    async fn refresh(&mut self) -> Outcome {
        match self {
            Source::Static(source) => source.refresh().await,
            Source::File(source) => source.refresh().await,
            Source::Dns(source) => source.refresh().await,
            Source::Kubernetes(source) => source.refresh().await,
        }
    }
}

/// Discovery with its options, ready to [`run`](Membership::run).
pub struct Membership {
    discovery: Discovery,
    self_addrs: SelfAddrs,
    refresh: Duration,
    status: Arc<DiscoveryStatus>,
    kube_client: Option<kube::Client>,
    resolver: Resolver,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("discovery", &self.discovery)
            .field("self_addrs", &self.self_addrs)
            .field("refresh", &self.refresh)
            .field(
                "kube_client",
                &self.kube_client.as_ref().map(|_| "injected"),
            )
            .finish_non_exhaustive()
    }
}

impl Membership {
    pub fn new(discovery: Discovery, self_addrs: SelfAddrs, refresh: Duration) -> Self {
        let lookup_time = refresh.clamp(MIN_LOOKUP_TIME, MAX_LOOKUP_TIME);
        Self {
            status: Arc::new(DiscoveryStatus::new(&discovery)),
            discovery,
            self_addrs,
            refresh,
            kube_client: None,
            resolver: Resolver::system(lookup_time),
        }
    }

    /// Use this client for the `kubernetes` mode instead of the in-cluster configuration
    /// (tests point it at a double; a kubeconfig-based client works the same way).
    pub fn with_kube_client(mut self, client: kube::Client) -> Self {
        self.kube_client = Some(client);
        self
    }

    /// The status this membership keeps up to date; clone the `Arc` into `/status`.
    pub fn status(&self) -> Arc<DiscoveryStatus> {
        self.status.clone()
    }

    /// Refresh now and then every `refresh` until `stop` turns true (or its sender is
    /// dropped), publishing on `peers` each time the set changes. Never fails: problems are
    /// logged once each and kept in [`DiscoveryStatus`].
    pub async fn run(self, peers: watch::Sender<Vec<SocketAddr>>, mut stop: watch::Receiver<bool>) {
        let Membership {
            discovery,
            self_addrs,
            refresh,
            status,
            kube_client,
            resolver,
        } = self;
        let lookup_time = refresh.clamp(MIN_LOOKUP_TIME, MAX_LOOKUP_TIME);
        tracing::info!(
            kind = discovery.kind(),
            source = %discovery.source(),
            refresh_ms = u64::try_from(refresh.as_millis()).unwrap_or(u64::MAX),
            "peer discovery started"
        );
        // A file is cheap to read and is followed closely; its names are resolved every
        // `refresh` (by the source) like every other source's.
        let poll = match discovery {
            Discovery::File(_) => refresh.min(FILE_POLL),
            _ => refresh,
        };
        let mut source = match discovery {
            Discovery::None => {
                status.record(Some(&[]), None);
                let _ = stop.wait_for(|stopped| *stopped).await;
                return;
            }
            Discovery::Static(entries) => Source::Static(StaticSource::new(entries, resolver)),
            Discovery::File(path) => Source::File(FileSource::new(path, resolver, refresh)),
            Discovery::Dns { name } => Source::Dns(DnsSource::new(name, resolver)),
            Discovery::Kubernetes {
                namespace,
                service,
                port_name,
            } => Source::Kubernetes(KubeSource::new(
                namespace,
                service,
                port_name,
                kube_client,
                lookup_time,
            )),
        };
        let mut ticks = tokio::time::interval(poll.max(Duration::from_millis(1)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut logged_error: Option<String> = None;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stop.wait_for(|stopped| *stopped) => return,
            }
            let outcome = tokio::select! {
                outcome = source.refresh() => outcome,
                _ = stop.wait_for(|stopped| *stopped) => return,
            };
            apply(outcome, &self_addrs, &peers, &status, &mut logged_error);
        }
    }
}

/// Publish a refresh's set if it changed, log what is new, and update the status.
fn apply(
    outcome: Outcome,
    self_addrs: &SelfAddrs,
    peers: &watch::Sender<Vec<SocketAddr>>,
    status: &DiscoveryStatus,
    logged_error: &mut Option<String>,
) {
    let next: Option<Vec<SocketAddr>> = outcome.addrs.map(|addrs| {
        let set: BTreeSet<SocketAddr> = addrs
            .into_iter()
            .filter(|addr| !self_addrs.is_self(*addr))
            .collect();
        set.into_iter().collect()
    });
    if let Some(next) = &next {
        let mut previous = Vec::new();
        let changed = peers.send_if_modified(|current| {
            if current == next {
                return false;
            }
            previous = std::mem::replace(current, next.clone());
            true
        });
        if changed {
            let added: Vec<String> = next
                .iter()
                .filter(|a| !previous.contains(a))
                .map(SocketAddr::to_string)
                .collect();
            let removed: Vec<String> = previous
                .iter()
                .filter(|a| !next.contains(a))
                .map(SocketAddr::to_string)
                .collect();
            tracing::info!(
                peers = next.len(),
                added = %added.join(","),
                removed = %removed.join(","),
                "peer set changed"
            );
        }
    }
    match &outcome.error {
        None => {
            if logged_error.take().is_some() {
                tracing::info!("peer discovery recovered");
            }
        }
        Some(error) => {
            if logged_error.as_deref() != Some(error.as_str()) {
                if next.is_some() {
                    tracing::warn!(%error, "peer discovery partly failed; what did not fail is published, the rest keeps its last addresses");
                } else {
                    tracing::warn!(%error, "peer discovery failed; keeping the last known peers");
                }
                *logged_error = Some(error.clone());
            }
        }
    }
    status.record(next.as_deref(), outcome.error.as_deref());
}

/// [`Membership::run`] without access to the status: `Membership::new(discovery, self_addrs,
/// refresh).run(peers, stop)`.
pub async fn run(
    discovery: Discovery,
    self_addrs: SelfAddrs,
    refresh: Duration,
    peers: watch::Sender<Vec<SocketAddr>>,
    stop: watch::Receiver<bool>,
) {
    Membership::new(discovery, self_addrs, refresh)
        .run(peers, stop)
        .await;
}

#[cfg(test)]
mod tests;
