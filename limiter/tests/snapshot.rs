//! Snapshots through the public API, as the server uses them: write from one limiter, restore
//! into a fresh one (a restarted process is a new replica), fall back past damaged files, keep
//! only the newest few, skip what the current policies do not know.

use std::collections::BTreeMap;
use std::fs;
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;

use openclaw_limiter::bucket::{Micros, Rate};
use openclaw_limiter::clock::ManualClock;
use openclaw_limiter::crdt::{BucketState, ReplicaId};
use openclaw_limiter::service::{Limiter, LimiterOptions};
use openclaw_limiter::snapshot::{FORMAT_VERSION, Snapshot, SnapshotError, Snapshots};

const START: Micros = 1_700_000_000_000_000;

const POLICIES: &str = "policies:
  extra:
    capacity: 5
    refill_interval_ms: 1000
    overrides:
      vip: {capacity: 50, refill_interval_ms: 1000}
";

/// A limiter with `default` (10 tokens per second) and `extra` (5, `vip` 50).
fn limiter(replica: u64, clock: Arc<ManualClock>, policies: &str) -> Limiter {
    let limiter = Limiter::new(LimiterOptions {
        node_id: format!("node-{replica}"),
        replica: ReplicaId(replica),
        default_rate: Rate::try_new(10, 1000).unwrap(),
        clock,
        shards: 8,
        track_changes: false,
    });
    limiter.reload_policies(policies).unwrap();
    limiter
}

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::at(START))
}

const KEYS: [&str; 6] = ["a", "b", "c", "vip", "d", "e"];

/// Spend from every key of both policies, differently, and merge in another replica's
/// consumption for some, so buckets have one or two components.
fn spend(limiter: &Limiter, clock: &ManualClock) {
    for (i, key) in KEYS.iter().enumerate() {
        limiter.decide("default", key, 1 + i as u64).unwrap();
        limiter.decide("extra", key, 1 + (i as u64 % 5)).unwrap();
        clock.advance_us(7_000);
    }
    let policy = limiter.policies().get("default").unwrap().clone();
    let now = limiter.now();
    for key in ["a", "c", "z"] {
        let mut remote = BucketState::full_at(now);
        remote.try_consume_at(policy.rate, ReplicaId(99), &mut (now - 1), 2, now);
        limiter
            .store()
            .merge(policy.id, key, &remote, policy.rate, now);
    }
}

/// Every bucket by (policy name, key).
fn states(limiter: &Limiter) -> BTreeMap<(String, String), BucketState> {
    let policies = limiter.policies();
    let mut states = BTreeMap::new();
    limiter.store().for_each(|id, key, state| {
        let name = policies.by_id(id).unwrap().name.clone();
        states.insert((name, key.to_owned()), state.clone());
    });
    states
}

/// What `peek` answers for every key this test uses, under every policy.
fn answers(limiter: &Limiter) -> Vec<String> {
    let mut out = Vec::new();
    for policy in ["default", "extra"] {
        for key in KEYS.iter().chain(&["z", "never-used"]) {
            let (verdict, _) = limiter.peek(policy, key, 1).unwrap();
            out.push(format!("{policy}/{key}: {verdict:?}"));
        }
    }
    out
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn a_snapshot_holds_every_bucket_state_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let limiter = limiter(1, clock.clone(), POLICIES);
    spend(&limiter, &clock);
    let info = Snapshots::new(dir.path()).write(&limiter).unwrap();
    assert_eq!(info.buckets, limiter.store().len() as u64);
    assert_eq!(info.created_us, limiter.now());
    assert_eq!(
        info.bytes,
        fs::metadata(&info.path).unwrap().len(),
        "{info:?}"
    );

    let snapshot = Snapshot::read(&info.path, u64::MAX).unwrap();
    assert_eq!(snapshot.node_id(), "node-1");
    assert_eq!(snapshot.replica(), ReplicaId(1));
    let read: BTreeMap<_, _> = snapshot
        .buckets()
        .map(|b| ((b.policy.to_owned(), b.key.to_owned()), b.state))
        .collect();
    let held = states(&limiter);
    assert_eq!(read, held);
    assert!(held.values().any(|s| s.components().len() == 2));
}

