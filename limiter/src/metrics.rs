//! The limiter's Prometheus series: one registry, built at start, names from
//! [`openclaw_common::metric_names`], labels bounded (policy, decision, reason, route — never a
//! client key). `docs/metrics.md` documents every series.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openclaw_common::metric_names as names;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub policy: String,
    pub decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoanLabels {
    pub role: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: &'static str,
}

/// A rate limit service rule: labels from the configuration, never from a request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub domain: String,
    pub rule: String,
    pub decision: &'static str,
}

/// [`RuleLabels`] and a descriptor value, for rules that ask for `detailed_metric` (bounded per
/// rule by `rls::service::MAX_DETAILED_VALUES`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DetailedLabels {
    pub domain: String,
    pub rule: String,
    pub value: String,
    pub decision: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;
/// The label set of a family with one unlabelled series (the empty list).
pub type NoLabels = Vec<(&'static str, &'static str)>;
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Counter handles for one policy, resolved once per policy load so that a decision bumps a
/// few atomics instead of hashing label sets.
#[derive(Clone, Debug)]
pub struct PolicyCounters {
    pub allowed: Counter,
    pub rejected: Counter,
    pub tokens: Counter,
    pub depletion: MicroCounter,
}

impl PolicyCounters {
    #[inline]
    pub fn count(&self, outcome: &crate::bucket::Outcome, cost: u64) {
        if outcome.allowed {
            self.allowed.inc();
            self.tokens.inc_by(cost);
        } else {
            self.rejected.inc();
        }
        // How empty the bucket was when asked: what openclaw_token_depletion_rate averages.
        self.depletion
            .inc_by_micros(u64::from(outcome.depleted_ppm));
    }
}

/// A counter of fractions, kept in millionths so that adding to it is one `fetch_add` on the
/// decision path (a float counter is a compare-and-swap loop: measured +20 ns a decision);
/// exported as the float it stands for.
#[derive(Debug, Clone, Default)]
pub struct MicroCounter(Arc<AtomicU64>);

impl MicroCounter {
    #[inline]
    pub fn inc_by_micros(&self, micros: u64) {
        self.0.fetch_add(micros, Ordering::Relaxed);
    }

    pub fn get(&self) -> f64 {
        self.0.load(Ordering::Relaxed) as f64 / 1e6
    }
}

impl TypedMetric for MicroCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for MicroCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<DecisionLabels, Counter>,
    tokens: Family<PolicyLabels, Counter>,
    depletion: Family<PolicyLabels, MicroCounter>,
    pub bad_requests: Family<ReasonLabels, Counter>,
    pub http_duration: HistogramFamily<RouteLabels>,
    pub active_buckets: Family<PolicyLabels, Gauge>,
    pub tokens_available: Family<PolicyLabels, Gauge>,
    pub capacity: Family<PolicyLabels, Gauge>,
    pub fill_rate: Family<PolicyLabels, FloatGauge>,
    pub current_usage: Family<PolicyLabels, Gauge>,
    pub rejection_rate: Family<PolicyLabels, FloatGauge>,
    pub refill_delay: FloatGauge,
    pub policy_reloads: Family<ResultLabels, Counter>,
    pub policy_reload_ok: Gauge,
    pub peers: Family<StateLabels, Gauge>,
    pub replication_lag: Family<PeerLabels, FloatGauge>,
    pub replication_bytes: Family<DirectionLabels, Counter>,
    pub replication_entries: Family<DirectionLabels, Counter>,
    pub merges: Counter,
    pub peer_rejected: Family<ReasonLabels, Counter>,
    /// Connections the peer listener holds now (`crate::listener`).
    pub peer_connections: Gauge,
    /// Loads of changed peer mTLS files, by result (`crate::peer_tls`).
    pub peer_tls_reloads: Family<ResultLabels, Counter>,
    /// 0 while changed peer mTLS files cannot be used, else 1.
    pub peer_tls_reload_ok: Gauge,
    pub peer_clock_offset: Family<PeerLabels, FloatGauge>,
    pub clock_lead: FloatGauge,
    pub peer_clock_refused: Family<ReasonLabels, Counter>,
    /// `openclaw_peer_entries_refused_total`: authenticated bucket entries no honest peer sends.
    pub peer_entries_refused: Family<ReasonLabels, Counter>,
    pub snapshot_age: FloatGauge,
    pub snapshots: Family<ResultLabels, Counter>,
    /// Off-site snapshots (`crate::remote`).
    pub snapshot_uploads: Family<ResultLabels, Counter>,
    pub snapshot_remote_age: FloatGauge,
    pub snapshot_remote_interval: Gauge,
    pub snapshot_remote_rejected: Family<ReasonLabels, Counter>,
    pub strict_share: Family<PolicyLabels, FloatGauge>,
    /// Unlabelled, but a family so that it is exported only while a strict policy is in force:
    /// a 0 on a replica without one would read as a lapsed lease.
    pub strict_lease_remaining: Family<NoLabels, FloatGauge>,
    strict_loans: Family<LoanLabels, Counter>,
    pub rls_requests: Family<CodeLabels, Counter>,
    pub rls_descriptors: Family<RuleLabels, Counter>,
    pub rls_detailed_hits: Family<DetailedLabels, Counter>,
    pub rls_config_reloads: Family<ResultLabels, Counter>,
    pub rls_config_reload_ok: Gauge,
    /// Connections the gRPC listener holds now (`crate::rls::grpc`).
    pub grpc_connections: Gauge,
    /// gRPC connections closed by the listener's limits, by reason.
    pub grpc_connections_closed: Family<ReasonLabels, Counter>,
    /// Latency histogram handles per route, resolved once: a request must not hash label sets.
    route_latency: Vec<(&'static str, Histogram)>,
}

