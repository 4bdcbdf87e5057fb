//! Kubernetes discovery (EndpointSlices through `kube`) against a DOUBLE of the API server.
//!
//! A real kube-apiserver cannot run here (it needs etcd, certificates and controllers), so the
//! test serves the one call discovery makes, as the documented API answers it:
//! `GET /apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices?labelSelector=...`
//! returns an `EndpointSliceList` (serialized from k8s-openapi's types, so every field name and
//! shape is the API's: `addressType`, `endpoints[].conditions.{ready,serving,terminating}`,
//! named `ports`), filtered by namespace and by the equality label selector; failures are a
//! `meta/v1 Status` with the HTTP code, as the API server sends them. The client is a real
//! `kube::Client` pointed at the double with a `kube::Config`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use k8s_openapi::List;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ListMeta, ObjectMeta, Status};
use openclaw_limiter::membership::{Discovery, Membership, SelfAddrs};

mod support;

use support::Running;

/// Discovery against the double, refreshing every 20 ms.
fn start(double: &Double, me: SelfAddrs) -> Running {
    let discovery = Discovery::try_from_parts(
        "kubernetes",
        None,
        None,
        None,
        Some(SERVICE),
        Some(NAMESPACE),
    )
    .unwrap();
    Running::start(
        Membership::new(discovery, me, Duration::from_millis(20)).with_kube_client(double.client()),
    )
}
const NAMESPACE: &str = "prod";
const SERVICE: &str = "openclaw-limiter";

#[derive(Default)]
struct Cluster {
    slices: Vec<EndpointSlice>,
    /// When set, every list fails with this code and reason.
    failure: Option<(u16, &'static str)>,
    /// `(namespace, labelSelector)` of every list request.
    requests: Vec<(String, Option<String>)>,
    resource_version: u64,
}

type Shared = Arc<Mutex<Cluster>>;

fn status(code: u16, reason: &str, message: String) -> Response {
    let body = Status {
        code: Some(code.into()),
        message: Some(message),
        reason: Some(reason.to_owned()),
        status: Some("Failure".to_owned()),
        ..Status::default()
    };
    let mut json = serde_json::to_value(&body).unwrap();
    // `Status` is served with its type meta, like every API object.
    json["apiVersion"] = "v1".into();
    json["kind"] = "Status".into();
    (StatusCode::from_u16(code).unwrap(), axum::Json(json)).into_response()
}

async fn list_endpoint_slices(
    State(cluster): State<Shared>,
    Path(namespace): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let params: Vec<(String, String)> =
        serde_urlencoded::from_str(query.as_deref().unwrap_or("")).unwrap();
    let selector = params
        .iter()
        .find(|(k, _)| k == "labelSelector")
        .map(|(_, v)| v.clone());
    let mut cluster = cluster.lock().unwrap();
    cluster.requests.push((namespace.clone(), selector.clone()));
    if let Some((code, reason)) = cluster.failure {
        let message = match code {
            403 => format!(
                "endpointslices.discovery.k8s.io is forbidden: User \
                 \"system:serviceaccount:{namespace}:openclaw-limiter\" cannot list resource \
                 \"endpointslices\" in API group \"discovery.k8s.io\" in the namespace \
                 \"{namespace}\""
            ),
            _ => "etcdserver: request timed out".to_owned(),
        };
        return status(code, reason, message);
    }
    // Equality-based selectors (`k=v`, `k==v`, comma = AND), the form discovery sends.
    let mut wanted = Vec::new();
    for term in selector.iter().flat_map(|s| s.split(',')) {
        let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) else {
            return status(
                400,
                "BadRequest",
                format!("unable to parse requirement: {term:?}"),
            );
        };
        wanted.push((key.trim().to_owned(), value.trim().to_owned()));
    }
    let items: Vec<EndpointSlice> = cluster
        .slices
        .iter()
        .filter(|s| s.metadata.namespace.as_deref() == Some(namespace.as_str()))
        .filter(|s| {
            let labels = s.metadata.labels.clone().unwrap_or_default();
            wanted
                .iter()
                .all(|(k, v)| labels.get(k).map(String::as_str) == Some(v.as_str()))
        })
        .cloned()
        .collect();
    let list = List {
        items,
        metadata: ListMeta {
            resource_version: Some(cluster.resource_version.to_string()),
            ..ListMeta::default()
        },
    };
    axum::Json(list).into_response()
}

