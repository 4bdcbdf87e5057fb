//! The limiter Deployment and its Service, played on 127.0.0.1: what the ReplicaSet
//! controller, the kubelet, the EndpointSlice controller and Prometheus' service discovery do
//! for `deploy/base/limiter/` in a cluster.
//!
//! One task (the controller) owns every limiter process and reconciles, every few tens of
//! milliseconds, the pods that run against the replica count asked for ([`Deployment::scale`]):
//! - **ReplicaSet**: too few pods, it starts new ones (`limiter-N`, a name never reused, an
//!   empty snapshot directory of its own, as a new pod gets an empty `emptyDir`); too many, it
//!   stops the surplus (crashed and not-ready pods first, then the most recently ready), with
//!   SIGTERM to the process' own positive pid (the limiter pushes its last changes and hands
//!   over its strict shares), SIGKILL only after the grace period.
//! - **kubelet**: a pod whose process exits without being asked to is restarted after the
//!   kubelet's back-off (10 s, doubling up to 5 min, divided by the time scale), same name,
//!   same snapshot directory (the pod's `emptyDir` survives a container restart). The readiness
//!   probe (`GET /ready`, every 5 s divided by the time scale, 2 s timeout, two failures to
//!   fail) decides whether a pod is ready.
//! - **Service**: the load generator's [`Endpoints`] are the ready pods' API addresses, as
//!   kube-proxy routes to ready endpoints only; a pod leaves them before it gets SIGTERM.
//! - **Peer discovery**: every pod's peer listener, ready or not (the headless Service with
//!   `publishNotReadyAddresses`), is listed in one peers file (`OPENCLAW_PEERS_FILE`, written
//!   atomically) that every limiter re-reads: a new pod pulls its peers' state before `/ready`;
//!   a leaving one stays listed until its process has exited, so that its hand-over is accepted.
//! - **Prometheus service discovery**: a `file_sd` file lists every pod that has a process
//!   (crashed ones keep their last address, so Prometheus sees them down), labelled
//!   `namespace`, `pod` and `app="openclaw"` (the pods' label, which the ServiceMonitor's
//!   `podTargetLabels` copies onto every series in a cluster). Prometheus re-reads it on change.
//!
//! Every change is logged as an [`Event`] with its time, for the scenario's report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openclaw_loadgen::Endpoints;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::process::{Group, Proc};
use crate::prometheus::NAMESPACE;
use crate::stack::host_port;
use crate::timescale::TimeScale;
use crate::{Error, Result};

/// The pods' `app` label (deploy/base/limiter: `app: openclaw`).
pub const APP_LABEL: &str = "openclaw";
/// The kubelet's first restart back-off, doubled per restart up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(10);
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// The readiness probe's period and failure threshold (deploy/base/limiter/deployment.yaml).
pub const PROBE_PERIOD: Duration = Duration::from_secs(5);
pub const PROBE_FAILURES: u32 = 2;
/// The readiness probe's timeout: a bound on one round trip, not compressed.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// terminationGracePeriodSeconds: a bound on a clean stop, not compressed.
pub const TERMINATION_GRACE: Duration = Duration::from_secs(30);
/// How often the controller looks at its pods.
const TICK: Duration = Duration::from_millis(25);

/// What every pod runs: the template of the Deployment.
#[derive(Debug, Clone)]
pub struct Template {
    pub limiter_bin: PathBuf,
    /// The limiter's environment (without `OPENCLAW_NODE_ID`, the snapshot directory and the
    /// peers file, which the controller sets).
    pub env: Vec<(String, String)>,
    pub group: Group,
    pub time_scale: TimeScale,
    /// `logs/`, `snapshots/POD/`, `peers`, `targets.json` go here.
    pub work_dir: PathBuf,
}

impl Template {
    pub fn peers_file(&self) -> PathBuf {
        self.work_dir.join("peers")
    }

    /// Prometheus' `file_sd` file for the limiter job.
    pub fn targets_file(&self) -> PathBuf {
        self.work_dir.join("prometheus-limiter-targets.json")
    }

    fn logs(&self) -> PathBuf {
        self.work_dir.join("logs")
    }

