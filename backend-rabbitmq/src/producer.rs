//! The producer: persistent publishes with publisher confirms.

use std::fmt;

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};
use polybus_core::{Error, Message, Producer, Result, SendGate, wire};

use crate::config::RabbitConfig;
use crate::consumer::declare_exchange;
use crate::errors::{alive, is_not_found, is_refusal, map_error};
use crate::{BACKEND, long};

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
