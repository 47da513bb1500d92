//! Hostile input (issue 10): records written by producers that are not polybus,
//! through each broker's native client ([`Harness::publish_foreign`]). Each case
//! checks that the group keeps moving, that the record reaches the handler or
//! `<topic>.dlq` byte-exact (or as the documented labelled copy), and that
//! nothing is lost. A broker that cannot carry an input skips the case, saying
//! why.

use std::time::Duration;

use polybus_core::{Delivery, HandlerError, HeaderValue, Headers, Order, dlq_headers, wire};

use crate::cases::dead_letter_listener;
use crate::{CaseResult, Ctx, Foreign, ForeignRecord, Harness, Outcome, Recorder};

/// Publishes every record, or returns the skip for the first the broker cannot carry.
async fn publish_all<H: Harness>(
    cx: &Ctx<H>,
    topic: &str,
    records: &[ForeignRecord],
) -> Result<Option<Outcome>, polybus_core::BoxError> {
    for record in records {
        if let Foreign::Inexpressible(why) = cx.harness().publish_foreign(topic, record).await? {
            return Ok(Some(Outcome::Skipped(why)));
        }
    }
    Ok(None)
}

fn text(d: &Delivery) -> String {
    String::from_utf8_lossy(d.payload()).into_owned()
}

fn headers_of(record: &ForeignRecord) -> Headers {
    record
        .headers
        .iter()
        .map(|(name, value)| {
            let name = String::from_utf8(name.clone()).expect("a decodable name");
            let value = value.clone().map_or(HeaderValue::Null, HeaderValue::from);
            (name, value)
        })
        .collect()
}

/// Binary keys (as Avro- or UUID-keyed topics have) are keys: records of one
/// key run one at a time in order, and a dead-letter copy keeps the key's bytes.
pub async fn foreign_binary_keys_keep_their_lanes<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "binkey").await?;
    let k1 = vec![0u8, 0, 0, 0xff, 0xfe, 7];
    let k2 = vec![0u8, 0, 0, 0xff, 0xfe, 8];
    let records: Vec<ForeignRecord> = (0..4)
        .flat_map(|i| {
            [
                ForeignRecord::new(format!("a-{i}")).key(k1.clone()),
                ForeignRecord::new(format!("b-{i}")).key(k2.clone()),
            ]
        })
        .collect();
    if let Some(skip) = publish_all(&cx, &topic, &records[..1]).await? {
        return Ok(skip);
    }
    let (dead, dlq_handle) = dead_letter_listener(&cx, &conn, &topic).await?;
    let seen = Recorder::new();
    let handler = {
        let seen = seen.clone();
        move |d: Delivery| {
            let seen = seen.clone();
            async move {
                seen.record(&d);
                // Slow enough that a wrong lane would let a key's records overlap.
                tokio::time::sleep(Duration::from_millis(20)).await;
                if text(&d) == "a-3" {
                    return Err(HandlerError::permanent("the last a is refused"));
                }
                Ok(())
            }
        }
    };
    let handle = cx
        .runner(&conn, &topic, &group)
        .order(Order::ByKey)
        .concurrency(8)
        .run(handler)
        .await?;
    publish_all(&cx, &topic, &records[1..]).await?;
    let got = seen.wait_for(8, cx.secs(30.0)).await?;
    let dead_letters = dead.wait_for(1, cx.secs(30.0)).await?;
    let report = handle.shutdown(cx.secs(10.0)).await;
    let _ = dlq_handle.shutdown(cx.secs(10.0)).await;
    for (prefix, key) in [("a-", &k1), ("b-", &k2)] {
        let of_key: Vec<String> = got.iter().map(text).filter(|t| t.starts_with(prefix)).collect();
        let expected: Vec<String> = (0..4).map(|i| format!("{prefix}{i}")).collect();
        assert_eq!(of_key, expected, "one key's records in order");
        assert!(
            got.iter()
                .filter(|d| text(d).starts_with(prefix))
                .all(|d| d.key_bytes().map(|k| &k[..]) == Some(&key[..])),
            "the key's bytes reach the handler"
        );
    }
    assert_eq!(text(&dead_letters[0]), "a-3");
    assert_eq!(
        dead_letters[0].key_bytes().map(|k| &k[..]),
        Some(&k1[..]),
        "the dead-letter copy keeps the binary key"
    );
    assert_eq!((report.handled, report.dead_lettered), (7, 1));
    assert!(cx.eventually_drained(&topic, &group, cx.secs(10.0)).await?);
    Ok(Outcome::Passed)
}

