//! End-to-end test harness for the OpenClaw workspace: start the real binaries and a real
//! Prometheus on 127.0.0.1, talk to them over HTTP, and stop them whatever happens.
//!
//! - [`ChildGuard`] owns a child process: kills and reaps it on drop (also when a test panics),
//!   keeps its stderr in a log file and prints the tail of it when the test failed.
//! - [`Service::spawn`] starts a workspace binary (found next to the test executable, in
//!   `target/<profile>/`) and waits, with a deadline, for the `listening NAME=URL` line it
//!   prints on stdout once bound (port 0 everywhere: no fixed ports).
//! - [`Prometheus::start`] runs Debian's `/usr/bin/prometheus` with a generated config
//!   (1 s scrape and evaluation interval) on a free loopback port and waits for `/-/ready`;
//!   [`Prometheus::query`] runs an instant query.
//! - [`wait_until`] polls a condition until a deadline (never sleep as synchronization).
//! - [`envoy`] runs a real Envoy in front of the limiter's rate limit service.
//!
//! Everything fails loudly with what to do: a missing binary says to build it, a missing
//! Prometheus says what to install.

pub mod accuracy;
pub mod envoy;
pub mod faketime;
pub mod proxy;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Debian's Prometheus server binary.
pub const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";

/// A child process that is killed and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    /// Keeps the log directory alive as long as the process.
    _dir: tempfile::TempDir,
}

impl ChildGuard {
    /// Starts `cmd` with stderr to a log file and stdout piped (see [`ChildGuard::stdout_lines`]).
    pub fn spawn(name: &str, mut cmd: Command) -> ChildGuard {
        let dir = tempfile::tempdir().expect("tempdir for the process log");
        let log = dir.path().join(format!("{name}.log"));
        let stderr = std::fs::File::create(&log).expect("log file");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({:?}): {e}", cmd.get_program()));
        ChildGuard {
            name: name.to_owned(),
            child: Some(child),
            log,
            _dir: dir,
        }
    }

    /// The OS process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// A channel of stdout lines, read on a background thread until the process closes it.
    /// Can be taken once.
    pub fn stdout_lines(&mut self) -> mpsc::Receiver<String> {
        let stdout = self
            .child
            .as_mut()
            .and_then(|c| c.stdout.take())
            .expect("stdout was already taken");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // Keep draining even when nobody listens any more, so the child never blocks.
                let _ = tx.send(line);
            }
        });
        rx
    }

    /// Whether the process has exited (reaping it if so).
    pub fn has_exited(&mut self) -> bool {
        matches!(
            self.child.as_mut().map(Child::try_wait),
            Some(Ok(Some(_))) | None
        )
    }

    /// The process's stderr so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The last `n` lines of stderr.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let mut tail: VecDeque<&str> = VecDeque::with_capacity(n);
        for line in log.lines() {
            if tail.len() == n {
                tail.pop_front();
            }
            tail.push_back(line);
        }
        tail.into_iter().collect::<Vec<_>>().join("\n")
    }

    /// Kills and reaps the process now.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits up to `grace` for a clean exit, then kills. Returns the exit
    /// status if it exited by itself.
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- last lines of {} stderr ----\n{}\n----",
                self.name,
                self.log_tail(40)
            );
        }
    }
}

/// The workspace's root directory (where `deploy/` and `docs/` are).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// Path of a workspace binary built by `cargo build --workspace --bins`, found next to the
/// running test executable (`target/<profile>/deps/..` -> `target/<profile>/<name>`).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    let mut dir = exe
        .parent()
        .expect("test executable has a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: run `cargo build --workspace --bins` first (same profile as the tests)",
        path.display()
    );
    path
}

/// A started service: its process and the URL from its `listening` line.
#[derive(Debug)]
pub struct Service {
    pub process: ChildGuard,
    pub url: String,
    /// Every `listening NAME=URL` pair printed, in order (a binary may listen on several).
    pub listening: Vec<(String, String)>,
}

