//! What a run does: targets, how load is driven, which keys, how it is spread, and its bounds.
//! Validation lists every problem at once, and refuses any target that is not loopback.

use std::net::IpAddr;
use std::time::Duration;

use crate::endpoints::Endpoints;
use crate::profile::RateProfile;
use crate::rls::RlsCall;
use crate::{Error, Result};

/// The longest run allowed: the per-second timeline is allocated up front.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Number of distinct cold keys behind [`Keys::Hot`] (`key-0` .. `key-999999`).
pub const COLD_KEYS: u64 = 1_000_000;

/// One load run. Build it with struct update syntax over [`Plan::default`], so fields added
/// later keep callers compiling:
///
/// ```
/// use std::time::Duration;
/// use openclaw_loadgen::{Drive, Plan, RateProfile};
/// let plan = Plan {
///     targets: vec!["http://127.0.0.1:8080".into()],
///     drive: Drive::OpenLoop(RateProfile::Constant(500.0)),
///     duration: Duration::from_secs(10),
///     ..Plan::default()
/// };
/// assert!(plan.validate().is_ok());
/// ```
#[derive(Clone)]
pub struct Plan {
    /// Base URLs of limiter APIs (`http://127.0.0.1:41234`). Loopback only: anything else is
    /// refused, so a typo cannot load someone else's service.
    pub targets: Vec<String>,
    /// What each request asks: `/rate` (the default) or Envoy's `ShouldRateLimit`.
    pub api: Api,
    pub drive: Drive,
    pub keys: Keys,
    pub spread: Spread,
    /// `?policy=`; `None` leaves the limiter's default. `/rate` only: for RLS the rules choose.
    pub policy: Option<String>,
    /// `?cost=` (RLS: `hits_addend`); 1 (the limiter's default) is not sent.
    pub cost: u64,
    /// Sent as `Authorization: Bearer ...` (the limiter's `OPENCLAW_API_KEY`).
    pub api_key: Option<String>,
    /// Hard bound on the sending time.
    pub duration: Duration,
    /// Hard bound on the number of requests sent.
    pub max_requests: Option<u64>,
    /// A target refusing connections is skipped for [`FAILOVER_PAUSE`](crate::FAILOVER_PAUSE)
    /// and the request goes to the next live target, as a Service drops a dead pod. Off: the
    /// refusal is counted as an error.
    pub failover: bool,
    /// A request not answered within this is an error (`timeout`).
    pub request_timeout: Duration,
    /// Open loop: requests in flight at most; a request due while this many are outstanding is
    /// not sent and counted as `missed`.
    pub max_in_flight: usize,
    /// How often `on_progress` is called.
    pub progress_interval: Duration,
    /// Seeds the key choice, so two runs with the same seed ask for the same keys in order.
    pub seed: u64,
    /// Targets that change during the run (a Service's ready endpoints), instead of `targets`
    /// (which must then be empty); round-robin over those listed when each request leaves.
    pub endpoints: Option<Endpoints>,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("targets", &self.targets)
            .field("api", &self.api)
            .field("drive", &self.drive)
            .field("keys", &self.keys)
            .field("spread", &self.spread)
            .field("policy", &self.policy)
            .field("cost", &self.cost)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("duration", &self.duration)
            .field("max_requests", &self.max_requests)
            .field("failover", &self.failover)
            .field("request_timeout", &self.request_timeout)
            .field("max_in_flight", &self.max_in_flight)
            .field("progress_interval", &self.progress_interval)
            .field("seed", &self.seed)
            .field(
                "endpoints",
                &self.endpoints.as_ref().map(Endpoints::current),
            )
            .finish()
    }
}

impl Default for Plan {
    fn default() -> Self {
        Self {
            targets: Vec::new(),
            api: Api::Rate,
            drive: Drive::ClosedLoop { connections: 1 },
            keys: Keys::Many { count: 10_000 },
            spread: Spread::RoundRobin,
            policy: None,
            cost: 1,
            api_key: None,
            duration: Duration::from_secs(10),
            max_requests: None,
            failover: false,
            request_timeout: Duration::from_secs(2),
            max_in_flight: 4096,
            progress_interval: Duration::from_secs(1),
            seed: 0x0C1A_3000_5EED,
            endpoints: None,
        }
    }
}

/// What each request asks the targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Api {
    /// `GET /rate?key=..` over HTTP/1.1 (keep-alive connections, one request at a time on each):
    /// 200 is allowed, 429 refused.
    Rate,
    /// Envoy's rate limit service on the limiter's gRPC listener: unary `ShouldRateLimit` over
    /// h2c, many calls at once on each connection. OK is allowed, OVER_LIMIT refused.
    Rls(RlsCall),
}

