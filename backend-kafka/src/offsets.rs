//! The offset book: per assigned partition, every offset fetched and not yet
//! acknowledged, and from it the position the group may commit.
//!
//! The commit position of a partition is its lowest held offset, or the offset
//! after the last one fetched when none is held: a commit never passes an
//! unsettled message. Each assignment has a generation; a settlement carrying
//! an older one (its partition was revoked, perhaps assigned again since) is
//! not recorded, and says so.
//!
//! Pure bookkeeping, no I/O: the subscription keeps it under its lock.

use std::collections::{BTreeMap, HashMap};
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

/// The offsets of one assigned partition.
#[derive(Debug)]
pub(crate) struct Part {
    pub(crate) generation: u64,
    offsets: BTreeMap<i64, Status>,
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
            offsets: BTreeMap::new(),
            next: None,
            sent: None,
            revoking: false,
        }
    }

    /// Where the group may commit: the lowest unsettled offset, or the next one.
    pub(crate) fn position(&self) -> Option<i64> {
        self.offsets.keys().next().copied().or(self.next)
    }

    /// How many of its offsets the runner holds.
    pub(crate) fn yielded(&self) -> usize {
        self.offsets.values().filter(|s| **s == Status::Yielded).count()
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

/// The offset book of a subscription.
#[derive(Default)]
pub(crate) struct Book {
    /// Topic → partition → offsets.
    topics: HashMap<String, (Arc<str>, HashMap<i32, Part>)>,
    /// Offsets fetched and not handed out yet (in the channel or to redeliver).
    pub(crate) queued: usize,
    /// Offsets handed out and not settled.
    pub(crate) yielded: usize,
    generation: u64,
}

impl Book {
    pub(crate) fn part(&mut self, topic: &str, partition: i32) -> Option<&mut Part> {
        self.topics
            .get_mut(topic)
            .and_then(|(_, parts)| parts.get_mut(&partition))
    }

    /// Starts a new generation for the partitions of `tpl` (an assignment).
    pub(crate) fn assign(&mut self, tpl: &TopicPartitionList) {
        self.generation += 1;
        let generation = self.generation;
        for e in tpl.elements() {
            self.remove(e.topic(), e.partition());
            let entry = self
                .topics
                .entry(e.topic().to_owned())
                .or_insert_with(|| (Arc::from(e.topic()), HashMap::new()));
            entry.1.insert(e.partition(), Part::new(generation));
        }
    }

    /// Forgets a partition and everything held of it.
    pub(crate) fn remove(&mut self, topic: &str, partition: i32) {
        if let Some((_, parts)) = self.topics.get_mut(topic)
            && let Some(part) = parts.remove(&partition)
        {
            for status in part.offsets.values() {
                self.count(*status, -1);
            }
        }
    }

    fn count(&mut self, status: Status, delta: isize) {
        match status {
            Status::Queued => self.queued = self.queued.saturating_add_signed(delta),
            Status::Yielded => self.yielded = self.yielded.saturating_add_signed(delta),
            Status::Released => {}
        }
    }

    /// Books a fetched record as queued; returns the topic's shared name and
    /// the partition's generation, or `None` when the record is not wanted
    /// (partition not assigned or being revoked, offset already held).
    pub(crate) fn fetched(&mut self, topic: &str, partition: i32, offset: i64) -> Option<(Arc<str>, u64)> {
        let (name, parts) = self.topics.get_mut(topic)?;
        let name = Arc::clone(name);
        let part = parts.get_mut(&partition)?;
        if part.revoking || part.offsets.contains_key(&offset) {
            return None;
        }
        part.offsets.insert(offset, Status::Queued);
        part.next = Some(part.next.map_or(offset + 1, |n| n.max(offset + 1)));
        let generation = part.generation;
        self.count(Status::Queued, 1);
        Some((name, generation))
    }

    /// Marks an offset handed to the runner; false when its partition was
    /// revoked, reassigned or is being revoked (then it is not handed out).
    pub(crate) fn hand_out(&mut self, topic: &str, partition: i32, generation: u64, offset: i64) -> bool {
        match self.part(topic, partition) {
            Some(part) if part.generation == generation && !part.revoking => {
                let before = part.offsets.insert(offset, Status::Yielded);
                if let Some(before) = before {
                    self.count(before, -1);
                }
                self.count(Status::Yielded, 1);
                true
            }
            _ => false,
        }
    }

    /// Acknowledges an offset: it no longer holds the commit back.
    pub(crate) fn ack(
        &mut self,
        topic: &str,
        partition: i32,
        generation: u64,
        offset: i64,
    ) -> Result<(), Stale> {
        let part = match self.part(topic, partition) {
            Some(part) if part.generation == generation => part,
            _ => return Err(Stale::Revoked),
        };
        let status = part.offsets.remove(&offset).ok_or(Stale::NotHeld)?;
        self.count(status, -1);
        Ok(())
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

    /// Commit positions that moved since they were last sent (`all`: every one).
    pub(crate) fn positions(&mut self, all: bool) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (topic, (_, parts)) in &mut self.topics {
            for (partition, part) in parts.iter_mut() {
                if let Some(position) = part.position()
                    && (all || part.sent != Some(position))
                {
                    part.sent = Some(position);
                    let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(position));
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
        assert_eq!(book.ack("t", 0, g, 5), Ok(()));
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
}
