//! Replicated `openclaw-limiter` processes on 127.0.0.1: convergence, kill -9 and restart under
//! load, partition and heal, snapshots across SIGTERM, corrupt snapshots, peer authentication.
//!
//! Every directed replication link `i -> j` goes through its own [`Proxy`], bound before any
//! replica starts: replica `i` is given the addresses of its links as `OPENCLAW_PEERS`, and each
//! link is pointed at replica `j`'s real peer port once `j` prints it. The proxies are also the
//! fault injector (a partition closes a link's connections and refuses new ones). A restarted
//! replica keeps its links; only their target changes.
//!
//! Small buckets, 10 ms sync intervals and long refill intervals keep the tests short and the
//! arithmetic exact: with a refill interval of an hour, a 100-token bucket refills one token
//! every 36 s, so within a test the level is the capacity minus what was spent.
//! Run `cargo build --workspace --bins` first: the tests start the real binary.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use openclaw_e2e::proxy::Proxy;
use openclaw_e2e::{Service, host_port, http_client, wait_until};
use reqwest::blocking::Client;
use serde_json::Value;

const START: Duration = Duration::from_secs(20);
const SETTLE: Duration = Duration::from_secs(10);
const SECRET: &str = "e2e-cluster-secret-0123456789";
/// One hour: 100 tokens refill at one token per 36 s, so nothing refills within a test.
const HOUR_MS: u64 = 3_600_000;

#[derive(Debug, Clone, Copy)]
struct Settings {
    capacity: u64,
    refill_interval_ms: u64,
    sync_interval_ms: u64,
    anti_entropy_interval_ms: u64,
    ready_max_wait_ms: u64,
}

impl Settings {
    fn envs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("BUCKET_CAPACITY", self.capacity.to_string()),
            ("REFILL_INTERVAL_MS", self.refill_interval_ms.to_string()),
            (
                "OPENCLAW_SYNC_INTERVAL_MS",
                self.sync_interval_ms.to_string(),
            ),
            (
                "OPENCLAW_ANTI_ENTROPY_INTERVAL_MS",
                self.anti_entropy_interval_ms.to_string(),
            ),
            (
                "OPENCLAW_READY_MAX_WAIT_MS",
                self.ready_max_wait_ms.to_string(),
            ),
            ("OPENCLAW_SHUTDOWN_GRACE_S", "2".to_owned()),
        ]
    }

    /// Tokens refilled per second.
    fn rate(&self) -> f64 {
        self.capacity as f64 * 1000.0 / self.refill_interval_ms as f64
    }
}

/// `n` replica slots, each link `from -> to` behind its own proxy. Replicas start on demand.
#[derive(Debug)]
struct Cluster {
    settings: Settings,
    /// `links[from][to]`; `None` on the diagonal.
    links: Vec<Vec<Option<Proxy>>>,
    replicas: Vec<Option<Service>>,
    http: Client,
}

impl Cluster {
    fn new(n: usize, settings: Settings) -> Cluster {
        let links = (0..n)
            .map(|from| (0..n).map(|to| (from != to).then(Proxy::start)).collect())
            .collect();
        Cluster {
            settings,
            links,
            replicas: (0..n).map(|_| None).collect(),
            http: http_client(),
        }
    }

    /// Starts every replica in order and waits until all are ready.
    fn start(n: usize, settings: Settings) -> Cluster {
        let mut cluster = Cluster::new(n, settings);
        for i in 0..n {
            cluster.spawn(i);
        }
        for i in 0..n {
            cluster.wait_ready(i);
        }
        cluster
    }

    fn link(&self, from: usize, to: usize) -> &Proxy {
        self.links[from][to].as_ref().expect("no link to itself")
    }

