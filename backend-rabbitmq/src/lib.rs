//! RabbitMQ backend for [polybus](https://docs.rs/polybus), on
//! [lapin](https://docs.rs/lapin).
//!
//! * A topic is a durable **topic exchange** named like the topic; its
//!   `<topic>.dlq` exchange and a durable `<topic>.dlq` queue (which keeps dead
//!   letters even before anyone consumes them) are declared with it.
//! * A group is a durable queue `<topic>.<group>` bound to the exchange with `#`:
//!   a **quorum** queue by default ([`QueueType::Classic`] as an option), so
//!   declaring a group keeps everything published from then on. A subscription
//!   without a group gets an exclusive, auto-delete classic queue. A topic with
//!   no group keeps nothing (`Capabilities::retains_without_group` is false).
//! * `send` publishes a persistent message and resolves on the publisher
//!   confirm; concurrent sends pipeline their confirms on one channel. A broker
//!   nack is an error; an unroutable message is not, unless
//!   [`RabbitConfig::mandatory`] is set.
//! * Consumers use `basic.qos` prefetch equal to the runner's bound (split between
//!   the topics of one subscription). Release is
//!   `basic.nack` with requeue (RabbitMQ has no delayed requeue, so the runner
//!   retries in process). Settlement goes through lapin's per-delivery acker,
//!   which is single-use and poisoned when its channel dies, so a stale delivery
//!   tag never acks another message after a reconnect.
//! * Connections recover by themselves: the producer's through lapin's
//!   auto-recovery (a `send` during an outage waits for recovery within the
//!   request timeout or fails with a retryable error), each subscription's by
//!   reconnecting its own connection with backoff and consuming anew.
//!
//! ```no_run
//! # async fn demo() -> polybus_core::Result<()> {
//! let bus = polybus_rabbitmq::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
//! bus.consumer.declare_topic("rides").await?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, ConnectionProperties, ExchangeKind};
use polybus_core::{
    AckHandle, Acker, Bytes, Capabilities, Connection, Consumer, Delivery, Error, Event, Message, Origin,
    Producer, Result, SendGate, StartFrom, SubscribeOptions, Subscription, names, redact_url, wire,
};

const BACKEND: &str = "rabbitmq";

/// The queue type of group queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum QueueType {
    /// Replicated, durable, with a delivery count (the default).
    #[default]
    Quorum,
    /// Classic durable queues.
    Classic,
}

/// How to reach RabbitMQ and how queues are declared. `Debug` hides credentials.
#[derive(Clone)]
#[non_exhaustive]
pub struct RabbitConfig {
    /// `amqp://user:pass@host:port/vhost` (or `amqps://`).
    pub url: String,
    /// The type of group queues (quorum by default).
    pub queue_type: QueueType,
    /// Group queues with single active consumer: one instance of a group
    /// consumes at a time, so per-key order holds across instances.
    pub single_active_consumer: bool,
    /// Make an unroutable message (no group queue bound) an error.
    pub mandatory: bool,
    /// The largest payload `send` accepts (default 4 MiB).
    pub max_payload: usize,
    /// How long connecting may take (default 5 s).
    pub connect_timeout: Duration,
    /// How long a confirm or a declaration may take, including waiting for the
    /// connection to recover (default 10 s).
    pub request_timeout: Duration,
}

impl fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("url", &redact_url(&self.url))
            .field("queue_type", &self.queue_type)
            .field("single_active_consumer", &self.single_active_consumer)
            .field("mandatory", &self.mandatory)
            .field("max_payload", &self.max_payload)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

impl RabbitConfig {
    /// Defaults for `url`, which is checked here.
    pub fn new(url: &str) -> Result<Self> {
        let parsed = url.parse::<lapin::uri::AMQPUri>().map_err(|e| {
            Error::InvalidConfig(format!(
                "RabbitMQ URL {}: {}",
                redact_url(url),
                e.replace(url, "<url>")
            ))
        })?;
        if parsed.authority.port == 0 {
            return Err(Error::InvalidConfig(format!(
                "RabbitMQ URL {}: port 0",
                redact_url(url)
            )));
        }
        Ok(RabbitConfig {
            url: url.to_owned(),
            queue_type: QueueType::Quorum,
            single_active_consumer: false,
            mandatory: false,
            max_payload: 4 * 1024 * 1024,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
        })
    }

