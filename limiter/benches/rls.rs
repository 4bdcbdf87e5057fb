//! What one `ShouldRateLimit` decision costs in-process, beside [`Limiter::decide`] (what a
//! `/rate` request pays below HTTP) measured in the same run, on the same keys:
//!
//! * `limiter_decide`: one decision, as for `/rate`;
//! * `rls_one_descriptor`: a request with one descriptor (`client_id=<key>`): rule lookup,
//!   bucket key, striped lock, peek then spend, status;
//! * `rls_two_descriptors`: the same plus a shared quota descriptor (peek both, spend both).
//!
//! 10 000 clients, each asked in turn, with buckets large enough that nearly every decision is
//! allowed. Not on the wire: the gRPC and HTTP layers come on top of both.
//!
//! Run: `cargo bench -p openclaw-limiter --bench rls`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::Criterion;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use openclaw_limiter::bucket::Rate;
use openclaw_limiter::clock::WallClock;
use openclaw_limiter::crdt::ReplicaId;
use openclaw_limiter::rls::{Rls, RlsConfig};
use openclaw_limiter::service::{Limiter, LimiterOptions};

const CLIENTS: usize = 10_000;

const RULES: &str = "
domain: edge
descriptors:
  - key: client_id
    rate_limit: {unit: second, requests_per_unit: 1000000000}
  - key: quota
    value: all
    rate_limit: {unit: second, requests_per_unit: 1000000000}
";

fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|&(key, value)| Entry {
                key: key.into(),
                value: value.into(),
            })
            .collect(),
        ..Default::default()
    }
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    let limiter = Arc::new(Limiter::new(LimiterOptions {
        node_id: "bench".into(),
        replica: ReplicaId(1),
        default_rate: Rate::try_new(1_000_000_000, 1000).unwrap(),
        clock: Arc::new(WallClock::new()),
        shards: 256,
        track_changes: false,
    }));
    let config = RlsConfig::from_files(&[("rules.yaml".into(), RULES.into())]).unwrap();
    let rls = Rls::new(limiter.clone(), config);
    let keys: Vec<String> = (0..CLIENTS).map(|i| format!("client-{i:07}")).collect();
    let one: Vec<RateLimitRequest> = keys
        .iter()
        .map(|k| RateLimitRequest {
            domain: "edge".into(),
            descriptors: vec![descriptor(&[("client_id", k)])],
            hits_addend: 0,
        })
        .collect();
    let two: Vec<RateLimitRequest> = keys
        .iter()
        .map(|k| RateLimitRequest {
            domain: "edge".into(),
            descriptors: vec![
                descriptor(&[("client_id", k)]),
                descriptor(&[("quota", "all")]),
            ],
            hits_addend: 0,
        })
        .collect();
    let mut group = criterion.benchmark_group("rls");
    let mut i = 0;
    group.bench_function("limiter_decide", |b| {
        b.iter(|| {
            i = (i + 1) % CLIENTS;
            black_box(limiter.decide("default", &keys[i], 1).unwrap())
        })
    });
    group.bench_function("rls_one_descriptor", |b| {
        b.iter(|| {
            i = (i + 1) % CLIENTS;
            black_box(rls.should_rate_limit(&one[i]).unwrap())
        })
    });
    group.bench_function("rls_two_descriptors", |b| {
        b.iter(|| {
            i = (i + 1) % CLIENTS;
            black_box(rls.should_rate_limit(&two[i]).unwrap())
        })
    });
    group.finish();
    criterion.final_summary();
}
