//! The real `openclaw-limiter` binary on 127.0.0.1, driven by a real HTTP client.

use std::process::Command;
use std::time::Duration;

use openclaw_common::wire::Decision;
use openclaw_e2e::{http_client, spawn_limiter, wait_until, workspace_bin};

fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn with_no_flags_it_runs_the_embedded_single_node_default() {
    let service = spawn_limiter(&[]);
    let client = http_client();
    let status: serde_json::Value = client
        .get(format!("{}/status", service.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(status["topology"], "single-node");
    assert_eq!(status["policies"][0]["name"], "default");
    assert_eq!(status["policies"][0]["capacity"], 1000);
    assert_eq!(status["policies"][0]["refill_interval_ms"], 1000);
    assert_eq!(
        client
            .get(format!("{}/ready", service.url))
            .send()
            .unwrap()
            .status(),
        200
    );
}

#[test]
fn decides_over_http_exports_metrics_and_stops_cleanly_on_sigterm() {
    let mut service = spawn_limiter(&[("BUCKET_CAPACITY", "5"), ("REFILL_INTERVAL_MS", "600000")]);
    let client = http_client();
    for i in 0..5 {
        let response = client
            .get(format!("{}/rate?key=e2e", service.url))
            .send()
            .unwrap();
        assert_eq!(response.status(), 200, "request {i}");
        assert!(response.headers().contains_key("ratelimit"));
    }
    let response = client
        .post(format!("{}/rate", service.url))
        .json(&serde_json::json!({"key": "e2e"}))
        .send()
        .unwrap();
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    let decision: Decision = response.json().unwrap();
    assert_eq!(
        (decision.allowed, decision.remaining, decision.limit),
        (false, 0, 5)
    );

    let text = client
        .get(format!("{}/metrics", service.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let allowed = r#"openclaw_requests_total{policy="default",decision="allowed"}"#;
    let rejected = r#"openclaw_requests_total{policy="default",decision="rejected"}"#;
    assert_eq!(metric_value(&text, allowed), Some(5.0), "{text}");
    assert_eq!(metric_value(&text, rejected), Some(1.0), "{text}");
    assert_eq!(
        metric_value(&text, r#"token_bucket_capacity{policy="default"}"#),
        Some(5.0)
    );
    // The sweep runs every second and publishes the depleted bucket.
    wait_until(Duration::from_secs(5), "the sweep to publish usage", || {
        let text = client
            .get(format!("{}/metrics", service.url))
            .send()
            .ok()?
            .text()
            .ok()?;
        (metric_value(&text, r#"token_bucket_current_usage{policy="default"}"#) == Some(5.0))
            .then_some(())
    });

    let status = service
        .process
        .terminate(Duration::from_secs(15))
        .expect("exits by itself on SIGTERM");
    assert!(status.success(), "{status:?}");
}

#[test]
fn invalid_configuration_lists_every_problem_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies.yaml");
    std::fs::write(
        &policies,
        "policies:\n  search: {capacity: 0, refill_interval_ms: 1000, burst: 2}\n",
    )
    .unwrap();
    let output = Command::new(workspace_bin("openclaw-limiter"))
        .args(["--listen", "127.0.0.1:0", "--policies"])
        .arg(&policies)
        .env("BUCKET_CAPACITY", "5")
        .env("REFILL_INTERVAL_MS", "0")
        .env("OPENCLAW_API_KEY", "REPLACE_WITH_REAL_KEY")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "REFILL_INTERVAL_MS",
        "OPENCLAW_API_KEY still holds the example placeholder",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    // With a valid default rate, the policies file's own problems are all listed too.
    let output = Command::new(workspace_bin("openclaw-limiter"))
        .args(["--listen", "127.0.0.1:0", "--policies"])
        .arg(&policies)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("policies.search.capacity"), "{stderr}");
    assert!(
        stderr.contains("policies.search.burst: unknown field"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty(), "it must not start listening");
}

#[test]
fn policies_file_is_reloaded_and_a_broken_edit_keeps_the_last_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies.yaml");
    std::fs::write(
        &policies,
        "policies:\n  search: {capacity: 3, refill_interval_ms: 60000}\n",
    )
    .unwrap();
    let path = policies.to_str().unwrap();
    let service = spawn_limiter(&[
        ("OPENCLAW_POLICIES", path),
        ("OPENCLAW_POLICIES_RELOAD_MS", "100"),
    ]);
    let client = http_client();
    let rate = |policy: &str| {
        client
            .get(format!("{}/rate?key=k&policy={policy}", service.url))
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(rate("search"), 200);
    assert_eq!(rate("fresh"), 400);

    // Replace the file the way editors and ConfigMap updates do: write aside, rename over.
    let staged = dir.path().join("policies.yaml.new");
    std::fs::write(&staged, "policies:\n  search: {capacity: 3, refill_interval_ms: 60000}\n  fresh: {capacity: 1, refill_interval_ms: 60000}\n").unwrap();
    std::fs::rename(&staged, &policies).unwrap();
    wait_until(
        Duration::from_secs(10),
        "the new policy to be served",
        || (rate("fresh") == 200).then_some(()),
    );
    // The search bucket kept its state across the reload: 1 of 3 spent before, 2 left.
    assert_eq!(rate("search"), 200);
    assert_eq!(rate("search"), 200);
    assert_eq!(rate("search"), 429);

    std::fs::write(&policies, "policies:\n  fresh: {capacity: -1}\n").unwrap();
    wait_until(
        Duration::from_secs(10),
        "the failed reload to be reported",
        || {
            let text = client
                .get(format!("{}/metrics", service.url))
                .send()
                .ok()?
                .text()
                .ok()?;
            (metric_value(&text, "openclaw_policy_config_last_reload_successful") == Some(0.0))
                .then_some(())
        },
    );
    assert_eq!(rate("fresh"), 429, "the last good policies stay in force");
    assert_eq!(rate("search"), 429);
}

#[test]
fn check_config_validates_the_rate_limit_rules_with_file_and_place() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    std::fs::write(
        &good,
        "domain: edge\ndescriptors:\n  - key: api_key\n    rate_limit: {unit: day, requests_per_unit: 1000}\n",
    )
    .unwrap();
    let output = Command::new(workspace_bin("openclaw-limiter"))
        .arg("--check-config")
        .env("OPENCLAW_RLS_CONFIG", &good)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");

    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "domain: edge\ndescriptors:\n  - key: api_key\n    rate_limit: {unit: fortnight, requests_per_unit: 1000}\n  - value: x\n",
    )
    .unwrap();
    let output = Command::new(workspace_bin("openclaw-limiter"))
        .arg("--check-config")
        .env("OPENCLAW_RLS_CONFIG", &bad)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "bad.yaml: descriptors[0].rate_limit.unit: invalid rate limit unit `fortnight`",
        "bad.yaml: descriptors[1].key: missing or empty",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

#[test]
fn a_snapshot_directory_serves_one_process_and_tells_the_next_one_whom_it_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let snapshots = dir.path().join("snapshots");
    let snapshots = snapshots.to_str().unwrap();
    let mut first = spawn_limiter(&[("OPENCLAW_SNAPSHOT_DIR", snapshots)]);
    let lock = dir.path().join("snapshots/replica.lock");
    let held_by = std::fs::read_to_string(&lock).unwrap();
    assert_eq!(held_by.trim().len(), 16, "a replica id in hex: {held_by:?}");

    // A second process on the same directory while the first runs: refused, nothing changed.
    let output = Command::new(workspace_bin("openclaw-limiter"))
        .args(["--listen", "127.0.0.1:0"])
        .env("OPENCLAW_SNAPSHOT_DIR", snapshots)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("locked by another running process"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty(), "it must not start listening");
    assert_eq!(std::fs::read_to_string(&lock).unwrap(), held_by);

    // The first one dies without a word (a crash): the next process on the directory takes the
    // lock the kernel released and names the replica it takes over from.
    first.process.kill();
    let second = spawn_limiter(&[("OPENCLAW_SNAPSHOT_DIR", snapshots)]);
    wait_until(Duration::from_secs(10), "the takeover to be logged", || {
        let log = second.process.log();
        (log.contains("takes over from the replica") && log.contains(held_by.trim())).then_some(())
    });
    assert_ne!(std::fs::read_to_string(&lock).unwrap(), held_by);
}
