//! Delegated authentication and authorization: the adapter trusts whom the cluster trusts.
//!
//! As an aggregated API server the adapter is called by the kube-aggregator (front proxy) on
//! behalf of the HPA controller or a user, and directly by anyone who can reach its Service. So
//! every request except health and OpenAPI is authenticated — front-proxy headers only behind a
//! verified front-proxy certificate, else a client certificate, else a bearer token via
//! TokenReview — and authorized with a SubjectAccessReview. All settings come from the ConfigMap
//! `kube-system/extension-apiserver-authentication`, re-read on a timer.
//!
//! Failure modes are explicit: no or bad credentials -> 401 `Status`, denied -> 403 `Status`
//! saying who cannot do what, Kubernetes API slow or down -> 503 `Status` within
//! `--kube-api-timeout` (health stays green: the adapter is fine, its judge is not).
//! `--authentication=none` must be asked for and logs a warning at start.

mod authn;
mod authz;
mod cache;
mod configmap;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::response::Response;
use http::{HeaderMap, HeaderName, StatusCode};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::UnixTime;
use tracing::{Instrument as _, debug, error, info, info_span, warn};

use self::authn::{CertOutcome, TokenAnswer};
use self::authz::Decision;
use self::cache::TtlCache;
use self::configmap::Delegation;
use crate::status::status_response;
use crate::tls::{PeerCertificates, parse_duration};

/// Errors that stop the adapter from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kubeconfig could not be read, or there is no in-cluster configuration.
    #[error("Kubernetes client configuration: {0}")]
    KubeConfig(String),
    /// The adapter's own identity may not read the authentication ConfigMap.
    #[error(
        "cannot read configmap {ns}/{name}: {message}. Grant it with a RoleBinding in {ns} to Role \
         extension-apiserver-authentication-reader for the adapter's ServiceAccount",
        ns = configmap::NAMESPACE,
        name = configmap::NAME
    )]
    ConfigMapForbidden {
        /// The API server's message.
        message: String,
    },
}

/// `--authentication`: there is no default, so running without authentication is a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Delegate to the Kubernetes API (TokenReview, SubjectAccessReview, client CAs from
    /// `kube-system/extension-apiserver-authentication`). What a cluster deployment uses.
    Delegated,
    /// Serve everyone. For running outside a cluster (development, tests); logs a warning.
    None,
}

/// Authentication and authorization flags. Flatten into the binary's clap struct.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthArgs {
    /// `delegated` (in a cluster) or `none` (no authentication, no authorization). Required.
    #[arg(long, env = "OPENCLAW_ADAPTER_AUTHENTICATION", value_enum)]
    pub authentication: AuthMode,

    /// Kubeconfig for reaching the Kubernetes API. Without it: the in-cluster ServiceAccount.
    #[arg(long, env = "OPENCLAW_ADAPTER_KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    /// Bound on each call to the Kubernetes API (ConfigMap, TokenReview, SubjectAccessReview);
    /// past it the request gets a 503 Status.
    #[arg(long, env = "OPENCLAW_ADAPTER_KUBE_API_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub kube_api_timeout: Duration,

    /// How long a TokenReview answer (accepted or rejected token) is reused.
    #[arg(long, env = "OPENCLAW_ADAPTER_AUTHENTICATION_TOKEN_CACHE_TTL", default_value = "10s", value_parser = parse_duration)]
    pub authentication_token_cache_ttl: Duration,

    /// How long an "allowed" SubjectAccessReview answer is reused.
    #[arg(long, env = "OPENCLAW_ADAPTER_AUTHORIZATION_CACHE_ALLOWED_TTL", default_value = "10s", value_parser = parse_duration)]
    pub authorization_cache_allowed_ttl: Duration,

    /// How long a "denied" SubjectAccessReview answer is reused.
    #[arg(long, env = "OPENCLAW_ADAPTER_AUTHORIZATION_CACHE_DENIED_TTL", default_value = "10s", value_parser = parse_duration)]
    pub authorization_cache_denied_ttl: Duration,

    /// How often `kube-system/extension-apiserver-authentication` is re-read (CA rotation).
    #[arg(long, env = "OPENCLAW_ADAPTER_AUTHENTICATION_CONFIG_REFRESH", default_value = "30s", value_parser = parse_duration)]
    pub authentication_config_refresh: Duration,

    /// Extra paths served without authentication or authorization (e.g. `/metrics`); a trailing
    /// `*` matches a prefix. Health (`/healthz`, `/livez`, `/readyz`) and `/openapi/*` always are.
    #[arg(
        long,
        env = "OPENCLAW_ADAPTER_AUTHORIZATION_ALWAYS_ALLOW_PATHS",
        value_delimiter = ',',
        value_name = "PATH"
    )]
    pub authorization_always_allow_paths: Vec<String>,
}

