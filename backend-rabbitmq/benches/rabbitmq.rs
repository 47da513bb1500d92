//! RabbitMQ throughput of polybus against raw lapin, same broker, same run.
//!
//! * **publish**: `N` persistent messages of 100 bytes to a topic exchange with
//!   one quorum queue bound, 256 publishes in flight, each resolving on its
//!   publisher confirm.
//! * **consume + ack**: the quorum queue holding `N` messages is drained with
//!   prefetch 256; raw lapin acks each delivery from its consumer stream with
//!   up to 256 acks in flight, polybus runs a no-op handler in the runner (concurrency 64, bound 256),
//!   which acks.
//!
//! The topology is the same for both (declared by polybus) and deleted after
//! each run; raw and polybus alternate which goes first.
//!
//! Every run also measures polybus with its metrics and tracing on (a metrics
//! recorder and an OpenTelemetry SDK tracer installed, `bench::observe`):
//! publishing inside a trace, then draining that topic; the report gives the
//! ratio to plain polybus (observed first in odd runs, last in even ones).
//!
//! ```text
//! POLYBUS_BENCH_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo bench -p polybus-rabbitmq --bench rabbitmq
//! POLYBUS_BENCH_MESSAGES=100000 POLYBUS_BENCH_RUNS=7 cargo bench -p polybus-rabbitmq --bench rabbitmq
//! ```

use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, ConnectionProperties};
use polybus_conformance::bench;
use polybus_core::{Bytes, StartFrom};
use polybus_rabbitmq::{RabbitConfig, RabbitConsumer, group_queue};

const IN_FLIGHT: usize = 256;
const PREFETCH: u16 = 256;

async fn raw_publish(channel: &lapin::Channel, exchange: &str, n: usize, payload: &Bytes) -> Duration {
    let began = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(format!("raw-{i}").into());
            async move {
                channel
                    .basic_publish(
                        exchange.into(),
                        "".into(),
                        BasicPublishOptions::default(),
                        payload,
                        properties,
                    )
                    .await
                    .expect("publish")
                    .await
                    .expect("confirm")
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .for_each(|_| async {})
        .await;
    began.elapsed()
}

async fn raw_consume(connection: &lapin::Connection, queue: &str, n: usize) -> Duration {
    let channel = connection.create_channel().await.expect("channel");
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .expect("qos");
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
    // Acks pipeline (up to the prefetch in flight), as the runner's do.
    let mut acks = futures::stream::FuturesUnordered::new();
    let (mut received, mut acked) = (0, 0);
    while acked < n {
        tokio::select! {
            delivery = consumer.next(), if received < n && acks.len() < usize::from(PREFETCH) => {
                let delivery = delivery.expect("open").expect("delivery");
                received += 1;
                acks.push(async move { delivery.ack(BasicAckOptions::default()).await.expect("ack") });
            }
            Some(_) = acks.next(), if !acks.is_empty() => acked += 1,
        }
    }
    let took = began.elapsed();
    let _ = channel.close(200, "bye".into()).await;
    took
}

/// Publishes `n` messages to a new topic and drains its group with a runner,
/// both with polybus's metrics and tracing on (`bench::observe`).
async fn observed(
    conn: &polybus_core::Connection,
    admin: &RabbitConsumer,
    topic: &str,
    n: usize,
    payload: &Bytes,
) -> [Duration; 2] {
    conn.consumer.declare_topic(topic).await.expect("topic");
    conn.consumer
        .declare_group(topic, "g", StartFrom::Latest)
        .await
        .expect("group");
    bench::observe(true);
    let sent = bench::publish(conn, topic, n, payload, IN_FLIGHT).await;
    let consumed = bench::consume(conn, topic, "g", n, 64, usize::from(PREFETCH)).await;
    bench::observe(false);
    let _ = admin.delete_topic(topic, &[group_queue(topic, "g")]).await;
    [sent, consumed]
}

fn main() {
    let url = std::env::var("POLYBUS_BENCH_AMQP_URL")
        .or_else(|_| std::env::var("POLYBUS_TEST_AMQP_URL"))
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let n = bench::env_or("POLYBUS_BENCH_MESSAGES", 50_000);
    let runs = bench::env_or("POLYBUS_BENCH_RUNS", 5);
    let runtime = bench::runtime();
    runtime.block_on(async move {
        let raw_conn = lapin::Connection::connect(&url, ConnectionProperties::default())
            .await
            .expect("RabbitMQ is reachable");
        let raw_channel = raw_conn.create_channel().await.expect("channel");
        raw_channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let config = RabbitConfig::new(&url).expect("url");
        let conn = polybus_rabbitmq::connect_with(config.clone())
            .await
            .expect("connect");
        let admin = RabbitConsumer::connect(&config).await.expect("admin");
        let payload = Bytes::from(vec![b'x'; 100]);
        let mut rates = bench::Rates::new(n);
        println!("RabbitMQ, {n} messages of 100 bytes per measurement, {runs} runs, quorum queues");
        for run in 0..runs {
            let raw_topic = format!("bench-raw{run}-{}", std::process::id());
            let pb_topic = format!("bench-pb{run}-{}", std::process::id());
            let obs_topic = format!("bench-obs{run}-{}", std::process::id());
            // Observed first in odd runs, last in even ones.
            let early = if run % 2 == 1 && bench::observation_available() {
                Some(observed(&conn, &admin, &obs_topic, n, &payload).await)
            } else {
                None
            };
            for t in [&raw_topic, &pb_topic] {
                conn.consumer.declare_topic(t).await.expect("topic");
                conn.consumer
                    .declare_group(t, "g", StartFrom::Latest)
                    .await
                    .expect("group");
            }
            let (raw_pub, pb_pub) = if run % 2 == 0 {
                let r = raw_publish(&raw_channel, &raw_topic, n, &payload).await;
                (r, bench::publish(&conn, &pb_topic, n, &payload, IN_FLIGHT).await)
            } else {
                let p = bench::publish(&conn, &pb_topic, n, &payload, IN_FLIGHT).await;
                (raw_publish(&raw_channel, &raw_topic, n, &payload).await, p)
            };
            // Each side drains the other's queue, so both get the same data.
            let (raw_con, pb_con) = if run % 2 == 0 {
                let r = raw_consume(&raw_conn, &group_queue(&pb_topic, "g"), n).await;
                (
                    r,
                    bench::consume(&conn, &raw_topic, "g", n, 64, usize::from(PREFETCH)).await,
                )
            } else {
                let p = bench::consume(&conn, &raw_topic, "g", n, 64, usize::from(PREFETCH)).await;
                (raw_consume(&raw_conn, &group_queue(&pb_topic, "g"), n).await, p)
            };
            rates.record(run, [raw_pub, pb_pub, raw_con, pb_con]);
            for t in [&raw_topic, &pb_topic] {
                let _ = admin.delete_topic(t, &[group_queue(t, "g")]).await;
            }
            if let Some(observed) = early {
                rates.record_observed(run, observed);
            } else if bench::observation_available() {
                let observed = observed(&conn, &admin, &obs_topic, n, &payload).await;
                rates.record_observed(run, observed);
            }
        }
        rates.report();
    });
}
