//! The memory a slow polybus consumer takes with a large backlog on NATS
//! JetStream: a file stream is filled with `POLYBUS_BENCH_MESSAGES` messages
//! of 100 bytes (default 1,000,000), then a runner with a slow handler (1 ms
//! per message, concurrency 4, bound 1,000, so at most 1,000 pulled and not
//! yet acked) consumes a durable group for `POLYBUS_BENCH_SECONDS` (default
//! 20) while the process's resident set is sampled every 100 ms. Prints the
//! RSS before subscribing and the peak while consuming. The streams are
//! deleted afterwards.
//!
//! ```text
//! POLYBUS_BENCH_NATS_URL=nats://127.0.0.1:4222 cargo bench -p polybus-nats --bench jetstream_rss
//! ```

use async_nats::jetstream;
use polybus_conformance::bench;
use polybus_nats::{NatsConfig, Storage, stream_name};

fn main() {
    let url = std::env::var("POLYBUS_BENCH_NATS_URL")
        .or_else(|_| std::env::var("POLYBUS_TEST_NATS_URL"))
        .unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let n = bench::env_or("POLYBUS_BENCH_MESSAGES", 1_000_000);
    let seconds = bench::env_or("POLYBUS_BENCH_SECONDS", 20);
    let runtime = bench::runtime();
    runtime.block_on(async move {
        let config = NatsConfig::from_url(&url).expect("url").storage(Storage::File);
        let conn = polybus_nats::connect_with(config.clone()).await.expect("connect");
        let topic = format!("bench.rss.{}", std::process::id());
        bench::backlog_rss(
            "JetStream slow consumer, file stream, bound 1,000",
            conn,
            || async { polybus_nats::connect_with(config).await.expect("connect") },
            &topic,
            n,
            seconds,
        )
        .await;
        let client = async_nats::connect(url.as_str())
            .await
            .expect("NATS is reachable");
        let js = jetstream::new(client);
        for name in [topic.clone(), format!("{topic}.dlq")] {
            let _ = js.delete_stream(stream_name(&name)).await;
        }
    });
}
