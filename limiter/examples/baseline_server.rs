//! The baseline for the HTTP load benchmark (`scripts/bench-http.sh`): a bare axum server with
//! the request and response shape of the limiter's `GET /rate?key=K&policy=P&cost=N`, and no
//! limiter behind it (the handler is `benches/support/baseline.rs`, shared with the in-process
//! router benchmark).
//!
//! It runs on the same runtime as `openclaw-limiter` (tokio's multi-threaded scheduler, one
//! worker per CPU the process may run on, the server future on the main thread) and is served
//! by `axum::serve` as the limiter is, so the two differ only in the application.
//!
//! Run: `cargo run --release -p openclaw-limiter --example baseline_server -- --listen 127.0.0.1:0`.
//! Prints `listening api=http://ADDR` on stdout once bound, as `openclaw-limiter` does.

use std::net::SocketAddr;

use clap::Parser;

#[path = "../benches/support/baseline.rs"]
mod baseline;

/// Bare axum baseline with the shape of `GET /rate`.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,

    /// The capacity every answer reports (pass the limiter's `BUCKET_CAPACITY` so both send
    /// bodies and header fields of the same length).
    #[arg(long, default_value_t = 1000)]
    limit: u64,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("listening api=http://{}", listener.local_addr()?);
    axum::serve(listener, baseline::router(args.limit))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}