    pub fn snapshot_dir(&self, pod: &str) -> PathBuf {
        self.work_dir.join("snapshots").join(pod)
    }

    fn probe_period(&self) -> Duration {
        let ms = self.time_scale.wait(PROBE_PERIOD).as_millis() as u64;
        Duration::from_millis(ms.max(100))
    }

    fn backoff(&self, restarts: u32) -> Duration {
        let simulated = FIRST_BACKOFF
            .saturating_mul(1 << restarts.min(10))
            .min(MAX_BACKOFF);
        self.time_scale.wait(simulated)
    }
}

/// Where a pod is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Its process runs and has not passed a readiness probe yet.
    Starting,
    Ready,
    /// Was ready, then failed the readiness probe [`PROBE_FAILURES`] times.
    NotReady,
    /// Asked to stop (SIGTERM); out of the Service.
    Terminating,
    /// Its process exited without being asked to; restarted after the back-off.
    Crashed,
}

/// One pod as the controller last saw it.
#[derive(Debug, Clone)]
pub struct PodStatus {
    pub name: String,
    pub phase: Phase,
    /// `http://127.0.0.1:PORT` of its decision API, once printed (the last one while crashed).
    pub api: Option<String>,
    /// Its peer listener, `127.0.0.1:PORT`, once printed.
    pub peer: Option<String>,
    /// The process id (0 while crashed).
    pub pid: u32,
    pub restarts: u32,
}

/// The Deployment's state: what was asked and every pod.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub desired: usize,
    pub pods: Vec<PodStatus>,
}

impl Status {
    /// Pods with a live process (terminating ones included): `status.replicas`.
    pub fn running(&self) -> usize {
        self.pods
            .iter()
            .filter(|p| p.phase != Phase::Crashed)
            .count()
    }

    /// Pods in the Service.
    pub fn ready(&self) -> usize {
        self.pods.iter().filter(|p| p.phase == Phase::Ready).count()
    }

    /// Pods that count toward the desired count (not terminating).
    pub fn active(&self) -> usize {
        self.pods
            .iter()
            .filter(|p| p.phase != Phase::Terminating)
            .count()
    }

    pub fn pod(&self, name: &str) -> Option<&PodStatus> {
        self.pods.iter().find(|p| p.name == name)
    }

    /// The ready pods' API URLs, by name.
    pub fn ready_apis(&self) -> Vec<String> {
        self.pods
            .iter()
            .filter(|p| p.phase == Phase::Ready)
            .filter_map(|p| p.api.clone())
            .collect()
    }

    /// Desired and ready agree, and nothing else is starting, crashed or stopping.
    pub fn settled(&self) -> bool {
        self.pods.len() == self.desired && self.ready() == self.desired
    }
}

/// What happened to which pod, when.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// The desired count changed (from, to).
    Scaled(usize, usize),
    /// A new pod's process was started.
    Created,
    /// A crashed pod's process was started again.
    Restarted,
    /// Its `listening` lines were read: in the peers file and Prometheus' targets from now.
    Listening,
    Ready,
    NotReady,
    /// Out of the Service, SIGTERM sent.
    Terminating,
    /// Its process exited after SIGTERM (how), and it is gone.
    Stopped(String),
    /// SIGKILL by request (`kill -9`).
    Killed,
    /// Its process exited without being asked to (how).
    Crashed(String),
}

#[derive(Debug, Clone)]
pub struct Event {
    pub at: Instant,
    /// Empty for [`EventKind::Scaled`].
    pub pod: String,
    pub kind: EventKind,
}

/// What [`Deployment::kill`] did.
#[derive(Debug, Clone)]
pub struct Killed {
    pub pod: String,
    pub pid: u32,
    pub api: String,
    pub at: Instant,
}

enum Request {
    Scale(usize),
    Kill(String, oneshot::Sender<Result<Killed>>),
    Shutdown(oneshot::Sender<BTreeMap<String, String>>),
}

/// The running Deployment: a handle on the controller task. Dropping it stops the controller,
/// which kills every pod still running.
#[derive(Debug)]
pub struct Deployment {
    commands: mpsc::UnboundedSender<Request>,
    status: watch::Receiver<Status>,
    events: Arc<Mutex<Vec<Event>>>,
    endpoints: Endpoints,
    template: Template,
    task: Option<JoinHandle<()>>,
}