    /// Starts (or restarts) replica `i` and points every link to it at its peer listener.
    fn spawn(&mut self, i: usize) {
        let peers: Vec<String> = (0..self.links.len())
            .filter(|&j| j != i)
            .map(|j| self.link(i, j).addr().to_string())
            .collect();
        let mut envs = self.settings.envs();
        envs.push(("OPENCLAW_NODE_ID", format!("replica-{i}")));
        envs.push(("OPENCLAW_PEERS", peers.join(",")));
        envs.push(("OPENCLAW_PEER_SECRET", SECRET.to_owned()));
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let service = Service::spawn(
            "openclaw-limiter",
            &["--listen", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0"],
            &envs,
            START,
        );
        let peer: SocketAddr = host_port(service.url_of("peer").expect("a `listening peer=` line"))
            .parse()
            .expect("peer address");
        for from in (0..self.links.len()).filter(|&j| j != i) {
            self.link(from, i).set_target(peer);
        }
        self.replicas[i] = Some(service);
    }

    fn replica(&self, i: usize) -> &Service {
        self.replicas[i].as_ref().expect("replica is running")
    }

    fn api(&self, i: usize) -> String {
        self.replica(i).url.clone()
    }

    fn wait_ready(&self, i: usize) {
        let url = format!("{}/ready", self.api(i));
        wait_until(START, &format!("replica-{i} to be ready"), || {
            self.http
                .get(&url)
                .send()
                .ok()
                .filter(|r| r.status() == 200)
                .map(|_| ())
        });
    }

    /// kill -9: no final push, no snapshot.
    fn kill(&mut self, i: usize) {
        if let Some(mut service) = self.replicas[i].take() {
            service.process.kill();
        }
    }

    /// Cut every link between `a` and `b`, both directions.
    fn partition(&self, a: &[usize], b: &[usize]) {
        for &i in a {
            for &j in b {
                self.link(i, j).partition();
                self.link(j, i).partition();
            }
        }
    }

    fn heal(&self) {
        self.links.iter().flatten().flatten().for_each(Proxy::heal);
    }

    fn spend(&self, i: usize, key: &str, cost: u64) -> u16 {
        spend(&self.http, &self.api(i), key, cost)
    }

    fn bucket(&self, i: usize, key: &str) -> Bucket {
        bucket(&self.http, &self.api(i), key)
    }

    fn status(&self, i: usize) -> Value {
        get_json(&self.http, &format!("{}/status", self.api(i)))
    }
}

/// `GET /rate?key=&cost=`: the status code.
fn spend(http: &Client, api: &str, key: &str, cost: u64) -> u16 {
    http.get(format!("{api}/rate"))
        .query(&[("key", key), ("cost", &cost.to_string())])
        .send()
        .expect("/rate answers")
        .status()
        .as_u16()
}

/// One bucket as `/status?key=` shows it, peeked without spending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bucket {
    remaining: u64,
    reset_after_ms: u64,
    held_in_memory: bool,
}

fn bucket(http: &Client, api: &str, key: &str) -> Bucket {
    let status = http
        .get(format!("{api}/status"))
        .query(&[("key", key)])
        .send()
        .expect("/status answers")
        .json::<Value>()
        .expect("/status is JSON");
    let b = &status["bucket"];
    Bucket {
        remaining: b["remaining"].as_u64().expect("remaining"),
        reset_after_ms: b["reset_after_ms"].as_u64().expect("reset_after_ms"),
        held_in_memory: b["held_in_memory"].as_bool().expect("held_in_memory"),
    }
}

fn get_json(http: &Client, url: &str) -> Value {
    http.get(url)
        .send()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .json()
        .unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
}

