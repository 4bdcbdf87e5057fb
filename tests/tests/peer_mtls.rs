//! Mutual TLS between replicas (issue 12), with real `openclaw-limiter` processes on 127.0.0.1:
//! certificates generated here (a peer CA, peer certificates carrying the peer server name,
//! and one CA that is not the peers'), membership from a peers file.
//!
//! Shown here: two replicas with mTLS and no shared secret replicate; the peer port refuses
//! plain HTTP, a TLS client without a certificate and one with a certificate of another CA at
//! the handshake (nothing reaches the peer routes), while a client holding a peer certificate
//! does reach them; a replica whose certificate files are rewritten serves the new certificate,
//! keeps replicating, and keeps the last good one when the next rewrite is broken;
//! `--check-config` names a missing or mismatched key; with nodes bound
//! (`OPENCLAW_PEER_TLS_BIND_NODE`), a member holding a valid certificate cannot speak as another
//! node.
//! Run `cargo build --workspace --bins` first: the tests start the real binary.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use openclaw_e2e::{Service, host_port, http_client, wait_until, workspace_bin};
use reqwest::blocking::Client;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;

const START: Duration = Duration::from_secs(20);
/// The default of `OPENCLAW_PEER_TLS_SERVER_NAME`.
const PEER_NAME: &str = "openclaw-peer";

/// A CA that signs peer certificates, as cert-manager's CA issuer would.
struct Ca {
    pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// A certificate and its key, PEM.
struct Leaf {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A peer certificate: the peer server name, client and server authentication.
    fn peer(&self) -> Leaf {
        self.leaf(vec![PEER_NAME.to_owned()])
    }

    /// A peer certificate that also names node `node` (`<node>.openclaw-peer`), as
    /// `OPENCLAW_PEER_TLS_BIND_NODE` wants it (cert-manager's csi-driver issues one per pod).
    fn peer_naming(&self, node: &str) -> Leaf {
        self.leaf(vec![PEER_NAME.to_owned(), format!("{node}.{PEER_NAME}")])
    }

