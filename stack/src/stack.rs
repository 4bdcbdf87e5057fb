//! The local stack: N limiter replicas peered with each other, Prometheus scraping them with
//! the alert rules loaded, and the metrics adapter serving the external metrics API.
//!
//! Start order (each step waits for the previous one's `listening` line, port 0 everywhere):
//! 1. one peer relay per replica ([`crate::forward`]): the replicas' `OPENCLAW_PEERS`;
//! 2. the limiters, with the settings of `deploy/base/limiter/limiter.env` where they apply
//!    locally; each relay is pointed at its replica's peer listener as soon as it prints it;
//! 3. Prometheus, scraping the limiters (rules from `alerts/rules/`, compressed copies when the
//!    time scale is above 1);
//! 4. the metrics adapter on plain HTTP without authentication (no Kubernetes API server here:
//!    TLS and delegated auth are what a cluster adds), asking that Prometheus, with
//!    `metrics-adapter/config/default.yaml` (compressed copy when the time scale is above 1);
//! 5. Prometheus' config rewritten to scrape the adapter and itself, and reloaded.
//!
//! [`Stack::shutdown`] stops everything in reverse order with SIGTERM (the limiters push their
//! last changes to peers); dropping a [`Stack`] kills whatever is still running.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::forward::Forwarder;
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
    "OPENCLAW_SNAPSHOT_DIR",
    "OPENCLAW_POLICIES",
    "OPENCLAW_LOG_FORMAT",
    "OPENCLAW_GRPC_LISTEN",
    "OPENCLAW_RLS_CONFIG",
];

/// How to start the stack.
#[derive(Debug, Clone)]
pub struct Options {
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

/// One limiter replica.
#[derive(Debug)]
pub struct Limiter {
    pub index: usize,
    pub node_id: String,
    /// `http://127.0.0.1:PORT` of the decision API (also `/metrics`, `/status`).
    pub api: String,
    /// Its own peer listener.
    pub peer: SocketAddr,
    /// The address its peers send to (the relay in front of `peer`).
    pub peer_relay: SocketAddr,
    /// None once killed.
    pub proc: Option<Proc>,
    pub pid: u32,
}

impl Limiter {
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| !p.has_exited())
    }
}

/// The running stack.
#[derive(Debug)]
pub struct Stack {
    pub options: Options,
    pub limiters: Vec<Limiter>,
    pub prometheus: Prometheus,
    /// The adapter's process and `http://127.0.0.1:PORT`.
    pub adapter: Proc,
    pub adapter_url: String,
    /// The rule files and adapter config actually loaded (compressed copies or the originals).
    pub rule_files: Vec<PathBuf>,
    pub adapter_config: PathBuf,
    /// How long `up` took.
    pub startup: Duration,
    relays: Vec<Forwarder>,
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
        let secret = peer_secret()?;
        let env = limiter_env(&options)?;

