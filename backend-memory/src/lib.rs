//! An in-process broker for polybus that keeps the same contract as a real one.
//!
//! Not a channel: topics are named, retained logs; consumer groups are cursors
//! with competing consumers inside a group and every group getting every message;
//! a declared group keeps what is published before it subscribes; deliveries are
//! leased until acked, released, or their ack deadline passes (keep-alives extend
//! it), and are redelivered with a raised attempt count otherwise; a subscription
//! that goes away (closed or dropped, as in a crash) gives its leases back at once;
//! and each subscription holds at most its prefetch of unsettled deliveries.
//!
//! Unit tests use the helpers on [`MemoryBroker`]: what was published to a topic,
//! and waiting until every delivery has been settled, so tests need no sleeps.
//! Fault-path tests inject faults on demand: failing publishes to a topic
//! ([`MemoryBroker::fail_publishes`]), acks that fail, hang or panic
//! ([`MemoryBroker::inject_ack_faults`]), leases that expire at once
//! ([`MemoryBroker::expire_leases`]) and subscriptions that end with an error
//! ([`MemoryBroker::fail_subscriptions`]).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> polybus_core::Result<()> {
//! use polybus_core::{Message, Producer};
//! use polybus_memory::MemoryBroker;
//!
//! let broker = MemoryBroker::new();
//! let conn = broker.connection();
//! conn.producer.send("rides", Message::new("created")).await?;
//! assert_eq!(broker.published("rides").len(), 1);
//! # Ok(()) }
//! ```
//!
//! The whole log is kept in memory for the broker's life: it is meant for tests
//! and examples, not for unbounded streams.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use polybus_core::time::later;
use polybus_core::{
    AckHandle, Acker, Capabilities, CatchUpProbe, Connection, Consumer, Delivery, Error, Event, Message,
    Origin, Producer, Result, StartFrom, SubscribeOptions, Subscription, names,
};
use tokio::sync::Notify;
use tokio::time::Instant;

mod hash;

/// Settings of an in-memory broker.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemoryConfig {
    /// How long a delivery stays leased without an ack, release or keep-alive
    /// before it is redelivered (default 30 s).
    pub ack_deadline: Duration,
    /// The largest payload accepted, in bytes (default 1 MiB).
    pub max_payload: usize,
    /// Whether `release` honours its delay (default `true`). `false` models a
    /// broker without delayed redelivery (RabbitMQ, core NATS): a release
    /// makes the message deliverable at once, whatever delay was asked for.
    pub delayed_release: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            ack_deadline: Duration::from_secs(30),
            max_payload: 1024 * 1024,
            delayed_release: true,
        }
    }
}

impl MemoryConfig {
    /// Sets the ack deadline.
    pub fn ack_deadline(mut self, deadline: Duration) -> Self {
        self.ack_deadline = deadline;
        self
    }

    /// Sets the maximum payload.
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// Sets whether `release` honours its delay (see [`MemoryConfig::delayed_release`]).
    pub fn delayed_release(mut self, honoured: bool) -> Self {
        self.delayed_release = honoured;
        self
    }
}

/// A snapshot of one group's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct GroupStats {
    /// Messages not yet delivered, or released and waiting for redelivery.
    pub pending: usize,
    /// Messages delivered and not yet settled.
    pub unacked: usize,
}

/// An in-process broker. Cheap to clone; clones share the same topics.
#[derive(Clone)]
pub struct MemoryBroker {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

struct Shared {
    state: Mutex<State>,
    changed: Notify,
    config: MemoryConfig,
    ids: AtomicU64,
    faults: Mutex<Faults>,
    /// Ack faults may be queued (so an ack without any skips the faults lock).
    ack_faults: AtomicBool,
    /// Publish faults may be set (likewise for publishes).
    publish_faults: AtomicBool,
    /// `Faults::subscription_failures`, readable without the lock.
    subscription_failures: AtomicU64,
}

type ErrorFn = Arc<dyn Fn() -> Error + Send + Sync>;

type Map<K, V> = HashMap<K, V, BuildHasherDefault<hash::FastHasher>>;

/// Faults injected by tests.
#[derive(Default)]
struct Faults {
    /// Per topic: how many more publishes fail, and with what.
    publishes: HashMap<String, (usize, ErrorFn)>,
    /// Ack faults still to apply, in order.
    acks: std::collections::VecDeque<AckFault>,
    /// Bumped by `fail_subscriptions`; each subscription fails once per bump.
    subscription_failures: u64,
    subscription_error: Option<ErrorFn>,
}

/// A fault for [`MemoryBroker::inject_ack_faults`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AckFault {
    /// The ack returns [`Error::NotSettled`] and settles nothing (the delivery
    /// stays leased and is redelivered when its deadline passes).
    Fail,
    /// The ack never returns and settles nothing.
    Hang,
    /// The ack takes effect, then panics (a client-library bug after the ack).
    PanicAfterAck,
}

