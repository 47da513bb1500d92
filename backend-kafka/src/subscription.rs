//! A subscription: one librdkafka consumer polled on a thread of its own, the
//! offsets it has handed out, and their commits.
//!
//! * [`poll`](crate::poll): the poll thread, which owns the consumer, takes
//!   records from the partition queues while the runner has room, and commits;
//! * [`rebalance`](crate::rebalance): the consumer's callbacks (they run on the
//!   poll thread, inside `poll`): assignments, and revocations that wait
//!   (bounded) for the runner to settle what it holds before committing;
//! * [`offsets`](crate::offsets): the offset book, which never lets a commit
//!   pass an unsettled message;
//! * here: the state they share, the settlement handles, and the async side
//!   ([`KafkaSubscription::next`]) that reads what the thread sends.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

use polybus_core::{
    AckHandle, Acker, Delivery, Error, Event, Result, SubscribeOptions, Subscription, async_trait,
};
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::consumer::{Settings, consumer_config};
use crate::offsets::{Book, Stale, Status};
use crate::poll::Poller;
use crate::rebalance::Context;
use crate::security::GroupClient;
use crate::{BACKEND, KafkaConfig, map_error};

/// How a subscription starts.
pub(crate) enum Start {
    /// As a member of this consumer group (its offsets are already fixed).
    Group(String),
    /// In no group: these partitions from these offsets (topic, partition, offset).
    Assign(Vec<(String, i32, i64)>),
}

/// A fetched message on its way to the runner (or given back, to be handed
/// out again).
pub(crate) struct Redelivery {
    pub(crate) delivery: Delivery,
    pub(crate) topic: Arc<str>,
    pub(crate) partition: i32,
    pub(crate) generation: u64,
    pub(crate) offset: i64,
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) book: Book,
    pub(crate) redeliver: VecDeque<Redelivery>,
    pub(crate) closing: bool,
    pub(crate) crashed: bool,
    /// Positions whose commit at a revocation failed (some brokers refuse
    /// commits while the group rebalances): if the partition comes back to this
    /// member at the next assignment, it restarts there (and commits it) instead
    /// of at the older committed offset.
    pub(crate) carried: HashMap<(String, i32), i64>,
    /// Assignments, revocations and errors for the runner, ahead of deliveries.
    pub(crate) controls: VecDeque<Result<Event>>,
    /// The poll thread has stopped.
    pub(crate) ended: bool,
    /// It stopped on a fatal error (the last offsets were not committed).
    pub(crate) fatal: bool,
}

/// What the poll thread is told.
pub(crate) enum Command {
    /// Credit was freed: resume.
    Wake,
    /// Commit, leave the group and stop; answer when done.
    Close(oneshot::Sender<Result<()>>),
    /// The subscription was dropped: stop without committing.
    Crash,
}

