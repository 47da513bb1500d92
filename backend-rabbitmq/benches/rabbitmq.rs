//! RabbitMQ throughput of polybus against raw lapin, same broker, same process,
//! at each pipelining depth (`POLYBUS_BENCH_DEPTH`, default 256 and 1,000: sends
//! in flight and prefetch). Four variants alternate which goes first:
//!
//! * **raw**: the best-practice lapin loop. Publish: persistent messages to a
//!   durable queue through the default exchange, `depth` publisher confirms
//!   pipelined on one confirm channel, no properties beyond persistence.
//!   Consume: `basic_qos(depth)`, one `basic.ack` per delivery, up to `depth`
//!   acks in flight.
//! * **same-wire raw**: the same loops sending exactly what polybus sends,
//!   on polybus's topology: the topic's exchange (declared by polybus) with
//!   the group's queue bound, a `message_id` in polybus's id format, the
//!   timestamp property and the `polybus-ts` header; the consumer reads the id
//!   and the timestamp header back.
//! * **polybus**: `producer.send` with `depth` in flight; the runner
//!   (unordered, concurrency 64, bound `depth`) with a handler that only marks
//!   what it saw.
//! * **polybus observed**: the polybus variant with its metrics and tracing
//!   on (`bench::observing`: a metrics recorder and an OpenTelemetry SDK
//!   tracer sampling every span, the sends made inside a trace), on its own
//!   topic; the table gives observed / polybus. It runs when the bench is
//!   built with polybus-conformance's `metrics` and `opentelemetry` features
//!   (this crate's dev-dependency turns them on).
//!
//! Every consumer drains what its own variant published and counts lost and
//! duplicated messages by a sequence number in the payload. Queues are classic
//! durable by default (`POLYBUS_BENCH_QUEUE=quorum` for quorum queues), new for
//! every run and deleted afterwards. Prints one table per depth. polybus
//! coalesces its acks (multiple acks, 2 ms bound) unless
//! `POLYBUS_BENCH_RMQ_ACKS=single` (one `basic.ack` per delivery) or
//! `POLYBUS_BENCH_RMQ_ACKS=<ms>` (another bound).
//!
//! ```text
//! POLYBUS_BENCH_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo bench -p polybus-rabbitmq --bench rabbitmq
//! POLYBUS_BENCH_MESSAGES=100000 POLYBUS_BENCH_RUNS=5 POLYBUS_BENCH_DEPTH=1000 cargo bench -p polybus-rabbitmq --bench rabbitmq
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, ConnectionProperties, ExchangeKind};
use polybus_conformance::bench::{self, Check, Seen};
use polybus_core::{Connection, StartFrom};
use polybus_rabbitmq::{QueueType, RabbitConfig, RabbitConsumer, group_queue};

const CONCURRENCY: usize = 64;

/// What a raw publish sends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wire {
    /// Persistence only.
    Bare,
    /// polybus's properties and header.
    Polybus,
}

fn properties(wire: Wire) -> BasicProperties {
    let properties = BasicProperties::default().with_delivery_mode(2);
    if wire == Wire::Bare {
        return properties;
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from(polybus_core::wire::TIMESTAMP),
        AMQPValue::LongString(LongString::from(now.as_millis().to_string())),
    );
    properties
        .with_timestamp(now.as_secs())
        .with_headers(headers)
        .with_message_id(bench::wire_id().into())
}

async fn raw_publish(
    channel: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    n: usize,
    depth: usize,
    wire: Wire,
) -> Duration {
    let began = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let payload = bench::payload(i);
            let properties = properties(wire);
            async move {
                channel
                    .basic_publish(
                        exchange.into(),
                        routing_key.into(),
                        BasicPublishOptions::default(),
                        &payload,
                        properties,
                    )
                    .await
                    .expect("publish")
                    .await
                    .expect("confirm")
            }
        })
        .buffer_unordered(depth)
        .for_each(|_| async {})
        .await;
    began.elapsed()
}

