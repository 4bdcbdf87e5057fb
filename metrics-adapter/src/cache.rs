//! A small TTL cache with single flight: concurrent lookups of one key share one fetch.
//!
//! Every HPA syncs every 15 s, and several HPAs (or one HPA with two metrics) tend to sync
//! together; without this each would send its own identical query. A fresh value is reused for
//! the rule's TTL; a fetch in flight is joined by later callers; errors are shared only with the
//! callers that were already waiting (never cached), so recovery is immediate. The map is
//! bounded: when full, expired entries are dropped, and if it is still full the value is
//! fetched without being cached.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::Result;

/// How a lookup was satisfied (the `result` label of the cache metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// A fresh cached value.
    Hit,
    /// This caller started the fetch.
    Miss,
    /// Joined a fetch another caller had started.
    Coalesced,
}

impl Lookup {
    pub fn as_str(self) -> &'static str {
        match self {
            Lookup::Hit => "hit",
            Lookup::Miss => "miss",
            Lookup::Coalesced => "coalesced",
        }
    }
}

struct Slot<V> {
    ttl: Duration,
    cell: OnceCell<(Result<V>, Instant)>,
}

impl<V> Slot<V> {
    fn new(ttl: Duration) -> Self {
        Slot {
            ttl,
            cell: OnceCell::new(),
        }
    }

    /// In flight, or holding a value younger than its TTL.
    fn usable(&self, now: Instant) -> bool {
        match self.cell.get() {
            None => true,
            Some((Ok(_), at)) => now.duration_since(*at) < self.ttl,
            Some((Err(_), _)) => false,
        }
    }
}

/// Keyed single-flight TTL cache.
pub struct Cache<V> {
    slots: Mutex<HashMap<String, Arc<Slot<V>>>>,
    max_entries: usize,
}

impl<V> std::fmt::Debug for Cache<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("max_entries", &self.max_entries)
            .finish_non_exhaustive()
    }
}

impl<V: Clone> Cache<V> {
    pub fn new(max_entries: usize) -> Self {
        Cache {
            slots: Mutex::new(HashMap::new()),
            max_entries: max_entries.max(1),
        }
    }

    /// The cached value for `key`, or the result of `fetch` (run at most once at a time per key).
    pub async fn get_or_fetch<F, Fut>(
        &self,
        key: &str,
        ttl: Duration,
        fetch: F,
    ) -> (Result<V>, Lookup)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V>>,
    {
        let now = Instant::now();
        let (slot, lookup) = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            match slots.get(key) {
                Some(slot) if slot.usable(now) => {
                    let lookup = if slot.cell.initialized() {
                        Lookup::Hit
                    } else {
                        Lookup::Coalesced
                    };
                    (slot.clone(), lookup)
                }
                _ => {
                    let slot = Arc::new(Slot::new(ttl));
                    if slots.len() >= self.max_entries {
                        slots.retain(|_, s| s.usable(now));
                    }
                    if slots.len() < self.max_entries || slots.contains_key(key) {
                        slots.insert(key.to_owned(), slot.clone());
                    }
                    (slot, Lookup::Miss)
                }
            }
        };
        let (result, _) = slot
            .cell
            .get_or_init(|| async {
                let r = fetch().await;
                (r, Instant::now())
            })
            .await;
        (result.clone(), lookup)
    }

    /// Entries currently held (for tests and debugging).
    pub fn len(&self) -> usize {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::Error;

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_lookups_costs_one_fetch() {
        let cache = Arc::new(Cache::<u32>::new(16));
        let fetches = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (cache, fetches) = (cache.clone(), fetches.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_fetch("k", Duration::from_secs(5), || async {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok(7)
                    })
                    .await
            }));
        }
        let mut lookups = Vec::new();
        for t in tasks {
            let (v, l) = t.await.unwrap();
            assert_eq!(v.unwrap(), 7);
            lookups.push(l);
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        assert_eq!(lookups.iter().filter(|l| **l == Lookup::Miss).count(), 1);
        assert_eq!(
            lookups.iter().filter(|l| **l == Lookup::Coalesced).count(),
            19
        );
    }

    #[tokio::test(start_paused = true)]
    async fn values_expire_after_their_ttl() {
        let cache = Cache::<u32>::new(16);
        let ttl = Duration::from_secs(5);
        let (_, l) = cache.get_or_fetch("k", ttl, || async { Ok(1) }).await;
        assert_eq!(l, Lookup::Miss);
        tokio::time::advance(Duration::from_secs(4)).await;
        let (v, l) = cache.get_or_fetch("k", ttl, || async { Ok(2) }).await;
        assert_eq!((v.unwrap(), l), (1, Lookup::Hit));
        tokio::time::advance(Duration::from_secs(2)).await;
        let (v, l) = cache.get_or_fetch("k", ttl, || async { Ok(3) }).await;
        assert_eq!((v.unwrap(), l), (3, Lookup::Miss));
    }

    #[tokio::test(start_paused = true)]
    async fn errors_are_never_served_from_the_cache() {
        let cache = Cache::<u32>::new(16);
        let ttl = Duration::from_secs(5);
        let (v, _) = cache
            .get_or_fetch("k", ttl, || async { Err(Error::Prometheus("down".into())) })
            .await;
        assert!(v.is_err());
        let (v, l) = cache.get_or_fetch("k", ttl, || async { Ok(9) }).await;
        assert_eq!((v.unwrap(), l), (9, Lookup::Miss));
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_ttl_still_coalesces_but_never_reuses() {
        let cache = Cache::<u32>::new(16);
        let (_, l1) = cache
            .get_or_fetch("k", Duration::ZERO, || async { Ok(1) })
            .await;
        let (v, l2) = cache
            .get_or_fetch("k", Duration::ZERO, || async { Ok(2) })
            .await;
        assert_eq!((l1, l2, v.unwrap()), (Lookup::Miss, Lookup::Miss, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn the_map_stays_bounded_under_many_distinct_keys() {
        let cache = Cache::<u32>::new(8);
        for i in 0..100 {
            let (v, _) = cache
                .get_or_fetch(&format!("k{i}"), Duration::from_secs(60), || async move {
                    Ok(i)
                })
                .await;
            assert_eq!(v.unwrap(), i);
        }
        assert!(cache.len() <= 8);
    }
}
