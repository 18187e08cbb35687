//! The set of addresses a node name stands for, one connection each, and the round-robin
//! choice among the usable ones. Pure bookkeeping: no sockets, no DNS, so it is tested alone.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Entries keyed by address (`K`), each with its connection (`T`), in resolution order.
pub(crate) struct AddressSet<K, T> {
    entries: Vec<(K, T)>,
    /// Where the next round-robin scan starts; only ever incremented, so concurrent callers
    /// start at different entries without a lock.
    next: AtomicUsize,
}

/// What an [`AddressSet::update`] changed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Changes<K> {
    pub added: Vec<K>,
    pub removed: Vec<K>,
}

impl<K> Default for Changes<K> {
    fn default() -> Self {
        Changes {
            added: Vec::new(),
            removed: Vec::new(),
        }
    }
}

impl<K: PartialEq + Clone, T> AddressSet<K, T> {
    pub(crate) fn new() -> Self {
        AddressSet {
            entries: Vec::new(),
            next: AtomicUsize::new(0),
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Makes the set exactly `keys` (duplicates count once, order as given): entries whose
    /// key is still there keep their connection, new keys get one from `make`, the others are
    /// dropped (their connections close once the calls using them are done).
    pub(crate) fn update(
        &mut self,
        keys: impl IntoIterator<Item = K>,
        mut make: impl FnMut(&K) -> T,
    ) -> Changes<K> {
        let mut old = std::mem::take(&mut self.entries);
        let mut changes = Changes::default();
        for key in keys {
            if self.entries.iter().any(|(k, _)| *k == key) {
                continue;
            }
            match old.iter().position(|(k, _)| *k == key) {
                Some(i) => self.entries.push(old.swap_remove(i)),
                None => {
                    let value = make(&key);
                    changes.added.push(key.clone());
                    self.entries.push((key, value));
                }
            }
        }
        changes.removed = old.into_iter().map(|(k, _)| k).collect();
        changes
    }

    /// Scans the entries once, starting one further than the previous scan did, and returns
    /// the first thing `usable` gives: successive calls spread over the usable entries in turn.
    pub(crate) fn pick<R>(&self, mut usable: impl FnMut(&T) -> Option<R>) -> Option<R> {
        let n = self.entries.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n).find_map(|i| usable(&self.entries[(start + i) % n].1))
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &T> {
        self.entries.iter().map(|(_, v)| v)
    }

    #[cfg(test)]
    pub(crate) fn keys(&self) -> impl Iterator<Item = &K> {
        self.entries.iter().map(|(k, _)| k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Connections are numbered in creation order, so a test sees which ones were kept.
    fn numbered() -> impl FnMut(&&'static str) -> usize {
        let mut made = 0;
        move |_| {
            made += 1;
            made
        }
    }

    #[test]
    fn updates_keep_known_addresses_add_new_ones_and_drop_vanished_ones() {
        let mut set = AddressSet::new();
        let mut make = numbered();
        let changes = set.update(["a", "b", "b"], &mut make);
        assert_eq!(changes.added, ["a", "b"]);
        assert!(changes.removed.is_empty());
        assert_eq!(set.len(), 2);

        let changes = set.update(["b", "c"], &mut make);
        assert_eq!(changes.added, ["c"]);
        assert_eq!(changes.removed, ["a"]);
        let entries: Vec<(&str, usize)> = set.keys().copied().zip(set.values().copied()).collect();
        // "b" kept its connection (2); "c" got a new one (3).
        assert_eq!(entries, [("b", 2), ("c", 3)]);

        let changes = set.update(["c", "b"], &mut make);
        assert_eq!(changes, Changes::default());

        let changes = set.update([], &mut make);
        assert_eq!(changes.removed.len(), 2);
        assert!(set.is_empty());
        assert_eq!(set.pick(|v| Some(*v)), None);
    }

    #[test]
    fn picks_spread_evenly_over_usable_entries() {
        let mut set = AddressSet::new();
        set.update(["a", "b", "c"], numbered());
        let mut counts: HashMap<usize, usize> = HashMap::new();
        for _ in 0..300 {
            let picked = set.pick(|v| Some(*v)).unwrap();
            *counts.entry(picked).or_default() += 1;
        }
        assert_eq!(counts.len(), 3);
        assert!(counts.values().all(|&c| c == 100), "{counts:?}");

        // Successive picks take the entries in turn.
        let seq: Vec<usize> = (0..6).map(|_| set.pick(|v| Some(*v)).unwrap()).collect();
        assert_eq!(seq[0..3], seq[3..6]);
        let mut first = seq[0..3].to_vec();
        first.sort();
        assert_eq!(first, [1, 2, 3]);
    }

    #[test]
    fn unusable_entries_are_skipped() {
        let mut set = AddressSet::new();
        set.update(["a", "b", "c", "d"], numbered());
        let usable = |v: &usize| v.is_multiple_of(2).then_some(*v);
        let mut counts: HashMap<usize, usize> = HashMap::new();
        for _ in 0..400 {
            *counts.entry(set.pick(usable).unwrap()).or_default() += 1;
        }
        assert_eq!(
            counts
                .keys()
                .copied()
                .collect::<std::collections::BTreeSet<_>>(),
            [2, 4].into()
        );
        // Each usable entry is also the first usable one after an unusable one: 200 each.
        assert_eq!(counts[&2], 200);
        assert_eq!(counts[&4], 200);
        assert_eq!(set.pick(|_| None::<usize>), None);
    }

    #[test]
    fn the_turn_survives_updates() {
        let mut set = AddressSet::new();
        set.update(["a", "b"], numbered());
        let before = set.pick(|v| Some(*v)).unwrap();
        set.update(["a", "b", "c"], |_| 3);
        let after = set.pick(|v| Some(*v)).unwrap();
        assert_ne!(before, after);
    }
}
