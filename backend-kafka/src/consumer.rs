//! Topics, groups and subscriptions: the admin client, group offsets, and the
//! subscription's start.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use polybus_core::{
    Capabilities, Consumer, Error, Result, StartFrom, SubscribeOptions, Subscription, async_trait, names,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::RDKafkaErrorCode;

use crate::group_offsets::{committed, fix_group_start, reposition_group, start_offset};
use crate::security::{self, GroupClient};
use crate::subscription::{self, Closer, Start};
use crate::{BACKEND, KafkaConfig, map_error, millis};

/// Declares topics and groups and opens subscriptions. Built by
/// [`connect`](crate::connect).
pub struct KafkaConsumer {
    /// The settings clients are made with (SASL credentials rotated by
    /// [`rotate_credentials`](Self::rotate_credentials)).
    config: Settings,
    admin: AdminClient<DefaultClientContext>,
    /// A client in no group, for metadata and watermarks.
    meta: Arc<BaseConsumer>,
    /// The subscriptions opened here, ended by `close`.
    subscriptions: Mutex<Vec<Closer>>,
    closed: AtomicBool,
}

impl std::fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConsumer")
            .field("config", &self.settings())
            .finish_non_exhaustive()
    }
}

/// A consumer's settings, shared with its subscriptions (whose catch-up
/// probes are made with the credentials of the last rotation).
pub(crate) type Settings = Arc<std::sync::RwLock<Arc<KafkaConfig>>>;

/// Runs a blocking librdkafka call off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::Backend {
        backend: BACKEND,
        message: format!("a blocking Kafka call failed: {e}"),
        retryable: true,
        source: None,
    })?
}

/// Probes the bootstrap brokers over TCP before librdkafka's metadata request,
/// which retries a refused connection until the whole connect timeout has
/// passed: when no broker accepts, it fails at once (every one refused or does
/// not resolve) or after `timeout` (some did not answer). One broker that
/// accepts is enough; the metadata request then checks that it speaks Kafka.
async fn probe_brokers(brokers: &[String], timeout: Duration) -> Result<()> {
    let probes = brokers.iter().map(|broker| async move {
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(broker.as_str())).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(Some(format!("{broker}: {e}"))),
            Err(_) => Err(None),
        }
    });
    let results = futures::future::join_all(probes).await;
    if results.iter().any(std::result::Result::is_ok) {
        return Ok(());
    }
    if results.iter().any(|r| matches!(r, Err(None))) {
        return Err(Error::timeout("connecting to a Kafka broker", timeout));
    }
    let refused: Vec<String> = results.into_iter().filter_map(|r| r.err().flatten()).collect();
    Err(Error::connection(
        BACKEND,
        format!("no Kafka broker can be reached ({})", refused.join("; ")),
    ))
}

