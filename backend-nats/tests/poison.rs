//! Messages from other NATS clients that async-nats cannot parse, and odd but
//! legal headers (issue 10). Written as raw protocol bytes
//! (`support/foreign.rs`). Skips loudly without `POLYBUS_TEST_NATS_URL`.

mod support;

use std::time::Duration;

use polybus_conformance::{ForeignRecord, Recorder, broker_url};
use polybus_core::{Delivery, HandlerError, HeaderValue, dlq_headers, wire};
use polybus_nats::{CoreConsumer, JetStreamConsumer, Mode};
use support::foreign;

fn url(test: &str) -> Option<String> {
    broker_url(support::URL_ENV, test)
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &polybus_core::Message::new("").id[..8])
}

fn text(d: &Delivery) -> String {
    String::from_utf8_lossy(d.payload()).into_owned()
}

/// JetStream: a header value that is not UTF-8 used to cost the consumer's
/// connection on every delivery (nothing behind it was handled, on any
/// subscription of that connection). Now it is dead-lettered as a labelled copy,
/// acked on the server (the group drains: nothing pending, nothing redelivered
/// after AckWait), and the records behind it — and another topic's runner on
/// the same connection — are handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jetstream_poison_value_is_dead_lettered_and_the_group_moves_on() {
    let Some(url) = url("jetstream_poison_value_is_dead_lettered_and_the_group_moves_on") else {
        return;
    };
    let config = support::test_config(&url, false);
    let admin = JetStreamConsumer::connect(&config).await.unwrap();
    let conn = polybus_nats::connect_with(config.clone()).await.unwrap();
    let (topic, other, group) = (unique("poison"), unique("bystander"), unique("g"));
    for t in [&topic, &other] {
        conn.consumer.declare_topic(t).await.unwrap();
        conn.consumer
            .declare_group(t, &group, polybus_core::StartFrom::Latest)
            .await
            .unwrap();
    }
    let dlq = polybus_core::names::dead_letter_topic(&topic);
    conn.consumer
        .declare_group(&dlq, &group, polybus_core::StartFrom::Earliest)
        .await
        .unwrap();
    let poison = ForeignRecord::new("poison payload \u{1F4A5}")
        .header("X-City", Some(b"Z\xfcrich"))
        .header("fine", Some(b"ok"));
    let mut records = vec![ForeignRecord::new("m-0")];
    records.push(poison.clone());
    records.extend((1..6).map(|i| ForeignRecord::new(format!("m-{i}"))));
    for r in &records {
        foreign::publish(&url, &topic, r, true).await.unwrap();
    }
    let seen = Recorder::new();
    let bystander = Recorder::new();
    let dead = Recorder::new();
    let other_handle = conn
        .runner()
        .topic(&other)
        .group(&group)
        .run(bystander.handler())
        .await
        .unwrap();
    let dlq_handle = conn
        .runner()
        .topic(&dlq)
        .group(&group)
        .run(dead.handler())
        .await
        .unwrap();
    // The poison runner last: the poison costs the shared connection, and a
    // subscribe in flight at that moment times out (retryably).
    let handle = conn
        .runner()
        .topic(&topic)
        .group(&group)
        .concurrency(4)
        .run(seen.handler())
        .await
        .unwrap();
    conn.producer
        .send(&other, polybus_core::Message::new("b-0"))
        .await
        .unwrap();
    let got = seen.wait_for(6, Duration::from_secs(30)).await.unwrap();
    bystander.wait_for(1, Duration::from_secs(30)).await.unwrap();
    let copies = dead.wait_for(1, Duration::from_secs(30)).await.unwrap();
    // Past AckWait (2 s): an ack that did not land would bring it back.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let report = handle.shutdown(Duration::from_secs(10)).await;
    let _ = other_handle.shutdown(Duration::from_secs(10)).await;
    let _ = dlq_handle.shutdown(Duration::from_secs(10)).await;
    let mut texts: Vec<String> = got.iter().map(text).collect();
    texts.sort();
    assert_eq!(texts, (0..6).map(|i| format!("m-{i}")).collect::<Vec<_>>());
    assert_eq!(seen.all().len(), 6, "the handler never sees the poison message");
    assert_eq!(dead.all().len(), 1, "dead-lettered once, not again after AckWait");
    let copy = &copies[0];
    assert_eq!(
        &copy.payload()[..],
        "poison payload \u{1F4A5}".as_bytes(),
        "payload intact"
    );
    let info = copy.dead_letter().expect("dead-letter headers");
    assert!(info.reason.contains("undecodable"), "{}", info.reason);
    let label = copy
        .message()
        .system_headers
        .get(dlq_headers::RAW_HEADERS)
        .expect("raw headers label");
    assert_eq!(wire::parse_raw_headers_label(label), Some(poison.headers.clone()));
    assert_eq!(copy.header("fine"), Some("ok"), "decodable headers stay headers");
    assert_eq!((report.handled, report.dead_lettered), (6, 1));
    assert!(report.is_clean(), "{report:?}");
    assert!(
        admin.is_drained(&topic, &group).await.unwrap(),
        "acked on the server"
    );
    let _ = admin.delete_topic(&topic).await;
    let _ = admin.delete_topic(&other).await;
    let _ = conn.close().await;
}