async fn raw_consume(
    connection: &lapin::Connection,
    queue: &str,
    n: usize,
    depth: usize,
    wire: Wire,
) -> (Duration, Check) {
    let channel = connection.create_channel().await.expect("channel");
    channel
        .basic_qos(
            depth.min(usize::from(u16::MAX)) as u16,
            BasicQosOptions::default(),
        )
        .await
        .expect("qos");
    let seen = Seen::new(n);
    let began = Instant::now();
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    // Acks pipeline, up to the prefetch in flight.
    let mut acks = futures::stream::FuturesUnordered::new();
    let mut id_bytes = 0usize;
    let idle = tokio::time::sleep(bench::IDLE);
    tokio::pin!(idle);
    while !(seen.complete() && acks.is_empty()) {
        tokio::select! {
            delivery = consumer.next(), if acks.len() < depth => {
                let delivery = delivery.expect("open").expect("delivery");
                if wire == Wire::Polybus {
                    // What polybus reads back: the id and the creation time.
                    let props = &delivery.properties;
                    id_bytes += props.message_id().as_ref().map_or(0, |id| id.as_str().len());
                    let ts = props
                        .headers()
                        .as_ref()
                        .and_then(|h| h.inner().get(polybus_core::wire::TIMESTAMP))
                        .and_then(|v| v.as_long_string())
                        .and_then(|s| std::str::from_utf8(s.as_bytes()).ok()?.parse::<u64>().ok());
                    id_bytes += ts.map_or(0, |_| 1);
                }
                seen.mark(&delivery.data);
                idle.as_mut().reset(tokio::time::Instant::now() + bench::IDLE);
                acks.push(async move { delivery.ack(BasicAckOptions::default()).await.expect("ack") });
            }
            Some(_) = acks.next(), if !acks.is_empty() => {}
            () = &mut idle => break,
        }
    }
    let took = began.elapsed();
    std::hint::black_box(id_bytes);
    let _ = channel.close(200, "bye".into()).await;
    (took, seen.check())
}

/// Where the same-wire loop sends: `polybus` (default: the topic's exchange
/// polybus declared, the group's queue bound with `#`), or, with
/// `POLYBUS_BENCH_RMQ_TOPOLOGY`, `fanout` (a fanout exchange bound to a
/// durable queue) or `default` (a durable queue on the default exchange, as
/// the raw loop): comparing them splits polybus's format cost from its
/// topology's.
fn same_wire_topology() -> &'static str {
    match std::env::var("POLYBUS_BENCH_RMQ_TOPOLOGY").as_deref() {
        Ok("fanout") => "fanout",
        Ok("default") => "default",
        _ => "polybus",
    }
}

/// The raw loops' connection: lapin's defaults, or with
/// `POLYBUS_BENCH_RMQ_RECOVER=1` lapin's auto-recovery on, as polybus's
/// producer has it (to measure what recovery costs).
fn raw_properties() -> ConnectionProperties {
    let properties = ConnectionProperties::default();
    if std::env::var("POLYBUS_BENCH_RMQ_RECOVER").is_ok_and(|v| v == "1") {
        properties.enable_auto_recover()
    } else {
        properties
    }
}

