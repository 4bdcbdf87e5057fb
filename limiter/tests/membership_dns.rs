//! DNS and static discovery through the machine's real resolver (`getaddrinfo`, /etc/hosts).
//! Only `localhost` and IP literals are looked up, so no query leaves the machine. Names that
//! fail, or fail after resolving, are covered with a scripted resolver in the module's unit
//! tests (a real resolver cannot be made to fail on cue without network traffic).

use std::collections::BTreeSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use openclaw_limiter::membership::{Discovery, Membership, SelfAddrs};

mod support;

use support::Running;

/// How often discovery refreshes in these tests.
const REFRESH: Duration = Duration::from_millis(20);

fn start(discovery: Discovery, self_addrs: SelfAddrs) -> Running {
    Running::start(Membership::new(discovery, self_addrs, REFRESH))
}

/// What the system resolver says `localhost:port` is: 127.0.0.1, and ::1 where /etc/hosts
/// lists it.
fn localhost(port: u16) -> BTreeSet<SocketAddr> {
    ("localhost", port).to_socket_addrs().unwrap().collect()
}

/// A port that is really this process's, as a replica's own peer listener would be.
async fn own_listener() -> (tokio::net::TcpListener, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

#[tokio::test]
async fn dns_discovery_of_localhost_yields_every_loopback_address_on_the_port() {
    let (_listener, me) = own_listener().await;
    let port = me.port().wrapping_add(1).max(1);
    let expected = localhost(port);
    assert!(expected.contains(&SocketAddr::from(([127, 0, 0, 1], port))));

    let mut run = start(
        Discovery::Dns {
            name: format!("localhost:{port}"),
        },
        SelfAddrs::new(me, []),
    );
    let peers = run.next_set().await;
    assert_eq!(peers, expected.into_iter().collect::<Vec<_>>());
    let report = run.refreshes(3).await;
    assert!(!run.has_unread_set(), "same answer, no publication");
    assert!(report.healthy && report.last_error.is_none(), "{report:?}");
    assert_eq!(report.kind, "dns");
    run.finish().await;
}

#[tokio::test]
async fn dns_discovery_leaves_this_replica_out() {
    let (_listener, me) = own_listener().await;
    let expected: Vec<SocketAddr> = localhost(me.port())
        .into_iter()
        .filter(|a| *a != me)
        .collect();

    let mut run = start(
        Discovery::Dns {
            name: format!("localhost:{}", me.port()),
        },
        SelfAddrs::new(me, []),
    );
    if expected.is_empty() {
        // Only 127.0.0.1 here (no ::1 in /etc/hosts): the set stays empty, so nothing is
        // published, while refreshes succeed.
        let report = run.refreshes(3).await;
        assert!(report.healthy, "{report:?}");
        assert!(report.peers.is_empty(), "{report:?}");
        assert!(!run.has_unread_set());
    } else {
        assert_eq!(run.next_set().await, expected);
    }
    run.finish().await;
}

#[tokio::test]
async fn static_entries_resolve_through_dns_and_leave_this_replica_out() {
    let (_listener, me) = own_listener().await;
    let other = me.port().wrapping_add(7).max(1);
    let third = me.port().wrapping_add(8).max(1);
    let entries = vec![
        format!("localhost:{other}"),
        me.to_string(),
        format!("127.0.0.1:{third}"),
    ];
    let mut run = start(Discovery::Static(entries), SelfAddrs::new(me, []));
    let mut expected = localhost(other);
    expected.insert(SocketAddr::from(([127, 0, 0, 1], third)));
    assert_eq!(
        run.next_set().await,
        expected.into_iter().collect::<Vec<_>>()
    );

    let report = run.refreshes(3).await;
    assert!(!run.has_unread_set());
    assert!(report.healthy && report.last_error.is_none(), "{report:?}");
    assert_eq!(report.kind, "static");
    run.finish().await;
}
