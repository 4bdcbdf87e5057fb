//! Kubernetes clients no one here wrote, pointed straight at the metrics adapter:
//! `kubectl get --raw` and `kubectl api-resources` (/usr/bin/kubectl), and the official Python
//! `kubernetes` client's dynamic discovery (PyPI, via tests/contract/python_dynamic_client.py).
//!
//! No Kubernetes API server can run here, so the clients talk to the adapter directly (as the
//! kube-aggregator would forward to it), over plain HTTP with `--authentication=none`; a real
//! Prometheus (Debian's) answers the queries. Missing tools fail the test with what to install.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use openclaw_e2e::{Prometheus, Service, spawn_adapter};
use serde_json::Value;

const KUBECTL: &str = "/usr/bin/kubectl";

/// Rules: one metric Prometheus always has (it scrapes itself), one the limiter would feed.
const CONFIG: &str = r#"
defaults:
  timeout: 2s
  cache_ttl: 0s
rules:
  - name: prometheus_up
    query: sum(up)
    selectable_labels: [job]
  - name: openclaw_requests_per_second
    query: sum(rate(openclaw_requests_total[1m]))
    selectable_labels: [policy, decision]
"#;

struct Setup {
    adapter: Service,
    _prometheus: Prometheus,
    dir: tempfile::TempDir,
}

impl Setup {
    fn start() -> Setup {
        Setup::start_with(false)
    }

    /// `tls`: serve HTTPS with the certificate the adapter generates, and trust its CA.
    fn start_with(tls: bool) -> Setup {
        let prometheus = Prometheus::start_scraping_itself();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("rules.yaml");
        std::fs::write(&config, CONFIG).unwrap();
        let ca = dir.path().join("ca.pem");
        let ca_arg = ["--tls-self-signed-ca-out", ca.to_str().unwrap()];
        let extra: &[&str] = if tls { &ca_arg } else { &[] };
        let adapter = spawn_adapter(&prometheus.url(), &config, !tls, extra);
        let trust = if tls {
            format!("    certificate-authority: {}\n", ca.display())
        } else {
            String::new()
        };
        // Over HTTPS kubectl prompts for a username unless the user has credentials; a token
        // (ignored with --authentication=none) keeps it non-interactive.
        let user = if tls {
            "{token: e2e-not-checked}"
        } else {
            "{}"
        };
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: adapter\n  cluster:\n    server: {}\n{trust}\
             contexts:\n- name: adapter\n  context:\n    cluster: adapter\n    user: anonymous\n\
             current-context: adapter\nusers:\n- name: anonymous\n  user: {user}\n",
            adapter.url
        );
        std::fs::write(dir.path().join("kubeconfig"), kubeconfig).unwrap();
        Setup {
            adapter,
            _prometheus: prometheus,
            dir,
        }
    }

    fn kubectl(&self, args: &[&str]) -> (bool, String, String) {
        assert!(
            Path::new(KUBECTL).is_file(),
            "{KUBECTL} is missing: install kubectl (Debian: apt-get install -y kubectl)"
        );
        let out = Command::new(KUBECTL)
            .arg("--kubeconfig")
            .arg(self.dir.path().join("kubeconfig"))
            .arg("--cache-dir")
            .arg(self.dir.path().join("kube-cache"))
            .arg("--request-timeout=10s")
            .args(args)
            .env("HOME", self.dir.path())
            .output()
            .expect("run kubectl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn kubectl_json(&self, path: &str) -> Value {
        let (ok, stdout, stderr) = self.kubectl(&["get", "--raw", path]);
        assert!(ok, "kubectl get --raw {path} failed: {stderr}");
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {stdout}"))
    }
}

