//! Kafka throughput of polybus against raw rdkafka, same broker, same process,
//! at each pipelining depth (`POLYBUS_BENCH_DEPTH`, default 256 and 1,000) and
//! partition count (`POLYBUS_BENCH_PARTITIONS`, default 1 and 4). Four
//! variants alternate which goes first:
//!
//! * **raw**: the best-practice rdkafka loop. Produce: a `BaseProducer`
//!   (`acks=all`, idempotence) that enqueues without awaiting each delivery,
//!   serving delivery reports with `poll(0)` and waiting only on `QueueFull`:
//!   librdkafka's queue is its window (`queue.buffering.max.messages`, default
//!   100,000; `POLYBUS_BENCH_KAFKA_RAW_QUEUE=depth` makes it the depth, which
//!   with 1 ms waits on a full queue is slower than polybus at the same
//!   depth); every delivery report is counted. Consume: a `BaseConsumer`
//!   (librdkafka's fetch defaults) that stores the highest offset per partition
//!   once per chunk of `depth` records, auto-committing the stored offsets,
//!   and commits them at the end.
//! * **same-wire raw**: the same loops writing what polybus writes (the
//!   `polybus-id` header in polybus's id format, the record timestamp set) and
//!   reading the id header back.
//! * **polybus**: `producer.send` with `depth` sends in flight; the runner
//!   (unordered, concurrency 64, bound `depth`) with a handler that only marks
//!   what it saw, committing the settled offsets itself. polybus's consumer
//!   configuration is its default (`POLYBUS_BENCH_KAFKA_BUFFER` sets
//!   `KafkaConfig::buffer`, `POLYBUS_BENCH_KAFKA_KBYTES` librdkafka's
//!   `queued.max.messages.kbytes`).
//! * **polybus observed**: the polybus variant with its metrics and tracing
//!   on (`bench::observing`: a metrics recorder and an OpenTelemetry SDK
//!   tracer sampling every span, the sends made inside a trace), on its own
//!   topic; the table gives observed / polybus. It runs when the bench is
//!   built with polybus-conformance's `metrics` and `opentelemetry` features
//!   (this crate's dev-dependency turns them on).
//!
//! Every consumer drains what its own variant produced (timed from creating
//! the consumer, so each includes the group join) and counts lost and
//! duplicated records by a sequence number in the payload. Topics are new for
//! every run and deleted afterwards. Prints one table per partition count and
//! depth.
//!
//! ```text
//! POLYBUS_BENCH_KAFKA_BROKERS=127.0.0.1:9092 cargo bench -p polybus-kafka --bench kafka
//! POLYBUS_BENCH_MESSAGES=1000000 POLYBUS_BENCH_RUNS=5 POLYBUS_BENCH_PARTITIONS=1 POLYBUS_BENCH_DEPTH=1000 cargo bench -p polybus-kafka --bench kafka
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use polybus_conformance::bench::{self, Check, Seen};
use polybus_core::{Connection, StartFrom};
use polybus_kafka::KafkaConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};

const CONCURRENCY: usize = 64;

/// What a raw loop writes and reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wire {
    /// The payload only.
    Bare,
    /// polybus's id header and record timestamp.
    Polybus,
}

fn raw_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers).set("log_level", "3");
    c
}

/// Counts delivery reports.
#[derive(Default)]
struct Reports {
    delivered: AtomicUsize,
    failed: AtomicUsize,
}

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.delivered.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

fn raw_produce(brokers: &str, topic: &str, n: usize, depth: usize, wire: Wire) -> Duration {
    let mut config = raw_config(brokers);
    config
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "60000");
    if std::env::var("POLYBUS_BENCH_KAFKA_RAW_QUEUE").is_ok_and(|q| q == "depth") {
        config.set("queue.buffering.max.messages", depth.to_string());
    }
    let producer: BaseProducer<Reports> = config
        .create_with_context(Reports::default())
        .expect("raw producer");
    let began = Instant::now();
    for i in 0..n {
        let payload = bench::payload(i);
        let id;
        let mut record = BaseRecord::<(), [u8]>::to(topic).payload(&payload[..]);
        if wire == Wire::Polybus {
            id = bench::wire_id();
            record = record
                .headers(OwnedHeaders::new_with_capacity(1).insert(Header {
                    key: polybus_core::wire::ID,
                    value: Some(id.as_bytes()),
                }))
                .timestamp(now_millis());
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(1));
                }
                // A topic created a moment ago may not be in this producer's
                // metadata yet (seen on tansu).
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::UnknownTopic), back))
                    if began.elapsed() < Duration::from_secs(30) =>
                {
                    record = back;
                    producer.poll(Duration::from_millis(100));
                }
                Err((e, _)) => panic!("produce: {e}"),
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(60)).expect("flush");
    let took = began.elapsed();
    let reports = producer.context();
    assert_eq!(
        (
            reports.delivered.load(Ordering::Relaxed),
            reports.failed.load(Ordering::Relaxed)
        ),
        (n, 0),
        "every record delivered"
    );
    took
}

