//! The Kafka harness for the conformance suite: librdkafka's in-process mock
//! cluster (one per case, always available) or a real broker from
//! `POLYBUS_TEST_KAFKA_BROKERS`.

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use polybus_conformance::{Foreign, ForeignRecord, Harness, Setup, timeout_multiplier};
use polybus_core::{
    Capabilities, Connection, Consumer, Result, StartFrom, SubscribeOptions, Subscription, async_trait,
};
use polybus_kafka::{KafkaConfig, KafkaConsumer};

pub mod foreign;
pub mod mock;

/// The variable naming the real Kafka brokers the tests use.
pub const BROKERS_ENV: &str = "POLYBUS_TEST_KAFKA_BROKERS";

/// Set to 1 when the Kafka broker under test keeps a time index (Apache
/// Kafka does; tansu and the mock cluster do not), to run `replay_from_timestamp`.
pub const TIME_INDEX_ENV: &str = "POLYBUS_TEST_KAFKA_TIME_INDEX";

/// The harness for a test outside the suite: the mock cluster (`REAL = false`,
/// always there) or the real broker, or `None` after a loud `SKIP` line when no
/// broker is configured (a failure under `POLYBUS_TEST_REQUIRE_BROKERS=1`).
pub async fn harness<const REAL: bool>(test: &str) -> Option<KafkaHarness<REAL>> {
    match KafkaHarness::<REAL>::setup().await {
        Setup::Ready(h) => Some(h),
        Setup::MissingBroker(reason) => {
            assert!(
                !polybus_conformance::brokers_required(),
                "{test}: POLYBUS_TEST_REQUIRE_BROKERS=1 but {reason}"
            );
            polybus_conformance::loud(&format!("SKIP {test} (real broker): {reason}"));
            None
        }
    }
}

/// Test settings: short session timeout and quick commits, 4 partitions.
pub fn test_config(brokers: &str) -> KafkaConfig {
    let m = timeout_multiplier();
    let mut config = KafkaConfig::from_url(&format!("kafka://{brokers}"))
        .expect("a valid broker list")
        .partitions(4)
        .session_timeout(Duration::from_secs_f64(6.0 * m))
        .connect_timeout(Duration::from_secs_f64(5.0 * m));
    config.commit_interval = Duration::from_millis(200);
    // As short as librdkafka allows (the session timeout), so the keep-alive
    // case holds handlers past it.
    config.max_poll_interval = config.session_timeout;
    config.revoke_timeout = Duration::from_secs_f64(5.0 * m);
    config
}

/// Where the brokers come from.
pub enum Cluster {
    /// A mock cluster of this case's own.
    Mock(Arc<mock::MockKafka>),
    /// A real broker.
    Real,
}

pub struct KafkaHarness<const REAL: bool> {
    pub config: KafkaConfig,
    pub cluster: Cluster,
    admin: KafkaConsumer,
    caps: Capabilities,
}

impl<const REAL: bool> KafkaHarness<REAL> {
    /// A harness on its own mock cluster, or on the real brokers.
    pub async fn start() -> Setup<Self> {
        let (cluster, brokers) = if REAL {
            let Ok(brokers) = std::env::var(BROKERS_ENV) else {
                return Setup::MissingBroker(format!("set {BROKERS_ENV}=127.0.0.1:9092"));
            };
            (Cluster::Real, brokers)
        } else {
            let mock = Arc::new(mock::MockKafka::new().expect("a librdkafka mock cluster"));
            let brokers = mock.bootstrap().to_owned();
            (Cluster::Mock(mock), brokers)
        };
        let mut config = test_config(&brokers);
        if REAL {
            // tansu (what CI runs) cannot fetch from an offset inside a record
            // batch: it returns nothing of that batch, so a consumer resuming
            // from a committed offset in the middle of one skips its rest. It
            // also reports the last batch's base offset + 1 as the high
            // watermark. With one record per batch both are exact. Kafka itself
            // needs neither; this only makes produce slower.
            config = config.set("batch.num.messages", "1");
        }
        let admin = KafkaConsumer::connect(config.clone())
            .await
            .unwrap_or_else(|e| panic!("Kafka at {brokers} cannot be reached: {e}"));
        let mut caps = admin.capabilities();
        let time_index = std::env::var(TIME_INDEX_ENV).is_ok_and(|v| v == "1");
        if !REAL || !time_index {
            // Neither librdkafka's mock cluster nor tansu (CI's broker) keeps a
            // time index: tansu answers ListOffsets by time with offset 0 for any
            // time. The replay-from-time case runs against a broker that has one
            // (Apache Kafka) when POLYBUS_TEST_KAFKA_TIME_INDEX=1; elsewhere it is
            // a visible SKIP.
            caps.replay_from_time = false;
        }
        Setup::Ready(KafkaHarness {
            config,
            cluster,
            admin,
            caps,
        })
    }

