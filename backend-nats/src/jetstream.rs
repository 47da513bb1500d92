//! JetStream mode: streams, durable pull consumers, acks, naks and in-progress acks.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::message::{AckKind, PublishMessage};
use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use async_nats::{Client, StatusCode};
use async_trait::async_trait;
use futures::StreamExt;
use polybus_core::{
    AckHandle, Acker, Bytes, Capabilities, Consumer, Delivery, Error, Event, Message, Origin, Producer,
    Result, SendGate, StartFrom, SubscribeOptions, Subscription,
};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::{BACKEND, HEADER_ROOM, NatsConfig, Storage, backend_error, headers, stream_name};

/// What both halves need to create streams: the JetStream context and settings.
#[derive(Clone)]
struct Streams {
    js: jetstream::Context,
    config: NatsConfig,
    known: Arc<Mutex<HashSet<String>>>,
}

impl Streams {
    fn new(client: Client, config: &NatsConfig) -> Self {
        let js = jetstream::ContextBuilder::new()
            .timeout(config.request_timeout)
            .build(client);
        Streams {
            js,
            config: config.clone(),
            known: Arc::new(Mutex::new(HashSet::new())),
        }
    }

    fn stream_config(&self, topic: &str) -> stream::Config {
        let c = &self.config;
        stream::Config {
            name: stream_name(topic),
            subjects: vec![topic.to_owned()],
            retention: stream::RetentionPolicy::Limits,
            storage: match c.storage {
                Storage::File => stream::StorageType::File,
                Storage::Memory => stream::StorageType::Memory,
            },
            num_replicas: c.replicas,
            max_age: c.max_age,
            max_bytes: c.max_bytes.map_or(-1, |b| b.min(i64::MAX as u64) as i64),
            max_messages: c.max_messages.map_or(-1, |m| m.min(i64::MAX as u64) as i64),
            max_messages_per_subject: -1,
            max_consumers: -1,
            max_message_size: -1,
            duplicate_window: c.duplicate_window,
            ..Default::default()
        }
    }

    /// Creates the stream for `topic` unless it exists (remembered per connection).
    async fn ensure(&self, topic: &str) -> Result<jetstream::stream::Stream> {
        let stream = self
            .js
            .get_or_create_stream(self.stream_config(topic))
            .await
            .map_err(|e| {
                let retryable = !matches!(
                    e.kind(),
                    jetstream::context::CreateStreamErrorKind::InvalidStreamName
                        | jetstream::context::CreateStreamErrorKind::JetStreamUnavailable
                );
                backend_error(&format!("creating the stream for topic '{topic}'"), e, retryable)
            })?;
        let subjects = &stream.cached_info().config.subjects;
        if !subjects.iter().any(|s| s == topic) {
            return Err(Error::InvalidConfig(format!(
                "the NATS stream '{}' exists but does not carry subject '{topic}' (it has {subjects:?})",
                stream_name(topic)
            )));
        }
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(topic.to_owned());
        Ok(stream)
    }
}

/// Publishes to JetStream; `send` resolves on the PubAck.
pub struct JetStreamProducer {
    streams: Streams,
    client: Client,
    server_max: usize,
    gate: SendGate,
}

impl std::fmt::Debug for JetStreamProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamProducer")
            .field("config", &self.streams.config)
            .field("closed", &self.gate.is_closed())
            .finish()
    }
}

impl JetStreamProducer {
    /// Opens a NATS connection for publishing.
    pub async fn connect(config: &NatsConfig) -> Result<Self> {
        let client = config.client("polybus-producer").await?;
        let server_max = client.server_info().max_payload;
        Ok(JetStreamProducer {
            streams: Streams::new(client.clone(), config),
            client,
            server_max,
            gate: SendGate::new("producer"),
        })
    }

