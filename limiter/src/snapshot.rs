//! Snapshots: the replica's CRDT state on local disk, so that a restarted replica does not
//! forget what it admitted before its peers can tell it.
//!
//! A snapshot is every bucket of the [`Store`](crate::store::Store), written to one file in
//! `OPENCLAW_SNAPSHOT_DIR`. Restoring merges it into the store like state from a peer
//! ([`Store::merge`](crate::store::Store::merge)): the merge is a join, so a snapshot can only
//! make the view more conservative, never hand out tokens that were already spent, and merging
//! a stale snapshot together with fresher peer state is harmless.
//!
//! # Wiring (for `main.rs` / `server.rs`)
//!
//! Everything here is blocking `std::fs`; call it through `tokio::task::spawn_blocking`.
//! [`Snapshots`] is `Send + Sync`: share one `Arc<Snapshots>` between the tasks below (it
//! serializes its own writers, so the periodic task, the admin call and SIGTERM may overlap).
//!
//! ```ignore
//! use std::sync::Arc;
//! use openclaw_limiter::snapshot::Snapshots;
//!
//! // At start, before serving decisions and before marking ready:
//! // Optionally .with_keep(n) and .with_max_bytes(b):
//! let snapshots = Arc::new(Snapshots::new(&config.snapshot_dir));
//! let report = tokio::task::spawn_blocking({
//!     let (snapshots, limiter) = (snapshots.clone(), limiter.clone());
//!     move || snapshots.restore_latest(&limiter)
//! })
//! .await??; // Err only when the directory cannot be listed; bad files are in the report.
//! tracing::info!(?report, "snapshot restore");
//!
//! // Every OPENCLAW_SNAPSHOT_INTERVAL_S, on SIGTERM after draining, and for POST /admin/snapshot
//! // (whose handler can return the `SnapshotInfo` as JSON: it is `Serialize`):
//! let info = tokio::task::spawn_blocking(move || snapshots.write(&limiter)).await??;
//!
//! // At scrape time (before `limiter.render_metrics()`), or from the sweeper every second:
//! snapshots.publish_age(&limiter);
//! ```
//!
//! `write` counts `openclaw_snapshots_total{result}` itself and logs failures; `restore_latest`
//! logs every file it rejects (`tracing::warn!`, naming the file and the reason) and returns them
//! in its [`RestoreReport`].
//!
//! Restore relies on what `main.rs` already does: each process start is a new
//! [`ReplicaId`]. The snapshot's components then belong to the previous run's replica and stay
//! in the merged state until refilled. (Restoring into the same replica that wrote the file
//! would drop that replica's own components; see [`Store::merge`](crate::store::Store::merge).)
//!
//! # Files
//!
//! `snapshot-<seq>.ocs`, where `seq` (20 digits, zero-padded) is the creation time in
//! microseconds, raised if needed above every snapshot already in the directory, so the newest
//! snapshot always has the largest number even if the wall clock stepped back across a restart.
//! A write goes to `.snapshot-<seq>.ocs.tmp` in the same directory, is fsynced, renamed over the
//! final name (atomic on POSIX), and the directory is fsynced; a crash at any point leaves
//! either the old set of snapshots or the old set plus the complete new one. Only then are all
//! but the newest `keep` snapshots deleted. Leftover temporary files of a crashed write are
//! removed by the next write. Files the limiter did not name are never touched. Rejected
//! (corrupt) files are left in place for inspection; they age out through retention like the
//! others.
//!
//! One directory belongs to one process (in Kubernetes, one volume per pod): two processes
//! writing to one directory would delete each other's snapshots.
//!
//! # Format, version 1
//!
//! Hand-written, little-endian, fixed-width integers, strings as a `u32` byte length then UTF-8:
//!
//! | field | encoding |
//! |---|---|
//! | magic | 8 bytes `OCLSNAP\0` |
//! | format version | `u16` = 3 (2 is read too) |
//! | file length | `u64`, every byte including the checksum |
//! | created | `u64`, µs since the UNIX epoch, on the writer's clock |
//! | writer's replica id | `u64` |
//! | writer's node id | string |
//! | bucket count | `u64` |
//! | per bucket: policy | `u32`, index into the policy table |
//! | &nbsp; key | string |
//! | &nbsp; epoch | `u64` µs |
//! | &nbsp; rebaser | `u64`, the replica whose rebase the epoch is |
//! | &nbsp; components | `u32` count, then per component four `u64`: replica, incarnation (µs), consumed, absorbed (`u64::MAX`: not listed by the claim) |
//! | policy table | `u32` count, then each policy name (string) |
//! | checksum | 32 bytes, SHA-256 of every byte before it |
//!
//! Buckets name their policy, not the process-local [`PolicyId`], because ids are handed out in
//! load order and differ between runs; the names go into a table after the buckets (it is
//! complete only once every bucket has been visited) so that a bucket costs four bytes of policy,
//! not a repeated name.
//!
//! Why hand-written and not serde + `postcard` (or bincode): the format must stay readable for
//! as long as old files exist, so it is spelled out here rather than implied by derive output
//! and a crate's wire rules; every length is checked against the bytes actually present before
//! anything is built from it, so a hostile or damaged length can never cause an allocation (the
//! only buffer is the file itself, bounded by [`Snapshots::with_max_bytes`]); the reader checks
//! invariants a generic decoder would not (components sorted by (replica, incarnation) and unique,
//! a listed `absorbed <= consumed`, policy indexes in range, no trailing bytes); and it costs no
//! dependency. It is about a hundred lines each way.
//!
//! Reading checks, in order: magic (else [`SnapshotError::Foreign`]), version (else
//! [`SnapshotError::UnsupportedVersion`]; a future version may lay out everything after it
//! differently, so nothing after it is interpreted), stated length (else
//! [`SnapshotError::Truncated`]), checksum (else [`SnapshotError::ChecksumMismatch`]), then the
//! structure ([`SnapshotError::Malformed`], which only a writer bug can produce). Nothing is
//! merged until the whole file has passed every check.
//!
//! The checksum detects damage (torn writes, bit rot, truncation), not tampering: whoever can
//! write the directory can write a valid snapshot, so the directory must be writable only by
//! the limiter.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use ring::digest;
use serde::Serialize;