#[derive(Default)]
struct State {
    topics: Map<String, TopicLog>,
    subs: Map<u64, SubState>,
}

impl State {
    /// Wakes the subscriptions that read `topic` (in `group`, if given): one
    /// wake-up each, only for those the change concerns.
    fn wake_readers(&self, topic: &str, group: Option<&str>) {
        for sub in self.subs.values() {
            if group.is_none_or(|g| *sub.group == *g) && sub.topics.iter().any(|t| **t == *topic) {
                sub.wake.notify_one();
            }
        }
    }

    /// Wakes every subscription (faults, closing, expired leases: rare).
    fn wake_all(&self) {
        for sub in self.subs.values() {
            sub.wake.notify_one();
        }
    }
}

#[derive(Default)]
struct TopicLog {
    messages: Vec<Message>,
    /// Records inserted as undecodable (by sequence), with the reason.
    undecodable: Map<usize, String>,
    groups: Map<String, Group>,
}

struct Group {
    cursor: usize,
    /// Released or expired deliveries, by sequence, with the earliest redelivery time.
    redeliver: BTreeMap<usize, Instant>,
    leases: Map<usize, Lease>,
    /// No lease ends before this (a lower bound: acks and keep-alives do not
    /// raise it), so leases are scanned for expiry only once it has passed.
    /// `None` while the group has no lease.
    first_deadline: Option<Instant>,
    /// Delivery counts of the records delivered and not yet acked.
    deliveries: Map<usize, u32>,
    anonymous: bool,
}

struct Lease {
    sub: u64,
    token: u64,
    deadline: Instant,
}

struct SubState {
    outstanding: usize,
    prefetch: usize,
    /// Wakes this subscription's `next` (a permit is kept if it is not waiting).
    wake: Arc<Notify>,
    topics: Vec<Arc<str>>,
    group: Arc<str>,
}

/// Whom a settlement wakes, besides `wait_until_settled`.
enum Wakes {
    Nobody,
    /// The subscription that held the lease: it was at its prefetch limit.
    Sub(u64),
    /// Every subscription of the lease's group on its topic (a redelivery).
    Group,
}

impl Group {
    fn new(cursor: usize, anonymous: bool) -> Self {
        Group {
            cursor,
            redeliver: BTreeMap::new(),
            leases: Map::default(),
            first_deadline: None,
            deliveries: Map::default(),
            anonymous,
        }
    }

    /// Moves every lease past its deadline to redelivery (only when one may
    /// be: see `first_deadline`); returns when the next lease ends, if any.
    fn expire(
        &mut self,
        now: Instant,
        subs: &mut Map<u64, SubState>,
        topic: &str,
        group: &str,
    ) -> Option<Instant> {
        if self.first_deadline.is_some_and(|first| first <= now) {
            let mut first: Option<Instant> = None;
            let redeliver = &mut self.redeliver;
            self.leases.retain(|seq, lease| {
                if lease.deadline <= now {
                    tracing::debug!(topic, group, seq, "ack deadline passed; redelivering");
                    if let Some(sub) = subs.get_mut(&lease.sub) {
                        sub.outstanding = sub.outstanding.saturating_sub(1);
                    }
                    redeliver.insert(*seq, now);
                    false
                } else {
                    first = Some(first.map_or(lease.deadline, |f| f.min(lease.deadline)));
                    true
                }
            });
            self.first_deadline = first;
        }
        if self.leases.is_empty() {
            self.first_deadline = None;
        }
        self.first_deadline
    }

    fn is_settled(&self, log_len: usize) -> bool {
        self.cursor >= log_len && self.redeliver.is_empty() && self.leases.is_empty()
    }
}

static NAMED: OnceLock<Mutex<HashMap<String, MemoryBroker>>> = OnceLock::new();

