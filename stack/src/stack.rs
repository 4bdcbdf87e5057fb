//! The local stack: the limiter Deployment and its Service ([`crate::deployment`]),
//! Prometheus scraping the pods with the alert rules loaded, the metrics adapter serving the
//! external metrics API, and the kube-state-metrics series of the Deployment and the HPA.
//!
//! Start order (port 0 everywhere; each step waits for what the next one needs):
//! 1. the Deployment with N pods, the settings of `deploy/base/limiter/limiter.env` where they
//!    apply locally, peers found through one shared peers file; it waits until every pod is
//!    ready (each pulls its peers' state before `/ready`);
//! 2. the kube-state-metrics series ([`crate::kube_state`]);
//! 3. Prometheus, scraping the pods from the controller's `file_sd` file (rules from
//!    `alerts/rules/`, compressed copies when the time scale is above 1);
//! 4. the metrics adapter on plain HTTP without authentication (no Kubernetes API server here:
//!    TLS and delegated auth are what a cluster adds), asking that Prometheus, with
//!    `metrics-adapter/config/default.yaml` (compressed copy when the time scale is above 1);
//! 5. Prometheus' config rewritten to scrape the adapter and itself, and reloaded.
//!
//! [`Stack::shutdown`] stops everything in reverse order with SIGTERM (the limiters push their
//! last changes to peers); dropping a [`Stack`] kills whatever is still running.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::deployment::{Deployment, Killed, Phase, Status, Template};
use crate::kube_state::KubeState;
use crate::process::{Group, Proc};
use crate::prometheus::{Prometheus, ScrapeConfig, Target};
use crate::timescale::TimeScale;
use crate::{Error, Result};

/// Binary names.
pub const LIMITER_BIN: &str = "openclaw-limiter";
pub const ADAPTER_BIN: &str = "openclaw-metrics-adapter";

/// Limiter settings from `limiter.env` that the stack replaces: addresses, discovery and
/// paths only make sense in a pod.
const LOCAL_OVERRIDES: &[&str] = &[
    "OPENCLAW_LISTEN",
    "OPENCLAW_PEER_LISTEN",
    "OPENCLAW_DISCOVERY",
    "OPENCLAW_KUBE_SERVICE",
    "OPENCLAW_PEER_DNS",
    "OPENCLAW_PEERS",
    "OPENCLAW_PEERS_FILE",
    "OPENCLAW_SNAPSHOT_DIR",
    "OPENCLAW_POLICIES",
    "OPENCLAW_LOG_FORMAT",
    "OPENCLAW_GRPC_LISTEN",
    "OPENCLAW_RLS_CONFIG",
];

/// How to start the stack.
#[derive(Debug, Clone)]
pub struct Options {
    /// Pods the Deployment starts with.
    pub replicas: usize,
    pub time_scale: TimeScale,
    /// The repository root: `alerts/rules/`, `metrics-adapter/config/default.yaml`, `deploy/`.
    pub config_dir: PathBuf,
    /// Where `openclaw-limiter` and `openclaw-metrics-adapter` are.
    pub bin_dir: PathBuf,
    /// Logs, generated configs, Prometheus' data, snapshots.
    pub work_dir: PathBuf,
    pub group: Group,
    /// Extra limiter environment, applied last (e.g. `OPENCLAW_SYNC_INTERVAL_MS`).
    pub limiter_env: Vec<(String, String)>,
    /// Extra policies, added to `deploy/base/limiter/policies.yaml`'s (a scenario's witness
    /// clients use their own): name -> (capacity, refill interval in ms).
    pub extra_policies: Vec<(String, u64, u64)>,
}

impl Options {
    /// The defaults for this checkout: 3 replicas, real time, binaries next to `bin_dir`.
    pub fn new(config_dir: PathBuf, bin_dir: PathBuf, work_dir: PathBuf) -> Options {
        Options {
            replicas: 3,
            time_scale: TimeScale::REAL,
            config_dir,
            bin_dir,
            work_dir,
            group: Group::Own,
            limiter_env: Vec::new(),
            // The scenario's witness clients have a policy of their own.
            extra_policies: vec![(
                crate::witness::POLICY.0.to_owned(),
                crate::witness::POLICY.1,
                crate::witness::POLICY.2,
            )],
        }
    }

    fn rules_dir(&self) -> PathBuf {
        self.config_dir.join("alerts/rules")
    }

    fn adapter_config(&self) -> PathBuf {
        self.config_dir.join("metrics-adapter/config/default.yaml")
    }

    fn limiter_env_file(&self) -> PathBuf {
        self.config_dir.join("deploy/base/limiter/limiter.env")
    }

    fn policies_file(&self) -> PathBuf {
        self.config_dir.join("deploy/base/limiter/policies.yaml")
    }