use crate::bucket::Micros;
use crate::crdt::{BucketState, Component, ReplicaId, UNLISTED};
use crate::metrics::ResultLabels;
use crate::service::Limiter;
use crate::store::PolicyId;

/// First bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"OCLSNAP\0";
/// The format version this build writes.
pub const FORMAT_VERSION: u16 = 3;
/// The earlier version this build still reads: the same layout, written before claims could
/// leave a component unlisted. A component it wrote with nothing absorbed and an incarnation
/// before its claim was one the claimant did not know, and is read as unlisted.
const FORMAT_VERSION_2: u16 = 2;
/// Snapshots kept by default: the newest, and two to fall back on if it is damaged.
pub const DEFAULT_KEEP: usize = 3;
/// Largest snapshot written or read by default. A bucket with one component and a short key
/// takes about 70 bytes, so this is over ten million buckets.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;

const FILE_PREFIX: &str = "snapshot-";
const FILE_SUFFIX: &str = ".ocs";
const TEMP_PREFIX: &str = ".snapshot-";
const TEMP_SUFFIX: &str = ".ocs.tmp";
const CHECKSUM_LEN: usize = 32;
/// Magic, version and file length: enough to decide whether the rest can be read.
const PREAMBLE_LEN: usize = MAGIC.len() + 2 + 8;
/// The smallest valid file: preamble, created, replica, empty node id, no buckets, no
/// policies, checksum.
const MIN_FILE_LEN: usize = PREAMBLE_LEN + 8 + 8 + 4 + 8 + 4 + CHECKSUM_LEN;
const COMPONENT_LEN: usize = 32;

/// Why a snapshot could not be written or a snapshot file was not trusted.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file system refused an operation. `action` says which (creating the directory,
    /// writing, syncing, renaming, reading, listing) and `path` on what.
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file has no bytes at all: a file system that lost a write, or a file someone created
    /// by hand. (The limiter's own writes become visible only once complete.)
    #[error("empty file")]
    Empty,
    /// The file does not start with [`MAGIC`]: it is not a limiter snapshot, or its first bytes
    /// are damaged.
    #[error("not an OpenClaw snapshot (wrong magic bytes)")]
    Foreign,
    /// A snapshot in a format version this build cannot read (written by a newer limiter, or a
    /// damaged version field).
    #[error("format version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion { found: u16, supported: u16 },
    /// The file is shorter than its header says (a torn copy, a full disk, a truncated file).
    #[error("truncated: {actual} bytes, expected {expected}")]
    Truncated { expected: u64, actual: u64 },
    /// The SHA-256 at the end does not match the contents: the file was damaged after it was
    /// written.
    #[error("checksum mismatch: the file is damaged")]
    ChecksumMismatch,
    /// The checksum matches but the contents break the format's rules; only a faulty writer
    /// produces this.
    #[error("malformed although its checksum matches: {0}")]
    Malformed(&'static str),
    /// The snapshot is larger than the configured bound ([`Snapshots::with_max_bytes`]):
    /// refused before reading (restore) or before writing (write).
    #[error("{len} bytes, above the limit of {max} bytes")]
    TooLarge { len: u64, max: u64 },
}

impl SnapshotError {
    fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self {
        let path = path.to_owned();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }
}

/// What [`Snapshots::write`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotInfo {
    pub path: PathBuf,
    /// The writer's clock when the snapshot was taken, µs since the UNIX epoch.
    pub created_us: Micros,
    pub bytes: u64,
    pub buckets: u64,
    /// Buckets left out because their policy was removed by a reload (the sweep drops them
    /// soon anyway).
    pub skipped_unknown_policy: u64,
    /// Older snapshots deleted by retention.
    pub deleted: Vec<PathBuf>,
}

/// The snapshot a restore used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestoredFrom {
    pub path: PathBuf,
    pub node_id: String,
    pub replica: u64,
    pub created_us: Micros,
    /// Buckets in the file.
    pub buckets: u64,
}

/// A snapshot file that restore did not trust, and why.
#[derive(Debug, Serialize)]
pub struct RejectedSnapshot {
    pub path: PathBuf,
    #[serde(serialize_with = "as_display")]
    pub reason: SnapshotError,
}