/// Connects to the named in-process broker of a `memory://` or `memory://<name>`
/// URL; every connect with the same name in one process shares one broker.
pub fn connect(url: &str) -> Result<Connection> {
    let name = url
        .strip_prefix("memory://")
        .ok_or_else(|| Error::InvalidConfig(format!("{url:?} is not a memory:// URL")))?;
    let name = name.trim_end_matches('/');
    let mut brokers = NAMED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let broker = brokers.entry(name.to_owned()).or_default().clone();
    Ok(broker.connection())
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBroker {
    /// A new, empty broker with the default settings.
    pub fn new() -> Self {
        Self::with_config(MemoryConfig::default())
    }

    /// A new, empty broker.
    pub fn with_config(config: MemoryConfig) -> Self {
        MemoryBroker {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed: Notify::new(),
                config,
                ids: AtomicU64::new(1),
                faults: Mutex::new(Faults::default()),
                ack_faults: AtomicBool::new(false),
                publish_faults: AtomicBool::new(false),
                subscription_failures: AtomicU64::new(0),
            }),
        }
    }

    /// A new producer.
    pub fn producer(&self) -> MemoryProducer {
        MemoryProducer {
            shared: Arc::clone(&self.shared),
            closed: AtomicBool::new(false),
        }
    }

    /// A new consumer.
    pub fn consumer(&self) -> MemoryConsumer {
        MemoryConsumer {
            shared: Arc::clone(&self.shared),
            closed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A new producer and consumer.
    pub fn connection(&self) -> Connection {
        Connection {
            producer: Arc::new(self.producer()),
            consumer: Arc::new(self.consumer()),
        }
    }

    /// What this broker promises.
    pub fn capabilities(&self) -> Capabilities {
        capabilities(&self.shared.config)
    }

    /// Every message published to `topic` so far, in publish order.
    pub fn published(&self, topic: &str) -> Vec<Message> {
        self.shared
            .lock()
            .topics
            .get(topic)
            .map(|t| t.messages.clone())
            .unwrap_or_default()
    }

    /// The state of `group` on `topic`, if it exists.
    pub fn group_stats(&self, topic: &str, group: &str) -> Option<GroupStats> {
        let state = self.shared.lock();
        let log = state.topics.get(topic)?;
        let g = log.groups.get(group)?;
        Some(GroupStats {
            pending: log.messages.len().saturating_sub(g.cursor) + g.redeliver.len(),
            unacked: g.leases.len(),
        })
    }

    /// Whether `group` has nothing pending and nothing unacked on `topic`.
    pub fn is_settled(&self, topic: &str, group: &str) -> bool {
        self.group_stats(topic, group)
            .is_some_and(|s| s.pending == 0 && s.unacked == 0)
    }

    /// Appends `message` to `topic` as another producer would write it, with no
    /// check of the portable grammar: binary keys, repeated header keys, header
    /// values that are not UTF-8 or null, a null payload (`tombstone`), oversized
    /// payloads. For hostile-input tests.
    pub fn insert_raw(&self, topic: &str, message: Message) {
        let mut state = self.shared.lock();
        state
            .topics
            .entry(topic.to_owned())
            .or_default()
            .messages
            .push(message);
        state.wake_readers(topic, None);
        drop(state);
        self.shared.changed.notify_waiters();
    }

    /// Appends a record that a real backend could not decode (a Kafka header
    /// name that is not UTF-8, say): it is delivered as an undecodable delivery
    /// (see `Delivery::undecodable`) with `reason`, as the backend's labelled
    /// copy `message`. For hostile-input tests of the runner.
    pub fn insert_undecodable(&self, topic: &str, message: Message, reason: &str) {
        let mut state = self.shared.lock();
        let log = state.topics.entry(topic.to_owned()).or_default();
        log.undecodable.insert(log.messages.len(), reason.to_owned());
        log.messages.push(message);
        state.wake_readers(topic, None);
        drop(state);
        self.shared.changed.notify_waiters();
    }

    /// Makes the next `count` publishes to `topic` (from any producer of this
    /// broker, dead letters included) fail with `error()`, publishing nothing.
    /// `error` may panic, to test a publish that panics.
    pub fn fail_publishes(
        &self,
        topic: &str,
        count: usize,
        error: impl Fn() -> Error + Send + Sync + 'static,
    ) {
        let mut faults = self.shared.faults();
        faults
            .publishes
            .insert(topic.to_owned(), (count, Arc::new(error)));
        self.shared.publish_faults.store(true, Ordering::Release);
    }

    /// Makes the next `count` acks (of any delivery) behave as `fault` says.
    pub fn inject_ack_faults(&self, fault: AckFault, count: usize) {
        let mut faults = self.shared.faults();
        faults.acks.extend(std::iter::repeat_n(fault, count));
        self.shared
            .ack_faults
            .store(!faults.acks.is_empty(), Ordering::Release);
    }

    /// Expires every lease now, as if every ack deadline had passed: the
    /// deliveries go back to their groups and later settlements of them fail with
    /// [`Error::NotSettled`].
    pub fn expire_leases(&self) {
        let now = Instant::now();
        let mut state = self.shared.lock();
        for log in state.topics.values_mut() {
            for group in log.groups.values_mut() {
                for lease in group.leases.values_mut() {
                    lease.deadline = now;
                }
                if !group.leases.is_empty() {
                    group.first_deadline = Some(now);
                }
            }
        }
        state.wake_all();
        drop(state);
        self.shared.changed.notify_waiters();
    }

    /// Makes every subscription open now return `error()` from its next call to
    /// `next` (once each). A non-retryable error ends a runner.
    pub fn fail_subscriptions(&self, error: impl Fn() -> Error + Send + Sync + 'static) {
        let mut faults = self.shared.faults();
        faults.subscription_failures += 1;
        faults.subscription_error = Some(Arc::new(error));
        self.shared
            .subscription_failures
            .store(faults.subscription_failures, Ordering::Release);
        drop(faults);
        self.shared.lock().wake_all();
        self.shared.changed.notify_waiters();
    }

    /// Waits until every group of every topic has settled every message (or
    /// `timeout` passes, which gives [`Error::Timeout`]).
    pub async fn wait_until_settled(&self, timeout: Duration) -> Result<()> {
        let until = Instant::now() + timeout;
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let all_settled = {
                let state = self.shared.lock();
                state
                    .topics
                    .values()
                    .all(|t| t.groups.values().all(|g| g.is_settled(t.messages.len())))
            };
            if all_settled {
                return Ok(());
            }
            if tokio::time::timeout_at(until, changed).await.is_err() {
                return Err(Error::timeout(
                    "waiting for every delivery to be settled",
                    timeout,
                ));
            }
        }
    }
}

