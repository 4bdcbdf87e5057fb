//! Shared by the `tls_*` and `auth_*` tests: generated PKI, a real HTTPS client, the Kubernetes
//! API double, and the adapter's serving stack (`tls::serve` + `auth::layer`) around a router
//! that echoes what reached it.
#![allow(dead_code)]

pub mod fake_kube_api;
pub mod https;
pub mod pki;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use axum::routing::get;
use metrics_adapter::auth::{self, Auth, UserInfo};
use metrics_adapter::tls::{self, PeerCertificates, TlsConfig};
use serde_json::{Value, json};

use self::pki::Ca;

/// The adapter's serving stack on 127.0.0.1:0; shut down when dropped.
pub struct Adapter {
    pub addr: SocketAddr,
    pub tls: TlsConfig,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Adapter {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

/// Serves the echo router over `tls`, behind `auth` when given.
pub async fn start(tls: TlsConfig, auth: Option<Arc<Auth>>) -> Adapter {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("metrics_adapter=debug")
        .try_init();
    let mut app = echo_router();
    if let Some(auth) = auth {
        app = app.layer(auth::layer(auth));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tls.clone();
    let task = tokio::spawn(async move {
        tls::serve(listener, serving, app, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    Adapter {
        addr,
        tls,
        stop: Some(stop),
        task,
    }
}

/// Health and OpenAPI routes like the real router's, and an echo of the identity for the rest.
pub fn echo_router() -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .route(
            "/openapi/v2",
            get(|| async { axum::Json(json!({"swagger": "2.0"})) }),
        )
        .route(
            "/openapi/v3",
            get(|| async { axum::Json(json!({"paths": {}})) }),
        )
        // The real router's list route, with its extractor: what a list call would serve.
        .route(
            "/apis/external.metrics.k8s.io/v1beta1/namespaces/{namespace}/{metric}",
            get(echo_list),
        )
        .fallback(echo)
}

/// The namespace and metric the real `list` handler would serve (axum's `Path`, which
/// percent-decodes each segment), with the identity.
async fn echo_list(
    axum::extract::Path((namespace, metric)): axum::extract::Path<(String, String)>,
    req: Request,
) -> axum::Json<Value> {
    let axum::Json(mut echoed) = echo(req).await;
    echoed["served"] = json!({"namespace": namespace, "metric": metric});
    axum::Json(echoed)
}

async fn echo(req: Request) -> axum::Json<Value> {
    let user = req
        .extensions()
        .get::<UserInfo>()
        .map(|u| json!({"name": u.name, "uid": u.uid, "groups": u.groups, "extra": u.extra}));
    let identity_headers: Vec<&str> = req
        .headers()
        .keys()
        .map(|k| k.as_str())
        .filter(|k| k.starts_with("x-remote-"))
        .collect();
    axum::Json(json!({
        "path": req.uri().path(),
        "user": user,
        "peer_certificates": req.extensions().get::<PeerCertificates>().map(|p| 1 + p.intermediates().len()),
        "identity_headers": identity_headers,
        "authorization_header": req.headers().contains_key("authorization"),
    }))
}

/// `kube-system/extension-apiserver-authentication` as kubeadm clusters publish it.
pub fn auth_configmap(
    client_ca: &Ca,
    front_proxy_ca: &Ca,
    allowed_names: &[&str],
) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("client-ca-file".to_owned(), client_ca.pem()),
        (
            "requestheader-client-ca-file".to_owned(),
            front_proxy_ca.pem(),
        ),
        (
            "requestheader-allowed-names".to_owned(),
            serde_json::to_string(allowed_names).unwrap(),
        ),
        (
            "requestheader-username-headers".to_owned(),
            r#"["X-Remote-User"]"#.to_owned(),
        ),
        (
            "requestheader-group-headers".to_owned(),
            r#"["X-Remote-Group"]"#.to_owned(),
        ),
        (
            "requestheader-extra-headers-prefix".to_owned(),
            r#"["X-Remote-Extra-"]"#.to_owned(),
        ),
    ])
}

/// Polls `check` until it returns `Some`, failing the test after `deadline`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "not within {deadline:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
