//! A subscription: one librdkafka consumer polled on a thread of its own, the
//! offsets it has handed out, and their commits.
//!
//! The poll thread owns the consumer. Rebalance callbacks run on it, inside
//! `poll`, so a revocation can block there — send `Event::Revoked` to the
//! runner, wait (bounded) until the runner has finished or given back every
//! message of the revoked partitions, commit, and only then let librdkafka hand
//! the partitions to another member. The async side ([`KafkaSubscription::next`])
//! reads what the thread sends through a channel; acks and releases update the
//! shared offset book directly.
//!
//! Per partition, the book holds every offset fetched and not yet acked. The
//! commit position is the lowest of them, or the offset after the last one
//! fetched when none is held: a commit never passes an unsettled message.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use polybus_core::{
    AckHandle, Acker, Bytes, Delivery, Error, Event, Origin, Partition, Result, SubscribeOptions,
    Subscription, async_trait, wire,
};
use rdkafka::client::ClientContext;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::consumer::consumer_config;
use crate::{BACKEND, KafkaConfig, map_error};

/// How a subscription starts.
pub(crate) enum Start {
    /// As a member of this consumer group (its offsets are already fixed).
    Group(String),
    /// In no group: these partitions from these offsets (topic, partition, offset).
    Assign(Vec<(String, i32, i64)>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Fetched, not yet handed to the runner (in the channel or to redeliver).
    Queued,
    /// Handed to the runner, not settled.
    Yielded,
    /// Given back while its partition is being revoked or the subscription closed.
    Released,
}

/// The offset book of one assigned partition.
struct Part {
    generation: u64,
    offsets: BTreeMap<i64, Status>,
    /// The offset after the last one fetched.
    next: Option<i64>,
    /// The last position sent in a commit.
    sent: Option<i64>,
    revoking: bool,
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
    fn position(&self) -> Option<i64> {
        self.offsets.keys().next().copied().or(self.next)
    }

    fn yielded(&self) -> usize {
        self.offsets.values().filter(|s| **s == Status::Yielded).count()
    }
}

/// A message the runner gave back, to be handed out again.
struct Redelivery {
    delivery: Delivery,
    topic: Arc<str>,
    partition: i32,
    generation: u64,
    offset: i64,
}

#[derive(Default)]
struct State {
    /// Topic → partition → book.
    topics: HashMap<String, (Arc<str>, HashMap<i32, Part>)>,
    /// Offsets fetched and not handed out yet (in the channel or to redeliver).
    queued: usize,
    /// Offsets handed out and not settled.
    yielded: usize,
    redeliver: VecDeque<Redelivery>,
    generation: u64,
    closing: bool,
    crashed: bool,
    /// Positions whose commit at a revocation failed (some brokers refuse
    /// commits while the group rebalances): if the partition comes back to this
    /// member at the next assignment, it restarts there (and commits it) instead
    /// of at the older committed offset.
    carried: HashMap<(String, i32), i64>,
    /// Assignments, revocations and errors for the runner, ahead of deliveries.
    controls: VecDeque<Result<Event>>,
    /// The poll thread has stopped.
    ended: bool,
    /// It stopped on a fatal error (the last offsets were not committed).
    fatal: bool,
}

impl State {
    fn part(&mut self, topic: &str, partition: i32) -> Option<&mut Part> {
        self.topics
            .get_mut(topic)
            .and_then(|(_, parts)| parts.get_mut(&partition))
    }

