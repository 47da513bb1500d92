//! JetStream throughput of polybus against raw async-nats, same server, same
//! process, at each pipelining depth (`POLYBUS_BENCH_DEPTH`, default 256 and
//! 1,000: sends in flight and prefetch). Four variants alternate which goes
//! first:
//!
//! * **raw**: the best-practice async-nats loop. Publish: `send_publish` with
//!   `depth` PubAcks pipelined, no headers. Consume: a durable pull consumer
//!   (explicit acks) read through `stream().max_messages_per_batch(depth)`
//!   (batched pulls), `ack()` per message.
//! * **same-wire raw**: the same loops sending exactly what polybus sends: a
//!   `Nats-Msg-Id` in polybus's id format (which the server tracks for
//!   deduplication) and the `polybus-ts` header, on a stream polybus declared;
//!   the consumer reads both headers back.
//! * **polybus**: `producer.send` with `depth` in flight; the runner
//!   (unordered, concurrency 64, bound `depth`) with a handler that only marks
//!   what it saw.
//! * **polybus observed**: the polybus variant with its metrics and tracing
//!   on (`bench::observing`: a metrics recorder and an OpenTelemetry SDK
//!   tracer sampling every span, the sends made inside a trace), on its own
//!   stream; the table gives observed / polybus. It runs when the bench is
//!   built with polybus-conformance's `metrics` and `opentelemetry` features
//!   (this crate's dev-dependency turns them on).
//!
//! Every consumer drains what its own variant published and counts lost and
//! duplicated messages by a sequence number in the payload. Streams are
//! file-backed by default (`POLYBUS_BENCH_STORAGE=memory` for memory), new for
//! every run and deleted afterwards. Prints one table per depth.
//!
//! ```text
//! POLYBUS_BENCH_NATS_URL=nats://127.0.0.1:4222 cargo bench -p polybus-nats --bench jetstream
//! POLYBUS_BENCH_MESSAGES=100000 POLYBUS_BENCH_RUNS=5 POLYBUS_BENCH_DEPTH=1000 cargo bench -p polybus-nats --bench jetstream
//! ```

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;
use polybus_conformance::bench::{self, Check, Seen};
use polybus_core::{Connection, StartFrom};
use polybus_nats::{NatsConfig, Storage, stream_name};

const CONCURRENCY: usize = 64;

/// What a raw publish sends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wire {
    /// No headers.
    Bare,
    /// polybus's headers.
    Polybus,
}

/// Whether the same-wire loop sends the id as `Nats-Msg-Id`, as polybus does
/// (default), or, with `POLYBUS_BENCH_NATS_ID=header`, as a plain `polybus-id`
/// header the server does not track: the difference is the cost of the
/// server's duplicate tracking.
fn dedup_id() -> bool {
    std::env::var("POLYBUS_BENCH_NATS_ID").map_or(true, |v| v != "header")
}

async fn raw_publish(js: &jetstream::Context, topic: &str, n: usize, depth: usize, wire: Wire) -> Duration {
    let began = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let mut publish = jetstream::message::PublishMessage::build().payload(bench::payload(i));
            if wire == Wire::Polybus {
                let millis = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis();
                let mut headers = HeaderMap::new();
                headers.insert(polybus_core::wire::TIMESTAMP, millis.to_string().as_str());
                publish = if dedup_id() {
                    publish.headers(headers).message_id(bench::wire_id())
                } else {
                    headers.insert(polybus_core::wire::ID, bench::wire_id().as_str());
                    publish.headers(headers)
                };
            }
            async move {
                js.send_publish(topic.to_owned(), publish)
                    .await
                    .expect("publish")
                    .await
                    .expect("puback")
            }
        })
        .buffer_unordered(depth)
        .for_each(|_| async {})
        .await;
    began.elapsed()
}

