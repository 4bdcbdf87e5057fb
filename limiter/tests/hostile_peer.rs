//! A peer that holds the secret, sending whatever it likes: structure-aware property tests of
//! the peer message decoder and merge (`Replicator::merge_authenticated`, what the listener does
//! with a body once its signatures check). Random bytes, and messages built field by field with
//! hostile values (extreme numbers, out-of-range indexes, the receiver's own id, keys of every
//! length, thousands of components, stamps far ahead), in JSON and in the binary form of
//! version 4, and either with bytes changed, in sequences, so merges of several
//! messages are checked too. After every message the receiver must hold only what an honest
//! cluster could have sent it:
//!
//! * a refused message changes nothing;
//! * every bucket has at most `MAX_COMPONENTS_PER_BUCKET` components;
//! * no component claims more than its owner can have admitted (docs/crdt.md, "What a peer may
//!   send"), by the receiver's clock and the guard;
//! * nothing panics (arithmetic overflow included: tests build with debug assertions).
//!
//! `PROPTEST_CASES` sets the number of sequences (default 64 here, in CI); the libFuzzer target
//! in `limiter/fuzz` (scripts/fuzz-peer.sh) runs the same entry point for as long as asked.

use std::sync::Arc;
use std::time::Duration;

use openclaw_limiter::bucket::{Micros, Rate};
use openclaw_limiter::clock::{Clock, WallClock};
use openclaw_limiter::crdt::ReplicaId;
use openclaw_limiter::escrow::protocol::Params;
use openclaw_limiter::replication::{self, ReplicationOptions, Replicator, UNVERIFIED_BUDGET};
use openclaw_limiter::service::{Limiter, LimiterOptions};
use proptest::prelude::*;
use serde_json::{Value, json};

const GUARD: Duration = Duration::from_millis(500);
const SELF: u64 = 1;

fn receiver() -> Arc<Replicator> {
    // The replicator's HTTP client needs a TLS provider, as main() installs.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let limiter = Arc::new(Limiter::new(LimiterOptions {
        node_id: "receiver".into(),
        replica: ReplicaId(SELF),
        default_rate: Rate::try_new(100, 600_000).unwrap(),
        clock: Arc::new(WallClock::new()),
        shards: 4,
        track_changes: true,
    }));
    Arc::new(
        Replicator::try_new(
            limiter,
            ReplicationOptions {
                secret: b"hostile-peer-secret-0123".to_vec(),
                tls: None,
                sync_interval: Duration::from_millis(50),
                anti_entropy_interval: Duration::from_secs(5),
                request_timeout: Duration::from_secs(1),
                strict: Params::default(),
                clock_guard: GUARD,
                loan_timeout: Duration::from_millis(25),
                unverified_budget: UNVERIFIED_BUDGET,
                legacy_signatures: false,
                max_buckets: openclaw_limiter::replication::DEFAULT_MAX_BUCKETS,
                max_requests_per_peer: 32,
                max_missed: openclaw_limiter::replication::DEFAULT_MAX_MISSED,
            },
        )
        .unwrap(),
    )
}

/// Everything the receiver holds, to compare before and after a refused message.
fn contents(replicator: &Replicator) -> Vec<(u32, String, String)> {
    let mut all = Vec::new();
    replicator
        .limiter()
        .store()
        .for_each(|policy, key, state| all.push((policy.0, key.to_owned(), format!("{state:?}"))));
    all.sort();
    all
}

fn check_invariants(replicator: &Replicator) -> Result<(), TestCaseError> {
    replicator.check_held_state().map_err(|problem| {
        TestCaseError::fail(format!("merged what no honest peer sends: {problem}"))
    })
}

/// A number as an attacker picks it: the extremes, the receiver's own values, near now, or
/// anything.
fn hostile_u64(now: Micros) -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0),
        Just(1),
        Just(u64::MAX),
        Just(u64::MAX - 1),
        Just(SELF),
        (0..10_000_000u64).prop_map(move |d| now.saturating_sub(d)),
        (0..2_000_000u64).prop_map(move |d| now.saturating_add(d)),
        0..1000u64,
        any::<u64>(),
    ]
}