    /// The rate limit service's rules (ConfigMap openclaw-limiter-rls in a pod).
    fn rls_rules_file(&self) -> PathBuf {
        self.config_dir.join("deploy/base/limiter/rls-rules.yaml")
    }
}

/// The repository root this binary was built from, if it is still there.
pub fn default_config_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    root.canonicalize().unwrap_or(root)
}

/// The running stack.
#[derive(Debug)]
pub struct Stack {
    pub options: Options,
    /// The limiter pods, their Service and their peers file.
    pub deployment: Deployment,
    pub prometheus: Prometheus,
    /// The adapter's process and `http://127.0.0.1:PORT`.
    pub adapter: Proc,
    pub adapter_url: String,
    /// The HPA's and the Deployment's kube-state-metrics series.
    pub kube_state: KubeState,
    /// The rule files and adapter config actually loaded (compressed copies or the originals).
    pub rule_files: Vec<PathBuf>,
    pub adapter_config: PathBuf,
    /// How long `up` took.
    pub startup: Duration,
}

impl Stack {
    /// Starts everything and waits until Prometheus scrapes every target.
    pub async fn up(options: Options) -> Result<Stack> {
        let started = Instant::now();
        if options.replicas == 0 || options.replicas > 32 {
            return Err(Error::Other(format!(
                "{} replicas: choose 1 to 32",
                options.replicas
            )));
        }
        let limiter_bin = binary(&options.bin_dir, LIMITER_BIN)?;
        let adapter_bin = binary(&options.bin_dir, ADAPTER_BIN)?;
        let work = &options.work_dir;
        let logs = work.join("logs");
        std::fs::create_dir_all(&logs).map_err(|e| Error::io(&logs, e))?;

        let (rule_files, adapter_config) = generate_configs(&options)?;
        let mut env = limiter_env(&options)?;
        env.push(("OPENCLAW_PEER_SECRET".into(), peer_secret()?));
        env.push((
            "RUST_LOG".into(),
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        ));
        env.extend(options.limiter_env.iter().cloned());

        // 1. The Deployment, every pod ready.
        let template = Template {
            limiter_bin,
            env,
            group: options.group,
            time_scale: options.time_scale,
            work_dir: work.clone(),
        };
        let deployment = Deployment::start(template, options.replicas)?;
        deployment
            .wait_for(
                &format!("{} limiter pods ready", options.replicas),
                Duration::from_secs(60),
                Status::settled,
            )
            .await?;

        // 2. The kube-state-metrics series.
        let kube_state = KubeState::start(deployment.watch()).await?;

        // 3. Prometheus, scraping the pods.
        let interval = options.time_scale.scrape_interval();
        let mut scrape = ScrapeConfig {
            interval,
            limiters_file: Some(deployment.template().targets_file()),
            adapter: None,
            kube_state: Some(kube_state.addr().to_string()),
            itself: None,
            rule_files: rule_files.clone(),
        };
        let mut prometheus = Prometheus::start(
            scrape.clone(),
            &work.join("prometheus"),
            &logs,
            options.group,
        )
        .await?;

        // 4. The adapter, asking that Prometheus.
        let mut cmd = Command::new(&adapter_bin);
        cmd.args([
            "serve",
            "--plain-http",
            "--bind-address",
            "127.0.0.1",
            "--secure-port",
            "0",
            "--authentication",
            "none",
            "--prometheus-url",
            prometheus.url(),
        ])
        .arg("--config")
        .arg(&adapter_config)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
        let mut adapter = Proc::spawn("metrics-adapter", cmd, &logs, options.group)?;
        let listening = adapter
            .wait_listening(&["http"], Duration::from_secs(30))
            .await?;
        let adapter_url = listening[0].1.clone();

        // 5. Scrape the adapter (and Prometheus itself) too.
        scrape.adapter = Some(Target {
            address: host_port(&adapter_url),
            pod: "metrics-adapter-0".into(),
        });
        prometheus.set_config(scrape).await?;

        let mut stack = Stack {
            options,
            deployment,
            prometheus,
            adapter,
            adapter_url,
            kube_state,
            rule_files,
            adapter_config,
            startup: Duration::ZERO,
        };
        stack
            .wait_all_scraped(Duration::from_secs(60) + interval * 4)
            .await?;
        stack.startup = started.elapsed();
        Ok(stack)
    }

