//! The producer: `acks=all`, idempotent, `send` resolves on the delivery report.

use std::time::{Duration, UNIX_EPOCH};

use polybus_core::{Message, Producer, Result, SendGate, async_trait, wire};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::{KafkaConfig, map_error, millis};

/// Sends to Kafka. Built by [`connect`](crate::connect).
pub struct KafkaProducer {
    inner: FutureProducer,
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

impl KafkaProducer {
    /// A producer with `acks=all` and idempotence on.
    pub fn new(config: &KafkaConfig) -> Result<Self> {
        let inner: FutureProducer = config
            .client_config()
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", millis(config.delivery_timeout))
            .set("request.timeout.ms", millis(config.request_timeout))
            .create()
            .map_err(|e| map_error("creating the Kafka producer", e))?;
        Ok(KafkaProducer {
            inner,
            gate: SendGate::new("producer"),
            max_payload: config.max_payload(),
            delivery_timeout: config.delivery_timeout,
        })
    }
}

/// The headers a record carries: the user's, the system ones and the id. The key
/// and the timestamp travel in the record's own fields.
pub(crate) fn record_headers(message: &Message) -> OwnedHeaders {
    let pairs = wire::encode(message).filter(|(k, _)| *k != wire::KEY && *k != wire::TIMESTAMP);
    let mut headers =
        OwnedHeaders::new_with_capacity(message.headers.len() + message.system_headers.len() + 1);
    for (key, value) in pairs {
        headers = headers.insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    }
    headers
}

#[async_trait]
impl Producer for KafkaProducer {
    fn max_payload(&self) -> usize {
        self.max_payload
    }

    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        let _in_flight = self.gate.enter()?;
        let millis = message
            .timestamp
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let mut record = FutureRecord::<[u8], [u8]>::to(topic)
            .payload(&message.payload[..])
            .headers(record_headers(&message))
            .timestamp(millis);
        if let Some(key) = &message.key {
            record = record.key(key.as_bytes());
        }
        // Waits (up to the delivery timeout) while librdkafka's queue is full.
        match self.inner.send(record, self.delivery_timeout).await {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(map_error(&format!("sending to {topic}"), e)),
        }
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