fn main() {
    let url = std::env::var("POLYBUS_BENCH_AMQP_URL")
        .or_else(|_| std::env::var("POLYBUS_TEST_AMQP_URL"))
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let n = bench::env_or("POLYBUS_BENCH_MESSAGES", 100_000);
    let runs = bench::env_or("POLYBUS_BENCH_RUNS", 5);
    let quorum = std::env::var("POLYBUS_BENCH_QUEUE").is_ok_and(|q| q == "quorum");
    let (queue_type, queue_name) = if quorum {
        (QueueType::Quorum, "quorum")
    } else {
        (QueueType::Classic, "classic")
    };
    let runtime = bench::runtime();
    runtime.block_on(async move {
        let raw_conn = Arc::new(
            lapin::Connection::connect(&url, raw_properties())
                .await
                .expect("RabbitMQ is reachable"),
        );
        let raw_channel = raw_conn.create_channel().await.expect("channel");
        raw_channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let mut config = RabbitConfig::new(&url).expect("url").queue_type(queue_type);
        // `POLYBUS_BENCH_RMQ_ACKS=single`: one basic.ack per delivery (no
        // coalescing), as before multiple acks; `=<ms>`: another bound.
        match std::env::var("POLYBUS_BENCH_RMQ_ACKS").as_deref() {
            Ok("single") => config = config.ack_coalescing(None),
            Ok(ms) => {
                if let Ok(ms) = ms.parse::<u64>() {
                    config = config.ack_coalescing(Some(Duration::from_millis(ms)));
                }
            }
            Err(_) => {}
        }
        let conn: Connection = polybus_rabbitmq::connect_with(config.clone())
            .await
            .expect("connect");
        let admin = RabbitConsumer::connect(&config).await.expect("admin");
        let pid = std::process::id();
        for depth in bench::depths() {
            let mut table = bench::Table::new(
                format!(
                    "RabbitMQ, {queue_name} durable queues, depth {depth} (in flight / prefetch), \
                     same-wire topology {}",
                    same_wire_topology()
                ),
                n,
            );
            for run in 0..runs {
                let names = [0, 1, 2, 3].map(|v| format!("bench-{pid}-d{depth}-r{run}-v{v}"));
                // raw: a durable queue of that name on the default exchange.
                let mut args = FieldTable::default();
                args.insert(
                    "x-queue-type".into(),
                    AMQPValue::LongString(LongString::from(queue_name)),
                );
                raw_channel
                    .queue_declare(
                        names[0].as_str().into(),
                        QueueDeclareOptions {
                            durable: true,
                            ..Default::default()
                        },
                        args,
                    )
                    .await
                    .expect("raw queue");
                // same-wire raw and polybus: polybus's topology (unless the
                // same-wire topology is overridden, see `same_wire_topology`).
                let topology = same_wire_topology();
                let (wire_exchange, wire_key, wire_queue) = match topology {
                    "default" => (String::new(), names[1].clone(), names[1].clone()),
                    "fanout" => (names[1].clone(), String::new(), names[1].clone()),
                    _ => (names[1].clone(), String::new(), group_queue(&names[1], "g")),
                };
                if topology != "polybus" {
                    let mut args = FieldTable::default();
                    args.insert(
                        "x-queue-type".into(),
                        AMQPValue::LongString(LongString::from(queue_name)),
                    );
                    let durable = QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    };
                    raw_channel
                        .queue_declare(wire_queue.as_str().into(), durable, args)
                        .await
                        .expect("same-wire queue");
                }
                if topology == "fanout" {
                    raw_channel
                        .exchange_declare(
                            wire_exchange.as_str().into(),
                            ExchangeKind::Fanout,
                            ExchangeDeclareOptions {
                                durable: true,
                                ..Default::default()
                            },
                            FieldTable::default(),
                        )
                        .await
                        .expect("fanout exchange");
                    raw_channel
                        .queue_bind(
                            wire_queue.as_str().into(),
                            wire_exchange.as_str().into(),
                            "".into(),
                            QueueBindOptions::default(),
                            FieldTable::default(),
                        )
                        .await
                        .expect("bind");
                }
                let polybus_topics = if topology == "polybus" {
                    &names[1..]
                } else {
                    &names[2..]
                };
                for t in polybus_topics {
                    conn.consumer.declare_topic(t).await.expect("topic");
                    conn.consumer
                        .declare_group(t, "g", StartFrom::Latest)
                        .await
                        .expect("group");
                }
                let (mut publish, mut publish_cpu) = ([Duration::ZERO; 4], [Duration::ZERO; 4]);
                for v in bench::order(run) {
                    let cpu = bench::cpu_time();
                    publish[v] = match v {
                        0 => raw_publish(&raw_channel, "", &names[0], n, depth, Wire::Bare).await,
                        1 => {
                            raw_publish(&raw_channel, &wire_exchange, &wire_key, n, depth, Wire::Polybus)
                                .await
                        }
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
                        0 => raw_consume(&raw_conn, &names[0], n, depth, Wire::Bare).await,
                        1 => raw_consume(&raw_conn, &wire_queue, n, depth, Wire::Polybus).await,
                        _ => {
                            let consume = bench::consume_seq(&conn, &names[v], "g", n, CONCURRENCY, depth);
                            bench::observing(v == bench::OBSERVED, consume).await
                        }
                    };
                    consume_cpu[v] = bench::cpu_time() - cpu;
                }
                table.record(run, publish, consume);
                table.record_cpu(publish_cpu, consume_cpu);
                let _ = raw_channel
                    .queue_delete(names[0].as_str().into(), QueueDeleteOptions::default())
                    .await;
                if topology != "polybus" {
                    let _ = raw_channel
                        .queue_delete(wire_queue.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
                if topology == "fanout" {
                    let _ = raw_channel
                        .exchange_delete(wire_exchange.as_str().into(), ExchangeDeleteOptions::default())
                        .await;
                }
                for t in polybus_topics {
                    let _ = admin.delete_topic(t, &[group_queue(t, "g")]).await;
                }
            }
            table.report();
        }
    });
}
