//! The producer: persistent publishes with publisher confirms.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};
use polybus_core::cloudevents::CONTENT_TYPE;
use polybus_core::{Error, Message, Producer, Result, SendGate, wire};

use crate::BACKEND;
use crate::config::RabbitConfig;
use crate::consumer::declare_exchange;
use crate::errors::{alive, is_not_found, is_refusal, map_error};

/// How many confirm channels a producer with `mandatory` publishes on (one
/// publish in flight on each).
const MANDATORY_CHANNELS: usize = 8;

/// One confirm channel of a producer.
struct Slot {
    /// Replaced when the broker closes it (a refusal) or a mandatory confirm
    /// timed out; `None` until first used.
    channel: std::sync::Mutex<Option<Channel>>,
    /// Held for the whole publish when `mandatory` is set: lapin hands a
    /// basic.return to whichever confirm of a multiple ack it resolves first,
    /// so with one publish in flight per channel a return can only be its own.
    turn: tokio::sync::Mutex<()>,
}

impl Slot {
    fn new(channel: Option<Channel>) -> Self {
        Slot {
            channel: std::sync::Mutex::new(channel),
            turn: tokio::sync::Mutex::new(()),
        }
    }
}

/// Publishes persistent messages with publisher confirms.
///
/// Without `mandatory`, every send pipelines on one confirm channel. With
/// `mandatory`, a send holds one of a few channels until its confirm, so an
/// unroutable answer (basic.return) is matched to the send it belongs to.
pub struct RabbitProducer {
    connection: lapin::Connection,
    /// The confirm channels: one, or [`MANDATORY_CHANNELS`] with `mandatory`.
    slots: Vec<Slot>,
    /// Round robin over `slots`.
    next_slot: std::sync::atomic::AtomicUsize,
    /// Exchanges declared (or being declared) by this producer, one cell per
    /// topic: concurrent first sends to a topic wait for one declaration.
    exchanges: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::OnceCell<()>>>>,
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
        let mut slots = vec![Slot::new(Some(channel))];
        if config.mandatory {
            slots.extend((1..MANDATORY_CHANNELS).map(|_| Slot::new(None)));
        }
        Ok(RabbitProducer {
            connection,
            slots,
            next_slot: std::sync::atomic::AtomicUsize::new(0),
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

    /// The slot's channel, opened if it has none yet.
    async fn current(&self, slot: &Slot) -> Result<Channel> {
        if let Some(channel) = slot.channel.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(channel);
        }
        let fresh = Self::confirm_channel(&self.connection).await?;
        let mut current = slot.channel.lock().unwrap_or_else(|p| p.into_inner());
        Ok(current.get_or_insert(fresh).clone())
    }

    /// Replaces `broken` (closed by a broker refusal, or given up by recovery)
    /// with a new confirm channel, unless another send already did.
    async fn reopen(&self, slot: &Slot, broken: &Channel) -> Result<()> {
        if alive(broken) {
            return Ok(());
        }
        let fresh = Self::confirm_channel(&self.connection).await?;
        let mut current = slot.channel.lock().unwrap_or_else(|p| p.into_inner());
        let replace = match current.as_ref() {
            Some(c) => c.id() == broken.id() && !alive(c),
            None => true,
        };
        if replace {
            *current = Some(fresh);
        }
        Ok(())
    }

    /// Drops the slot's channel after a mandatory confirm timed out: its late
    /// basic.return could otherwise be handed to the slot's next send.
    async fn discard(&self, slot: &Slot, channel: &Channel) {
        {
            let mut current = slot.channel.lock().unwrap_or_else(|p| p.into_inner());
            if current.as_ref().is_some_and(|c| c.id() == channel.id()) {
                *current = None;
            }
        }
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            channel.close(200, "confirm timed out".into()),
        )
        .await;
    }