    async fn publish_once(
        &self,
        topic: &str,
        payload: Bytes,
        headers: async_nats::HeaderMap,
    ) -> Result<bool> {
        let publish = PublishMessage::build().payload(payload).headers(headers);
        let acked = match self.streams.js.send_publish(topic.to_owned(), publish).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match acked {
            Ok(_) => Ok(true),
            Err(e) => match e.kind() {
                PublishErrorKind::StreamNotFound => Ok(false),
                PublishErrorKind::TimedOut => Err(Error::timeout(
                    format!("publishing to '{topic}' (waiting for the PubAck)"),
                    self.streams.config.request_timeout,
                )),
                PublishErrorKind::BrokenPipe => Err(Error::Connection {
                    backend: BACKEND,
                    message: format!("publishing to '{topic}': {e}"),
                    source: Some(Box::new(e)),
                }),
                PublishErrorKind::MaxPayloadExceeded => Err(Error::PayloadTooLarge {
                    size: 0,
                    max: self.max_payload(),
                }),
                _ => Err(backend_error(&format!("publishing to '{topic}'"), e, true)),
            },
        }
    }
}

#[async_trait]
impl Producer for JetStreamProducer {
    fn max_payload(&self) -> usize {
        self.server_max.saturating_sub(HEADER_ROOM)
    }

    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        let _in_flight = self.gate.enter()?;
        let headers = headers::encode(&message, true)?;
        let size = message.payload.len() + headers::wire_len(&headers);
        if size > self.server_max {
            return Err(Error::PayloadTooLarge {
                size,
                max: self.server_max,
            });
        }
        if self.publish_once(topic, message.payload.clone(), headers).await? {
            return Ok(());
        }
        // No stream carries the subject yet: create it (its dead-letter stream is
        // created when the topic is declared), then publish again. The same
        // Nats-Msg-Id makes the retry safe.
        self.streams.ensure(topic).await?;
        let headers = headers::encode(&message, true)?;
        if self.publish_once(topic, message.payload, headers).await? {
            Ok(())
        } else {
            Err(Error::NotFound {
                what: format!("a NATS stream for subject '{topic}'"),
            })
        }
    }

    async fn flush(&self) -> Result<()> {
        // Every send resolves on its PubAck: wait for those in flight, then make
        // sure nothing is left in the client's buffer.
        self.gate.wait_idle().await;
        self.client
            .flush()
            .await
            .map_err(|e| backend_error("flushing the NATS connection", e, true))
    }

    async fn close(&self) -> Result<()> {
        self.gate.close().await;
        let flushed = self.flush().await;
        let _ = self.client.drain().await;
        flushed
    }
}

/// Declares streams and durable consumers and opens pull subscriptions.
pub struct JetStreamConsumer {
    streams: Streams,
    client: Client,
    server_max: usize,
    closed: Arc<AtomicBool>,
}

impl std::fmt::Debug for JetStreamConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamConsumer")
            .field("config", &self.streams.config)
            .finish()
    }
}

impl JetStreamConsumer {
    /// Opens a NATS connection for consuming.
    pub async fn connect(config: &NatsConfig) -> Result<Self> {
        let client = config.client("polybus-consumer").await?;
        let server_max = client.server_info().max_payload;
        Ok(JetStreamConsumer {
            streams: Streams::new(client.clone(), config),
            client,
            server_max,
            closed: Arc::new(AtomicBool::new(false)),
        })
    }

    fn consumer_config(&self, name: Option<String>, start: StartFrom, prefetch: usize) -> pull::Config {
        let c = &self.streams.config;
        pull::Config {
            durable_name: name,
            deliver_policy: match start {
                StartFrom::Earliest => DeliverPolicy::All,
                _ => DeliverPolicy::New,
            },
            ack_policy: AckPolicy::Explicit,
            ack_wait: c.ack_wait,
            max_deliver: c.max_deliver.map_or(-1, i64::from),
            max_ack_pending: c.max_ack_pending.max(prefetch).min(i64::MAX as usize) as i64,
            // An anonymous subscription's consumer goes away soon after its client.
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        }
    }

