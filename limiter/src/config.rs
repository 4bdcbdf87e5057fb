//! The whole configuration surface: flags, each with its environment variable (the operations
//! guide's ConfigMap and Secret set the variables). Parsing reads everything and validation
//! reports every problem before the process exits with status 64.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::bucket::Rate;
use crate::membership::Discovery;
use crate::policy::{PolicyIds, PolicySet};

/// The example Secret in the operations guide ships this value; starting with it would protect
/// the API with a key everyone knows.
const PLACEHOLDER_API_KEY: &str = "REPLACE_WITH_REAL_KEY";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// OpenClaw edge rate limiter: token buckets replicated as a CRDT, decided over HTTP.
///
/// With no flags it runs one node with a `default` policy of 1000 tokens per second.
#[derive(Debug, Clone, Parser)]
#[command(name = "openclaw-limiter", version, about, long_about = None)]
pub struct Args {
    /// Without a command, run a limiter node.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Address of the decision API (`/rate`, `/status`, health, `/metrics`). Port 0 picks a free port.
    #[arg(long, env = "OPENCLAW_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Tokens each bucket of the `default` policy holds.
    #[arg(long, env = "BUCKET_CAPACITY", default_value_t = 1000)]
    pub bucket_capacity: u64,

    /// Milliseconds in which an empty `default` bucket refills completely (continuously).
    #[arg(long, env = "REFILL_INTERVAL_MS", default_value_t = 1000)]
    pub refill_interval_ms: u64,

    /// Bearer token required on `/rate`, `/rate/batch` and `/status` (health and metrics stay open).
    #[arg(long, env = "OPENCLAW_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// This replica's name in `/status` and logs [default: the host name].
    #[arg(long, env = "OPENCLAW_NODE_ID")]
    pub node_id: Option<String>,

    /// YAML file of named policies and per-key overrides; reloaded when it changes.
    #[arg(long, env = "OPENCLAW_POLICIES")]
    pub policies: Option<PathBuf>,

    /// How often to check the policies file for changes, in milliseconds.
    #[arg(long, env = "OPENCLAW_POLICIES_RELOAD_MS", default_value_t = 2000)]
    pub policies_reload_ms: u64,

    /// Seconds to let in-flight requests finish after SIGTERM before closing connections.
    #[arg(long, env = "OPENCLAW_SHUTDOWN_GRACE_S", default_value_t = 10)]
    pub shutdown_grace_s: u64,

    /// Log format on stderr (level from `RUST_LOG`, default `info`).
    #[arg(long, env = "OPENCLAW_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Address of the replication listener (peer traffic only; keep it inside the cluster).
    #[arg(long, env = "OPENCLAW_PEER_LISTEN", default_value = "0.0.0.0:8081")]
    pub peer_listen: SocketAddr,

    /// How to find peers: none, static, file, dns or kubernetes [default: inferred from which
    /// of OPENCLAW_PEERS, OPENCLAW_PEERS_FILE, OPENCLAW_PEER_DNS, OPENCLAW_KUBE_SERVICE is set,
    /// else none].
    #[arg(long, env = "OPENCLAW_DISCOVERY")]
    pub discovery: Option<String>,

    /// Static peers: comma-separated host:port of the other replicas' replication listeners.
    #[arg(long, env = "OPENCLAW_PEERS")]
    pub peers: Option<String>,

    /// A file of peers, one host:port per line (`#` comments), followed when it changes; a file
    /// that does not parse keeps the last good set. Must exist and parse at start.
    #[arg(long, env = "OPENCLAW_PEERS_FILE")]
    pub peers_file: Option<String>,

    /// host:port of a headless Service whose DNS records are the replicas (re-resolved).
    #[arg(long, env = "OPENCLAW_PEER_DNS")]
    pub peer_dns: Option<String>,

    /// Service whose EndpointSlices list the replicas (discovery through the Kubernetes API).
    #[arg(long, env = "OPENCLAW_KUBE_SERVICE")]
    pub kube_service: Option<String>,

    /// Namespace of this pod (downward API), for Kubernetes discovery.
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,

    /// This pod's IP (downward API), so discovery can leave this replica out of its peers.
    #[arg(long, env = "POD_IP")]
    pub pod_ip: Option<IpAddr>,

    /// Seconds between discovery refreshes.
    #[arg(long, env = "OPENCLAW_DISCOVERY_REFRESH_S", default_value_t = 10)]
    pub discovery_refresh_s: u64,

    /// Shared secret that authenticates peer traffic (HMAC-SHA256); required with peers unless
    /// peer mutual TLS is on (then optional, and checked as well when set).
    #[arg(long, env = "OPENCLAW_PEER_SECRET", hide_env_values = true)]
    pub peer_secret: Option<String>,

    /// Peer mutual TLS: this replica's certificate chain (PEM, leaf first), presented to peers
    /// as server and as client. With OPENCLAW_PEER_TLS_KEY and OPENCLAW_PEER_TLS_CA (all three or
    /// none); re-read when it changes.
    #[arg(long, env = "OPENCLAW_PEER_TLS_CERT")]
    pub peer_tls_cert: Option<PathBuf>,

    /// Peer mutual TLS: the private key (PEM) of OPENCLAW_PEER_TLS_CERT.
    #[arg(long, env = "OPENCLAW_PEER_TLS_KEY")]
    pub peer_tls_key: Option<PathBuf>,

    /// Peer mutual TLS: PEM bundle of the CA that signs peer certificates, the only trust root
    /// for peer connections both ways (dedicate it to peers).
    #[arg(long, env = "OPENCLAW_PEER_TLS_CA")]
    pub peer_tls_ca: Option<PathBuf>,

    /// Peer mutual TLS: the DNS name every peer certificate carries, checked by clients
    /// whatever address they dialled (peers are dialled by IP).
    #[arg(long, env = "OPENCLAW_PEER_TLS_SERVER_NAME", default_value = crate::peer_tls::DEFAULT_SERVER_NAME)]
    pub peer_tls_server_name: String,

    /// Peer mutual TLS: take a message (or an answer) only from the node its certificate names.
    /// Every peer certificate must then also carry `<node id>.<server name>` (for a pod,
    /// `<pod name>.openclaw-peer`: cert-manager's csi-driver issues one per pod), so that a
    /// member can speak only as itself.
    #[arg(long, env = "OPENCLAW_PEER_TLS_BIND_NODE", default_value_t = false, action = clap::ArgAction::Set)]
    pub peer_tls_bind_node: bool,

    /// Peer mutual TLS: how often the three files are checked for changes, in milliseconds.
    #[arg(long, env = "OPENCLAW_PEER_TLS_RELOAD_MS", default_value_t = crate::peer_tls::DEFAULT_RELOAD_MS)]
    pub peer_tls_reload_ms: u64,