impl AuthArgs {
    /// Defaults of every flag for `mode`, for tests and embedding.
    pub fn new(mode: AuthMode) -> Self {
        Self {
            authentication: mode,
            kubeconfig: None,
            kube_api_timeout: Duration::from_secs(5),
            authentication_token_cache_ttl: Duration::from_secs(10),
            authorization_cache_allowed_ttl: Duration::from_secs(10),
            authorization_cache_denied_ttl: Duration::from_secs(10),
            authentication_config_refresh: Duration::from_secs(30),
            authorization_always_allow_paths: Vec::new(),
        }
    }
}

/// Who made a request, as authenticated; put into the request's extensions for handlers and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserInfo {
    /// User name (`system:serviceaccount:ns:name`, a CN, or what the front proxy asserted).
    pub name: String,
    /// UID, when the authenticator knows one.
    pub uid: Option<String>,
    /// Groups, always including `system:authenticated`.
    pub groups: Vec<String>,
    /// Extra attributes (scopes, …), passed on to SubjectAccessReview unchanged.
    pub extra: BTreeMap<String, Vec<String>>,
}

const GROUP_AUTHENTICATED: &str = "system:authenticated";
const GROUP_MASTERS: &str = "system:masters";
const TOKEN_CACHE_CAPACITY: usize = 4096;
const DECISION_CACHE_CAPACITY: usize = 8192;

/// Paths every probe and OpenAPI client may read: the contract forbids 401/403 on them.
fn always_open(path: &str) -> bool {
    [
        "/healthz",
        "/livez",
        "/readyz",
        "/openapi/v2",
        "/openapi/v3",
    ]
    .iter()
    .any(|p| {
        path == *p
            || path
                .strip_prefix(p)
                .is_some_and(|rest| rest.starts_with('/'))
    })
}

/// Authentication and authorization state, shared by all requests.
pub struct Auth {
    mode: Option<Arc<Delegated>>,
    extra_open_paths: Vec<String>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("delegated", &self.mode.is_some())
            .field("extra_open_paths", &self.extra_open_paths)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// Builds the client and reads the authentication ConfigMap once (bounded by
    /// `--kube-api-timeout`), then keeps re-reading it in the background while `Auth` lives.
    ///
    /// Fails when the kubeconfig is unusable or the adapter may not read the ConfigMap (an RBAC
    /// mistake, reported with the fix). An unreachable API is not fatal: requests that need it
    /// get 503 until it answers, and [`Auth::ready`] says whether the ConfigMap was read.
    pub async fn from_args(args: &AuthArgs) -> Result<Self, Error> {
        let extra_open_paths = args.authorization_always_allow_paths.clone();
        if args.authentication == AuthMode::None {
            warn!(
                "--authentication=none: every request is served without authentication or authorization; \
                 never run like this where the port is reachable by others"
            );
            return Ok(Self {
                mode: None,
                extra_open_paths,
            });
        }
        let client = kube_client(args).await?;
        let delegated = Arc::new(Delegated {
            client,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            api_timeout: args.kube_api_timeout,
            state: RwLock::new(LoadState::NotLoaded("not read yet".to_owned())),
            tokens: TtlCache::new(TOKEN_CACHE_CAPACITY),
            token_ttl: args.authentication_token_cache_ttl,
            decisions: TtlCache::new(DECISION_CACHE_CAPACITY),
            allowed_ttl: args.authorization_cache_allowed_ttl,
            denied_ttl: args.authorization_cache_denied_ttl,
            token_key: ring::hmac::Key::generate(
                ring::hmac::HMAC_SHA256,
                &ring::rand::SystemRandom::new(),
            )
            .map_err(|_| {
                Error::KubeConfig("no system randomness for the token cache key".to_owned())
            })?,
        });
        if let Err(ReloadError::Forbidden(message)) = delegated.reload().await {
            return Err(Error::ConfigMapForbidden { message });
        }
        tokio::spawn(
            refresh(
                Arc::downgrade(&delegated),
                args.authentication_config_refresh,
            )
            .instrument(info_span!("auth_config_refresh")),
        );
        Ok(Self {
            mode: Some(delegated),
            extra_open_paths,
        })
    }

