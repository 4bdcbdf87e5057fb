//! Sending one decision request: pick the key and target, `GET /rate` (or a `ShouldRateLimit`
//! call, [`crate::rls`]), classify the answer, and fail over to the next live target when one
//! refuses connections.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use crate::endpoints::{Endpoints, MAX_TARGETS};
use crate::plan::{Api, Keys, Plan, Spread};
use crate::record::{ErrorKind, Outcome, Recorder};
use crate::rls::Connections;

/// How long a target that refused a connection is skipped when failover is on.
pub const FAILOVER_PAUSE: Duration = Duration::from_secs(1);

/// Everything needed to send requests; shared by every task of a run.
#[derive(Debug)]
pub(crate) struct Sender {
    client: Client<HttpConnector, Empty<Bytes>>,
    /// `ShouldRateLimit` instead of `/rate`.
    rls: Option<Connections>,
    /// Where requests go (fixed, or following a Service's ready endpoints).
    endpoints: Endpoints,
    /// Per target number: nanoseconds since the start before which it is skipped (failover).
    down_until_ns: Vec<AtomicU64>,
    /// `&policy=..&cost=..`, or empty.
    suffix: String,
    auth: Option<HeaderValue>,
    keys: Keys,
    seed: u64,
    spread: Spread,
    failover: bool,
    timeout: Duration,
    start: Instant,
}

impl Sender {
    /// `endpoints` holds the plan's validated, normalised target URLs, or changes during the run.
    pub(crate) fn new(plan: &Plan, endpoints: Endpoints, start: Instant) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(plan.request_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        let mut suffix = String::new();
        if let Some(policy) = &plan.policy {
            suffix.push_str("&policy=");
            suffix.push_str(policy);
        }
        if plan.cost != 1 {
            suffix.push_str(&format!("&cost={}", plan.cost));
        }
        let auth = plan.api_key.as_ref().map(|key| {
            let mut value =
                HeaderValue::try_from(format!("Bearer {key}")).expect("validated API key");
            value.set_sensitive(true);
            value
        });
        Self {
            client,
            rls: match &plan.api {
                Api::Rate => None,
                Api::Rls(call) => {
                    let hits = u32::try_from(plan.cost).expect("validated: RLS hits fit in u32");
                    Some(Connections::new(call.clone(), hits, auth.clone()))
                }
            },
            endpoints,
            down_until_ns: (0..MAX_TARGETS).map(|_| AtomicU64::new(0)).collect(),
            suffix,
            auth,
            keys: plan.keys,
            seed: plan.seed,
            spread: plan.spread,
            failover: plan.failover,
            timeout: plan.request_timeout,
            start,
        }
    }

    /// Sends request `seq` (due at `due` since the start, i.e. at `intended`) and records it;
    /// `open_loop` also records how late it leaves. `lane` picks the HTTP/2 connection of an
    /// RLS call (a closed-loop worker's number, so that each keeps to one connection).
    pub(crate) async fn request(
        &self,
        recorder: &Recorder,
        seq: u64,
        lane: u64,
        due: Duration,
        intended: Instant,
        open_loop: bool,
    ) {
        if open_loop {
            recorder.lag(seq, intended.elapsed());
        }
        let mut key = String::with_capacity(16);
        if self.rls.as_ref().is_none_or(Connections::needs_key) {
            self.keys.key_for(self.seed, seq, &mut key);
        }
        let targets = self.endpoints.view();
        let n = targets.len();
        if n == 0 {
            // No endpoint at all: what connecting to a Service without ready pods gives.
            recorder.finished(seq, due, 0, Outcome::Error(ErrorKind::Connect), None);
            tokio::task::yield_now().await;
            return;
        }
        let first = match self.spread {
            Spread::RoundRobin => (seq % n as u64) as usize,
            Spread::One(i) => i % n,
        };
        let mut last = targets[first].0;
        for attempt in 0..n {
            let (t, base) = &targets[failover_order(first, n, seq, attempt)];
            let t = *t;
            if self.failover && self.is_down(t) {
                recorder.failed_over(t);
                continue;
            }
            last = t;
            let outcome = self.try_once(t, base, lane, &key).await;
            if self.failover && outcome == Outcome::Error(ErrorKind::Connect) {
                let until = self.start.elapsed() + FAILOVER_PAUSE;
                self.down_until_ns[t].fetch_max(until.as_nanos() as u64, Relaxed);
                recorder.failed_over(t);
                continue;
            }
            let answered = matches!(
                outcome,
                Outcome::Allowed
                    | Outcome::Rejected
                    | Outcome::Error(
                        ErrorKind::Status(_) | ErrorKind::Grpc(_) | ErrorKind::Malformed
                    )
            );
            let latency = answered.then(|| intended.elapsed());
            recorder.finished(seq, due, t, outcome, latency);
            return;
        }
        // Every target refused (or is still paused after refusing).
        recorder.finished(seq, due, last, Outcome::Error(ErrorKind::Connect), None);
        // Nothing above may have awaited (every target paused): let a closed-loop worker's
        // neighbours run rather than spin on this thread.
        tokio::task::yield_now().await;
    }

