//! The peer listener's connection caps (`LimitedListener`, issue 12), over real sockets on
//! 127.0.0.1, port 0: per source address, and in total. Linux routes all of 127/8 to the
//! loopback interface, so a client socket bound to 127.0.0.2 is a second source.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use openclaw_limiter::listener::{Counters, LimitedListener, Limits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A bound on each test as a whole, so that a regression fails rather than hangs. Nothing
/// waits on it to happen.
const TEST_DEADLINE: Duration = Duration::from_secs(30);

/// `axum::serve` of a one-route app on a [`LimitedListener`], stopped by [`Server::stop`].
struct Server {
    addr: SocketAddr,
    counters: Counters,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(max_connections: usize, max_connections_per_source: usize) -> Self {
        let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = inner.local_addr().unwrap();
        let counters = Counters::default();
        let listener = LimitedListener::new(
            inner,
            Limits {
                max_connections,
                max_connections_per_source,
                idle_timeout: Duration::from_secs(600),
            },
            counters.clone(),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let app = Router::new().route("/", get(|| async { "ok" }));
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            addr,
            counters,
            stop,
            task,
        }
    }

    /// Stops accepting and waits for the server's connections to end (the test's clients must
    /// be closed first: a graceful stop waits for them).
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }

    fn open(&self) -> i64 {
        self.counters.open.get()
    }

    fn refused(&self) -> u64 {
        self.counters.per_source_refused.get()
    }

    /// Waits until the listener holds `n` connections (a connection a client closed is given
    /// back once the server has read its end, on the server's task).
    async fn wait_open(&self, n: i64) {
        while self.open() != n {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

async fn connect_from(source: Ipv4Addr, server: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0)).unwrap();
    socket.connect(server).await.unwrap()
}

/// Sends `GET /` and reads the answer: `Some(body)`, or `None` when the server closed the
/// connection (end of stream or reset) instead of answering.
async fn get_root(stream: &mut TcpStream) -> Option<String> {
    let request = b"GET / HTTP/1.1\r\nhost: peer\r\n\r\n";
    if stream.write_all(request).await.is_err() {
        return None;
    }
    read_answer(stream).await
}

async fn read_answer(stream: &mut TcpStream) -> Option<String> {
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
        let text = String::from_utf8_lossy(&answer);
        if let Some((head, body)) = text.split_once("\r\n\r\n")
            && body == "ok"
        {
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            return Some(body.to_owned());
        }
    }
}

#[tokio::test]
async fn a_source_at_its_cap_is_refused_at_accept_while_other_sources_still_get_in() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let localhost = Ipv4Addr::new(127, 0, 0, 1);
        // Two per source, three in all: a refused connection must not use up the third slot.
        let server = Server::start(3, 2).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut stream = connect_from(localhost, server.addr).await;
            assert_eq!(get_root(&mut stream).await.as_deref(), Some("ok"));
            held.push(stream);
        }
        assert_eq!(server.open(), 2);

        // Over the cap: closed by the server before anything is read, and counted, every time.
        for refused in 1..=2 {
            let mut over = connect_from(localhost, server.addr).await;
            assert_eq!(
                get_root(&mut over).await,
                None,
                "connection {} from 127.0.0.1 with a cap of 2 was served",
                2 + refused
            );
            assert_eq!(server.refused(), refused);
        }
        assert_eq!(server.open(), 2);

        // Another source takes the slot the refused ones did not hold.
        let mut other = connect_from(Ipv4Addr::new(127, 0, 0, 2), server.addr).await;
        assert_eq!(get_root(&mut other).await.as_deref(), Some("ok"));
        assert_eq!(server.open(), 3);

        // One of 127.0.0.1's closes: it may connect again.
        drop(held.pop());
        server.wait_open(2).await;
        let mut again = connect_from(localhost, server.addr).await;
        assert_eq!(get_root(&mut again).await.as_deref(), Some("ok"));
        assert_eq!(server.open(), 3);
        assert_eq!(server.refused(), 2);

        drop((held, other, again));
        server.stop().await;
    })
    .await
    .expect("the test finished within its deadline");
}

#[tokio::test]
async fn at_the_total_cap_a_new_connection_waits_for_a_slot_and_is_not_refused() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let localhost = Ipv4Addr::new(127, 0, 0, 1);
        // The per-source cap equal to the total: only the total cap acts.
        let server = Server::start(2, 2).await;
        let mut first = connect_from(localhost, server.addr).await;
        let mut second = connect_from(localhost, server.addr).await;
        assert_eq!(get_root(&mut first).await.as_deref(), Some("ok"));
        assert_eq!(get_root(&mut second).await.as_deref(), Some("ok"));

        // The third waits in the backlog: connected by the kernel, not accepted, not closed.
        let mut third = connect_from(localhost, server.addr).await;
        third
            .write_all(b"GET / HTTP/1.1\r\nhost: peer\r\n\r\n")
            .await
            .unwrap();
        // A round trip on a held connection, then the third still has no answer.
        assert_eq!(get_root(&mut second).await.as_deref(), Some("ok"));
        let mut buf = [0u8; 64];
        assert!(
            matches!(third.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "the third connection was answered or closed while two were held"
        );
        assert_eq!(server.open(), 2);

        // A slot frees: the waiting request is served.
        drop(first);
        assert_eq!(read_answer(&mut third).await.as_deref(), Some("ok"));
        assert_eq!(server.open(), 2);
        assert_eq!(server.refused(), 0);

        drop((second, third));
        server.stop().await;
    })
    .await
    .expect("the test finished within its deadline");
}
