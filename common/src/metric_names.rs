//! Names of every Prometheus series the limiter exports, and the external metrics the adapter
//! serves. `docs/metrics.md` documents each one; a test keeps that document and this list equal.

/// Decisions made, by `policy` and `decision` (`allowed` | `rejected`). Counter.
pub const REQUESTS_TOTAL: &str = "openclaw_requests_total";
/// Tokens admitted by this replica, by `policy`. Counter.
pub const TOKENS_CONSUMED_TOTAL: &str = "openclaw_tokens_consumed_total";
/// Sum over decisions of how empty the bucket was when asked (0 full .. 1 empty), by `policy`.
/// Counter; its rate over the rate of [`REQUESTS_TOTAL`] is the average depletion requests meet.
pub const BUCKET_DEPLETION_TOTAL: &str = "openclaw_bucket_depletion_total";
/// Requests refused as malformed before any decision, by `reason`. Counter.
pub const BAD_REQUESTS_TOTAL: &str = "openclaw_bad_requests_total";
/// HTTP request latency on the decision API, by `route`. Histogram (seconds).
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "openclaw_http_request_duration_seconds";
/// Buckets held in memory (not full), by `policy`. Gauge.
pub const ACTIVE_BUCKETS: &str = "openclaw_active_buckets";
/// Tokens left in the most depleted bucket of a `policy` (capacity when none is active). Gauge.
pub const TOKENS_AVAILABLE: &str = "openclaw_tokens_available";
/// Outcome of loading the policies file, by `result` (`success` | `failure`). Counter.
pub const POLICY_RELOADS_TOTAL: &str = "openclaw_policy_reloads_total";
/// 1 when the last attempt to load the policies file succeeded, else 0. Gauge.
pub const POLICY_CONFIG_LAST_RELOAD_SUCCESSFUL: &str =
    "openclaw_policy_config_last_reload_successful";
/// Build metadata, `version` label, value 1. Gauge.
pub const BUILD_INFO: &str = "openclaw_build_info";

/// Per-key capacity of a `policy`, in tokens. Gauge (alerting guide).
pub const TOKEN_BUCKET_CAPACITY: &str = "token_bucket_capacity";
/// Tokens added to each bucket of a `policy` per second. Gauge (alerting guide).
pub const TOKEN_BUCKET_FILL_RATE: &str = "token_bucket_fill_rate";
/// Tokens currently consumed in the most depleted bucket of a `policy`. Gauge (alerting guide).
pub const TOKEN_BUCKET_CURRENT_USAGE: &str = "token_bucket_current_usage";
/// Seconds since the refill and reclamation pass last completed. Gauge (alerting guide).
pub const TOKEN_BUCKET_REFILL_DELAY: &str = "token_bucket_refill_delay";
/// Share of decisions rejected over the last minute, 0..1, by `policy`. Gauge (alerting guide).
pub const TOKEN_BUCKET_REJECTION_RATE: &str = "token_bucket_rejection_rate";

/// External metric: requests per second across the limiter fleet.
pub const EXTERNAL_REQUESTS_PER_SECOND: &str = "openclaw_requests_per_second";
/// External metric: how empty, on average, the buckets that decisions meet are: 0 (full) to 1
/// (empty), weighted by request.
pub const EXTERNAL_TOKEN_DEPLETION_RATE: &str = "openclaw_token_depletion_rate";