fn capabilities(config: &MemoryConfig) -> Capabilities {
    let mut caps = Capabilities::new("memory", config.max_payload);
    caps.ack_deadline = Some(config.ack_deadline);
    caps.networked = false;
    caps.reposition = true;
    caps.catch_up = true;
    caps.delayed_release = config.delayed_release;
    caps
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn faults(&self) -> MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The injected fault for this ack, if one is due.
    fn ack_fault(&self) -> Option<AckFault> {
        if !self.ack_faults.load(Ordering::Acquire) {
            return None;
        }
        let mut faults = self.faults();
        let fault = faults.acks.pop_front();
        self.ack_faults.store(!faults.acks.is_empty(), Ordering::Release);
        fault
    }

    /// The injected error for a publish to `topic`, if one is due.
    fn publish_fault(&self, topic: &str) -> Option<ErrorFn> {
        if !self.publish_faults.load(Ordering::Acquire) {
            return None;
        }
        let mut faults = self.faults();
        let (left, error) = faults.publishes.get_mut(topic)?;
        let error = Arc::clone(error);
        *left -= 1;
        if *left == 0 {
            faults.publishes.remove(topic);
            self.publish_faults
                .store(!faults.publishes.is_empty(), Ordering::Release);
        }
        Some(error)
    }

    fn declare_topic(state: &mut State, topic: &str) {
        state.topics.entry(topic.to_owned()).or_default();
    }

    fn declare_group(state: &mut State, topic: &str, group: &str, start: StartFrom, anonymous: bool) {
        let log = state.topics.entry(topic.to_owned()).or_default();
        let cursor = Self::start_position(log, start);
        log.groups
            .entry(group.to_owned())
            .or_insert_with(|| Group::new(cursor, anonymous));
    }

    /// Where `start` puts a cursor in `log`.
    fn start_position(log: &TopicLog, start: StartFrom) -> usize {
        let len = log.messages.len();
        match start {
            StartFrom::Earliest => 0,
            // The first message stamped at or after the time (the log is in
            // publish order; timestamps are the senders').
            StartFrom::Timestamp(t) => log.messages.iter().position(|m| m.timestamp >= t).unwrap_or(len),
            _ => len,
        }
    }

    /// Moves an existing group with no members to `start`.
    fn reposition(state: &mut State, topic: &str, group: &str, start: StartFrom) -> Result<()> {
        let members = state
            .subs
            .values()
            .filter(|s| *s.group == *group && s.topics.iter().any(|t| **t == *topic))
            .count();
        if members > 0 {
            return Err(Error::InvalidConfig(format!(
                "group {group:?} on {topic:?} has {members} active member(s): stop them before repositioning it"
            )));
        }
        let log = state.topics.get_mut(topic).ok_or_else(|| Error::NotFound {
            what: format!("topic {topic:?}"),
        })?;
        let cursor = Self::start_position(log, start);
        let entry = log.groups.get_mut(group).ok_or_else(|| Error::NotFound {
            what: format!("group {group:?} on topic {topic:?}"),
        })?;
        let anonymous = entry.anonymous;
        *entry = Group::new(cursor, anonymous);
        Ok(())
    }

    /// Finds a lease by token and applies `f` to the group and lease.
    /// Finds the lease `target` names and, if it is still held, applies `f`
    /// to its group (one lookup of topic and group).
    fn with_lease(
        &self,
        target: &LeaseRef,
        f: impl FnOnce(&mut Group, &mut Map<u64, SubState>, Instant) -> Wakes,
    ) -> bool {
        let now = Instant::now();
        let mut guard = self.lock();
        let state = &mut *guard;
        let group = state
            .topics
            .get_mut(&*target.topic)
            .and_then(|t| t.groups.get_mut(&*target.group));
        // A lease past its deadline is lost even if no one has reaped it yet: the
        // broker has (logically) given the message to someone else.
        let owned = match group {
            Some(group)
                if group
                    .leases
                    .get(&target.seq)
                    .is_some_and(|l| l.token == target.token && l.deadline > now) =>
            {
                match f(group, &mut state.subs, now) {
                    Wakes::Nobody => {}
                    Wakes::Sub(id) => {
                        if let Some(sub) = state.subs.get(&id) {
                            sub.wake.notify_one();
                        }
                    }
                    Wakes::Group => state.wake_readers(&target.topic, Some(&target.group)),
                }
                true
            }
            _ => false,
        };
        drop(guard);
        if owned {
            // For `wait_until_settled`.
            self.changed.notify_waiters();
        }
        owned
    }
}

