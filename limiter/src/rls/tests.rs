//! `ShouldRateLimit` semantics, one test per rule of `docs/rls.md`, on a manual clock.

use std::sync::Arc;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::{Duration, UInt64Value};

use super::config::RlsConfig;
use super::service::{Rls, RlsError, bucket_key};
use crate::bucket::Rate;
use crate::clock::ManualClock;
use crate::crdt::ReplicaId;
use crate::policy::Mode;
use crate::service::{Limiter, LimiterOptions};

const CONFIG: &str = "
domain: edge
descriptors:
  - key: client
    rate_limit: {unit: minute, requests_per_unit: 10, name: per_client}
  - key: tight
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: daily
    rate_limit: {unit: day, requests_per_unit: 1000, name: daily}
  - key: health
    rate_limit: {unlimited: true, name: health}
  - key: trial
    shadow_mode: true
    rate_limit: {unit: hour, requests_per_unit: 2, name: trial}
  - key: blocked
    rate_limit: {unit: second, requests_per_unit: 0}
  - key: path
    value: /search*
    detailed_metric: true
    rate_limit: {unit: minute, requests_per_unit: 3, name: search}
  - key: plan
    value: gold
    rate_limit: {unit: minute, requests_per_unit: 100, name: gold, replaces: [{name: per_client}]}
";

fn rls_with(config: &str) -> (Rls, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::at(1_000_000_000));
    let limiter = Arc::new(Limiter::new(LimiterOptions {
        node_id: "test".into(),
        replica: ReplicaId(1),
        default_rate: Rate::try_new(10, 1000).unwrap(),
        clock: clock.clone(),
        shards: 4,
        track_changes: false,
    }));
    let config = RlsConfig::from_files(&[("rls.yaml".into(), config.into())]).unwrap();
    (Rls::new(limiter, config), clock)
}

fn rls() -> (Rls, Arc<ManualClock>) {
    rls_with(CONFIG)
}

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

fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.into(),
        descriptors,
        hits_addend: 0,
    }
}

fn ask(rls: &Rls, descriptors: &[&[(&str, &str)]]) -> RateLimitResponse {
    rls.should_rate_limit(&request(
        "edge",
        descriptors.iter().map(|d| descriptor(d)).collect(),
    ))
    .unwrap()
}

fn codes(response: &RateLimitResponse) -> Vec<Code> {
    response
        .statuses
        .iter()
        .map(|s| Code::try_from(s.code).unwrap())
        .collect()
}

fn remaining(rls: &Rls, policy: &str, entries: &[(&str, &str)]) -> u64 {
    let key = bucket_key("edge", &descriptor(entries).entries, &[]);
    rls.limiter()
        .peek(policy, &key, 1)
        .unwrap()
        .0
        .outcome
        .remaining
}

#[test]
fn allowed_up_to_the_bucket_then_over_limit_with_the_limit_and_remaining() {
    let (rls, _) = rls();
    for expected in (0..10).rev() {
        let response = ask(&rls, &[&[("client", "a")]]);
        assert_eq!(response.overall_code, Code::Ok as i32);
        let status = &response.statuses[0];
        assert_eq!(status.limit_remaining, expected);
        assert_eq!(
            status.current_limit,
            Some(RateLimit {
                name: "per_client".into(),
                requests_per_unit: 10,
                unit: 2,
            })
        );
    }
    let response = ask(&rls, &[&[("client", "a")]]);
    assert_eq!(response.overall_code, Code::OverLimit as i32);
    assert_eq!(codes(&response), [Code::OverLimit]);
    assert_eq!(response.statuses[0].limit_remaining, 0);
    // Another client has its own bucket.
    assert_eq!(
        ask(&rls, &[&[("client", "b")]]).overall_code,
        Code::Ok as i32
    );
}

#[test]
fn duration_until_reset_is_time_to_full_when_allowed_and_time_to_retry_when_refused() {
    let (rls, clock) = rls();
    // 10 per minute: a token every 6 s. One spent: full again in 6 s.
    let status = &ask(&rls, &[&[("client", "a")]]).statuses[0];
    assert_eq!(
        status.duration_until_reset,
        Some(Duration {
            seconds: 6,
            nanos: 0
        })
    );
    for _ in 0..9 {
        ask(&rls, &[&[("client", "a")]]);
    }
    clock.advance_us(1_000_000);
    // Empty for 1 s: the next token in 5 s (the bucket is full in 59 s).
    let status = &ask(&rls, &[&[("client", "a")]]).statuses[0];
    assert_eq!(status.code, Code::OverLimit as i32);
    assert_eq!(status.duration_until_reset.unwrap().seconds, 5);
}

#[test]
fn hits_addend_of_the_request_counts_and_zero_means_one() {
    let (rls, _) = rls();
    let mut req = request("edge", vec![descriptor(&[("client", "a")])]);
    req.hits_addend = 0;
    assert_eq!(
        rls.should_rate_limit(&req).unwrap().statuses[0].limit_remaining,
        9
    );
    req.hits_addend = 4;
    assert_eq!(
        rls.should_rate_limit(&req).unwrap().statuses[0].limit_remaining,
        5
    );
    // More hits than the bucket ever holds: over, nothing spent.
    req.hits_addend = 11;
    let response = rls.should_rate_limit(&req).unwrap();
    assert_eq!(response.overall_code, Code::OverLimit as i32);
    assert_eq!(remaining(&rls, "rls:edge.client", &[("client", "a")]), 5);
}

