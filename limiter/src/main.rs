//! `openclaw-limiter`: parse the configuration, build the limiter, serve until SIGTERM.

use std::hash::BuildHasher;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use openclaw_limiter::clock::WallClock;
use openclaw_limiter::config::{Args, Config, LogFormat};
use openclaw_limiter::crdt::ReplicaId;
use openclaw_limiter::escrow::protocol::Params;
use openclaw_limiter::membership::{Membership, SelfAddrs};
use openclaw_limiter::remote::Remote;
use openclaw_limiter::replication::{ReplicationOptions, Replicator};
use openclaw_limiter::rls::grpc::GrpcOptions;
use openclaw_limiter::rls::{Rls, RlsConfig};
use openclaw_limiter::server::{RemoteOptions, Replication, ServerOptions, serve};
use openclaw_limiter::service::{Limiter, LimiterOptions};
use openclaw_limiter::snapshot::Snapshots;

/// Exit status for invalid configuration (EX_USAGE), as linkerd2-proxy does.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    // One TLS crypto provider for the process (ring: no C toolchain needed). The Kubernetes
    // client needs one, and so does the peer HTTP client whenever a workspace build unifies a
    // rustls feature into reqwest; without it, building a client panics.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let check_only = args.check_config;
    let config = match Config::try_from_args(args) {
        Ok(config) => config,
        Err(problems) => {
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
    init_logging(config.log_format);
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
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
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
            let replicator = Replicator::try_new(
                limiter.clone(),
                ReplicationOptions {
                    secret: settings.secret.clone().into_bytes(),
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
                },
            )?;
            let replicator = Arc::new(replicator);
            limiter.enable_loans(Arc::downgrade(&replicator));
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
            })
        }
        _ => None,
    };
    // Machine-readable lines on stdout: scripts and tests that bind port 0 read them. One
    // write for all of them, so a reader that has the first line has the others too.
    let mut listening = format!("listening api=http://{addr}\n");
    let replication = replication.map(|(peer_addr, replication)| {
        listening.push_str(&format!("listening peer=http://{peer_addr}\n"));
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

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