/// Sends messages to a [`MemoryBroker`].
pub struct MemoryProducer {
    shared: Arc<Shared>,
    closed: AtomicBool,
}

impl std::fmt::Debug for MemoryProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryProducer")
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish()
    }
}

#[async_trait]
impl Producer for MemoryProducer {
    fn max_payload(&self) -> usize {
        self.shared.config.max_payload
    }

    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed("producer"));
        }
        if let Some(error) = self.shared.publish_fault(topic) {
            return Err(error());
        }
        let mut state = self.shared.lock();
        match state.topics.get_mut(topic) {
            Some(log) => log.messages.push(message),
            None => state
                .topics
                .entry(topic.to_owned())
                .or_default()
                .messages
                .push(message),
        }
        // Wakes the subscriptions of this topic only; `wait_until_settled`
        // needs no wake-up for a message that makes nothing settled.
        state.wake_readers(topic, None);
        drop(state);
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        Ok(())
    }
}

/// Declares topics and groups on a [`MemoryBroker`] and subscribes to them.
pub struct MemoryConsumer {
    shared: Arc<Shared>,
    closed: Arc<AtomicBool>,
}

impl std::fmt::Debug for MemoryConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryConsumer")
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl MemoryConsumer {
    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::Closed("consumer"))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Consumer for MemoryConsumer {
    fn capabilities(&self) -> Capabilities {
        capabilities(&self.shared.config)
    }

    async fn declare_topic_unchecked(&self, topic: &str) -> Result<()> {
        self.check_open()?;
        let mut state = self.shared.lock();
        Shared::declare_topic(&mut state, topic);
        Shared::declare_topic(&mut state, &names::dead_letter_topic(topic));
        Ok(())
    }

    async fn declare_group_unchecked(&self, topic: &str, group: &str, start: StartFrom) -> Result<()> {
        self.check_open()?;
        Shared::declare_group(&mut self.shared.lock(), topic, group, start, false);
        Ok(())
    }

    async fn subscribe_unchecked(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        self.check_open()?;
        let id = self.shared.ids.fetch_add(1, Ordering::Relaxed);
        let group = options
            .group
            .clone()
            .unwrap_or_else(|| format!("~anonymous-{id}"));
        let topics: Vec<Arc<str>> = options.topics.iter().map(|t| Arc::from(t.as_str())).collect();
        let group: Arc<str> = Arc::from(group);
        let wake = Arc::new(Notify::new());
        let mut state = self.shared.lock();
        for topic in &options.topics {
            Shared::declare_group(&mut state, topic, &group, options.start, options.group.is_none());
        }
        state.subs.insert(
            id,
            SubState {
                outstanding: 0,
                prefetch: options.prefetch.max(1),
                wake: Arc::clone(&wake),
                topics: topics.clone(),
                group: Arc::clone(&group),
            },
        );
        drop(state);
        Ok(Box::new(MemorySubscription {
            shared: Arc::clone(&self.shared),
            consumer_closed: Arc::clone(&self.closed),
            id,
            wake,
            topics,
            group,
            named_group: options.group,
            turn: 0,
            closed: false,
            stopped: false,
            failures_seen: self.shared.faults().subscription_failures,
        }))
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        self.shared.lock().wake_all();
        self.shared.changed.notify_waiters();
        Ok(())
    }

    /// Exact: messages not yet delivered, waiting for redelivery, or delivered
    /// and not yet acked.
    async fn lag_unchecked(&self, topic: &str, group: &str) -> Result<u64> {
        self.check_open()?;
        let state = self.shared.lock();
        let stats = state
            .topics
            .get(topic)
            .and_then(|log| log.groups.get(group).map(|g| (log, g)))
            .map(|(log, g)| log.messages.len().saturating_sub(g.cursor) + g.redeliver.len() + g.leases.len());
        match stats {
            Some(lag) => Ok(lag as u64),
            None => Err(Error::NotFound {
                what: format!("group {group:?} on topic {topic:?}"),
            }),
        }
    }

    async fn reposition_group_unchecked(&self, topic: &str, group: &str, start: StartFrom) -> Result<()> {
        self.check_open()?;
        Shared::reposition(&mut self.shared.lock(), topic, group, start)?;
        let state = self.shared.lock();
        state.wake_readers(topic, Some(group));
        drop(state);
        self.shared.changed.notify_waiters();
        Ok(())
    }
}