    /// A fresh connection with `config`.
    pub async fn connect_with(&self, config: KafkaConfig) -> Result<Connection> {
        let conn = polybus_kafka::connect_with(config).await?;
        Ok(match &self.cluster {
            Cluster::Real => conn,
            Cluster::Mock(mock) => Connection {
                producer: conn.producer,
                consumer: Arc::new(MockTopics {
                    inner: conn.consumer,
                    mock: Arc::clone(mock),
                }),
            },
        })
    }

    /// The consumer that reads offsets and watermarks.
    pub fn admin(&self) -> &KafkaConsumer {
        &self.admin
    }

    /// The mock cluster, if this harness runs on one.
    pub fn mock(&self) -> Option<&mock::MockKafka> {
        match &self.cluster {
            Cluster::Mock(mock) => Some(mock),
            Cluster::Real => None,
        }
    }

    /// Plain librdkafka settings for these brokers (for clients that act
    /// outside polybus in a test: other producers, admin tools).
    pub fn raw_config(&self) -> rdkafka::ClientConfig {
        let mut config = rdkafka::ClientConfig::new();
        config
            .set("bootstrap.servers", self.config.brokers.join(","))
            .set("log_level", "3");
        if REAL {
            config.set("batch.num.messages", "1");
        }
        config
    }
}

/// On the mock cluster, which has no CreateTopics, topics are created through
/// the mock's own API; everything else goes to the real consumer.
struct MockTopics {
    inner: Arc<dyn Consumer>,
    mock: Arc<mock::MockKafka>,
}

impl MockTopics {
    fn create(&self, topic: &str) -> Result<()> {
        self.mock.create_topic(topic, 4)?;
        self.mock
            .create_topic(&polybus_core::names::dead_letter_topic(topic), 4)
    }
}

#[async_trait]
impl Consumer for MockTopics {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn declare_topic_unchecked(&self, topic: &str) -> Result<()> {
        self.create(topic)
    }

    async fn declare_group_unchecked(&self, topic: &str, group: &str, start: StartFrom) -> Result<()> {
        self.create(topic)?;
        self.inner.declare_group_unchecked(topic, group, start).await
    }

    async fn subscribe_unchecked(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        for topic in &options.topics {
            self.create(topic)?;
        }
        self.inner.subscribe_unchecked(options).await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }

    async fn lag_unchecked(&self, topic: &str, group: &str) -> Result<u64> {
        self.inner.lag_unchecked(topic, group).await
    }

    async fn reposition_group_unchecked(&self, topic: &str, group: &str, start: StartFrom) -> Result<()> {
        self.inner.reposition_group_unchecked(topic, group, start).await
    }
}

#[async_trait]
impl<const REAL: bool> Harness for KafkaHarness<REAL> {
    async fn setup() -> Setup<Self> {
        Self::start().await
    }

    fn capabilities(&self) -> Capabilities {
        self.caps.clone()
    }

    async fn connect(&self) -> Result<Connection> {
        self.connect_with(self.config.clone()).await
    }

    async fn drained(&self, topic: &str, group: &str) -> Result<bool> {
        Ok(self.admin.lag(topic, group).await? == 0)
    }

    async fn publish_foreign(&self, topic: &str, record: &ForeignRecord) -> Result<Foreign> {
        let brokers = self.config.brokers.join(",");
        let (topic, record) = (topic.to_owned(), record.clone());
        tokio::task::spawn_blocking(move || foreign::produce(&brokers, &topic, &record))
            .await
            .map_err(|e| polybus_core::Error::InvalidConfig(format!("foreign producer task: {e}")))??;
        Ok(Foreign::Published)
    }

    async fn connect_unreachable(&self, timeout: Duration) -> Result<Connection> {
        let port = polybus_conformance::free_port()?;
        let config = KafkaConfig::from_url(&format!("kafka://127.0.0.1:{port}"))?.connect_timeout(timeout);
        polybus_kafka::connect_with(config).await
    }
}