        // 1. One relay per replica, bound before any replica starts.
        let mut relays = Vec::new();
        for _ in 0..options.replicas {
            relays.push(Forwarder::start().await?);
        }
        // 2. The replicas.
        let mut limiters = Vec::new();
        for i in 0..options.replicas {
            let node_id = format!("limiter-{i}");
            let peers: Vec<String> = (0..options.replicas)
                .filter(|&j| j != i)
                .map(|j| relays[j].addr().to_string())
                .collect();
            let mut cmd = Command::new(&limiter_bin);
            cmd.args(["--listen", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0"]);
            for (k, v) in &env {
                cmd.env(k, v);
            }
            cmd.env("OPENCLAW_NODE_ID", &node_id)
                .env("OPENCLAW_PEER_SECRET", &secret)
                .env(
                    "OPENCLAW_SNAPSHOT_DIR",
                    work.join("snapshots").join(&node_id),
                )
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
                );
            if peers.is_empty() {
                cmd.env("OPENCLAW_DISCOVERY", "none");
            } else {
                cmd.env("OPENCLAW_DISCOVERY", "static")
                    .env("OPENCLAW_PEERS", peers.join(","));
            }
            for (k, v) in &options.limiter_env {
                cmd.env(k, v);
            }
            let mut proc = Proc::spawn(&node_id, cmd, &logs, options.group)?;
            let names: &[&str] = if peers.is_empty() {
                &["api"]
            } else {
                &["api", "peer"]
            };
            let listening = proc.wait_listening(names, Duration::from_secs(30)).await?;
            let url_of = |name: &str| {
                listening
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, u)| u.clone())
            };
            let api = url_of("api").unwrap_or_default();
            let peer: SocketAddr = match url_of("peer") {
                Some(u) => host_port(&u)
                    .parse()
                    .map_err(|e| Error::Other(format!("{node_id}: peer address {u}: {e}")))?,
                None => relays[i].addr(),
            };
            relays[i].set_target(peer);
            let pid = proc.id();
            limiters.push(Limiter {
                index: i,
                node_id,
                api,
                peer,
                peer_relay: relays[i].addr(),
                proc: Some(proc),
                pid,
            });
        }

        // 3. Prometheus, scraping the limiters.
        let interval = options.time_scale.scrape_interval();
        let mut scrape = ScrapeConfig {
            interval,
            limiters: limiters
                .iter()
                .map(|l| Target {
                    address: host_port(&l.api),
                    pod: l.node_id.clone(),
                })
                .collect(),
            adapter: None,
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
            limiters,
            prometheus,
            adapter,
            adapter_url,
            rule_files,
            adapter_config,
            startup: Duration::ZERO,
            relays,
        };
        stack
            .wait_all_scraped(Duration::from_secs(60) + interval * 4)
            .await?;
        stack.startup = started.elapsed();
        Ok(stack)
    }

    /// Waits until Prometheus reports every target up.
    async fn wait_all_scraped(&mut self, deadline: Duration) -> Result<()> {
        let until = Instant::now() + deadline;
        let expected = self.limiters.len() + 2;
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
            for l in &mut self.limiters {
                if let Some(p) = l.proc.as_mut()
                    && p.has_exited()
                {
                    return Err(Error::Child {
                        name: l.node_id.clone(),
                        what: "exited while the stack started".into(),
                        log_tail: p.log_tail(30),
                        log: p.log_path().to_owned(),
                    });
                }
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

    /// The decision API URLs of the replicas, in order (killed ones included).
    pub fn limiter_urls(&self) -> Vec<String> {
        self.limiters.iter().map(|l| l.api.clone()).collect()
    }

    /// SIGKILLs replica `i` (as `kill -9` would). Its relay stays: peers see it down.
    pub fn kill_replica(&mut self, i: usize) -> Result<u32> {
        let l = self
            .limiters
            .get_mut(i)
            .ok_or_else(|| Error::Other(format!("no replica {i}")))?;
        let mut proc = l
            .proc
            .take()
            .ok_or_else(|| Error::Other(format!("replica {i} is not running")))?;
        let pid = proc.id();
        proc.kill();
        Ok(pid)
    }

    /// `listening NAME=URL` lines for everything the stack runs (machine-readable).
    pub fn listening_lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for l in &self.limiters {
            lines.push(format!("listening {}={}", l.node_id, l.api));
        }
        lines.push(format!("listening prometheus={}", self.prometheus.url()));
        lines.push(format!("listening metrics-adapter={}", self.adapter_url));
        lines
    }

    /// A table for people.
    pub fn table(&self) -> String {
        let mut rows: Vec<(String, String, String, String)> = Vec::new();
        for l in &self.limiters {
            rows.push((
                l.node_id.clone(),
                l.api.clone(),
                format!("peer {} (relay {})", l.peer, l.peer_relay),
                l.pid.to_string(),
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
            "logs and generated configs: {}\n",
            self.options.work_dir.display()
        ));
        out
    }

    /// Stops everything, most dependent first: adapter, Prometheus, then the limiters (SIGTERM,
    /// each within its grace period), then the relays.
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
        // The limiters stop together: each pushes its last changes to the others first.
        for l in &mut self.limiters {
            if let Some(p) = l.proc.as_mut() {
                p.request_stop();
            }
        }
        for l in &mut self.limiters {
            let status = match l.proc.as_mut() {
                Some(p) => describe(p.terminate(grace).await),
                None => "killed earlier".into(),
            };
            outcome.insert(l.node_id.clone(), status);
        }
        self.relays.clear();
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
        options.policies_file().display().to_string(),
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