    /// Milliseconds between delta pushes to peers.
    #[arg(long, env = "OPENCLAW_SYNC_INTERVAL_MS", default_value_t = 50)]
    pub sync_interval_ms: u64,

    /// Milliseconds between full-state pushes to peers (anti-entropy).
    #[arg(
        long,
        env = "OPENCLAW_ANTI_ENTROPY_INTERVAL_MS",
        default_value_t = 5000
    )]
    pub anti_entropy_interval_ms: u64,

    /// `strict` mode: how long a replica may spend its escrow share after sending a round of
    /// peer messages that every other member answered, in milliseconds (docs/crdt.md).
    /// Default: 1000, or 4 sync intervals if that is longer.
    #[arg(long, env = "OPENCLAW_STRICT_LEASE_MS")]
    pub strict_lease_ms: Option<u64>,

    /// `strict` mode: the clock-skew guard. A silent replica's share is given to others after
    /// lease + guard; strict mode's bound holds while replicas' clocks drift apart by less than
    /// this over one lease, in milliseconds.
    #[arg(long, env = "OPENCLAW_STRICT_SKEW_GUARD_MS", default_value_t = 500)]
    pub strict_skew_guard_ms: u64,

    /// `strict` mode: how long a request this replica's share cannot pay waits for one peer's
    /// loan, in milliseconds (1 to 1000). A request asks one peer at a time, at most every
    /// other replica; an answer later than this is dropped (the tokens lent are lost, which can
    /// only refuse, never over-admit). docs/crdt.md, "strict mode", loans.
    #[arg(long, env = "OPENCLAW_STRICT_LOAN_TIMEOUT_MS", default_value_t = 25)]
    pub strict_loan_timeout_ms: u64,

    /// Clock guard, in milliseconds: a peer whose clock is ahead of this replica's by up to this
    /// much pulls this replica's clock forward to its own (so offsets cancel); a peer message,
    /// claim epoch or incarnation further ahead is refused and counted
    /// (`openclaw_peer_clock_refused_total`). When a strict majority of the replicas is further
    /// than this ahead of or behind this replica's system clock, that clock is the wrong one,
    /// and the replica moves to theirs. See docs/crdt.md, "Clocks".
    #[arg(long, env = "OPENCLAW_CLOCK_SKEW_GUARD_MS", default_value_t = 500)]
    pub clock_skew_guard_ms: u64,

    /// Also accept peer requests signed as versions before the head signature signed them (the
    /// body only), whose bodies must be read before anything in them is authenticated. Only
    /// while a rolling upgrade from such a version runs; off by default. See docs/crdt.md,
    /// "What a peer may send".
    #[arg(
        long,
        env = "OPENCLAW_PEER_LEGACY_SIGNATURES",
        default_value_t = false,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub peer_legacy_signatures: bool,

    /// Longest wait at start for peers' state before reporting ready anyway, in milliseconds.
    #[arg(long, env = "OPENCLAW_READY_MAX_WAIT_MS", default_value_t = 5000)]
    pub ready_max_wait_ms: u64,

    /// Buckets this replica holds beyond which it takes no new one from peers (buckets it holds
    /// still merge, and its own clients still get one; refused entries are counted as
    /// `openclaw_peer_entries_refused_total{reason="store_full"}`). About 115-400 bytes each.
    #[arg(long, env = "OPENCLAW_MAX_BUCKETS", default_value_t = crate::replication::DEFAULT_MAX_BUCKETS)]
    pub max_buckets: usize,

    /// Most connections the peer listener holds at once; beyond, new ones wait in the backlog.
    #[arg(long, env = "OPENCLAW_PEER_MAX_CONNECTIONS", default_value_t = crate::listener::DEFAULT_MAX_CONNECTIONS)]
    pub peer_max_connections: usize,

    /// Most connections the peer listener holds at once from one source IP address (an IPv4-mapped
    /// IPv6 address counts as its IPv4 one); beyond, new ones from it are closed at once, unread
    /// (`openclaw_peer_messages_rejected_total{reason="per_source"}`). 1 to
    /// OPENCLAW_PEER_MAX_CONNECTIONS. Default: 64, or OPENCLAW_PEER_MAX_CONNECTIONS if lower; an
    /// honest peer holds one or two, plus one per `strict` loan in flight.
    #[arg(long, env = "OPENCLAW_PEER_MAX_CONNECTIONS_PER_SOURCE")]
    pub peer_max_connections_per_source: Option<usize>,

    /// Seconds after which a peer connection on which nothing moved (no headers, no body, an
    /// unused keep-alive) is closed. Keep it above the peers' 30 s pool idle time.
    #[arg(long, env = "OPENCLAW_PEER_IDLE_TIMEOUT_S", default_value_t = crate::listener::DEFAULT_IDLE_TIMEOUT.as_secs())]
    pub peer_idle_timeout_s: u64,

    /// Directory for snapshots of the bucket state (written periodically and on SIGTERM,
    /// restored at start), one per replica: its lock tells a restarted process that the
    /// previous one is gone (`lineage`). Unset: no snapshots.
    #[arg(long, env = "OPENCLAW_SNAPSHOT_DIR")]
    pub snapshot_dir: Option<PathBuf>,

    /// Seconds between snapshots.
    #[arg(long, env = "OPENCLAW_SNAPSHOT_INTERVAL_S", default_value_t = 60)]
    pub snapshot_interval_s: u64,

    /// Address of Envoy's rate limit service (gRPC, HTTP/2 cleartext); served only when
    /// OPENCLAW_RLS_CONFIG is set. Port 0 picks a free port.
    #[arg(long, env = "OPENCLAW_GRPC_LISTEN", default_value = "0.0.0.0:8082")]
    pub grpc_listen: SocketAddr,

    /// Most connections the gRPC listener holds at once; beyond, new ones wait in the backlog.
    #[arg(long, env = "OPENCLAW_GRPC_MAX_CONNECTIONS", default_value_t = crate::rls::grpc::DEFAULT_LIMITS.max_connections)]
    pub grpc_max_connections: usize,

    /// Most connections the gRPC listener holds at once from one source IP address; beyond,
    /// new ones from it are closed at once, unread
    /// (`openclaw_grpc_connections_closed_total{reason="per_source"}`). 1 to
    /// OPENCLAW_GRPC_MAX_CONNECTIONS. Default: 256, or OPENCLAW_GRPC_MAX_CONNECTIONS if lower; an
    /// Envoy holds one per worker thread and cluster that points here.
    #[arg(long, env = "OPENCLAW_GRPC_MAX_CONNECTIONS_PER_SOURCE")]
    pub grpc_max_connections_per_source: Option<usize>,

    /// Seconds after which a gRPC connection on which nothing moved (a handshake never
    /// finished, a client gone or no longer reading) is closed. Idle live clients are not: a
    /// PING every third of it keeps them moving, and one unanswered for another third closes
    /// the connection.
    #[arg(long, env = "OPENCLAW_GRPC_IDLE_TIMEOUT_S", default_value_t = crate::rls::grpc::DEFAULT_LIMITS.idle_timeout.as_secs())]
    pub grpc_idle_timeout_s: u64,

    /// envoyproxy/ratelimit YAML rules: a file, or a directory of .yaml/.yml files; reloaded
    /// when they change (every OPENCLAW_POLICIES_RELOAD_MS). Setting it starts the gRPC listener.
    #[arg(long, env = "OPENCLAW_RLS_CONFIG")]
    pub rls_config: Option<PathBuf>,

    /// Off-site copy of the snapshots, `s3://bucket/prefix` (needs OPENCLAW_SNAPSHOT_DIR): each
    /// replica uploads its newest verified snapshot to `prefix/<node id>/`. Credentials,
    /// region and endpoint from the standard AWS_* variables. Unset: no off-site copy.
    #[arg(long, env = "OPENCLAW_SNAPSHOT_REMOTE")]
    pub snapshot_remote: Option<String>,

    /// Seconds between off-site uploads (the first follows the first local snapshot).
    #[arg(long, env = "OPENCLAW_SNAPSHOT_REMOTE_INTERVAL_S", default_value_t = crate::remote::DEFAULT_INTERVAL_S)]
    pub snapshot_remote_interval_s: u64,

    /// Off-site snapshots each replica keeps; older ones of its own are deleted.
    #[arg(long, env = "OPENCLAW_SNAPSHOT_REMOTE_KEEP", default_value_t = crate::remote::DEFAULT_KEEP)]
    pub snapshot_remote_keep: usize,

    /// At start, when the local snapshot directory has nothing usable and peers gave no state,
    /// merge the newest valid off-site snapshot of every replica before reporting ready.
    #[arg(
        long,
        env = "OPENCLAW_RESTORE_FROM_REMOTE",
        default_value_t = false,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub restore_from_remote: bool,

    /// Off-site snapshots taken longer ago than this many seconds are skipped by a restore.
    #[arg(long, env = "OPENCLAW_RESTORE_MAX_AGE_S", default_value_t = crate::remote::DEFAULT_MAX_AGE_S)]
    pub restore_max_age_s: u64,

    /// Validate the configuration and the policies file, print the policies, and exit.
    #[arg(long)]
    pub check_config: bool,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Disaster recovery, offline: seed a snapshot directory from the off-site store, and exit.
    ///
    /// Merges the newest valid off-site snapshot of every replica under a prefix, and writes the
    /// result as one local snapshot that a replica started on that directory loads. Options of the node (policies, OPENCLAW_RLS_CONFIG, the `default`
    /// policy's rate) go before `restore` or in the environment, as for the node: buckets of
    /// policies they do not define are dropped. Exit status: 0 written, 64 invalid
    /// configuration, 66 no valid snapshot found, 69 the store could not be listed or stopped
    /// answering, 73 the directory is unusable or already holds snapshots.
    Restore(RestoreArgs),
}

