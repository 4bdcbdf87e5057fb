//! Envoy's rate limit service (`envoy.service.ratelimit.v3.RateLimitService`, "RLS"): edge
//! proxies (Envoy, Istio, Envoy Gateway, Contour, Emissary) ask the limiter directly, with
//! descriptor rules in envoyproxy/ratelimit's own YAML format, decided on the limiter's
//! replicated token buckets.
//!
//! * [`config`]: the rules, read and validated from `OPENCLAW_RLS_CONFIG`.
//! * [`service`]: `ShouldRateLimit` semantics over [`crate::service::Limiter`].
//! * [`grpc`]: the gRPC listener (h2c), the standard health service and the config watcher.
//!
//! `docs/rls.md` describes the configuration, the semantics and what replicas promise.

pub mod config;
pub mod grpc;
pub mod service;

pub use config::{RlsConfig, RlsConfigErrors};
pub use service::{Rls, RlsError};

#[cfg(test)]
mod tests;
