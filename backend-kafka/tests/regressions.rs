//! Regression tests for faults found in review (issue 12), on the mock cluster
//! (always) and on the real broker of `POLYBUS_TEST_KAFKA_BROKERS` (skipped
//! loudly without it):
//!
//! * a partition the group has never committed (added to a live topic, or
//!   whose commit expired) starts at its earliest offset, not at its end;
//! * declaring a group on a topic created elsewhere creates its dead-letter
//!   topic (real broker: the mock has no CreateTopics);
//! * `send_batch` keeps one key's records in batch order when librdkafka's
//!   queue is full;
//! * the producer survives a fatal (idempotence) error;
//! * an ack or release after the partition was revoked says it did not take
//!   effect;
//! * closing the consumer ends its open subscriptions;
//! * a refused connection fails at once.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use polybus_conformance::{Harness, timeout_multiplier};
use polybus_core::{Connection, Delivery, Error, Event, HandlerResult, Message, StartFrom, SubscribeOptions};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use support::harness;

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s * timeout_multiplier())
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

/// Issue 12.1: with partitions 0–2 committed and 5 records on partition 3,
/// which the group never committed, a runner of the group handles all 5 (the
/// old `subscribe` committed partition 3's end and skipped them).
async fn uncommitted_partition_starts_at_earliest<const REAL: bool>() {
    let test = "uncommitted_partition_starts_at_earliest";
    let Some(h) = harness::<REAL>(test).await else {
        return;
    };
    let conn = h.connect().await.expect("connect");
    let topic = h.unique_name("newpart");
    let group = h.unique_name("g");
    conn.consumer.declare_topic(&topic).await.expect("declare topic");
    // The group has committed partitions 0–2 (at 0) and never partition 3, as
    // if 3 had been added to the topic after the group's last commit.
    let member: BaseConsumer = h
        .raw_config()
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("group client");
    let mut tpl = TopicPartitionList::new();
    for partition in 0..3 {
        tpl.add_partition_offset(&topic, partition, Offset::Offset(0))
            .unwrap();
    }
    member.commit(&tpl, CommitMode::Sync).expect("commit 0–2");
    let producer: ThreadedProducer<DefaultProducerContext> = h.raw_config().create().expect("producer");
    for i in 0..5 {
        let payload = format!("p3-{i}");
        producer
            .send(BaseRecord::<(), str>::to(&topic).partition(3).payload(&payload))
            .map_err(|(e, _)| e)
            .expect("enqueue");
    }
    producer.flush(secs(10.0)).expect("flush");
    let handled = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&handled);
    let runner = conn
        .runner()
        .topic(&topic)
        .group(&group)
        .run(move |d: Delivery| {
            let seen = Arc::clone(&seen);
            async move {
                seen.lock().unwrap().push(d.origin().partition);
                HandlerResult::Ok(())
            }
        })
        .await
        .expect("runner");
    let count = || handled.lock().unwrap().len();
    let until = Instant::now() + secs(15.0);
    while count() < 5 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    runner.shutdown(secs(10.0)).await;
    let committed = h.admin().committed(&topic, &group).await.expect("committed");
    assert_eq!(
        count(),
        5,
        "records on a partition the group never committed were skipped (committed now: {committed:?})"
    );
    assert_eq!(committed[3], Some(5), "{committed:?}");
    let _ = conn.close().await;
}

#[test]
fn uncommitted_partition_starts_at_earliest_on_mock() {
    runtime().block_on(uncommitted_partition_starts_at_earliest::<false>());
}

#[test]
fn uncommitted_partition_starts_at_earliest_on_broker() {
    runtime().block_on(uncommitted_partition_starts_at_earliest::<true>());
}

