use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use tokio::sync::watch;

use super::dns::Resolver;
use super::kubernetes::peers_from_slices;
use super::*;

fn parts(
    kind: &str,
    peers: Option<&str>,
    dns: Option<&str>,
    service: Option<&str>,
    namespace: Option<&str>,
) -> Result<Discovery, Vec<String>> {
    Discovery::try_from_parts(kind, peers, None, dns, service, namespace)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn each_kind_builds_from_its_own_variable() {
    assert_eq!(
        parts("none", None, None, None, Some("prod")),
        Ok(Discovery::None)
    );
    assert_eq!(
        parts(
            "static",
            Some(" limiter-0.limiter:8081, 10.0.0.7:8081,[fd00::1]:8081 "),
            None,
            None,
            None
        ),
        Ok(Discovery::Static(vec![
            "limiter-0.limiter:8081".into(),
            "10.0.0.7:8081".into(),
            "[fd00::1]:8081".into(),
        ]))
    );
    assert_eq!(
        parts(
            "DNS",
            None,
            Some("openclaw-peers.prod.svc.cluster.local.:8081"),
            None,
            None
        ),
        Ok(Discovery::Dns {
            name: "openclaw-peers.prod.svc.cluster.local.:8081".into()
        })
    );
    assert_eq!(
        parts(
            "kubernetes",
            Some(""),
            None,
            Some("openclaw-limiter"),
            Some("prod")
        ),
        Ok(Discovery::Kubernetes {
            namespace: "prod".into(),
            service: "openclaw-limiter".into(),
            port_name: "peer".into(),
        })
    );
}

#[test]
fn every_problem_in_a_static_list_is_reported_with_its_variable() {
    let errors = parts(
        "static",
        Some("a:1,,b,http://c:2,d:0,e:99999,::1:8081,[zz]:1,a:1,-bad-:3,ok:8081,f g:1"),
        None,
        None,
        None,
    )
    .unwrap_err();
    let expected = [
        ("entry 2", "empty"),
        ("entry 3", "missing \":port\""),
        ("entry 4", "a URL"),
        ("entry 5", "port 0"),
        ("entry 6", "not a number from 1 to 65535"),
        ("entry 7", "need brackets"),
        ("entry 8", "not an IPv6 address"),
        ("entry 9", "listed twice"),
        ("entry 10", "not a host name"),
        ("entry 12", "not a host name"),
    ];
    assert_eq!(errors.len(), expected.len(), "{errors:#?}");
    for (line, (entry, problem)) in errors.iter().zip(expected) {
        assert!(line.starts_with("OPENCLAW_PEERS "), "{line}");
        assert!(
            line.contains(&format!("{entry} ")) && line.contains(problem),
            "{line:?} should name {entry} and say {problem:?}"
        );
    }
}

#[test]
fn a_missing_value_and_values_for_other_kinds_are_all_reported() {
    let errors = parts("static", None, Some("x:1"), Some("svc"), Some("prod")).unwrap_err();
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("OPENCLAW_PEERS is required"))
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("OPENCLAW_PEER_DNS is set"))
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("OPENCLAW_KUBE_SERVICE is set"))
    );

    let errors = parts("none", Some("a:1"), Some("b:2"), Some("svc"), None).unwrap_err();
    assert_eq!(errors.len(), 3, "{errors:#?}");

    let errors = parts("dns", Some("a:1"), Some("no-port"), None, None).unwrap_err();
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("OPENCLAW_PEER_DNS=\"no-port\""))
    );

    let errors = parts("kubernetes", None, None, Some("Bad_Name"), Some("Prod!")).unwrap_err();
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("OPENCLAW_KUBE_SERVICE=\"Bad_Name\""))
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("POD_NAMESPACE=\"Prod!\""))
    );

    let errors = parts("kubernetes", None, None, None, None).unwrap_err();
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("OPENCLAW_KUBE_SERVICE is required"))
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("POD_NAMESPACE is required"))
    );

    let errors = parts("consul", Some("a:"), None, None, None).unwrap_err();
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("OPENCLAW_DISCOVERY=\"consul\""))
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("OPENCLAW_PEERS entry 1"))
    );
}