    /// Waits until Prometheus reports every target up: the pods, the adapter, kube-state and
    /// itself.
    async fn wait_all_scraped(&mut self, deadline: Duration) -> Result<()> {
        let until = Instant::now() + deadline;
        let expected = self.deployment.status().pods.len() + 3;
        loop {
            let targets = self.prometheus.api().targets().await.unwrap_or_default();
            let up = targets.iter().filter(|(_, _, h)| h == "up").count();
            if up >= expected {
                return Ok(());
            }
            if Instant::now() > until {
                return Err(Error::Other(format!(
                    "Prometheus scrapes {up} of {expected} targets up after {deadline:?}: {targets:?}\n\
                     (logs in {})",
                    self.options.work_dir.join("logs").display()
                )));
            }
            if let Some(pod) = self
                .deployment
                .status()
                .pods
                .iter()
                .find(|p| p.phase == Phase::Crashed)
            {
                return Err(Error::Other(format!(
                    "{} exited while the stack started (log {})",
                    pod.name,
                    self.options
                        .work_dir
                        .join("logs")
                        .join(format!("{}.log", pod.name))
                        .display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The adapter's rules as loaded: (external metric name, PromQL).
    pub fn adapter_queries(&self) -> Result<Vec<(String, String)>> {
        let path = &self.adapter_config;
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let doc: serde_norway::Value = serde_norway::from_str(&text)
            .map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
        Ok(doc["rules"]
            .as_sequence()
            .map(|rules| {
                rules
                    .iter()
                    .filter_map(|r| {
                        Some((
                            r["name"].as_str()?.to_owned(),
                            r["query"].as_str()?.trim().to_owned(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The PromQL the adapter runs for external metric `name`.
    pub fn adapter_query(&self, name: &str) -> Option<String> {
        self.adapter_queries()
            .ok()?
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, q)| q)
    }

    /// The decision API URLs of the ready pods (the Service's endpoints now).
    pub fn limiter_urls(&self) -> Vec<String> {
        self.deployment.status().ready_apis()
    }

    /// SIGKILLs pod `name` (as `kill -9` would); the deployment restarts it after the kubelet's
    /// back-off.
    pub async fn kill_replica(&self, name: &str) -> Result<Killed> {
        self.deployment.kill(name).await
    }

    /// `listening NAME=URL` lines for everything the stack runs (machine-readable).
    pub fn listening_lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for p in &self.deployment.status().pods {
            if let Some(api) = &p.api {
                lines.push(format!("listening {}={api}", p.name));
            }
        }
        lines.push(format!("listening prometheus={}", self.prometheus.url()));
        lines.push(format!("listening metrics-adapter={}", self.adapter_url));
        lines
    }

    /// A table for people.
    pub fn table(&self) -> String {
        let mut rows: Vec<(String, String, String, String)> = Vec::new();
        for p in &self.deployment.status().pods {
            rows.push((
                p.name.clone(),
                p.api.clone().unwrap_or_default(),
                format!("peer {}", p.peer.as_deref().unwrap_or("-")),
                p.pid.to_string(),
            ));
        }
        rows.push((
            "prometheus".into(),
            self.prometheus.url().to_owned(),
            format!(
                "scrape/eval every {}, {} rule files",
                crate::timescale::format_duration(self.options.time_scale.scrape_interval()),
                self.rule_files.len()
            ),
            self.prometheus.proc.id().to_string(),
        ));
        rows.push((
            "metrics-adapter".into(),
            self.adapter_url.clone(),
            "plain HTTP, no auth: /apis/external.metrics.k8s.io/v1beta1".into(),
            self.adapter.id().to_string(),
        ));
        let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(7);
        let w1 = rows.iter().map(|r| r.1.len()).max().unwrap_or(0).max(3);
        let w3 = rows.iter().map(|r| r.3.len()).max().unwrap_or(0).max(3);
        let mut out = format!("{:w0$}  {:w1$}  {:>w3$}  notes\n", "service", "url", "pid");
        for (a, b, c, d) in rows {
            out.push_str(&format!("{a:w0$}  {b:w1$}  {d:>w3$}  {c}\n"));
        }
        out.push_str(&format!(
            "peers file (every pod's peer listener): {}\nlogs and generated configs: {}\n",
            self.deployment.template().peers_file().display(),
            self.options.work_dir.display()
        ));
        out
    }

    /// Stops everything, most dependent first: adapter, Prometheus, then the pods (SIGTERM,
    /// all at once, each within the grace period).
    pub async fn shutdown(mut self) -> BTreeMap<String, String> {
        let mut outcome = BTreeMap::new();
        let grace = Duration::from_secs(15);
        let describe = |s: Option<std::process::ExitStatus>| {
            s.map_or_else(|| "killed after the grace period".into(), |s| s.to_string())
        };
        outcome.insert(
            "metrics-adapter".into(),
            describe(self.adapter.terminate(grace).await),
        );
        outcome.insert(
            "prometheus".into(),
            describe(self.prometheus.proc.terminate(grace).await),
        );
        outcome.extend(self.deployment.shutdown().await);
        outcome
    }
}

/// `http://127.0.0.1:1234/x` -> `127.0.0.1:1234`.
pub fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

fn binary(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        let profile = dir
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|p| *p == "release")
            .map_or("", |_| " --release");
        Err(Error::Other(format!(
            "{} not found: build it first with `cargo build{profile} -p openclaw-limiter \
             -p openclaw-metrics-adapter` (the stack runs the binaries next to itself)",
            path.display()
        )))
    }
}

/// 24 random bytes, hex: the peer HMAC key of this run.
fn peer_secret() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::Other(format!("/dev/urandom: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// `deploy/base/limiter/limiter.env` minus what only makes sense in a pod, plus the policies
/// file from `deploy/` and text logs.
fn limiter_env(options: &Options) -> Result<Vec<(String, String)>> {
    let path = options.limiter_env_file();
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let mut env: Vec<(String, String)> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| !LOCAL_OVERRIDES.contains(k))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    env.push((
        "OPENCLAW_POLICIES".into(),
        policies_file(options)?.display().to_string(),
    ));
    env.push(("OPENCLAW_LOG_FORMAT".into(), "text".into()));
    // The gRPC rate limit service as deployed, on a port of its own per replica.
    env.push((
        "OPENCLAW_RLS_CONFIG".into(),
        options.rls_rules_file().display().to_string(),
    ));
    env.push(("OPENCLAW_GRPC_LISTEN".into(), "127.0.0.1:0".into()));
    // Peers on loopback answer at once: do not hold readiness for the default 5 s.
    env.push(("OPENCLAW_READY_MAX_WAIT_MS".into(), "2000".into()));
    Ok(env)
}

/// The rule files and adapter config to load: the originals in real time, else compressed
/// copies in `work_dir/config`.
fn generate_configs(options: &Options) -> Result<(Vec<PathBuf>, PathBuf)> {
    let rules_dir = options.rules_dir();
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&rules_dir)
        .map_err(|e| Error::io(&rules_dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    sources.sort();
    if sources.is_empty() {
        return Err(Error::Other(format!(
            "no rule files in {}",
            rules_dir.display()
        )));
    }
    let adapter_source = options.adapter_config();
    if !adapter_source.is_file() {
        return Err(Error::Other(format!(
            "{} is missing",
            adapter_source.display()
        )));
    }
    let scale = options.time_scale;
    if scale.is_real_time() {
        return Ok((sources, adapter_source));
    }
    let out = options.work_dir.join("config");
    std::fs::create_dir_all(out.join("rules")).map_err(|e| Error::io(&out, e))?;
    let mut rule_files = Vec::new();
    for source in &sources {
        let text = std::fs::read_to_string(source).map_err(|e| Error::io(source, e))?;
        let origin = relative(source, &options.config_dir);
        let compressed = scale.rule_file(&text, &origin)?;
        let target = out
            .join("rules")
            .join(source.file_name().unwrap_or_default());
        std::fs::write(&target, compressed).map_err(|e| Error::io(&target, e))?;
        rule_files.push(target);
    }
    let text =
        std::fs::read_to_string(&adapter_source).map_err(|e| Error::io(&adapter_source, e))?;
    let compressed =
        scale.adapter_config(&text, &relative(&adapter_source, &options.config_dir))?;
    let adapter_config = out.join("metrics-adapter.yaml");
    std::fs::write(&adapter_config, compressed).map_err(|e| Error::io(&adapter_config, e))?;
    Ok((rule_files, adapter_config))
}

fn relative(path: &Path, root: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// `deploy/base/limiter/policies.yaml` as is, or a copy in the work directory with
/// [`Options::extra_policies`] added.
fn policies_file(options: &Options) -> Result<PathBuf> {
    let source = options.policies_file();
    if options.extra_policies.is_empty() {
        return Ok(source);
    }
    let text = std::fs::read_to_string(&source).map_err(|e| Error::io(&source, e))?;
    let mut doc: serde_norway::Value = serde_norway::from_str(&text)
        .map_err(|e| Error::Other(format!("{}: {e}", source.display())))?;
    let policies = doc
        .get_mut("policies")
        .and_then(serde_norway::Value::as_mapping_mut)
        .ok_or_else(|| Error::Other(format!("{}: no `policies` map", source.display())))?;
    for (name, capacity, refill_ms) in &options.extra_policies {
        let mut p = serde_norway::Mapping::new();
        p.insert("capacity".into(), (*capacity).into());
        p.insert("refill_interval_ms".into(), (*refill_ms).into());
        policies.insert(name.as_str().into(), p.into());
    }
    let body = serde_norway::to_string(&doc).map_err(|e| Error::Other(e.to_string()))?;
    let dir = options.work_dir.join("config");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let path = dir.join("policies.yaml");
    std::fs::write(
        &path,
        format!(
            "# Generated by openclaw-stack: {} with the scenario's own policies added.\n{body}",
            relative(&source, &options.config_dir)
        ),
    )
    .map_err(|e| Error::io(&path, e))?;
    Ok(path)
}
