//! Connecting a subscription: its connection, channel and consumers, and
//! reconnecting with backoff.

use std::time::Duration;

use futures::StreamExt;
use lapin::Channel;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use polybus_core::{Error, Result};

use crate::BACKEND;
use crate::config::RabbitConfig;
use crate::consumer::declare_exchange;
use crate::errors::{is_not_found, map_error};

pub(super) type DeliveryStream =
    futures::stream::BoxStream<'static, (String, lapin::Result<lapin::message::Delivery>)>;

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

/// Waits for a reconnection in progress and closes what it opened.
pub(super) async fn close_opening(opening: Option<tokio::task::JoinHandle<Result<Opened>>>) {
    if let Some(Ok(Ok(opened))) = match opening {
        Some(task) => Some(task.await),
        None => None,
    } {
        let _ = opened.connection.close(200, "bye".into()).await;
    }
}

/// A channel on `connection` with the prefetch and one consumer per source.
pub(super) async fn open_consumers(
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
pub(super) async fn start_consumers(
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
pub(super) type Restored = (Vec<DeliveryStream>, Vec<String>);

/// A subscription's connection, channel and consumers.
pub(super) struct Opened {
    pub(super) connection: lapin::Connection,
    pub(super) channel: Channel,
    pub(super) deliveries: futures::stream::SelectAll<DeliveryStream>,
    pub(super) tags: Vec<String>,
    /// The sources still to consume (a queue of the old name may be gone).
    pub(super) sources: Vec<Source>,
}

/// Connects and starts consuming `sources`, within the request timeout.
pub(super) async fn open_sources(
    config: &RabbitConfig,
    mut sources: Vec<Source>,
    prefetch: u16,
) -> Result<Opened> {
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
pub(super) async fn reopen(
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