#[test]
fn a_descriptors_own_hits_addend_overrides_the_requests_and_zero_only_checks() {
    let (rls, _) = rls();
    let mut own = descriptor(&[("client", "a")]);
    own.hits_addend = Some(UInt64Value { value: 3 });
    let mut check = descriptor(&[("client", "b")]);
    check.hits_addend = Some(UInt64Value { value: 0 });
    let mut req = request("edge", vec![own, check, descriptor(&[("client", "c")])]);
    req.hits_addend = 2;
    let response = rls.should_rate_limit(&req).unwrap();
    let left: Vec<u32> = response
        .statuses
        .iter()
        .map(|s| s.limit_remaining)
        .collect();
    assert_eq!(left, [7, 10, 8]);
    assert!(
        !rls.limiter().store().contains(
            rls.limiter().policies().get("rls:edge.client").unwrap().id,
            &bucket_key("edge", &descriptor(&[("client", "b")]).entries, &[])
        ),
        "a check creates no bucket"
    );
}

#[test]
fn one_descriptor_over_its_limit_charges_none_of_the_others() {
    let (rls, _) = rls();
    assert_eq!(
        ask(&rls, &[&[("tight", "x")]]).overall_code,
        Code::Ok as i32
    );
    let response = ask(
        &rls,
        &[&[("client", "a")], &[("tight", "x")], &[("daily", "a")]],
    );
    assert_eq!(response.overall_code, Code::OverLimit as i32);
    assert_eq!(codes(&response), [Code::Ok, Code::OverLimit, Code::Ok]);
    // What the others report is their untouched level.
    assert_eq!(response.statuses[0].limit_remaining, 10);
    assert_eq!(response.statuses[2].limit_remaining, 1000);
    assert_eq!(remaining(&rls, "rls:edge.client", &[("client", "a")]), 10);
    assert_eq!(remaining(&rls, "rls:edge.daily", &[("daily", "a")]), 1000);
    assert!(
        rls.limiter().store().len() == 1,
        "only the tight bucket exists"
    );
    // When every descriptor is within its limit, all are charged.
    let response = ask(&rls, &[&[("client", "a")], &[("daily", "a")]]);
    assert_eq!(codes(&response), [Code::Ok, Code::Ok]);
    assert_eq!(remaining(&rls, "rls:edge.client", &[("client", "a")]), 9);
    assert_eq!(remaining(&rls, "rls:edge.daily", &[("daily", "a")]), 999);
}

#[test]
fn no_domain_or_no_rule_is_ok_without_a_current_limit() {
    let (rls, _) = rls();
    for domain in ["edge", "unknown"] {
        let response = rls
            .should_rate_limit(&request(domain, vec![descriptor(&[("nothing", "here")])]))
            .unwrap();
        assert_eq!(response.overall_code, Code::Ok as i32);
        assert_eq!(
            response.statuses,
            [DescriptorStatus {
                code: Code::Ok as i32,
                ..Default::default()
            }]
        );
    }
    // A descriptor deeper than the rule matches nothing either.
    let response = ask(&rls, &[&[("client", "a"), ("extra", "x")]]);
    assert_eq!(response.statuses[0].current_limit, None);
    assert!(rls.limiter().store().is_empty());
}

#[test]
fn unlimited_is_ok_without_touching_a_bucket() {
    let (rls, _) = rls();
    for _ in 0..100 {
        let response = ask(&rls, &[&[("health", "probe")]]);
        assert_eq!(response.overall_code, Code::Ok as i32);
        assert_eq!(response.statuses[0].limit_remaining, u32::MAX);
        assert_eq!(response.statuses[0].current_limit, None);
    }
    assert!(rls.limiter().store().is_empty());
}