#[test]
fn kubectl_get_raw_reads_discovery_and_list_calls() {
    let s = Setup::start();

    let apis = s.kubectl_json("/apis");
    assert_eq!(apis["kind"], "APIGroupList");
    assert_eq!(apis["groups"][0]["name"], "external.metrics.k8s.io");
    assert_eq!(apis["groups"][0]["preferredVersion"]["version"], "v1beta1");

    let group = s.kubectl_json("/apis/external.metrics.k8s.io");
    assert_eq!(group["kind"], "APIGroup");

    let resources = s.kubectl_json("/apis/external.metrics.k8s.io/v1beta1");
    let names: Vec<&str> = resources["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["openclaw_requests_per_second", "prometheus_up"]);

    let list = s.kubectl_json("/apis/external.metrics.k8s.io/v1beta1/namespaces/default/prometheus_up?labelSelector=job%3Dprometheus");
    assert_eq!(list["kind"], "ExternalMetricValueList");
    assert_eq!(list["apiVersion"], "external.metrics.k8s.io/v1beta1");
    assert_eq!(list["items"][0]["metricName"], "prometheus_up");
    // `sum(up{job="prometheus"})` keeps no labels, so the item carries none.
    assert_eq!(list["items"][0]["metricLabels"], serde_json::json!({}));
    assert_eq!(list["items"][0]["value"], "1");

    // kubectl shows our Status the way it shows any API server's.
    let (ok, _, stderr) = s.kubectl(&[
        "get",
        "--raw",
        "/apis/external.metrics.k8s.io/v1beta1/namespaces/default/no_such_metric",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("NotFound") && stderr.contains("no_such_metric"),
        "{stderr}"
    );
    let (ok, _, stderr) = s.kubectl(&[
        "get",
        "--raw",
        "/apis/external.metrics.k8s.io/v1beta1/namespaces/default/prometheus_up?labelSelector=job%3E1",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("BadRequest") && stderr.contains("not supported"),
        "{stderr}"
    );
}

#[test]
fn kubectl_api_resources_lists_every_metric_of_the_group() {
    let s = Setup::start();
    let (ok, stdout, stderr) = s.kubectl(&[
        "api-resources",
        "--api-group=external.metrics.k8s.io",
        "-o",
        "wide",
    ]);
    assert!(ok, "kubectl api-resources failed: {stderr}\n{stdout}");
    for metric in ["openclaw_requests_per_second", "prometheus_up"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(metric))
            .unwrap_or_else(|| panic!("{metric} missing:\n{stdout}"));
        assert!(line.contains("external.metrics.k8s.io/v1beta1"), "{line}");
        assert!(line.contains("true"), "namespaced: {line}");
        assert!(line.contains("ExternalMetricValueList"), "{line}");
        assert!(line.contains("get"), "verbs: {line}");
    }
}

#[test]
fn the_binary_serves_https_by_default_and_kubectl_verifies_its_generated_ca() {
    let mut s = Setup::start_with(true);
    assert!(s.adapter.url.starts_with("https://"), "{}", s.adapter.url);
    assert!(s.adapter.url_of("https").is_some());
    let list = s.kubectl_json(
        "/apis/external.metrics.k8s.io/v1beta1/namespaces/default/prometheus_up?labelSelector=job%3Dprometheus",
    );
    assert_eq!(list["items"][0]["value"], "1");
    // SIGTERM: a clean exit within the grace period.
    let status = s.adapter.process.terminate(Duration::from_secs(20));
    assert!(
        status.is_some_and(|st| st.success()),
        "exit status {status:?}"
    );
}

fn python_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contract/python_dynamic_client.py")
}

#[test]
fn the_python_kubernetes_clients_dynamic_discovery_finds_and_lists_the_metrics() {
    let s = Setup::start();
    let out = Command::new("python3")
        .arg(python_script())
        .arg(&s.adapter.url)
        .arg("prometheus_up")
        .arg("job=prometheus")
        .output()
        .expect("python3 is needed for this test");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() != Some(3), "{stderr}");
    assert!(out.status.success(), "the Python client failed:\n{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON from the script");
    assert_eq!(v["resource"]["name"], "prometheus_up");
    assert_eq!(v["resource"]["kind"], "ExternalMetricValueList");
    assert_eq!(v["resource"]["namespaced"], true);
    assert_eq!(v["resource"]["verbs"], serde_json::json!(["get"]));
    let found: Vec<&str> = v["resources_in_group"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        found.contains(&"prometheus_up") && found.contains(&"openclaw_requests_per_second"),
        "{found:?}"
    );
    assert_eq!(v["list"]["kind"], "ExternalMetricValueList");
    assert_eq!(v["list"]["items"][0]["value"], "1");
    assert_eq!(v["bad_selector"]["status"], 400);
    assert_eq!(v["bad_selector"]["body"]["kind"], "Status");
}

/// The official Python client's generated discovery calls ask for the trailing-slash paths
/// (`/apis/`, `/version/`, `/apis/{group}/`, `/apis/{group}/{version}/`), which kube-apiserver
/// serves like the paths without the slash.
#[test]
fn the_python_kubernetes_clients_discovery_calls_with_trailing_slashes_succeed() {
    let s = Setup::start();
    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("contract/python_discovery.py"))
        .arg(&s.adapter.url)
        .output()
        .expect("python3 is needed for this test");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() != Some(3), "{stderr}");
    assert!(out.status.success(), "the Python client failed:\n{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON from the script");
    assert_eq!(
        v["groups"],
        serde_json::json!([{
            "name": "external.metrics.k8s.io",
            "preferred_version": "external.metrics.k8s.io/v1beta1"
        }])
    );
    assert!(
        v["git_version"]
            .as_str()
            .is_some_and(|g| g.starts_with('v')),
        "{v}"
    );
    assert_eq!(v["group"]["name"], "external.metrics.k8s.io");
    assert_eq!(v["group"]["versions"], serde_json::json!(["v1beta1"]));
    assert_eq!(
        v["resources"]["group_version"],
        "external.metrics.k8s.io/v1beta1"
    );
    assert_eq!(
        v["resources"]["names"],
        serde_json::json!(["openclaw_requests_per_second", "prometheus_up"])
    );
}
