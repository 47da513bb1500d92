//! The producer: `acks=all`, idempotent, `send` resolves on the delivery report.
//!
//! Records are enqueued with `send_result` and, while librdkafka's queue is
//! full, the enqueue is retried by the same task: a batch's records enter the
//! queue in batch order, so one key's records reach its partition in that
//! order (idempotence keeps the order through librdkafka's retries).
//!
//! A fatal error (librdkafka's `rd_kafka_fatal_error`, raised by the
//! idempotent producer when it can no longer guarantee order or once-ness)
//! leaves a librdkafka producer dead for good. The sends it hits fail with a
//! retryable error, and the producer is replaced by a new one (a new producer
//! id), so later sends and dead letters go through.
//!
//! **Records larger than `max_message_bytes`.** `send` refuses them
//! client-side, but a dead-letter copy of another producer's record may be
//! larger (a Java producer writes up to 1,048,576 bytes by default, more with
//! compression, and librdkafka checks the *uncompressed* size). Such a
//! `publish` goes through a second librdkafka producer, made on first need,
//! whose `message.max.bytes` is librdkafka's maximum and which compresses
//! (lz4): the broker then decides by its own limit, the one that let the
//! original in (`<topic>.dlq` is created with its source's
//! `max.message.bytes`). A copy the broker still refuses is
//! `PayloadTooLarge`, and the runner dead-letters a labelled stub.

use std::sync::{Arc, RwLock};
use std::time::{Duration, UNIX_EPOCH};

use polybus_core::{Error, Message, Producer, Result, SendGate, async_trait, wire};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};
use tokio::time::Instant;

use crate::{BACKEND, KafkaConfig, map_error, millis};

/// librdkafka's largest `message.max.bytes`: the oversize producer leaves the
/// limit to the broker.
const OVERSIZE_MESSAGE_MAX_BYTES: usize = 1_000_000_000;

/// How long an enqueue waits before trying a full queue again.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(2);

/// Sends to Kafka. Built by [`connect`](crate::connect).
pub struct KafkaProducer {
    /// The current librdkafka producer (replaced after a fatal error).
    inner: RwLock<Arc<FutureProducer>>,
    /// The producer for records over `max_message_bytes` (dead-letter copies
    /// of foreign records), made on first need; see the module doc.
    oversize: std::sync::Mutex<Option<Arc<FutureProducer>>>,
    /// The settings clients are made with (SASL credentials rotated by
    /// [`rotate_credentials`](Self::rotate_credentials)).
    config: RwLock<KafkaConfig>,
    gate: SendGate,
    max_payload: usize,
    delivery_timeout: Duration,
}

impl std::fmt::Debug for KafkaProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaProducer")
            .field("max_payload", &self.max_payload)
            .field("closed", &self.gate.is_closed())
            .finish_non_exhaustive()
    }
}

fn create(config: &KafkaConfig) -> Result<FutureProducer> {
    producer_config(config)
        .create()
        .map_err(|e| map_error("creating the Kafka producer", e))
}

/// The producer for records over `max_message_bytes` (module doc).
fn create_oversize(config: &KafkaConfig) -> Result<FutureProducer> {
    producer_config(config)
        .set("message.max.bytes", OVERSIZE_MESSAGE_MAX_BYTES.to_string())
        .set("compression.type", "lz4")
        .create()
        .map_err(|e| map_error("creating the Kafka producer for large records", e))
}

fn producer_config(config: &KafkaConfig) -> rdkafka::ClientConfig {
    let mut c = config.client_config();
    c.set("acks", "all")
        .set("enable.idempotence", "true")
        .set("partitioner", config.partitioner.librdkafka_name())
        .set("message.timeout.ms", millis(config.delivery_timeout))
        .set("request.timeout.ms", millis(config.request_timeout));
    if !config.properties.contains_key("linger.ms")
        && !config.properties.contains_key("queue.buffering.max.ms")
    {
        // `send` resolves on the delivery report, so callers keep a bounded
        // number of sends in flight and each one waits out the linger:
        // librdkafka's 5 ms capped 256 sends in flight at about 31 k/s and 1,000
        // at about 115 k/s on one partition (BENCHMARKS.md, "Kafka producer
        // linger"). At 1 ms the batches are still filled by whatever is queued.
        c.set("linger.ms", DEFAULT_LINGER_MS);
    }
    c
}

/// The producer's default `linger.ms` (librdkafka's own is 5).
const DEFAULT_LINGER_MS: &str = "1";

impl KafkaProducer {
    /// A producer with `acks=all` and idempotence on.
    pub fn new(config: &KafkaConfig) -> Result<Self> {
        Ok(KafkaProducer {
            inner: RwLock::new(Arc::new(create(config)?)),
            oversize: std::sync::Mutex::new(None),
            config: RwLock::new(config.clone()),
            gate: SendGate::new("producer"),
            max_payload: config.max_payload(),
            delivery_timeout: config.delivery_timeout,
        })
    }

