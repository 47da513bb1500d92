//! Subscriptions: consumers on a connection of their own, and settlement.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::Channel;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use polybus_core::{
    AckHandle, Acker, Bytes, Delivery, Error, Event, HeaderValue, Origin, Result, Subscription, wire,
};

use crate::config::{DEFAULT_DELIVERY_LIMIT, QueueType, RabbitConfig};
use crate::consumer::declare_exchange;
use crate::errors::{alive as alive_channel, is_not_found, map_error};
use crate::{BACKEND, TYPES, header_value, is_broker_header, types_label, value_text};

type DeliveryStream = futures::stream::BoxStream<'static, (String, lapin::Result<lapin::message::Delivery>)>;

/// One queue a subscription consumes from.
#[derive(Clone)]
pub(crate) struct Source {
    pub(crate) topic: String,
    pub(crate) queue: String,
    /// An exclusive, auto-delete queue of this subscription's connection.
    pub(crate) private: bool,
    /// A group queue of the old `<topic>.<group>` name, consumed until it is
    /// deleted; dropped from the sources once it is gone.
    pub(crate) legacy: bool,
}

/// A subscription on a connection of its own, without lapin's auto-recovery:
/// when the connection drops, `next` reconnects with backoff, declares its
/// private queues again and consumes anew (the broker has already given every
/// unacknowledged delivery of the old connection back).
pub(crate) struct RabbitSubscription {
    config: RabbitConfig,
    sources: Vec<Source>,
    prefetch: u16,
    connection: Option<lapin::Connection>,
    channel: Option<Channel>,
    deliveries: futures::stream::SelectAll<DeliveryStream>,
    tags: Vec<String>,
    group: Option<String>,
    consumer_closed: Arc<AtomicBool>,
    /// `stop` cancelled the consumers: no reconnect, and the subscription ends
    /// once the deliveries already received are handed out.
    stopped: bool,
    /// Poison handling (see `parse_failed`): consuming with prefetch 1 since
    /// lapin last failed to parse a message, for this many more deliveries.
    careful: Option<u32>,
    /// Connections lost to a parse failure in a row, with no delivery between
    /// them: the same message every time.
    parse_failures: u32,
    /// A reconnection in progress (see `reconnect`).
    opening: Option<tokio::task::JoinHandle<Result<Opened>>>,
    /// Consumers being started again with the full prefetch (see
    /// `received_carefully`).
    restoring: Option<tokio::task::JoinHandle<Result<Restored>>>,
    /// Dropped when the current connection is lost: settlements still waiting
    /// on it end at once (see `RabbitAck`).
    alive: tokio::sync::watch::Sender<()>,
}

impl Drop for RabbitSubscription {
    fn drop(&mut self) {
        // A crash: closing the connection hands every unacknowledged delivery
        // back to the broker, as a dead process's connection would.
        let (channel, connection) = (self.channel.take(), self.connection.take());
        let opening = self.opening.take();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Some(channel) = channel {
                    let _ = channel.close(200, "dropped".into()).await;
                }
                if let Some(connection) = connection {
                    let _ = connection.close(200, "dropped".into()).await;
                }
                close_opening(opening).await;
            });
        }
    }
}

/// Waits for a reconnection in progress and closes what it opened.
async fn close_opening(opening: Option<tokio::task::JoinHandle<Result<Opened>>>) {
    if let Some(Ok(Ok(opened))) = match opening {
        Some(task) => Some(task.await),
        None => None,
    } {
        let _ = opened.connection.close(200, "bye".into()).await;
    }
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
    match start_consumers(&channel, sources, prefetch, true).await {
        Ok((streams, tags)) => Ok((channel, futures::stream::select_all(streams), tags)),
        Err(e) => {
            let _ = channel.close(200, "bye".into()).await;
            Err(e)
        }
    }
}

