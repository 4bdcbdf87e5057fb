//! `openclaw-limiter`: parse the configuration, build the limiter, serve until SIGTERM; or,
//! with `restore`, seed a snapshot directory from the off-site store and exit.

use std::hash::BuildHasher;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use openclaw_limiter::clock::WallClock;
use openclaw_limiter::config::{Args, Command, Config, LogFormat, RestoreSettings};
use openclaw_limiter::crdt::ReplicaId;
use openclaw_limiter::escrow::protocol::Params;
use openclaw_limiter::membership::{Membership, SelfAddrs};
use openclaw_limiter::peer_tls::{PeerTls, ReloadCounters};
use openclaw_limiter::remote::{Remote, RestoreEvent, SeedError};
use openclaw_limiter::replication::{ReplicationOptions, Replicator};
use openclaw_limiter::rls::grpc::GrpcOptions;
use openclaw_limiter::rls::{Rls, RlsConfig};
use openclaw_limiter::server::{RemoteOptions, Replication, ServerOptions, serve};
use openclaw_limiter::service::{Limiter, LimiterOptions};
use openclaw_limiter::snapshot::Snapshots;

/// Exit status for invalid configuration (EX_USAGE), as linkerd2-proxy does.
const EXIT_CONFIG: u8 = 64;
/// `restore`: no valid snapshot under the prefix (EX_NOINPUT).
const EXIT_NOTHING_VALID: u8 = 66;
/// `restore`: the store could not be listed, or stopped answering (EX_UNAVAILABLE).
const EXIT_STORE: u8 = 69;
/// `restore`: the target directory is unusable or already holds snapshots (EX_CANTCREAT).
const EXIT_TARGET: u8 = 73;