#[test]
fn restore_into_a_fresh_replica_gives_the_same_answers() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let before = limiter(1, clock.clone(), POLICIES);
    spend(&before, &clock);
    let snapshots = Snapshots::new(dir.path());
    let written = snapshots.write(&before).unwrap();

    // The restarted process: a new replica id, an empty store, the same time.
    let after = limiter(2, Arc::new(ManualClock::at(before.now())), POLICIES);
    let report = snapshots.restore_latest(&after).unwrap();
    let used = report.used.as_ref().unwrap();
    assert_eq!(used.path, written.path);
    assert_eq!(used.replica, 1);
    assert_eq!(used.buckets, written.buckets);
    assert!(report.rejected.is_empty());
    assert_eq!(report.restored, written.buckets, "{report:?}");
    assert_eq!(answers(&after), answers(&before));
    assert_eq!(states(&after), states(&before));

    // Restoring the same snapshot again changes nothing: the merge is idempotent.
    let again = snapshots.restore_latest(&after).unwrap();
    assert_eq!((again.restored, again.unchanged), (0, written.buckets));
    assert_eq!(answers(&after), answers(&before));
}

#[test]
fn restore_drops_what_has_refilled_since_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let before = limiter(1, clock.clone(), POLICIES);
    before.decide("default", "small", 1).unwrap();
    before.decide("extra", "vip", 50).unwrap();
    let snapshots = Snapshots::new(dir.path());
    snapshots.write(&before).unwrap();

    // 0.5 s later "small" is full again; "vip" has 25 of its 50 tokens back.
    let after = limiter(2, Arc::new(ManualClock::at(START + 500_000)), POLICIES);
    let report = snapshots.restore_latest(&after).unwrap();
    assert_eq!((report.restored, report.unchanged), (1, 1));
    assert_eq!(after.store().len(), 1);
    let (vip, held) = after.peek("extra", "vip", 1).unwrap();
    assert!(held);
    assert_eq!(vip.outcome.remaining, 25);
}

/// Ways a snapshot file gets damaged, each with the reason restore must give.
#[derive(Debug, Clone, Copy)]
enum Damage {
    BitFlip,
    Truncated,
    ZeroLength,
    Garbage,
    WrongMagic,
    FutureVersion,
}

impl Damage {
    fn apply(self, path: &Path) {
        let mut bytes = fs::read(path).unwrap();
        match self {
            Damage::BitFlip => {
                let middle = bytes.len() / 2;
                bytes[middle] ^= 0x10;
            }
            Damage::Truncated => bytes.truncate(bytes.len() * 2 / 3),
            Damage::ZeroLength => bytes.clear(),
            Damage::Garbage => {
                // Deterministic noise of about the same length.
                let mut x = 0x9e37_79b9_7f4a_7c15u64;
                for byte in bytes.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *byte = x as u8;
                }
            }
            Damage::WrongMagic => bytes[..8].copy_from_slice(b"GIF89a\0\0"),
            Damage::FutureVersion => {
                bytes[8..10].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes())
            }
        }
        fs::write(path, bytes).unwrap();
    }

    fn is_reported_as(self, reason: &SnapshotError) -> bool {
        match self {
            Damage::BitFlip => matches!(reason, SnapshotError::ChecksumMismatch),
            Damage::Truncated => matches!(reason, SnapshotError::Truncated { .. }),
            Damage::ZeroLength => matches!(reason, SnapshotError::Empty),
            Damage::Garbage | Damage::WrongMagic => matches!(reason, SnapshotError::Foreign),
            Damage::FutureVersion => matches!(
                reason,
                SnapshotError::UnsupportedVersion { found, supported: FORMAT_VERSION }
                    if *found == FORMAT_VERSION + 1
            ),
        }
    }
}