    fn is_down(&self, target: usize) -> bool {
        let until = self.down_until_ns[target].load(Relaxed);
        until != 0 && (self.start.elapsed().as_nanos() as u64) < until
    }

    /// One attempt on target number `t` (at `base`), bounded by the request timeout.
    async fn try_once(&self, t: usize, base: &str, lane: u64, key: &str) -> Outcome {
        let exchange = async {
            match &self.rls {
                Some(rls) => rls.call(t, base, lane, key).await,
                None => self.rate(base, key).await,
            }
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or(Outcome::Error(ErrorKind::Timeout))
    }

    /// `GET /rate?key=..` over the pooled HTTP/1.1 client.
    async fn rate(&self, base: &str, key: &str) -> Outcome {
        const PATH: &str = "/rate?key=";
        let mut uri =
            String::with_capacity(base.len() + PATH.len() + key.len() + self.suffix.len());
        uri.push_str(base);
        uri.push_str(PATH);
        uri.push_str(key);
        uri.push_str(&self.suffix);
        let mut request = Request::get(uri);
        if let Some(auth) = &self.auth {
            request = request.header(header::AUTHORIZATION, auth.clone());
        }
        let Ok(request) = request.body(Empty::new()) else {
            return Outcome::Error(ErrorKind::Transport);
        };
        let response = match self.client.request(request).await {
            Ok(response) => response,
            Err(e) if e.is_connect() => return Outcome::Error(ErrorKind::Connect),
            Err(_) => return Outcome::Error(ErrorKind::Transport),
        };
        let status = response.status();
        // Read the body to the end so the connection goes back to the pool.
        if response.into_body().collect().await.is_err() {
            return Outcome::Error(ErrorKind::Transport);
        }
        match status {
            StatusCode::OK => Outcome::Allowed,
            StatusCode::TOO_MANY_REQUESTS => Outcome::Rejected,
            other => Outcome::Error(ErrorKind::Status(other.as_u16())),
        }
    }
}

/// The target of `attempt` (0 = the planned one) for request `seq` whose planned target is
/// `first` of `n`. Later attempts visit every other target once, starting at a different one
/// for consecutive requests of the same planned target: the requests of a dead target spread
/// evenly over the live ones, as a Service spreads them over the ready pods that remain, rather
/// than all landing on its neighbour.
fn failover_order(first: usize, n: usize, seq: u64, attempt: usize) -> usize {
    if attempt == 0 || n < 2 {
        return (first + attempt) % n.max(1);
    }
    let others = n - 1;
    let rotation = ((seq / n as u64) % others as u64) as usize;
    (first + 1 + (rotation + attempt - 1) % others) % n
}

#[cfg(test)]
mod tests {
    use super::failover_order;

    #[test]
    fn the_requests_of_a_dead_target_spread_evenly_over_the_others() {
        // Four targets, round robin, target 1 dead: its requests 1, 5, 9, ... go to 2, 3, 0 in
        // turn on their second attempt.
        let second: Vec<usize> = (0..6u64)
            .map(|k| failover_order(1, 4, 1 + 4 * k, 1))
            .collect();
        assert_eq!(second, vec![2, 3, 0, 2, 3, 0]);
    }

    #[test]
    fn every_request_tries_each_target_exactly_once() {
        for n in 1..6 {
            for seq in 0..40u64 {
                let first = (seq % n as u64) as usize;
                let mut seen: Vec<usize> =
                    (0..n).map(|a| failover_order(first, n, seq, a)).collect();
                assert_eq!(seen[0], first);
                seen.sort_unstable();
                assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n={n} seq={seq}");
            }
        }
    }
}