/// Issue 12.1: a second `declare_group` (any start) on a group that has
/// committed never moves its start, on any partition.
async fn redeclaring_keeps_the_start<const REAL: bool>() {
    let test = "redeclaring_keeps_the_start";
    let Some(h) = harness::<REAL>(test).await else {
        return;
    };
    let conn = h.connect().await.expect("connect");
    let topic = h.unique_name("redeclare");
    let group = h.unique_name("g");
    conn.consumer.declare_topic(&topic).await.expect("declare topic");
    conn.consumer
        .declare_group(&topic, &group, StartFrom::Latest)
        .await
        .expect("declare");
    let before = h.admin().committed(&topic, &group).await.expect("committed");
    let messages = (0..20).map(|i| Message::new(format!("m{i}")).with_key(format!("k{i}")));
    conn.producer
        .send_batch(&topic, messages.collect())
        .await
        .expect("publish");
    for start in [StartFrom::Latest, StartFrom::Earliest] {
        conn.consumer
            .declare_group(&topic, &group, start)
            .await
            .expect("declare again");
    }
    let after = h.admin().committed(&topic, &group).await.expect("committed");
    assert_eq!(before, after, "a declared group's start moved");
    let _ = conn.close().await;
}

#[test]
fn redeclaring_keeps_the_start_on_mock() {
    runtime().block_on(redeclaring_keeps_the_start::<false>());
}

#[test]
fn redeclaring_keeps_the_start_on_broker() {
    runtime().block_on(redeclaring_keeps_the_start::<true>());
}

/// Issue 12.2: a topic created by someone else (3 partitions, a larger
/// `max.message.bytes`, no `.dlq`) gets its dead-letter topic when a group is
/// declared on it, with as many partitions, so dead letters have somewhere to
/// go on a broker that does not create topics. Real broker only: the mock
/// cluster has no CreateTopics (its harness creates both topics itself).
async fn dead_letter_topic_follows_an_existing_topic<const REAL: bool>() {
    let test = "dead_letter_topic_follows_an_existing_topic";
    let Some(h) = harness::<REAL>(test).await else {
        return;
    };
    if !REAL {
        polybus_conformance::loud(&format!(
            "SKIP {test} (mock): the mock cluster has no CreateTopics"
        ));
        return;
    }
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        h.raw_config().create().expect("admin client");
    let topic = h.unique_name("elsewhere");
    let created = admin
        .create_topics(
            &[NewTopic::new(&topic, 3, TopicReplication::Fixed(1)).set("max.message.bytes", "2000000")],
            &AdminOptions::new().operation_timeout(Some(secs(10.0))),
        )
        .await
        .expect("create topic");
    assert!(created.iter().all(|r| r.is_ok()), "{created:?}");
    let conn = h.connect().await.expect("connect");
    let dlq = polybus_core::names::dead_letter_topic(&topic);
    conn.consumer
        .declare_group(&topic, &h.unique_name("g"), StartFrom::Latest)
        .await
        .expect("declare group");
    assert_eq!(
        h.admin().partitions(&dlq).await.expect("metadata"),
        Some(3),
        "{dlq} exists with the source topic's partitions"
    );
    conn.producer
        .send(&dlq, Message::new("dead"))
        .await
        .expect("a dead letter can be published");
    let _ = conn.close().await;
}

#[test]
fn dead_letter_topic_follows_an_existing_topic_on_mock() {
    runtime().block_on(dead_letter_topic_follows_an_existing_topic::<false>());
}