async fn raw_consume(
    js: &jetstream::Context,
    topic: &str,
    n: usize,
    depth: usize,
    wire: Wire,
) -> (Duration, Check) {
    let stream = js.get_stream(stream_name(topic)).await.expect("stream");
    let consumer = stream
        .get_or_create_consumer(
            "raw",
            pull::Config {
                durable_name: Some("raw".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                max_ack_pending: depth.max(1024) as i64,
                ..Default::default()
            },
        )
        .await
        .expect("consumer");
    let seen = Seen::new(n);
    let began = Instant::now();
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(depth)
        .messages()
        .await
        .expect("messages");
    let mut read = 0usize;
    while !seen.complete() {
        let message = match tokio::time::timeout(bench::IDLE, messages.next()).await {
            Ok(m) => m.expect("open").expect("message"),
            Err(_) => break,
        };
        if wire == Wire::Polybus {
            // What polybus reads back: the id and the creation time.
            if let Some(headers) = &message.headers {
                let id = headers
                    .get("Nats-Msg-Id")
                    .or_else(|| headers.get(polybus_core::wire::ID));
                read += id.map_or(0, |id| id.as_str().len());
                read += headers
                    .get(polybus_core::wire::TIMESTAMP)
                    .and_then(|ts| ts.as_str().parse::<u64>().ok())
                    .map_or(0, |_| 1);
            }
        }
        seen.mark(&message.payload);
        message.ack().await.expect("ack");
    }
    let took = began.elapsed();
    std::hint::black_box(read);
    drop(messages);
    let _ = stream.delete_consumer("raw").await;
    (took, seen.check())
}

fn main() {
    let url = std::env::var("POLYBUS_BENCH_NATS_URL")
        .or_else(|_| std::env::var("POLYBUS_TEST_NATS_URL"))
        .unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let n = bench::env_or("POLYBUS_BENCH_MESSAGES", 100_000);
    let runs = bench::env_or("POLYBUS_BENCH_RUNS", 5);
    let memory = std::env::var("POLYBUS_BENCH_STORAGE").is_ok_and(|s| s == "memory");
    let (storage, raw_storage, storage_name) = if memory {
        (Storage::Memory, stream::StorageType::Memory, "memory")
    } else {
        (Storage::File, stream::StorageType::File, "file")
    };
    let runtime = bench::runtime();
    runtime.block_on(async move {
        let client = async_nats::connect(url.as_str())
            .await
            .expect("NATS is reachable");
        let js = jetstream::new(client);
        let config = NatsConfig::from_url(&url).expect("url").storage(storage);
        let conn: Connection = polybus_nats::connect_with(config).await.expect("connect");
        let pid = std::process::id();
        for depth in bench::depths() {
            let mut table = bench::Table::new(
                format!("NATS JetStream, {storage_name} streams, depth {depth} (in flight / pull batch)"),
                n,
            );
            for run in 0..runs {
                let names = [0, 1, 2, 3].map(|v| format!("bench.{pid}.d{depth}.r{run}.v{v}"));
                js.create_stream(stream::Config {
                    name: stream_name(&names[0]),
                    subjects: vec![names[0].clone()],
                    storage: raw_storage,
                    ..Default::default()
                })
                .await
                .expect("raw stream");
                for t in &names[1..] {
                    conn.consumer.declare_topic(t).await.expect("topic");
                }
                for t in &names[2..] {
                    conn.consumer
                        .declare_group(t, "polybus", StartFrom::Earliest)
                        .await
                        .expect("group");
                }
                let (mut publish, mut publish_cpu) = ([Duration::ZERO; 4], [Duration::ZERO; 4]);
                for v in bench::order(run) {
                    let cpu = bench::cpu_time();
                    publish[v] = match v {
                        0 => raw_publish(&js, &names[0], n, depth, Wire::Bare).await,
                        1 => raw_publish(&js, &names[1], n, depth, Wire::Polybus).await,
                        _ => {
                            let observed = v == bench::OBSERVED;
                            bench::observing(observed, bench::publish_seq(&conn, &names[v], n, depth)).await
                        }
                    };
                    publish_cpu[v] = bench::cpu_time() - cpu;
                }
                let (mut consume, mut consume_cpu) =
                    ([(Duration::ZERO, Check::default()); 4], [Duration::ZERO; 4]);
                for v in bench::order(run) {
                    let cpu = bench::cpu_time();
                    consume[v] = match v {
                        0 => raw_consume(&js, &names[0], n, depth, Wire::Bare).await,
                        1 => raw_consume(&js, &names[1], n, depth, Wire::Polybus).await,
                        _ => {
                            let consume =
                                bench::consume_seq(&conn, &names[v], "polybus", n, CONCURRENCY, depth);
                            bench::observing(v == bench::OBSERVED, consume).await
                        }
                    };
                    consume_cpu[v] = bench::cpu_time() - cpu;
                }
                table.record(run, publish, consume);
                table.record_cpu(publish_cpu, consume_cpu);
                for t in &names {
                    // polybus declared a dead-letter stream beside its topics.
                    for name in [t.clone(), format!("{t}.dlq")] {
                        let _ = js.delete_stream(stream_name(&name)).await;
                    }
                }
            }
            table.report();
        }
    });
}
