//! The offset book: per assigned partition, every offset fetched and not yet
//! acknowledged, and from it the position the group may commit.
//!
//! The commit position of a partition is its lowest held offset, or the offset
//! after the last one fetched when none is held: a commit never passes an
//! unsettled message. Each assignment has a generation; a settlement carrying
//! an older one (its partition was revoked, perhaps assigned again since) is
//! not recorded, and says so.
//!
//! A partition's offsets arrive in increasing order (with gaps: compaction and
//! transaction markers), so they are kept in a queue sorted by offset, not a
//! map: a fetch is a push at the back, a settlement finds its slot (at once
//! when the offsets are contiguous, by binary search otherwise) and marks it,
//! and the front is popped while settled. An offset that arrives out of order
//! (never expected; kept correct anyway) is inserted at its place. Settled
//! slots behind a held one are dropped once they are most of the queue, so
//! its length stays within a small multiple of what is held.
//!
//! Pure bookkeeping, no I/O: the subscription keeps it under its lock.

use std::collections::VecDeque;
use std::sync::Arc;

use rdkafka::{Offset, TopicPartitionList};

/// Where one offset stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    /// Fetched, not yet handed to the runner (in the channel or to redeliver).
    Queued,
    /// Handed to the runner, not settled.
    Yielded,
    /// Given back while its partition is being revoked or the subscription closed.
    Released,
}

/// One fetched offset; `None` once it is acknowledged.
#[derive(Debug, Clone, Copy)]
struct Slot {
    offset: i64,
    status: Option<Status>,
}

/// Below this many slots the settled ones are not compacted away (small in
/// tests, so that the property test compacts often).
#[cfg(not(test))]
const COMPACT_MIN: usize = 64;
#[cfg(test)]
const COMPACT_MIN: usize = 8;

/// The offsets of one assigned partition.
#[derive(Debug)]
pub(crate) struct Part {
    pub(crate) generation: u64,
    /// Fetched offsets in increasing order; the front one, if any, is held.
    slots: VecDeque<Slot>,
    /// How many slots are held (not settled).
    held: usize,
    /// How many are `Queued`, and how many `Yielded`.
    queued: usize,
    yielded: usize,
    /// The offset after the last one fetched.
    next: Option<i64>,
    /// The last position sent in a commit.
    pub(crate) sent: Option<i64>,
    /// Its revocation has begun: nothing more is handed out.
    pub(crate) revoking: bool,
}

impl Part {
    fn new(generation: u64) -> Self {
        Part {
            generation,
            slots: VecDeque::new(),
            held: 0,
            queued: 0,
            yielded: 0,
            next: None,
            sent: None,
            revoking: false,
        }
    }

    /// Where the group may commit: the lowest unsettled offset, or the next one.
    pub(crate) fn position(&self) -> Option<i64> {
        self.slots.front().map(|s| s.offset).or(self.next)
    }

    /// How many of its offsets the runner holds.
    pub(crate) fn yielded(&self) -> usize {
        self.yielded
    }

    /// The index of `offset`'s slot, or where it would go.
    fn find(&self, offset: i64) -> std::result::Result<usize, usize> {
        let Some(front) = self.slots.front() else {
            return Err(0);
        };
        // Contiguous offsets (the usual case): the slot is `offset - front` away.
        if let Ok(guess) = usize::try_from(offset.wrapping_sub(front.offset))
            && self.slots.get(guess).is_some_and(|s| s.offset == offset)
        {
            return Ok(guess);
        }
        self.slots.binary_search_by_key(&offset, |s| s.offset)
    }

    /// The status of a held offset, if it is held.
    fn status(&self, offset: i64) -> Option<Status> {
        self.find(offset).ok().and_then(|i| self.slots[i].status)
    }

