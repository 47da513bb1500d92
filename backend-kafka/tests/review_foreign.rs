//! Hostile review of issue 10 on the mock cluster: bytes a native Kafka client
//! can write that the byte-exact model must keep (or label), never lie about.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use polybus_conformance::{ForeignRecord, Harness, Recorder, Setup, timeout_multiplier};
use polybus_core::{
    Delivery, Event, HandlerError, HeaderValue, Message, StartFrom, SubscribeOptions, dlq_headers, wire,
};
use support::KafkaHarness;

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s * timeout_multiplier())
}

/// Writes `records` with the foreign producer, runs a group whose handler
/// rejects (permanently) every record whose payload starts with `bad`, and
/// returns what the handler saw and what reached `<topic>.dlq`.
async fn run(records: Vec<ForeignRecord>, handled: usize, dead: usize) -> (Vec<Delivery>, Vec<Delivery>) {
    let Setup::Ready(harness) = KafkaHarness::<false>::setup().await else {
        panic!("the mock cluster is always there")
    };
    let conn = harness.connect().await.expect("connect");
    let topic = harness.unique_name("review");
    conn.consumer.declare_topic(&topic).await.expect("declare topic");
    conn.consumer
        .declare_group(&topic, "g", StartFrom::Latest)
        .await
        .expect("declare group");
    let dlq = polybus_core::names::dead_letter_topic(&topic);
    conn.consumer
        .declare_group(&dlq, "g", StartFrom::Earliest)
        .await
        .expect("declare the dead-letter group");
    for record in records {
        harness
            .publish_foreign(&topic, &record)
            .await
            .expect("foreign produce");
    }
    let seen = Recorder::new();
    let handler = {
        let seen = seen.clone();
        move |d: Delivery| {
            let seen = seen.clone();
            async move {
                seen.record(&d);
                if d.payload().starts_with(b"bad") {
                    return Err(HandlerError::permanent("rejected"));
                }
                Ok(())
            }
        }
    };
    let dead_seen = Recorder::new();
    let dlq_handle = conn
        .runner()
        .topic(&dlq)
        .group("g")
        .run(dead_seen.handler())
        .await
        .expect("dlq runner");
    let handle = conn
        .runner()
        .topic(&topic)
        .group("g")
        .run(handler)
        .await
        .expect("runner");
    let got = if handled > 0 {
        seen.wait_for(handled, secs(30.0)).await.expect("handled")
    } else {
        Vec::new()
    };
    let copies = if dead > 0 {
        dead_seen.wait_for(dead, secs(30.0)).await.expect("dead letters")
    } else {
        Vec::new()
    };
    let report = handle.shutdown(secs(10.0)).await;
    let _ = dlq_handle.shutdown(secs(10.0)).await;
    assert!(report.error().is_none(), "{report:?}");
    conn.close().await.expect("close");
    (got, copies)
}

/// Every header of a dead-letter copy as raw bytes: the user headers and the
/// foreign `polybus-` headers (not the runner's `polybus-dlq-*` ones), or the
/// raw label of an undecodable record.
fn raw_headers_of(copy: &Delivery) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let m = copy.message();
    if let Some(label) = m.system_headers.get(dlq_headers::RAW_HEADERS) {
        return wire::parse_raw_headers_label(label).expect("a label");
    }
    m.headers
        .iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().map(<[u8]>::to_vec)))
        .collect()
}

