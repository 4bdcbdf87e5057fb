//! Delegated authentication and authorization, end to end over HTTPS with a real client
//! (reqwest over rustls/ring) presenting real certificates (rcgen, generated per test).
//!
//! No Kubernetes API server can run on these machines: the ConfigMap, TokenReview and
//! SubjectAccessReview side is `auth_support::fake_kube_api`, a double that answers as the
//! documented API does (real k8s-openapi request/response types, 201 on create, `Status` errors,
//! its own bearer-token check), reached by the adapter's real `kube` client through a kubeconfig.

mod auth_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use auth_support::fake_kube_api::FakeKubeApi;
use auth_support::https::{Alpn, client};
use auth_support::pki::{Ca, Identity};
use auth_support::{Adapter, auth_configmap, eventually, start};
use clap::Parser;
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes, SubjectAccessReviewSpec,
};
use metrics_adapter::auth::{Auth, AuthArgs, AuthMode};
use metrics_adapter::tls::{TlsArgs, TlsConfig};
use serde_json::{Value, json};

const LIST: &str =
    "/apis/external.metrics.k8s.io/v1beta1/namespaces/edge/openclaw_requests_per_second";
const DEADLINE: Duration = Duration::from_secs(15);

struct Env {
    api: FakeKubeApi,
    adapter: Adapter,
    auth: Arc<Auth>,
    client_ca: Ca,
    front_proxy_ca: Ca,
    serving_ca: String,
    _dir: tempfile::TempDir,
}

/// The double with a kubeadm-style ConfigMap (front proxy CN `front-proxy-client`), tokens for
/// `bob` and `admin`, an allow-everything policy, and the adapter in front of the echo router.
async fn env(tweak: impl FnOnce(&mut AuthArgs)) -> Env {
    let api = FakeKubeApi::start().await;
    let (client_ca, front_proxy_ca) = (Ca::new("kubernetes-ca"), Ca::new("front-proxy-ca"));
    api.set_configmap(Some(auth_configmap(
        &client_ca,
        &front_proxy_ca,
        &["front-proxy-client"],
    )));
    api.add_token("bob-token", "bob", &["dev"]);
    api.set_policy(|_| (true, String::new()));
    let dir = tempfile::tempdir().unwrap();
    let mut args = AuthArgs::new(AuthMode::Delegated);
    args.kubeconfig = Some(api.write_kubeconfig(dir.path()));
    tweak(&mut args);
    let auth = Arc::new(Auth::from_args(&args).await.unwrap());
    let tls = TlsConfig::from_args(&TlsArgs::default()).unwrap();
    let serving_ca = tls.self_signed_ca_pem().unwrap().to_owned();
    let adapter = start(tls, Some(auth.clone())).await;
    Env {
        api,
        adapter,
        auth,
        client_ca,
        front_proxy_ca,
        serving_ca,
        _dir: dir,
    }
}

impl Env {
    /// GET `path` with an optional client certificate and extra headers; status and JSON body.
    async fn get(
        &self,
        identity: Option<&Identity>,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let http = client(
            &self.serving_ca,
            identity,
            Alpn::Http2,
            "localhost",
            self.adapter.addr,
        );
        let mut request = http.get(format!(
            "https://localhost:{}{path}",
            self.adapter.addr.port()
        ));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let body = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        )
    }
}

