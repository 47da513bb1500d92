//! Core NATS mode: subjects and queue groups, at-most-once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::Client;
use async_trait::async_trait;
use futures::StreamExt;
use polybus_core::{
    AckHandle, Acker, Capabilities, Consumer, Delivery, Error, Event, Message, Origin, Producer, Result,
    SendGate, StartFrom, SubscribeOptions, Subscription,
};

use crate::markers::Markers;
use crate::security::{Denied, Violation, Violations};
use crate::{NatsConfig, backend_error, headers};

fn capabilities(server_max: usize) -> Capabilities {
    let mut caps = Capabilities::new("nats-core", server_max.saturating_sub(crate::HEADER_ROOM));
    caps.at_least_once = false;
    caps.replay = false;
    caps.replay_from_time = false;
    caps.retains_without_group = false;
    caps.delayed_release = false;
    caps.binding = polybus_core::cloudevents::Binding::Nats;
    caps
}

/// Publishes on core NATS; `send` resolves once the server has read the message
/// (a round trip), with no persistence behind it. A send the user's permissions
/// refuse fails with [`Error::PermissionDenied`] (the server's `-ERR` comes
/// before the round trip's answer).
pub struct CoreProducer {
    client: Client,
    violations: Violations,
    markers: Arc<Markers>,
    timeout: Duration,
    server_max: usize,
    gate: SendGate,
}

impl std::fmt::Debug for CoreProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreProducer")
            .field("closed", &self.gate.is_closed())
            .finish()
    }
}

impl CoreProducer {
    /// Opens a NATS connection for publishing.
    pub async fn connect(config: &NatsConfig) -> Result<Self> {
        let violations = Violations::with_markers();
        // A buffer of one message: the producer's only subscription is its
        // markers' (request answers do not use it).
        let mut own = config.clone();
        own.subscription_capacity = 1;
        let client = own
            .client_watched("polybus-core-producer", None, &violations)
            .await?;
        let server_max = client.server_info().max_payload;
        let markers = Arc::clone(violations.markers().ok_or_else(|| {
            Error::InvalidConfig("NATS: the core producer's connection has no markers".into())
        })?);
        let mut seen = violations.watch();
        let marker = markers.start(&client, config.request_timeout).await?;
        // After the answer the first marker is in the buffer: the next ones
        // are reported as slow-consumer events. A user who may not use the
        // marker subject is told so here.
        Violations::default()
            .round_trip(&client, config.request_timeout, &mut seen, |v| {
                v.subject == marker
            })
            .await
            .map_err(|e| match e {
                Error::PermissionDenied { message, .. } if message.contains(&marker) => {
                    crate::markers::marker_error(&crate::security::Violation {
                        denied: Denied::Publish,
                        subject: marker.clone(),
                    })
                }
                other => other,
            })?;
        Ok(CoreProducer {
            client,
            violations,
            markers,
            timeout: config.request_timeout,
            server_max,
            gate: SendGate::new("producer"),
        })
    }
}

#[async_trait]
impl Producer for CoreProducer {
    fn max_payload(&self) -> usize {
        capabilities(self.server_max).max_payload
    }

    fn backend(&self) -> &'static str {
        capabilities(self.server_max).backend
    }

    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        let _in_flight = self.gate.enter()?;
        let headers = headers::encode(&message, false)?;
        let size = message.payload.len() + headers::wire_len(&headers);
        if size > self.server_max {
            return Err(Error::PayloadTooLarge {
                size,
                max: self.server_max,
            });
        }
        // Violations reported from before the publish on: its -ERR, if any,
        // comes before the round trip's answer.
        let mut seen = self.violations.watch();
        let data = async {
            self.client
                .publish_with_headers(topic.to_owned(), headers, message.payload)
                .await
                .map_err(|e| backend_error(&format!("publishing to '{topic}'"), e, true))
        };
        self.markers
            .confirm(
                &self.client,
                self.timeout,
                &mut seen,
                |v| v.denied == Denied::Publish && v.subject == topic,
                data,
            )
            .await
    }

    async fn flush(&self) -> Result<()> {
        let mut seen = self.violations.watch();
        self.markers
            .confirm(&self.client, self.timeout, &mut seen, |_| false, async { Ok(()) })
            .await
    }

    async fn close(&self) -> Result<()> {
        self.gate.close().await;
        let flushed = self.flush().await;
        let _ = self.client.drain().await;
        flushed
    }
}

