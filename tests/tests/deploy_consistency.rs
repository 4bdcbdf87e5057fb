//! `deploy/` against the code it deploys: the manifests are rendered with the real `kubectl
//! kustomize` (base and every overlay) and checked against the real binaries and their real
//! output, so a renamed flag, port, label or metric breaks this test instead of a rollout.
//!
//! - generated copies (adapter config, PrometheusRule, dashboard ConfigMap) equal their sources;
//! - every environment variable set for a container is one its binary reads (`--help` lists
//!   each flag's `[env: NAME=]`), every port a container declares is one it listens on, and the
//!   limiter accepts the deployed configuration (`--check-config`, the real policies file);
//! - Services, ServiceMonitors, the PDB, NetworkPolicy and HPA select or name objects that
//!   exist, with ports those objects declare; the Deployments' selectors do not overlap;
//!   ServiceMonitors produce the scrape jobs `alerts/` matches on;
//! - the adapter's APIService, Service and RBAC follow the external metrics contract;
//! - every series named by the alert rules, the dashboard and the adapter's config is exported
//!   by a running limiter or adapter (scraped after exercising them) or recorded by a rule;
//! - the HPA's external metrics, with its selectors, are served by the adapter running the
//!   deployed config against a real Prometheus scraping a real limiter.
//!
//! No Kubernetes API server can run on the build machines: objects are checked as rendered, the
//! way the API server would resolve names, labels and ports. Needs `cargo build --workspace
//! --bins`, kubectl (/usr/bin/kubectl) and Debian's Prometheus (`apt-get install -y prometheus`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use metrics_adapter::config::Config as AdapterConfig;
use openclaw_e2e::{Prometheus, Service, free_port, http_client, spawn_adapter, workspace_bin};
use promql_parser::parser::{self, Expr};
use serde_json::Value;

/// Every kustomization an SRE may apply.
const TARGETS: &[&str] = &[
    "base",
    "overlays/production",
    "overlays/canary",
    "overlays/dev",
    // The base with the opt-in component that adds the depletion metric to the HPA.
    SCALE_ON_DEPLETION,
    // The production overlay with the opt-in off-site snapshots (credentials, egress policy).
    "tests/targets/offsite-snapshots",
    // The production overlay with the opt-in peer mutual TLS (cert-manager objects, mount).
    PEER_MTLS,
    // And with a certificate per pod naming it (cert-manager's csi-driver), nodes bound.
    PEER_MTLS_PER_POD,
];
const PEER_MTLS: &str = "tests/targets/peer-mtls";
const PEER_MTLS_PER_POD: &str = "tests/targets/peer-mtls-per-pod";
const SCALE_ON_DEPLETION: &str = "tests/targets/scale-on-depletion";
const LIMITER: &str = "openclaw-limiter";
const ADAPTER: &str = "openclaw-metrics-adapter";
/// Scrape jobs `alerts/` matches on (alerts/README.md, "Assumptions about the scrape").
const JOBS: &[&str] = &["openclaw-limiter", "openclaw-metrics-adapter"];

/// Series exported by other software, by their documented names: Prometheus' `up`,
/// kube-state-metrics v2 and kube-apiserver (the same file alerts/tools/checks.py reads).
fn external_series() -> Vec<String> {
    read("alerts/external-series.txt")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// All documents of a YAML stream as JSON values (empty documents dropped). Documents are
/// split on `---` lines, as kubectl writes them (inside block scalars such a line is indented).
fn yaml_docs(text: &str, what: &str) -> Vec<Value> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" {
            docs.push(String::new());
        } else {
            let last = docs.last_mut().expect("one document");
            last.push_str(line);
            last.push('\n');
        }
    }
    docs.iter()
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .map(|d| {
            serde_norway::from_str::<Value>(d).unwrap_or_else(|e| panic!("{what}: bad YAML: {e}"))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// `kubectl kustomize deploy/<target>`, parsed.
fn render(target: &str) -> Vec<Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(root().join("deploy").join(target))
        .output()
        .expect("kubectl is needed (/usr/bin/kubectl)");
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/{target} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_docs(&String::from_utf8_lossy(&out.stdout), target)
}

fn kind(o: &Value) -> &str {
    o["kind"].as_str().unwrap_or_default()
}
fn name(o: &Value) -> &str {
    o["metadata"]["name"].as_str().unwrap_or_default()
}
fn namespace(o: &Value) -> &str {
    o["metadata"]["namespace"].as_str().unwrap_or_default()
}
fn id(o: &Value) -> String {
    format!("{}/{}/{}", kind(o), namespace(o), name(o))
}
fn of_kind<'a>(objs: &'a [Value], k: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    objs.iter().filter(move |o| kind(o) == k)
}
fn find<'a>(objs: &'a [Value], k: &str, ns: &str, n: &str) -> Option<&'a Value> {
    objs.iter()
        .find(|o| kind(o) == k && name(o) == n && (ns.is_empty() || namespace(o) == ns))
}
fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}
fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A metav1.LabelSelector (matchLabels and matchExpressions) against a label set.
fn selector_matches(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = labels_selector_matches(&selector["matchLabels"], labels);
    let by_exprs = selector["matchExpressions"]
        .as_array()
        .map(|exprs| {
            exprs.iter().all(|e| {
                let key = e["key"].as_str().unwrap_or_default();
                let values = strs(&e["values"]);
                let value = labels.get(key);
                match e["operator"].as_str().unwrap_or_default() {
                    "In" => value.is_some_and(|v| values.contains(v)),
                    "NotIn" => value.is_none_or(|v| !values.contains(v)),
                    "Exists" => value.is_some(),
                    "DoesNotExist" => value.is_none(),
                    other => panic!("unknown selector operator {other}"),
                }
            })
        })
        .unwrap_or(true);
    by_labels && by_exprs
}

/// A Service-style selector (a plain map) against a label set; an empty one matches nothing
/// here, since none of ours is meant to be empty.
fn labels_selector_matches(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    let wanted = self::labels(selector);
    wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Pod templates of the Deployments: (deployment, namespace, pod labels, pod spec).
fn pod_templates(objs: &[Value]) -> Vec<(&Value, &str, BTreeMap<String, String>, &Value)> {
    of_kind(objs, "Deployment")
        .map(|d| {
            (
                d,
                namespace(d),
                labels(&d["spec"]["template"]["metadata"]["labels"]),
                &d["spec"]["template"]["spec"],
            )
        })
        .collect()
}

/// Container port names and numbers of a pod spec.
fn container_ports(spec: &Value) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for c in spec["containers"].as_array().into_iter().flatten() {
        for p in c["ports"].as_array().into_iter().flatten() {
            if let (Some(n), Some(port)) = (p["name"].as_str(), p["containerPort"].as_u64()) {
                out.insert(n.to_owned(), port);
            }
        }
    }
    out
}

/// Whether `port` (a name or a number) is declared by the pod spec.
fn declares_port(spec: &Value, port: &Value) -> bool {
    let ports = container_ports(spec);
    match port {
        Value::String(n) => ports.contains_key(n),
        Value::Number(n) => ports.values().any(|p| Some(*p) == n.as_u64()),
        _ => false,
    }
}

/// The binary a container runs, from its image name.
fn binary_of(container: &Value) -> &'static str {
    let image = container["image"].as_str().unwrap_or_default();
    if image.contains("metrics-adapter") {
        ADAPTER
    } else if image.contains("limiter") {
        LIMITER
    } else {
        panic!(
            "container {} runs an unknown image {image}",
            container["name"]
        )
    }
}

/// Environment variable names a binary reads as flags: every `[env: NAME=]` of its `--help`.
fn help_envs(binary: &str) -> BTreeSet<String> {
    let args: &[&str] = if binary == ADAPTER {
        &["serve", "--help"]
    } else {
        &["--help"]
    };
    let out = Command::new(workspace_bin(binary))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{binary} --help: {e}"));
    assert!(out.status.success(), "{binary} --help failed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut names = BTreeSet::new();
    for part in text.split("[env: ").skip(1) {
        let end = part.find(['=', ']']).unwrap_or(part.len());
        names.insert(part[..end].trim().to_owned());
    }
    assert!(!names.is_empty(), "{binary} --help lists no env vars");
    names
}

/// Whether a crate's sources contain `needle`.
fn source_contains(krate: &str, needle: &str) -> bool {
    fn walk(dir: &Path, needle: &str) -> bool {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, needle)
                } else {
                    p.extension().is_some_and(|x| x == "rs")
                        && std::fs::read_to_string(&p).is_ok_and(|s| s.contains(needle))
                }
            })
    }
    walk(&root().join(krate).join("src"), needle)
}