    /// The group's durable consumer, created (starting at `start`) if missing.
    async fn group_consumer(
        &self,
        topic: &str,
        group: &str,
        start: StartFrom,
        prefetch: usize,
    ) -> Result<jetstream::consumer::Consumer<pull::Config>> {
        let stream = self.streams.ensure(topic).await?;
        let name = stream_name(group);
        let mut config = self.consumer_config(Some(name.clone()), start, prefetch);
        config.inactive_threshold = Duration::ZERO;
        let consumer = stream
            .get_or_create_consumer(&name, config)
            .await
            .map_err(|e| backend_error(&format!("creating group '{group}' on '{topic}'"), e, true))?;
        let existing = &consumer.cached_info().config;
        if existing.max_ack_pending >= 0 && (existing.max_ack_pending as u64) < prefetch as u64 {
            tracing::warn!(
                target: "polybus_nats",
                topic, group,
                max_ack_pending = existing.max_ack_pending, bound = prefetch,
                "the group's MaxAckPending is below this runner's bound; the server holds back the rest"
            );
        }
        let configured = self.streams.config.ack_wait;
        if existing.ack_wait < configured {
            // Keep-alives every third of the configured AckWait would come too late
            // for the server's shorter one: held messages would be redelivered.
            return Err(Error::InvalidConfig(format!(
                "NATS group '{group}' on '{topic}' exists with AckWait {:?}, shorter than the configured {configured:?}; \
                 configure ack_wait of at most {:?} or delete the group's consumer",
                existing.ack_wait, existing.ack_wait
            )));
        }
        Ok(consumer)
    }

    /// An ephemeral consumer for a subscription without a group (remembered in
    /// `created` so it is deleted on close).
    async fn anonymous_consumer(
        &self,
        topic: &str,
        options: &SubscribeOptions,
        created: &mut Vec<(jetstream::stream::Stream, String)>,
    ) -> Result<jetstream::consumer::Consumer<pull::Config>> {
        let stream = self.streams.ensure(topic).await?;
        let consumer = stream
            .create_consumer(self.consumer_config(None, options.start, options.prefetch))
            .await
            .map_err(|e| backend_error(&format!("subscribing to '{topic}'"), e, true))?;
        created.push((stream, consumer.cached_info().name.clone()));
        Ok(consumer)
    }

    /// Whether `group` on `topic` has nothing pending and nothing unacknowledged.
    pub async fn is_drained(&self, topic: &str, group: &str) -> Result<bool> {
        let stream = self
            .streams
            .js
            .get_stream(stream_name(topic))
            .await
            .map_err(|e| backend_error(&format!("looking up topic '{topic}'"), e, true))?;
        let info = stream
            .consumer_info(stream_name(group))
            .await
            .map_err(|e| backend_error(&format!("looking up group '{group}'"), e, true))?;
        Ok(info.num_pending == 0 && info.num_ack_pending == 0)
    }