/// How requests are paced.
#[derive(Debug, Clone, PartialEq)]
pub enum Drive {
    /// Sent on the profile's clock whether or not earlier answers came back; latency is
    /// measured from when each request was due, so a slow server cannot hide its queueing
    /// (no coordinated omission).
    OpenLoop(RateProfile),
    /// `connections` workers, each sending its next request when the previous one is answered:
    /// that many requests outstanding. Over HTTP/1.1 each holds a connection of its own; over
    /// HTTP/2 ([`Api::Rls`]) they share [`RlsCall::connections`] as concurrent streams.
    ClosedLoop { connections: usize },
}

/// Which client keys the requests name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Keys {
    /// Uniform over `key-0` .. `key-{count-1}`.
    Many { count: u64 },
    /// A `share` (0..=1) of requests uniform over `hot-0` .. `hot-{count-1}`, the rest uniform
    /// over [`COLD_KEYS`] cold keys `key-N`.
    Hot { count: u32, share: f64 },
}

impl Keys {
    /// `many:COUNT` or `hot:COUNT[:SHARE]` (share defaults to 0.9), e.g. `many:10000`, `hot:4`,
    /// `hot:1:1.0`.
    pub fn parse(s: &str) -> Result<Self> {
        let invalid = |reason: &str| Error::InvalidKeys {
            input: s.to_owned(),
            reason: reason.to_owned(),
        };
        let keys = match s.trim().split(':').collect::<Vec<_>>().as_slice() {
            ["many", count] => Keys::Many {
                count: count
                    .trim()
                    .parse()
                    .map_err(|_| invalid("COUNT must be a whole number"))?,
            },
            ["hot", count] | ["hot", count, _] => {
                let share = match s.trim().split(':').nth(2) {
                    None => 0.9,
                    Some(share) => share
                        .trim()
                        .parse()
                        .map_err(|_| invalid("SHARE must be a number from 0 to 1"))?,
                };
                Keys::Hot {
                    count: count
                        .trim()
                        .parse()
                        .map_err(|_| invalid("COUNT must be a whole number"))?,
                    share,
                }
            }
            _ => return Err(invalid("expected many:COUNT or hot:COUNT[:SHARE]")),
        };
        keys.validate().map_err(|e| invalid(&e))?;
        Ok(keys)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        match *self {
            Keys::Many { count: 0 } | Keys::Hot { count: 0, .. } => {
                Err("COUNT must be at least 1".into())
            }
            Keys::Hot { share, .. } if !(0.0..=1.0).contains(&share) => {
                Err(format!("SHARE {share} must be from 0 to 1"))
            }
            _ => Ok(()),
        }
    }

    /// The key of request `seq`, chosen by a hash of (`seed`, `seq`): no shared random state
    /// between the tasks sending requests.
    pub fn key_for(&self, seed: u64, seq: u64, out: &mut String) {
        use std::fmt::Write;
        let r = splitmix64(seed ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        out.clear();
        match *self {
            Keys::Many { count } => {
                let _ = write!(out, "key-{}", r % count);
            }
            Keys::Hot { count, share } => {
                // The top 53 bits decide hot or cold, the low bits pick the key.
                let u = (r >> 11) as f64 / (1u64 << 53) as f64;
                let pick = splitmix64(r);
                if u < share {
                    let _ = write!(out, "hot-{}", pick % u64::from(count));
                } else {
                    let _ = write!(out, "key-{}", pick % COLD_KEYS);
                }
            }
        }
    }
}

/// How requests are spread over the targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spread {
    /// Request n goes to target n mod (number of targets).
    RoundRobin,
    /// Every request goes to the target at this index (others only take over on failover).
    One(usize),
}

impl Spread {
    /// `round-robin` (or `rr`) or `one:INDEX`.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        match s {
            "round-robin" | "rr" => Ok(Spread::RoundRobin),
            _ => s
                .strip_prefix("one:")
                .and_then(|i| i.trim().parse().ok())
                .map(Spread::One)
                .ok_or_else(|| Error::InvalidSpread {
                    input: s.to_owned(),
                    reason: "expected round-robin or one:INDEX (0 is the first target)".into(),
                }),
        }
    }
}

