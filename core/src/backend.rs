//! The backend interface: what each broker implements, kept small.
//!
//! A backend provides a [`Producer`] and a [`Consumer`]. The consumer opens a
//! [`Subscription`] that yields [`Event`]s; each delivery comes with an [`Acker`]
//! that settles it (ack, release, keep-alive). Everything else — concurrency,
//! ordering lanes, retries, dead letters, shutdown — is the [`Runner`](crate::Runner)'s job,
//! written once for all backends.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::Serialize;

use crate::error::Result;
use crate::message::{Delivery, Message};
use crate::names;

/// What a backend promises. The conformance suite runs or skips its cases by these.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// The backend's name (`"memory"`, `"kafka"`, …).
    pub backend: &'static str,
    /// Messages are redelivered until acknowledged (false for core NATS).
    pub at_least_once: bool,
    /// The largest payload `send` accepts, in bytes, after the library's headers.
    pub max_payload: usize,
    /// A new group can start from the earliest retained message.
    pub replay: bool,
    /// A new group can start at a point in time ([`StartFrom::Timestamp`]): the
    /// broker keeps an append time per message and can seek to it.
    pub replay_from_time: bool,
    /// An existing group can be moved to another start with
    /// [`Consumer::reposition_group`] (false unless the backend says so).
    pub reposition: bool,
    /// A subscription can tell where its log ends when a run begins and when
    /// everything up to there has been settled
    /// ([`Subscription::catch_up_probe`]), so a runner can run in catch-up mode
    /// ([`Runner::catch_up`](crate::Runner::catch_up)). False unless the
    /// backend says so (a queue is not a log: RabbitMQ, core NATS).
    pub catch_up: bool,
    /// Messages published while no group is declared are kept (false on RabbitMQ).
    pub retains_without_group: bool,
    /// Acks are positions (Kafka offsets): on shutdown the runner drains what it
    /// holds instead of releasing it.
    pub positional_acks: bool,
    /// The broker redelivers a held message after this long without an ack or a
    /// keep-alive; the runner sends keep-alives well before it.
    pub ack_deadline: Option<Duration>,
    /// Per-key order holds across several instances of one group.
    pub key_order_across_instances: bool,
    /// `release` honours a delay.
    pub delayed_release: bool,
    /// The backend talks to a broker over the network (so "unreachable" means something).
    pub networked: bool,
    /// The CloudEvents protocol binding the backend's headers follow: which
    /// names typed events are sent and read under (see [`crate::cloudevents`]).
    /// [`Binding::Http`](crate::cloudevents::Binding::Http) (`ce-` headers) unless the backend says otherwise.
    pub binding: crate::cloudevents::Binding,
}

impl Capabilities {
    /// Capabilities of an at-least-once backend with everything supported; adjust
    /// the fields that differ.
    pub fn new(backend: &'static str, max_payload: usize) -> Self {
        Capabilities {
            backend,
            at_least_once: true,
            max_payload,
            replay: true,
            replay_from_time: true,
            reposition: false,
            catch_up: false,
            retains_without_group: true,
            positional_acks: false,
            ack_deadline: None,
            key_order_across_instances: false,
            delayed_release: true,
            networked: true,
            binding: crate::cloudevents::Binding::Http,
        }
    }
}

/// Where a new consumer group starts. Applies only when the group is first declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StartFrom {
    /// Only messages published after the group was declared (the default).
    #[default]
    Latest,
    /// Every message the broker still retains for the topic.
    Earliest,
    /// Every retained message the broker appended at or after this time (Kafka:
    /// the record timestamp, log-append or create time as the topic says;
    /// JetStream: the stream's store time; memory: the message's timestamp).
    /// Only where [`Capabilities::replay_from_time`] says so; elsewhere
    /// declaring or subscribing with it is [`Error::Unsupported`](crate::Error::Unsupported).
    Timestamp(SystemTime),
}

impl StartFrom {
    /// The time in milliseconds since the Unix epoch, for [`StartFrom::Timestamp`]
    /// (times before 1970 are 0).
    pub fn timestamp_millis(self) -> Option<i64> {
        match self {
            StartFrom::Timestamp(t) => Some(
                t.duration_since(std::time::UNIX_EPOCH)
                    .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                    .unwrap_or(0),
            ),
            _ => None,
        }
    }
}

