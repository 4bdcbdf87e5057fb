//! The whole OpenClaw system on one machine, and the scenarios that prove it scales.
//!
//! `openclaw-stack up` starts, on 127.0.0.1 with port 0 everywhere, the limiter Deployment and
//! its Service (N pods that find each other through a shared peers file, restarted when they
//! die, scaled on request: [`deployment`]), Debian's Prometheus scraping them with the rules of
//! `alerts/rules/`, and the metrics adapter serving `external.metrics.k8s.io` from that
//! Prometheus ([`stack`]). `openclaw-stack scenario` drives load through the Service with the
//! project's load generator, runs the HorizontalPodAutoscaler's algorithm on
//! `deploy/base/limiter/hpa.yaml` against the adapter and scales the Deployment to what it
//! decides, samples Prometheus and its alerts, and writes a report with plots ([`scenario`],
//! [`report`]). A time scale compresses every wait of the system so that tests see minutes of
//! behaviour in seconds ([`timescale`]). The end-to-end tests in `tests/tests/whole_system.rs`
//! use this library.

pub mod deployment;
pub mod figures;
pub mod kube_state;
pub mod plot;
pub mod process;
pub mod prometheus;
pub mod report;
pub mod scenario;
pub mod stack;
pub mod timescale;
pub mod witness;

/// The load generator the scenarios drive (for callers that put load on the Service).
pub use openclaw_loadgen as loadgen;

use std::path::{Path, PathBuf};

/// Everything that can go wrong while running the stack.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A child process could not be started at all.
    #[error("cannot start {name} ({program}): {source}")]
    Start {
        name: String,
        program: String,
        source: std::io::Error,
    },
    /// A child process misbehaved (exited, did not listen in time); with the end of its log.
    #[error("{name} {what}; log {log}:\n{log_tail}")]
    Child {
        name: String,
        what: String,
        log_tail: String,
        log: PathBuf,
    },
    /// Anything else, said in words.
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io {
            path: path.to_owned(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A multi-threaded Tokio runtime for callers that have none (the end-to-end tests): the
/// stack, the load generator and the HPA simulator are async.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Other(format!("tokio runtime: {e}")))
}
