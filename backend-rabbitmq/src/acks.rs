//! Coalesced acknowledgements: one `basic.ack` with `multiple = true` for a
//! run of contiguous delivery tags that polybus has acked, per channel.
//!
//! A multiple ack up to tag `N` acknowledges every tag `<= N` the broker still
//! holds as unacknowledged on the channel. So it may only be sent when every
//! such tag has been acked by polybus: not one still being handled, not one
//! released (its `basic.nack` must be on the wire first), not one whose single
//! ack is still being written (the broker would see it after the multiple ack
//! and close the channel for an unknown tag), and not one the subscription has
//! not handed out yet (a consumer's buffered delivery on a channel shared by
//! several consumers). [`AckBook`] is that bookkeeping, pure and synchronous;
//! [`Acks`] runs one book per channel in a task of its own that writes what the
//! book plans and answers each ack only once its frame is written.
//!
//! **Bounded latency.** An ack above a tag that is still held waits at most the
//! coalescing bound ([`crate::RabbitConfig::ack_coalescing`], 2 ms by default)
//! and is then written on its own (`multiple = false`). Once a blocking tag has
//! made an ack wait out the bound, it is taken to be slow (a long handler, a
//! message retrying in process, one waiting in its key's lane) and every later
//! ack above it is written on its own at once, until the floor passes it. So a
//! slow handler holding tag 1 costs the acks of 2, 3, … one bound, not its
//! whole run time.
//!
//! **Channel generations.** A book belongs to one channel: a subscription that
//! reconnects, or opens a new channel, starts a new [`Acks`], and the deliveries
//! of the old channel keep the old one, whose writes go through lapin's
//! per-delivery [`lapin::Acker`] of that channel (poisoned when the channel
//! dies). An ack for an old channel's delivery can therefore never settle
//! anything on the new one; it ends in `Error::NotSettled` and the broker
//! redelivers the message.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use lapin::options::{BasicAckOptions, BasicNackOptions};
use polybus_core::{Error, Result};
use tokio::sync::{mpsc, oneshot, watch};

use crate::errors::alive as alive_channel;

/// Where a delivery tag above the floor stands.
#[derive(Debug)]
enum State<W> {
    /// Handed out, not settled yet.
    Held,
    /// Acked by polybus, waiting to be written (in a multiple ack or alone).
    Acked { waiter: W },
    /// A single ack or a nack for it is being written (once written, the tag
    /// moves to the book's `settled` runs).
    Sending,
}

/// What one flush writes. The multiple ack never covers a tag of `singles` or
/// `nacks` (they are all above it), so the three may be written in any order.
#[derive(Debug)]
pub(crate) struct Plan<W> {
    /// `basic.ack(tag, multiple = true)` and the waiters it answers; the
    /// waiter of `tag` itself is the last.
    pub(crate) multiple: Option<(u64, Vec<W>)>,
    /// `basic.ack(tag, multiple = false)` each.
    pub(crate) singles: Vec<(u64, W)>,
    /// `basic.nack(tag, requeue = true)` each.
    pub(crate) nacks: Vec<(u64, W)>,
}

impl<W> Plan<W> {
    /// Whether there is nothing to write.
    pub(crate) fn is_empty(&self) -> bool {
        self.multiple.is_none() && self.singles.is_empty() && self.nacks.is_empty()
    }
}

/// Why the book turned a settlement away (nothing is written for it).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The tag was not handed out on this channel, or was settled already.
    NotHeld,
}

/// The acknowledgement book of one channel: which delivery tags are held,
/// acked, being written or settled, and the floor below which every tag is
/// settled on the wire (or covered by a multiple ack already planned).
///
/// `W` is what waits for a tag's write (a reply channel in [`Acks`], anything
/// in tests).
#[derive(Debug)]
pub(crate) struct AckBook<W> {
    /// Every tag `<= floor` is settled (or in a multiple ack already planned).
    floor: u64,
    /// Tags above the floor the book has seen and not settled on the wire.
    tags: BTreeMap<u64, State<W>>,
    /// Tags above the floor settled on the wire on their own (single ack or
    /// nack written), as runs `start -> end` (inclusive), merged as they
    /// touch: with a stuck lowest tag, everything settled above it is one
    /// run, not one entry per tag.
    settled: BTreeMap<u64, u64>,
    /// Nacks to write at the next flush.
    releases: Vec<(u64, W)>,
    /// The acked tags, in the order (and with the time) they were acked;
    /// entries whose tag a multiple ack covered are dropped lazily.
    waiting: VecDeque<(Instant, u64)>,
    /// A blocking tag (the floor's successor) that made an ack wait out the
    /// bound: acks above it are written on their own at once.
    slow: Option<u64>,
    /// The channel is lost or the floor cannot advance: every later ack is
    /// written on its own.
    singles_only: bool,
}

/// How many entries (unsettled tags and settled runs) above the floor the
/// book keeps before it gives up coalescing on this channel (tags that never
/// reach the book, every other one, would otherwise hold the floor and keep
/// the settled runs apart, and the book would grow, forever). Twice the
/// largest prefetch AMQP can express.
const MAX_TRACKED: usize = 2 * (u16::MAX as usize + 1);

impl<W> Default for AckBook<W> {
    fn default() -> Self {
        AckBook {
            floor: 0,
            tags: BTreeMap::new(),
            settled: BTreeMap::new(),
            releases: Vec::new(),
            waiting: VecDeque::new(),
            slow: None,
            singles_only: false,
        }
    }
}

impl<W> AckBook<W> {
    /// A book for a new channel (delivery tags start at 1).
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// The highest tag below which everything is settled or planned.
    #[cfg(test)]
    pub(crate) fn floor(&self) -> u64 {
        self.floor
    }

    /// How many entries the book keeps above the floor.
    fn tracked(&self) -> usize {
        self.tags.len() + self.settled.len()
    }