/// `openclaw-limiter restore`.
#[derive(Debug, Clone, clap::Args)]
pub struct RestoreArgs {
    /// Where the replicas shipped their snapshots, `s3://bucket/prefix`. Credentials, region
    /// and endpoint from the standard AWS_* variables.
    #[arg(long, env = "OPENCLAW_SNAPSHOT_REMOTE")]
    pub from: Option<String>,

    /// The local snapshot directory to seed; created if missing.
    #[arg(long, env = "OPENCLAW_SNAPSHOT_DIR")]
    pub into: Option<PathBuf>,

    /// Skip off-site snapshots taken longer ago than this many seconds.
    #[arg(long, env = "OPENCLAW_RESTORE_MAX_AGE_S", default_value_t = crate::remote::DEFAULT_MAX_AGE_S)]
    pub max_age_s: u64,

    /// Write even if the directory already holds snapshots: the restored one becomes the newest,
    /// the one a replica loads (older ones are pruned to the newest 3, as a replica would).
    #[arg(long)]
    pub force: bool,
}

/// `openclaw-limiter restore`, validated.
#[derive(Debug, Clone)]
pub struct RestoreSettings {
    pub from: crate::remote::RemoteLocation,
    pub into: PathBuf,
    pub max_age: Duration,
    pub force: bool,
}

impl RestoreSettings {
    /// Validate everything; on failure return every problem.
    pub fn try_from_args(args: &RestoreArgs) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let from = match args.from.as_deref() {
            None => {
                errors.push(
                    "restore: --from s3://bucket/prefix (or OPENCLAW_SNAPSHOT_REMOTE) is required"
                        .into(),
                );
                None
            }
            Some(url) => crate::remote::RemoteLocation::parse(url)
                .map_err(|e| errors.push(format!("restore --from: {e}")))
                .ok(),
        };
        if args.into.is_none() {
            errors.push(
                "restore: --into DIR (or OPENCLAW_SNAPSHOT_DIR) is required: the snapshot directory to seed"
                    .into(),
            );
        }
        if args.max_age_s == 0 {
            errors.push(
                "restore: --max-age-s (OPENCLAW_RESTORE_MAX_AGE_S) must be at least 1".into(),
            );
        }
        match (errors.is_empty(), from, args.into.clone()) {
            (true, Some(from), Some(into)) => Ok(Self {
                from,
                into,
                max_age: Duration::from_secs(args.max_age_s),
                force: args.force,
            }),
            _ => Err(errors),
        }
    }
}

/// Minimum length of the peer secret: shorter ones are guessable.
pub const MIN_PEER_SECRET_BYTES: usize = 16;

/// Replication settings; present only when a discovery kind other than `none` is configured.
#[derive(Debug, Clone)]
pub struct ReplicationSettings {
    pub listen: SocketAddr,
    pub discovery: Discovery,
    /// This pod's IP, left out of the peers discovery finds.
    pub pod_ip: Option<IpAddr>,
    pub discovery_refresh: Duration,
    /// `OPENCLAW_PEER_SECRET`; absent only with peer mutual TLS.
    pub secret: Option<String>,
    /// Peer mutual TLS, when `OPENCLAW_PEER_TLS_*` are set.
    pub tls: Option<crate::peer_tls::PeerTlsSettings>,
    pub sync_interval: Duration,
    pub anti_entropy_interval: Duration,
    pub ready_max_wait: Duration,
    pub strict_lease: Duration,
    pub strict_skew_guard: Duration,
    pub strict_loan_timeout: Duration,
    pub clock_skew_guard: Duration,
    /// Accept body-only signatures (a rolling upgrade from an earlier version).
    pub legacy_signatures: bool,
    /// Connection limits of the peer listener.
    pub peer_limits: crate::listener::Limits,
    /// Buckets held beyond which none is taken from peers.
    pub max_buckets: usize,
}