struct Double {
    cluster: Shared,
    url: String,
    server: tokio::task::JoinHandle<()>,
}

impl Double {
    async fn start(slices: Vec<EndpointSlice>) -> Self {
        let cluster: Shared = Arc::new(Mutex::new(Cluster {
            slices,
            resource_version: 1,
            ..Cluster::default()
        }));
        let app = Router::new()
            .route(
                "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
                get(list_endpoint_slices),
            )
            .with_state(cluster.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            cluster,
            url,
            server,
        }
    }

    fn client(&self) -> kube::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = kube::Config::new(self.url.parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    fn change(&self, edit: impl FnOnce(&mut Cluster)) {
        let mut cluster = self.cluster.lock().unwrap();
        edit(&mut cluster);
        cluster.resource_version += 1;
    }
}

impl Drop for Double {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn endpoint(ip: &str, ready: bool, terminating: bool) -> Endpoint {
    Endpoint {
        addresses: vec![ip.to_owned()],
        // As the EndpointSlice controller writes them: serving follows the pod's readiness,
        // ready is serving and not terminating.
        conditions: Some(EndpointConditions {
            ready: Some(ready && !terminating),
            serving: Some(ready),
            terminating: Some(terminating),
        }),
        node_name: Some("node-a".to_owned()),
        ..Endpoint::default()
    }
}

fn slice(namespace: &str, service: &str, name: &str, endpoints: Vec<Endpoint>) -> EndpointSlice {
    let port = |name: &str, port: i32| EndpointPort {
        name: Some(name.to_owned()),
        port: Some(port),
        protocol: Some("TCP".to_owned()),
        ..EndpointPort::default()
    };
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                ("kubernetes.io/service-name".to_owned(), service.to_owned()),
                (
                    "endpointslice.kubernetes.io/managed-by".to_owned(),
                    "endpointslice-controller.k8s.io".to_owned(),
                ),
            ])),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".to_owned(),
        endpoints,
        // The API port first, so picking "the first port" instead of the named one fails.
        ports: Some(vec![port("http", 8080), port("peer", 8081)]),
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// This replica: POD_IP 10.0.0.9, peer listener on 0.0.0.0:8081.
fn me() -> SelfAddrs {
    SelfAddrs::new(addr("0.0.0.0:8081"), ["10.0.0.9".parse().unwrap()])
}

fn initial_cluster() -> Vec<EndpointSlice> {
    vec![
        slice(
            NAMESPACE,
            SERVICE,
            "openclaw-limiter-abcde",
            vec![
                endpoint("10.0.0.1", true, false),
                endpoint("10.0.0.2", false, false), // restarting: not ready yet
                endpoint("10.0.0.3", true, true),   // terminating (rolling update)
                endpoint("10.0.0.9", true, false),  // this replica
            ],
        ),
        // Another Service in the namespace, and the same Service in another namespace.
        slice(
            NAMESPACE,
            "other",
            "other-xyz",
            vec![endpoint("10.1.0.1", true, false)],
        ),
        slice(
            "staging",
            SERVICE,
            "openclaw-limiter-stg",
            vec![endpoint("10.2.0.1", true, false)],
        ),
    ]
}

#[tokio::test]
async fn endpoint_slices_give_live_replicas_on_the_peer_port_without_self() {
    let double = Double::start(initial_cluster()).await;
    let mut run = start(&double, me());

    // Not-ready 10.0.0.2 is included, terminating 10.0.0.3 and this replica are not, the port
    // is the one named "peer" (8081), and nothing from the other Service or namespace.
    assert_eq!(
        run.next_set().await,
        [addr("10.0.0.1:8081"), addr("10.0.0.2:8081")]
    );
    let report = run.refreshes(2).await;
    assert!(report.healthy && report.last_error.is_none(), "{report:?}");
    assert_eq!(report.kind, "kubernetes");
    assert_eq!(report.source, "prod/openclaw-limiter port peer");
    assert!(!run.has_unread_set(), "unchanged slices, no publication");

    let requests = double.cluster.lock().unwrap().requests.clone();
    assert!(requests.len() >= 3);
    for (namespace, selector) in requests {
        assert_eq!(namespace, NAMESPACE);
        assert_eq!(
            selector.as_deref(),
            Some("kubernetes.io/service-name=openclaw-limiter")
        );
    }
    run.finish().await;
}