/// Whether a binary reads `var` other than as a flag: named as a string literal in its crate
/// (`std::env::var`), or `RUST_LOG`, which tracing-subscriber's `EnvFilter::from_default_env`
/// reads.
fn read_directly(krate: &str, var: &str) -> bool {
    source_contains(krate, &format!("\"{var}\""))
        || (var == "RUST_LOG" && source_contains(krate, "from_default_env"))
}

/// The crate directory of a binary.
fn crate_of(binary: &str) -> &'static str {
    if binary == ADAPTER {
        "metrics-adapter"
    } else {
        "limiter"
    }
}

/// Keys of the example Secret (not rendered: it is not applied by kustomize).
fn example_secret() -> Value {
    yaml_docs(
        &read("deploy/base/limiter/secret.example.yaml"),
        "secret.example.yaml",
    )
    .remove(0)
}

/// Every environment variable a container gets: (name, value if literal, where from).
fn container_env(objs: &[Value], ns: &str, container: &Value) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for from in container["envFrom"].as_array().into_iter().flatten() {
        if let Some(cm) = from["configMapRef"]["name"].as_str() {
            let cm = find(objs, "ConfigMap", ns, cm)
                .unwrap_or_else(|| panic!("envFrom ConfigMap {ns}/{cm} is not in the manifests"));
            for (k, v) in cm["data"].as_object().into_iter().flatten() {
                out.push((k.clone(), v.as_str().map(str::to_owned)));
            }
        }
        if let Some(secret) = from["secretRef"]["name"].as_str() {
            let example = example_secret();
            assert_eq!(
                name(&example),
                secret,
                "envFrom Secret {secret} is not the one secret.example.yaml documents"
            );
            for (k, _) in example["stringData"].as_object().into_iter().flatten() {
                out.push((k.clone(), None));
            }
        }
    }
    for e in container["env"].as_array().into_iter().flatten() {
        out.push((
            e["name"].as_str().unwrap_or_default().to_owned(),
            e["value"].as_str().map(str::to_owned),
        ));
    }
    out
}

fn port_of_addr(addr: &str) -> Option<u64> {
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}

#[test]
fn generated_copies_equal_their_sources() {
    assert_eq!(
        read("deploy/base/metrics-adapter/config.yaml"),
        read("metrics-adapter/config/default.yaml"),
        "deploy/base/metrics-adapter/config.yaml is stale: run python3 deploy/tools/generate.py"
    );
    assert_eq!(
        read("deploy/base/monitoring/dashboards/openclaw.json"),
        read("alerts/dashboards/openclaw.json"),
        "the dashboard copy is stale: run python3 deploy/tools/generate.py"
    );
    let mut rule_files: Vec<PathBuf> = std::fs::read_dir(root().join("alerts/rules"))
        .expect("alerts/rules")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    rule_files.sort();
    assert!(!rule_files.is_empty());
    let mut groups = Vec::new();
    for f in &rule_files {
        let doc = yaml_docs(&std::fs::read_to_string(f).unwrap(), "rule file").remove(0);
        groups.extend(doc["groups"].as_array().cloned().unwrap_or_default());
    }
    for target in TARGETS {
        let objs = render(target);
        let rule = of_kind(&objs, "PrometheusRule")
            .next()
            .unwrap_or_else(|| panic!("{target}: no PrometheusRule"));
        assert_eq!(
            rule["spec"]["groups"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
            groups,
            "{target}: the PrometheusRule's groups differ from alerts/rules/*.yaml: run python3 deploy/tools/generate.py"
        );
        // What kustomize put into the ConfigMaps is the source, byte for byte.
        let adapter_cm = find(
            &objs,
            "ConfigMap",
            "openclaw",
            "openclaw-metrics-adapter-config",
        )
        .expect("adapter ConfigMap");
        assert_eq!(
            adapter_cm["data"]["config.yaml"].as_str(),
            Some(read("metrics-adapter/config/default.yaml").as_str()),
            "{target}: adapter ConfigMap"
        );
        let dashboards: Vec<&Value> = of_kind(&objs, "ConfigMap")
            .filter(|c| c["metadata"]["labels"]["grafana_dashboard"] == "1")
            .collect();
        assert_eq!(dashboards.len(), 1, "{target}: one dashboard ConfigMap");
        assert_eq!(
            dashboards[0]["data"]["openclaw.json"].as_str(),
            Some(read("alerts/dashboards/openclaw.json").as_str()),
            "{target}: dashboard ConfigMap"
        );
    }
}

#[test]
fn every_env_var_and_port_in_the_manifests_is_one_the_binaries_read() {
    let limiter_envs = help_envs(LIMITER);
    let adapter_envs = help_envs(ADAPTER);
    let mut unknown = BTreeSet::new();
    for target in TARGETS {
        let objs = render(target);
        for (d, ns, _, spec) in pod_templates(&objs) {
            for c in spec["containers"].as_array().into_iter().flatten() {
                let binary = binary_of(c);
                let known = if binary == ADAPTER {
                    &adapter_envs
                } else {
                    &limiter_envs
                };
                let env = container_env(&objs, ns, c);
                let mut defined = BTreeSet::new();
                for (var, value) in &env {
                    // The binaries' own settings must be flags (house style: clap documents
                    // the whole surface); others (downward API, RUST_LOG) may be read directly.
                    let read = known.contains(var)
                        || (!var.starts_with("OPENCLAW_")
                            && var != "BUCKET_CAPACITY"
                            && var != "REFILL_INTERVAL_MS"
                            && read_directly(crate_of(binary), var));
                    if !read {
                        unknown.insert(format!("{binary}: {var} (set in {target} {})", id(d)));
                    }
                    // $(VAR) references must name a variable defined before (Kubernetes
                    // leaves them unexpanded otherwise).
                    if let Some(v) = value {
                        for r in v.split("$(").skip(1) {
                            let referenced = r.split(')').next().unwrap_or_default();
                            assert!(
                                defined.contains(referenced),
                                "{target} {}: {var} references $({referenced}) before it is defined",
                                id(d)
                            );
                        }
                    }
                    defined.insert(var.clone());
                }
                // Ports: every declared port is one the binary listens on.
                let value_of = |k: &str| {
                    env.iter()
                        .rev()
                        .find(|(n, _)| n == k)
                        .and_then(|(_, v)| v.clone())
                };
                let ports = container_ports(spec);
                let expected: BTreeMap<&str, u64> = if binary == LIMITER {
                    [
                        (
                            "http",
                            value_of("OPENCLAW_LISTEN")
                                .and_then(|a| port_of_addr(&a))
                                .unwrap_or(8080),
                        ),
                        (
                            "peer",
                            value_of("OPENCLAW_PEER_LISTEN")
                                .and_then(|a| port_of_addr(&a))
                                .unwrap_or(8081),
                        ),
                        (
                            "grpc",
                            value_of("OPENCLAW_GRPC_LISTEN")
                                .and_then(|a| port_of_addr(&a))
                                .unwrap_or(8082),
                        ),
                    ]
                    .into()
                } else {
                    [(
                        "https",
                        value_of("OPENCLAW_ADAPTER_SECURE_PORT")
                            .and_then(|p| p.parse().ok())
                            .unwrap_or(6443),
                    )]
                    .into()
                };
                for (pname, port) in &ports {
                    assert_eq!(
                        expected.get(pname.as_str()),
                        Some(port),
                        "{target} {}: container port {pname}={port} is not what {binary} listens on ({expected:?})",
                        id(d)
                    );
                }
                for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
                    let p = &c[probe]["httpGet"];
                    if !p.is_null() {
                        assert!(
                            declares_port(spec, &p["port"]),
                            "{target} {}: {probe} port {} is not declared",
                            id(d),
                            p["port"]
                        );
                    }
                }
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "environment variables the binaries do not read (not in `--help`):\n  {}",
        unknown.into_iter().collect::<Vec<_>>().join("\n  ")
    );
}

#[test]
fn the_limiter_and_adapter_accept_the_deployed_configuration() {
    let objs = render("overlays/production");
    let dir = tempfile::tempdir().unwrap();
    let policies = find(&objs, "ConfigMap", "openclaw", "openclaw-limiter-policies")
        .expect("policies ConfigMap");
    let policies_file = dir.path().join("policies.yaml");
    std::fs::write(
        &policies_file,
        policies["data"]["policies.yaml"].as_str().unwrap(),
    )
    .unwrap();
    let rls_dir = dir.path().join("rls");
    write_config_map_files(&objs, "openclaw-limiter-rls", &rls_dir);
    let limiter = find(&objs, "Deployment", "openclaw", LIMITER).unwrap();
    let container = &limiter["spec"]["template"]["spec"]["containers"][0];
    // The deployed environment, with the pod-only paths moved to the temporary directory and
    // real-looking secrets (the example's placeholders are refused, see below).
    let check = |api_key: &str| {
        let mut cmd = Command::new(workspace_bin(LIMITER));
        cmd.arg("--check-config").env_clear();
        for (var, value) in container_env(&objs, "openclaw", container) {
            let value = match var.as_str() {
                "OPENCLAW_POLICIES" => policies_file.display().to_string(),
                "OPENCLAW_SNAPSHOT_DIR" => dir.path().display().to_string(),
                "OPENCLAW_RLS_CONFIG" => rls_dir.display().to_string(),
                "OPENCLAW_API_KEY" => api_key.to_owned(),
                "OPENCLAW_PEER_SECRET" => "0123456789abcdef0123456789abcdef".to_owned(),
                "OPENCLAW_NODE_ID" => "openclaw-limiter-abc".to_owned(),
                "POD_NAMESPACE" => "openclaw".to_owned(),
                "POD_IP" => "10.0.0.7".to_owned(),
                _ => value
                    .unwrap_or_default()
                    .replace("$(POD_NAMESPACE)", "openclaw"),
            };
            cmd.env(var, value);
        }
        cmd.output().unwrap()
    };
    let ok = check("9f86d081884c7d659a2feaa0c55ad015");
    assert!(
        ok.status.success(),
        "openclaw-limiter --check-config refuses the deployed configuration:\n{}{}",
        String::from_utf8_lossy(&ok.stdout),
        String::from_utf8_lossy(&ok.stderr)
    );
    // The example Secret's placeholder is refused (deploy/README.md tells SREs so).
    let example = example_secret();
    let placeholder = example["stringData"]["OPENCLAW_API_KEY"].as_str().unwrap();
    let refused = check(placeholder);
    assert_eq!(
        refused.status.code(),
        Some(64),
        "the placeholder key must be refused"
    );
    assert!(String::from_utf8_lossy(&refused.stderr).contains("placeholder"));

    let adapter_cm = find(
        &objs,
        "ConfigMap",
        "openclaw",
        "openclaw-metrics-adapter-config",
    )
    .unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, adapter_cm["data"]["config.yaml"].as_str().unwrap()).unwrap();
    let out = Command::new(workspace_bin(ADAPTER))
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "adapter check-config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The limiter Deployment's pod spec, its container, and the container's environment (a
/// value for literals, `None` for what comes from elsewhere).
fn limiter_pod(objs: &[Value]) -> (&Value, &Value, BTreeMap<String, Option<String>>) {
    let deployment = find(objs, "Deployment", "openclaw", LIMITER).unwrap();
    let spec = &deployment["spec"]["template"]["spec"];
    let container = &spec["containers"][0];
    let env = container_env(objs, "openclaw", container)
        .into_iter()
        .collect();
    (spec, container, env)
}

/// `OPENCLAW_PEER_TLS_SERVER_NAME` as deployed, or its default.
fn peer_server_name(env: &BTreeMap<String, Option<String>>) -> String {
    env.get("OPENCLAW_PEER_TLS_SERVER_NAME")
        .cloned()
        .flatten()
        .unwrap_or_else(|| "openclaw-peer".to_owned())
}

/// The one volume the three `OPENCLAW_PEER_TLS_*` files are read from. Each file has the name
/// cert-manager writes (`tls.crt`, `tls.key`, `ca.crt`: in a Secret, and from the csi-driver
/// by default), under a directory mount (a `subPath` mount never sees renewals).
fn peer_tls_volume<'a>(
    spec: &'a Value,
    container: &Value,
    env: &BTreeMap<String, Option<String>>,
) -> &'a Value {
    let mut volumes = BTreeSet::new();
    for (var, file) in [
        ("OPENCLAW_PEER_TLS_CERT", "tls.crt"),
        ("OPENCLAW_PEER_TLS_KEY", "tls.key"),
        ("OPENCLAW_PEER_TLS_CA", "ca.crt"),
    ] {
        let path = env
            .get(var)
            .cloned()
            .flatten()
            .unwrap_or_else(|| panic!("{var} is not set to a literal"));
        let (dir, name) = path.rsplit_once('/').unwrap();
        assert_eq!(name, file, "{var}={path}: cert-manager writes `{file}`");
        let mount = container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["mountPath"] == dir)
            .unwrap_or_else(|| panic!("{var}={path}: nothing is mounted at {dir}"));
        assert!(
            mount["subPath"].is_null(),
            "a subPath mount never sees renewals"
        );
        volumes.insert(mount["name"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        volumes.len(),
        1,
        "the three files come from one volume: {volumes:?}"
    );
    let name = volumes.pop_first().unwrap();
    spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == name.as_str())
        .unwrap_or_else(|| panic!("volume {name} is not declared"))
}