    fn count(&mut self, status: Option<Status>, delta: isize) {
        match status {
            Some(Status::Queued) => self.queued = self.queued.saturating_add_signed(delta),
            Some(Status::Yielded) => self.yielded = self.yielded.saturating_add_signed(delta),
            Some(Status::Released) | None => {}
        }
        if status.is_some() {
            self.held = self.held.saturating_add_signed(delta);
        }
    }

    /// Sets an offset's status (`None`: settled), adding its slot if it has
    /// none; returns the status it had.
    fn set(&mut self, offset: i64, status: Option<Status>) -> Option<Status> {
        let before = match self.slots.back() {
            Some(back) if back.offset >= offset => match self.find(offset) {
                Ok(i) => std::mem::replace(&mut self.slots[i].status, status),
                Err(i) => {
                    if status.is_some() {
                        self.slots.insert(i, Slot { offset, status });
                    }
                    None
                }
            },
            _ => {
                if status.is_some() {
                    self.slots.push_back(Slot { offset, status });
                }
                None
            }
        };
        self.count(before, -1);
        self.count(status, 1);
        if before.is_some() && status.is_none() {
            self.settle();
        }
        before
    }

    /// Drops the settled slots at the front, and every settled one when they
    /// are most of the queue (a held offset at the front keeps them otherwise).
    fn settle(&mut self) {
        while self.slots.front().is_some_and(|s| s.status.is_none()) {
            self.slots.pop_front();
        }
        if self.slots.len() >= COMPACT_MIN && self.slots.len() > 2 * self.held {
            self.slots.retain(|s| s.status.is_some());
        }
    }
}

/// Why a settlement was not recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stale {
    /// The partition is no longer assigned, or was assigned again since.
    Revoked,
    /// The offset is not held (already settled).
    NotHeld,
}

impl Stale {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Stale::Revoked => "its partition was revoked (or reassigned) before the settlement",
            Stale::NotHeld => "its offset is no longer held",
        }
    }
}

/// The partitions of one topic, indexed by partition number (Kafka numbers
/// them from 0, densely): no hashing per record.
#[derive(Default)]
struct Parts(Vec<Option<Part>>);

impl Parts {
    fn get_mut(&mut self, partition: i32) -> Option<&mut Part> {
        let i = usize::try_from(partition).ok()?;
        self.0.get_mut(i).and_then(Option::as_mut)
    }

    fn insert(&mut self, partition: i32, part: Part) {
        // A negative partition is never assigned; ignore rather than panic.
        let Ok(i) = usize::try_from(partition) else {
            return;
        };
        if self.0.len() <= i {
            self.0.resize_with(i + 1, || None);
        }
        self.0[i] = Some(part);
    }

    fn remove(&mut self, partition: i32) -> Option<Part> {
        let i = usize::try_from(partition).ok()?;
        self.0.get_mut(i).and_then(Option::take)
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = (i32, &mut Part)> {
        self.0
            .iter_mut()
            .enumerate()
            .filter_map(|(i, part)| Some((i32::try_from(i).ok()?, part.as_mut()?)))
    }
}

/// The offset book of a subscription.
#[derive(Default)]
pub(crate) struct Book {
    /// Topic → partition → offsets (a subscription has few topics: a list).
    topics: Vec<(Arc<str>, Parts)>,
    /// Offsets fetched and not handed out yet (in the channel or to redeliver).
    pub(crate) queued: usize,
    /// Offsets handed out and not settled.
    pub(crate) yielded: usize,
    generation: u64,
}

impl Book {
    fn topic(&mut self, topic: &str) -> Option<&mut (Arc<str>, Parts)> {
        self.topics.iter_mut().find(|(name, _)| **name == *topic)
    }

    pub(crate) fn part(&mut self, topic: &str, partition: i32) -> Option<&mut Part> {
        self.topic(topic).and_then(|(_, parts)| parts.get_mut(partition))
    }