    fn remove_part(&mut self, topic: &str, partition: i32) {
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

    /// Commit positions that moved since they were last sent (`all`: every one).
    fn positions(&mut self, all: bool) -> TopicPartitionList {
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

/// What the poll thread is told.
enum Command {
    /// Credit was freed: resume.
    Wake,
    /// Commit, leave the group and stop; answer when done.
    Close(oneshot::Sender<Result<()>>),
    /// The subscription was dropped: stop without committing.
    Crash,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a delivery is settled (a revocation waits on it).
    settled: Condvar,
    /// Wakes `next` when a released message is ready to be handed out again.
    redelivered: Notify,
    /// Wakes `next` when a delivery is settled (it waits while `prefetch` are out).
    freed: Notify,
    /// Wakes `next` and `control` when a control event is queued.
    control_ready: Notify,
    commands: Mutex<std_mpsc::Sender<Command>>,
    /// Whether the poll thread stopped taking messages for lack of room.
    starved: AtomicBool,
    /// A librdkafka queue per assigned partition, split off the consumer queue
    /// in the rebalance callback before the partition is assigned (so nothing
    /// of it ever reaches the consumer queue). They hold the consumer: the poll
    /// thread clears them before it drops it.
    queues: Mutex<Vec<(String, i32, PartitionQueue<Context>)>>,
    /// How many deliveries may be handed out and unsettled at once.
    prefetch: usize,

    group: Option<String>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an event for the runner ahead of any delivery.
    fn push_control(&self, event: Result<Event>) {
        self.lock().controls.push_back(event);
        self.control_ready.notify_one();
    }

    fn queues(&self) -> MutexGuard<'_, Vec<(String, i32, PartitionQueue<Context>)>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn command(&self, command: Command) {
        let _ = self
            .commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(command);
    }

    /// At or below this many queued messages, a starved poll thread takes more.
    fn resume_at(&self) -> usize {
        self.prefetch / 2
    }

    /// Wakes a starved poll thread when the queue has room again.
    fn wake_if_room(&self, queued: usize) {
        if queued <= self.resume_at() && self.starved.swap(false, Ordering::AcqRel) {
            self.command(Command::Wake);
        }
    }

    /// Marks a delivery handed to the runner; false if its partition was
    /// revoked or the subscription is closing (then it is not handed out).
    fn hand_out(&self, topic: &str, partition: i32, generation: u64, offset: i64) -> bool {
        let mut state = self.lock();
        if state.closing {
            return false;
        }
        match state.part(topic, partition) {
            Some(part) if part.generation == generation && !part.revoking => {
                let before = part.offsets.insert(offset, Status::Yielded);
                if let Some(before) = before {
                    state.count(before, -1);
                }
                state.count(Status::Yielded, 1);
                let queued = state.queued;
                drop(state);
                self.wake_if_room(queued);
                true
            }
            _ => false,
        }
    }

    fn ack(&self, topic: &str, partition: i32, generation: u64, offset: i64) {
        let mut state = self.lock();
        let removed = match state.part(topic, partition) {
            Some(part) if part.generation == generation => part.offsets.remove(&offset),
            _ => None,
        };
        if let Some(status) = removed {
            state.count(status, -1);
        }
        drop(state);
        self.settled.notify_all();
        self.freed.notify_one();
    }

    fn release(&self, ack: &KafkaAck) {
        let mut state = self.lock();
        let closing = state.closing;
        let Some(part) = state.part(&ack.topic, ack.partition) else {
            return;
        };
        if part.generation != ack.generation || !part.offsets.contains_key(&ack.offset) {
            return;
        }
        let new = if closing || part.revoking {
            Status::Released
        } else {
            Status::Queued
        };
        if let Some(before) = part.offsets.insert(ack.offset, new) {
            state.count(before, -1);
        }
        state.count(new, 1);
        if new == Status::Released {
            drop(state);
            self.settled.notify_all();
            self.freed.notify_one();
            return;
        }
        state.redeliver.push_back(Redelivery {
            delivery: ack.delivery.with_attempt(ack.delivery.attempt() + 1),
            topic: Arc::clone(&ack.topic),
            partition: ack.partition,
            generation: ack.generation,
            offset: ack.offset,
        });
        drop(state);
        self.redelivered.notify_one();
        self.freed.notify_one();
    }
}

/// Settles one delivery: ack removes its offset from the book, release keeps it
/// and hands the message out again.
struct KafkaAck {
    shared: Arc<Shared>,
    delivery: Delivery,
    topic: Arc<str>,
    partition: i32,
    generation: u64,
    offset: i64,
}

#[async_trait]
impl AckHandle for KafkaAck {
    async fn ack(&self) -> Result<()> {
        self.shared
            .ack(&self.topic, self.partition, self.generation, self.offset);
        Ok(())
    }

    async fn release(&self, delay: Option<Duration>) -> Result<()> {
        if let Some(delay) = delay.filter(|d| !d.is_zero()) {
            // The offset stays held (uncommitted) meanwhile.
            tokio::time::sleep(delay).await;
        }
        self.shared.release(self);
        Ok(())
    }
}

/// The consumer's callbacks, run on the poll thread.
struct Context {
    shared: Arc<Shared>,
    first_assignment: Mutex<Option<oneshot::Sender<Result<()>>>>,
    /// The consumer itself, to split partition queues off in the callback.
    consumer: OnceLock<Weak<BaseConsumer<Context>>>,
    revoke_timeout: Duration,
}

impl ClientContext for Context {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", facility = fac, "{log_message}")
            }
            L::Warning => tracing::warn!(target: "librdkafka", facility = fac, "{log_message}"),
            _ => tracing::debug!(target: "librdkafka", facility = fac, "{log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", error = %error, "{reason}");
    }
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<Partition> {
    tpl.elements()
        .iter()
        .map(|e| Partition {
            topic: e.topic().to_owned(),
            partition: e.partition(),
        })
        .collect()
}

impl Context {
    /// Tells the runner about an assignment and wakes `subscribe` on the first.
    fn assigned(&self, tpl: &TopicPartitionList) {
        let partitions = partitions_of(tpl);
        tracing::debug!(?partitions, "partitions assigned");
        self.shared.push_control(Ok(Event::Assigned(partitions)));
        self.first_assignment_done(Ok(()));
    }