/// The opt-in peer mTLS component: the three `OPENCLAW_PEER_TLS_*` files are the keys
/// cert-manager writes into the Secret the Deployment mounts, that Secret is the one a
/// Certificate from a CA issuer fills, the certificate carries the server name peers check and
/// both usages, and the limiter accepts the deployed variables with such files in place (and
/// without the peer secret: mTLS alone authenticates).
#[test]
fn the_peer_mtls_component_mounts_the_certificate_the_limiter_is_told_to_read() {
    let objs = render(PEER_MTLS);
    let (spec, container, env) = limiter_pod(&objs);
    let server_name = peer_server_name(&env);
    let volume = peer_tls_volume(spec, container, &env);
    let secret = volume["secret"]["secretName"]
        .as_str()
        .unwrap_or_else(|| panic!("volume {} is not a Secret", volume["name"]));

    let certificate = of_kind(&objs, "Certificate")
        .find(|c| c["spec"]["secretName"] == secret)
        .unwrap_or_else(|| panic!("no Certificate fills Secret {secret}"));
    let cert_spec = &certificate["spec"];
    assert!(
        strs(&cert_spec["dnsNames"]).contains(&server_name),
        "{}: dnsNames lack the peer server name {server_name}",
        id(certificate)
    );
    let usages = strs(&cert_spec["usages"]);
    for usage in ["server auth", "client auth"] {
        assert!(
            usages.iter().any(|u| u == usage),
            "{}: usages lack {usage}",
            id(certificate)
        );
    }
    assert_peer_ca_issuer(&objs, cert_spec["issuerRef"]["name"].as_str().unwrap());
    let dns_names = strs(&cert_spec["dnsNames"]);
    let output = check_config_with_peer_certificate(&objs, &env, &dns_names);
    assert!(
        output.status.success(),
        "openclaw-limiter --check-config refuses {PEER_MTLS}'s configuration:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The Issuer `name` is in the manifests and is a CA issuer whose CA a CA Certificate fills (so
/// that `ca.crt` of what it issues is the peer CA).
fn assert_peer_ca_issuer(objs: &[Value], name: &str) {
    let issuer = find(objs, "Issuer", "openclaw", name)
        .unwrap_or_else(|| panic!("the peer certificates' Issuer {name} is not in the manifests"));
    let ca_secret = issuer["spec"]["ca"]["secretName"]
        .as_str()
        .unwrap_or_else(|| {
            panic!(
                "{}: not a CA issuer (ca.crt would not be the peer CA)",
                id(issuer)
            )
        });
    assert!(
        of_kind(objs, "Certificate")
            .any(|c| c["spec"]["secretName"] == ca_secret && c["spec"]["isCA"] == true),
        "the peer CA Secret {ca_secret} is not filled by a CA Certificate"
    );
}

/// The node id the consistency tests give the limiter (a pod name).
const POD_NAME: &str = "openclaw-limiter-abc";

/// Runs `openclaw-limiter --check-config` in the deployed environment `env`, with peer files
/// like cert-manager's (a CA, and a certificate for `dns_names` with client and server
/// authentication) at temporary paths.
fn check_config_with_peer_certificate(
    objs: &[Value],
    env: &BTreeMap<String, Option<String>>,
    dns_names: &[String],
) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(dns_names.to_vec()).unwrap();
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let leaf = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.path().join("tls.crt"), leaf.pem()).unwrap();
    std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("ca.crt"), ca.pem()).unwrap();
    let policies = dir.path().join("policies.yaml");
    let policies_map = find(objs, "ConfigMap", "openclaw", "openclaw-limiter-policies").unwrap();
    std::fs::write(
        &policies,
        policies_map["data"]["policies.yaml"].as_str().unwrap(),
    )
    .unwrap();
    let rls_dir = dir.path().join("rls");
    write_config_map_files(objs, "openclaw-limiter-rls", &rls_dir);
    let mut cmd = Command::new(workspace_bin(LIMITER));
    cmd.arg("--check-config").env_clear();
    for (var, value) in env {
        let value = match var.as_str() {
            "OPENCLAW_PEER_TLS_CERT" => dir.path().join("tls.crt").display().to_string(),
            "OPENCLAW_PEER_TLS_KEY" => dir.path().join("tls.key").display().to_string(),
            "OPENCLAW_PEER_TLS_CA" => dir.path().join("ca.crt").display().to_string(),
            "OPENCLAW_POLICIES" => policies.display().to_string(),
            "OPENCLAW_SNAPSHOT_DIR" => dir.path().display().to_string(),
            "OPENCLAW_RLS_CONFIG" => rls_dir.display().to_string(),
            "OPENCLAW_API_KEY" => "9f86d081884c7d659a2feaa0c55ad015".to_owned(),
            // mTLS alone: the secret may be dropped from the Secret with this component.
            "OPENCLAW_PEER_SECRET" => continue,
            "OPENCLAW_NODE_ID" => POD_NAME.to_owned(),
            "POD_NAMESPACE" => "openclaw".to_owned(),
            "POD_IP" => "10.0.0.7".to_owned(),
            _ => value
                .clone()
                .unwrap_or_default()
                .replace("$(POD_NAMESPACE)", "openclaw"),
        };
        cmd.env(var, value);
    }
    cmd.output().unwrap()
}