fn component(now: Micros) -> BoxedStrategy<Value> {
    (
        hostile_u64(now),
        hostile_u64(now),
        hostile_u64(now),
        hostile_u64(now),
    )
        .prop_map(|(replica, incarnation, consumed, absorbed)| {
            json!([replica, incarnation, consumed, absorbed])
        })
        .boxed()
}

fn entry(now: Micros) -> BoxedStrategy<Value> {
    (
        prop_oneof![Just(0u32), Just(1u32), 0..5u32, any::<u32>()],
        prop_oneof![Just(String::new()), "[a-c]{1,2}", "[a-z]{300}", ".{0,20}",],
        hostile_u64(now),
        hostile_u64(now),
        prop_oneof![
            8 => prop::collection::vec(component(now), 0..4),
            1 => prop::collection::vec(component(now), 60..80),
        ],
    )
        .prop_map(|(policy, key, epoch, rebaser, components)| {
            json!([policy, key, epoch, rebaser, components])
        })
        .boxed()
}

fn message(now: Micros) -> BoxedStrategy<Vec<u8>> {
    (
        prop_oneof![Just(2u32), Just(1u32), any::<u32>()],
        prop_oneof!["peer-[a-c]", Just(String::new()), ".{0,300}"],
        hostile_u64(now),
        prop_oneof![
            Just(now),
            hostile_u64(now),
            (0..400_000u64).prop_map(move |d| now + d)
        ],
        any::<bool>(),
        prop::collection::vec(prop_oneof![Just("default".to_owned()), ".{0,10}"], 0..3),
        prop::collection::vec(entry(now), 0..6),
    )
        .prop_map(|(v, node, replica, sent_at, full, policies, entries)| {
            serde_json::to_vec(&json!({
                "v": v, "node": node, "replica": replica, "sent_at": sent_at, "full": full,
                "policies": policies, "entries": entries,
            }))
            .unwrap()
        })
        .boxed()
}

/// A stamp of a compact (version 3) entry: an offset from the message's `sent_at`.
fn compact_stamp() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(0i64),
        Just(i64::MIN),
        Just(i64::MAX),
        -10_000_000..2_000_000i64,
        any::<i64>(),
    ]
}

/// A compact entry: replicas by index into the message's table (in range or not), stamps as
/// offsets, `absorbed` a number or `null` (unlisted).
fn compact_entry() -> BoxedStrategy<Value> {
    let index = || prop_oneof![4 => 0..3u64, 1 => any::<u64>()];
    let component = move || {
        (
            index(),
            compact_stamp(),
            prop_oneof![0..1000u64, any::<u64>()],
            prop_oneof![
                Just(None),
                (0..1000u64).prop_map(Some),
                any::<u64>().prop_map(Some)
            ],
        )
            .prop_map(|(replica, incarnation, consumed, absorbed)| {
                json!([replica, incarnation, consumed, absorbed])
            })
    };
    (
        prop_oneof![Just(0u32), 0..3u32, any::<u32>()],
        prop_oneof!["[a-c]{1,2}", Just(String::new())],
        compact_stamp(),
        index(),
        prop_oneof![
            8 => prop::collection::vec(component(), 0..4),
            1 => prop::collection::vec(component(), 60..80),
        ],
    )
        .prop_map(|(policy, key, epoch, rebaser, components)| {
            json!([policy, key, epoch, rebaser, components])
        })
        .boxed()
}