    /// Ends `subscribe`'s wait for the first assignment (once).
    fn first_assignment_done(&self, result: Result<()>) {
        let first = self
            .first_assignment
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(first) = first {
            let _ = first.send(result);
        }
    }

    /// Gives each partition of `tpl` a queue of its own, woken into the poll
    /// loop when it gets data. Called before librdkafka starts fetching them.
    fn split(&self, tpl: &TopicPartitionList) {
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
            return;
        };
        let wake = self
            .shared
            .commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut queues = self.shared.queues();
        for e in tpl.elements() {
            let (topic, partition) = (e.topic(), e.partition());
            // An old handle goes first: dropping it switches the wake-up off.
            queues.retain(|(t, p, _)| !(t == topic && *p == partition));
            let Some(mut queue) = consumer.split_partition_queue(topic, partition) else {
                tracing::warn!(topic, partition, "no queue for an assigned partition");
                continue;
            };
            let wake = wake.clone();
            queue.set_nonempty_callback(move || {
                let _ = wake.send(Command::Wake);
            });
            queues.push((topic.to_owned(), partition, queue));
        }
    }

    /// Drops the queues of revoked partitions, emptied first (librdkafka would
    /// keep their outdated records until the client is destroyed).
    fn unsplit(&self, tpl: &TopicPartitionList) {
        let mut queues = self.shared.queues();
        queues.retain(|(topic, partition, queue)| {
            let revoked = tpl.find_partition(topic, *partition).is_some();
            if revoked {
                for _ in 0..100_000 {
                    if queue.poll(Duration::ZERO).is_none() {
                        break;
                    }
                }
            }
            !revoked
        });
    }

    fn assign(&self, tpl: &TopicPartitionList) {
        let mut state = self.shared.lock();
        state.generation += 1;
        let generation = state.generation;
        for e in tpl.elements() {
            state.remove_part(e.topic(), e.partition());
            let entry = state
                .topics
                .entry(e.topic().to_owned())
                .or_insert_with(|| (Arc::from(e.topic()), HashMap::new()));
            entry.1.insert(e.partition(), Part::new(generation));
        }
    }

