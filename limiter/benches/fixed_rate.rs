//! The fixed-rate half of the HTTP benchmark (`scripts/bench-http.sh`): an open-loop load
//! generator for `GET /rate` that reports latency percentiles at a given request rate.
//!
//! Why not an off-the-shelf tool: `wrk` is closed-loop (it measures peaks, not latency at a
//! rate); Debian's `hey -q` tops out near 25k requests/s on one core here; `h2load --rps` runs
//! each connection's timer at 10 ms at most, so at tens of thousands of requests per second it
//! sends bursts of hundreds of requests every 10 ms and times each from when it was finally
//! sent, which hides the queueing the bursts cause.
//!
//! Here request `i` is due at `start + i / rate`: the due times are evenly spaced, one thread
//! (pinned to the load core by the script) waits for each by spinning on the clock while the
//! runtime polls the sockets, and hands it to connection `i mod N` (keep-alive HTTP/1.1, one
//! request in flight per connection). Latency runs from the due time to the end of the
//! response, so a request that waits behind a slow one counts its wait (no coordinated
//! omission). Keys are drawn uniformly from `--keys` keys.
//!
//! `cargo bench -p openclaw-limiter --bench fixed_rate -- --url http://127.0.0.1:PORT --rate R`
//! prints one summary line (`fixed_rate sent=… ok=… p50_ms=… p99_ms=…`). Without `--url` (as
//! under `cargo test --benches` or a plain `cargo bench`) it checks itself for one second
//! against the bare baseline handler served in-process on 127.0.0.1:0.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

#[path = "support/baseline.rs"]
mod baseline;

/// Open-loop load at a fixed rate against `GET /rate`, with latency percentiles.
#[derive(Debug, Parser)]
struct Args {
    /// Base URL of the server (`http://127.0.0.1:PORT`); without it, a one-second self-check.
    #[arg(long)]
    url: Option<String>,
    /// Requests per second.
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Seconds measured (after the warm-up).
    #[arg(long, default_value_t = 1.0)]
    duration: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// Keep-alive connections (one request in flight on each).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Keys the requests are spread over, uniformly.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Write every measured request as `due_offset_us latency_us status` to this file, to see
    /// when slow answers happen.
    #[arg(long)]
    dump: Option<std::path::PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// One answered request.
struct Record {
    due: Instant,
    latency: Duration,
    status: u16,
}

/// splitmix64: a deterministic, dependency-free key sequence.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Read one HTTP/1.1 response with a `Content-Length` (as both servers send) and return its
/// status; `buf` keeps nothing between responses (one request in flight).
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<u16> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).map_err(|_| invalid("non-UTF-8 head"))?;
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| invalid("no status code"))?;
            let length: usize = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .ok_or_else(|| invalid("no content-length"))?;
            let total = end + 4 + length;
            while buf.len() < total {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..total);
            return Ok(status);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One connection: send each request handed to it, record when its answer is complete.
async fn connection(
    addr: SocketAddr,
    mut due: mpsc::UnboundedReceiver<(Instant, u64)>,
) -> io::Result<Vec<Record>> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut records = Vec::new();
    let mut buf = Vec::with_capacity(4096);
    let mut request = Vec::with_capacity(128);
    while let Some((at, key)) = due.recv().await {
        request.clear();
        request.extend_from_slice(
            format!(
                "GET /rate?key=client-{key:07}&policy=default&cost=1 HTTP/1.1\r\nHost: {addr}\r\n\r\n"
            )
            .as_bytes(),
        );
        stream.write_all(&request).await?;
        let status = read_response(&mut stream, &mut buf).await?;
        records.push(Record {
            due: at,
            latency: at.elapsed(),
            status,
        });
    }
    Ok(records)
}

/// What a run measured.
struct Summary {
    sent: u64,
    ok: u64,
    rejected: u64,
    other: u64,
    failed_connections: usize,
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    max_dispatch_lag_us: u128,
}