    /// Starts a new generation for the partitions of `tpl` (an assignment).
    pub(crate) fn assign(&mut self, tpl: &TopicPartitionList) {
        self.generation += 1;
        let generation = self.generation;
        for e in tpl.elements() {
            self.remove(e.topic(), e.partition());
            let parts = match self.topics.iter().position(|(name, _)| **name == *e.topic()) {
                Some(i) => &mut self.topics[i].1,
                None => {
                    self.topics.push((Arc::from(e.topic()), Parts::default()));
                    &mut self.topics.last_mut().expect("just pushed").1
                }
            };
            parts.insert(e.partition(), Part::new(generation));
        }
    }

    /// Forgets a partition and everything held of it.
    pub(crate) fn remove(&mut self, topic: &str, partition: i32) {
        if let Some((_, parts)) = self.topic(topic)
            && let Some(part) = parts.remove(partition)
        {
            self.queued = self.queued.saturating_sub(part.queued);
            self.yielded = self.yielded.saturating_sub(part.yielded);
        }
    }

    /// Applies a change of one offset's status to the subscription's counts.
    fn count(&mut self, before: Option<Status>, after: Option<Status>) {
        for (status, delta) in [(before, -1isize), (after, 1)] {
            match status {
                Some(Status::Queued) => self.queued = self.queued.saturating_add_signed(delta),
                Some(Status::Yielded) => self.yielded = self.yielded.saturating_add_signed(delta),
                Some(Status::Released) | None => {}
            }
        }
    }

    /// Books a fetched record as queued; returns the topic's shared name and
    /// the partition's generation, or `None` when the record is not wanted
    /// (partition not assigned or being revoked, offset already held).
    pub(crate) fn fetched(&mut self, topic: &str, partition: i32, offset: i64) -> Option<(Arc<str>, u64)> {
        let (name, parts) = self.topic(topic)?;
        let name = Arc::clone(name);
        let part = parts.get_mut(partition)?;
        // In order (the usual case) it cannot be held yet.
        let in_order = part.slots.back().is_none_or(|back| back.offset < offset);
        if part.revoking || (!in_order && part.status(offset).is_some()) {
            return None;
        }
        part.set(offset, Some(Status::Queued));
        part.next = Some(part.next.map_or(offset + 1, |n| n.max(offset + 1)));
        let generation = part.generation;
        self.queued += 1;
        Some((name, generation))
    }

    /// Marks an offset handed to the runner; false when its partition was
    /// revoked, reassigned or is being revoked (then it is not handed out).
    pub(crate) fn hand_out(&mut self, topic: &str, partition: i32, generation: u64, offset: i64) -> bool {
        match self.part(topic, partition) {
            Some(part) if part.generation == generation && !part.revoking => {
                let before = part.set(offset, Some(Status::Yielded));
                self.count(before, Some(Status::Yielded));
                true
            }
            _ => false,
        }
    }

    /// Acknowledges an offset: it no longer holds the commit back. Returns
    /// whether its partition is being revoked (a revocation may be waiting
    /// for it).
    pub(crate) fn ack(
        &mut self,
        topic: &str,
        partition: i32,
        generation: u64,
        offset: i64,
    ) -> Result<bool, Stale> {
        let part = match self.part(topic, partition) {
            Some(part) if part.generation == generation => part,
            _ => return Err(Stale::Revoked),
        };
        if part.status(offset).is_none() {
            return Err(Stale::NotHeld);
        }
        let revoking = part.revoking;
        let before = part.set(offset, None);
        self.count(before, None);
        Ok(revoking)
    }

    /// Gives an offset back: it stays held, as `Queued` (to be handed out
    /// again) or, with `hold_only` or on a partition being revoked, as
    /// `Released` (never handed out again here; the next owner gets it).
    /// Returns the new status.
    pub(crate) fn release(
        &mut self,
        topic: &str,
        partition: i32,
        generation: u64,
        offset: i64,
        hold_only: bool,
    ) -> Result<Status, Stale> {
        let part = match self.part(topic, partition) {
            Some(part) if part.generation == generation => part,
            _ => return Err(Stale::Revoked),
        };
        if part.status(offset).is_none() {
            return Err(Stale::NotHeld);
        }
        let new = if hold_only || part.revoking {
            Status::Released
        } else {
            Status::Queued
        };
        let before = part.set(offset, Some(new));
        self.count(before, Some(new));
        Ok(new)
    }

