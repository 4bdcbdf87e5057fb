//! Off-site snapshots: each replica ships its newest verified local snapshot to an object store
//! (S3 or an S3-compatible store), and a replica started after a disaster (nothing usable on
//! local disk, no state from peers) restores the cluster's state from there before `/ready`.
//!
//! # Objects
//!
//! `<prefix>/<node-id>/<created>.ocs`, where `created` (20 digits, zero-padded) is the
//! snapshot's creation time in µs, read from the file's own header, so the newest object of a
//! replica has the largest name and a restore can skip a too-old object without downloading it.
//! The object's bytes are the local snapshot file unchanged ([`crate::snapshot`], format version
//! 3): it carries its own SHA-256, which the restore checks like any local file, so a damaged or
//! truncated object is detected whatever the store did. An upload is one PUT, which S3 makes
//! visible whole or not at all: a reader never sees half an object.
//!
//! Each replica writes and prunes only its own `<node-id>/` folder (the newest `keep` objects
//! stay); node ids must therefore differ between replicas, as pod names do. Folders of replicas
//! that are gone are left alone: their snapshots age out of every restore through the maximum
//! age, and a bucket lifecycle rule can delete them (deploy/README.md).
//!
//! # Restore
//!
//! [`Remote::restore`] lists the whole prefix, takes for every node folder its newest object
//! that passes every check (falling back to older ones), and merges each into the store. The
//! merge is the CRDT join, so combining the snapshots of several replicas, taken at different
//! times, is safe: it can only make the view more conservative. Objects older than the maximum
//! age, damaged, of a foreign or unsupported format, or whose name disagrees with their header
//! are logged, counted in `openclaw_snapshot_remote_rejected_total{reason}` and skipped, never
//! trusted. Buckets of policies that no longer exist are dropped, as for local snapshots.
//!
//! # Failures
//!
//! Shipping runs in a background task ([`ship`]) that never touches the decision path: it reads
//! a file on a blocking thread and talks to the store; a store that is down costs retries with
//! back-off, counted in `openclaw_snapshot_uploads_total{result="failure"}`, and the age gauge
//! `openclaw_snapshot_remote_age_seconds` keeps growing until an upload succeeds (the
//! `OpenClawOffsiteSnapshotStale` alert). A shutdown drops an upload in flight.
//!
//! Every request has a deadline ([`CONNECT_TIMEOUT`], [`STALL_TIMEOUT`], the upload deadline of
//! [`UPLOAD_MIN_BYTES_PER_S`]), so a store that accepts connections and never answers costs a
//! bounded time: a failed upload, or a restore that gives up (docs/configuration.md).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use object_store::ClientConfigKey;
use object_store::aws::AmazonS3ConfigKey;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::Serialize;
use tokio::sync::watch;

use crate::bucket::Micros;
use crate::metrics::{ReasonLabels, ResultLabels};
use crate::service::Limiter;
use crate::snapshot::{DEFAULT_MAX_BYTES, Snapshot, SnapshotError, SnapshotInfo, Snapshots};

/// The standard variables the S3 client reads (`AmazonS3Builder::from_env` reads every `AWS_*`
/// it knows): listed so that start-up can log which are set (never their values), and so the
/// deployment checks know the limiter reads them.
pub const AWS_ENV: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ALLOW_HTTP",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
];

/// Snapshots each replica keeps off-site by default: a week of daily copies.
pub const DEFAULT_KEEP: usize = 7;
/// Default seconds between uploads: the operations guide's daily copy.
pub const DEFAULT_INTERVAL_S: u64 = 86_400;
/// Default maximum age of a snapshot a restore trusts: older ones are skipped without being
/// downloaded.
pub const DEFAULT_MAX_AGE_S: u64 = 7 * 86_400;

const OBJECT_SUFFIX: &str = ".ocs";
/// First wait after a failed upload; doubled after each failure up to [`MAX_BACKOFF`] (and never
/// beyond the upload interval).
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// TCP (and TLS) connection set-up to the store.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest the store may stay silent while a request is under way: for a listing page, a
/// download's response and each of its chunks, a delete. A store that accepts connections and
/// never answers costs a restore this long, once (see [`Remote::restore`]).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The slowest upload accepted: a PUT gets [`STALL_TIMEOUT`] plus one second per MiB (the
/// progress of a request body cannot be watched through the client, so its deadline is sized).
pub const UPLOAD_MIN_BYTES_PER_S: u64 = 1 << 20;
/// The HTTP client's own limit on any request, a backstop behind the deadlines above: the
/// upload deadline of the largest snapshot.
const REQUEST_BACKSTOP: Duration =
    Duration::from_secs(10 + DEFAULT_MAX_BYTES / UPLOAD_MIN_BYTES_PER_S);
/// How soon to look again when there is no new local snapshot to ship yet.
const RECHECK: Duration = Duration::from_secs(5);
/// How often the age gauge is refreshed.
const AGE_REFRESH: Duration = Duration::from_secs(1);
const NEVER: u64 = u64::MAX;

/// Why talking to the object store, or reading what to ship, failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The `OPENCLAW_SNAPSHOT_REMOTE` URL is not one this build can use.
    #[error("OPENCLAW_SNAPSHOT_REMOTE {url:?}: {reason}")]
    Url { url: String, reason: String },
    /// The object store refused a request or could not be reached (after its own retries).
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    /// The object store accepted the request and then did not answer in time.
    #[error("object store: no answer to {operation} {object} within {} s", .after.as_secs_f64())]
    Timeout {
        operation: &'static str,
        object: String,
        after: Duration,
    },
    /// A restore stopped when the store stopped answering; the snapshots merged before stay
    /// merged (a partial restore is still a join: never less conservative than none).
    #[error(
        "stopped after merging {merged} of {nodes} replica folders (those merges are kept): {source}"
    )]
    Incomplete {
        merged: usize,
        nodes: usize,
        source: Box<RemoteError>,
    },
    /// The local snapshot directory could not be listed or a snapshot file read.
    #[error("local snapshot: {0}")]
    Local(#[from] SnapshotError),
    /// A blocking task (reading a file, merging a snapshot) panicked or was cancelled.
    #[error("task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Where off-site snapshots go: `s3://bucket/prefix`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteLocation {
    pub url: String,
    pub bucket: String,
    /// Without leading or trailing `/`; may be empty.
    pub prefix: String,
}

impl RemoteLocation {
    /// Accepts `s3://bucket` and `s3://bucket/some/prefix`. Google Cloud Storage and Azure Blob
    /// Storage are not built in (see docs/configuration.md); their URLs get an error that says
    /// what to do instead.
    pub fn parse(url: &str) -> Result<Self, RemoteError> {
        let problem = |reason: &str| RemoteError::Url {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        if url.starts_with("gs://") {
            return Err(problem(
                "gs:// is not built in this binary (only s3:// URLs are supported): use Google \
                 Cloud Storage's S3-compatible XML API instead, with an HMAC key as \
                 AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL=https://storage.googleapis.com \
                 and OPENCLAW_SNAPSHOT_REMOTE=s3://BUCKET/PREFIX",
            ));
        }
        if ["azure://", "az://", "abfs://", "abfss://", "adl://"]
            .iter()
            .any(|scheme| url.starts_with(scheme))
            || url.contains(".blob.core.windows.net")
        {
            return Err(problem(
                "Azure Blob Storage is not built in this binary (only s3:// URLs are supported): \
                 use an S3-compatible store, or an S3 gateway in front of the container, with \
                 AWS_ENDPOINT_URL pointing at it",
            ));
        }
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| problem("only s3:// URLs are supported (s3://bucket/prefix)"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(problem("no bucket name"));
        }
        let prefix = prefix.trim_matches('/');
        if prefix
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
            && !prefix.is_empty()
        {
            return Err(problem("the prefix has an empty, `.` or `..` segment"));
        }
        Ok(Self {
            url: url.to_owned(),
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
        })
    }
}

/// One replica's view of the off-site store: ships its own snapshots, restores everyone's.
#[derive(Debug)]
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    /// For logs: the configured URL.
    url: String,
    prefix: Path,
    node_id: String,
    keep: usize,
    max_bytes: u64,
    /// [`STALL_TIMEOUT`], shorter in tests.
    stall: Duration,
    /// Creation time (µs) of the newest snapshot this process shipped, [`NEVER`] before that.
    last_uploaded: AtomicU64,
}