/// The value of one series (`name{labels}` exactly as exported) in `/metrics`.
fn metric(http: &Client, api: &str, series: &str) -> Option<f64> {
    let text = http
        .get(format!("{api}/metrics"))
        .send()
        .ok()?
        .text()
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The outbound peer entry for link address `address` in a `/status` body.
fn peer_entry(status: &Value, address: SocketAddr) -> Option<&Value> {
    status["peers"]
        .as_array()?
        .iter()
        .find(|p| p["address"] == address.to_string())
}

fn peer_up(status: &Value, address: SocketAddr) -> Option<bool> {
    peer_entry(status, address)?["up"].as_bool()
}

#[test]
fn three_replicas_converge_after_traffic_to_one_of_them() {
    // Anti-entropy once a minute (its first round is at start-up, before any traffic): the
    // convergence below can only come from delta pushes.
    let cluster = Cluster::start(
        3,
        Settings {
            capacity: 100,
            refill_interval_ms: HOUR_MS,
            sync_interval_ms: 10,
            anti_entropy_interval_ms: 60_000,
            ready_max_wait_ms: 5_000,
        },
    );
    let key = "converge";
    for _ in 0..3 {
        assert_eq!(cluster.spend(0, key, 10), 200);
    }
    let spent_at = Instant::now();
    assert_eq!(cluster.bucket(0, key).remaining, 70);
    for i in [1, 2] {
        let seen = wait_until(
            Duration::from_secs(5),
            &format!("replica-{i} to see the 30 tokens spent at replica-0"),
            || {
                let b = cluster.bucket(i, key);
                (b.remaining == 70).then_some(b)
            },
        );
        assert!(seen.held_in_memory, "{seen:?}");
    }
    eprintln!(
        "converged on 3 replicas {:?} after the last spend (polled every 50 ms)",
        spent_at.elapsed()
    );
    // Identical views: the same level to the microsecond (same epoch, same components).
    let views: Vec<Bucket> = (0..3).map(|i| cluster.bucket(i, key)).collect();
    assert!(
        views.iter().all(|b| b.remaining == 70),
        "replicas disagree: {views:?}"
    );
    // Each one decides from the merged view: the other 70 spent at replica-1 empty it for all.
    assert_eq!(cluster.spend(1, key, 70), 200);
    wait_until(
        Duration::from_secs(5),
        "the bucket to be empty everywhere",
        || {
            (0..3)
                .all(|i| cluster.bucket(i, key).remaining == 0)
                .then_some(())
        },
    );
    for i in 0..3 {
        assert_eq!(cluster.spend(i, key, 1), 429, "replica-{i} over-admits");
    }
    // Replicas of one build send each other binary deltas (docs/crdt.md, "The wire format"):
    // each says in /status that its peers read version 4.
    for i in 0..3 {
        let status = cluster.status(i);
        for j in (0..3).filter(|&j| j != i) {
            let peer = peer_entry(&status, cluster.link(i, j).addr());
            let version = peer.and_then(|p| p["reads_version"].as_u64());
            assert_eq!(version, Some(4), "replica-{i} on replica-{j}: {peer:?}");
        }
    }
}

/// One request of the load loop.
#[derive(Debug, Clone, Copy)]
struct Shot {
    /// When the answer came, since the load started.
    at: Duration,
    replica: usize,
    /// `Some(status)`, or `None` when the request failed (connection refused or reset).
    status: Option<u16>,
}

/// A bounded, paced load loop on its own thread: `GET /rate?key=` round-robin over the replicas
/// currently routable. Stopped and joined on drop (also when the test panics).
#[derive(Debug)]
struct Load {
    routes: Arc<Mutex<Vec<Option<String>>>>,
    stop: Arc<AtomicBool>,
    admitted: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
    started: Instant,
    thread: Option<JoinHandle<Vec<Shot>>>,
}

impl Load {
    fn start(routes: Vec<Option<String>>, key: &str, per_second: f64, at_most: Duration) -> Load {
        let routes = Arc::new(Mutex::new(routes));
        let stop = Arc::new(AtomicBool::new(false));
        let admitted = Arc::new(AtomicU64::new(0));
        let sent = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let thread = {
            let (routes, stop, admitted, sent) =
                (routes.clone(), stop.clone(), admitted.clone(), sent.clone());
            let key = key.to_owned();
            std::thread::spawn(move || {
                let http = Client::builder()
                    .no_proxy()
                    .timeout(Duration::from_secs(2))
                    .build()
                    .expect("load client");
                let mut shots = Vec::new();
                let mut n: u64 = 0;
                while !stop.load(Ordering::Relaxed) && started.elapsed() < at_most {
                    // Pacing (an open-loop schedule), not synchronization.
                    let due = started + Duration::from_secs_f64(n as f64 / per_second);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let target = {
                        let routes = routes.lock().unwrap_or_else(|p| p.into_inner());
                        let len = routes.len();
                        (0..len)
                            .map(|k| (n as usize + k) % len)
                            .find_map(|i| routes[i].clone().map(|url| (i, url)))
                    };
                    n += 1;
                    let Some((replica, url)) = target else {
                        continue;
                    };
                    let status = http
                        .get(format!("{url}/rate"))
                        .query(&[("key", key.as_str())])
                        .send()
                        .ok()
                        .map(|r| r.status().as_u16());
                    if status == Some(200) {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                    shots.push(Shot {
                        at: started.elapsed(),
                        replica,
                        status,
                    });
                }
                shots
            })
        };
        Load {
            routes,
            stop,
            admitted,
            sent,
            started,
            thread: Some(thread),
        }
    }

    fn route(&self, replica: usize, url: Option<String>) {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())[replica] = url;
    }

    fn admitted(&self) -> u64 {
        self.admitted.load(Ordering::Relaxed)
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn finish(mut self) -> Vec<Shot> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("finished once")
            .join()
            .expect("load thread")
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The most admissions in any window of length `window`.
fn max_admitted_in_window(shots: &[Shot], window: Duration) -> usize {
    let mut open: VecDeque<Duration> = VecDeque::new();
    let mut most = 0;
    for shot in shots.iter().filter(|s| s.status == Some(200)) {
        open.push_back(shot.at);
        while open.front().is_some_and(|&t| shot.at - t > window) {
            open.pop_front();
        }
        most = most.max(open.len());
    }
    most
}

#[test]
fn load_spread_over_three_replicas_above_the_limit_stays_within_the_shared_mode_bound() {
    // 20 tokens refilled over 200 ms (r = 100/s), 150 requests/s round-robin over the three
    // replicas: 1.5 times the limit, each replica alone seeing half of it. A 300 ms sync
    // interval (r*s = 30 tokens of refill per round; the defaults, 1000/s and 50 ms, give 50)
    // keeps the request rate low. The shared-mode bound of docs/crdt.md over T seconds is
    // C + r*T + (N-1)(C + r*D), D = s + delay; the delay is given 50 ms of slack for a loaded
    // machine. docs/accuracy.md has the same pattern at the defaults.
    let settings = Settings {
        capacity: 20,
        refill_interval_ms: 200,
        sync_interval_ms: 300,
        anti_entropy_interval_ms: 5_000,
        ready_max_wait_ms: 5_000,
    };
    let cluster = Cluster::start(3, settings);
    let load = Load::start(
        (0..3).map(|i| Some(cluster.api(i))).collect(),
        "spread",
        150.0,
        Duration::from_secs(6),
    );
    wait_until(Duration::from_secs(15), "600 requests", || {
        (load.sent() >= 600).then_some(())
    });
    let shots = load.finish();
    let admitted = shots.iter().filter(|s| s.status == Some(200)).count() as f64;
    let failed = shots.iter().filter(|s| s.status.is_none()).count();
    let elapsed = shots.last().expect("shots").at.as_secs_f64();
    let (c, r) = (settings.capacity as f64, settings.rate());
    let d = (settings.sync_interval_ms + 50) as f64 / 1000.0;
    let ideal = c + r * elapsed;
    let bound = ideal + 2.0 * (c + r * d);
    eprintln!(
        "spread load: {} requests over {elapsed:.2} s, {admitted} admitted, ideal {ideal:.0}, \
         bound {bound:.0}",
        shots.len()
    );
    assert_eq!(failed, 0);
    assert!(
        admitted <= bound,
        "the cluster admitted {admitted} where a single bucket admits {ideal:.0} and the \
         shared-mode bound is {bound:.0}"
    );
    assert!(admitted >= ideal - r * d, "under-admits: {admitted}");
}

#[test]
fn a_replica_killed_under_load_recovers_from_peers_before_ready_and_the_cluster_stays_within_the_bound()
 {
    // 60 tokens, refilled over 10 minutes (0.1 token/s): the load drains the bucket in under a
    // second and the cluster must then hold the line. Anti-entropy every 5 s: a restarted
    // replica that did not recover from its peers before `/ready` would not hear of the debt
    // from them for seconds (once the bucket is empty they reject everything, so they push no
    // deltas) and would admit its share of the load, up to a whole bucket.
    let settings = Settings {
        capacity: 60,
        refill_interval_ms: 600_000,
        sync_interval_ms: 10,
        anti_entropy_interval_ms: 5_000,
        ready_max_wait_ms: 5_000,
    };
    let mut cluster = Cluster::start(3, settings);
    let key = "hot";
    let per_second = 100.0;
    let load = Load::start(
        (0..3).map(|i| Some(cluster.api(i))).collect(),
        key,
        per_second,
        Duration::from_secs(30),
    );

    // Kill replica-0 mid-drain, while it is admitting.
    wait_until(Duration::from_secs(10), "30 admissions", || {
        (load.admitted() >= 30).then_some(())
    });
    load.route(0, None);
    let killed_at = load.elapsed();
    cluster.kill(0);
    // The survivors keep serving the load and drain the rest of the bucket. Restarting only
    // then makes forgetting visible in the count: nothing they do afterwards would tell the
    // restarted replica about the debt before the next anti-entropy round.
    wait_until(SETTLE, "the survivors to drain the bucket", || {
        (cluster.bucket(1, key).remaining == 0 && cluster.bucket(2, key).remaining == 0)
            .then_some(())
    });

    cluster.spawn(0);
    cluster.wait_ready(0);
    // Recovered before ready: its view is as empty as the survivors' (at most one token of
    // refill later). A replica that forgot would show a full bucket.
    let recovered = cluster.bucket(0, key);
    assert!(
        recovered.remaining <= 1 && recovered.held_in_memory,
        "restarted replica-0 shows {recovered:?} where the survivors had drained the bucket: \
         it forgot what the cluster admitted"
    );
    load.route(0, Some(cluster.api(0)));
    let restarted_at = load.elapsed();
    let sent_at_restart = load.sent();
    wait_until(
        Duration::from_secs(10),
        "150 requests after the restart",
        || (load.sent() >= sent_at_restart + 150).then_some(()),
    );
    let shots = load.finish();

    let admitted = shots.iter().filter(|s| s.status == Some(200)).count();
    let admitted_after = shots
        .iter()
        .filter(|s| s.status == Some(200) && s.at >= restarted_at)
        .count();
    let errors: Vec<&Shot> = shots.iter().filter(|s| s.status.is_none()).collect();
    let elapsed = shots.last().expect("shots").at.as_secs_f64();
    // docs/crdt.md: admitted <= C + r*T + U, where U is what replicas admitted that others had
    // not seen yet: at most what was admitted within one propagation delay D. Here D is taken
    // as 20 sync intervals (generous for a loaded 2-core machine) and U measured from the load
    // log. On top of it, kill -9 loses what replica-0 admitted in its last D before dying,
    // since it never pushed it (asynchronous replication cannot keep that).
    let window = Duration::from_millis(20 * settings.sync_interval_ms);
    let in_flight = max_admitted_in_window(&shots, window);
    let lost_at_kill = shots
        .iter()
        .filter(|s| {
            s.replica == 0
                && s.status == Some(200)
                && s.at <= killed_at
                && killed_at - s.at <= window
        })
        .count();
    let refill = (settings.rate() * elapsed).ceil() as usize;
    let bound = settings.capacity as usize + refill + in_flight + lost_at_kill;
    let docs_bound = settings.capacity as f64
        + settings.rate() * elapsed
        + 2.0 * (settings.capacity as f64 + settings.rate() * window.as_secs_f64());
    eprintln!(
        "kill -9 under load: {} requests over {elapsed:.2} s, {admitted} admitted \
         ({admitted_after} after the restart), restarted replica recovered to {} left; bound {bound} = C {} + refill {refill} + in flight {in_flight} + lost \
         at kill {lost_at_kill}; worst case of docs/crdt.md {docs_bound:.0}",
        shots.len(),
        recovered.remaining,
        settings.capacity
    );
    assert!(
        admitted <= bound,
        "the cluster admitted {admitted}, more than the bound {bound}"
    );
    assert!(
        admitted >= settings.capacity as usize,
        "never under-admits: {admitted} < capacity"
    );
    // The survivors kept answering: only a request in flight to the killed replica may fail.
    assert!(
        errors.iter().all(|s| s.replica == 0) && errors.len() <= 1,
        "failed requests: {errors:?}"
    );
    // After the restart the bucket is empty: everything is rejected except what refill
    // allows and what kill -9 lost.
    assert!(
        admitted_after <= refill + lost_at_kill + 1,
        "{admitted_after} admitted after the restart"
    );
}

#[test]
fn during_a_partition_both_sides_admit_and_after_healing_they_converge_to_the_merged_consumption() {
    let capacity = 100;
    let cluster = Cluster::start(
        3,
        Settings {
            capacity,
            refill_interval_ms: HOUR_MS,
            sync_interval_ms: 10,
            anti_entropy_interval_ms: 300,
            ready_max_wait_ms: 5_000,
        },
    );
    let key = "split";
    cluster.partition(&[0], &[1, 2]);

    // Shared mode is AP: each side decides from what it can see. 70 + 25 + 25 = 120 tokens are
    // admitted against a capacity of 100.
    for _ in 0..7 {
        assert_eq!(cluster.spend(0, key, 10), 200);
    }
    for i in [1, 2] {
        for _ in 0..5 {
            assert_eq!(cluster.spend(i, key, 5), 200, "replica-{i}");
        }
    }
    // replica-1 and replica-2 still talk to each other: they agree on their side's 50.
    wait_until(SETTLE, "the majority side to converge on its 50", || {
        [1, 2]
            .iter()
            .all(|&i| cluster.bucket(i, key).remaining == 50)
            .then_some(())
    });
    // replica-0 has tried to push its 70 and failed on both links.
    wait_until(SETTLE, "replica-0 to see both links down", || {
        let status = cluster.status(0);
        [1, 2]
            .iter()
            .all(|&j| peer_up(&status, cluster.link(0, j).addr()) == Some(false))
            .then_some(())
    });
    wait_until(
        SETTLE,
        "replica-1 to see its link to replica-0 down",
        || (peer_up(&cluster.status(1), cluster.link(1, 0).addr()) == Some(false)).then_some(()),
    );
    assert_eq!(
        cluster.bucket(0, key).remaining,
        30,
        "replica-0 saw only its own 70"
    );
    for i in [1, 2] {
        assert_eq!(cluster.bucket(i, key).remaining, 50, "replica-{i}");
    }

    cluster.heal();
    // The deltas sent during the partition were lost; anti-entropy (300 ms) repairs it.
    // Merged: 120 spent, a debt of 20. With a 100-token bucket refilled over an hour, one
    // token is 36 000 ms of refill, so `reset_after_ms` tells the outstanding consumption:
    // between 119 and 120 tokens (the partial token is refill since the spending).
    let token_ms = HOUR_MS / capacity;
    let merged = wait_until(SETTLE, "all replicas to see the merged 120", || {
        let views: Vec<Bucket> = (0..3).map(|i| cluster.bucket(i, key)).collect();
        views
            .iter()
            .all(|b| b.remaining == 0 && b.reset_after_ms > 119 * token_ms)
            .then_some(views)
    });
    for (i, b) in merged.iter().enumerate() {
        assert!(
            b.reset_after_ms <= 120 * token_ms,
            "replica-{i} counts more than was spent: {b:?}"
        );
    }
    for i in 0..3 {
        assert_eq!(cluster.spend(i, key, 1), 429, "replica-{i} after the heal");
    }
    for i in 0..3 {
        for j in (0..3).filter(|&j| j != i) {
            wait_until(SETTLE, &format!("link {i}->{j} to be up again"), || {
                (peer_up(&cluster.status(i), cluster.link(i, j).addr()) == Some(true)).then_some(())
            });
        }
    }
}

/// A delta a peer did not take goes again once the peer answers again, not only with the next
/// whole-state round. Anti-entropy is an hour apart here, so on the old code the 30 tokens spent
/// while the link was cut reached replica-1 only an hour later: a peer that misses a delta
/// round under a flapping network counted short for up to a whole anti-entropy interval.
#[test]
fn a_delta_lost_to_a_cut_link_arrives_soon_after_the_link_heals() {
    let cluster = Cluster::start(
        2,
        Settings {
            capacity: 100,
            refill_interval_ms: HOUR_MS,
            sync_interval_ms: 20,
            anti_entropy_interval_ms: HOUR_MS,
            ready_max_wait_ms: 5_000,
        },
    );
    let key = "cut";
    // A delta through the link first: it is up before the cut.
    assert_eq!(cluster.spend(0, "warm", 1), 200);
    wait_until(SETTLE, "replica-0 to reach replica-1", || {
        (cluster.bucket(1, "warm").remaining == 99
            && peer_up(&cluster.status(0), cluster.link(0, 1).addr()) == Some(true))
        .then_some(())
    });
    cluster.partition(&[0], &[1]);
    assert_eq!(cluster.spend(0, key, 30), 200);
    // In shared mode a round with no change sends nothing, so the first failure after the cut
    // is the delta carrying these 30.
    wait_until(SETTLE, "replica-0 to fail to push the 30", || {
        (peer_up(&cluster.status(0), cluster.link(0, 1).addr()) == Some(false)).then_some(())
    });
    assert_eq!(cluster.bucket(1, key).remaining, 100);

    cluster.heal();
    wait_until(
        SETTLE,
        "replica-1 to see the 30 spent while cut off",
        || (cluster.bucket(1, key).remaining == 70).then_some(()),
    );
}

/// One limiter process with `envs` on top of the test settings, no peers.
fn lone_limiter(settings: Settings, extra: &[(&str, &str)]) -> Service {
    let mut envs: Vec<(&str, String)> = settings.envs();
    envs.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Service::spawn(
        "openclaw-limiter",
        &["--listen", "127.0.0.1:0"],
        &envs,
        START,
    )
}

fn wait_ready(http: &Client, service: &Service) {
    let url = format!("{}/ready", service.url);
    wait_until(START, "the limiter to be ready", || {
        http.get(&url)
            .send()
            .ok()
            .filter(|r| r.status() == 200)
            .map(|_| ())
    });
}

/// SIGTERM, and check that the process exited by itself with success.
fn stop_cleanly(service: &mut Service) {
    let status = service
        .process
        .terminate(Duration::from_secs(15))
        .expect("exits by itself on SIGTERM");
    assert!(status.success(), "{status:?}");
}

const SINGLE: Settings = Settings {
    capacity: 100,
    refill_interval_ms: HOUR_MS,
    sync_interval_ms: 50,
    anti_entropy_interval_ms: 5_000,
    ready_max_wait_ms: 5_000,
};

fn snapshot_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("snapshot dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("snapshot-") && n.ends_with(".ocs"))
        })
        .collect();
    files.sort();
    files
}

#[test]
fn bucket_state_survives_sigterm_and_a_restart_from_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot_dir = dir.path().to_str().unwrap();
    let http = http_client();
    let key = "durable";
    let mut first = lone_limiter(SINGLE, &[("OPENCLAW_SNAPSHOT_DIR", snapshot_dir)]);
    for cost in [20, 10, 7] {
        assert_eq!(spend(&http, &first.url, key, cost), 200);
    }
    assert_eq!(bucket(&http, &first.url, key).remaining, 63);
    let spent_at = Instant::now();
    stop_cleanly(&mut first);
    assert_eq!(
        snapshot_files(dir.path()).len(),
        1,
        "one snapshot written on SIGTERM"
    );

    let second = lone_limiter(SINGLE, &[("OPENCLAW_SNAPSHOT_DIR", snapshot_dir)]);
    wait_ready(&http, &second);
    let restored = bucket(&http, &second.url, key);
    // Refill since the spending: 100 tokens per hour.
    let refill = (SINGLE.rate() * spent_at.elapsed().as_secs_f64()).floor() as u64;
    assert!(
        (63..=63 + refill).contains(&restored.remaining) && restored.held_in_memory,
        "expected 63 (+{refill} refill) after the restart, got {restored:?}"
    );
    let status = get_json(&http, &format!("{}/status", second.url));
    assert_eq!(status["snapshot"]["enabled"], true, "{status}");
    // It decides from the restored state: 63 left, so 64 is refused and 63 admitted.
    assert_eq!(spend(&http, &second.url, key, 64 + refill), 429);
    assert_eq!(spend(&http, &second.url, key, 63), 200);
}