    /// Sets the group queue type.
    pub fn queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }

    /// Makes unroutable messages an error.
    pub fn mandatory(mut self, mandatory: bool) -> Self {
        self.mandatory = mandatory;
        self
    }

    /// Sets the connection timeout.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Single-active-consumer group queues.
    pub fn single_active_consumer(mut self, on: bool) -> Self {
        self.single_active_consumer = on;
        self
    }

    async fn connection(&self, name: &str) -> Result<lapin::Connection> {
        self.connection_with(name, true).await
    }

    /// A connection; with `recover`, lapin reconnects it and replays its
    /// topology by itself (subscriptions recover their own, see `reconnect`).
    async fn connection_with(&self, name: &str, recover: bool) -> Result<lapin::Connection> {
        let mut properties = ConnectionProperties::default().with_connection_name(name.into());
        if recover {
            properties = properties.enable_auto_recover();
        }
        // lapin's auto-recovery also retries the first connect until the timeout;
        // a broker that refuses TCP outright is reported at once instead.
        if let Ok(uri) = self.url.parse::<lapin::uri::AMQPUri>() {
            let address = (uri.authority.host.clone(), uri.authority.port);
            match tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect(address)).await {
                Err(_) => return Err(Error::timeout("connecting to RabbitMQ", self.connect_timeout)),
                Ok(Err(e)) => {
                    return Err(Error::Connection {
                        backend: BACKEND,
                        message: format!("connecting to {}: {e}", redact_url(&self.url)),
                        source: Some(Box::new(e)),
                    });
                }
                Ok(Ok(_probe)) => {}
            }
        }
        let connecting = lapin::Connection::connect(&self.url, properties);
        match tokio::time::timeout(self.connect_timeout, connecting).await {
            Err(_) => Err(Error::timeout("connecting to RabbitMQ", self.connect_timeout)),
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(map_error(&format!("connecting to {}", redact_url(&self.url)), e)),
        }
    }
}

/// Whether the broker refused an operation on a channel (404 no such exchange
/// or queue, 406 precondition failed, …): the channel is closed, the connection
/// is fine, and trying the same again will not help.
fn is_refusal(e: &lapin::Error) -> bool {
    e.is_amqp_soft_error()
}

fn is_not_found(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(a)
        if matches!(a.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

/// Whether a channel is usable now or will be after lapin's recovery.
fn alive(channel: &Channel) -> bool {
    channel.status().connected() || channel.status().reconnecting()
}

/// Maps a lapin error: broker-side refusals are not retryable, lost connections are.
fn map_error(what: &str, e: lapin::Error) -> Error {
    let message = format!("{what}: {e}");
    if is_not_found(&e) {
        Error::NotFound { what: message }
    } else if is_refusal(&e) || e.is_amqp_hard_error() || (e.is_amqp_error() && !e.can_be_recovered()) {
        Error::Backend {
            backend: BACKEND,
            message,
            retryable: false,
            source: Some(Box::new(e)),
        }
    } else if e.is_io_error() || e.can_be_recovered() {
        Error::Connection {
            backend: BACKEND,
            message,
            source: Some(Box::new(e)),
        }
    } else {
        Error::Backend {
            backend: BACKEND,
            message,
            retryable: true,
            source: Some(Box::new(e)),
        }
    }
}

/// Connects with a URL: a producer and a consumer, each on its own connection.
pub async fn connect(url: &str) -> Result<Connection> {
    connect_with(RabbitConfig::new(url)?).await
}

/// Connects with a full configuration.
pub async fn connect_with(config: RabbitConfig) -> Result<Connection> {
    Ok(Connection {
        producer: Arc::new(RabbitProducer::connect(&config).await?),
        consumer: Arc::new(RabbitConsumer::connect(&config).await?),
    })
}

/// The queue that holds `group`'s messages of `topic`.
pub fn group_queue(topic: &str, group: &str) -> String {
    format!("{topic}.{group}")
}

/// Headers RabbitMQ adds on delivery (not the user's).
fn is_broker_header(key: &str) -> bool {
    matches!(key, "x-delivery-count" | "x-death")
        || key.starts_with("x-first-death-")
        || key.starts_with("x-last-death-")
}

fn long(value: impl Into<String>) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.into()))
}

