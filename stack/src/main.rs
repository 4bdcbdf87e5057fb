//! `openclaw-stack`: run the whole system locally (`up`) or a load scenario with a report
//! (`scenario`). See docs/local-stack.md.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use openclaw_stack::process::Group;
use openclaw_stack::report;
use openclaw_stack::scenario::{self, Kill, Options as ScenarioOptions, Profile, minsec};
use openclaw_stack::stack::{Options, Stack, default_config_dir};
use openclaw_stack::timescale::TimeScale;

#[derive(Debug, Parser)]
#[command(name = "openclaw-stack", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, clap::Args)]
struct StackArgs {
    /// Limiter pods the Deployment starts with (peered through a shared peers file).
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Simulated seconds per real second: 1 is real time; K > 1 divides every scrape and
    /// evaluation interval, alert `for`, range window and cache lifetime by K (floors in
    /// docs/local-stack.md).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// The repository root (alerts/rules, metrics-adapter/config, deploy/).
    #[arg(long, default_value_os_t = default_config_dir())]
    config_dir: PathBuf,
    /// Where openclaw-limiter and openclaw-metrics-adapter are [default: next to this binary].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Logs, generated configs and Prometheus data [default: a new temporary directory,
    /// removed at exit].
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start the stack, print where everything listens, run until Ctrl-C or SIGTERM.
    Up(StackArgs),
    /// Start the stack, run a load scenario with the simulated HPA, write a report, stop.
    Scenario(ScenarioArgs),
}

#[derive(Debug, clap::Args)]
struct ScenarioArgs {
    #[command(flatten)]
    stack: StackArgs,
    /// Report directory (report.md, SVG plots, CSV).
    #[arg(long, default_value = "openclaw-scenario-report")]
    out: PathBuf,
    /// Phases: `standard` (20 min) or `quick` (13.5 min), in scenario time.
    #[arg(long, default_value = "standard")]
    profile: String,
    /// SIGKILL one replica at this scenario time (e.g. `5m`, `150s`).
    #[arg(long, value_parser = humantime::parse_duration)]
    kill_replica_at: Option<std::time::Duration>,
    /// Which replica to kill: N is pod limiter-N of those the stack started with [default:
    /// the last]. It is restarted after the kubelet's back-off, from its snapshot directory.
    #[arg(long)]
    kill_replica: Option<usize>,
    /// The HPA manifest to simulate instead of deploy/base/limiter/hpa.yaml, relative to the
    /// repository, e.g. tests/fixtures/operations-guide-hpa.yaml (the guide's own HPA).
    #[arg(long, value_name = "FILE")]
    hpa: Option<PathBuf>,
    /// A kustomize patch of the HPA manifest to simulate with, relative to the
    /// repository (repeatable, applied in order), e.g.
    /// deploy/components/scale-on-depletion/hpa.yaml or deploy/overlays/production/hpa.yaml.
    #[arg(long, value_name = "FILE")]
    hpa_patch: Vec<PathBuf>,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    match cli.command {
        Cmd::Up(args) => runtime.block_on(up(args)),
        Cmd::Scenario(args) => runtime.block_on(scenario(args)),
    }
}

/// Options from the flags, and the temporary work directory if one was made.
fn options(args: &StackArgs) -> anyhow::Result<(Options, Option<tempfile::TempDir>)> {
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the binary's directory")?
            .to_path_buf(),
    };
    let (work_dir, temp) = match &args.work_dir {
        Some(d) => (d.clone(), None),
        None => {
            let t = tempfile::Builder::new()
                .prefix("openclaw-stack-")
                .tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let mut options = Options::new(args.config_dir.clone(), bin_dir, work_dir);
    options.replicas = args.replicas;
    options.time_scale = TimeScale::new(args.time_scale)?;
    options.group = Group::Own;
    Ok((options, temp))
}

async fn up(args: StackArgs) -> anyhow::Result<()> {
    let (options, _temp) = options(&args)?;
    let stack = tokio::select! {
        stack = Stack::up(options) => stack?,
        _ = shutdown_signal() => anyhow::bail!("interrupted while starting"),
    };
    for line in stack.listening_lines() {
        println!("{line}");
    }
    eprintln!(
        "\nOpenClaw stack up in {:.1} s ({} limiter replicas, time scale {}):\n\n{}",
        stack.startup.as_secs_f64(),
        stack.deployment.status().pods.len(),
        stack.options.time_scale.factor(),
        stack.table()
    );
    eprintln!(
        "Try:  curl -i '{}/rate?key=alice'",
        stack.limiter_urls().first().map_or("", String::as_str)
    );
    eprintln!(
        "      curl -s '{}/apis/external.metrics.k8s.io/v1beta1/namespaces/openclaw/openclaw_requests_per_second'",
        stack.adapter_url
    );
    eprintln!(
        "      open {}/alerts\nCtrl-C stops everything.",
        stack.prometheus.url()
    );
    shutdown_signal().await;
    eprintln!("stopping...");
    for (name, how) in stack.shutdown().await {
        eprintln!("  {name}: {how}");
    }
    Ok(())
}

async fn scenario(args: ScenarioArgs) -> anyhow::Result<()> {
    let (options, _temp) = options(&args.stack)?;
    let profile = Profile::named(&args.profile, options.replicas)?;
    let kill = args.kill_replica_at.map(|at| Kill {
        replica: args
            .kill_replica
            .unwrap_or(options.replicas.saturating_sub(1)),
        at,
    });
    let command = std::env::args()
        .map(|a| shell_quote(&a))
        .collect::<Vec<_>>()
        .join(" ");
    let k = options.time_scale.factor();
    eprintln!(
        "scenario {}: {} of scenario time at time scale {k} ({:.0} s real), report in {}",
        profile.name,
        minsec(profile.total().as_secs_f64()),
        profile.total().as_secs_f64() / k,
        args.out.display()
    );
    let mut stack = tokio::select! {
        stack = Stack::up(options) => stack?,
        _ = shutdown_signal() => anyhow::bail!("interrupted while starting"),
    };
    for line in stack.listening_lines() {
        println!("{line}");
    }
    eprintln!("stack up in {:.1} s", stack.startup.as_secs_f64());
    let scenario_options = ScenarioOptions {
        profile,
        kill,
        hpa_manifest: args.hpa.clone(),
        hpa_patches: args.hpa_patch.clone(),
        progress: !args.quiet,
    };
    let outcome = scenario::run(&mut stack, &scenario_options, shutdown_signal()).await;
    eprintln!("stopping the stack...");
    stack.shutdown().await;
    let outcome = outcome?;
    report::write(&outcome, &args.out, &command)?;
    eprintln!("report: {}", args.out.join("report.md").display());
    if let Some((peak, at)) = outcome.peak_desired() {
        eprintln!("peak desired replicas {peak} at {}", minsec(at));
    }
    Ok(())
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
