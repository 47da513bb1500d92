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
use crate::errors::inequivalent_arg;
use crate::errors::map_error;
use crate::names::{dead_letter_queue, group_queue, legacy_group_queue, private_queue};
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

    /// Declares `queue` durable with `arguments`. A queue that exists with other
    /// arguments is a configuration error when the differing argument is one the
    /// user chose (queue type, single active consumer, or one polybus does not
    /// set); when it is one polybus sets by default (delivery limit, dead-letter
    /// route), the queue predates it or was declared with another default: the
    /// declaration is repeated without it and a warning says so, so a new
    /// version never makes existing queues undeclarable. With `lenient`, any
    /// difference only warns (the dead-letter queue, whose arguments older
    /// versions chose).
    async fn declare_queue(&self, queue: &str, mut arguments: Vec<QueueArg>, lenient: bool) -> Result<()> {
        loop {
            let channel = self.channel().await?;
            let table = arguments.iter().fold(FieldTable::default(), |mut table, arg| {
                table.insert(arg.name.into(), arg.value.clone());
                table
            });
            let declared = channel
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    table,
                )
                .await;
            let _ = channel.close(200, "bye".into()).await;
            let e = match declared {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            let Some(name) = inequivalent_arg(&e) else {
                return Err(map_error(&format!("declaring queue '{queue}'"), e));
            };
            let ours = arguments.iter().position(|a| a.name == name);
            let chosen = ours.map_or(!is_default_arg(&name), |i| arguments[i].kind == ArgKind::Chosen);
            if chosen && !lenient {
                return Err(Error::InvalidConfig(format!(
                    "queue '{queue}' exists with a different '{name}' than this configuration \
                     declares (another process declares it differently, or the configuration \
                     changed; queue arguments cannot change): {e}"
                )));
            }
            tracing::warn!(
                target: "polybus_rabbitmq",
                queue,
                argument = %name,
                "queue exists with another value of this argument; keeping the queue as it is",
            );
            match ours {
                Some(i) => {
                    arguments.remove(i);
                }
                None => return self.declare_passive(queue).await.map(|_| ()),
            }
        }
    }

    /// Looks `queue` up without changing it: (ready messages, consumers).
    async fn declare_passive(&self, queue: &str) -> Result<(u32, u32)> {
        let channel = self.channel().await?;
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = channel.close(200, "bye".into()).await;
        let declared = declared.map_err(|e| map_error(&format!("looking up queue '{queue}'"), e))?;
        Ok((declared.message_count(), declared.consumer_count()))
    }

    /// Binds `queue` to `exchange` with `#` (every message of the topic).
    async fn bind(&self, queue: &str, exchange: &str) -> Result<()> {
        let channel = self.channel().await?;
        let bound = channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await;
        let _ = channel.close(200, "bye".into()).await;
        bound.map_err(|e| map_error(&format!("binding queue '{queue}' to '{exchange}'"), e))
    }

    /// The arguments of a group queue of `topic`. Only group queues get them:
    /// the dead-letter queue is shared by every group of the topic.
    fn group_arguments(&self, topic: &str) -> Vec<QueueArg> {
        let mut arguments = Vec::new();
        if self.config.queue_type == QueueType::Quorum {
            arguments.push(QueueArg::chosen("x-queue-type", long("quorum")));
        }
        if self.config.single_active_consumer {
            arguments.push(QueueArg::chosen(
                "x-single-active-consumer",
                AMQPValue::Boolean(true),
            ));
        }
        if self.config.queue_type == QueueType::Quorum
            && let Some(limit) = self.config.delivery_limit
        {
            // Past the limit the broker dead-letters the message to the topic's
            // dead-letter exchange, at least once (which needs reject-publish).
            arguments.push(QueueArg::default_arg(
                "x-delivery-limit",
                AMQPValue::LongLongInt(i64::from(limit)),
            ));
            arguments.push(QueueArg::default_arg(
                "x-dead-letter-exchange",
                long(names::dead_letter_topic(topic)),
            ));
            arguments.push(QueueArg::default_arg(
                "x-dead-letter-strategy",
                long("at-least-once"),
            ));
            arguments.push(QueueArg::default_arg("x-overflow", long("reject-publish")));
        }
        arguments
    }

    /// Declares `group`'s queue of `topic` and binds it, then deals with a queue
    /// of the old `<topic>.<group>` name: it is unbound from the topic (so it
    /// gets no new copies), deleted when empty and unused, and otherwise
    /// returned so subscriptions consume its backlog too.
    async fn declare_group_queues(&self, topic: &str, group: &str) -> Result<Option<String>> {
        let queue = group_queue(topic, group);
        self.declare_queue(&queue, self.group_arguments(topic), false)
            .await?;
        self.bind(&queue, topic).await?;
        let Some(legacy) = legacy_group_queue(topic, group) else {
            return Ok(None);
        };
        let (ready, consumers) = match self.declare_passive(&legacy).await {
            Ok(found) => found,
            Err(Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let channel = self.channel().await?;
        let unbound = channel
            .queue_unbind(
                legacy.as_str().into(),
                topic.into(),
                "#".into(),
                FieldTable::default(),
            )
            .await;
        let _ = channel.close(200, "bye".into()).await;
        unbound.map_err(|e| map_error(&format!("unbinding old queue '{legacy}' from '{topic}'"), e))?;
        if ready == 0 && consumers == 0 {
            let channel = self.channel().await?;
            let deleted = channel
                .queue_delete(
                    legacy.as_str().into(),
                    QueueDeleteOptions {
                        if_unused: true,
                        if_empty: true,
                        ..Default::default()
                    },
                )
                .await;
            let _ = channel.close(200, "bye".into()).await;
            if deleted.is_ok() {
                tracing::info!(target: "polybus_rabbitmq", queue = %legacy, "deleted the empty queue of the old name");
                return Ok(None);
            }
        }
        tracing::warn!(
            target: "polybus_rabbitmq",
            queue = %legacy,
            new = %queue,
            ready,
            "group queue of the old name still exists; consuming it until it is deleted",
        );
        Ok(Some(legacy))
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
        caps.replay_from_time = false;
        caps.retains_without_group = false;
        caps.delayed_release = false;
        caps.key_order_across_instances = self.config.single_active_consumer;
        caps.binding = polybus_core::cloudevents::Binding::Amqp;
        caps
    }

    async fn declare_topic_unchecked(&self, topic: &str) -> Result<()> {
        let channel = self.channel().await?;
        let dlq = names::dead_letter_topic(topic);
        let result = async {
            declare_exchange(&channel, topic).await?;
            declare_exchange(&channel, &dlq).await
        }
        .await;
        let _ = channel.close(200, "bye".into()).await;
        result?;
        // Dead letters are kept even before anyone consumes them. The queue has
        // no arguments (older versions gave it the group's; those are kept).
        let queue = dead_letter_queue(topic);
        self.declare_queue(&queue, Vec::new(), true).await?;
        self.bind(&queue, &dlq).await
    }

    async fn declare_group_unchecked(&self, topic: &str, group: &str, _start: StartFrom) -> Result<()> {
        // A queue keeps what arrives from its declaration on: earliest and latest
        // are the same for a new group (there is no replay).
        // The topic comes first, with its dead-letter exchange and queue, so the
        // runner's dead letters for this group are kept.
        self.declare_topic_unchecked(topic).await?;
        self.declare_group_queues(topic, group).await.map(|_| ())
    }

    /// Only the messages **ready** in the group's queue (a passive declare's
    /// message count): AMQP does not show delivered-but-unacked ones.
    async fn lag_unchecked(&self, topic: &str, group: &str) -> Result<u64> {
        self.ready_messages(topic, group).await.map(u64::from)
    }

    async fn subscribe_unchecked(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed("consumer"));
        }
        let mut sources = Vec::new();
        for topic in &options.topics {
            match &options.group {
                Some(group) => {
                    self.declare_topic_unchecked(topic).await?;
                    let legacy = self.declare_group_queues(topic, group).await?;
                    sources.push(Source {
                        topic: topic.clone(),
                        queue: group_queue(topic, group),
                        private: false,
                        legacy: false,
                    });
                    if let Some(queue) = legacy {
                        sources.push(Source {
                            topic: topic.clone(),
                            queue,
                            private: false,
                            legacy: true,
                        });
                    }
                }
                None => sources.push(Source {
                    topic: topic.clone(),
                    // Named here, not by the broker, so a reconnect can declare it again.
                    queue: private_queue(topic, &Message::new(Bytes::new()).id[..13]),
                    private: true,
                    legacy: false,
                }),
            }
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

/// Who decides a queue argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArgKind {
    /// Set from the user's configuration: two declarers that differ are a
    /// configuration error.
    Chosen,
    /// Set by polybus by default: an existing queue without it (an older
    /// version) or with another value is kept as it is, with a warning.
    Default,
}

/// One `x-` argument of a queue declaration.
struct QueueArg {
    name: &'static str,
    value: AMQPValue,
    kind: ArgKind,
}

impl QueueArg {
    fn chosen(name: &'static str, value: AMQPValue) -> Self {
        QueueArg {
            name,
            value,
            kind: ArgKind::Chosen,
        }
    }

    fn default_arg(name: &'static str, value: AMQPValue) -> Self {
        QueueArg {
            name,
            value,
            kind: ArgKind::Default,
        }
    }
}

/// The arguments polybus sets by default on some queues (see [`ArgKind::Default`]).
fn is_default_arg(name: &str) -> bool {
    matches!(
        name,
        "x-delivery-limit"
            | "x-dead-letter-exchange"
            | "x-dead-letter-routing-key"
            | "x-dead-letter-strategy"
            | "x-overflow"
    )
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