/// JSON log lines (`OPENCLAW_LOG_FORMAT=json`) whose message is `message`.
fn log_events(service: &Service, message: &str) -> Vec<Value> {
    service
        .process
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["fields"]["message"] == message)
        .collect()
}

/// Replace the first occurrence of `from` in `path` with `to` (same length).
fn patch_file(path: &std::path::Path, from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .unwrap_or_else(|| panic!("{} does not contain {from:?}", path.display()));
    bytes[at..at + to.len()].copy_from_slice(to);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_corrupt_snapshot_is_reported_and_skipped_for_the_older_good_one_or_an_empty_start() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot_dir = dir.path().to_str().unwrap();
    let http = http_client();
    let envs = [
        ("OPENCLAW_SNAPSHOT_DIR", snapshot_dir),
        ("OPENCLAW_LOG_FORMAT", "json"),
    ];
    // Two generations: the older holds 20 spent on `acct-x`, the newer 30.
    let mut first = lone_limiter(SINGLE, &envs);
    assert_eq!(spend(&http, &first.url, "acct-x", 20), 200);
    stop_cleanly(&mut first);
    let mut second = lone_limiter(SINGLE, &envs);
    wait_ready(&http, &second);
    assert_eq!(bucket(&http, &second.url, "acct-x").remaining, 80);
    assert_eq!(spend(&http, &second.url, "acct-x", 10), 200);
    stop_cleanly(&mut second);
    let files = snapshot_files(dir.path());
    assert_eq!(files.len(), 2, "{files:?}");
    let (older, newest) = (&files[0], &files[1]);

    // A corruption that keeps the file well-formed: the key `acct-x` becomes `acct-y`. Only
    // the checksum can tell; trusting the file would move the 30 spent tokens to `acct-y`.
    patch_file(newest, b"acct-x", b"acct-y");
    let third = lone_limiter(SINGLE, &envs);
    wait_ready(&http, &third);
    assert_eq!(
        bucket(&http, &third.url, "acct-x").remaining,
        80,
        "restored from the older good snapshot"
    );
    assert_eq!(
        bucket(&http, &third.url, "acct-y"),
        Bucket {
            remaining: 100,
            reset_after_ms: 0,
            held_in_memory: false
        },
        "nothing from the corrupt snapshot"
    );
    let newest_name = newest.file_name().unwrap().to_str().unwrap();
    let rejected = log_events(&third, "snapshot rejected: skipped, not trusted");
    assert!(
        rejected.len() == 1
            && rejected[0]["fields"]["file"]
                .as_str()
                .is_some_and(|f| f.ends_with(newest_name)),
        "expected one log line naming {newest_name}, got {rejected:?}\n{}",
        third.process.log()
    );
    drop(third);

    // Both corrupt (the older one with bytes flipped in the middle): start empty, report both.
    let mut bytes = std::fs::read(older).unwrap();
    let middle = bytes.len() / 2;
    for b in &mut bytes[middle..middle + 4] {
        *b ^= 0xff;
    }
    std::fs::write(older, bytes).unwrap();
    let fourth = lone_limiter(SINGLE, &envs);
    wait_ready(&http, &fourth);
    assert_eq!(
        bucket(&http, &fourth.url, "acct-x"),
        Bucket {
            remaining: 100,
            reset_after_ms: 0,
            held_in_memory: false
        },
        "starts empty rather than trusting a corrupt snapshot"
    );
    assert_eq!(
        log_events(&fourth, "snapshot rejected: skipped, not trusted").len(),
        2,
        "{}",
        fourth.process.log()
    );
    assert_eq!(
        log_events(&fourth, "no usable snapshot: starting empty").len(),
        1,
        "{}",
        fourth.process.log()
    );
}