fn assert_status(body: &Value, code: u16, reason: &str) {
    assert_eq!(body["kind"], "Status", "{body}");
    assert_eq!(body["apiVersion"], "v1", "{body}");
    assert_eq!(body["status"], "Failure", "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["reason"], reason, "{body}");
}

const SPOOFED: [(&str, &str); 3] = [
    ("X-Remote-User", "admin"),
    ("X-Remote-Group", "system:masters"),
    ("X-Remote-Extra-Scopes", "everything"),
];

#[tokio::test]
async fn front_proxy_certificate_with_an_allowed_cn_makes_x_remote_headers_the_identity() {
    let env = env(|_| {}).await;
    let proxy = env.front_proxy_ca.client("front-proxy-client", &[]);
    let headers = [
        (
            "X-Remote-User",
            "system:serviceaccount:kube-system:horizontal-pod-autoscaler",
        ),
        ("X-Remote-Group", "system:serviceaccounts"),
        ("X-Remote-Group", "system:serviceaccounts:kube-system"),
        ("X-Remote-Extra-Acme.com%2Fproject", "edge"),
        ("X-Remote-Extra-Scopes", "a"),
        ("X-Remote-Extra-Scopes", "b"),
    ];
    let (status, body) = env.get(Some(&proxy), LIST, &headers).await;
    assert_eq!(status, 200, "{body}");
    let groups = json!([
        "system:serviceaccounts",
        "system:serviceaccounts:kube-system",
        "system:authenticated"
    ]);
    assert_eq!(
        body["user"],
        json!({
            "name": "system:serviceaccount:kube-system:horizontal-pod-autoscaler",
            "uid": null,
            "groups": groups,
            "extra": {"acme.com/project": ["edge"], "scopes": ["a", "b"]},
        })
    );
    assert_eq!(
        body["identity_headers"],
        json!([]),
        "handlers never see X-Remote-*"
    );
    let reviews = env.api.access_reviews();
    assert_eq!(reviews.len(), 1);
    assert_eq!(
        reviews[0].user.as_deref(),
        Some("system:serviceaccount:kube-system:horizontal-pod-autoscaler")
    );
    assert_eq!(
        reviews[0].groups.as_ref().unwrap(),
        &groups
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g.as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    );
    assert_eq!(
        reviews[0].extra.as_ref().unwrap()["acme.com/project"],
        ["edge"]
    );
}

#[tokio::test]
async fn front_proxy_ca_certificate_with_a_cn_not_allowed_does_not_make_x_remote_headers_trusted() {
    let env = env(|_| {}).await;
    let impostor = env.front_proxy_ca.client("mallory", &[]);
    let (status, body) = env.get(Some(&impostor), LIST, &SPOOFED).await;
    assert_eq!(status, 401, "{body}");
    assert_status(&body, 401, "Unauthorized");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("not in requestheader-allowed-names"),
        "{body}"
    );

    // With a token as well, the token's user is who asks, not the header's.
    let (status, body) = env
        .get(
            Some(&impostor),
            LIST,
            &[
                SPOOFED[0],
                SPOOFED[1],
                ("Authorization", "Bearer bob-token"),
            ],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user"]["name"], "bob");
    assert_eq!(
        body["user"]["groups"],
        json!(["dev", "system:authenticated"])
    );
    assert_eq!(
        body["authorization_header"], false,
        "handlers never see the token"
    );
    assert!(
        env.api
            .access_reviews()
            .iter()
            .all(|r| r.user.as_deref() == Some("bob"))
    );
}

#[tokio::test]
async fn a_certificate_from_another_ca_does_not_make_x_remote_headers_trusted() {
    let env = env(|_| {}).await;
    let forged = Ca::new("front-proxy-ca").client("front-proxy-client", &[]);
    let (status, body) = env.get(Some(&forged), LIST, &SPOOFED).await;
    assert_eq!(status, 401, "{body}");
    assert_status(&body, 401, "Unauthorized");
    assert!(env.api.access_reviews().is_empty());
}

#[tokio::test]
async fn x_remote_headers_without_a_certificate_are_ignored() {
    let env = env(|_| {}).await;
    let (status, body) = env.get(None, LIST, &SPOOFED).await;
    assert_eq!(status, 401, "{body}");
    assert_status(&body, 401, "Unauthorized");

    let (status, body) = env
        .get(
            None,
            LIST,
            &[
                SPOOFED[0],
                SPOOFED[1],
                ("Authorization", "Bearer bob-token"),
            ],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user"]["name"], "bob");
    let reviews = env.api.access_reviews();
    assert_eq!(
        reviews.len(),
        1,
        "system:masters from a header must not skip authorization"
    );
    assert_eq!(
        reviews[0].groups.as_deref().unwrap(),
        ["dev", "system:authenticated"]
    );
}

#[tokio::test]
async fn a_client_ca_certificate_authenticates_as_its_cn_with_its_organizations_as_groups() {
    let env = env(|_| {}).await;
    let carol = env.client_ca.client("carol", &["ops", "dev"]);
    let (status, body) = env.get(Some(&carol), LIST, &SPOOFED).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["user"]["name"], "carol",
        "X-Remote-User is ignored for a non-front-proxy cert"
    );
    assert_eq!(
        body["user"]["groups"],
        json!(["ops", "dev", "system:authenticated"])
    );
    assert_eq!(body["peer_certificates"], 1);
}

#[tokio::test]
async fn bearer_tokens_are_reviewed_once_per_ttl_for_both_good_and_bad_tokens() {
    let env = env(|_| {}).await;
    for _ in 0..3 {
        let (status, body) = env
            .get(None, LIST, &[("Authorization", "Bearer bob-token")])
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["user"],
            json!({"name": "bob", "uid": "uid-bob", "groups": ["dev", "system:authenticated"], "extra": {}})
        );
    }
    assert_eq!(
        env.api.token_reviews(),
        1,
        "answers within the TTL come from the cache"
    );
    assert_eq!(
        env.api.access_reviews().len(),
        1,
        "so do authorization decisions"
    );

    for _ in 0..2 {
        let (status, body) = env
            .get(None, LIST, &[("Authorization", "Bearer stolen-or-expired")])
            .await;
        assert_eq!(status, 401, "{body}");
        assert_status(&body, 401, "Unauthorized");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("invalid bearer token"),
            "{body}"
        );
    }
    assert_eq!(env.api.token_reviews(), 2, "a rejection is cached too");
}