    /// Whether `tag` is in a run settled on the wire.
    fn is_settled(&self, tag: u64) -> bool {
        self.settled
            .range(..=tag)
            .next_back()
            .is_some_and(|(_, &end)| end >= tag)
    }

    /// Adds `tag` to the settled runs, merging it with its neighbours.
    fn mark_settled(&mut self, tag: u64) {
        let (mut start, mut end) = (tag, tag);
        if let Some((&before, &last)) = self.settled.range(..tag).next_back()
            && last.checked_add(1) == Some(tag)
        {
            self.settled.remove(&before);
            start = before;
        }
        if let Some(next) = tag.checked_add(1)
            && let Some(last) = self.settled.remove(&next)
        {
            end = last;
        }
        self.settled.insert(start, end);
    }

    /// Records a delivery handed out on this channel. A tag seen before (or at
    /// or below the floor) is ignored: `false`.
    pub(crate) fn delivered(&mut self, tag: u64) -> bool {
        if tag <= self.floor || self.tags.contains_key(&tag) || self.is_settled(tag) {
            return false;
        }
        self.tags.insert(tag, State::Held);
        if self.tracked() > MAX_TRACKED {
            self.give_up_coalescing();
        }
        true
    }

    /// Polybus acked `tag`: it waits in the book until a flush writes it.
    pub(crate) fn ack(&mut self, tag: u64, waiter: W, now: Instant) -> std::result::Result<(), (Refused, W)> {
        match self.tags.get_mut(&tag) {
            Some(state @ State::Held) => {
                *state = State::Acked { waiter };
                self.waiting.push_back((now, tag));
                Ok(())
            }
            _ => Err((Refused::NotHeld, waiter)),
        }
    }

    /// Polybus released `tag`: its nack is written at the next flush, alone,
    /// and the floor cannot pass it before that write is done.
    pub(crate) fn release(&mut self, tag: u64, waiter: W) -> std::result::Result<(), (Refused, W)> {
        match self.tags.get_mut(&tag) {
            Some(state @ State::Held) => {
                *state = State::Sending;
                self.releases.push((tag, waiter));
                Ok(())
            }
            _ => Err((Refused::NotHeld, waiter)),
        }
    }

    /// A single ack or nack planned earlier is written: the floor may pass it.
    pub(crate) fn written(&mut self, tag: u64) {
        if !matches!(self.tags.get(&tag), Some(State::Sending)) {
            return;
        }
        self.tags.remove(&tag);
        // With coalescing given up nothing advances the floor any more: the
        // tag is forgotten.
        if !self.singles_only {
            self.mark_settled(tag);
            if self.tracked() > MAX_TRACKED {
                self.give_up_coalescing();
            }
        }
    }

    /// What to write now. Tags acked contiguously from the floor become one
    /// multiple ack; acks above a blocking tag are written alone once they
    /// have waited `bound` (at once when the blocker is known to be slow, or
    /// with `flush_all`); releases are always written at once.
    pub(crate) fn plan(&mut self, now: Instant, bound: Duration, flush_all: bool) -> Plan<W> {
        let nacks = std::mem::take(&mut self.releases);
        // The contiguous run from the floor: acked or already settled tags.
        let mut covered = Vec::new();
        let mut top = None;
        if !self.singles_only {
            while let Some(next) = self.floor.checked_add(1) {
                if let Some(end) = self.settled.remove(&next) {
                    self.floor = end;
                    continue;
                }
                let Some(entry) = self.tags.first_entry() else {
                    break;
                };
                if *entry.key() != next || !matches!(entry.get(), State::Acked { .. }) {
                    break;
                }
                let (tag, state) = entry.remove_entry();
                self.floor = tag;
                if let State::Acked { waiter, .. } = state {
                    covered.push(waiter);
                    top = Some(tag);
                }
            }
        }
        let multiple = top.map(|tag| (tag, covered));
        if self.slow.is_some_and(|slow| slow <= self.floor) {
            self.slow = None;
        }
        // Acks above the blocking tag, oldest first (entries of tags that
        // are no longer waiting are dropped on the way).
        self.drop_stale();
        let blocker = self.floor.saturating_add(1);
        let overdue = self
            .waiting
            .front()
            .is_some_and(|(since, _)| now.saturating_duration_since(*since) >= bound);
        if overdue && !flush_all {
            self.slow = Some(blocker);
        }
        let alone = flush_all || self.singles_only || self.slow == Some(blocker);
        let mut singles = Vec::new();
        while let Some(&(since, tag)) = self.waiting.front() {
            if !alone && now.saturating_duration_since(since) < bound {
                break;
            }
            self.waiting.pop_front();
            if let Some(state @ State::Acked { .. }) = self.tags.get_mut(&tag)
                && let State::Acked { waiter, .. } = std::mem::replace(state, State::Sending)
            {
                singles.push((tag, waiter));
            }
        }
        singles.sort_unstable_by_key(|(tag, _)| *tag);
        Plan {
            multiple,
            singles,
            nacks,
        }
    }

    /// Drops the oldest entries of `waiting` whose tag is no longer acked
    /// and waiting (a multiple ack covered it).
    fn drop_stale(&mut self) {
        while let Some((_, tag)) = self.waiting.front() {
            if matches!(self.tags.get(tag), Some(State::Acked { .. })) {
                break;
            }
            self.waiting.pop_front();
        }
    }

    /// When the oldest ack still waiting has waited `bound` (possibly
    /// earlier: an entry a multiple ack covered is only dropped by `plan`).
    /// `None` also when that instant is past, or at the edge of, what an
    /// `Instant` can hold (a bound such as `Duration::MAX`: the ack waits for
    /// the tags below it). The edge matters: tokio rounds a deadline up by
    /// almost 1 ms, which must not overflow either.
    pub(crate) fn next_deadline(&self, bound: Duration) -> Option<Instant> {
        self.waiting
            .front()
            .and_then(|(since, _)| since.checked_add(bound))
            .filter(|at| at.checked_add(Duration::from_secs(1)).is_some())
    }