impl KafkaConsumer {
    /// Connects: builds the clients and checks, within the connect timeout, that a
    /// broker answers a metadata request.
    pub async fn connect(config: KafkaConfig) -> Result<Self> {
        config.validate()?;
        let admin: AdminClient<DefaultClientContext> = config
            .client_config()
            .create()
            .map_err(|e| map_error("creating the Kafka admin client", e))?;
        let meta: BaseConsumer = config
            .client_config()
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| map_error("creating the Kafka metadata client", e))?;
        probe_brokers(&config.brokers, config.connect_timeout).await?;
        // A client of its own whose error callback is watched, so a refused
        // login or TLS handshake ends the connect at once (librdkafka would
        // otherwise reconnect until the timeout).
        let probe = config.clone();
        let timeout = config.connect_timeout;
        blocking(move || crate::security::probe(&probe, timeout)).await?;
        let meta = Arc::new(meta);
        Ok(KafkaConsumer {
            config: Arc::new(std::sync::RwLock::new(Arc::new(config))),
            admin,
            meta,
            subscriptions: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
        })
    }

    /// The settings this consumer makes its clients with (its SASL
    /// credentials are the rotated ones after
    /// [`rotate_credentials`](Self::rotate_credentials)).
    pub fn config(&self) -> Arc<KafkaConfig> {
        self.settings()
    }

    fn settings(&self) -> Arc<KafkaConfig> {
        Arc::clone(&self.config.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Replaces the SASL user name and password (PLAIN or SCRAM) without a
    /// restart: every client of this consumer (admin, metadata, the
    /// subscriptions still open) uses them the next time it logs in to a
    /// broker (a new or lost connection; connections already open stay as
    /// they are), and brokers waiting to reconnect retry at once; clients made
    /// later (new subscriptions) are made with them.
    ///
    /// `InvalidConfig` without a SASL mechanism (or with a NUL byte or an
    /// empty value); `Unsupported` for another mechanism than PLAIN or SCRAM.
    pub fn rotate_credentials(&self, username: &str, password: &str) -> Result<()> {
        let (user, pass) = crate::credentials::check(username, password)?;
        // A subscription being opened meanwhile with the old settings is
        // given the new credentials by `subscribe` once it is in the list.
        let mut config = self.config.write().unwrap_or_else(|p| p.into_inner());
        let rotated = config.with_rotated_credentials(username, password)?;
        crate::credentials::set(self.admin.inner(), &user, &pass)?;
        crate::credentials::set(self.meta.client(), &user, &pass)?;
        for subscription in self
            .subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            subscription.rotate(&user, &pass)?;
        }
        *config = Arc::new(rotated);
        tracing::info!(target: "polybus_kafka", user = username, "Kafka consumer SASL credentials rotated");
        Ok(())
    }

    /// The number of partitions of `topic`, or `None` when it does not exist.
    pub async fn partitions(&self, topic: &str) -> Result<Option<i32>> {
        let meta = Arc::clone(&self.meta);
        let topic = topic.to_owned();
        let timeout = self.settings().request_timeout;
        blocking(move || partition_count(&meta, &topic, timeout)).await
    }

    /// How many messages of `topic` `group` has not committed yet (the sum over
    /// partitions of the end offset less the committed one). Zero means the
    /// group is drained.
    pub async fn lag(&self, topic: &str, group: &str) -> Result<u64> {
        names::validate_topic(topic)?;
        names::validate_group(group)?;
        let meta = Arc::clone(&self.meta);
        let offsets = self.group_client(group)?;
        let topic = topic.to_owned();
        let config = self.settings();
        let timeout = config.request_timeout;
        blocking(move || {
            let Some(count) = partition_count(&meta, &topic, timeout)? else {
                return Err(Error::NotFound {
                    what: format!("Kafka topic {topic}"),
                });
            };
            let committed = committed(&offsets, &config, &topic, count)?;
            let mut lag = 0u64;
            for (partition, committed) in committed.into_iter().enumerate() {
                let (low, high) = meta
                    .fetch_watermarks(&topic, partition as i32, timeout)
                    .map_err(|e| map_error("reading watermarks", e))?;
                let from = committed.unwrap_or(low).max(low);
                lag += (high - from).max(0) as u64;
            }
            Ok(lag)
        })
        .await
    }

    /// The offset `group` has committed on each partition of `topic` (index =
    /// partition; `None` where it has committed nothing).
    pub async fn committed(&self, topic: &str, group: &str) -> Result<Vec<Option<i64>>> {
        names::validate_topic(topic)?;
        names::validate_group(group)?;
        let Some(count) = self.partitions(topic).await? else {
            return Err(Error::NotFound {
                what: format!("Kafka topic {topic}"),
            });
        };
        let client = self.group_client(group)?;
        let topic = topic.to_owned();
        let config = self.settings();
        blocking(move || committed(&client, &config, &topic, count)).await
    }

    /// A client of `group` that never joins it, for reading and committing its
    /// offsets; a refused login fails its requests at once (see
    /// [`security::refusable`]).
    fn group_client(&self, group: &str) -> Result<GroupClient> {
        security::group_client(&self.settings(), group)
    }

    /// Creates `topics` that do not exist yet with the configured partitions.
    async fn create_topics(&self, topics: &[String]) -> Result<()> {
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|t| {
                NewTopic::new(
                    t,
                    self.settings().partitions,
                    TopicReplication::Fixed(self.settings().replication),
                )
            })
            .collect();
        self.create(&new).await
    }

    /// Creates `new` topics (existing ones are fine) and waits until the
    /// metadata shows them.
    async fn create(&self, new: &[NewTopic<'_>]) -> Result<()> {
        let options = AdminOptions::new()
            .operation_timeout(Some(self.settings().request_timeout))
            .request_timeout(Some(self.settings().request_timeout));
        let results = self
            .admin
            .create_topics(new, &options)
            .await
            .map_err(|e| map_error("creating topics", e))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(map_error(
                        &format!("creating topic {topic}"),
                        rdkafka::error::KafkaError::AdminOp(code),
                    ));
                }
            }
        }
        // Creation is asynchronous on the broker: wait until the metadata shows it.
        let until = tokio::time::Instant::now() + self.settings().request_timeout;
        for topic in new.iter().map(|t| t.name) {
            loop {
                if self.partitions(topic).await?.is_some() {
                    break;
                }
                if tokio::time::Instant::now() >= until {
                    return Err(Error::timeout(
                        format!("waiting for topic {topic} to appear"),
                        self.settings().request_timeout,
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// The partition count of `topic`, creating it (and its dead-letter topic)
    /// first if it is missing; an existing topic gets its dead-letter topic if
    /// that is missing.
    async fn ensure_topic(&self, topic: &str) -> Result<i32> {
        let count = match self.partitions(topic).await? {
            Some(count) => count,
            None => {
                self.declare_topic_unchecked(topic).await?;
                self.partitions(topic).await?.ok_or_else(|| Error::NotFound {
                    what: format!("Kafka topic {topic}"),
                })?
            }
        };
        self.ensure_dead_letter_topic(topic, count).await?;
        Ok(count)
    }

    /// Creates `<topic>.dlq` if it is missing (a topic created by someone else
    /// has none, and a broker that does not create topics on produce would
    /// refuse every dead letter): with the source topic's partition count and,
    /// where the broker tells it, its `max.message.bytes`, so every record of
    /// the source fits.
    async fn ensure_dead_letter_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        let dlq = names::dead_letter_topic(topic);
        if names::validate_topic(&dlq).is_err() || self.partitions(&dlq).await?.is_some() {
            return Ok(());
        }
        let max_bytes = self.topic_config(topic, "max.message.bytes").await;
        let mut new = NewTopic::new(
            &dlq,
            partitions.max(1),
            TopicReplication::Fixed(self.settings().replication),
        );
        if let Some(bytes) = &max_bytes {
            new = new.set("max.message.bytes", bytes);
        }
        tracing::info!(
            topic,
            dlq,
            partitions,
            ?max_bytes,
            "creating the dead-letter topic of an existing topic"
        );
        self.create(&[new]).await
    }

    /// One configuration value of `topic`, if the broker answers DescribeConfigs.
    async fn topic_config(&self, topic: &str, key: &str) -> Option<String> {
        let options = AdminOptions::new().request_timeout(Some(self.settings().request_timeout));
        let results = self
            .admin
            .describe_configs(&[ResourceSpecifier::Topic(topic)], &options)
            .await
            .ok()?;
        let resource = results.into_iter().next()?.ok()?;
        resource.get(key).and_then(|entry| entry.value.clone())
    }

    /// Fails once [`close`](Consumer::close) was called.
    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed("consumer"));
        }
        Ok(())
    }
}