impl Service {
    /// Starts workspace binary `name` with `args` and `envs`, and waits up to `deadline` for
    /// its `listening NAME=URL` stdout line (the first one becomes [`Service::url`]).
    pub fn spawn(name: &str, args: &[&str], envs: &[(&str, &str)], deadline: Duration) -> Service {
        let mut cmd = Command::new(workspace_bin(name));
        cmd.args(args);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
        );
        let mut process = ChildGuard::spawn(name, cmd);
        let lines = process.stdout_lines();
        let until = Instant::now() + deadline;
        let mut listening = Vec::new();
        while listening.is_empty() {
            let left = until.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(line) => {
                    if let Some(pair) = parse_listening(&line) {
                        listening.push(pair);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if process.has_exited() {
                        panic!(
                            "{name} exited before listening; stderr:\n{}",
                            process.log_tail(40)
                        );
                    }
                    if Instant::now() >= until {
                        panic!(
                            "{name} printed no `listening NAME=URL` line within {deadline:?}; stderr:\n{}",
                            process.log_tail(40)
                        );
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!(
                        "{name} closed stdout before listening; stderr:\n{}",
                        process.log_tail(40)
                    );
                }
            }
        }
        // Collect further `listening` lines printed right after the first.
        while let Ok(line) = lines.recv_timeout(Duration::from_millis(50)) {
            if let Some(pair) = parse_listening(&line) {
                listening.push(pair);
            }
        }
        let url = listening[0].1.clone();
        Service {
            process,
            url,
            listening,
        }
    }

    /// The URL printed for `name` (e.g. `api`, `http`, `https`).
    pub fn url_of(&self, name: &str) -> Option<&str> {
        self.listening
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, u)| u.as_str())
    }

    /// `host:port` of [`Service::url`], for scrape configs.
    pub fn host_port(&self) -> String {
        host_port(&self.url)
    }
}

/// `listening api=http://127.0.0.1:1234` -> `("api", "http://127.0.0.1:1234")`.
pub fn parse_listening(line: &str) -> Option<(String, String)> {
    let rest = line.trim().strip_prefix("listening ")?;
    let (name, url) = rest.split_once('=')?;
    (!name.is_empty() && url.contains("://")).then(|| (name.to_owned(), url.trim().to_owned()))
}

/// `http://127.0.0.1:1234/x` -> `127.0.0.1:1234`.
pub fn host_port(url: &str) -> String {
    let without_scheme = url.split_once("://").map_or(url, |(_, r)| r);
    without_scheme
        .split('/')
        .next()
        .unwrap_or(without_scheme)
        .to_owned()
}

