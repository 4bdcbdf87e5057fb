//! Membership from a peers file (`OPENCLAW_PEERS_FILE`), with real `openclaw-limiter` processes
//! on 127.0.0.1, as a VM, systemd or Nomad deployment (or `openclaw-stack`) runs them: every
//! replica is given the same file listing all replicas, and whoever adds or removes a replica
//! rewrites it.
//!
//! Shown here: a replica added to the file starts from its peers' state before `/ready`; the
//! replicas already running follow the file; a replica that leaves (SIGTERM) hands what it
//! spent to the survivors, which see it as soon as it has exited. Buckets refill over an hour,
//! so within a test a level is the capacity minus what was spent.
//! Run `cargo build --workspace --bins` first: the tests start the real binary.

use std::path::Path;
use std::time::Duration;

use openclaw_e2e::{Service, host_port, http_client, wait_until};
use reqwest::blocking::Client;
use serde_json::Value;

const START: Duration = Duration::from_secs(20);
const SECRET: &str = "e2e-peers-file-secret-0123456789";

/// Replace the file as a generator should (write aside, rename over).
fn write_peers(path: &Path, peers: &[&str]) {
    let aside = path.with_extension("tmp");
    let mut text = String::from("# written by the test: every replica, each one included\n");
    for peer in peers {
        text.push_str(peer);
        text.push('\n');
    }
    std::fs::write(&aside, text).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

/// A replica reading `peers_file`. Deltas go out every `sync_ms`; full rounds as rarely.
fn replica(name: &str, peers_file: &Path, sync_ms: u64, ready_wait_ms: u64) -> Service {
    let sync = sync_ms.to_string();
    let ready_wait = ready_wait_ms.to_string();
    Service::spawn(
        "openclaw-limiter",
        &["--listen", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0"],
        &[
            ("OPENCLAW_NODE_ID", name),
            ("OPENCLAW_PEERS_FILE", peers_file.to_str().unwrap()),
            ("OPENCLAW_PEER_SECRET", SECRET),
            ("BUCKET_CAPACITY", "100"),
            ("REFILL_INTERVAL_MS", "3600000"),
            ("OPENCLAW_SYNC_INTERVAL_MS", &sync),
            ("OPENCLAW_ANTI_ENTROPY_INTERVAL_MS", &sync),
            ("OPENCLAW_READY_MAX_WAIT_MS", &ready_wait),
            ("OPENCLAW_SHUTDOWN_GRACE_S", "2"),
        ],
        START,
    )
}

fn peer_addr(service: &Service) -> String {
    host_port(service.url_of("peer").expect("a `listening peer=` line"))
}

fn get_json(http: &Client, url: &str) -> Value {
    http.get(url)
        .send()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .json()
        .unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
}

fn is_ready(http: &Client, service: &Service) -> bool {
    http.get(format!("{}/ready", service.url))
        .send()
        .is_ok_and(|r| r.status() == 200)
}

fn wait_ready(http: &Client, service: &Service) {
    wait_until(START, "the replica to be ready", || {
        is_ready(http, service).then_some(())
    });
}

fn spend(http: &Client, service: &Service, key: &str, cost: u64) -> u16 {
    http.get(format!("{}/rate", service.url))
        .query(&[("key", key), ("cost", &cost.to_string())])
        .send()
        .expect("/rate answers")
        .status()
        .as_u16()
}

/// `remaining` of `key` as `/status?key=` shows it, without spending.
fn remaining(http: &Client, service: &Service, key: &str) -> u64 {
    let status = get_json(http, &format!("{}/status?key={key}", service.url));
    status["bucket"]["remaining"].as_u64().expect("remaining")
}

/// The peers discovery publishes, as `/status` shows them.
fn discovered(http: &Client, service: &Service) -> Vec<String> {
    let status = get_json(http, &format!("{}/status", service.url));
    let mut peers: Vec<String> = status["discovery"]["peers"]
        .as_array()
        .expect("discovery.peers")
        .iter()
        .map(|p| p.as_str().expect("an address").to_owned())
        .collect();
    peers.sort();
    peers
}

#[test]
fn a_replica_added_to_the_file_joins_with_the_state_before_ready_and_one_leaving_hands_over() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("peers");
    let http = http_client();

    // The first replica: a file that lists nobody yet (it must exist and parse at start).
    write_peers(&file, &[]);
    let first = replica("first", &file, 50, 300);
    wait_ready(&http, &first);
    let first_peer = peer_addr(&first);
    assert_eq!(spend(&http, &first, "spent-before-join", 30), 200);

    // The second: added to the file before it starts. It must know what was spent before it
    // turns ready. Its deltas go out only once a minute: what reaches the first replica
    // later in this test comes from its SIGTERM hand-over.
    write_peers(&file, &[&first_peer]);
    let mut second = replica("second", &file, 60_000, 10_000);
    wait_ready(&http, &second);
    assert_eq!(
        remaining(&http, &second, "spent-before-join"),
        70,
        "the joining replica turned ready without its peer's state"
    );

    // Both listed: the first replica follows the file (it never restarts).
    let second_peer = peer_addr(&second);
    write_peers(&file, &[&first_peer, &second_peer]);
    wait_until(START, "the first replica to follow the file", || {
        (discovered(&http, &first) == [second_peer.clone()]).then_some(())
    });
    assert_eq!(discovered(&http, &second), vec![first_peer.clone()]);

    // Spent on the second replica; not sent yet (a minute between its delta rounds).
    assert_eq!(spend(&http, &second, "spent-before-leave", 25), 200);
    assert_eq!(remaining(&http, &second, "spent-before-leave"), 75);

    // Scale-down: SIGTERM, a clean exit, and the survivor knows what the leaver spent.
    let status = second
        .process
        .terminate(Duration::from_secs(15))
        .expect("exits by itself on SIGTERM");
    assert!(status.success(), "{status:?}");
    assert_eq!(
        remaining(&http, &first, "spent-before-leave"),
        75,
        "what the leaving replica spent was lost on its way out"
    );
    assert_eq!(remaining(&http, &first, "spent-before-join"), 70);

    write_peers(&file, &[&first_peer]);
    wait_until(START, "the first replica to drop the departed peer", || {
        discovered(&http, &first).is_empty().then_some(())
    });
}

#[test]
fn a_bad_peers_file_keeps_the_last_good_peers_and_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("peers");
    let http = http_client();
    write_peers(&file, &[]);
    let first = replica("first", &file, 50, 300);
    let second = replica("second", &file, 50, 300);
    let (first_peer, second_peer) = (peer_addr(&first), peer_addr(&second));
    write_peers(&file, &[&first_peer, &second_peer]);
    wait_until(START, "both replicas to follow the file", || {
        (discovered(&http, &first) == [second_peer.clone()]
            && discovered(&http, &second) == [first_peer.clone()])
        .then_some(())
    });

    // Half-written by a careless generator: rejected, the peers stay, `/status` says why.
    std::fs::write(&file, format!("{first_peer}\n{second_peer},\n")).unwrap();
    let report = wait_until(START, "the bad file to be reported", || {
        let status = get_json(&http, &format!("{}/status", first.url));
        (status["discovery"]["healthy"] == false).then_some(status)
    });
    let error = report["discovery"]["last_error"].as_str().unwrap_or("");
    assert!(error.contains("line 2"), "{report}");
    assert_eq!(discovered(&http, &first), vec![second_peer.clone()]);
    // Still replicating: spent on one, seen on the other.
    assert_eq!(spend(&http, &first, "while-the-file-is-bad", 10), 200);
    wait_until(START, "the spending to replicate", || {
        (remaining(&http, &second, "while-the-file-is-bad") == 90).then_some(())
    });

    // A replica cannot start on a broken file: a configuration error, not a lone replica.
    let broken = std::process::Command::new(openclaw_e2e::workspace_bin("openclaw-limiter"))
        .args(["--check-config"])
        .env("OPENCLAW_PEERS_FILE", &file)
        .env("OPENCLAW_PEER_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(!broken.status.success());
    let stderr = String::from_utf8_lossy(&broken.stderr);
    assert!(
        stderr.contains("OPENCLAW_PEERS_FILE") && stderr.contains("line 2"),
        "{stderr}"
    );
}
