//! What a replica publishes about its demand: the tokens of each strict policy it was asked for
//! (admitted or not) over the last demand window, counted in slots so the window slides.
//!
//! A count, not a rate over the last slot: the proposer needs to know how much a figure can be
//! trusted. Over one 500 ms slot a client at 10 requests/s spread over three replicas shows
//! each of them 0 to 4 requests, and shares that followed those figures jumped between the 2 %
//! floor and 96 % every second (docs/crdt.md, "strict mode", utilization). The counting noise of
//! a count `c` is about `√c`, which is what the proposer weighs a share's move against; `c`
//! counts requests, not tokens: a client whose requests cost 5 tokens each makes a count of
//! tokens five times as lumpy, and shares that read its noise as demand moved 40 times in two
//! minutes (escrow/tests.rs, `half_bucket_requests`).
//!
//! Pure: time is an argument.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::bucket::Micros;

/// Tokens and requests asked per policy name.
type Counts = HashMap<String, Asked>;

/// What a replica was asked for, of one policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Asked {
    pub tokens: u64,
    pub requests: u64,
}

#[derive(Debug, Clone)]
pub struct DemandMeter {
    window_us: Micros,
    slot_us: Micros,
    /// Closed slots, oldest first: when each ended, and what it counted.
    closed: VecDeque<(Micros, Counts)>,
    /// The open slot: when it started, and what it has counted.
    open: (Micros, Counts),
}

impl DemandMeter {
    /// Count over the last `window_us`, publishing every `slot_us`.
    pub fn new(now: Micros, window_us: Micros, slot_us: Micros) -> Self {
        Self {
            window_us,
            slot_us: slot_us.max(1),
            closed: VecDeque::new(),
            open: (now, HashMap::new()),
        }
    }

    /// One request for `tokens` of `policy`.
    pub fn record(&mut self, policy: &str, tokens: u64) {
        let count = match self.open.1.get_mut(policy) {
            Some(count) => count,
            None => self.open.1.entry(policy.to_owned()).or_default(),
        };
        count.tokens = count.tokens.saturating_add(tokens);
        count.requests = count.requests.saturating_add(1);
    }

    /// Once a slot has passed: close it, and return what was asked per policy over the slots
    /// that end within the last window (policies asked for nothing are left out).
    pub fn publish_if_due(&mut self, now: Micros) -> Option<BTreeMap<String, Asked>> {
        if now.saturating_sub(self.open.0) < self.slot_us {
            return None;
        }
        let counted = std::mem::take(&mut self.open.1);
        self.closed.push_back((now, counted));
        self.open.0 = now;
        // A slot is in the window while it ends within it: the window spans at most one slot
        // more than `window_us`, never less (once the meter is that old).
        let horizon = now.saturating_sub(self.window_us);
        while self.closed.front().is_some_and(|&(end, _)| end <= horizon) {
            self.closed.pop_front();
        }
        let mut total: BTreeMap<String, Asked> = BTreeMap::new();
        for (_, counts) in &self.closed {
            for (policy, asked) in counts {
                let sum = total.entry(policy.clone()).or_default();
                sum.tokens = sum.tokens.saturating_add(asked.tokens);
                sum.requests = sum.requests.saturating_add(asked.requests);
            }
        }
        total.retain(|_, asked| asked.requests > 0);
        Some(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Micros = 1_000;

    #[test]
    fn demand_is_the_tokens_asked_over_the_last_window_published_once_a_slot() {
        let mut meter = DemandMeter::new(0, 2_000 * MS, 500 * MS);
        meter.record("p", 3);
        assert_eq!(meter.publish_if_due(400 * MS), None, "not a slot yet");
        meter.record("p", 2);
        meter.record("q", 1);
        let first = meter.publish_if_due(500 * MS).unwrap();
        let asked = |tokens, requests| Asked { tokens, requests };
        assert_eq!(
            first,
            BTreeMap::from([("p".into(), asked(5, 2)), ("q".into(), asked(1, 1))])
        );
        // Three more slots with one token of p each: the window now holds all four.
        for slot in 2..=4 {
            meter.record("p", 1);
            meter.publish_if_due(slot * 500 * MS).unwrap();
        }
        meter.record("p", 1);
        // At 2.5 s the first slot (ended at 0.5 s) has left the 2 s window.
        let later = meter.publish_if_due(2_500 * MS).unwrap();
        assert_eq!(later, BTreeMap::from([("p".into(), asked(4, 4))]));
        // Nothing asked for a whole window: nothing published.
        for slot in 6..=10 {
            meter.publish_if_due(slot * 500 * MS).unwrap();
        }
        assert_eq!(meter.publish_if_due(5_500 * MS), Some(BTreeMap::new()));
    }
}
