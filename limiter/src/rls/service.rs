//! `ShouldRateLimit` semantics: from a request's descriptors to the rules that apply, the
//! buckets they charge and the statuses Envoy turns into its decision and `X-RateLimit-*`
//! headers. Synchronous code over [`Limiter`], except for borrowing from peers for `strict`
//! rules ([`Rls::should_rate_limit_with_loans`]); `super::grpc` puts it on the wire.
//!
//! Every rule that holds a bucket is an internal policy of the limiter (`rls:` and the rule's
//! full key, see [`Rule::policy`]), in the rule's mode; the bucket's key is the request's
//! domain and descriptor entries ([`bucket_key`]). So the buckets are the same as `/rate`'s
//! (CRDT buckets when `shared`, escrow sub-buckets when `strict`): replicated, snapshotted,
//! swept and counted in the per-policy series the same way. What is RLS-specific is the order:
//! every bucket of a request is checked, and loans taken, before any is spent.
//!
//! A descriptor's `limit` override (set by Envoy's route configuration) is a bucket under the
//! policy `rls:limit:<requests>/<unit>` (`:strict` appended when the rule the descriptor
//! matches is `strict`: an override changes the number, not how replicas share it), registered
//! the first time a rate is seen; at most [`MAX_OVERRIDE_RATES`] of them.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use smallvec::SmallVec;

use super::config::{Limit, Lookup, RlsConfig, Rule, Unit};
use crate::bucket::{Outcome, Rate};
use crate::escrow::Shortfall;
use crate::metrics::{CodeLabels, DetailedLabels, ResultLabels, RuleLabels};
use crate::policy::{InternalPolicy, Mode};
use crate::replication::Loan;
use crate::service::Limiter;

/// Most distinct `limit` override rates (each is a policy).
pub const MAX_OVERRIDE_RATES: usize = 64;
/// Most distinct descriptor values per `detailed_metric` rule in
/// `openclaw_rls_detailed_hits_total`; later ones count under the value `_other`.
pub const MAX_DETAILED_VALUES: usize = 100;
/// Longest bucket key kept as it is; longer keys are replaced by their SHA-256, since peers
/// refuse keys over [`crate::http::MAX_KEY_BYTES`].
const MAX_PLAIN_KEY_BYTES: usize = crate::http::MAX_KEY_BYTES;
/// Stripes of the lock that makes peek-then-spend atomic among this replica's RLS decisions.
const STRIPES: usize = 64;

/// Why a request was refused before any decision (gRPC `INVALID_ARGUMENT`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RlsError {
    #[error("rate limit domain must not be empty")]
    EmptyDomain,
    #[error("rate limit descriptor list must not be empty")]
    NoDescriptors,
    #[error("descriptors[{0}].limit: the unit must be one of SECOND..YEAR")]
    OverrideUnit(usize),
}

/// Counter handles of one rule, resolved when the configuration is loaded.
#[derive(Debug, Clone)]
struct RuleCounters {
    ok: Counter,
    over_limit: Counter,
    shadow_over_limit: Counter,
    not_charged: Counter,
    unlimited: Counter,
    replaced: Counter,
    /// `detailed_metric` rules only.
    detailed: Option<Arc<Detailed>>,
}

/// `openclaw_rls_detailed_hits_total` of one rule, with the values seen so far (bounded).
#[derive(Debug)]
struct Detailed {
    domain: String,
    rule: String,
    seen: Mutex<BTreeSet<String>>,
    family: Family<DetailedLabels, Counter>,
}

/// A configuration with its counters.
#[derive(Debug)]
struct Loaded {
    config: RlsConfig,
    rules: Vec<RuleCounters>,
    no_rule: Counter,
    override_counters: RuleCounters,
}