/// The routes whose latency is recorded; anything else counts as `unmatched` (kept last).
pub const ROUTES: [&str; 8] = [
    "/rate",
    "/rate/batch",
    "/status",
    "/admin/snapshot",
    "/healthz",
    "/ready",
    "/metrics",
    "unmatched",
];

/// prometheus-client appends `_total` to counters itself.
fn counter_name(name: &'static str) -> &'static str {
    name.strip_suffix("_total").unwrap_or(name)
}

fn latency_histogram() -> Histogram {
    // 50 µs to ~0.8 s: a decision is tens of microseconds, a slow one is worth seeing.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 15))
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let metrics = Self {
            requests: Family::default(),
            tokens: Family::default(),
            depletion: Family::default(),
            bad_requests: Family::default(),
            http_duration: Family::new_with_constructor(latency_histogram),
            active_buckets: Family::default(),
            tokens_available: Family::default(),
            capacity: Family::default(),
            fill_rate: Family::default(),
            current_usage: Family::default(),
            rejection_rate: Family::default(),
            refill_delay: FloatGauge::default(),
            policy_reloads: Family::default(),
            policy_reload_ok: Gauge::default(),
            peers: Family::default(),
            replication_lag: Family::default(),
            replication_bytes: Family::default(),
            replication_entries: Family::default(),
            merges: Counter::default(),
            peer_rejected: Family::default(),
            peer_connections: Gauge::default(),
            peer_tls_reloads: Family::default(),
            peer_tls_reload_ok: Gauge::default(),
            peer_clock_offset: Family::default(),
            clock_lead: FloatGauge::default(),
            peer_clock_refused: Family::default(),
            peer_entries_refused: Family::default(),
            snapshot_age: FloatGauge::default(),
            snapshots: Family::default(),
            snapshot_uploads: Family::default(),
            snapshot_remote_age: FloatGauge::default(),
            snapshot_remote_interval: Gauge::default(),
            snapshot_remote_rejected: Family::default(),
            strict_share: Family::default(),
            strict_lease_remaining: Family::default(),
            strict_loans: Family::default(),
            rls_requests: Family::default(),
            rls_descriptors: Family::default(),
            rls_detailed_hits: Family::default(),
            rls_config_reloads: Family::default(),
            rls_config_reload_ok: Gauge::default(),
            grpc_connections: Gauge::default(),
            grpc_connections_closed: Family::default(),
            route_latency: Vec::new(),
            registry: Registry::default(),
        };
        registry.register(
            counter_name(names::REQUESTS_TOTAL),
            "Rate-limit decisions, by policy and decision (allowed or rejected)",
            metrics.requests.clone(),
        );
        registry.register(
            counter_name(names::TOKENS_CONSUMED_TOTAL),
            "Tokens admitted by this replica, by policy",
            metrics.tokens.clone(),
        );
        registry.register(
            counter_name(names::BUCKET_DEPLETION_TOTAL),
            "Sum over decisions of how empty the bucket was when asked (0 full, 1 empty), by policy; \
             over the rate of openclaw_requests_total it is the average depletion requests meet",
            metrics.depletion.clone(),
        );
        registry.register(
            counter_name(names::BAD_REQUESTS_TOTAL),
            "Requests refused as malformed before any decision, by reason",
            metrics.bad_requests.clone(),
        );
        registry.register(
            names::HTTP_REQUEST_DURATION_SECONDS,
            "Time to answer an HTTP request on the decision API, by route",
            metrics.http_duration.clone(),
        );
        registry.register(
            names::ACTIVE_BUCKETS,
            "Buckets holding consumption (not full), by policy",
            metrics.active_buckets.clone(),
        );
        registry.register(
            names::TOKENS_AVAILABLE,
            "Whole tokens in the most depleted bucket of the policy (capacity when none is active)",
            metrics.tokens_available.clone(),
        );
        registry.register(
            names::TOKEN_BUCKET_CAPACITY,
            "Tokens each bucket of the policy holds when full",
            metrics.capacity.clone(),
        );
        registry.register(
            names::TOKEN_BUCKET_FILL_RATE,
            "Tokens added to each bucket of the policy per second",
            metrics.fill_rate.clone(),
        );
        registry.register(
            names::TOKEN_BUCKET_CURRENT_USAGE,
            "Tokens consumed and not yet refilled in the most depleted bucket of the policy",
            metrics.current_usage.clone(),
        );
        registry.register(
            names::TOKEN_BUCKET_REJECTION_RATE,
            "Share of decisions rejected over the last minute, 0 to 1, by policy",
            metrics.rejection_rate.clone(),
        );
        registry.register(
            names::TOKEN_BUCKET_REFILL_DELAY,
            "Seconds since the refill and reclamation pass last completed (healthy: about 1)",
            metrics.refill_delay.clone(),
        );
        registry.register(
            counter_name(names::POLICY_RELOADS_TOTAL),
            "Attempts to load the policies file, by result (success or failure)",
            metrics.policy_reloads.clone(),
        );
        registry.register(
            names::POLICY_CONFIG_LAST_RELOAD_SUCCESSFUL,
            "1 if the last attempt to load the policies file succeeded, else 0",
            metrics.policy_reload_ok.clone(),
        );
        registry.register(
            names::PEERS,
            "Peers known to this replica, by state (up: last exchange succeeded)",
            metrics.peers.clone(),
        );
        registry.register(
            names::REPLICATION_LAG_SECONDS,
            "Seconds since this replica last merged state received from the peer",
            metrics.replication_lag.clone(),
        );
        registry.register(
            counter_name(names::REPLICATION_BYTES_TOTAL),
            "Replication payload bytes, by direction",
            metrics.replication_bytes.clone(),
        );
        registry.register(
            counter_name(names::REPLICATION_ENTRIES_TOTAL),
            "Bucket entries carried by replication, by direction",
            metrics.replication_entries.clone(),
        );
        registry.register(
            counter_name(names::MERGES_TOTAL),
            "Remote bucket entries that changed local state when merged",
            metrics.merges.clone(),
        );
        registry.register(
            counter_name(names::PEER_MESSAGES_REJECTED_TOTAL),
            "Peer messages refused and never merged, by reason",
            metrics.peer_rejected.clone(),
        );
        registry.register(
            names::PEER_CONNECTIONS,
            "Connections the peer listener holds now",
            metrics.peer_connections.clone(),
        );
        registry.register(
            counter_name(names::PEER_TLS_RELOADS_TOTAL),
            "Attempts to load changed peer mutual-TLS files, by result",
            metrics.peer_tls_reloads.clone(),
        );
        registry.register(
            names::PEER_TLS_LAST_RELOAD_SUCCESSFUL,
            "0 while changed peer mutual-TLS files cannot be used, else 1",
            metrics.peer_tls_reload_ok.clone(),
        );
        // Nothing has failed yet (and without mTLS nothing can).
        metrics.peer_tls_reload_ok.set(1);
        registry.register(
            names::PEER_CLOCK_OFFSET_SECONDS,
            "How far the peer's clock is ahead of this replica's system clock (negative: behind), \
             from its last message (send time minus receive time: reads low by the network delay)",
            metrics.peer_clock_offset.clone(),
        );
        registry.register(
            names::CLOCK_LEAD_SECONDS,
            "How far this replica's clock runs ahead of its system clock to keep up with the \
             fastest peer within the clock guard (negative: behind it, following a majority \
             of the replicas that far behind)",
            metrics.clock_lead.clone(),
        );
        registry.register(
            counter_name(names::PEER_CLOCK_REFUSED_TOTAL),
            "Peer timestamps further ahead than the clock guard, refused and never merged, by \
             reason (message_ahead, answer_ahead, epoch_ahead, incarnation_ahead)",
            metrics.peer_clock_refused.clone(),
        );
        registry.register(
            counter_name(names::PEER_ENTRIES_REFUSED_TOTAL),
            "Authenticated peer bucket entries refused and never merged because no honest \
             replica sends them, by reason (implausible_consumption, too_many_components)",
            metrics.peer_entries_refused.clone(),
        );
        registry.register(
            names::SNAPSHOT_AGE_SECONDS,
            "Seconds since the last snapshot was written or restored (0 when snapshots are off)",
            metrics.snapshot_age.clone(),
        );
        registry.register(
            counter_name(names::SNAPSHOTS_TOTAL),
            "Snapshot attempts, by result",
            metrics.snapshots.clone(),
        );
        registry.register(
            counter_name(names::SNAPSHOT_UPLOADS_TOTAL),
            "Uploads of a snapshot to the off-site store, by result",
            metrics.snapshot_uploads.clone(),
        );
        registry.register(
            names::SNAPSHOT_REMOTE_AGE_SECONDS,
            "Age of the newest snapshot this replica shipped off-site (before the first: time \
             since start; 0 when off-site snapshots are off)",
            metrics.snapshot_remote_age.clone(),
        );
        registry.register(
            names::SNAPSHOT_REMOTE_INTERVAL_SECONDS,
            "Configured seconds between off-site uploads (0 when off-site snapshots are off)",
            metrics.snapshot_remote_interval.clone(),
        );
        registry.register(
            counter_name(names::SNAPSHOT_REMOTE_REJECTED_TOTAL),
            "Off-site snapshot objects a restore skipped and did not trust, by reason",
            metrics.snapshot_remote_rejected.clone(),
        );
        registry.register(
            names::STRICT_SHARE,
            "Share of a strict policy's capacity and refill this replica may spend now, 0 to 1 \
             (0 while its lease has lapsed), by policy",
            metrics.strict_share.clone(),
        );
        registry.register(
            names::STRICT_LEASE_REMAINING_SECONDS,
            "Seconds until this replica's strict-mode lease lapses unless a round renews it \
             (0: lapsed, strict policies refuse everything here)",
            metrics.strict_lease_remaining.clone(),
        );
        registry.register(
            counter_name(names::STRICT_LOANS_TOTAL),
            "Strict-mode loans between replicas, by role (borrower, lender) and result",
            metrics.strict_loans.clone(),
        );
        registry.register(
            counter_name(names::RLS_REQUESTS_TOTAL),
            "ShouldRateLimit calls of Envoy's rate limit service, by overall code",
            metrics.rls_requests.clone(),
        );
        registry.register(
            counter_name(names::RLS_DESCRIPTORS_TOTAL),
            "Request descriptors decided by the rate limit service, by domain, rule and decision",
            metrics.rls_descriptors.clone(),
        );
        registry.register(
            counter_name(names::RLS_DETAILED_HITS_TOTAL),
            "Hits of descriptors of rules with detailed_metric, by domain, rule, value (bounded) and decision",
            metrics.rls_detailed_hits.clone(),
        );
        registry.register(
            counter_name(names::RLS_CONFIG_RELOADS_TOTAL),
            "Attempts to load the rate limit service configuration, by result",
            metrics.rls_config_reloads.clone(),
        );
        registry.register(
            names::RLS_CONFIG_LAST_RELOAD_SUCCESSFUL,
            "1 if the last attempt to load the rate limit service configuration succeeded, else 0",
            metrics.rls_config_reload_ok.clone(),
        );
        registry.register(
            names::GRPC_CONNECTIONS,
            "Connections the gRPC listener holds now",
            metrics.grpc_connections.clone(),
        );
        registry.register(
            counter_name(names::GRPC_CONNECTIONS_CLOSED_TOTAL),
            "gRPC connections closed by the listener's limits, by reason",
            metrics.grpc_connections_closed.clone(),
        );
        for state in ["up", "down"] {
            metrics.peers.get_or_create(&StateLabels { state }).set(0);
        }
        // Counters that alerts take `rate()` or `increase()` of must exist at 0 before their first
        // increment, or the first failure is invisible to those functions.
        for reason in [
            "unauthenticated",
            "malformed",
            "too_large",
            "incompatible",
            "clock_ahead",
            "busy",
            "too_slow",
            "replayed",
            "misdirected",
            "sender_not_certified",
            "idle_connection",
            "tls_handshake",
            "per_source",
        ] {
            let _ = metrics
                .peer_rejected
                .get_or_create(&ReasonLabels { reason });
        }
        for reason in [
            "message_ahead",
            "answer_ahead",
            "epoch_ahead",
            "incarnation_ahead",
        ] {
            let _ = metrics
                .peer_clock_refused
                .get_or_create(&ReasonLabels { reason });
        }
        for reason in [
            "implausible_consumption",
            "too_many_components",
            "store_full",
        ] {
            let _ = metrics
                .peer_entries_refused
                .get_or_create(&ReasonLabels { reason });
        }
        for result in ["success", "failure"] {
            let _ = metrics.snapshots.get_or_create(&ResultLabels { result });
            let _ = metrics
                .snapshot_uploads
                .get_or_create(&ResultLabels { result });
            let _ = metrics
                .policy_reloads
                .get_or_create(&ResultLabels { result });
        }
        for direction in ["sent", "received"] {
            // Export zeros from the start, so rates over them exist before the first sync.
            let _ = metrics
                .replication_bytes
                .get_or_create(&DirectionLabels { direction });
            let _ = metrics
                .replication_entries
                .get_or_create(&DirectionLabels { direction });
        }
        let build_info: Family<VersionLabels, Gauge> = Family::default();
        build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            names::BUILD_INFO,
            "Build of this limiter, value 1",
            build_info,
        );
        let route_latency = ROUTES
            .iter()
            .map(|&route| {
                let histogram = metrics
                    .http_duration
                    .get_or_create(&RouteLabels { route })
                    .clone();
                (route, histogram)
            })
            .collect();
        Self {
            registry,
            route_latency,
            ..metrics
        }
    }

    /// The latency histogram of `route` (a matched path), or of `unmatched`.
    #[inline]
    pub fn route_latency(&self, route: &str) -> &Histogram {
        let found = self.route_latency.iter().find(|(r, _)| *r == route);
        &found
            .unwrap_or_else(|| self.route_latency.last().expect("ROUTES is not empty"))
            .1
    }

    /// One strict-mode loan request, as borrower or lender.
    pub fn count_loan(&self, role: &'static str, result: &'static str) {
        self.strict_loans
            .get_or_create(&LoanLabels { role, result })
            .inc();
    }

    pub fn policy_counters(&self, policy: &str) -> PolicyCounters {
        let label = |decision| DecisionLabels {
            policy: policy.to_owned(),
            decision,
        };
        // One statement per handle: `get_or_create` returns a read guard, and a second call on
        // the same family while it lives would wait for the write lock forever.
        let allowed = self.requests.get_or_create(&label("allowed")).clone();
        let rejected = self.requests.get_or_create(&label("rejected")).clone();
        let policy = PolicyLabels {
            policy: policy.to_owned(),
        };
        let tokens = self.tokens.get_or_create(&policy).clone();
        let depletion = self.depletion.get_or_create(&policy).clone();
        PolicyCounters {
            allowed,
            rejected,
            tokens,
            depletion,
        }
    }

    /// Stop exporting the per-policy gauges of a policy that a reload removed. Its counters stay:
    /// counters must not go backwards or vanish while Prometheus computes rates over them.
    pub fn forget_policy(&self, policy: &str) {
        let labels = PolicyLabels {
            policy: policy.to_owned(),
        };
        self.active_buckets.remove(&labels);
        self.tokens_available.remove(&labels);
        self.capacity.remove(&labels);
        self.fill_rate.remove(&labels);
        self.current_usage.remove(&labels);
        self.rejection_rate.remove(&labels);
        self.strict_share.remove(&labels);
    }

    /// The Prometheus text exposition (OpenMetrics) of every series.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
