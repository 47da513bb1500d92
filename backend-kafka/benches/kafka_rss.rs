//! The memory a slow polybus consumer takes with a large backlog: a topic is
//! filled with `POLYBUS_BENCH_MESSAGES` records of 100 bytes (default
//! 1,000,000; `POLYBUS_BENCH_PARTITIONS` partitions, default 4), then a runner
//! with a slow handler (1 ms per message, concurrency 4, bound 1,000) consumes
//! for `POLYBUS_BENCH_SECONDS` (default 20) while the process's resident set
//! is sampled every 100 ms. Prints the RSS before subscribing and the peak
//! while consuming, for polybus's default `KafkaConfig::buffer` (or
//! `POLYBUS_BENCH_KAFKA_BUFFER`).
//!
//! ```text
//! POLYBUS_BENCH_KAFKA_BROKERS=127.0.0.1:9092 cargo bench -p polybus-kafka --bench kafka_rss
//! ```

use polybus_conformance::bench;
use polybus_kafka::KafkaConfig;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;

/// `config` with the librdkafka settings of `POLYBUS_BENCH_KAFKA_SET`
/// (`key=value,key=value`).
fn extra_settings(mut config: KafkaConfig) -> KafkaConfig {
    for pair in std::env::var("POLYBUS_BENCH_KAFKA_SET")
        .unwrap_or_default()
        .split(',')
    {
        if let Some((key, value)) = pair.split_once('=') {
            config = config.set(key.trim(), value.trim());
        }
    }
    config
}

fn main() {
    let brokers = std::env::var("POLYBUS_BENCH_KAFKA_BROKERS")
        .or_else(|_| std::env::var("POLYBUS_TEST_KAFKA_BROKERS"))
        .unwrap_or_else(|_| "127.0.0.1:9092".into());
    let n = bench::env_or("POLYBUS_BENCH_MESSAGES", 1_000_000);
    let partitions = bench::env_or("POLYBUS_BENCH_PARTITIONS", 4);
    let seconds = bench::env_or("POLYBUS_BENCH_SECONDS", 20);
    let runtime = bench::runtime();
    runtime.block_on(async move {
        let mut config = KafkaConfig::from_url(&format!("kafka://{brokers}"))
            .expect("broker list")
            .partitions(partitions as i32);
        if let Some(buffer) = std::env::var("POLYBUS_BENCH_KAFKA_BUFFER")
            .ok()
            .and_then(|b| b.parse().ok())
        {
            config.buffer = buffer;
        }
        let buffer = config.buffer;
        let conn = polybus_kafka::connect_with(config).await.expect("connect");
        let topic = format!("bench-rss-{}", std::process::id());
        let mut consumer_config = KafkaConfig::from_url(&format!("kafka://{brokers}")).expect("broker list");
        consumer_config.buffer = buffer;
        consumer_config = extra_settings(consumer_config);
        bench::backlog_rss(
            &format!("Kafka slow consumer, {partitions} partition(s), buffer {buffer}"),
            conn,
            || async {
                polybus_kafka::connect_with(consumer_config)
                    .await
                    .expect("connect")
            },
            &topic,
            n,
            seconds,
        )
        .await;
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", brokers.as_str())
            .create()
            .expect("admin");
        let dlq = format!("{topic}.dlq");
        let _ = admin.delete_topics(&[&topic, &dlq], &AdminOptions::new()).await;
    });
}
