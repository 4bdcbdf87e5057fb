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

/// The names a rate's unit may take (a policy's `unit`, a rate limit rule's `unit`), and their
/// length in milliseconds: envoyproxy/ratelimit's units and lengths (`UnitToDivider`: a month is
/// 30 days, a year 365), so its configs carry over. A bucket refills continuously over that
/// length; it is not a calendar window.
pub const UNITS: [(&str, u64); 7] = [
    ("second", 1_000),
    ("minute", 60_000),
    ("hour", 3_600_000),
    ("day", 86_400_000),
    ("week", 7 * 86_400_000),
    ("month", 30 * 86_400_000),
    ("year", 365 * 86_400_000),
];
