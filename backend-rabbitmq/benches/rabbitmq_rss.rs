//! The memory a slow polybus consumer takes with a large backlog on RabbitMQ: a
//! classic durable queue (a topic's group queue) is filled with
//! `POLYBUS_BENCH_MESSAGES` messages of 100 bytes (default 1,000,000), then a
//! runner with a slow handler (1 ms per message, concurrency 4, bound 1,000,
//! so a prefetch of 1,000) consumes for `POLYBUS_BENCH_SECONDS` (default 20)
//! while the process's resident set is sampled every 100 ms. Prints the RSS
//! before subscribing and the peak while consuming. The queues are deleted
//! afterwards.
//!
//! ```text
//! POLYBUS_BENCH_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo bench -p polybus-rabbitmq --bench rabbitmq_rss
//! ```

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection as AmqpConnection, ConnectionProperties};
use polybus_conformance::bench;
use polybus_rabbitmq::{RabbitConfig, dead_letter_queue, group_queue};

fn main() {
    let url = std::env::var("POLYBUS_BENCH_AMQP_URL")
        .or_else(|_| std::env::var("POLYBUS_TEST_AMQP_URL"))
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let n = bench::env_or("POLYBUS_BENCH_MESSAGES", 1_000_000);
    let seconds = bench::env_or("POLYBUS_BENCH_SECONDS", 20);
    let runtime = bench::runtime();
    runtime.block_on(async move {
        let config = RabbitConfig::new(&url).expect("url");
        let conn = polybus_rabbitmq::connect_with(config.clone())
            .await
            .expect("connect");
        let topic = format!("bench-rss-{}", std::process::id());
        bench::backlog_rss(
            "RabbitMQ slow consumer, classic durable queue, prefetch 1,000",
            conn,
            || async { polybus_rabbitmq::connect_with(config).await.expect("connect") },
            &topic,
            n,
            seconds,
        )
        .await;
        let raw = AmqpConnection::connect(&url, ConnectionProperties::default())
            .await
            .expect("RabbitMQ is reachable");
        let channel = raw.create_channel().await.expect("channel");
        for queue in [group_queue(&topic, "slow"), dead_letter_queue(&topic)] {
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for exchange in [topic.clone(), format!("{topic}.dlq")] {
            let _ = channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
    });
}