/// Envoy's rate limit service, present when `OPENCLAW_RLS_CONFIG` is set.
#[derive(Debug, Clone)]
pub struct RlsSettings {
    pub listen: SocketAddr,
    pub limits: crate::listener::Limits,
    pub path: PathBuf,
    /// The files as read and validated at start: (name, text).
    pub files: Vec<(String, String)>,
}

/// Off-site snapshot settings; present only when `OPENCLAW_SNAPSHOT_REMOTE` is set.
#[derive(Debug, Clone)]
pub struct RemoteSettings {
    pub location: crate::remote::RemoteLocation,
    pub interval: Duration,
    pub keep: usize,
    pub restore: bool,
    pub restore_max_age: Duration,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub default_rate: Rate,
    pub api_key: Option<String>,
    pub node_id: String,
    pub policies_path: Option<PathBuf>,
    /// The policies file's text as read at start (validated).
    pub policies_text: Option<String>,
    pub policies_reload: Duration,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    pub replication: Option<ReplicationSettings>,
    pub snapshot_dir: Option<PathBuf>,
    pub snapshot_interval: Duration,
    pub rls: Option<RlsSettings>,
    pub snapshot_remote: Option<RemoteSettings>,
}

impl Config {
    /// Validate everything; on failure return every problem, one per line.
    pub fn try_from_args(args: Args) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let default_rate = Rate::try_new(args.bucket_capacity, args.refill_interval_ms)
            .map_err(|e| errors.push(format!("BUCKET_CAPACITY / REFILL_INTERVAL_MS: {e}")))
            .ok();
        match args.api_key.as_deref() {
            Some("") => errors.push("OPENCLAW_API_KEY is set but empty: unset it to disable auth".into()),
            Some(PLACEHOLDER_API_KEY) => errors.push(format!(
                "OPENCLAW_API_KEY still holds the example placeholder {PLACEHOLDER_API_KEY:?}: put a real secret in the Secret"
            )),
            _ => {}
        }
        let node_id = args.node_id.clone().unwrap_or_else(hostname);
        if node_id.is_empty() || node_id.len() > 253 {
            errors.push("OPENCLAW_NODE_ID must be 1 to 253 bytes".into());
        }
        if args.policies_reload_ms == 0 {
            errors.push("OPENCLAW_POLICIES_RELOAD_MS must be at least 1".into());
        }
        let mut policies_text = None;
        if let Some(path) = &args.policies {
            match std::fs::read_to_string(path) {
                Err(e) => errors.push(format!(
                    "OPENCLAW_POLICIES: cannot read {}: {e}",
                    path.display()
                )),
                Ok(text) => {
                    if let Some(rate) = default_rate
                        && let Err(problems) =
                            PolicySet::from_yaml(&text, rate, &PolicyIds::default())
                    {
                        errors.extend(
                            problems
                                .0
                                .into_iter()
                                .map(|p| format!("{}: {p}", path.display())),
                        );
                    }
                    policies_text = Some(text);
                }
            }
        }
        let grpc_limits = connection_limits(
            "OPENCLAW_GRPC",
            ConnectionArgs {
                max_connections: args.grpc_max_connections,
                max_connections_per_source: args.grpc_max_connections_per_source,
                idle_timeout_s: args.grpc_idle_timeout_s,
            },
            crate::rls::grpc::DEFAULT_LIMITS.max_connections_per_source,
            &mut errors,
        );
        let rls = args.rls_config.as_ref().and_then(|path| {
            let files = crate::rls::config::read_files(path)
                .map_err(|problems| {
                    errors.extend(
                        problems
                            .0
                            .into_iter()
                            .map(|p| format!("OPENCLAW_RLS_CONFIG: {p}")),
                    )
                })
                .ok()?;
            match crate::rls::RlsConfig::from_files(&files) {
                Ok(_) => Some(RlsSettings {
                    listen: args.grpc_listen,
                    limits: grpc_limits,
                    path: path.clone(),
                    files,
                }),
                Err(problems) => {
                    errors.extend(problems.0);
                    None
                }
            }
        });
        let replication = replication_settings(&args, &node_id, &mut errors);
        if args.snapshot_interval_s == 0 {
            errors.push("OPENCLAW_SNAPSHOT_INTERVAL_S must be at least 1".into());
        }
        let snapshot_remote = remote_settings(&args, &mut errors);
        match (errors.is_empty(), default_rate) {
            (true, Some(default_rate)) => Ok(Self {
                rls,
                snapshot_remote,
                replication,
                snapshot_dir: args.snapshot_dir,
                snapshot_interval: Duration::from_secs(args.snapshot_interval_s),
                listen: args.listen,
                default_rate,
                api_key: args.api_key,
                node_id,
                policies_path: args.policies,
                policies_text,
                policies_reload: Duration::from_millis(args.policies_reload_ms),
                shutdown_grace: Duration::from_secs(args.shutdown_grace_s),
                log_format: args.log_format,
            }),
            _ => Err(errors),
        }
    }
}