/// Counts the messages a core NATS connection dropped because a subscription's
/// buffer (`NatsConfig::subscription_capacity`) was full: core NATS is
/// at-most-once, but its loss is counted, never silent.
///
/// The count comes from async-nats's slow-consumer events, one per dropped
/// message. async-nats hands those events over through a bounded queue (128)
/// and drops events too when it is full, so under a large burst the count is a
/// lower bound: more may have been lost, never fewer. Each increase is logged
/// with `warn!` (at most once a second, with the total).
#[derive(Clone, Default)]
pub struct DropCounter {
    inner: Arc<DropInner>,
}

#[derive(Default)]
struct DropInner {
    dropped: AtomicU64,
    connection_losses: AtomicU64,
    warned: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for DropCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DropCounter")
            .field("dropped", &self.dropped())
            .field("connection_losses", &self.connection_losses())
            .finish()
    }
}

impl DropCounter {
    /// Messages dropped so far (a lower bound, see the type's docs).
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// How often the consumer's connection was lost. Whatever was on its way
    /// to the consumer then is gone (at-most-once): a message async-nats cannot
    /// parse (header values or names that are not UTF-8 / printable ASCII, from
    /// another client) costs the connection each time one is published, and
    /// the messages behind it in the same read.
    pub fn connection_losses(&self) -> u64 {
        self.inner.connection_losses.load(Ordering::Relaxed)
    }

    /// Counts one connection loss, loudly.
    pub(crate) fn record_loss(&self) {
        let total = self.inner.connection_losses.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(
            target: "polybus_nats",
            connection_losses = total,
            "core NATS consumer connection lost: messages in flight to it are lost (at-most-once); \
             a message the NATS client cannot parse (headers that are not UTF-8) does this each time it is published"
        );
    }

    /// Counts one dropped message and logs the total (at most once a second).
    pub(crate) fn record(&self) {
        let total = self.inner.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        let mut warned = self.inner.warned.lock().unwrap_or_else(|p| p.into_inner());
        if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
            *warned = Some(Instant::now());
            tracing::warn!(
                target: "polybus_nats",
                dropped = total,
                "core NATS subscription buffer full: messages dropped (at-most-once); \
                 the consumer is slower than the publishers (see subscription_capacity)"
            );
        }
    }
}

/// Subscribes on core NATS: a group is a queue group; nothing is stored, so
/// declaring is a no-op and messages sent while nobody listens are gone.
pub struct CoreConsumer {
    client: Client,
    violations: Violations,
    timeout: Duration,
    server_max: usize,
    closed: Arc<AtomicBool>,
    drops: DropCounter,
}

impl std::fmt::Debug for CoreConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreConsumer").finish_non_exhaustive()
    }
}

impl CoreConsumer {
    /// Opens a NATS connection for subscribing.
    pub async fn connect(config: &NatsConfig) -> Result<Self> {
        let drops = DropCounter::default();
        let violations = Violations::default();
        let client = config
            .client_watched("polybus-core-consumer", Some(drops.clone()), &violations)
            .await?;
        let server_max = client.server_info().max_payload;
        Ok(CoreConsumer {
            client,
            violations,
            timeout: config.request_timeout,
            server_max,
            closed: Arc::new(AtomicBool::new(false)),
            drops,
        })
    }

    /// How many messages this consumer's connection has dropped because a
    /// subscription's buffer was full (a lower bound, see [`DropCounter`]).
    pub fn dropped(&self) -> u64 {
        self.drops.dropped()
    }

    /// How often this consumer's connection was lost (see
    /// [`DropCounter::connection_losses`]).
    pub fn connection_losses(&self) -> u64 {
        self.drops.connection_losses()
    }

    /// A handle that reads the same count, kept after the consumer is put in a
    /// [`Connection`](polybus_core::Connection) (as `Arc<dyn Consumer>`).
    pub fn drop_counter(&self) -> DropCounter {
        self.drops.clone()
    }
}

#[async_trait]
impl Consumer for CoreConsumer {
    fn capabilities(&self) -> Capabilities {
        capabilities(self.server_max)
    }

    async fn declare_topic_unchecked(&self, _topic: &str) -> Result<()> {
        Ok(())
    }

    async fn declare_group_unchecked(&self, _topic: &str, _group: &str, _start: StartFrom) -> Result<()> {
        Ok(())
    }

