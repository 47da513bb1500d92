//! JetStream mode: streams, durable pull consumers, acks, naks and in-progress acks.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use async_trait::async_trait;
use polybus_core::{
    Bytes, Capabilities, Consumer, Error, Message, Producer, Result, SendGate, StartFrom, SubscribeOptions,
    Subscription,
};
use tokio::sync::mpsc;

use crate::consumer_config::{PullLimits, Wanted, check_existing};
use crate::security::Violations;
use crate::subscription::{JetStreamSubscription, Pump, PumpSetup, Shared};
use crate::{BACKEND, HEADER_ROOM, NatsConfig, Storage, backend_error, headers, stream_name};

/// What both halves need to create streams: the JetStream context and settings.
#[derive(Clone)]
struct Streams {
    js: jetstream::Context,
    config: NatsConfig,
    known: Arc<Mutex<HashSet<String>>>,
    /// The connection's permission violations, mapped back to the calls.
    violations: Violations,
}

impl Streams {
    /// Opens a connection named `name` and its JetStream context.
    async fn connect(config: &NatsConfig, name: &str) -> Result<(Client, Self)> {
        let violations = Violations::default();
        let client = config.client_watched(name, None, &violations).await?;
        let mut streams = Streams::new(client.clone(), config);
        streams.violations = violations;
        Ok((client, streams))
    }

