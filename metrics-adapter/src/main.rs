//! `openclaw-metrics-adapter`: `serve`, `check-config` and `explain`. Everything else is in the
//! library; this file only parses flags and wires the pieces.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use metrics_adapter::api::{AppState, router};
use metrics_adapter::config::{Config, ConfigStore};
use metrics_adapter::metrics::Metrics;
use metrics_adapter::prometheus::Prometheus;
use metrics_adapter::server::{
    ServeArgs, load_config, serve_plain, shutdown_signal, spawn_config_watcher,
};
use metrics_adapter::{auth, explain, tls};
use tokio::sync::watch;

/// Kubernetes external metrics API (external.metrics.k8s.io/v1beta1) over Prometheus, for the
/// OpenClaw limiter's HorizontalPodAutoscaler.
#[derive(Debug, Parser)]
#[command(name = "openclaw-metrics-adapter", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the API (prints `listening https=...` or `listening http=...` on stdout).
    Serve(Box<ServeCommand>),
    /// Validate a rules file: every problem with its position; exit 0 when valid, 1 otherwise.
    CheckConfig {
        /// Rules file; the embedded default when absent.
        #[arg(long, env = "OPENCLAW_ADAPTER_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Show the final PromQL, Prometheus' answer, the served items and the HPA's decision.
    Explain(ExplainArgs),
}

#[derive(Debug, clap::Args)]
struct ServeCommand {
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    tls: tls::TlsArgs,
    #[command(flatten)]
    auth: auth::AuthArgs,
}

#[derive(Debug, clap::Args)]
struct ExplainArgs {
    /// Rules file; the embedded default when absent.
    #[arg(long, env = "OPENCLAW_ADAPTER_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Prometheus base URL.
    #[arg(
        long,
        env = "OPENCLAW_ADAPTER_PROMETHEUS_URL",
        default_value = "http://127.0.0.1:9090"
    )]
    prometheus_url: String,
    /// External metric to explain (not needed with --hpa).
    #[arg(long)]
    metric: Option<String>,
    /// Namespace of the request (the HPA manifest's namespace wins when it has one).
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// Label selector, as the HPA sends it (`policy=default,decision in (allowed)`).
    #[arg(long, short = 'l', default_value = "")]
    selector: String,
    /// An autoscaling/v2 HorizontalPodAutoscaler manifest (YAML): explain all its External
    /// metrics and compute the replica count.
    #[arg(long, value_name = "FILE")]
    hpa: Option<PathBuf>,
    /// Current replicas of the scale target (default: the manifest's status.currentReplicas).
    #[arg(long)]
    current_replicas: Option<i32>,
    /// Ready pods (default: the current replicas).
    #[arg(long)]
    ready_replicas: Option<i32>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(cmd) => {
            let ServeCommand {
                serve: args,
                tls,
                auth,
            } = *cmd;
            runtime.block_on(serve(args, tls, auth))
        }
        Command::CheckConfig { config } => return check_config(config),
        Command::Explain(args) => runtime.block_on(run_explain(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: Option<PathBuf>) -> ExitCode {
    match load_config(path.as_deref()) {
        Ok((config, _)) => {
            let origin = path.map_or("embedded default".to_owned(), |p| p.display().to_string());
            println!("{origin}: OK, {} external metrics", config.rules.len());
            for rule in config.rules.values() {
                println!("  {}: {}", rule.name, rule.query.normalized());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs, tls_args: tls::TlsArgs, auth_args: auth::AuthArgs) -> Result<()> {
    let metrics = Metrics::shared();
    let (config, text) = load_config(args.config.as_deref()).context("loading the config")?;
    tracing::info!(metrics = %config.names(), prometheus = %args.prometheus_url, "config loaded");
    metrics.config_reload(true, config.rules.len());
    let store = ConfigStore::new(config);
    let prometheus = Prometheus::new(
        &args.prometheus_url,
        args.max_concurrent_queries,
        metrics.clone(),
    )?;
    let auth = Arc::new(
        auth::Auth::from_args(&auth_args)
            .await
            .context("setting up authentication")?,
    );
    let mut state = AppState::new(store.clone(), prometheus, metrics.clone());
    let ready_auth = auth.clone();
    state.set_ready_check(move || ready_auth.ready());
    let app = router(state).layer(auth::layer(auth));

    let (stop_tx, stop_rx) = watch::channel(false);
    let watcher = spawn_config_watcher(&args, text, store, metrics, stop_rx);
    let listener = tokio::net::TcpListener::bind(args.listen_addr())
        .await
        .with_context(|| format!("binding {}", args.listen_addr()))?;
    let addr = listener.local_addr()?;
    let shutdown = async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    };
    if args.plain_http {
        tracing::warn!("--plain-http: serving without TLS; the kube-aggregator cannot use this");
        println!("listening http=http://{addr}");
        serve_plain(listener, app, shutdown, tls_args.shutdown_grace_period).await?;
    } else {
        let tls = tls::TlsConfig::from_args(&tls_args).context("setting up TLS")?;
        println!("listening https=https://{addr}");
        tls::serve(listener, tls, app, shutdown).await?;
    }
    if let Some(w) = watcher {
        let _ = w.await;
    }
    Ok(())
}

async fn run_explain(args: ExplainArgs) -> Result<()> {
    let config = match &args.config {
        Some(p) => Config::from_file(p)?,
        None => Config::embedded_default(),
    };
    let hpa_yaml = match &args.hpa {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        None => None,
    };
    let prometheus = Prometheus::new(&args.prometheus_url, 4, Metrics::shared())?;
    let req = explain::Request {
        metric: args.metric,
        namespace: args.namespace,
        selector: args.selector,
        hpa_yaml,
        current_replicas: args.current_replicas,
        ready_replicas: args.ready_replicas,
    };
    let report = explain::explain(&config, &req, |promql, timeout| {
        let prometheus = prometheus.clone();
        async move { prometheus.query("explain", &promql, timeout).await }
    })
    .await?;
    print!("{report}");
    Ok(())
}