/// Repeated header names, values that are not UTF-8, null and empty values reach
/// the handler as written, and the dead-letter copy keeps them byte-exact.
pub async fn foreign_headers_keep_their_bytes<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "rawhdr").await?;
    let record = ForeignRecord::new("with odd headers")
        .header("dup", Some(b"1"))
        .header("dup", Some(b"2"))
        .header("city", Some(b"Z\xfcrich"))
        .header("nothing", None)
        .header("empty", Some(b""));
    if let Some(skip) = publish_all(&cx, &topic, std::slice::from_ref(&record)).await? {
        return Ok(skip);
    }
    let (dead, dlq_handle) = dead_letter_listener(&cx, &conn, &topic).await?;
    let seen = Recorder::new();
    let handler = {
        let seen = seen.clone();
        move |d: Delivery| {
            let seen = seen.clone();
            async move {
                seen.record(&d);
                Err(HandlerError::permanent("refused to see the dead-letter copy"))
            }
        }
    };
    let handle = cx.runner(&conn, &topic, &group).run(handler).await?;
    let got = seen.wait_for(1, cx.secs(30.0)).await?;
    let dead_letters = dead.wait_for(1, cx.secs(30.0)).await?;
    let _ = handle.shutdown(cx.secs(10.0)).await;
    let _ = dlq_handle.shutdown(cx.secs(10.0)).await;
    let expected = headers_of(&record);
    assert_eq!(
        got[0].message().headers,
        expected,
        "the handler sees the headers as written"
    );
    let copy = &dead_letters[0];
    assert!(copy.dead_letter().and_then(|d| d.stub).is_none(), "an exact copy");
    assert_eq!(
        copy.message().headers,
        expected,
        "the dead-letter copy keeps them"
    );
    assert_eq!(copy.payload(), got[0].payload());
    assert!(cx.eventually_drained(&topic, &group, cx.secs(10.0)).await?);
    Ok(Outcome::Passed)
}

/// A null payload (a Kafka tombstone) is told apart from an empty one, and its
/// dead-letter copy is a tombstone too.
pub async fn foreign_tombstone_is_not_an_empty_payload<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "tomb").await?;
    let tombstone = ForeignRecord {
        payload: None,
        key: Some(b"ride-1".to_vec()),
        headers: vec![(b"kind".to_vec(), Some(b"tombstone".to_vec()))],
    };
    let empty = ForeignRecord::new("")
        .key(b"ride-1".to_vec())
        .header("kind", Some(b"empty"));
    if let Some(skip) = publish_all(&cx, &topic, &[tombstone]).await? {
        return Ok(skip);
    }
    publish_all(&cx, &topic, &[empty]).await?;
    let (dead, dlq_handle) = dead_letter_listener(&cx, &conn, &topic).await?;
    let seen = Recorder::new();
    let handler = {
        let seen = seen.clone();
        move |d: Delivery| {
            let seen = seen.clone();
            async move {
                seen.record(&d);
                if d.is_tombstone() {
                    return Err(HandlerError::permanent(
                        "tombstones go to the dead-letter topic here",
                    ));
                }
                Ok(())
            }
        }
    };
    let handle = cx
        .runner(&conn, &topic, &group)
        .start(polybus_core::StartFrom::Earliest)
        .run(handler)
        .await?;
    let got = seen.wait_for(2, cx.secs(30.0)).await?;
    let dead_letters = dead.wait_for(1, cx.secs(30.0)).await?;
    let _ = handle.shutdown(cx.secs(10.0)).await;
    let _ = dlq_handle.shutdown(cx.secs(10.0)).await;
    let kinds: Vec<(Option<&str>, bool, usize)> = got
        .iter()
        .map(|d| (d.header("kind"), d.is_tombstone(), d.payload().len()))
        .collect();
    assert_eq!(
        kinds,
        vec![(Some("tombstone"), true, 0), (Some("empty"), false, 0)],
        "a null payload is not an empty one"
    );
    assert!(
        dead_letters[0].is_tombstone(),
        "the dead-letter copy is a tombstone too"
    );
    Ok(Outcome::Passed)
}

