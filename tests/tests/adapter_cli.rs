//! The adapter's SRE commands, run as the real binary: `check-config` exit codes and messages,
//! and `explain` against a real Prometheus (Debian's; it scrapes itself).

use std::process::Command;

use openclaw_e2e::{Prometheus, workspace_bin};

fn adapter(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(workspace_bin("openclaw-metrics-adapter"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run openclaw-metrics-adapter");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_accepts_the_shipped_rules_and_exits_zero() {
    let shipped = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../metrics-adapter/config/default.yaml"
    );
    for args in [
        vec!["check-config"],
        vec!["check-config", "--config", shipped],
    ] {
        let (code, stdout, stderr) = adapter(&args);
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        assert!(stdout.contains("OK, 2 external metrics"), "{stdout}");
        assert!(
            stdout.contains(
                "openclaw_token_depletion_rate: sum(rate(openclaw_bucket_depletion_total[1m]))"
            ),
            "{stdout}"
        );
    }
}

#[test]
fn check_config_lists_every_error_with_its_position_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.yaml");
    std::fs::write(
        &path,
        "rules:\n  - name: ok\n    query: up\n  - name: broken\n    query: sum(rate(x[1m])\n  - name: typo\n    query: up\n    on_emtpy: error\n",
    )
    .unwrap();
    let (code, _, stderr) = adapter(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{stderr}");
    let file = path.display().to_string();
    assert!(
        stderr.contains(&format!(
            "{file}:5:15: rule \"broken\": query: unclosed left parenthesis"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{file}:6: rule \"typo\"")) && stderr.contains("on_emtpy"),
        "{stderr}"
    );

    let (code, _, stderr) = adapter(&["check-config", "--config", "/nonexistent/rules.yaml"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("/nonexistent/rules.yaml"), "{stderr}");
}

#[test]
fn explain_shows_the_final_promql_prometheus_answer_items_and_the_hpa_decision() {
    let prometheus = Prometheus::start_scraping_itself();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        "rules:\n  - name: targets_up\n    query: sum(up)\n    selectable_labels: [job]\n",
    )
    .unwrap();
    let hpa = dir.path().join("hpa.yaml");
    std::fs::write(
        &hpa,
        "apiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata: {name: demo, namespace: edge}\n\
         spec:\n  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: demo}\n  minReplicas: 1\n  maxReplicas: 10\n\
         \x20 metrics:\n  - type: External\n    external:\n      metric: {name: targets_up, selector: {matchLabels: {job: prometheus}}}\n\
         \x20     target: {type: Value, value: 250m}\n",
    )
    .unwrap();
    let url = prometheus.url();
    let (code, stdout, stderr) = adapter(&[
        "explain",
        "--config",
        rules.to_str().unwrap(),
        "--prometheus-url",
        &url,
        "--hpa",
        hpa.to_str().unwrap(),
        "--current-replicas",
        "2",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("Final PromQL:\n  sum(up{job=\"prometheus\"})"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Prometheus answered (1 series):\n  {\"status\":\"success\""),
        "{stdout}"
    );
    assert!(stdout.contains("\"value\": \"1\""), "{stdout}");
    // Usage 1 against 250m on 2 ready pods: ratio 4 -> ceil(4 x 2) = 8. The manifest has no
    // spec.behavior, so the controller's legacy limit applies: at most max(2 x 2, 4) = 4.
    assert!(
        stdout.contains("ratio 4.0000, ceil(4.0000 x 2 ready) -> 8 replicas"),
        "{stdout}"
    );
    assert!(
        stdout.contains("=> The HPA would set 4 replicas (now 2)."),
        "{stdout}"
    );

    // A selector the rule does not allow shows the 400 Status the API would serve.
    let (code, stdout, _) = adapter(&[
        "explain",
        "--config",
        rules.to_str().unwrap(),
        "--prometheus-url",
        &url,
        "--metric",
        "targets_up",
        "-l",
        "instance=x",
    ]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("Served (HTTP 400)"), "{stdout}");
}