/// `OPENCLAW_PEER_TLS_*`: all three files or none, each readable, the pair matching, the
/// certificate one the peers will accept. Checked whenever set, peers or not.
fn peer_tls_settings(
    args: &Args,
    node_id: &str,
    errors: &mut Vec<String>,
) -> Option<crate::peer_tls::PeerTlsSettings> {
    let files = [
        ("OPENCLAW_PEER_TLS_CERT", &args.peer_tls_cert),
        ("OPENCLAW_PEER_TLS_KEY", &args.peer_tls_key),
        ("OPENCLAW_PEER_TLS_CA", &args.peer_tls_ca),
    ];
    let missing: Vec<&str> = files
        .iter()
        .filter(|(_, path)| path.is_none())
        .map(|(name, _)| *name)
        .collect();
    match missing.len() {
        3 => {
            if args.peer_tls_bind_node {
                errors.push(
                    "OPENCLAW_PEER_TLS_BIND_NODE=true needs peer mutual TLS \
                     (OPENCLAW_PEER_TLS_CERT, OPENCLAW_PEER_TLS_KEY, OPENCLAW_PEER_TLS_CA): it \
                     binds a node to the certificate it presents"
                        .into(),
                );
            }
            return None;
        }
        0 => {}
        _ => {
            let set: Vec<&str> = files
                .iter()
                .filter(|(_, path)| path.is_some())
                .map(|(name, _)| *name)
                .collect();
            errors.push(format!(
                "peer mutual TLS needs OPENCLAW_PEER_TLS_CERT, OPENCLAW_PEER_TLS_KEY and \
                 OPENCLAW_PEER_TLS_CA together: {} set but {} missing",
                set.join(", "),
                missing.join(", ")
            ));
            return None;
        }
    }
    let before = errors.len();
    let server_name = rustls::pki_types::ServerName::try_from(args.peer_tls_server_name.clone())
        .map_err(|e| {
            errors.push(format!(
                "OPENCLAW_PEER_TLS_SERVER_NAME={:?}: not a DNS name: {e}",
                args.peer_tls_server_name
            ))
        })
        .ok();
    if args.peer_tls_reload_ms == 0 {
        errors.push("OPENCLAW_PEER_TLS_RELOAD_MS must be at least 1".into());
    }
    if args.peer_tls_bind_node
        && let Some(server_name) = &server_name
        && let Err(e) = crate::peer_tls::node_name(node_id, server_name)
    {
        errors.push(format!(
            "OPENCLAW_PEER_TLS_BIND_NODE=true names this node `<OPENCLAW_NODE_ID>.<OPENCLAW_PEER_TLS_SERVER_NAME>` in its certificate: {e} (node ids must be DNS labels, as pod names are)"
        ));
    }
    let settings = crate::peer_tls::PeerTlsSettings {
        files: crate::peer_tls::PeerTlsFiles {
            cert: args.peer_tls_cert.clone()?,
            key: args.peer_tls_key.clone()?,
            ca: args.peer_tls_ca.clone()?,
        },
        server_name: server_name?,
        reload: Duration::from_millis(args.peer_tls_reload_ms),
        bind_node: args.peer_tls_bind_node.then(|| node_id.to_owned()),
    };
    if let Err(problems) = settings.check() {
        errors.extend(problems);
    }
    (errors.len() == before).then_some(settings)
}

fn replication_settings(
    args: &Args,
    node_id: &str,
    errors: &mut Vec<String>,
) -> Option<ReplicationSettings> {
    let tls = peer_tls_settings(args, node_id, errors);
    let tls_asked =
        args.peer_tls_cert.is_some() || args.peer_tls_key.is_some() || args.peer_tls_ca.is_some();
    let inferred = if args.peers.is_some() {
        "static"
    } else if args.peers_file.is_some() {
        "file"
    } else if args.peer_dns.is_some() {
        "dns"
    } else if args.kube_service.is_some() {
        "kubernetes"
    } else {
        "none"
    };
    let kind = args
        .discovery
        .clone()
        .unwrap_or_else(|| inferred.to_owned());
    let before = errors.len();
    let discovery = Discovery::try_from_parts(
        &kind,
        args.peers.as_deref(),
        args.peers_file.as_deref(),
        args.peer_dns.as_deref(),
        args.kube_service.as_deref(),
        args.pod_namespace.as_deref(),
    )
    .map_err(|problems| errors.extend(problems))
    .ok();
    if let Some(Discovery::File(path)) = &discovery
        && let Err(problems) = crate::membership::file::check_peers_file(path)
    {
        errors.extend(problems);
    }
    if matches!(discovery, None | Some(Discovery::None)) {
        return None;
    }
    // With mutual TLS the secret is optional: only holders of a CA-signed key connect. Set
    // too, it is checked too (docs/crdt.md, "Peer authentication").
    let secret = match args.peer_secret.as_deref() {
        None if tls_asked => None,
        None => {
            errors.push(format!("OPENCLAW_PEER_SECRET (or peer mutual TLS, OPENCLAW_PEER_TLS_*) is required with peer discovery `{kind}`: peer traffic is always authenticated"));
            None
        }
        Some(s) if s.len() < MIN_PEER_SECRET_BYTES => {
            errors.push(format!(
                "OPENCLAW_PEER_SECRET must be at least {MIN_PEER_SECRET_BYTES} bytes"
            ));
            None
        }
        Some(s) => Some(s.to_owned()),
    };
    for (name, value, min) in [
        ("OPENCLAW_SYNC_INTERVAL_MS", args.sync_interval_ms, 1),
        (
            "OPENCLAW_ANTI_ENTROPY_INTERVAL_MS",
            args.anti_entropy_interval_ms,
            1,
        ),
        ("OPENCLAW_DISCOVERY_REFRESH_S", args.discovery_refresh_s, 1),
        ("OPENCLAW_CLOCK_SKEW_GUARD_MS", args.clock_skew_guard_ms, 1),
        (
            "OPENCLAW_MAX_BUCKETS",
            u64::try_from(args.max_buckets).unwrap_or(u64::MAX),
            1,
        ),
    ] {
        if value < min {
            errors.push(format!("{name} must be at least {min}"));
        }
    }
    let peer_limits = connection_limits(
        "OPENCLAW_PEER",
        ConnectionArgs {
            max_connections: args.peer_max_connections,
            max_connections_per_source: args.peer_max_connections_per_source,
            idle_timeout_s: args.peer_idle_timeout_s,
        },
        crate::listener::DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
        errors,
    );
    let strict_lease_ms = args
        .strict_lease_ms
        .unwrap_or((4 * args.sync_interval_ms).max(1000));
    if strict_lease_ms < 4 * args.sync_interval_ms {
        errors.push(
            "OPENCLAW_STRICT_LEASE_MS must be at least 4 sync intervals (OPENCLAW_SYNC_INTERVAL_MS): \
             a lease is renewed once per round"
                .into(),
        );
    }
    if !(1..=1000).contains(&args.strict_loan_timeout_ms) {
        errors.push("OPENCLAW_STRICT_LOAN_TIMEOUT_MS must be 1 to 1000".into());
    }
    if args.anti_entropy_interval_ms < args.sync_interval_ms {
        errors.push(
            "OPENCLAW_ANTI_ENTROPY_INTERVAL_MS must not be shorter than OPENCLAW_SYNC_INTERVAL_MS"
                .into(),
        );
    }
    (errors.len() == before).then(|| ReplicationSettings {
        listen: args.peer_listen,
        discovery: discovery.expect("checked above"),
        pod_ip: args.pod_ip,
        discovery_refresh: Duration::from_secs(args.discovery_refresh_s),
        secret,
        tls,
        sync_interval: Duration::from_millis(args.sync_interval_ms),
        anti_entropy_interval: Duration::from_millis(args.anti_entropy_interval_ms),
        ready_max_wait: Duration::from_millis(args.ready_max_wait_ms),
        strict_lease: Duration::from_millis(strict_lease_ms),
        strict_skew_guard: Duration::from_millis(args.strict_skew_guard_ms),
        strict_loan_timeout: Duration::from_millis(args.strict_loan_timeout_ms),
        clock_skew_guard: Duration::from_millis(args.clock_skew_guard_ms),
        legacy_signatures: args.peer_legacy_signatures,
        max_buckets: args.max_buckets,
        peer_limits,
    })
}

