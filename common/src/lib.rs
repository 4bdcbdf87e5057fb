//! What the OpenClaw limiter and its metrics adapter must agree on, and nothing else.
//!
//! The limiter exports Prometheus series; the metrics adapter's default PromQL, the alert rules
//! and the dashboard read them. Keeping the names here (and testing the other artifacts against
//! a running process) stops a rename in one place from silently breaking autoscaling in another.
//! Wire types that a client of `/rate` needs live here too, so the load generator and the tests
//! parse exactly what the server writes. With the `tls` feature, [`tls`] reads the PEM files both
//! TLS endpoints (adapter serving, limiter peers) take.

pub mod metric_names;
#[cfg(feature = "tls")]
pub mod tls;
pub mod wire;