struct MemorySubscription {
    shared: Arc<Shared>,
    consumer_closed: Arc<AtomicBool>,
    id: u64,
    /// Woken by what concerns this subscription (see `State::wake_readers`).
    wake: Arc<Notify>,
    /// Shared with every lease, which names its topic and group.
    topics: Vec<Arc<str>>,
    group: Arc<str>,
    named_group: Option<String>,
    turn: usize,
    closed: bool,
    /// `stop` was called: nothing more is handed out.
    stopped: bool,
    /// How many injected subscription failures this subscription has returned.
    failures_seen: u64,
}

struct LeaseRef {
    topic: Arc<str>,
    group: Arc<str>,
    seq: usize,
    token: u64,
}

struct MemoryAck {
    shared: Arc<Shared>,
    lease: LeaseRef,
}

/// Ends a lease; returns its subscription if that was at its prefetch limit
/// (so it may take again and must be woken).
fn end_lease(group: &mut Group, subs: &mut Map<u64, SubState>, seq: usize) -> Option<u64> {
    let lease = group.leases.remove(&seq)?;
    let sub = subs.get_mut(&lease.sub)?;
    let was_full = sub.outstanding >= sub.prefetch;
    sub.outstanding = sub.outstanding.saturating_sub(1);
    was_full.then_some(lease.sub)
}

fn not_settled(operation: &'static str) -> Error {
    Error::NotSettled {
        operation,
        reason: "the delivery's lease has ended (ack deadline passed, released, or its subscription closed); it will be redelivered".into(),
    }
}

#[async_trait]
impl AckHandle for MemoryAck {
    async fn ack(&self) -> Result<()> {
        let fault = self.shared.ack_fault();
        match fault {
            Some(AckFault::Fail) => {
                return Err(Error::NotSettled {
                    operation: "ack",
                    reason: "injected ack failure".into(),
                });
            }
            Some(AckFault::Hang) => std::future::pending::<()>().await,
            _ => {}
        }
        let seq = self.lease.seq;
        let owned = self.shared.with_lease(&self.lease, |group, subs, _| {
            let full = end_lease(group, subs, seq);
            group.deliveries.remove(&seq);
            full.map_or(Wakes::Nobody, Wakes::Sub)
        });
        if fault == Some(AckFault::PanicAfterAck) {
            panic!("injected panic after the ack (memory broker fault)");
        }
        if owned { Ok(()) } else { Err(not_settled("ack")) }
    }