    fn new(client: Client, config: &NatsConfig) -> Self {
        let js = jetstream::ContextBuilder::new()
            .timeout(config.request_timeout)
            .build(client);
        Streams {
            js,
            config: config.clone(),
            known: Arc::new(Mutex::new(HashSet::new())),
            violations: Violations::default(),
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
        let creating = async {
            self.js
                .get_or_create_stream(self.stream_config(topic))
                .await
                .map_err(|e| {
                    let retryable = !matches!(
                        e.kind(),
                        jetstream::context::CreateStreamErrorKind::InvalidStreamName
                            | jetstream::context::CreateStreamErrorKind::JetStreamUnavailable
                    );
                    backend_error(&format!("creating the stream for topic '{topic}'"), e, retryable)
                })
        };
        let stream = self.violations.guard(|v| v.concerns(topic), creating).await?;
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

/// The largest header block JetStream stores (nats-server refuses more with
/// err_code 10097).
const MAX_JETSTREAM_HEADER_BYTES: usize = 64 * 1024;

impl JetStreamProducer {
    /// Opens a NATS connection for publishing.
    pub async fn connect(config: &NatsConfig) -> Result<Self> {
        let (client, streams) = Streams::connect(config, "polybus-producer").await?;
        let server_max = client.server_info().max_payload;
        Ok(JetStreamProducer {
            streams,
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
        let publishing = async {
            Ok(
                match self.streams.js.send_publish(topic.to_owned(), publish).await {
                    Ok(ack) => ack.await,
                    Err(e) => Err(e),
                },
            )
        };
        // A denied publish gets no PubAck, only an asynchronous -ERR.
        let acked = self
            .streams
            .violations
            .guard(|v| v.concerns(topic), publishing)
            .await?;
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

    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        let _in_flight = self.gate.enter()?;
        let headers = headers::encode(&message, true)?;
        let header_len = headers::wire_len(&headers);
        if header_len > MAX_JETSTREAM_HEADER_BYTES {
            // The server would refuse it (err_code 10097) with an error that
            // looks retryable; nothing about this message will ever fit.
            return Err(Error::MessageRejected {
                backend: BACKEND,
                message: format!(
                    "a header block of {header_len} bytes exceeds JetStream's {MAX_JETSTREAM_HEADER_BYTES}"
                ),
                source: None,
            });
        }
        let size = message.payload.len() + header_len;
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
        let (client, streams) = Streams::connect(config, "polybus-consumer").await?;
        let server_max = client.server_info().max_payload;
        Ok(JetStreamConsumer {
            streams,
            client,
            server_max,
            closed: Arc::new(AtomicBool::new(false)),
        })
    }

    fn consumer_config(&self, name: Option<String>, start: StartFrom, prefetch: usize) -> pull::Config {
        let c = &self.streams.config;
        pull::Config {
            durable_name: name,
            deliver_policy: deliver_policy(start),
            ack_policy: AckPolicy::Explicit,
            ack_wait: c.ack_wait,
            max_deliver: c.max_deliver.map_or(-1, i64::from),
            max_ack_pending: c.max_ack_pending.max(prefetch).min(i64::MAX as usize) as i64,
            // An anonymous subscription's consumer goes away soon after its client.
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        }
    }

    /// The group's durable consumer, created (starting at `start`) if missing,
    /// and the limits its settings put on pull requests. An existing consumer
    /// whose settings cannot work with polybus is refused (see
    /// [`check_existing`]).
    async fn group_consumer(
        &self,
        topic: &str,
        group: &str,
        start: StartFrom,
        prefetch: usize,
    ) -> Result<(
        stream::Stream,
        jetstream::consumer::Consumer<pull::Config>,
        PullLimits,
    )> {
        let stream = self.streams.ensure(topic).await?;
        let name = stream_name(group);
        let c = &self.streams.config;
        let wanted = Wanted {
            ack_wait: c.ack_wait,
            max_deliver: c.max_deliver,
            pull_expiry: c.pull_expiry,
        };
        let what = format!("group '{group}' on '{topic}'");
        // Check an existing consumer before asking for it as a pull consumer
        // (a push consumer would not even come back as one).
        match stream.consumer_info(&name).await {
            Ok(info) => {
                check_existing(&info.config, topic, group, &wanted)?;
            }
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {}
            Err(e) => return Err(backend_error(&format!("looking up {what}"), e, true)),
        }
        let mut config = self.consumer_config(Some(name.clone()), start, prefetch);
        config.inactive_threshold = Duration::ZERO;
        let consumer = stream
            .get_or_create_consumer(&name, config)
            .await
            .map_err(|e| backend_error(&format!("creating {what}"), e, true))?;
        // Checked again: another instance may have created it in between.
        let existing = &consumer.cached_info().config;
        let limits = check_existing(existing, topic, group, &wanted)?;
        if existing.max_ack_pending >= 0 && (existing.max_ack_pending as u64) < prefetch as u64 {
            tracing::warn!(
                target: "polybus_nats",
                topic, group,
                max_ack_pending = existing.max_ack_pending, bound = prefetch,
                "the group's MaxAckPending is below this runner's bound; the server holds back the rest"
            );
        }
        Ok((stream, consumer, limits))
    }

    /// An ephemeral consumer for a subscription without a group (the caller
    /// deletes it on close).
    async fn anonymous_consumer(
        &self,
        topic: &str,
        options: &SubscribeOptions,
    ) -> Result<(stream::Stream, jetstream::consumer::Consumer<pull::Config>)> {
        let stream = self.streams.ensure(topic).await?;
        let consumer = stream
            .create_consumer(self.consumer_config(None, options.start, options.prefetch))
            .await
            .map_err(|e| backend_error(&format!("subscribing to '{topic}'"), e, true))?;
        Ok((stream, consumer))
    }

    /// Whether `group` on `topic` has nothing pending and nothing unacknowledged.
    pub async fn is_drained(&self, topic: &str, group: &str) -> Result<bool> {
        Ok(Consumer::lag_unchecked(self, topic, group).await? == 0)
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

/// The JetStream deliver policy for a start.
fn deliver_policy(start: StartFrom) -> DeliverPolicy {
    match start {
        StartFrom::Earliest => DeliverPolicy::All,
        // The stream's store time, at or after `t`.
        StartFrom::Timestamp(t) => t
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .and_then(|d| async_nats::datetime::from_nanos(d.as_nanos() as i128).ok())
            .map_or(DeliverPolicy::All, |start_time| DeliverPolicy::ByStartTime {
                start_time,
            }),
        _ => DeliverPolicy::New,
    }
}

impl JetStreamConsumer {
    /// Moves the group's durable consumer to `start`: its configuration is kept,
    /// only its deliver policy changes, so the consumer is deleted and created
    /// again (JetStream cannot change a deliver policy in place). Refused while
    /// the consumer has waiting pull requests (an active member), after a grace
    /// of 2 s for the requests of members that just stopped.
    async fn reposition(&self, topic: &str, group: &str, start: StartFrom) -> Result<()> {
        let what = format!("group '{group}' on '{topic}'");
        let stream = self
            .streams
            .js
            .get_stream(stream_name(topic))
            .await
            .map_err(|_| Error::NotFound {
                what: format!("topic '{topic}'"),
            })?;
        let name = stream_name(group);
        let mut waited = 0;
        let info = loop {
            let info = match stream.consumer_info(&name).await {
                Ok(info) => info,
                Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {
                    return Err(Error::NotFound { what });
                }
                Err(e) => return Err(backend_error(&format!("looking up {what}"), e, true)),
            };
            if info.num_waiting == 0 && !info.push_bound {
                break info;
            }
            if waited >= 20 {
                return Err(Error::InvalidConfig(format!(
                    "{what} has active members ({} waiting pull requests): stop them before repositioning it",
                    info.num_waiting
                )));
            }
            waited += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut config = info.config.clone();
        config.deliver_policy = deliver_policy(start);
        stream
            .delete_consumer(&name)
            .await
            .map_err(|e| backend_error(&format!("deleting {what} to reposition it"), e, true))?;
        stream
            .create_consumer(config)
            .await
            .map_err(|e| backend_error(&format!("creating {what} again at its new start"), e, true))?;
        Ok(())
    }
}

#[async_trait]
impl Consumer for JetStreamConsumer {
    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::new(BACKEND, self.server_max.saturating_sub(HEADER_ROOM));
        caps.ack_deadline = Some(self.streams.config.ack_wait);
        caps.binding = polybus_core::cloudevents::Binding::Nats;
        caps.reposition = true;
        caps.catch_up = true;
        caps
    }

    async fn reposition_group_unchecked(&self, topic: &str, group: &str, start: StartFrom) -> Result<()> {
        self.reposition(topic, group, start).await
    }

    async fn declare_topic_unchecked(&self, topic: &str) -> Result<()> {
        self.streams.ensure(topic).await?;
        self.streams
            .ensure(&polybus_core::names::dead_letter_topic(topic))
            .await?;
        Ok(())
    }

    async fn declare_group_unchecked(&self, topic: &str, group: &str, start: StartFrom) -> Result<()> {
        self.streams
            .violations
            .guard(|v| v.concerns(topic), self.group_consumer(topic, group, start, 1))
            .await
            .map(|_| ())
    }

    async fn subscribe_unchecked(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed("consumer"));
        }
        let violations = (self.streams.violations.watch(), options.topics.clone());
        // Create every consumer and inbox first, so a failure leaves nothing running.
        let mut parts = Vec::new();
        let mut ephemeral = Vec::new();
        let mut failed = None;
        for topic in &options.topics {
            let created = match &options.group {
                Some(group) => {
                    self.streams
                        .violations
                        .guard(
                            |v| v.concerns(topic),
                            self.group_consumer(topic, group, options.start, options.prefetch),
                        )
                        .await
                }
                None => match self
                    .streams
                    .violations
                    .guard(|v| v.concerns(topic), self.anonymous_consumer(topic, &options))
                    .await
                {
                    Ok((stream, consumer)) => {
                        ephemeral.push((stream.clone(), consumer.cached_info().name.clone()));
                        Ok((stream, consumer, PullLimits::new(self.streams.config.pull_expiry)))
                    }
                    Err(e) => Err(e),
                },
            };
            let inbox = self.client.new_inbox();
            let replies = match created {
                Ok((stream, consumer, limits)) => self
                    .client
                    .subscribe(format!("{inbox}.*"))
                    .await
                    .map(|replies| (topic.clone(), stream, consumer, limits, inbox, replies))
                    .map_err(|e| backend_error("subscribing to the pull inbox", e, true)),
                Err(e) => Err(e),
            };
            match replies {
                Ok(p) => parts.push(p),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            drop(parts);
            for (stream, name) in ephemeral {
                let _ = stream.delete_consumer(&name).await;
            }
            return Err(e);
        }
        let shared = Arc::new(Shared::new(options.prefetch, parts.len()));
        let mut pumps = Vec::new();
        let mut controls = Vec::new();
        let config = &self.streams.config;
        let mut consumers = Vec::with_capacity(parts.len());
        for (index, (topic, stream, consumer, limits, inbox, replies)) in parts.into_iter().enumerate() {
            let info = consumer.cached_info().clone();
            consumers.push((topic.clone(), stream.clone(), info.name.clone()));
            let ephemeral_config = if options.group.is_none() {
                shared.add_ephemeral(index, stream.clone(), info.name.clone());
                Some(self.consumer_config(None, options.start, options.prefetch))
            } else {
                None
            };
            let (control, control_rx) = mpsc::unbounded_channel();
            let pump = Pump::new(PumpSetup {
                index,
                client: self.client.clone(),
                js: self.streams.js.clone(),
                shared: Arc::clone(&shared),
                stream,
                consumer: info.name.clone(),
                topic,
                group: options.group.clone(),
                ephemeral_config,
                start_sequence: info.delivered.stream_sequence,
                inbox,
                limits,
                keep_alive: info.config.ack_wait.min(config.ack_wait) / 3,
                retry_limit: config.pull_retry_limit,
                consumer_closed: Arc::clone(&self.closed),
            });
            pumps.push(tokio::spawn(pump.run(replies, control_rx)));
            controls.push(control);
        }
        self.client
            .flush()
            .await
            .map_err(|e| backend_error("flushing the subscription", e, true))?;
        Ok(Box::new(JetStreamSubscription {
            shared,
            pumps,
            controls,
            client: self.client.clone(),
            group: options.group.clone(),
            consumer_closed: Arc::clone(&self.closed),
            request_timeout: config.request_timeout,
            stopped: false,
            violations,
            consumers,
        }))
    }

    /// The durable consumer's `num_pending` (not yet delivered) plus
    /// `num_ack_pending` (delivered, not yet acked).
    async fn lag_unchecked(&self, topic: &str, group: &str) -> Result<u64> {
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
        Ok(info.num_pending.saturating_add(info.num_ack_pending as u64))
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        self.client
            .drain()
            .await
            .map_err(|e| backend_error("closing the NATS connection", e, false))
    }
}
