//! The OpenClaw metrics adapter: a Kubernetes `external.metrics.k8s.io/v1beta1` aggregated API
//! server that answers the HorizontalPodAutoscaler from Prometheus.
//!
//! The limiter replicas export Prometheus series (names in `openclaw_common::metric_names`);
//! Prometheus scrapes them; the HPA asks the Kubernetes API for an external metric such as
//! `openclaw_requests_per_second`, the aggregator forwards that call here, and we run the
//! SRE-configured PromQL for it ([`config`]), with the HPA's label selector ([`selector`])
//! injected into the parsed query ([`promql`]), through a bounded, single-flight cache
//! ([`cache`], [`prometheus`]), and answer with canonical Kubernetes quantities ([`quantity`])
//! in the exact wire shape the HPA decodes ([`api`]). [`explain`] shows an SRE every step of
//! that for one metric, down to the replica count the HPA would pick ([`hpa`], reading the
//! manifest with [`hpa_manifest`]); [`hpa_sim`] runs that controller loop over time against a
//! live external metrics API, as the local stack does.
//!
//! Serving is TLS ([`tls`]) with delegated authentication and authorization ([`auth`]) in front
//! of [`api::router`]. Everything is in the library; `main.rs` only parses flags and wires the
//! pieces, so tests drive [`api::router`] in-process with `tower::ServiceExt::oneshot`.

pub mod api;
pub mod auth;
pub mod cache;
pub mod config;
mod error;
pub mod explain;
pub mod hpa;
pub mod hpa_manifest;
pub mod hpa_sim;
pub mod metrics;
pub mod prometheus;
pub mod promql;
pub mod quantity;
pub mod selector;
pub mod server;
pub mod status;
pub mod tls;

pub use error::{Error, Result};