/// A record polybus cannot decode (a header name that is not UTF-8, which any
/// C, Go or Python Kafka client can write) never reaches the handler, never
/// stops the group: it is dead-lettered as a labelled copy — payload intact, its
/// raw headers in `polybus-dlq-raw-headers` — and the records behind it are
/// handled.
pub async fn foreign_undecodable_record_is_dead_lettered<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "undecod").await?;
    let bad = ForeignRecord::new(b"poison \xff payload".to_vec())
        .key(b"k".to_vec())
        .header(b"\xffname".to_vec(), Some(b"v"))
        .header("fine", Some(b"ok"));
    let records = [
        ForeignRecord::new("before").key(b"k".to_vec()),
        bad.clone(),
        ForeignRecord::new("after").key(b"k".to_vec()),
    ];
    if let Some(skip) = publish_all(&cx, &topic, &records[..1]).await? {
        return Ok(skip);
    }
    if let Some(skip) = publish_all(&cx, &topic, &records[1..]).await? {
        return Ok(skip);
    }
    let (dead, dlq_handle) = dead_letter_listener(&cx, &conn, &topic).await?;
    let seen = Recorder::new();
    let handle = cx
        .runner(&conn, &topic, &group)
        .start(polybus_core::StartFrom::Earliest)
        .run(seen.handler())
        .await?;
    let got = seen.wait_for(2, cx.secs(30.0)).await?;
    let dead_letters = dead.wait_for(1, cx.secs(30.0)).await?;
    tokio::time::sleep(cx.secs(0.5)).await;
    let report = handle.shutdown(cx.secs(10.0)).await;
    let _ = dlq_handle.shutdown(cx.secs(10.0)).await;
    let texts: Vec<String> = seen.all().iter().map(text).collect();
    assert_eq!(
        texts,
        vec!["before", "after"],
        "the handler never sees the bad record"
    );
    assert_eq!(got.len(), 2);
    let copy = &dead_letters[0];
    assert_eq!(
        &copy.payload()[..],
        &bad.payload.clone().unwrap_or_default()[..],
        "payload intact"
    );
    let info = copy.dead_letter().expect("dead-letter headers");
    assert!(info.reason.contains("undecodable"), "{}", info.reason);
    let label = copy
        .message()
        .system_headers
        .get(dlq_headers::RAW_HEADERS)
        .expect("the raw headers travel with the copy");
    assert_eq!(
        wire::parse_raw_headers_label(label),
        Some(bad.headers.clone()),
        "every raw header, byte-exact, in the label"
    );
    assert_eq!((report.handled, report.dead_lettered), (2, 1));
    assert!(report.is_clean(), "{report:?}");
    Ok(Outcome::Passed)
}

/// A record larger than polybus's own `send` accepts — another producer may
/// write up to the broker's limit (a Java Kafka producer 1,048,576 bytes where
/// polybus's `send` stops 16 KiB below `max_message_bytes`) — that the handler
/// refuses is dead-lettered whole, or as a labelled stub where the broker
/// refuses the copy, and the records behind it on the same key are handled.
/// It used to be retried for ever on Kafka, holding the partition.
///
/// The payload is `max_payload` + 8 KiB: every backend keeps at least 16 KiB
/// between `send`'s limit and its broker's (headers, framing).
pub async fn foreign_payload_over_the_send_limit_does_not_stop_the_group<H: Harness>(
    cx: Ctx<H>,
) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "bigforeign").await?;
    let big = vec![b'z'; conn.producer.max_payload() + 8 * 1024];
    let records = [
        ForeignRecord::new("before").key(b"k".to_vec()),
        ForeignRecord::new(big.clone()).key(b"k".to_vec()),
        ForeignRecord::new("after").key(b"k".to_vec()),
    ];
    let (dead, dlq_handle) = dead_letter_listener(&cx, &conn, &topic).await?;
    let seen = Recorder::new();
    let handler = {
        let seen = seen.clone();
        move |d: Delivery| {
            let seen = seen.clone();
            async move {
                if d.payload().len() > 1024 {
                    return Err(HandlerError::permanent("too large for this service"));
                }
                seen.record(&d);
                Ok(())
            }
        }
    };
    let handle = cx
        .runner(&conn, &topic, &group)
        .start(polybus_core::StartFrom::Earliest)
        .order(Order::ByKey)
        .run(handler)
        .await?;
    // Published once the runner listens: core NATS keeps nothing for later.
    if let Some(skip) = publish_all(&cx, &topic, &records).await? {
        let _ = handle.shutdown(cx.secs(10.0)).await;
        let _ = dlq_handle.shutdown(cx.secs(10.0)).await;
        return Ok(skip);
    }
    let got = seen.wait_for(2, cx.secs(30.0)).await?;
    let dead_letters = dead.wait_for(1, cx.secs(30.0)).await?;
    let report = handle.shutdown(cx.secs(10.0)).await;
    let _ = dlq_handle.shutdown(cx.secs(10.0)).await;
    let texts: Vec<String> = got.iter().map(text).collect();
    assert_eq!(
        texts,
        vec!["before", "after"],
        "the records behind it are handled"
    );
    let copy = &dead_letters[0];
    let info = copy.dead_letter().expect("dead-letter headers");
    match &info.stub {
        None => assert!(copy.payload() == &big[..], "a whole copy keeps the payload"),
        Some(label) => assert!(
            label.contains("payload truncated") && big.starts_with(copy.payload()),
            "a stub says what it left out and keeps a prefix: {label}"
        ),
    }
    assert_eq!(
        copy.key_bytes().map(|k| &k[..]),
        Some(&b"k"[..]),
        "the copy keeps the key"
    );
    assert_eq!((report.handled, report.dead_lettered), (2, 1), "{report:?}");
    assert!(report.error().is_none(), "{report:?}");
    Ok(Outcome::Passed)
}
