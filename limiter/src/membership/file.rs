//! The `file` source: `OPENCLAW_PEERS_FILE`, one `host:port` per line, for replicas run outside
//! Kubernetes (VMs, systemd units, Nomad, the local stack) by whatever rewrites the file when
//! the set of replicas changes (a config-management run, a Nomad template, `openclaw-stack`).
//!
//! Like Prometheus' `file_sd`, the file is polled and a file that does not parse changes
//! nothing: the last good set stays (and the problem shows in `/status` and the log) until the
//! file is fixed. Polling, not file events: editors and Kubernetes ConfigMaps replace files by
//! renaming, which event watchers miss. Names in the file are resolved through DNS as
//! `OPENCLAW_PEERS` entries are ([`StaticSource`]): at once when the file changes, and every
//! refresh otherwise.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use super::dns::{Resolver, StaticSource};
use super::{Outcome, check_host_port};

/// How often the file itself is read (its names are re-resolved every refresh): a changed
/// file is followed within this time.
pub const FILE_POLL: Duration = Duration::from_secs(1);

/// The entries of a peers file, in file order, or every problem found, each with its line.
///
/// A line is `host:port`, optionally followed by a `#` comment; blank lines and lines holding
/// only a comment are skipped. An entry listed twice is an error (a generator that writes the
/// same replica twice is probably writing something else wrong too).
pub fn parse_peers_file(text: &str) -> Result<Vec<String>, Vec<String>> {
    let mut entries: Vec<String> = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let entry = line
            .split_once('#')
            .map_or(line, |(before, _)| before)
            .trim();
        if entry.is_empty() {
            continue;
        }
        if entry.contains(char::is_whitespace) || entry.contains(',') {
            errors.push(format!(
                "line {n} ({entry:?}): one host:port per line (no commas or spaces)"
            ));
        } else if let Err(e) = check_host_port(entry) {
            errors.push(format!("line {n} ({entry:?}): {e}"));
        } else if entries.iter().any(|seen| seen == entry) {
            errors.push(format!("line {n} ({entry:?}) is listed twice"));
        } else {
            entries.push(entry.to_owned());
        }
    }
    if errors.is_empty() {
        Ok(entries)
    } else {
        Err(errors)
    }
}

/// Read and parse the file now: the start-up check, so that a wrong path or a broken file is a
/// configuration error rather than a replica that quietly runs alone.
pub fn check_peers_file(path: &Path) -> Result<Vec<String>, Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![format!(
            "OPENCLAW_PEERS_FILE={}: cannot read it: {e}",
            path.display()
        )]
    })?;
    parse_peers_file(&text).map_err(|problems| {
        problems
            .into_iter()
            .map(|p| format!("OPENCLAW_PEERS_FILE={}: {p}", path.display()))
            .collect()
    })
}

/// The file, its last good contents and their addresses.
#[derive(Debug)]
pub(super) struct FileSource {
    path: PathBuf,
    resolver: Resolver,
    /// Names are resolved again after this long even if the file did not change.
    resolve_every: Duration,
    /// The last text that parsed, and the source resolving its entries.
    good: Option<(String, StaticSource)>,
    /// The last text that did not parse, and why (reported again on every poll while it stays).
    rejected: Option<(String, String)>,
    /// What resolving the good entries gave last, and when.
    resolved: Option<(Instant, Outcome)>,
}

impl FileSource {
    pub(super) fn new(path: PathBuf, resolver: Resolver, resolve_every: Duration) -> Self {
        Self {
            path,
            resolver,
            resolve_every,
            good: None,
            rejected: None,
            resolved: None,
        }
    }

    pub(super) async fn refresh(&mut self) -> Outcome {
        let file_error = match tokio::fs::read_to_string(&self.path).await {
            Err(e) => Some(format!(
                "cannot read the peers file {}: {e}",
                self.path.display()
            )),
            Ok(text) => self.take(text),
        };
        let due = match &self.resolved {
            None => true,
            Some((at, _)) => at.elapsed() >= self.resolve_every,
        };
        if let Some((_, source)) = &mut self.good
            && due
        {
            let outcome = source.refresh().await;
            self.resolved = Some((Instant::now(), outcome));
        }
        let resolved = self.resolved.as_ref().map(|(_, outcome)| outcome);
        let errors: Vec<&str> = file_error
            .as_deref()
            .into_iter()
            .chain(resolved.and_then(|o| o.error.as_deref()))
            .collect();
        Outcome {
            // Before the first good file there is nothing to publish; after it, its set.
            addrs: resolved.and_then(|o| o.addrs.clone()),
            error: (!errors.is_empty()).then(|| errors.join("; ")),
        }
    }

    /// Take the file's current text: a new good text replaces the entries (resolved at once);
    /// a bad one is reported and changes nothing. Returns the file's problem, if any.
    fn take(&mut self, text: String) -> Option<String> {
        if self.good.as_ref().is_some_and(|(good, _)| *good == text) {
            self.rejected = None;
            return None;
        }
        if let Some((bad, why)) = &self.rejected
            && *bad == text
        {
            return Some(why.clone());
        }
        match parse_peers_file(&text) {
            Ok(entries) => {
                self.good = Some((text, StaticSource::new(entries, self.resolver.clone())));
                self.rejected = None;
                self.resolved = None;
                None
            }
            Err(problems) => {
                let why = format!(
                    "peers file {} rejected, keeping the last good peers: {}",
                    self.path.display(),
                    problems.join("; ")
                );
                self.rejected = Some((text, why.clone()));
                Some(why)
            }
        }
    }
}