/// A Java producer can write a header key with U+0000 in it (`"a\u0000b"`,
/// valid UTF-8: bytes `61 00 62`); a C client can write any bytes. librdkafka
/// parses the name with its length, but `rd_kafka_header_get_all` hands it out
/// as a C string, so `CStr` stopped at the NUL: the record reached the
/// handler (and `<topic>.dlq`) with its header silently renamed to `a`.
/// `raw_headers` now reads the name's length (see its module doc).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn header_name_with_nul_is_not_truncated() {
    let record = ForeignRecord::new("bad-nul")
        .key(b"k".to_vec())
        .header(b"a\0b".to_vec(), Some(b"v"))
        .header(b"n\0".to_vec(), None);
    let (seen, copies) = run(vec![record, ForeignRecord::new("after").key(b"k".to_vec())], 1, 1).await;
    for d in &seen {
        assert!(
            !d.message().headers.contains_key("a") && !d.message().headers.contains_key("n"),
            "the handler saw a truncated header name: {:?}",
            d.message().headers
        );
    }
    assert_eq!(
        raw_headers_of(&copies[0]),
        vec![(b"a\0b".to_vec(), Some(b"v".to_vec())), (b"n\0".to_vec(), None)],
        "the dead-letter copy must keep the header names' bytes ({:?})",
        copies[0].dead_letter()
    );
}

/// librdkafka refuses to parse a header block of more than 100,000 headers
/// (`RD_KAFKA_RESP_ERR__BAD_MSG`); a Java producer can write 100,001 (3 bytes
/// each). `raw_headers::read` took the error for "no headers": the handler
/// saw the record without any header and its dead-letter copy had none.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unparsable_header_block_is_not_read_as_no_headers() {
    let mut record = ForeignRecord::new("bad-many").key(b"k".to_vec());
    record.headers = (0..100_001).map(|_| (b"h".to_vec(), None)).collect();
    let (seen, copies) = run(vec![record, ForeignRecord::new("after").key(b"k".to_vec())], 1, 1).await;
    for d in &seen {
        assert_ne!(
            d.payload(),
            "bad-many",
            "the handler saw a record whose headers were lost"
        );
    }
    let info = copies[0].dead_letter().expect("dead-letter headers");
    assert!(
        info.reason.contains("undecodable") && info.reason.contains("header"),
        "the dead letter says the headers could not be read: {info:?} ({} headers)",
        copies[0].message().headers.len()
    );
}

/// A foreign record with its own `polybus-key` header: the record's key is the
/// key (lanes, partition of the dead-letter copy), and the header is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn foreign_polybus_key_header_does_not_replace_the_record_key() {
    let records = vec![
        ForeignRecord::new("bad-key")
            .key(b"real".to_vec())
            .header(b"polybus-key".to_vec(), Some(b"fake")),
        ForeignRecord::new("bad-nullkey")
            .key(b"real2".to_vec())
            .header(b"polybus-key".to_vec(), None),
    ];
    let (seen, copies) = run(records, 2, 2).await;
    for d in seen.iter().chain(&copies) {
        let expected: &[u8] = if d.payload().ends_with(b"nullkey") {
            b"real2"
        } else {
            b"real"
        };
        assert_eq!(
            d.key_bytes().map(|k| &k[..]),
            Some(expected),
            "{:?}: the record's key, not the polybus-key header",
            d.payload()
        );
    }
    for copy in &copies {
        assert_eq!(
            copy.message().system_headers.get_all(wire::KEY).count(),
            1,
            "the copy keeps the foreign polybus-key header: {:?}",
            copy.message().system_headers
        );
    }
}

/// A foreign `polybus-ts` header is not the record's timestamp, and is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn foreign_polybus_ts_header_does_not_replace_the_record_timestamp() {
    let before = SystemTime::now() - Duration::from_secs(60);
    let records = vec![
        ForeignRecord::new("bad-ts")
            .key(b"k".to_vec())
            .header(b"polybus-ts".to_vec(), Some(b"5")),
    ];
    let (seen, copies) = run(records, 1, 1).await;
    assert!(
        seen[0].message().timestamp > before,
        "the record's timestamp, not polybus-ts: {:?}",
        seen[0].message().timestamp.duration_since(UNIX_EPOCH)
    );
    assert_eq!(
        copies[0].message().system_headers.get(wire::TIMESTAMP),
        Some("5"),
        "the copy keeps the foreign polybus-ts header: {:?}",
        copies[0].message().system_headers
    );
}