#[test]
fn a_damaged_newest_snapshot_is_reported_and_the_previous_good_one_used() {
    for damage in [
        Damage::BitFlip,
        Damage::Truncated,
        Damage::ZeroLength,
        Damage::Garbage,
        Damage::WrongMagic,
        Damage::FutureVersion,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let clock = clock();
        let before = limiter(1, clock.clone(), POLICIES);
        let snapshots = Snapshots::new(dir.path());
        spend(&before, &clock);
        let good = snapshots.write(&before).unwrap();
        let good_answers = answers(&before);
        let good_states = states(&before);
        before.decide("default", "a", 1).unwrap();
        before.decide("default", "late", 9).unwrap();
        let newest = snapshots.write(&before).unwrap();
        damage.apply(&newest.path);

        let after = limiter(2, Arc::new(ManualClock::at(before.now())), POLICIES);
        let report = snapshots.restore_latest(&after).unwrap();
        assert_eq!(
            report.used.as_ref().map(|u| &u.path),
            Some(&good.path),
            "{damage:?}: {report:?}"
        );
        assert_eq!(report.rejected.len(), 1, "{damage:?}: {report:?}");
        assert_eq!(report.rejected[0].path, newest.path, "{damage:?}");
        assert!(
            damage.is_reported_as(&report.rejected[0].reason),
            "{damage:?} reported as: {}",
            report.rejected[0].reason
        );
        // Nothing of the damaged file was merged.
        assert_eq!(answers(&after), good_answers, "{damage:?}");
        assert_eq!(states(&after), good_states, "{damage:?}");
        // The report says why, in words, for /status or a log line.
        let json = serde_json::to_value(&report).unwrap();
        let reason = json["rejected"][0]["reason"].as_str().unwrap();
        assert_eq!(reason, report.rejected[0].reason.to_string());
    }
}

#[test]
fn when_every_snapshot_is_damaged_nothing_is_restored() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let before = limiter(1, clock.clone(), POLICIES);
    spend(&before, &clock);
    let snapshots = Snapshots::new(dir.path());
    let older = snapshots.write(&before).unwrap();
    let newer = snapshots.write(&before).unwrap();
    Damage::BitFlip.apply(&older.path);
    Damage::Truncated.apply(&newer.path);

    let after = limiter(2, clock.clone(), POLICIES);
    let report = snapshots.restore_latest(&after).unwrap();
    assert!(report.used.is_none());
    let rejected: Vec<_> = report.rejected.iter().map(|r| &r.path).collect();
    assert_eq!(rejected, [&newer.path, &older.path]);
    assert!(after.store().is_empty());
}

#[test]
fn a_missing_or_empty_directory_restores_nothing_and_is_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let limiter = limiter(1, clock(), POLICIES);
    for path in [dir.path().to_owned(), dir.path().join("not-yet-created")] {
        let report = Snapshots::new(&path).restore_latest(&limiter).unwrap();
        assert!(report.used.is_none(), "{path:?}");
        assert!(report.rejected.is_empty(), "{path:?}");
    }
    // The first write creates the directory.
    let nested = dir.path().join("not-yet-created").join("deeper");
    let info = Snapshots::new(&nested).write(&limiter).unwrap();
    assert!(info.path.starts_with(&nested));
    assert_eq!(info.buckets, 0);
}

