//! The shared conformance suite against a live RabbitMQ. Skips loudly without
//! `POLYBUS_TEST_AMQP_URL` (e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`).

use std::time::Duration;

use polybus_conformance::{Foreign, ForeignRecord, Harness, Setup, timeout_multiplier};
use polybus_core::{Capabilities, Connection, Consumer, Result, async_trait};
use polybus_rabbitmq::{RabbitConfig, RabbitConsumer};

#[path = "support/amqp_raw.rs"]
mod amqp_raw;

const URL_ENV: &str = "POLYBUS_TEST_AMQP_URL";

struct RabbitHarness {
    config: RabbitConfig,
    admin: RabbitConsumer,
    foreign: amqp_raw::Target,
}

/// A foreign record as the AMQP message a native client would write, or why
/// AMQP cannot carry it.
fn amqp_message(record: &ForeignRecord) -> std::result::Result<amqp_raw::RawMessage, String> {
    let Some(payload) = &record.payload else {
        return Err("AMQP has no null body: a tombstone cannot be written".into());
    };
    let mut message = amqp_raw::RawMessage::new(payload.clone());
    for (i, (name, value)) in record.headers.iter().enumerate() {
        if record.headers[..i].iter().any(|(n, _)| n == name) {
            return Err(format!(
                "an AMQP headers table cannot hold a name twice ({})",
                String::from_utf8_lossy(name)
            ));
        }
        if std::str::from_utf8(name).is_err() {
            // RabbitMQ carries it, but lapin cannot parse the frame, so the copy
            // cannot be read back through polybus as this case expects: the
            // broker dead-letters the raw message instead (tests/poison.rs).
            return Err(
                "a header name that is not UTF-8 drops lapin's connection; RabbitMQ \
                 dead-letters it broker-side (quorum queues) or the subscription fails \
                 loudly (classic): tests/poison.rs covers it"
                    .into(),
            );
        }
        let value = match value {
            Some(v) => amqp_raw::Value::LongStr(v.clone()),
            None => amqp_raw::Value::Void,
        };
        message = message.header(name.clone(), value);
    }
    if let Some(key) = &record.key {
        // Keys travel as the `polybus-key` long string, as polybus writes them:
        // any bytes.
        message = message.header(polybus_core::wire::KEY, amqp_raw::Value::LongStr(key.clone()));
    }
    Ok(message)
}

/// The group queues of `topic` that exist on the broker, found with `rabbitmqctl`
/// (AMQP cannot list queues). Empty when `rabbitmqctl` is not available.
fn queues_of(topic: &str) -> Vec<String> {
    let Ok(out) = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "name", "-q", "--no-table-headers"])
        .output()
    else {
        return Vec::new();
    };
    let prefix = format!("{topic}{}", polybus_rabbitmq::SEPARATOR);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|q| q.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

#[async_trait]
impl Harness for RabbitHarness {
    async fn setup() -> Setup<Self> {
        let Ok(url) = std::env::var(URL_ENV) else {
            return Setup::MissingBroker(format!("set {URL_ENV}=amqp://guest:guest@127.0.0.1:5672/%2f"));
        };
        let config = RabbitConfig::new(&url)
            .expect("a valid POLYBUS_TEST_AMQP_URL")
            .connect_timeout(Duration::from_secs_f64(5.0 * timeout_multiplier()));
        let admin = RabbitConsumer::connect(&config)
            .await
            .unwrap_or_else(|e| panic!("{URL_ENV} is set but RabbitMQ cannot be reached: {e}"));
        let foreign = amqp_raw::Target::from_url(&url);
        Setup::Ready(RabbitHarness {
            config,
            admin,
            foreign,
        })
    }

    fn capabilities(&self) -> Capabilities {
        self.admin.capabilities()
    }

    async fn connect(&self) -> Result<Connection> {
        polybus_rabbitmq::connect_with(self.config.clone()).await
    }

    async fn drained(&self, topic: &str, group: &str) -> Result<bool> {
        Ok(self.admin.ready_messages(topic, group).await? == 0)
    }

    async fn connect_unreachable(&self, timeout: Duration) -> Result<Connection> {
        let port = polybus_conformance::free_port()?;
        let config =
            RabbitConfig::new(&format!("amqp://guest:guest@127.0.0.1:{port}/%2f"))?.connect_timeout(timeout);
        polybus_rabbitmq::connect_with(config).await
    }

    async fn publish_foreign(&self, topic: &str, record: &ForeignRecord) -> Result<Foreign> {
        let message = match amqp_message(record) {
            Ok(m) => m,
            Err(why) => return Ok(Foreign::Inexpressible(why)),
        };
        amqp_raw::publish(&self.foreign, topic, &[message])
            .await
            .map_err(|e| polybus_core::Error::InvalidConfig(format!("foreign AMQP publisher: {e}")))?;
        Ok(Foreign::Published)
    }

    async fn cleanup(&self, topics: &[String]) {
        for topic in topics {
            let queues = queues_of(topic);
            if let Err(e) = self.admin.delete_topic(topic, &queues).await {
                eprintln!("cleanup of {topic}: {e}");
            }
            let dlq = polybus_core::names::dead_letter_topic(topic);
            let _ = self.admin.delete_topic(&dlq, &queues_of(&dlq)).await;
        }
    }
}

polybus_conformance::conformance_suite!(RabbitHarness);