/// What one upload did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Uploaded {
    pub object: String,
    pub created_us: Micros,
    pub bytes: u64,
    pub buckets: u64,
    /// Older objects of this replica deleted by retention.
    pub deleted: Vec<String>,
}

/// An object the restore did not trust, and why.
#[derive(Debug, Serialize)]
pub struct RejectedObject {
    pub object: String,
    /// The metric label: `too_old`, `empty`, `foreign`, `unsupported_version`, `truncated`,
    /// `checksum`, `malformed`, `too_large`, `name_mismatch` or `unreadable`.
    pub reason: &'static str,
    pub detail: String,
}

/// The snapshot of one node folder a restore merged.
#[derive(Debug, Serialize)]
pub struct MergedObject {
    pub object: String,
    pub node_id: String,
    pub created_us: Micros,
    pub buckets: u64,
    /// Buckets whose merge changed local state.
    pub restored: u64,
    pub skipped_unknown_policy: u64,
}

/// A step of a restore, reported as it happens ([`Remote::restore_reporting`]).
#[derive(Debug)]
pub enum RestoreEvent<'a> {
    /// The prefix was listed: `objects` in all, in `nodes` node folders, `ignored` not named
    /// like snapshots.
    Listed {
        objects: usize,
        nodes: usize,
        ignored: usize,
    },
    Merged(&'a MergedObject),
    Rejected(&'a RejectedObject),
}

/// What [`Remote::restore`] did.
#[derive(Debug, Default, Serialize)]
pub struct RemoteRestoreReport {
    /// Objects listed under the prefix.
    pub objects: usize,
    /// Node folders found under the prefix.
    pub nodes: usize,
    /// One entry per node folder that had a usable snapshot.
    pub merged: Vec<MergedObject>,
    pub rejected: Vec<RejectedObject>,
    /// Objects under the prefix whose names are not `<node>/<digits>.ocs`: not ours, ignored.
    pub ignored: usize,
    /// Names of policies that no longer exist, whose buckets were dropped.
    pub unknown_policies: Vec<String>,
    pub bytes_downloaded: u64,
    pub elapsed_ms: u64,
}

impl Remote {
    /// An S3 (or S3-compatible) store for `location`, configured from the standard environment:
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`,
    /// `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, and web identity (IRSA) through
    /// `AWS_WEB_IDENTITY_TOKEN_FILE` and `AWS_ROLE_ARN`.
    pub fn s3_from_env(
        location: &RemoteLocation,
        node_id: &str,
        keep: usize,
    ) -> Result<Self, RemoteError> {
        Self::s3(
            object_store::aws::AmazonS3Builder::from_env(),
            location,
            node_id,
            keep,
        )
    }

    /// An S3 store from `builder` (credentials, endpoint) with this module's retries and
    /// timeouts.
    fn s3(
        builder: object_store::aws::AmazonS3Builder,
        location: &RemoteLocation,
        node_id: &str,
        keep: usize,
    ) -> Result<Self, RemoteError> {
        let store = builder
            .with_bucket_name(&location.bucket)
            // Connection set-up is bounded here; a store that accepts and then stays silent is
            // bounded by the deadlines this module puts on each operation (STALL_TIMEOUT, the
            // upload deadline). The client's own request timeout (30 s by default, whatever
            // the size) would fail large transfers, so it is only a backstop.
            // (Set key by key: `with_client_options` would replace what `from_env` read, such
            // as AWS_ALLOW_HTTP.)
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                format!("{}s", CONNECT_TIMEOUT.as_secs()),
            )
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                format!("{}s", REQUEST_BACKSTOP.as_secs()),
            )
            // The store's own retries are short: the shipping loop retries with its own back-off,
            // and a restore must not hold readiness for minutes on a dead endpoint.
            .with_retry(object_store::RetryConfig {
                backoff: object_store::BackoffConfig::default(),
                max_retries: 3,
                retry_timeout: Duration::from_secs(20),
            })
            .build()?;
        let set: Vec<&str> = AWS_ENV
            .iter()
            .copied()
            .filter(|name| std::env::var_os(name).is_some())
            .collect();
        tracing::info!(
            remote = %location.url,
            node = node_id,
            keep,
            from_env = ?set,
            "off-site snapshots configured"
        );
        Ok(Self::with_store(
            Arc::new(store),
            &location.url,
            &location.prefix,
            node_id,
            keep,
        ))
    }

    /// Any [`ObjectStore`] (tests use the in-memory one).
    pub fn with_store(
        store: Arc<dyn ObjectStore>,
        url: &str,
        prefix: &str,
        node_id: &str,
        keep: usize,
    ) -> Self {
        Self {
            store,
            url: url.to_owned(),
            prefix: Path::from(prefix),
            node_id: node_id.to_owned(),
            keep: keep.max(1),
            max_bytes: DEFAULT_MAX_BYTES,
            stall: STALL_TIMEOUT,
            last_uploaded: AtomicU64::new(NEVER),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn node_folder(&self) -> Path {
        self.prefix.clone().join(self.node_id.as_str())
    }

    /// Ship the newest local snapshot that passes every check, unless it was shipped already
    /// (`Ok(None)`, also when there is none yet). Then delete this replica's objects beyond the
    /// newest `keep`. Counts `openclaw_snapshot_uploads_total{result}` for every attempt that
    /// had something to ship.
    pub async fn upload_newest(
        &self,
        snapshots: &Arc<Snapshots>,
        limiter: &Limiter,
    ) -> Result<Option<Uploaded>, RemoteError> {
        let shipped = self.last_uploaded.load(Ordering::Relaxed);
        let max_bytes = self.max_bytes;
        let newest = tokio::task::spawn_blocking({
            let snapshots = snapshots.clone();
            move || newest_verified(&snapshots, max_bytes)
        })
        .await??;
        let Some(snapshot) = newest else {
            return Ok(None);
        };
        if shipped != NEVER && snapshot.created_us() <= shipped {
            return Ok(None);
        }
        let result = self.put(snapshot).await;
        let outcome = if result.is_ok() { "success" } else { "failure" };
        limiter
            .metrics()
            .snapshot_uploads
            .get_or_create(&ResultLabels { result: outcome })
            .inc();
        result.map(Some)
    }

    async fn put(&self, snapshot: Snapshot) -> Result<Uploaded, RemoteError> {
        let created_us = snapshot.created_us();
        let buckets = snapshot.bucket_count();
        let object = self.node_folder().join(object_name(created_us));
        let bytes = snapshot.into_bytes();
        let len = bytes.len() as u64;
        let deadline = upload_deadline(len, self.stall);
        within(
            deadline,
            "PUT",
            &object,
            self.store.put(&object, PutPayload::from(bytes)),
        )
        .await?;
        self.last_uploaded.store(created_us, Ordering::Relaxed);
        let deleted = self.apply_retention().await;
        Ok(Uploaded {
            object: object.to_string(),
            created_us,
            bytes: len,
            buckets,
            deleted,
        })
    }

    /// Delete this replica's objects beyond the newest `keep`. Failures are logged: the new
    /// object is safe, and the next upload tries again.
    async fn apply_retention(&self) -> Vec<String> {
        let folder = self.node_folder();
        let mut ours: Vec<(Micros, Path)> = Vec::new();
        let mut listing = self.store.list(Some(&folder));
        loop {
            let Ok(next) = tokio::time::timeout(self.stall, listing.next()).await else {
                tracing::warn!(
                    after_s = self.stall.as_secs_f64(),
                    "off-site retention skipped: the listing stalled"
                );
                return Vec::new();
            };
            let Some(item) = next else { break };
            match item {
                Ok(meta) => {
                    // Only direct children named like ours: never someone else's file.
                    let created = meta.location.prefix_match(&folder).and_then(|mut rest| {
                        match (rest.next(), rest.next()) {
                            (Some(name), None) => parse_object_name(name.as_ref()),
                            _ => None,
                        }
                    });
                    if let Some(created) = created {
                        ours.push((created, meta.location));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "off-site retention skipped: cannot list");
                    return Vec::new();
                }
            }
        }
        ours.sort_by_key(|&(created, _)| std::cmp::Reverse(created));
        let mut deleted = Vec::new();
        for (_, object) in ours.into_iter().skip(self.keep) {
            match within(self.stall, "DELETE", &object, self.store.delete(&object)).await {
                Ok(()) => deleted.push(object.to_string()),
                Err(e) => {
                    tracing::warn!(%object, error = %e, "cannot delete old off-site snapshot")
                }
            }
        }
        deleted
    }

    /// Set `openclaw_snapshot_remote_age_seconds`: the age of the newest snapshot this process
    /// shipped, or before the first one, the time since start (so a replica that never manages
    /// to ship still trips the alert).
    pub fn publish_age(&self, limiter: &Limiter) {
        let now = limiter.now();
        let since = match self.last_uploaded.load(Ordering::Relaxed) {
            NEVER => limiter.started(),
            created => created,
        };
        limiter
            .metrics()
            .snapshot_remote_age
            .set(now.saturating_sub(since) as f64 / 1e6);
    }

    /// Merge the newest valid snapshot of every node folder under the prefix into `limiter`'s
    /// store (see the module documentation). An error means the prefix could not be listed, or
    /// the store stopped answering midway ([`RemoteError::Incomplete`]); objects that fail a
    /// check are in the report.
    ///
    /// Bounded: a store that accepts connections and stays silent costs at most
    /// [`STALL_TIMEOUT`] once, beyond the transfers that made progress. A download that stalls
    /// ends the restore rather than moving on to the next object, which would wait as long.
    pub async fn restore(
        &self,
        limiter: &Arc<Limiter>,
        max_age: Duration,
    ) -> Result<RemoteRestoreReport, RemoteError> {
        self.restore_reporting(limiter, max_age, &mut |_| {}).await
    }

    /// [`Remote::restore`], telling `progress` what it does as it does it (the offline
    /// `openclaw-limiter restore` prints it).
    pub async fn restore_reporting(
        &self,
        limiter: &Arc<Limiter>,
        max_age: Duration,
        progress: &mut (dyn FnMut(RestoreEvent<'_>) + Send),
    ) -> Result<RemoteRestoreReport, RemoteError> {
        let started = Instant::now();
        let mut report = RemoteRestoreReport::default();
        tracing::info!(remote = %self.url, "off-site restore: listing snapshots");
        let mut nodes: BTreeMap<String, Vec<(Micros, object_store::ObjectMeta)>> = BTreeMap::new();
        let mut listing = self.store.list(Some(&self.prefix));
        loop {
            let next = tokio::time::timeout(self.stall, listing.next())
                .await
                .map_err(|_| RemoteError::Timeout {
                    operation: "LIST",
                    object: format!("{}/", self.prefix),
                    after: self.stall,
                })?;
            let Some(item) = next else { break };
            let meta = item?;
            report.objects += 1;
            let parts: Option<Vec<String>> = meta
                .location
                .prefix_match(&self.prefix)
                .map(|rest| rest.map(|p| p.as_ref().to_owned()).collect());
            match parts.as_deref() {
                Some([node, name]) => match parse_object_name(name) {
                    Some(created) => nodes.entry(node.clone()).or_default().push((created, meta)),
                    None => report.ignored += 1,
                },
                _ => report.ignored += 1,
            }
        }
        report.nodes = nodes.len();
        tracing::info!(
            objects = report.objects,
            nodes = nodes.len(),
            ignored = report.ignored,
            "off-site restore: found node folders"
        );
        progress(RestoreEvent::Listed {
            objects: report.objects,
            nodes: report.nodes,
            ignored: report.ignored,
        });
        let max_age_us = max_age.as_micros() as u64;
        let mut unknown = std::collections::BTreeSet::new();
        for (node, mut objects) in nodes {
            objects.sort_by_key(|(created, _)| std::cmp::Reverse(*created));
            for (created, meta) in objects {
                let object = meta.location.to_string();
                let age_us = limiter.now().saturating_sub(created);
                let rejection = if age_us > max_age_us {
                    Some((
                        "too_old",
                        format!(
                            "taken {} s ago, above the maximum age of {} s",
                            age_us / 1_000_000,
                            max_age.as_secs()
                        ),
                    ))
                } else if meta.size > self.max_bytes {
                    Some(("too_large", format!("{} bytes", meta.size)))
                } else {
                    None
                };
                if let Some((reason, detail)) = rejection {
                    self.reject(limiter, &mut report, progress, object, reason, detail);
                    continue;
                }
                let fetching = Instant::now();
                let bytes = match self.fetch(&meta.location, meta.size).await {
                    Ok(bytes) => bytes,
                    Err(e @ RemoteError::Timeout { .. }) => {
                        // A silent store would cost every remaining object the same wait.
                        let detail = e.to_string();
                        self.reject(limiter, &mut report, progress, object, "unreadable", detail);
                        tracing::warn!(
                            merged = report.merged.len(),
                            nodes = report.nodes,
                            "off-site restore stopped: the store stopped answering"
                        );
                        return Err(RemoteError::Incomplete {
                            merged: report.merged.len(),
                            nodes: report.nodes,
                            source: Box::new(e),
                        });
                    }
                    Err(e) => {
                        let detail = e.to_string();
                        self.reject(limiter, &mut report, progress, object, "unreadable", detail);
                        continue;
                    }
                };
                report.bytes_downloaded += bytes.len() as u64;
                let download_ms = fetching.elapsed().as_millis() as u64;
                let snapshot = match Snapshot::decode(bytes) {
                    Ok(snapshot) if snapshot.created_us() == created => snapshot,
                    Ok(snapshot) => {
                        let detail = format!(
                            "the name says created at {created} µs, the header {} µs",
                            snapshot.created_us()
                        );
                        self.reject(
                            limiter,
                            &mut report,
                            progress,
                            object,
                            "name_mismatch",
                            detail,
                        );
                        continue;
                    }
                    Err(e) => {
                        let (reason, detail) = (rejection_reason(&e), e.to_string());
                        self.reject(limiter, &mut report, progress, object, reason, detail);
                        continue;
                    }
                };
                let merged = tokio::task::spawn_blocking({
                    let limiter = limiter.clone();
                    move || {
                        let report = snapshot.merge_into(&limiter);
                        (snapshot, report)
                    }
                })
                .await?;
                let (snapshot, merge) = merged;
                unknown.extend(merge.unknown_policies.iter().cloned());
                tracing::info!(
                    %object,
                    node = %node,
                    writer = %snapshot.node_id(),
                    age_s = age_us / 1_000_000,
                    buckets = snapshot.bucket_count(),
                    restored = merge.restored,
                    skipped_unknown_policy = merge.skipped_unknown_policy,
                    bytes = meta.size,
                    download_ms,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "off-site restore: snapshot merged"
                );
                report.merged.push(MergedObject {
                    object,
                    node_id: snapshot.node_id().to_owned(),
                    created_us: created,
                    buckets: snapshot.bucket_count(),
                    restored: merge.restored,
                    skipped_unknown_policy: merge.skipped_unknown_policy,
                });
                progress(RestoreEvent::Merged(
                    report.merged.last().expect("just pushed"),
                ));
                break;
            }
        }
        report.unknown_policies = unknown.into_iter().collect();
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            nodes = report.nodes,
            merged = report.merged.len(),
            rejected = report.rejected.len(),
            buckets = limiter.store().len(),
            bytes = report.bytes_downloaded,
            unknown_policies = ?report.unknown_policies,
            elapsed_ms = report.elapsed_ms,
            "off-site restore done"
        );
        Ok(report)
    }

    /// Download `object` (`size` bytes by its listing), giving up when the store is silent
    /// for [`STALL_TIMEOUT`]: before the response, or between two chunks of the body. A slow
    /// but steady download of a large snapshot is never cut short.
    async fn fetch(&self, object: &Path, size: u64) -> Result<Vec<u8>, RemoteError> {
        let response = within(self.stall, "GET", object, self.store.get(object)).await?;
        let mut body = response.into_stream();
        let mut bytes = Vec::with_capacity(size.min(self.max_bytes) as usize);
        loop {
            let chunk = tokio::time::timeout(self.stall, body.next())
                .await
                .map_err(|_| RemoteError::Timeout {
                    operation: "GET (body)",
                    object: object.to_string(),
                    after: self.stall,
                })?;
            match chunk {
                Some(chunk) => bytes.extend_from_slice(&chunk?),
                None => return Ok(bytes),
            }
        }
    }

    fn reject(
        &self,
        limiter: &Limiter,
        report: &mut RemoteRestoreReport,
        progress: &mut (dyn FnMut(RestoreEvent<'_>) + Send),
        object: String,
        reason: &'static str,
        detail: String,
    ) {
        tracing::warn!(%object, reason, %detail, "off-site snapshot rejected: skipped, not trusted");
        limiter
            .metrics()
            .snapshot_remote_rejected
            .get_or_create(&ReasonLabels { reason })
            .inc();
        report.rejected.push(RejectedObject {
            object,
            reason,
            detail,
        });
        progress(RestoreEvent::Rejected(
            report.rejected.last().expect("just pushed"),
        ));
    }
}

/// Why the offline restore (`openclaw-limiter restore`) wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// The target directory cannot take a snapshot: not a directory, not readable or not
    /// writable, or the written file did not read back.
    #[error("{}: {reason}", .dir.display())]
    Target { dir: PathBuf, reason: String },
    /// The target directory already holds snapshots, and `--force` was not given.
    #[error(
        "{} already holds {count} snapshot(s), the newest {}: a replica started on it would \
         load them; refusing to add one (use --force to make the restored snapshot the newest)",
        .dir.display(),
        .newest.display()
    )]
    NotEmpty {
        dir: PathBuf,
        count: usize,
        newest: PathBuf,
    },
    /// A running limiter process holds the target directory (`lineage::claim`): it reads
    /// snapshots only when it starts, so one written under it would be ignored and then buried
    /// under its own. Refused with `--force` too.
    #[error(
        "{} is in use by a running limiter process (it holds {}): a replica loads snapshots \
         only when it starts, so one restored under it would be ignored; stop that process \
         first, or restore into another directory",
        .dir.display(),
        crate::lineage::LOCK_FILE
    )]
    InUse { dir: PathBuf },
    /// The store could not be listed, or stopped answering midway.
    #[error("cannot restore from {url}: {source}")]
    Store { url: String, source: RemoteError },
    /// The store answered, but no object under the prefix passed every check.
    #[error(
        "no valid snapshot under {url}: {objects} object(s) in {nodes} replica folder(s), \
         {rejected} rejected"
    )]
    NothingValid {
        url: String,
        objects: usize,
        nodes: usize,
        rejected: usize,
    },
}