/// The longest idle timeout a listener takes: a day is far beyond any client's keep-alive, and
/// a timer armed that far stays clear of the clock's range.
const MAX_IDLE_TIMEOUT_S: u64 = 86_400;

/// One listener's `<PREFIX>_MAX_CONNECTIONS`, `<PREFIX>_MAX_CONNECTIONS_PER_SOURCE` and
/// `<PREFIX>_IDLE_TIMEOUT_S` as given.
struct ConnectionArgs {
    max_connections: usize,
    max_connections_per_source: Option<usize>,
    idle_timeout_s: u64,
}

/// A listener's connection limits (`crate::listener`), checked: each at least 1, the
/// per-source cap within the total (its default lowered to the total when that is smaller).
fn connection_limits(
    prefix: &str,
    given: ConnectionArgs,
    default_per_source: usize,
    errors: &mut Vec<String>,
) -> crate::listener::Limits {
    let total = given.max_connections;
    if total == 0 {
        errors.push(format!("{prefix}_MAX_CONNECTIONS must be at least 1"));
    }
    if !(1..=MAX_IDLE_TIMEOUT_S).contains(&given.idle_timeout_s) {
        errors.push(format!(
            "{prefix}_IDLE_TIMEOUT_S must be 1 to {MAX_IDLE_TIMEOUT_S} (a day)"
        ));
    }
    match given.max_connections_per_source {
        Some(0) => errors.push(format!(
            "{prefix}_MAX_CONNECTIONS_PER_SOURCE must be at least 1"
        )),
        Some(n) if n > total => errors.push(format!(
            "{prefix}_MAX_CONNECTIONS_PER_SOURCE ({n}) must not exceed \
             {prefix}_MAX_CONNECTIONS ({total}): no source can hold more than all connections"
        )),
        _ => {}
    }
    crate::listener::Limits {
        max_connections: total,
        max_connections_per_source: given
            .max_connections_per_source
            .unwrap_or(default_per_source.min(total)),
        idle_timeout: Duration::from_secs(given.idle_timeout_s),
    }
}

