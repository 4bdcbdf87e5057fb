//! Serving plumbing: the `serve` flags, config loading and hot reload, plain-HTTP serving and
//! the shutdown signal. TLS serving and authentication live in [`crate::tls`] and
//! [`crate::auth`]; `main.rs` puts the pieces together.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::Instrument;

use crate::config::{Config, ConfigStore, parse_duration};
use crate::metrics::Metrics;
use crate::{Error, Result};

/// Flags of `openclaw-metrics-adapter serve` that are not TLS or authentication.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Rules file (YAML). Without it the embedded default (config/default.yaml) is served.
    #[arg(long, env = "OPENCLAW_ADAPTER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// How often the rules file is re-read; a changed, valid file replaces the config in force,
    /// an invalid one is reported and ignored.
    #[arg(long, env = "OPENCLAW_ADAPTER_CONFIG_POLL_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub config_poll_interval: Duration,

    /// Prometheus base URL (the HTTP API is under /api/v1).
    #[arg(
        long,
        env = "OPENCLAW_ADAPTER_PROMETHEUS_URL",
        default_value = "http://127.0.0.1:9090"
    )]
    pub prometheus_url: String,

    /// Most Prometheus queries in flight at once; more wait (within their rule's timeout).
    #[arg(
        long,
        env = "OPENCLAW_ADAPTER_MAX_CONCURRENT_QUERIES",
        default_value_t = 8
    )]
    pub max_concurrent_queries: usize,

    /// Address to listen on.
    #[arg(long, env = "OPENCLAW_ADAPTER_BIND_ADDRESS", default_value = "0.0.0.0")]
    pub bind_address: std::net::IpAddr,

    /// Port to listen on (0 picks a free one; the `listening` line on stdout says which).
    #[arg(long, env = "OPENCLAW_ADAPTER_SECURE_PORT", default_value_t = 6443)]
    pub secure_port: u16,

    /// Serve plain HTTP instead of TLS. Only for local runs and tests: the kube-aggregator
    /// talks TLS. Logs a warning.
    #[arg(long, env = "OPENCLAW_ADAPTER_PLAIN_HTTP")]
    pub plain_http: bool,
}

impl ServeArgs {
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bind_address, self.secure_port)
    }
}

/// Loads `--config` or the embedded default; also returns the file's text, so the reloader
/// can tell when it changes.
pub fn load_config(path: Option<&std::path::Path>) -> Result<(Config, Option<String>)> {
    match path {
        None => Ok((Config::embedded_default(), None)),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
                path: path.display().to_string(),
                source,
            })?;
            let config = Config::from_yaml(&text, &path.display().to_string())?;
            Ok((config, Some(text)))
        }
    }
}

/// Polls the rules file's contents every `interval` until `stop` turns true. A changed, valid
/// file replaces the config; an invalid one is logged (every error) and counted once, and the
/// last good config stays in force.
pub async fn watch_config(
    path: PathBuf,
    interval: Duration,
    store: ConfigStore,
    metrics: Arc<Metrics>,
    mut last_text: String,
    mut stop: watch::Receiver<bool>,
) {
    let origin = path.display().to_string();
    let mut last_read_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(t) => {
                last_read_error = None;
                t
            }
            Err(e) => {
                let msg = e.to_string();
                if last_read_error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(path = %origin, error = %msg, "cannot read the config file; keeping the config in force");
                    metrics.config_reload(false, 0);
                    last_read_error = Some(msg);
                }
                continue;
            }
        };
        if text == last_text {
            continue;
        }
        match Config::from_yaml(&text, &origin) {
            Ok(config) => {
                let n = config.rules.len();
                tracing::info!(path = %origin, metrics = %config.names(), "config reloaded");
                store.replace(config);
                metrics.config_reload(true, n);
            }
            Err(Error::Config(errors)) => {
                for e in &errors {
                    tracing::error!(path = %origin, "{e}");
                }
                tracing::error!(path = %origin, count = errors.len(), "config rejected; keeping the last good config");
                metrics.config_reload(false, 0);
            }
            Err(e) => {
                tracing::error!(path = %origin, error = %e, "config rejected; keeping the last good config");
                metrics.config_reload(false, 0);
            }
        }
        last_text = text;
    }
}

/// Starts [`watch_config`] on its own task when a file is configured.
pub fn spawn_config_watcher(
    args: &ServeArgs,
    text: Option<String>,
    store: ConfigStore,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let path = args.config.clone()?;
    let text = text?;
    let span = tracing::info_span!("config_watcher", path = %path.display());
    Some(tokio::spawn(
        watch_config(path, args.config_poll_interval, store, metrics, text, stop).instrument(span),
    ))
}

/// Serves `app` over plain HTTP until `shutdown` completes, then lets in-flight requests finish
/// for at most `grace`.
pub async fn serve_plain<F>(
    listener: TcpListener,
    app: Router,
    shutdown: F,
    grace: Duration,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        let _ = done_tx.send(());
    });
    let mut server = std::pin::pin!(server.into_future());
    tokio::select! {
        r = &mut server => r,
        _ = async {
            let _ = done_rx.await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(?grace, "grace period over; dropping open connections");
            Ok(())
        }
    }
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "rules:\n  - name: a\n    query: up\n";
    const GOOD2: &str = "rules:\n  - name: a\n    query: up\n  - name: b\n    query: up\n";

    async fn wait_for(mut check: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "condition not met within 5s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn reload_applies_good_files_and_keeps_the_last_good_one_on_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let (config, text) = load_config(Some(&path)).unwrap();
        let store = ConfigStore::new(config);
        let metrics = Metrics::shared();
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(watch_config(
            path.clone(),
            Duration::from_millis(20),
            store.clone(),
            metrics.clone(),
            text.unwrap(),
            stop_rx,
        ));

        std::fs::write(&path, GOOD2).unwrap();
        wait_for(|| store.get().rules.len() == 2).await;
        assert!(
            metrics
                .encode()
                .contains("openclaw_adapter_config_reloads_total{result=\"success\"} 1")
        );

        std::fs::write(&path, "rules:\n  - name: a\n    query: sum(\n").unwrap();
        wait_for(|| {
            metrics
                .encode()
                .contains("openclaw_adapter_config_last_reload_successful 0")
        })
        .await;
        assert_eq!(
            store.get().rules.len(),
            2,
            "the last good config stays in force"
        );

        std::fs::remove_file(&path).unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(store.get().rules.len(), 2);

        std::fs::write(&path, GOOD).unwrap();
        wait_for(|| store.get().rules.len() == 1).await;
        assert!(
            metrics
                .encode()
                .contains("openclaw_adapter_config_last_reload_successful 1")
        );

        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}
