//! A double of the Kubernetes API server, for the three calls delegated auth makes.
//!
//! No Kubernetes API server can run on these machines, so the adapter's `kube` client is pointed
//! (through a real kubeconfig file) at this axum server on 127.0.0.1:0. It answers as the
//! documented API does, with the real request and response types from k8s-openapi:
//! - `GET /api/v1/namespaces/{ns}/configmaps/{name}`: 200 `ConfigMap`, or 404 `Status`
//!   (`configmaps "x" not found`), or 403 `Status` when told to (missing RBAC);
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews`: 201 `TokenReview` with `status`;
//! - `POST /apis/authorization.k8s.io/v1/subjectaccessreviews`: 201 `SubjectAccessReview` with
//!   `status`, 422 `Status` for a spec the real API rejects (no user/groups, or not exactly one
//!   of resourceAttributes / nonResourceAttributes);
//! - every call needs the adapter's own bearer token (401 `Status` otherwise), bodies must be
//!   JSON of the right kind (k8s-openapi checks `apiVersion` and `kind` when decoding).
//!
//! It counts calls and records every SubjectAccessReview spec, so tests can assert caching and
//! the exact attributes sent. It can also be told to never answer reviews (API hung).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State as AxumState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewStatus, UserInfo};
use k8s_openapi::api::authorization::v1::{
    SubjectAccessReview, SubjectAccessReviewSpec, SubjectAccessReviewStatus,
};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Status, StatusDetails};

/// The bearer token the adapter's kubeconfig carries (its ServiceAccount token).
pub const ADAPTER_TOKEN: &str = "adapter-serviceaccount-token";

type Policy = Box<dyn Fn(&SubjectAccessReviewSpec) -> (bool, String) + Send + Sync>;

#[derive(Default)]
struct State {
    configmap: Mutex<Option<BTreeMap<String, String>>>,
    configmap_forbidden: AtomicBool,
    tokens: Mutex<BTreeMap<String, UserInfo>>,
    policy: Mutex<Option<Policy>>,
    hang_reviews: AtomicBool,
    token_reviews: AtomicUsize,
    configmap_reads: AtomicUsize,
    access_reviews: Mutex<Vec<SubjectAccessReviewSpec>>,
}

/// The running double; stops when dropped.
pub struct FakeKubeApi {
    pub addr: SocketAddr,
    state: Arc<State>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKubeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeKubeApi {
    pub async fn start() -> Self {
        let state = Arc::new(State::default());
        let app = Router::new()
            .route("/api/v1/namespaces/{ns}/configmaps/{name}", get(configmap))
            .route(
                "/apis/authentication.k8s.io/v1/tokenreviews",
                post(token_review),
            )
            .route(
                "/apis/authorization.k8s.io/v1/subjectaccessreviews",
                post(access_review),
            )
            .fallback(|| async {
                status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    "the server could not find the requested resource".into(),
                )
            })
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            addr,
            state,
            server,
        }
    }

    /// A kubeconfig for the adapter: this server, authenticated with [`ADAPTER_TOKEN`].
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: adapter\ncurrent-context: fake\n\
             users:\n- name: adapter\n  user:\n    token: {ADAPTER_TOKEN}\n",
            addr = self.addr
        );
        std::fs::write(&path, yaml).unwrap();
        path
    }

    /// Publishes (`Some`) or deletes (`None`) `kube-system/extension-apiserver-authentication`.
    pub fn set_configmap(&self, data: Option<BTreeMap<String, String>>) {
        *self.state.configmap.lock().unwrap() = data;
    }

    /// Answer 403 to the ConfigMap read, as a cluster without the reader RoleBinding does.
    pub fn forbid_configmap(&self) {
        self.state.configmap_forbidden.store(true, Ordering::SeqCst);
    }

    /// TokenReview will authenticate `token` as `username` in `groups`.
    pub fn add_token(&self, token: &str, username: &str, groups: &[&str]) {
        self.state.tokens.lock().unwrap().insert(
            token.to_owned(),
            UserInfo {
                username: Some(username.to_owned()),
                uid: Some(format!("uid-{username}")),
                groups: Some(groups.iter().map(|g| (*g).to_owned()).collect()),
                extra: None,
            },
        );
    }

    /// SubjectAccessReview answers `policy(spec)` = (allowed, reason). Default: deny, no reason.
    pub fn set_policy(
        &self,
        policy: impl Fn(&SubjectAccessReviewSpec) -> (bool, String) + Send + Sync + 'static,
    ) {
        *self.state.policy.lock().unwrap() = Some(Box::new(policy));
    }

    /// TokenReview and SubjectAccessReview never answer (an API server that hangs).
    pub fn hang_reviews(&self) {
        self.state.hang_reviews.store(true, Ordering::SeqCst);
    }

    pub fn token_reviews(&self) -> usize {
        self.state.token_reviews.load(Ordering::SeqCst)
    }

    pub fn configmap_reads(&self) -> usize {
        self.state.configmap_reads.load(Ordering::SeqCst)
    }

    /// Every SubjectAccessReview spec received, in order.
    pub fn access_reviews(&self) -> Vec<SubjectAccessReviewSpec> {
        self.state.access_reviews.lock().unwrap().clone()
    }
}

fn status(code: StatusCode, reason: &str, message: String) -> Response {
    status_with_details(code, reason, message, None)
}

fn status_with_details(
    code: StatusCode,
    reason: &str,
    message: String,
    details: Option<StatusDetails>,
) -> Response {
    let body = Status {
        code: Some(i32::from(code.as_u16())),
        details,
        message: Some(message),
        metadata: Default::default(),
        reason: Some(reason.to_owned()),
        status: Some("Failure".to_owned()),
    };
    (
        code,
        [("content-type", "application/json")],
        serde_json::to_vec(&body).unwrap(),
    )
        .into_response()
}

fn created<T: serde::Serialize>(body: &T) -> Response {
    (
        StatusCode::CREATED,
        [("content-type", "application/json")],
        serde_json::to_vec(body).unwrap(),
    )
        .into_response()
}

/// The API server authenticates the adapter itself first.
fn check_caller(headers: &HeaderMap) -> Option<Response> {
    let expected = format!("Bearer {ADAPTER_TOKEN}");
    match headers.get("authorization").and_then(|v| v.to_str().ok()) {
        Some(v) if v == expected => None,
        _ => Some(status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized".into(),
        )),
    }
}

/// Decodes a JSON body of kind `T`, as the API server does (415 / 400 otherwise).
fn decode<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<T, Box<Response>> {
    let json = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return Err(Box::new(status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            "expected application/json".into(),
        )));
    }
    serde_json::from_slice(body).map_err(|e| {
        Box::new(status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("decoding body: {e}"),
        ))
    })
}

async fn configmap(
    AxumState(state): AxumState<Arc<State>>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(denied) = check_caller(&headers) {
        return denied;
    }
    state.configmap_reads.fetch_add(1, Ordering::SeqCst);
    if state.configmap_forbidden.load(Ordering::SeqCst) {
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "configmaps \"{name}\" is forbidden: User \"system:serviceaccount:monitoring:openclaw-metrics-adapter\" \
                 cannot get resource \"configmaps\" in API group \"\" in the namespace \"{ns}\""
            ),
        );
    }
    let data = state.configmap.lock().unwrap().clone();
    match data {
        Some(data) if ns == "kube-system" && name == "extension-apiserver-authentication" => {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(name),
                    namespace: Some(ns),
                    resource_version: Some("4711".into()),
                    uid: Some("6f1c2d5e-0000-4000-8000-000000000001".into()),
                    ..ObjectMeta::default()
                },
                data: Some(data),
                ..ConfigMap::default()
            };
            (
                StatusCode::OK,
                [("content-type", "application/json")],
                serde_json::to_vec(&cm).unwrap(),
            )
                .into_response()
        }
        _ => status_with_details(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("configmaps \"{name}\" not found"),
            Some(StatusDetails {
                name: Some(name),
                kind: Some("configmaps".into()),
                ..StatusDetails::default()
            }),
        ),
    }
}

async fn token_review(
    AxumState(state): AxumState<Arc<State>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(denied) = check_caller(&headers) {
        return denied;
    }
    let mut review: TokenReview = match decode(&headers, &body) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    state.token_reviews.fetch_add(1, Ordering::SeqCst);
    if state.hang_reviews.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    let token = review.spec.token.clone().unwrap_or_default();
    let user = state.tokens.lock().unwrap().get(&token).cloned();
    review.status = Some(match user {
        Some(user) => TokenReviewStatus {
            authenticated: Some(true),
            user: Some(user),
            audiences: Some(vec!["https://kubernetes.default.svc.cluster.local".into()]),
            error: None,
        },
        None => TokenReviewStatus {
            authenticated: None,
            user: Some(UserInfo::default()),
            audiences: None,
            error: Some("[invalid bearer token, token lookup failed]".into()),
        },
    });
    created(&review)
}

async fn access_review(
    AxumState(state): AxumState<Arc<State>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(denied) = check_caller(&headers) {
        return denied;
    }
    let mut review: SubjectAccessReview = match decode(&headers, &body) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    let spec = &review.spec;
    let no_subject = spec.user.as_deref().unwrap_or("").is_empty()
        && spec.groups.as_ref().is_none_or(Vec::is_empty);
    let attrs = usize::from(spec.resource_attributes.is_some())
        + usize::from(spec.non_resource_attributes.is_some());
    if no_subject || attrs != 1 {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "SubjectAccessReview.authorization.k8s.io \"\" is invalid: spec: Invalid value: at least one of user or \
             group must be specified, and exactly one of resourceAttributes or nonResourceAttributes"
                .into(),
        );
    }
    state.access_reviews.lock().unwrap().push(spec.clone());
    if state.hang_reviews.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    let (allowed, reason) = match &*state.policy.lock().unwrap() {
        Some(policy) => policy(spec),
        None => (false, String::new()),
    };
    review.status = Some(SubjectAccessReviewStatus {
        allowed,
        denied: None,
        evaluation_error: None,
        reason: (!reason.is_empty()).then_some(reason),
    });
    created(&review)
}