    /// Waits for the runner to settle what it holds of the revoked partitions,
    /// commits them and forgets them.
    fn revoke(&self, consumer: &BaseConsumer<Context>, tpl: &TopicPartitionList) {
        let revoked = partitions_of(tpl);
        let mut state = self.shared.lock();
        if state.crashed {
            for p in &revoked {
                state.remove_part(&p.topic, p.partition);
            }
            return;
        }
        for p in &revoked {
            if let Some(part) = state.part(&p.topic, p.partition) {
                part.revoking = true;
            }
        }
        state.redeliver.retain(|r| {
            !revoked
                .iter()
                .any(|p| *p.topic == *r.topic && p.partition == r.partition)
        });
        let closing = state.closing;
        drop(state);
        if !closing {
            self.shared.push_control(Ok(Event::Revoked(revoked.clone())));
        }
        let held = |state: &mut State| -> usize {
            revoked
                .iter()
                .filter_map(|p| state.part(&p.topic, p.partition).map(|part| part.yielded()))
                .sum()
        };
        let until = Instant::now() + self.revoke_timeout;
        let mut state = self.shared.lock();
        while !state.closing && !state.crashed {
            let left = held(&mut state);
            let now = Instant::now();
            if left == 0 {
                break;
            }
            if now >= until {
                tracing::warn!(
                    held = left,
                    "revocation: the runner still holds messages of revoked partitions; \
                     the new owner will handle them again"
                );
                break;
            }
            state = self
                .shared
                .settled
                .wait_timeout(state, until - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let mut commit = TopicPartitionList::new();
        for p in &revoked {
            if let Some(position) = state.part(&p.topic, p.partition).and_then(|part| part.position()) {
                let _ = commit.add_partition_offset(&p.topic, p.partition, Offset::Offset(position));
            }
            state.remove_part(&p.topic, p.partition);
        }
        let crashed = state.crashed;
        drop(state);
        if crashed || commit.count() == 0 || consumer.assignment_lost() || self.shared.group.is_none() {
            return;
        }
        if let Err(e) = consumer.commit(&commit, CommitMode::Sync) {
            tracing::info!(
                error = %e,
                "commit on revocation refused; kept for the next assignment \
                 (a partition that moves to another member is handled again from its last commit)"
            );
            let mut state = self.shared.lock();
            for e in commit.elements() {
                if let Offset::Offset(position) = e.offset() {
                    state
                        .carried
                        .insert((e.topic().to_owned(), e.partition()), position);
                }
            }
        }
    }

    /// Starts partitions this member had when a revocation's commit was refused
    /// at the position it could not commit, and commits it now.
    fn apply_carried(&self, consumer: &BaseConsumer<Context>, tpl: &mut TopicPartitionList) {
        let carried = std::mem::take(&mut self.shared.lock().carried);
        if carried.is_empty() {
            return;
        }
        let mut commit = TopicPartitionList::new();
        for ((topic, partition), position) in carried {
            if tpl.find_partition(&topic, partition).is_some() {
                let offset = Offset::Offset(position);
                let _ = tpl.set_partition_offset(&topic, partition, offset);
                let _ = commit.add_partition_offset(&topic, partition, offset);
            }
        }
        if commit.count() > 0
            && let Err(e) = consumer.commit(&commit, CommitMode::Async)
        {
            tracing::warn!(error = %e, "committing carried positions failed");
        }
    }
}

impl ConsumerContext for Context {
    /// Replaces rdkafka's default rebalance handling (same steps, safe API) so
    /// that an assignment can start partitions at carried positions.
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.assign(tpl);
                self.apply_carried(consumer, tpl);
                self.split(tpl);
                let result = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                self.assigned(tpl);
                result
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.revoke(consumer, tpl);
                self.unsplit(tpl);
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                tracing::warn!(error = ?other, "Kafka rebalance failed; unassigning");
                self.revoke(consumer, tpl);
                self.unsplit(tpl);
                consumer.unassign()
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "applying a Kafka rebalance failed");
        }
    }

    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!(error = %e, "offset commit failed; it is sent again");
            let mut state = self.shared.lock();
            for e in offsets.elements() {
                if let Some(part) = state.part(e.topic(), e.partition()) {
                    part.sent = None;
                }
            }
        }
    }
}