/// What [`Remote::restore_into_dir`] did.
#[derive(Debug)]
pub struct Seeded {
    pub report: RemoteRestoreReport,
    /// Buckets in the written snapshot.
    pub buckets: u64,
    pub written: SnapshotInfo,
}

impl Remote {
    /// Disaster recovery, offline: the restore [`Remote::restore_reporting`] does at start,
    /// into `limiter` (which holds the configured policies and nothing else), then written as
    /// one local snapshot into `dir` for a replica started on it to load. Nothing is written
    /// unless the restore merged at least one snapshot and finished; the file is written aside
    /// and renamed ([`Snapshots::write`]), then read back and checked. `dir` is checked first,
    /// before the store is asked: it must be (or be creatable as) a writable directory that no
    /// running limiter process holds, without snapshot files unless `force`.
    pub async fn restore_into_dir(
        &self,
        limiter: &Arc<Limiter>,
        max_age: Duration,
        dir: &std::path::Path,
        force: bool,
        progress: &mut (dyn FnMut(RestoreEvent<'_>) + Send),
    ) -> Result<Seeded, SeedError> {
        check_target(dir, force)?;
        let report = self
            .restore_reporting(limiter, max_age, progress)
            .await
            .map_err(|source| SeedError::Store {
                url: self.url.clone(),
                source,
            })?;
        if report.merged.is_empty() {
            return Err(SeedError::NothingValid {
                url: self.url.clone(),
                objects: report.objects,
                nodes: report.nodes,
                rejected: report.rejected.len(),
            });
        }
        let target = |reason: String| SeedError::Target {
            dir: dir.to_owned(),
            reason,
        };
        let snapshots = Snapshots::new(dir);
        let written = tokio::task::spawn_blocking({
            let limiter = limiter.clone();
            move || {
                let written = snapshots.write(&limiter)?;
                // Read back what a replica will read.
                match Snapshot::read(&written.path, DEFAULT_MAX_BYTES) {
                    Ok(back)
                        if back.created_us() == written.created_us
                            && back.bucket_count() == written.buckets =>
                    {
                        Ok(Ok(written))
                    }
                    other => {
                        let _ = std::fs::remove_file(&written.path);
                        Ok(Err(match other {
                            Ok(_) => "the written snapshot reads back different".to_owned(),
                            Err(e) => format!("the written snapshot does not read back: {e}"),
                        }))
                    }
                }
            }
        })
        .await
        .map_err(|e| target(e.to_string()))?
        .map_err(|e: SnapshotError| target(e.to_string()))?
        .map_err(target)?;
        Ok(Seeded {
            buckets: written.buckets,
            report,
            written,
        })
    }
}

/// `dir` can take the restored snapshot: an existing directory we can list and write into,
/// that no running limiter process holds, holding no snapshot unless `force`; or a path whose nearest existing ancestor is a
/// writable directory (it is created when the snapshot is written). Writes nothing but a
/// probe file, removed at once.
fn check_target(dir: &std::path::Path, force: bool) -> Result<(), SeedError> {
    let unusable = |reason: String| SeedError::Target {
        dir: dir.to_owned(),
        reason,
    };
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => Err(unusable("exists and is not a directory".to_owned())),
        Ok(_) => {
            match crate::lineage::is_held(dir) {
                Ok(false) => {}
                Ok(true) => {
                    return Err(SeedError::InUse {
                        dir: dir.to_owned(),
                    });
                }
                Err(e) => return Err(unusable(format!("cannot read its lock file: {e}"))),
            }
            let existing = Snapshots::new(dir)
                .list()
                .map_err(|e| unusable(e.to_string()))?;
            if let Some(newest) = existing.first().filter(|_| !force) {
                return Err(SeedError::NotEmpty {
                    dir: dir.to_owned(),
                    count: existing.len(),
                    newest: newest.clone(),
                });
            }
            probe_writable(dir).map_err(|e| unusable(format!("not writable: {e}")))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let ancestor = dir
                .ancestors()
                .skip(1)
                .map(|a| {
                    if a.as_os_str().is_empty() {
                        std::path::Path::new(".")
                    } else {
                        a
                    }
                })
                .find(|a| std::fs::symlink_metadata(a).is_ok())
                .unwrap_or(std::path::Path::new("."));
            if !ancestor.is_dir() {
                return Err(unusable(format!(
                    "cannot be created: {} is not a directory",
                    ancestor.display()
                )));
            }
            probe_writable(ancestor).map_err(|e| {
                unusable(format!(
                    "cannot be created: {} is not writable: {e}",
                    ancestor.display()
                ))
            })
        }
        Err(e) => Err(unusable(e.to_string())),
    }
}

fn probe_writable(dir: &std::path::Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".openclaw-restore-probe-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)?;
    std::fs::remove_file(&probe)
}

/// The newest snapshot in the directory that passes every check, if any.
fn newest_verified(snapshots: &Snapshots, max_bytes: u64) -> Result<Option<Snapshot>, RemoteError> {
    for path in snapshots.list()? {
        match Snapshot::read(&path, max_bytes) {
            Ok(snapshot) => return Ok(Some(snapshot)),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "not shipping a damaged snapshot; trying an older one")
            }
        }
    }
    Ok(None)
}