/// Envoy's rate limit service over a [`Limiter`].
#[derive(Debug)]
pub struct Rls {
    limiter: Arc<Limiter>,
    loaded: ArcSwap<Loaded>,
    /// Override rates registered so far (their policies), and the lock that orders
    /// registrations and reloads.
    overrides: Mutex<BTreeSet<(u32, Unit, Mode)>>,
    /// Whether the warning about too many override rates was logged.
    overrides_full: AtomicBool,
    stripes: Box<[Mutex<()>]>,
    hasher: foldhash::fast::FixedState,
    /// `openclaw_rls_requests_total` by code: ok, over_limit, invalid_argument, unauthenticated.
    requests: [Counter; 4],
}

/// What applies to one descriptor of a request.
#[derive(Debug)]
enum Plan<'a> {
    /// No rule (unknown domain, no match).
    None,
    /// Its rule was replaced by another rule of the request (`replaces`).
    Replaced,
    Unlimited(&'a RuleCounters),
    Limited(Limited<'a>),
}

#[derive(Debug)]
struct Limited<'a> {
    requests_per_unit: u32,
    unit: Unit,
    name: &'a str,
    /// The policy of its bucket; `None` for 0 requests per unit (refuses without a bucket).
    policy: Option<(Cow<'a, str>, Rate)>,
    key: String,
    hits: u64,
    /// An enforced descriptor's check counts the hits of every enforced descriptor of the
    /// request on the same bucket (Envoy may send one descriptor twice): these, and whether
    /// there are others.
    bucket_hits: u64,
    shares_bucket: bool,
    shadow: bool,
    counters: &'a RuleCounters,
    detailed_value: Option<&'a str>,
}

impl Limited<'_> {
    /// Whether these hits (with the others on its bucket) can ever be granted: a bucket never
    /// holds more than its capacity.
    fn grantable(&self) -> bool {
        self.bucket_hits <= u64::from(self.requests_per_unit)
    }

    /// Enforced and spending: takes part in the all-or-nothing check.
    fn enforced(&self) -> bool {
        !self.shadow && self.hits > 0 && self.policy.is_some()
    }

    fn same_bucket(&self, other: &Limited<'_>) -> bool {
        self.key == other.key
            && self.policy.as_ref().map(|(p, _)| p) == other.policy.as_ref().map(|(p, _)| p)
    }
}

impl Rls {
    /// The service with `config` in force (its policies registered with the limiter).
    pub fn new(limiter: Arc<Limiter>, config: RlsConfig) -> Self {
        let loaded = Loaded::build(config, &limiter);
        let rls = Self {
            requests: ["ok", "over_limit", "invalid_argument", "unauthenticated"].map(|code| {
                limiter
                    .metrics()
                    .rls_requests
                    .get_or_create(&CodeLabels { code })
                    .clone()
            }),
            limiter,
            loaded: ArcSwap::from_pointee(loaded),
            overrides: Mutex::default(),
            overrides_full: AtomicBool::new(false),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            hasher: foldhash::fast::FixedState::default(),
        };
        let overrides = rls.lock_overrides();
        rls.register(&rls.loaded.load().config, &overrides);
        drop(overrides);
        rls.record_reload(true);
        rls
    }

    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    /// Put `config` in force. Buckets of rules that remain (same full key) keep their state.
    pub fn reload(&self, config: RlsConfig) {
        let overrides = self.lock_overrides();
        // Policies first: a request that sees the new rules finds their policies.
        self.register(&config, &overrides);
        self.loaded
            .store(Arc::new(Loaded::build(config, &self.limiter)));
        drop(overrides);
        self.record_reload(true);
    }

    /// Count a failed reload (the configuration in force stays).
    pub fn reload_failed(&self) {
        self.record_reload(false);
    }

    fn record_reload(&self, ok: bool) {
        let m = self.limiter.metrics();
        let result = if ok { "success" } else { "failure" };
        m.rls_config_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
        m.rls_config_reload_ok.set(i64::from(ok));
    }