    /// Declares the topic's exchange once per producer, so a send to a topic
    /// nobody declared is not refused (which would close the channel).
    ///
    /// The first sends to a topic share one declaration (a `OnceCell` per
    /// topic): before, every send that started before the first declaration
    /// finished opened a channel and declared the exchange itself, so a
    /// producer starting with 1,000 sends in flight made 1,000 declarations.
    /// A failed declaration leaves the cell empty, and the next send tries again.
    async fn ensure_exchange(&self, topic: &str) -> Result<()> {
        let cell = {
            let mut exchanges = self.exchanges.lock().unwrap_or_else(|p| p.into_inner());
            match exchanges.get(topic) {
                Some(cell) if cell.initialized() => return Ok(()),
                Some(cell) => Arc::clone(cell),
                None => {
                    let cell = Arc::new(tokio::sync::OnceCell::new());
                    exchanges.insert(topic.to_owned(), Arc::clone(&cell));
                    cell
                }
            }
        };
        cell.get_or_try_init(|| async {
            let channel = self
                .connection
                .create_channel()
                .await
                .map_err(|e| map_error("opening a channel", e))?;
            let declared = declare_exchange(&channel, topic).await;
            let _ = channel.close(200, "bye".into()).await;
            declared
        })
        .await
        .map(|_| ())
    }

    fn properties(message: &Message) -> BasicProperties {
        // The id travels as the AMQP `message_id` property (a short string) when
        // it fits in 255 bytes, else as the `polybus-id` header; the receiver
        // reads whichever is there.
        let id_property = ShortString::try_new(message.id.as_str()).ok();
        // A copy of a received message gets its typed AMQP values back.
        let types: Vec<(String, char)> = message
            .system_headers
            .get(crate::TYPES)
            .map(crate::parse_types_label)
            .unwrap_or_default();
        // A `content-type` header is the AMQP `content_type` property (the
        // CloudEvents AMQP binding's `datacontenttype`), when it fits one.
        let content_type = message
            .headers
            .get(CONTENT_TYPE)
            .and_then(|ct| ShortString::try_new(ct).ok());
        let mut headers = FieldTable::default();
        for (key, value) in wire::encode(message) {
            if (key == wire::ID && id_property.is_some())
                || key == crate::TYPES
                || (key == CONTENT_TYPE && content_type.is_some())
            {
                continue;
            }
            let typed = types
                .iter()
                .find(|(name, _)| name == key)
                .and_then(|(_, tag)| crate::typed_value(*tag, &value));
            let value = typed.unwrap_or_else(|| crate::amqp_value(&value));
            headers.insert(ShortString::from(key), value);
        }
        let timestamp = message
            .timestamp
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_timestamp(timestamp)
            .with_headers(headers);
        if let Some(content_type) = content_type {
            properties = properties.with_content_type(content_type);
        }
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

    fn backend(&self) -> &'static str {
        crate::BACKEND
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
        let index = self.next_slot.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.slots.len();
        let slot = &self.slots[index];
        let _turn = if self.config.mandatory {
            match tokio::time::timeout_at(deadline, slot.turn.lock()).await {
                Ok(turn) => Some(turn),
                Err(_) => {
                    return Err(Error::timeout(
                        format!("publishing to '{topic}' (waiting for a mandatory channel)"),
                        self.config.request_timeout,
                    ));
                }
            }
        } else {
            None
        };
        loop {
            let channel = self.current(slot).await?;
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
                    if self.config.mandatory {
                        self.discard(slot, &channel).await;
                    }
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
                    let _ = self.reopen(slot, &channel).await;
                    return Err(map_error(&format!("publishing to '{topic}'"), e));
                }
                Err(e) => {
                    let what = format!("publishing to '{topic}'");
                    if !alive(&channel) {
                        // Closed for good (recovery gave up): start a new channel.
                        self.reopen(slot, &channel).await?;
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
        for slot in &self.slots {
            let channel = slot.channel.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(channel) = channel {
                let _ = channel.close(200, "bye".into()).await;
            }
        }
        let _ = self.connection.close(200, "bye".into()).await;
        Ok(())
    }
}
