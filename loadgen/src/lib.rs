//! OpenClaw's own load generator for the limiter's decision APIs: `GET /rate` over HTTP/1.1, and
//! Envoy's rate limit service (`ShouldRateLimit`, unary gRPC over h2c).
//!
//! It sits beside the limiter replicas on one machine: the scenario runner (`stack/`) and the
//! `openclaw-load` binary drive it to put a known load on a local stack and read back what the
//! limiters decided. A [`Plan`] says where (loopback targets only), which [`Api`], how (open
//! loop on a [`RateProfile`]'s clock, or closed loop with N requests outstanding), which keys
//! (many, or a few hot ones), how the requests are spread over the replicas, and the bounds
//! (duration, request count); [`run`] carries it out and returns a [`Summary`]: counts by decision and by target, a
//! per-second timeline, and latency percentiles measured from each request's due time so that
//! a slow server cannot hide its queueing (no coordinated omission).
//!
//! - [`profile`]: rate profiles, their command-line syntax and the open-loop schedule (pure).
//! - [`plan`]: the plan, its validation, keys and spread.
//! - [`Endpoints`]: targets that change during a run, as a Service's ready endpoints do.
//! - `send`: one request over a pooled HTTP/1.1 client, with failover between targets.
//! - [`rls`]: `ShouldRateLimit` calls over HTTP/2 connections, and reading their answers.
//! - [`record`]: counters, timeline, histograms, [`Progress`] and [`Summary`].
//! - `engine`: the scheduler, the workers and the bounds ([`run`]).
//! - [`report`]: human-readable progress lines and the summary table.
//!
//! ```no_run
//! use std::time::Duration;
//! use openclaw_loadgen::{Drive, Keys, Plan, Progress, RateProfile, Spread, run};
//!
//! async fn spike() -> Result<(), openclaw_loadgen::Error> {
//!     let plan = Plan {
//!         targets: vec!["http://127.0.0.1:41001".into(), "http://127.0.0.1:41002".into()],
//!         drive: Drive::OpenLoop(RateProfile::parse("steps:200x10s,1000x20s")?),
//!         keys: Keys::Hot { count: 4, share: 0.9 },
//!         spread: Spread::RoundRobin,
//!         duration: Duration::from_secs(30),
//!         failover: true,
//!         ..Plan::default()
//!     };
//!     let on_progress = |p: &Progress| eprintln!("{:.0}s: {} sent", p.elapsed.as_secs_f64(), p.sent);
//!     let summary = run(&plan, on_progress, std::future::pending()).await?;
//!     assert_eq!(summary.requests, summary.allowed + summary.rejected + summary.errors);
//!     Ok(())
//! }
//! ```

mod endpoints;
mod engine;
pub mod plan;
pub mod profile;
pub mod record;
pub mod report;
pub mod rls;
mod send;

pub use endpoints::{Endpoints, MAX_TARGETS};
pub use engine::run;
pub use plan::{Api, Drive, Keys, Plan, Spread};
pub use profile::RateProfile;
pub use record::{Percentiles, Progress, SecondCounts, Summary, TargetCounts};
pub use rls::RlsCall;
pub use send::FAILOVER_PAUSE;

/// Everything that can go wrong before a run starts. A run itself does not fail: unanswered
/// requests are counted as errors in its [`Summary`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A rate profile that does not parse or asks for nothing sensible.
    #[error("rate profile `{input}`: {reason}")]
    InvalidProfile { input: String, reason: String },
    /// A `--keys` value that does not parse.
    #[error("keys `{input}`: {reason}")]
    InvalidKeys { input: String, reason: String },
    /// An `--rls-descriptor` value that does not parse.
    #[error("RLS descriptor `{input}`: {reason}")]
    InvalidDescriptor { input: String, reason: String },
    /// A `--spread` value that does not parse.
    #[error("spread `{input}`: {reason}")]
    InvalidSpread { input: String, reason: String },
    /// A plan with problems, each one listed (non-loopback targets among them).
    #[error("invalid plan:\n  - {}", .0.join("\n  - "))]
    InvalidPlan(Vec<String>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