    fn lock_overrides(&self) -> MutexGuard<'_, BTreeSet<(u32, Unit, Mode)>> {
        self.overrides.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, config: &RlsConfig, overrides: &BTreeSet<(u32, Unit, Mode)>) {
        let mut policies = config.policies();
        // One policy per rate and mode serves every domain's descriptors with that override.
        policies.extend(overrides.iter().filter_map(|&(requests, unit, mode)| {
            Some(InternalPolicy {
                name: override_policy(requests, unit, mode),
                rate: Rate::try_new(u64::from(requests), unit.millis()).ok()?,
                mode,
            })
        }));
        self.limiter.set_internal_policies(policies);
    }

    /// The policy of an override rate in `mode`, registered if new; `None` past
    /// [`MAX_OVERRIDE_RATES`].
    fn override_policy(&self, requests: u32, unit: Unit, mode: Mode) -> Option<(String, Rate)> {
        let rate = Rate::try_new(u64::from(requests), unit.millis()).ok()?;
        let name = override_policy(requests, unit, mode);
        let mut overrides = self.lock_overrides();
        if !overrides.contains(&(requests, unit, mode)) {
            if overrides.len() >= MAX_OVERRIDE_RATES {
                if !self.overrides_full.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        requests,
                        unit = unit.name(),
                        "more than {MAX_OVERRIDE_RATES} distinct descriptor limit overrides: \
                         new ones are not enforced (logged once)"
                    );
                }
                return None;
            }
            overrides.insert((requests, unit, mode));
            self.register(&self.loaded.load().config, &overrides);
        }
        Some((name, rate))
    }

    /// Count a call refused for want of the API key (the gRPC layer checks it).
    pub fn count_unauthenticated(&self) {
        self.requests[3].inc();
    }

    /// Decide a `ShouldRateLimit` request without borrowing for `strict` rules (see
    /// [`Rls::should_rate_limit_with_loans`]).
    pub fn should_rate_limit(
        &self,
        request: &RateLimitRequest,
    ) -> Result<RateLimitResponse, RlsError> {
        let loaded = self.loaded.load();
        let result = self.prepare(&loaded, request).map(|plans| {
            self.shortfalls(&plans);
            self.decide(&loaded, &plans, &[])
        });
        self.count_request(result)
    }

    /// Decide a `ShouldRateLimit` request; a `strict` rule whose bucket this replica's share
    /// cannot pay borrows from its peers first, as `/rate` does, unless another descriptor of
    /// the request would refuse it anyway. The request then waits for up to one loan
    /// timeout per peer asked. Without strict rules this is [`Rls::should_rate_limit`].
    pub async fn should_rate_limit_with_loans(
        &self,
        request: &RateLimitRequest,
    ) -> Result<RateLimitResponse, RlsError> {
        let loaded = self.loaded.load_full();
        let plans = match self.prepare(&loaded, request) {
            Ok(plans) => plans,
            Err(e) => return self.count_request(Err(e)),
        };
        let short = self.shortfalls(&plans);
        // Borrowing is worth it only if nothing else refuses the request (it is checked
        // again, with the loans, under the locks).
        let others_pass = !short.is_empty()
            && plans.iter().enumerate().all(|(i, plan)| match plan {
                Plan::Limited(l) if !l.shadow && !short.iter().any(|(j, _)| *j == i) => {
                    allowed(l, self.peek(l, 0).as_ref())
                }
                _ => true,
            });
        let mut loans: SmallVec<[(usize, Shortfall, Loan); 2]> = SmallVec::new();
        if others_pass {
            for (i, shortfall) in short {
                let Plan::Limited(l) = &plans[i] else {
                    continue;
                };
                let Some((policy, _)) = &l.policy else {
                    continue;
                };
                if let Some(loan) = self.limiter.borrow(policy, &l.key, shortfall).await {
                    loans.push((i, shortfall, loan));
                }
            }
        }
        let lent: SmallVec<[(usize, i128); 2]> =
            loans.iter().map(|(i, _, loan)| (*i, loan.lent)).collect();
        let (response, spent) = self.decide_spending(&loaded, &plans, &lent);
        for (i, shortfall, loan) in loans {
            if let Plan::Limited(l) = &plans[i]
                && let Some((policy, _)) = &l.policy
            {
                let allowed = response.statuses[i].code == Code::Ok as i32;
                self.limiter
                    .settle_loan(policy, &l.key, shortfall, loan, spent[i], allowed);
            }
        }
        self.count_request(Ok(response))
    }

    fn count_request(
        &self,
        result: Result<RateLimitResponse, RlsError>,
    ) -> Result<RateLimitResponse, RlsError> {
        let code = match &result {
            Ok(r) if r.overall_code == Code::OverLimit as i32 => 1,
            Ok(_) => 0,
            Err(_) => 2,
        };
        self.requests[code].inc();
        result
    }

    /// What applies to each descriptor of `request`.
    fn prepare<'a>(
        &self,
        loaded: &'a Loaded,
        request: &'a RateLimitRequest,
    ) -> Result<Vec<Plan<'a>>, RlsError> {
        if request.domain.is_empty() {
            return Err(RlsError::EmptyDomain);
        }
        if request.descriptors.is_empty() {
            return Err(RlsError::NoDescriptors);
        }
        let mut plans = Vec::with_capacity(request.descriptors.len());
        let mut rules = Vec::with_capacity(request.descriptors.len());
        for (i, descriptor) in request.descriptors.iter().enumerate() {
            let (plan, rule) = self.plan(loaded, request, i, descriptor)?;
            plans.push(plan);
            rules.push(rule);
        }
        apply_replaces(loaded, &rules, &mut plans);
        count_bucket_hits(&mut plans);
        Ok(plans)
    }

    /// For every enforced descriptor of a `strict` rule decided by the escrow: its hits count
    /// as demand (once per request, as a `/rate` decision's do), and what a loan would have to
    /// pay for it now. Descriptors that name one bucket twice are not lent for: each loan
    /// pays one descriptor's spend.
    fn shortfalls(&self, plans: &[Plan<'_>]) -> SmallVec<[(usize, Shortfall); 2]> {
        if !self.limiter.has_strict_policies() {
            return SmallVec::new();
        }
        plans
            .iter()
            .enumerate()
            .filter_map(|(i, plan)| match plan {
                Plan::Limited(l) if l.enforced() && l.grantable() => {
                    let (policy, _) = l.policy.as_ref()?;
                    let shortfall = self.limiter.strict_shortfall(policy, &l.key, l.hits)?;
                    (!l.shares_bucket).then_some((i, shortfall))
                }
                _ => None,
            })
            .collect()
    }

    fn decide(
        &self,
        loaded: &Loaded,
        plans: &[Plan<'_>],
        lent: &[(usize, i128)],
    ) -> RateLimitResponse {
        self.decide_spending(loaded, plans, lent).0
    }

    /// Decide planned descriptors all or nothing, `lent[i]` units borrowed for descriptor `i`;
    /// also says which descriptors were spent from.
    fn decide_spending(
        &self,
        loaded: &Loaded,
        plans: &[Plan<'_>],
        lent: &[(usize, i128)],
    ) -> (RateLimitResponse, SmallVec<[bool; 4]>) {
        let loan_of = |i: usize| {
            lent.iter()
                .find(|(j, _)| *j == i)
                .map_or(0, |&(_, units)| units)
        };

        // Lock the stripes of every bucket this request may spend from, in order: among this
        // replica's RLS decisions, checking all and then spending is one atomic step.
        let mut stripes: SmallVec<[usize; 4]> = plans
            .iter()
            .filter_map(|plan| match plan {
                Plan::Limited(l) if l.hits > 0 => l
                    .policy
                    .as_ref()
                    .map(|(policy, _)| self.hasher.hash_one((policy, &l.key)) as usize % STRIPES),
                _ => None,
            })
            .collect();
        stripes.sort_unstable();
        stripes.dedup();
        let _guards: SmallVec<[MutexGuard<'_, ()>; 4]> = stripes
            .iter()
            .map(|&i| self.stripes[i].lock().unwrap_or_else(|p| p.into_inner()))
            .collect();

        // One enforced descriptor is decided directly (check and spend are one step in the
        // store, and a refusal spends nothing); every other limited one is peeked first.
        let direct = plans.iter().position(|plan| {
            matches!(plan, Plan::Limited(l) if l.enforced() && l.grantable() && !l.shares_bucket)
        });
        let mut outcomes: SmallVec<[Option<Outcome>; 4]> = plans
            .iter()
            .enumerate()
            .map(|(i, plan)| match plan {
                Plan::Limited(l) if Some(i) != direct => self.peek(l, loan_of(i)),
                _ => None,
            })
            .collect();
        let mut spent: SmallVec<[bool; 4]> = smallvec::smallvec![false; plans.len()];
        let mut refused = plans
            .iter()
            .zip(&outcomes)
            .enumerate()
            .any(|(i, (plan, peek))| {
                Some(i) != direct
                    && matches!(plan, Plan::Limited(l) if !l.shadow && !allowed(l, peek.as_ref()))
            });
        if let Some(d) = direct {
            let Plan::Limited(l) = &plans[d] else {
                unreachable!("direct is a limited descriptor")
            };
            if refused {
                outcomes[d] = self.peek(l, loan_of(d));
            } else {
                outcomes[d] = self.spend(l, loan_of(d));
                spent[d] = true;
                refused = outcomes[d].is_some_and(|o| !o.allowed);
            }
        }
        // The others: spent if the request is admitted, else left as they are; enforced ones
        // first, so that a shadow descriptor on the same bucket never takes their tokens.
        if !refused {
            for shadow in [false, true] {
                for (i, plan) in plans.iter().enumerate() {
                    if let Plan::Limited(l) = plan
                        && l.shadow == shadow
                        && Some(i) != direct
                        && l.hits > 0
                        && l.grantable()
                        && l.policy.is_some()
                    {
                        outcomes[i] = self.spend(l, loan_of(i));
                        spent[i] = true;
                    }
                }
            }
        }

        let mut statuses = Vec::with_capacity(plans.len());
        let mut over = false;
        for ((plan, outcome), &spent) in plans.iter().zip(outcomes).zip(&spent) {
            let status = match plan {
                Plan::None => {
                    loaded.no_rule.inc();
                    DescriptorStatus {
                        code: Code::Ok as i32,
                        ..Default::default()
                    }
                }
                Plan::Replaced => DescriptorStatus {
                    code: Code::Ok as i32,
                    ..Default::default()
                },
                Plan::Unlimited(counters) => {
                    counters.unlimited.inc();
                    DescriptorStatus {
                        code: Code::Ok as i32,
                        limit_remaining: u32::MAX,
                        ..Default::default()
                    }
                }
                // The rules changed under this request (its policy is gone): no limit now.
                Plan::Limited(l) if l.policy.is_some() && outcome.is_none() => {
                    loaded.no_rule.inc();
                    DescriptorStatus {
                        code: Code::Ok as i32,
                        ..Default::default()
                    }
                }
                Plan::Limited(l) => {
                    let granted = match (spent, outcome) {
                        (true, Some(o)) => o.allowed,
                        _ => allowed(l, outcome.as_ref()),
                    };
                    let code = if granted || l.shadow {
                        Code::Ok
                    } else {
                        over = true;
                        Code::OverLimit
                    };
                    let decision = match (granted, l.shadow, refused) {
                        (false, true, _) => "shadow_over_limit",
                        (false, false, _) => "over_limit",
                        (true, _, true) => "not_charged",
                        (true, _, false) => "ok",
                    };
                    count(l, decision);
                    limited_status(l, code, outcome.as_ref())
                }
            };
            statuses.push(status);
        }
        let response = RateLimitResponse {
            overall_code: if over { Code::OverLimit } else { Code::Ok } as i32,
            statuses,
            ..Default::default()
        };
        (response, spent)
    }

    /// What applies to descriptor `i`.
    fn plan<'a>(
        &self,
        loaded: &'a Loaded,
        request: &'a RateLimitRequest,
        i: usize,
        descriptor: &'a RateLimitDescriptor,
    ) -> Result<(Plan<'a>, Option<usize>), RlsError> {
        let entries = descriptor
            .entries
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()));
        // As in the reference: an unknown domain has no limits, not even overrides.
        if !loaded.config.has_domain(&request.domain) {
            return Ok((Plan::None, None));
        }
        // Per-descriptor hits when set (0 included: check without spending), else the
        // request's, where 0 (unset) means 1. A negative hit would be a refund, which a
        // G-Counter cannot take: it is checked, not spent.
        let hits = if descriptor.is_negative_hits {
            0
        } else {
            match &descriptor.hits_addend {
                Some(h) => h.value,
                None => u64::from(request.hits_addend.max(1)),
            }
        };
        if let Some(limit) = &descriptor.limit {
            let unit = Unit::from_proto(limit.unit).ok_or(RlsError::OverrideUnit(i))?;
            // The override replaces the number of the rule the descriptor matches, not how
            // replicas share its bucket: a `strict` rule stays strict (shared without a rule).
            let mode = match loaded
                .config
                .lookup_sharing(&request.domain, entries, |_, _| {})
            {
                Lookup::Rule(_, rule) => rule.mode,
                Lookup::UnknownDomain | Lookup::NoRule => Mode::Shared,
            };
            let policy = if limit.requests_per_unit == 0 {
                None
            } else {
                match self.override_policy(limit.requests_per_unit, unit, mode) {
                    Some((policy, rate)) => Some((Cow::Owned(policy), rate)),
                    None => return Ok((Plan::None, None)),
                }
            };
            let plan = Plan::Limited(Limited {
                requests_per_unit: limit.requests_per_unit,
                unit,
                name: "",
                policy,
                key: bucket_key(&request.domain, &descriptor.entries, &[]),
                hits,
                bucket_hits: hits,
                shares_bucket: false,
                shadow: false,
                counters: &loaded.override_counters,
                detailed_value: None,
            });
            return Ok((plan, None));
        }
        let mut shared: SmallVec<[(usize, &str); 2]> = SmallVec::new();
        let found = loaded
            .config
            .lookup_sharing(&request.domain, entries, |i, pattern| {
                shared.push((i, pattern))
            });
        let (index, rule) = match found {
            Lookup::Rule(index, rule) => (index, rule),
            Lookup::UnknownDomain | Lookup::NoRule => return Ok((Plan::None, None)),
        };
        let counters = &loaded.rules[index];
        let plan = match rule.limit {
            Limit::Unlimited => Plan::Unlimited(counters),
            Limit::PerUnit {
                requests_per_unit,
                unit,
            } => Plan::Limited(Limited {
                requests_per_unit,
                unit,
                name: &rule.name,
                policy: rule
                    .limit
                    .rate()
                    .map(|rate| (Cow::Borrowed(rule.policy()), rate)),
                key: bucket_key(&request.domain, &descriptor.entries, &shared),
                hits,
                bucket_hits: hits,
                shares_bucket: false,
                shadow: rule.shadow_mode,
                counters,
                detailed_value: rule
                    .detailed_metric
                    .then(|| descriptor.entries.last().map(|e| e.value.as_str()))
                    .flatten(),
            }),
        };
        Ok((plan, Some(index)))
    }

    /// What spending `l`'s bucket would see, with `lent` units borrowed for it.
    fn peek(&self, l: &Limited<'_>, lent: i128) -> Option<Outcome> {
        let (policy, rate) = l.policy.as_ref()?;
        let cost = l.bucket_hits.min(rate.capacity());
        self.limiter
            .peek_with_loan(policy, &l.key, cost, lent)
            .ok()
            .map(|verdict| verdict.outcome)
    }

    /// Spend `l`'s hits, with `lent` units borrowed for it. A strict rule's hits counted as
    /// demand already ([`Rls::shortfalls`]).
    fn spend(&self, l: &Limited<'_>, lent: i128) -> Option<Outcome> {
        let (policy, _) = l.policy.as_ref()?;
        self.limiter
            .spend_with_loan(policy, &l.key, l.hits, lent)
            .ok()
            .map(|verdict| verdict.outcome)
    }
}