/// A compact (version 3) message, its replica table made of hostile ids.
fn compact_message(now: Micros) -> BoxedStrategy<Vec<u8>> {
    (
        prop_oneof!["peer-[a-c]", Just(String::new())],
        hostile_u64(now),
        prop_oneof![Just(now), hostile_u64(now)],
        prop::collection::vec(hostile_u64(now), 0..4),
        prop::collection::vec(prop_oneof![Just("default".to_owned()), ".{0,10}"], 0..3),
        prop::collection::vec(compact_entry(), 0..6),
    )
        .prop_map(|(node, replica, sent_at, replicas, policies, entries)| {
            serde_json::to_vec(&json!({
                "v": 3, "node": node, "replica": replica, "sent_at": sent_at, "full": false,
                "policies": policies, "replicas": replicas, "entries": entries,
            }))
            .unwrap()
        })
        .boxed()
}

/// A compact message in the binary form (version 4): the same hostile values, as a replica of
/// this version sends deltas. Messages whose values the binary form cannot carry (a policy
/// index beyond `u32`, say) stay JSON.
fn binary_message(now: Micros) -> BoxedStrategy<Vec<u8>> {
    compact_message(now)
        .prop_map(|json| replication::binary_from_json(&json).unwrap_or(json))
        .boxed()
}

/// A valid message, or one with a few of its bytes changed.
fn mutated(now: Micros) -> BoxedStrategy<Vec<u8>> {
    (
        prop_oneof![message(now), compact_message(now), binary_message(now)],
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
    )
        .prop_map(|(mut bytes, flips)| {
            for (at, byte) in flips {
                if !bytes.is_empty() {
                    let i = at.index(bytes.len());
                    bytes[i] = byte;
                }
            }
            bytes
        })
        .boxed()
}

fn body(now: Micros) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..512),
        4 => message(now),
        3 => compact_message(now),
        3 => binary_message(now),
        3 => mutated(now),
    ]
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(64)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn whatever_a_peer_sends_the_receiver_holds_only_what_an_honest_cluster_could(
        bodies in prop::collection::vec(body(WallClock::new().now()), 1..12)
    ) {
        let receiver = receiver();
        for body in bodies {
            let before = contents(&receiver);
            if receiver.merge_authenticated(&body).is_err() {
                prop_assert_eq!(&contents(&receiver), &before, "a refused message changed state");
            }
            check_invariants(&receiver)?;
        }
    }
}

/// Components are capped per bucket, not only per message: two messages of 40 components each
/// for one key must not leave 80 in the bucket.
#[test]
fn components_are_bounded_across_messages_too() {
    let receiver = receiver();
    let now = receiver.limiter().now();
    for batch in 0..2u64 {
        let components: Vec<Value> = (0..40u64)
            .map(|i| json!([100 + batch * 40 + i, now, 1, u64::MAX]))
            .collect();
        let body = serde_json::to_vec(&json!({
            "v": 2, "node": "peer", "replica": 7, "sent_at": now, "full": false,
            "policies": ["default"], "entries": [[0, "k", 0, 0, components]],
        }))
        .unwrap();
        let _ = receiver.merge_authenticated(&body);
    }
    check_invariants(&receiver).unwrap();
}

/// The fuzz target's seeds (`limiter/fuzz/seeds/peer_message`, scripts/fuzz-peer.sh) are
/// messages a replica takes, JSON and binary among them: libFuzzer mutates from them, and a seed
/// the decoder refused would fuzz little but the refusal.
#[test]
fn every_fuzz_seed_is_a_message_a_replica_takes() {
    let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/peer_message");
    let mut forms = std::collections::BTreeSet::new();
    for seed in std::fs::read_dir(&seeds).unwrap() {
        let path = seed.unwrap().path();
        let body = std::fs::read(&path).unwrap();
        let taken = receiver().merge_authenticated(&body);
        // Taken, not refused: the buckets the seeds name have long refilled (their stamps
        // are fixed), so what a merge changes depends on the day.
        assert!(taken.is_ok(), "{}: {taken:?}", path.display());
        forms.insert(if body.starts_with(b"{") {
            "JSON"
        } else {
            "binary"
        });
    }
    assert_eq!(forms.into_iter().collect::<Vec<_>>(), ["JSON", "binary"]);
}