async fn run(addr: SocketAddr, args: &Args) -> io::Result<Summary> {
    let mut senders = Vec::with_capacity(args.connections);
    let mut tasks = Vec::with_capacity(args.connections);
    for _ in 0..args.connections.max(1) {
        let (tx, rx) = mpsc::unbounded_channel();
        senders.push(tx);
        tasks.push(tokio::spawn(connection(addr, rx)));
    }
    let start = Instant::now() + Duration::from_millis(200);
    let measured_from = start + Duration::from_secs_f64(args.warmup);
    let total = ((args.warmup + args.duration) * args.rate).round() as u64;
    let mut keys = SplitMix(7);
    let mut max_lag = Duration::ZERO;
    let mut sent = 0;
    for i in 0..total {
        let at = start + Duration::from_secs_f64(i as f64 / args.rate);
        // Spin to the due time; each yield lets the runtime poll the sockets.
        while Instant::now() < at {
            tokio::task::yield_now().await;
        }
        max_lag = max_lag.max(at.elapsed());
        let connection = (i % senders.len() as u64) as usize;
        if senders[connection]
            .send((at, keys.next() % args.keys.max(1)))
            .is_ok()
        {
            sent += u64::from(at >= measured_from);
        }
    }
    drop(senders);

    let mut latencies = Vec::new();
    let mut dump = Vec::new();
    let (mut ok, mut rejected, mut other, mut failed_connections) = (0, 0, 0, 0);
    for task in tasks {
        let records = match tokio::time::timeout(Duration::from_secs(10), task).await {
            Ok(Ok(Ok(records))) => records,
            Ok(Ok(Err(e))) => {
                eprintln!("fixed_rate: a connection failed: {e}");
                failed_connections += 1;
                continue;
            }
            Ok(Err(e)) => return Err(io::Error::other(e)),
            Err(_) => {
                eprintln!(
                    "fixed_rate: a connection did not finish within 10 s of the last request"
                );
                failed_connections += 1;
                continue;
            }
        };
        for record in records.into_iter().filter(|r| r.due >= measured_from) {
            match record.status {
                200..=299 => ok += 1,
                429 => rejected += 1,
                _ => other += 1,
            }
            latencies.push(record.latency);
            if args.dump.is_some() {
                dump.push((record.due - measured_from, record.latency, record.status));
            }
        }
    }
    if let Some(path) = &args.dump {
        dump.sort_unstable();
        let text: String = dump
            .iter()
            .map(|(at, latency, status)| {
                format!("{} {} {status}\n", at.as_micros(), latency.as_micros())
            })
            .collect();
        std::fs::write(path, text)?;
    }
    latencies.sort_unstable();
    let quantile = |q: f64| {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1000.0
    };
    Ok(Summary {
        sent,
        ok,
        rejected,
        other,
        failed_connections,
        rate: latencies.len() as f64 / args.duration,
        p50_ms: quantile(0.5),
        p99_ms: quantile(0.99),
        p999_ms: quantile(0.999),
        max_ms: quantile(1.0),
        max_dispatch_lag_us: max_lag.as_micros(),
    })
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let result = runtime.block_on(async {
        let addr = match &args.url {
            Some(url) => url
                .strip_prefix("http://")
                .map(|rest| rest.trim_end_matches('/'))
                .and_then(|host| host.parse::<SocketAddr>().ok())
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("--url must be http://IP:PORT, got {url}"),
                    )
                })?,
            None => {
                // Self-check: the bare baseline handler, in-process on a free port.
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let addr = listener.local_addr()?;
                tokio::spawn(async move { axum::serve(listener, baseline::router(1000)).await });
                addr
            }
        };
        run(addr, &args).await
    });
    match result {
        Ok(s) => {
            println!(
                "fixed_rate sent={} ok={} rejected={} other={} failed_connections={} rate={:.0} \
                 p50_ms={:.3} p99_ms={:.3} p999_ms={:.3} max_ms={:.3} max_dispatch_lag_us={}",
                s.sent,
                s.ok,
                s.rejected,
                s.other,
                s.failed_connections,
                s.rate,
                s.p50_ms,
                s.p99_ms,
                s.p999_ms,
                s.max_ms,
                s.max_dispatch_lag_us
            );
            let answered = s.ok + s.rejected + s.other;
            if args.url.is_none() && (answered != s.sent || s.ok != s.sent) {
                eprintln!(
                    "fixed_rate: self-check failed: {answered} answers to {} requests",
                    s.sent
                );
                return std::process::ExitCode::FAILURE;
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fixed_rate: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