    /// Every waiter still in the book (acked, not planned), for failing them.
    pub(crate) fn drain_waiters(&mut self) -> Vec<W> {
        self.waiting.clear();
        let mut waiters: Vec<W> = self.releases.drain(..).map(|(_, w)| w).collect();
        for state in self.tags.values_mut() {
            if let State::Acked { .. } = state
                && let State::Acked { waiter, .. } = std::mem::replace(state, State::Sending)
            {
                waiters.push(waiter);
            }
        }
        waiters
    }

    /// Stops coalescing on this channel: from now on every ack is planned
    /// alone (still only for tags the book holds).
    fn give_up_coalescing(&mut self) {
        if !self.singles_only {
            tracing::warn!(
                target: "polybus_rabbitmq",
                floor = self.floor,
                unsettled = self.tags.len(),
                settled_runs = self.settled.len(),
                "the ack book tracks too many entries (delivery tags that never reached it?); \
                 acks on this channel are written one by one"
            );
        }
        self.singles_only = true;
        self.settled.clear();
    }
}

/// An ack's or a release's wait for its write.
struct Waiter {
    operation: &'static str,
    /// lapin's acker of the delivery: its channel, single use, poisoned when
    /// the channel dies.
    acker: lapin::Acker,
    reply: oneshot::Sender<Result<()>>,
}

enum Command {
    Delivered(u64),
    Ack(u64, Waiter),
    Release(u64, Waiter),
    /// Makes the task panic (tests of the guard in `Acks::start`).
    #[cfg(test)]
    Panic,
}

/// The coalescing acknowledger of one channel: a handle on the task that
/// keeps the channel's [`AckBook`] and writes what it plans. Cloned into each
/// delivery's settlement handle; the task ends when every clone is gone or the
/// channel is lost.
#[derive(Clone)]
pub(crate) struct Acks {
    commands: mpsc::UnboundedSender<Command>,
}

impl Acks {
    /// Starts the task for `channel`. `alive` ends when the subscription sees
    /// the channel's connection lost.
    ///
    /// If the task ends while the channel is still open (a panic, or a write
    /// lapin refused on a live channel), the channel is closed: every ack
    /// from then on is `NotSettled`, and that must be true (the broker
    /// redelivers what the channel held, and the subscription, whose
    /// consumers end with the channel, reconnects) rather than leave the
    /// deliveries unacknowledged on an open channel until the prefetch fills.
    pub(crate) fn start(channel: lapin::Channel, alive: watch::Receiver<()>, bound: Duration) -> Self {
        use futures::FutureExt;
        let (commands, receiver) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let ran = std::panic::AssertUnwindSafe(run(receiver, channel.clone(), alive, bound))
                .catch_unwind()
                .await;
            let lost_by_lapin = matches!(ran, Ok(Ended::Lost));
            if !lost_by_lapin && alive_channel(&channel) {
                tracing::error!(
                    target: "polybus_rabbitmq",
                    panicked = ran.is_err(),
                    "the ack task of an open channel ended; closing the channel so the broker redelivers what it holds"
                );
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    channel.close(
                        200,
                        "polybus: acks can no longer be written on this channel".into(),
                    ),
                )
                .await;
            }
        });
        Acks { commands }
    }

    #[cfg(test)]
    fn panic_task(&self) {
        let _ = self.commands.send(Command::Panic);
    }

    /// Records a delivery before it is handed out.
    pub(crate) fn delivered(&self, tag: u64) {
        let _ = self.commands.send(Command::Delivered(tag));
    }

    /// Acks `tag`; resolves once a frame that acknowledges it is written.
    pub(crate) async fn ack(&self, tag: u64, acker: lapin::Acker) -> Result<()> {
        self.settle("ack", |waiter| Command::Ack(tag, waiter), acker)
            .await
    }

    /// Releases `tag` (`basic.nack` with requeue); resolves once it is written.
    pub(crate) async fn release(&self, tag: u64, acker: lapin::Acker) -> Result<()> {
        self.settle("release", |waiter| Command::Release(tag, waiter), acker)
            .await
    }

    async fn settle(
        &self,
        operation: &'static str,
        command: impl FnOnce(Waiter) -> Command,
        acker: lapin::Acker,
    ) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        if self
            .commands
            .send(command(Waiter {
                operation,
                acker,
                reply,
            }))
            .is_err()
        {
            return Err(lost(operation));
        }
        answer.await.unwrap_or_else(|_| Err(lost(operation)))
    }
}

fn lost(operation: &'static str) -> Error {
    Error::NotSettled {
        operation,
        reason: "the delivery's channel is gone; the broker redelivers it".into(),
    }
}

fn refused(operation: &'static str) -> Error {
    Error::NotSettled {
        operation,
        reason: "the delivery is not held on its channel (settled already?); nothing was written".into(),
    }
}

/// lapin's answer as polybus's: `Ok(false)` is a poisoned (channel closed) or
/// used acker, `Err` a channel that ended while writing; either way nothing
/// was settled and the broker redelivers.
pub(crate) fn outcome(operation: &'static str, result: &lapin::Result<bool>) -> Result<()> {
    match result {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::NotSettled {
            operation,
            reason: "the delivery's channel was closed; the broker redelivers it".into(),
        }),
        Err(e) => Err(Error::NotSettled {
            operation,
            reason: format!("the delivery's channel ended while settling ({e}); the broker redelivers it"),
        }),
    }
}

/// Resolves when the channel is gone: the subscription saw its connection
/// lost, or its status says so (checked every 100 ms: lapin does not always
/// resolve a write queued as its connection fails).
async fn channel_lost(channel: &lapin::Channel, alive: &mut watch::Receiver<()>) {
    let polling = async {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if !alive_channel(channel) {
                return;
            }
        }
    };
    tokio::select! {
        _ = alive.changed() => {}
        _ = polling => {}
    }
}

