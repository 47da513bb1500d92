//! Kafka throughput of polybus against raw rdkafka, same broker, same run, same
//! librdkafka settings.
//!
//! * **produce**: `N` records of 100 bytes, `IN_FLIGHT` sends in flight, each
//!   resolving on its delivery report; both producers `acks=all` with
//!   idempotence. polybus adds its `polybus-id` header.
//! * **consume + ack**: a new consumer group drains a topic pre-filled with `N`
//!   records (timed from subscribing, so both include the group join). Raw
//!   rdkafka is the usual at-least-once loop: a `StreamConsumer` that stores
//!   each record's offset after handling it, auto-committing stored offsets;
//!   polybus runs a no-op handler in the runner, which acks, and commits the
//!   settled offsets itself.
//!
//! Topics have 4 partitions and are new for every measurement. Raw and polybus
//! alternate which goes first.
//!
//! Every run also measures polybus with its metrics and tracing on (a metrics
//! recorder and an OpenTelemetry SDK tracer installed, `bench::observe`):
//! publishing inside a trace, then draining that topic; the report gives the
//! ratio to plain polybus (observed first in odd runs, last in even ones).
//!
//! ```text
//! POLYBUS_BENCH_KAFKA_BROKERS=127.0.0.1:9092 cargo bench -p polybus-kafka --bench kafka
//! POLYBUS_BENCH_MESSAGES=1000000 POLYBUS_BENCH_RUNS=5 cargo bench -p polybus-kafka --bench kafka
//! ```

use std::time::{Duration, Instant};

use futures::StreamExt;
use polybus_conformance::bench;
use polybus_core::{Bytes, Connection, StartFrom};
use polybus_kafka::KafkaConfig;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};

const IN_FLIGHT: usize = 1024;
const CONCURRENCY: usize = 64;
const BOUND: usize = 1024;

fn raw_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers).set("log_level", "3");
    c
}

async fn raw_produce(producer: &FutureProducer, topic: &str, n: usize, payload: &Bytes) -> Duration {
    let began = Instant::now();
    futures::stream::iter(0..n)
        .map(|_| async move {
            let record = FutureRecord::<(), [u8]>::to(topic).payload(&payload[..]);
            producer
                .send(record, Duration::from_secs(30))
                .await
                .map_err(|(e, _)| e)
                .expect("delivery")
        })
        .buffer_unordered(IN_FLIGHT)
        .for_each(|_| async {})
        .await;
    began.elapsed()
}

async fn raw_consume(brokers: &str, topic: &str, group: &str, n: usize) -> Duration {
    let began = Instant::now();
    let consumer: StreamConsumer = raw_config(brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("raw consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut seen = 0;
    while seen < n {
        let message = consumer.recv().await.expect("message");
        consumer
            .store_offset_from_message(&message)
            .expect("store offset");
        seen += 1;
    }
    let took = began.elapsed();
    consumer
        .commit_consumer_state(rdkafka::consumer::CommitMode::Sync)
        .expect("commit");
    took
}

async fn polybus_consume(conn: &Connection, topic: &str, group: &str, n: usize) -> Duration {
    conn.consumer
        .declare_group(topic, group, StartFrom::Earliest)
        .await
        .expect("group");
    bench::consume(conn, topic, group, n, CONCURRENCY, BOUND).await
}

/// Publishes `n` records to a new topic and drains it with a new group, both
/// with polybus's metrics and tracing on (`bench::observe`).
async fn observed(conn: &Connection, topic: &str, group: &str, n: usize, payload: &Bytes) -> [Duration; 2] {
    conn.consumer.declare_topic(topic).await.expect("topic");
    bench::observe(true);
    let sent = bench::publish(conn, topic, n, payload, IN_FLIGHT).await;
    let consumed = polybus_consume(conn, topic, group, n).await;
    bench::observe(false);
    [sent, consumed]
}

fn main() {
    let brokers = std::env::var("POLYBUS_BENCH_KAFKA_BROKERS")
        .or_else(|_| std::env::var("POLYBUS_TEST_KAFKA_BROKERS"))
        .unwrap_or_else(|_| "127.0.0.1:9092".into());
    let n = bench::env_or("POLYBUS_BENCH_MESSAGES", 1_000_000);
    let runs = bench::env_or("POLYBUS_BENCH_RUNS", 5);
    let runtime = bench::runtime();
    runtime.block_on(async move {
        let config = KafkaConfig::from_url(&format!("kafka://{brokers}"))
            .expect("broker list")
            .partitions(4);
        let conn = polybus_kafka::connect_with(config).await.expect("connect");
        let raw: FutureProducer = raw_config(&brokers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "30000")
            .create()
            .expect("raw producer");
        let payload = Bytes::from(vec![b'x'; 100]);
        let mut rates = bench::Rates::new(n);
        let id = std::process::id();
        println!("Kafka at {brokers}, {n} records of 100 bytes per measurement, {runs} runs");
        for run in 0..runs {
            let raw_topic = format!("bench-raw-{id}-{run}");
            let pb_topic = format!("bench-pb-{id}-{run}");
            let (obs_topic, obs_group) = (format!("bench-obs-{id}-{run}"), format!("obs-{id}-{run}"));
            // Observed first in odd runs, last in even ones.
            let early = if run % 2 == 1 && bench::observation_available() {
                Some(observed(&conn, &obs_topic, &obs_group, n, &payload).await)
            } else {
                None
            };
            for t in [&raw_topic, &pb_topic] {
                conn.consumer.declare_topic(t).await.expect("topic");
            }
            let (raw_pub, pb_pub) = if run % 2 == 0 {
                let r = raw_produce(&raw, &raw_topic, n, &payload).await;
                (r, bench::publish(&conn, &pb_topic, n, &payload, IN_FLIGHT).await)
            } else {
                let p = bench::publish(&conn, &pb_topic, n, &payload, IN_FLIGHT).await;
                (raw_produce(&raw, &raw_topic, n, &payload).await, p)
            };
            // Each consumer drains the other's topic, so both read the same data
            // within a run (polybus's records carry its id header either way).
            let (raw_group, pb_group) = (format!("raw-{id}-{run}"), format!("pb-{id}-{run}"));
            let (raw_con, pb_con) = if run % 2 == 0 {
                let r = raw_consume(&brokers, &pb_topic, &raw_group, n).await;
                (r, polybus_consume(&conn, &raw_topic, &pb_group, n).await)
            } else {
                let p = polybus_consume(&conn, &raw_topic, &pb_group, n).await;
                (raw_consume(&brokers, &pb_topic, &raw_group, n).await, p)
            };
            rates.record(run, [raw_pub, pb_pub, raw_con, pb_con]);
            if let Some(observed) = early {
                rates.record_observed(run, observed);
            } else if bench::observation_available() {
                let observed = observed(&conn, &obs_topic, &obs_group, n, &payload).await;
                rates.record_observed(run, observed);
            }
        }
        rates.report();
    });
}