/// A foreign `polybus-id` header that cannot be an id (not UTF-8, or
/// repeated) is kept byte-exact in the dead-letter copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn foreign_polybus_id_header_that_is_not_an_id_is_kept() {
    let records = vec![
        ForeignRecord::new("bad-id")
            .key(b"k".to_vec())
            .header(b"polybus-id".to_vec(), Some(&[0xff, 0xfe][..])),
    ];
    let (_seen, copies) = run(records, 1, 1).await;
    let ids: Vec<&HeaderValue> = copies[0].message().system_headers.get_all(wire::ID).collect();
    assert_eq!(
        ids,
        vec![&HeaderValue::from(vec![0xffu8, 0xfe])],
        "the copy keeps the foreign polybus-id bytes (id {:?})",
        copies[0].id()
    );
}

/// Repeated names with a null between them, a 1 MiB header value, a tombstone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repeated_nulls_big_values_and_tombstones_are_kept() {
    let mut tomb = ForeignRecord::new("").key(b"t".to_vec());
    tomb.payload = None;
    let records = vec![
        ForeignRecord::new("bad-dup")
            .key(b"k".to_vec())
            .header(b"x".to_vec(), Some(b"1"))
            .header(b"x".to_vec(), None)
            .header(b"x".to_vec(), Some(b""))
            .header(b"".to_vec(), Some(b"empty name")),
        ForeignRecord::new("bad-big")
            .key(b"k".to_vec())
            .header(b"big".to_vec(), Some(&vec![7u8; 1 << 20][..])),
        tomb,
        ForeignRecord::new("after").key(b"k".to_vec()),
    ];
    let (seen, copies) = run(records, 4, 2).await;
    let dup = copies
        .iter()
        .find(|c| c.payload() == "bad-dup")
        .expect("dup copy");
    assert_eq!(
        dup.message().headers.get_all("x").collect::<Vec<_>>(),
        vec![
            &HeaderValue::from("1"),
            &HeaderValue::Null,
            &HeaderValue::from("")
        ]
    );
    assert_eq!(dup.message().headers.get(""), Some("empty name"));
    let big = copies
        .iter()
        .find(|c| c.payload().starts_with(b"bad-big"))
        .expect("big copy");
    let info = big.dead_letter().expect("dead-letter headers");
    assert!(
        info.stub.is_some()
            || big
                .message()
                .headers
                .get_value("big")
                .and_then(HeaderValue::as_bytes)
                .map(<[u8]>::len)
                == Some(1 << 20),
        "{info:?}"
    );
    assert!(seen.iter().any(|d| d.is_tombstone() && d.key() == Some("t")));
}

/// An empty key is a key: every record with it lands on one partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn empty_key_always_lands_on_one_partition() {
    let Setup::Ready(harness) = KafkaHarness::<false>::setup().await else {
        panic!("the mock cluster is always there")
    };
    let conn = harness.connect().await.expect("connect");
    let topic = harness.unique_name("emptykey");
    conn.consumer.declare_topic(&topic).await.expect("declare topic");
    let mut sub = conn
        .consumer
        .subscribe(
            SubscribeOptions::new(&topic)
                .start(StartFrom::Latest)
                .prefetch(64),
        )
        .await
        .expect("subscribe");
    for i in 0..24 {
        conn.producer
            .send(&topic, Message::new(format!("{i}")).with_key(""))
            .await
            .expect("send");
    }
    let mut partitions = Vec::new();
    let until = tokio::time::Instant::now() + secs(30.0);
    while partitions.len() < 24 {
        match tokio::time::timeout_at(until, sub.next()).await {
            Ok(Some(Ok(Event::Delivery(d, acker)))) => {
                assert_eq!(
                    d.key_bytes().map(|k| k.len()),
                    Some(0),
                    "an empty key, not no key"
                );
                partitions.push(d.origin().partition.expect("a partition"));
                acker.ack().await.expect("ack");
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("expected deliveries, got {other:?}"),
        }
    }
    sub.close().await.expect("close");
    partitions.dedup();
    assert_eq!(
        partitions.len(),
        1,
        "one partition for the empty key: {partitions:?}"
    );
    conn.close().await.expect("close");
}
