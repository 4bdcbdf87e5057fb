//! The rate limit service over real gRPC on 127.0.0.1:0, in-process: health follows readiness
//! and shutdown, `ShouldRateLimit` answers and refuses bad input with INVALID_ARGUMENT, the rule
//! files reload on change and a broken edit keeps the last good rules; shutdown answers the calls
//! in flight, and another service's calls are UNIMPLEMENTED.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use openclaw_limiter::bucket::Rate;
use openclaw_limiter::clock::WallClock;
use openclaw_limiter::crdt::ReplicaId;
use openclaw_limiter::rls::config::read_files;
use openclaw_limiter::rls::grpc::{self, GrpcOptions, serve};
use openclaw_limiter::rls::{Rls, RlsConfig};
use openclaw_limiter::service::{Limiter, LimiterOptions};
use tokio::sync::watch;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const DEADLINE: Duration = Duration::from_secs(10);
const RLS_SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
const API_KEY: &str = "rls-test-key-0123456789";

async fn poll<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A lone limiter (no peers) on the wall clock.
fn limiter(node_id: &str) -> Arc<Limiter> {
    Arc::new(Limiter::new(LimiterOptions {
        node_id: node_id.into(),
        replica: ReplicaId(1),
        default_rate: Rate::try_new(10, 1000).unwrap(),
        clock: Arc::new(WallClock::new()),
        shards: 4,
        track_changes: false,
    }))
}

/// A request with the API key, as Envoy sends it with `initial_metadata`.
fn request(domain: &str, entries: &[(&str, &str)]) -> tonic::Request<RateLimitRequest> {
    let mut request = tonic::Request::new(unauthenticated(domain, entries));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {API_KEY}").parse().unwrap(),
    );
    request
}