fn remote_settings(args: &Args, errors: &mut Vec<String>) -> Option<RemoteSettings> {
    let Some(url) = args.snapshot_remote.as_deref() else {
        if args.restore_from_remote {
            errors.push("OPENCLAW_RESTORE_FROM_REMOTE needs OPENCLAW_SNAPSHOT_REMOTE".into());
        }
        return None;
    };
    let before = errors.len();
    let location = crate::remote::RemoteLocation::parse(url)
        .map_err(|e| errors.push(e.to_string()))
        .ok();
    if args.snapshot_dir.is_none() {
        errors.push(
            "OPENCLAW_SNAPSHOT_REMOTE needs OPENCLAW_SNAPSHOT_DIR: what is shipped is the newest \
             verified local snapshot"
                .into(),
        );
    }
    for (name, value) in [
        (
            "OPENCLAW_SNAPSHOT_REMOTE_INTERVAL_S",
            args.snapshot_remote_interval_s,
        ),
        (
            "OPENCLAW_SNAPSHOT_REMOTE_KEEP",
            args.snapshot_remote_keep as u64,
        ),
        ("OPENCLAW_RESTORE_MAX_AGE_S", args.restore_max_age_s),
    ] {
        if value == 0 {
            errors.push(format!("{name} must be at least 1"));
        }
    }
    (errors.len() == before).then(|| RemoteSettings {
        location: location.expect("checked above"),
        interval: Duration::from_secs(args.snapshot_remote_interval_s),
        keep: args.snapshot_remote_keep,
        restore: args.restore_from_remote,
        restore_max_age: Duration::from_secs(args.restore_max_age_s),
    })
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "openclaw-limiter".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["openclaw-limiter", "--node-id", "n1"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    #[test]
    fn no_flags_is_a_single_node_with_the_guide_defaults() {
        let config = Config::try_from_args(args(&[])).unwrap();
        assert_eq!(config.default_rate, Rate::try_new(1000, 1000).unwrap());
        assert_eq!(config.listen.to_string(), "0.0.0.0:8080");
        assert!(config.api_key.is_none() && config.policies_path.is_none());
        assert!(config.replication.is_none() && config.snapshot_dir.is_none());
    }

    #[test]
    fn peers_require_an_authenticating_secret() {
        let errors = Config::try_from_args(args(&["--peers", "a:8081"])).unwrap_err();
        assert!(
            errors[0].contains("OPENCLAW_PEER_SECRET (or peer mutual TLS"),
            "{errors:?}"
        );
        let errors = Config::try_from_args(args(&["--peers", "a:8081", "--peer-secret", "short"]))
            .unwrap_err();
        assert!(errors[0].contains("at least 16 bytes"), "{errors:?}");
        let config = Config::try_from_args(args(&[
            "--peers",
            "a:8081",
            "--peer-secret",
            "0123456789abcdef",
        ]))
        .unwrap();
        let replication = config.replication.unwrap();
        assert_eq!(replication.discovery.kind(), "static");
        let errors = Config::try_from_args(args(&[
            "--discovery",
            "dns",
            "--peer-secret",
            "0123456789abcdef",
        ]))
        .unwrap_err();
        assert!(
            errors.iter().any(|e| e.contains("OPENCLAW_PEER_DNS")),
            "{errors:?}"
        );
        assert_eq!(replication.sync_interval, Duration::from_millis(50));
    }

    #[test]
    fn the_per_source_connection_cap_defaults_to_64_and_stays_within_the_total_cap() {
        let peer = |extra: &[&str]| {
            let mut argv = vec!["--peers", "a:8081", "--peer-secret", "0123456789abcdef"];
            argv.extend_from_slice(extra);
            Config::try_from_args(args(&argv)).map(|c| c.replication.unwrap().peer_limits)
        };
        let limits = peer(&[]).unwrap();
        assert_eq!(
            (limits.max_connections, limits.max_connections_per_source),
            (1024, 64)
        );
        // A total cap below the default lowers the default with it.
        let limits = peer(&["--peer-max-connections", "2"]).unwrap();
        assert_eq!(limits.max_connections_per_source, 2);
        let limits = peer(&["--peer-max-connections-per-source", "1024"]).unwrap();
        assert_eq!(limits.max_connections_per_source, 1024);

        // Every peer connection panicked at its first stall before this was refused.
        let errors = peer(&["--peer-idle-timeout-s", "18446744073709551615"]).unwrap_err();
        assert_eq!(
            errors,
            ["OPENCLAW_PEER_IDLE_TIMEOUT_S must be 1 to 86400 (a day)"]
        );
        let errors = peer(&["--peer-max-connections-per-source", "0"]).unwrap_err();
        assert_eq!(
            errors,
            ["OPENCLAW_PEER_MAX_CONNECTIONS_PER_SOURCE must be at least 1"]
        );
        let errors = peer(&[
            "--peer-max-connections",
            "8",
            "--peer-max-connections-per-source",
            "9",
        ])
        .unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with(
                "OPENCLAW_PEER_MAX_CONNECTIONS_PER_SOURCE (9) must not exceed OPENCLAW_PEER_MAX_CONNECTIONS (8)"
            ),
            "{errors:?}"
        );
    }

    #[test]
    fn the_grpc_listener_limits_default_to_4096_256_and_60_s_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("edge.yaml");
        std::fs::write(
            &file,
            "domain: edge\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1}\n",
        )
        .unwrap();
        let grpc = |extra: &[&str]| {
            let mut argv = vec!["--rls-config", file.to_str().unwrap()];
            argv.extend_from_slice(extra);
            Config::try_from_args(args(&argv)).map(|c| {
                let limits = c.rls.unwrap().limits;
                (
                    limits.max_connections,
                    limits.max_connections_per_source,
                    limits.idle_timeout,
                )
            })
        };
        assert_eq!(grpc(&[]).unwrap(), (4096, 256, Duration::from_secs(60)));
        // A total cap below the default lowers the per-source default with it.
        let limits = grpc(&[
            "--grpc-max-connections",
            "100",
            "--grpc-idle-timeout-s",
            "5",
        ]);
        assert_eq!(limits.unwrap(), (100, 100, Duration::from_secs(5)));
        // An idle timer armed beyond the clock's range would panic on the first stall.
        let errors = grpc(&["--grpc-idle-timeout-s", "18446744073709551615"]).unwrap_err();
        assert_eq!(
            errors,
            ["OPENCLAW_GRPC_IDLE_TIMEOUT_S must be 1 to 86400 (a day)"]
        );
        let errors = grpc(&[
            "--grpc-max-connections",
            "0",
            "--grpc-idle-timeout-s",
            "0",
            "--grpc-max-connections-per-source",
            "3",
        ])
        .unwrap_err();
        assert_eq!(
            errors,
            [
                "OPENCLAW_GRPC_MAX_CONNECTIONS must be at least 1",
                "OPENCLAW_GRPC_IDLE_TIMEOUT_S must be 1 to 86400 (a day)",
                "OPENCLAW_GRPC_MAX_CONNECTIONS_PER_SOURCE (3) must not exceed \
                 OPENCLAW_GRPC_MAX_CONNECTIONS (0): no source can hold more than all connections",
            ]
        );
    }

    #[test]
    fn binding_nodes_needs_mutual_tls_and_a_certificate_naming_this_node() {
        use crate::peer_tls::test_certs::{Ca, path_str};
        let errors = Config::try_from_args(args(&[
            "--peers",
            "a:8081",
            "--peer-secret",
            "0123456789abcdef0123",
            "--peer-tls-bind-node",
            "true",
        ]))
        .unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("OPENCLAW_PEER_TLS_BIND_NODE=true needs peer mutual TLS"),
            "{errors:?}"
        );

        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("peers");
        let files = ca.write(
            dir.path(),
            &ca.leaf_for(&["openclaw-peer", "node-a.openclaw-peer"]),
        );
        let with = |node: &str| {
            Config::try_from_args(
                Args::try_parse_from([
                    "openclaw-limiter",
                    "--node-id",
                    node,
                    "--peers",
                    "b:8081",
                    "--peer-tls-cert",
                    path_str(&files.cert),
                    "--peer-tls-key",
                    path_str(&files.key),
                    "--peer-tls-ca",
                    path_str(&files.ca),
                    "--peer-tls-bind-node",
                    "true",
                ])
                .unwrap(),
            )
        };
        let tls = with("node-a").unwrap().replication.unwrap().tls.unwrap();
        assert_eq!(tls.bind_node.as_deref(), Some("node-a"));
        let errors = with("node-b").unwrap_err();
        assert!(
            errors[0].contains("`node-b.openclaw-peer`"),
            "another node's certificate: {errors:?}"
        );
        let errors = with("node b").unwrap_err();
        assert!(
            errors[0].contains("node ids must be DNS labels"),
            "{errors:?}"
        );
    }

    #[test]
    fn peer_mutual_tls_takes_three_files_together_and_makes_the_secret_optional() {
        use crate::peer_tls::test_certs::{Ca, path_str};
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("peers");
        let files = ca.write(dir.path(), &ca.leaf(crate::peer_tls::DEFAULT_SERVER_NAME));
        let (cert, key, ca_file) = (
            path_str(&files.cert),
            path_str(&files.key),
            path_str(&files.ca),
        );

        let errors = Config::try_from_args(args(&[
            "--peers",
            "a:8081",
            "--peer-tls-cert",
            cert,
            "--peer-tls-ca",
            ca_file,
        ]))
        .unwrap_err();
        assert_eq!(
            errors.len(),
            1,
            "no secret is not a second problem: {errors:?}"
        );
        assert!(
            errors[0].contains(
                "OPENCLAW_PEER_TLS_CERT, OPENCLAW_PEER_TLS_CA set but OPENCLAW_PEER_TLS_KEY missing"
            ),
            "{errors:?}"
        );

        // All three, no secret: mTLS alone authenticates.
        let tls_args = [
            "--peer-tls-cert",
            cert,
            "--peer-tls-key",
            key,
            "--peer-tls-ca",
            ca_file,
        ];
        let mut argv = vec!["--peers", "a:8081"];
        argv.extend_from_slice(&tls_args);
        let replication = Config::try_from_args(args(&argv))
            .unwrap()
            .replication
            .unwrap();
        assert_eq!(replication.secret, None);
        let tls = replication.tls.unwrap();
        assert_eq!(tls.files, files);
        assert_eq!(tls.server_name.to_str(), "openclaw-peer");

        // Both: the secret must still be a good one.
        argv.extend_from_slice(&["--peer-secret", "short"]);
        let errors = Config::try_from_args(args(&argv)).unwrap_err();
        assert!(errors[0].contains("at least 16 bytes"), "{errors:?}");

        // A file that is not there is named, peers or not.
        let missing = dir.path().join("nope.pem");
        let errors = Config::try_from_args(args(&[
            "--peer-tls-cert",
            cert,
            "--peer-tls-key",
            path_str(&missing),
            "--peer-tls-ca",
            ca_file,
        ]))
        .unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with(&format!(
                "OPENCLAW_PEER_TLS_KEY={}: cannot read",
                missing.display()
            )),
            "{errors:?}"
        );
    }

    #[test]
    fn a_peers_file_is_inferred_and_must_exist_and_parse_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peers");
        let path_arg = path.to_str().unwrap();
        let secret = ["--peer-secret", "0123456789abcdef"];
        let with_file = |extra: &[&str]| {
            let mut argv = vec!["--peers-file", path_arg];
            argv.extend_from_slice(&secret);
            argv.extend_from_slice(extra);
            Config::try_from_args(args(&argv))
        };

        // Missing: a configuration error naming the variable, not a replica running alone.
        let errors = with_file(&[]).unwrap_err();
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("OPENCLAW_PEERS_FILE=") && e.contains("cannot read")),
            "{errors:?}"
        );

        std::fs::write(
            &path,
            "# replicas\n10.0.0.1:8081\nlimiter-1:8081, limiter-2:8081\n\n",
        )
        .unwrap();
        let errors = with_file(&[]).unwrap_err();
        assert!(
            errors.iter().any(|e| e.contains("line 3")),
            "the bad line is named: {errors:?}"
        );

        std::fs::write(&path, "# replicas\n10.0.0.1:8081 # a\nlimiter-1:8081\n").unwrap();
        let replication = with_file(&[]).unwrap().replication.unwrap();
        assert_eq!(replication.discovery, Discovery::File(path.clone()));
        assert_eq!(replication.discovery.kind(), "file");

        // Two sources at once is a mistake, reported.
        let errors = with_file(&["--peers", "a:8081"]).unwrap_err();
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("OPENCLAW_PEERS_FILE is set but OPENCLAW_DISCOVERY=static")),
            "{errors:?}"
        );
    }

    #[test]
    fn the_rate_limit_service_is_configured_by_its_rules_and_they_are_validated() {
        let config = Config::try_from_args(args(&[])).unwrap();
        assert!(config.rls.is_none(), "no rules, no gRPC listener");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("edge.yaml");
        std::fs::write(
            &file,
            "domain: edge\ndescriptors:\n  - key: k\n    rate_limit: {unit: day, requests_per_unit: 1000}\n",
        )
        .unwrap();
        let config = Config::try_from_args(args(&[
            "--rls-config",
            dir.path().to_str().unwrap(),
            "--grpc-listen",
            "127.0.0.1:0",
        ]))
        .unwrap();
        let rls = config.rls.unwrap();
        assert_eq!(rls.files.len(), 1);
        assert_eq!(rls.listen.to_string(), "127.0.0.1:0");
        std::fs::write(&file, "domain: edge\ndescriptors:\n  - key: k\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\n").unwrap();
        let errors =
            Config::try_from_args(args(&["--rls-config", file.to_str().unwrap()])).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains(
                "edge.yaml: descriptors[0].rate_limit.unit: invalid rate limit unit `fortnight`"
            ),
            "{errors:?}"
        );
    }

    #[test]
    fn off_site_snapshots_need_a_local_directory_an_s3_url_and_positive_numbers() {
        let config = Config::try_from_args(args(&[])).unwrap();
        assert!(config.snapshot_remote.is_none());
        let errors = Config::try_from_args(args(&[
            "--snapshot-remote",
            "gs://b/p",
            "--snapshot-remote-interval-s",
            "0",
            "--snapshot-remote-keep",
            "0",
        ]))
        .unwrap_err();
        assert_eq!(errors.len(), 4, "{errors:#?}");
        assert!(
            errors.iter().any(|e| e.contains("only s3://")),
            "{errors:#?}"
        );
        assert!(
            errors.iter().any(|e| e.contains("OPENCLAW_SNAPSHOT_DIR")),
            "{errors:#?}"
        );
        let errors = Config::try_from_args(args(&["--restore-from-remote", "true"])).unwrap_err();
        assert!(
            errors[0].contains("needs OPENCLAW_SNAPSHOT_REMOTE"),
            "{errors:#?}"
        );
        let config = Config::try_from_args(args(&[
            "--snapshot-dir",
            "/tmp/x",
            "--snapshot-remote",
            "s3://bucket/dr/eu",
            "--restore-from-remote",
            "true",
        ]))
        .unwrap();
        let remote = config.snapshot_remote.unwrap();
        assert_eq!(remote.location.prefix, "dr/eu");
        assert_eq!(remote.interval, Duration::from_secs(86_400));
        assert_eq!(remote.keep, 7);
        assert!(remote.restore);
    }

    #[test]
    fn restore_is_a_subcommand_and_without_one_the_node_runs_as_before() {
        let node = args(&["--snapshot-dir", "/tmp/x"]);
        assert!(node.command.is_none());
        assert!(Config::try_from_args(node).is_ok());
        // Node options go before the command; the command has its own.
        let parsed = args(&[
            "--bucket-capacity",
            "5",
            "restore",
            "--from",
            "s3://bucket/dr/eu",
            "--into",
            "/tmp/seed",
            "--max-age-s",
            "60",
        ]);
        assert_eq!(parsed.bucket_capacity, 5);
        let Some(Command::Restore(restore)) = &parsed.command else {
            panic!("{parsed:?}")
        };
        let settings = RestoreSettings::try_from_args(restore).unwrap();
        assert_eq!(settings.from.prefix, "dr/eu");
        assert_eq!(settings.into, PathBuf::from("/tmp/seed"));
        assert_eq!(settings.max_age, Duration::from_secs(60));
        assert!(!settings.force);
        assert!(Config::try_from_args(parsed).is_ok());

        let errors = RestoreSettings::try_from_args(&RestoreArgs {
            from: Some("gs://bucket/p".into()),
            into: None,
            max_age_s: 0,
            force: false,
        })
        .unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:#?}");
        assert!(errors[0].contains("gs:// is not built in"), "{errors:#?}");
        let errors = RestoreSettings::try_from_args(&RestoreArgs {
            from: None,
            into: Some("/tmp/seed".into()),
            max_age_s: 1,
            force: true,
        })
        .unwrap_err();
        assert!(
            errors[0].contains("--from s3://bucket/prefix"),
            "{errors:#?}"
        );
    }

    #[test]
    fn every_problem_is_reported_together() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.yaml");
        std::fs::write(
            &file,
            "policies:\n  a: {capacity: 0, refill_interval_ms: 1}\n",
        )
        .unwrap();
        let errors = Config::try_from_args(args(&[
            "--bucket-capacity",
            "0",
            "--api-key",
            PLACEHOLDER_API_KEY,
            "--policies-reload-ms",
            "0",
        ]))
        .unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:#?}");
        let errors = Config::try_from_args(args(&[
            "--policies",
            file.to_str().unwrap(),
            "--api-key",
            "",
        ]))
        .unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(
            errors.iter().any(|e| e.contains("policies.a.capacity")),
            "{errors:#?}"
        );
    }
}