/// Peers known to this replica, by `state` (`up` | `down`). Gauge.
pub const PEERS: &str = "openclaw_peers";
/// Seconds since this replica last merged state from `peer`. Gauge.
pub const REPLICATION_LAG_SECONDS: &str = "openclaw_replication_lag_seconds";
/// Replication payload bytes, by `direction` (`sent` | `received`). Counter.
pub const REPLICATION_BYTES_TOTAL: &str = "openclaw_replication_bytes_total";
/// Bucket entries carried by replication, by `direction` (`sent` | `received`). Counter.
pub const REPLICATION_ENTRIES_TOTAL: &str = "openclaw_replication_entries_total";
/// Remote entries merged into local state. Counter.
pub const MERGES_TOTAL: &str = "openclaw_merges_total";
/// Peer messages refused (unauthenticated, malformed, too_large, incompatible, clock_ahead), by
/// `reason`. Counter.
pub const PEER_MESSAGES_REJECTED_TOTAL: &str = "openclaw_peer_messages_rejected_total";
/// Connections the peer listener holds now (at most `OPENCLAW_PEER_MAX_CONNECTIONS`). Gauge.
pub const PEER_CONNECTIONS: &str = "openclaw_peer_connections";
/// Attempts to load changed peer mutual-TLS files (`OPENCLAW_PEER_TLS_*`), by `result`
/// (`success` | `failure`: the previous material stays in use). Counter.
pub const PEER_TLS_RELOADS_TOTAL: &str = "openclaw_peer_tls_reloads_total";
/// 0 while changed peer mutual-TLS files cannot be used (the previous certificate stays in use),
/// else 1 (also while mTLS is off). Gauge.
pub const PEER_TLS_LAST_RELOAD_SUCCESSFUL: &str = "openclaw_peer_tls_last_reload_successful";
/// How far `peer`'s clock is ahead of this replica's system clock (negative: behind), seen on
/// its last message: its send time minus the receiving time, so the network delay makes it read
/// low. Gauge.
pub const PEER_CLOCK_OFFSET_SECONDS: &str = "openclaw_peer_clock_offset_seconds";
/// How far this replica's clock runs ahead of its system clock to keep up with the fastest peer
/// within the guard. Gauge.
pub const CLOCK_LEAD_SECONDS: &str = "openclaw_clock_lead_seconds";
/// Peer timestamps refused by the clock guard, by `reason` (`message_ahead`: the whole message;
/// `epoch_ahead`, `incarnation_ahead`: one bucket entry). Counter.
pub const PEER_CLOCK_REFUSED_TOTAL: &str = "openclaw_peer_clock_refused_total";
/// Authenticated peer bucket entries refused because no honest replica sends them, by `reason`
/// (`implausible_consumption`: a component claims more than its owner could have admitted
/// since its incarnation; `too_many_components`). Counter.
pub const PEER_ENTRIES_REFUSED_TOTAL: &str = "openclaw_peer_entries_refused_total";
/// Seconds since the last successful snapshot was written (or restored). Gauge.
pub const SNAPSHOT_AGE_SECONDS: &str = "openclaw_snapshot_age_seconds";
/// Snapshot attempts, by `result` (`success` | `failure`). Counter.
pub const SNAPSHOTS_TOTAL: &str = "openclaw_snapshots_total";
/// Uploads of a snapshot to the off-site store, by `result` (`success` | `failure`). Counter.
pub const SNAPSHOT_UPLOADS_TOTAL: &str = "openclaw_snapshot_uploads_total";
/// Age of the newest snapshot this replica shipped off-site; before the first, seconds since
/// start. Gauge.
pub const SNAPSHOT_REMOTE_AGE_SECONDS: &str = "openclaw_snapshot_remote_age_seconds";
/// Configured seconds between off-site uploads (0: off). Gauge.
pub const SNAPSHOT_REMOTE_INTERVAL_SECONDS: &str = "openclaw_snapshot_remote_interval_seconds";
/// Off-site objects a restore skipped, by `reason` (`too_old`, `checksum`, `unsupported_version`,
/// ...). Counter.
pub const SNAPSHOT_REMOTE_REJECTED_TOTAL: &str = "openclaw_snapshot_remote_rejected_total";

/// Share of a strict `policy` this replica may spend now, 0..1 (0 while its lease has lapsed).
/// Gauge, strict policies only.
pub const STRICT_SHARE: &str = "openclaw_strict_share";
/// Seconds until this replica's strict-mode lease lapses without renewal (0: lapsed). Gauge,
/// exported once a strict policy has been configured.
pub const STRICT_LEASE_REMAINING_SECONDS: &str = "openclaw_strict_lease_remaining_seconds";
/// `strict` loans between replicas, by `role` (`borrower` | `lender`) and `result` (borrower:
/// `granted` one peer lent it all, `pooled` several lent a part each, `dry` the peers together
/// held too little, `failed` some peer did not answer, `evened_out` a background loan evened
/// out the sub-buckets; lender: `lent`, `declined`, `given` a borrower passed on its part of
/// an evening out). Counter.
pub const STRICT_LOANS_TOTAL: &str = "openclaw_strict_loans_total";

