//! Kafka speaks Kafka's partitioning (issue 10): keyed records go where the Java
//! client (and kafka-python, franz-go) would put them, so polybus and those
//! clients keep one key on one partition. Expected partitions come from the
//! murmur2 values published in Apache Kafka's own tests (`UtilsTest.testMurmur2`)
//! with the Java partitioner's formula `(murmur2(key) & 0x7fffffff) % partitions`
//! — not from code under test. On the mock cluster (always) and on the real
//! broker of `POLYBUS_TEST_KAFKA_BROKERS` (skipped loudly without it).

mod support;

use std::collections::HashMap;
use std::time::Duration;

use polybus_conformance::{Harness, Setup, timeout_multiplier};
use polybus_core::{Event, Message, StartFrom, SubscribeOptions};
use support::KafkaHarness;

/// Kafka's `UtilsTest.testMurmur2` vectors: key → murmur2 (Java `int`).
const JAVA_MURMUR2: &[(&str, i32)] = &[
    ("21", -973_932_308),
    ("foobar", -790_332_482),
    ("a-little-bit-long-string", -985_981_536),
    ("a-little-bit-longer-string", -1_486_304_829),
    ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
    ("abc", 479_470_107),
];

fn java_partition(hash: i32, partitions: i32) -> i32 {
    (hash & 0x7fff_ffff) % partitions
}

async fn keys_land_where_java_puts_them<const REAL: bool>(test: &str) {
    let harness = match KafkaHarness::<REAL>::setup().await {
        Setup::Ready(h) => h,
        Setup::MissingBroker(reason) => {
            assert!(
                !polybus_conformance::brokers_required(),
                "{test}: POLYBUS_TEST_REQUIRE_BROKERS=1 but {reason}"
            );
            polybus_conformance::loud(&format!("SKIP {test} (real broker): {reason}"));
            return;
        }
    };
    let conn = harness.connect().await.expect("connect");
    let topic = harness.unique_name("murmur");
    conn.consumer.declare_topic(&topic).await.expect("declare topic");
    let partitions = harness.config.partitions;
    let mut sub = conn
        .consumer
        .subscribe(
            SubscribeOptions::new(&topic)
                .start(StartFrom::Latest)
                .prefetch(64),
        )
        .await
        .expect("subscribe");
    for round in 0..2 {
        for (key, _) in JAVA_MURMUR2 {
            let message = Message::new(format!("{key}/{round}")).with_key(key);
            conn.producer.send(&topic, message).await.expect("send");
        }
    }
    let mut seen: HashMap<String, Vec<i32>> = HashMap::new();
    let until = tokio::time::Instant::now() + Duration::from_secs_f64(30.0 * timeout_multiplier());
    while seen.values().map(Vec::len).sum::<usize>() < 2 * JAVA_MURMUR2.len() {
        match tokio::time::timeout_at(until, sub.next()).await {
            Ok(Some(Ok(Event::Delivery(d, acker)))) => {
                let key = d.key().expect("a text key").to_owned();
                seen.entry(key)
                    .or_default()
                    .push(d.origin().partition.expect("a partition"));
                acker.ack().await.expect("ack");
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("{test}: expected deliveries, got {other:?} ({seen:?})"),
        }
    }
    sub.close().await.expect("close");
    for (key, hash) in JAVA_MURMUR2 {
        let expected = java_partition(*hash, partitions);
        assert_eq!(
            seen[*key],
            vec![expected, expected],
            "{test}: key {key:?} (murmur2 {hash}) belongs on partition {expected} of {partitions}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_land_where_the_java_client_puts_them_on_mock() {
    keys_land_where_java_puts_them::<false>("keys_land_where_the_java_client_puts_them_on_mock").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_land_where_the_java_client_puts_them_on_broker() {
    keys_land_where_java_puts_them::<true>("keys_land_where_the_java_client_puts_them_on_broker").await;
}