fn as_display<S: serde::Serializer>(
    value: &impl std::fmt::Display,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

/// What [`Snapshots::restore_latest`] did.
#[derive(Debug, Default, Serialize)]
pub struct RestoreReport {
    /// The newest snapshot that passed every check, if any.
    pub used: Option<RestoredFrom>,
    /// Buckets whose merge changed local state.
    pub restored: u64,
    /// Buckets merged without effect: refilled since the snapshot was taken, or already known.
    pub unchanged: u64,
    /// Buckets of policies the current policy set does not have; not merged.
    pub skipped_unknown_policy: u64,
    /// Names of those policies.
    pub unknown_policies: Vec<String>,
    /// Newer snapshots that were rejected before `used`, newest first.
    pub rejected: Vec<RejectedSnapshot>,
}

/// The snapshot directory of one replica: writes, retention, restore.
#[derive(Debug)]
pub struct Snapshots {
    dir: PathBuf,
    keep: usize,
    max_bytes: u64,
    /// Held for a whole write, so that concurrent writers (periodic, admin, SIGTERM) never race
    /// on names, temporary files or retention.
    writing: Mutex<()>,
    /// When the last snapshot was written or restored (µs), [`NEVER`] before that.
    last_success: AtomicU64,
}

const NEVER: u64 = u64::MAX;

impl Snapshots {
    /// Snapshots in `dir` (created on the first write), keeping [`DEFAULT_KEEP`], at most
    /// [`DEFAULT_MAX_BYTES`] each.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            keep: DEFAULT_KEEP,
            max_bytes: DEFAULT_MAX_BYTES,
            writing: Mutex::new(()),
            last_success: AtomicU64::new(NEVER),
        }
    }

    /// Keep the newest `keep` snapshots and delete older ones after each write.
    pub fn with_keep(mut self, keep: NonZeroUsize) -> Self {
        self.keep = keep.get();
        self
    }

    /// Refuse to write, or to read back, a snapshot above `max_bytes`.
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn keep(&self) -> usize {
        self.keep
    }

    /// Snapshot files in the directory, newest first. A missing directory has none.
    pub fn list(&self) -> Result<Vec<PathBuf>, SnapshotError> {
        Ok(self.list_numbered()?.into_iter().map(|(_, p)| p).collect())
    }

    fn list_numbered(&self) -> Result<Vec<(u64, PathBuf)>, SnapshotError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(SnapshotError::io("listing", &self.dir)(e)),
        };
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(SnapshotError::io("listing", &self.dir))?;
            if let Some(seq) = entry.file_name().to_str().and_then(parse_file_name) {
                files.push((seq, entry.path()));
            }
        }
        files.sort_by_key(|&(seq, _)| std::cmp::Reverse(seq));
        Ok(files)
    }

    /// Write a snapshot of `limiter`'s state, then delete all but the newest `keep`. Counts
    /// `openclaw_snapshots_total{result}` and, on success, restarts the age gauge.
    pub fn write(&self, limiter: &Limiter) -> Result<SnapshotInfo, SnapshotError> {
        self.write_with(limiter, |file, bytes| file.write_all(bytes))
    }

    /// [`Snapshots::write`] with the step that puts the bytes into the temporary file supplied,
    /// so tests can make it fail midway.
    fn write_with(
        &self,
        limiter: &Limiter,
        put: impl FnOnce(&mut File, &[u8]) -> io::Result<()>,
    ) -> Result<SnapshotInfo, SnapshotError> {
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let result = self.write_locked(limiter, put);
        let outcome = if result.is_ok() { "success" } else { "failure" };
        limiter
            .metrics()
            .snapshots
            .get_or_create(&ResultLabels { result: outcome })
            .inc();
        match &result {
            Ok(info) => tracing::debug!(
                file = %info.path.display(),
                buckets = info.buckets,
                bytes = info.bytes,
                "snapshot written"
            ),
            Err(e) => tracing::warn!(dir = %self.dir.display(), error = %e, "snapshot failed"),
        }
        result
    }

    fn write_locked(
        &self,
        limiter: &Limiter,
        put: impl FnOnce(&mut File, &[u8]) -> io::Result<()>,
    ) -> Result<SnapshotInfo, SnapshotError> {
        fs::create_dir_all(&self.dir).map_err(SnapshotError::io("creating", &self.dir))?;
        self.remove_stale_temporaries();
        let existing = self.list_numbered()?;
        let created_us = limiter.now();
        let seq = existing
            .first()
            .map_or(created_us, |&(newest, _)| created_us.max(newest + 1));
        let encoded = encode(limiter, created_us, self.max_bytes)?;
        let path = self.dir.join(file_name(seq));
        let temp = self
            .dir
            .join(format!("{TEMP_PREFIX}{seq:020}{TEMP_SUFFIX}"));
        let written = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&temp)
                .map_err(SnapshotError::io("creating", &temp))?;
            put(&mut file, &encoded.bytes).map_err(SnapshotError::io("writing", &temp))?;
            file.sync_all()
                .map_err(SnapshotError::io("syncing", &temp))?;
            drop(file);
            fs::rename(&temp, &path).map_err(SnapshotError::io("renaming", &temp))
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&temp);
            return Err(e);
        }
        sync_dir(&self.dir)?;
        self.last_success.store(created_us, Ordering::Relaxed);
        let deleted = self.apply_retention();
        Ok(SnapshotInfo {
            path,
            created_us,
            bytes: encoded.bytes.len() as u64,
            buckets: encoded.buckets,
            skipped_unknown_policy: encoded.skipped_unknown_policy,
            deleted,
        })
    }

    /// Delete all but the newest `keep` snapshots. Failures are logged, not fatal: the new
    /// snapshot is safe, and the next write tries again.
    fn apply_retention(&self) -> Vec<PathBuf> {
        let files = match self.list_numbered() {
            Ok(files) => files,
            Err(e) => {
                tracing::warn!(error = %e, "snapshot retention skipped");
                return Vec::new();
            }
        };
        let mut deleted = Vec::new();
        for (_, path) in files.into_iter().skip(self.keep) {
            match fs::remove_file(&path) {
                Ok(()) => deleted.push(path),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot delete old snapshot")
                }
            }
        }
        deleted
    }

    /// Remove temporary files a crashed write left behind. Only this process writes here, and
    /// it holds the write lock, so none of them is in use.
    fn remove_stale_temporaries(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Merge the newest snapshot that passes every check into `limiter`'s store. Newer files
    /// that fail a check are logged, listed in the report and skipped. A missing or empty
    /// directory restores nothing and is not an error; only a directory that cannot be listed
    /// is.
    pub fn restore_latest(&self, limiter: &Limiter) -> Result<RestoreReport, SnapshotError> {
        let mut report = RestoreReport::default();
        for (_, path) in self.list_numbered()? {
            match Snapshot::read(&path, self.max_bytes) {
                Ok(snapshot) => {
                    merge_into(&snapshot, limiter, &mut report);
                    report.used = Some(RestoredFrom {
                        path,
                        node_id: snapshot.node_id.clone(),
                        replica: snapshot.replica.0,
                        created_us: snapshot.created_us,
                        buckets: snapshot.bucket_count,
                    });
                    self.last_success.store(limiter.now(), Ordering::Relaxed);
                    break;
                }
                Err(reason) => {
                    tracing::warn!(
                        file = %path.display(),
                        %reason,
                        "snapshot rejected: skipped, not trusted"
                    );
                    report.rejected.push(RejectedSnapshot { path, reason });
                }
            }
        }
        if let Some(used) = &report.used {
            tracing::info!(
                file = %used.path.display(),
                from_node = %used.node_id,
                restored = report.restored,
                unchanged = report.unchanged,
                skipped_unknown_policy = report.skipped_unknown_policy,
                rejected = report.rejected.len(),
                "snapshot restored"
            );
        } else {
            tracing::info!(
                dir = %self.dir.display(),
                rejected = report.rejected.len(),
                "no usable snapshot: starting empty"
            );
        }
        Ok(report)
    }

    /// Seconds since the last snapshot was written or restored at `now`, if any was.
    pub fn age_seconds(&self, now: Micros) -> Option<f64> {
        match self.last_success.load(Ordering::Relaxed) {
            NEVER => None,
            last => Some(now.saturating_sub(last) as f64 / 1e6),
        }
    }

    /// Set `openclaw_snapshot_age_seconds`. Before the first success the age counts from the
    /// limiter's start, so a replica whose snapshots keep failing still trips the age alert.
    pub fn publish_age(&self, limiter: &Limiter) {
        let now = limiter.now();
        let age = self
            .age_seconds(now)
            .unwrap_or_else(|| now.saturating_sub(limiter.started()) as f64 / 1e6);
        limiter.metrics().snapshot_age.set(age);
    }
}