/// Refuses a start this backend cannot honour, the same way everywhere.
fn check_start(caps: &Capabilities, start: StartFrom) -> Result<()> {
    if matches!(start, StartFrom::Timestamp(_)) && !caps.replay_from_time {
        return Err(crate::Error::Unsupported(format!(
            "{} cannot start a group at a point in time (capabilities.replay_from_time = false)",
            caps.backend
        )));
    }
    Ok(())
}

/// What to subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscribeOptions {
    /// The topics to consume.
    pub topics: Vec<String>,
    /// The consumer group; `None` for a private, non-durable subscription.
    pub group: Option<String>,
    /// Where a group that does not exist yet starts.
    pub start: StartFrom,
    /// How many unsettled deliveries the backend may hand out at once.
    pub prefetch: usize,
}

impl SubscribeOptions {
    /// A subscription to `topic` in no group, starting at the latest message.
    pub fn new(topic: impl Into<String>) -> Self {
        SubscribeOptions {
            topics: vec![topic.into()],
            group: None,
            start: StartFrom::Latest,
            prefetch: 32,
        }
    }

    /// Also consume `topic`.
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topics.push(topic.into());
        self
    }

    /// Consume as a member of `group`.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Where a new group starts.
    pub fn start(mut self, start: StartFrom) -> Self {
        self.start = start;
        self
    }

    /// How many unsettled deliveries may be outstanding (at least 1).
    pub fn prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// Checks every name against the portable grammar.
    pub fn validate(&self) -> Result<()> {
        if self.topics.is_empty() {
            return Err(crate::Error::InvalidConfig(
                "a subscription needs at least one topic".into(),
            ));
        }
        for topic in &self.topics {
            names::validate_topic(topic)?;
        }
        if let Some(group) = &self.group {
            names::validate_group(group)?;
        }
        if self.prefetch == 0 {
            return Err(crate::Error::InvalidConfig("prefetch must be at least 1".into()));
        }
        Ok(())
    }
}

/// Sends messages to a broker. Implemented by each backend.
///
/// Applications call [`send`](Producer::send) (and [`ProducerExt::send_json`]);
/// backends implement [`publish`](Producer::publish), which `send` calls after
/// checking the topic, headers and payload size the same way on every backend.
#[async_trait]
pub trait Producer: Send + Sync + 'static {
    /// The largest payload this producer accepts, in bytes.
    fn max_payload(&self) -> usize;

    /// The backend's name, as in its consumer's [`Capabilities::backend`]
    /// (the `messaging.system` of its metrics). The default is `"unknown"`.
    fn backend(&self) -> &'static str {
        "unknown"
    }

    /// Backend hook: sends an already validated message. Resolves once the broker
    /// has taken responsibility for it. Applications call [`send`](Producer::send).
    async fn publish(&self, topic: &str, message: Message) -> Result<()>;

    /// Waits until every message accepted so far has been taken by the broker.
    async fn flush(&self) -> Result<()>;

    /// Flushes, then closes. Later sends fail with [`Error::Closed`](crate::Error::Closed).
    async fn close(&self) -> Result<()>;

    /// Sends `message` to `topic`; resolves when the broker has taken it.
    ///
    /// Fails with a typed error, before anything reaches the broker, for a bad
    /// topic name, a header outside the portable grammar or a payload over
    /// [`max_payload`](Producer::max_payload).
    async fn send(&self, topic: &str, message: Message) -> Result<()> {
        message.validate(topic, self.max_payload())?;
        crate::observe::send(self.backend(), topic, message, |m| self.publish(topic, m)).await
    }

    /// Sends many messages, pipelined; resolves when the broker has taken all of
    /// them. Every message is validated before any is sent.
    async fn send_batch(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        let max = self.max_payload();
        for message in &messages {
            message.validate(topic, max)?;
        }
        let sends = messages
            .into_iter()
            .map(|m| crate::observe::send(self.backend(), topic, m, |m| self.publish(topic, m)));
        futures::future::try_join_all(sends).await.map(|_| ())
    }
}