    /// A pass-through `Auth` (`--authentication=none`) without the start-up warning, for tests.
    pub fn disabled() -> Self {
        Self {
            mode: None,
            extra_open_paths: Vec::new(),
        }
    }

    /// Whether requests can be judged: always with `none`; with `delegated`, once the
    /// authentication ConfigMap was read. For `/readyz`.
    pub fn ready(&self) -> bool {
        self.mode
            .as_ref()
            .is_none_or(|d| matches!(*d.state(), LoadState::Loaded(_)))
    }

    fn is_open(&self, path: &str) -> bool {
        always_open(path)
            || self
                .extra_open_paths
                .iter()
                .any(|p| match p.strip_suffix('*') {
                    Some(prefix) => path.starts_with(prefix),
                    None => path == p,
                })
    }

    /// Lets `req` through (with its [`UserInfo`] attached) or answers it with a Status.
    async fn check(&self, mut req: Request) -> Result<Request, Response> {
        let Some(d) = &self.mode else {
            strip_identity_headers(req.headers_mut(), None);
            return Ok(req);
        };
        let loaded = match &*d.state() {
            LoadState::Loaded(delegation) => Ok(delegation.clone()),
            LoadState::NotLoaded(why) => Err(why.clone()),
        };
        if self.is_open(req.uri().path()) {
            strip_identity_headers(req.headers_mut(), loaded.as_deref().ok());
            return Ok(req);
        }
        let delegation = loaded.map_err(|why| {
            status_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                format!(
                    "cannot authenticate requests yet: configmap {}/{} has not been read ({why})",
                    configmap::NAMESPACE,
                    configmap::NAME
                ),
            )
        })?;

        let peer = req.extensions().get::<PeerCertificates>().cloned();
        let mut user = d
            .authenticate(&delegation, peer.as_ref(), req.headers())
            .await?;
        if !user.groups.iter().any(|g| g == GROUP_AUTHENTICATED) {
            user.groups.push(GROUP_AUTHENTICATED.to_owned());
        }
        // Handlers never see credentials or headers that only the front proxy may set.
        strip_identity_headers(req.headers_mut(), Some(&delegation));
        req.headers_mut().remove(http::header::AUTHORIZATION);

        if !user.groups.iter().any(|g| g == GROUP_MASTERS) {
            let attributes = authz::attributes(req.method(), req.uri().path(), req.uri().query());
            let decision = d.authorize(&user, &attributes).await?;
            if !decision.allowed {
                let message = authz::forbidden_message(&user, &attributes, &decision.reason);
                debug!(user = %user.name, %message, "forbidden");
                return Err(status_response(StatusCode::FORBIDDEN, "Forbidden", message));
            }
        }
        req.extensions_mut().insert(user);
        Ok(req)
    }
}