fn raw_consume(
    brokers: &str,
    topic: &str,
    group: &str,
    n: usize,
    depth: usize,
    wire: Wire,
) -> (Duration, Check) {
    let seen = Seen::new(n);
    let began = Instant::now();
    let consumer: BaseConsumer = raw_config(brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("raw consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut highest: HashMap<i32, i64> = HashMap::new();
    let store = |highest: &mut HashMap<i32, i64>| {
        let mut list = TopicPartitionList::new();
        for (&partition, &offset) in highest.iter() {
            list.add_partition_offset(topic, partition, Offset::Offset(offset + 1))
                .expect("offset");
        }
        consumer.store_offsets(&list).expect("store offsets");
        highest.clear();
    };
    let (mut in_chunk, mut read, mut last) = (0usize, 0usize, Instant::now());
    while !seen.complete() && last.elapsed() < bench::IDLE {
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message.expect("message");
        if wire == Wire::Polybus {
            // What polybus reads back: the id (as text) and the timestamp.
            let id = message
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == polybus_core::wire::ID))
                .and_then(|h| std::str::from_utf8(h.value?).ok());
            read += id.map_or(0, str::len) + message.timestamp().to_millis().map_or(0, |_| 1);
        }
        seen.mark(message.payload().unwrap_or_default());
        highest.insert(message.partition(), message.offset());
        last = Instant::now();
        in_chunk += 1;
        if in_chunk == depth {
            store(&mut highest);
            in_chunk = 0;
        }
    }
    store(&mut highest);
    let took = began.elapsed();
    std::hint::black_box(read);
    consumer.commit_consumer_state(CommitMode::Sync).expect("commit");
    (took, seen.check())
}

async fn polybus_consume(
    conn: &Connection,
    topic: &str,
    group: &str,
    n: usize,
    depth: usize,
) -> (Duration, Check) {
    conn.consumer
        .declare_group(topic, group, StartFrom::Earliest)
        .await
        .expect("group");
    bench::consume_seq(conn, topic, group, n, CONCURRENCY, depth).await
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
    let runs = bench::env_or("POLYBUS_BENCH_RUNS", 5);
    let buffer = std::env::var("POLYBUS_BENCH_KAFKA_BUFFER")
        .ok()
        .and_then(|b| b.parse::<usize>().ok());
    let runtime = bench::runtime();
    runtime.block_on(async move {
        let admin: AdminClient<DefaultClientContext> = raw_config(&brokers).create().expect("admin");
        let brokers = Arc::new(brokers);
        let pid = std::process::id();
        for partitions in bench::list_or("POLYBUS_BENCH_PARTITIONS", &[1, 4]) {
            let mut config = KafkaConfig::from_url(&format!("kafka://{brokers}"))
                .expect("broker list")
                .partitions(partitions as i32);
            if let Some(buffer) = buffer {
                config.buffer = buffer;
            }
            if let Ok(kbytes) = std::env::var("POLYBUS_BENCH_KAFKA_KBYTES") {
                config = config.set("queued.max.messages.kbytes", kbytes);
            }
            config = extra_settings(config);
            let buffer = config.buffer;
            let conn = polybus_kafka::connect_with(config).await.expect("connect");
            for depth in bench::depths() {
                let mut table = bench::Table::new(
                    format!(
                        "Kafka at {brokers}, {partitions} partition(s), depth {depth} \
                         (in flight / runner bound), polybus buffer {buffer}"
                    ),
                    n,
                );
                for run in 0..runs {
                    let names =
                        [0, 1, 2, 3].map(|v| format!("bench-{pid}-p{partitions}-d{depth}-r{run}-v{v}"));
                    for t in &names {
                        conn.consumer.declare_topic(t).await.expect("topic");
                    }
                    let (mut publish, mut publish_cpu) = ([Duration::ZERO; 4], [Duration::ZERO; 4]);
                    for v in bench::order(run) {
                        let wire = [Wire::Bare, Wire::Polybus][v.min(1)];
                        let cpu = bench::cpu_time();
                        publish[v] = if v < 2 {
                            let (b, t) = (Arc::clone(&brokers), names[v].clone());
                            tokio::task::spawn_blocking(move || raw_produce(&b, &t, n, depth, wire))
                                .await
                                .expect("raw produce")
                        } else {
                            let observed = v == bench::OBSERVED;
                            bench::observing(observed, bench::publish_seq(&conn, &names[v], n, depth)).await
                        };
                        publish_cpu[v] = bench::cpu_time() - cpu;
                    }
                    let (mut consume, mut consume_cpu) =
                        ([(Duration::ZERO, Check::default()); 4], [Duration::ZERO; 4]);
                    for v in bench::order(run) {
                        let group = format!("g-{}", names[v]);
                        let wire = [Wire::Bare, Wire::Polybus][v.min(1)];
                        let cpu = bench::cpu_time();
                        consume[v] = if v < 2 {
                            let (b, t) = (Arc::clone(&brokers), names[v].clone());
                            tokio::task::spawn_blocking(move || raw_consume(&b, &t, &group, n, depth, wire))
                                .await
                                .expect("raw consume")
                        } else {
                            let observed = v == bench::OBSERVED;
                            bench::observing(observed, polybus_consume(&conn, &names[v], &group, n, depth))
                                .await
                        };
                        consume_cpu[v] = bench::cpu_time() - cpu;
                    }
                    table.record(run, publish, consume);
                    table.record_cpu(publish_cpu, consume_cpu);
                    // With the dead-letter topics polybus declared beside them.
                    let dlqs: Vec<String> = names.iter().map(|t| format!("{t}.dlq")).collect();
                    let topics: Vec<&str> = names.iter().chain(&dlqs).map(String::as_str).collect();
                    let _ = admin.delete_topics(&topics, &AdminOptions::new()).await;
                }
                table.report();
            }
        }
    });
}