fn value_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::LongLongInt(i) => Some(i.to_string()),
        AMQPValue::LongInt(i) => Some(i.to_string()),
        AMQPValue::LongUInt(i) => Some(i.to_string()),
        AMQPValue::ShortInt(i) => Some(i.to_string()),
        AMQPValue::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Publishes persistent messages with publisher confirms.
pub struct RabbitProducer {
    connection: lapin::Connection,
    /// The confirm channel; replaced when the broker closes it (a refusal).
    channel: std::sync::Mutex<Channel>,
    /// Exchanges known to exist (declared on first send to a topic).
    exchanges: std::sync::Mutex<std::collections::HashSet<String>>,
    config: RabbitConfig,
    gate: SendGate,
}

impl fmt::Debug for RabbitProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitProducer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl RabbitProducer {
    /// Opens a connection and a confirm-mode channel.
    pub async fn connect(config: &RabbitConfig) -> Result<Self> {
        let connection = config.connection("polybus-producer").await?;
        let channel = Self::confirm_channel(&connection).await?;
        Ok(RabbitProducer {
            connection,
            channel: std::sync::Mutex::new(channel),
            exchanges: std::sync::Mutex::default(),
            config: config.clone(),
            gate: SendGate::new("producer"),
        })
    }

    async fn confirm_channel(connection: &lapin::Connection) -> Result<Channel> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| map_error("opening a channel", e))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| map_error("enabling publisher confirms", e))?;
        Ok(channel)
    }

    fn current(&self) -> Channel {
        self.channel.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces `broken` (closed by a broker refusal, or given up by recovery)
    /// with a new confirm channel, unless another send already did.
    async fn reopen(&self, broken: &Channel) -> Result<()> {
        if alive(broken) {
            return Ok(());
        }
        let fresh = Self::confirm_channel(&self.connection).await?;
        let mut current = self.channel.lock().unwrap_or_else(|p| p.into_inner());
        if current.id() == broken.id() && !alive(&current) {
            *current = fresh;
        }
        Ok(())
    }

    /// Declares the topic's exchange once per producer, so a send to a topic
    /// nobody declared is not refused (which would close the channel).
    async fn ensure_exchange(&self, topic: &str) -> Result<()> {
        if self
            .exchanges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(topic)
        {
            return Ok(());
        }
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(|e| map_error("opening a channel", e))?;
        let declared = declare_exchange(&channel, topic).await;
        let _ = channel.close(200, "bye".into()).await;
        declared?;
        self.exchanges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(topic.to_owned());
        Ok(())
    }

    fn properties(message: &Message) -> BasicProperties {
        // The id travels as the AMQP `message_id` property (a short string) when
        // it fits in 255 bytes, else as the `polybus-id` header; the receiver
        // reads whichever is there.
        let id_property = ShortString::try_new(message.id.as_str()).ok();
        let mut headers = FieldTable::default();
        for (key, value) in wire::encode(message) {
            if key == wire::ID && id_property.is_some() {
                continue;
            }
            headers.insert(ShortString::from(key), long(value));
        }
        let timestamp = message
            .timestamp
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_timestamp(timestamp)
            .with_headers(headers);
        match id_property {
            Some(id) => properties.with_message_id(id),
            None => properties,
        }
    }
}

