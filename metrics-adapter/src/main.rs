//! `openclaw-metrics-adapter`: `serve`, `check-config`, `explain` and `simulate-hpa`. Everything
//! else is in the library; this file only parses flags and wires the pieces.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use metrics_adapter::api::{AppState, router};
use metrics_adapter::config::{Config, ConfigStore};
use metrics_adapter::hpa_sim::{self, HpaSimulator, HttpsLister, Overrides, SyncRecord};
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
    /// Run the HPA controller's loop for a manifest against a live external metrics API:
    /// one line per sync on stdout, exit after --duration (or Ctrl-C).
    SimulateHpa(SimulateHpaArgs),
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

#[derive(Debug, clap::Args)]
struct SimulateHpaArgs {
    /// An autoscaling/v2 HorizontalPodAutoscaler manifest (YAML), e.g.
    /// deploy/base/limiter/hpa.yaml.
    #[arg(long, value_name = "FILE")]
    hpa: PathBuf,
    /// A kustomize patch of that HPA to apply first (repeatable, in order), e.g.
    /// deploy/overlays/production/hpa.yaml, or deploy/components/scale-on-depletion/hpa.yaml
    /// (adds the depletion metric to the default HPA's request rate).
    #[arg(long, value_name = "FILE")]
    patch: Vec<PathBuf>,
    /// Base URL of the external metrics API (the adapter): http://HOST:PORT, or https:// with
    /// --ca-file.
    #[arg(long, value_name = "URL")]
    adapter_url: String,
    /// PEM CA that signed the adapter's serving certificate (https:// URLs only).
    #[arg(long, value_name = "PEM")]
    ca_file: Option<PathBuf>,
    /// Replicas of the scale target at the start (clamped to minReplicas..maxReplicas).
    #[arg(long, default_value_t = 1)]
    initial_replicas: i32,
    /// Override minReplicas.
    #[arg(long)]
    min_replicas: Option<i32>,
    /// Override maxReplicas.
    #[arg(long)]
    max_replicas: Option<i32>,
    /// Namespace of the list calls (default: the manifest's, else `default`).
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// Simulated seconds per real second (at least 1): at 30, one sync every 0.5 s and the
    /// 300 s scale-down window passes in 10 s.
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Wall-clock time to run (e.g. `90s`, `10m`); the simulated time covered is this times
    /// --time-scale.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    duration: Duration,
    /// Bound on each list call.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    request_timeout: Duration,
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
        Command::SimulateHpa(args) => runtime.block_on(simulate_hpa(args)),
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

async fn simulate_hpa(args: SimulateHpaArgs) -> Result<()> {
    if !(args.time_scale.is_finite() && args.time_scale >= 1.0) {
        anyhow::bail!(
            "--time-scale {} must be a number of at least 1",
            args.time_scale
        );
    }
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    let yaml = read(&args.hpa)?;
    let overrides = Overrides {
        patches: args.patch.iter().map(read).collect::<Result<_>>()?,
        min_replicas: args.min_replicas,
        max_replicas: args.max_replicas,
        namespace: args.namespace.clone(),
    };
    let mut sim = HpaSimulator::from_manifest_with(&yaml, &overrides, args.initial_replicas)?;
    let spec = sim.spec();
    println!(
        "HPA {} in namespace {}: minReplicas {}, maxReplicas {}, {}, {} External metric(s); \
         starting at {} replicas; time scale {} (a sync every {:?} of real time) for {:?}",
        sim.name(),
        sim.namespace(),
        spec.min_replicas,
        spec.max_replicas,
        if spec.behavior.is_some() {
            "with behavior"
        } else {
            "no behavior (the controller's original rules)"
        },
        sim.metrics().len(),
        sim.current_replicas(),
        args.time_scale,
        sim.sync_period().div_f64(args.time_scale),
        args.duration,
    );
    let stop = async {
        tokio::select! {
            () = tokio::time::sleep(args.duration) => {}
            () = shutdown_signal() => {}
        }
    };
    let print = |r: &SyncRecord| println!("{r}");
    let records = match &args.ca_file {
        Some(ca) => {
            let lister = HttpsLister::new(&args.adapter_url, ca, args.request_timeout)?;
            hpa_sim::run_with(&mut sim, args.time_scale, |p| lister.get(p), print, stop).await
        }
        None => {
            if !args.adapter_url.starts_with("http://") {
                anyhow::bail!(
                    "--adapter-url {:?}: use http://, or https:// with --ca-file",
                    args.adapter_url
                );
            }
            let client = hpa_sim::http_client(args.request_timeout)?;
            hpa_sim::run(
                &mut sim,
                &client,
                &args.adapter_url,
                args.time_scale,
                print,
                stop,
            )
            .await
        }
    };
    let peak = records.iter().map(|r| r.desired).max().unwrap_or(0);
    let failed = records
        .iter()
        .filter(|r| r.metrics.iter().any(|m| m.value.is_err()))
        .count();
    println!(
        "done: {} syncs over {:.0} simulated s; replicas {} -> {} (peak {peak}); {failed} syncs with a failed metric",
        records.len(),
        records.last().map_or(0.0, |r| r.at_s),
        records
            .first()
            .map_or(sim.current_replicas(), |r| r.current),
        sim.current_replicas(),
    );
    Ok(())
}