/// An open Kafka subscription.
pub(crate) struct KafkaSubscription {
    shared: Arc<Shared>,
    items: mpsc::UnboundedReceiver<Redelivery>,
    close_timeout: Duration,
    closed: bool,
}

/// Builds the consumer, starts its poll thread and waits for the first assignment.
pub(crate) async fn open(
    config: Arc<KafkaConfig>,
    options: SubscribeOptions,
    start: Start,
) -> Result<KafkaSubscription> {
    let (commands, command_rx) = std_mpsc::channel();
    let group = match &start {
        Start::Group(group) => Some(group.clone()),
        Start::Assign(_) => None,
    };
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        settled: Condvar::new(),
        redelivered: Notify::new(),
        commands: Mutex::new(commands),
        starved: AtomicBool::new(false),
        queues: Mutex::new(Vec::new()),
        prefetch: options.prefetch.max(1),
        freed: Notify::new(),
        control_ready: Notify::new(),
        group: group.clone(),
    });
    let (items_tx, items) = mpsc::unbounded_channel();
    let (first_tx, first_rx) = oneshot::channel();
    let context = Context {
        shared: Arc::clone(&shared),
        first_assignment: Mutex::new(Some(first_tx)),
        consumer: OnceLock::new(),
        revoke_timeout: config.revoke_timeout,
    };
    let group_id = group
        .clone()
        .unwrap_or_else(|| format!("polybus-private-{}", uuid::Uuid::new_v4().simple()));
    let consumer: Arc<BaseConsumer<Context>> = Arc::new(
        consumer_config(&config, &group_id)
            .create_with_context(context)
            .map_err(|e| map_error("creating the Kafka consumer", e))?,
    );
    let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
    let started = match &start {
        Start::Group(_) => {
            let topics: Vec<&str> = options.topics.iter().map(String::as_str).collect();
            consumer
                .subscribe(&topics)
                .map_err(|e| map_error("subscribing", e))
        }
        Start::Assign(offsets) => {
            let mut tpl = TopicPartitionList::new();
            for (topic, partition, offset) in offsets {
                tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))
                    .map_err(|e| map_error("building the assignment", e))?;
            }
            let context = consumer.context();
            context.assign(&tpl);
            context.split(&tpl);
            let assigned = consumer
                .assign(&tpl)
                .map_err(|e| map_error("assigning partitions", e));
            context.assigned(&tpl);
            assigned
        }
    };
    if let Err(e) = started {
        // The partition queues hold the consumer: let them go with it.
        shared.queues().clear();
        return Err(e);
    }
    let poller = Poller {
        consumer,
        shared: Arc::clone(&shared),
        items: items_tx,
        commands: command_rx,
        commit_interval: config.commit_interval,
        group: group.clone(),
        topics_group: group_id,
    };
    std::thread::Builder::new()
        .name("polybus-kafka-poll".into())
        .spawn(move || poller.run())
        .map_err(|e| Error::Backend {
            backend: BACKEND,
            message: format!("starting the Kafka poll thread: {e}"),
            retryable: true,
            source: Some(Box::new(e)),
        })?;
    let sub = KafkaSubscription {
        shared,
        items,
        close_timeout: config.request_timeout + config.session_timeout,
        closed: false,
    };
    let limit = config.session_timeout + config.request_timeout + config.revoke_timeout;
    match tokio::time::timeout(limit, first_rx).await {
        Ok(Ok(Ok(()))) => Ok(sub),
        Ok(Ok(Err(e))) => {
            let _ = Box::new(sub).close().await;
            Err(e)
        }
        Ok(Err(_)) => {
            // The poll thread ended before any assignment: say why if it told.
            let reason = match sub.shared.lock().controls.pop_front() {
                Some(Err(e)) => e,
                _ => Error::connection(BACKEND, "the Kafka consumer stopped before joining its group"),
            };
            Err(reason)
        }
        Err(_) => {
            let _ = Box::new(sub).close().await;
            Err(Error::timeout(
                format!("joining Kafka group for {:?}", options.topics),
                limit,
            ))
        }
    }
}