#[async_trait]
impl Producer for RabbitProducer {
    fn max_payload(&self) -> usize {
        self.config.max_payload
    }

    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        let _in_flight = self.gate.enter()?;
        let properties = Self::properties(&message);
        // Groups bind with `#`; the key travels as `polybus-key`, so the routing
        // key stays empty (and no key is too long for it).
        let routing_key = "";
        self.ensure_exchange(topic).await?;
        let options = BasicPublishOptions {
            mandatory: self.config.mandatory,
            ..Default::default()
        };
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        loop {
            let channel = self.current();
            let attempt = async {
                channel
                    .basic_publish(
                        topic.into(),
                        routing_key.into(),
                        options,
                        &message.payload,
                        properties.clone(),
                    )
                    .await?
                    .await
            };
            let result = match tokio::time::timeout_at(deadline, attempt).await {
                Err(_) => {
                    return Err(Error::timeout(
                        format!("publishing to '{topic}' (waiting for the confirm)"),
                        self.config.request_timeout,
                    ));
                }
                Ok(r) => r,
            };
            match result {
                Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => return Ok(()),
                Ok(Confirmation::Ack(Some(_))) => {
                    return Err(Error::NotFound {
                        what: format!("a queue bound to topic '{topic}' (the message was unroutable)"),
                    });
                }
                Ok(Confirmation::Nack(_)) => {
                    return Err(Error::Backend {
                        backend: BACKEND,
                        message: format!("RabbitMQ refused (nacked) a message to '{topic}'"),
                        retryable: true,
                        source: None,
                    });
                }
                Err(e) if is_refusal(&e) => {
                    // E.g. the exchange was deleted (404): the broker closed the
                    // channel. Open another for later sends; this one failed.
                    if is_not_found(&e) {
                        self.exchanges
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(topic);
                    }
                    let _ = self.reopen(&channel).await;
                    return Err(map_error(&format!("publishing to '{topic}'"), e));
                }
                Err(e) => {
                    let what = format!("publishing to '{topic}'");
                    if !alive(&channel) {
                        // Closed for good (recovery gave up): start a new channel.
                        self.reopen(&channel).await?;
                        continue;
                    }
                    let recovered = tokio::time::timeout_at(deadline, channel.wait_for_recovery(e)).await;
                    match recovered {
                        Ok(Ok(())) => continue,
                        Ok(Err(e)) => return Err(map_error(&what, e)),
                        Err(_) => {
                            return Err(Error::Connection {
                                backend: BACKEND,
                                message: format!("{what}: the connection did not recover in time"),
                                source: None,
                            });
                        }
                    }
                }
            }
        }
    }

    async fn flush(&self) -> Result<()> {
        // Every send resolves on its confirm: wait for those in flight.
        self.gate.wait_idle().await;
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.gate.close().await;
        let _ = self.current().close(200, "bye".into()).await;
        let _ = self.connection.close(200, "bye".into()).await;
        Ok(())
    }
}

/// Declares exchanges and queues and opens consumers.
pub struct RabbitConsumer {
    connection: lapin::Connection,
    config: RabbitConfig,
    closed: Arc<AtomicBool>,
}

impl fmt::Debug for RabbitConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConsumer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl RabbitConsumer {
    /// Opens a connection for declaring and consuming.
    pub async fn connect(config: &RabbitConfig) -> Result<Self> {
        Ok(RabbitConsumer {
            connection: config.connection("polybus-consumer").await?,
            config: config.clone(),
            closed: Arc::new(AtomicBool::new(false)),
        })
    }

