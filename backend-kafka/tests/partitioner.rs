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
    let Some(harness) = support::harness::<REAL>(test).await else {
        return;
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

/// Where kafka-python's own `DefaultPartitioner` puts each key (`k` + hex in,
/// one partition per line out), run by the Python of `POLYBUS_TEST_PYTHON` (a
/// venv with `kafka-python`, made by `scripts/brokers.sh ensure_python_clients`).
fn kafka_python_partitions(python: &str, keys: &[Vec<u8>], partitions: i32) -> Vec<i32> {
    let script = r#"
import sys
from kafka.partitioner.default import DefaultPartitioner
class Cluster:
    def topics(self): return {"t"}
    def partitions_for_topic(self, topic): return set(range(int(sys.argv[1])))
    def available_partitions_for_topic(self, topic): return self.partitions_for_topic(topic)
p = DefaultPartitioner()
for line in sys.stdin.read().split():
    key = bytes.fromhex(line[1:])
    print(p.partition("t", key, key, None, None, Cluster()))
"#;
    use std::io::Write;
    let mut child = std::process::Command::new(python)
        .args(["-c", script, &partitions.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("running kafka-python");
    let input: String = keys
        .iter()
        .map(|k| format!("k{}\n", k.iter().map(|b| format!("{b:02x}")).collect::<String>()))
        .collect();
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write keys");
    let out = child.wait_with_output().expect("kafka-python output");
    assert!(
        out.status.success(),
        "kafka-python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().parse().expect("a partition number"))
        .collect()
}

/// polybus's producer and kafka-python put the same keys — text and binary —
/// on the same partitions (the mock cluster, 4 partitions). Skips loudly
/// without `POLYBUS_TEST_PYTHON`; fails without it under
/// `POLYBUS_TEST_REQUIRE_BROKERS=1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_land_where_kafka_python_puts_them() {
    let test = "keys_land_where_kafka_python_puts_them";
    let Some(python) = polybus_conformance::broker_url("POLYBUS_TEST_PYTHON", test) else {
        return;
    };
    let Setup::Ready(harness) = KafkaHarness::<false>::setup().await else {
        panic!("the mock cluster is always there");
    };
    let conn = harness.connect().await.expect("connect");
    let topic = harness.unique_name("pykeys");
    conn.consumer.declare_topic(&topic).await.expect("declare topic");
    let partitions = harness.config.partitions;
    let mut keys: Vec<Vec<u8>> = (0..40).map(|i| format!("ride-{i}").into_bytes()).collect();
    keys.push(vec![0, 0, 0, 0xff, 0xfe, 7]);
    keys.push(uuid::Uuid::new_v4().as_bytes().to_vec());
    keys.push(Vec::new());
    let expected = kafka_python_partitions(&python, &keys, partitions);
    assert_eq!(expected.len(), keys.len());
    let mut sub = conn
        .consumer
        .subscribe(
            SubscribeOptions::new(&topic)
                .start(StartFrom::Latest)
                .prefetch(64),
        )
        .await
        .expect("subscribe");
    for (i, key) in keys.iter().enumerate() {
        let mut message = Message::new(i.to_string());
        // Binary keys are what other producers write; the dead-letter path
        // publishes them as they are (`publish`, not `send`).
        message.key = Some(polybus_core::Bytes::from(key.clone()));
        conn.producer.publish(&topic, message).await.expect("publish");
    }
    let mut seen = vec![None; keys.len()];
    let until = tokio::time::Instant::now() + Duration::from_secs_f64(30.0 * timeout_multiplier());
    while seen.iter().any(Option::is_none) {
        match tokio::time::timeout_at(until, sub.next()).await {
            Ok(Some(Ok(Event::Delivery(d, acker)))) => {
                let i: usize = String::from_utf8_lossy(d.payload()).parse().expect("index");
                seen[i] = d.origin().partition;
                acker.ack().await.expect("ack");
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("{test}: expected deliveries, got {other:?}"),
        }
    }
    sub.close().await.expect("close");
    let got: Vec<i32> = seen.into_iter().map(|p| p.expect("seen")).collect();
    assert_eq!(got, expected, "polybus and kafka-python agree on every key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_land_where_the_java_client_puts_them_on_mock() {
    keys_land_where_java_puts_them::<false>("keys_land_where_the_java_client_puts_them_on_mock").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_land_where_the_java_client_puts_them_on_broker() {
    keys_land_where_java_puts_them::<true>("keys_land_where_the_java_client_puts_them_on_broker").await;
}
