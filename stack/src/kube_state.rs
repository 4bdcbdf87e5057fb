//! The kube-state-metrics series that `alerts/rules/scaling.yaml` reads, served by the stack
//! for the HPA it simulates and the Deployment it plays, so that `HPAReplicaStuck`,
//! `OpenClawHPAAtMaxReplicas`, `OpenClawHPAMetricsUnavailable` and
//! `OpenClawReplicasUnavailable` are evaluated on the stack as they would be in a cluster.
//!
//! - `kube_horizontalpodautoscaler_*` for `openclaw/openclaw-hpa` (once a scenario's HPA has
//!   synced): `status_desired_replicas` is the count the last sync set;
//!   `status_current_replicas` is the pods the Deployment has (not terminating): the stack
//!   reports what it actually runs, so a stack that did not follow the HPA would show, and
//!   `HPAReplicaStuck` is the check that it does. `status_condition{condition="ScalingActive"}`
//!   is false while a metric cannot be read.
//! - `kube_deployment_spec_replicas`, `kube_deployment_status_replicas` (pods with a process),
//!   `kube_deployment_status_replicas_available` and `_ready` (pods in the Service) for
//!   `openclaw/openclaw-limiter`.
//!
//! A plain HTTP/1.1 listener on 127.0.0.1:0 answering every request with the text format and
//! closing the connection: Prometheus asks nothing more of a target.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::deployment::Status;
use crate::prometheus::NAMESPACE;
use crate::{Error, Result};

pub const HPA_NAME: &str = "openclaw-hpa";
pub const DEPLOYMENT_NAME: &str = "openclaw-limiter";

/// What the simulated HPA last decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HpaState {
    pub desired: i32,
    pub min: i32,
    pub max: i32,
    /// Every metric was read at the last sync.
    pub scaling_active: bool,
}

/// The exporter; stops when dropped.
#[derive(Debug)]
pub struct KubeState {
    addr: SocketAddr,
    hpa: Arc<Mutex<Option<HpaState>>>,
    task: JoinHandle<()>,
}

impl KubeState {
    /// Binds 127.0.0.1:0 and serves the series of `deployment` (and of the HPA once set).
    pub async fn start(deployment: watch::Receiver<Status>) -> Result<KubeState> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Error::Other(format!("kube-state-metrics: bind 127.0.0.1:0: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Other(format!("kube-state-metrics: {e}")))?;
        let hpa: Arc<Mutex<Option<HpaState>>> = Arc::default();
        let shared = hpa.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    continue;
                };
                let body = render(
                    *shared.lock().unwrap_or_else(|p| p.into_inner()),
                    &deployment.borrow(),
                );
                tokio::spawn(async move {
                    // Read the request head (bounded), answer, close.
                    let mut buf = vec![0u8; 8192];
                    let mut read = 0;
                    let head = async {
                        while read < buf.len() {
                            match conn.read(&mut buf[read..]).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => read += n,
                            }
                            if buf[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                                break;
                            }
                        }
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(5), head).await;
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(response.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        Ok(KubeState { addr, hpa, task })
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the HPA decided at its last sync.
    pub fn set_hpa(&self, state: HpaState) {
        *self.hpa.lock().unwrap_or_else(|p| p.into_inner()) = Some(state);
    }
}

impl Drop for KubeState {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The exposition text.
pub fn render(hpa: Option<HpaState>, deployment: &Status) -> String {
    let mut out = String::new();
    if let Some(h) = hpa {
        let labels = format!("namespace=\"{NAMESPACE}\",horizontalpodautoscaler=\"{HPA_NAME}\"");
        let _ = writeln!(
            out,
            "kube_horizontalpodautoscaler_info{{{labels},scaletargetref_kind=\"Deployment\",\
             scaletargetref_name=\"{DEPLOYMENT_NAME}\"}} 1"
        );
        for (name, v) in [
            ("spec_min_replicas", h.min),
            ("spec_max_replicas", h.max),
            ("status_desired_replicas", h.desired),
            ("status_current_replicas", deployment.active() as i32),
        ] {
            let _ = writeln!(out, "kube_horizontalpodautoscaler_{name}{{{labels}}} {v}");
        }
        for (status, v) in [
            ("true", h.scaling_active),
            ("false", !h.scaling_active),
            ("unknown", false),
        ] {
            let _ = writeln!(
                out,
                "kube_horizontalpodautoscaler_status_condition{{{labels},condition=\"ScalingActive\",status=\"{status}\"}} {}",
                u8::from(v)
            );
        }
    }
    let labels = format!("namespace=\"{NAMESPACE}\",deployment=\"{DEPLOYMENT_NAME}\"");
    for (name, v) in [
        ("spec_replicas", deployment.desired),
        ("status_replicas", deployment.running()),
        ("status_replicas_available", deployment.ready()),
        ("status_replicas_ready", deployment.ready()),
    ] {
        let _ = writeln!(out, "kube_deployment_{name}{{{labels}}} {v}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deployment::{Phase, PodStatus};

    #[test]
    fn the_series_the_scaling_alerts_read_are_there_with_their_labels() {
        let pod = |phase| PodStatus {
            name: "limiter-0".into(),
            phase,
            api: None,
            peer: None,
            pid: 1,
            restarts: 0,
        };
        let status = Status {
            desired: 3,
            pods: vec![
                pod(Phase::Ready),
                pod(Phase::Starting),
                pod(Phase::Terminating),
            ],
        };
        let text = render(
            Some(HpaState {
                desired: 3,
                min: 2,
                max: 15,
                scaling_active: true,
            }),
            &status,
        );
        for line in [
            "kube_horizontalpodautoscaler_status_desired_replicas{namespace=\"openclaw\",horizontalpodautoscaler=\"openclaw-hpa\"} 3",
            "kube_horizontalpodautoscaler_status_current_replicas{namespace=\"openclaw\",horizontalpodautoscaler=\"openclaw-hpa\"} 2",
            "kube_horizontalpodautoscaler_spec_max_replicas{namespace=\"openclaw\",horizontalpodautoscaler=\"openclaw-hpa\"} 15",
            "condition=\"ScalingActive\",status=\"false\"} 0",
            "scaletargetref_name=\"openclaw-limiter\"} 1",
            "kube_deployment_status_replicas_available{namespace=\"openclaw\",deployment=\"openclaw-limiter\"} 1",
            "kube_deployment_spec_replicas{namespace=\"openclaw\",deployment=\"openclaw-limiter\"} 3",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(!render(None, &status).contains("horizontalpodautoscaler"));
    }
}