    fn settings(&self) -> KafkaConfig {
        self.config.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the SASL user name and password (PLAIN or SCRAM) without a
    /// restart: librdkafka uses them the next time it logs in to a broker
    /// (a new or lost connection; connections already open stay as they are),
    /// and brokers waiting to reconnect, after a refused login for example,
    /// retry at once. Producers made later (after a fatal error, or for large
    /// dead-letter copies) use them too.
    ///
    /// `InvalidConfig` without a SASL mechanism (or with a NUL byte or an empty
    /// value); `Unsupported` for another mechanism than PLAIN or SCRAM.
    pub fn rotate_credentials(&self, username: &str, password: &str) -> Result<()> {
        let (user, pass) = crate::credentials::check(username, password)?;
        // Lock order (as `failed` and `for_record`): producer, oversize slot,
        // settings; holding all three, no producer is made with the old ones.
        let current = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let oversize = self.oversize.lock().unwrap_or_else(|p| p.into_inner());
        let mut config = self.config.write().unwrap_or_else(|p| p.into_inner());
        let rotated = config.with_rotated_credentials(username, password)?;
        crate::credentials::set(current.client(), &user, &pass)?;
        if let Some(oversize) = &*oversize {
            crate::credentials::set(oversize.client(), &user, &pass)?;
        }
        *config = rotated;
        tracing::info!(target: "polybus_kafka", user = username, "Kafka producer SASL credentials rotated");
        Ok(())
    }

    fn current(&self) -> Arc<FutureProducer> {
        Arc::clone(&self.inner.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The producer for `message`: the oversize one when the record would be
    /// over `max_message_bytes` (only a `publish` of a copy can be).
    fn for_record(&self, message: &Message) -> Result<Arc<FutureProducer>> {
        if record_size(message) <= self.settings().max_message_bytes {
            return Ok(self.current());
        }
        let mut slot = self.oversize.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(producer) = &*slot {
            return Ok(Arc::clone(producer));
        }
        let producer = Arc::new(create_oversize(&self.settings())?);
        *slot = Some(Arc::clone(&producer));
        Ok(producer)
    }

    /// Maps a send's error; when `producer` has hit a fatal error, replaces it
    /// (once: a producer already replaced is left alone) and says so.
    fn failed(&self, producer: &Arc<FutureProducer>, topic: &str, e: KafkaError) -> Error {
        let Some((code, reason)) = producer.client().fatal_error() else {
            return map_error(&format!("sending to {topic}"), e);
        };
        {
            // A dead oversize producer is made again on next need.
            let mut slot = self.oversize.lock().unwrap_or_else(|p| p.into_inner());
            if slot.as_ref().is_some_and(|o| Arc::ptr_eq(o, producer)) {
                *slot = None;
            }
        }
        let mut current = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if Arc::ptr_eq(&current, producer) {
            match create(&self.settings()) {
                Ok(fresh) => {
                    tracing::error!(?code, %reason, "the Kafka producer hit a fatal error; replaced by a new one");
                    let old = std::mem::replace(&mut *current, Arc::new(fresh));
                    // Dropping a producer purges and flushes (blocking, up to 0.5 s).
                    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                        runtime.spawn_blocking(move || drop(old));
                    }
                }
                Err(e) => tracing::error!(error = %e, "replacing the failed Kafka producer failed"),
            }
        }
        // Recreating cannot help where the broker refuses the producer itself.
        let hopeless = matches!(
            code,
            RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
                | RDKafkaErrorCode::UnsupportedFeature
        );
        Error::Backend {
            backend: BACKEND,
            message: format!(
                "sending to {topic}: the Kafka producer hit a fatal error ({code:?}: {reason}) and was \
                 replaced; this record may not have been written"
            ),
            retryable: !hopeless,
            source: Some(Box::new(e)),
        }
    }

    /// Enqueues one record, waiting while librdkafka's queue is full (until
    /// `deadline`) without letting anything else of the caller's go first.
    async fn enqueue(
        &self,
        producer: &Arc<FutureProducer>,
        topic: &str,
        message: &Message,
        deadline: Instant,
    ) -> Result<DeliveryFuture> {
        let mut record = record(topic, message);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    if Instant::now() >= deadline {
                        return Err(Error::timeout(
                            format!("waiting for room in the Kafka producer's queue for {topic}"),
                            self.delivery_timeout,
                        ));
                    }
                    record = back;
                    tokio::time::sleep(QUEUE_FULL_WAIT).await;
                }
                Err((e, _)) => return Err(self.failed(producer, topic, e)),
            }
        }
    }

    /// Waits for a delivery report.
    async fn delivered(
        &self,
        producer: &Arc<FutureProducer>,
        topic: &str,
        delivery: DeliveryFuture,
    ) -> Result<()> {
        match delivery.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(self.failed(producer, topic, e)),
            Err(_canceled) => Err(Error::Backend {
                backend: BACKEND,
                message: format!("sending to {topic}: the producer went away before the delivery report"),
                retryable: true,
                source: None,
            }),
        }
    }
}

