//! Kafka-specific promises, on the mock cluster (always) and on the real broker
//! of `POLYBUS_TEST_KAFKA_BROKERS` (skipped loudly without it):
//!
//! * a rebalance mid-stream (one of two consumers leaves) loses nothing and
//!   keeps every key in order;
//! * a consumer dropped without shutdown (a crash) is followed by one that
//!   resumes exactly from the committed offsets, with nothing lost.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use polybus_conformance::{Harness, timeout_multiplier};
use polybus_core::{Connection, Delivery, HandlerResult, Message, Order, StartFrom};
use support::{KafkaHarness, harness};

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s * timeout_multiplier())
}

/// What one handler saw: (key, seq, partition, offset) in handling order.
/// (key, seq, partition, offset).
type Entry = (String, usize, i32, u64);

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Entry>>>);

impl Log {
    fn record(&self, d: &Delivery) {
        let seq = d.header("seq").and_then(|s| s.parse().ok()).expect("seq header");
        let origin = d.origin();
        self.0.lock().unwrap().push((
            d.key().unwrap_or_default().to_owned(),
            seq,
            origin.partition.expect("a partition"),
            origin.sequence.expect("an offset"),
        ));
    }

    fn entries(&self) -> Vec<Entry> {
        self.0.lock().unwrap().clone()
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    async fn wait_for(&self, n: usize, within: Duration) {
        let until = tokio::time::Instant::now() + within;
        while self.len() < n {
            assert!(
                tokio::time::Instant::now() < until,
                "only {} of {n} messages handled within {within:?}",
                self.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn message(key: usize, seq: usize) -> Message {
    Message::new(format!("m-{seq}"))
        .with_key(format!("key-{key}"))
        .with_header("seq", seq.to_string())
}

async fn publish(conn: &Connection, topic: &str, range: std::ops::Range<usize>, keys: usize) {
    let messages: Vec<Message> = range.map(|seq| message(seq % keys, seq)).collect();
    for chunk in messages.chunks(100) {
        conn.producer
            .send_batch(topic, chunk.to_vec())
            .await
            .expect("publishing");
    }
}

/// A harness, a connection, and a new topic with a group declared on it (from
/// the latest offset); `None` after a loud SKIP when the broker is missing.
async fn setup<const REAL: bool>(
    test: &str,
    prefix: &str,
) -> Option<(KafkaHarness<REAL>, Connection, String, String)> {
    let h = harness::<REAL>(test).await?;
    let conn = h.connect().await.expect("connect");
    let topic = h.unique_name(prefix);
    conn.consumer.declare_topic(&topic).await.expect("declare topic");
    let group = h.unique_name("g");
    conn.consumer
        .declare_group(&topic, &group, StartFrom::Latest)
        .await
        .expect("declare group");
    Some((h, conn, topic, group))
}

async fn rebalance_mid_stream<const REAL: bool>() {
    let test = "rebalance_mid_stream_loses_nothing_and_keeps_key_order";
    let Some((h, conn, topic, group)) = setup::<REAL>(test, "rebalance").await else {
        return;
    };
    const TOTAL: usize = 2000;
    const KEYS: usize = 24;
    let log = Log::default();
    let runner = |conn: &Connection, log: Log| {
        conn.runner()
            .topic(&topic)
            .group(&group)
            .order(Order::ByKey)
            .concurrency(8)
            .run(move |d: Delivery| {
                let log = log.clone();
                async move {
                    tokio::time::sleep(Duration::from_micros(fastrand_u64(200, 1500))).await;
                    log.record(&d);
                    HandlerResult::Ok(())
                }
            })
    };
    let conn_a = h.connect().await.expect("connect A");
    let conn_b = h.connect().await.expect("connect B");
    let a = runner(&conn_a, log.clone()).await.expect("runner A");
    let b = runner(&conn_b, log.clone()).await.expect("runner B");
    publish(&conn, &topic, 0..TOTAL / 2, KEYS).await;
    log.wait_for(TOTAL / 4, secs(60.0)).await;
    // A leaves mid-stream while messages are in flight and more keep coming.
    let publisher = {
        let (conn, topic) = (conn.clone(), topic.clone());
        tokio::spawn(async move { publish(&conn, &topic, TOTAL / 2..TOTAL, KEYS).await })
    };
    let report_a = a.shutdown(secs(15.0)).await;
    publisher.await.expect("publisher");
    log.wait_for(TOTAL, secs(90.0)).await;
    // Give late duplicates, if any, time to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report_b = b.shutdown(secs(15.0)).await;
    let entries = log.entries();
    let seen: HashSet<usize> = entries.iter().map(|e| e.1).collect();
    assert_eq!(seen.len(), TOTAL, "every message handled (none lost)");
    let mut by_key: HashMap<&str, Vec<usize>> = HashMap::new();
    for (key, seq, _, _) in &entries {
        by_key.entry(key).or_default().push(*seq);
    }
    for (key, seqs) in by_key {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{key} handled in publish order across the rebalance: {seqs:?}"
        );
    }
    polybus_conformance::loud(&format!(
        "INFO {test}: A handled {}, B handled {}, {} duplicates",
        report_a.handled,
        report_b.handled,
        entries.len() - TOTAL
    ));
    assert!(
        report_a.handled > 0 && report_b.handled > 0,
        "both consumers took part"
    );
    let _ = conn.close().await;
    let _ = conn_a.close().await;
    let _ = conn_b.close().await;
}

async fn crash_resumes_from_committed<const REAL: bool>() {
    let test = "dropped_consumer_resumes_from_committed_offsets";
    let Some((h, conn, topic, group)) = setup::<REAL>(test, "crash").await else {
        return;
    };
    const TOTAL: usize = 600;
    publish(&conn, &topic, 0..TOTAL, 8).await;
    let run = |conn: &Connection, log: Log, delay: Duration| {
        conn.runner()
            .topic(&topic)
            .group(&group)
            .concurrency(4)
            .run(move |d: Delivery| {
                let log = log.clone();
                async move {
                    tokio::time::sleep(delay).await;
                    log.record(&d);
                    HandlerResult::Ok(())
                }
            })
    };
    let conn_a = h.connect().await.expect("connect A");
    let first = Log::default();
    let a = run(&conn_a, first.clone(), Duration::from_millis(3))
        .await
        .expect("runner A");
    first.wait_for(TOTAL / 3, secs(60.0)).await;
    // Give a periodic commit the chance to happen, then crash.
    tokio::time::sleep(Duration::from_millis(400)).await;
    h.crash(&a).await;
    // A commit sent just before the crash may still be landing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The crashed member leaves the group; what it committed is the restart point.
    let committed = h
        .admin()
        .committed(&topic, &group)
        .await
        .expect("committed offsets");
    assert!(
        committed.iter().flatten().any(|o| *o > 0),
        "A committed progress before the crash: {committed:?}"
    );
    let second = Log::default();
    let conn_b = h.connect().await.expect("connect B");
    let b = run(&conn_b, second.clone(), Duration::ZERO)
        .await
        .expect("runner B");
    let handled_by_a: HashSet<usize> = first.entries().iter().map(|e| e.1).collect();
    let until = tokio::time::Instant::now() + secs(60.0);
    loop {
        let seen: HashSet<usize> = handled_by_a
            .iter()
            .copied()
            .chain(second.entries().iter().map(|e| e.1))
            .collect();
        if seen.len() == TOTAL {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "lost messages: {} of {TOTAL} handled by A or B",
            seen.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.shutdown(secs(10.0)).await;
    // B started exactly where the group had committed, on every partition.
    let mut first_offsets: HashMap<i32, u64> = HashMap::new();
    for (_, _, partition, offset) in second.entries() {
        let e = first_offsets.entry(partition).or_insert(offset);
        *e = (*e).min(offset);
    }
    for (partition, start) in first_offsets {
        let committed = committed[partition as usize].unwrap_or(0);
        assert_eq!(
            start as i64, committed,
            "partition {partition}: B resumed at {start}, the committed offset is {committed}"
        );
    }
    let redone = second
        .entries()
        .iter()
        .filter(|e| handled_by_a.contains(&e.1))
        .count();
    polybus_conformance::loud(&format!(
        "INFO {test}: A handled {} before the crash, B {}, {redone} handled again (A's uncommitted tail)",
        handled_by_a.len(),
        second.len()
    ));
    let _ = conn.close().await;
    let _ = conn_b.close().await;
}

fn fastrand_u64(lo: u64, hi: u64) -> u64 {
    use std::hash::{BuildHasher, RandomState};
    lo + RandomState::new().hash_one(std::time::Instant::now()) % (hi - lo)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn rebalance_mid_stream_on_mock() {
    runtime().block_on(rebalance_mid_stream::<false>());
}

#[test]
fn rebalance_mid_stream_on_broker() {
    runtime().block_on(rebalance_mid_stream::<true>());
}

#[test]
fn crash_resumes_from_committed_on_mock() {
    runtime().block_on(crash_resumes_from_committed::<false>());
}

#[test]
fn crash_resumes_from_committed_on_broker() {
    runtime().block_on(crash_resumes_from_committed::<true>());
}
