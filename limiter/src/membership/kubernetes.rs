//! The `kubernetes` source: the EndpointSlices of a Service, listed through the API server.
//!
//! A list every refresh rather than a watch: the slices of one Service are a few small objects,
//! a list is one request whose failure is simple to reason about, and it needs no resume or
//! re-list logic. At the default 10 s interval that is 0.1 requests per second per replica.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};

use super::Outcome;

/// The label the EndpointSlice controller puts on every slice it manages for a Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

pub(super) struct KubeSource {
    namespace: String,
    service: String,
    port_name: String,
    /// Built from the in-cluster configuration on first use unless injected; a failure to build
    /// it is a failed refresh like any other, retried next time.
    client: Option<kube::Client>,
    timeout: Duration,
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("namespace", &self.namespace)
            .field("service", &self.service)
            .field("port_name", &self.port_name)
            .finish_non_exhaustive()
    }
}

impl KubeSource {
    pub(super) fn new(
        namespace: String,
        service: String,
        port_name: String,
        client: Option<kube::Client>,
        timeout: Duration,
    ) -> Self {
        Self {
            namespace,
            service,
            port_name,
            client,
            timeout,
        }
    }

    pub(super) async fn refresh(&mut self) -> Outcome {
        let client = match &self.client {
            Some(client) => client.clone(),
            None => match in_cluster_client(self.timeout) {
                Ok(client) => self.client.insert(client).clone(),
                Err(e) => return Outcome::failed(e),
            },
        };
        let what = format!(
            "EndpointSlices of Service {}/{}",
            self.namespace, self.service
        );
        let api: Api<EndpointSlice> = Api::namespaced(client, &self.namespace);
        let params =
            ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}={}", self.service));
        let slices = match tokio::time::timeout(self.timeout, api.list(&params)).await {
            Err(_) => {
                return Outcome::failed(format!(
                    "cannot list {what}: no answer within {} ms",
                    self.timeout.as_millis()
                ));
            }
            Ok(Err(e)) => return Outcome::failed(format!("cannot list {what}: {e}")),
            Ok(Ok(list)) => list.items,
        };
        match peers_from_slices(&slices, &self.port_name) {
            Ok(addrs) => Outcome::ok(addrs),
            Err(e) => Outcome::failed(format!("{what}: {e}")),
        }
    }
}

fn in_cluster_client(timeout: Duration) -> Result<kube::Client, String> {
    // kube's rustls connector needs a process-wide provider; `ring`, as everywhere in the
    // workspace. Already installed is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut config = kube::Config::incluster().map_err(|e| {
        format!("no in-cluster Kubernetes configuration (is this running in a pod?): {e}")
    })?;
    config.connect_timeout = Some(timeout);
    config.read_timeout = Some(timeout);
    config.write_timeout = Some(timeout);
    kube::Client::try_from(config).map_err(|e| format!("cannot build a Kubernetes client: {e}"))
}

/// The peers in `slices`: the first address of every endpoint that is not terminating, on the
/// slice's port named `port_name`. Readiness is ignored on purpose (a restarting replica must
/// be reachable by its peers before it is ready). Errors when the answer cannot be right:
/// no slice at all (the Service is missing or misnamed: the controller keeps a slice even for
/// a Service without endpoints), or endpoints whose slices have no port of that name.
pub(super) fn peers_from_slices(
    slices: &[EndpointSlice],
    port_name: &str,
) -> Result<Vec<SocketAddr>, String> {
    if slices.is_empty() {
        return Err(format!(
            "none found with label {SERVICE_NAME_LABEL} (does the Service exist in this namespace?)"
        ));
    }
    let mut peers = Vec::new();
    let mut endpoints_without_port = 0usize;
    let mut ports_seen: Vec<String> = Vec::new();
    for slice in slices {
        if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
            continue;
        }
        let port = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == port_name)
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|&p| p != 0);
        let Some(port) = port else {
            endpoints_without_port += slice.endpoints.len();
            for p in slice.ports.iter().flatten() {
                let name = p.name.clone().unwrap_or_default();
                if !ports_seen.contains(&name) {
                    ports_seen.push(name);
                }
            }
            continue;
        };
        for endpoint in &slice.endpoints {
            let terminating = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.terminating)
                .unwrap_or(false);
            if terminating {
                continue;
            }
            let Some(ip) = endpoint
                .addresses
                .first()
                .and_then(|a| a.parse::<IpAddr>().ok())
            else {
                continue;
            };
            peers.push(SocketAddr::new(ip, port));
        }
    }
    if peers.is_empty() && endpoints_without_port > 0 {
        return Err(format!(
            "{endpoints_without_port} endpoint(s) but no port named {port_name:?} (ports: {})",
            ports_seen
                .iter()
                .map(|p| format!("{p:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(peers)
}