    /// Commit positions that moved since they were last sent (`all`: every one).
    pub(crate) fn positions(&mut self, all: bool) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (topic, parts) in &mut self.topics {
            for (partition, part) in parts.iter_mut() {
                if let Some(position) = part.position()
                    && (all || part.sent != Some(position))
                {
                    part.sent = Some(position);
                    let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(position));
                }
            }
        }
        tpl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tpl(parts: &[(&str, i32)]) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in parts {
            tpl.add_partition(topic, *partition);
        }
        tpl
    }

    fn positions(book: &mut Book, all: bool) -> Vec<(String, i32, i64)> {
        let mut out: Vec<_> = book
            .positions(all)
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => (e.topic().to_owned(), e.partition(), o),
                other => panic!("{other:?}"),
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn the_position_never_passes_an_unsettled_offset() {
        let mut book = Book::default();
        book.assign(&tpl(&[("t", 0)]));
        let (_, g) = book.fetched("t", 0, 10).unwrap();
        for offset in 11..14 {
            book.fetched("t", 0, offset).unwrap();
        }
        for offset in 10..14 {
            assert!(book.hand_out("t", 0, g, offset));
        }
        assert_eq!((book.queued, book.yielded), (0, 4));
        book.ack("t", 0, g, 11).unwrap();
        book.ack("t", 0, g, 13).unwrap();
        assert_eq!(positions(&mut book, false), [("t".into(), 0, 10)]);
        // Unchanged positions are not sent again, unless all are asked for.
        assert!(positions(&mut book, false).is_empty());
        assert_eq!(positions(&mut book, true), [("t".into(), 0, 10)]);
        book.ack("t", 0, g, 10).unwrap();
        assert_eq!(positions(&mut book, false), [("t".into(), 0, 12)]);
        book.ack("t", 0, g, 12).unwrap();
        assert_eq!(positions(&mut book, false), [("t".into(), 0, 14)]);
        assert_eq!(book.yielded, 0);
    }

    #[test]
    fn settlements_of_an_older_assignment_are_stale() {
        let mut book = Book::default();
        book.assign(&tpl(&[("t", 0), ("t", 1)]));
        let (_, old) = book.fetched("t", 0, 5).unwrap();
        assert!(book.hand_out("t", 0, old, 5));
        // Revoked and assigned again: a new generation, an empty book.
        book.assign(&tpl(&[("t", 0)]));
        assert_eq!(book.yielded, 0);
        assert_eq!(book.ack("t", 0, old, 5), Err(Stale::Revoked));
        assert_eq!(book.release("t", 0, old, 5, false), Err(Stale::Revoked));
        assert!(!book.hand_out("t", 0, old, 5));
        // Revoked for good.
        book.remove("t", 1);
        assert_eq!(book.ack("t", 1, old, 0), Err(Stale::Revoked));
        // A settled offset is no longer held.
        let (_, g) = book.fetched("t", 0, 5).unwrap();
        assert!(book.hand_out("t", 0, g, 5));
        assert_eq!(book.ack("t", 0, g, 5), Ok(false));
        assert_eq!(book.ack("t", 0, g, 5), Err(Stale::NotHeld));
    }

    #[test]
    fn releases_hold_the_offset() {
        let mut book = Book::default();
        book.assign(&tpl(&[("t", 0)]));
        let (_, g) = book.fetched("t", 0, 0).unwrap();
        book.fetched("t", 0, 1).unwrap();
        assert!(book.hand_out("t", 0, g, 0));
        assert!(book.hand_out("t", 0, g, 1));
        assert_eq!(book.release("t", 0, g, 0, false), Ok(Status::Queued));
        assert_eq!((book.queued, book.yielded), (1, 1));
        assert_eq!(book.release("t", 0, g, 1, true), Ok(Status::Released));
        assert_eq!((book.queued, book.yielded), (1, 0));
        book.part("t", 0).unwrap().revoking = true;
        assert_eq!(book.release("t", 0, g, 0, false), Ok(Status::Released));
        // Released offsets still hold the commit back.
        assert_eq!(positions(&mut book, true), [("t".into(), 0, 0)]);
        // A partition being revoked takes nothing new and hands nothing out.
        assert!(book.fetched("t", 0, 2).is_none());
        assert!(!book.hand_out("t", 0, g, 0));
    }

    #[test]
    fn gaps_in_offsets_are_skipped_by_the_position() {
        // Compaction and transaction markers leave holes between offsets.
        let mut book = Book::default();
        book.assign(&tpl(&[("t", 0)]));
        let (_, g) = book.fetched("t", 0, 0).unwrap();
        for offset in [5, 6, 100] {
            book.fetched("t", 0, offset).unwrap();
        }
        for offset in [0, 5, 6, 100] {
            assert!(book.hand_out("t", 0, g, offset));
        }
        // Holes are not held: settling them is refused, they hold nothing back.
        assert_eq!(book.ack("t", 0, g, 3), Err(Stale::NotHeld));
        book.ack("t", 0, g, 5).unwrap();
        assert_eq!(positions(&mut book, false), [("t".into(), 0, 0)]);
        book.ack("t", 0, g, 0).unwrap();
        assert_eq!(positions(&mut book, false), [("t".into(), 0, 6)]);
        book.ack("t", 0, g, 100).unwrap();
        assert!(positions(&mut book, false).is_empty());
        book.ack("t", 0, g, 6).unwrap();
        assert_eq!(positions(&mut book, false), [("t".into(), 0, 101)]);
        assert_eq!((book.queued, book.yielded), (0, 0));
        // Later offsets after the hole start where they arrive.
        book.fetched("t", 0, 250).unwrap();
        assert_eq!(positions(&mut book, false), [("t".into(), 0, 250)]);
    }

    #[test]
    fn out_of_order_acks_hold_the_position_at_the_lowest_unsettled() {
        let mut book = Book::default();
        book.assign(&tpl(&[("t", 0)]));
        let (_, g) = book.fetched("t", 0, 0).unwrap();
        for offset in 1..1000 {
            book.fetched("t", 0, offset).unwrap();
        }
        for offset in 0..1000 {
            assert!(book.hand_out("t", 0, g, offset));
        }
        // Every odd offset, backwards, then every even one but 0.
        for offset in (1..1000).rev().step_by(2) {
            book.ack("t", 0, g, offset).unwrap();
            assert_eq!(book.part("t", 0).unwrap().position(), Some(0));
        }
        for offset in (2..1000).step_by(2) {
            book.ack("t", 0, g, offset).unwrap();
            assert_eq!(book.part("t", 0).unwrap().position(), Some(0));
        }
        // One held offset in front keeps only a bounded queue behind it.
        assert!(book.part("t", 0).unwrap().slots.len() <= COMPACT_MIN);
        assert_eq!(book.ack("t", 0, g, 999), Err(Stale::NotHeld));
        book.ack("t", 0, g, 0).unwrap();
        assert_eq!(book.part("t", 0).unwrap().position(), Some(1000));
        assert_eq!((book.queued, book.yielded), (0, 0));
    }

    #[test]
    fn revocation_wakes_only_for_its_partitions_and_forgets_them() {
        let mut book = Book::default();
        book.assign(&tpl(&[("t", 0), ("t", 1)]));
        let (_, g) = book.fetched("t", 0, 0).unwrap();
        book.fetched("t", 0, 1).unwrap();
        book.fetched("t", 1, 7).unwrap();
        for (partition, offset) in [(0, 0), (0, 1), (1, 7)] {
            assert!(book.hand_out("t", partition, g, offset));
        }
        book.part("t", 0).unwrap().revoking = true;
        assert_eq!(book.part("t", 0).unwrap().yielded(), 2);
        // An ack on the partition being revoked says so (its revocation waits).
        assert_eq!(book.ack("t", 0, g, 1), Ok(true));
        assert_eq!(book.ack("t", 1, g, 7), Ok(false));
        assert_eq!(book.part("t", 0).unwrap().yielded(), 1);
        assert_eq!(book.part("t", 0).unwrap().position(), Some(0));
        assert_eq!((book.queued, book.yielded), (0, 1));
        // Forgetting it forgets what it held.
        book.remove("t", 0);
        assert_eq!((book.queued, book.yielded), (0, 0));
        assert_eq!(book.ack("t", 0, g, 0), Err(Stale::Revoked));
        assert_eq!(positions(&mut book, true), [("t".into(), 1, 8)]);
    }

    #[test]
    fn a_released_offset_is_handed_out_again_and_a_refetch_is_booked_again() {
        let mut book = Book::default();
        book.assign(&tpl(&[("t", 0)]));
        let (_, g) = book.fetched("t", 0, 10).unwrap();
        book.fetched("t", 0, 11).unwrap();
        assert!(book.hand_out("t", 0, g, 10));
        assert!(book.hand_out("t", 0, g, 11));
        book.ack("t", 0, g, 11).unwrap();
        // Released for redelivery: held as queued, then handed out again.
        assert_eq!(book.release("t", 0, g, 10, false), Ok(Status::Queued));
        assert_eq!((book.queued, book.yielded), (1, 0));
        // A fetched offset already held is not booked twice.
        assert!(book.fetched("t", 0, 10).is_none());
        assert!(book.hand_out("t", 0, g, 10));
        assert_eq!(positions(&mut book, true), [("t".into(), 0, 10)]);
        book.ack("t", 0, g, 10).unwrap();
        assert_eq!(positions(&mut book, true), [("t".into(), 0, 12)]);
        // The fetcher going back (an offset reset, a seek) books the records
        // again and the position follows them back: handled twice, never lost.
        book.fetched("t", 0, 11).unwrap();
        assert_eq!(positions(&mut book, true), [("t".into(), 0, 11)]);
        book.fetched("t", 0, 12).unwrap();
        assert!(book.hand_out("t", 0, g, 12));
        book.ack("t", 0, g, 12).unwrap();
        assert_eq!(positions(&mut book, true), [("t".into(), 0, 11)]);
        assert!(book.hand_out("t", 0, g, 11));
        book.ack("t", 0, g, 11).unwrap();
        assert_eq!(positions(&mut book, true), [("t".into(), 0, 13)]);
    }

    /// The book as it was: a `BTreeMap` of held offsets per partition.
    mod reference {
        use std::collections::{BTreeMap, HashMap};

        use super::super::{Stale, Status};

        pub(super) struct Part {
            pub(super) generation: u64,
            pub(super) offsets: BTreeMap<i64, Status>,
            pub(super) next: Option<i64>,
            pub(super) revoking: bool,
        }

        #[derive(Default)]
        pub(super) struct Book {
            pub(super) parts: HashMap<i32, Part>,
            pub(super) queued: usize,
            pub(super) yielded: usize,
            generation: u64,
        }

        impl Book {
            fn count(&mut self, status: Status, delta: isize) {
                match status {
                    Status::Queued => self.queued = self.queued.saturating_add_signed(delta),
                    Status::Yielded => self.yielded = self.yielded.saturating_add_signed(delta),
                    Status::Released => {}
                }
            }
            pub(super) fn assign(&mut self, partitions: &[i32]) {
                self.generation += 1;
                for p in partitions {
                    self.remove(*p);
                    let part = Part {
                        generation: self.generation,
                        offsets: BTreeMap::new(),
                        next: None,
                        revoking: false,
                    };
                    self.parts.insert(*p, part);
                }
            }
            pub(super) fn remove(&mut self, partition: i32) {
                if let Some(part) = self.parts.remove(&partition) {
                    for status in part.offsets.values() {
                        self.count(*status, -1);
                    }
                }
            }
            pub(super) fn fetched(&mut self, partition: i32, offset: i64) -> Option<u64> {
                let part = self.parts.get_mut(&partition)?;
                if part.revoking || part.offsets.contains_key(&offset) {
                    return None;
                }
                part.offsets.insert(offset, Status::Queued);
                part.next = Some(part.next.map_or(offset + 1, |n| n.max(offset + 1)));
                let g = part.generation;
                self.count(Status::Queued, 1);
                Some(g)
            }
            pub(super) fn hand_out(&mut self, partition: i32, generation: u64, offset: i64) -> bool {
                match self.parts.get_mut(&partition) {
                    Some(part) if part.generation == generation && !part.revoking => {
                        if let Some(before) = part.offsets.insert(offset, Status::Yielded) {
                            self.count(before, -1);
                        }
                        self.count(Status::Yielded, 1);
                        true
                    }
                    _ => false,
                }
            }
            pub(super) fn ack(
                &mut self,
                partition: i32,
                generation: u64,
                offset: i64,
            ) -> Result<bool, Stale> {
                let part = match self.parts.get_mut(&partition) {
                    Some(part) if part.generation == generation => part,
                    _ => return Err(Stale::Revoked),
                };
                let revoking = part.revoking;
                let status = part.offsets.remove(&offset).ok_or(Stale::NotHeld)?;
                self.count(status, -1);
                Ok(revoking)
            }
            pub(super) fn release(
                &mut self,
                partition: i32,
                generation: u64,
                offset: i64,
                hold_only: bool,
            ) -> Result<Status, Stale> {
                let part = match self.parts.get_mut(&partition) {
                    Some(part) if part.generation == generation => part,
                    _ => return Err(Stale::Revoked),
                };
                if !part.offsets.contains_key(&offset) {
                    return Err(Stale::NotHeld);
                }
                let new = if hold_only || part.revoking {
                    Status::Released
                } else {
                    Status::Queued
                };
                if let Some(before) = part.offsets.insert(offset, new) {
                    self.count(before, -1);
                }
                self.count(new, 1);
                Ok(new)
            }
            pub(super) fn position(&self, partition: i32) -> Option<i64> {
                let part = self.parts.get(&partition)?;
                part.offsets.keys().next().copied().or(part.next)
            }
            pub(super) fn yielded_of(&self, partition: i32) -> Option<usize> {
                let part = self.parts.get(&partition)?;
                Some(part.offsets.values().filter(|s| **s == Status::Yielded).count())
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Assign(Vec<i32>),
        Remove(i32),
        Revoking(i32),
        /// The next offset after a gap (0: the same offset again).
        FetchNext(i32, i64),
        FetchAt(i32, i64),
        HandOut(i32, bool, i64),
        Ack(i32, bool, i64),
        Release(i32, bool, i64, bool),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        let p = 0..3i32;
        // How far back from the partition's next offset a settlement aims:
        // mostly among the last few fetched.
        let back = || prop_oneof![3 => 0..8i64, 1 => 0..64i64];
        prop_oneof![
            1 => proptest::collection::vec(0..3i32, 0..3).prop_map(Op::Assign),
            1 => p.clone().prop_map(Op::Remove),
            1 => p.clone().prop_map(Op::Revoking),
            12 => (p.clone(), prop_oneof![8 => Just(1i64), 2 => 2..5i64, 1 => Just(0i64), 1 => 50..200i64])
                .prop_map(|(p, gap)| Op::FetchNext(p, gap)),
            1 => (p.clone(), 0..300i64).prop_map(|(p, o)| Op::FetchAt(p, o)),
            8 => (p.clone(), any::<bool>(), back()).prop_map(|(p, old, back)| Op::HandOut(p, old, back)),
            10 => (p.clone(), any::<bool>(), back()).prop_map(|(p, old, back)| Op::Ack(p, old, back)),
            3 => (p, any::<bool>(), back(), any::<bool>())
                .prop_map(|(p, old, back, hold)| Op::Release(p, old, back, hold)),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// The queue book answers every operation as the `BTreeMap` one did,
        /// and keeps the same positions and counts.
        #[test]
        fn the_book_matches_the_btreemap_book(ops in proptest::collection::vec(op(), 1..400)) {
            let mut book = Book::default();
            let mut model = reference::Book::default();
            let parts = |ps: &[i32]| {
                let mut tpl = TopicPartitionList::new();
                for p in ps {
                    tpl.add_partition("t", *p);
                }
                tpl
            };
            for op in ops {
                // Offsets chosen relative to the partition's next one, and
                // the current generation or the one before it.
                let next = |model: &reference::Book, p: i32| {
                    model.parts.get(&p).and_then(|part| part.next).unwrap_or(0)
                };
                let generation = |model: &reference::Book, p: i32, old: bool| {
                    model.parts.get(&p).map_or(1, |part| part.generation) - u64::from(old)
                };
                match op {
                    Op::Assign(ps) => {
                        book.assign(&parts(&ps));
                        model.assign(&ps);
                    }
                    Op::Remove(p) => {
                        book.remove("t", p);
                        model.remove(p);
                    }
                    Op::Revoking(p) => {
                        if let (Some(a), Some(b)) = (book.part("t", p), model.parts.get_mut(&p)) {
                            a.revoking = true;
                            b.revoking = true;
                        }
                    }
                    Op::FetchNext(p, gap) => {
                        let offset = (next(&model, p) + gap - 1).max(0);
                        proptest::prop_assert_eq!(book.fetched("t", p, offset).map(|(_, g)| g), model.fetched(p, offset));
                    }
                    Op::FetchAt(p, offset) => {
                        proptest::prop_assert_eq!(book.fetched("t", p, offset).map(|(_, g)| g), model.fetched(p, offset));
                    }
                    Op::HandOut(p, old, back) => {
                        let (g, offset) = (generation(&model, p, old), next(&model, p) - 1 - back);
                        proptest::prop_assert_eq!(book.hand_out("t", p, g, offset), model.hand_out(p, g, offset));
                    }
                    Op::Ack(p, old, back) => {
                        let (g, offset) = (generation(&model, p, old), next(&model, p) - 1 - back);
                        proptest::prop_assert_eq!(book.ack("t", p, g, offset), model.ack(p, g, offset));
                    }
                    Op::Release(p, old, back, hold) => {
                        let (g, offset) = (generation(&model, p, old), next(&model, p) - 1 - back);
                        proptest::prop_assert_eq!(
                            book.release("t", p, g, offset, hold),
                            model.release(p, g, offset, hold)
                        );
                    }
                }
                proptest::prop_assert_eq!((book.queued, book.yielded), (model.queued, model.yielded));
                for p in 0..3 {
                    let ours = book.part("t", p).map(|part| (part.position(), part.yielded()));
                    let theirs = model
                        .parts
                        .get(&p)
                        .map(|_| (model.position(p), model.yielded_of(p).unwrap_or(0)));
                    proptest::prop_assert_eq!(ours, theirs);
                    if let Some(part) = book.part("t", p) {
                        // The queue stays within a small multiple of what it holds.
                        let settled = part.slots.len() - part.held;
                        proptest::prop_assert!(settled <= COMPACT_MIN.max(part.held), "{} settled", settled);
                        proptest::prop_assert_eq!(part.held, model.parts[&p].offsets.len());
                    }
                }
            }
        }
    }
}