#[test]
fn blank_values_count_as_unset() {
    assert_eq!(
        parts(" ", Some(" "), Some(""), Some(""), Some("")),
        Ok(Discovery::None)
    );
}

#[test]
fn self_is_the_listener_or_an_own_ip_on_the_peer_port() {
    let pod = SelfAddrs::new(
        addr("0.0.0.0:8081"),
        [IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5))],
    );
    assert!(pod.is_self(addr("10.0.0.5:8081")));
    assert!(pod.is_self(addr("[::ffff:10.0.0.5]:8081")));
    assert!(
        pod.is_self(addr("127.0.0.1:8081")),
        "a wildcard listener is reachable on loopback"
    );
    assert!(!pod.is_self(addr("10.0.0.5:8082")));
    assert!(!pod.is_self(addr("10.0.0.6:8081")));

    let local = SelfAddrs::new(addr("127.0.0.1:9001"), []);
    assert!(local.is_self(addr("127.0.0.1:9001")));
    assert!(!local.is_self(addr("127.0.0.1:9002")));
    assert!(!local.is_self(addr("[::1]:9001")), "a different socket");
    assert!(!SelfAddrs::default().is_self(addr("127.0.0.1:1")));
}

/// Answers for each name, changed by the test while discovery runs.
type Script = Arc<Mutex<std::collections::HashMap<String, Result<Vec<SocketAddr>, String>>>>;

fn scripted(script: &Script) -> Resolver {
    let script = script.clone();
    Resolver::scripted(Duration::from_secs(2), move |name| {
        match script.lock().unwrap().get(name).cloned() {
            Some(Ok(addrs)) => Ok(addrs),
            Some(Err(e)) => Err(io::Error::other(e)),
            None => Err(io::Error::other("unknown name")),
        }
    })
}

struct Running {
    status: Arc<DiscoveryStatus>,
    peers: watch::Receiver<Vec<SocketAddr>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn start(discovery: Discovery, self_addrs: SelfAddrs, resolver: Resolver) -> Running {
    let mut membership = Membership::new(discovery, self_addrs, Duration::from_millis(5));
    membership.resolver = resolver;
    let status = membership.status();
    let (peers_tx, peers) = watch::channel(Vec::new());
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(membership.run(peers_tx, stop_rx));
    Running {
        status,
        peers,
        stop,
        task,
    }
}

impl Running {
    /// Wait (bounded) until `n` more refreshes have been applied than when called.
    async fn refreshes(&self, n: u64) -> DiscoveryReport {
        let target = self.status.report().refreshes + n;
        self.report_when(|r| r.refreshes >= target).await
    }