/// Conveniences for every [`Producer`].
#[async_trait]
pub trait ProducerExt: Producer {
    /// Sends `value` as a JSON payload.
    async fn send_json<T: Serialize + Sync + ?Sized>(&self, topic: &str, value: &T) -> Result<()> {
        self.send(topic, Message::json(value)?).await
    }

    /// Sends `value` as a JSON payload with an ordering key.
    async fn send_json_keyed<T: Serialize + Sync + ?Sized>(
        &self,
        topic: &str,
        key: &str,
        value: &T,
    ) -> Result<()> {
        self.send(topic, Message::json(value)?.with_key(key)).await
    }
}

impl<P: Producer + ?Sized> ProducerExt for P {}

/// Declares topics and groups and opens subscriptions. Implemented by each backend.
///
/// As with [`Producer`], applications call the provided methods, which check
/// names the same way everywhere, and backends implement the `*_unchecked` hooks.
#[async_trait]
pub trait Consumer: Send + Sync + 'static {
    /// What this backend promises.
    fn capabilities(&self) -> Capabilities;

    /// Backend hook: creates the topic and its `<topic>.dlq` if they are missing.
    async fn declare_topic_unchecked(&self, topic: &str) -> Result<()>;

    /// Backend hook: creates the group if it is missing, starting at `start`; from
    /// then on it keeps every message published to the topic.
    async fn declare_group_unchecked(&self, topic: &str, group: &str, start: StartFrom) -> Result<()>;

    /// Backend hook: opens a subscription; returns once it is ready to receive.
    async fn subscribe_unchecked(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>>;

    /// Closes the consumer's connections. Open subscriptions end.
    async fn close(&self) -> Result<()>;

    /// Backend hook for [`lag`](Consumer::lag). The default says the backend
    /// cannot tell ([`Error::Unsupported`](crate::Error::Unsupported)).
    async fn lag_unchecked(&self, topic: &str, group: &str) -> Result<u64> {
        let _ = (topic, group);
        Err(crate::Error::Unsupported(format!(
            "{} cannot report consumer lag",
            self.capabilities().backend
        )))
    }

    /// Backend hook: moves an existing group to `start`. The default refuses
    /// with [`Error::Unsupported`](crate::Error::Unsupported).
    async fn reposition_group_unchecked(&self, topic: &str, group: &str, start: StartFrom) -> Result<()> {
        let _ = (topic, group, start);
        Err(crate::Error::Unsupported(format!(
            "{} cannot reposition an existing group (capabilities.reposition = false)",
            self.capabilities().backend
        )))
    }

    /// The backlog of `group` on `topic`: messages the group has not acknowledged
    /// yet, as far as the broker shows them (memory: exact; see the README's
    /// "Observability" section for what each broker can see). Lag is a property of
    /// the group, not of one instance: every instance reports the same number, so
    /// aggregate it across instances with `max`, never `sum`.
    async fn lag(&self, topic: &str, group: &str) -> Result<u64> {
        names::validate_declared_topic(topic)?;
        names::validate_group(group)?;
        self.lag_unchecked(topic, group).await
    }

    /// Moves an existing group on `topic` to `start` — the "rebuild the
    /// projection" operation: from then on the group gets every retained message
    /// from that point again ([`StartFrom::Earliest`]), from a time, or only new
    /// ones. Refused while the group has active members (stop its runners
    /// first) and for a group that does not exist ([`Error::NotFound`](crate::Error::NotFound)).
    /// Only where [`Capabilities::reposition`] says so; elsewhere
    /// [`Error::Unsupported`](crate::Error::Unsupported).
    async fn reposition_group(&self, topic: &str, group: &str, start: StartFrom) -> Result<()> {
        names::validate_topic(topic)?;
        names::validate_group(group)?;
        check_start(&self.capabilities(), start)?;
        self.reposition_group_unchecked(topic, group, start).await
    }

    /// Creates `topic` (and its dead-letter topic) if missing.
    async fn declare_topic(&self, topic: &str) -> Result<()> {
        names::validate_declared_topic(topic)?;
        self.declare_topic_unchecked(topic).await
    }

    /// Creates `group` on `topic` if missing. Declaring fixes the group's start:
    /// it keeps every message published from then on, even before its first
    /// subscriber connects. `start` applies only to a new group.
    async fn declare_group(&self, topic: &str, group: &str, start: StartFrom) -> Result<()> {
        names::validate_declared_topic(topic)?;
        names::validate_group(group)?;
        check_start(&self.capabilities(), start)?;
        self.declare_group_unchecked(topic, group, start).await
    }

    /// Opens a subscription (declaring its group if needed); returns once ready.
    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        options.validate()?;
        check_start(&self.capabilities(), options.start)?;
        self.subscribe_unchecked(options).await
    }
}