/// Owns the consumer on its thread.
struct Poller {
    consumer: Arc<BaseConsumer<Context>>,
    shared: Arc<Shared>,
    items: mpsc::UnboundedSender<Redelivery>,
    commands: std_mpsc::Receiver<Command>,
    commit_interval: Duration,
    group: Option<String>,
    topics_group: String,
}

enum Flow {
    Close(oneshot::Sender<Result<()>>),
    Crash,
    Fatal,
}

impl Poller {
    fn run(self) {
        let mut next_queue = 0usize;
        let mut idle = false;
        let mut last_commit = Instant::now();
        tracing::debug!(group = %self.topics_group, "Kafka poll thread started");
        let flow = 'run: loop {
            // Commands first; when there was nothing to do, wait for one (new
            // data, room, close) a little.
            let first = if idle {
                match self.commands.recv_timeout(Duration::from_millis(100)) {
                    Ok(c) => Some(c),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => break Flow::Crash,
                }
            } else {
                None
            };
            for command in first
                .into_iter()
                .chain(std::iter::from_fn(|| self.commands.try_recv().ok()))
            {
                match command {
                    Command::Wake => {}
                    Command::Close(reply) => break 'run Flow::Close(reply),
                    Command::Crash => break 'run Flow::Crash,
                }
            }
            idle = true;
            // The consumer queue: rebalances (their callbacks run in here) and
            // errors. Records come through it only for a partition that could
            // not get a queue of its own.
            for _ in 0..64 {
                match self.consumer.poll(Duration::ZERO) {
                    None => break,
                    Some(Ok(message)) => {
                        idle = false;
                        if !self.on_message(&message) {
                            break 'run Flow::Crash;
                        }
                    }
                    Some(Err(e)) if self.on_error(&e) => break 'run Flow::Fatal,
                    Some(Err(_)) => {}
                }
            }
            if self.group.is_some() && last_commit.elapsed() >= self.commit_interval {
                last_commit = Instant::now();
                let tpl = self.shared.lock().positions(false);
                if tpl.count() > 0
                    && let Err(e) = self.consumer.commit(&tpl, CommitMode::Async)
                {
                    tracing::warn!(error = %e, "offset commit failed; it is sent again");
                }
            }
            // Partition queues, round robin, while the runner has room. librdkafka
            // stops fetching a partition whose queue is full (`queued.min.messages`,
            // `queued.max.messages.kbytes`), so nothing is paused or fetched twice.
            let mut room = self.shared.prefetch.saturating_sub(self.shared.lock().queued);
            if room == 0 {
                self.shared.starved.store(true, Ordering::Release);
                // Room made between the count and the flag would go unnoticed.
                if self.shared.lock().queued >= self.shared.prefetch {
                    continue;
                }
                self.shared.starved.store(false, Ordering::Release);
                room = 1;
            }
            let queues = self.shared.queues();
            let mut empty = 0;
            while room > 0 && empty < queues.len() {
                let (_, _, queue) = &queues[next_queue % queues.len()];
                next_queue = next_queue.wrapping_add(1);
                match queue.poll(Duration::ZERO) {
                    None => empty += 1,
                    Some(Ok(message)) => {
                        empty = 0;
                        room -= 1;
                        idle = false;
                        if !self.on_message(&message) {
                            break 'run Flow::Crash;
                        }
                    }
                    Some(Err(e)) if self.on_error(&e) => break 'run Flow::Fatal,
                    Some(Err(_)) => empty += 1,
                }
            }
        };
        // The partition queues hold the consumer too: let them go first, so that
        // dropping it closes it here (its revocation callback runs on this thread).
        self.shared.queues().clear();
        match flow {
            Flow::Close(reply) => {
                let result = self.commit_all();
                tracing::debug!(group = %self.topics_group, "Kafka subscription closing");
                drop(self.consumer); // leaves the group (the revocation commits again)
                let _ = reply.send(result);
            }
            Flow::Crash => {
                self.shared.lock().crashed = true;
                drop(self.consumer);
            }
            Flow::Fatal => {
                // A fatal error: stop taking messages, leave without committing more.
                {
                    let mut state = self.shared.lock();
                    state.crashed = true;
                    state.fatal = true;
                }
                drop(self.consumer);
            }
        }
        self.shared.lock().ended = true;
        self.shared.control_ready.notify_one();
    }

    /// Books a fetched message and sends it on; false when nobody listens any more.
    fn on_message(&self, message: &BorrowedMessage<'_>) -> bool {
        let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
        let mut state = self.shared.lock();
        let Some((name, parts)) = state.topics.get_mut(topic) else {
            return true;
        };
        let name = Arc::clone(name);
        let Some(part) = parts.get_mut(&partition) else {
            return true;
        };
        if part.revoking || part.offsets.contains_key(&offset) {
            return true;
        }
        part.offsets.insert(offset, Status::Queued);
        part.next = Some(part.next.map_or(offset + 1, |n| n.max(offset + 1)));
        let generation = part.generation;
        state.count(Status::Queued, 1);
        drop(state);
        let delivery = to_delivery(message, self.shared.group.clone());
        self.items
            .send(Redelivery {
                delivery,
                topic: name,
                partition,
                generation,
                offset,
            })
            .is_ok()
    }

    /// Reports a consumer error; true when it is fatal (the subscription ends).
    /// Authorization failures go to the runner (and to a `subscribe` still
    /// waiting) as non-retryable errors; librdkafka retries everything else.
    fn on_error(&self, e: &KafkaError) -> bool {
        use rdkafka::error::RDKafkaErrorCode as C;
        let code = e.rdkafka_error_code();
        let fatal = matches!(e, KafkaError::MessageConsumptionFatal(_)) || code == Some(C::Fatal);
        let refused = matches!(
            code,
            Some(
                C::TopicAuthorizationFailed
                    | C::GroupAuthorizationFailed
                    | C::ClusterAuthorizationFailed
                    | C::SaslAuthenticationFailed
                    | C::Authentication
            )
        );
        if fatal || refused {
            tracing::error!(error = %e, "Kafka consumer error; the subscription ends");
            let error = || Error::Backend {
                backend: BACKEND,
                message: format!("consuming: {e}"),
                retryable: false,
                source: None,
            };
            self.consumer.context().first_assignment_done(Err(error()));
            self.shared.push_control(Err(error()));
            return fatal;
        }
        tracing::warn!(error = %e, "Kafka consumer error (librdkafka retries)");
        false
    }

    /// Commits every partition's position synchronously (on close).
    fn commit_all(&self) -> Result<()> {
        if self.group.is_none() {
            return Ok(());
        }
        let tpl = self.shared.lock().positions(true);
        if tpl.count() == 0 {
            return Ok(());
        }
        self.consumer
            .commit(&tpl, CommitMode::Sync)
            .map_err(|e| map_error("committing offsets on close", e))
    }
}