    /// A fresh channel: a refused declaration closes its channel, so each
    /// declaration gets its own.
    async fn channel(&self) -> Result<Channel> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed("consumer"));
        }
        self.connection
            .create_channel()
            .await
            .map_err(|e| map_error("opening a channel", e))
    }

    async fn declare_bound_queue(
        &self,
        channel: &Channel,
        exchange: &str,
        queue: &str,
        quorum: bool,
    ) -> Result<()> {
        let mut arguments = FieldTable::default();
        if quorum {
            arguments.insert("x-queue-type".into(), long("quorum"));
        }
        if self.config.single_active_consumer {
            arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        }
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                arguments,
            )
            .await
            .map_err(|e| map_error(&format!("declaring queue '{queue}'"), e))?;
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| map_error(&format!("binding queue '{queue}' to '{exchange}'"), e))
    }

    /// Messages ready in `group`'s queue (unacknowledged ones are not counted by
    /// AMQP; once no consumer holds them they are ready again).
    pub async fn ready_messages(&self, topic: &str, group: &str) -> Result<u32> {
        let channel = self.channel().await?;
        let queue = group_queue(topic, group);
        let declared = channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| map_error(&format!("looking up queue '{queue}'"), e))?;
        let _ = channel.close(200, "bye".into()).await;
        Ok(declared.message_count())
    }

    /// Deletes the exchanges of `topic` and its dead-letter topic, the dead-letter
    /// queue, and the given queues (for tests and tools).
    pub async fn delete_topic(&self, topic: &str, queues: &[String]) -> Result<()> {
        let dlq = names::dead_letter_topic(topic);
        for queue in queues.iter().map(String::as_str).chain([dlq.as_str()]) {
            let channel = self.channel().await?;
            let _ = channel
                .queue_delete(queue.into(), QueueDeleteOptions::default())
                .await;
            let _ = channel.close(200, "bye".into()).await;
        }
        for exchange in [topic, dlq.as_str()] {
            let channel = self.channel().await?;
            let _ = channel
                .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
                .await;
            let _ = channel.close(200, "bye".into()).await;
        }
        Ok(())
    }
}

#[async_trait]
impl Consumer for RabbitConsumer {
    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::new(BACKEND, self.config.max_payload);
        caps.replay = false;
        caps.retains_without_group = false;
        caps.delayed_release = false;
        caps.key_order_across_instances = self.config.single_active_consumer;
        caps
    }

    async fn declare_topic_unchecked(&self, topic: &str) -> Result<()> {
        let channel = self.channel().await?;
        let dlq = names::dead_letter_topic(topic);
        let result = async {
            declare_exchange(&channel, topic).await?;
            declare_exchange(&channel, &dlq).await?;
            // Dead letters are kept even before anyone consumes them.
            self.declare_bound_queue(&channel, &dlq, &dlq, false).await
        }
        .await;
        let _ = channel.close(200, "bye".into()).await;
        result
    }

    async fn declare_group_unchecked(&self, topic: &str, group: &str, _start: StartFrom) -> Result<()> {
        // A queue keeps what arrives from its declaration on: earliest and latest
        // are the same for a new group (there is no replay).
        // The topic comes first, with its dead-letter exchange and queue, so the
        // runner's dead letters for this group are kept.
        self.declare_topic_unchecked(topic).await?;
        let channel = self.channel().await?;
        let result = async {
            let quorum = self.config.queue_type == QueueType::Quorum;
            self.declare_bound_queue(&channel, topic, &group_queue(topic, group), quorum)
                .await
        }
        .await;
        let _ = channel.close(200, "bye".into()).await;
        result
    }

    async fn subscribe_unchecked(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed("consumer"));
        }
        let mut sources = Vec::new();
        for topic in &options.topics {
            let source = match &options.group {
                Some(group) => {
                    self.declare_group_unchecked(topic, group, options.start).await?;
                    Source {
                        topic: topic.clone(),
                        queue: group_queue(topic, group),
                        private: false,
                    }
                }
                None => Source {
                    topic: topic.clone(),
                    // Named here, not by the broker, so a reconnect can declare it again.
                    queue: format!("{topic}.polybus-{}", &Message::new(Bytes::new()).id[..13]),
                    private: true,
                },
            };
            sources.push(source);
        }
        // `basic.qos` limits each consumer (quorum queues have no global qos), so
        // the subscription's bound is split between its topics.
        let per_consumer = (options.prefetch / sources.len().max(1)).max(1);
        let prefetch = u16::try_from(per_consumer).unwrap_or(u16::MAX);
        let mut subscription = RabbitSubscription {
            config: self.config.clone(),
            sources,
            prefetch,
            connection: None,
            channel: None,
            deliveries: futures::stream::SelectAll::new(),
            tags: Vec::new(),
            group: options.group,
            consumer_closed: Arc::clone(&self.closed),
        };
        subscription.open().await?;
        Ok(Box::new(subscription))
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        let _ = self.connection.close(200, "bye".into()).await;
        Ok(())
    }
}

type DeliveryStream = futures::stream::BoxStream<'static, (String, lapin::Result<lapin::message::Delivery>)>;