/// An upper bound of the bytes librdkafka counts for `message` against
/// `message.max.bytes` (payload, key, headers, framing).
fn record_size(message: &Message) -> usize {
    const FRAMING: usize = 128;
    let headers: usize = message
        .headers
        .iter()
        .chain(message.system_headers.iter())
        .map(|(k, v)| k.len() + v.as_bytes().map_or(0, <[u8]>::len) + 10)
        .sum();
    message.payload.len() + message.key.as_ref().map_or(0, |k| k.len()) + headers + message.id.len() + FRAMING
}

/// A record for `message`: the key and the timestamp in the record's own fields.
fn record<'a>(topic: &'a str, message: &'a Message) -> FutureRecord<'a, [u8], [u8]> {
    let millis = message
        .timestamp
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let mut record = FutureRecord::<[u8], [u8]>::to(topic)
        .headers(record_headers(message))
        .timestamp(millis);
    // A tombstone (null payload) stays one in a dead-letter copy.
    if !message.tombstone {
        record = record.payload(&message.payload[..]);
    }
    if let Some(key) = &message.key {
        record = record.key(&key[..]);
    }
    record
}

/// The headers a record carries: the user's, the system ones and the id. The key
/// and the timestamp travel in the record's own fields, so every system header
/// is written as it is (a dead-letter copy keeps another producer's
/// `polybus-key`, `polybus-ts` and `polybus-id` headers byte-exact); the id is
/// added unless such a copy already carries its own `polybus-id` headers.
pub(crate) fn record_headers(message: &Message) -> OwnedHeaders {
    // Values are bytes or null, as Kafka carries them (a dead-letter copy keeps
    // another producer's non-UTF-8 and null values).
    // The id is written from the message's own string (no copy per record).
    let with_id = !message.system_headers.contains_key(wire::ID);
    let mut headers = OwnedHeaders::new_with_capacity(
        message.headers.len() + message.system_headers.len() + usize::from(with_id),
    );
    for (key, value) in message.headers.iter().chain(&message.system_headers) {
        headers = headers.insert(Header {
            key,
            value: value.as_bytes(),
        });
    }
    if with_id {
        headers = headers.insert(Header {
            key: wire::ID,
            value: Some(message.id.as_bytes()),
        });
    }
    headers
}

#[async_trait]
impl Producer for KafkaProducer {
    fn max_payload(&self) -> usize {
        self.max_payload
    }

    fn backend(&self) -> &'static str {
        crate::BACKEND
    }

    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        let _in_flight = self.gate.enter()?;
        let producer = self.for_record(&message)?;
        let deadline = Instant::now() + self.delivery_timeout;
        let delivery = self.enqueue(&producer, topic, &message, deadline).await?;
        self.delivered(&producer, topic, delivery).await
    }

    /// Sends the batch in order: each record is enqueued only after the one
    /// before it (waiting while librdkafka's queue is full), so records with
    /// the same key reach their partition in batch order. Resolves when every
    /// record has its delivery report; the first failure is returned (records
    /// enqueued before it are still delivered).
    async fn send_batch(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        let max = self.max_payload();
        for message in &messages {
            message.validate(topic, max)?;
        }
        let _in_flight = self.gate.enter()?;
        let producer = self.current();
        let deadline = Instant::now() + self.delivery_timeout;
        let mut deliveries = Vec::with_capacity(messages.len());
        let mut failure = None;
        for message in &messages {
            match self.enqueue(&producer, topic, message, deadline).await {
                Ok(delivery) => deliveries.push(delivery),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        for delivery in deliveries {
            if let Err(e) = self.delivered(&producer, topic, delivery).await {
                failure.get_or_insert(e);
            }
        }
        failure.map_or(Ok(()), Err)
    }

    async fn flush(&self) -> Result<()> {
        // Every accepted send resolves on its delivery report, so waiting for the
        // sends in flight is waiting for delivery.
        self.gate.wait_idle().await;
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.gate.close().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::message::Headers;

    use super::*;

    fn pairs(headers: &OwnedHeaders) -> Vec<(String, Option<Vec<u8>>)> {
        headers
            .iter()
            .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
            .collect()
    }

    #[test]
    fn the_id_follows_the_headers_once() {
        let m = Message::new("x").with_header("a", "1");
        assert_eq!(
            pairs(&record_headers(&m)),
            vec![
                ("a".to_owned(), Some(b"1".to_vec())),
                (wire::ID.to_owned(), Some(m.id.as_bytes().to_vec())),
            ]
        );
        // A dead-letter copy of another producer's record keeps that record's
        // own id header, and gets no second one.
        let mut copy = m.clone();
        copy.system_headers.insert(wire::ID, "theirs");
        let got = pairs(&record_headers(&copy));
        assert_eq!(got.iter().filter(|(k, _)| k == wire::ID).count(), 1, "{got:?}");
        assert!(
            got.contains(&(wire::ID.to_owned(), Some(b"theirs".to_vec()))),
            "{got:?}"
        );
    }
}