/// With `components/peer-mtls-per-pod` each pod's certificate comes from cert-manager's
/// csi-driver, issued for that pod by the peer CA, naming the peer server name and the pod
/// (`<pod name>.<server name>`); the limiter takes messages only from the node a certificate
/// names (`OPENCLAW_PEER_TLS_BIND_NODE`), and its node id is the pod name, so the names
/// agree. No shared peer certificate is issued any more. `--check-config` accepts what the
/// driver would issue for this pod, and refuses what it would issue for another.
#[test]
fn the_per_pod_peer_mtls_component_issues_each_pod_a_certificate_naming_its_node() {
    let objs = render(PEER_MTLS_PER_POD);
    let (spec, container, env) = limiter_pod(&objs);
    let literal = |var: &str| env.get(var).cloned().flatten();
    assert_eq!(
        literal("OPENCLAW_PEER_TLS_BIND_NODE").as_deref(),
        Some("true")
    );
    let node_id = container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "OPENCLAW_NODE_ID")
        .expect("OPENCLAW_NODE_ID is set");
    assert_eq!(
        node_id["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name",
        "the node id must be the pod name the certificate names"
    );
    let server_name = peer_server_name(&env);
    let volume = peer_tls_volume(spec, container, &env);
    assert!(volume["secret"].is_null(), "still a Secret: {volume}");
    assert_eq!(volume["csi"]["driver"], "csi.cert-manager.io", "{volume}");
    let attributes = &volume["csi"]["volumeAttributes"];
    for key in ["certificate-file", "key-file", "ca-file"] {
        assert!(
            attributes[format!("csi.cert-manager.io/{key}")].is_null(),
            "{key} set: the paths above assume the driver's default file names"
        );
    }
    assert_eq!(attributes["csi.cert-manager.io/issuer-kind"], "Issuer");
    assert_peer_ca_issuer(
        &objs,
        attributes["csi.cert-manager.io/issuer-name"]
            .as_str()
            .expect("an issuer-name attribute"),
    );
    let list = |key: &str| -> Vec<String> {
        attributes[format!("csi.cert-manager.io/{key}")]
            .as_str()
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_owned())
            .collect()
    };
    let usages = list("key-usages");
    for usage in ["server auth", "client auth"] {
        assert!(usages.iter().any(|u| u == usage), "key-usages lack {usage}");
    }
    let dns_names = list("dns-names");
    assert!(dns_names.contains(&server_name), "{dns_names:?}");
    assert!(
        dns_names.contains(&format!("${{POD_NAME}}.{server_name}")),
        "{dns_names:?} do not name the pod"
    );
    assert!(
        !of_kind(&objs, "Certificate").any(|c| strs(&c["spec"]["dnsNames"]).contains(&server_name)),
        "a shared peer certificate is still issued: its key could speak for every replica"
    );

    let issued_for = |pod: &str| -> Vec<String> {
        dns_names
            .iter()
            .map(|n| n.replace("${POD_NAME}", pod))
            .collect()
    };
    let output = check_config_with_peer_certificate(&objs, &env, &issued_for(POD_NAME));
    assert!(
        output.status.success(),
        "openclaw-limiter --check-config refuses {PEER_MTLS_PER_POD}'s configuration:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let other =
        check_config_with_peer_certificate(&objs, &env, &issued_for("openclaw-limiter-xyz"));
    let said = String::from_utf8_lossy(&other.stderr);
    assert!(
        !other.status.success() && said.contains(&format!("`{POD_NAME}.{server_name}`")),
        "another pod's certificate was accepted, or refused for another reason:\n{said}"
    );
}