impl Plan {
    /// Every problem with the plan, or the targets' normalised base URLs (none with
    /// [`Plan::endpoints`]).
    pub fn validate(&self) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        let mut bases = Vec::new();
        match (&self.endpoints, self.targets.is_empty()) {
            (None, true) => problems.push("no target: give at least one limiter URL".to_owned()),
            (Some(_), false) => problems.push(
                "give targets or endpoints, not both (endpoints change, targets do not)".into(),
            ),
            (Some(_), true) if self.spread != Spread::RoundRobin => {
                problems.push("changing endpoints are spread round-robin: no one:INDEX".to_owned())
            }
            _ => {}
        }
        for target in &self.targets {
            match loopback_base(target) {
                Ok(base) => bases.push(base),
                Err(e) => problems.push(e),
            }
        }
        if let Spread::One(i) = self.spread
            && !self.targets.is_empty()
            && i >= self.targets.len()
        {
            let n = self.targets.len();
            problems.push(format!(
                "spread one:{i}: there {} only {n} target{} (the first is one:0)",
                if n == 1 { "is" } else { "are" },
                if n == 1 { "" } else { "s" },
            ));
        }
        match &self.drive {
            Drive::OpenLoop(profile) => {
                if let Err(e) = profile.validate() {
                    problems.push(format!("rate profile: {e}"));
                }
            }
            Drive::ClosedLoop { connections } => {
                if !(1..=10_000).contains(connections) {
                    problems.push(format!("connections must be 1 to 10000, got {connections}"));
                }
            }
        }
        if let Err(e) = self.keys.validate() {
            problems.push(format!("keys: {e}"));
        }
        if let Api::Rls(call) = &self.api {
            problems.extend(call.problems());
            if self.policy.is_some() {
                problems.push(
                    "a policy is for /rate only: ShouldRateLimit's rules choose the limit".into(),
                );
            }
            if self.cost > u64::from(u32::MAX) {
                problems.push(format!(
                    "cost {} is more hits than ShouldRateLimit carries (at most {})",
                    self.cost,
                    u32::MAX
                ));
            }
        }
        if let Some(policy) = &self.policy
            && (policy.is_empty()
                || policy.len() > 63
                || !policy
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)))
        {
            problems.push(format!(
                "policy `{policy}` must be 1 to 63 of A-Z a-z 0-9 - _ ."
            ));
        }
        if self.cost == 0 {
            problems.push("cost must be at least 1".to_owned());
        }
        if let Some(key) = &self.api_key
            && http::HeaderValue::try_from(format!("Bearer {key}")).is_err()
        {
            problems.push("the API key must be visible ASCII".to_owned());
        }
        if self.duration.is_zero() || self.duration > MAX_DURATION {
            problems.push(format!(
                "duration must be longer than 0 s and at most 24 h, got {:?}",
                self.duration
            ));
        }
        if self.max_requests == Some(0) {
            problems.push("max requests must be at least 1".to_owned());
        }
        if self.request_timeout.is_zero() {
            problems.push("request timeout must be longer than 0 s".to_owned());
        }
        if !(1..=1 << 20).contains(&self.max_in_flight) {
            problems.push(format!(
                "max in flight must be 1 to {}, got {}",
                1 << 20,
                self.max_in_flight
            ));
        }
        if self.progress_interval < Duration::from_millis(10) {
            problems.push("progress interval must be at least 10 ms".to_owned());
        }
        if problems.is_empty() {
            Ok(bases)
        } else {
            Err(Error::InvalidPlan(problems))
        }
    }
}

/// `http://127.0.0.1:41234[/]` -> `http://127.0.0.1:41234`; refuses other schemes, paths,
/// queries, and any host that is not a loopback address or `localhost` (no name is resolved).
pub fn loopback_base(target: &str) -> std::result::Result<String, String> {
    let uri: http::Uri = target
        .trim()
        .parse()
        .map_err(|e| format!("target `{target}` is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(format!(
                "target `{target}`: scheme `{other}` is not supported (plain http to loopback only)"
            ));
        }
        None => {
            return Err(format!(
                "target `{target}` has no scheme: write http://127.0.0.1:PORT"
            ));
        }
    }
    let host = uri
        .host()
        .ok_or_else(|| format!("target `{target}` has no host"))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return Err(format!(
            "target `{target}`: host `{host}` is not loopback; this generator only sends to \
             127.0.0.0/8, ::1 or localhost"
        ));
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(format!(
            "target `{target}`: give the base URL without a path (it sends to /rate, or to the \
             RLS method)"
        ));
    }
    if uri.query().is_some() {
        return Err(format!("target `{target}`: no query string, please"));
    }
    let port = uri.port_u16().unwrap_or(80);
    Ok(format!("http://{host}:{port}"))
}