#[test]
fn retention_keeps_only_the_newest_snapshots_and_leaves_other_files_alone() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("README"), "operator notes").unwrap();
    fs::write(dir.path().join("snapshot-old.ocs.bak"), "a copy").unwrap();
    let clock = clock();
    let limiter = limiter(1, clock.clone(), POLICIES);
    let snapshots = Snapshots::new(dir.path()).with_keep(NonZeroUsize::new(2).unwrap());
    let mut written = Vec::new();
    for i in 0..5 {
        limiter.decide("default", &format!("k{i}"), 1).unwrap();
        let info = snapshots.write(&limiter).unwrap();
        written.push(info.path.clone());
        let deleted: Vec<_> = info.deleted.iter().collect();
        if i >= 2 {
            assert_eq!(deleted, [&written[i - 2]], "write {i}");
        } else {
            assert!(deleted.is_empty(), "write {i}");
        }
        clock.advance_us(60_000_000);
    }
    assert_eq!(
        snapshots.list().unwrap(),
        [written[4].clone(), written[3].clone()]
    );
    let mut expected: Vec<String> = ["README", "snapshot-old.ocs.bak"]
        .map(String::from)
        .to_vec();
    expected.extend(
        written[3..]
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned()),
    );
    expected.sort();
    assert_eq!(file_names(dir.path()), expected);
}

#[test]
fn default_retention_keeps_three() {
    let dir = tempfile::tempdir().unwrap();
    let limiter = limiter(1, clock(), POLICIES);
    let snapshots = Snapshots::new(dir.path());
    for _ in 0..5 {
        snapshots.write(&limiter).unwrap();
    }
    assert_eq!(snapshots.list().unwrap().len(), 3);
}

#[test]
fn the_newest_snapshot_sorts_last_even_when_the_clock_stands_still_or_steps_back() {
    let dir = tempfile::tempdir().unwrap();
    let snapshots = Snapshots::new(dir.path());
    let clock = clock();
    let first = limiter(1, clock.clone(), POLICIES);
    first.decide("default", "k", 1).unwrap();
    let a = snapshots.write(&first).unwrap();
    let b = snapshots.write(&first).unwrap();
    assert_ne!(a.path, b.path);
    // A restart whose wall clock is an hour behind the previous run's.
    let behind = limiter(
        2,
        Arc::new(ManualClock::at(START - 3_600_000_000)),
        POLICIES,
    );
    behind.decide("default", "k", 3).unwrap();
    let c = snapshots.write(&behind).unwrap();
    assert_eq!(snapshots.list().unwrap(), [c.path, b.path, a.path]);
    assert_eq!(
        c.created_us,
        START - 3_600_000_000,
        "the header keeps the true time"
    );
}

#[test]
fn leftover_temporary_files_of_a_crashed_write_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join(".snapshot-00000000000000000001.ocs.tmp");
    fs::write(&stale, b"half a snapshot").unwrap();
    let limiter = limiter(1, clock(), POLICIES);
    let snapshots = Snapshots::new(dir.path());
    // A temporary file is never taken for a snapshot.
    assert!(
        snapshots
            .restore_latest(&limiter)
            .unwrap()
            .rejected
            .is_empty()
    );
    let info = snapshots.write(&limiter).unwrap();
    assert_eq!(
        file_names(dir.path()),
        [info.path.file_name().unwrap().to_str().unwrap()]
    );
}

#[test]
fn buckets_of_unknown_policies_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let before = limiter(1, clock.clone(), POLICIES);
    spend(&before, &clock);
    let snapshots = Snapshots::new(dir.path());
    let written = snapshots.write(&before).unwrap();
    let extra_buckets = states(&before)
        .keys()
        .filter(|(policy, _)| policy == "extra")
        .count() as u64;
    assert!(extra_buckets > 0);

    // The new process runs without `extra`.
    let only_default = "policies:\n  default: {capacity: 10, refill_interval_ms: 1000}\n";
    let after = limiter(2, Arc::new(ManualClock::at(before.now())), only_default);
    let report = snapshots.restore_latest(&after).unwrap();
    assert_eq!(report.skipped_unknown_policy, extra_buckets);
    assert_eq!(report.unknown_policies, ["extra"]);
    assert_eq!(report.restored, written.buckets - extra_buckets);
    let mut restored = states(&before);
    restored.retain(|(policy, _), _| policy == "default");
    assert_eq!(states(&after), restored);
}

