//! A set of targets that changes while a run goes on, as a Kubernetes Service's endpoints
//! follow the ready pods: whoever manages the replicas ([`Endpoints::set`]) says which are
//! ready, and each request goes to one of those listed at the moment it leaves.
//!
//! Every target ever listed keeps its number for the whole run (the order in which it was first
//! listed), so the summary's per-target counts stay meaningful when a replica leaves and a new
//! one, at a new address, comes in. A fixed plan ([`Plan::targets`](crate::Plan)) is the same
//! thing set once.

use std::sync::{Arc, Mutex, RwLock};

use crate::plan::loopback_base;
use crate::{Error, Result};

/// Most distinct targets one [`Endpoints`] will ever list: the per-target counters are
/// allocated up front so that recording a request takes no lock.
pub const MAX_TARGETS: usize = 256;

/// The targets requests go to now; cheap to clone (one shared set).
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Every base URL ever listed; the index is the target's number.
    known: Mutex<Vec<String>>,
    /// The targets listed now: (number, base URL).
    current: RwLock<Arc<Vec<(usize, String)>>>,
}

impl Endpoints {
    /// An empty set: requests sent before anything is listed fail as `connect` errors (as
    /// connecting to a Service without ready endpoints does).
    pub fn new() -> Endpoints {
        Endpoints::default()
    }

    /// A set holding `targets` (validated as [`Endpoints::set`] does).
    pub fn with(targets: &[String]) -> Result<Endpoints> {
        let e = Endpoints::new();
        e.set(targets)?;
        Ok(e)
    }

    /// Replaces the listed targets. Each must be a loopback base URL; refused, with the set
    /// unchanged, if one is not or if more than [`MAX_TARGETS`] distinct ones would have been
    /// listed over the set's life.
    pub fn set(&self, targets: &[String]) -> Result<()> {
        let mut problems = Vec::new();
        let mut bases = Vec::new();
        for t in targets {
            match loopback_base(t) {
                Ok(b) => {
                    if !bases.contains(&b) {
                        bases.push(b);
                    }
                }
                Err(e) => problems.push(e),
            }
        }
        if !problems.is_empty() {
            return Err(Error::InvalidPlan(problems));
        }
        let mut known = self.inner.known.lock().unwrap_or_else(|p| p.into_inner());
        let new = bases.iter().filter(|b| !known.contains(b)).count();
        if known.len() + new > MAX_TARGETS {
            return Err(Error::InvalidPlan(vec![format!(
                "more than {MAX_TARGETS} distinct targets over one run"
            )]));
        }
        let mut listed = Vec::with_capacity(bases.len());
        for b in bases {
            let index = match known.iter().position(|k| *k == b) {
                Some(i) => i,
                None => {
                    known.push(b.clone());
                    known.len() - 1
                }
            };
            listed.push((index, b));
        }
        *self
            .inner
            .current
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(listed);
        Ok(())
    }

    /// The base URLs listed now.
    pub fn current(&self) -> Vec<String> {
        self.view().iter().map(|(_, b)| b.clone()).collect()
    }

    /// Every base URL ever listed, by number.
    pub fn known(&self) -> Vec<String> {
        self.inner
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The listed targets with their numbers (one read lock, one reference count).
    pub(crate) fn view(&self) -> Arc<Vec<(usize, String)>> {
        self.inner
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_keeps_its_number_when_it_leaves_and_comes_back() {
        let e =
            Endpoints::with(&["http://127.0.0.1:1".into(), "http://127.0.0.1:2/".into()]).unwrap();
        e.set(&["http://127.0.0.1:2".into(), "http://127.0.0.1:3".into()])
            .unwrap();
        e.set(&["http://127.0.0.1:1".into()]).unwrap();
        assert_eq!(e.current(), ["http://127.0.0.1:1"]);
        assert_eq!(
            e.known(),
            [
                "http://127.0.0.1:1",
                "http://127.0.0.1:2",
                "http://127.0.0.1:3"
            ]
        );
        assert_eq!(e.view()[0].0, 0);
    }

    #[test]
    fn a_non_loopback_target_is_refused_and_the_set_unchanged() {
        let e = Endpoints::with(&["http://127.0.0.1:1".into()]).unwrap();
        assert!(
            e.set(&["http://127.0.0.1:2".into(), "http://10.0.0.1:80".into()])
                .is_err()
        );
        assert_eq!(e.current(), ["http://127.0.0.1:1"]);
        assert_eq!(e.known().len(), 1);
    }
}
