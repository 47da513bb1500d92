//! Regression tests for faults found in review (issue 12), on the mock cluster
//! (always) and on the real broker of `POLYBUS_TEST_KAFKA_BROKERS` (skipped
//! loudly without it):
//!
//! * `send_batch` keeps one key's records in batch order when librdkafka's
//!   queue is full;
//! * the producer survives a fatal (idempotence) error.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use polybus_conformance::{Harness, Setup, timeout_multiplier};
use polybus_core::Message;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::{Offset, TopicPartitionList};
use support::KafkaHarness;

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s * timeout_multiplier())
}

async fn harness<const REAL: bool>(test: &str) -> Option<KafkaHarness<REAL>> {
    match KafkaHarness::<REAL>::setup().await {
        Setup::Ready(h) => Some(h),
        Setup::MissingBroker(reason) => {
            assert!(
                !polybus_conformance::brokers_required(),
                "{test}: POLYBUS_TEST_REQUIRE_BROKERS=1 but {reason}"
            );
            polybus_conformance::loud(&format!("SKIP {test} (real broker): {reason}"));
            None
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Waits until `ready` holds, or panics with `what` after `within`.
async fn eventually(within: Duration, what: &str, mut ready: impl FnMut() -> bool) {
    let until = Instant::now() + within;
    while !ready() {
        assert!(Instant::now() < until, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads every record of `topic` (4 partitions) from the start until `count`
/// arrived; returns (partition, offset, seq header) in offset order per partition.
fn read_all(
    h_config: rdkafka::ClientConfig,
    topic: &str,
    count: usize,
    within: Duration,
) -> Vec<(i32, i64, usize)> {
    let reader: BaseConsumer = h_config
        .clone()
        .set("group.id", "polybus-test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    let mut tpl = TopicPartitionList::new();
    for partition in 0..4 {
        tpl.add_partition_offset(topic, partition, Offset::Beginning)
            .unwrap();
    }
    reader.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let until = Instant::now() + within;
    while out.len() < count {
        assert!(Instant::now() < until, "read {} of {count} records", out.len());
        if let Some(Ok(m)) = reader.poll(Duration::from_millis(100)) {
            let seq = m
                .headers()
                .and_then(|hs| hs.iter().find(|h| h.key == "seq").and_then(|h| h.value))
                .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
                .expect("seq header");
            out.push((m.partition(), m.offset(), seq));
        }
    }
    out
}

/// Issue 12.3: 300 same-key sends in one batch through a queue of 10 reach
/// the partition in batch order (rdkafka's `send` retried a full queue after a
/// sleep while later sends got in first).
async fn send_batch_keeps_key_order<const REAL: bool>() {
    let test = "send_batch_keeps_key_order_when_the_queue_is_full";
    let Some(h) = harness::<REAL>(test).await else {
        return;
    };
    let conn = h
        .connect_with(h.config.clone().set("queue.buffering.max.messages", "10"))
        .await
        .expect("connect");
    let topic = h.unique_name("batchorder");
    conn.consumer.declare_topic(&topic).await.expect("declare topic");
    const TOTAL: usize = 300;
    let batch: Vec<Message> = (0..TOTAL)
        .map(|i| {
            Message::new(format!("m{i}"))
                .with_key("one-key")
                .with_header("seq", i.to_string())
        })
        .collect();
    tokio::time::timeout(secs(60.0), conn.producer.send_batch(&topic, batch))
        .await
        .expect("send_batch in time")
        .expect("send_batch");
    let config = h.raw_config();
    let topic2 = topic.clone();
    let mut records = tokio::task::spawn_blocking(move || read_all(config, &topic2, TOTAL, secs(30.0)))
        .await
        .expect("reader");
    records.sort_by_key(|(p, o, _)| (*p, *o));
    let seqs: Vec<usize> = records.iter().map(|r| r.2).collect();
    let inversions = seqs.windows(2).filter(|w| w[0] > w[1]).count();
    assert_eq!(inversions, 0, "one key's records out of batch order: {seqs:?}");
    let _ = conn.close().await;
}

#[test]
fn send_batch_keeps_key_order_on_mock() {
    runtime().block_on(send_batch_keeps_key_order::<false>());
}

#[test]
fn send_batch_keeps_key_order_on_broker() {
    runtime().block_on(send_batch_keeps_key_order::<true>());
}

/// Issue 12.4: a fatal idempotence error (the mock answers a Produce request
/// with OUT_OF_ORDER_SEQUENCE_NUMBER for the first batch in flight) fails the
/// sends it hits, and the producer is recreated: later sends (and dead letters)
/// go through. The old producer stayed fatal for good.
#[test]
fn producer_survives_a_fatal_error() {
    runtime().block_on(async {
        let Some(h) = harness::<false>("producer_survives_a_fatal_error").await else {
            return;
        };
        let conn = h.connect().await.expect("connect");
        let topic = h.unique_name("fatal");
        conn.consumer.declare_topic(&topic).await.expect("declare topic");
        conn.producer
            .send(&topic, Message::new("before"))
            .await
            .expect("first send");
        h.mock().expect("mock").fail_produce_requests(
            rdkafka_sys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
            1,
        );
        let failed = tokio::time::timeout(secs(15.0), conn.producer.send(&topic, Message::new("hit")))
            .await
            .expect("the failed send resolves");
        let e = failed.expect_err("the send hit by the fatal error fails");
        assert!(
            e.is_retryable(),
            "a send lost to a fatal error may be retried: {e}"
        );
        for i in 0..3 {
            tokio::time::timeout(
                secs(15.0),
                conn.producer.send(&topic, Message::new(format!("after-{i}"))),
            )
            .await
            .expect("send in time")
            .unwrap_or_else(|e| panic!("send {i} after the fatal error: {e}"));
        }
        let dlq = polybus_core::names::dead_letter_topic(&topic);
        conn.producer
            .send(&dlq, Message::new("dead"))
            .await
            .expect("dead letter");
        let _ = conn.close().await;
    });
}

/// Records timestamps: the producer gives a record the message's timestamp
/// (the runner sets the dead-lettering time on a dead letter, so retention
/// counts from then).
#[test]
fn records_carry_the_message_timestamp() {
    runtime().block_on(async {
        let Some(h) = harness::<false>("records_carry_the_message_timestamp").await else {
            return;
        };
        let conn = h.connect().await.expect("connect");
        let topic = h.unique_name("ts");
        conn.consumer.declare_topic(&topic).await.expect("declare topic");
        let mut message = Message::new("x").with_header("seq", "0");
        message.timestamp = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        conn.producer.send(&topic, message).await.expect("send");
        let config = h.raw_config();
        let reader: BaseConsumer = config
            .clone()
            .set("group.id", "polybus-test-reader")
            .create()
            .expect("reader");
        let mut tpl = TopicPartitionList::new();
        for partition in 0..4 {
            tpl.add_partition_offset(&topic, partition, Offset::Beginning)
                .unwrap();
        }
        reader.assign(&tpl).expect("assign");
        let mut found = HashMap::new();
        eventually(secs(10.0), "the record arrives", || {
            if let Some(Ok(m)) = reader.poll(Duration::from_millis(50)) {
                found.insert(m.offset(), m.timestamp().to_millis());
            }
            !found.is_empty()
        })
        .await;
        assert_eq!(found.values().next().copied().flatten(), Some(1_700_000_000_123));
        let _ = conn.close().await;
    });
}