/// Removes the front-proxy identity headers; they are only ever read by `auth`, and only after
/// the front proxy's certificate has been verified.
fn strip_identity_headers(headers: &mut HeaderMap, delegation: Option<&Delegation>) {
    const DEFAULT_NAMES: [&str; 3] = ["x-remote-user", "x-remote-uid", "x-remote-group"];
    const DEFAULT_PREFIX: &str = "x-remote-extra-";
    let fp = delegation.and_then(|d| d.front_proxy.as_ref());
    let mut doomed: Vec<HeaderName> = DEFAULT_NAMES
        .iter()
        .map(|n| HeaderName::from_static(n))
        .collect();
    if let Some(fp) = fp {
        doomed.extend(
            fp.username_headers
                .iter()
                .chain(&fp.uid_headers)
                .chain(&fp.group_headers)
                .cloned(),
        );
    }
    doomed.extend(
        headers
            .keys()
            .filter(|name| {
                name.as_str().starts_with(DEFAULT_PREFIX)
                    || fp.is_some_and(|fp| {
                        fp.extra_prefixes
                            .iter()
                            .any(|p| name.as_str().starts_with(p.as_str()))
                    })
            })
            .cloned(),
    );
    for name in doomed {
        headers.remove(name);
    }
}

/// What `delegated` mode keeps between requests.
struct Delegated {
    client: kube::Client,
    provider: Arc<CryptoProvider>,
    api_timeout: Duration,
    state: RwLock<LoadState>,
    tokens: TtlCache<TokenAnswer>,
    token_ttl: Duration,
    decisions: TtlCache<Decision>,
    allowed_ttl: Duration,
    denied_ttl: Duration,
    /// Random per process: cache keys are HMACs of tokens, useless outside this process.
    token_key: ring::hmac::Key,
}

enum LoadState {
    Loaded(Arc<Delegation>),
    NotLoaded(String),
}

enum ReloadError {
    Forbidden(String),
    Other,
}

/// A failed call to the Kubernetes API, turned into the Status the caller gets.
fn api_failure(
    what: &str,
    timeout: Duration,
    result: Result<kube::Error, tokio::time::error::Elapsed>,
) -> Response {
    let (code, reason, message) = match result {
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            format!("{what}: the Kubernetes API did not answer within {timeout:?}"),
        ),
        Ok(kube::Error::Api(status)) => (
            // The API answered but refused the adapter itself (e.g. no system:auth-delegator
            // binding): a deployment mistake, not the caller's.
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            format!(
                "{what}: the Kubernetes API refused the adapter ({} {}): {}; it needs a ClusterRoleBinding to system:auth-delegator",
                status.code, status.reason, status.message
            ),
        ),
        Ok(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            format!("{what}: the Kubernetes API is unreachable: {e}"),
        ),
    };
    error!(%message, "delegated auth failed");
    status_response(code, reason, message)
}

impl Delegated {
    fn state(&self) -> std::sync::RwLockReadGuard<'_, LoadState> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Re-reads the ConfigMap. A bad or unreadable new version keeps the last good one.
    async fn reload(&self) -> Result<(), ReloadError> {
        let fetched = tokio::time::timeout(self.api_timeout, configmap::fetch(&self.client)).await;
        let (name, ns) = (configmap::NAME, configmap::NAMESPACE);
        let loaded = matches!(*self.state(), LoadState::Loaded(_));
        let data = match fetched {
            Ok(Ok(Some(data))) => data,
            Ok(Ok(None)) => {
                if !loaded {
                    warn!(
                        "configmap {ns}/{name} does not exist: client certificates cannot authenticate, only bearer tokens"
                    );
                }
                self.set(LoadState::Loaded(Arc::new(Delegation::empty())));
                return Ok(());
            }
            Ok(Err(kube::Error::Api(status))) if status.is_forbidden() || status.code == 401 => {
                let message = format!("{} {}", status.code, status.message);
                warn!(%message, "reading configmap {ns}/{name} is not allowed; grant Role extension-apiserver-authentication-reader");
                return Err(ReloadError::Forbidden(message));
            }
            Ok(Err(e)) => {
                return Err(
                    self.keep_or_record(format!("reading configmap {ns}/{name}: {e}"), loaded)
                );
            }
            Err(_) => {
                let why = format!(
                    "reading configmap {ns}/{name}: no answer within {:?}",
                    self.api_timeout
                );
                return Err(self.keep_or_record(why, loaded));
            }
        };
        match Delegation::parse(&data, &self.provider) {
            Ok(delegation) => {
                let summary = (
                    delegation.client_ca.as_ref().map(|c| c.size),
                    delegation
                        .front_proxy
                        .as_ref()
                        .map(|f| (f.ca.size, f.allowed_names.clone())),
                );
                self.set(LoadState::Loaded(Arc::new(delegation)));
                debug!(?summary, "authentication configmap read");
                if !loaded {
                    info!(
                        client_ca_certs = ?summary.0,
                        front_proxy = ?summary.1,
                        "delegated authentication ready"
                    );
                }
                Ok(())
            }
            Err(problems) => Err(self.keep_or_record(
                format!("configmap {ns}/{name} is invalid: {}", problems.join("; ")),
                loaded,
            )),
        }
    }