#[tokio::test]
async fn scale_up_and_scale_down_are_picked_up_on_the_next_refresh() {
    let double = Double::start(initial_cluster()).await;
    let mut run = start(&double, me());
    assert_eq!(
        run.next_set().await,
        [addr("10.0.0.1:8081"), addr("10.0.0.2:8081")]
    );

    // Scale-up: a new pod lands in a second slice of the same Service, not ready yet.
    double.change(|c| {
        c.slices.push(slice(
            NAMESPACE,
            SERVICE,
            "openclaw-limiter-fghij",
            vec![endpoint("10.0.0.4", false, false)],
        ));
    });
    assert_eq!(
        run.next_set().await,
        [
            addr("10.0.0.1:8081"),
            addr("10.0.0.2:8081"),
            addr("10.0.0.4:8081")
        ]
    );

    // Scale-down: 10.0.0.1 starts terminating (its endpoint stays listed until it is gone).
    double.change(|c| {
        c.slices[0].endpoints[0] = endpoint("10.0.0.1", true, true);
    });
    assert_eq!(
        run.next_set().await,
        [addr("10.0.0.2:8081"), addr("10.0.0.4:8081")]
    );
    run.finish().await;
}

#[tokio::test]
async fn api_errors_keep_the_last_set_and_show_in_the_status() {
    let double = Double::start(initial_cluster()).await;
    let mut run = start(&double, me());
    let known = run.next_set().await;
    assert_eq!(known, [addr("10.0.0.1:8081"), addr("10.0.0.2:8081")]);

    // The API server fails, and meanwhile the cluster changes: nothing is published.
    double.change(|c| {
        c.failure = Some((500, "InternalError"));
        c.slices[0].endpoints.clear();
    });
    let report = run.refreshes(3).await;
    assert!(!run.has_unread_set(), "a failed list must not publish");
    assert_eq!(run.current_set(), known);
    assert!(!report.healthy);
    assert_eq!(report.peers, ["10.0.0.1:8081", "10.0.0.2:8081"]);
    let error = report.last_error.unwrap();
    assert!(
        error.contains("prod/openclaw-limiter") && error.contains("etcdserver: request timed out"),
        "{error}"
    );

    // Missing RBAC: the 403's message reaches /status.
    double.change(|c| c.failure = Some((403, "Forbidden")));
    let report = run.refreshes(3).await;
    assert!(!run.has_unread_set());
    let error = report.last_error.unwrap();
    assert!(error.contains("forbidden"), "{error}");

    // A Service that vanished (no slice at all) is an error too, not "no peers".
    double.change(|c| {
        c.failure = None;
        c.slices
            .retain(|s| s.metadata.name.as_deref() != Some("openclaw-limiter-abcde"));
    });
    let report = run.refreshes(3).await;
    assert!(!run.has_unread_set());
    assert!(
        report
            .last_error
            .unwrap()
            .contains("does the Service exist"),
        "{:?}",
        run.report()
    );

    // Recovery publishes what the API says now.
    double.change(|c| {
        c.slices.push(slice(
            NAMESPACE,
            SERVICE,
            "openclaw-limiter-klmno",
            vec![
                endpoint("10.0.0.5", true, false),
                endpoint("10.0.0.9", true, false),
            ],
        ));
    });
    assert_eq!(run.next_set().await, [addr("10.0.0.5:8081")]);
    let report = run.refreshes(1).await;
    assert!(report.healthy, "{report:?}");
    assert!(report.last_success_unix_ms >= report.last_error_unix_ms);
    run.finish().await;
}
