//! The prefix-state cache: the recurrent state (and next-token logits) after a token prefix.
//!
//! An RWKV state has the same size whatever the prefix length, so caching the state after a
//! 2,000-token system prompt costs exactly as much memory as after a 20-token one, and a request
//! that starts with that prefix skips reading it. Entries are keyed by their exact token
//! sequence; a lookup probes the prompt's prefixes at every length that has an entry, longest
//! first, so the number of probes is bounded by the number of distinct cached lengths.

use rwkv_core::model::State;
use std::collections::{BTreeMap, HashMap};

/// One cached prefix.
struct Entry {
    state: State,
    /// Next-token logits after the prefix, so that a prompt equal to the prefix needs no
    /// forward pass at all before its first sample.
    logits: Vec<f32>,
    /// Logical time of the last use (insert or hit), for LRU eviction.
    last_used: u64,
    /// Bytes charged against the budget.
    bytes: usize,
}

/// What a lookup found: the longest cached prefix of the prompt.
pub struct Hit {
    /// Prefix length in tokens (at least 1, at most the prompt's length).
    pub len: usize,
    /// A fork of the state after the prefix.
    pub state: State,
    /// Next-token logits after the prefix.
    pub logits: Vec<f32>,
}

/// An LRU map from token prefixes to states, bounded by a byte budget.
pub struct PrefixCache {
    budget: usize,
    bytes: usize,
    clock: u64,
    entries: HashMap<Vec<u32>, Entry>,
    /// How many entries have each prefix length: the lengths a lookup probes.
    lengths: BTreeMap<usize, usize>,
}

impl PrefixCache {
    /// An empty cache holding at most `budget` bytes of states, logits and keys (0 disables it).
    pub fn new(budget: usize) -> Self {
        PrefixCache {
            budget,
            bytes: 0,
            clock: 0,
            entries: HashMap::new(),
            lengths: BTreeMap::new(),
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes held (states, logits and keys).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The longest cached prefix of `tokens` (possibly all of them), forked, or `None`.
    pub fn lookup(&mut self, tokens: &[u32]) -> Option<Hit> {
        if tokens.is_empty() {
            // (`range(1..=0)` would panic.)
            return None;
        }
        let len = self
            .lengths
            .range(1..=tokens.len())
            .rev()
            .map(|(&len, _)| len)
            .find(|&len| self.entries.contains_key(&tokens[..len]))?;
        self.clock += 1;
        let e = self.entries.get_mut(&tokens[..len])?;
        e.last_used = self.clock;
        Some(Hit {
            len,
            state: e.state.clone(),
            logits: e.logits.clone(),
        })
    }

    /// Stores a copy of `state` and `logits` under `tokens`, evicting least recently used
    /// entries to stay within the budget. An existing entry is only marked as used: the same
    /// prefix always yields the same state.
    pub fn insert(&mut self, tokens: &[u32], state: &State, logits: &[f32]) {
        if tokens.is_empty() {
            return;
        }
        self.clock += 1;
        if let Some(e) = self.entries.get_mut(tokens) {
            e.last_used = self.clock;
            return;
        }
        let bytes = state.bytes() + std::mem::size_of_val(logits) + std::mem::size_of_val(tokens);
        if bytes > self.budget {
            return;
        }
        while self.bytes + bytes > self.budget {
            self.evict_one();
        }
        self.entries.insert(
            tokens.to_vec(),
            Entry {
                state: state.clone(),
                logits: logits.to_vec(),
                last_used: self.clock,
                bytes,
            },
        );
        *self.lengths.entry(tokens.len()).or_insert(0) += 1;
        self.bytes += bytes;
    }

    /// Drops the least recently used entry. A linear scan: entries are few (each one is a
    /// whole model state), and eviction happens at most once per insert.
    fn evict_one(&mut self) {
        let Some(key) = self
            .entries
            .iter()
            .min_by_key(|(_, e)| e.last_used)
            .map(|(k, _)| k.clone())
        else {
            return;
        };
        if let Some(e) = self.entries.remove(&key) {
            self.bytes -= e.bytes;
            if let Some(n) = self.lengths.get_mut(&key.len()) {
                *n -= 1;
                if *n == 0 {
                    self.lengths.remove(&key.len());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rwkv_core::model::Model;

    /// A state of the fixture model, marked so that tests can tell states apart.
    fn state(mark: f32) -> State {
        thread_local! {
            static MODEL: Model = Model::load(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../tests/fixtures/v7/model.safetensors"
            ))
            .expect("fixture model");
        }
        let mut s = MODEL.with(|m| m.new_state());
        s.tensor_mut(0)[0] = mark;
        s
    }

    #[test]
    fn longest_prefix_wins_and_exact_match_counts() {
        let mut c = PrefixCache::new(1 << 20);
        c.insert(&[1, 2], &state(2.0), &[0.5]);
        c.insert(&[1, 2, 3, 4], &state(4.0), &[0.25]);
        let h = c.lookup(&[1, 2, 3, 4, 5]).unwrap();
        assert_eq!((h.len, h.state.tensor(0)[0]), (4, 4.0));
        let h = c.lookup(&[1, 2, 3, 4]).unwrap();
        assert_eq!((h.len, h.logits[0]), (4, 0.25));
        let h = c.lookup(&[1, 2, 3]).unwrap();
        assert_eq!(h.len, 2);
        assert!(c.lookup(&[2, 1]).is_none());
        assert!(c.lookup(&[1]).is_none());
        assert!(c.lookup(&[]).is_none());
    }

    #[test]
    fn lru_eviction_stays_within_budget() {
        let one = state(0.0).bytes() + 4 + 4;
        let mut c = PrefixCache::new(2 * one);
        c.insert(&[1], &state(1.0), &[0.0]);
        c.insert(&[2], &state(2.0), &[0.0]);
        assert!(c.lookup(&[1]).is_some()); // [2] is now the least recently used
        c.insert(&[3], &state(3.0), &[0.0]);
        assert_eq!(c.len(), 2);
        assert!(c.bytes() <= 2 * one);
        assert!(c.lookup(&[2]).is_none());
        assert!(c.lookup(&[1]).is_some() && c.lookup(&[3]).is_some());
    }

    #[test]
    fn zero_budget_disables() {
        let mut c = PrefixCache::new(0);
        c.insert(&[1], &state(1.0), &[0.0]);
        assert!(c.is_empty() && c.lookup(&[1]).is_none());
    }
}
