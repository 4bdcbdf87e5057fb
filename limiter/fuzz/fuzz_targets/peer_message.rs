//! Whatever a peer holding the secret sends as a `POST /v1/sync` body: the replica must neither
//! panic nor hold afterwards anything no honest cluster could have sent it
//! (`Replicator::check_held_state`). The same entry point and invariants as
//! `limiter/tests/hostile_peer.rs`, for as long as scripts/fuzz-peer.sh is asked to run.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use openclaw_limiter::bucket::Rate;
use openclaw_limiter::clock::WallClock;
use openclaw_limiter::crdt::ReplicaId;
use openclaw_limiter::escrow::protocol::Params;
use openclaw_limiter::replication::{ReplicationOptions, Replicator, UNVERIFIED_BUDGET};
use openclaw_limiter::service::{Limiter, LimiterOptions};

/// One receiver for the whole run: state builds up across inputs, as it does on a replica.
fn receiver() -> &'static Replicator {
    static RECEIVER: OnceLock<Replicator> = OnceLock::new();
    RECEIVER.get_or_init(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let limiter = Arc::new(Limiter::new(LimiterOptions {
            node_id: "receiver".into(),
            replica: ReplicaId(1),
            default_rate: Rate::try_new(100, 600_000).unwrap(),
            clock: Arc::new(WallClock::new()),
            shards: 4,
            track_changes: true,
        }));
        Replicator::try_new(
            limiter,
            ReplicationOptions {
                secret: b"fuzz-peer-secret-0123456".to_vec(),
                tls: None,
                sync_interval: Duration::from_millis(50),
                anti_entropy_interval: Duration::from_secs(5),
                request_timeout: Duration::from_secs(1),
                strict: Params::default(),
                clock_guard: Duration::from_millis(500),
                loan_timeout: Duration::from_millis(25),
                unverified_budget: UNVERIFIED_BUDGET,
                legacy_signatures: false,
                max_buckets: openclaw_limiter::replication::DEFAULT_MAX_BUCKETS,
            },
        )
        .unwrap()
    })
}

fuzz_target!(|body: &[u8]| {
    let receiver = receiver();
    let _ = receiver.merge_authenticated(body);
    if let Err(problem) = receiver.check_held_state() {
        panic!("merged what no honest peer sends: {problem}");
    }
});
