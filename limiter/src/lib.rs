//! The OpenClaw rate-limit decision service.
//!
//! Other services ask it "may client K spend N tokens under policy P?" over HTTP. Each replica
//! keeps its buckets in a CRDT ([`crdt`]), so replicas at the edge can share one limit without a
//! central lock or store. The crate is layered so each layer can be tested alone:
//!
//! * [`bucket`] and [`crdt`]: pure arithmetic and the mergeable state; time is an argument.
//! * [`store`]: the sharded table of buckets; still no clock and no I/O.
//! * [`policy`]: named limits and per-key overrides, validated from YAML.
//! * [`service`]: the limiter as callers see it: reads the clock, counts, reloads policies.
//! * [`rls`]: Envoy's rate limit service (gRPC), descriptor rules decided on the same buckets.
//! * [`http`]: the decision API; [`server`]: lifecycle; [`config`]: flags and env vars;
//!   [`metrics`]: the Prometheus series.
//! * [`replication`] and [`membership`]: peers and what travels between them; [`listener`]
//!   and [`peer_tls`]: what the peer port accepts (connection limits, mutual TLS);
//!   [`node_binding`]: which node a replica id belongs to when certificates name nodes.

pub mod bucket;
pub mod clock;
pub mod config;
pub mod crdt;
pub mod escrow;
pub mod http;
pub mod lineage;
pub mod listener;
pub mod membership;
pub mod metrics;
pub mod node_binding;
pub mod peer_tls;
pub mod policy;
pub mod remote;
pub mod replication;
pub mod rls;
pub mod server;
pub mod service;
pub mod snapshot;
pub mod store;