/// One queue a subscription consumes from.
#[derive(Clone)]
struct Source {
    topic: String,
    queue: String,
    /// An exclusive, auto-delete queue of this subscription's connection.
    private: bool,
}

/// A subscription on a connection of its own, without lapin's auto-recovery:
/// when the connection drops, `next` reconnects with backoff, declares its
/// private queues again and consumes anew (the broker has already given every
/// unacknowledged delivery of the old connection back).
struct RabbitSubscription {
    config: RabbitConfig,
    sources: Vec<Source>,
    prefetch: u16,
    connection: Option<lapin::Connection>,
    channel: Option<Channel>,
    deliveries: futures::stream::SelectAll<DeliveryStream>,
    tags: Vec<String>,
    group: Option<String>,
    consumer_closed: Arc<AtomicBool>,
}

impl Drop for RabbitSubscription {
    fn drop(&mut self) {
        // A crash: closing the connection hands every unacknowledged delivery
        // back to the broker, as a dead process's connection would.
        let (channel, connection) = (self.channel.take(), self.connection.take());
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Some(channel) = channel {
                    let _ = channel.close(200, "dropped".into()).await;
                }
                if let Some(connection) = connection {
                    let _ = connection.close(200, "dropped".into()).await;
                }
            });
        }
    }
}

/// Declares `exchange` as a durable topic exchange (a topic), if missing.
async fn declare_exchange(channel: &Channel, exchange: &str) -> Result<()> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| map_error(&format!("declaring exchange '{exchange}'"), e))
}

/// A channel on `connection` with the prefetch and one consumer per source.
async fn open_consumers(
    connection: &lapin::Connection,
    sources: &[Source],
    prefetch: u16,
) -> Result<(Channel, futures::stream::SelectAll<DeliveryStream>, Vec<String>)> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| map_error("opening a channel", e))?;
    let consumers = async {
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| map_error("setting the prefetch", e))?;
        let mut consumers = Vec::new();
        for source in sources {
            if source.private {
                declare_exchange(&channel, &source.topic).await?;
                channel
                    .queue_declare(
                        source.queue.as_str().into(),
                        QueueDeclareOptions {
                            exclusive: true,
                            auto_delete: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| map_error("declaring a private queue", e))?;
                channel
                    .queue_bind(
                        source.queue.as_str().into(),
                        source.topic.as_str().into(),
                        "#".into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| map_error("binding a private queue", e))?;
            }
            let consumer = channel
                .basic_consume(
                    source.queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| map_error(&format!("consuming from '{}'", source.queue), e))?;
            consumers.push((source.topic.clone(), consumer));
        }
        Ok::<_, Error>(consumers)
    }
    .await;
    let consumers = match consumers {
        Ok(c) => c,
        Err(e) => {
            let _ = channel.close(200, "bye".into()).await;
            return Err(e);
        }
    };
    let tags = consumers
        .iter()
        .map(|(_, c)| c.tag().as_str().to_owned())
        .collect();
    let streams = consumers
        .into_iter()
        .map(|(topic, consumer)| consumer.map(move |delivery| (topic.clone(), delivery)).boxed());
    Ok((channel, futures::stream::select_all(streams), tags))
}

impl RabbitSubscription {
    /// Connects and starts consuming.
    async fn open(&mut self) -> Result<()> {
        let connection = self.config.connection_with("polybus-subscription", false).await?;
        match open_consumers(&connection, &self.sources, self.prefetch).await {
            Ok((channel, deliveries, tags)) => {
                self.connection = Some(connection);
                self.channel = Some(channel);
                self.deliveries = deliveries;
                self.tags = tags;
                Ok(())
            }
            Err(e) => {
                let _ = connection.close(200, "bye".into()).await;
                Err(e)
            }
        }
    }