    fn leaf(&self, dns_names: Vec<String>) -> Leaf {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(dns_names).unwrap();
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// A replica's certificate directory, as a Secret volume holds it.
struct Files {
    dir: PathBuf,
}

impl Files {
    fn new(root: &Path, name: &str, ca: &Ca, leaf: &Leaf) -> Self {
        let dir = root.join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("ca.crt"), &ca.pem).unwrap();
        let files = Self { dir };
        files.rotate(leaf);
        files
    }

    /// Replace certificate and key, each written aside and renamed over.
    fn rotate(&self, leaf: &Leaf) {
        for (name, text) in [("tls.crt", &leaf.cert), ("tls.key", &leaf.key)] {
            let aside = self.dir.join(format!(".{name}.tmp"));
            std::fs::write(&aside, text).unwrap();
            std::fs::rename(&aside, self.dir.join(name)).unwrap();
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_owned()
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("OPENCLAW_PEER_TLS_CERT", self.path("tls.crt")),
            ("OPENCLAW_PEER_TLS_KEY", self.path("tls.key")),
            ("OPENCLAW_PEER_TLS_CA", self.path("ca.crt")),
        ]
    }
}

fn write_peers(path: &Path, peers: &[&str]) {
    let aside = path.with_extension("tmp");
    std::fs::write(&aside, peers.join("\n") + "\n").unwrap();
    std::fs::rename(&aside, path).unwrap();
}

/// A replica with peer mTLS and no shared secret.
fn replica(name: &str, peers_file: &Path, files: &Files) -> Service {
    replica_with(name, peers_file, files, &[])
}

/// [`replica`], with more variables.
fn replica_with(name: &str, peers_file: &Path, files: &Files, extra: &[(&str, &str)]) -> Service {
    let peers = peers_file.to_str().unwrap().to_owned();
    let mut env: Vec<(&str, String)> = vec![
        ("OPENCLAW_NODE_ID", name.to_owned()),
        ("OPENCLAW_PEERS_FILE", peers),
        ("BUCKET_CAPACITY", "100".to_owned()),
        ("REFILL_INTERVAL_MS", "3600000".to_owned()),
        ("OPENCLAW_SYNC_INTERVAL_MS", "50".to_owned()),
        ("OPENCLAW_ANTI_ENTROPY_INTERVAL_MS", "500".to_owned()),
        ("OPENCLAW_DISCOVERY_REFRESH_S", "1".to_owned()),
        ("OPENCLAW_READY_MAX_WAIT_MS", "300".to_owned()),
        ("OPENCLAW_PEER_TLS_RELOAD_MS", "100".to_owned()),
        ("OPENCLAW_SHUTDOWN_GRACE_S", "2".to_owned()),
    ];
    env.extend(files.env());
    env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Service::spawn(
        "openclaw-limiter",
        &["--listen", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0"],
        &env,
        START,
    )
}

fn peer_url(service: &Service) -> &str {
    service.url_of("peer").expect("a `listening peer=` line")
}

fn get_json(http: &Client, url: &str) -> Value {
    http.get(url)
        .send()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .json()
        .unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
}

fn wait_ready(http: &Client, service: &Service) {
    wait_until(START, "the replica to be ready", || {
        http.get(format!("{}/ready", service.url))
            .send()
            .is_ok_and(|r| r.status() == 200)
            .then_some(())
    });
}

fn spend(http: &Client, service: &Service, key: &str, cost: u64) {
    let status = http
        .get(format!("{}/rate", service.url))
        .query(&[("key", key), ("cost", &cost.to_string())])
        .send()
        .expect("/rate answers")
        .status();
    assert_eq!(status, 200);
}

fn remaining(http: &Client, service: &Service, key: &str) -> u64 {
    let status = get_json(http, &format!("{}/status?key={key}", service.url));
    status["bucket"]["remaining"].as_u64().expect("remaining")
}

/// Waits until `service` sees `key` at `expected` tokens left.
fn wait_remaining(http: &Client, service: &Service, key: &str, expected: u64) {
    wait_until(
        START,
        &format!("{key} at {expected} on the other replica"),
        || (remaining(http, service, key) == expected).then_some(()),
    );
}

/// The value of one series (`name{labels}` exactly as exported) in `/metrics`.
fn metric(http: &Client, service: &Service, series: &str) -> f64 {
    let text = http
        .get(format!("{}/metrics", service.url))
        .send()
        .and_then(|r| r.text())
        .expect("/metrics answers");
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{series} not in /metrics"))
}

const NOT_CERTIFIED: &str =
    "openclaw_peer_messages_rejected_total{reason=\"sender_not_certified\"}";
const TLS_REFUSED: &str = "openclaw_peer_messages_rejected_total{reason=\"tls_handshake\"}";
const UNAUTHENTICATED: &str = "openclaw_peer_messages_rejected_total{reason=\"unauthenticated\"}";

/// A TLS client of the peer port that trusts `ca_pem` and presents `identity`, if any.
fn tls_client(ca_pem: &str, identity: Option<&Leaf>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(leaf) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(leaf.cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    Arc::new(config)
}

/// Sends an unsigned `POST /v1/sync` over TLS and returns what came back (the status line), or
/// the error that ended the exchange. Also returns the certificate the server presented.
fn exchange(
    config: Arc<rustls::ClientConfig>,
    peer: &str,
) -> (Result<String, String>, Option<Vec<u8>>) {
    let tcp = TcpStream::connect(host_port(peer)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = ServerName::try_from(PEER_NAME).unwrap();
    let connection = rustls::ClientConnection::new(config, name).unwrap();
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    let body = r#"{"v":2}"#;
    let request = format!(
        "POST /v1/sync HTTP/1.1\r\nhost: peer\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut answer = Vec::new();
    let result = tls
        .write_all(request.as_bytes())
        .and_then(|()| tls.read_to_end(&mut answer).map(|_| ()))
        .map_err(|e| e.to_string())
        .and_then(|()| {
            let text = String::from_utf8_lossy(&answer);
            match text.lines().next() {
                Some(line) if !line.is_empty() => Ok(line.to_owned()),
                _ => Err("closed without an answer".to_owned()),
            }
        });
    let served = tls
        .conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|c| c.to_vec());
    (result, served)
}

/// The DER of a PEM certificate's first block.
fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[test]
fn replicas_with_mutual_tls_replicate_and_the_peer_port_refuses_anyone_without_a_peer_certificate()
{
    let root = tempfile::tempdir().unwrap();
    let peers = root.path().join("peers");
    let http = http_client();
    let ca = Ca::new("openclaw-peer-ca");
    let (a_leaf, b_leaf) = (ca.peer(), ca.peer());
    let a_files = Files::new(root.path(), "a", &ca, &a_leaf);
    let b_files = Files::new(root.path(), "b", &ca, &b_leaf);

    write_peers(&peers, &[]);
    let a = replica("a", &peers, &a_files);
    let b = replica("b", &peers, &b_files);
    assert!(peer_url(&a).starts_with("https://"), "{}", peer_url(&a));
    wait_ready(&http, &a);
    wait_ready(&http, &b);
    write_peers(
        &peers,
        &[&host_port(peer_url(&a)), &host_port(peer_url(&b))],
    );

    // Replication over mTLS, both ways.
    spend(&http, &a, "spent-on-a", 30);
    wait_remaining(&http, &b, "spent-on-a", 70);
    spend(&http, &b, "spent-on-b", 20);
    wait_remaining(&http, &a, "spent-on-b", 80);

    let refused_before = metric(&http, &a, TLS_REFUSED);
    let unauthenticated_before = metric(&http, &a, UNAUTHENTICATED);

    // Plain HTTP on the TLS port: no HTTP answer.
    let plain = http
        .post(peer_url(&a).replacen("https://", "http://", 1) + "/v1/sync")
        .body("{}")
        .send();
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");

    // A TLS client that trusts the peer CA but has no certificate, and one whose certificate
    // another CA signed: refused at the handshake.
    let (no_cert, _) = exchange(tls_client(&ca.pem, None), peer_url(&a));
    assert!(no_cert.is_err(), "no certificate, answered: {no_cert:?}");
    let stranger = Ca::new("not-the-peer-ca");
    let (other_ca, _) = exchange(tls_client(&ca.pem, Some(&stranger.peer())), peer_url(&a));
    assert!(
        other_ca.is_err(),
        "another CA's certificate, answered: {other_ca:?}"
    );
    wait_until(START, "three refused handshakes counted", || {
        (metric(&http, &a, TLS_REFUSED) >= refused_before + 3.0).then_some(())
    });
    assert_eq!(
        metric(&http, &a, UNAUTHENTICATED),
        unauthenticated_before,
        "a refused connection reached the peer routes"
    );

    // The control: a holder of a peer certificate reaches the routes (and, unsigned, is
    // refused there), so the refusals above are the handshake's.
    let (holder, served) = exchange(tls_client(&ca.pem, Some(&ca.peer())), peer_url(&a));
    assert_eq!(holder.as_deref(), Ok("HTTP/1.1 401 Unauthorized"));
    assert_eq!(served, Some(der(&a_leaf.cert)));
    assert_eq!(
        metric(&http, &a, UNAUTHENTICATED),
        unauthenticated_before + 1.0
    );
    assert_eq!(remaining(&http, &a, "spent-on-a"), 70, "nothing merged");
}

#[test]
fn a_replica_whose_certificate_is_rotated_serves_the_new_one_and_keeps_replicating() {
    let root = tempfile::tempdir().unwrap();
    let peers = root.path().join("peers");
    let http = http_client();
    let ca = Ca::new("openclaw-peer-ca");
    let a_files = Files::new(root.path(), "a", &ca, &ca.peer());
    let b_files = Files::new(root.path(), "b", &ca, &ca.peer());

    write_peers(&peers, &[]);
    let a = replica("a", &peers, &a_files);
    let b = replica("b", &peers, &b_files);
    wait_ready(&http, &a);
    wait_ready(&http, &b);
    write_peers(
        &peers,
        &[&host_port(peer_url(&a)), &host_port(peer_url(&b))],
    );
    spend(&http, &b, "before-rotation", 10);
    wait_remaining(&http, &a, "before-rotation", 90);

    // cert-manager renews b's certificate: same CA, new key.
    let renewed = ca.peer();
    b_files.rotate(&renewed);
    let success = "openclaw_peer_tls_reloads_total{result=\"success\"}";
    let failure = "openclaw_peer_tls_reloads_total{result=\"failure\"}";
    wait_until(START, "b to reload its certificate", || {
        (metric(&http, &b, success) == 1.0).then_some(())
    });
    let client = tls_client(&ca.pem, Some(&ca.peer()));
    let (_, served) = exchange(client.clone(), peer_url(&b));
    assert_eq!(
        served,
        Some(der(&renewed.cert)),
        "new handshakes get the new certificate"
    );

    // Both directions still work, with b's new certificate as server and as client.
    spend(&http, &b, "after-rotation", 15);
    wait_remaining(&http, &a, "after-rotation", 85);
    spend(&http, &a, "after-rotation-a", 5);
    wait_remaining(&http, &b, "after-rotation-a", 95);

    // A broken rotation (a certificate from another CA): refused, counted, the last good one
    // stays in use.
    b_files.rotate(&Ca::new("not-the-peer-ca").peer());
    wait_until(START, "the broken rotation to be counted", || {
        (metric(&http, &b, failure) == 1.0).then_some(())
    });
    assert_eq!(
        metric(&http, &b, "openclaw_peer_tls_last_reload_successful"),
        0.0
    );
    let (_, served) = exchange(client, peer_url(&b));
    assert_eq!(served, Some(der(&renewed.cert)));
    spend(&http, &b, "after-broken-rotation", 25);
    wait_remaining(&http, &a, "after-broken-rotation", 75);
    assert_eq!(metric(&http, &b, success), 1.0);
}

/// The listener's limits hold over TLS: a connection that never starts its handshake, and one
/// that stops in the middle of its ClientHello, take a slot each and are closed by the idle
/// timeout; a peer waiting behind them is served once they are.
#[test]
fn stalled_handshakes_hold_a_slot_and_are_closed_by_the_idle_timeout() {
    let root = tempfile::tempdir().unwrap();
    let peers = root.path().join("peers");
    write_peers(&peers, &["127.0.0.1:9"]);
    let http = http_client();
    let ca = Ca::new("openclaw-peer-ca");
    let files = Files::new(root.path(), "a", &ca, &ca.peer());
    let a = replica_with(
        "a",
        &peers,
        &files,
        &[
            ("OPENCLAW_PEER_IDLE_TIMEOUT_S", "1"),
            ("OPENCLAW_PEER_MAX_CONNECTIONS", "2"),
        ],
    );
    wait_ready(&http, &a);
    let peer = host_port(peer_url(&a));
    let idle = "openclaw_peer_messages_rejected_total{reason=\"idle_connection\"}";
    let idle_before = metric(&http, &a, idle);

    let mut silent = TcpStream::connect(&peer).unwrap();
    let mut halfway = TcpStream::connect(&peer).unwrap();
    // A handshake record header announcing 512 bytes, and nothing more.
    halfway.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).unwrap();
    wait_until(START, "both connections to be held", || {
        (metric(&http, &a, "openclaw_peer_connections") == 2.0).then_some(())
    });

    // Behind them, a peer: it waits in the backlog until a slot frees, then gets through.
    let waiting = std::thread::spawn({
        let client = tls_client(&ca.pem, Some(&ca.peer()));
        let url = peer_url(&a).to_owned();
        move || exchange(client, &url).0
    });

    for (name, stream) in [("silent", &mut silent), ("half-way", &mut halfway)] {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 256];
        match stream.read(&mut buf) {
            Ok(0) => {}
            Err(e)
                if e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut => {}
            other => panic!("the {name} connection was not closed by the replica: {other:?}"),
        }
    }
    assert_eq!(
        waiting.join().unwrap().as_deref(),
        Ok("HTTP/1.1 401 Unauthorized")
    );
    assert!(metric(&http, &a, idle) >= idle_before + 2.0);
}

#[test]
fn check_config_names_a_missing_or_mismatched_peer_key() {
    let root = tempfile::tempdir().unwrap();
    let ca = Ca::new("openclaw-peer-ca");
    let files = Files::new(root.path(), "a", &ca, &ca.peer());
    let check = |files: &Files| {
        let mut command = Command::new(workspace_bin("openclaw-limiter"));
        command
            .arg("--check-config")
            .env("OPENCLAW_PEERS", "127.0.0.1:1")
            .env_remove("OPENCLAW_PEER_SECRET");
        for (name, value) in files.env() {
            command.env(name, value);
        }
        command.output().unwrap()
    };
    let output = check(&files);
    assert!(output.status.success(), "{output:?}");

    // Another certificate's key.
    std::fs::write(files.dir.join("tls.key"), ca.peer().key).unwrap();
    let output = check(&files);
    assert_eq!(output.status.code(), Some(64), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("OPENCLAW_PEER_TLS_KEY={}", files.path("tls.key")))
            && stderr.contains("do not fit together"),
        "{stderr}"
    );

    // No key at all.
    std::fs::remove_file(files.dir.join("tls.key")).unwrap();
    let output = check(&files);
    assert_eq!(output.status.code(), Some(64), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "OPENCLAW_PEER_TLS_KEY={}: cannot read",
            files.path("tls.key")
        )),
        "{stderr}"
    );
}