/// Polls `condition` every 50 ms until it returns `Some`, or panics with `what` at `deadline`.
pub fn wait_until<T>(
    deadline: Duration,
    what: &str,
    mut condition: impl FnMut() -> Option<T>,
) -> T {
    let until = Instant::now() + deadline;
    loop {
        if let Some(v) = condition() {
            return v;
        }
        assert!(
            Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A loopback port that was free a moment ago (bind :0, read, release). Callers must retry on
/// a bind failure: another process may take it in between.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// A blocking HTTP client with a bounded timeout, no proxy.
pub fn http_client() -> reqwest::blocking::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// A real Prometheus server on 127.0.0.1, stopped on drop.
#[derive(Debug)]
pub struct Prometheus {
    process: Option<ChildGuard>,
    port: u16,
    dir: tempfile::TempDir,
    http: reqwest::blocking::Client,
    targets: Vec<String>,
    /// Labels Prometheus attaches to every series of the `openclaw` job's targets.
    target_labels: Vec<(String, String)>,
    rule_files: Vec<PathBuf>,
}

/// The metrics adapter binary.
pub const ADAPTER_BIN: &str = "openclaw-metrics-adapter";

/// Starts one `openclaw-limiter` with its decision API on 127.0.0.1 (port 0) and `envs`.
pub fn spawn_limiter(envs: &[(&str, &str)]) -> Service {
    Service::spawn(
        "openclaw-limiter",
        &["--listen", "127.0.0.1:0"],
        envs,
        Duration::from_secs(20),
    )
}

/// Starts `openclaw-metrics-adapter serve` on 127.0.0.1 (port 0) without authentication (no
/// Kubernetes API here), asking `prometheus_url` with the rules in `config`. `plain_http` serves
/// HTTP instead of HTTPS; `extra` arguments are appended.
pub fn spawn_adapter(
    prometheus_url: &str,
    config: &Path,
    plain_http: bool,
    extra: &[&str],
) -> Service {
    let config = config.to_str().expect("a UTF-8 config path");
    let mut args = vec!["serve"];
    if plain_http {
        args.push("--plain-http");
    }
    args.extend([
        "--bind-address",
        "127.0.0.1",
        "--secure-port",
        "0",
        "--authentication",
        "none",
        "--prometheus-url",
        prometheus_url,
        "--config",
        config,
    ]);
    args.extend_from_slice(extra);
    Service::spawn(ADAPTER_BIN, &args, &[], Duration::from_secs(20))
}

impl Prometheus {
    /// Starts Prometheus with no other target and waits until it has scraped itself once, so
    /// that `up{job="prometheus"}` has a sample to query.
    pub fn start_scraping_itself() -> Prometheus {
        let prometheus = Prometheus::start(&[], &[]);
        wait_until(
            Duration::from_secs(30),
            "Prometheus to scrape itself",
            || {
                prometheus
                    .vector("up{job=\"prometheus\"}")
                    .ok()
                    .filter(|v| !v.is_empty())
                    .map(|_| ())
            },
        );
        prometheus
    }

    /// Starts Prometheus scraping `scrape_targets` (`host:port`, path `/metrics`, every 1 s)
    /// and loading `rule_files`, and waits until it is ready.
    pub fn start(scrape_targets: &[String], rule_files: &[PathBuf]) -> Prometheus {
        Prometheus::start_with_target_labels(scrape_targets, &[], rule_files)
    }

    /// [`Prometheus::start`], with `labels` attached to every series scraped from the targets
    /// (as the Prometheus Operator's `podTargetLabels` attach pod labels in a cluster).
    pub fn start_with_target_labels(
        scrape_targets: &[String],
        labels: &[(&str, &str)],
        rule_files: &[PathBuf],
    ) -> Prometheus {
        assert!(
            Path::new(PROMETHEUS_BIN).is_file(),
            "{PROMETHEUS_BIN} is missing: install Debian's Prometheus with `apt-get install -y prometheus` \
             (scripts/install-test-deps.sh does this)"
        );
        let dir = tempfile::tempdir().expect("tempdir for Prometheus");
        let mut p = Prometheus {
            process: None,
            port: 0,
            dir,
            http: http_client(),
            targets: scrape_targets.to_vec(),
            target_labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            rule_files: rule_files.to_vec(),
        };
        p.launch(None);
        p
    }

    /// The generated config: job `openclaw` scrapes `targets`, job `prometheus` scrapes
    /// Prometheus itself (so tests always have a series: `up{job="prometheus"}`).
    fn write_config(&self, port: u16) {
        let targets: Vec<String> = self.targets.iter().map(|t| format!("'{t}'")).collect();
        let rules: Vec<String> = self
            .rule_files
            .iter()
            .map(|p| format!("  - '{}'", p.display()))
            .collect();
        let labels: Vec<String> = self
            .target_labels
            .iter()
            .map(|(k, v)| format!("{k}: '{v}'"))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n{}\n\
             scrape_configs:\n  - job_name: openclaw\n    static_configs:\n      - targets: [{}]\n\
             \x20       labels: {{{}}}\n\
             \x20 - job_name: prometheus\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n",
            if rules.is_empty() {
                "  []".to_owned()
            } else {
                rules.join("\n")
            },
            targets.join(", "),
            labels.join(", ")
        );
        std::fs::write(self.dir.path().join("prometheus.yml"), config)
            .expect("write prometheus.yml");
    }

    fn launch(&mut self, port: Option<u16>) {
        let mut last_log = String::new();
        for _attempt in 0..5 {
            let port = port.unwrap_or_else(free_port);
            self.write_config(port);
            let mut cmd = Command::new(PROMETHEUS_BIN);
            cmd.arg(format!(
                "--config.file={}",
                self.dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--storage.tsdb.retention.time=1h")
            .arg("--log.level=warn");
            let mut process = ChildGuard::spawn("prometheus", cmd);
            let _ = process.stdout_lines();
            let ready_url = format!("http://127.0.0.1:{port}/-/ready");
            let until = Instant::now() + Duration::from_secs(30);
            loop {
                if process.has_exited() {
                    last_log = process.log_tail(20);
                    break;
                }
                if self
                    .http
                    .get(&ready_url)
                    .send()
                    .is_ok_and(|r| r.status().is_success())
                {
                    self.port = port;
                    self.process = Some(process);
                    return;
                }
                assert!(
                    Instant::now() < until,
                    "Prometheus not ready within 30s:\n{}",
                    process.log_tail(20)
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            if !last_log.contains("address already in use") {
                break;
            }
        }
        panic!("Prometheus did not start:\n{last_log}");
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops the server (the data directory is kept for [`Prometheus::restart`]).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.terminate(Duration::from_secs(10));
        }
    }

    /// Starts it again on the same port with the same config and data.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port;
        self.launch(Some(port));
    }

    /// Runs an instant query; returns the `data` object (`resultType`, `result`).
    pub fn query(&self, promql: &str) -> Result<Value, String> {
        let response = self
            .http
            .get(format!("{}/api/v1/query", self.url()))
            .query(&[("query", promql)])
            .send()
            .map_err(|e| e.to_string())?;
        let body: Value = response.json().map_err(|e| e.to_string())?;
        if body["status"] != "success" {
            return Err(body.to_string());
        }
        Ok(body["data"].clone())
    }

    /// The samples of a vector query as `(labels, value string)`.
    pub fn vector(&self, promql: &str) -> Result<Vec<(Value, String)>, String> {
        let data = self.query(promql)?;
        let result = data["result"]
            .as_array()
            .ok_or_else(|| format!("not a vector: {data}"))?;
        Ok(result
            .iter()
            .map(|s| {
                (
                    s["metric"].clone(),
                    s["value"][1].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect())
    }

    /// Health of the scrape targets, from `/api/v1/targets` (`"up"`, `"down"`, `"unknown"`).
    pub fn target_health(&self) -> Vec<String> {
        let Ok(r) = self
            .http
            .get(format!("{}/api/v1/targets", self.url()))
            .send()
        else {
            return Vec::new();
        };
        let Ok(body) = r.json::<Value>() else {
            return Vec::new();
        };
        body["data"]["activeTargets"]
            .as_array()
            .map(|ts| {
                ts.iter()
                    .map(|t| t["health"].as_str().unwrap_or_default().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The server's stderr so far.
    pub fn log(&self) -> String {
        self.process
            .as_ref()
            .map(ChildGuard::log)
            .unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_lines_parse() {
        assert_eq!(
            parse_listening("listening api=http://127.0.0.1:1234"),
            Some(("api".to_owned(), "http://127.0.0.1:1234".to_owned()))
        );
        assert_eq!(
            parse_listening("listening https=https://[::1]:6443")
                .unwrap()
                .0,
            "https"
        );
        assert_eq!(parse_listening("started"), None);
        assert_eq!(parse_listening("listening nothing"), None);
        assert_eq!(host_port("http://127.0.0.1:1234/metrics"), "127.0.0.1:1234");
    }

    #[test]
    fn child_guard_kills_its_process_on_drop() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let guard = ChildGuard::spawn("sleep", cmd);
        let pid = guard.id();
        drop(guard);
        let alive = Path::new(&format!("/proc/{pid}")).exists()
            && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| !s.contains(") Z "));
        assert!(!alive, "process {pid} survived its guard");
    }

    #[test]
    fn wait_until_returns_the_value_once_the_condition_holds() {
        let mut n = 0;
        let v = wait_until(Duration::from_secs(5), "n to reach 3", || {
            n += 1;
            (n >= 3).then_some(n)
        });
        assert_eq!(v, 3);
    }
}