#[test]
fn peer_traffic_with_a_wrong_secret_is_refused_and_counted_and_status_lists_peers_up_and_down() {
    let settings = Settings {
        capacity: 100,
        refill_interval_ms: HOUR_MS,
        sync_interval_ms: 10,
        anti_entropy_interval_ms: 200,
        ready_max_wait_ms: 2_000,
    };
    // Three slots, two replicas: replica-2 never starts, so the links to it lead nowhere.
    let mut cluster = Cluster::new(3, settings);
    cluster.spawn(0);
    cluster.spawn(1);
    cluster.wait_ready(0);
    cluster.wait_ready(1);
    let (to_1, to_2) = (cluster.link(0, 1).addr(), cluster.link(0, 2).addr());
    wait_until(
        SETTLE,
        "replica-0 to list replica-1 up and replica-2 down",
        || {
            let status = cluster.status(0);
            (peer_up(&status, to_1) == Some(true) && peer_up(&status, to_2) == Some(false))
                .then_some(())
        },
    );
    let status = cluster.status(0);
    assert!(
        peer_entry(&status, to_1).unwrap()["messages_sent"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{status}"
    );
    assert!(
        peer_entry(&status, to_2).unwrap()["last_error"].is_string(),
        "{status}"
    );
    assert!(
        status["inbound"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["node"] == "replica-1" && p["up"] == true),
        "{status}"
    );
    cluster.link(0, 1).partition();
    wait_until(SETTLE, "replica-0 to list replica-1 down", || {
        (peer_up(&cluster.status(0), to_1) == Some(false)).then_some(())
    });
    cluster.heal();
    wait_until(SETTLE, "replica-0 to list replica-1 up again", || {
        (peer_up(&cluster.status(0), to_1) == Some(true)).then_some(())
    });

    // A replica configured with another secret, pointed straight at replica-0's peer
    // listener: its start-up pull, heartbeats and deltas are all refused.
    let rejected = r#"openclaw_peer_messages_rejected_total{reason="unauthenticated"}"#;
    let api0 = cluster.api(0);
    let before = metric(&cluster.http, &api0, rejected).expect("the series is exported");
    let replica0_peer = host_port(cluster.replica(0).url_of("peer").unwrap());
    let mut envs = settings.envs();
    envs.extend([
        ("OPENCLAW_NODE_ID", "rogue".to_owned()),
        ("OPENCLAW_PEERS", replica0_peer),
        (
            "OPENCLAW_PEER_SECRET",
            "not-the-cluster-secret-at-all".to_owned(),
        ),
    ]);
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let rogue = Service::spawn(
        "openclaw-limiter",
        &["--listen", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0"],
        &envs,
        START,
    );
    assert_eq!(spend(&cluster.http, &rogue.url, "rogue-key", 40), 200);
    wait_until(SETTLE, "replica-0 to refuse the rogue's messages", || {
        let now = metric(&cluster.http, &api0, rejected)?;
        (now >= before + 3.0).then_some(())
    });
    wait_until(SETTLE, "the rogue to see replica-0 refuse it", || {
        let status = get_json(&cluster.http, &format!("{}/status", rogue.url));
        let peer = status["peers"].as_array()?.first()?.clone();
        (peer["up"] == false && peer["last_error"].as_str()?.contains("401")).then_some(())
    });
    // Nothing of it was merged.
    assert_eq!(
        cluster.bucket(0, "rogue-key"),
        Bucket {
            remaining: 100,
            reset_after_ms: 0,
            held_in_memory: false
        }
    );
    let status = cluster.status(0);
    assert!(
        !status["inbound"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["node"] == "rogue"),
        "{status}"
    );

    // An unsigned message straight from the test: 401, counted once more (the rogue is gone,
    // so nothing else moves the counter).
    drop(rogue);
    let peer_url = cluster.replica(0).url_of("peer").unwrap().to_owned();
    let before = metric(&cluster.http, &api0, rejected).unwrap();
    let response = cluster
        .http
        .post(format!("{peer_url}/v1/sync"))
        .header("content-type", "application/json")
        .body(
            r#"{"v":1,"node":"x","replica":1,"sent_at":0,"full":true,"policies":[],"entries":[]}"#,
        )
        .send()
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(metric(&cluster.http, &api0, rejected), Some(before + 1.0));
}

/// The peer port before any authentication (issue 12): a connection that sends nothing, or
/// stops half-way through its headers, is closed after `OPENCLAW_PEER_IDLE_TIMEOUT_S`, and no
/// more than `OPENCLAW_PEER_MAX_CONNECTIONS` are held at once (the others wait in the backlog).
/// Before the limits, both kinds of connection were held for as long as the client liked.
#[test]
fn the_peer_port_closes_idle_connections_and_holds_no_more_than_its_cap() {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    let http = http_client();
    let replica = lone_limiter(
        SINGLE,
        &[
            ("OPENCLAW_PEER_LISTEN", "127.0.0.1:0"),
            // A peer that never answers: replication (and its listener) on, nobody to talk to.
            ("OPENCLAW_PEERS", "127.0.0.1:9"),
            ("OPENCLAW_PEER_SECRET", SECRET),
            ("OPENCLAW_READY_MAX_WAIT_MS", "100"),
            ("OPENCLAW_PEER_IDLE_TIMEOUT_S", "1"),
            ("OPENCLAW_PEER_MAX_CONNECTIONS", "2"),
        ],
    );
    wait_ready(&http, &replica);
    let peer = host_port(replica.url_of("peer").expect("a `listening peer=` line"));
    let open = || metric(&http, &replica.url, "openclaw_peer_connections");

    // Two silent clients, one of them stopped half-way through its headers: the cap.
    let mut silent = TcpStream::connect(&peer).unwrap();
    let mut halfway = TcpStream::connect(&peer).unwrap();
    halfway
        .write_all(b"POST /v1/sync HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    wait_until(START, "both connections to be held", || {
        (open() == Some(2.0)).then_some(())
    });
    // A third, well-formed request waits: the listener does not accept it while both are held.
    let mut third = TcpStream::connect(&peer).unwrap();
    third
        .write_all(b"GET /v1/state HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert_eq!(
        open(),
        Some(2.0),
        "a connection beyond the cap was accepted"
    );

    // The idle ones are closed by the replica (a read sees the end, or a reset), well within
    // the test's own limit.
    for (name, stream) in [("silent", &mut silent), ("half-way", &mut halfway)] {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 256];
        match stream.read(&mut buf) {
            Ok(0) => {}
            Err(e)
                if e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut => {}
            other => panic!("the {name} connection was not closed by the replica: {other:?}"),
        }
    }
    // Then the waiting request is served (refused: it is not signed), and counted as closed idle.
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    let _ = third.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer:?}");
    let closed = metric(
        &http,
        &replica.url,
        "openclaw_peer_messages_rejected_total{reason=\"idle_connection\"}",
    );
    assert!(closed.is_some_and(|n| n >= 2.0), "{closed:?}");
}