#[test]
fn selectors_ports_and_references_resolve_to_objects_that_exist() {
    for target in TARGETS {
        let objs = render(target);
        let pods = pod_templates(&objs);
        // Each Deployment selects its own pods and no other Deployment's (stable vs canary).
        for (d, ns, pod_labels, _) in &pods {
            assert!(
                selector_matches(&d["spec"]["selector"], pod_labels),
                "{target} {}: selector does not match its own template",
                id(d)
            );
            for (other, other_ns, other_labels, _) in &pods {
                if id(other) != id(d) && ns == other_ns {
                    assert!(
                        !selector_matches(&d["spec"]["selector"], other_labels),
                        "{target}: {} selects the pods of {}",
                        id(d),
                        id(other)
                    );
                }
            }
        }
        // Services select pods that declare every target port.
        for svc in of_kind(&objs, "Service") {
            let selected: Vec<_> = pods
                .iter()
                .filter(|(_, ns, l, _)| {
                    *ns == namespace(svc) && labels_selector_matches(&svc["spec"]["selector"], l)
                })
                .collect();
            assert!(
                !selected.is_empty(),
                "{target} {}: selects no pods",
                id(svc)
            );
            for port in svc["spec"]["ports"].as_array().into_iter().flatten() {
                for (d, _, _, spec) in &selected {
                    assert!(
                        declares_port(spec, &port["targetPort"]),
                        "{target} {}: targetPort {} not declared by {}",
                        id(svc),
                        port["targetPort"],
                        id(d)
                    );
                }
            }
        }
        // PDBs and NetworkPolicies select pods; NetworkPolicy ports are declared.
        for k in ["PodDisruptionBudget", "NetworkPolicy"] {
            for o in of_kind(&objs, k) {
                let sel = if k == "NetworkPolicy" {
                    &o["spec"]["podSelector"]
                } else {
                    &o["spec"]["selector"]
                };
                let selected: Vec<_> = pods
                    .iter()
                    .filter(|(_, ns, l, _)| *ns == namespace(o) && selector_matches(sel, l))
                    .collect();
                assert!(!selected.is_empty(), "{target} {}: selects no pods", id(o));
                for rule in o["spec"]["ingress"].as_array().into_iter().flatten() {
                    for p in rule["ports"].as_array().into_iter().flatten() {
                        for (d, _, _, spec) in &selected {
                            assert!(
                                declares_port(spec, &p["port"]),
                                "{target} {}: port {} not declared by {}",
                                id(o),
                                p["port"],
                                id(d)
                            );
                        }
                    }
                    for from in rule["from"].as_array().into_iter().flatten() {
                        if !from["podSelector"].is_null() && from["namespaceSelector"].is_null() {
                            assert!(
                                pods.iter().any(|(_, ns, l, _)| *ns == namespace(o)
                                    && selector_matches(&from["podSelector"], l)),
                                "{target} {}: a `from` podSelector matches no pod",
                                id(o)
                            );
                        }
                    }
                }
            }
        }
        // The HPA scales a Deployment that exists, and only the stable track.
        let hpas: Vec<_> = of_kind(&objs, "HorizontalPodAutoscaler").collect();
        assert_eq!(hpas.len(), 1, "{target}: one HPA");
        let hpa = hpas[0];
        assert_eq!(
            name(hpa),
            "openclaw-hpa",
            "alerts/ watches HPA openclaw-hpa"
        );
        assert_eq!(hpa["apiVersion"], "autoscaling/v2");
        let scaled = find(
            &objs,
            "Deployment",
            namespace(hpa),
            hpa["spec"]["scaleTargetRef"]["name"].as_str().unwrap(),
        )
        .unwrap_or_else(|| panic!("{target}: the HPA's target does not exist"));
        assert_eq!(name(scaled), LIMITER);
        assert!(
            scaled["spec"]["replicas"].is_null(),
            "{target}: the HPA's Deployment must not set replicas (every apply would reset them)"
        );
        // ServiceMonitors: select a Service with the endpoint's port; the job is one alerts/
        // expects. The Prometheus Operator takes the job from the Service label named by
        // jobLabel, else from the Service's name.
        let mut jobs = BTreeSet::new();
        for sm in of_kind(&objs, "ServiceMonitor") {
            let services: Vec<_> = of_kind(&objs, "Service")
                .filter(|s| {
                    namespace(s) == namespace(sm)
                        && selector_matches(
                            &sm["spec"]["selector"],
                            &labels(&s["metadata"]["labels"]),
                        )
                })
                .collect();
            assert_eq!(
                services.len(),
                1,
                "{target} {}: selects {} Services (exactly one expected)",
                id(sm),
                services.len()
            );
            let svc = services[0];
            for ep in sm["spec"]["endpoints"].as_array().into_iter().flatten() {
                let port = ep["port"].as_str().unwrap_or_default();
                assert!(
                    svc["spec"]["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|p| p["name"] == port),
                    "{target} {}: endpoint port {port} is not a port of {}",
                    id(sm),
                    id(svc)
                );
            }
            let job = match sm["spec"]["jobLabel"].as_str() {
                Some(l) => svc["metadata"]["labels"][l]
                    .as_str()
                    .unwrap_or_else(|| panic!("{target}: {} has no label {l}", id(svc)))
                    .to_owned(),
                None => name(svc).to_owned(),
            };
            jobs.insert(job);
        }
        assert_eq!(
            jobs,
            JOBS.iter().map(|s| s.to_string()).collect(),
            "{target}: scrape jobs"
        );
        // Volumes name ConfigMaps that exist; the Secret volume names the certificate's Secret.
        for (d, ns, _, spec) in &pods {
            for v in spec["volumes"].as_array().into_iter().flatten() {
                if let Some(cm) = v["configMap"]["name"].as_str() {
                    assert!(
                        find(&objs, "ConfigMap", ns, cm).is_some(),
                        "{target} {}: volume ConfigMap {cm} missing",
                        id(d)
                    );
                }
                if let Some(secret) = v["secret"]["secretName"].as_str() {
                    assert!(
                        of_kind(&objs, "Certificate").any(|c| c["spec"]["secretName"] == secret),
                        "{target} {}: Secret {secret} is made by no Certificate",
                        id(d)
                    );
                }
            }
            let sa = spec["serviceAccountName"].as_str().unwrap_or_default();
            assert!(
                find(&objs, "ServiceAccount", ns, sa).is_some(),
                "{target} {}: ServiceAccount {sa} missing",
                id(d)
            );
        }
    }
}

#[test]
fn pod_templates_meet_the_restricted_pod_security_standard() {
    for target in TARGETS {
        let objs = render(target);
        for (d, _, _, spec) in pod_templates(&objs) {
            let pod = &spec["securityContext"];
            assert_eq!(pod["runAsNonRoot"], true, "{target} {}", id(d));
            assert_eq!(
                pod["seccompProfile"]["type"],
                "RuntimeDefault",
                "{target} {}",
                id(d)
            );
            assert!(pod["runAsUser"].as_u64().is_some_and(|u| u > 0));
            for c in spec["containers"].as_array().into_iter().flatten() {
                let sc = &c["securityContext"];
                assert_eq!(sc["allowPrivilegeEscalation"], false, "{target} {}", id(d));
                assert_eq!(sc["readOnlyRootFilesystem"], true, "{target} {}", id(d));
                assert_eq!(
                    strs(&sc["capabilities"]["drop"]),
                    ["ALL"],
                    "{target} {}",
                    id(d)
                );
                for k in ["requests", "limits"] {
                    assert!(
                        c["resources"][k]["memory"].is_string(),
                        "{target} {}: {k}.memory",
                        id(d)
                    );
                }
            }
            let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
            let pre_stop = spec["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
                .as_u64()
                .unwrap_or(0);
            assert!(
                pre_stop + 15 <= grace,
                "{target} {}: preStop {pre_stop}s leaves under 15 s of the {grace}s grace for draining and the final snapshot",
                id(d)
            );
        }
    }
}

#[test]
fn the_adapter_registration_and_rbac_follow_the_external_metrics_contract() {
    for target in TARGETS {
        let objs = render(target);
        let api = find(&objs, "APIService", "", "v1beta1.external.metrics.k8s.io")
            .unwrap_or_else(|| panic!("{target}: APIService"));
        let spec = &api["spec"];
        assert_eq!(spec["group"], "external.metrics.k8s.io");
        assert_eq!(spec["version"], "v1beta1");
        assert_eq!(spec["groupPriorityMinimum"], 100);
        assert_eq!(spec["versionPriority"], 100);
        let trusted = spec["caBundle"].is_string()
            || spec["insecureSkipTLSVerify"] == true
            || api["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].is_string();
        assert!(
            trusted,
            "{target}: the APIService has no way to trust the adapter"
        );
        if let Some(from) =
            api["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].as_str()
        {
            let (ns, cert) = from.split_once('/').unwrap();
            let cert = find(&objs, "Certificate", ns, cert)
                .unwrap_or_else(|| panic!("{target}: inject-ca-from names a missing Certificate"));
            let svc_dns = format!(
                "{}.{}.svc",
                spec["service"]["name"].as_str().unwrap(),
                spec["service"]["namespace"].as_str().unwrap()
            );
            assert!(
                strs(&cert["spec"]["dnsNames"]).contains(&svc_dns),
                "{target}: certificate lacks SAN {svc_dns}"
            );
        }
        let svc_ns = spec["service"]["namespace"].as_str().unwrap();
        let svc = find(
            &objs,
            "Service",
            svc_ns,
            spec["service"]["name"].as_str().unwrap(),
        )
        .unwrap_or_else(|| panic!("{target}: the APIService's Service is missing"));
        let port = spec["service"]["port"].as_u64().unwrap_or(443);
        let svc_port = svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["port"].as_u64() == Some(port))
            .unwrap_or_else(|| panic!("{target}: Service has no port {port}"));
        assert_eq!(port, 443);
        let adapter = find(&objs, "Deployment", svc_ns, ADAPTER).unwrap();
        let pod_spec = &adapter["spec"]["template"]["spec"];
        assert_eq!(
            container_ports(pod_spec).get(svc_port["targetPort"].as_str().unwrap()),
            Some(&6443)
        );
        let sa = pod_spec["serviceAccountName"].as_str().unwrap();
        let is_adapter = |s: &Value| {
            s["kind"] == "ServiceAccount" && s["name"] == sa && s["namespace"] == svc_ns
        };
        let bound =
            |k: &str, ns: &str, role_kind: &str, role: &str, subject: &dyn Fn(&Value) -> bool| {
                of_kind(&objs, k).any(|b| {
                    namespace(b) == ns
                        && b["roleRef"]["kind"] == role_kind
                        && b["roleRef"]["name"] == role
                        && b["subjects"].as_array().into_iter().flatten().any(subject)
                })
            };
        assert!(
            bound(
                "ClusterRoleBinding",
                "",
                "ClusterRole",
                "system:auth-delegator",
                &is_adapter
            ),
            "{target}: auth-delegator"
        );
        assert!(
            bound(
                "RoleBinding",
                "kube-system",
                "Role",
                "extension-apiserver-authentication-reader",
                &is_adapter
            ),
            "{target}: the authentication reader RoleBinding must be in kube-system"
        );
        let hpa_controller = |s: &Value| {
            s["kind"] == "ServiceAccount"
                && s["name"] == "horizontal-pod-autoscaler"
                && s["namespace"] == "kube-system"
        };
        let reader = of_kind(&objs, "ClusterRole")
            .find(|r| {
                r["rules"].as_array().into_iter().flatten().any(|rule| {
                    strs(&rule["apiGroups"]).contains(&"external.metrics.k8s.io".to_owned())
                        && strs(&rule["verbs"]).contains(&"get".to_owned())
                        && strs(&rule["verbs"]).contains(&"list".to_owned())
                })
            })
            .unwrap_or_else(|| panic!("{target}: no ClusterRole reads external metrics"));
        assert!(
            bound(
                "ClusterRoleBinding",
                "",
                "ClusterRole",
                name(reader),
                &hpa_controller
            ),
            "{target}: the HPA controller may not read external metrics"
        );
        // The limiter may watch EndpointSlices in its namespace (discovery=kubernetes).
        let limiter = find(&objs, "Deployment", "openclaw", LIMITER).unwrap();
        let lsa = limiter["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .unwrap();
        let role = of_kind(&objs, "Role")
            .find(|r| {
                namespace(r) == "openclaw"
                    && r["rules"].as_array().into_iter().flatten().any(|rule| {
                        strs(&rule["apiGroups"]).contains(&"discovery.k8s.io".to_owned())
                            && strs(&rule["resources"]).contains(&"endpointslices".to_owned())
                            && ["get", "list", "watch"]
                                .iter()
                                .all(|v| strs(&rule["verbs"]).contains(&v.to_string()))
                    })
            })
            .unwrap_or_else(|| panic!("{target}: no Role for EndpointSlice discovery"));
        let is_limiter = |s: &Value| {
            s["kind"] == "ServiceAccount" && s["name"] == lsa && s["namespace"] == "openclaw"
        };
        assert!(bound(
            "RoleBinding",
            "openclaw",
            "Role",
            name(role),
            &is_limiter
        ));
        // The peers Service publishes not-ready replicas, so they can sync before turning ready.
        let peers = of_kind(&objs, "Service")
            .find(|s| s["spec"]["clusterIP"] == "None")
            .unwrap_or_else(|| panic!("{target}: no headless Service for peers"));
        assert_eq!(peers["spec"]["publishNotReadyAddresses"], true);
    }
}

/// External metrics of an HPA: (metric name, selector, target).
fn hpa_metrics(hpa: &Value) -> Vec<(String, Value, Value)> {
    hpa["spec"]["metrics"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            assert_eq!(m["type"], "External", "only External metrics are expected");
            (
                m["external"]["metric"]["name"].as_str().unwrap().to_owned(),
                m["external"]["metric"]["selector"].clone(),
                m["external"]["target"].clone(),
            )
        })
        .collect()
}

/// A metav1.LabelSelector as the `labelSelector` query string the HPA controller sends.
fn selector_string(sel: &Value) -> String {
    let mut parts: Vec<String> = labels(&sel["matchLabels"])
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in sel["matchExpressions"].as_array().into_iter().flatten() {
        let key = e["key"].as_str().unwrap();
        let values = strs(&e["values"]).join(",");
        parts.push(match e["operator"].as_str().unwrap() {
            "In" => format!("{key} in ({values})"),
            "NotIn" => format!("{key} notin ({values})"),
            "Exists" => key.to_owned(),
            "DoesNotExist" => format!("!{key}"),
            other => panic!("operator {other}"),
        });
    }
    parts.join(",")
}

fn selector_keys(sel: &Value) -> BTreeSet<String> {
    let mut keys: BTreeSet<String> = labels(&sel["matchLabels"]).into_keys().collect();
    for e in sel["matchExpressions"].as_array().into_iter().flatten() {
        keys.insert(e["key"].as_str().unwrap().to_owned());
    }
    keys
}

#[test]
fn the_hpa_names_metrics_the_adapter_config_serves_with_selectors_it_allows() {
    for target in TARGETS {
        let objs = render(target);
        let cm = find(
            &objs,
            "ConfigMap",
            "openclaw",
            "openclaw-metrics-adapter-config",
        )
        .unwrap();
        let config = AdapterConfig::from_yaml(cm["data"]["config.yaml"].as_str().unwrap(), target)
            .unwrap_or_else(|e| panic!("{target}: adapter config: {e}"));
        let hpa = of_kind(&objs, "HorizontalPodAutoscaler").next().unwrap();
        let metrics = hpa_metrics(hpa);
        let names: BTreeSet<&str> = metrics.iter().map(|(n, _, _)| n.as_str()).collect();
        // The request rate always; depletion only with the component: more replicas cannot
        // lower it, so scaling on it by default would ratchet to maxReplicas (deploy/README.md).
        let mut expected =
            BTreeSet::from([openclaw_common::metric_names::EXTERNAL_REQUESTS_PER_SECOND]);
        if *target == SCALE_ON_DEPLETION {
            expected.insert(openclaw_common::metric_names::EXTERNAL_TOKEN_DEPLETION_RATE);
        }
        assert_eq!(names, expected, "{target}: the HPA's metrics");
        for (metric, selector, t) in &metrics {
            let rule = config
                .rules
                .get(metric)
                .unwrap_or_else(|| panic!("{target}: the adapter config does not serve {metric}"));
            let keys = selector_keys(selector);
            assert!(
                keys.is_subset(&rule.selectable_labels),
                "{target}: {metric}: selector keys {keys:?} outside the adapter's selectable labels {:?} (the adapter answers 400)",
                rule.selectable_labels
            );
            let expected = if metric == openclaw_common::metric_names::EXTERNAL_TOKEN_DEPLETION_RATE
            {
                // A ratio: Value, not the guide's AverageValue (deploy/README.md).
                ("Value", "value", "900m")
            } else {
                ("AverageValue", "averageValue", "800")
            };
            assert_eq!(t["type"], expected.0, "{target}: {metric} target type");
            assert_eq!(t[expected.1], expected.2, "{target}: {metric} target");
        }
        assert_eq!(hpa["spec"]["maxReplicas"], 15);
        assert!(hpa["spec"]["minReplicas"].as_u64().is_some_and(|m| m >= 2));
    }
}

/// The operations guide's HPA (`tests/fixtures/operations-guide-hpa.yaml`, its apiVersion
/// aside) against what deploy/ ships: each of its selector keys is one the deployed adapter
/// config lets its metric be narrowed by, and one the limiter series carry with the value the
/// HPA asks for: the limiter ServiceMonitor copies it from the pods (podTargetLabels), and
/// every pod behind the Service it scrapes has it. (metrics_adapter_e2e runs the same HPA
/// against the real adapter and Prometheus.)
#[test]
fn the_operations_guides_hpa_selects_labels_the_deployed_series_carry() {
    let guide: Value = serde_norway::from_str(&read("tests/fixtures/operations-guide-hpa.yaml"))
        .expect("the guide's HPA fixture is YAML");
    let metrics = hpa_metrics(&guide);
    assert_eq!(metrics.len(), 2, "the guide's HPA has both metrics");
    for target in TARGETS {
        let objs = render(target);
        let cm = find(
            &objs,
            "ConfigMap",
            "openclaw",
            "openclaw-metrics-adapter-config",
        )
        .unwrap();
        let config = AdapterConfig::from_yaml(cm["data"]["config.yaml"].as_str().unwrap(), target)
            .unwrap_or_else(|e| panic!("{target}: adapter config: {e}"));
        let monitor = find(&objs, "ServiceMonitor", "openclaw", LIMITER).unwrap();
        let copied: BTreeSet<String> = strs(&monitor["spec"]["podTargetLabels"])
            .into_iter()
            .collect();
        let service = of_kind(&objs, "Service")
            .find(|svc| {
                selector_matches(
                    &monitor["spec"]["selector"],
                    &labels(&svc["metadata"]["labels"]),
                )
            })
            .unwrap_or_else(|| panic!("{target}: no Service for the limiter ServiceMonitor"));
        let scraped: Vec<_> = pod_templates(&objs)
            .into_iter()
            .filter(|(_, _, pod, _)| labels_selector_matches(&service["spec"]["selector"], pod))
            .collect();
        assert!(
            !scraped.is_empty(),
            "{target}: no pods behind {}",
            name(service)
        );
        for (metric, selector, _) in &metrics {
            let rule = config.rules.get(metric).unwrap();
            assert!(
                selector["matchExpressions"].is_null(),
                "the guide's selectors are matchLabels"
            );
            for (key, value) in labels(&selector["matchLabels"]) {
                assert!(
                    rule.selectable_labels.contains(&key),
                    "{target}: {metric} cannot be narrowed by {key:?} (selectable: {:?})",
                    rule.selectable_labels
                );
                assert!(
                    copied.contains(&key),
                    "{target}: the limiter ServiceMonitor does not copy the pod label {key:?} \
                     onto the series (podTargetLabels: {copied:?})"
                );
                for (deployment, _, pod, _) in &scraped {
                    assert_eq!(
                        pod.get(&key),
                        Some(&value),
                        "{target}: the pods of {} lack {key}={value}",
                        name(deployment)
                    );
                }
            }
        }
    }
}

/// Metric names read by an expression, with `__name__` matchers.
fn series_names(expr: &Expr, out: &mut BTreeSet<String>, jobs: &mut BTreeSet<String>) {
    fn selector(
        vs: &promql_parser::parser::VectorSelector,
        out: &mut BTreeSet<String>,
        jobs: &mut BTreeSet<String>,
    ) {
        if let Some(n) = &vs.name {
            out.insert(n.clone());
        }
        for m in &vs.matchers.matchers {
            if m.name == "__name__" {
                out.insert(m.value.clone());
            }
            if m.name == "job" {
                jobs.insert(m.value.clone());
            }
        }
    }
    match expr {
        Expr::Aggregate(a) => {
            series_names(&a.expr, out, jobs);
            if let Some(p) = &a.param {
                series_names(p, out, jobs);
            }
        }
        Expr::Unary(u) => series_names(&u.expr, out, jobs),
        Expr::Binary(b) => {
            series_names(&b.lhs, out, jobs);
            series_names(&b.rhs, out, jobs);
        }
        Expr::Paren(p) => series_names(&p.expr, out, jobs),
        Expr::Subquery(s) => series_names(&s.expr, out, jobs),
        Expr::VectorSelector(vs) => selector(vs, out, jobs),
        Expr::MatrixSelector(ms) => selector(&ms.vs, out, jobs),
        Expr::Call(c) => {
            for a in &c.args.args {
                series_names(a, out, jobs);
            }
        }
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

/// A Grafana expression with its variables expanded to something PromQL parses.
fn expand_grafana(expr: &str) -> String {
    let mut s = expr.to_owned();
    for v in ["__rate_interval", "__interval", "__range"] {
        s = s
            .replace(&format!("${{{v}}}"), "5m")
            .replace(&format!("${v}"), "5m");
    }
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'{') {
            for c in chars.by_ref() {
                if c == '}' {
                    break;
                }
            }
        } else {
            while chars
                .peek()
                .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_')
            {
                chars.next();
            }
        }
        out.push('x');
    }
    out
}

/// Every (where, PromQL) that the deployed objects make Prometheus or the adapter evaluate.
fn deployed_queries(objs: &[Value]) -> (Vec<(String, String)>, BTreeSet<String>) {
    let mut queries = Vec::new();
    let mut recorded = BTreeSet::new();
    for rule in of_kind(objs, "PrometheusRule") {
        for g in rule["spec"]["groups"].as_array().into_iter().flatten() {
            for r in g["rules"].as_array().into_iter().flatten() {
                let what = r["alert"].as_str().or(r["record"].as_str()).unwrap_or("?");
                if let Some(rec) = r["record"].as_str() {
                    recorded.insert(rec.to_owned());
                }
                queries.push((
                    format!("rule {what}"),
                    r["expr"].as_str().unwrap_or_default().to_owned(),
                ));
            }
        }
    }
    for cm in of_kind(objs, "ConfigMap") {
        if let Some(dash) = cm["data"]["openclaw.json"].as_str() {
            let dash: Value = serde_json::from_str(dash).expect("dashboard JSON");
            fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
                for p in panels.as_array().into_iter().flatten() {
                    for t in p["targets"].as_array().into_iter().flatten() {
                        out.push((
                            format!("dashboard panel {}", p["title"]),
                            expand_grafana(t["expr"].as_str().unwrap_or_default()),
                        ));
                    }
                    walk(&p["panels"], out);
                }
            }
            walk(&dash["panels"], &mut queries);
            for v in dash["templating"]["list"].as_array().into_iter().flatten() {
                let q = v["query"]["query"]
                    .as_str()
                    .or(v["query"].as_str())
                    .unwrap_or("");
                if let Some(inner) = q
                    .strip_prefix("label_values(")
                    .and_then(|r| r.rsplit_once(','))
                    .map(|(q, _)| q)
                {
                    queries.push((
                        format!("dashboard variable {}", v["name"]),
                        expand_grafana(inner),
                    ));
                }
            }
        }
        if let Some(config) = cm["data"]["config.yaml"].as_str() {
            let config = AdapterConfig::from_yaml(config, "adapter ConfigMap").unwrap();
            for (n, rule) in &config.rules {
                queries.push((format!("adapter rule {n}"), rule.query.source.clone()));
            }
        }
    }
    (queries, recorded)
}

/// Sample names of a Prometheus text exposition.
fn exposed_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or_default().to_owned())
        .collect()
}

