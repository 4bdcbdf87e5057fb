//! `openclaw-stack`: run the whole system locally (`up`) or a load scenario with a report
//! (`scenario`). See docs/local-stack.md.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use openclaw_stack::process::Group;
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
    /// Limiter replicas, peered with each other.
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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    match cli.command {
        Cmd::Up(args) => runtime.block_on(up(args)),
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
        stack.limiters.len(),
        stack.options.time_scale.factor(),
        stack.table()
    );
    eprintln!("Try:  curl -i '{}/rate?key=alice'", stack.limiters[0].api);
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

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