    fn keep_or_record(&self, why: String, loaded: bool) -> ReloadError {
        if loaded {
            warn!(%why, "keeping the last good authentication configuration");
        } else {
            warn!(%why, "authentication configuration not available; requests needing it get 503");
            self.set(LoadState::NotLoaded(why));
        }
        ReloadError::Other
    }

    fn set(&self, state: LoadState) {
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = state;
    }

    async fn authenticate(
        &self,
        delegation: &Delegation,
        peer: Option<&PeerCertificates>,
        headers: &HeaderMap,
    ) -> Result<UserInfo, Response> {
        let untrusted = match authn::from_certificate(delegation, peer, headers, UnixTime::now()) {
            CertOutcome::User(user) => return Ok(user),
            CertOutcome::Untrusted(why) => Some(why),
            CertOutcome::Absent => None,
        };
        let unauthorized = |message: String| {
            debug!(%message, "unauthenticated");
            status_response(StatusCode::UNAUTHORIZED, "Unauthorized", message)
        };
        let Some(token) = authn::bearer_token(headers) else {
            return Err(unauthorized(match untrusted {
                Some(why) => format!("Unauthorized: {why}, and no bearer token"),
                None => "Unauthorized: no credentials; send a bearer token or a client certificate"
                    .to_owned(),
            }));
        };
        let key: cache::Key = ring::hmac::sign(&self.token_key, token.as_bytes())
            .as_ref()
            .try_into()
            .expect("HMAC-SHA256 is 32 bytes");
        let answer = match self.tokens.get_at(&key, Instant::now()) {
            Some(answer) => answer,
            None => {
                let answer = match tokio::time::timeout(
                    self.api_timeout,
                    authn::review_token(&self.client, token),
                )
                .await
                {
                    Ok(Ok(answer)) => answer,
                    Ok(Err(e)) => return Err(api_failure("TokenReview", self.api_timeout, Ok(e))),
                    Err(elapsed) => {
                        return Err(api_failure("TokenReview", self.api_timeout, Err(elapsed)));
                    }
                };
                self.tokens
                    .insert_at(key, answer.clone(), self.token_ttl, Instant::now());
                answer
            }
        };
        match answer {
            TokenAnswer::Authenticated(user) => Ok(user),
            TokenAnswer::Rejected(why) if why.is_empty() => Err(unauthorized(
                "Unauthorized: the bearer token was rejected".to_owned(),
            )),
            TokenAnswer::Rejected(why) => Err(unauthorized(format!(
                "Unauthorized: the bearer token was rejected: {why}"
            ))),
        }
    }