/// A limiter started with the deployed environment (ports, paths and discovery moved to the
/// test's own), and what it needs kept alive.
struct Limiter {
    service: Service,
    api_key: String,
    peer_port: u16,
    _dir: tempfile::TempDir,
}

/// Writes every file of ConfigMap `name` (namespace openclaw) into `dir`, as the kubelet mounts
/// it.
fn write_config_map_files(objs: &[Value], name: &str, dir: &Path) {
    let config_map =
        find(objs, "ConfigMap", "openclaw", name).unwrap_or_else(|| panic!("ConfigMap {name}"));
    std::fs::create_dir_all(dir).unwrap();
    let Value::Object(data) = &config_map["data"] else {
        panic!("ConfigMap {name} has no data");
    };
    for (file, text) in data {
        std::fs::write(dir.join(file), text.as_str().expect("file text")).unwrap();
    }
}

fn start_limiters(objs: &[Value]) -> Vec<Limiter> {
    let deployment = find(objs, "Deployment", "openclaw", LIMITER).unwrap();
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let env = container_env(objs, "openclaw", container);
    let policies = find(objs, "ConfigMap", "openclaw", "openclaw-limiter-policies").unwrap()["data"]
        ["policies.yaml"]
        .as_str()
        .unwrap()
        .to_owned();
    let help = help_envs(LIMITER);
    // Two peered replicas once the limiter replicates (its --help has OPENCLAW_PEERS), so the
    // replication series exist; one replica before.
    let replicas = if help.contains("OPENCLAW_PEERS") {
        2
    } else {
        1
    };
    let peer_ports: Vec<u16> = (0..replicas).map(|_| free_port()).collect();
    let api_key = "test-api-key-0123456789abcdef".to_owned();
    (0..replicas)
        .map(|i| {
            let dir = tempfile::tempdir().unwrap();
            let policies_file = dir.path().join("policies.yaml");
            std::fs::write(&policies_file, &policies).unwrap();
            let snapshots = dir.path().join("snapshots");
            std::fs::create_dir_all(&snapshots).unwrap();
            let rls_dir = dir.path().join("rls");
            write_config_map_files(objs, "openclaw-limiter-rls", &rls_dir);
            let peers: Vec<String> = peer_ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| format!("127.0.0.1:{p}"))
                .collect();
            let mut vars: Vec<(String, String)> = Vec::new();
            for (var, value) in &env {
                // Peers come from the static list here: no cluster DNS or API to ask.
                if var == "OPENCLAW_PEER_DNS" || var == "OPENCLAW_KUBE_SERVICE" {
                    continue;
                }
                let value = match var.as_str() {
                    "OPENCLAW_LISTEN" => "127.0.0.1:0".to_owned(),
                    "OPENCLAW_PEER_LISTEN" => format!("127.0.0.1:{}", peer_ports[i]),
                    "OPENCLAW_DISCOVERY" => "static".to_owned(),
                    "OPENCLAW_POLICIES" => policies_file.display().to_string(),
                    "OPENCLAW_SNAPSHOT_DIR" => snapshots.display().to_string(),
                    "OPENCLAW_RLS_CONFIG" => rls_dir.display().to_string(),
                    "OPENCLAW_GRPC_LISTEN" => "127.0.0.1:0".to_owned(),
                    "OPENCLAW_API_KEY" => api_key.clone(),
                    "OPENCLAW_PEER_SECRET" => "peer-secret-0123456789abcdef".to_owned(),
                    "OPENCLAW_NODE_ID" => format!("replica-{i}"),
                    "POD_NAMESPACE" => "openclaw".to_owned(),
                    "POD_IP" => "127.0.0.1".to_owned(),
                    _ => value
                        .clone()
                        .unwrap_or_default()
                        .replace("$(POD_NAMESPACE)", "openclaw"),
                };
                vars.push((var.clone(), value));
            }
            vars.push(("OPENCLAW_PEERS".to_owned(), peers.join(",")));
            let refs: Vec<(&str, &str)> =
                vars.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
            let service = Service::spawn(LIMITER, &[], &refs, Duration::from_secs(20));
            Limiter {
                service,
                api_key: api_key.clone(),
                peer_port: peer_ports[i],
                _dir: dir,
            }
        })
        .collect()
}

