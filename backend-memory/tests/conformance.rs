//! The shared conformance suite, run against the in-memory backend.

use std::time::Duration;

use polybus_conformance::{Foreign, ForeignRecord, Harness, Setup, timeout_multiplier};
use polybus_core::{
    Bytes, Capabilities, Connection, HeaderValue, Message, Result, async_trait, dlq_headers, wire,
};
use polybus_memory::{MemoryBroker, MemoryConfig};

struct MemoryHarness {
    broker: MemoryBroker,
}

#[async_trait]
impl Harness for MemoryHarness {
    async fn setup() -> Setup<Self> {
        // A short ack deadline, so the runner's keep-alives are exercised.
        let deadline = Duration::from_secs_f64(1.0 * timeout_multiplier());
        Setup::Ready(MemoryHarness {
            broker: MemoryBroker::with_config(MemoryConfig::default().ack_deadline(deadline)),
        })
    }

    fn capabilities(&self) -> Capabilities {
        self.broker.capabilities()
    }

    async fn connect(&self) -> Result<Connection> {
        Ok(self.broker.connection())
    }

    async fn drained(&self, topic: &str, group: &str) -> Result<bool> {
        Ok(self.broker.is_settled(topic, group))
    }

    /// The in-memory broker has no wire: records go in through its raw-insert
    /// helpers, as the Kafka backend would decode them (a header name that is
    /// not UTF-8 makes an undecodable record with the raw headers labelled).
    async fn publish_foreign(&self, topic: &str, record: &ForeignRecord) -> Result<Foreign> {
        let mut message = Message::new(Bytes::from(record.payload.clone().unwrap_or_default()));
        message.tombstone = record.payload.is_none();
        message.key = record.key.clone().map(Bytes::from);
        let mut bad_names = 0;
        for (name, value) in &record.headers {
            match String::from_utf8(name.clone()) {
                Ok(name) => message
                    .headers
                    .append(name, value.clone().map_or(HeaderValue::Null, HeaderValue::from)),
                Err(_) => bad_names += 1,
            }
        }
        if bad_names > 0 {
            let label = wire::raw_headers_label(record.headers.iter().map(|(n, v)| (&n[..], v.as_deref())));
            message.system_headers.insert(dlq_headers::RAW_HEADERS, label);
            self.broker
                .insert_undecodable(topic, message, "a header name is not UTF-8");
        } else {
            self.broker.insert_raw(topic, message);
        }
        Ok(Foreign::Published)
    }
}

polybus_conformance::conformance_suite!(MemoryHarness);