    async fn authorize(
        &self,
        user: &UserInfo,
        attributes: &authz::Attributes,
    ) -> Result<Decision, Response> {
        let spec = authz::review_spec(user, attributes);
        let key: cache::Key = {
            // Specs serialize deterministically (fields in order, extra in a BTreeMap).
            let bytes = serde_json::to_vec(&spec).unwrap_or_default();
            ring::digest::digest(&ring::digest::SHA256, &bytes)
                .as_ref()
                .try_into()
                .expect("SHA-256 is 32 bytes")
        };
        if let Some(decision) = self.decisions.get_at(&key, Instant::now()) {
            return Ok(decision);
        }
        let decision =
            match tokio::time::timeout(self.api_timeout, authz::review(&self.client, spec)).await {
                Ok(Ok(decision)) => decision,
                Ok(Err(e)) => {
                    return Err(api_failure("SubjectAccessReview", self.api_timeout, Ok(e)));
                }
                Err(elapsed) => {
                    return Err(api_failure(
                        "SubjectAccessReview",
                        self.api_timeout,
                        Err(elapsed),
                    ));
                }
            };
        let ttl = if decision.allowed {
            self.allowed_ttl
        } else {
            self.denied_ttl
        };
        self.decisions
            .insert_at(key, decision.clone(), ttl, Instant::now());
        Ok(decision)
    }
}

async fn refresh(delegated: Weak<Delegated>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(d) = delegated.upgrade() else { return };
        let _ = d.reload().await;
    }
}

async fn kube_client(args: &AuthArgs) -> Result<kube::Client, Error> {
    let mut config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| Error::KubeConfig(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| Error::KubeConfig(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::incluster().map_err(|e| {
            Error::KubeConfig(format!(
                "not running in a cluster ({e}); pass --kubeconfig, or --authentication=none outside a cluster"
            ))
        })?,
    };
    config.connect_timeout = Some(args.kube_api_timeout);
    config.read_timeout = Some(args.kube_api_timeout);
    config.write_timeout = Some(args.kube_api_timeout);
    kube::Client::try_from(config).map_err(|e| Error::KubeConfig(e.to_string()))
}

/// The middleware: wrap the router with `router.layer(auth::layer(auth))`.
pub fn layer(auth: Arc<Auth>) -> AuthLayer {
    AuthLayer { auth }
}

/// See [`layer`].
#[derive(Debug, Clone)]
pub struct AuthLayer {
    auth: Arc<Auth>,
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            auth: self.auth.clone(),
            inner,
        }
    }
}

/// See [`layer`].
#[derive(Clone)]
pub struct AuthService<S> {
    auth: Arc<Auth>,
    inner: S,
}

impl<S> fmt::Debug for AuthService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthService")
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

impl<S> tower::Service<Request> for AuthService<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        // The clone that was polled ready serves this request (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        Box::pin(async move {
            match auth.check(req).await {
                Ok(req) => inner.call(req).await,
                Err(response) => Ok(response),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_and_openapi_paths_are_open_and_lookalikes_are_not() {
        for open in [
            "/healthz",
            "/livez",
            "/readyz",
            "/readyz/ping",
            "/openapi/v2",
            "/openapi/v3",
            "/openapi/v3/apis/x",
        ] {
            assert!(always_open(open), "{open}");
        }
        for closed in [
            "/healthzz",
            "/openapi",
            "/openapi/v3x",
            "/apis",
            "/metrics",
            "/",
        ] {
            assert!(!always_open(closed), "{closed}");
        }
    }

    #[test]
    fn extra_open_paths_match_exactly_or_by_trailing_star() {
        let auth = Auth {
            mode: None,
            extra_open_paths: vec!["/metrics".into(), "/debug/*".into()],
        };
        assert!(auth.is_open("/metrics") && auth.is_open("/debug/pprof"));
        assert!(!auth.is_open("/metrics/x") && !auth.is_open("/apis"));
    }

    #[test]
    fn identity_headers_are_stripped_even_without_configuration() {
        let mut headers = HeaderMap::new();
        for (k, v) in [
            ("x-remote-user", "admin"),
            ("x-remote-group", "system:masters"),
            ("x-remote-extra-scopes", "all"),
            ("accept", "*/*"),
        ] {
            headers.append(k, v.parse().unwrap());
        }
        strip_identity_headers(&mut headers, None);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("accept"));
    }
}