/// The partition count of `topic` from a metadata request, `None` if missing.
pub(crate) fn partition_count(meta: &BaseConsumer, topic: &str, timeout: Duration) -> Result<Option<i32>> {
    let metadata = meta
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| map_error(&format!("reading metadata of {topic}"), e))?;
    topic_partitions(&metadata, topic)
}

/// The number of partitions of `topic` in `metadata`, or `None` when it does
/// not exist.
pub(crate) fn topic_partitions(metadata: &rdkafka::metadata::Metadata, topic: &str) -> Result<Option<i32>> {
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    match found.error() {
        None if !found.partitions().is_empty() => Ok(Some(found.partitions().len() as i32)),
        None => Ok(None),
        Some(e) => match RDKafkaErrorCode::from(e) {
            RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic => Ok(None),
            RDKafkaErrorCode::LeaderNotAvailable => Ok(None),
            code => Err(map_error(
                &format!("reading metadata of {topic}"),
                rdkafka::error::KafkaError::MetadataFetch(code),
            )),
        },
    }
}

#[async_trait]
impl Consumer for KafkaConsumer {
    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::new(BACKEND, self.settings().max_payload());
        caps.positional_acks = true;
        caps.key_order_across_instances = true;
        // Kafka has no delayed redelivery: a release with a delay only sleeps
        // client-side before handing the message out again. Said so, the runner
        // waits out an overloaded message's backoff itself, where it counts
        // towards what the runner holds and a shutdown gives it back at once
        // (a sleeping release was outside both).
        caps.delayed_release = false;
        // Kafka's only deadline: a member that stops polling is removed from its
        // group. The poll thread keeps polling while handlers run.
        caps.ack_deadline = Some(self.settings().max_poll_interval);
        caps.binding = polybus_core::cloudevents::Binding::Kafka;
        caps.catch_up = true;
        caps.reposition = true;
        caps
    }

    async fn reposition_group_unchecked(&self, topic: &str, group: &str, start: StartFrom) -> Result<()> {
        self.check_open()?;
        let Some(count) = self.partitions(topic).await? else {
            return Err(Error::NotFound {
                what: format!("Kafka topic {topic}"),
            });
        };
        let meta = Arc::clone(&self.meta);
        let client = self.group_client(group)?;
        let config = self.settings();
        let (topic, group) = (topic.to_owned(), group.to_owned());
        blocking(move || reposition_group(&config, &meta, &client, &group, &topic, count, start)).await
    }

    /// End offsets less the group's committed offsets, summed over partitions
    /// (see [`KafkaConsumer::lag`]).
    async fn lag_unchecked(&self, topic: &str, group: &str) -> Result<u64> {
        KafkaConsumer::lag(self, topic, group).await
    }

    async fn declare_topic_unchecked(&self, topic: &str) -> Result<()> {
        self.check_open()?;
        self.create_topics(&[topic.to_owned(), names::dead_letter_topic(topic)])
            .await
    }

    async fn declare_group_unchecked(&self, topic: &str, group: &str, start: StartFrom) -> Result<()> {
        self.check_open()?;
        let count = self.ensure_topic(topic).await?;
        let meta = Arc::clone(&self.meta);
        let client = self.group_client(group)?;
        let topic = topic.to_owned();
        let config = self.settings();
        blocking(move || fix_group_start(&meta, &client, &config, &topic, count, start)).await
    }

    async fn subscribe_unchecked(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        self.check_open()?;
        let mut partitions = Vec::new();
        for topic in &options.topics {
            let count = self.ensure_topic(topic).await?;
            if let Some(group) = &options.group {
                self.declare_group_unchecked(topic, group, options.start).await?;
            }
            partitions.push((topic.clone(), count));
        }
        let start = match &options.group {
            Some(group) => Start::Group(group.clone()),
            None => {
                // No group: read every partition from its current end (or start),
                // fixed before `subscribe` returns so nothing sent after it is missed.
                let meta = Arc::clone(&self.meta);
                let timeout = self.settings().request_timeout;
                let from = options.start;
                let offsets = blocking(move || {
                    let mut offsets = Vec::new();
                    for (topic, count) in partitions {
                        for partition in 0..count {
                            let offset = start_offset(&meta, &topic, partition, from, timeout)?;
                            offsets.push((topic.clone(), partition, offset));
                        }
                    }
                    Ok(offsets)
                })
                .await?;
                Start::Assign(offsets)
            }
        };
        let settings = self.settings();
        let sub = subscription::open(Arc::clone(&settings), Arc::clone(&self.config), options, start).await?;
        {
            let mut subscriptions = self.subscriptions.lock().unwrap_or_else(|p| p.into_inner());
            subscriptions.retain(Closer::is_open);
            subscriptions.push(sub.closer());
        }
        // Credentials rotated while it was being opened: give it the new ones,
        // holding the settings so that no rotation runs in between (one that
        // runs later finds the subscription in the list).
        {
            let now = self.config.read().unwrap_or_else(|p| p.into_inner());
            if !Arc::ptr_eq(&settings, &now)
                && let Some((user, pass)) = now.sasl_credentials()
            {
                let (user, pass) = crate::credentials::check(&user, &pass)?;
                sub.closer().rotate(&user, &pass)?;
            }
        }
        if self.closed.load(Ordering::Acquire) {
            // `close` ran while this subscription was being opened.
            let _ = Box::new(sub).close().await;
            return Err(Error::Closed("consumer"));
        }
        Ok(Box::new(sub))
    }

    /// Ends every subscription opened here that is still open (each commits
    /// what was acked and leaves its group; its `next` then returns `None`),
    /// and refuses later declarations and subscriptions.
    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        let open: Vec<Closer> =
            std::mem::take(&mut *self.subscriptions.lock().unwrap_or_else(|p| p.into_inner()));
        let results = futures::future::join_all(open.iter().map(Closer::close)).await;
        results.into_iter().collect()
    }
}

/// librdkafka settings of a subscription's consumer.
pub(crate) fn consumer_config(config: &KafkaConfig, group: &str) -> rdkafka::ClientConfig {
    let mut c = config.client_config();
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        .set("queued.min.messages", config.buffer.to_string())
        .set("session.timeout.ms", millis(config.session_timeout))
        .set("max.poll.interval.ms", millis(config.max_poll_interval))
        .set(
            "heartbeat.interval.ms",
            millis(config.session_timeout / 4).as_str(),
        );
    if !config.properties.contains_key("queued.max.messages.kbytes") {
        // Per partition, since each has a queue of its own (librdkafka: 64 MiB).
        c.set(
            "queued.max.messages.kbytes",
            crate::DEFAULT_QUEUE_KBYTES.to_string(),
        );
    }
    c
}
