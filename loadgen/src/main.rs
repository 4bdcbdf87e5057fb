//! `openclaw-load`: load on the limiter's `/rate` API, or on its Envoy rate limit service, from
//! the command line. Parses and checks every flag (listing every problem, exit 64), runs the
//! plan with a progress line on stderr, stops early on Ctrl-C or SIGTERM, and prints the summary
//! (a table, or JSON with `--json`).

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use openclaw_loadgen::report::{bar_line, plain_line, summary_table};
use openclaw_loadgen::{
    Api, Drive, Error, Keys, Plan, Progress, RateProfile, RlsCall, Spread, run,
};

/// Exit code for bad input (EX_USAGE).
const EXIT_USAGE: u8 = 64;
/// Duration when neither `--duration` nor a profile with an end says how long.
const DEFAULT_DURATION: Duration = Duration::from_secs(10);

/// Load generator for the OpenClaw limiter's decision API (GET /rate), or its Envoy rate limit
/// service (ShouldRateLimit over h2c, with --rls-domain), loopback targets only.
///
/// Open loop (`--rate PROFILE`) sends on the profile's clock whatever the answers do, and
/// measures latency from each request's due time; closed loop (`--connections N`) keeps N
/// requests outstanding (RLS: N connections x `--streams` calls). See loadgen/README.md for the
/// profile syntax and examples.
#[derive(Debug, Parser)]
#[command(name = "openclaw-load", version)]
struct Args {
    /// Limiter API base URL, e.g. http://127.0.0.1:8080 (repeat, or a comma list).
    #[arg(long = "target", value_name = "URL", value_delimiter = ',')]
    targets: Vec<String>,
    /// Open loop at this rate profile: 500 | steps:200x10s,1000x20s | ramp:100-2000/60s |
    /// spike:300,3000@20s+10s.
    #[arg(long, value_name = "PROFILE", allow_hyphen_values = true)]
    rate: Option<String>,
    /// Closed loop with this many connections, each sending when its last answer came.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    connections: Option<String>,
    /// Call Envoy's rate limit service (ShouldRateLimit, gRPC over h2c) with this domain instead
    /// of GET /rate; --target is then the limiter's gRPC listener.
    #[arg(long, value_name = "DOMAIN")]
    rls_domain: Option<String>,
    /// A descriptor of every call: KEY=VALUE[,KEY=VALUE...]; a KEY alone takes the request's
    /// key (--keys). Repeat for several descriptors.
    #[arg(long, value_name = "ENTRIES")]
    rls_descriptor: Vec<String>,
    /// RLS, closed loop: calls outstanding at once on each HTTP/2 connection [default: 1].
    #[arg(long, value_name = "M", allow_hyphen_values = true)]
    streams: Option<String>,
    /// How long to send [default: the profile's length, else 10s].
    #[arg(long, value_name = "DURATION")]
    duration: Option<String>,
    /// Stop after sending this many requests.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    max_requests: Option<String>,
    /// many:COUNT (uniform over key-0..) or hot:COUNT[:SHARE] (SHARE of requests, default 0.9,
    /// on hot-0..; the rest over a million cold keys).
    #[arg(long, value_name = "KEYS", default_value = "many:10000")]
    keys: String,
    /// round-robin, or one:INDEX to send everything to one target.
    #[arg(long, value_name = "SPREAD", default_value = "round-robin")]
    spread: String,
    /// Policy to ask for (?policy=); the limiter's default when absent.
    #[arg(long)]
    policy: Option<String>,
    /// Tokens per request (?cost=; RLS: hits_addend).
    #[arg(long, default_value = "1", allow_hyphen_values = true)]
    cost: String,
    /// Bearer token for a limiter with OPENCLAW_API_KEY set.
    #[arg(long, env = "OPENCLAW_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Skip a target that refuses connections for 1 s and send to the next live one.
    #[arg(long)]
    failover: bool,
    /// A request unanswered after this is an error.
    #[arg(long, value_name = "DURATION", default_value = "2s")]
    timeout: String,
    /// Open loop: most requests outstanding; a request due beyond this is counted as missed.
    #[arg(
        long,
        value_name = "N",
        default_value = "4096",
        allow_hyphen_values = true
    )]
    max_in_flight: String,
    /// Seed of the key choice (same seed, same keys in the same order).
    #[arg(long, allow_hyphen_values = true)]
    seed: Option<String>,
    /// Threads sending and receiving; 1 runs everything on one thread, which sends each
    /// HTTP/2 connection's calls in fewer writes [default: the cores this process may use].
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    threads: Option<String>,
    /// Print the summary as JSON on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            // --help, --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let Setup {
        plan,
        describe,
        threads,
    } = match plan_from(&args) {
        Ok(setup) => setup,
        Err(problems) => {
            eprintln!("openclaw-load: invalid arguments:");
            for problem in problems {
                eprintln!("  - {problem}");
            }
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = match runtime(threads) {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("openclaw-load: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async_main(plan, describe, &args))
}

async fn async_main(plan: Plan, describe: String, args: &Args) -> ExitCode {
    let terminal = std::io::stderr().is_terminal();
    let quiet = args.quiet;
    if !quiet {
        eprintln!("openclaw-load: {describe}");
    }
    let on_progress = move |p: &Progress| {
        if quiet {
            return;
        }
        let mut err = std::io::stderr().lock();
        if terminal {
            let _ = write!(err, "\r\x1b[2K{}", bar_line(p));
        } else {
            let _ = writeln!(err, "{}", plain_line(p));
        }
        let _ = err.flush();
    };
    let summary = match run(&plan, on_progress, stop_signal()).await {
        Ok(summary) => summary,
        Err(Error::InvalidPlan(problems)) => {
            eprintln!("openclaw-load: invalid arguments:");
            for problem in problems {
                eprintln!("  - {problem}");
            }
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            eprintln!("openclaw-load: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if terminal && !quiet {
        eprintln!();
    }
    let table = summary_table(&summary);
    if args.json {
        eprint!("{table}");
        match serde_json::to_string_pretty(&summary) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("openclaw-load: cannot write the summary as JSON: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{table}");
    }
    if summary.requests > 0 && summary.errors == summary.requests {
        eprintln!("openclaw-load: no request was answered with a decision");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// The runtime the run goes on: with one thread, Tokio's single-threaded one.
///
/// Why not the multi-threaded runtime with one worker: there, a task woken by the running task
/// runs next, so each call that an HTTP/2 connection's answers wake sends its next request,
/// wakes the connection and has it written at once, one write per call. On the single-threaded
/// runtime every woken call runs first and the connection writes their requests together.
/// Measured with `--rls-domain`, 4 connections x 16 streams, pinned to one core: 0.83 writes
/// per call against 0.13, and 45-70 % more calls per second from the same core (loadgen/README.md,
/// "How fast"). Also what the limiter's gRPC workers do, for the same reason.
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

/// Completes on Ctrl-C or SIGTERM; never if neither can be listened for.
async fn stop_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// Most `--threads`.
const MAX_THREADS: u64 = 1024;

/// What the command line asks for.
struct Setup {
    plan: Plan,
    /// One line saying what will run.
    describe: String,
    /// The runtime's threads.
    threads: usize,
}

/// Every flag checked; every problem listed.
fn plan_from(args: &Args) -> Result<Setup, Vec<String>> {
    let mut problems = Vec::new();
    let mut plan = Plan {
        targets: args
            .targets
            .iter()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect(),
        ..Plan::default()
    };
    if plan.targets.is_empty() {
        problems.push("--target: give at least one limiter URL, e.g. http://127.0.0.1:8080".into());
    }
    let mut profile_length = None;
    match (&args.rate, &args.connections) {
        (Some(_), Some(_)) => problems.push(
            "--rate (open loop) and --connections (closed loop) exclude each other: give one"
                .into(),
        ),
        (None, None) => {
            problems.push("give --rate PROFILE (open loop) or --connections N (closed loop)".into())
        }
        (Some(rate), None) => match RateProfile::parse(rate) {
            Ok(profile) => {
                profile_length = profile.length();
                plan.drive = Drive::OpenLoop(profile);
            }
            Err(e) => problems.push(format!("--rate: {e}")),
        },
        (None, Some(connections)) => match connections.trim().parse::<usize>() {
            Ok(n) if (1..=10_000).contains(&n) => plan.drive = Drive::ClosedLoop { connections: n },
            _ => problems.push(format!(
                "--connections `{connections}`: expected a whole number from 1 to 10000"
            )),
        },
    }
    let streams = args
        .streams
        .as_ref()
        .and_then(|m| number("--streams", m, 1, &mut problems))
        .unwrap_or(1);
    match &args.rls_domain {
        Some(domain) => {
            let mut call = RlsCall::new(domain.trim());
            for d in &args.rls_descriptor {
                match RlsCall::parse_descriptor(d) {
                    Ok(entries) => call.descriptors.push(entries),
                    Err(e) => problems.push(format!("--rls-descriptor: {e}")),
                }
            }
            match (&mut plan.drive, &args.streams) {
                (Drive::ClosedLoop { connections }, _) => {
                    call.connections = *connections;
                    match usize::try_from(streams).map(|m| m.saturating_mul(*connections)) {
                        Ok(calls) if calls <= 10_000 => *connections = calls,
                        _ => problems.push(format!(
                            "--connections {connections} x --streams {streams}: at most 10000 \
                             calls outstanding"
                        )),
                    }
                }
                (Drive::OpenLoop(_), Some(_)) => problems.push(
                    "--streams is for the closed loop; in open loop the rate sets how many \
                     calls are outstanding"
                        .into(),
                ),
                (Drive::OpenLoop(_), None) => {}
            }
            plan.api = Api::Rls(call);
        }
        None => {
            if !args.rls_descriptor.is_empty() {
                problems.push("--rls-descriptor needs --rls-domain".into());
            }
            if args.streams.is_some() {
                problems.push(
                    "--streams is for RLS calls over HTTP/2 (--rls-domain); HTTP/1.1 carries one \
                     request at a time per connection"
                        .into(),
                );
            }
        }
    }
    plan.duration = match &args.duration {
        Some(d) => duration("--duration", d, &mut problems).unwrap_or(DEFAULT_DURATION),
        None => profile_length.unwrap_or(DEFAULT_DURATION),
    };
    if let Some(max) = &args.max_requests {
        plan.max_requests = number("--max-requests", max, 1, &mut problems);
    }
    match Keys::parse(&args.keys) {
        Ok(keys) => plan.keys = keys,
        Err(e) => problems.push(format!("--keys: {e}")),
    }
    match Spread::parse(&args.spread) {
        Ok(spread) => plan.spread = spread,
        Err(e) => problems.push(format!("--spread: {e}")),
    }
    plan.policy = args.policy.clone();
    plan.cost = number("--cost", &args.cost, 1, &mut problems).unwrap_or(1);
    plan.api_key = args.api_key.clone().filter(|k| !k.is_empty());
    plan.failover = args.failover;
    if let Some(timeout) = duration("--timeout", &args.timeout, &mut problems) {
        plan.request_timeout = timeout;
    }
    if let Some(n) = number("--max-in-flight", &args.max_in_flight, 1, &mut problems) {
        plan.max_in_flight = usize::try_from(n).unwrap_or(usize::MAX);
    }
    if let Some(seed) = &args.seed {
        plan.seed = number("--seed", seed, 0, &mut problems).unwrap_or(plan.seed);
    }
    let threads = match &args.threads {
        Some(t) => match t.trim().parse::<u64>() {
            Ok(n) if (1..=MAX_THREADS).contains(&n) => n as usize,
            _ => {
                problems.push(format!(
                    "--threads `{t}`: expected a whole number from 1 to {MAX_THREADS}"
                ));
                1
            }
        },
        None => std::thread::available_parallelism().map_or(1, usize::from),
    };
    // What the flags alone cannot tell: loopback targets, spread index, policy name, bounds.
    // (No targets was said already, and so was a descriptor that does not parse.)
    if let Err(Error::InvalidPlan(more)) = plan.validate() {
        let said = |p: &String| {
            p.starts_with("no target")
                || (!args.rls_descriptor.is_empty() && p.contains("at least one descriptor"))
        };
        problems.extend(more.into_iter().filter(|p| !said(p)));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let drive = match (&args.rate, &plan.drive, &plan.api) {
        (Some(rate), _, Api::Rate) => format!("open loop, rate {rate}"),
        (Some(rate), _, Api::Rls(call)) => format!(
            "ShouldRateLimit (domain {}), open loop, rate {rate}, {} connection{} per target",
            call.domain,
            call.connections,
            if call.connections == 1 { "" } else { "s" }
        ),
        (None, Drive::ClosedLoop { connections }, Api::Rate) => {
            format!("closed loop, {connections} connections")
        }
        (None, Drive::ClosedLoop { .. }, Api::Rls(call)) => format!(
            "ShouldRateLimit (domain {}), closed loop, {} connections x {streams} streams",
            call.domain, call.connections
        ),
        (None, Drive::OpenLoop(_), _) => "open loop".to_owned(),
    };
    let describe = format!(
        "{drive} for {} on {} target{}, keys {}, {}{}{}, {threads} thread{}",
        humantime::format_duration(plan.duration),
        plan.targets.len(),
        if plan.targets.len() == 1 { "" } else { "s" },
        args.keys,
        args.spread,
        plan.max_requests
            .map(|m| format!(", at most {m} requests"))
            .unwrap_or_default(),
        if plan.failover { ", failover" } else { "" },
        if threads == 1 { "" } else { "s" },
    );
    Ok(Setup {
        plan,
        describe,
        threads,
    })
}

fn duration(flag: &str, value: &str, problems: &mut Vec<String>) -> Option<Duration> {
    match humantime::parse_duration(value.trim()) {
        Ok(d) if !d.is_zero() => Some(d),
        Ok(_) => {
            problems.push(format!("{flag} `{value}`: must be longer than 0 s"));
            None
        }
        Err(e) => {
            problems.push(format!("{flag} `{value}`: {e} (e.g. 500ms, 30s, 2m)"));
            None
        }
    }
}

fn number(flag: &str, value: &str, min: u64, problems: &mut Vec<String>) -> Option<u64> {
    match value.trim().parse::<u64>() {
        Ok(n) if n >= min => Some(n),
        _ => {
            problems.push(format!(
                "{flag} `{value}`: expected a whole number, at least {min}"
            ));
            None
        }
    }
}