/// What the poll thread, the callbacks and the async side share.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Signalled when a delivery is settled (a revocation waits on it).
    pub(crate) settled: Condvar,
    /// Wakes `next` when a released message is ready to be handed out again.
    redelivered: Notify,
    /// Wakes `next` when a delivery is settled (it waits while `prefetch` are out).
    freed: Notify,
    /// Wakes `next` and `control` when a control event is queued.
    pub(crate) control_ready: Notify,
    pub(crate) commands: Mutex<std_mpsc::Sender<Command>>,
    /// Whether the poll thread stopped taking messages for lack of room.
    pub(crate) starved: AtomicBool,
    /// A librdkafka queue per assigned partition, split off the consumer queue
    /// in the rebalance callback before the partition is assigned (so nothing
    /// of it ever reaches the consumer queue). They hold the consumer: the poll
    /// thread clears them before it drops it.
    queues: Mutex<Vec<(String, i32, PartitionQueue<Context>)>>,
    /// How many deliveries may be handed out and unsettled at once.
    pub(crate) prefetch: usize,
    /// The consumer group, if any.
    pub(crate) group: Option<String>,
    /// The group clients of this subscription's catch-up probes, given
    /// rotated credentials with the subscription's own consumer.
    pub(crate) probes: Mutex<Vec<Weak<GroupClient>>>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an event for the runner ahead of any delivery.
    pub(crate) fn push_control(&self, event: Result<Event>) {
        self.lock().controls.push_back(event);
        self.control_ready.notify_one();
    }

    pub(crate) fn queues(&self) -> MutexGuard<'_, Vec<(String, i32, PartitionQueue<Context>)>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn command(&self, command: Command) {
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
        if !Self::hand_out_locked(&mut state, topic, partition, generation, offset) {
            return false;
        }
        let queued = state.book.queued;
        drop(state);
        self.wake_if_room(queued);
        true
    }

    /// [`Shared::hand_out`] under a lock already held (the caller wakes the
    /// poll thread if there is room).
    fn hand_out_locked(state: &mut State, topic: &str, partition: i32, generation: u64, offset: i64) -> bool {
        !state.closing && state.book.hand_out(topic, partition, generation, offset)
    }

    fn ack(&self, ack: &KafkaAck) -> std::result::Result<(), Stale> {
        let result = self
            .lock()
            .book
            .ack(&ack.topic, ack.partition, ack.generation, ack.offset);
        // Only a revocation waits on `settled`, and only for partitions it
        // marked revoking (under the lock, before it waits): waking it for
        // any other ack would cost a futex call per record.
        if result == Ok(true) {
            self.settled.notify_all();
        }
        self.freed.notify_one();
        result.map(|_| ())
    }

    fn release(&self, ack: &KafkaAck) -> std::result::Result<(), Stale> {
        let mut state = self.lock();
        let closing = state.closing;
        let new = state
            .book
            .release(&ack.topic, ack.partition, ack.generation, ack.offset, closing)?;
        if new == Status::Released {
            drop(state);
            self.settled.notify_all();
            self.freed.notify_one();
            return Ok(());
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
        Ok(())
    }

    /// Asks the poll thread to commit, leave the group and stop; `next` then
    /// returns `None` once it has handed out what is left of its controls.
    async fn close(&self, timeout: Duration) -> Result<()> {
        {
            let mut state = self.lock();
            state.closing = true;
            state.redeliver.clear();
        }
        // A revocation waiting for the runner stops waiting.
        self.settled.notify_all();
        let (tx, rx) = oneshot::channel();
        self.command(Command::Close(tx));
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            // The thread had already stopped.
            Ok(Err(_)) if self.lock().fatal => Err(Error::Backend {
                backend: BACKEND,
                message: "the Kafka consumer had failed; its last offsets were not committed".into(),
                retryable: false,
                source: None,
            }),
            Ok(Err(_)) => Ok(()),
            Err(_) => Err(Error::timeout("closing the Kafka consumer", timeout)),
        }
    }
}

/// Ends a subscription from its consumer's `close`, without owning it.
pub(crate) struct Closer {
    shared: Weak<Shared>,
    timeout: Duration,
    /// The subscription's librdkafka consumer, while it lives.
    client: Weak<BaseConsumer<Context>>,
}

impl Closer {
    /// Whether the subscription is still open (not dropped, poll thread running).
    pub(crate) fn is_open(&self) -> bool {
        self.shared.upgrade().is_some_and(|s| !s.lock().ended)
    }

    /// Sets the SASL credentials of the subscription's consumer and of its
    /// catch-up probes' group clients, those that live.
    pub(crate) fn rotate(&self, user: &std::ffi::CStr, pass: &std::ffi::CStr) -> Result<()> {
        if let Some(consumer) = self.client.upgrade() {
            crate::credentials::set(consumer.client(), user, pass)?;
        }
        if let Some(shared) = self.shared.upgrade() {
            let mut probes = shared.probes.lock().unwrap_or_else(|p| p.into_inner());
            probes.retain(|probe| probe.strong_count() > 0);
            for probe in probes.iter().filter_map(Weak::upgrade) {
                crate::credentials::set(probe.client(), user, pass)?;
            }
        }
        Ok(())
    }