impl Deployment {
    /// Starts the controller with `replicas` pods asked for (they start at once; see
    /// [`Deployment::wait_for`] to wait until they are ready).
    pub fn start(template: Template, replicas: usize) -> Result<Deployment> {
        for dir in [template.logs(), template.work_dir.join("snapshots")] {
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        // Both files exist from the start: a limiter reads an empty peers file as "no peers
        // yet", Prometheus an empty target list as nothing to scrape yet.
        write_atomically(&template.peers_file(), &peers_text(&[]))?;
        write_atomically(&template.targets_file(), "[]\n")?;
        let http = metrics_adapter::hpa_sim::http_client(PROBE_TIMEOUT)
            .map_err(|e| Error::Other(format!("HTTP client: {e}")))?;
        let (commands, rx) = mpsc::unbounded_channel();
        let (status_tx, status) = watch::channel(Status::default());
        let events = Arc::new(Mutex::new(Vec::new()));
        let endpoints = Endpoints::new();
        let controller = Controller {
            template: template.clone(),
            desired: replicas,
            pods: Vec::new(),
            next_index: 0,
            status: status_tx,
            events: events.clone(),
            endpoints: endpoints.clone(),
            http,
            probes: JoinSet::new(),
            written: (String::new(), String::new(), Vec::new()),
        };
        controller.event("", EventKind::Scaled(0, replicas));
        let task = tokio::spawn(controller.run(rx));
        Ok(Deployment {
            commands,
            status,
            events,
            endpoints,
            template,
            task: Some(task),
        })
    }

    /// Asks for `replicas` pods (as the HPA sets the scale's `spec.replicas`).
    pub fn scale(&self, replicas: usize) {
        let _ = self.commands.send(Request::Scale(replicas));
    }

    /// SIGKILLs a pod's process (as `kill -9` on the node would); the kubelet part of the
    /// controller restarts it after the back-off.
    pub async fn kill(&self, pod: &str) -> Result<Killed> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Request::Kill(pod.to_owned(), tx))
            .map_err(|_| Error::Other("the deployment controller has stopped".into()))?;
        rx.await
            .map_err(|_| Error::Other("the deployment controller has stopped".into()))?
    }

    /// The state now.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// A receiver of every new state.
    pub fn watch(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The Service's endpoints: the ready pods' API URLs, kept current by the controller.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    pub fn template(&self) -> &Template {
        &self.template
    }

    /// Waits until `ok` holds for the state, up to `deadline`; fails with `what` and the state.
    pub async fn wait_for(
        &self,
        what: &str,
        deadline: Duration,
        mut ok: impl FnMut(&Status) -> bool,
    ) -> Result<Status> {
        let mut rx = self.status.clone();
        match tokio::time::timeout(deadline, rx.wait_for(|s| ok(s))).await {
            Ok(Ok(s)) => Ok(s.clone()),
            Ok(Err(_)) => Err(Error::Other(format!(
                "the deployment controller stopped before {what}"
            ))),
            Err(_) => Err(Error::Other(format!(
                "not {what} within {deadline:?}: {:?}\n(logs in {})",
                self.status(),
                self.template.logs().display()
            ))),
        }
    }

    /// Stops every pod (SIGTERM, all at once so that each hands over to the others while they
    /// still run; SIGKILL after the grace period) and the controller. Returns how each ended.
    pub async fn shutdown(mut self) -> BTreeMap<String, String> {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Request::Shutdown(tx)).is_err() {
            return BTreeMap::new();
        }
        let outcome = rx.await.unwrap_or_default();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        outcome
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        // The controller owns the processes: aborting it drops them, which kills them.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// One pod, as the controller holds it.
#[derive(Debug)]
struct Pod {
    name: String,
    proc: Option<Proc>,
    pid: u32,
    phase: Phase,
    api: Option<String>,
    peer: Option<String>,
    restarts: u32,
    /// When a crashed pod is started again.
    restart_at: Option<Instant>,
    next_probe: Instant,
    /// A probe of this process is in flight.
    probing: bool,
    failures: u32,
    /// When it last turned ready (the newest ready pods go first on scale-down).
    ready_since: Option<Instant>,
    /// When a terminating pod is killed if still running.
    kill_at: Option<Instant>,
}

impl Pod {
    fn status(&self) -> PodStatus {
        PodStatus {
            name: self.name.clone(),
            phase: self.phase,
            api: self.api.clone(),
            peer: self.peer.clone(),
            pid: if self.phase == Phase::Crashed {
                0
            } else {
                self.pid
            },
            restarts: self.restarts,
        }
    }
}

struct Controller {
    template: Template,
    desired: usize,
    pods: Vec<Pod>,
    next_index: usize,
    status: watch::Sender<Status>,
    events: Arc<Mutex<Vec<Event>>>,
    endpoints: Endpoints,
    http: reqwest::Client,
    /// Readiness probes in flight: (pod, pid, passed).
    probes: JoinSet<(String, u32, bool)>,
    /// The peers file, the targets file and the endpoints as last written.
    written: (String, String, Vec<String>),
}

impl Controller {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Request>) {
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Request::Scale(n)) => {
                        if n != self.desired {
                            self.event("", EventKind::Scaled(self.desired, n));
                            self.desired = n;
                        }
                    }
                    Some(Request::Kill(pod, reply)) => {
                        let _ = reply.send(self.kill(&pod));
                    }
                    Some(Request::Shutdown(reply)) => {
                        let _ = reply.send(self.shutdown().await);
                        return;
                    }
                    // The handle is gone: dropping the pods kills them.
                    None => return,
                },
                _ = ticker.tick() => {}
            }
            self.reconcile().await;
        }
    }

    fn event(&self, pod: &str, kind: EventKind) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Event {
                at: Instant::now(),
                pod: pod.to_owned(),
                kind,
            });
    }

    async fn reconcile(&mut self) {
        let now = Instant::now();
        // Processes that ended.
        let mut events = Vec::new();
        self.pods.retain_mut(|pod| {
            let Some(proc) = pod.proc.as_mut() else {
                return true;
            };
            if !proc.has_exited() {
                if pod.phase == Phase::Terminating && pod.kill_at.is_some_and(|t| now >= t) {
                    proc.kill();
                    events.push((
                        pod.name.clone(),
                        EventKind::Stopped("killed after the grace period".into()),
                    ));
                    return false;
                }
                return true;
            }
            let how = exit_text(proc);
            pod.proc = None;
            if pod.phase == Phase::Terminating {
                events.push((pod.name.clone(), EventKind::Stopped(how)));
                return false;
            }
            events.push((pod.name.clone(), EventKind::Crashed(how)));
            pod.phase = Phase::Crashed;
            pod.ready_since = None;
            pod.restart_at = Some(now + self.template.backoff(pod.restarts));
            true
        });
        for (pod, kind) in events {
            self.event(&pod, kind);
        }

        // New `listening` lines.
        let mut listening = Vec::new();
        for pod in &mut self.pods {
            let Some(proc) = pod.proc.as_mut() else {
                continue;
            };
            for (name, url) in proc.take_listening() {
                match name.as_str() {
                    "api" => pod.api = Some(url),
                    "peer" => {
                        pod.peer = Some(host_port(&url));
                        listening.push(pod.name.clone());
                    }
                    _ => {}
                }
            }
        }
        for pod in listening {
            self.event(&pod, EventKind::Listening);
        }

        self.probe(now);

        // Restarts after the back-off.
        let due: Vec<usize> = (0..self.pods.len())
            .filter(|&i| {
                self.pods[i].phase == Phase::Crashed
                    && self.pods[i].restart_at.is_some_and(|t| now >= t)
            })
            .collect();
        for i in due {
            let name = self.pods[i].name.clone();
            match self.spawn(&name) {
                Ok(proc) => {
                    let pod = &mut self.pods[i];
                    pod.pid = proc.id();
                    pod.proc = Some(proc);
                    pod.phase = Phase::Starting;
                    pod.restarts += 1;
                    pod.restart_at = None;
                    pod.failures = 0;
                    pod.probing = false;
                    pod.next_probe = Instant::now();
                    // The old addresses stay listed until the new ones are printed.
                    self.event(&name, EventKind::Restarted);
                }
                Err(e) => {
                    let pod = &mut self.pods[i];
                    pod.restarts += 1;
                    pod.restart_at = Some(now + self.template.backoff(pod.restarts));
                    self.event(&name, EventKind::Crashed(e.to_string()));
                }
            }
        }

        // The ReplicaSet: as many pods as desired, not counting those on their way out.
        let active = self
            .pods
            .iter()
            .filter(|p| p.phase != Phase::Terminating)
            .count();
        for _ in active..self.desired {
            let name = format!("limiter-{}", self.next_index);
            self.next_index += 1;
            match self.spawn(&name) {
                Ok(proc) => {
                    self.pods.push(Pod {
                        name: name.clone(),
                        pid: proc.id(),
                        proc: Some(proc),
                        phase: Phase::Starting,
                        api: None,
                        peer: None,
                        restarts: 0,
                        restart_at: None,
                        next_probe: Instant::now(),
                        probing: false,
                        failures: 0,
                        ready_since: None,
                        kill_at: None,
                    });
                    self.event(&name, EventKind::Created);
                }
                Err(e) => self.event(&name, EventKind::Crashed(e.to_string())),
            }
        }
        if active > self.desired {
            for name in self.victims(active - self.desired) {
                self.terminate(&name);
            }
        }
        self.publish();
    }

    /// Starts the readiness probes that are due and takes the answers of those that finished.
    /// Probes run in the background, each bounded by the probe's timeout (2 s, not compressed:
    /// a bound on one round trip), so a slow pod never holds up the controller.
    fn probe(&mut self, now: Instant) {
        let period = self.template.probe_period();
        for pod in &mut self.pods {
            let probing = matches!(pod.phase, Phase::Starting | Phase::Ready | Phase::NotReady);
            let Some(api) = pod
                .api
                .clone()
                .filter(|_| probing && now >= pod.next_probe && !pod.probing)
            else {
                continue;
            };
            pod.next_probe = now + period;
            pod.probing = true;
            let http = self.http.clone();
            let name = pod.name.clone();
            let pid = pod.pid;
            self.probes.spawn(async move {
                let ok =
                    tokio::time::timeout(PROBE_TIMEOUT, http.get(format!("{api}/ready")).send())
                        .await
                        .is_ok_and(|r| r.is_ok_and(|r| r.status().is_success()));
                (name, pid, ok)
            });
        }
        let mut changes = Vec::new();
        while let Some(Ok((name, pid, ok))) = self.probes.try_join_next() {
            // The pod may be gone, restarted, or asked to stop while its probe ran.
            let Some(pod) = self
                .pods
                .iter_mut()
                .find(|p| p.name == name && p.pid == pid)
            else {
                continue;
            };
            pod.probing = false;
            if !matches!(pod.phase, Phase::Starting | Phase::Ready | Phase::NotReady) {
                continue;
            }
            if ok {
                pod.failures = 0;
                if pod.phase != Phase::Ready {
                    pod.phase = Phase::Ready;
                    pod.ready_since = Some(Instant::now());
                    changes.push((pod.name.clone(), EventKind::Ready));
                }
            } else if pod.phase == Phase::Ready {
                pod.failures += 1;
                if pod.failures >= PROBE_FAILURES {
                    pod.phase = Phase::NotReady;
                    pod.ready_since = None;
                    changes.push((pod.name.clone(), EventKind::NotReady));
                }
            }
        }
        for (pod, kind) in changes {
            self.event(&pod, kind);
        }
    }

    /// Which pods go on a scale-down, as the ReplicaSet controller ranks them: crashed, then
    /// starting or not ready, then the most recently ready.
    fn victims(&self, n: usize) -> Vec<String> {
        let mut candidates: Vec<usize> = (0..self.pods.len())
            .filter(|&i| self.pods[i].phase != Phase::Terminating)
            .collect();
        let rank = |p: &Pod| match p.phase {
            Phase::Crashed => 0,
            Phase::Starting | Phase::NotReady => 1,
            _ => 2,
        };
        candidates.sort_by(|&a, &b| {
            let (a, b) = (&self.pods[a], &self.pods[b]);
            rank(a)
                .cmp(&rank(b))
                .then_with(|| b.ready_since.cmp(&a.ready_since))
        });
        candidates
            .into_iter()
            .take(n)
            .map(|i| self.pods[i].name.clone())
            .collect()
    }

    /// Out of the Service first (written before the signal), then SIGTERM to its process.
    fn terminate(&mut self, name: &str) {
        let Some(i) = self.pods.iter().position(|p| p.name == name) else {
            return;
        };
        let pod = &mut self.pods[i];
        pod.phase = Phase::Terminating;
        pod.kill_at = Some(Instant::now() + TERMINATION_GRACE);
        self.publish();
        let pod = &mut self.pods[i];
        match pod.proc.as_mut() {
            Some(proc) => proc.request_stop(),
            // Crashed: nothing runs; it is simply gone.
            None => {
                self.pods.remove(i);
                self.event(name, EventKind::Stopped("was not running".into()));
                return;
            }
        }
        self.event(name, EventKind::Terminating);
    }

    fn kill(&mut self, name: &str) -> Result<Killed> {
        let pod = self
            .pods
            .iter_mut()
            .find(|p| p.name == name)
            .ok_or_else(|| Error::Other(format!("no pod {name}")))?;
        let proc = pod
            .proc
            .as_mut()
            .ok_or_else(|| Error::Other(format!("{name} is not running")))?;
        let pid = proc.id();
        proc.kill();
        let killed = Killed {
            pod: name.to_owned(),
            pid,
            api: pod.api.clone().unwrap_or_default(),
            at: Instant::now(),
        };
        self.event(name, EventKind::Killed);
        Ok(killed)
    }

    fn spawn(&self, name: &str) -> Result<Proc> {
        let t = &self.template;
        let mut cmd = Command::new(&t.limiter_bin);
        cmd.args(["--listen", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0"]);
        for (k, v) in &t.env {
            cmd.env(k, v);
        }
        cmd.env("OPENCLAW_NODE_ID", name)
            .env("OPENCLAW_SNAPSHOT_DIR", t.snapshot_dir(name))
            .env("OPENCLAW_PEERS_FILE", t.peers_file());
        // A restarted pod appends to its log, as `kubectl logs --previous` keeps the last one.
        Proc::spawn_appending(name, cmd, &t.logs(), t.group)
    }

    /// Writes the peers file, Prometheus' targets and the Service's endpoints if they changed,
    /// then publishes the state.
    fn publish(&mut self) {
        let peers: Vec<&str> = self.pods.iter().filter_map(|p| p.peer.as_deref()).collect();
        let peers = peers_text(&peers);
        if peers != self.written.0 {
            match write_atomically(&self.template.peers_file(), &peers) {
                Ok(()) => self.written.0 = peers,
                Err(e) => tracing_warn(&format!("peers file: {e}")),
            }
        }
        let targets = targets_json(
            &self
                .pods
                .iter()
                .filter_map(|p| Some((p.name.as_str(), host_port(p.api.as_deref()?))))
                .collect::<Vec<_>>(),
        );
        if targets != self.written.1 {
            match write_atomically(&self.template.targets_file(), &targets) {
                Ok(()) => self.written.1 = targets,
                Err(e) => tracing_warn(&format!("Prometheus targets: {e}")),
            }
        }
        let ready: Vec<String> = self
            .pods
            .iter()
            .filter(|p| p.phase == Phase::Ready)
            .filter_map(|p| p.api.clone())
            .collect();
        if ready != self.written.2 {
            match self.endpoints.set(&ready) {
                Ok(()) => self.written.2 = ready,
                Err(e) => tracing_warn(&format!("endpoints: {e}")),
            }
        }
        let status = Status {
            desired: self.desired,
            pods: self.pods.iter().map(Pod::status).collect(),
        };
        self.status.send_if_modified(|s| {
            let changed = s.desired != status.desired
                || s.pods.len() != status.pods.len()
                || s.pods.iter().zip(&status.pods).any(|(a, b)| {
                    (a.phase, &a.api, &a.peer, a.pid, a.restarts)
                        != (b.phase, &b.api, &b.peer, b.pid, b.restarts)
                });
            *s = status;
            changed
        });
    }

    async fn shutdown(&mut self) -> BTreeMap<String, String> {
        let mut outcome = BTreeMap::new();
        for i in 0..self.pods.len() {
            self.pods[i].phase = Phase::Terminating;
        }
        self.publish();
        for pod in &mut self.pods {
            if let Some(p) = pod.proc.as_mut() {
                p.request_stop();
            }
        }
        for pod in &mut self.pods {
            let how = match pod.proc.as_mut() {
                Some(p) => p.terminate(TERMINATION_GRACE).await.map_or_else(
                    || "killed after the grace period".to_owned(),
                    |s| s.to_string(),
                ),
                None => "not running (crashed)".into(),
            };
            outcome.insert(pod.name.clone(), how);
        }
        self.pods.clear();
        self.publish();
        outcome
    }
}

/// Errors writing the controller's files are not fatal (the next change tries again); they go
/// to stderr.
fn tracing_warn(message: &str) {
    eprintln!("openclaw-stack: deployment: {message}");
}

fn exit_text(proc: &mut Proc) -> String {
    proc.exit_status()
        .map_or_else(|| "exited".to_owned(), |s| s.to_string())
}

/// The peers file: one `host:port` per line.
fn peers_text(peers: &[&str]) -> String {
    let mut out = String::from(
        "# Generated by openclaw-stack: the peer listener of every limiter pod, ready or not\n\
         # (a headless Service with publishNotReadyAddresses). Each limiter ignores its own line.\n",
    );
    for p in peers {
        out.push_str(p);
        out.push('\n');
    }
    out
}

/// Prometheus' `file_sd` JSON: one target group per pod.
fn targets_json(pods: &[(&str, String)]) -> String {
    let groups: Vec<serde_json::Value> = pods
        .iter()
        .map(|(pod, address)| {
            serde_json::json!({
                "targets": [address],
                "labels": {"namespace": NAMESPACE, "pod": pod, "app": APP_LABEL},
            })
        })
        .collect();
    serde_json::to_string_pretty(&groups).unwrap_or_else(|_| "[]".into()) + "\n"
}

/// Writes `text` to a temporary file beside `path`, then renames it over `path`: a reader sees
/// the old content or the new, never a part.
pub fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_targets_carry_the_pods_app_label_and_the_peers_file_one_address_per_line() {
        let json = targets_json(&[("limiter-0", "127.0.0.1:1".into())]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v[0]["targets"][0], "127.0.0.1:1");
        assert_eq!(v[0]["labels"]["app"], "openclaw");
        assert_eq!(v[0]["labels"]["pod"], "limiter-0");
        assert_eq!(v[0]["labels"]["namespace"], "openclaw");
        let peers = peers_text(&["127.0.0.1:5", "127.0.0.1:6"]);
        let lines: Vec<&str> = peers
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .collect();
        assert_eq!(lines, ["127.0.0.1:5", "127.0.0.1:6"]);
    }

    #[test]
    fn the_kubelet_back_off_doubles_up_to_five_minutes_and_is_compressed() {
        let t = |k: f64| Template {
            limiter_bin: PathBuf::new(),
            env: Vec::new(),
            group: Group::Inherit,
            time_scale: TimeScale::new(k).unwrap(),
            work_dir: PathBuf::new(),
        };
        assert_eq!(t(1.0).backoff(0), Duration::from_secs(10));
        assert_eq!(t(1.0).backoff(1), Duration::from_secs(20));
        assert_eq!(t(1.0).backoff(9), Duration::from_secs(300));
        assert_eq!(t(10.0).backoff(0), Duration::from_secs(1));
        assert_eq!(t(30.0).probe_period(), Duration::from_millis(166));
    }

    #[test]
    fn a_write_replaces_the_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peers");
        write_atomically(&path, "a\n").unwrap();
        write_atomically(&path, "b\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "b\n");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "the temporary file is left behind");
    }
}
