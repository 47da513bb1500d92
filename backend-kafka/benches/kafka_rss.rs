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

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use polybus_conformance::bench;
use polybus_core::{Delivery, HandlerResult, Order, StartFrom};
use polybus_kafka::KafkaConfig;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;

/// The resident set of this process, in KiB.
fn rss_kib() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

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
        conn.consumer.declare_topic(&topic).await.expect("topic");
        conn.consumer
            .declare_group(&topic, "slow", StartFrom::Earliest)
            .await
            .expect("group");
        bench::publish_seq(&conn, &topic, n, 1000).await;
        drop(conn);
        let mut consumer_config = KafkaConfig::from_url(&format!("kafka://{brokers}")).expect("broker list");
        consumer_config.buffer = buffer;
        consumer_config = extra_settings(consumer_config);
        let slow = polybus_kafka::connect_with(consumer_config).await.expect("connect");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = rss_kib();
        let handled = Arc::new(AtomicUsize::new(0));
        let handle = slow
            .runner()
            .topic(&topic)
            .group("slow")
            .order(Order::Unordered)
            .concurrency(4)
            .buffer(1000 - 4)
            .run({
                let handled = Arc::clone(&handled);
                move |_d: Delivery| {
                    let handled = Arc::clone(&handled);
                    async move {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        handled.fetch_add(1, Ordering::Relaxed);
                        HandlerResult::Ok(())
                    }
                }
            })
            .await
            .expect("run");
        let mut peak = before;
        for _ in 0..seconds * 10 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            peak = peak.max(rss_kib());
        }
        handle.shutdown(Duration::from_secs(10)).await;
        println!(
            "Kafka slow consumer, {partitions} partition(s), backlog {n} records of 100 bytes, buffer {buffer}: \
             RSS before subscribing {:.1} MiB, peak while consuming {:.1} MiB (+{:.1} MiB), handled {} in {seconds} s",
            before as f64 / 1024.0,
            peak as f64 / 1024.0,
            (peak - before) as f64 / 1024.0,
            handled.load(Ordering::Relaxed)
        );
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", brokers.as_str())
            .create()
            .expect("admin");
        let dlq = format!("{topic}.dlq");
        let _ = admin.delete_topics(&[&topic, &dlq], &AdminOptions::new()).await;
    });
}
