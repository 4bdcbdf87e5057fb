//! A small bounded TTL map for TokenReview and SubjectAccessReview answers.
//!
//! Keys are 32-byte digests (never a token itself). Time is passed in (`*_at(now)`), so the
//! expiry rules are tested without clocks. Bounded: an attacker sending random tokens cannot
//! grow it past `capacity`; when full, expired entries go first, then the one closest to expiry.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A cache key: a digest of everything the answer depends on.
pub(crate) type Key = [u8; 32];

#[derive(Debug)]
pub(crate) struct TtlCache<V> {
    entries: Mutex<HashMap<Key, (Instant, V)>>,
    capacity: usize,
}

impl<V: Clone> TtlCache<V> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    /// The value stored for `key` unless it expired by `now`.
    pub(crate) fn get_at(&self, key: &Key, now: Instant) -> Option<V> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        match entries.get(key) {
            Some((expires, value)) if *expires > now => Some(value.clone()),
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        }
    }

    /// Stores `value` until `now + ttl`. A zero TTL stores nothing (caching disabled).
    pub(crate) fn insert_at(&self, key: Key, value: V, ttl: Duration, now: Instant) {
        if ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= self.capacity && !entries.contains_key(&key) {
            entries.retain(|_, (expires, _)| *expires > now);
            if entries.len() >= self.capacity {
                let soonest = entries
                    .iter()
                    .min_by_key(|(_, (expires, _))| *expires)
                    .map(|(k, _)| *k);
                if let Some(soonest) = soonest {
                    entries.remove(&soonest);
                }
            }
        }
        entries.insert(key, (now + ttl, value));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(10);

    #[test]
    fn value_is_served_until_its_ttl_ends_and_not_after() {
        let cache = TtlCache::new(8);
        let t0 = Instant::now();
        cache.insert_at([1; 32], "alice", TTL, t0);
        assert_eq!(
            cache.get_at(&[1; 32], t0 + Duration::from_secs(9)),
            Some("alice")
        );
        assert_eq!(cache.get_at(&[1; 32], t0 + TTL), None);
        assert_eq!(cache.len(), 0, "an expired entry is dropped when read");
    }

    #[test]
    fn zero_ttl_disables_caching() {
        let cache = TtlCache::new(8);
        let t0 = Instant::now();
        cache.insert_at([1; 32], 1, Duration::ZERO, t0);
        assert_eq!(cache.get_at(&[1; 32], t0), None);
    }

    #[test]
    fn a_full_cache_drops_expired_entries_first_then_the_soonest_to_expire() {
        let cache = TtlCache::new(2);
        let t0 = Instant::now();
        cache.insert_at([1; 32], 1, Duration::from_secs(1), t0);
        cache.insert_at([2; 32], 2, Duration::from_secs(100), t0);
        // [1] has expired at t0+5: it goes, [2] stays.
        cache.insert_at([3; 32], 3, TTL, t0 + Duration::from_secs(5));
        assert_eq!(cache.get_at(&[2; 32], t0 + Duration::from_secs(5)), Some(2));
        assert_eq!(cache.get_at(&[3; 32], t0 + Duration::from_secs(5)), Some(3));
        // Nothing expired: the one closest to expiry ([3] at t0+15) makes room.
        cache.insert_at([4; 32], 4, TTL, t0 + Duration::from_secs(6));
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get_at(&[3; 32], t0 + Duration::from_secs(6)), None);
        assert_eq!(cache.get_at(&[2; 32], t0 + Duration::from_secs(6)), Some(2));
        assert_eq!(cache.get_at(&[4; 32], t0 + Duration::from_secs(6)), Some(4));
    }
}