    /// After the connection dropped: reconnect with backoff, within the request
    /// timeout (then a retryable error; the next call tries again).
    async fn reconnect(&mut self) -> Result<()> {
        self.deliveries = futures::stream::SelectAll::new();
        self.channel = None;
        if let Some(old) = self.connection.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), old.close(200, "reconnecting".into())).await;
        }
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.open().await {
                Ok(()) => {
                    tracing::info!(target: "polybus_rabbitmq", "subscription reconnected");
                    return Ok(());
                }
                Err(e) if tokio::time::Instant::now() + backoff >= deadline => {
                    return Err(Error::Connection {
                        backend: BACKEND,
                        message: format!("reconnecting the subscription: {e}"),
                        source: Some(Box::new(e)),
                    });
                }
                Err(e) => {
                    tracing::warn!(target: "polybus_rabbitmq", error = %e, "subscription reconnect failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    fn delivery(&self, topic: String, delivery: lapin::message::Delivery) -> Event {
        let headers: BTreeMap<String, String> = delivery
            .properties
            .headers()
            .as_ref()
            .map(|table| {
                table
                    .inner()
                    .iter()
                    .filter_map(|(k, v)| value_text(v).map(|v| (k.as_str().to_owned(), v)))
                    .collect()
            })
            .unwrap_or_default();
        let delivery_count = headers
            .get("x-delivery-count")
            .and_then(|c| c.parse::<u32>().ok());
        let attempt = match delivery_count {
            Some(count) => count.saturating_add(1),
            None if delivery.redelivered => 2,
            None => 1,
        };
        let fallback = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned());
        let tag = delivery.delivery_tag;
        let pairs = headers.into_iter().filter(|(k, _)| !is_broker_header(k));
        let message = wire::decode(Bytes::from(delivery.data), pairs, || {
            fallback.unwrap_or_else(|| format!("{topic}:{tag}"))
        });
        let origin = Origin {
            topic,
            group: self.group.clone(),
            partition: None,
            sequence: None,
        };
        Event::Delivery(
            Delivery::new(message, origin, attempt),
            Acker::new(RabbitAck {
                acker: delivery.acker,
            }),
        )
    }
}

#[async_trait]
impl Subscription for RabbitSubscription {
    async fn next(&mut self) -> Option<Result<Event>> {
        loop {
            if self.consumer_closed.load(Ordering::Acquire) {
                return None;
            }
            match self.deliveries.next().await {
                Some((topic, Ok(delivery))) => return Some(Ok(self.delivery(topic, delivery))),
                Some((_, Err(e))) => {
                    tracing::warn!(target: "polybus_rabbitmq", error = %e, "consumer lost its connection; reconnecting");
                }
                None => {}
            }
            if self.consumer_closed.load(Ordering::Acquire) {
                return None;
            }
            if let Err(e) = self.reconnect().await {
                return Some(Err(e));
            }
        }
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        let limit = self.config.request_timeout;
        let (channel, connection) = (self.channel.take(), self.connection.take());
        let tags = std::mem::take(&mut self.tags);
        let closing = async {
            if let Some(channel) = channel {
                for tag in &tags {
                    let _ = channel
                        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                        .await;
                }
                // Closing gives back what was delivered but not settled.
                let _ = channel.close(200, "bye".into()).await;
            }
            if let Some(connection) = connection {
                let _ = connection.close(200, "bye".into()).await;
            }
        };
        let _ = tokio::time::timeout(limit, closing).await;
        Ok(())
    }
}

struct RabbitAck {
    acker: lapin::Acker,
}

impl RabbitAck {
    fn settled(what: &str, result: lapin::Result<bool>) -> Result<()> {
        match result {
            Ok(true) => Ok(()),
            // The channel this delivery came on is gone: the broker redelivers it.
            Ok(false) => Err(Error::Connection {
                backend: BACKEND,
                message: format!("{what}: the delivery's channel was closed; it will be redelivered"),
                source: None,
            }),
            Err(e) => Err(map_error(what, e)),
        }
    }
}

#[async_trait]
impl AckHandle for RabbitAck {
    async fn ack(&self) -> Result<()> {
        Self::settled("ack", self.acker.ack(BasicAckOptions::default()).await)
    }

    async fn release(&self, _delay: Option<Duration>) -> Result<()> {
        let options = BasicNackOptions {
            requeue: true,
            ..Default::default()
        };
        Self::settled("nack", self.acker.nack(options).await)
    }
}
