//! Process lifecycle: start the background tasks, serve until the shutdown signal, drain for a
//! bounded grace period, stop the tasks.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::Instrument;

use crate::http::{AppState, router};
use crate::membership::Membership;
use crate::remote::Remote;
use crate::replication::{self, Replicator, peer_router};
use crate::service::Limiter;
use crate::snapshot::Snapshots;

/// How often the refill-and-reclaim pass runs (and so how fresh the usage gauges are).
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How often the clock follows the system clock: a backward correction is taken at most a tenth
/// as fast as time passes, so the clock never steps back by more than 1 ms.
pub const CLOCK_RESYNC_INTERVAL: Duration = Duration::from_millis(10);

#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub api_key: Option<String>,
    pub policies_path: Option<PathBuf>,
    /// The policies file's text already applied at start, so the watcher only reacts to changes.
    pub policies_text: Option<String>,
    pub policies_reload: Duration,
    pub shutdown_grace: Duration,
    /// Where and how often to snapshot the state (restored by the caller before `serve`).
    pub snapshots: Option<(Arc<Snapshots>, Duration)>,
    /// Off-site snapshots (`crate::remote`); shipped only together with `snapshots`.
    pub remote: Option<RemoteOptions>,
}

/// Off-site snapshots: where, how often, and whether to restore from there at start.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    pub remote: Arc<Remote>,
    pub interval: Duration,
    /// Restore from the store before reporting ready, skipping snapshots older than this, if the
    /// state is still empty once the peers' state is in. The caller sets it only when the local
    /// snapshot directory had nothing usable.
    pub restore_max_age: Option<Duration>,
}

/// Everything replication needs at run time.
#[derive(Debug)]
pub struct Replication {
    pub replicator: Arc<Replicator>,
    /// The bound replication listener.
    pub listener: TcpListener,
    /// Finds the peers.
    pub membership: Membership,
    /// Longest wait at start for peers' state before reporting ready anyway.
    pub ready_max_wait: Duration,
    /// Connection limits of the replication listener.
    pub limits: crate::listener::Limits,
    /// Peer mutual TLS: the listener requires it and its files are polled for changes (the
    /// replicator's client was built with the same material).
    pub tls: Option<Arc<crate::peer_tls::PeerTls>>,
}

