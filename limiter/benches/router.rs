//! What the application adds to one `GET /rate` request, without sockets or HTTP parsing: the
//! limiter's router (`openclaw_limiter::http::router`: request-metrics and auth middleware,
//! routing, query validation, the decision, the response) against the bare handler of the same
//! shape that `scripts/bench-http.sh` serves as its baseline (`support/baseline.rs`).
//!
//! Requests go through `tower::ServiceExt::oneshot`, polled once with a no-op waker (nothing on
//! this path waits), so the figure is the CPU time of the application layer alone. Over TCP,
//! hyper and the kernel add the same work to both; `bench-http.sh` measures that whole.
//!
//! The limiter runs as `openclaw-limiter` does by default (one node, 256 shards, wall clock,
//! no API key), with a capacity of 10^9 tokens per second so every decision is allowed (the
//! baseline always answers 200), over 100k keys, and each request carries the caller's address
//! as `axum::serve` adds it.
//!
//! Run: `cargo bench -p openclaw-limiter --bench router`. Without `--bench` (as under
//! `cargo test --benches`) criterion runs every case once.

use std::future::Future;
use std::hint::black_box;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use criterion::Criterion;
use openclaw_limiter::bucket::Rate;
use openclaw_limiter::clock::WallClock;
use openclaw_limiter::crdt::ReplicaId;
use openclaw_limiter::http::{AppState, router};
use openclaw_limiter::service::{Limiter, LimiterOptions};
use tower::ServiceExt;

#[path = "support/baseline.rs"]
mod baseline;

const CAPACITY: u64 = 1_000_000_000;
const KEYS: usize = 100_000;

/// Poll a future that completes without waiting.
fn ready<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the request waited on something"),
    }
}

/// Request URIs over `KEYS` keys, in a scrambled order.
fn uris() -> Vec<String> {
    (0..KEYS)
        .map(|i| {
            let key = (i * 7919) % KEYS;
            format!("/rate?key=client-{key:07}&policy=default&cost=1")
        })
        .collect()
}

fn request(uri: &str, peer: Option<SocketAddr>) -> Request<Body> {
    let mut request = Request::get(uri)
        .body(Body::empty())
        .expect("valid request");
    if let Some(peer) = peer {
        request.extensions_mut().insert(ConnectInfo(peer));
    }
    request
}

fn bench_app(criterion: &mut Criterion, name: &str, app: Router, peer: Option<SocketAddr>) {
    let uris = uris();
    let mut next = 0;
    let response = ready(app.clone().oneshot(request(&uris[0], peer))).expect("infallible");
    assert_eq!(response.status(), StatusCode::OK, "{name} must answer 200");
    criterion.bench_function(&format!("router/rate/{name}"), |b| {
        b.iter(|| {
            let uri = &uris[next];
            next = (next + 1) % uris.len();
            let response = ready(app.clone().oneshot(request(uri, peer))).expect("infallible");
            black_box(response)
        })
    });
}

fn main() {
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();

    let limiter = Arc::new(Limiter::new(LimiterOptions {
        node_id: "bench".into(),
        replica: ReplicaId(1),
        default_rate: Rate::try_new(CAPACITY, 1000).expect("valid rate"),
        clock: Arc::new(WallClock::new()),
        shards: 256,
        track_changes: false,
    }));
    let app = router(AppState {
        limiter,
        api_key: None,
        replicator: None,
        discovery: None,
        snapshots: None,
    });
    let peer: SocketAddr = "127.0.0.1:40000".parse().expect("valid address");
    bench_app(&mut criterion, "limiter", app, Some(peer));
    bench_app(&mut criterion, "baseline", baseline::router(CAPACITY), None);
    criterion.final_summary();
}