/// Rebuilds the polybus message from a Kafka record.
fn to_delivery(message: &BorrowedMessage<'_>, group: Option<String>) -> Delivery {
    let mut headers: Vec<(String, String)> = Vec::new();
    if let Some(h) = message.headers() {
        for header in h.iter() {
            let value = header.value.map(String::from_utf8_lossy).unwrap_or_default();
            headers.push((header.key.to_owned(), value.into_owned()));
        }
    }
    if let Some(key) = message.key().and_then(|k| std::str::from_utf8(k).ok()) {
        headers.push((wire::KEY.to_owned(), key.to_owned()));
    }
    if let Some(millis) = message.timestamp().to_millis() {
        headers.push((wire::TIMESTAMP.to_owned(), millis.to_string()));
    }
    let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
    let payload = Bytes::copy_from_slice(message.payload().unwrap_or_default());
    let decoded = wire::decode(payload, headers, || format!("{topic}/{partition}/{offset}"));
    let origin = Origin {
        topic: topic.to_owned(),
        group,
        partition: Some(partition),
        sequence: Some(offset as u64),
    };
    Delivery::new(decoded, origin, 1)
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn next(&mut self) -> Option<Result<Event>> {
        loop {
            let (control, redelivery, full) = {
                let mut state = self.shared.lock();
                let control = state.controls.pop_front();
                let full = state.yielded >= self.shared.prefetch;
                let redelivery = if control.is_some() || full {
                    None
                } else {
                    state.redeliver.pop_front()
                };
                (control, redelivery, full)
            };
            if let Some(event) = control {
                return Some(event);
            }
            if full {
                // `prefetch` deliveries are out: wait for one to be settled (a
                // settlement between the check and here leaves a permit).
                tokio::select! {
                    _ = self.shared.freed.notified() => {}
                    _ = self.shared.control_ready.notified() => {}
                }
                continue;
            }
            let r = match redelivery {
                Some(r) => r,
                None => {
                    tokio::select! {
                        biased;
                        _ = self.shared.control_ready.notified() => continue,
                        item = self.items.recv() => match item {
                            Some(r) => r,
                            // The poll thread is gone; hand out what it queued last.
                            None if !self.shared.lock().controls.is_empty() => continue,
                            None => return None,
                        },
                        _ = self.shared.redelivered.notified() => continue,
                    }
                }
            };
            if !self
                .shared
                .hand_out(&r.topic, r.partition, r.generation, r.offset)
            {
                continue;
            }
            let acker = Acker::new(KafkaAck {
                shared: Arc::clone(&self.shared),
                delivery: r.delivery.clone(),
                topic: r.topic,
                partition: r.partition,
                generation: r.generation,
                offset: r.offset,
            });
            return Some(Ok(Event::Delivery(r.delivery, acker)));
        }
    }

    async fn control(&mut self) -> Option<Result<Event>> {
        loop {
            {
                let mut state = self.shared.lock();
                if let Some(event) = state.controls.pop_front() {
                    return Some(event);
                }
                if state.ended {
                    return None;
                }
            }
            self.shared.control_ready.notified().await;
        }
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        self.closed = true;
        {
            let mut state = self.shared.lock();
            state.closing = true;
            state.redeliver.clear();
        }
        // A revocation waiting for the runner stops waiting.
        self.shared.settled.notify_all();
        let (tx, rx) = oneshot::channel();
        self.shared.command(Command::Close(tx));
        match tokio::time::timeout(self.close_timeout, rx).await {
            Ok(Ok(result)) => result,
            // The thread had already stopped.
            Ok(Err(_)) if self.shared.lock().fatal => Err(Error::Backend {
                backend: BACKEND,
                message: "the Kafka consumer had failed; its last offsets were not committed".into(),
                retryable: false,
                source: None,
            }),
            Ok(Err(_)) => Ok(()),
            Err(_) => Err(Error::timeout("closing the Kafka consumer", self.close_timeout)),
        }
    }
}

impl Drop for KafkaSubscription {
    fn drop(&mut self) {
        if !self.closed {
            // A crash: nothing more is committed; the group hands the partitions on.
            self.shared.lock().crashed = true;
            self.shared.settled.notify_all();
            self.shared.command(Command::Crash);
        }
    }
}
