//! The NATS harness for the conformance suite, in JetStream (`CORE = false`) or
//! core NATS (`CORE = true`) mode. The server comes from `POLYBUS_TEST_NATS_URL`.

#![allow(dead_code)]

pub(crate) mod foreign;

use std::time::Duration;

use polybus_conformance::{Foreign, ForeignRecord, Harness, Setup, timeout_multiplier};
use polybus_core::{Capabilities, Connection, Result, async_trait};
use polybus_nats::{JetStreamConsumer, Mode, NatsConfig, Storage};

/// The variable naming the NATS server the tests use.
pub(crate) const URL_ENV: &str = "POLYBUS_TEST_NATS_URL";

/// The variable naming a NATS server that requires TLS and a user and
/// password (`scripts/brokers.sh`'s `ensure_secure_nats`).
pub(crate) const SECURE_URL_ENV: &str = "POLYBUS_TEST_NATS_SECURE_URL";

/// `SECURE` selects the server from [`SECURE_URL_ENV`] instead of [`URL_ENV`].
pub(crate) struct NatsHarness<const CORE: bool, const SECURE: bool = false> {
    pub(crate) config: NatsConfig,
    url: String,
    admin: JetStreamConsumer,
    caps: Capabilities,
}

/// The test settings: a short AckWait (2 s × the multiplier) so crash
/// redelivery is quick, and streams in memory.
pub(crate) fn test_config(url: &str, core: bool) -> NatsConfig {
    let config = NatsConfig::from_url(url)
        .expect("a valid POLYBUS_TEST_NATS_URL")
        .ack_wait(Duration::from_secs_f64(2.0 * timeout_multiplier()))
        .storage(Storage::Memory)
        .mode(if core { Mode::Core } else { Mode::JetStream });
    let mut config = config.connect_timeout(Duration::from_secs_f64(5.0 * timeout_multiplier()));
    config.pull_expiry = Duration::from_secs(2);
    config
}

#[async_trait]
impl<const CORE: bool, const SECURE: bool> Harness for NatsHarness<CORE, SECURE> {
    async fn setup() -> Setup<Self> {
        let var = if SECURE { SECURE_URL_ENV } else { URL_ENV };
        let Ok(url) = std::env::var(var) else {
            return Setup::MissingBroker(format!("set {var} (scripts/brokers.sh)"));
        };
        let config = test_config(&url, CORE);
        let admin = JetStreamConsumer::connect(&config)
            .await
            .unwrap_or_else(|e| panic!("{var} is set but NATS cannot be reached: {e}"));
        let probe = polybus_nats::connect_with(config.clone())
            .await
            .unwrap_or_else(|e| panic!("connecting to {var}: {e}"));
        let caps = probe.consumer.capabilities();
        let _ = probe.close().await;
        Setup::Ready(NatsHarness {
            config,
            url,
            admin,
            caps,
        })
    }

    fn capabilities(&self) -> Capabilities {
        self.caps.clone()
    }

    async fn connect(&self) -> Result<Connection> {
        polybus_nats::connect_with(self.config.clone()).await
    }

    async fn drained(&self, topic: &str, group: &str) -> Result<bool> {
        if CORE {
            // Core NATS holds nothing for a group.
            return Ok(true);
        }
        self.admin.is_drained(topic, group).await
    }

    async fn connect_unreachable(&self, timeout: Duration) -> Result<Connection> {
        // A port nothing listens on: bind one, then let it go.
        let port = polybus_conformance::free_port()?;
        let config = NatsConfig::from_url(&format!("nats://127.0.0.1:{port}"))?
            .mode(self.config.mode)
            .connect_timeout(timeout);
        polybus_nats::connect_with(config).await
    }

    async fn publish_foreign(&self, topic: &str, record: &ForeignRecord) -> Result<Foreign> {
        if CORE && foreign::inexpressible(record).is_none() && !foreign::async_nats_parses(record) {
            // Written, but lost: core NATS cannot redeliver it (tests/poison.rs).
            return Ok(Foreign::Inexpressible(
                "core NATS: a message async-nats cannot parse costs the connection and is lost \
                 (at-most-once, nothing to fetch again); counted and logged, see tests/poison.rs"
                    .into(),
            ));
        }
        foreign::publish(&self.url, topic, record, !CORE).await
    }

    async fn cleanup(&self, topics: &[String]) {
        if CORE {
            return;
        }
        for topic in topics {
            if let Err(e) = self.admin.delete_topic(topic).await {
                eprintln!("cleanup of {topic}: {e}");
            }
        }
    }
}