#[test]
fn buckets_of_a_policy_removed_by_a_reload_are_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let limiter = limiter(1, clock.clone(), POLICIES);
    spend(&limiter, &clock);
    let extra_buckets = states(&limiter)
        .keys()
        .filter(|(policy, _)| policy == "extra")
        .count() as u64;
    let total = limiter.store().len() as u64;
    // The reload drops `extra`; its buckets stay in the store until the next sweep.
    limiter
        .reload_policies("policies:\n  default: {capacity: 10, refill_interval_ms: 1000}\n")
        .unwrap();
    let info = Snapshots::new(dir.path()).write(&limiter).unwrap();
    assert_eq!(info.skipped_unknown_policy, extra_buckets);
    assert_eq!(info.buckets, total - extra_buckets);
    let snapshot = Snapshot::read(&info.path, u64::MAX).unwrap();
    assert_eq!(snapshot.policies(), ["default"]);
}

#[test]
fn writes_are_counted_and_the_age_gauge_follows_the_last_success() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let limiter = limiter(1, clock.clone(), POLICIES);
    let gauge = |limiter: &Limiter| -> f64 {
        limiter
            .render_metrics()
            .lines()
            .find_map(|l| l.strip_prefix("openclaw_snapshot_age_seconds "))
            .unwrap()
            .parse()
            .unwrap()
    };
    let snapshots = Snapshots::new(dir.path());
    assert_eq!(snapshots.age_seconds(limiter.now()), None);
    // Before any success the age counts from the limiter's start, so failing snapshots alert.
    clock.advance_us(4_000_000);
    snapshots.publish_age(&limiter);
    assert_eq!(gauge(&limiter), 4.0);

    snapshots.write(&limiter).unwrap();
    clock.advance_us(2_500_000);
    assert_eq!(snapshots.age_seconds(limiter.now()), Some(2.5));
    snapshots.publish_age(&limiter);
    assert_eq!(gauge(&limiter), 2.5);

    // A directory that cannot be created (its parent is a file): works the same as root.
    let blocker = dir.path().join("a-file");
    fs::write(&blocker, "").unwrap();
    let broken = Snapshots::new(blocker.join("snapshots"));
    let error = broken.write(&limiter).unwrap_err();
    assert!(matches!(error, SnapshotError::Io { .. }), "{error}");
    assert!(error.to_string().contains("a-file"), "{error}");
    let text = limiter.render_metrics();
    for line in [
        "openclaw_snapshots_total{result=\"success\"} 1",
        "openclaw_snapshots_total{result=\"failure\"} 1",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }

    // A restore restarts the age too.
    let restored = limiter_at(2, START + 100_000_000);
    snapshots.restore_latest(&restored).unwrap();
    assert_eq!(snapshots.age_seconds(restored.now()), Some(0.0));
}

fn limiter_at(replica: u64, now: Micros) -> Limiter {
    limiter(replica, Arc::new(ManualClock::at(now)), POLICIES)
}

#[test]
fn snapshots_can_be_shared_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Snapshots>();
    assert_send_sync::<SnapshotError>();

    // Writers racing (periodic task, admin call, SIGTERM) each produce a whole snapshot.
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let limiter = Arc::new(limiter(1, clock.clone(), POLICIES));
    spend(&limiter, &clock);
    let snapshots = Arc::new(Snapshots::new(dir.path()).with_keep(NonZeroUsize::new(8).unwrap()));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (snapshots, limiter) = (snapshots.clone(), limiter.clone());
            std::thread::spawn(move || snapshots.write(&limiter).unwrap())
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let files = snapshots.list().unwrap();
    assert_eq!(files.len(), 4);
    for file in files {
        Snapshot::read(&file, u64::MAX).unwrap();
    }
}