#[test]
fn dead_letter_topic_follows_an_existing_topic_on_broker() {
    runtime().block_on(dead_letter_topic_follows_an_existing_topic::<true>());
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

/// Ack truth: an ack (or release) of a delivery whose partition was revoked
/// meanwhile records nothing, and says so with `Error::NotSettled`.
#[test]
fn settling_after_revocation_is_not_settled() {
    runtime().block_on(async {
        let Some(h) = harness::<false>("settling_after_revocation_is_not_settled").await else {
            return;
        };
        let mut config = h.config.clone();
        config.revoke_timeout = Duration::from_millis(300);
        let conn = h.connect_with(config.clone()).await.expect("connect");
        let topic = h.unique_name("revoked");
        let group = h.unique_name("g");
        conn.consumer.declare_topic(&topic).await.expect("declare topic");
        conn.consumer
            .declare_group(&topic, &group, StartFrom::Latest)
            .await
            .expect("declare group");
        let options = SubscribeOptions::new(&topic).group(&group);
        let mut a = conn
            .consumer
            .subscribe(options.clone())
            .await
            .expect("subscribe A");
        for i in 0..2 {
            conn.producer
                .send(&topic, Message::new(format!("m{i}")).with_key("k"))
                .await
                .expect("send");
        }
        let mut held = Vec::new();
        while held.len() < 2 {
            match tokio::time::timeout(secs(10.0), a.next())
                .await
                .expect("a delivery")
            {
                Some(Ok(Event::Delivery(_, acker))) => held.push(acker),
                Some(Ok(_)) => {}
                other => panic!("A ended: {other:?}"),
            }
        }
        // B joins: A's partitions are revoked (A holds two deliveries past the
        // revoke timeout), then shared out again under a new assignment.
        let conn_b = h.connect_with(config).await.expect("connect B");
        let b = conn_b.consumer.subscribe(options).await.expect("subscribe B");
        let acked = held[0].ack().await;
        assert!(
            matches!(acked, Err(Error::NotSettled { operation: "ack", .. })),
            "an ack after revocation must not claim success: {acked:?}"
        );
        let released = held[1].release(None).await;
        assert!(
            matches!(
                released,
                Err(Error::NotSettled {
                    operation: "release",
                    ..
                })
            ),
            "a release after revocation must not claim success: {released:?}"
        );
        let _ = b.close().await;
        let _ = a.close().await;
        let _ = conn.close().await;
        let _ = conn_b.close().await;
    });
}

/// Issue 12.4: `KafkaConsumer::close` ends its open subscriptions (the trait
/// promises it): `next` returns `None` soon after.
#[test]
fn closing_the_consumer_ends_its_subscriptions() {
    runtime().block_on(async {
        let Some(h) = harness::<false>("closing_the_consumer_ends_its_subscriptions").await else {
            return;
        };
        let conn: Connection = h.connect().await.expect("connect");
        let topic = h.unique_name("closed");
        let mut sub = conn
            .consumer
            .subscribe(SubscribeOptions::new(&topic).group(h.unique_name("g")))
            .await
            .expect("subscribe");
        tokio::time::timeout(secs(10.0), conn.consumer.close())
            .await
            .expect("close in time")
            .expect("close");
        let ended = tokio::time::timeout(secs(10.0), async {
            loop {
                match sub.next().await {
                    None => break,
                    Some(Ok(Event::Delivery(..))) => panic!("a delivery after close"),
                    Some(_) => {}
                }
            }
        })
        .await;
        assert!(
            ended.is_ok(),
            "the subscription is still open after the consumer closed"
        );
        let later = conn
            .consumer
            .subscribe(SubscribeOptions::new(&topic).group(h.unique_name("g")))
            .await;
        assert!(
            matches!(later, Err(Error::Closed(_))),
            "subscribe after close: {:?}",
            later.as_ref().map(|_| "a subscription")
        );
        let _ = sub.close().await;
    });
}

/// Issue 12.4: a broker that refuses the TCP connection is reported at once,
/// not after the whole connect timeout (10 s by default).
#[test]
fn refused_connection_fails_at_once() {
    runtime().block_on(async {
        let port = polybus_conformance::free_port().expect("a free port");
        let started = Instant::now();
        let result = polybus_kafka::connect(&format!("kafka://127.0.0.1:{port}")).await;
        let took = started.elapsed();
        assert!(matches!(result, Err(Error::Connection { .. })), "{result:?}");
        assert!(
            took < Duration::from_secs(2),
            "a refused connection took {took:?}"
        );
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