    async fn report_when(&self, done: impl Fn(&DiscoveryReport) -> bool) -> DiscoveryReport {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let report = self.status.report();
            if done(&report) {
                return report;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not reached: {report:?}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn next_set(&mut self) -> Vec<SocketAddr> {
        tokio::time::timeout(Duration::from_secs(10), self.peers.changed())
            .await
            .expect("a publication within 10 s")
            .unwrap();
        self.peers.borrow_and_update().clone()
    }

    async fn finish(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("stops when told")
            .unwrap();
    }
}

#[tokio::test]
async fn a_set_is_published_once_and_again_only_when_it_changes() {
    let script: Script = Arc::default();
    let name = "peers.example:8081";
    let set = |addrs: &[&str]| Ok(addrs.iter().map(|a| addr(a)).collect::<Vec<_>>());
    script.lock().unwrap().insert(
        name.into(),
        set(&[
            "10.0.0.2:8081",
            "10.0.0.1:8081",
            "10.0.0.2:8081",
            "10.0.0.9:8081",
        ]),
    );
    let me = SelfAddrs::new(addr("0.0.0.0:8081"), ["10.0.0.9".parse().unwrap()]);
    let mut run = start(Discovery::Dns { name: name.into() }, me, scripted(&script));

    assert_eq!(
        run.next_set().await,
        [addr("10.0.0.1:8081"), addr("10.0.0.2:8081")]
    );
    // The same answer in another order is the same set: no publication.
    script.lock().unwrap().insert(
        name.into(),
        set(&["10.0.0.2:8081", "10.0.0.9:8081", "10.0.0.1:8081"]),
    );
    run.refreshes(5).await;
    assert!(
        !run.peers.has_changed().unwrap(),
        "published an unchanged set"
    );

    script
        .lock()
        .unwrap()
        .insert(name.into(), set(&["10.0.0.3:8081", "10.0.0.1:8081"]));
    assert_eq!(
        run.next_set().await,
        [addr("10.0.0.1:8081"), addr("10.0.0.3:8081")]
    );
    run.refreshes(5).await;
    assert!(!run.peers.has_changed().unwrap());
    let report = run.status.report();
    assert!(report.healthy && report.last_error.is_none(), "{report:?}");
    assert_eq!(report.peers, ["10.0.0.1:8081", "10.0.0.3:8081"]);
    run.finish().await;
}

#[tokio::test]
async fn a_failing_dns_refresh_keeps_the_last_set_and_reports_the_error() {
    let script: Script = Arc::default();
    let name = "peers.example:8081";
    script.lock().unwrap().insert(
        name.into(),
        Ok(vec![addr("10.0.0.1:8081"), addr("10.0.0.2:8081")]),
    );
    let mut run = start(
        Discovery::Dns { name: name.into() },
        SelfAddrs::default(),
        scripted(&script),
    );
    let first = run.next_set().await;
    assert_eq!(first.len(), 2);

    script
        .lock()
        .unwrap()
        .insert(name.into(), Err("SERVFAIL".into()));
    let report = run.refreshes(3).await;
    assert!(
        !run.peers.has_changed().unwrap(),
        "a failure must not publish"
    );
    assert_eq!(*run.peers.borrow(), first);
    assert!(!report.healthy);
    assert_eq!(report.peers, ["10.0.0.1:8081", "10.0.0.2:8081"]);
    let error = report.last_error.unwrap();
    assert!(
        error.contains("peers.example:8081") && error.contains("SERVFAIL"),
        "{error}"
    );
    assert!(report.failed_refreshes >= 3);

    // An empty answer is a failure too, not "no peers".
    script.lock().unwrap().insert(name.into(), Ok(vec![]));
    let report = run.refreshes(2).await;
    assert!(report.last_error.unwrap().contains("no address"));
    assert_eq!(*run.peers.borrow(), first);

    script
        .lock()
        .unwrap()
        .insert(name.into(), Ok(vec![addr("10.0.0.2:8081")]));
    assert_eq!(run.next_set().await, [addr("10.0.0.2:8081")]);
    let report = run.refreshes(1).await;
    assert!(
        report.healthy && report.last_error.is_some(),
        "the last error stays for /status"
    );
    assert!(report.last_success_unix_ms >= report.last_error_unix_ms);
    run.finish().await;
}

#[tokio::test]
async fn a_static_entry_that_stops_resolving_keeps_its_addresses_and_late_names_join() {
    let script: Script = Arc::default();
    script
        .lock()
        .unwrap()
        .insert("a.example:1".into(), Ok(vec![addr("10.0.0.1:1")]));
    let entries = vec![
        "a.example:1".into(),
        "b.example:1".into(),
        "10.0.0.3:1".into(),
    ];
    let mut run = start(
        Discovery::Static(entries),
        SelfAddrs::default(),
        scripted(&script),
    );

    // b does not resolve yet: the others are published, and the failure is reported.
    assert_eq!(
        run.next_set().await,
        [addr("10.0.0.1:1"), addr("10.0.0.3:1")]
    );
    let report = run.refreshes(1).await;
    assert!(!report.healthy && report.last_error.unwrap().contains("b.example:1"));

    script
        .lock()
        .unwrap()
        .insert("b.example:1".into(), Ok(vec![addr("10.0.0.2:1")]));
    assert_eq!(
        run.next_set().await,
        [addr("10.0.0.1:1"), addr("10.0.0.2:1"), addr("10.0.0.3:1")]
    );
    assert!(run.refreshes(1).await.healthy);

    script
        .lock()
        .unwrap()
        .insert("a.example:1".into(), Err("NXDOMAIN".into()));
    let report = run.refreshes(3).await;
    assert!(
        !run.peers.has_changed().unwrap(),
        "a's last addresses are kept"
    );
    assert!(!report.healthy && report.last_error.unwrap().contains("a.example:1"));
    run.finish().await;
}

#[tokio::test]
async fn no_discovery_publishes_nothing_and_stops_when_told() {
    let run = start(
        Discovery::None,
        SelfAddrs::default(),
        scripted(&Arc::default()),
    );
    let report = run.report_when(|r| r.refreshes == 1).await;
    assert_eq!(report.kind, "none");
    assert!(report.peers.is_empty() && report.healthy);
    assert!(!run.peers.has_changed().unwrap());
    run.finish().await;
}

#[tokio::test]
async fn dropping_the_stop_sender_ends_the_task() {
    let run = start(
        Discovery::Static(vec!["10.0.0.1:1".into()]),
        SelfAddrs::default(),
        scripted(&Arc::default()),
    );
    run.refreshes(1).await;
    drop(run.stop);
    tokio::time::timeout(Duration::from_secs(10), run.task)
        .await
        .expect("stops")
        .unwrap();
}

fn slice(address_type: &str, ports: &[(&str, i32)], endpoints: Vec<Endpoint>) -> EndpointSlice {
    EndpointSlice {
        address_type: address_type.into(),
        endpoints,
        ports: Some(
            ports
                .iter()
                .map(|(name, port)| EndpointPort {
                    name: Some((*name).into()),
                    port: Some(*port),
                    protocol: Some("TCP".into()),
                    ..EndpointPort::default()
                })
                .collect(),
        ),
        ..EndpointSlice::default()
    }
}

fn endpoint(ip: &str, ready: Option<bool>, terminating: Option<bool>) -> Endpoint {
    Endpoint {
        addresses: vec![ip.into()],
        conditions: Some(EndpointConditions {
            ready,
            serving: ready,
            terminating,
        }),
        ..Endpoint::default()
    }
}

#[test]
fn slices_give_every_endpoint_not_terminating_on_the_named_port() {
    let slices = [
        slice(
            "IPv4",
            &[("api", 8080), ("peer", 8081)],
            vec![
                endpoint("10.0.0.1", Some(true), Some(false)),
                endpoint("10.0.0.2", Some(false), Some(false)),
                endpoint("10.0.0.3", Some(false), Some(true)),
                endpoint("10.0.0.4", None, None),
                Endpoint {
                    addresses: vec!["10.0.0.5".into(), "10.0.0.50".into()],
                    ..Endpoint::default()
                },
            ],
        ),
        slice(
            "IPv6",
            &[("peer", 8081)],
            vec![endpoint("fd00::1", Some(true), None)],
        ),
        slice(
            "FQDN",
            &[("peer", 8081)],
            vec![endpoint("x.example", Some(true), None)],
        ),
    ];
    let mut peers = peers_from_slices(&slices, "peer").unwrap();
    peers.sort();
    assert_eq!(
        peers,
        [
            addr("10.0.0.1:8081"),
            addr("10.0.0.2:8081"),
            addr("10.0.0.4:8081"),
            addr("10.0.0.5:8081"),
            addr("[fd00::1]:8081"),
        ]
    );
}

#[test]
fn slices_without_the_named_port_or_no_slice_at_all_are_errors() {
    let err = peers_from_slices(&[], "peer").unwrap_err();
    assert!(err.contains("kubernetes.io/service-name"), "{err}");
    let slices = [slice(
        "IPv4",
        &[("http", 80)],
        vec![endpoint("10.0.0.1", Some(true), None)],
    )];
    let err = peers_from_slices(&slices, "peer").unwrap_err();
    assert!(
        err.contains("no port named \"peer\"") && err.contains("\"http\""),
        "{err}"
    );
    // A Service with no endpoints yet (the controller's placeholder slice) is simply empty.
    let placeholder = EndpointSlice {
        address_type: "IPv4".into(),
        ..EndpointSlice::default()
    };
    assert_eq!(peers_from_slices(&[placeholder], "peer"), Ok(vec![]));
}

#[test]
fn a_peers_file_is_one_host_port_per_line_with_comments() {
    let text =
        "# the replicas\n\n  10.0.0.1:8081  \nlimiter-1.example:8081 # rack b\n[fd00::1]:8081\n";
    assert_eq!(
        file::parse_peers_file(text),
        Ok(vec![
            "10.0.0.1:8081".to_owned(),
            "limiter-1.example:8081".to_owned(),
            "[fd00::1]:8081".to_owned(),
        ])
    );
    assert_eq!(file::parse_peers_file("# nobody yet\n"), Ok(vec![]));

    let errors = file::parse_peers_file(
        "10.0.0.1:8081\n10.0.0.2\na:8081, b:8081\n10.0.0.1:8081\nhttp://c:8081\n",
    )
    .unwrap_err();
    assert_eq!(errors.len(), 4, "{errors:?}");
    for (error, line) in errors
        .iter()
        .zip(["line 2 ", "line 3 ", "line 4 ", "line 5 "])
    {
        assert!(error.starts_with(line), "{errors:?}");
    }
    assert!(errors[2].contains("listed twice"), "{errors:?}");
}

/// Replace the file as generators do (write aside, rename over), so a poll never reads half.
fn rewrite(path: &std::path::Path, text: &str) {
    let aside = path.with_extension("tmp");
    std::fs::write(&aside, text).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

#[tokio::test]
async fn a_peers_file_is_followed_and_a_bad_one_keeps_the_last_good_set() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("peers");
    let script: Script = Arc::default();
    script.lock().unwrap().insert(
        "limiter-2.example:8081".into(),
        Ok(vec![addr("10.0.0.2:8081")]),
    );
    rewrite(
        &path,
        "# all replicas, this one included\n10.0.0.9:8081\n10.0.0.1:8081\n",
    );
    let me = SelfAddrs::new(addr("0.0.0.0:8081"), ["10.0.0.9".parse().unwrap()]);
    let mut run = start(Discovery::File(path.clone()), me, scripted(&script));
    assert_eq!(
        run.next_set().await,
        [addr("10.0.0.1:8081")],
        "itself left out"
    );

    // Added, by name: resolved at once, not at the next refresh.
    rewrite(
        &path,
        "10.0.0.9:8081\n10.0.0.1:8081\nlimiter-2.example:8081\n",
    );
    assert_eq!(
        run.next_set().await,
        [addr("10.0.0.1:8081"), addr("10.0.0.2:8081")]
    );
    // Removed.
    rewrite(&path, "10.0.0.9:8081\nlimiter-2.example:8081\n");
    assert_eq!(run.next_set().await, [addr("10.0.0.2:8081")]);

    // A file that does not parse changes nothing and is reported, naming the line.
    rewrite(&path, "10.0.0.9:8081\n10.0.0.3\n");
    let report = run.report_when(|r| !r.healthy).await;
    let error = report.last_error.clone().unwrap();
    assert!(
        error.contains("rejected") && error.contains("line 2"),
        "{report:?}"
    );
    run.refreshes(5).await;
    assert!(
        !run.peers.has_changed().unwrap(),
        "a bad file changed the set"
    );
    assert_eq!(run.status.report().peers, ["10.0.0.2:8081"]);
    // So does a file that disappears.
    std::fs::remove_file(&path).unwrap();
    let report = run
        .report_when(|r| {
            r.last_error
                .as_deref()
                .is_some_and(|e| e.contains("cannot read"))
        })
        .await;
    assert_eq!(report.peers, ["10.0.0.2:8081"]);
    assert!(!run.peers.has_changed().unwrap());

    // Fixed: followed again, and healthy.
    rewrite(&path, "10.0.0.4:8081\n");
    assert_eq!(run.next_set().await, [addr("10.0.0.4:8081")]);
    let report = run.report_when(|r| r.healthy).await;
    assert_eq!(report.kind, "file");
    run.finish().await;
}

#[tokio::test]
async fn a_peers_file_that_never_parsed_publishes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("peers");
    rewrite(&path, "not a peer\n");
    let script: Script = Arc::default();
    let run = start(
        Discovery::File(path.clone()),
        SelfAddrs::default(),
        scripted(&script),
    );
    let report = run.report_when(|r| r.refreshes >= 3).await;
    assert!(!report.healthy && report.peers.is_empty(), "{report:?}");
    assert!(!run.peers.has_changed().unwrap());
    run.finish().await;
}