#[test]
fn shadow_mode_counts_but_always_answers_ok_and_vetoes_nothing() {
    let (rls, _) = rls();
    for _ in 0..2 {
        assert_eq!(
            ask(&rls, &[&[("trial", "t")]]).overall_code,
            Code::Ok as i32
        );
    }
    let response = ask(&rls, &[&[("trial", "t")], &[("client", "a")]]);
    assert_eq!(response.overall_code, Code::Ok as i32);
    assert_eq!(codes(&response), [Code::Ok, Code::Ok]);
    assert_eq!(response.statuses[0].limit_remaining, 0);
    assert_eq!(remaining(&rls, "rls:edge.client", &[("client", "a")]), 9);
    let text = rls.limiter().render_metrics();
    for line in [
        r#"openclaw_rls_descriptors_total{domain="edge",rule="trial",decision="ok"} 2"#,
        r#"openclaw_rls_descriptors_total{domain="edge",rule="trial",decision="shadow_over_limit"} 1"#,
        r#"openclaw_requests_total{policy="rls:edge.trial",decision="allowed"} 2"#,
        r#"openclaw_requests_total{policy="rls:edge.trial",decision="rejected"} 1"#,
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}

#[test]
fn zero_requests_per_unit_refuses_without_a_bucket() {
    let (rls, _) = rls();
    let response = ask(&rls, &[&[("blocked", "x")], &[("client", "a")]]);
    assert_eq!(codes(&response), [Code::OverLimit, Code::Ok]);
    assert_eq!(
        response.statuses[0]
            .current_limit
            .as_ref()
            .unwrap()
            .requests_per_unit,
        0
    );
    assert!(rls.limiter().store().is_empty(), "nothing charged");
}

/// An override's bucket is decided in the mode of the rule its descriptor matches: a route
/// that changes a `strict` rule's number must not quietly make it `shared` (which may admit
/// more than the limit across replicas). A descriptor that matches no rule, or a `shared` one,
/// keeps the shared override policy. On the old code every override was `shared`.
#[test]
fn a_limit_override_takes_the_mode_of_the_rule_its_descriptor_matches() {
    let (rls, _) = rls_with(
        "
domain: edge
descriptors:
  - key: paid
    rate_limit: {unit: minute, requests_per_unit: 10, mode: strict}
  - key: client
    rate_limit: {unit: minute, requests_per_unit: 10}
",
    );
    let overridden = |key: &str| {
        let mut d = descriptor(&[(key, "a")]);
        d.limit = Some(RateLimitOverride {
            requests_per_unit: 5,
            unit: 2,
        });
        d
    };
    for key in ["paid", "client", "unmatched"] {
        let response = rls
            .should_rate_limit(&request("edge", vec![overridden(key)]))
            .unwrap();
        assert_eq!(response.statuses[0].code, Code::Ok as i32, "{key}");
    }
    let policies = rls.limiter().policies();
    let mode_of = |name: &str| policies.get(name).map(|p| p.mode);
    assert_eq!(mode_of("rls:limit:5/minute:strict"), Some(Mode::Strict));
    assert_eq!(mode_of("rls:limit:5/minute"), Some(Mode::Shared));
}

#[test]
fn a_descriptors_limit_override_is_honoured_with_its_own_bucket() {
    let (rls, _) = rls();
    let mut overridden = descriptor(&[("client", "a")]);
    overridden.limit = Some(RateLimitOverride {
        requests_per_unit: 2,
        unit: 1,
    });
    let req = request("edge", vec![overridden]);
    let statuses: Vec<(i32, u32)> = (0..3)
        .map(|_| {
            let s = &rls.should_rate_limit(&req).unwrap().statuses[0];
            assert_eq!(s.current_limit.as_ref().unwrap().requests_per_unit, 2);
            (s.code, s.limit_remaining)
        })
        .collect();
    assert_eq!(
        statuses,
        [
            (Code::Ok as i32, 1),
            (Code::Ok as i32, 0),
            (Code::OverLimit as i32, 0)
        ]
    );
    assert!(rls.limiter().policies().get("rls:limit:2/second").is_some());
    // The rule's own bucket was not touched.
    assert_eq!(remaining(&rls, "rls:edge.client", &[("client", "a")]), 10);
    // An override without a unit is refused.
    let mut bad = descriptor(&[("client", "a")]);
    bad.limit = Some(RateLimitOverride {
        requests_per_unit: 2,
        unit: 0,
    });
    assert_eq!(
        rls.should_rate_limit(&request("edge", vec![bad])),
        Err(RlsError::OverrideUnit(0))
    );
}

#[test]
fn a_rule_that_replaces_another_by_name_drops_it() {
    let (rls, _) = rls();
    for _ in 0..10 {
        ask(&rls, &[&[("client", "a")]]);
    }
    let response = ask(&rls, &[&[("client", "a")], &[("plan", "gold")]]);
    assert_eq!(codes(&response), [Code::Ok, Code::Ok]);
    assert_eq!(response.statuses[0].current_limit, None, "replaced");
    assert_eq!(response.statuses[1].limit_remaining, 99);
    let text = rls.limiter().render_metrics();
    for line in [
        r#"openclaw_rls_descriptors_total{domain="edge",rule="per_client",decision="replaced"} 1"#,
        r#"openclaw_rls_descriptors_total{domain="",rule="",decision="no_rule"} 0"#,
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}

#[test]
fn empty_domain_or_no_descriptors_is_invalid_and_overall_code_is_always_set() {
    let (rls, _) = rls();
    assert_eq!(
        rls.should_rate_limit(&request("", vec![descriptor(&[("client", "a")])])),
        Err(RlsError::EmptyDomain)
    );
    assert_eq!(
        rls.should_rate_limit(&request("edge", vec![])),
        Err(RlsError::NoDescriptors)
    );
    for response in [
        ask(&rls, &[&[("nothing", "x")]]),
        ask(&rls, &[&[("health", "x")]]),
        ask(&rls, &[&[("blocked", "x")]]),
    ] {
        assert_ne!(response.overall_code, Code::Unknown as i32);
    }
    let text = rls.limiter().render_metrics();
    assert!(
        text.contains(r#"openclaw_rls_requests_total{code="invalid_argument"} 2"#),
        "{text}"
    );
}

#[test]
fn detailed_metric_labels_values_up_to_a_bound() {
    let (rls, _) = rls();
    ask(&rls, &[&[("path", "/search?q=1")]]);
    for i in 0..super::service::MAX_DETAILED_VALUES + 5 {
        ask(&rls, &[&[("path", &format!("/search/{i}"))]]);
    }
    let text = rls.limiter().render_metrics();
    let series = text
        .lines()
        .filter(|l| l.starts_with("openclaw_rls_detailed_hits_total{"))
        .count();
    assert_eq!(series, super::service::MAX_DETAILED_VALUES + 1, "{text}");
    assert!(
        text.contains(r#"value="_other",decision="ok"} 6"#),
        "{text}"
    );
}

#[test]
fn rule_buckets_are_policies_that_survive_a_policies_reload_and_an_rls_reload() {
    let (rls, _) = rls();
    ask(&rls, &[&[("client", "a")]]);
    let limiter = rls.limiter();
    assert!(limiter.policies().get("rls:edge.client").is_some());
    assert!(
        limiter.policies().get("rls:edge.health").is_none(),
        "unlimited: no bucket"
    );
    limiter
        .reload_policies("policies:\n  api: {capacity: 5, refill_interval_ms: 1000}\n")
        .unwrap();
    assert!(limiter.policies().get("api").is_some());
    assert_eq!(remaining(&rls, "rls:edge.client", &[("client", "a")]), 9);
    // A new rule set that keeps the rule keeps its bucket, and drops the others' policies.
    let smaller = "domain: edge\ndescriptors:\n  - key: client\n    rate_limit: {unit: minute, requests_per_unit: 10}\n";
    rls.reload(RlsConfig::from_files(&[("r.yaml".into(), smaller.into())]).unwrap());
    assert_eq!(remaining(&rls, "rls:edge.client", &[("client", "a")]), 9);
    assert!(limiter.policies().get("rls:edge.daily").is_none());
    assert!(limiter.policies().get("api").is_some());
    assert_eq!(
        ask(&rls, &[&[("daily", "a")]]).statuses[0].current_limit,
        None
    );
}

#[test]
fn a_strict_rule_is_a_strict_policy_and_a_reload_changes_its_mode_as_the_policies_file_does() {
    let strict = "domain: edge\ndescriptors:\n  - key: client\n    rate_limit: {unit: minute, requests_per_unit: 10, mode: strict}\n  - key: other\n    rate_limit: {unit: minute, requests_per_unit: 10}\n";
    let (rls, _) = rls_with(strict);
    let limiter = rls.limiter();
    let mode = |name: &str| limiter.policies().get(name).map(|p| p.mode);
    assert_eq!(mode("rls:edge.client"), Some(Mode::Strict));
    assert_eq!(mode("rls:edge.other"), Some(Mode::Shared));
    assert!(limiter.has_strict_policies());
    // A policies-file reload keeps the rules' modes.
    limiter
        .reload_policies("policies:\n  api: {capacity: 5, refill_interval_ms: 1000}\n")
        .unwrap();
    assert_eq!(mode("rls:edge.client"), Some(Mode::Strict));
    // Without peers (no escrow) a strict rule is the textbook bucket, as a strict policy is.
    for _ in 0..10 {
        assert_eq!(codes(&ask(&rls, &[&[("client", "a")]])), [Code::Ok]);
    }
    assert_eq!(codes(&ask(&rls, &[&[("client", "a")]])), [Code::OverLimit]);
    // Turning the mode off on reload: the same policy, now shared, its bucket kept.
    let shared = strict.replace(", mode: strict", "");
    rls.reload(RlsConfig::from_files(&[("r.yaml".into(), shared)]).unwrap());
    assert_eq!(mode("rls:edge.client"), Some(Mode::Shared));
    assert!(!limiter.has_strict_policies());
    assert_eq!(codes(&ask(&rls, &[&[("client", "a")]])), [Code::OverLimit]);
    rls.reload(RlsConfig::from_files(&[("r.yaml".into(), strict.into())]).unwrap());
    assert_eq!(mode("rls:edge.client"), Some(Mode::Strict));
}

#[test]
fn bucket_keys_are_unambiguous_and_short_enough_for_peers() {
    let key = |entries: &[(&str, &str)]| bucket_key("d", &descriptor(entries).entries, &[]);
    assert_ne!(key(&[("a", "bc")]), key(&[("ab", "c")]));
    assert_ne!(key(&[("a", "b"), ("c", "d")]), key(&[("a", "b:1:c1:d")]));
    let long = "x".repeat(1000);
    let hashed = key(&[("k", &long)]);
    assert!(hashed.starts_with('#') && hashed.len() == 65, "{hashed}");
    assert_ne!(hashed, key(&[("k", &long[1..])]));
    assert!(key(&[("k", "v")]).len() <= crate::http::MAX_KEY_BYTES);
    let entries = descriptor(&[("f", "files/*")]).entries;
    assert_ne!(
        bucket_key("d", &entries, &[(0, "files/*")]),
        bucket_key("d", &entries, &[]),
        "a shared pattern never equals that pattern as a literal value"
    );
}

#[test]
fn concurrent_requests_never_charge_one_descriptor_without_the_other() {
    let (rls, _) = rls_with(
        "domain: edge\ndescriptors:\n  - key: a\n    rate_limit: {unit: hour, requests_per_unit: 50}\n  - key: b\n    rate_limit: {unit: hour, requests_per_unit: 1000}\n",
    );
    let rls = Arc::new(rls);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let rls = rls.clone();
            std::thread::spawn(move || {
                (0..100)
                    .filter(|_| {
                        ask(&rls, &[&[("b", "shared")], &[("a", "tight")]]).overall_code
                            == Code::Ok as i32
                    })
                    .count()
            })
        })
        .collect();
    let admitted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(admitted, 50);
    assert_eq!(remaining(&rls, "rls:edge.a", &[("a", "tight")]), 0);
    assert_eq!(
        remaining(&rls, "rls:edge.b", &[("b", "shared")]),
        950,
        "b is charged exactly for the admitted requests"
    );
}

#[test]
fn override_rates_are_bounded_and_past_the_bound_not_enforced() {
    let (rls, _) = rls();
    let with_override = |requests_per_unit: u32| {
        let mut d = descriptor(&[("client", "a")]);
        d.limit = Some(RateLimitOverride {
            requests_per_unit,
            unit: 3,
        });
        rls.should_rate_limit(&request("edge", vec![d])).unwrap()
    };
    for n in 1..=super::service::MAX_OVERRIDE_RATES as u32 {
        let response = with_override(n);
        assert!(response.statuses[0].current_limit.is_some(), "rate {n}");
    }
    let past = with_override(10_000);
    assert_eq!(past.overall_code, Code::Ok as i32);
    assert_eq!(past.statuses[0].current_limit, None);
    let overrides = rls
        .limiter()
        .policies()
        .iter()
        .filter(|p| p.name.starts_with("rls:limit:"))
        .count();
    assert_eq!(overrides, super::service::MAX_OVERRIDE_RATES);
    // A known rate still is.
    assert!(with_override(1).statuses[0].current_limit.is_some());
}

/// envoyproxy/ratelimit's README, examples 4 to 10, unchanged: each loads, and decides as the
/// README says. (Example 11 uses `share_threshold`, which is refused as not supported.)
mod readme_examples {
    use super::*;

    fn rls_of(yaml: &str) -> Rls {
        rls_with(yaml).0
    }

    fn ask_in(rls: &Rls, domain: &str, descriptors: &[&[(&str, &str)]]) -> RateLimitResponse {
        rls.should_rate_limit(&request(
            domain,
            descriptors.iter().map(|d| descriptor(d)).collect(),
        ))
        .unwrap()
    }

    fn limit_of(rls: &Rls, domain: &str, entries: &[(&str, &str)]) -> Option<u32> {
        ask_in(rls, domain, &[entries]).statuses[0]
            .current_limit
            .as_ref()
            .map(|l| l.requests_per_unit)
    }

    #[test]
    fn example_4_matches_only_at_the_configured_depth() {
        let flat = rls_of(
            "domain: example4\ndescriptors:\n  - key: key\n    value: value\n    rate_limit:\n      requests_per_unit: 300\n      unit: second\n",
        );
        assert_eq!(
            limit_of(
                &flat,
                "example4",
                &[("key", "value"), ("subkey", "subvalue")]
            ),
            None
        );
        let nested = rls_of(
            "domain: example4\ndescriptors:\n  - key: key\n    value: value\n    descriptors:\n      - key: subkey\n        rate_limit:\n          requests_per_unit: 300\n          unit: second\n",
        );
        assert_eq!(
            limit_of(
                &nested,
                "example4",
                &[("key", "value"), ("subkey", "subvalue")]
            ),
            Some(300)
        );
    }

    #[test]
    fn example_5_unlimited_returns_ok_with_max_remaining() {
        let rls = rls_of(
            "domain: internal\ndescriptors:\n  - key: ldap\n    rate_limit:\n      unlimited: true\n  - key: azure\n    rate_limit:\n      unit: minute\n      requests_per_unit: 100\n",
        );
        let response = ask_in(&rls, "internal", &[&[("ldap", "x")], &[("azure", "y")]]);
        assert_eq!(codes(&response), [Code::Ok, Code::Ok]);
        assert_eq!(response.statuses[0].limit_remaining, u32::MAX);
        assert_eq!(response.statuses[1].limit_remaining, 99);
    }

    #[test]
    fn example_6_shadow_mode_user_a_is_never_limited_user_b_is() {
        let rls = rls_of(
            "domain: example6\ndescriptors:\n  - key: service\n    descriptors:\n      - key: user\n        value: user-a\n        rate_limit:\n          requests_per_unit: 10\n          unit: second\n        shadow_mode: true\n      - key: user\n        value: user-b\n        rate_limit:\n          requests_per_unit: 20\n          unit: second\n",
        );
        let codes_for = |user: &str, n: usize| -> Vec<i32> {
            (0..n)
                .map(|_| {
                    ask_in(
                        &rls,
                        "example6",
                        &[&[("service", "auth-service"), ("user", user)]],
                    )
                    .overall_code
                })
                .collect()
        };
        assert!(
            codes_for("user-a", 30)
                .iter()
                .all(|&c| c == Code::Ok as i32)
        );
        let b = codes_for("user-b", 21);
        assert!(b[..20].iter().all(|&c| c == Code::Ok as i32));
        assert_eq!(b[20], Code::OverLimit as i32);
    }

    #[test]
    fn example_7_replaces_drops_the_named_limit() {
        let rls = rls_of(
            "domain: example7\ndescriptors:\n  - key: key_1\n    value: value_1\n    descriptors:\n      - key: user\n        value: bkthomps\n        rate_limit:\n          name: specific_limit\n          requests_per_unit: 5\n          unit: second\n  - key: key_2\n    value: value_2\n    descriptors:\n      - key: user\n        value: bkthomps\n        rate_limit:\n          replaces:\n            - name: specific_limit\n          requests_per_unit: 10\n          unit: second\n",
        );
        let one = [("key_1", "value_1"), ("user", "bkthomps")];
        let two = [("key_2", "value_2"), ("user", "bkthomps")];
        assert_eq!(limit_of(&rls, "example7", &one), Some(5));
        assert_eq!(limit_of(&rls, "example7", &two), Some(10));
        let both = ask_in(&rls, "example7", &[&one, &two]);
        assert_eq!(both.statuses[0].current_limit, None, "replaced");
        assert_eq!(
            both.statuses[1]
                .current_limit
                .as_ref()
                .unwrap()
                .requests_per_unit,
            10
        );
    }

    #[test]
    fn example_8_detailed_metric_values_have_their_own_series() {
        let rls = rls_of(
            "domain: example8\ndescriptors:\n  - key: key1\n    detailed_metric: true\n    rate_limit:\n      unit: minute\n      requests_per_unit: 10\n  - key: key1\n    value: value1\n    rate_limit:\n      unit: minute\n      requests_per_unit: 20\n",
        );
        assert_eq!(
            limit_of(&rls, "example8", &[("key1", "unspecified_value")]),
            Some(10)
        );
        assert_eq!(
            limit_of(&rls, "example8", &[("key1", "unspecified_value2")]),
            Some(10)
        );
        assert_eq!(limit_of(&rls, "example8", &[("key1", "value1")]), Some(20));
        let text = rls.limiter().render_metrics();
        for value in ["unspecified_value", "unspecified_value2"] {
            assert!(
                text.contains(&format!(
                    r#"openclaw_rls_detailed_hits_total{{domain="example8",rule="example8.key1",value="{value}",decision="ok"}} 1"#
                )),
                "{text}"
            );
        }
    }

    #[test]
    fn example_9_wildcards_trailing_middle_and_multiple() {
        let trailing = rls_of(
            "domain: example9\ndescriptors:\n  - key: key1\n    value: value*\n    rate_limit:\n      unit: minute\n      requests_per_unit: 20\n",
        );
        for v in ["value1", "value2", "valueXYZ"] {
            assert_eq!(
                limit_of(&trailing, "example9", &[("key1", v)]),
                Some(20),
                "{v}"
            );
        }
        let middle = rls_of(
            "domain: example9\ndescriptors:\n  - key: path\n    value: /api/*/action\n    rate_limit:\n      unit: minute\n      requests_per_unit: 20\n",
        );
        assert_eq!(
            limit_of(&middle, "example9", &[("path", "/api/123/action")]),
            Some(20)
        );
        assert_eq!(
            limit_of(&middle, "example9", &[("path", "/api/user-id/action")]),
            Some(20)
        );
        assert_eq!(
            limit_of(&middle, "example9", &[("path", "/api/123/other")]),
            None
        );
        let multiple = rls_of(
            "domain: example9\ndescriptors:\n  - key: route\n    value: /api/*/resource/*/action\n    rate_limit:\n      unit: minute\n      requests_per_unit: 20\n",
        );
        for v in ["/api/v1/resource/123/action", "/api/v2/resource/456/action"] {
            assert_eq!(
                limit_of(&multiple, "example9", &[("route", v)]),
                Some(20),
                "{v}"
            );
        }
    }

    #[test]
    fn example_10_value_to_metric_loads_and_limits_per_subject() {
        let rls = rls_of(
            "domain: example10\ndescriptors:\n  - key: route\n    value_to_metric: true\n    descriptors:\n      - key: http_method\n        value_to_metric: true\n        descriptors:\n          - key: subject_id\n            rate_limit:\n              unit: minute\n              requests_per_unit: 60\n",
        );
        let entries = [
            ("route", "api"),
            ("http_method", "GET"),
            ("subject_id", "123"),
        ];
        assert_eq!(limit_of(&rls, "example10", &entries), Some(60));
    }

    #[test]
    fn example_11_share_threshold_makes_wildcard_matches_share_one_bucket() {
        let rls = rls_of(
            "domain: example11\ndescriptors:\n  # With share_threshold: true, all files/* matches share the same threshold\n  - key: files\n    value: files/*\n    share_threshold: true\n    rate_limit:\n      unit: hour\n      requests_per_unit: 10\n  # Without share_threshold, each files_no_share/* match has its own isolated threshold\n  - key: files_no_share\n    value: files_no_share/*\n    share_threshold: false\n    rate_limit:\n      unit: hour\n      requests_per_unit: 10\n",
        );
        let shared: Vec<i32> = (0..11)
            .map(|i| {
                let file = format!("files/{i}.txt");
                ask_in(&rls, "example11", &[&[("files", file.as_str())]]).overall_code
            })
            .collect();
        assert!(
            shared[..10].iter().all(|&c| c == Code::Ok as i32),
            "{shared:?}"
        );
        assert_eq!(
            shared[10],
            Code::OverLimit as i32,
            "one bucket for all files/*"
        );
        let isolated: Vec<i32> = (0..11)
            .map(|i| {
                let file = format!("files_no_share/{i}.txt");
                ask_in(&rls, "example11", &[&[("files_no_share", file.as_str())]]).overall_code
            })
            .collect();
        assert!(
            isolated.iter().all(|&c| c == Code::Ok as i32),
            "{isolated:?}"
        );
    }
}

#[test]
fn rule_buckets_are_snapshotted_and_restored_like_any_policys() {
    let dir = tempfile::tempdir().unwrap();
    let snapshots = crate::snapshot::Snapshots::new(dir.path());
    let (before, clock) = rls();
    for _ in 0..4 {
        ask(&before, &[&[("daily", "k")]]);
    }
    snapshots.write(before.limiter()).unwrap();
    // A restarted process: a new limiter on the same clock, the rules registered before the
    // restore (as main.rs does), then the snapshot.
    let limiter = Arc::new(Limiter::new(LimiterOptions {
        node_id: "test".into(),
        replica: ReplicaId(2),
        default_rate: Rate::try_new(10, 1000).unwrap(),
        clock,
        shards: 4,
        track_changes: false,
    }));
    let after = Rls::new(
        limiter,
        RlsConfig::from_files(&[("rls.yaml".into(), CONFIG.into())]).unwrap(),
    );
    let report = snapshots.restore_latest(after.limiter()).unwrap();
    assert_eq!(report.skipped_unknown_policy, 0, "{report:?}");
    assert_eq!(remaining(&after, "rls:edge.daily", &[("daily", "k")]), 996);
}

#[test]
fn a_bucket_named_twice_in_one_request_is_checked_for_both() {
    let (rls, _) = rls();
    for _ in 0..8 {
        ask(&rls, &[&[("client", "a")]]);
    }
    // Two tokens left: the same descriptor twice takes both.
    let response = ask(
        &rls,
        &[&[("client", "a")], &[("client", "a")], &[("daily", "a")]],
    );
    assert_eq!(codes(&response), [Code::Ok, Code::Ok, Code::Ok]);
    assert_eq!(remaining(&rls, "rls:edge.client", &[("client", "a")]), 0);
    // One token left: twice is over, and nothing is charged, the day quota included.
    let before = remaining(&rls, "rls:edge.daily", &[("daily", "a")]);
    let response = ask(&rls, &[&[("client", "c")], &[("client", "c")]]);
    assert_eq!(
        codes(&response),
        [Code::Ok, Code::Ok],
        "a fresh client has 10"
    );
    for _ in 0..7 {
        ask(&rls, &[&[("client", "c")]]);
    }
    assert_eq!(remaining(&rls, "rls:edge.client", &[("client", "c")]), 1);
    let response = ask(
        &rls,
        &[&[("client", "c")], &[("daily", "a")], &[("client", "c")]],
    );
    assert_eq!(response.overall_code, Code::OverLimit as i32);
    assert_eq!(
        remaining(&rls, "rls:edge.client", &[("client", "c")]),
        1,
        "nothing charged"
    );
    assert_eq!(remaining(&rls, "rls:edge.daily", &[("daily", "a")]), before);
}

/// `ShouldRateLimit` on one replica against textbook token buckets ([`ReferenceBucket`]) fed
/// the same requests, with the semantics of docs/rls.md written out independently of the
/// service: every rule a bucket of `requests_per_unit` refilled over its unit (second to year),
/// all-or-nothing charging across a request's descriptors, a bucket named twice checked for
/// the sum of its hits, shadow descriptors charged but never refusing, 0 hits checking only,
/// sweeps that forget full buckets at any time. Each answer must match to the descriptor: code,
/// `limit_remaining` and `duration_until_reset`; and so must every bucket's level after it.
mod textbook {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;
    use crate::bucket::{Micros, Outcome, ReferenceBucket};
    use crate::clock::Clock;
    use crate::policy::UNITS;

    /// The rules' keys: `a` and `b` enforced, `s` in shadow mode; `z` matches no rule.
    const KEYS: [&str; 4] = ["a", "b", "s", "z"];
    const VALUES: [&str; 2] = ["x", "y"];

    #[derive(Debug, Clone)]
    struct Rule {
        unit: usize,
        requests_per_unit: u32,
        strict: bool,
    }

    #[derive(Debug, Clone)]
    struct Ask {
        /// Microseconds since the previous request.
        gap_us: Micros,
        /// (key, value, the descriptor's own `hits_addend`)
        descriptors: Vec<(usize, usize, Option<u64>)>,
        hits_addend: u32,
        sweep_first: bool,
    }

    fn rule() -> impl Strategy<Value = Rule> {
        (0..UNITS.len(), 1..=6u32, any::<bool>()).prop_map(|(unit, requests_per_unit, strict)| {
            Rule {
                unit,
                requests_per_unit,
                strict,
            }
        })
    }

    /// Gaps from nothing to a year and a half, spread over every scale (log-uniform), so that
    /// each rule's bucket is seen full, draining, empty and refilling.
    fn gap() -> impl Strategy<Value = Micros> {
        prop_oneof![
            1 => Just(0u64),
            6 => (0.0f64..47.0).prop_map(|e| 2f64.powf(e) as Micros),
        ]
    }

    fn ask() -> impl Strategy<Value = Ask> {
        let descriptor = (
            0..KEYS.len(),
            0..VALUES.len(),
            prop_oneof![3 => Just(None), 1 => (0..=4u64).prop_map(Some)],
        );
        (
            gap(),
            proptest::collection::vec(descriptor, 1..=4),
            prop_oneof![2 => Just(0u32), 1 => 1..=4u32],
            proptest::bool::weighted(0.1),
        )
            .prop_map(|(gap_us, descriptors, hits_addend, sweep_first)| Ask {
                gap_us,
                descriptors,
                hits_addend,
                sweep_first,
            })
    }

    fn config(rules: &[Rule; 3]) -> String {
        let mut yaml = String::from("domain: edge\ndescriptors:\n");
        for (key, rule) in ["a", "b", "s"].iter().zip(rules) {
            yaml.push_str(&format!(
                "  - key: {key}\n{}    rate_limit: {{unit: {}, requests_per_unit: {}, name: rule_{key}{}}}\n",
                if *key == "s" { "    shadow_mode: true\n" } else { "" },
                UNITS[rule.unit].0,
                rule.requests_per_unit,
                if rule.strict { ", mode: strict" } else { "" },
            ));
        }
        yaml
    }

    /// One descriptor's answer: its code and, for a limited one, `limit_remaining` and
    /// `duration_until_reset` in whole seconds.
    type Status = (Code, Option<(u32, u64)>);

    /// What docs/rls.md says the answer to `ask` is at `now`, spending from `buckets`.
    fn expected(
        rules: &[Rule; 3],
        buckets: &mut HashMap<(usize, usize), ReferenceBucket>,
        ask: &Ask,
        now: Micros,
    ) -> (Code, Vec<Status>) {
        let rate = |key: usize| {
            let rule = &rules[key];
            Rate::try_new(u64::from(rule.requests_per_unit), UNITS[rule.unit].1).unwrap()
        };
        let hits_of = |own: Option<u64>| own.unwrap_or(u64::from(ask.hits_addend.max(1)));
        let limited = |key: usize| key < 3;
        let enforced = |&(key, _, own): &(usize, usize, Option<u64>)| {
            limited(key) && key != 2 && hits_of(own) > 0
        };
        // Every enforced descriptor is checked for all the enforced hits on its bucket.
        let group = |key: usize, value: usize| -> u64 {
            ask.descriptors
                .iter()
                .filter(|d| enforced(d) && d.0 == key && d.1 == value)
                .map(|d| hits_of(d.2))
                .sum()
        };
        let peek = |buckets: &mut HashMap<(usize, usize), ReferenceBucket>,
                    key: usize,
                    value: usize,
                    cost: u64| {
            let bucket = buckets
                .entry((key, value))
                .or_insert_with(|| ReferenceBucket::new_at(rate(key), now));
            // A check reports the bucket as it is: whether `cost` fits, and the level now.
            let level = level_at(bucket, now);
            let rate = rate(key);
            Outcome::describe(rate, level, level >= rate.tokens_scaled(cost), cost)
        };
        // Checked first, nothing spent. `grantable`: the hits checked (with the others on its
        // bucket) fit in the bucket at all.
        let mut outcomes: Vec<Option<Outcome>> = Vec::new();
        let mut passes: Vec<bool> = Vec::new();
        let mut grantable: Vec<bool> = Vec::new();
        for d @ &(key, value, own) in &ask.descriptors {
            if !limited(key) {
                outcomes.push(None);
                passes.push(true);
                grantable.push(true);
                continue;
            }
            let capacity = u64::from(rules[key].requests_per_unit);
            let checked = if enforced(d) {
                group(key, value)
            } else {
                hits_of(own)
            };
            let outcome = peek(buckets, key, value, checked.min(capacity));
            passes.push(if hits_of(own) == 0 {
                outcome.allowed
            } else {
                checked <= capacity && outcome.allowed
            });
            grantable.push(checked <= capacity);
            outcomes.push(Some(outcome));
        }
        let refused = ask
            .descriptors
            .iter()
            .zip(&passes)
            .any(|(&(key, _, _), &pass)| limited(key) && key != 2 && !pass);
        // Admitted: every enforced descriptor spends its hits, then the shadow ones theirs.
        let mut spent = vec![false; ask.descriptors.len()];
        if !refused {
            for shadow in [false, true] {
                for (i, &(key, value, own)) in ask.descriptors.iter().enumerate() {
                    let hits = hits_of(own);
                    if limited(key) && (key == 2) == shadow && hits > 0 && grantable[i] {
                        let bucket = buckets.get_mut(&(key, value)).expect("peeked above");
                        outcomes[i] = Some(bucket.try_consume_at(hits, now));
                        spent[i] = true;
                    }
                }
            }
        }
        let mut overall = Code::Ok;
        let statuses = ask
            .descriptors
            .iter()
            .enumerate()
            .map(|(i, &(key, _, _))| {
                let Some(outcome) = outcomes[i] else {
                    return (Code::Ok, None);
                };
                let granted = if spent[i] { outcome.allowed } else { passes[i] };
                let code = if granted || key == 2 {
                    Code::Ok
                } else {
                    overall = Code::OverLimit;
                    Code::OverLimit
                };
                let wait_us = if outcome.allowed || code == Code::Ok || !grantable[i] {
                    outcome.reset_after_us
                } else {
                    outcome.retry_after_us
                };
                let remaining = u32::try_from(outcome.remaining).unwrap();
                (code, Some((remaining, wait_us.div_ceil(1_000_000))))
            })
            .collect();
        (overall, statuses)
    }

    /// The textbook bucket's level at `now` (refilled, nothing spent).
    fn level_at(bucket: &ReferenceBucket, now: Micros) -> i128 {
        let mut refilled = bucket.clone();
        refilled.try_consume_at(0, now);
        refilled.level_scaled()
    }

    proptest! {
        // 256 cases unless PROPTEST_CASES says otherwise.
        #[test]
        fn decides_as_textbook_buckets_with_all_or_nothing_charging(
            rules in [rule(), rule(), rule()],
            asks in proptest::collection::vec(ask(), 1..80),
        ) {
            let (rls, clock) = rls_with(&config(&rules));
            let start = clock.now();
            let mut buckets: HashMap<(usize, usize), ReferenceBucket> = HashMap::new();
            for (n, ask) in asks.iter().enumerate() {
                clock.advance_us(ask.gap_us);
                if ask.sweep_first {
                    rls.limiter().sweep();
                }
                let now = clock.now();
                let request = RateLimitRequest {
                    domain: "edge".into(),
                    descriptors: ask
                        .descriptors
                        .iter()
                        .map(|&(key, value, own)| RateLimitDescriptor {
                            hits_addend: own.map(|value| UInt64Value { value }),
                            ..descriptor(&[(KEYS[key], VALUES[value])])
                        })
                        .collect(),
                    hits_addend: ask.hits_addend,
                };
                let response = rls.should_rate_limit(&request).unwrap();
                let (overall, statuses) = expected(&rules, &mut buckets, ask, now);
                let context = || format!("request {n} at +{} us: {ask:?}", now - start);
                prop_assert_eq!(
                    Code::try_from(response.overall_code).unwrap(), overall, "{}", context()
                );
                prop_assert_eq!(response.statuses.len(), statuses.len());
                for (status, (code, numbers)) in response.statuses.iter().zip(&statuses) {
                    prop_assert_eq!(Code::try_from(status.code).unwrap(), *code, "{}", context());
                    let got = status.current_limit.as_ref().map(|_| {
                        (
                            status.limit_remaining,
                            status.duration_until_reset.map_or(0, |d| d.seconds as u64),
                        )
                    });
                    prop_assert_eq!(got, *numbers, "{}: {:?}", context(), status);
                }
                // Every bucket holds what the textbook one holds, to the whole token.
                for (&(key, value), bucket) in &buckets {
                    let textbook = bucket.clone().try_consume_at(0, now).remaining;
                    let policy = format!("rls:edge.{}", KEYS[key]);
                    let held = remaining(&rls, &policy, &[(KEYS[key], VALUES[value])]);
                    prop_assert_eq!(held, textbook, "{} {}={}: {}", policy, KEYS[key], VALUES[value], context());
                }
            }
        }
    }
}