/// Envoy's rate limit service: `ShouldRateLimit` calls answered, by `code` (`ok`,
/// `over_limit`, `invalid_argument`, `unauthenticated`). Counter.
pub const RLS_REQUESTS_TOTAL: &str = "openclaw_rls_requests_total";
/// Envoy's rate limit service: request descriptors decided, by `domain`, `rule` and `decision`.
/// Counter; labels come from the configuration only.
pub const RLS_DESCRIPTORS_TOTAL: &str = "openclaw_rls_descriptors_total";
/// Envoy's rate limit service: hits (`hits_addend`) of descriptors of a `detailed_metric` rule,
/// by `domain`, `rule`, descriptor `value` (at most a bounded number per rule) and `decision`.
pub const RLS_DETAILED_HITS_TOTAL: &str = "openclaw_rls_detailed_hits_total";
/// Attempts to load the rate limit configuration (`OPENCLAW_RLS_CONFIG`), by `result`. Counter.
pub const RLS_CONFIG_RELOADS_TOTAL: &str = "openclaw_rls_config_reloads_total";
/// 1 if the last attempt to load the rate limit configuration succeeded, else 0. Gauge.
pub const RLS_CONFIG_LAST_RELOAD_SUCCESSFUL: &str = "openclaw_rls_config_last_reload_successful";
/// Connections the gRPC listener holds now (at most `OPENCLAW_GRPC_MAX_CONNECTIONS`). Gauge.
pub const GRPC_CONNECTIONS: &str = "openclaw_grpc_connections";
/// gRPC connections the listener closed, by `reason` (`per_source`: at accept, unread, its
/// source at `OPENCLAW_GRPC_MAX_CONNECTIONS_PER_SOURCE`; `idle`: nothing moved for
/// `OPENCLAW_GRPC_IDLE_TIMEOUT_S`; `keepalive`: a PING went unanswered). Counter.
pub const GRPC_CONNECTIONS_CLOSED_TOTAL: &str = "openclaw_grpc_connections_closed_total";

/// Every name above, for checks that documents and artifacts mention them all.
pub const ALL: &[&str] = &[
    REQUESTS_TOTAL,
    TOKENS_CONSUMED_TOTAL,
    BUCKET_DEPLETION_TOTAL,
    BAD_REQUESTS_TOTAL,
    HTTP_REQUEST_DURATION_SECONDS,
    ACTIVE_BUCKETS,
    TOKENS_AVAILABLE,
    POLICY_RELOADS_TOTAL,
    POLICY_CONFIG_LAST_RELOAD_SUCCESSFUL,
    BUILD_INFO,
    TOKEN_BUCKET_CAPACITY,
    TOKEN_BUCKET_FILL_RATE,
    TOKEN_BUCKET_CURRENT_USAGE,
    TOKEN_BUCKET_REFILL_DELAY,
    TOKEN_BUCKET_REJECTION_RATE,
    EXTERNAL_REQUESTS_PER_SECOND,
    EXTERNAL_TOKEN_DEPLETION_RATE,
    PEERS,
    REPLICATION_LAG_SECONDS,
    REPLICATION_BYTES_TOTAL,
    REPLICATION_ENTRIES_TOTAL,
    MERGES_TOTAL,
    PEER_MESSAGES_REJECTED_TOTAL,
    PEER_CONNECTIONS,
    PEER_TLS_RELOADS_TOTAL,
    PEER_TLS_LAST_RELOAD_SUCCESSFUL,
    PEER_CLOCK_OFFSET_SECONDS,
    CLOCK_LEAD_SECONDS,
    PEER_CLOCK_REFUSED_TOTAL,
    PEER_ENTRIES_REFUSED_TOTAL,
    SNAPSHOT_AGE_SECONDS,
    SNAPSHOTS_TOTAL,
    SNAPSHOT_UPLOADS_TOTAL,
    SNAPSHOT_REMOTE_AGE_SECONDS,
    SNAPSHOT_REMOTE_INTERVAL_SECONDS,
    SNAPSHOT_REMOTE_REJECTED_TOTAL,
    STRICT_SHARE,
    STRICT_LEASE_REMAINING_SECONDS,
    STRICT_LOANS_TOTAL,
    RLS_REQUESTS_TOTAL,
    RLS_DESCRIPTORS_TOTAL,
    RLS_DETAILED_HITS_TOTAL,
    RLS_CONFIG_RELOADS_TOTAL,
    RLS_CONFIG_LAST_RELOAD_SUCCESSFUL,
    GRPC_CONNECTIONS,
    GRPC_CONNECTIONS_CLOSED_TOTAL,
];

#[cfg(test)]
mod tests {
    #[test]
    fn every_series_is_documented() {
        let doc = include_str!("../../docs/metrics.md");
        for name in super::ALL {
            assert!(
                doc.contains(&format!("`{name}`")),
                "docs/metrics.md does not describe {name}"
            );
        }
    }
}