fn unauthenticated(domain: &str, entries: &[(&str, &str)]) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.into(),
        descriptors: vec![RateLimitDescriptor {
            entries: entries
                .iter()
                .map(|&(key, value)| Entry {
                    key: key.into(),
                    value: value.into(),
                })
                .collect(),
            ..Default::default()
        }],
        hits_addend: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_follows_readiness_rules_reload_and_shutdown_drains() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edge.yaml");
    std::fs::write(
        &file,
        "domain: edge\ndescriptors:\n  - key: k\n    rate_limit: {unit: hour, requests_per_unit: 1}\n",
    )
    .unwrap();
    let limiter = limiter("grpc");
    let files = read_files(&file).unwrap();
    let rls = Arc::new(Rls::new(
        limiter.clone(),
        RlsConfig::from_files(&files).unwrap(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = tokio::spawn(serve(
        GrpcOptions {
            listener,
            rls,
            config_path: Some(file.clone()),
            config_files: Some(files),
            reload_every: Duration::from_millis(50),
            shutdown_grace: Duration::from_secs(5),
            api_key: Some(Arc::from(API_KEY)),
            limits: grpc::DEFAULT_LIMITS,
        },
        stop_rx,
    ));
    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect_timeout(DEADLINE)
        .connect_lazy();
    let health = HealthClient::new(channel.clone());
    let rls = RateLimitServiceClient::new(channel);
    let status = |service: &str| {
        let mut health = health.clone();
        let service = service.to_owned();
        async move {
            health
                .check(HealthCheckRequest { service })
                .await
                .ok()
                .map(|r| r.into_inner().status)
        }
    };

    // Not ready yet: the limiter has not recovered. Decisions are answered all the same.
    let not_serving = poll("the health service", || status(RLS_SERVICE)).await;
    assert_eq!(not_serving, ServingStatus::NotServing as i32);
    assert_eq!(status("").await, Some(ServingStatus::NotServing as i32));
    limiter.mark_ready();
    poll("SERVING once ready", || async {
        (status(RLS_SERVICE).await == Some(ServingStatus::Serving as i32)).then_some(())
    })
    .await;
    assert_eq!(status("").await, Some(ServingStatus::Serving as i32));

    let code = |domain: &'static str, value: &'static str| {
        let mut rls = rls.clone();
        async move {
            rls.should_rate_limit(request(domain, &[("k", value)]))
                .await
                .map(|r| r.into_inner().overall_code)
        }
    };
    assert_eq!(code("edge", "a").await.unwrap(), Code::Ok as i32);
    assert_eq!(code("edge", "a").await.unwrap(), Code::OverLimit as i32);
    let refused = code("", "a").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("domain"), "{refused:?}");
    // Without the API key (or with a wrong one): refused, nothing decided.
    let mut anonymous = rls.clone();
    let refused = anonymous
        .should_rate_limit(unauthenticated("edge", &[("k", "b")]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let mut wrong = tonic::Request::new(unauthenticated("edge", &[("k", "b")]));
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer guess".parse().unwrap());
    let refused = anonymous.should_rate_limit(wrong).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert_eq!(
        code("edge", "b").await.unwrap(),
        Code::Ok as i32,
        "b untouched"
    );
    assert!(
        limiter
            .render_metrics()
            .contains(r#"openclaw_rls_requests_total{code="unauthenticated"} 2"#)
    );

    // A changed file is applied; the bucket of the rule that stays keeps its state.
    std::fs::write(
        &file,
        "domain: edge\ndescriptors:\n  - key: k\n    rate_limit: {unit: hour, requests_per_unit: 1}\n  - key: fresh\n    rate_limit: {unit: hour, requests_per_unit: 5}\n",
    )
    .unwrap();
    let mut fresh = rls.clone();
    poll("the new rule", || {
        let mut fresh = fresh.clone();
        async move {
            let r = fresh
                .should_rate_limit(request("edge", &[("fresh", "x")]))
                .await
                .ok()?
                .into_inner();
            r.statuses[0].current_limit.is_some().then_some(())
        }
    })
    .await;
    assert_eq!(code("edge", "a").await.unwrap(), Code::OverLimit as i32);
    // A broken edit keeps the last good rules and is reported.
    std::fs::write(
        &file,
        "domain: edge\ndescriptors:\n  - key: k\n    rate_limit: {unit: fortnight}\n",
    )
    .unwrap();
    poll("the failed reload to be counted", || async {
        limiter
            .render_metrics()
            .contains("openclaw_rls_config_last_reload_successful 0")
            .then_some(())
    })
    .await;
    let r = fresh
        .should_rate_limit(request("edge", &[("fresh", "x")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.statuses[0].limit_remaining, 3, "the last good rules stay");

    // Shutdown: the server drains and ends within the grace period.
    stop_tx.send(true).unwrap();
    tokio::time::timeout(DEADLINE, server)
        .await
        .expect("the gRPC server stops")
        .unwrap();
    assert!(code("edge", "b").await.is_err(), "nothing listens any more");
}

/// gRPC's length-prefixed message: not compressed, length, the encoded request.
fn grpc_frame(request: &RateLimitRequest) -> bytes::Bytes {
    let message = prost::Message::encode_to_vec(request);
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&message);
    frame.into()
}

/// The headers of a call to `path` as a gRPC client sends them.
fn grpc_call(address: std::net::SocketAddr, path: &str) -> http::Request<()> {
    http::Request::post(format!("http://{address}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {API_KEY}"))
        .body(())
        .unwrap()
}

/// Open a call to `path` on `client`'s connection: its answer, and the stream to send its
/// message on.
async fn open_call(
    client: &h2::client::SendRequest<bytes::Bytes>,
    address: std::net::SocketAddr,
    path: &str,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    client
        .clone()
        .ready()
        .await
        .expect("the connection takes a call")
        .send_request(grpc_call(address, path), false)
        .expect("the call opens")
}

/// A whole answer over a raw HTTP/2 stream: its body and its trailers' `grpc-status`.
async fn grpc_answer(response: h2::client::ResponseFuture) -> (Vec<u8>, Option<String>) {
    let response = response.await.expect("the call is answered");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("the answer's body arrives whole");
        body.flow_control().release_capacity(chunk.len()).unwrap();
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.expect("the answer's trailers arrive");
    let status = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .map(|v| v.to_str().unwrap().to_owned());
    (data, status)
}

/// Shutdown lets the calls already received finish: a call whose request is still arriving when
/// shutdown starts is answered, on a connection that takes no new call (GOAWAY). A path of no
/// service served here is UNIMPLEMENTED, the way gRPC servers say it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_flight_when_shutdown_starts_is_answered_and_unknown_services_are_unimplemented()
{
    let (_limiter, address, stop_tx, server) = serve_with(grpc::DEFAULT_LIMITS).await;
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let should_rate_limit = format!("/{RLS_SERVICE}/ShouldRateLimit");

    // A service nobody serves here.
    let (answer, mut request) = open_call(&client, address, "/no.such.Service/Method").await;
    // The server may answer (and close the stream) before the message is sent.
    let _ = request.send_data(grpc_frame(&unauthenticated("edge", &[("k", "x")])), true);
    let response = answer.await.unwrap();
    assert_eq!(response.status(), 200);
    let unimplemented = tonic::Code::Unimplemented as i32;
    assert_eq!(
        response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap()),
        Some(unimplemented.to_string().as_str()),
        "{response:?}"
    );

    // A call whose headers have arrived and whose message has not.
    let (held, mut held_body) = open_call(&client, address, &should_rate_limit).await;
    // Once the server has seen the held call (a later call on the connection is answered),
    // shutdown starts.
    let (answer, mut request) = open_call(&client, address, &should_rate_limit).await;
    request
        .send_data(grpc_frame(&unauthenticated("edge", &[("k", "y")])), true)
        .unwrap();
    assert_eq!(grpc_answer(answer).await.1.as_deref(), Some("0"));
    stop_tx.send(true).unwrap();
    // The connection takes no new call once the server said GOAWAY; calls opened before it did
    // are answered.
    poll("the server to refuse new calls (GOAWAY)", || {
        let client = client.clone();
        let path = should_rate_limit.clone();
        async move {
            // Refused either way: the client has heard GOAWAY, or the server resets the call.
            let Ok(mut ready) = client.ready().await else {
                return Some(());
            };
            let Ok((answer, mut request)) = ready.send_request(grpc_call(address, &path), false)
            else {
                return Some(());
            };
            let frame = grpc_frame(&unauthenticated("edge", &[("k", "probe")]));
            if request.send_data(frame, true).is_err() {
                return Some(());
            }
            answer.await.is_err().then_some(())
        }
    })
    .await;
    assert!(!server.is_finished(), "a call is still in flight");
    held_body
        .send_data(grpc_frame(&unauthenticated("edge", &[("k", "held")])), true)
        .expect("the held call stays open through the drain");
    let (body, status) = tokio::time::timeout(DEADLINE, grpc_answer(held))
        .await
        .expect("the held call is answered during the drain");
    assert_eq!(status.as_deref(), Some("0"), "the held call is decided");
    let response: envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse =
        prost::Message::decode(&body[5..]).unwrap();
    assert_eq!(response.overall_code, Code::Ok as i32);
    assert_eq!(
        response.statuses[0].limit_remaining, 4,
        "decided on its bucket"
    );
    // With nothing in flight, the server ends well before the grace period.
    tokio::time::timeout(DEADLINE, server)
        .await
        .expect("the gRPC server stops once the held call is answered")
        .unwrap();
    let _ = connection.await;
}

/// A ready gRPC listener on 127.0.0.1:0 with `limits`, its rules one hourly bucket of 5 per
/// `k`, `OPENCLAW_API_KEY` set, 30 s of grace at shutdown; stop it with the sender.
async fn serve_with(
    limits: openclaw_limiter::listener::Limits,
) -> (
    Arc<Limiter>,
    std::net::SocketAddr,
    watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let limiter = limiter("grpc-limits");
    limiter.mark_ready();
    let rules = "domain: edge\ndescriptors:\n  - key: k\n    rate_limit: {unit: hour, requests_per_unit: 5}\n";
    let config = RlsConfig::from_files(&[("edge.yaml".into(), rules.into())]).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = tokio::spawn(serve(
        GrpcOptions {
            listener,
            rls: Arc::new(Rls::new(limiter.clone(), config)),
            config_path: None,
            config_files: None,
            reload_every: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            api_key: Some(Arc::from(API_KEY)),
            limits,
        },
        stop_rx,
    ));
    (limiter, address, stop_tx, server)
}

/// Stops the listener, closes the test's client and waits for the listener to end.
async fn stop_and_wait(
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
    client: h2::client::SendRequest<bytes::Bytes>,
    connection: tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    stop.send(true).unwrap();
    drop(client);
    tokio::time::timeout(DEADLINE, server)
        .await
        .expect("the gRPC server stops")
        .unwrap();
    connection.abort();
}

/// At most 8 connections, `per_source` of them from one address, closed after `idle`.
fn limits(per_source: usize, idle: Duration) -> openclaw_limiter::listener::Limits {
    openclaw_limiter::listener::Limits {
        max_connections: 8,
        max_connections_per_source: per_source,
        idle_timeout: idle,
    }
}

fn closed_total(limiter: &Limiter, reason: &'static str) -> u64 {
    limiter
        .metrics()
        .grpc_connections_closed
        .get_or_create(&openclaw_limiter::metrics::ReasonLabels { reason })
        .get()
}

/// Reads (and drops) whatever the server sends until it closes the connection; false if it is
/// still open at the deadline.
async fn closed_by_server(tcp: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buffer = [0u8; 1024];
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout_at(until, tcp.read(&mut buffer)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// A `ShouldRateLimit` call on an HTTP/2 connection of the test's own: its `grpc-status`.
async fn call_on(
    client: &h2::client::SendRequest<bytes::Bytes>,
    address: std::net::SocketAddr,
    value: &str,
) -> Option<String> {
    let (answer, mut request) =
        open_call(client, address, &format!("/{RLS_SERVICE}/ShouldRateLimit")).await;
    request
        .send_data(grpc_frame(&unauthenticated("edge", &[("k", value)])), true)
        .unwrap();
    grpc_answer(answer).await.1
}

/// One source address holds at most its cap of connections: the next one is closed unread and
/// counted, and once one of them closes the source is served again. The gauge follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_beyond_its_cap_of_grpc_connections_is_closed_unread() {
    let (limiter, address, stop, server) = serve_with(limits(2, Duration::from_secs(60))).await;
    let open = || limiter.metrics().grpc_connections.get();
    let first = tokio::net::TcpStream::connect(address).await.unwrap();
    let second = tokio::net::TcpStream::connect(address).await.unwrap();
    poll("two connections held", || async {
        (open() == 2).then_some(())
    })
    .await;

    let mut third = tokio::net::TcpStream::connect(address).await.unwrap();
    assert!(
        closed_by_server(&mut third).await,
        "a third connection from 127.0.0.1 is closed at once"
    );
    assert_eq!(closed_total(&limiter, "per_source"), 1);
    assert_eq!(open(), 2, "the refused connection held no place");

    drop(first);
    poll("the closed connection's place given back", || async {
        (open() == 1).then_some(())
    })
    .await;
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    assert_eq!(call_on(&client, address, "a").await.as_deref(), Some("0"));
    assert_eq!(closed_total(&limiter, "per_source"), 1);

    // A connection that never carried a call (here, never even began its HTTP/2 handshake)
    // does not hold the drain for the grace period (30 s, beyond the deadline).
    stop_and_wait(stop, server, client, connection).await;
    drop(second);
}

/// A connection on which nothing moves is closed after the idle timeout, but a client that is
/// merely quiet is not: the server PINGs it and its answers keep the connection moving. A client
/// that completed its handshake and then answers no PING is closed by the PING's own timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_grpc_connections_are_closed_and_quiet_live_clients_are_kept() {
    let (limiter, address, stop, server) = serve_with(limits(8, Duration::from_millis(1500))).await;

    // A live client, quiet after its first call.
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let mut connection = tokio::spawn(connection);
    assert_eq!(call_on(&client, address, "a").await.as_deref(), Some("0"));

    // Two silent connections, one after the other, each opened after the live client's last
    // call: once the second is closed, the live client has been quiet for two idle timeouts.
    for closed in 1..=2 {
        let mut silent = tokio::net::TcpStream::connect(address).await.unwrap();
        assert!(
            closed_by_server(&mut silent).await,
            "a connection that never sends a byte is closed"
        );
        assert_eq!(closed_total(&limiter, "idle"), closed);
    }

    assert!(
        !connection.is_finished(),
        "the quiet live client's connection is still open: {:?}",
        (&mut connection).await
    );
    assert_eq!(call_on(&client, address, "b").await.as_deref(), Some("0"));
    assert_eq!(closed_total(&limiter, "keepalive"), 0);

    // HTTP/2's preface and an empty SETTINGS frame, then nothing: no PING is ever answered.
    use tokio::io::AsyncWriteExt;
    let mut mute = tokio::net::TcpStream::connect(address).await.unwrap();
    mute.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    assert!(
        closed_by_server(&mut mute).await,
        "a client that answers no PING is closed"
    );
    // Counted once hyper has returned the connection's end, which may be just after the client
    // sees it closed; its place is given back then too.
    poll("the unanswered PING counted", || async {
        (closed_total(&limiter, "keepalive") == 1).then_some(())
    })
    .await;
    poll("the mute connection's place given back", || async {
        (limiter.metrics().grpc_connections.get() == 1).then_some(())
    })
    .await;
    assert_eq!(closed_total(&limiter, "idle"), 2);

    stop_and_wait(stop, server, client, connection).await;
}