/// A fast, well-mixed 64-bit hash (the SplitMix64 finaliser).
pub(crate) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_targets_are_normalised_and_others_refused() {
        assert_eq!(
            loopback_base("http://127.0.0.1:41234/").unwrap(),
            "http://127.0.0.1:41234"
        );
        assert_eq!(
            loopback_base("http://127.3.2.1").unwrap(),
            "http://127.3.2.1:80"
        );
        assert_eq!(loopback_base("http://[::1]:9").unwrap(), "http://[::1]:9");
        assert_eq!(
            loopback_base("http://localhost:8080").unwrap(),
            "http://localhost:8080"
        );
        for (bad, why) in [
            ("http://10.0.0.1:8080", "not loopback"),
            ("http://example.com", "not loopback"),
            ("http://127.0.0.1.nip.io", "not loopback"),
            ("http://[::2]:80", "not loopback"),
            ("https://127.0.0.1:443", "scheme `https`"),
            ("127.0.0.1:8080", "no scheme"),
            ("http://127.0.0.1:1/rate", "without a path"),
            ("http://127.0.0.1:1/?key=a", "no query"),
            ("not a url", "not a URL"),
        ] {
            let err = loopback_base(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn a_plan_lists_every_problem() {
        let plan = Plan {
            targets: vec!["http://10.1.2.3:80".into(), "ftp://127.0.0.1".into()],
            drive: Drive::ClosedLoop { connections: 0 },
            keys: Keys::Hot {
                count: 2,
                share: 1.5,
            },
            spread: Spread::One(2),
            policy: Some("bad policy".into()),
            cost: 0,
            duration: Duration::ZERO,
            max_requests: Some(0),
            ..Plan::default()
        };
        let Err(Error::InvalidPlan(problems)) = plan.validate() else {
            panic!("accepted");
        };
        let all = problems.join("\n");
        for expected in [
            "not loopback",
            "scheme `ftp`",
            "one:2",
            "connections",
            "SHARE 1.5",
            "policy `bad policy`",
            "cost",
            "duration",
            "max requests",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
        assert_eq!(problems.len(), 9, "{all}");
    }

    #[test]
    fn debug_output_does_not_show_the_api_key() {
        let plan = Plan {
            api_key: Some("s3cret-token".into()),
            ..Plan::default()
        };
        let shown = format!("{plan:?}");
        assert!(
            !shown.contains("s3cret") && shown.contains("<redacted>"),
            "{shown}"
        );
    }

    #[test]
    fn keys_and_spread_parse_and_refuse_nonsense() {
        assert_eq!(
            Keys::parse("many:10000").unwrap(),
            Keys::Many { count: 10000 }
        );
        assert_eq!(
            Keys::parse("hot:4").unwrap(),
            Keys::Hot {
                count: 4,
                share: 0.9
            }
        );
        assert_eq!(
            Keys::parse("hot:1:1").unwrap(),
            Keys::Hot {
                count: 1,
                share: 1.0
            }
        );
        for bad in [
            "",
            "many",
            "many:0",
            "many:x",
            "hot:2:1.5",
            "hot:2:x",
            "cold:3",
            "hot:1:1:1",
        ] {
            assert!(Keys::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Spread::parse("round-robin").unwrap(), Spread::RoundRobin);
        assert_eq!(Spread::parse("one:2").unwrap(), Spread::One(2));
        for bad in ["", "one", "one:-1", "random"] {
            assert!(Spread::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hot_keys_get_their_share_and_many_keys_spread_uniformly() {
        let mut key = String::new();
        let hot = Keys::Hot {
            count: 4,
            share: 0.75,
        };
        let mut hot_hits = [0u32; 4];
        let mut cold = 0;
        for seq in 0..40_000 {
            hot.key_for(7, seq, &mut key);
            match key.strip_prefix("hot-") {
                Some(i) => hot_hits[i.parse::<usize>().unwrap()] += 1,
                None => cold += 1,
            }
        }
        assert!((cold as f64 / 40_000.0 - 0.25).abs() < 0.01, "{cold}");
        for hits in hot_hits {
            assert!((hits as f64 / 30_000.0 - 0.25).abs() < 0.02, "{hot_hits:?}");
        }
        let many = Keys::Many { count: 10 };
        let mut seen = std::collections::HashSet::new();
        for seq in 0..1000 {
            many.key_for(7, seq, &mut key);
            seen.insert(key.clone());
        }
        assert_eq!(seen.len(), 10);
    }
}
