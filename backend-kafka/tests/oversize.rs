//! A record from another producer that is larger than polybus's own producer
//! accepts (a Java producer may write 1,048,576 bytes, more with compression;
//! polybus's `send` caps at `max_message_bytes` − 16 KiB) and that the handler
//! rejects. It used to be retried for ever, holding the partition's commit;
//! then it was dead-lettered as a labelled stub; now its dead-letter copy is
//! whole, through the producer's oversize path (the broker's limit decides),
//! and the records behind it are handled (issue 10). On the mock cluster
//! (always) and on the real broker of `POLYBUS_TEST_KAFKA_BROKERS` (skipped
//! loudly without it).

mod support;

use std::time::Duration;

use polybus_conformance::{Harness, Recorder, timeout_multiplier};
use polybus_core::{Delivery, HandlerError, StartFrom};

async fn oversized_foreign_record_is_dead_lettered_whole<const REAL: bool>(test: &str) {
    let Some(harness) = support::harness::<REAL>(test).await else {
        return;
    };
    let secs = |s: f64| Duration::from_secs_f64(s * timeout_multiplier());
    let conn = harness.connect().await.expect("connect");
    let topic = harness.unique_name("oversize");
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
    let huge = vec![b'x'; 1_048_576];
    assert!(
        huge.len() > conn.producer.max_payload(),
        "bigger than polybus sends"
    );
    for payload in [b"before".to_vec(), huge.clone(), b"after".to_vec()] {
        let record = polybus_conformance::ForeignRecord::new(payload).key(b"k".to_vec());
        harness
            .publish_foreign(&topic, &record)
            .await
            .expect("foreign produce");
    }
    let handled = Recorder::new();
    let handler = {
        let handled = handled.clone();
        move |d: Delivery| {
            let handled = handled.clone();
            async move {
                if d.payload().len() > 1000 {
                    return Err(HandlerError::permanent("too big for this service"));
                }
                handled.record(&d);
                Ok(())
            }
        }
    };
    let dead = Recorder::new();
    let dlq_handle = conn
        .runner()
        .topic(&dlq)
        .group("g")
        .run(dead.handler())
        .await
        .expect("dlq runner");
    let handle = conn
        .runner()
        .topic(&topic)
        .group("g")
        .run(handler)
        .await
        .expect("runner");
    let got = handled
        .wait_for(2, secs(30.0))
        .await
        .expect("the records behind it are handled");
    let copies = dead.wait_for(1, secs(30.0)).await.expect("a dead letter");
    let report = handle.shutdown(secs(10.0)).await;
    let _ = dlq_handle.shutdown(secs(10.0)).await;
    let texts: Vec<&[u8]> = got.iter().map(|d| &d.payload()[..]).collect();
    assert_eq!(texts, vec![&b"before"[..], &b"after"[..]]);
    let info = copies[0].dead_letter().expect("dead-letter headers");
    assert_eq!(info.stub, None, "a whole copy, not a labelled stub: {info:?}");
    assert!(
        copies[0].payload() == &huge[..],
        "the copy's payload is the record's ({} bytes, expected {})",
        copies[0].payload().len(),
        huge.len()
    );
    assert_eq!(copies[0].key(), Some("k"));
    assert_eq!((report.handled, report.dead_lettered), (2, 1), "{report:?}");
    assert!(report.error().is_none(), "{report:?}");
    conn.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_foreign_record_is_dead_lettered_whole_on_mock() {
    oversized_foreign_record_is_dead_lettered_whole::<false>(
        "oversized_foreign_record_is_dead_lettered_whole_on_mock",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_foreign_record_is_dead_lettered_whole_on_broker() {
    oversized_foreign_record_is_dead_lettered_whole::<true>(
        "oversized_foreign_record_is_dead_lettered_whole_on_broker",
    )
    .await;
}