fn rejection_reason(error: &SnapshotError) -> &'static str {
    match error {
        SnapshotError::Empty => "empty",
        SnapshotError::Foreign => "foreign",
        SnapshotError::UnsupportedVersion { .. } => "unsupported_version",
        SnapshotError::Truncated { .. } => "truncated",
        SnapshotError::ChecksumMismatch => "checksum",
        SnapshotError::Malformed(_) => "malformed",
        SnapshotError::TooLarge { .. } => "too_large",
        SnapshotError::Io { .. } => "unreadable",
    }
}

/// How long an upload of `bytes` may take: the stall timeout, plus a second per MiB.
fn upload_deadline(bytes: u64, stall: Duration) -> Duration {
    stall + Duration::from_secs_f64(bytes as f64 / UPLOAD_MIN_BYTES_PER_S as f64)
}

/// `request`, or [`RemoteError::Timeout`] if it has not finished `after`.
async fn within<T>(
    after: Duration,
    operation: &'static str,
    object: &Path,
    request: impl std::future::Future<Output = Result<T, object_store::Error>>,
) -> Result<T, RemoteError> {
    match tokio::time::timeout(after, request).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(RemoteError::Timeout {
            operation,
            object: object.to_string(),
            after,
        }),
    }
}

fn object_name(created_us: Micros) -> String {
    format!("{created_us:020}{OBJECT_SUFFIX}")
}