fn main() -> ExitCode {
    // One TLS crypto provider for the process (ring: no C toolchain needed). The Kubernetes
    // client needs one, and so does the peer HTTP client whenever a workspace build unifies a
    // rustls feature into reqwest; without it, building a client panics.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let check_only = args.check_config;
    let mut problems = Vec::new();
    let restore = match &args.command {
        None => None,
        Some(Command::Restore(restore)) => {
            if check_only {
                problems.push("--check-config does not go with `restore`".to_owned());
            }
            RestoreSettings::try_from_args(restore)
                .map_err(|p| problems.extend(p))
                .ok()
        }
    };
    let config = match Config::try_from_args(args) {
        Ok(config) if problems.is_empty() => config,
        result => {
            problems.extend(result.err().unwrap_or_default());
            eprintln!(
                "openclaw-limiter: invalid configuration ({} problems):",
                problems.len()
            );
            for problem in problems {
                eprintln!("  - {problem}");
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if check_only {
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    // The offline restore reports on stdout; its log shows only errors unless RUST_LOG says.
    init_logging(
        config.log_format,
        if restore.is_some() { "error" } else { "info" },
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("openclaw-limiter: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(settings) = restore {
        return runtime.block_on(restore_offline(config, settings));
    }
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The limiter with the configured policies and nothing else: what a node starts from, and
/// what the offline restore merges into (so both drop the same unknown policies).
fn build_limiter(config: &Config) -> anyhow::Result<(Arc<Limiter>, Option<Arc<Rls>>)> {
    let limiter = Arc::new(Limiter::new(LimiterOptions {
        node_id: config.node_id.clone(),
        replica: new_replica_id(&config.node_id),
        default_rate: config.default_rate,
        clock: Arc::new(WallClock::new()),
        shards: 256,
        track_changes: config.replication.is_some(),
    }));
    if let Some(text) = &config.policies_text {
        limiter
            .reload_policies(text)
            .map_err(|e| anyhow::anyhow!("policies file: {e}"))?;
    }
    // The rate limit service's rules are policies of the limiter: registered before snapshots
    // are restored, so that their buckets are restored too.
    let rls = match &config.rls {
        None => None,
        Some(settings) => {
            let rules = RlsConfig::from_files(&settings.files)
                .map_err(|e| anyhow::anyhow!("OPENCLAW_RLS_CONFIG: {e}"))?;
            Some(Arc::new(Rls::new(limiter.clone(), rules)))
        }
    };
    Ok((limiter, rls))
}

/// `openclaw-limiter restore`: progress and a summary on stdout, the reason for a failure on
/// stderr, and an exit status per kind of failure.
async fn restore_offline(config: Config, settings: RestoreSettings) -> ExitCode {
    let fail = |code: u8, message: String| {
        eprintln!("openclaw-limiter restore: {message}");
        ExitCode::from(code)
    };
    let (limiter, _rls) = match build_limiter(&config) {
        Ok(built) => built,
        Err(e) => return fail(EXIT_CONFIG, format!("{e:#}")),
    };
    let remote = match Remote::s3_from_env(&settings.from, &config.node_id, 1) {
        Ok(remote) => remote,
        Err(e) => return fail(EXIT_CONFIG, e.to_string()),
    };
    println!(
        "restoring {} into {} (snapshots at most {} s old; policies: {})",
        settings.from.url,
        settings.into.display(),
        settings.max_age.as_secs(),
        limiter
            .policies()
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let now = limiter.now();
    let mut progress = |event: RestoreEvent<'_>| match event {
        RestoreEvent::Listed {
            objects,
            nodes,
            ignored,
        } => println!(
            "listed {objects} object(s): {nodes} replica folder(s), {ignored} ignored (not named <node>/<µs>.ocs)"
        ),
        RestoreEvent::Merged(m) => println!(
            "merged  {} (node {}, taken {} s ago): {} bucket(s), {} dropped (policy not configured)",
            m.object,
            m.node_id,
            now.saturating_sub(m.created_us) / 1_000_000,
            m.buckets,
            m.skipped_unknown_policy
        ),
        RestoreEvent::Rejected(r) => {
            println!("skipped {} [{}]: {}", r.object, r.reason, r.detail)
        }
    };
    let seeded = remote
        .restore_into_dir(
            &limiter,
            settings.max_age,
            &settings.into,
            settings.force,
            &mut progress,
        )
        .await;
    match seeded {
        Ok(seeded) => {
            let report = &seeded.report;
            if !report.unknown_policies.is_empty() {
                println!(
                    "dropped the buckets of policies not configured here: {}",
                    report.unknown_policies.join(", ")
                );
            }
            println!(
                "wrote {} ({} bytes, {} buckets, read back and verified)",
                seeded.written.path.display(),
                seeded.written.bytes,
                seeded.buckets
            );
            println!(
                "restore OK: {} bucket(s) from {} of {} replica folder(s), {} object(s) skipped, \
                 {} bytes downloaded in {} ms; start the replica on {}",
                seeded.buckets,
                report.merged.len(),
                report.nodes,
                report.rejected.len(),
                report.bytes_downloaded,
                report.elapsed_ms,
                settings.into.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            let code = match &e {
                SeedError::Target { .. } | SeedError::NotEmpty { .. } | SeedError::InUse { .. } => {
                    EXIT_TARGET
                }
                SeedError::Store { .. } => EXIT_STORE,
                SeedError::NothingValid { .. } => EXIT_NOTHING_VALID,
            };
            fail(code, format!("{e}; nothing written"))
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let (limiter, rls) = build_limiter(&config)?;
    // Held until the process exits: the lock that tells a later process on this directory that
    // this one is gone.
    let lineage = match &config.snapshot_dir {
        None => None,
        Some(dir) => {
            let lineage = openclaw_limiter::lineage::claim(dir, limiter.store().replica())?;
            if let Some(predecessor) = lineage.predecessor {
                tracing::info!(
                    predecessor = %format!("{:016x}", predecessor.0),
                    lock = %lineage.path.display(),
                    "this process takes over from the replica that held the snapshot directory before \
                     (its lock is free: it has exited); peers stop waiting for it"
                );
            }
            Some(lineage)
        }
    };
    let snapshots = match &config.snapshot_dir {
        None => None,
        Some(dir) => {
            let snapshots = Arc::new(Snapshots::new(dir.clone()));
            let (from, into) = (snapshots.clone(), limiter.clone());
            let report = tokio::task::spawn_blocking(move || from.restore_latest(&into))
                .await?
                .with_context(|| format!("cannot read snapshots in {}", dir.display()))?;
            match &report.used {
                Some(used) => tracing::info!(
                    path = %used.path.display(),
                    restored = report.restored,
                    rejected = report.rejected.len(),
                    "restored from snapshot"
                ),
                None => tracing::info!(
                    rejected = report.rejected.len(),
                    "no usable snapshot; starting empty"
                ),
            }
            Some((snapshots, config.snapshot_interval, report.used.is_some()))
        }
    };
    let remote = match &config.snapshot_remote {
        None => None,
        Some(settings) => {
            let remote = Remote::s3_from_env(&settings.location, &config.node_id, settings.keep)
                .context("off-site snapshots")?;
            let restored_locally = snapshots.as_ref().is_some_and(|(_, _, used)| *used);
            Some(RemoteOptions {
                remote: Arc::new(remote),
                interval: settings.interval,
                restore_max_age: (settings.restore && !restored_locally)
                    .then_some(settings.restore_max_age),
            })
        }
    };
    let snapshots = snapshots.map(|(snapshots, every, _)| (snapshots, every));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let replication = match &config.replication {
        None => None,
        Some(settings) => {
            let listener = tokio::net::TcpListener::bind(settings.listen)
                .await
                .with_context(|| format!("cannot listen for peers on {}", settings.listen))?;
            let peer_addr = listener.local_addr()?;
            let tls = match &settings.tls {
                None => None,
                Some(tls) => Some(Arc::new(
                    PeerTls::try_new(
                        tls.clone(),
                        ReloadCounters {
                            reloads: limiter.metrics().peer_tls_reloads.clone(),
                            last_ok: limiter.metrics().peer_tls_reload_ok.clone(),
                        },
                    )
                    .map_err(|problems| anyhow::anyhow!("{}", problems.join("; ")))?,
                )),
            };
            let replicator = Replicator::try_new(
                limiter.clone(),
                ReplicationOptions {
                    secret: match &settings.secret {
                        Some(secret) => secret.clone().into_bytes(),
                        None => openclaw_limiter::replication::MTLS_ONLY_KEY.to_vec(),
                    },
                    tls: tls.clone(),
                    sync_interval: settings.sync_interval,
                    anti_entropy_interval: settings.anti_entropy_interval,
                    request_timeout: (settings.sync_interval * 20)
                        .clamp(Duration::from_millis(500), Duration::from_secs(5)),
                    strict: Params {
                        lease_us: settings.strict_lease.as_micros() as u64,
                        guard_us: settings.strict_skew_guard.as_micros() as u64,
                        ..Params::default()
                    },
                    clock_guard: settings.clock_skew_guard,
                    loan_timeout: settings.strict_loan_timeout,
                    unverified_budget: openclaw_limiter::replication::UNVERIFIED_BUDGET,
                    legacy_signatures: settings.legacy_signatures,
                    max_buckets: settings.max_buckets,
                    max_requests_per_peer: (settings.peer_limits.max_connections_per_source / 2)
                        .max(1),
                    max_missed: openclaw_limiter::replication::DEFAULT_MAX_MISSED,
                },
            )?;
            let replicator = Arc::new(replicator);
            limiter.enable_loans(Arc::downgrade(&replicator));
            if let (Some(escrow), Some(predecessor)) = (
                limiter.escrow(),
                lineage.as_ref().and_then(|l| l.predecessor),
            ) {
                escrow.supersede(predecessor);
            }
            let membership = Membership::new(
                settings.discovery.clone(),
                SelfAddrs::new(peer_addr, settings.pod_ip),
                settings.discovery_refresh,
            );
            Some((
                peer_addr,
                Replication {
                    replicator,
                    listener,
                    membership,
                    ready_max_wait: settings.ready_max_wait,
                    limits: settings.peer_limits,
                    tls,
                },
            ))
        }
    };
    let grpc = match (&config.rls, rls) {
        (Some(settings), Some(rls)) => {
            let listener = tokio::net::TcpListener::bind(settings.listen)
                .await
                .with_context(|| format!("cannot listen for gRPC on {}", settings.listen))?;
            Some(GrpcOptions {
                listener,
                rls,
                config_path: Some(settings.path.clone()),
                config_files: Some(settings.files.clone()),
                reload_every: config.policies_reload,
                shutdown_grace: config.shutdown_grace,
                api_key: config.api_key.as_deref().map(Arc::from),
                limits: settings.limits,
            })
        }
        _ => None,
    };
    // Machine-readable lines on stdout: scripts and tests that bind port 0 read them. One
    // write for all of them, so a reader that has the first line has the others too.
    let mut listening = format!("listening api=http://{addr}\n");
    let replication = replication.map(|(peer_addr, replication)| {
        let scheme = if replication.tls.is_some() {
            "https"
        } else {
            "http"
        };
        listening.push_str(&format!("listening peer={scheme}://{peer_addr}\n"));
        replication
    });
    if let Some(grpc) = &grpc {
        let grpc_addr = grpc.listener.local_addr()?;
        listening.push_str(&format!("listening grpc=http://{grpc_addr}\n"));
    }
    {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(listening.as_bytes())?;
        stdout.flush()?;
    }
    tracing::info!(%addr, node = %config.node_id, policies = limiter.policies().len(), "openclaw-limiter started");
    serve(
        listener,
        limiter,
        ServerOptions {
            api_key: config.api_key,
            policies_path: config.policies_path,
            policies_text: config.policies_text,
            policies_reload: config.policies_reload,
            shutdown_grace: config.shutdown_grace,
            snapshots,
            remote,
        },
        replication,
        grpc,
        shutdown_signal(),
    )
    .await?;
    tracing::info!("stopped");
    drop(lineage);
    Ok(())
}

/// Each process start is a new replica (see `crdt::ReplicaId`).
fn new_replica_id(node_id: &str) -> ReplicaId {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    ReplicaId(std::collections::hash_map::RandomState::new().hash_one((
        node_id,
        nanos,
        std::process::id(),
    )))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(e) => {
                    tracing::warn!("cannot listen for SIGTERM ({e}); only Ctrl-C stops the server");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