    /// Deletes the streams of `topic` and its dead-letter topic (for tests and tools).
    pub async fn delete_topic(&self, topic: &str) -> Result<()> {
        for t in [topic.to_owned(), polybus_core::names::dead_letter_topic(topic)] {
            match self.streams.js.delete_stream(stream_name(&t)).await {
                Ok(_) => {}
                Err(e) if e.to_string().contains("not found") => {}
                Err(e) => return Err(backend_error(&format!("deleting topic '{t}'"), e, true)),
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Consumer for JetStreamConsumer {
    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::new(BACKEND, self.server_max.saturating_sub(HEADER_ROOM));
        caps.ack_deadline = Some(self.streams.config.ack_wait);
        caps
    }

    async fn declare_topic_unchecked(&self, topic: &str) -> Result<()> {
        self.streams.ensure(topic).await?;
        self.streams
            .ensure(&polybus_core::names::dead_letter_topic(topic))
            .await?;
        Ok(())
    }

    async fn declare_group_unchecked(&self, topic: &str, group: &str, start: StartFrom) -> Result<()> {
        self.group_consumer(topic, group, start, 1).await.map(|_| ())
    }

    async fn subscribe_unchecked(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed("consumer"));
        }
        // Create every consumer and inbox first, so a failure leaves nothing running.
        let mut consumers = Vec::new();
        let mut ephemeral = Vec::new();
        let mut failed = None;
        for topic in &options.topics {
            let created = match &options.group {
                Some(group) => {
                    self.group_consumer(topic, group, options.start, options.prefetch)
                        .await
                }
                None => self.anonymous_consumer(topic, &options, &mut ephemeral).await,
            };
            let inbox = self.client.new_inbox();
            let replies = match created {
                Ok(consumer) => self
                    .client
                    .subscribe(format!("{inbox}.*"))
                    .await
                    .map(|replies| (consumer, inbox, replies))
                    .map_err(|e| backend_error("subscribing to the pull inbox", e, true)),
                Err(e) => Err(e),
            };
            match replies {
                Ok(parts) => consumers.push(parts),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            drop(consumers);
            for (stream, name) in ephemeral {
                let _ = stream.delete_consumer(&name).await;
            }
            return Err(e);
        }
        let shared = Arc::new(Shared::new(options.prefetch, consumers.len()));
        let pumps = consumers
            .into_iter()
            .enumerate()
            .map(|(index, (consumer, inbox, replies))| {
                let info = consumer.cached_info();
                let pump = Pump {
                    index,
                    client: self.client.clone(),
                    js: self.streams.js.clone(),
                    shared: Arc::clone(&shared),
                    next_subject: format!("$JS.API.CONSUMER.MSG.NEXT.{}.{}", info.stream_name, info.name),
                    inbox,
                    expiry: self.streams.config.pull_expiry,
                    keep_alive: info.config.ack_wait.min(self.streams.config.ack_wait) / 3,
                    consumer_closed: Arc::clone(&self.closed),
                };
                tokio::spawn(pump.run(replies))
            })
            .collect();
        self.client
            .flush()
            .await
            .map_err(|e| backend_error("flushing the subscription", e, true))?;
        Ok(Box::new(JetStreamSubscription {
            shared,
            pumps,
            ephemeral,
            client: self.client.clone(),
            group: options.group.clone(),
            consumer_closed: Arc::clone(&self.closed),
        }))
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        self.client
            .drain()
            .await
            .map_err(|e| backend_error("closing the NATS connection", e, false))
    }
}

/// Fetched messages not yet handed out, and the credit that bounds fetching.
/// Each topic's pump has its own share of the credit, so an idle topic cannot
/// starve a busy one.
struct Shared {
    state: Mutex<State>,
    /// Signalled when a message is buffered, a pump ends or fails.
    data: Notify,
    /// Signalled when a delivery is settled (credit returns).
    credit: Notify,
    per_pump: usize,
    pumps: usize,
}

struct State {
    /// Fetched, not yet handed out: (pump, message).
    buffer: VecDeque<(usize, jetstream::Message)>,
    /// Per pump: buffered + handed out and unsettled + asked for in a pull request.
    outstanding: Vec<usize>,
    failure: Option<Error>,
    /// How many pumps have stopped.
    ended: usize,
}

impl Shared {
    fn new(prefetch: usize, pumps: usize) -> Self {
        let pumps = pumps.max(1);
        Shared {
            state: Mutex::new(State {
                buffer: VecDeque::new(),
                outstanding: vec![0; pumps],
                failure: None,
                ended: 0,
            }),
            data: Notify::new(),
            credit: Notify::new(),
            per_pump: (prefetch / pumps).max(1),
            pumps,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A pump asks for more only once this much credit is free (or none is
    /// outstanding), so pull requests stay large instead of one per ack.
    fn threshold(&self) -> usize {
        (self.per_pump / 2).max(1)
    }

    fn give_back(&self, pump: usize, n: usize) {
        if n > 0 {
            let mut state = self.lock();
            let Some(o) = state.outstanding.get_mut(pump) else {
                return;
            };
            let before = *o;
            *o = o.saturating_sub(n);
            let after = *o;
            drop(state);
            // Wake the pump only when its free credit crosses the threshold.
            let limit = self.per_pump.saturating_sub(self.threshold());
            if after == 0 || (before > limit && after <= limit) {
                self.credit.notify_waiters();
            }
        }
    }

    /// Records that a pump stopped (with `failure`, if any) and wakes the reader.
    fn pump_ended(&self, failure: Option<Error>) {
        let mut state = self.lock();
        state.ended += 1;
        if failure.is_some() {
            state.failure = failure;
        }
        drop(state);
        self.data.notify_waiters();
    }
}

/// What to do after a message arrived on a pump's inbox.
enum Flow {
    Continue,
    /// The current pull request is over (pause before the next one, if set).
    RequestDone(Option<Duration>),
    Stop,
}

/// One topic's pull loop: asks for as many messages as its credit allows,
/// buffers them, and keeps the buffered ones alive with in-progress acks. It
/// reads its inbox in every state, so late deliveries from an abandoned request
/// are buffered (and kept alive) too, never left unseen in the client.
struct Pump {
    index: usize,
    client: Client,
    js: jetstream::Context,
    shared: Arc<Shared>,
    next_subject: String,
    inbox: String,
    expiry: Duration,
    keep_alive: Duration,
    consumer_closed: Arc<AtomicBool>,
}

impl Pump {
    async fn run(self, mut replies: async_nats::Subscriber) {
        let mut tick = tokio::time::interval(self.keep_alive.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut request_no: u64 = 0;
        let mut none = 0;
        loop {
            if self.consumer_closed.load(Ordering::Acquire) {
                self.shared.pump_ended(None);
                return;
            }
            let credit_returned = self.shared.credit.notified();
            tokio::pin!(credit_returned);
            credit_returned.as_mut().enable();
            let connected = self.client.connection_state() == async_nats::connection::State::Connected;
            let credits = if connected {
                let mut state = self.shared.lock();
                let mine = &mut state.outstanding[self.index];
                let free = self.shared.per_pump.saturating_sub(*mine);
                if free >= self.shared.threshold() || (*mine == 0 && free > 0) {
                    *mine += free;
                    free
                } else {
                    0
                }
            } else {
                0
            };
            if credits == 0 {
                // Wait for credit (or the connection), still reading the inbox.
                tokio::select! {
                    _ = credit_returned => {}
                    _ = tokio::time::sleep(Duration::from_millis(100)), if !connected => {}
                    _ = tick.tick() => self.keep_buffered_alive().await,
                    incoming = replies.next() => {
                        if let Flow::Stop = self.on_incoming(incoming, None, &mut none) {
                            return;
                        }
                    }
                }
                continue;
            }
            request_no += 1;
            let reply = format!("{}.{request_no}", self.inbox);
            let body = format!(
                r#"{{"batch":{credits},"expires":{}}}"#,
                self.expiry.as_nanos().min(i64::MAX as u128)
            );
            if let Err(e) = self
                .client
                .publish_with_reply(self.next_subject.clone(), reply.clone(), body.into())
                .await
            {
                self.shared.give_back(self.index, credits);
                if self.consumer_closed.load(Ordering::Acquire) {
                    self.shared.pump_ended(None);
                    return;
                }
                tracing::warn!(target: "polybus_nats", error = %e, "pull request failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            let deadline = tokio::time::Instant::now() + self.expiry + Duration::from_secs(2);
            let mut remaining = credits;
            let mut pause = None;
            while remaining > 0 {
                tokio::select! {
                    biased;
                    incoming = replies.next() => match self.on_incoming(incoming, Some(&reply), &mut remaining) {
                        Flow::Continue => {}
                        Flow::RequestDone(p) => {
                            pause = p;
                            break;
                        }
                        Flow::Stop => {
                            self.shared.give_back(self.index, remaining);
                            return;
                        }
                    },
                    _ = tick.tick() => self.keep_buffered_alive().await,
                    _ = tokio::time::sleep_until(deadline) => break, // lost (e.g. a reconnect): ask again
                }
            }
            self.shared.give_back(self.index, remaining);
            if let Some(pause) = pause {
                tokio::time::sleep(pause).await;
            }
        }
    }

    /// Buffers a delivery, or reads a status: `current` is the reply subject of
    /// the pull request in flight, if any.
    fn on_incoming(
        &self,
        incoming: Option<async_nats::Message>,
        current: Option<&str>,
        remaining: &mut usize,
    ) -> Flow {
        let Some(msg) = incoming else {
            // The connection was closed: the subscription ends.
            self.shared.pump_ended(None);
            return Flow::Stop;
        };
        match msg.status {
            None | Some(StatusCode::OK) => {
                let mut state = self.shared.lock();
                if *remaining > 0 {
                    *remaining -= 1;
                } else {
                    // A late delivery from an abandoned request: held all the same.
                    state.outstanding[self.index] += 1;
                }
                let was_empty = state.buffer.is_empty();
                state.buffer.push_back((
                    self.index,
                    jetstream::Message {
                        message: msg,
                        context: self.js.clone(),
                    },
                ));
                drop(state);
                // `next` only waits on an empty buffer.
                if was_empty {
                    self.shared.data.notify_waiters();
                }
                Flow::Continue
            }
            Some(StatusCode::IDLE_HEARTBEAT) => Flow::Continue,
            Some(status) => {
                if current != Some(msg.subject.as_str()) {
                    return Flow::Continue; // the end of an earlier, abandoned request
                }
                if status == StatusCode::TIMEOUT || status == StatusCode::NOT_FOUND {
                    return Flow::RequestDone(None);
                }
                let description = msg.description.clone().unwrap_or_default();
                let lower = description.to_ascii_lowercase();
                if lower.contains("consumer deleted")
                    || lower.contains("push based")
                    || status.as_u16() == 400
                {
                    tracing::error!(target: "polybus_nats", %status, %description, "pull consumer unusable; the subscription ends");
                    self.shared.pump_ended(Some(Error::Backend {
                        backend: BACKEND,
                        message: format!("pull request refused by the server: {status} {description}"),
                        retryable: false,
                        source: None,
                    }));
                    return Flow::Stop;
                }
                tracing::warn!(target: "polybus_nats", %status, %description, "pull request ended by the server");
                Flow::RequestDone(Some(Duration::from_millis(250)))
            }
        }
    }

    /// In-progress acks for fetched messages the runner has not taken yet.
    async fn keep_buffered_alive(&self) {
        let replies: Vec<_> = {
            let state = self.shared.lock();
            state
                .buffer
                .iter()
                .filter(|(pump, _)| *pump == self.index)
                .filter_map(|(_, m)| m.message.reply.clone())
                .collect()
        };
        for reply in replies {
            let _ = self.client.publish(reply, Bytes::from_static(b"+WPI")).await;
        }
    }
}

struct JetStreamSubscription {
    shared: Arc<Shared>,
    pumps: Vec<JoinHandle<()>>,
    ephemeral: Vec<(jetstream::stream::Stream, String)>,
    client: Client,
    group: Option<String>,
    consumer_closed: Arc<AtomicBool>,
}

impl Drop for JetStreamSubscription {
    fn drop(&mut self) {
        // A crash: stop fetching; nothing more is settled and the server redelivers
        // what was not acknowledged once AckWait runs out.
        for pump in &self.pumps {
            pump.abort();
        }
    }
}

impl JetStreamSubscription {
    fn delivery(&self, pump: usize, msg: jetstream::Message) -> Event {
        let (attempt, sequence, fallback) = match msg.info() {
            Ok(info) => (
                u32::try_from(info.delivered.max(1)).unwrap_or(u32::MAX),
                Some(info.stream_sequence),
                format!("{}:{}", info.stream, info.stream_sequence),
            ),
            Err(_) => (1, None, String::new()),
        };
        let topic = msg.message.subject.to_string();
        let message = headers::decode(msg.message.payload.clone(), msg.message.headers.as_ref(), || {
            if fallback.is_empty() {
                polybus_core::Message::new(Bytes::new()).id
            } else {
                fallback
            }
        });
        let origin = Origin {
            topic,
            group: self.group.clone(),
            partition: None,
            sequence,
        };
        let acker = Acker::new(JetStreamAck {
            message: msg,
            pump,
            shared: Arc::clone(&self.shared),
            returned: AtomicBool::new(false),
        });
        Event::Delivery(Delivery::new(message, origin, attempt), acker)
    }
}

#[async_trait]
impl Subscription for JetStreamSubscription {
    async fn next(&mut self) -> Option<Result<Event>> {
        loop {
            let arrived = self.shared.data.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            {
                let mut state = self.shared.lock();
                if let Some((pump, msg)) = state.buffer.pop_front() {
                    drop(state);
                    return Some(Ok(self.delivery(pump, msg)));
                }
                if let Some(e) = state.failure.take() {
                    return Some(Err(e));
                }
                if state.ended >= self.shared.pumps {
                    return None;
                }
            }
            if self.consumer_closed.load(Ordering::Acquire) {
                return None;
            }
            arrived.await;
        }
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        // Let what the server already sent us (e.g. redeliveries of messages the
        // runner just released into our open pull request) reach the buffer: the
        // server redelivers asynchronously, so allow it a moment after our NAKs.
        let _ = crate::round_trip(&self.client, Duration::from_secs(5)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _ = crate::round_trip(&self.client, Duration::from_secs(5)).await;
        for pump in &self.pumps {
            pump.abort();
        }
        for pump in std::mem::take(&mut self.pumps) {
            let _ = pump.await;
        }
        // The server has dropped our inbox before we give anything back, so what we
        // release is not handed to our own pull request again.
        let _ = crate::round_trip(&self.client, Duration::from_secs(5)).await;
        // Give back what was fetched but not handed out, at once.
        let unhanded: Vec<_> = self.shared.lock().buffer.drain(..).collect();
        for (_, msg) in unhanded {
            let _ = msg.ack_with(AckKind::Nak(None)).await;
        }
        for (stream, name) in std::mem::take(&mut self.ephemeral) {
            let _ = stream.delete_consumer(&name).await;
        }
        self.client
            .flush()
            .await
            .map_err(|e| backend_error("flushing acknowledgements", e, true))
    }
}

struct JetStreamAck {
    message: jetstream::Message,
    pump: usize,
    shared: Arc<Shared>,
    returned: AtomicBool,
}

impl JetStreamAck {
    fn give_back(&self) {
        if !self.returned.swap(true, Ordering::AcqRel) {
            self.shared.give_back(self.pump, 1);
        }
    }

    async fn send(&self, kind: AckKind, what: &str) -> Result<()> {
        self.message.ack_with(kind).await.map_err(|e| Error::Backend {
            backend: BACKEND,
            message: format!("{what}: {e}"),
            retryable: true,
            source: Some(e),
        })
    }
}

impl Drop for JetStreamAck {
    fn drop(&mut self) {
        self.give_back();
    }
}

#[async_trait]
impl AckHandle for JetStreamAck {
    async fn ack(&self) -> Result<()> {
        let result = self.send(AckKind::Ack, "ack").await;
        self.give_back();
        result
    }

    async fn release(&self, delay: Option<Duration>) -> Result<()> {
        let result = self
            .send(AckKind::Nak(delay.filter(|d| !d.is_zero())), "nak")
            .await;
        self.give_back();
        result
    }

    async fn keep_alive(&self) -> Result<()> {
        self.send(AckKind::Progress, "in-progress ack").await
    }
}
