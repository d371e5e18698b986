//! Order per key within a partition (`ordering = "key"`). Pure code: which event may start,
//! and which offset may be committed. Events of one key go one at a time, in offset order;
//! events of different keys go side by side, so a slow or retried event holds back only its
//! own key. The offset committed is the lowest one not yet done with: a crash or a rebalance
//! delivers again only what was in flight or waiting, never skips one.

use std::collections::{BTreeSet, HashMap, VecDeque};

/// A record key; keyless events form one key of their own (in order among themselves).
pub type Key = Option<Vec<u8>>;

pub struct KeyOrder<T> {
    /// Offsets admitted and not yet done with.
    pending: BTreeSet<i64>,
    /// Keys with an event in flight, and what waits behind it, in offset order.
    busy: HashMap<Key, VecDeque<T>>,
    /// The offset after the highest admitted.
    end: i64,
    /// The last offset handed out to commit.
    committed: i64,
}

impl<T> KeyOrder<T> {
    pub fn new() -> KeyOrder<T> {
        KeyOrder {
            pending: BTreeSet::new(),
            busy: HashMap::new(),
            end: -1,
            committed: -1,
        }
    }

    /// Offsets admitted and not yet done with: the window the lane bounds.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// `item`, the event at `offset` (offsets come in increasing order) with `key`: handed
    /// back to start now when its key is free, else kept until its key's turn.
    pub fn admit(&mut self, offset: i64, key: Key, item: T) -> Option<T> {
        if self.committed < 0 {
            // Where the lane starts: nothing before it is ours to commit.
            self.committed = offset;
        }
        self.pending.insert(offset);
        self.end = self.end.max(offset + 1);
        match self.busy.get_mut(&key) {
            Some(waiting) => {
                waiting.push_back(item);
                None
            }
            None => {
                self.busy.insert(key, VecDeque::new());
                Some(item)
            }
        }
    }

    /// The event at `offset` of `key` is done with: the next event of that key to start, if
    /// one waits, and the offset to commit now, if it moved.
    pub fn done(&mut self, offset: i64, key: &Key) -> (Option<T>, Option<i64>) {
        self.pending.remove(&offset);
        let next = match self.busy.get_mut(key) {
            Some(waiting) => {
                let next = waiting.pop_front();
                if next.is_none() {
                    self.busy.remove(key);
                }
                next
            }
            None => None,
        };
        let commit = self.pending.first().copied().unwrap_or(self.end);
        if commit > self.committed {
            self.committed = commit;
            (next, Some(commit))
        } else {
            (next, None)
        }
    }
}

impl<T> Default for KeyOrder<T> {
    fn default() -> Self {
        KeyOrder::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> Key {
        Some(k.as_bytes().to_vec())
    }

    #[test]
    fn keys_go_side_by_side_and_each_in_order() {
        let mut o = KeyOrder::new();
        assert_eq!(o.admit(10, key("a"), 10), Some(10));
        assert_eq!(
            o.admit(11, key("b"), 11),
            Some(11),
            "another key starts at once"
        );
        assert_eq!(o.admit(12, key("a"), 12), None, "behind a's first");
        assert_eq!(o.admit(13, None, 13), Some(13));
        assert_eq!(
            o.admit(14, None, 14),
            None,
            "keyless events keep their order too"
        );
        assert_eq!(o.len(), 5);
        // b finishes first: 10 is still in flight, nothing to commit yet.
        assert_eq!(o.done(11, &key("b")), (None, None));
        // a's first done: a's next starts; 10 and 11 are done, 12 is not.
        assert_eq!(o.done(10, &key("a")), (Some(12), Some(12)));
        assert_eq!(o.done(13, &None), (Some(14), None), "12 still pending");
        assert_eq!(o.done(12, &key("a")), (None, Some(14)));
        assert_eq!(
            o.done(14, &None),
            (None, Some(15)),
            "everything admitted is done"
        );
        assert_eq!(o.len(), 0);
    }

    #[test]
    fn the_commit_never_passes_an_event_not_done_with() {
        let mut o = KeyOrder::new();
        for offset in 0..6 {
            let k = key(["x", "y", "z"][offset as usize % 3]);
            o.admit(offset, k, offset);
        }
        // 0, 1, 2 run; 3, 4, 5 wait behind them. 2 then 1 finish before 0.
        assert_eq!(o.done(2, &key("z")), (Some(5), None));
        assert_eq!(o.done(1, &key("y")), (Some(4), None));
        assert_eq!(o.done(5, &key("z")), (None, None));
        assert_eq!(o.done(0, &key("x")), (Some(3), Some(3)), "0-2 done, 3 not");
        assert_eq!(o.done(4, &key("y")), (None, None));
        assert_eq!(o.done(3, &key("x")), (None, Some(6)));
    }
}