    /// Closes the subscription if it is still open.
    pub(crate) async fn close(&self) -> Result<()> {
        match self.shared.upgrade() {
            Some(shared) if !shared.lock().ended => shared.close(self.timeout).await,
            _ => Ok(()),
        }
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

/// What a settlement that was not recorded returns.
fn not_settled(operation: &'static str, stale: Stale) -> Error {
    Error::NotSettled {
        operation,
        reason: stale.reason().to_owned(),
    }
}

#[async_trait]
impl AckHandle for KafkaAck {
    /// Removes the offset from the book; `Error::NotSettled` when its
    /// partition was revoked (or reassigned) meanwhile: nothing was recorded,
    /// and the partition's owner handles the message again.
    async fn ack(&self) -> Result<()> {
        self.shared.ack(self).map_err(|stale| not_settled("ack", stale))
    }

    /// Keeps the offset held and hands the message out again at once (or, on a
    /// partition being revoked or a subscription closing, only holds the commit
    /// back); `Error::NotSettled` when the partition was revoked meanwhile.
    /// The delay is ignored (`Capabilities::delayed_release` is false: the
    /// runner waits out an overloaded message's backoff itself).
    async fn release(&self, _delay: Option<Duration>) -> Result<()> {
        self.shared
            .release(self)
            .map_err(|stale| not_settled("release", stale))
    }
}

/// An open Kafka subscription.
pub(crate) struct KafkaSubscription {
    shared: Arc<Shared>,
    client: Weak<BaseConsumer<Context>>,
    items: mpsc::UnboundedReceiver<Redelivery>,
    close_timeout: Duration,
    closed: bool,
    /// For catch-up probes: the consumer's settings as they are now (SASL
    /// credentials rotated), the topics, and (in no group) the offset each
    /// partition was assigned at.
    settings: Settings,
    topics: Vec<String>,
    assigned: HashMap<(String, i32), i64>,
}

/// Builds the consumer, starts its poll thread and waits for the first assignment.
pub(crate) async fn open(
    config: Arc<KafkaConfig>,
    settings: Settings,
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
        probes: Mutex::new(Vec::new()),
    });
    let (items_tx, items) = mpsc::unbounded_channel();
    let (first_tx, first_rx) = oneshot::channel();
    let context = Context::new(Arc::clone(&shared), first_tx, config.revoke_timeout);
    let group_id = group
        .clone()
        .unwrap_or_else(|| format!("polybus-private-{}", uuid::Uuid::new_v4().simple()));
    let consumer: Arc<BaseConsumer<Context>> = Arc::new(
        consumer_config(&config, &group_id)
            .create_with_context(context)
            .map_err(|e| map_error("creating the Kafka consumer", e))?,
    );
    consumer.context().set_consumer(&consumer);
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
    let client = Arc::downgrade(&consumer);
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
    let assigned = match &start {
        Start::Group(_) => HashMap::new(),
        Start::Assign(offsets) => offsets
            .iter()
            .map(|(topic, partition, offset)| ((topic.clone(), *partition), *offset))
            .collect(),
    };
    let sub = KafkaSubscription {
        shared,
        client,
        items,
        close_timeout: config.request_timeout + config.session_timeout,
        closed: false,
        settings,
        topics: options.topics.clone(),
        assigned,
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

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn next(&mut self) -> Option<Result<Event>> {
        loop {
            let (control, redelivery, full, ready) = {
                let mut state = self.shared.lock();
                let control = state.controls.pop_front();
                let full = state.book.yielded >= self.shared.prefetch;
                if control.is_none() && full && state.ended {
                    // Nothing more will come (consumer closed, or a fatal error).
                    return None;
                }
                let redelivery = if control.is_some() || full {
                    None
                } else {
                    state.redeliver.pop_front()
                };
                // The usual case: a fetched message is waiting; hand it out
                // under this same lock instead of taking it again.
                let ready = match (&control, &redelivery, full) {
                    (None, None, false) => match self.items.try_recv() {
                        Ok(r) => {
                            let handed = Shared::hand_out_locked(
                                &mut state,
                                &r.topic,
                                r.partition,
                                r.generation,
                                r.offset,
                            );
                            Some((r, handed, state.book.queued))
                        }
                        Err(_) => None,
                    },
                    _ => None,
                };
                (control, redelivery, full, ready)
            };
            if let Some(event) = control {
                return Some(event);
            }
            if let Some((r, handed, queued)) = ready {
                if !handed {
                    continue;
                }
                self.shared.wake_if_room(queued);
                return Some(Ok(self.delivery(r)));
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
            return Some(Ok(self.delivery(r)));
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
        self.shared.close(self.close_timeout).await
    }

    /// The high watermark of every partition now, against this subscription's
    /// positions and the group's commits (see the `catch_up` module).
    async fn catch_up_probe(&mut self) -> Result<Box<dyn polybus_core::CatchUpProbe>> {
        let probe = crate::catch_up::KafkaCatchUp::new(
            &self.settings,
            Arc::clone(&self.shared),
            &self.topics,
            self.assigned.clone(),
        )
        .await?;
        Ok(Box::new(probe))
    }
}

impl KafkaSubscription {
    /// The event for a message handed out, with its settlement handle.
    fn delivery(&self, r: Redelivery) -> Event {
        let acker = Acker::new(KafkaAck {
            shared: Arc::clone(&self.shared),
            delivery: r.delivery.clone(),
            topic: r.topic,
            partition: r.partition,
            generation: r.generation,
            offset: r.offset,
        });
        Event::Delivery(r.delivery, acker)
    }

    /// A handle that lets the consumer end this subscription.
    pub(crate) fn closer(&self) -> Closer {
        Closer {
            shared: Arc::downgrade(&self.shared),
            timeout: self.close_timeout,
            client: Weak::clone(&self.client),
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