fn parse_object_name(name: &str) -> Option<Micros> {
    let digits = name.strip_suffix(OBJECT_SUFFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Ship every `every` (first as soon as a local snapshot exists), retrying failures with
/// exponential back-off; refresh the age gauge every second. Stops with `stop`.
pub async fn ship(
    remote: Arc<Remote>,
    snapshots: Arc<Snapshots>,
    limiter: Arc<Limiter>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut next = tokio::time::Instant::now();
    let mut backoff = FIRST_BACKOFF;
    let mut age = tokio::time::interval(AGE_REFRESH);
    age.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return,
            _ = age.tick() => {
                remote.publish_age(&limiter);
                continue;
            }
            _ = tokio::time::sleep_until(next) => {}
        }
        // An upload in flight neither holds up a shutdown (dropping a PUT never leaves part of
        // an object: S3 shows all of it or nothing) nor stops the age gauge.
        let upload = remote.upload_newest(&snapshots, &limiter);
        tokio::pin!(upload);
        let result = loop {
            tokio::select! {
                _ = stop.wait_for(|stopped| *stopped) => return,
                _ = age.tick() => remote.publish_age(&limiter),
                result = &mut upload => break result,
            }
        };
        match result {
            Ok(Some(uploaded)) => {
                tracing::info!(
                    object = %uploaded.object,
                    bytes = uploaded.bytes,
                    buckets = uploaded.buckets,
                    deleted = uploaded.deleted.len(),
                    "snapshot shipped off-site"
                );
                backoff = FIRST_BACKOFF;
                next = tokio::time::Instant::now() + every;
            }
            Ok(None) => next = tokio::time::Instant::now() + RECHECK.min(every),
            Err(e) => {
                tracing::warn!(remote = %remote.url(), error = %e, retry_in_s = backoff.as_secs_f64(), "off-site upload failed");
                next = tokio::time::Instant::now() + backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF).min(every.max(FIRST_BACKOFF));
            }
        }
        remote.publish_age(&limiter);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use object_store::memory::InMemory;

    use super::*;
    use crate::bucket::Rate;
    use crate::clock::ManualClock;
    use crate::crdt::ReplicaId;
    use crate::service::LimiterOptions;

    const START: Micros = 1_700_000_000_000_000;
    const HOUR_US: u64 = 3_600_000_000;

    fn limiter(node: &str, replica: u64, clock: Arc<ManualClock>) -> Arc<Limiter> {
        let limiter = Limiter::new(LimiterOptions {
            node_id: node.to_owned(),
            replica: ReplicaId(replica),
            // Nothing refills within a test: 100 tokens an hour.
            default_rate: Rate::try_new(100, 3_600_000).unwrap(),
            clock,
            shards: 4,
            track_changes: false,
        });
        limiter
            .reload_policies(
                "policies:\n  extra:\n    capacity: 10\n    refill_interval_ms: 3600000\n",
            )
            .unwrap();
        Arc::new(limiter)
    }

    fn remaining(limiter: &Limiter, policy: &str, key: &str) -> u64 {
        limiter.peek(policy, key, 1).unwrap().0.outcome.remaining
    }

    struct Replica {
        limiter: Arc<Limiter>,
        snapshots: Arc<Snapshots>,
        remote: Remote,
        _dir: tempfile::TempDir,
    }

    fn replica(
        store: &Arc<InMemory>,
        node: &str,
        replica: u64,
        clock: &Arc<ManualClock>,
    ) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        Replica {
            limiter: limiter(node, replica, clock.clone()),
            snapshots: Arc::new(Snapshots::new(dir.path())),
            remote: Remote::with_store(store.clone(), "mem://", "dr/cluster", node, 3),
            _dir: dir,
        }
    }

    async fn keys(store: &InMemory, prefix: &str) -> Vec<String> {
        let prefix = Path::from(prefix);
        let mut names: Vec<String> = store
            .list(Some(&prefix))
            .map(|m| m.unwrap().location.to_string())
            .collect()
            .await;
        names.sort();
        names
    }

    #[tokio::test]
    async fn each_replica_ships_its_newest_snapshot_once_and_keeps_only_its_own_newest() {
        let store = Arc::new(InMemory::new());
        let clock = Arc::new(ManualClock::at(START));
        let a = replica(&store, "node-a", 1, &clock);
        let b = replica(&store, "node-b", 2, &clock);
        assert!(
            a.remote
                .upload_newest(&a.snapshots, &a.limiter)
                .await
                .unwrap()
                .is_none()
        );

        b.snapshots.write(&b.limiter).unwrap();
        b.remote
            .upload_newest(&b.snapshots, &b.limiter)
            .await
            .unwrap()
            .unwrap();
        for i in 0..5u64 {
            a.limiter.decide("default", "k", 1).unwrap();
            a.snapshots.write(&a.limiter).unwrap();
            let up = a
                .remote
                .upload_newest(&a.snapshots, &a.limiter)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(up.created_us, START + i * 1_000_000);
            assert_eq!(
                up.object,
                format!("dr/cluster/node-a/{:020}.ocs", START + i * 1_000_000)
            );
            // The same local snapshot is not shipped twice.
            assert!(
                a.remote
                    .upload_newest(&a.snapshots, &a.limiter)
                    .await
                    .unwrap()
                    .is_none()
            );
            clock.advance_us(1_000_000);
        }
        let names = keys(&store, "dr/cluster").await;
        let expected: Vec<String> = (2..5u64)
            .map(|i| format!("dr/cluster/node-a/{:020}.ocs", START + i * 1_000_000))
            .chain([format!("dr/cluster/node-b/{START:020}.ocs")])
            .collect();
        assert_eq!(names, expected);
        // The object is the local file, byte for byte.
        let newest = a.snapshots.list().unwrap()[0].clone();
        let object = store.get(&Path::from(expected[2].as_str())).await.unwrap();
        assert_eq!(
            object.bytes().await.unwrap().to_vec(),
            std::fs::read(newest).unwrap()
        );
        let text = a.limiter.render_metrics();
        assert!(
            text.contains("openclaw_snapshot_uploads_total{result=\"success\"} 5"),
            "{text}"
        );
        a.remote.publish_age(&a.limiter);
        assert!(
            a.limiter
                .render_metrics()
                .contains("openclaw_snapshot_remote_age_seconds 1")
        );
    }

    #[tokio::test]
    async fn a_damaged_local_snapshot_is_not_shipped_an_older_good_one_is() {
        let store = Arc::new(InMemory::new());
        let clock = Arc::new(ManualClock::at(START));
        let a = replica(&store, "node-a", 1, &clock);
        let good = a.snapshots.write(&a.limiter).unwrap();
        clock.advance_us(1_000);
        let bad = a.snapshots.write(&a.limiter).unwrap();
        let mut bytes = std::fs::read(&bad.path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&bad.path, bytes).unwrap();
        let up = a
            .remote
            .upload_newest(&a.snapshots, &a.limiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(up.created_us, good.created_us);
    }

    fn limiter_now(clock: &ManualClock) -> Micros {
        use crate::clock::Clock;
        clock.now()
    }

    /// A file of format version 1: the magic, then a version this build does not read.
    fn older_format(created: Micros) -> Vec<u8> {
        let mut bytes = crate::snapshot::MAGIC.to_vec();
        bytes.extend_from_slice(&1u16.to_le_bytes());
        bytes.extend_from_slice(&[0; 60]);
        let _ = created;
        bytes
    }

    #[tokio::test]
    async fn restore_merges_every_nodes_newest_valid_snapshot_and_skips_what_it_cannot_trust() {
        let store = Arc::new(InMemory::new());
        let clock = Arc::new(ManualClock::at(START));
        let a = replica(&store, "node-a", 1, &clock);
        let b = replica(&store, "node-b", 2, &clock);
        let c = replica(&store, "node-c", 3, &clock);
        a.limiter.decide("default", "alice", 30).unwrap();
        a.limiter.decide("extra", "x", 4).unwrap();
        b.limiter.decide("default", "bob", 20).unwrap();
        // node-a ships twice; its newest object is then damaged: the older one must be used.
        a.snapshots.write(&a.limiter).unwrap();
        a.remote
            .upload_newest(&a.snapshots, &a.limiter)
            .await
            .unwrap();
        clock.advance_us(1_000_000);
        a.limiter.decide("default", "alice", 5).unwrap();
        a.snapshots.write(&a.limiter).unwrap();
        let newest_a = a
            .remote
            .upload_newest(&a.snapshots, &a.limiter)
            .await
            .unwrap()
            .unwrap();
        let mut damaged = store
            .get(&Path::from(newest_a.object.as_str()))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec();
        damaged[100] ^= 0x40;
        store
            .put(&Path::from(newest_a.object.as_str()), damaged.into())
            .await
            .unwrap();
        b.snapshots.write(&b.limiter).unwrap();
        b.remote
            .upload_newest(&b.snapshots, &b.limiter)
            .await
            .unwrap();
        // node-c: its only object is in a format this build does not read.
        let c_object = format!("dr/cluster/node-c/{:020}.ocs", limiter_now(&clock));
        store
            .put(
                &Path::from(c_object.as_str()),
                older_format(limiter_now(&clock)).into(),
            )
            .await
            .unwrap();
        drop(c);
        // node-d: a snapshot from long ago, never downloaded.
        store
            .put(
                &Path::from("dr/cluster/node-d/00000000000000000001.ocs"),
                vec![1, 2, 3].into(),
            )
            .await
            .unwrap();
        // Not ours: ignored.
        store
            .put(&Path::from("dr/cluster/README"), vec![0].into())
            .await
            .unwrap();

        clock.advance_us(HOUR_US / 100);
        let fresh = limiter("node-new", 9, clock.clone());
        // Only `default` is left: the `extra` policy's bucket is dropped.
        fresh.reload_policies("policies: {}\n").unwrap();
        let remote = Remote::with_store(store.clone(), "mem://", "dr/cluster", "node-new", 3);
        let report = remote
            .restore(&fresh, Duration::from_secs(86_400))
            .await
            .unwrap();

        assert_eq!(report.nodes, 4);
        assert_eq!(report.ignored, 1);
        let merged: Vec<_> = report.merged.iter().map(|m| m.node_id.as_str()).collect();
        assert_eq!(merged, ["node-a", "node-b"]);
        let reasons: Vec<_> = report
            .rejected
            .iter()
            .map(|r| (r.object.as_str(), r.reason))
            .collect();
        assert_eq!(
            reasons,
            [
                (newest_a.object.as_str(), "checksum"),
                (c_object.as_str(), "unsupported_version"),
                ("dr/cluster/node-d/00000000000000000001.ocs", "too_old"),
            ]
        );
        assert_eq!(report.unknown_policies, ["extra"]);
        // node-a's older snapshot: alice had spent 30 (the 5 after it are lost), bob 20; one
        // token refilled in the 36 s that passed.
        assert_eq!(remaining(&fresh, "default", "alice"), 71);
        assert_eq!(remaining(&fresh, "default", "bob"), 81);
        let text = fresh.render_metrics();
        for line in [
            "openclaw_snapshot_remote_rejected_total{reason=\"checksum\"} 1",
            "openclaw_snapshot_remote_rejected_total{reason=\"unsupported_version\"} 1",
            "openclaw_snapshot_remote_rejected_total{reason=\"too_old\"} 1",
        ] {
            assert!(text.contains(line), "missing {line}:\n{text}");
        }
    }

    #[tokio::test]
    async fn an_object_whose_name_disagrees_with_its_header_is_not_trusted() {
        let store = Arc::new(InMemory::new());
        let clock = Arc::new(ManualClock::at(START));
        let a = replica(&store, "node-a", 1, &clock);
        a.limiter.decide("default", "k", 50).unwrap();
        let written = a.snapshots.write(&a.limiter).unwrap();
        // A valid snapshot renamed to look newer than it is.
        let renamed = format!("dr/cluster/node-a/{:020}.ocs", START + 5);
        store
            .put(
                &Path::from(renamed.as_str()),
                std::fs::read(written.path).unwrap().into(),
            )
            .await
            .unwrap();
        let fresh = limiter("node-new", 9, clock.clone());
        let remote = Remote::with_store(store.clone(), "mem://", "dr/cluster", "node-new", 3);
        let report = remote
            .restore(&fresh, Duration::from_secs(60))
            .await
            .unwrap();
        assert!(report.merged.is_empty());
        assert_eq!(report.rejected[0].reason, "name_mismatch");
        assert_eq!(remaining(&fresh, "default", "k"), 100);
    }

    /// An S3 endpoint on 127.0.0.1 that answers a listing of the bucket with `objects` (if
    /// any) and never answers anything else: it reads what it is sent and stays silent. It
    /// speaks just enough S3 for object_store's listing; it is not a double of S3.
    struct SilentS3 {
        addr: std::net::SocketAddr,
        gets: Arc<AtomicU64>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for SilentS3 {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn silent_s3(objects: Option<Vec<String>>) -> SilentS3 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gets = Arc::new(AtomicU64::new(0));
        let listing = objects.map(|keys| {
            let contents: String = keys
                .iter()
                .map(|k| {
                    format!(
                        "<Contents><Key>{k}</Key><LastModified>2024-01-01T00:00:00.000Z</LastModified>\
                         <ETag>\"e\"</ETag><Size>100</Size></Contents>"
                    )
                })
                .collect();
            let body = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListBucketResult><Name>b</Name>\
                 <IsTruncated>false</IsTruncated>{contents}</ListBucketResult>"
            );
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/xml\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
        });
        let task = tokio::spawn({
            let gets = gets.clone();
            async move {
                loop {
                    let Ok((mut socket, _)) = listener.accept().await else {
                        return;
                    };
                    let (gets, listing) = (gets.clone(), listing.clone());
                    tokio::spawn(async move {
                        let mut buf = Vec::new();
                        let mut chunk = [0u8; 4096];
                        loop {
                            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                                match socket.read(&mut chunk).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                                }
                                continue;
                            };
                            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                            buf.drain(..end + 4);
                            let line = head.lines().next().unwrap_or("");
                            match &listing {
                                Some(listing)
                                    if line.starts_with("GET ") && line.contains("list-type=2") =>
                                {
                                    if socket.write_all(listing.as_bytes()).await.is_err() {
                                        return;
                                    }
                                }
                                _ => {
                                    if line.starts_with("GET ") {
                                        gets.fetch_add(1, Ordering::SeqCst);
                                    }
                                    // Silent from here on: read until the client gives up.
                                    while matches!(socket.read(&mut chunk).await, Ok(n) if n > 0) {}
                                    return;
                                }
                            }
                        }
                    });
                }
            }
        });
        SilentS3 { addr, gets, task }
    }

    fn remote_at(server: &SilentS3, stall: Duration) -> Remote {
        // object_store's HTTP client needs a TLS provider even for http:// endpoints.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let builder = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(format!("http://{}", server.addr))
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id("test-key")
            .with_secret_access_key("test-secret");
        let location = RemoteLocation::parse("s3://b/dr").unwrap();
        let mut remote = Remote::s3(builder, &location, "node-a", 3).unwrap();
        remote.stall = stall;
        remote
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_that_never_answers_fails_a_restore_and_an_upload_within_their_deadlines() {
        let server = silent_s3(None).await;
        let stall = Duration::from_millis(300);
        let remote = remote_at(&server, stall);
        let clock = Arc::new(ManualClock::at(START));
        let fresh = limiter("node-new", 9, clock.clone());
        let began = Instant::now();
        let error = remote
            .restore(&fresh, Duration::from_secs(86_400))
            .await
            .unwrap_err();
        let took = began.elapsed();
        assert!(
            matches!(
                error,
                RemoteError::Timeout {
                    operation: "LIST",
                    ..
                }
            ),
            "{error}"
        );
        // Bounded by the stall timeout, not by the client's 30 s default or its retries.
        assert!(took >= stall && took < Duration::from_secs(5), "{took:?}");

        let a = replica(&Arc::new(InMemory::new()), "node-a", 1, &clock);
        a.limiter.decide("default", "k", 1).unwrap();
        a.snapshots.write(&a.limiter).unwrap();
        let began = Instant::now();
        let error = remote
            .upload_newest(&a.snapshots, &a.limiter)
            .await
            .unwrap_err();
        let took = began.elapsed();
        assert!(
            matches!(
                error,
                RemoteError::Timeout {
                    operation: "PUT",
                    ..
                }
            ),
            "{error}"
        );
        assert!(took >= stall && took < Duration::from_secs(5), "{took:?}");
        let text = a.limiter.render_metrics();
        assert!(
            text.contains("openclaw_snapshot_uploads_total{result=\"failure\"} 1"),
            "{text}"
        );

        // The offline restore reports the store, and writes nothing.
        let dir = tempfile::tempdir().unwrap();
        let into = dir.path().join("snapshots");
        let error = remote
            .restore_into_dir(&fresh, Duration::from_secs(60), &into, false, &mut |_| {})
            .await
            .unwrap_err();
        assert!(matches!(error, SeedError::Store { .. }), "{error}");
        assert!(!into.exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_download_that_stalls_ends_the_restore_instead_of_stalling_on_every_object() {
        let keys = ["node-a", "node-b", "node-c"]
            .map(|node| format!("dr/{node}/{START:020}.ocs"))
            .to_vec();
        let server = silent_s3(Some(keys.clone())).await;
        let remote = remote_at(&server, Duration::from_millis(300));
        let fresh = limiter("node-new", 9, Arc::new(ManualClock::at(START)));
        let mut events = Vec::new();
        let error = remote
            .restore_reporting(&fresh, Duration::from_secs(86_400), &mut |e| {
                events.push(format!("{e:?}"))
            })
            .await
            .unwrap_err();
        assert!(
            matches!(
                &error,
                RemoteError::Incomplete { merged: 0, nodes: 3, source }
                    if matches!(**source, RemoteError::Timeout { .. })
            ),
            "{error}"
        );
        assert_eq!(
            server.gets.load(Ordering::SeqCst),
            1,
            "one stall, not three"
        );
        assert_eq!(events.len(), 2, "{events:#?}");
        assert!(
            events[0].starts_with("Listed { objects: 3, nodes: 3"),
            "{events:#?}"
        );
        assert!(
            events[1].contains("unreadable") && events[1].contains(&keys[0]),
            "{events:#?}"
        );
    }

    #[tokio::test]
    async fn restore_into_dir_writes_one_verified_snapshot_that_a_replica_loads() {
        let store = Arc::new(InMemory::new());
        let clock = Arc::new(ManualClock::at(START));
        let a = replica(&store, "node-a", 1, &clock);
        let b = replica(&store, "node-b", 2, &clock);
        a.limiter.decide("default", "alice", 30).unwrap();
        a.limiter.decide("extra", "x", 4).unwrap();
        b.limiter.decide("default", "bob", 20).unwrap();
        for r in [&a, &b] {
            r.snapshots.write(&r.limiter).unwrap();
            r.remote
                .upload_newest(&r.snapshots, &r.limiter)
                .await
                .unwrap()
                .unwrap();
        }
        store
            .put(
                &Path::from(format!("dr/cluster/node-c/{START:020}.ocs").as_str()),
                older_format(START).into(),
            )
            .await
            .unwrap();

        // The configured policies: only `default`.
        let offline = limiter("restore", 7, clock.clone());
        offline.reload_policies("policies: {}\n").unwrap();
        let remote = Remote::with_store(store.clone(), "mem://", "dr/cluster", "restore", 1);
        let dir = tempfile::tempdir().unwrap();
        let into = dir.path().join("new/snapshots");
        let mut events = Vec::new();
        let seeded = remote
            .restore_into_dir(
                &offline,
                Duration::from_secs(86_400),
                &into,
                false,
                &mut |e| events.push(format!("{e:?}")),
            )
            .await
            .unwrap();
        assert_eq!(seeded.report.merged.len(), 2);
        assert_eq!(seeded.report.rejected[0].reason, "unsupported_version");
        assert_eq!(seeded.report.unknown_policies, ["extra"]);
        assert_eq!(seeded.buckets, 2, "alice and bob; extra's bucket dropped");
        assert_eq!(events.len(), 4, "listed, 2 merged, 1 rejected: {events:#?}");
        let files = Snapshots::new(&into).list().unwrap();
        assert_eq!(files, std::slice::from_ref(&seeded.written.path));
        let leftovers: Vec<_> = std::fs::read_dir(&into).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary or probe file left");

        // A replica started on the directory loads it.
        let node = limiter("node-new", 9, clock.clone());
        let report = Snapshots::new(&into).restore_latest(&node).unwrap();
        assert!(report.used.is_some());
        assert_eq!(remaining(&node, "default", "alice"), 70);
        assert_eq!(remaining(&node, "default", "bob"), 80);
        assert_eq!(remaining(&node, "extra", "x"), 10, "dropped, not restored");
    }

    #[tokio::test]
    async fn restore_into_dir_writes_nothing_it_should_not() {
        let store = Arc::new(InMemory::new());
        let clock = Arc::new(ManualClock::at(START));
        let a = replica(&store, "node-a", 1, &clock);
        a.limiter.decide("default", "alice", 30).unwrap();
        a.snapshots.write(&a.limiter).unwrap();
        a.remote
            .upload_newest(&a.snapshots, &a.limiter)
            .await
            .unwrap();
        let remote = Remote::with_store(store.clone(), "mem://", "dr/cluster", "restore", 1);
        let empty = Remote::with_store(store.clone(), "mem://", "dr/other", "restore", 1);
        let offline = || limiter("restore", 7, clock.clone());
        let max_age = Duration::from_secs(86_400);
        let dir = tempfile::tempdir().unwrap();

        // Nothing valid under the prefix: nothing written, not even the directory.
        let into = dir.path().join("a");
        let error = empty
            .restore_into_dir(&offline(), max_age, &into, false, &mut |_| {})
            .await
            .unwrap_err();
        assert!(
            matches!(error, SeedError::NothingValid { objects: 0, .. }),
            "{error}"
        );
        assert!(!into.exists());
        // Too old is nothing valid too.
        clock.advance_us(2 * HOUR_US);
        let error = remote
            .restore_into_dir(
                &offline(),
                Duration::from_secs(3600),
                &into,
                false,
                &mut |_| {},
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                error,
                SeedError::NothingValid {
                    objects: 1,
                    rejected: 1,
                    ..
                }
            ),
            "{error}"
        );
        assert!(!into.exists());

        // Not a directory: refused before the store is asked.
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        for target in [file.clone(), file.join("below")] {
            let mut asked = false;
            let error = remote
                .restore_into_dir(&offline(), max_age, &target, false, &mut |_| asked = true)
                .await
                .unwrap_err();
            assert!(matches!(error, SeedError::Target { .. }), "{error}");
            assert!(!asked, "the store was asked for an unusable target");
        }
        assert_eq!(std::fs::read(&file).unwrap(), b"x");

        // A directory that holds snapshots: refused without --force, unchanged.
        let seeded = remote
            .restore_into_dir(&offline(), max_age, &into, false, &mut |_| {})
            .await
            .unwrap();
        let before = std::fs::read(&seeded.written.path).unwrap();
        let error = remote
            .restore_into_dir(&offline(), max_age, &into, false, &mut |_| {})
            .await
            .unwrap_err();
        assert!(
            matches!(error, SeedError::NotEmpty { count: 1, .. }),
            "{error}"
        );
        assert_eq!(
            Snapshots::new(&into).list().unwrap(),
            std::slice::from_ref(&seeded.written.path)
        );
        assert_eq!(std::fs::read(&seeded.written.path).unwrap(), before);
        // With --force, the restored snapshot is the newest.
        let forced = remote
            .restore_into_dir(&offline(), max_age, &into, true, &mut |_| {})
            .await
            .unwrap();
        let files = Snapshots::new(&into).list().unwrap();
        assert_eq!(files, [forced.written.path.clone(), seeded.written.path]);

        // A directory a running replica holds: refused, with --force too, before the store is
        // asked. It reads snapshots only when it starts: one written under it now would be
        // ignored, then buried under its own.
        let running = crate::lineage::claim(&into, ReplicaId(0xabc)).unwrap();
        let mut asked = false;
        let error = remote
            .restore_into_dir(&offline(), max_age, &into, true, &mut |_| asked = true)
            .await
            .unwrap_err();
        assert!(matches!(error, SeedError::InUse { .. }), "{error}");
        assert!(!asked, "the store was asked for a directory in use");
        assert_eq!(Snapshots::new(&into).list().unwrap(), files);
        // Once it has stopped, --force restores into it again.
        drop(running);
        remote
            .restore_into_dir(&offline(), max_age, &into, true, &mut |_| {})
            .await
            .unwrap();
        assert_eq!(Snapshots::new(&into).list().unwrap().len(), 3);
    }

    #[test]
    fn only_s3_urls_with_a_bucket_are_accepted() {
        let l = RemoteLocation::parse("s3://bucket/a/b/").unwrap();
        assert_eq!((l.bucket.as_str(), l.prefix.as_str()), ("bucket", "a/b"));
        let l = RemoteLocation::parse("s3://bucket").unwrap();
        assert_eq!((l.bucket.as_str(), l.prefix.as_str()), ("bucket", ""));
        for (url, says) in [
            ("gs://b/p", "gs:// is not built in this binary"),
            ("azure://c/p", "Azure Blob Storage is not built in"),
            ("az://c/p", "Azure Blob Storage is not built in"),
            (
                "https://acct.blob.core.windows.net/c",
                "Azure Blob Storage is not built in",
            ),
        ] {
            let error = RemoteLocation::parse(url).unwrap_err().to_string();
            assert!(
                error.contains(says) && error.contains("only s3:// URLs are supported"),
                "{error}"
            );
        }
        for bad in ["s3://", "s3:///p", "bucket/p", "s3://b/a//c", "s3://b/../c"] {
            assert!(RemoteLocation::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn object_names_order_snapshots_and_nothing_else() {
        assert_eq!(parse_object_name(&object_name(42)), Some(42));
        for other in ["42", ".ocs", "4a.ocs", "42.ocs.tmp", "snapshot-42.ocs"] {
            assert_eq!(parse_object_name(other), None, "{other}");
        }
    }
}