    async fn release(&self, delay: Option<Duration>) -> Result<()> {
        let seq = self.lease.seq;
        let delay = delay.filter(|_| self.shared.config.delayed_release);
        let owned = self.shared.with_lease(&self.lease, |group, subs, now| {
            let at = later(now, delay.unwrap_or_default());
            end_lease(group, subs, seq);
            group.redeliver.insert(seq, at);
            Wakes::Group
        });
        if owned {
            Ok(())
        } else {
            Err(not_settled("release"))
        }
    }

    async fn keep_alive(&self) -> Result<()> {
        let extend = self.shared.config.ack_deadline;
        let seq = self.lease.seq;
        let owned = self.shared.with_lease(&self.lease, |group, _, now| {
            if let Some(lease) = group.leases.get_mut(&seq) {
                lease.deadline = later(now, extend);
            }
            Wakes::Nobody
        });
        if owned {
            Ok(())
        } else {
            Err(not_settled("keep-alive"))
        }
    }
}

impl MemorySubscription {
    /// The error `fail_subscriptions` injected, once per call.
    fn injected_failure(&mut self) -> Option<Error> {
        if self.shared.subscription_failures.load(Ordering::Acquire) <= self.failures_seen {
            return None;
        }
        let faults = self.shared.faults();
        if faults.subscription_failures <= self.failures_seen {
            return None;
        }
        self.failures_seen = faults.subscription_failures;
        let error = faults.subscription_error.clone()?;
        drop(faults);
        Some(error())
    }

    /// Takes the next available delivery, or tells when to look again.
    fn try_take(&mut self) -> std::result::Result<Event, Option<Instant>> {
        let now = Instant::now();
        let mut guard = self.shared.lock();
        let state = &mut *guard;
        let mut wake: Option<Instant> = None;
        let n = self.topics.len();
        // Expire overdue leases of every group this subscription reads (with one
        // topic, in the same lookup as the take below).
        for topic in self.topics.iter().filter(|_| n > 1) {
            let Some(group) = state
                .topics
                .get_mut(&**topic)
                .and_then(|t| t.groups.get_mut(&*self.group))
            else {
                continue;
            };
            if let Some(next) = group.expire(now, &mut state.subs, topic, &self.group) {
                wake = Some(wake.map_or(next, |w| w.min(next)));
            }
        }
        let deadline = later(now, self.shared.config.ack_deadline);
        for i in 0..n {
            let index = (self.turn + i) % n;
            let topic = &self.topics[index];
            let Some(log) = state.topics.get_mut(&**topic) else {
                continue;
            };
            let Some(group) = log.groups.get_mut(&*self.group) else {
                continue;
            };
            if n == 1
                && let Some(next) = group.expire(now, &mut state.subs, topic, &self.group)
            {
                wake = Some(wake.map_or(next, |w| w.min(next)));
            }
            let Some(sub) = state.subs.get(&self.id) else {
                return Err(None);
            };
            if sub.outstanding >= sub.prefetch {
                return Err(wake);
            }
            let redelivery = group
                .redeliver
                .iter()
                .find(|(_, at)| **at <= now)
                .map(|(seq, _)| *seq);
            if redelivery.is_none()
                && let Some(at) = group.redeliver.values().min()
            {
                wake = Some(wake.map_or(*at, |w| w.min(*at)));
            }
            let seq = match redelivery {
                Some(seq) => {
                    group.redeliver.remove(&seq);
                    seq
                }
                None if group.cursor < log.messages.len() => {
                    group.cursor += 1;
                    group.cursor - 1
                }
                None => continue,
            };
            let token = self.shared.ids.fetch_add(1, Ordering::Relaxed);
            group.leases.insert(
                seq,
                Lease {
                    sub: self.id,
                    token,
                    deadline,
                },
            );
            group.first_deadline = Some(group.first_deadline.map_or(deadline, |f| f.min(deadline)));
            let attempt = group.deliveries.entry(seq).or_insert(0);
            *attempt += 1;
            let attempt = *attempt;
            if let Some(sub) = state.subs.get_mut(&self.id) {
                sub.outstanding += 1;
            }
            self.turn = index + 1;
            let origin = Origin {
                topic: String::from(&**topic),
                group: self.named_group.clone(),
                partition: None,
                sequence: Some(seq as u64),
            };
            let message = log.messages[seq].clone();
            let delivery = match log.undecodable.get(&seq) {
                Some(reason) => Delivery::undecodable(message, origin, attempt, reason.clone()),
                None => Delivery::new(message, origin, attempt),
            };
            let acker = Acker::new(MemoryAck {
                shared: Arc::clone(&self.shared),
                lease: LeaseRef {
                    topic: Arc::clone(topic),
                    group: Arc::clone(&self.group),
                    seq,
                    token,
                },
            });
            return Ok(Event::Delivery(delivery, acker));
        }
        Err(wake)
    }