fn answer(waiter: Waiter, result: Result<()>) {
    let _ = waiter.reply.send(result);
}

/// What woke the task.
enum Wake {
    Command(Command),
    /// Every handle is gone.
    Closed,
    /// The oldest waiting ack has waited the bound.
    Deadline,
    Lost,
}

/// How the task ended.
enum Ended {
    /// The channel or its connection was lost (or every handle is gone).
    Lost,
    /// A write failed on a channel that may still be open.
    WriteFailed,
}

async fn run(
    mut commands: mpsc::UnboundedReceiver<Command>,
    channel: lapin::Channel,
    mut alive: watch::Receiver<()>,
    bound: Duration,
) -> Ended {
    let mut book: AckBook<Waiter> = AckBook::new();
    loop {
        let deadline = book.next_deadline(bound);
        let wake = tokio::select! {
            biased;
            _ = alive.changed() => Wake::Lost,
            command = commands.recv() => command.map_or(Wake::Closed, Wake::Command),
            () = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            } => Wake::Deadline,
        };
        let mut open = true;
        match wake {
            Wake::Lost => {
                fail_all(&mut book, &mut commands);
                return Ended::Lost;
            }
            Wake::Closed => open = false,
            Wake::Deadline => {}
            Wake::Command(command) => {
                apply(&mut book, command);
                // Whatever else is queued joins this flush.
                loop {
                    match commands.try_recv() {
                        Ok(command) => apply(&mut book, command),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                }
            }
        }
        // Once every handle is gone nothing more can be acked: whatever is
        // waiting is written alone (held tags stay with the broker). A write
        // that settled tags alone (a nack, single acks) may let the floor
        // pass them: plan again at once, or acks waiting above a released tag
        // would wait for the next command or the bound.
        loop {
            let plan = book.plan(Instant::now(), bound, !open);
            if plan.is_empty() {
                break;
            }
            let settled_alone = !plan.singles.is_empty() || !plan.nacks.is_empty();
            if !write(&mut book, plan, &channel, &mut alive).await {
                fail_all(&mut book, &mut commands);
                return Ended::WriteFailed;
            }
            if !settled_alone {
                break;
            }
        }
        if !open {
            for waiter in book.drain_waiters() {
                let operation = waiter.operation;
                answer(waiter, Err(lost(operation)));
            }
            return Ended::Lost;
        }
    }
}

fn apply(book: &mut AckBook<Waiter>, command: Command) {
    match command {
        Command::Delivered(tag) => {
            book.delivered(tag);
        }
        Command::Ack(tag, waiter) => {
            if let Err((_, waiter)) = book.ack(tag, waiter, Instant::now()) {
                answer(waiter, Err(refused("ack")));
            }
        }
        Command::Release(tag, waiter) => {
            if let Err((_, waiter)) = book.release(tag, waiter) {
                answer(waiter, Err(refused("release")));
            }
        }
        #[cfg(test)]
        Command::Panic => panic!("ack task: panic requested by a test"),
    }
}

/// Writes a plan (its parts are disjoint, so concurrently) and answers its
/// waiters. `false` when the channel is lost: nothing more can be settled.
async fn write(
    book: &mut AckBook<Waiter>,
    plan: Plan<Waiter>,
    channel: &lapin::Channel,
    alive: &mut watch::Receiver<()>,
) -> bool {
    let Plan {
        multiple,
        singles,
        nacks,
    } = plan;
    let requeue = BasicNackOptions {
        requeue: true,
        ..Default::default()
    };
    // The multiple ack goes through the acker of its top tag, so a poisoned
    // channel refuses it like any other settlement.
    let multiple_write = async {
        match &multiple {
            Some((_, waiters)) => match waiters.last() {
                Some(top) if waiters.len() > 1 => {
                    Some(top.acker.ack(BasicAckOptions { multiple: true }).await)
                }
                Some(top) => Some(top.acker.ack(BasicAckOptions::default()).await),
                None => None,
            },
            None => None,
        }
    };
    let single_writes = futures::future::join_all(
        singles
            .iter()
            .map(|(_, waiter)| waiter.acker.ack(BasicAckOptions::default())),
    );
    let nack_writes = futures::future::join_all(nacks.iter().map(|(_, waiter)| waiter.acker.nack(requeue)));
    let writes = async { futures::join!(multiple_write, single_writes, nack_writes) };
    let written = tokio::select! {
        biased;
        written = writes => Some(written),
        () = channel_lost(channel, alive) => None,
    };
    let Some((multiple_result, single_results, nack_results)) = written else {
        if let Some((_, waiters)) = multiple {
            for waiter in waiters {
                answer(waiter, Err(lost("ack")));
            }
        }
        for (_, waiter) in singles {
            answer(waiter, Err(lost("ack")));
        }
        for (_, waiter) in nacks {
            answer(waiter, Err(lost("release")));
        }
        return false;
    };
    let mut healthy = true;
    if let (Some((_, waiters)), Some(result)) = (multiple, multiple_result) {
        healthy &= matches!(result, Ok(true));
        for waiter in waiters {
            answer(waiter, outcome("ack", &result));
        }
    }
    for ((tag, waiter), result) in singles.into_iter().zip(single_results) {
        healthy &= matches!(result, Ok(true));
        book.written(tag);
        answer(waiter, outcome("ack", &result));
    }
    for ((tag, waiter), result) in nacks.into_iter().zip(nack_results) {
        healthy &= matches!(result, Ok(true));
        book.written(tag);
        answer(waiter, outcome("release", &result));
    }
    healthy
}