/// Drives every code path that creates labelled series: allowed and rejected decisions, a
/// malformed request, /status, an on-demand snapshot (once it exists), a bad peer message.
fn exercise(limiter: &Limiter) {
    let http = http_client();
    let url = limiter
        .service
        .url_of("api")
        .unwrap_or(&limiter.service.url)
        .to_owned();
    let auth = format!("Bearer {}", limiter.api_key);
    for _ in 0..3 {
        let r = http
            .get(format!("{url}/rate?key=deploy-test&cost=600"))
            .header("Authorization", &auth)
            .send()
            .unwrap();
        assert!(
            r.status().as_u16() == 200 || r.status().as_u16() == 429,
            "/rate: {}",
            r.status()
        );
    }
    let bad = http
        .get(format!("{url}/rate?key=deploy-test&cost=0"))
        .header("Authorization", &auth)
        .send()
        .unwrap();
    assert!(bad.status().is_client_error());
    let _ = http
        .get(format!("{url}/status"))
        .header("Authorization", &auth)
        .send();
    let _ = http
        .post(format!("{url}/admin/snapshot"))
        .header("Authorization", &auth)
        .send();
    // An unauthenticated message to the peer listener's sync route: refused and counted.
    let _ = http
        .post(format!("http://127.0.0.1:{}/v1/sync", limiter.peer_port))
        .body("not a peer message")
        .send();
}