fn file_name(seq: u64) -> String {
    format!("{FILE_PREFIX}{seq:020}{FILE_SUFFIX}")
}

/// The sequence number of a snapshot file's name, if it is one.
fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(FILE_PREFIX)?.strip_suffix(FILE_SUFFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Make a rename in `dir` durable: the new directory entry is on disk, not just the file.
fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(SnapshotError::io("syncing directory", dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

struct Encoded {
    bytes: Vec<u8>,
    buckets: u64,
    skipped_unknown_policy: u64,
}

/// How a [`PolicyId`] met while encoding maps to the file's policy table.
#[derive(Clone, Copy)]
enum Slot {
    Unseen,
    Gone,
    Index(u32),
}

/// Encode every bucket of `limiter`'s store. Runs under each shard's lock in turn, so it only
/// appends to memory: no system call ever holds up a shard's decisions. The buffer is bounded
/// by `max_bytes`: past it, encoding stops and the write fails.
fn encode(limiter: &Limiter, created_us: Micros, max_bytes: u64) -> Result<Encoded, SnapshotError> {
    let policies = limiter.policies();
    let store = limiter.store();
    let mut out = Vec::with_capacity(4096 + store.len().saturating_mul(72));
    out.extend_from_slice(&MAGIC);
    put_u16(&mut out, FORMAT_VERSION);
    let length_at = out.len();
    put_u64(&mut out, 0);
    put_u64(&mut out, created_us);
    put_u64(&mut out, store.replica().0);
    let mut fits = put_str(&mut out, limiter.node_id());
    let count_at = out.len();
    put_u64(&mut out, 0);

    let mut slots: Vec<Slot> = Vec::new();
    let mut names: Vec<&str> = Vec::new();
    let mut buckets = 0u64;
    let mut skipped_unknown_policy = 0u64;
    store.for_each(|id: PolicyId, key, state| {
        if !fits || out.len() as u64 > max_bytes {
            fits = false;
            return;
        }
        let i = id.0 as usize;
        if slots.len() <= i {
            slots.resize(i + 1, Slot::Unseen);
        }
        if let Slot::Unseen = slots[i] {
            slots[i] = match policies.by_id(id) {
                Some(policy) => {
                    names.push(&policy.name);
                    Slot::Index(names.len() as u32 - 1)
                }
                None => Slot::Gone,
            };
        }
        let Slot::Index(index) = slots[i] else {
            skipped_unknown_policy += 1;
            return;
        };
        put_u32(&mut out, index);
        fits &= put_str(&mut out, key);
        put_u64(&mut out, state.epoch());
        put_u64(&mut out, state.rebaser().0);
        put_u32(&mut out, state.components().len() as u32);
        for c in state.components() {
            put_u64(&mut out, c.replica.0);
            put_u64(&mut out, c.incarnation);
            put_u64(&mut out, c.consumed);
            put_u64(&mut out, c.absorbed);
        }
        buckets += 1;
    });
    out[count_at..count_at + 8].copy_from_slice(&buckets.to_le_bytes());
    put_u32(&mut out, names.len() as u32);
    for name in &names {
        fits &= put_str(&mut out, name);
    }
    let len = (out.len() + CHECKSUM_LEN) as u64;
    if !fits || len > max_bytes {
        return Err(SnapshotError::TooLarge {
            len: len.max(max_bytes.saturating_add(1)),
            max: max_bytes,
        });
    }
    out[length_at..length_at + 8].copy_from_slice(&len.to_le_bytes());
    let checksum = digest::digest(&digest::SHA256, &out);
    out.extend_from_slice(checksum.as_ref());
    Ok(Encoded {
        bytes: out,
        buckets,
        skipped_unknown_policy,
    })
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Returns false (and writes an empty string) if `s` is too long for its length field; the
/// caller then fails the write rather than produce a file it cannot read back.
fn put_str(out: &mut Vec<u8>, s: &str) -> bool {
    let Ok(len) = u32::try_from(s.len()) else {
        put_u32(out, 0);
        return false;
    };
    put_u32(out, len);
    out.extend_from_slice(s.as_bytes());
    true
}

/// A snapshot file that passed every check, held in memory.
#[derive(Debug)]
pub struct Snapshot {
    bytes: Vec<u8>,
    version: u16,
    node_id: String,
    replica: ReplicaId,
    created_us: Micros,
    bucket_count: u64,
    /// Where the first bucket starts in `bytes`.
    buckets_at: usize,
    policies: Vec<String>,
}

/// One bucket of a [`Snapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotBucket<'a> {
    pub policy: &'a str,
    pub key: &'a str,
    pub state: BucketState,
}

impl Snapshot {
    /// Read and check the file at `path`, refusing (before reading) one above `max_bytes`.
    pub fn read(path: &Path, max_bytes: u64) -> Result<Self, SnapshotError> {
        let file = File::open(path).map_err(SnapshotError::io("opening", path))?;
        let len = file
            .metadata()
            .map_err(SnapshotError::io("reading", path))?
            .len();
        if len > max_bytes {
            return Err(SnapshotError::TooLarge {
                len,
                max: max_bytes,
            });
        }
        let mut bytes = Vec::with_capacity(len as usize);
        // Bounded even if the file grows while it is read.
        file.take(max_bytes.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(SnapshotError::io("reading", path))?;
        if bytes.len() as u64 > max_bytes {
            return Err(SnapshotError::TooLarge {
                len: bytes.len() as u64,
                max: max_bytes,
            });
        }
        Self::decode(bytes)
    }

    /// Check `bytes` as a snapshot file (see the module documentation for the order).
    pub fn decode(bytes: Vec<u8>) -> Result<Self, SnapshotError> {
        let actual = bytes.len() as u64;
        if bytes.is_empty() {
            return Err(SnapshotError::Empty);
        }
        let magic_len = bytes.len().min(MAGIC.len());
        if bytes[..magic_len] != MAGIC[..magic_len] {
            return Err(SnapshotError::Foreign);
        }
        if bytes.len() < MAGIC.len() + 2 {
            return Err(SnapshotError::Truncated {
                expected: MIN_FILE_LEN as u64,
                actual,
            });
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != FORMAT_VERSION && version != FORMAT_VERSION_2 {
            return Err(SnapshotError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        if bytes.len() < PREAMBLE_LEN {
            return Err(SnapshotError::Truncated {
                expected: MIN_FILE_LEN as u64,
                actual,
            });
        }
        let stated = u64::from_le_bytes(bytes[10..18].try_into().expect("8 bytes"));
        if stated > actual || bytes.len() < MIN_FILE_LEN {
            return Err(SnapshotError::Truncated {
                expected: stated.max(MIN_FILE_LEN as u64),
                actual,
            });
        }
        let (content, checksum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        if digest::digest(&digest::SHA256, content).as_ref() != checksum {
            return Err(SnapshotError::ChecksumMismatch);
        }
        if stated != actual {
            return Err(SnapshotError::Malformed(
                "the length field disagrees with the file size",
            ));
        }

        let mut reader = Reader {
            bytes: content,
            at: PREAMBLE_LEN,
        };
        let created_us = reader.u64()?;
        let replica = ReplicaId(reader.u64()?);
        let node_id = reader.str()?.to_owned();
        let bucket_count = reader.u64()?;
        let buckets_at = reader.at;
        let mut policies_used = 0u64;
        for _ in 0..bucket_count {
            let record = reader.record()?;
            policies_used = policies_used.max(u64::from(record.policy) + 1);
        }
        let policy_count = reader.u32()?;
        // Each name takes at least its 4-byte length: never reserve more than the bytes left.
        let mut policies = Vec::with_capacity((policy_count as usize).min(reader.remaining() / 4));
        for _ in 0..policy_count {
            policies.push(reader.str()?.to_owned());
        }
        if reader.remaining() != 0 {
            return Err(SnapshotError::Malformed("bytes after the policy table"));
        }
        if policies_used > u64::from(policy_count) {
            return Err(SnapshotError::Malformed(
                "a bucket names a policy outside the policy table",
            ));
        }
        Ok(Self {
            bytes,
            version,
            node_id,
            replica,
            created_us,
            bucket_count,
            buckets_at,
            policies,
        })
    }

    /// The writer's node id (`OPENCLAW_NODE_ID`, by default the host name).
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The writer's replica id (one process run).
    pub fn replica(&self) -> ReplicaId {
        self.replica
    }

    /// When the snapshot was taken, on the writer's clock.
    pub fn created_us(&self) -> Micros {
        self.created_us
    }

    pub fn bucket_count(&self) -> u64 {
        self.bucket_count
    }

    /// Policy names in the file's table.
    pub fn policies(&self) -> &[String] {
        &self.policies
    }

    /// The checked file, byte for byte (what is shipped off-site, `crate::remote`).
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// Merge every bucket whose policy still exists into `limiter`'s store, as a restore does
    /// (`crate::remote` merges several snapshots this way).
    pub fn merge_into(&self, limiter: &Limiter) -> RestoreReport {
        let mut report = RestoreReport::default();
        merge_into(self, limiter, &mut report);
        report
    }

    /// Every bucket, in file order.
    pub fn buckets(&self) -> impl Iterator<Item = SnapshotBucket<'_>> {
        self.records().map(|(policy, key, state)| SnapshotBucket {
            policy: &self.policies[policy as usize],
            key,
            state,
        })
    }

    /// Every bucket with its policy's index in the table.
    fn records(&self) -> impl Iterator<Item = (u32, &str, BucketState)> {
        let mut reader = Reader {
            bytes: &self.bytes[..self.bytes.len() - CHECKSUM_LEN],
            at: self.buckets_at,
        };
        (0..self.bucket_count).map(move |_| {
            let record = reader
                .record()
                .expect("every record was checked by Snapshot::decode");
            let upgrade = self.version == FORMAT_VERSION_2;
            let state = BucketState::from_parts(
                record.epoch,
                record.rebaser,
                record
                    .components
                    .chunks_exact(COMPONENT_LEN)
                    .map(component)
                    .map(|mut c| {
                        if upgrade && c.absorbed == 0 && c.incarnation < record.epoch {
                            c.absorbed = UNLISTED;
                        }
                        c
                    }),
            );
            (record.policy, record.key, state)
        })
    }
}

/// Merge every bucket of `snapshot` whose policy still exists into `limiter`'s store.
fn merge_into(snapshot: &Snapshot, limiter: &Limiter, report: &mut RestoreReport) {
    if snapshot.replica == limiter.store().replica() {
        tracing::warn!(
            "restoring a snapshot written by this very replica: its own components are treated \
             as refilled (a restarted process must use a new replica id)"
        );
    }
    let policies = limiter.policies();
    let resolved: Vec<_> = snapshot
        .policies
        .iter()
        .map(|name| policies.get(name).cloned())
        .collect();
    let mut unknown = vec![false; resolved.len()];
    let now = limiter.now();
    for (index, key, state) in snapshot.records() {
        let Some(policy) = &resolved[index as usize] else {
            report.skipped_unknown_policy += 1;
            unknown[index as usize] = true;
            continue;
        };
        let rate = policy.rate_for(key);
        if limiter.store().merge(policy.id, key, &state, rate, now) {
            report.restored += 1;
        } else {
            report.unchanged += 1;
        }
    }
    report.unknown_policies = snapshot
        .policies
        .iter()
        .zip(unknown)
        .filter(|&(_, unknown)| unknown)
        .map(|(name, _)| name.clone())
        .collect();
}

fn component(bytes: &[u8]) -> Component {
    let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    Component {
        replica: ReplicaId(word(0)),
        incarnation: word(1),
        consumed: word(2),
        absorbed: word(3),
    }
}

/// A bucket as laid out in the file.
struct Record<'a> {
    policy: u32,
    key: &'a str,
    epoch: Micros,
    rebaser: ReplicaId,
    /// `COMPONENT_LEN` bytes per component.
    components: &'a [u8],
}

/// Reads the checked content of a file; every length is compared with the bytes left before
/// anything is sliced.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        if n > self.remaining() {
            return Err(SnapshotError::Malformed("a field runs past the end"));
        }
        let slice = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(slice)
    }

    fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn str(&mut self) -> Result<&'a str, SnapshotError> {
        let len = self.u32()? as usize;
        std::str::from_utf8(self.take(len)?)
            .map_err(|_| SnapshotError::Malformed("a string is not UTF-8"))
    }

    /// One bucket, checked: components sorted by (replica, incarnation) without repeats, none having absorbed
    /// more than it consumed. These hold for every state the CRDT produces, so a file breaking
    /// them did not come from a correct writer.
    fn record(&mut self) -> Result<Record<'a>, SnapshotError> {
        let policy = self.u32()?;
        let key = self.str()?;
        let epoch = self.u64()?;
        let rebaser = ReplicaId(self.u64()?);
        let n = self.u32()? as usize;
        if n > self.remaining() / COMPONENT_LEN {
            return Err(SnapshotError::Malformed(
                "a component list runs past the end",
            ));
        }
        let components = self.take(n * COMPONENT_LEN)?;
        let mut previous: Option<(ReplicaId, Micros)> = None;
        for chunk in components.chunks_exact(COMPONENT_LEN) {
            let c = component(chunk);
            if c.is_listed() && c.absorbed > c.consumed {
                return Err(SnapshotError::Malformed(
                    "a component absorbed more than it consumed",
                ));
            }
            if previous.is_some_and(|p| p >= (c.replica, c.incarnation)) {
                return Err(SnapshotError::Malformed(
                    "components are not sorted by replica",
                ));
            }
            previous = Some((c.replica, c.incarnation));
        }
        Ok(Record {
            policy,
            key,
            epoch,
            rebaser,
            components,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::bucket::Rate;
    use crate::clock::ManualClock;
    use crate::service::LimiterOptions;

    const START: Micros = 1_700_000_000_000_000;

    fn limiter(replica: u64, clock: Arc<ManualClock>) -> Limiter {
        let limiter = Limiter::new(LimiterOptions {
            node_id: format!("node-{replica}"),
            replica: ReplicaId(replica),
            default_rate: Rate::try_new(10, 1000).unwrap(),
            clock,
            shards: 4,
            track_changes: false,
        });
        limiter
            .reload_policies(
                "policies:\n  extra:\n    capacity: 5\n    refill_interval_ms: 1000\n    overrides:\n      vip: {capacity: 50, refill_interval_ms: 1000}\n",
            )
            .unwrap();
        limiter
    }

    /// A limiter holding buckets of both policies, one of them with a second replica's
    /// component merged in.
    fn busy_limiter() -> Limiter {
        let limiter = limiter(1, Arc::new(ManualClock::at(START)));
        limiter.decide("default", "a", 3).unwrap();
        limiter.decide("default", "b", 10).unwrap();
        limiter.decide("extra", "vip", 40).unwrap();
        let policy = limiter.policies().get("default").unwrap().clone();
        let mut remote = BucketState::full_at(START);
        remote.try_consume_at(policy.rate, ReplicaId(9), &mut (START - 5), 4, START);
        limiter
            .store()
            .merge(policy.id, "a", &remote, policy.rate, START);
        limiter
    }

    fn encoded(limiter: &Limiter) -> Vec<u8> {
        encode(limiter, limiter.now(), DEFAULT_MAX_BYTES)
            .unwrap()
            .bytes
    }

    /// Every bucket of the store, by (policy name, key).
    fn store_states(limiter: &Limiter) -> BTreeMap<(String, String), BucketState> {
        let policies = limiter.policies();
        let mut states = BTreeMap::new();
        limiter.store().for_each(|id, key, state| {
            let name = policies.by_id(id).unwrap().name.clone();
            states.insert((name, key.to_owned()), state.clone());
        });
        states
    }

    fn snapshot_states(snapshot: &Snapshot) -> BTreeMap<(String, String), BucketState> {
        snapshot
            .buckets()
            .map(|b| ((b.policy.to_owned(), b.key.to_owned()), b.state))
            .collect()
    }

    /// Recompute the checksum after editing the contents, as a faulty writer would produce.
    fn reseal(mut bytes: Vec<u8>) -> Vec<u8> {
        let content = bytes.len() - CHECKSUM_LEN;
        let checksum = digest::digest(&digest::SHA256, &bytes[..content]);
        bytes[content..].copy_from_slice(checksum.as_ref());
        bytes
    }

    #[test]
    fn decoding_gives_back_every_bucket_and_the_header() {
        let limiter = busy_limiter();
        let snapshot = Snapshot::decode(encoded(&limiter)).unwrap();
        assert_eq!(snapshot.node_id(), "node-1");
        assert_eq!(snapshot.replica(), ReplicaId(1));
        assert_eq!(snapshot.created_us(), START);
        assert_eq!(snapshot.bucket_count(), 3);
        let states = snapshot_states(&snapshot);
        assert_eq!(states, store_states(&limiter));
        let a = &states[&("default".to_owned(), "a".to_owned())];
        assert_eq!(a.components().len(), 2, "{a:?}");
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        let bytes = encoded(&busy_limiter());
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            let error = Snapshot::decode(damaged).expect_err("a flipped bit must be detected");
            let byte = bit / 8;
            let expected_ok = match byte {
                0..8 => matches!(error, SnapshotError::Foreign),
                // A flip that lands on the other readable version is caught by the checksum.
                8..10 => matches!(
                    error,
                    SnapshotError::UnsupportedVersion { .. } | SnapshotError::ChecksumMismatch
                ),
                // The length field: raised, the file looks truncated; lowered, the checksum
                // (which covers it) no longer matches.
                10..18 => matches!(
                    error,
                    SnapshotError::Truncated { .. } | SnapshotError::ChecksumMismatch
                ),
                _ => matches!(error, SnapshotError::ChecksumMismatch),
            };
            assert!(expected_ok, "bit {bit} (byte {byte}): {error}");
        }
    }

    #[test]
    fn every_truncation_is_rejected_as_truncated() {
        let bytes = encoded(&busy_limiter());
        assert!(matches!(
            Snapshot::decode(Vec::new()),
            Err(SnapshotError::Empty)
        ));
        for len in 1..bytes.len() {
            match Snapshot::decode(bytes[..len].to_vec()) {
                Err(SnapshotError::Truncated { actual, .. }) => assert_eq!(actual, len as u64),
                other => panic!("{len} of {} bytes: {other:?}", bytes.len()),
            }
        }
        // Appended bytes are damage too.
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            Snapshot::decode(longer),
            Err(SnapshotError::ChecksumMismatch)
        ));
    }

    #[test]
    fn contents_breaking_the_format_are_rejected_even_with_a_valid_checksum() {
        let bytes = encoded(&busy_limiter());
        let snapshot = Snapshot::decode(bytes.clone()).unwrap();
        let first = snapshot.buckets_at;
        // The first bucket: policy index, key length, key, epoch, rebaser, component count,
        // components.
        let key_len = u32::from_le_bytes(bytes[first + 4..first + 8].try_into().unwrap()) as usize;
        let components_at = first + 8 + key_len + 8 + 8;
        let first_component = components_at + 4;
        let table = bytes.len() - CHECKSUM_LEN - 4 - (4 + "default".len()) - (4 + "extra".len());

        let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
        let mut b = bytes.clone();
        b[first..first + 4].copy_from_slice(&7u32.to_le_bytes());
        cases.push(("outside the policy table", b));
        let mut b = bytes.clone();
        // absorbed := consumed + 1
        let consumed = u64::from_le_bytes(
            b[first_component + 16..first_component + 24]
                .try_into()
                .unwrap(),
        );
        b[first_component + 24..first_component + 32]
            .copy_from_slice(&(consumed + 1).to_le_bytes());
        cases.push(("absorbed more than it consumed", b));
        let mut b = bytes.clone();
        b[components_at..components_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        cases.push(("component list runs past the end", b));
        let mut b = bytes.clone();
        b[first + 4..first + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        cases.push(("a field runs past the end", b));
        let mut b = bytes.clone();
        let count_at = snapshot.buckets_at - 8;
        b[count_at..count_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        cases.push(("runs past the end", b));
        let mut b = bytes.clone();
        b[table..table + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        cases.push(("a field runs past the end", b));
        let mut b = bytes.clone();
        b[first + 8] = 0xff;
        cases.push(("not UTF-8", b));
        let mut b = bytes.clone();
        b.splice(b.len() - CHECKSUM_LEN..b.len() - CHECKSUM_LEN, [0u8; 3]);
        let len = b.len() as u64;
        b[10..18].copy_from_slice(&len.to_le_bytes());
        cases.push(("bytes after the policy table", b));
        let mut b = bytes.clone();
        let len = b.len() as u64 - 1;
        b[10..18].copy_from_slice(&len.to_le_bytes());
        cases.push(("length field disagrees", b));

        // Two components of one bucket swapped: find the bucket with two.
        let two = snapshot
            .buckets()
            .position(|b| b.state.components().len() == 2)
            .unwrap();
        let mut reader = Reader {
            bytes: &bytes,
            at: first,
        };
        for _ in 0..two {
            reader.record().unwrap();
        }
        let at = reader.at;
        let record = reader.record().unwrap();
        let comps = at + 8 + record.key.len() + 8 + 8 + 4;
        let mut b = bytes.clone();
        b[comps..comps + 64].rotate_left(32);
        cases.push(("not sorted by replica", b));

        // Each case names the reason it must be rejected with.
        for (expected, damaged) in cases {
            match Snapshot::decode(reseal(damaged)) {
                Err(SnapshotError::Malformed(reason)) => {
                    assert!(reason.contains(expected), "{expected:?}: got {reason:?}")
                }
                other => panic!("{expected:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_write_failing_midway_leaves_the_previous_snapshot_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::at(START));
        let limiter = limiter(1, clock.clone());
        limiter.decide("default", "k", 4).unwrap();
        let snapshots = Snapshots::new(dir.path());
        let good = snapshots.write(&limiter).unwrap();
        let good_bytes = fs::read(&good.path).unwrap();

        clock.advance_us(1_000);
        limiter.decide("default", "k", 5).unwrap();
        let error = snapshots
            .write_with(&limiter, |file, bytes| {
                file.write_all(&bytes[..bytes.len() / 2])?;
                Err(io::Error::other("disk full (injected)"))
            })
            .unwrap_err();
        assert!(
            matches!(
                &error,
                SnapshotError::Io {
                    action: "writing",
                    ..
                }
            ),
            "{error}"
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [good.path.file_name().unwrap()], "{names:?}");
        assert_eq!(fs::read(&good.path).unwrap(), good_bytes);
        let text = limiter.render_metrics();
        for line in [
            "openclaw_snapshots_total{result=\"success\"} 1",
            "openclaw_snapshots_total{result=\"failure\"} 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }

        let fresh = self::limiter(2, Arc::new(ManualClock::at(START + 1_000)));
        let report = snapshots.restore_latest(&fresh).unwrap();
        assert_eq!(report.used.unwrap().path, good.path);
        assert_eq!(
            fresh.peek("default", "k", 1).unwrap().0.outcome.remaining,
            6
        );
    }

    #[test]
    fn a_snapshot_above_the_size_bound_is_neither_written_nor_read() {
        let dir = tempfile::tempdir().unwrap();
        let limiter = busy_limiter();
        let small = Snapshots::new(dir.path()).with_max_bytes(64);
        assert!(matches!(
            small.write(&limiter),
            Err(SnapshotError::TooLarge { max: 64, .. })
        ));
        assert!(small.list().unwrap().is_empty());

        let written = Snapshots::new(dir.path()).write(&limiter).unwrap();
        assert!(matches!(
            Snapshot::read(&written.path, written.bytes - 1),
            Err(SnapshotError::TooLarge { .. })
        ));
        let report = small
            .restore_latest(&self::limiter(2, Arc::new(ManualClock::at(START))))
            .unwrap();
        assert!(report.used.is_none());
        assert!(matches!(
            report.rejected[0].reason,
            SnapshotError::TooLarge { .. }
        ));
    }

    #[test]
    fn file_names_order_snapshots_and_nothing_else() {
        assert_eq!(parse_file_name(&file_name(42)), Some(42));
        assert_eq!(file_name(42), "snapshot-00000000000000000042.ocs");
        for other in [
            "snapshot-.ocs",
            "snapshot-12a.ocs",
            "snapshot-12.ocs.tmp",
            ".snapshot-12.ocs.tmp",
            "snapshot-+12.ocs",
            "notes.txt",
        ] {
            assert_eq!(parse_file_name(other), None, "{other}");
        }
    }

    /// A random history of local decisions and merges from other replicas.
    #[derive(Debug, Clone)]
    enum Op {
        Decide {
            policy: bool,
            key: u8,
            cost: u64,
            advance_us: u64,
        },
        Remote {
            replica: u64,
            key: u8,
            cost: u64,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (any::<bool>(), 0..6u8, 1..=5u64, 0..300_000u64).prop_map(
                |(policy, key, cost, advance_us)| Op::Decide { policy, key, cost, advance_us }
            ),
            1 => (2..5u64, 0..6u8, 1..=5u64)
                .prop_map(|(replica, key, cost)| Op::Remote { replica, key, cost }),
        ]
    }

    proptest! {
        #[test]
        fn encoding_round_trips_every_bucket_state_exactly(
            ops in proptest::collection::vec(op(), 0..60)
        ) {
            let clock = Arc::new(ManualClock::at(START));
            let limiter = limiter(1, clock.clone());
            let default = limiter.policies().get("default").unwrap().clone();
            for op in ops {
                match op {
                    Op::Decide { policy, key, cost, advance_us } => {
                        clock.advance_us(advance_us);
                        let policy = if policy { "extra" } else { "default" };
                        let key = if key == 0 { "vip".to_owned() } else { format!("k{key}") };
                        limiter.decide(policy, &key, cost).unwrap();
                    }
                    Op::Remote { replica, key, cost } => {
                        let now = limiter.now();
                        let mut remote = BucketState::full_at(now);
                        remote.try_consume_at(default.rate, ReplicaId(replica), &mut 1, cost, now);
                        limiter.store().merge(default.id, &format!("k{key}"), &remote, default.rate, now);
                    }
                }
            }
            let snapshot = Snapshot::decode(encoded(&limiter)).unwrap();
            prop_assert_eq!(snapshot.bucket_count() as usize, limiter.store().len());
            prop_assert_eq!(snapshot_states(&snapshot), store_states(&limiter));
        }
    }
}