/// Sets the prefetch of consumers started from now on and starts one consumer
/// per source on `channel` (declaring private queues first when `declare`).
async fn start_consumers(
    channel: &Channel,
    sources: &[Source],
    prefetch: u16,
    declare: bool,
) -> Result<(Vec<DeliveryStream>, Vec<String>)> {
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| map_error("setting the prefetch", e))?;
    let mut consumers = Vec::new();
    for source in sources {
        if source.private && declare {
            declare_exchange(channel, &source.topic).await?;
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
    let tags = consumers
        .iter()
        .map(|(_, c)| c.tag().as_str().to_owned())
        .collect();
    let streams = consumers
        .into_iter()
        .map(|(topic, consumer)| consumer.map(move |delivery| (topic.clone(), delivery)).boxed())
        .collect();
    Ok((streams, tags))
}

/// Consumers started again on the same channel, and their tags.
type Restored = (Vec<DeliveryStream>, Vec<String>);

/// A subscription's connection, channel and consumers.
struct Opened {
    connection: lapin::Connection,
    channel: Channel,
    deliveries: futures::stream::SelectAll<DeliveryStream>,
    tags: Vec<String>,
    /// The sources still to consume (a queue of the old name may be gone).
    sources: Vec<Source>,
}

/// Connects and starts consuming `sources`, within the request timeout.
async fn open_sources(config: &RabbitConfig, mut sources: Vec<Source>, prefetch: u16) -> Result<Opened> {
    let connection = config.connection_with("polybus-subscription", false).await?;
    let opening = async {
        // A queue of the old name may have been deleted (empty and unused while
        // this subscription was away): consuming it would be refused (404).
        let mut gone = Vec::new();
        for source in sources.iter().filter(|s| s.legacy) {
            if let Ok(channel) = connection.create_channel().await {
                let found = channel
                    .queue_declare(
                        source.queue.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await;
                if found.as_ref().is_err_and(is_not_found) {
                    gone.push(source.queue.clone());
                }
                let _ = channel.close(200, "bye".into()).await;
            }
        }
        sources.retain(|s| !gone.contains(&s.queue));
        open_consumers(&connection, &sources, prefetch).await
    };
    let limit = config.request_timeout;
    let opened = match tokio::time::timeout(limit, opening).await {
        Ok(result) => result,
        Err(_) => Err(Error::timeout("starting the subscription's consumers", limit)),
    };
    match opened {
        Ok((channel, deliveries, tags)) => Ok(Opened {
            connection,
            channel,
            deliveries,
            tags,
            sources,
        }),
        Err(e) => {
            let _ = tokio::time::timeout(Duration::from_secs(1), connection.close(200, "bye".into())).await;
            Err(e)
        }
    }
}

/// Closes `old` (bounded), then connects again with backoff until it works or
/// the request timeout has passed. A refusal (non-retryable: the user's
/// permissions or credentials were revoked, a TLS failure) ends it at once.
async fn reopen(
    config: RabbitConfig,
    sources: Vec<Source>,
    prefetch: u16,
    old: Option<lapin::Connection>,
) -> Result<Opened> {
    if let Some(old) = old {
        let _ = tokio::time::timeout(Duration::from_secs(1), old.close(200, "reconnecting".into())).await;
    }
    let deadline = tokio::time::Instant::now() + config.request_timeout;
    let mut backoff = Duration::from_millis(100);
    loop {
        match open_sources(&config, sources.clone(), prefetch).await {
            Ok(opened) => return Ok(opened),
            // Refused (credentials, permissions, TLS, configuration): trying
            // again cannot help, so the runner ends with it instead of looping.
            Err(e) if !e.is_retryable() => {
                tracing::warn!(target: "polybus_rabbitmq", error = %e, "subscription reconnect refused");
                return Err(e);
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

impl RabbitSubscription {
    /// A subscription that is not connected yet (see `open`).
    pub(crate) fn new(
        config: RabbitConfig,
        sources: Vec<Source>,
        prefetch: u16,
        group: Option<String>,
        consumer_closed: Arc<AtomicBool>,
    ) -> Self {
        RabbitSubscription {
            config,
            sources,
            prefetch,
            connection: None,
            channel: None,
            deliveries: futures::stream::SelectAll::new(),
            tags: Vec::new(),
            group,
            consumer_closed,
            stopped: false,
            careful: None,
            parse_failures: 0,
            opening: None,
            restoring: None,
            alive: tokio::sync::watch::channel(()).0,
        }
    }

    /// Connects and starts consuming.
    pub(crate) async fn open(&mut self) -> Result<()> {
        let opened = open_sources(&self.config, self.sources.clone(), self.current_prefetch()).await?;
        self.install(opened);
        Ok(())
    }

    /// The prefetch to consume with now: 1 while poison handling is careful.
    fn current_prefetch(&self) -> u16 {
        if self.careful.is_some() { 1 } else { self.prefetch }
    }

    fn install(&mut self, opened: Opened) {
        self.alive = tokio::sync::watch::channel(()).0;
        self.connection = Some(opened.connection);
        self.channel = Some(opened.channel);
        self.deliveries = opened.deliveries;
        self.tags = opened.tags;
        self.sources = opened.sources;
    }

    /// After the connection dropped: reconnect with backoff, within the request
    /// timeout (then a retryable error; the next call tries again). The work
    /// runs in a task of its own, so `next` stays cancel-safe: a `next` dropped
    /// mid-reconnect (the runner polls it with `now_or_never`) leaves the task
    /// running, and the following call awaits the same task. (Reconnecting in
    /// the `next` future itself dropped half-open lapin connections and, about
    /// one run in five of the poison tests, stalled the subscription.)
    async fn reconnect(&mut self) -> Result<()> {
        let task = match self.opening.take() {
            Some(task) => task,
            None => {
                // Settlements waiting on the lost connection give up now.
                self.alive = tokio::sync::watch::channel(()).0;
                if let Some(restoring) = self.restoring.take() {
                    restoring.abort();
                }
                self.deliveries = futures::stream::SelectAll::new();
                self.channel = None;
                let old = self.connection.take();
                let (config, sources, prefetch) =
                    (self.config.clone(), self.sources.clone(), self.current_prefetch());
                tokio::spawn(reopen(config, sources, prefetch, old))
            }
        };
        let task = self.opening.insert(task);
        let joined = task.await;
        self.opening = None;
        match joined {
            Ok(Ok(opened)) => {
                tracing::info!(target: "polybus_rabbitmq", "subscription reconnected");
                self.install(opened);
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(e) => Err(Error::Connection {
                backend: BACKEND,
                message: format!("reconnecting the subscription: the task ended: {e}"),
                source: None,
            }),
        }
    }

    /// lapin could not parse a frame (a message whose header name or
    /// `message_id` is not UTF-8: lapin's short strings are `String`s) and
    /// dropped the connection; the broker requeues everything this connection
    /// held. From now on the subscription consumes with prefetch 1, so the
    /// messages ahead of the unparsable one are received, handled and acked one
    /// at a time before it is sent again, and only the unparsable message is
    /// counted against a quorum queue's delivery limit, which then moves it to
    /// `<topic>.dlq`. Without such a limit (a classic queue) nothing can move
    /// it: after a bounded number of losses in a row with no delivery between
    /// them, the subscription ends with a non-retryable error.
    fn parse_failed(&mut self, e: lapin::Error) -> Option<Error> {
        self.parse_failures += 1;
        self.careful = Some(u32::from(self.prefetch).max(1));
        let queues: Vec<&str> = self.sources.iter().map(|s| s.queue.as_str()).collect();
        let limit = self.parse_failure_limit();
        tracing::warn!(
            target: "polybus_rabbitmq",
            error = %e,
            queues = ?queues,
            failures = self.parse_failures,
            limit,
            "lapin cannot parse a message (a header name or message_id that is not UTF-8?); reconnecting with prefetch 1"
        );
        if self.parse_failures < limit {
            return None;
        }
        let hint = if self.all_limited() {
            "the queue's delivery limit should have dead-lettered it to '<topic>.dlq' by now: \
             check the queue's x-delivery-limit policy"
        } else {
            "a classic queue has no delivery limit, so nothing can move it: take it out of the \
             queue by other means (e.g. the management UI's get messages, or a shovel) or use \
             quorum group queues (RabbitConfig::queue_type)"
        };
        Some(Error::Backend {
            backend: BACKEND,
            message: format!(
                "the AMQP client cannot parse a message in '{}' ({e}): the connection was lost \
                 {} times in a row at the same message without receiving any other; a header \
                 name or message_id that is not UTF-8 (written by another client) does this; {hint}",
                queues.join("', '"),
                self.parse_failures,
            ),
            retryable: false,
            source: Some(Box::new(e)),
        })
    }

    /// Whether every source is a group queue with a delivery limit (quorum).
    fn all_limited(&self) -> bool {
        self.config.queue_type == QueueType::Quorum && self.sources.iter().all(|s| !s.private)
    }

    /// How many parse failures in a row end the subscription: one more than a
    /// quorum queue delivers a message before dead-lettering it (its limit + 1),
    /// or 3 where nothing limits deliveries.
    fn parse_failure_limit(&self) -> u32 {
        if self.all_limited() {
            self.config
                .delivery_limit
                .unwrap_or(DEFAULT_DELIVERY_LIMIT)
                .saturating_add(2)
        } else {
            3
        }
    }

    /// Counts a delivery received in careful mode; after as many as the normal
    /// prefetch, the consumers are started again with it, in a task (so `next`
    /// stays cancel-safe): cancelled and re-consumed on the same channel, so
    /// the deliveries already received stay settleable. `next` takes the new
    /// consumers when the task ends.
    fn received_carefully(&mut self) {
        let Some(left) = self.careful else {
            return;
        };
        if left > 1 {
            self.careful = Some(left - 1);
            return;
        }
        self.careful = None;
        if self.prefetch <= 1 || self.restoring.is_some() {
            return;
        }
        let (Some(channel), false) = (self.channel.clone(), self.stopped) else {
            return;
        };
        let (tags, sources, prefetch, limit) = (
            self.tags.clone(),
            self.sources.clone(),
            self.prefetch,
            self.config.request_timeout,
        );
        self.restoring = Some(tokio::spawn(async move {
            let resumed = async {
                for tag in &tags {
                    channel
                        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                        .await
                        .map_err(|e| map_error("cancelling a careful consumer", e))?;
                }
                start_consumers(&channel, &sources, prefetch, false).await
            };
            match tokio::time::timeout(limit, resumed).await {
                Ok(result) => result,
                Err(_) => Err(Error::timeout("restoring the prefetch", limit)),
            }
        }));
    }

    /// Takes the consumers a finished restore started.
    fn restored(&mut self, joined: std::result::Result<Result<Restored>, tokio::task::JoinError>) {
        self.restoring = None;
        match joined {
            Ok(Ok((streams, tags))) => {
                for stream in streams {
                    self.deliveries.push(stream);
                }
                self.tags = tags;
                tracing::info!(target: "polybus_rabbitmq", prefetch = self.prefetch, "consuming with the full prefetch again");
            }
            // The connection is failing: the stream reports it (or ends) and
            // `next` reconnects.
            Ok(Err(e)) => {
                tracing::warn!(target: "polybus_rabbitmq", error = %e, "could not restore the prefetch")
            }
            Err(e) => tracing::warn!(target: "polybus_rabbitmq", error = %e, "restoring the prefetch failed"),
        }
    }

    fn delivery(&self, topic: String, delivery: lapin::message::Delivery) -> Event {
        let table = delivery.properties.headers().as_ref();
        let delivery_count = table
            .and_then(|t| t.inner().get("x-delivery-count"))
            .and_then(value_text)
            .and_then(|c| c.parse::<u32>().ok());
        // The label is ours to make: one arriving from the wire is dropped.
        let fields: Vec<(&str, &lapin::types::AMQPValue)> = table
            .map(|table| {
                table
                    .inner()
                    .iter()
                    .map(|(k, v)| (k.as_str(), v))
                    .filter(|(k, _)| !is_broker_header(k) && *k != TYPES)
                    .collect()
            })
            .unwrap_or_default();
        let mut headers: Vec<(String, HeaderValue)> = fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), header_value(v)))
            .collect();
        // The AMQP `content_type` property is the `content-type` header (the
        // CloudEvents AMQP binding's `datacontenttype`), unless one is in the table.
        if let Some(ct) = delivery.properties.content_type()
            && !headers
                .iter()
                .any(|(k, _)| k == polybus_core::cloudevents::CONTENT_TYPE)
        {
            headers.push((
                polybus_core::cloudevents::CONTENT_TYPE.to_owned(),
                HeaderValue::from(ct.as_str()),
            ));
        }
        let types = types_label(fields.iter().copied());
        let attempt = match delivery_count {
            Some(count) => count.saturating_add(1),
            None if delivery.redelivered => 2,
            None => 1,
        };
        // A message without an id (a foreign publisher) gets one from its
        // content, so a redelivery has the same id.
        let fallback = match delivery.properties.message_id() {
            Some(id) => id.as_str().to_owned(),
            None if headers.iter().any(|(k, _)| k == wire::ID) => String::new(),
            None => content_id(
                &delivery.data,
                &headers,
                delivery.properties.timestamp().unwrap_or(0),
            ),
        };
        if let Some(types) = types {
            headers.push((TYPES.to_owned(), HeaderValue::from(types)));
        }
        let message = wire::decode(Bytes::from(delivery.data), headers, || fallback);
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
                alive: self.alive.subscribe(),
                channel: self.channel.clone(),
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
            let polled = match self.restoring.as_mut() {
                Some(task) => tokio::select! {
                    joined = task => {
                        self.restored(joined);
                        continue;
                    }
                    polled = self.deliveries.next() => polled,
                },
                None => self.deliveries.next().await,
            };
            let polled = match (polled, self.restoring.as_mut()) {
                // The careful consumer is cancelled and the new ones are not
                // pushed yet: wait for them instead of reconnecting.
                (None, Some(task)) => {
                    let joined = task.await;
                    self.restored(joined);
                    continue;
                }
                (polled, _) => polled,
            };
            match polled {
                Some((topic, Ok(delivery))) => {
                    self.parse_failures = 0;
                    self.received_carefully();
                    return Some(Ok(self.delivery(topic, delivery)));
                }
                Some((_, Err(e))) if self.stopped => {
                    // Stopped: nothing more is consumed, and the broker has given
                    // back what this connection held.
                    tracing::warn!(target: "polybus_rabbitmq", error = %e, "stopped subscription lost its connection");
                    return None;
                }
                Some((_, Err(e))) if matches!(e.kind(), lapin::ErrorKind::ParsingError(_)) => {
                    if let Some(fatal) = self.parse_failed(e) {
                        return Some(Err(fatal));
                    }
                }
                Some((_, Err(e))) => {
                    tracing::warn!(target: "polybus_rabbitmq", error = %e, "consumer lost its connection; reconnecting");
                }
                // Every consumer was cancelled by `stop` and what they had
                // received was handed out.
                None if self.stopped => return None,
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

    /// Cancels this subscription's consumers (`basic.cancel`), so deliveries the
    /// runner releases from now on go to other consumers of the group instead of
    /// back into this one's prefetch. The channel stays open: deliveries already
    /// received can still be acked and released, and `next` hands out those
    /// lapin had buffered, then ends. Idempotent.
    async fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        if let Some(task) = self.restoring.as_mut() {
            // Its consumers must be cancelled too.
            if let Ok(joined) = tokio::time::timeout(self.config.request_timeout, task).await {
                self.restored(joined);
            }
        }
        let tags = std::mem::take(&mut self.tags);
        let Some(channel) = self.channel.clone() else {
            return Ok(());
        };
        let limit = self.config.request_timeout;
        let cancelling = async {
            for tag in &tags {
                channel
                    .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                    .await
                    .map_err(|e| map_error(&format!("cancelling consumer '{tag}'"), e))?;
            }
            Ok(())
        };
        match tokio::time::timeout(limit, cancelling).await {
            Ok(result) => result,
            Err(_) => Err(Error::timeout("cancelling the subscription's consumers", limit)),
        }
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        let limit = self.config.request_timeout;
        let (channel, connection) = (self.channel.take(), self.connection.take());
        let tags = std::mem::take(&mut self.tags);
        let opening = self.opening.take();
        let closing = async {
            close_opening(opening).await;
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

/// The id of a message that came without one: `amqp-` and a 64-bit FNV-1a hash
/// of its payload, headers (without the broker's) and timestamp property. The
/// same on every redelivery; two identical messages get the same id.
fn content_id(payload: &[u8], headers: &[(String, HeaderValue)], timestamp: u64) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        // Each field is length-prefixed, so fields cannot run into each other.
        for byte in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(payload);
    let mut sorted: Vec<&(String, HeaderValue)> = headers.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, value) in sorted {
        eat(key.as_bytes());
        match value.as_bytes() {
            Some(bytes) => eat(bytes),
            None => eat(b"\xff(null)"),
        }
    }
    eat(&timestamp.to_le_bytes());
    format!("amqp-{hash:016x}")
}

struct RabbitAck {
    acker: lapin::Acker,
    /// Ends (the sender is dropped) when the subscription sees the delivery's
    /// connection lost.
    alive: tokio::sync::watch::Receiver<()>,
    /// The delivery's channel, watched while settling: the subscription only
    /// sees a lost connection when the runner pulls, which a full runner does not.
    channel: Option<Channel>,
}

impl RabbitAck {
    /// lapin's acker answers `Ok(false)` when it is poisoned (its channel closed
    /// or was replaced by a reconnect) and `Err` when the channel ended while
    /// settling: either way the broker did not get the settlement and will
    /// redeliver the message, so nothing was settled.
    fn settled(operation: &'static str, result: lapin::Result<bool>) -> Result<()> {
        match result {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::NotSettled {
                operation,
                reason: "the delivery's channel was closed; the broker redelivers it".into(),
            }),
            Err(e) => Err(Error::NotSettled {
                operation,
                reason: format!(
                    "the delivery's channel ended while settling ({e}); the broker redelivers it"
                ),
            }),
        }
    }
}

impl RabbitAck {
    /// Settles, unless the delivery's connection is lost first: lapin does not
    /// always resolve a settlement queued just as its connection failed (seen
    /// after a parse failure: the ack never returned, so the key's lane stayed
    /// blocked until the runner's settle timeout, and with prefetch 1 nothing
    /// else was delivered meanwhile).
    async fn until_lost(
        &self,
        operation: &'static str,
        settling: impl std::future::Future<Output = lapin::Result<bool>>,
    ) -> Result<()> {
        let mut alive = self.alive.clone();
        let channel = self.channel.clone();
        let channel_gone = async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if channel.as_ref().is_none_or(|c| !alive_channel(c)) {
                    return;
                }
            }
        };
        tokio::select! {
            biased;
            result = settling => Self::settled(operation, result),
            _ = channel_gone => Err(Error::NotSettled {
                operation,
                reason: "the delivery's channel is gone; the broker redelivers it".into(),
            }),
            _ = alive.changed() => Err(Error::NotSettled {
                operation,
                reason: "the delivery's connection was lost; the broker redelivers it".into(),
            }),
        }
    }
}

#[async_trait]
impl AckHandle for RabbitAck {
    async fn ack(&self) -> Result<()> {
        self.until_lost("ack", self.acker.ack(BasicAckOptions::default()))
            .await
    }

    async fn release(&self, _delay: Option<Duration>) -> Result<()> {
        let options = BasicNackOptions {
            requeue: true,
            ..Default::default()
        };
        self.until_lost("release", self.acker.nack(options)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ids_are_stable_and_follow_the_content() {
        let headers = vec![("a".to_owned(), HeaderValue::from("1"))];
        let id = content_id(b"x", &headers, 7);
        assert_eq!(id, content_id(b"x", &headers, 7));
        assert_ne!(id, content_id(b"y", &headers, 7));
        assert_ne!(id, content_id(b"x", &[], 7));
        assert_ne!(id, content_id(b"x", &headers, 8));
        // Length prefixes: moving bytes between fields changes the id.
        let ab = vec![("ab".to_owned(), HeaderValue::from(""))];
        let a_b = vec![("a".to_owned(), HeaderValue::from("b"))];
        assert_ne!(content_id(b"", &ab, 0), content_id(b"", &a_b, 0));
        assert!(id.starts_with("amqp-") && id.len() == 21, "{id}");
    }
}
