//! The consumer: declarations of topics and groups, and opening subscriptions.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};
use polybus_core::{
    Bytes, Capabilities, Consumer, Error, Message, Result, StartFrom, SubscribeOptions, Subscription, names,
};

use crate::config::{QueueType, RabbitConfig};
use crate::errors::map_error;
use crate::names::group_queue;
use crate::subscription::{RabbitSubscription, Source};
use crate::{BACKEND, long};

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
        let mut subscription = RabbitSubscription::new(
            self.config.clone(),
            sources,
            prefetch,
            options.group,
            Arc::clone(&self.closed),
        );
        subscription.open().await?;
        Ok(Box::new(subscription))
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        let _ = self.connection.close(200, "bye".into()).await;
        Ok(())
    }
}

/// Declares `exchange` as a durable topic exchange (a topic), if missing.
pub(crate) async fn declare_exchange(channel: &Channel, exchange: &str) -> Result<()> {
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
