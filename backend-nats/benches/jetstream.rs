//! JetStream throughput of polybus against raw async-nats, same server, same run.
//!
//! * **publish**: `N` messages of 100 bytes, 256 sends in flight, each resolving
//!   on its PubAck, every message with a `Nats-Msg-Id`.
//! * **consume + ack**: a durable pull consumer (explicit acks) drains a stream
//!   pre-filled with `N` messages; raw async-nats acks each message from its
//!   `messages()` stream, polybus runs a no-op handler in the runner, which acks.
//!
//! Streams are in memory (the same for both), created fresh for every run and
//! deleted afterwards. Raw and polybus alternate within each run.
//!
//! Every run also measures polybus with its metrics and tracing on (a metrics
//! recorder and an OpenTelemetry SDK tracer installed, `bench::observe`):
//! publishing inside a trace, then draining that stream; the report gives the
//! ratio to plain polybus (observed first in odd runs, last in even ones).
//!
//! ```text
//! POLYBUS_BENCH_NATS_URL=nats://127.0.0.1:4222 cargo bench -p polybus-nats --bench jetstream
//! POLYBUS_BENCH_MESSAGES=200000 POLYBUS_BENCH_RUNS=7 cargo bench -p polybus-nats --bench jetstream
//! ```

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;
use polybus_conformance::bench;
use polybus_core::{Bytes, StartFrom};
use polybus_nats::{NatsConfig, Storage, stream_name};

const IN_FLIGHT: usize = 256;
const PREFETCH: usize = 256;

fn stream_config(topic: &str) -> stream::Config {
    stream::Config {
        name: stream_name(topic),
        subjects: vec![topic.to_owned()],
        storage: stream::StorageType::Memory,
        ..Default::default()
    }
}

async fn raw_publish(js: &jetstream::Context, topic: &str, n: usize, payload: &Bytes) -> Duration {
    let began = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let publish = jetstream::message::PublishMessage::build()
                .payload(payload.clone())
                .message_id(format!("raw-{topic}-{i}"));
            async move {
                js.send_publish(topic.to_owned(), publish)
                    .await
                    .expect("publish")
                    .await
                    .expect("puback")
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .for_each(|_| async {})
        .await;
    began.elapsed()
}

async fn raw_consume(js: &jetstream::Context, topic: &str, n: usize) -> Duration {
    let stream = js.get_stream(stream_name(topic)).await.expect("stream");
    let consumer = stream
        .get_or_create_consumer(
            "raw",
            pull::Config {
                durable_name: Some("raw".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                max_ack_pending: 1024,
                ..Default::default()
            },
        )
        .await
        .expect("consumer");
    let began = Instant::now();
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(PREFETCH)
        .messages()
        .await
        .expect("messages");
    let mut seen = 0;
    while seen < n {
        let message = messages.next().await.expect("open").expect("message");
        message.ack().await.expect("ack");
        seen += 1;
    }
    let took = began.elapsed();
    js.get_stream(stream_name(topic))
        .await
        .expect("stream")
        .delete_consumer("raw")
        .await
        .expect("delete consumer");
    took
}

async fn polybus_consume(conn: &polybus_core::Connection, topic: &str, n: usize) -> Duration {
    conn.consumer
        .declare_group(topic, "polybus", StartFrom::Earliest)
        .await
        .expect("group");
    bench::consume(conn, topic, "polybus", n, 64, PREFETCH).await
}

/// Publishes `n` messages to a new stream and drains it with a runner, both
/// with polybus's metrics and tracing on (`bench::observe`).
async fn observed(
    js: &jetstream::Context,
    conn: &polybus_core::Connection,
    topic: &str,
    n: usize,
    payload: &Bytes,
) -> [Duration; 2] {
    js.create_stream(stream_config(topic)).await.expect("stream");
    bench::observe(true);
    let sent = bench::publish(conn, topic, n, payload, IN_FLIGHT).await;
    let consumed = polybus_consume(conn, topic, n).await;
    bench::observe(false);
    let _ = js.delete_stream(stream_name(topic)).await;
    [sent, consumed]
}

fn main() {
    let url = std::env::var("POLYBUS_BENCH_NATS_URL")
        .or_else(|_| std::env::var("POLYBUS_TEST_NATS_URL"))
        .unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let n = bench::env_or("POLYBUS_BENCH_MESSAGES", 100_000);
    let runs = bench::env_or("POLYBUS_BENCH_RUNS", 5);
    let runtime = bench::runtime();
    runtime.block_on(async move {
        let client = async_nats::connect(url.as_str())
            .await
            .expect("NATS is reachable");
        let js = jetstream::new(client);
        let config = NatsConfig::from_url(&url).expect("url").storage(Storage::Memory);
        let conn = polybus_nats::connect_with(config).await.expect("connect");
        let payload = Bytes::from(vec![b'x'; 100]);
        let mut rates = bench::Rates::new(n);
        println!("JetStream, {n} messages of 100 bytes per measurement, {runs} runs, {url}");
        for run in 0..runs {
            let raw_topic = format!("bench.raw{run}.{}", std::process::id());
            let pb_topic = format!("bench.pb{run}.{}", std::process::id());
            let obs_topic = format!("bench.obs{run}.{}", std::process::id());
            // Observed first in odd runs, last in even ones.
            let early = if run % 2 == 1 && bench::observation_available() {
                Some(observed(&js, &conn, &obs_topic, n, &payload).await)
            } else {
                None
            };
            for t in [&raw_topic, &pb_topic] {
                js.create_stream(stream_config(t)).await.expect("stream");
            }
            // Alternate which goes first, so drift in the machine hits both.
            let (raw_pub, pb_pub) = if run % 2 == 0 {
                let r = raw_publish(&js, &raw_topic, n, &payload).await;
                (r, bench::publish(&conn, &pb_topic, n, &payload, IN_FLIGHT).await)
            } else {
                let p = bench::publish(&conn, &pb_topic, n, &payload, IN_FLIGHT).await;
                (raw_publish(&js, &raw_topic, n, &payload).await, p)
            };
            // Both consumers drain a stream of n messages (each drains the other's
            // stream, so the data is the same for both sides within a run).
            let (raw_con, pb_con) = if run % 2 == 0 {
                let r = raw_consume(&js, &pb_topic, n).await;
                (r, polybus_consume(&conn, &raw_topic, n).await)
            } else {
                let p = polybus_consume(&conn, &raw_topic, n).await;
                (raw_consume(&js, &pb_topic, n).await, p)
            };
            rates.record(run, [raw_pub, pb_pub, raw_con, pb_con]);
            for t in [&raw_topic, &pb_topic] {
                let _ = js.delete_stream(stream_name(t)).await;
            }
            if let Some(observed) = early {
                rates.record_observed(run, observed);
            } else if bench::observation_available() {
                let observed = observed(&js, &conn, &obs_topic, n, &payload).await;
                rates.record_observed(run, observed);
            }
        }
        rates.report();
    });
}
