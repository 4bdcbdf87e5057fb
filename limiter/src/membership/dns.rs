//! The `static` and `dns` sources: names resolved through the system resolver on every refresh.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use super::Outcome;

type LookupFuture = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>>;
type LookupFn = dyn Fn(String) -> LookupFuture + Send + Sync;

/// Resolves `host:port` to addresses, within a time limit. The system resolver in production;
/// tests substitute a scripted one to make a name fail after it has resolved.
#[derive(Clone)]
pub(super) struct Resolver {
    lookup: Arc<LookupFn>,
    timeout: Duration,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Resolver {
    /// `getaddrinfo` through `tokio::net::lookup_host` (honours /etc/hosts and the pod's
    /// search domains, as every other program in the container does).
    pub(super) fn system(timeout: Duration) -> Self {
        Self {
            lookup: Arc::new(|name: String| {
                Box::pin(async move { Ok(tokio::net::lookup_host(name).await?.collect()) })
            }),
            timeout,
        }
    }

    #[cfg(test)]
    pub(super) fn scripted(
        timeout: Duration,
        lookup: impl Fn(&str) -> io::Result<Vec<SocketAddr>> + Send + Sync + 'static,
    ) -> Self {
        let lookup = Arc::new(lookup);
        Self {
            lookup: Arc::new(move |name: String| {
                let result = lookup(&name);
                Box::pin(async move { result })
            }),
            timeout,
        }
    }

    /// Every address of `name`; no address at all is an error too (nothing to dial).
    async fn resolve(&self, name: &str) -> Result<Vec<SocketAddr>, String> {
        // An IP literal needs no resolver: it works even when DNS is down.
        if let Ok(addr) = name.parse::<SocketAddr>() {
            return Ok(vec![addr]);
        }
        match tokio::time::timeout(self.timeout, (self.lookup)(name.to_owned())).await {
            Err(_) => Err(format!(
                "cannot resolve {name}: no answer within {} ms",
                self.timeout.as_millis()
            )),
            Ok(Err(e)) => Err(format!("cannot resolve {name}: {e}")),
            Ok(Ok(addrs)) if addrs.is_empty() => Err(format!("{name} resolved to no address")),
            Ok(Ok(addrs)) => Ok(addrs),
        }
    }
}

/// `OPENCLAW_PEERS`: each entry resolved on every refresh. An entry that fails keeps the
/// addresses it resolved to last (none if it never resolved); the others are unaffected.
#[derive(Debug)]
pub(super) struct StaticSource {
    entries: Vec<String>,
    last: HashMap<String, Vec<SocketAddr>>,
    resolver: Resolver,
}

impl StaticSource {
    pub(super) fn new(entries: Vec<String>, resolver: Resolver) -> Self {
        Self {
            entries,
            last: HashMap::new(),
            resolver,
        }
    }

    pub(super) async fn refresh(&mut self) -> Outcome {
        // Concurrently, so one slow name costs one timeout, not one per entry.
        let mut lookups = tokio::task::JoinSet::new();
        for (i, entry) in self.entries.iter().enumerate() {
            let resolver = self.resolver.clone();
            let entry = entry.clone();
            lookups.spawn(async move { (i, resolver.resolve(&entry).await) });
        }
        let mut results: Vec<Option<Result<Vec<SocketAddr>, String>>> =
            vec![None; self.entries.len()];
        while let Some(joined) = lookups.join_next().await {
            if let Ok((i, result)) = joined {
                results[i] = Some(result);
            }
        }
        let mut addrs = Vec::new();
        let mut errors = Vec::new();
        for (entry, result) in self.entries.iter().zip(results) {
            match result
                .unwrap_or_else(|| Err(format!("cannot resolve {entry}: lookup task failed")))
            {
                Ok(resolved) => {
                    addrs.extend_from_slice(&resolved);
                    self.last.insert(entry.clone(), resolved);
                }
                Err(e) => {
                    if let Some(previous) = self.last.get(entry) {
                        addrs.extend_from_slice(previous);
                    }
                    errors.push(e);
                }
            }
        }
        Outcome {
            addrs: Some(addrs),
            error: (!errors.is_empty()).then(|| errors.join("; ")),
        }
    }
}

/// `OPENCLAW_PEER_DNS`: one name whose every address is a peer. A failed lookup says nothing
/// about the peers, so the last set stays.
#[derive(Debug)]
pub(super) struct DnsSource {
    name: String,
    resolver: Resolver,
}

impl DnsSource {
    pub(super) fn new(name: String, resolver: Resolver) -> Self {
        Self { name, resolver }
    }

    pub(super) async fn refresh(&mut self) -> Outcome {
        match self.resolver.resolve(&self.name).await {
            Ok(addrs) => Outcome::ok(addrs),
            Err(e) => Outcome::failed(e),
        }
    }
}
