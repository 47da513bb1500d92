//! Poison messages (issue 10): AMQP messages lapin cannot parse (a header name
//! or `message_id` that is not UTF-8, written by a foreign publisher) never
//! stop a group silently. On a quorum group queue the broker's delivery limit
//! moves them to `<topic>.dlq` and the messages around them are handled; on a
//! classic queue the runner ends with a clear, non-retryable error. Skips
//! loudly without `POLYBUS_TEST_AMQP_URL`.

use std::time::{Duration, Instant};

use polybus_conformance::{Recorder, broker_url};
use polybus_core::{Delivery, Message, Order, StartFrom};
use polybus_rabbitmq::{QueueType, RabbitConfig, RabbitConsumer, group_queue};

#[path = "support/amqp_raw.rs"]
mod amqp_raw;

use amqp_raw::{RawMessage, Target, Value};

fn config(test: &str) -> Option<(RabbitConfig, Target)> {
    let url = broker_url("POLYBUS_TEST_AMQP_URL", test)?;
    Some((RabbitConfig::new(&url).unwrap(), Target::from_url(&url)))
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &Message::new("").id[..8])
}

fn text(d: &Delivery) -> String {
    String::from_utf8_lossy(d.payload()).into_owned()
}

/// Ready messages in `queue` (a passive declare), `None` if it does not exist.
async fn ready_in(config: &RabbitConfig, queue: &str) -> Option<u32> {
    let connection = lapin::Connection::connect(&config.url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let found = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .ok()
        .map(|q| q.message_count());
    let _ = connection.close(200, "bye".into()).await;
    found
}

/// `before-0..3`, the poison message, `after-0..after`, all with key `k`.
fn around(poison: RawMessage, after: usize) -> Vec<RawMessage> {
    let plain = |name: String| RawMessage::new(name).header("polybus-key", Value::LongStr(b"k".to_vec()));
    let mut messages: Vec<RawMessage> = (0..3).map(|i| plain(format!("before-{i}"))).collect();
    messages.push(poison.header("polybus-key", Value::LongStr(b"k".to_vec())));
    messages.extend((0..after).map(|i| plain(format!("after-{i}"))));
    messages
}

/// On a quorum group queue (delivery limit 3 here, to keep the test short), the
/// poison message is delivered limit + 1 times, each time dropping lapin's
/// connection, then the broker dead-letters it to `<topic>.dlq`; every message
/// before and after it is handled exactly as published, none is counted out of
/// its own delivery limit, and the runner never fails.
async fn quorum_case(test: &str, poison: RawMessage, after: usize, concurrency: usize) {
    let Some((config, target)) = config(test) else {
        return;
    };
    let config = config.delivery_limit(Some(3));
    let topic = unique("poison");
    let conn = polybus_rabbitmq::connect_with(config.clone()).await.unwrap();
    conn.consumer
        .declare_group(&topic, "g", StartFrom::Latest)
        .await
        .unwrap();
    amqp_raw::publish(&target, &topic, &around(poison, after))
        .await
        .unwrap();
    let seen = Recorder::new();
    let last = format!("after-{}", after - 1);
    let handle = conn
        .runner()
        .topic(&topic)
        .group("g")
        .order(Order::ByKey)
        .concurrency(concurrency)
        .buffer(1)
        .run(seen.handler())
        .await
        .unwrap();
    let started = Instant::now();
    while !seen.all().iter().any(|d| text(d) == last) && started.elapsed() < Duration::from_secs(40) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A few reconnects (delivery limit 3): seconds, not a settle timeout.
    let took = started.elapsed();
    let mut dead = None;
    for _ in 0..100 {
        dead = ready_in(&config, &format!("{topic}.dlq")).await;
        if dead == Some(1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let error = handle.error();
    let report = handle.shutdown(Duration::from_secs(10)).await;
    let left = ready_in(&config, &group_queue(&topic, "g")).await;
    let admin = RabbitConsumer::connect(&config).await.unwrap();
    let _ = admin.delete_topic(&topic, &[group_queue(&topic, "g")]).await;
    let _ = admin.delete_topic(&format!("{topic}.dlq"), &[]).await;
    let texts: Vec<String> = seen.all().iter().map(text).collect();
    let mut distinct: Vec<&String> = Vec::new();
    for t in &texts {
        if !distinct.contains(&t) {
            distinct.push(t);
        }
    }
    let expected: Vec<String> = (0..3)
        .map(|i| format!("before-{i}"))
        .chain((0..after).map(|i| format!("after-{i}")))
        .collect();
    assert_eq!(
        distinct,
        expected.iter().collect::<Vec<_>>(),
        "every message around the poison one is handled, in key order: {texts:?}"
    );
    // The messages lapin had handed out before it failed on the poison one lose
    // their acks with the connection and come back once (at-least-once); after
    // that, prefetch 1 keeps them from being delivered again with it.
    for t in &distinct {
        let times = texts.iter().filter(|x| x == t).count();
        let most = if t.starts_with("before-") { 2 } else { 1 };
        assert!(times <= most, "{t} handled {times} times: {texts:?}");
    }
    assert!(error.is_none(), "the runner keeps going: {error:?}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert_eq!(
        (dead, left),
        (Some(1), Some(0)),
        "only the poison message is in {topic}.dlq; the group is drained"
    );
    // Only the acks lost with the first connection failed to settle.
    assert!(
        report.dead_lettered == 0 && report.settle_failures <= 3 && report.ended.is_some(),
        "{report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_name_that_is_not_utf8_is_dead_lettered_by_the_broker_on_quorum_queues() {
    quorum_case(
        "a_header_name_that_is_not_utf8_is_dead_lettered_by_the_broker_on_quorum_queues",
        RawMessage::new("poison").header(b"\xffname".to_vec(), Value::LongStr(b"v".to_vec())),
        3,
        4,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_id_that_is_not_utf8_is_dead_lettered_by_the_broker_on_quorum_queues() {
    quorum_case(
        "a_message_id_that_is_not_utf8_is_dead_lettered_by_the_broker_on_quorum_queues",
        RawMessage::new("poison").message_id(b"id-\xfe\xff".to_vec()),
        3,
        4,
    )
    .await;
}

/// After the poison message, the subscription goes back to the runner's full
/// prefetch (4 here: concurrency 1, buffer 1, backoff room 2) once it has
/// received that many messages with prefetch 1; the 40 messages behind it are
/// all handled once, in order, across that switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_prefetch_comes_back_after_a_poison_message() {
    quorum_case(
        "the_full_prefetch_comes_back_after_a_poison_message",
        RawMessage::new("poison").header(b"\xffname".to_vec(), Value::LongStr(b"v".to_vec())),
        40,
        1,
    )
    .await;
}

/// A classic group queue has no delivery limit: no route can move the poison
/// message, so after a bounded number of connection losses at the same point
/// the runner fails with a non-retryable error that says what happened,
/// instead of reconnecting forever. The message stays in the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_on_a_classic_queue_fails_the_runner_loudly() {
    let Some((config, target)) = config("a_poison_message_on_a_classic_queue_fails_the_runner_loudly") else {
        return;
    };
    let config = config.queue_type(QueueType::Classic);
    let topic = unique("poisonc");
    let conn = polybus_rabbitmq::connect_with(config.clone()).await.unwrap();
    conn.consumer
        .declare_group(&topic, "g", StartFrom::Latest)
        .await
        .unwrap();
    let poison = RawMessage::new("poison").header(b"\xffname".to_vec(), Value::LongStr(b"v".to_vec()));
    amqp_raw::publish(&target, &topic, &around(poison, 3))
        .await
        .unwrap();
    let seen = Recorder::new();
    let handle = conn
        .runner()
        .topic(&topic)
        .group("g")
        .run(seen.handler())
        .await
        .unwrap();
    let started = Instant::now();
    while handle.error().is_none() && started.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let error = handle.error();
    let report = handle.shutdown(Duration::from_secs(10)).await;
    let left = ready_in(&config, &group_queue(&topic, "g")).await;
    let admin = RabbitConsumer::connect(&config).await.unwrap();
    let _ = admin.delete_topic(&topic, &[group_queue(&topic, "g")]).await;
    let _ = admin.delete_topic(&format!("{topic}.dlq"), &[]).await;
    let error = error.expect("the runner fails instead of reconnecting forever");
    assert!(!error.is_retryable(), "{error}");
    let message = error.to_string();
    assert!(
        message.contains("cannot parse") && message.contains(&group_queue(&topic, "g")),
        "the error says what happened and where: {message}"
    );
    let texts: Vec<String> = seen.all().iter().map(text).collect();
    assert!(
        texts.iter().all(|t| t.starts_with("before-")),
        "nothing behind the poison message: {texts:?}"
    );
    assert!(!report.is_clean());
    assert_eq!(
        left,
        Some(4),
        "the poison message and those behind it stay queued"
    );
}

/// Typed AMQP header values from a foreign publisher: handlers see scalars as
/// exact text (byte arrays as their bytes, void as null), and the dead-letter
/// copy in `<topic>.dlq` has each scalar back in its AMQP type (through the
/// `polybus-amqp-types` label); tables and arrays reach both as text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_header_values_are_text_for_handlers_and_typed_in_dead_letters() {
    use lapin::types::{AMQPValue, ByteArray, DecimalValue};
    let Some((config, target)) =
        config("typed_header_values_are_text_for_handlers_and_typed_in_dead_letters")
    else {
        return;
    };
    let topic = unique("typed");
    let conn = polybus_rabbitmq::connect_with(config.clone()).await.unwrap();
    conn.consumer
        .declare_group(&topic, "g", StartFrom::Latest)
        .await
        .unwrap();
    // (name, as written, as the handler sees it, as the dead-letter copy holds it)
    let long = |s: &str| AMQPValue::LongString(s.into());
    let cases: Vec<(&str, Value, Option<&[u8]>, AMQPValue)> = vec![
        ("bool", Value::Bool(true), Some(b"true"), AMQPValue::Boolean(true)),
        ("i8", Value::I8(-8), Some(b"-8"), AMQPValue::ShortShortInt(-8)),
        ("u8", Value::U8(200), Some(b"200"), AMQPValue::ShortShortUInt(200)),
        ("i16", Value::I16(-300), Some(b"-300"), AMQPValue::ShortInt(-300)),
        (
            "u16",
            Value::U16(60_000),
            Some(b"60000"),
            AMQPValue::ShortUInt(60_000),
        ),
        ("i32", Value::I32(-5), Some(b"-5"), AMQPValue::LongInt(-5)),
        (
            "u32",
            Value::U32(4_000_000_000),
            Some(b"4000000000"),
            AMQPValue::LongUInt(4_000_000_000),
        ),
        (
            "i64",
            Value::I64(-9_000_000_000),
            Some(b"-9000000000"),
            AMQPValue::LongLongInt(-9_000_000_000),
        ),
        ("f32", Value::F32(0.1), Some(b"0.1"), AMQPValue::Float(0.1)),
        (
            "f64",
            Value::F64(-2.5e-8),
            Some(b"-0.000000025"),
            AMQPValue::Double(-2.5e-8),
        ),
        (
            "price",
            Value::Decimal {
                scale: 2,
                value: 1250,
            },
            Some(b"12.50"),
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 1250,
            }),
        ),
        (
            "ts",
            Value::Timestamp(1_700_000_000),
            Some(b"1700000000"),
            AMQPValue::Timestamp(1_700_000_000),
        ),
        (
            "blob",
            Value::Bytes(vec![0, 0xff, 1]),
            Some(b"\x00\xff\x01"),
            AMQPValue::ByteArray(ByteArray::from(vec![0, 0xff, 1])),
        ),
        (
            "city",
            Value::LongStr(b"Z\xfcrich".to_vec()),
            Some(b"Z\xfcrich"),
            AMQPValue::LongString(b"Z\xfcrich".to_vec().into()),
        ),
        ("nothing", Value::Void, None, AMQPValue::Void),
        ("empty", Value::LongStr(Vec::new()), Some(b""), long("")),
    ];
    let mut message = RawMessage::new("typed");
    for (name, value, _, _) in &cases {
        message = message.header(name.as_bytes().to_vec(), value.clone());
    }
    message = message
        .header("nested", Value::Table(vec![(b"a".to_vec(), Value::I32(1))]))
        .header(
            "list",
            Value::Array(vec![Value::I32(1), Value::LongStr(b"x".to_vec())]),
        );
    amqp_raw::publish(&target, &topic, &[message]).await.unwrap();
    let seen = Recorder::new();
    let handler = {
        let seen = seen.clone();
        move |d: Delivery| {
            let seen = seen.clone();
            async move {
                seen.record(&d);
                Err(polybus_core::HandlerError::permanent(
                    "to see the dead-letter copy",
                ))
            }
        }
    };
    let handle = conn.runner().topic(&topic).group("g").run(handler).await.unwrap();
    let got = seen.wait_for(1, Duration::from_secs(20)).await;
    let dlq = format!("{topic}.dlq");
    for _ in 0..100 {
        if ready_in(&config, &dlq).await == Some(1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = handle.shutdown(Duration::from_secs(10)).await;
    let connection = lapin::Connection::connect(&config.url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let copy = channel
        .basic_get(
            dlq.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap();
    let _ = connection.close(200, "bye".into()).await;
    let admin = RabbitConsumer::connect(&config).await.unwrap();
    let _ = admin.delete_topic(&topic, &[group_queue(&topic, "g")]).await;
    let _ = admin.delete_topic(&dlq, &[]).await;
    let got = got.expect("the handler saw the message");
    let copy = copy.expect("the dead-letter copy is in the queue");
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    let message = got[0].message();
    let table = copy.properties.headers().clone().unwrap_or_default();
    for (name, _, text, typed) in &cases {
        let seen_value = message
            .headers
            .get_value(name)
            .unwrap_or_else(|| panic!("{name} reaches the handler"));
        assert_eq!(seen_value.as_bytes(), *text, "{name} as the handler sees it");
        assert_eq!(
            table.inner().get(*name),
            Some(typed),
            "{name} in the dead-letter copy"
        );
    }
    assert!(
        message.headers.get("nested").is_some_and(|t| t.contains('a')),
        "a table reaches the handler as text: {:?}",
        message.headers.get("nested")
    );
    for name in ["nested", "list"] {
        let text = message.headers.get(name).unwrap().to_owned();
        assert_eq!(
            table.inner().get(name),
            Some(&long(&text)),
            "{name} travels as its text"
        );
    }
    assert!(
        table.inner().get("polybus-amqp-types").is_none(),
        "the label itself is not published"
    );
}