#[tokio::test]
async fn a_token_review_is_asked_again_once_the_ttl_has_passed() {
    let env = env(|args| args.authentication_token_cache_ttl = Duration::from_millis(200)).await;
    let auth = [("Authorization", "Bearer bob-token")];
    assert_eq!(env.get(None, LIST, &auth).await.0, 200);
    assert_eq!(env.api.token_reviews(), 1);
    eventually("a second TokenReview after the TTL", DEADLINE, || async {
        assert_eq!(env.get(None, LIST, &auth).await.0, 200);
        (env.api.token_reviews() == 2).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_list_call_is_authorized_with_the_exact_resource_attributes_and_a_denial_says_why() {
    let env = env(|_| {}).await;
    env.api.set_policy(|spec| {
        let allowed = spec
            .resource_attributes
            .as_ref()
            .is_some_and(|r| r.resource.as_deref() == Some("openclaw_requests_per_second"));
        (
            allowed,
            if allowed {
                String::new()
            } else {
                "no RBAC policy matched".into()
            },
        )
    });
    let bob = [("Authorization", "Bearer bob-token")];
    let (status, body) = env.get(None, LIST, &bob).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        env.api.access_reviews(),
        [SubjectAccessReviewSpec {
            user: Some("bob".into()),
            uid: Some("uid-bob".into()),
            groups: Some(vec!["dev".into(), "system:authenticated".into()]),
            extra: None,
            resource_attributes: Some(ResourceAttributes {
                group: Some("external.metrics.k8s.io".into()),
                version: Some("v1beta1".into()),
                resource: Some("openclaw_requests_per_second".into()),
                namespace: Some("edge".into()),
                verb: Some("list".into()),
                ..ResourceAttributes::default()
            }),
            non_resource_attributes: None,
        }]
    );

    let (status, body) = env
        .get(
            None,
            "/apis/external.metrics.k8s.io/v1beta1/namespaces/edge/openclaw_token_depletion_rate",
            &bob,
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert_status(&body, 403, "Forbidden");
    assert_eq!(
        body["message"],
        "openclaw_token_depletion_rate.external.metrics.k8s.io is forbidden: User \"bob\" cannot list resource \
         \"openclaw_token_depletion_rate\" in API group \"external.metrics.k8s.io\" in the namespace \"edge\": \
         no RBAC policy matched"
    );
    // The denial is cached as well.
    assert_eq!(
        env.get(
            None,
            "/apis/external.metrics.k8s.io/v1beta1/namespaces/edge/openclaw_token_depletion_rate",
            &bob
        )
        .await
        .0,
        403
    );
    assert_eq!(env.api.access_reviews().len(), 2);
}

/// Go apiservers decode the path before anything looks at it, so what is authorized is what
/// is served: a percent-encoded namespace or metric must be reviewed decoded. Here an
/// authorizer denies namespace `secret-ns` (as a webhook or a deny rule could); asking for
/// `secret%2Dns` must not slip past it and be served as `secret-ns`.
#[tokio::test]
async fn the_list_call_is_authorized_on_the_decoded_namespace_and_metric_it_serves() {
    let env = env(|_| {}).await;
    env.api.set_policy(|spec| {
        let denied = spec
            .resource_attributes
            .as_ref()
            .is_some_and(|r| r.namespace.as_deref() == Some("secret-ns"));
        (!denied, String::new())
    });
    let bob = [("Authorization", "Bearer bob-token")];
    for encoded in [
        "/apis/external.metrics.k8s.io/v1beta1/namespaces/secret%2Dns/openclaw_requests_per_second",
        "/apis/external.metrics.k8s.io/v1beta1/namespaces/%73ecret-ns/openclaw%5Frequests_per_second",
    ] {
        let (status, body) = env.get(None, encoded, &bob).await;
        let review = env.api.access_reviews().pop().unwrap();
        let attributes = review.resource_attributes.unwrap();
        assert_eq!(
            (
                attributes.namespace.as_deref(),
                attributes.resource.as_deref()
            ),
            (Some("secret-ns"), Some("openclaw_requests_per_second")),
            "{encoded} was reviewed as something other than what it names; answer {status} {body}"
        );
        assert_eq!(status, 403, "{encoded}: {body}");
        assert_status(&body, 403, "Forbidden");
    }

    // Allowed elsewhere: the review names exactly the namespace and metric that are served.
    let (status, body) = env
        .get(
            None,
            "/apis/external.metrics.k8s.io/v1beta1/namespaces/ed%67e/openclaw%5Frequests_per_second",
            &bob,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let attributes = env
        .api
        .access_reviews()
        .pop()
        .unwrap()
        .resource_attributes
        .unwrap();
    assert_eq!(body["served"]["namespace"], "edge");
    assert_eq!(body["served"]["metric"], "openclaw_requests_per_second");
    assert_eq!(attributes.namespace.as_deref(), Some("edge"));
    assert_eq!(
        attributes.resource.as_deref(),
        Some("openclaw_requests_per_second")
    );
}

#[tokio::test]
async fn discovery_is_authorized_as_a_non_resource_get_of_its_path() {
    let env = env(|_| {}).await;
    let bob = [("Authorization", "Bearer bob-token")];
    for path in ["/apis", "/apis/external.metrics.k8s.io/v1beta1"] {
        assert_eq!(env.get(None, path, &bob).await.0, 200);
        let last = env.api.access_reviews().pop().unwrap();
        assert_eq!(last.resource_attributes, None);
        assert_eq!(
            last.non_resource_attributes,
            Some(NonResourceAttributes {
                path: Some(path.into()),
                verb: Some("get".into())
            })
        );
    }
}

#[tokio::test]
async fn system_masters_skips_subject_access_review() {
    let env = env(|_| {}).await;
    env.api
        .set_policy(|_| (false, "everything is denied".into()));
    let admin = env
        .client_ca
        .client("kubernetes-admin", &["system:masters"]);
    let (status, body) = env.get(Some(&admin), LIST, &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(env.api.access_reviews().is_empty());
    let plain = env.client_ca.client("dave", &["ops"]);
    assert_eq!(env.get(Some(&plain), LIST, &[]).await.0, 403);

    // The aggregator's availability probe: front proxy, system:kube-aggregator in system:masters.
    let proxy = env.front_proxy_ca.client("front-proxy-client", &[]);
    let probe = [
        ("X-Remote-User", "system:kube-aggregator"),
        ("X-Remote-Group", "system:masters"),
    ];
    let (status, body) = env
        .get(
            Some(&proxy),
            "/apis/external.metrics.k8s.io/v1beta1",
            &probe,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        env.api.access_reviews().len(),
        1,
        "only dave's request was reviewed"
    );
}

#[tokio::test]
async fn health_and_openapi_answer_without_credentials_even_when_the_api_hangs() {
    let env = env(|args| args.kube_api_timeout = Duration::from_millis(300)).await;
    env.api.hang_reviews();
    for path in [
        "/healthz",
        "/livez",
        "/readyz",
        "/openapi/v2",
        "/openapi/v3",
    ] {
        let (status, body) = env.get(None, path, &[]).await;
        assert_eq!(status, 200, "{path}: {body}");
        // Garbage credentials do not turn them into 401 either.
        let (status, _) = env
            .get(None, path, &[("Authorization", "Bearer nonsense")])
            .await;
        assert_eq!(status, 200, "{path}");
    }
    assert_eq!(env.api.token_reviews(), 0);
    let (status, body) = env.get(None, "/apis", &[]).await;
    assert_eq!(status, 401);
    assert_status(&body, 401, "Unauthorized");
}

#[tokio::test]
async fn a_hung_kubernetes_api_yields_a_503_status_within_the_bound() {
    let bound = Duration::from_millis(500);
    let env = env(|args| args.kube_api_timeout = bound).await;
    env.api.hang_reviews();
    let started = Instant::now();
    let (status, body) = env
        .get(None, LIST, &[("Authorization", "Bearer bob-token")])
        .await;
    let took = started.elapsed();
    assert_eq!(status, 503, "{body}");
    assert_status(&body, 503, "ServiceUnavailable");
    assert!(
        body["message"].as_str().unwrap().contains("TokenReview"),
        "{body}"
    );
    assert!(took < bound + Duration::from_secs(2), "took {took:?}");

    // A front-proxy request needs no TokenReview, but its SubjectAccessReview hangs too.
    let proxy = env.front_proxy_ca.client("front-proxy-client", &[]);
    let started = Instant::now();
    let (status, body) = env
        .get(Some(&proxy), LIST, &[("X-Remote-User", "alice")])
        .await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("SubjectAccessReview"),
        "{body}"
    );
    assert!(started.elapsed() < bound + Duration::from_secs(2));
    assert_eq!(env.get(None, "/healthz", &[]).await.0, 200);
}

#[tokio::test]
async fn an_unreachable_kubernetes_api_at_start_is_not_fatal_and_answers_503_until_it_is_back() {
    // A port that was just free: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: gone\n  cluster:\n    server: http://{closed}\n\
             contexts:\n- name: gone\n  context:\n    cluster: gone\n    user: u\ncurrent-context: gone\n\
             users:\n- name: u\n  user:\n    token: t\n"
        ),
    )
    .unwrap();
    let mut args = AuthArgs::new(AuthMode::Delegated);
    args.kubeconfig = Some(kubeconfig);
    args.kube_api_timeout = Duration::from_millis(500);
    let started = Instant::now();
    let auth = Arc::new(Auth::from_args(&args).await.unwrap());
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(!auth.ready());

    let tls = TlsConfig::from_args(&TlsArgs::default()).unwrap();
    let ca = tls.self_signed_ca_pem().unwrap().to_owned();
    let adapter = start(tls, Some(auth)).await;
    let http = client(&ca, None, Alpn::Http1, "localhost", adapter.addr);
    let base = format!("https://localhost:{}", adapter.addr.port());
    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let response = http
        .get(format!("{base}{LIST}"))
        .bearer_auth("t")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_status(&body, 503, "ServiceUnavailable");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("extension-apiserver-authentication"),
        "{body}"
    );
}

#[tokio::test]
async fn a_forbidden_configmap_at_start_is_an_error_that_names_the_missing_role() {
    let api = FakeKubeApi::start().await;
    api.forbid_configmap();
    let dir = tempfile::tempdir().unwrap();
    let mut args = AuthArgs::new(AuthMode::Delegated);
    args.kubeconfig = Some(api.write_kubeconfig(dir.path()));
    let err = Auth::from_args(&args).await.unwrap_err().to_string();
    assert!(
        err.contains("extension-apiserver-authentication-reader"),
        "{err}"
    );
    assert!(err.contains("403"), "{err}");
}

#[tokio::test]
async fn a_rotated_front_proxy_ca_takes_effect_after_the_configmap_is_reread() {
    let env = env(|args| args.authentication_config_refresh = Duration::from_millis(100)).await;
    assert!(env.auth.ready());
    let old_proxy = env.front_proxy_ca.client("front-proxy-client", &[]);
    let user = [("X-Remote-User", "alice")];
    assert_eq!(env.get(Some(&old_proxy), LIST, &user).await.0, 200);

    let rotated = Ca::new("front-proxy-ca-2");
    let new_proxy = rotated.client("front-proxy-client", &[]);
    assert_eq!(env.get(Some(&new_proxy), LIST, &user).await.0, 401);
    let reads_before = env.api.configmap_reads();
    env.api.set_configmap(Some(auth_configmap(
        &env.client_ca,
        &rotated,
        &["front-proxy-client"],
    )));
    eventually("the rotated CA is trusted", DEADLINE, || async {
        (env.get(Some(&new_proxy), LIST, &user).await.0 == 200).then_some(())
    })
    .await;
    assert!(env.api.configmap_reads() > reads_before);
    assert_eq!(
        env.get(Some(&old_proxy), LIST, &user).await.0,
        401,
        "the old CA is no longer trusted"
    );
}

#[tokio::test]
async fn a_missing_configmap_leaves_bearer_tokens_working() {
    let api = FakeKubeApi::start().await; // publishes no ConfigMap: reads get 404
    api.add_token("bob-token", "bob", &[]);
    api.set_policy(|_| (true, String::new()));
    let dir = tempfile::tempdir().unwrap();
    let mut args = AuthArgs::new(AuthMode::Delegated);
    args.kubeconfig = Some(api.write_kubeconfig(dir.path()));
    let auth = Arc::new(Auth::from_args(&args).await.unwrap());
    assert!(auth.ready());
    let tls = TlsConfig::from_args(&TlsArgs::default()).unwrap();
    let ca = tls.self_signed_ca_pem().unwrap().to_owned();
    let adapter = start(tls, Some(auth)).await;
    let http = client(&ca, None, Alpn::Http1, "localhost", adapter.addr);
    let response = http
        .get(format!("https://localhost:{}{LIST}", adapter.addr.port()))
        .bearer_auth("bob-token")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn authentication_none_serves_everyone_and_still_strips_identity_headers() {
    let auth = Arc::new(
        Auth::from_args(&AuthArgs::new(AuthMode::None))
            .await
            .unwrap(),
    );
    assert!(auth.ready());
    let tls = TlsConfig::from_args(&TlsArgs::default()).unwrap();
    let ca = tls.self_signed_ca_pem().unwrap().to_owned();
    let adapter = start(tls, Some(auth)).await;
    let http = client(&ca, None, Alpn::Http1, "localhost", adapter.addr);
    let response = http
        .get(format!("https://localhost:{}{LIST}", adapter.addr.port()))
        .header("X-Remote-User", "admin")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["user"], Value::Null);
    assert_eq!(body["identity_headers"], json!([]));
}

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    auth: AuthArgs,
}

#[test]
fn the_authentication_mode_must_be_given_explicitly() {
    let err = Cli::try_parse_from(["adapter"]).unwrap_err();
    assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    assert!(err.to_string().contains("--authentication"), "{err}");
    let cli = Cli::try_parse_from([
        "adapter",
        "--authentication=delegated",
        "--kube-api-timeout=2s",
    ])
    .unwrap();
    assert_eq!(cli.auth.authentication, AuthMode::Delegated);
    assert_eq!(cli.auth.kube_api_timeout, Duration::from_secs(2));
    assert_eq!(
        cli.auth.authentication_token_cache_ttl,
        Duration::from_secs(10)
    );
    assert!(Cli::try_parse_from(["adapter", "--authentication=maybe"]).is_err());
}