/// A partition of a topic, on brokers that have them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Partition {
    /// The topic.
    pub topic: String,
    /// The partition number.
    pub partition: i32,
}

/// What a subscription yields.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A message to handle, and the handle that settles it.
    Delivery(Delivery, Acker),
    /// Partitions were assigned to this subscription.
    Assigned(Vec<Partition>),
    /// Partitions were taken away; held deliveries from them should not be acked
    /// any more (they are released by the runner and redelivered elsewhere).
    Revoked(Vec<Partition>),
}

/// An open subscription. Owned by one runner (or test).
///
/// Dropping it without [`close`](Subscription::close) is a crash: nothing more is
/// settled and the broker redelivers what was not acknowledged.
#[async_trait]
pub trait Subscription: Send {
    /// The next event, or `None` once the subscription has ended.
    ///
    /// Must be cancel-safe: if the future is dropped before it completes, no
    /// delivery is lost (the runner polls it inside `select!`).
    async fn next(&mut self) -> Option<Result<Event>>;

    /// What [`next`](Subscription::next) would return at once, without waiting:
    /// `Some(event)` if it is ready, `None` if `next` would wait. The runner
    /// calls it to take what has already arrived without a wait (and without a
    /// future per delivery). The default polls `next` once and drops it, which
    /// is correct for any cancel-safe `next`; a backend may answer more cheaply.
    fn try_next(&mut self) -> Option<Option<Result<Event>>> {
        futures::FutureExt::now_or_never(self.next())
    }

    /// The next control event ([`Event::Assigned`], [`Event::Revoked`], or an
    /// error), without taking a delivery. The runner polls this while it holds
    /// all it may and does not call [`next`](Subscription::next), so a
    /// revocation reaches it even then. Must be cancel-safe. The default never
    /// resolves (for backends without partitions).
    async fn control(&mut self) -> Option<Result<Event>> {
        futures::future::pending().await
    }

    /// Stops the broker from handing this subscription more deliveries (for
    /// example AMQP `basic.cancel`, or no further pull requests), so that what the
    /// runner releases next goes to another consumer instead of straight back
    /// into this one's prefetch. Deliveries already yielded can still be acked,
    /// released and kept alive; [`next`](Subscription::next) may still return
    /// deliveries that were already fetched. Called by the runner at shutdown
    /// before it releases anything; must be idempotent. The default does nothing
    /// (for backends where a subscription only receives what it asks for).
    async fn stop(&mut self) -> Result<()> {
        Ok(())
    }

    /// Graceful close: gives back deliveries fetched but not yet yielded, commits
    /// what was acked, leaves the group and closes the connection.
    async fn close(self: Box<Self>) -> Result<()>;

    /// Backend hook for catch-up runs: reads where the log of every topic (and
    /// partition) this subscription consumes ends *now*, and returns a probe
    /// that tells when every message that existed then has been settled (acked
    /// or dead-lettered) by this subscription's group — whatever was published
    /// after this call is not required. Called once, by
    /// [`Runner::run`](crate::Runner::run) in catch-up mode, right after
    /// subscribing. The default refuses with
    /// [`Error::Unsupported`](crate::Error::Unsupported); a backend that
    /// implements it sets [`Capabilities::catch_up`].
    async fn catch_up_probe(&mut self) -> Result<Box<dyn CatchUpProbe>> {
        Err(crate::Error::Unsupported(
            "this backend cannot tell where its log ends (capabilities.catch_up = false)".into(),
        ))
    }
}