#[test]
fn every_series_used_is_exported_by_a_running_process_or_recorded() {
    let objs = render("overlays/canary");
    let limiters = start_limiters(&objs);
    for l in &limiters {
        exercise(l);
    }
    let http = http_client();
    let prometheus = Prometheus::start(
        &limiters
            .iter()
            .map(|l| openclaw_e2e::host_port(l.service.url_of("api").unwrap_or(&l.service.url)))
            .collect::<Vec<_>>(),
        &[],
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    let cm = find(
        &objs,
        "ConfigMap",
        "openclaw",
        "openclaw-metrics-adapter-config",
    )
    .unwrap();
    std::fs::write(&config, cm["data"]["config.yaml"].as_str().unwrap()).unwrap();
    let adapter = spawn_adapter(&prometheus.url(), &config, true, &[]);

    // The HPA's metrics, with its selectors, as the HPA controller asks for them: served by the
    // deployed config with at least one item (zero items is an error for the HPA).
    let hpa = of_kind(&objs, "HorizontalPodAutoscaler").next().unwrap();
    let discovery: Value = http
        .get(format!(
            "{}/apis/external.metrics.k8s.io/v1beta1",
            adapter.url
        ))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let served: BTreeSet<String> = discovery["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["name"].as_str().map(str::to_owned))
        .collect();
    for (metric, selector, _) in hpa_metrics(hpa) {
        assert!(
            served.contains(&metric),
            "adapter does not list {metric}: {served:?}"
        );
        let url = format!(
            "{}/apis/external.metrics.k8s.io/v1beta1/namespaces/{}/{metric}",
            adapter.url,
            namespace(hpa)
        );
        let sel = selector_string(&selector);
        // Prometheus needs two scrapes (1 s apart) before rate() answers.
        let deadline = std::time::Instant::now() + Duration::from_secs(45);
        let mut last = String::new();
        loop {
            if let Ok(r) = http.get(&url).query(&[("labelSelector", &sel)]).send() {
                let status = r.status();
                let body: Value = r.json().unwrap_or_default();
                if status.is_success() && body["items"].as_array().is_some_and(|i| !i.is_empty()) {
                    break;
                }
                last = format!("{status} {body}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the adapter never served {metric} with the HPA's selector {sel:?}; last answer: {last}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // Every series name used anywhere must be exported (by a limiter or the adapter, scraped
    // after every path ran) or recorded by a rule, or be a documented external series. Some
    // appear only after the replicas have synced once: scrape until none is missing, or report
    // what still is after the deadline.
    let (queries, recorded) = deployed_queries(&objs);
    assert!(
        queries.len() > 30,
        "too few queries found: {}",
        queries.len()
    );
    let mut used = BTreeMap::<String, BTreeSet<String>>::new();
    let mut jobs = BTreeSet::new();
    for (what, q) in &queries {
        let expr = parser::parse(q).unwrap_or_else(|e| panic!("{what}: PromQL {q:?}: {e}"));
        let mut names = BTreeSet::new();
        series_names(&expr, &mut names, &mut jobs);
        for n in names {
            used.entry(n).or_default().insert(what.clone());
        }
    }
    let external = external_series();
    let scrape = || {
        let mut exported = BTreeSet::new();
        for l in &limiters {
            let url = l.service.url_of("api").unwrap_or(&l.service.url).to_owned();
            if let Ok(r) = http.get(format!("{url}/metrics")).send() {
                exported.extend(exposed_names(&r.text().unwrap_or_default()));
            }
        }
        if let Ok(r) = http.get(format!("{}/metrics", adapter.url)).send() {
            exported.extend(exposed_names(&r.text().unwrap_or_default()));
        }
        used.iter()
            .filter(|(n, _)| {
                !exported.contains(*n) && !recorded.contains(*n) && !external.contains(*n)
            })
            .map(|(n, w)| (n.clone(), w.clone()))
            .collect::<BTreeMap<_, _>>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut missing = scrape();
    while !missing.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        missing = scrape();
    }
    for job in &jobs {
        assert!(
            JOBS.contains(&job.as_str()),
            "a query matches job={job:?}, which no ServiceMonitor produces"
        );
    }
    assert!(
        missing.is_empty(),
        "series used but neither exported by the running limiter{} and adapter nor recorded:\n  {}",
        if limiters.len() > 1 { "s" } else { "" },
        missing
            .iter()
            .map(|(n, w)| format!(
                "{n} (used by {})",
                w.iter().cloned().collect::<Vec<_>>().join(", ")
            ))
            .collect::<Vec<_>>()
            .join("\n  ")
    );
}

#[test]
fn grafana_variables_expand_to_valid_promql() {
    assert_eq!(
        expand_grafana(r#"rate(x{a=~"$policy", b="${namespace:regex}"}[$__rate_interval])"#),
        r#"rate(x{a=~"x", b="x"}[5m])"#
    );
    let mut names = BTreeSet::new();
    let mut jobs = BTreeSet::new();
    series_names(
        &parser::parse(r#"sum(rate(a_total{job="j"}[1m])) / on() group_left max({__name__="b"}) + histogram_quantile(0.9, c_bucket)"#).unwrap(),
        &mut names,
        &mut jobs,
    );
    assert_eq!(
        names,
        BTreeSet::from(["a_total".into(), "b".into(), "c_bucket".into()])
    );
    assert_eq!(jobs, BTreeSet::from(["j".into()]));
    assert_eq!(
        selector_string(
            &serde_json::json!({"matchLabels": {"a": "b"}, "matchExpressions": [
            {"key": "d", "operator": "In", "values": ["x", "y"]}, {"key": "e", "operator": "Exists"}]})
        ),
        "a=b,d in (x,y),e"
    );
}

#[test]
fn the_canary_runs_the_stable_pod_spec_with_only_the_image_and_track_changed() {
    let objs = render("overlays/canary");
    let stable = find(&objs, "Deployment", "openclaw", LIMITER).expect("stable Deployment");
    let canary = find(&objs, "Deployment", "openclaw", "openclaw-limiter-canary")
        .expect("canary Deployment");
    let strip = |d: &Value| {
        let mut d = d.clone();
        let image = d["spec"]["template"]["spec"]["containers"][0]["image"].take();
        for path in [
            "/metadata/labels",
            "/spec/selector/matchLabels",
            "/spec/template/metadata/labels",
        ] {
            d.pointer_mut(path)
                .and_then(Value::as_object_mut)
                .expect("labels")
                .remove("track");
        }
        d["metadata"]["name"].take();
        d["spec"].as_object_mut().unwrap().remove("replicas");
        (d, image)
    };
    let (s, stable_image) = strip(stable);
    let (c, canary_image) = strip(canary);
    assert_eq!(
        s, c,
        "the canary Deployment drifted from the stable one: python3 deploy/tools/generate.py"
    );
    assert_ne!(
        stable_image, canary_image,
        "the canary must run another image"
    );
    assert_eq!(canary["spec"]["replicas"], 1);
    assert_eq!(
        stable["spec"]["template"]["metadata"]["labels"]["track"],
        "stable"
    );
    assert_eq!(
        canary["spec"]["template"]["metadata"]["labels"]["track"],
        "canary"
    );
    // Both tracks behind the one Service, in one replication group, under one PDB.
    let service = find(&objs, "Service", "openclaw", LIMITER).unwrap();
    for d in [stable, canary] {
        let pod_labels = labels(&d["spec"]["template"]["metadata"]["labels"]);
        assert!(labels_selector_matches(
            &service["spec"]["selector"],
            &pod_labels
        ));
        let peers = find(&objs, "Service", "openclaw", "openclaw-limiter-peers").unwrap();
        assert!(labels_selector_matches(
            &peers["spec"]["selector"],
            &pod_labels
        ));
    }
}
