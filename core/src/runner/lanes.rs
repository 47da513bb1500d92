//! The dispatcher's bookkeeping types: lanes by a numeric id, and the slots of
//! running attempts.
//!
//! A lane is found by a `u64` id the dispatcher hands out itself (never reused),
//! so the lane table hashes with a multiply instead of SipHash. Only the index
//! from a message key to its lane ([`Order::ByKey`](super::Order::ByKey)) hashes
//! bytes that come from producers, and it keeps std's randomly keyed hasher.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use tokio_util::time::delay_queue;

use crate::backend::Acker;
use crate::message::Delivery;

/// A lane's id: unique for the runner's life.
pub(super) type LaneId = u64;

/// The one lane of [`Order::Sequential`](super::Order::Sequential).
pub(super) const SEQUENTIAL: LaneId = 0;

/// Hashes the dispatcher's own `u64` ids (not attacker-chosen) with one
/// multiply: the top bits, which the table's probing uses, are well mixed.
#[derive(Default, Clone, Copy)]
pub(super) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A map keyed by the dispatcher's own ids.
pub(super) type IdMap<V> = HashMap<LaneId, V, BuildHasherDefault<IdHasher>>;
/// A set of the dispatcher's own ids.
pub(super) type IdSet = HashSet<LaneId, BuildHasherDefault<IdHasher>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Head {
    Waiting,
    Running,
    Backoff,
    /// Overloaded: waits out a backoff in the runner, then goes back to the
    /// broker with its lane (backends without delayed redelivery).
    Shed,
}

pub(super) struct Held {
    pub(super) delivery: Delivery,
    pub(super) acker: Acker,
}

/// A lane's FIFO queue. The head is kept inline, so a lane of one delivery
/// (every lane with [`Order::Unordered`](super::Order::Unordered)) allocates
/// nothing beyond its table entry.
#[derive(Default)]
pub(super) struct Items {
    head: Option<Held>,
    rest: VecDeque<Held>,
}

impl Items {
    pub(super) fn len(&self) -> usize {
        usize::from(self.head.is_some()) + self.rest.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.head.is_none()
    }

    pub(super) fn push_back(&mut self, held: Held) {
        match self.head {
            None => self.head = Some(held),
            Some(_) => self.rest.push_back(held),
        }
    }

    pub(super) fn front(&self) -> Option<&Held> {
        self.head.as_ref()
    }

    pub(super) fn front_mut(&mut self) -> Option<&mut Held> {
        self.head.as_mut()
    }

    pub(super) fn pop_front(&mut self) -> Option<Held> {
        let head = self.head.take();
        self.head = self.rest.pop_front();
        head
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Held> {
        self.head.iter().chain(self.rest.iter())
    }

    /// Removes the items from position `from` on, in order.
    pub(super) fn drain_from(&mut self, from: usize) -> Vec<Held> {
        if from == 0 {
            let mut all = Vec::with_capacity(self.len());
            all.extend(self.head.take());
            all.extend(self.rest.drain(..));
            all
        } else {
            self.rest.drain(from.min(self.rest.len() + 1) - 1..).collect()
        }
    }
}

impl IntoIterator for Items {
    type Item = Held;
    type IntoIter =
        std::iter::Chain<std::option::IntoIter<Held>, std::collections::vec_deque::IntoIter<Held>>;

    fn into_iter(self) -> Self::IntoIter {
        self.head.into_iter().chain(self.rest)
    }
}

pub(super) struct Lane {
    pub(super) items: Items,
    pub(super) head: Head,
    pub(super) backoff_key: Option<delay_queue::Key>,
    /// The message key this lane orders ([`Order::ByKey`](super::Order::ByKey)).
    pub(super) key: Option<bytes::Bytes>,
}

impl Lane {
    pub(super) fn new(key: Option<bytes::Bytes>) -> Self {
        Lane {
            items: Items::default(),
            head: Head::Waiting,
            backoff_key: None,
            key,
        }
    }
}

/// What runs: slot → lane, with free slots reused (at most `concurrency` slots).
#[derive(Default)]
pub(super) struct Slots {
    lanes: Vec<Option<LaneId>>,
    free: Vec<usize>,
    running: usize,
}

impl Slots {
    /// Records that `lane` runs; returns its slot.
    pub(super) fn start(&mut self, lane: LaneId) -> usize {
        self.running += 1;
        match self.free.pop() {
            Some(slot) => {
                self.lanes[slot] = Some(lane);
                slot
            }
            None => {
                self.lanes.push(Some(lane));
                self.lanes.len() - 1
            }
        }
    }

    /// The lane that ran in `slot`, freeing it.
    pub(super) fn finish(&mut self, slot: usize) -> Option<LaneId> {
        let lane = self.lanes.get_mut(slot)?.take()?;
        self.free.push(slot);
        self.running -= 1;
        Some(lane)
    }

    /// The lane running in `slot`, if any.
    pub(super) fn get(&self, slot: usize) -> Option<LaneId> {
        self.lanes.get(slot).copied().flatten()
    }

    /// How many attempts run.
    pub(super) fn len(&self) -> usize {
        self.running
    }

    pub(super) fn is_empty(&self) -> bool {
        self.running == 0
    }

    /// Frees every slot; returns the lanes that were running.
    pub(super) fn drain(&mut self) -> Vec<LaneId> {
        let lanes: Vec<LaneId> = self.lanes.iter_mut().filter_map(Option::take).collect();
        self.free = (0..self.lanes.len()).collect();
        self.running = 0;
        lanes
    }
}