/// Whether `l` passes given what a peek saw.
fn allowed(l: &Limited<'_>, peek: Option<&Outcome>) -> bool {
    if l.hits == 0 {
        // Check only: the reference refuses 0 hits only past the limit, which a bucket
        // reaches only in debt (shared mode, after concurrent spending on other replicas).
        return peek.is_none_or(|o| o.allowed);
    }
    // No outcome with a policy: the rules changed under this request and no longer limit it.
    l.grantable() && peek.is_none_or(|o| o.allowed)
}

/// Sets each enforced descriptor's `bucket_hits` to the hits of all enforced descriptors of the
/// request on its bucket, so that a bucket named twice is checked for both.
fn count_bucket_hits(plans: &mut [Plan<'_>]) {
    let totals: SmallVec<[(u64, bool); 4]> = plans
        .iter()
        .map(|plan| match plan {
            Plan::Limited(a) if a.enforced() => {
                plans
                    .iter()
                    .fold((0, false), |(sum, shared), other| match other {
                        Plan::Limited(b) if b.enforced() && a.same_bucket(b) => {
                            (sum + b.hits, shared || !std::ptr::eq(a, b))
                        }
                        _ => (sum, shared),
                    })
            }
            Plan::Limited(a) => (a.hits, false),
            _ => (0, false),
        })
        .collect();
    for (plan, (total, shared)) in plans.iter_mut().zip(totals) {
        if let Plan::Limited(l) = plan {
            l.bucket_hits = total;
            l.shares_bucket = shared;
        }
    }
}

/// `replaces`: a rule with a name is dropped when another rule matched by the same request
/// (limited or unlimited) replaces that name. `rules[i]` is the rule descriptor `i` matched.
fn apply_replaces(loaded: &Loaded, rules: &[Option<usize>], plans: &mut [Plan<'_>]) {
    let all = loaded.config.rules();
    let replaced: Vec<&str> = rules
        .iter()
        .flatten()
        .flat_map(|&i| all[i].replaces.iter().map(String::as_str))
        .collect();
    if replaced.is_empty() {
        return;
    }
    for (plan, rule) in plans.iter_mut().zip(rules) {
        if let Some(&i) = rule.as_ref()
            && !all[i].name.is_empty()
            && replaced.contains(&all[i].name.as_str())
        {
            loaded.rules[i].replaced.inc();
            *plan = Plan::Replaced;
        }
    }
}

fn count(l: &Limited<'_>, decision: &'static str) {
    let c = l.counters;
    match decision {
        "ok" => c.ok.inc(),
        "over_limit" => c.over_limit.inc(),
        "shadow_over_limit" => c.shadow_over_limit.inc(),
        _ => c.not_charged.inc(),
    };
    let (Some(detailed), Some(value)) = (&c.detailed, l.detailed_value) else {
        return;
    };
    let mut seen = detailed.seen.lock().unwrap_or_else(|p| p.into_inner());
    let value = if seen.contains(value) {
        value
    } else if seen.len() < MAX_DETAILED_VALUES {
        seen.insert(value.to_owned());
        value
    } else {
        "_other"
    };
    drop(seen);
    detailed
        .family
        .get_or_create(&DetailedLabels {
            domain: detailed.domain.clone(),
            rule: detailed.rule.clone(),
            value: value.to_owned(),
            decision,
        })
        .inc_by(l.hits);
}

/// The status of a limited descriptor: Envoy writes `X-RateLimit-Limit` from `current_limit`,
/// `X-RateLimit-Remaining` from `limit_remaining` and `X-RateLimit-Reset` from
/// `duration_until_reset`: for an allowed request, the seconds until the bucket is full again;
/// for a refused one, until these hits would be granted (rounded up to whole seconds).
fn limited_status(l: &Limited<'_>, code: Code, outcome: Option<&Outcome>) -> DescriptorStatus {
    let unit_us = l.unit.millis() * 1000;
    let (remaining, reset_us) = match outcome {
        Some(o) if o.allowed || code == Code::Ok => (o.remaining, o.reset_after_us),
        Some(o) if l.grantable() => (o.remaining, o.retry_after_us),
        Some(o) => (o.remaining, o.reset_after_us),
        // No bucket: 0 per unit, or the rules changed under the request.
        None => (0, unit_us),
    };
    DescriptorStatus {
        code: code as i32,
        current_limit: Some(RateLimit {
            name: l.name.to_owned(),
            requests_per_unit: l.requests_per_unit,
            unit: l.unit.proto(),
        }),
        limit_remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
        duration_until_reset: Some(Duration {
            seconds: i64::try_from(reset_us.div_ceil(1_000_000)).unwrap_or(i64::MAX),
            nanos: 0,
        }),
        quota: None,
    }
}

/// The policy of a `limit` override rate in `mode`.
fn override_policy(requests: u32, unit: Unit, mode: Mode) -> String {
    match mode {
        Mode::Shared => format!("rls:limit:{requests}/{}", unit.name()),
        Mode::Strict => format!("rls:limit:{requests}/{}:strict", unit.name()),
    }
}

/// The bucket key of a descriptor: its domain and entries, each length-prefixed so that no two
/// descriptors share a key; keys longer than peers accept are replaced by their SHA-256 (hex,
/// after a `#` no plain key starts with). An entry `i` listed in `shared` (matched by a
/// `share_threshold` wildcard) contributes its pattern instead of its value, after a `*` where
/// a value's length would start, so it never equals a key with that pattern as a value.
pub fn bucket_key(
    domain: &str,
    entries: &[envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry],
    shared: &[(usize, &str)],
) -> String {
    use std::fmt::Write;
    let mut key = String::with_capacity(domain.len() + 16 * entries.len() + 8);
    let _ = write!(key, "{}:{domain}", domain.len());
    for (i, entry) in entries.iter().enumerate() {
        let _ = write!(key, "{}:{}", entry.key.len(), entry.key);
        match shared.iter().find(|&&(j, _)| j == i) {
            Some((_, pattern)) => {
                let _ = write!(key, "*{}:{pattern}", pattern.len());
            }
            None => {
                let _ = write!(key, "{}:{}", entry.value.len(), entry.value);
            }
        }
    }
    if key.len() <= MAX_PLAIN_KEY_BYTES {
        return key;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let mut hashed = String::with_capacity(65);
    hashed.push('#');
    for byte in digest.as_ref() {
        let _ = write!(hashed, "{byte:02x}");
    }
    hashed
}

impl Loaded {
    fn build(config: RlsConfig, limiter: &Limiter) -> Self {
        let metrics = limiter.metrics();
        let counters = |domain: &str, rule: &str, detailed: bool| {
            let handle = |decision| {
                metrics
                    .rls_descriptors
                    .get_or_create(&RuleLabels {
                        domain: domain.to_owned(),
                        rule: rule.to_owned(),
                        decision,
                    })
                    .clone()
            };
            RuleCounters {
                ok: handle("ok"),
                over_limit: handle("over_limit"),
                shadow_over_limit: handle("shadow_over_limit"),
                not_charged: handle("not_charged"),
                unlimited: handle("unlimited"),
                replaced: handle("replaced"),
                detailed: detailed.then(|| {
                    Arc::new(Detailed {
                        domain: domain.to_owned(),
                        rule: rule.to_owned(),
                        seen: Mutex::default(),
                        family: metrics.rls_detailed_hits.clone(),
                    })
                }),
            }
        };
        let rules = config
            .rules()
            .iter()
            .map(|rule: &Rule| counters(&rule.domain, rule.label(), rule.detailed_metric))
            .collect();
        let no_rule = metrics
            .rls_descriptors
            .get_or_create(&RuleLabels {
                domain: String::new(),
                rule: String::new(),
                decision: "no_rule",
            })
            .clone();
        Self {
            rules,
            no_rule,
            override_counters: counters("", "limit_override", false),
            config,
        }
    }
}