/// What `service`'s `/status` says of the peer at `address`.
fn peer_status(http: &Client, service: &Service, address: &str) -> Value {
    let status = get_json(http, &format!("{}/status", service.url));
    status["peers"]
        .as_array()
        .and_then(|peers| peers.iter().find(|p| p["address"] == address))
        .cloned()
        .unwrap_or_else(|| panic!("no peer {address} in {status}"))
}

/// With `OPENCLAW_PEER_TLS_BIND_NODE=true` a member speaks only as the node its certificate
/// names. Replicas `a` and `b` hold certificates naming them. A third process holds a valid
/// peer certificate naming node `c` but says it is `a` (`OPENCLAW_NODE_ID=a`, binding off on
/// its side, as a compromised or misconfigured member would run). `a` and `b` replicate; `b`
/// refuses every message of the impostor (`sender_not_certified`), so what it spent never
/// reaches `b`; and `b` does not take the impostor's hello as `a`'s (its certificate names
/// `c`), so it sends it nothing. With the check disabled, `b` took every message of the
/// impostor and the wait for its refusals timed out (seen).
#[test]
fn with_nodes_bound_a_member_speaks_only_as_the_node_its_certificate_names() {
    let root = tempfile::tempdir().unwrap();
    let peers = root.path().join("peers");
    let http = http_client();
    let ca = Ca::new("openclaw-peer-ca");
    let a_files = Files::new(root.path(), "a", &ca, &ca.peer_naming("a"));
    let b_files = Files::new(root.path(), "b", &ca, &ca.peer_naming("b"));
    let impostor_files = Files::new(root.path(), "impostor", &ca, &ca.peer_naming("c"));
    let bound = [("OPENCLAW_PEER_TLS_BIND_NODE", "true")];

    write_peers(&peers, &[]);
    let a = replica_with("a", &peers, &a_files, &bound);
    let b = replica_with("b", &peers, &b_files, &bound);
    let impostor = replica("a", &peers, &impostor_files);
    for service in [&a, &b, &impostor] {
        wait_ready(&http, service);
    }
    let impostor_address = host_port(peer_url(&impostor));
    write_peers(
        &peers,
        &[
            &host_port(peer_url(&a)),
            &host_port(peer_url(&b)),
            &impostor_address,
        ],
    );

    // The certified members replicate, both ways.
    spend(&http, &a, "spent-on-a", 30);
    wait_remaining(&http, &b, "spent-on-a", 70);
    spend(&http, &b, "spent-on-b", 20);
    wait_remaining(&http, &a, "spent-on-b", 80);

    // The impostor's rounds go on being refused; the first one after its spending carried it.
    let refused_before = metric(&http, &b, NOT_CERTIFIED);
    spend(&http, &impostor, "spent-by-impostor", 40);
    wait_until(
        START,
        "b to refuse three more of the impostor's messages",
        || (metric(&http, &b, NOT_CERTIFIED) >= refused_before + 3.0).then_some(()),
    );
    assert_eq!(
        remaining(&http, &b, "spent-by-impostor"),
        100,
        "b merged what a member certified as node c sent as node a"
    );
    assert_eq!(remaining(&http, &a, "spent-by-impostor"), 100);

    // Nor does b take the impostor for a when it dials it.
    let seen = peer_status(&http, &b, &impostor_address);
    assert_eq!(seen["messages_sent"], 0, "{seen}");
    assert!(
        seen["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("does not name that node")),
        "{seen}"
    );
    // While the real a is known as itself.
    let real_a = peer_status(&http, &b, &host_port(peer_url(&a)));
    assert_eq!(real_a["node"], "a", "{real_a}");
}