    async fn subscribe_unchecked(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed("consumer"));
        }
        // Kept by the subscription for its whole life: a subscription the
        // server refuses now or later (permissions reloaded) ends it.
        let mut seen = self.violations.watch();
        let mut subscribers = Vec::new();
        for topic in &options.topics {
            let subscriber = match &options.group {
                Some(group) => self.client.queue_subscribe(topic.clone(), group.clone()).await,
                None => self.client.subscribe(topic.clone()).await,
            }
            .map_err(|e| backend_error(&format!("subscribing to '{topic}'"), e, true))?;
            subscribers.push(subscriber);
        }
        // Once the server has the subscription, messages published after this
        // point reach it; a refused one was answered with an -ERR before.
        let topics = options.topics.clone();
        self.violations
            .round_trip(&self.client, self.timeout, &mut seen, |v| refuses(v, &topics))
            .await?;
        Ok(Box::new(CoreSubscription {
            violations: seen,
            topics,
            messages: futures::stream::select_all(subscribers),
            group: options.group,
            consumer_closed: Arc::clone(&self.closed),
            stopped: false,
            client: self.client.clone(),
            timeout: self.timeout,
        }))
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        self.client
            .drain()
            .await
            .map_err(|e| backend_error("closing the NATS connection", e, true))
    }
}

/// Whether `v` refuses a subscription to one of `topics`.
fn refuses(v: &Violation, topics: &[String]) -> bool {
    v.denied == Denied::Subscribe && topics.contains(&v.subject)
}

struct CoreSubscription {
    /// The connection's permission violations: the server refuses a
    /// subscription when the user's permissions are reloaded without it (and
    /// stops sending to it), so one about these topics ends the subscription.
    violations: tokio::sync::broadcast::Receiver<Arc<Violation>>,
    topics: Vec<String>,
    messages: futures::stream::SelectAll<async_nats::Subscriber>,
    group: Option<String>,
    consumer_closed: Arc<AtomicBool>,
    stopped: bool,
    client: Client,
    timeout: Duration,
}

#[async_trait]
impl Subscription for CoreSubscription {
    async fn next(&mut self) -> Option<Result<Event>> {
        if self.consumer_closed.load(Ordering::Acquire) {
            return None;
        }
        let msg = loop {
            tokio::select! {
                biased;
                msg = self.messages.next() => break msg?,
                seen = self.violations.recv() => match seen {
                    Ok(v) if refuses(&v, &self.topics) => {
                        tracing::warn!(target: "polybus_nats", subject = v.subject, "subscription refused mid-run; ending it");
                        return Some(Err(v.error()));
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    // The connection is gone: its subscribers end too.
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        break self.messages.next().await?;
                    }
                },
            }
        };
        let message = headers::decode(msg.payload, msg.headers.as_ref(), || {
            polybus_core::Message::new(polybus_core::Bytes::new()).id
        });
        let origin = Origin {
            topic: msg.subject.to_string(),
            group: self.group.clone(),
            partition: None,
            sequence: None,
        };
        Some(Ok(Event::Delivery(
            Delivery::new(message, origin, 1),
            Acker::new(NoAck),
        )))
    }

    async fn stop(&mut self) -> Result<()> {
        if !self.stopped {
            self.stopped = true;
            // First a round trip: the PONG comes after every message the server
            // routed to us before it, so those are in the subscribers' buffers
            // (a message still on the wire when the drain started was lost).
            crate::round_trip(&self.client, self.timeout).await?;
            // Unsubscribe, but let through what the server sent before it saw
            // that: `next` yields it, then ends.
            for subscriber in self.messages.iter_mut() {
                let _ = subscriber.drain().await;
            }
            // Once the server has seen the UNSUBs, nothing published later comes.
            crate::round_trip(&self.client, self.timeout).await?;
        }
        Ok(())
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        for subscriber in self.messages.iter_mut() {
            let _ = subscriber.unsubscribe().await;
        }
        Ok(())
    }
}

/// Core NATS has nothing to settle: a message is gone once delivered.
struct NoAck;

#[async_trait]
impl AckHandle for NoAck {
    async fn ack(&self) -> Result<()> {
        Ok(())
    }

    async fn release(&self, _delay: Option<Duration>) -> Result<()> {
        Ok(())
    }
}