/// Made by [`Subscription::catch_up_probe`]: remembers where the log ended when
/// it was made, and answers whether the group has settled everything up to
/// there. Asked by the runner after settlements (and about once a second),
/// never concurrently with itself, until it says yes.
#[async_trait]
pub trait CatchUpProbe: Send + Sync + 'static {
    /// Whether every message that was in the log when the probe was made has
    /// been settled by the group (a log that was empty then: at once). A
    /// retryable error is asked again later; any other ends the wait with it.
    async fn caught_up(&self) -> Result<bool>;
}

/// Backend hook behind an [`Acker`]: settles one delivery.
///
/// Every method tells the truth: it returns `Ok` only when the settlement took
/// effect (or was handed to the broker on a live channel, where the protocol has
/// no reply), and [`Error::NotSettled`](crate::Error::NotSettled) when the
/// delivery is no longer held (lease expired, channel closed, partition
/// revoked). The runner bounds every call with its settle timeout.
#[async_trait]
pub trait AckHandle: Send + Sync + 'static {
    /// Acknowledges: the broker will not deliver it to this group again.
    async fn ack(&self) -> Result<()>;
    /// Gives it back for redelivery, at once or after `delay`.
    async fn release(&self, delay: Option<Duration>) -> Result<()>;
    /// Extends the broker's ack deadline for a delivery still held.
    async fn keep_alive(&self) -> Result<()> {
        Ok(())
    }
}

/// Settles one delivery. Settling is idempotent: only the first `ack` or `release`
/// reaches the broker, later ones (and keep-alives after settling) do nothing.
/// Cheap to clone: clones settle the same delivery (one allocation per
/// delivery, shared by the runner and the attempt that handles it).
#[derive(Clone)]
pub struct Acker {
    inner: Arc<AckerInner<dyn AckHandle>>,
}

struct AckerInner<H: ?Sized> {
    settled: AtomicBool,
    handle: H,
}

impl std::fmt::Debug for Acker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acker")
            .field("settled", &self.is_settled())
            .finish_non_exhaustive()
    }
}

impl Acker {
    /// Wraps a backend's settlement handle.
    pub fn new(handle: impl AckHandle) -> Self {
        Acker {
            inner: Arc::new(AckerInner {
                settled: AtomicBool::new(false),
                handle,
            }),
        }
    }

    /// Whether `ack` or `release` has been called.
    pub fn is_settled(&self) -> bool {
        self.inner.settled.load(Ordering::Acquire)
    }

    fn settle_once(&self) -> bool {
        !self.inner.settled.swap(true, Ordering::AcqRel)
    }

    /// Acknowledges the delivery (once).
    pub async fn ack(&self) -> Result<()> {
        if self.settle_once() {
            self.inner.handle.ack().await
        } else {
            Ok(())
        }
    }

    /// Gives the delivery back for redelivery (once), optionally after `delay`.
    pub async fn release(&self, delay: Option<Duration>) -> Result<()> {
        if self.settle_once() {
            self.inner.handle.release(delay).await
        } else {
            Ok(())
        }
    }

    /// Extends the ack deadline while the delivery is held; nothing once settled.
    pub async fn keep_alive(&self) -> Result<()> {
        if self.is_settled() {
            Ok(())
        } else {
            self.inner.handle.keep_alive().await
        }
    }
}

/// A producer and a consumer for one broker.
#[derive(Clone)]
pub struct Connection {
    /// Sends messages.
    pub producer: Arc<dyn Producer>,
    /// Declares topics and groups, opens subscriptions.
    pub consumer: Arc<dyn Consumer>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("backend", &self.consumer.capabilities().backend)
            .finish()
    }
}

impl Connection {
    /// A runner on this connection (dead letters go through its producer).
    pub fn runner(&self) -> crate::Runner {
        crate::Runner::new(Arc::clone(&self.consumer), Arc::clone(&self.producer))
    }

    /// Flushes and closes the producer, then closes the consumer.
    pub async fn close(&self) -> Result<()> {
        let produced = self.producer.close().await;
        let consumed = self.consumer.close().await;
        produced.and(consumed)
    }
}