/// Core NATS: nothing is stored, so a message async-nats cannot parse is lost
/// with the connection (and whatever was behind it in the same read). The loss
/// is counted and logged; the consumer reconnects and handles what comes next;
/// the handler never sees the poison message.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn core_poison_costs_the_connection_and_is_counted() {
    let Some(url) = url("core_poison_costs_the_connection_and_is_counted") else {
        return;
    };
    let config = support::test_config(&url, true);
    let consumer = CoreConsumer::connect(&config).await.unwrap();
    let counter = consumer.drop_counter();
    let producer = polybus_nats::CoreProducer::connect(&config).await.unwrap();
    let conn = polybus_core::Connection {
        producer: std::sync::Arc::new(producer),
        consumer: std::sync::Arc::new(consumer),
    };
    let topic = unique("corepoison");
    let seen = Recorder::new();
    let handle = conn
        .runner()
        .topic(&topic)
        .group("g")
        .run(seen.handler())
        .await
        .unwrap();
    foreign::publish(&url, &topic, &ForeignRecord::new("before"), false)
        .await
        .unwrap();
    seen.wait_for(1, Duration::from_secs(10)).await.unwrap();
    assert_eq!(counter.connection_losses(), 0);
    let poison = ForeignRecord::new("poison").header("X-City", Some(b"Z\xfcrich"));
    foreign::publish(&url, &topic, &poison, false).await.unwrap();
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while counter.connection_losses() == 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(counter.connection_losses(), 1, "the loss is counted");
    // Once reconnected (the subscription is registered again), new messages flow.
    let mut i = 0;
    while seen.all().len() < 2 && tokio::time::Instant::now() < until + Duration::from_secs(10) {
        foreign::publish(&url, &topic, &ForeignRecord::new(format!("after-{i}")), false)
            .await
            .unwrap();
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = handle.shutdown(Duration::from_secs(10)).await;
    let texts: Vec<String> = seen.all().iter().map(text).collect();
    assert!(texts.len() >= 2 && texts[1].starts_with("after-"), "{texts:?}");
    assert!(!texts.iter().any(|t| t == "poison"), "{texts:?}");
    let _ = conn.close().await;
}

/// Header names keep their casing (`X-CITY`, `x-city` and `X-City` are three
/// names), repeated names keep their order, unicode and empty values and a
/// 60 KiB value round-trip to the handler and into the dead-letter copy, on
/// JetStream and core NATS. What does not round-trip, by the NATS clients'
/// reading of the header block: whitespace around a value (trimmed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn odd_headers_round_trip() {
    let Some(url) = url("odd_headers_round_trip") else {
        return;
    };
    // JetStream refuses header blocks over 64 KiB (err_code 10097, checked below).
    let long = "v".repeat(60 * 1024);
    let record = ForeignRecord::new("odd")
        .header("X-CITY", Some(b"upper"))
        .header("x-city", Some(b"lower"))
        .header("X-City", Some(b"mixed"))
        .header("dup", Some(b"1"))
        .header("dup", Some(b"2"))
        .header("unicode", Some("Zürich ✓".as_bytes()))
        .header("empty", Some(b""))
        .header("long", Some(long.as_bytes()))
        .header("padded", Some(b"  in spaces  "));
    for mode in [Mode::JetStream, Mode::Core] {
        let core = mode == Mode::Core;
        let config = support::test_config(&url, core);
        let conn = polybus_nats::connect_with(config.clone()).await.unwrap();
        let (topic, group) = (unique("oddhdr"), unique("g"));
        conn.consumer.declare_topic(&topic).await.unwrap();
        conn.consumer
            .declare_group(&topic, &group, polybus_core::StartFrom::Latest)
            .await
            .unwrap();
        let dlq = polybus_core::names::dead_letter_topic(&topic);
        let dead = Recorder::new();
        let dlq_handle = conn
            .runner()
            .topic(&dlq)
            .group(&group)
            .run(dead.handler())
            .await
            .unwrap();
        let seen = Recorder::new();
        let handler = {
            let seen = seen.clone();
            move |d: Delivery| {
                let seen = seen.clone();
                async move {
                    seen.record(&d);
                    Err(HandlerError::permanent("to see the dead-letter copy"))
                }
            }
        };
        let handle = conn
            .runner()
            .topic(&topic)
            .group(&group)
            .run(handler)
            .await
            .unwrap();
        foreign::publish(&url, &topic, &record, !core).await.unwrap();
        let got = seen.wait_for(1, Duration::from_secs(15)).await.unwrap();
        let copies = dead.wait_for(1, Duration::from_secs(15)).await.unwrap();
        let _ = handle.shutdown(Duration::from_secs(10)).await;
        let _ = dlq_handle.shutdown(Duration::from_secs(10)).await;
        for d in [&got[0], &copies[0]] {
            let h = &d.message().headers;
            let values = |name: &str| -> Vec<String> {
                h.get_all(name)
                    .filter_map(HeaderValue::as_str)
                    .map(str::to_owned)
                    .collect()
            };
            assert_eq!(values("X-CITY"), ["upper"], "{mode:?}");
            assert_eq!(values("x-city"), ["lower"], "{mode:?}");
            assert_eq!(values("X-City"), ["mixed"], "{mode:?}");
            assert_eq!(values("dup"), ["1", "2"], "{mode:?}");
            assert_eq!(values("unicode"), ["Zürich ✓"], "{mode:?}");
            assert_eq!(values("empty"), [""], "{mode:?}");
            assert_eq!(values("long"), std::slice::from_ref(&long), "{mode:?}");
            assert_eq!(values("padded"), ["in spaces"], "{mode:?}: trimmed by the client");
        }
        if !core {
            let too_long = ForeignRecord::new("x").header("long", Some("v".repeat(64 * 1024).as_bytes()));
            let refused = foreign::publish(&url, &topic, &too_long, true).await.unwrap_err();
            assert!(refused.to_string().contains("10097"), "{refused}");
            let admin = JetStreamConsumer::connect(&config).await.unwrap();
            let _ = admin.delete_topic(&topic).await;
        }
        let _ = conn.close().await;
    }
}
