//! Helpers shared by the limiter's integration tests (each test binary uses a subset).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openclaw_limiter::membership::{DiscoveryReport, DiscoveryStatus, Membership};
use tokio::sync::watch;

/// Bound on every wait in these tests.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A discovery task running in the test, with what it publishes and its status.
pub struct Running {
    status: Arc<DiscoveryStatus>,
    peers: watch::Receiver<Vec<SocketAddr>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    pub fn start(membership: Membership) -> Self {
        let status = membership.status();
        let (peers_tx, peers) = watch::channel(Vec::new());
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(membership.run(peers_tx, stop_rx));
        Self {
            status,
            peers,
            stop,
            task,
        }
    }

    /// The next published peer set (fails after [`DEADLINE`]).
    pub async fn next_set(&mut self) -> Vec<SocketAddr> {
        tokio::time::timeout(DEADLINE, self.peers.changed())
            .await
            .expect("a publication before the deadline")
            .unwrap();
        self.peers.borrow_and_update().clone()
    }

    /// Whether a set was published that the test has not read yet.
    pub fn has_unread_set(&self) -> bool {
        self.peers.has_changed().expect("discovery still running")
    }

    /// The last published peer set.
    pub fn current_set(&self) -> Vec<SocketAddr> {
        self.peers.borrow().clone()
    }

    /// Wait (bounded, polling) until `n` more refreshes than now have been applied.
    pub async fn refreshes(&self, n: u64) -> DiscoveryReport {
        let target = self.status.report().refreshes + n;
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let report = self.status.report();
            if report.refreshes >= target {
                return report;
            }
            assert!(tokio::time::Instant::now() < deadline, "stuck: {report:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn report(&self) -> DiscoveryReport {
        self.status.report()
    }

    pub async fn finish(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("discovery stops when told")
            .unwrap();
    }
}