/// Serve the decision API on `listener` until `shutdown` completes, then give in-flight requests
/// `shutdown_grace` to finish.
pub async fn serve(
    listener: TcpListener,
    limiter: Arc<Limiter>,
    options: ServerOptions,
    replication: Option<Replication>,
    grpc: Option<crate::rls::grpc::GrpcOptions>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(
        sweeper(limiter.clone(), stop_rx.clone()).instrument(tracing::info_span!("sweeper")),
    );
    tasks.spawn(
        follow_system_clock(limiter.clone(), stop_rx.clone())
            .instrument(tracing::info_span!("clock")),
    );
    if let Some(path) = options.policies_path.clone() {
        let span = tracing::info_span!("policy_watcher", path = %path.display());
        tasks.spawn(
            watch_policies(
                limiter.clone(),
                path,
                options.policies_text.clone(),
                options.policies_reload,
                stop_rx.clone(),
            )
            .instrument(span),
        );
    }

    if let Some(grpc) = grpc {
        // Drains with the HTTP server: both stop on the same signal.
        tasks.spawn(
            crate::rls::grpc::serve(grpc, stop_rx.clone()).instrument(tracing::info_span!("grpc")),
        );
    }

    let replicator = replication.as_ref().map(|r| r.replicator.clone());
    let discovery = replication.as_ref().map(|r| r.membership.status());
    let restore = options
        .remote
        .as_ref()
        .and_then(|r| Some((r.remote.clone(), r.restore_max_age?)));
    match replication {
        None => match restore.clone() {
            None => limiter.mark_ready(),
            Some((remote, max_age)) => {
                let (limiter, mut stop) = (limiter.clone(), stop_rx.clone());
                tasks.spawn(
                    async move {
                        tokio::select! {
                            _ = restore_if_empty(&limiter, &remote, max_age) => limiter.mark_ready(),
                            _ = stop.wait_for(|stopped| *stopped) => {}
                        }
                    }
                    .instrument(tracing::info_span!("remote_restore")),
                );
            }
        },
        Some(replication) => {
            let mut stop = stop_rx.clone();
            let metrics = limiter.metrics();
            let listener = crate::listener::LimitedListener::new(
                replication.listener,
                replication.limits,
                crate::listener::Counters {
                    open: metrics.peer_connections.clone(),
                    idle_closed: metrics
                        .peer_rejected
                        .get_or_create(&crate::metrics::ReasonLabels {
                            reason: "idle_connection",
                        })
                        .clone(),
                    tls_refused: metrics
                        .peer_rejected
                        .get_or_create(&crate::metrics::ReasonLabels {
                            reason: "tls_handshake",
                        })
                        .clone(),
                    per_source_refused: metrics
                        .peer_rejected
                        .get_or_create(&crate::metrics::ReasonLabels {
                            reason: "per_source",
                        })
                        .clone(),
                },
            );
            let listener = match &replication.tls {
                None => listener,
                Some(tls) => {
                    let config = tls.server_config().map_err(std::io::Error::other)?;
                    tasks.spawn(
                        tls.clone()
                            .watch(stop_rx.clone())
                            .instrument(tracing::info_span!("peer_tls_poller")),
                    );
                    listener.with_tls(config)
                }
            };
            // Each request sees the client certificate of its connection (nodes bound).
            let routes = peer_router(replication.replicator.clone())
                .into_make_service_with_connect_info::<crate::listener::ClientCertificate>(
            );
            let peer_server = axum::serve(listener, routes).with_graceful_shutdown(async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            });
            tasks.spawn(
                async move {
                    if let Err(e) = peer_server.await {
                        tracing::error!(error = %e, "replication listener failed");
                    }
                }
                .instrument(tracing::info_span!("peer_listener")),
            );
            let (peers_tx, peers_rx) = watch::channel(Vec::new());
            tasks.spawn(
                replication
                    .membership
                    .run(peers_tx, stop_rx.clone())
                    .instrument(tracing::info_span!("membership")),
            );
            tasks.spawn(
                recover_then_replicate(
                    replication.replicator,
                    peers_rx,
                    replication.ready_max_wait,
                    restore,
                    stop_rx.clone(),
                )
                .instrument(tracing::info_span!("replication")),
            );
        }
    }
    let app = router(AppState {
        limiter: limiter.clone(),
        api_key: options.api_key.map(Arc::from),
        replicator,
        discovery,
        snapshots: options.snapshots.as_ref().map(|(s, _)| s.clone()),
    });
    if let Some((snapshots, every)) = options.snapshots.clone() {
        if let Some(remote) = options.remote.clone() {
            limiter
                .metrics()
                .snapshot_remote_interval
                .set(remote.interval.as_secs() as i64);
            let span = tracing::info_span!("remote_snapshots", remote = %remote.remote.url());
            tasks.spawn(
                crate::remote::ship(
                    remote.remote,
                    snapshots.clone(),
                    limiter.clone(),
                    remote.interval,
                    stop_rx.clone(),
                )
                .instrument(span),
            );
        }
        tasks.spawn(
            periodic_snapshots(limiter.clone(), snapshots, every, stop_rx.clone())
                .instrument(tracing::info_span!("snapshots")),
        );
    }

    let mut signalled = stop_rx.clone();
    let stop = stop_tx.clone();
    let server = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!("shutdown requested: draining in-flight requests");
        let _ = stop.send(true);
    });
    let grace = options.shutdown_grace;
    let result = tokio::select! {
        result = server => result,
        _ = async move {
            let _ = signalled.wait_for(|stopped| *stopped).await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(grace_s = grace.as_secs(), "grace period over: closing remaining connections");
            Ok(())
        }
    };
    let _ = stop_tx.send(true);
    // The replication task pushes its last changes to peers before it ends.
    while tasks.join_next().await.is_some() {}
    if let Some((snapshots, _)) = options.snapshots {
        let limiter = limiter.clone();
        match tokio::task::spawn_blocking(move || snapshots.write(&limiter)).await {
            Ok(Ok(info)) => {
                tracing::info!(path = %info.path.display(), buckets = info.buckets, "final snapshot written")
            }
            Ok(Err(e)) => tracing::error!(error = %e, "final snapshot failed"),
            Err(e) => tracing::error!(error = %e, "final snapshot task failed"),
        }
    }
    result
}

async fn periodic_snapshots(
    limiter: Arc<Limiter>,
    snapshots: Arc<Snapshots>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
        let (limiter, snapshots) = (limiter.clone(), snapshots.clone());
        // `write` counts and logs its own failures.
        let _ = tokio::task::spawn_blocking(move || snapshots.write(&limiter)).await;
    }
}