/// The channel is lost: every waiter gets `NotSettled`, and so does every
/// command still queued (later ones find the task gone).
fn fail_all(book: &mut AckBook<Waiter>, commands: &mut mpsc::UnboundedReceiver<Command>) {
    commands.close();
    for waiter in book.drain_waiters() {
        let operation = waiter.operation;
        answer(waiter, Err(lost(operation)));
    }
    while let Ok(command) = commands.try_recv() {
        match command {
            Command::Delivered(_) => {}
            Command::Ack(_, waiter) => answer(waiter, Err(lost("ack"))),
            Command::Release(_, waiter) => answer(waiter, Err(lost("release"))),
            #[cfg(test)]
            Command::Panic => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: Duration = Duration::from_millis(2);

    fn book(tags: std::ops::RangeInclusive<u64>) -> AckBook<u64> {
        let mut book = AckBook::new();
        for tag in tags {
            assert!(book.delivered(tag));
        }
        book
    }

    fn ack(book: &mut AckBook<u64>, tags: &[u64], now: Instant) {
        for &tag in tags {
            book.ack(tag, tag, now).unwrap();
        }
    }

    /// Writes a plan the way the task does: singles and nacks are settled on
    /// the wire once written.
    fn written(book: &mut AckBook<u64>, plan: &Plan<u64>) {
        for (tag, _) in plan.singles.iter().chain(&plan.nacks) {
            book.written(*tag);
        }
    }

    fn singles(plan: &Plan<u64>) -> Vec<u64> {
        plan.singles.iter().map(|(t, _)| *t).collect()
    }

    #[test]
    fn contiguous_acks_become_one_multiple_ack() {
        let now = Instant::now();
        let mut book = book(1..=5);
        ack(&mut book, &[3, 1, 2, 5, 4], now);
        let plan = book.plan(now, BOUND, false);
        let (top, waiters) = plan.multiple.as_ref().unwrap();
        assert_eq!(*top, 5);
        assert_eq!(
            waiters,
            &vec![1, 2, 3, 4, 5],
            "every waiter answered, the top tag last"
        );
        assert!(plan.singles.is_empty() && plan.nacks.is_empty());
        assert_eq!(book.floor(), 5);
        assert!(book.plan(now, BOUND, false).is_empty());
    }

    #[test]
    fn out_of_order_acks_wait_for_the_lower_tag_then_coalesce() {
        let now = Instant::now();
        let mut book = book(1..=6);
        ack(&mut book, &[2, 3, 5], now);
        let plan = book.plan(now, BOUND, false);
        assert!(
            plan.is_empty(),
            "tag 1 is still held: nothing may cover 2 and 3 yet"
        );
        assert_eq!(book.next_deadline(BOUND), Some(now + BOUND));
        ack(&mut book, &[1], now + Duration::from_micros(100));
        let plan = book.plan(now + Duration::from_micros(200), BOUND, false);
        assert_eq!(plan.multiple.as_ref().map(|(t, _)| *t), Some(3));
        assert!(plan.singles.is_empty(), "5 waits for 4 (within the bound)");
        assert_eq!(book.floor(), 3);
        ack(&mut book, &[4, 6], now + Duration::from_micros(300));
        let plan = book.plan(now + Duration::from_micros(400), BOUND, false);
        assert_eq!(plan.multiple.as_ref().map(|(t, _)| *t), Some(6));
        assert_eq!(book.floor(), 6);
    }

    #[test]
    fn a_release_in_the_middle_breaks_the_run_and_is_written_first() {
        let now = Instant::now();
        let mut book = book(1..=10);
        // Everything but 5 is acked before 5 is released.
        ack(&mut book, &[1, 2, 3, 4, 6, 7, 8, 9, 10], now);
        let plan = book.plan(now, BOUND, false);
        assert_eq!(
            plan.multiple.as_ref().map(|(t, _)| *t),
            Some(4),
            "stops below the held tag"
        );
        book.release(5, 5).unwrap();
        let plan = book.plan(now, BOUND, false);
        assert_eq!(plan.nacks.iter().map(|(t, _)| *t).collect::<Vec<_>>(), vec![5]);
        assert!(
            plan.multiple.is_none(),
            "5 is being nacked: no multiple ack may cover it yet"
        );
        assert!(
            plan.singles.is_empty(),
            "6..10 wait (within the bound) for the nack to be written"
        );
        written(&mut book, &plan);
        let plan = book.plan(now, BOUND, false);
        let (top, waiters) = plan.multiple.as_ref().unwrap();
        assert_eq!((*top, waiters.clone()), (10, vec![6, 7, 8, 9, 10]));
        assert_eq!(book.floor(), 10);
    }

    #[test]
    fn a_release_is_never_delayed_and_never_swallowed() {
        let now = Instant::now();
        let mut book = book(1..=3);
        book.release(2, 2).unwrap();
        ack(&mut book, &[1, 3], now);
        let plan = book.plan(now, BOUND, false);
        assert_eq!(plan.nacks.iter().map(|(t, _)| *t).collect::<Vec<_>>(), vec![2]);
        // 1 may go (as an ack of 1 alone), 3 may not be covered by it.
        assert_eq!(plan.multiple.as_ref().map(|(t, _)| *t), Some(1));
        assert!(plan.singles.is_empty());
        // The nack is not written yet: past the bound, 3 goes alone rather
        // than in a multiple ack that would cover 2.
        let plan = book.plan(now + BOUND, BOUND, false);
        assert!(plan.multiple.is_none());
        assert_eq!(singles(&plan), vec![3]);
    }

    #[test]
    fn a_slow_lower_tag_delays_the_others_by_one_bound_only() {
        let start = Instant::now();
        let mut book = book(1..=1000);
        ack(&mut book, &(2..=500).collect::<Vec<_>>(), start);
        assert!(book.plan(start, BOUND, false).is_empty());
        // Past the bound they go one by one; tag 1 is now known to be slow.
        let later = start + BOUND;
        let plan = book.plan(later, BOUND, false);
        assert!(plan.multiple.is_none());
        assert_eq!(singles(&plan), (2..=500).collect::<Vec<_>>());
        written(&mut book, &plan);
        // Later acks above the slow tag do not wait at all.
        ack(&mut book, &[501, 502], later);
        let plan = book.plan(later, BOUND, false);
        assert_eq!(singles(&plan), vec![501, 502]);
        written(&mut book, &plan);
        // Tag 1 is acked at last: one ack covers it (everything above it up
        // to 502 was settled alone), and the floor moves past them.
        ack(&mut book, &[1], later);
        let plan = book.plan(later, BOUND, false);
        let (top, waiters) = plan.multiple.as_ref().unwrap();
        assert_eq!((*top, waiters.len()), (1, 1));
        assert_eq!(book.floor(), 502);
        // Coalescing resumes above it.
        ack(&mut book, &[504, 503], later);
        let plan = book.plan(later, BOUND, false);
        assert_eq!(plan.multiple.as_ref().map(|(t, _)| *t), Some(504));
        assert!(plan.singles.is_empty());
    }

    #[test]
    fn a_tag_not_handed_out_yet_holds_the_floor() {
        // Two consumers on one channel: tag 2 is still in the other
        // consumer's buffer when 3 is acked.
        let now = Instant::now();
        let mut book = AckBook::new();
        book.delivered(1);
        book.delivered(3);
        ack(&mut book, &[1, 3], now);
        let plan = book.plan(now, BOUND, false);
        assert_eq!(plan.multiple.as_ref().map(|(t, _)| *t), Some(1));
        assert_eq!(book.floor(), 1, "2 is unknown: 3 must not be covered");
        book.delivered(2);
        ack(&mut book, &[2], now);
        let plan = book.plan(now, BOUND, false);
        assert_eq!(plan.multiple.as_ref().map(|(t, _)| *t), Some(3));
    }

    #[test]
    fn a_single_ack_being_written_is_never_covered_by_a_multiple_ack() {
        let start = Instant::now();
        let mut book = book(1..=3);
        ack(&mut book, &[2], start);
        let plan = book.plan(start + BOUND, BOUND, false);
        assert_eq!(singles(&plan), vec![2]);
        // 1 and 3 are acked while 2's single ack is still being written: a
        // multiple ack up to 3 written before it would make the broker see 2
        // as an unknown tag and close the channel.
        ack(&mut book, &[1, 3], start + BOUND);
        let during = book.plan(start + BOUND, BOUND, false);
        assert_eq!(during.multiple.as_ref().map(|(t, _)| *t), Some(1));
        assert!(during.singles.iter().all(|(t, _)| *t != 2));
        written(&mut book, &plan);
        written(&mut book, &during);
        let after = book.plan(start + BOUND, BOUND, false);
        assert_eq!(book.floor(), 3);
        // 3 went alone (2 was slow) or in this ack: never twice.
        let three = during.singles.iter().filter(|(t, _)| *t == 3).count()
            + after.multiple.iter().filter(|(t, _)| *t == 3).count()
            + after.singles.iter().filter(|(t, _)| *t == 3).count();
        assert_eq!(three, 1);
    }

    #[test]
    fn duplicates_and_unknown_tags_write_nothing() {
        let now = Instant::now();
        let mut book = book(1..=2);
        assert!(!book.delivered(2), "a tag is recorded once");
        ack(&mut book, &[1], now);
        assert_eq!(book.ack(1, 11, now), Err((Refused::NotHeld, 11)), "acked twice");
        assert_eq!(
            book.release(1, 12),
            Err((Refused::NotHeld, 12)),
            "released after its ack"
        );
        assert_eq!(
            book.ack(7, 7, now),
            Err((Refused::NotHeld, 7)),
            "never handed out"
        );
        let plan = book.plan(now, BOUND, false);
        assert_eq!(
            plan.multiple.as_ref().map(|(t, w)| (*t, w.clone())),
            Some((1, vec![1]))
        );
        assert_eq!(
            book.ack(1, 13, now),
            Err((Refused::NotHeld, 13)),
            "below the floor"
        );
        assert!(!book.delivered(1), "below the floor");
        book.release(2, 2).unwrap();
        assert_eq!(
            book.ack(2, 14, now),
            Err((Refused::NotHeld, 14)),
            "acked after its release"
        );
    }

    #[test]
    fn a_new_channel_starts_a_book_of_its_own() {
        // The old channel's book is not consulted for the new channel's tags:
        // tag 1 of the new channel is not tag 1 of the old one.
        let now = Instant::now();
        let mut old = book(1..=3);
        ack(&mut old, &[2, 3], now);
        let mut new = book(1..=1);
        ack(&mut new, &[1], now);
        let plan = new.plan(now, BOUND, false);
        assert_eq!(
            plan.multiple.as_ref().map(|(t, w)| (*t, w.clone())),
            Some((1, vec![1]))
        );
        assert!(
            old.plan(now, BOUND, false).is_empty(),
            "the old channel's 1 is still held"
        );
        // When the old channel is lost, its waiters are failed, not written.
        let mut waiters = old.drain_waiters();
        waiters.sort_unstable();
        assert_eq!(waiters, vec![2, 3]);
        assert!(old.plan(now + BOUND, BOUND, false).is_empty());
    }

    #[test]
    fn flushing_everything_writes_every_ack_and_skips_held_tags() {
        let now = Instant::now();
        let mut book = book(1..=5);
        ack(&mut book, &[1, 2, 4, 5], now);
        let plan = book.plan(now, BOUND, true);
        assert_eq!(plan.multiple.as_ref().map(|(t, _)| *t), Some(2));
        assert_eq!(singles(&plan), vec![4, 5]);
    }

    #[test]
    fn a_bound_past_what_an_instant_holds_does_not_panic() {
        // `ack_coalescing(Some(Duration::MAX))`: the deadline of an ack above
        // a held tag overflowed `Instant` and panicked the channel's ack task,
        // after which every ack on the (still open) channel was `NotSettled`.
        let now = Instant::now();
        let mut book = book(1..=2);
        ack(&mut book, &[2], now);
        assert!(book.plan(now, Duration::MAX, false).is_empty());
        assert_eq!(book.next_deadline(Duration::MAX), None);
        ack(&mut book, &[1], now);
        let plan = book.plan(now, Duration::MAX, false);
        assert_eq!(plan.multiple.as_ref().map(|(t, _)| *t), Some(2));
    }

    #[test]
    fn a_long_stuck_head_neither_grows_the_book_nor_ends_coalescing() {
        // One handler runs for the whole of a long run (tag 1): everything
        // above it is acked alone and settled while it holds the floor. The
        // book kept every one of those tags, and past 2 x 65,536 of them gave
        // up coalescing on the channel for good, even after tag 1 was acked.
        let start = Instant::now();
        let mut book = book(1..=1);
        let last = MAX_TRACKED as u64 + 1_000;
        let mut largest = 0;
        for tag in 2..=last {
            assert!(book.delivered(tag));
            book.ack(tag, tag, start).unwrap();
            let plan = book.plan(start + BOUND, BOUND, false);
            assert_eq!(singles(&plan), vec![tag]);
            written(&mut book, &plan);
            largest = largest.max(book.tracked());
        }
        assert!(
            largest <= 4,
            "tags settled alone above the stuck head are kept one by one: {largest}"
        );
        ack(&mut book, &[1], start + BOUND);
        let plan = book.plan(start + BOUND, BOUND, false);
        assert_eq!(plan.multiple.as_ref().map(|(t, _)| *t), Some(1));
        assert_eq!(book.floor(), last);
        // Coalescing resumes once the head is settled.
        let tags: Vec<u64> = (last + 1..=last + 10).collect();
        for &tag in &tags {
            book.delivered(tag);
        }
        ack(&mut book, &tags, start + BOUND);
        let plan = book.plan(start + BOUND, BOUND, false);
        assert_eq!(plan.multiple.as_ref().map(|(t, _)| *t), Some(last + 10));
        assert!(plan.singles.is_empty());
    }

    #[tokio::test]
    async fn a_deadline_at_the_edge_of_what_an_instant_holds_is_sleepable() {
        // tokio rounds a deadline up by just under 1 ms (`t + 999_999 ns`),
        // so a deadline that an `Instant` barely holds panicked the timer
        // (and with it the channel's ack task).
        let now = Instant::now();
        let (mut low, mut high) = (Duration::ZERO, Duration::MAX);
        while high - low > Duration::from_nanos(1) {
            let mid = low + (high - low) / 2;
            if now.checked_add(mid).is_some() {
                low = mid;
            } else {
                high = mid;
            }
        }
        let mut book = book(1..=2);
        ack(&mut book, &[2], now);
        for bound in [low, low - Duration::from_micros(500)] {
            if let Some(at) = book.next_deadline(bound) {
                let sleeping = tokio::spawn(tokio::time::sleep_until(at.into()));
                tokio::time::sleep(Duration::from_millis(5)).await;
                sleeping.abort();
                let ended = sleeping.await;
                assert!(
                    ended.as_ref().is_err_and(|e| e.is_cancelled()),
                    "the deadline's timer failed: {ended:?}"
                );
            }
        }
    }

    /// The guard in `Acks::start`: an ack task that ends (here: panics)
    /// while its channel is open closes the channel, so what it held is
    /// redelivered and the subscription reconnects, instead of every later
    /// ack being `NotSettled` on a channel that stays open (the wedge the
    /// `Instant` overflows caused). Needs the broker
    /// (`POLYBUS_TEST_AMQP_URL`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_ack_task_that_ends_on_an_open_channel_closes_it() {
        let Some(url) = polybus_conformance::broker_url(
            "POLYBUS_TEST_AMQP_URL",
            "an_ack_task_that_ends_on_an_open_channel_closes_it",
        ) else {
            return;
        };
        let connection = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        let (alive_sender, alive) = watch::channel(());
        let acks = Acks::start(channel.clone(), alive, BOUND);
        acks.panic_task();
        let until = Instant::now() + Duration::from_secs(5);
        while alive_channel(&channel) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let closed = !alive_channel(&channel);
        let _ = connection.close(200, "bye".into()).await;
        drop(alive_sender);
        assert!(closed, "the channel stayed open with its ack task gone");
    }

    #[test]
    fn tags_are_u64_and_large_ones_work() {
        let now = Instant::now();
        let mut book = AckBook::new();
        book.floor = u64::MAX - 3;
        for tag in u64::MAX - 2..=u64::MAX - 1 {
            assert!(book.delivered(tag));
        }
        ack(&mut book, &[u64::MAX - 1, u64::MAX - 2], now);
        let plan = book.plan(now, BOUND, false);
        assert_eq!(plan.multiple.as_ref().map(|(t, _)| *t), Some(u64::MAX - 1));
    }

    #[test]
    fn tags_that_never_arrive_stop_coalescing_instead_of_growing_the_book() {
        let now = Instant::now();
        let mut book = AckBook::new();
        // Every other tag (1, 3, 5, ...) never reaches the book: the tags
        // settled alone between them cannot merge into runs.
        let mut tag = 2;
        while !book.singles_only {
            book.delivered(tag);
            book.ack(tag, tag, now).unwrap();
            let plan = book.plan(now + BOUND, BOUND, false);
            written(&mut book, &plan);
            tag += 2;
        }
        assert!(book.tracked() <= MAX_TRACKED);
        assert!(book.settled.is_empty());
        book.delivered(tag);
        ack(&mut book, &[tag], now);
        let plan = book.plan(now, BOUND, false);
        assert_eq!(singles(&plan), vec![tag]);
        assert!(plan.multiple.is_none());
    }

    #[test]
    fn settled_runs_merge_in_any_order() {
        let now = Instant::now();
        let mut book = book(1..=7);
        for tag in [5, 3, 6, 4, 2] {
            book.release(tag, tag).unwrap();
            let plan = book.plan(now, BOUND, false);
            written(&mut book, &plan);
        }
        assert_eq!(book.settled.len(), 1, "{:?}", book.settled);
        ack(&mut book, &[1], now);
        let plan = book.plan(now, BOUND, false);
        assert_eq!(plan.multiple.as_ref().map(|(t, _)| *t), Some(1));
        assert_eq!(book.floor(), 6);
        assert!(!book.delivered(4), "settled already");
    }

    /// A small deterministic generator (no test dependency for it).
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n.max(1)
        }
    }

    /// The broker's side of one channel: what it holds unacknowledged, with
    /// RabbitMQ's rules (a multiple ack settles every unacked tag up to its
    /// own, which must be unacked; any other unknown tag closes the channel).
    #[derive(Default)]
    struct Broker {
        unacked: std::collections::BTreeSet<u64>,
        next: u64,
    }

    /// Random interleavings of deliveries (handed out in any order, as with
    /// several consumers on a channel), acks, releases, flushes, writes that
    /// finish later and the passing of time, against a model of the broker:
    /// no frame may name a tag the broker does not hold (406, a redelivery
    /// storm), no multiple ack may cover a tag polybus has not acked (loss),
    /// every ack and release is answered once, and everything acked is
    /// settled in the end.
    #[test]
    fn random_interleavings_never_cover_an_unacked_tag_or_name_an_unknown_one() {
        for seed in 1..=300u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let mut broker = Broker::default();
            let mut book: AckBook<u64> = AckBook::new();
            let start = Instant::now();
            let mut now = start;
            let mut buffered: Vec<u64> = Vec::new();
            let mut held: Vec<u64> = Vec::new();
            let mut acked = std::collections::BTreeSet::new();
            let mut released = std::collections::BTreeSet::new();
            let mut answered = std::collections::BTreeSet::new();
            let mut writing: Vec<u64> = Vec::new();
            let steps = 400 + rng.below(400);
            let apply = |plan: Plan<u64>,
                         broker: &mut Broker,
                         acked: &std::collections::BTreeSet<u64>,
                         released: &std::collections::BTreeSet<u64>,
                         answered: &mut std::collections::BTreeSet<u64>,
                         writing: &mut Vec<u64>| {
                if let Some((top, waiters)) = plan.multiple {
                    assert!(
                        broker.unacked.contains(&top),
                        "seed {seed}: multiple ack of unknown tag {top}"
                    );
                    let covered: Vec<u64> = broker.unacked.range(..=top).copied().collect();
                    for tag in &covered {
                        assert!(
                            acked.contains(tag),
                            "seed {seed}: multiple ack {top} covers {tag}, not acked"
                        );
                        broker.unacked.remove(tag);
                    }
                    assert_eq!(waiters.last(), Some(&top));
                    for w in waiters {
                        assert!(answered.insert(w), "seed {seed}: {w} answered twice");
                    }
                }
                for (tag, w) in plan.singles {
                    assert!(
                        acked.contains(&tag),
                        "seed {seed}: single ack of {tag}, not acked"
                    );
                    assert!(
                        broker.unacked.remove(&tag),
                        "seed {seed}: single ack of unknown tag {tag}"
                    );
                    assert!(answered.insert(w), "seed {seed}: {w} answered twice");
                    writing.push(tag);
                }
                for (tag, w) in plan.nacks {
                    assert!(
                        released.contains(&tag),
                        "seed {seed}: nack of {tag}, not released"
                    );
                    assert!(
                        broker.unacked.remove(&tag),
                        "seed {seed}: nack of unknown tag {tag}"
                    );
                    assert!(answered.insert(w), "seed {seed}: {w} answered twice");
                    writing.push(tag);
                }
            };
            for _ in 0..steps {
                match rng.below(10) {
                    0 | 1 => {
                        broker.next += 1;
                        broker.unacked.insert(broker.next);
                        buffered.push(broker.next);
                    }
                    2 | 3 if !buffered.is_empty() => {
                        // Another consumer's buffer may be taken first.
                        let i = rng.below(buffered.len().min(3) as u64) as usize;
                        let tag = buffered.remove(i);
                        assert!(book.delivered(tag));
                        held.push(tag);
                    }
                    4 | 5 if !held.is_empty() => {
                        let tag = held.swap_remove(rng.below(held.len() as u64) as usize);
                        book.ack(tag, tag, now).unwrap();
                        acked.insert(tag);
                    }
                    6 if !held.is_empty() => {
                        let tag = held.swap_remove(rng.below(held.len() as u64) as usize);
                        book.release(tag, tag).unwrap();
                        released.insert(tag);
                    }
                    7 => {
                        // The previous flush's writes finish; a new one starts.
                        for tag in writing.drain(..) {
                            book.written(tag);
                        }
                        let plan = book.plan(now, BOUND, rng.below(20) == 0);
                        apply(plan, &mut broker, &acked, &released, &mut answered, &mut writing);
                    }
                    _ => now += Duration::from_micros(rng.below(3000)),
                }
            }
            // The end: everything handed out is settled, then flushed.
            for tag in buffered.drain(..) {
                assert!(book.delivered(tag));
                held.push(tag);
            }
            for tag in held.drain(..) {
                book.ack(tag, tag, now).unwrap();
                acked.insert(tag);
            }
            for _ in 0..4 {
                for tag in writing.drain(..) {
                    book.written(tag);
                }
                let plan = book.plan(now, BOUND, true);
                apply(plan, &mut broker, &acked, &released, &mut answered, &mut writing);
            }
            assert!(
                broker.unacked.is_empty(),
                "seed {seed}: left unacked {:?}",
                broker.unacked
            );
            assert_eq!(answered.len(), acked.len() + released.len(), "seed {seed}");
        }
    }
}