    /// Gives back every lease this subscription holds and forgets it.
    fn leave(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        let now = Instant::now();
        let mut state = self.shared.lock();
        state.subs.remove(&self.id);
        for topic in &self.topics {
            let Some(log) = state.topics.get_mut(&**topic) else {
                continue;
            };
            if let Some(group) = log.groups.get_mut(&*self.group) {
                let mine: Vec<usize> = group
                    .leases
                    .iter()
                    .filter(|(_, l)| l.sub == self.id)
                    .map(|(seq, _)| *seq)
                    .collect();
                for seq in mine {
                    group.leases.remove(&seq);
                    group.redeliver.insert(seq, now);
                }
                if group.anonymous {
                    log.groups.remove(&*self.group);
                }
            }
            state.wake_readers(topic, Some(&self.group));
        }
        drop(state);
        self.shared.changed.notify_waiters();
    }
}

#[async_trait]
impl Subscription for MemorySubscription {
    async fn next(&mut self) -> Option<Result<Event>> {
        loop {
            if self.closed || self.stopped || self.consumer_closed.load(Ordering::Acquire) {
                return None;
            }
            if let Some(error) = self.injected_failure() {
                return Some(Err(error));
            }
            // Take what is there without registering for a wake-up; register
            // (before looking again, so no change is missed) only when idle.
            if let Ok(event) = self.try_take() {
                return Some(Ok(event));
            }
            let wake = Arc::clone(&self.wake);
            let changed = wake.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(error) = self.injected_failure() {
                return Some(Err(error));
            }
            match self.try_take() {
                Ok(event) => return Some(Ok(event)),
                Err(wake) => {
                    let wake = wake.unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
                    tokio::select! {
                        _ = changed => {}
                        _ = tokio::time::sleep_until(wake) => {}
                    }
                }
            }
        }
    }

    fn try_next(&mut self) -> Option<Option<Result<Event>>> {
        if self.closed || self.stopped || self.consumer_closed.load(Ordering::Acquire) {
            return Some(None);
        }
        if let Some(error) = self.injected_failure() {
            return Some(Some(Err(error)));
        }
        self.try_take().ok().map(|event| Some(Ok(event)))
    }

    async fn stop(&mut self) -> Result<()> {
        self.stopped = true;
        Ok(())
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        self.leave();
        Ok(())
    }

    /// Exact: the length of each topic's log now; caught up once the group's
    /// cursor has passed it and nothing before it waits for redelivery or is
    /// held unacknowledged.
    async fn catch_up_probe(&mut self) -> Result<Box<dyn CatchUpProbe>> {
        let state = self.shared.lock();
        let ends = self
            .topics
            .iter()
            .map(|t| {
                (
                    Arc::clone(t),
                    state.topics.get(&**t).map_or(0, |log| log.messages.len()),
                )
            })
            .collect();
        Ok(Box::new(MemoryCatchUp {
            shared: Arc::clone(&self.shared),
            group: Arc::clone(&self.group),
            ends,
        }))
    }
}

/// Where each topic's log ended when a catch-up run began.
struct MemoryCatchUp {
    shared: Arc<Shared>,
    group: Arc<str>,
    ends: Vec<(Arc<str>, usize)>,
}

#[async_trait]
impl CatchUpProbe for MemoryCatchUp {
    async fn caught_up(&self) -> Result<bool> {
        let state = self.shared.lock();
        for (topic, end) in &self.ends {
            let Some(group) = state
                .topics
                .get(&**topic)
                .and_then(|log| log.groups.get(&*self.group))
            else {
                return Err(Error::NotFound {
                    what: format!("group {:?} on topic {topic:?}", self.group),
                });
            };
            let before = |seq: &usize| *seq < *end;
            if group.cursor < *end || group.redeliver.keys().any(before) || group.leases.keys().any(before) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

impl Drop for MemorySubscription {
    fn drop(&mut self) {
        self.leave();
    }
}