/// Start-up recovery, then the sender loop. A replica that starts empty (new, or restarted
/// without a snapshot) pulls its peers' state before it reports ready, so it does not admit
/// what the cluster already spent. Readiness waits at most `max_wait` for peers to appear and
/// answer: a first replica, or one cut off from the others, must still come up.
async fn recover_then_replicate(
    replicator: Arc<Replicator>,
    mut peers: watch::Receiver<Vec<SocketAddr>>,
    max_wait: Duration,
    restore: Option<(Arc<Remote>, Duration)>,
    stop: watch::Receiver<bool>,
) {
    let deadline = tokio::time::Instant::now() + max_wait;
    let found = tokio::time::timeout_at(deadline, peers.wait_for(|p| !p.is_empty()))
        .await
        .is_ok_and(|r| r.is_ok());
    let known = peers.borrow().clone();
    match found {
        true => {
            let pulled = tokio::time::timeout_at(deadline, replicator.pull_from(&known)).await;
            match pulled {
                Ok(answered) => tracing::info!(answered, peers = known.len(), "start-up sync done"),
                Err(_) => {
                    tracing::warn!(peers = known.len(), "start-up sync timed out; ready anyway")
                }
            }
        }
        false => tracing::info!("no peers found within the start-up wait; ready as a lone replica"),
    }
    if let Some((remote, max_age)) = restore {
        // A shutdown does not wait for a long restore.
        let mut stopping = stop.clone();
        tokio::select! {
            _ = restore_if_empty(replicator.limiter(), &remote, max_age) => {}
            _ = stopping.wait_for(|stopped| *stopped) => return,
        }
    }
    replicator.limiter().mark_ready();
    replication::run(replicator, peers, stop).await;
}

/// Disaster recovery: a replica that found nothing usable on local disk and got no state from
/// its peers (after a regional outage, all of them are new) merges the off-site snapshots.
/// A store that cannot be listed is logged, and the replica comes up without them, as it does
/// without peers: it must still serve.
async fn restore_if_empty(limiter: &Arc<Limiter>, remote: &Remote, max_age: Duration) {
    if !limiter.store().is_empty() {
        tracing::info!(
            buckets = limiter.store().len(),
            "state received from peers: no off-site restore"
        );
        return;
    }
    if let Err(e) = remote.restore(limiter, max_age).await {
        tracing::error!(remote = %remote.url(), error = %e, "off-site restore failed or stopped: ready with what it merged before (possibly nothing)");
    }
}

/// Keeps the limiter's clock on the system clock's corrections (`clock::WallClock`).
async fn follow_system_clock(limiter: Arc<Limiter>, mut stop: watch::Receiver<bool>) {
    let clock = limiter.clock();
    let mut ticks = tokio::time::interval(CLOCK_RESYNC_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !*stop.borrow_and_update() {
        tokio::select! {
            _ = ticks.tick() => clock.resync(),
            result = stop.changed() => if result.is_err() { return },
        }
    }
}

async fn sweeper(limiter: Arc<Limiter>, mut stop: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(SWEEP_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // `changed()`, not `wait_for()`: the latter's guard is not `Send` across the sweep's awaits.
    while !*stop.borrow_and_update() {
        tokio::select! {
            _ = ticks.tick() => {
                let reclaimed = limiter.sweep_yielding().await;
                tracing::trace!(reclaimed, keys = limiter.store().len(), "sweep");
            }
            result = stop.changed() => if result.is_err() { return },
        }
    }
}

/// Polls the file's contents (robust to editors' rename-on-save and to Kubernetes' ConfigMap
/// symlink swaps, which file-event watchers miss) and applies a changed file if it is valid.
async fn watch_policies(
    limiter: Arc<Limiter>,
    path: PathBuf,
    mut applied: Option<String>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(text) => text,
            Err(e) => {
                let message = format!("cannot read the policies file: {e}");
                if last_error.as_deref() != Some(message.as_str()) {
                    tracing::error!("{message}; keeping the last good policies");
                    last_error = Some(message);
                }
                continue;
            }
        };
        if applied.as_deref() == Some(text.as_str()) {
            continue;
        }
        match limiter.reload_policies(&text) {
            Ok(()) => {
                tracing::info!(policies = limiter.policies().len(), "policies reloaded");
                last_error = None;
            }
            Err(problems) => {
                tracing::error!(
                    "policies file rejected, keeping the last good policies: {problems}"
                );
            }
        }
        applied = Some(text);
    }
}
