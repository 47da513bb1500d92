//! The conformance cases. Each is a public async function over the core traits;
//! [`conformance_suite!`](crate::conformance_suite) turns each into a test.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use polybus_core::{
    Connection, Delivery, Error, Event, HandlerError, HandlerResult, Message, NameKind, Order, RetryPolicy,
    StartFrom, SubscribeOptions,
};

use crate::{CaseResult, Ctx, Harness, Outcome, Recorder};

pub use crate::fault_cases::*;
pub use crate::foreign_cases::*;
pub use crate::lag_cases::*;
#[cfg(feature = "opentelemetry")]
pub use crate::trace_cases::trace_crosses_the_broker;

/// A message sent inside a span is handled inside a span of the same trace
/// (needs this crate's `opentelemetry` feature; skipped loudly without it).
#[cfg(not(feature = "opentelemetry"))]
pub async fn trace_crosses_the_broker<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let _ = cx;
    Ok(Outcome::Skipped(
        "polybus-conformance was built without its `opentelemetry` feature".into(),
    ))
}
pub use crate::replay_cases::*;
pub use crate::typed_cases::*;

pub(crate) fn numbered(prefix: &str, i: usize) -> Message {
    Message::new(format!("{prefix}-{i}"))
        .with_header("index", i.to_string())
        .with_header("case", prefix)
}

pub(crate) async fn publish(
    conn: &Connection,
    topic: &str,
    messages: Vec<Message>,
) -> Result<Vec<Message>, Error> {
    let mut sent = Vec::with_capacity(messages.len());
    for message in messages {
        conn.producer.send(topic, message.clone()).await?;
        sent.push(message);
    }
    Ok(sent)
}

pub(crate) fn index_of(d: &Delivery) -> usize {
    d.header("index")
        .and_then(|v| v.parse().ok())
        .expect("every test message has an index header")
}

/// Skips a case that needs redelivery or retention on an at-most-once backend.
pub(crate) fn needs_at_least_once<H: Harness>(cx: &Ctx<H>) -> Option<Outcome> {
    let caps = cx.caps();
    (!caps.at_least_once).then(|| {
        Outcome::Skipped(format!(
            "{} is at-most-once: nothing is redelivered or kept for a group (capabilities.at_least_once = false)",
            caps.backend
        ))
    })
}

/// Whether messages may be published before the runner starts (so it begins
/// with a backlog): only where a declared group keeps them.
fn backlog_first<H: Harness>(cx: &Ctx<H>) -> bool {
    cx.caps().at_least_once
}

pub(crate) fn unique_ids(deliveries: &[Delivery]) -> HashSet<String> {
    deliveries.iter().map(|d| d.id().to_owned()).collect()
}

/// 100 messages, published before and after subscribing to a declared group,
/// arrive with payload, key, user headers and id intact.
pub async fn roundtrip<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "roundtrip").await?;
    let message = |i: usize| numbered("roundtrip", i).with_key(format!("key-{}", i % 7));
    // Half before the runner subscribes (where a declared group keeps them), half after.
    let before = if backlog_first(&cx) { 50 } else { 0 };
    let mut sent = publish(&conn, &topic, (0..before).map(message).collect()).await?;
    let recorder = Recorder::new();
    let handle = cx.runner(&conn, &topic, &group).run(recorder.handler()).await?;
    sent.extend(publish(&conn, &topic, (before..100).map(message).collect()).await?);
    let got = recorder.wait_for(100, cx.secs(30.0)).await?;
    let report = handle.shutdown(cx.secs(10.0)).await;
    let by_id: HashMap<&str, &Message> = sent.iter().map(|m| (m.id.as_str(), m)).collect();
    for d in &got {
        let original = by_id
            .get(d.id())
            .unwrap_or_else(|| panic!("unexpected message id {}", d.id()));
        assert_eq!(d.payload(), &original.payload, "payload of {}", d.id());
        assert_eq!(d.message().key, original.key, "key of {}", d.id());
        assert_eq!(
            d.message().headers,
            original.headers,
            "user headers of {}",
            d.id()
        );
        assert_eq!(d.topic(), topic);
    }
    assert_eq!(unique_ids(&got).len(), 100, "every message arrives");
    assert_eq!(report.handled, got.len() as u64);
    assert!(cx.eventually_drained(&topic, &group, cx.secs(10.0)).await?);
    Ok(Outcome::Passed)
}

/// Empty, binary, maximum-size payloads and unicode/empty header values
/// round-trip; one byte over the maximum and bad header keys are typed errors.
pub async fn edge_payloads<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let max = cx.caps().max_payload;
    assert_eq!(
        conn.producer.max_payload(),
        max,
        "producer and capabilities agree"
    );
    assert!(
        max >= 512 * 1024,
        "the maximum payload is at least 512 KiB (it is {max})"
    );
    let (topic, group) = cx.topic_and_group(&conn, "edge").await?;

    let recorder = Recorder::new();
    let handle = cx.runner(&conn, &topic, &group).run(recorder.handler()).await?;
    let binary: Vec<u8> = (0..=255u8).cycle().take(1024).collect();
    assert!(std::str::from_utf8(&binary).is_err());
    let largest: Vec<u8> = (0..max).map(|i| (i % 251) as u8).collect();
    let sent = publish(
        &conn,
        &topic,
        vec![
            Message::new(Vec::new()).with_header("index", "0"),
            Message::new(binary).with_header("index", "1"),
            Message::new(largest).with_header("index", "2"),
            Message::new("headers")
                .with_header("index", "3")
                .with_header("unicode", "héllo ✓ 日本語 🚀")
                .with_header("empty", ""),
        ],
    )
    .await?;

    let over = conn.producer.send(&topic, Message::new(vec![7u8; max + 1])).await;
    assert!(
        matches!(over, Err(Error::PayloadTooLarge { size, max: m }) if size == max + 1 && m == max),
        "one byte over the maximum is PayloadTooLarge, got {over:?}"
    );
    for bad_key in ["bad key", "a:b", "", "naïve", "polybus-reserved"] {
        let result = conn
            .producer
            .send(&topic, Message::new("x").with_header(bad_key, "v"))
            .await;
        assert!(
            matches!(result, Err(Error::InvalidHeader { .. })),
            "header key {bad_key:?} is rejected, got {result:?}"
        );
    }
    let result = conn
        .producer
        .send(&topic, Message::new("x").with_header("k", "line\r\nbreak"))
        .await;
    assert!(
        matches!(result, Err(Error::InvalidHeader { .. })),
        "CR/LF in a value: {result:?}"
    );

    let got = recorder.wait_for(4, cx.secs(30.0)).await?;
    handle.shutdown(cx.secs(10.0)).await;
    assert_eq!(got.len(), 4, "rejected messages were not sent");
    for d in &got {
        let original = &sent[index_of(d)];
        assert_eq!(d.payload(), &original.payload, "payload {}", index_of(d));
        assert_eq!(d.message().headers, original.headers, "headers {}", index_of(d));
        assert_eq!(d.id(), original.id);
    }
    Ok(Outcome::Passed)
}

/// Messages on one topic never reach another topic's subscribers.
pub async fn topics_are_isolated<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let a = cx.topic(&conn, "iso-a").await?;
    let b = cx.topic(&conn, "iso-b").await?;
    let group = cx.group_name("g");
    for t in [&a, &b] {
        conn.consumer.declare_group(t, &group, StartFrom::Latest).await?;
    }
    let (rec_a, rec_b) = (Recorder::new(), Recorder::new());
    let ha = cx.runner(&conn, &a, &group).run(rec_a.handler()).await?;
    let hb = cx.runner(&conn, &b, &group).run(rec_b.handler()).await?;
    publish(&conn, &a, (0..10).map(|i| numbered("a", i)).collect()).await?;
    publish(&conn, &b, (0..15).map(|i| numbered("b", i)).collect()).await?;
    rec_a.wait_for(10, cx.secs(30.0)).await?;
    rec_b.wait_for(15, cx.secs(30.0)).await?;
    ha.shutdown(cx.secs(10.0)).await;
    hb.shutdown(cx.secs(10.0)).await;
    for (rec, topic, prefix, n) in [(&rec_a, &a, "a", 10), (&rec_b, &b, "b", 15)] {
        let got = rec.all();
        assert_eq!(got.len(), n, "{topic} got exactly its own messages");
        for d in got {
            assert_eq!(d.topic(), topic.as_str());
            assert!(d.payload().starts_with(prefix.as_bytes()));
        }
    }
    Ok(Outcome::Passed)
}

/// 1,000 messages from 10 concurrent tasks all arrive, none twice.
pub async fn concurrent_publishers<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "pubs").await?;
    let recorder = Recorder::new();
    let handle = cx
        .runner(&conn, &topic, &group)
        .order(Order::Unordered)
        .run(recorder.handler())
        .await?;
    let mut tasks = Vec::new();
    for task in 0..10 {
        let producer = Arc::clone(&conn.producer);
        let topic = topic.clone();
        tasks.push(tokio::spawn(async move {
            let sends = (0..100).map(|i| producer.send(&topic, numbered("pub", task * 100 + i)));
            futures::future::try_join_all(sends).await
        }));
    }
    for task in tasks {
        task.await??;
    }
    recorder
        .wait_until("1000 distinct messages", cx.secs(60.0), |seen| {
            unique_ids(seen).len() >= 1000
        })
        .await?;
    handle.shutdown(cx.secs(10.0)).await;
    let got = recorder.all();
    assert_eq!(unique_ids(&got).len(), 1000);
    assert_eq!(got.len(), 1000, "no duplicates when nothing fails");
    Ok(Outcome::Passed)
}

fn keyed(key: usize, seq: usize, i: usize) -> Message {
    numbered("ordered", i)
        .with_key(format!("key-{key}"))
        .with_header("seq", seq.to_string())
}

/// `keys * per_key` messages in runs of five consecutive messages per key, so that
/// same-key messages are close together and unordered handling would be visible.
fn bursts(keys: usize, per_key: usize) -> Vec<Message> {
    let mut next_seq = vec![0; keys];
    let mut messages = Vec::with_capacity(keys * per_key);
    let mut i = 0;
    while messages.len() < keys * per_key {
        let key = (i / 5) % keys;
        if next_seq[key] < per_key {
            messages.push(keyed(key, next_seq[key], messages.len()));
            next_seq[key] += 1;
        }
        i += 1;
    }
    messages
}

fn assert_key_order(handled: &[(String, usize)], keys: usize, per_key: usize) {
    let mut by_key: HashMap<&str, Vec<usize>> = HashMap::new();
    for (key, seq) in handled {
        by_key.entry(key).or_default().push(*seq);
    }
    assert_eq!(by_key.len(), keys, "every key was handled");
    for (key, seqs) in by_key {
        assert_eq!(
            seqs,
            (0..per_key).collect::<Vec<_>>(),
            "key {key} handled in publish order, each once"
        );
    }
}

fn seq_of(d: &Delivery) -> usize {
    d.header("seq").and_then(|s| s.parse().ok()).expect("seq header")
}

/// 1,000 messages over 16 keys, concurrency 8, random handler delays: each key is
/// handled in publish order.
pub async fn key_order_under_concurrency<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "order").await?;
    let (keys, per_key) = (16, 1000 / 16);
    let early = backlog_first(&cx);
    if early {
        publish(&conn, &topic, bursts(keys, per_key)).await?;
    }
    let handled = Arc::new(std::sync::Mutex::new(Vec::new()));
    let running_keys = Arc::new(std::sync::Mutex::new(HashMap::<String, usize>::new()));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let recorder = Recorder::new();
    let handler = {
        let state = (handled.clone(), running_keys.clone(), overlaps.clone());
        let gauges = (in_flight.clone(), peak.clone(), recorder.clone());
        move |d: Delivery| {
            let (handled, running_keys, overlaps) = state.clone();
            let (in_flight, peak, recorder) = gauges.clone();
            async move {
                let key = d.key().unwrap_or_default().to_owned();
                {
                    let mut running = running_keys.lock().unwrap();
                    let n = running.entry(key.clone()).or_default();
                    *n += 1;
                    if *n > 1 {
                        overlaps.fetch_add(1, Ordering::SeqCst);
                    }
                }
                handled.lock().unwrap().push((key.clone(), seq_of(&d)));
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_micros(fastrand::u64(0..2000))).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                *running_keys.lock().unwrap().get_mut(&key).expect("key") -= 1;
                recorder.record(&d);
                HandlerResult::Ok(())
            }
        }
    };
    let handle = cx
        .runner(&conn, &topic, &group)
        .order(Order::ByKey)
        .concurrency(8)
        .run(handler)
        .await?;
    if !early {
        publish(&conn, &topic, bursts(keys, per_key)).await?;
    }
    recorder.wait_for(keys * per_key, cx.secs(60.0)).await?;
    handle.shutdown(cx.secs(10.0)).await;
    assert_key_order(&handled.lock().unwrap(), keys, per_key);
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "two handlers of one key never overlap"
    );
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak <= 8, "at most 8 handlers at once, saw {peak}");
    assert!(peak >= 2, "different keys ran concurrently (peak {peak})");
    Ok(Outcome::Passed)
}

/// Some messages fail their first attempts; per-key order still holds, because a
/// retrying message blocks its own key only.
pub async fn key_order_across_retries<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "order-retry").await?;
    let (keys, per_key) = (8, 25);
    let early = backlog_first(&cx);
    if early {
        publish(&conn, &topic, bursts(keys, per_key)).await?;
    }
    let handled = Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorder = Recorder::new();
    let handler = {
        let (handled, recorder) = (handled.clone(), recorder.clone());
        move |d: Delivery| {
            let (handled, recorder) = (handled.clone(), recorder.clone());
            async move {
                let seq = seq_of(&d);
                if seq % 5 == 2 && d.attempt() < 3 {
                    return Err(HandlerError::retryable(format!(
                        "flaky on attempt {}",
                        d.attempt()
                    )));
                }
                handled
                    .lock()
                    .unwrap()
                    .push((d.key().unwrap_or_default().to_owned(), seq));
                recorder.record(&d);
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
    if !early {
        publish(&conn, &topic, bursts(keys, per_key)).await?;
    }
    recorder.wait_for(keys * per_key, cx.secs(60.0)).await?;
    let report = handle.shutdown(cx.secs(10.0)).await;
    assert_key_order(&handled.lock().unwrap(), keys, per_key);
    assert_eq!(
        report.retried,
        (keys * 5 * 2) as u64,
        "each flaky message was retried twice"
    );
    assert_eq!(
        report.released, 0,
        "retries stay in process, nothing goes back to the broker"
    );
    assert!(
        recorder
            .all()
            .iter()
            .all(|d| seq_of(d) % 5 != 2 || d.attempt() == 3)
    );
    Ok(Outcome::Passed)
}

/// Sequential mode: 200 messages of one key are handled one at a time, in order,
/// even with a higher concurrency configured.
pub async fn sequential_mode<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "sequential").await?;
    // Several keys and keyless messages: sequential means one at a time overall.
    let messages: Vec<Message> = (0..200)
        .map(|i| {
            if i % 3 == 0 {
                numbered("ordered", i).with_header("seq", i.to_string())
            } else {
                keyed(i % 5, i, i)
            }
        })
        .collect();
    let early = backlog_first(&cx);
    let messages = if early {
        publish(&conn, &topic, messages).await?;
        Vec::new()
    } else {
        messages
    };
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let recorder = Recorder::new();
    let handler = {
        let (in_flight, peak, recorder) = (in_flight.clone(), peak.clone(), recorder.clone());
        move |d: Delivery| {
            let (in_flight, peak, recorder) = (in_flight.clone(), peak.clone(), recorder.clone());
            async move {
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                recorder.record(&d);
                tokio::time::sleep(Duration::from_micros(fastrand::u64(0..300))).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                HandlerResult::Ok(())
            }
        }
    };
    let handle = cx
        .runner(&conn, &topic, &group)
        .order(Order::Sequential)
        .concurrency(8)
        .run(handler)
        .await?;
    publish(&conn, &topic, messages).await?;
    let got = recorder.wait_for(200, cx.secs(60.0)).await?;
    handle.shutdown(cx.secs(10.0)).await;
    assert_eq!(peak.load(Ordering::SeqCst), 1, "one at a time");
    if cx.caps().key_order_across_instances {
        // Partitioned brokers order per partition only: check each key, and the
        // keyless messages per partition (the producer spreads them).
        let mut by_key: HashMap<(Option<polybus_core::Bytes>, Option<i32>), Vec<usize>> = HashMap::new();
        for d in &got {
            let key = d.message().key.clone();
            let partition = if key.is_none() { d.origin().partition } else { None };
            by_key.entry((key, partition)).or_default().push(seq_of(d));
        }
        for ((key, partition), seqs) in by_key {
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "key {key:?} (partition {partition:?}) in publish order"
            );
        }
    } else {
        let order: Vec<usize> = got.iter().map(seq_of).collect();
        assert_eq!(order, (0..200).collect::<Vec<_>>(), "publish order");
    }
    Ok(Outcome::Passed)
}

/// After acks and a graceful restart the group is drained and nothing is
/// redelivered.
pub async fn ack_is_final<H: Harness>(cx: Ctx<H>) -> CaseResult {
    if let Some(skip) = needs_at_least_once(&cx) {
        return Ok(skip);
    }
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "ackfinal").await?;
    publish(&conn, &topic, (0..20).map(|i| numbered("ack", i)).collect()).await?;
    let first = Recorder::new();
    let handle = cx.runner(&conn, &topic, &group).run(first.handler()).await?;
    first.wait_for(20, cx.secs(30.0)).await?;
    let report = handle.shutdown(cx.secs(10.0)).await;
    assert_eq!(report.handled, 20);
    assert!(
        cx.eventually_drained(&topic, &group, cx.secs(10.0)).await?,
        "the broker holds nothing for the group after the acks"
    );
    let conn2 = cx.connect().await?;
    let second = Recorder::new();
    let handle = cx.runner(&conn2, &topic, &group).run(second.handler()).await?;
    let marker = Message::new("marker").with_header("index", "999");
    conn2.producer.send(&topic, marker.clone()).await?;
    second
        .wait_until("the marker", cx.secs(30.0), |seen| {
            seen.iter().any(|d| d.id() == marker.id)
        })
        .await?;
    handle.shutdown(cx.secs(10.0)).await;
    assert_eq!(
        second.ids(),
        vec![marker.id.clone()],
        "only the new message arrives after the restart"
    );
    assert!(cx.eventually_drained(&topic, &group, cx.secs(10.0)).await?);
    Ok(Outcome::Passed)
}

/// A retryable error is retried in process with the attempt raised: handled on
/// attempt 3.
pub async fn retryable_error_is_retried<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "retry").await?;
    let attempts = Recorder::new();
    let handled = Recorder::new();
    let handler = {
        let (attempts, handled) = (attempts.clone(), handled.clone());
        move |d: Delivery| {
            let (attempts, handled) = (attempts.clone(), handled.clone());
            async move {
                attempts.record(&d);
                if d.attempt() < 3 {
                    return Err(HandlerError::retryable("not yet"));
                }
                handled.record(&d);
                Ok(())
            }
        }
    };
    let handle = cx.runner(&conn, &topic, &group).run(handler).await?;
    conn.producer.send(&topic, numbered("retry", 0)).await?;
    handled.wait_for(1, cx.secs(30.0)).await?;
    let report = handle.shutdown(cx.secs(10.0)).await;
    let seen: Vec<u32> = attempts.all().iter().map(Delivery::attempt).collect();
    assert_eq!(seen, vec![1, 2, 3], "attempt numbers");
    assert_eq!((report.handled, report.retried, report.dead_lettered), (1, 2, 0));
    assert_eq!(report.released, 0, "retries stay in process");
    assert!(cx.eventually_drained(&topic, &group, cx.secs(10.0)).await?);
    Ok(Outcome::Passed)
}

pub(crate) async fn dead_letter_listener<H: Harness>(
    cx: &Ctx<H>,
    conn: &Connection,
    topic: &str,
) -> Result<(Recorder, polybus_core::RunHandle), Error> {
    let dlq = polybus_core::names::dead_letter_topic(topic);
    let group = cx.group_name("dlq");
    conn.consumer
        .declare_group(&dlq, &group, StartFrom::Latest)
        .await?;
    let recorder = Recorder::new();
    let handle = cx.runner(conn, &dlq, &group).run(recorder.handler()).await?;
    Ok((recorder, handle))
}

/// A permanent error dead-letters the message to `<topic>.dlq` with the reason
/// headers, and later messages keep flowing.
pub async fn permanent_error_dead_letters<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "perm").await?;
    let (dead, dlq_handle) = dead_letter_listener(&cx, &conn, &topic).await?;
    let calls = Recorder::new();
    let handled = Recorder::new();
    let handler = {
        let (calls, handled) = (calls.clone(), handled.clone());
        move |d: Delivery| {
            let (calls, handled) = (calls.clone(), handled.clone());
            async move {
                calls.record(&d);
                if index_of(&d) == 1 {
                    return Err(HandlerError::permanent("malformed ride"));
                }
                handled.record(&d);
                Ok(())
            }
        }
    };
    let handle = cx.runner(&conn, &topic, &group).run(handler).await?;
    let sent = publish(
        &conn,
        &topic,
        (0..5).map(|i| numbered("perm", i).with_key("k")).collect(),
    )
    .await?;
    handled.wait_for(4, cx.secs(30.0)).await?;
    let dead_letters = dead.wait_for(1, cx.secs(30.0)).await?;
    let report = handle.shutdown(cx.secs(10.0)).await;
    dlq_handle.shutdown(cx.secs(10.0)).await;
    let d = &dead_letters[0];
    assert_eq!(d.id(), sent[1].id);
    assert_eq!(d.payload(), &sent[1].payload);
    assert_eq!(
        d.message().headers,
        sent[1].headers,
        "user headers survive; polybus- ones are not among them"
    );
    let info = d.dead_letter().expect("dead-letter headers");
    assert!(info.reason.contains("malformed ride"), "reason: {}", info.reason);
    assert_eq!(info.topic, topic);
    assert_eq!(info.attempts, 1);
    assert_eq!(info.group.as_deref(), Some(group.as_str()));
    assert_eq!(calls.len(), 5, "a permanent error is not retried");
    assert_eq!((report.handled, report.dead_lettered), (4, 1));
    assert!(cx.eventually_drained(&topic, &group, cx.secs(10.0)).await?);
    Ok(Outcome::Passed)
}

/// A message that keeps failing is attempted `max_attempts` times, then
/// dead-lettered.
pub async fn max_attempts_then_dead_letter<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "maxatt").await?;
    let (dead, dlq_handle) = dead_letter_listener(&cx, &conn, &topic).await?;
    let calls = Recorder::new();
    let handler = {
        let calls = calls.clone();
        move |d: Delivery| {
            let calls = calls.clone();
            async move {
                calls.record(&d);
                Err(HandlerError::retryable("dependency down"))
            }
        }
    };
    let handle = cx
        .runner(&conn, &topic, &group)
        .retry(RetryPolicy::attempts(3).backoff(Duration::from_millis(10), Duration::from_millis(50)))
        .run(handler)
        .await?;
    let sent = conn.producer.send(&topic, numbered("max", 0)).await;
    sent?;
    let dead_letters = dead.wait_for(1, cx.secs(30.0)).await?;
    let report = handle.shutdown(cx.secs(10.0)).await;
    dlq_handle.shutdown(cx.secs(10.0)).await;
    let info = dead_letters[0].dead_letter().expect("dead-letter headers");
    assert_eq!(info.attempts, 3);
    assert!(
        info.reason.contains("dependency down") && info.reason.contains("3 attempts"),
        "{}",
        info.reason
    );
    let attempts: Vec<u32> = calls.all().iter().map(Delivery::attempt).collect();
    assert_eq!(attempts, vec![1, 2, 3]);
    assert_eq!((report.retried, report.dead_lettered, report.handled), (2, 1, 0));
    assert_eq!(report.released, 0, "retries stay in process");
    assert!(cx.eventually_drained(&topic, &group, cx.secs(10.0)).await?);
    Ok(Outcome::Passed)
}

/// A panicking handler is caught; the message is retried and the consumer keeps
/// going.
pub async fn panic_is_retried<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "panic").await?;
    let handled = Recorder::new();
    let handler = {
        let handled = handled.clone();
        move |d: Delivery| {
            let handled = handled.clone();
            async move {
                if index_of(&d) == 0 && d.attempt() == 1 {
                    panic!("handler bug (expected by the panic_is_retried case)");
                }
                handled.record(&d);
                HandlerResult::Ok(())
            }
        }
    };
    let handle = cx.runner(&conn, &topic, &group).run(handler).await?;
    publish(&conn, &topic, (0..3).map(|i| numbered("panic", i)).collect()).await?;
    let got = handled.wait_for(3, cx.secs(30.0)).await?;
    publish(&conn, &topic, vec![numbered("panic", 3)]).await?;
    handled.wait_for(4, cx.secs(30.0)).await?;
    let report = handle.shutdown(cx.secs(10.0)).await;
    let first = got.iter().find(|d| index_of(d) == 0).expect("message 0 handled");
    assert_eq!(first.attempt(), 2, "retried after the panic");
    assert_eq!((report.handled, report.retried), (4, 1));
    Ok(Outcome::Passed)
}

/// A crashed consumer's unacked messages go to the next consumer in the group: no
/// loss; duplicates are counted and reported.
pub async fn crashed_consumer_work_is_redelivered<H: Harness>(cx: Ctx<H>) -> CaseResult {
    if let Some(skip) = needs_at_least_once(&cx) {
        return Ok(skip);
    }
    let conn_a = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn_a, "crash").await?;
    let sent = publish(&conn_a, &topic, (0..30).map(|i| numbered("crash", i)).collect()).await?;
    let started = Recorder::new();
    let acked_by_a = Recorder::new();
    let handler = {
        let (started, acked) = (started.clone(), acked_by_a.clone());
        let ok_budget = Arc::new(AtomicUsize::new(10));
        move |d: Delivery| {
            let (started, acked, ok_budget) = (started.clone(), acked.clone(), ok_budget.clone());
            async move {
                started.record(&d);
                if ok_budget
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    acked.record(&d);
                    return Ok(());
                }
                futures::future::pending::<()>().await;
                HandlerResult::Ok(())
            }
        }
    };
    let a = cx
        .runner(&conn_a, &topic, &group)
        .order(Order::Unordered)
        .concurrency(4)
        .run(handler)
        .await?;
    started.wait_for(14, cx.secs(30.0)).await?;
    cx.harness().crash(&a).await;
    let stuck: HashSet<String> = started
        .ids()
        .into_iter()
        .filter(|id| !acked_by_a.ids().contains(id))
        .collect();
    assert_eq!(stuck.len(), 4, "four handlers were stuck at the crash");

    let conn_b = cx.connect().await?;
    let b_seen = Recorder::new();
    let all: HashSet<String> = sent.iter().map(|m| m.id.clone()).collect();
    let b = cx
        .runner(&conn_b, &topic, &group)
        .order(Order::Unordered)
        .run(b_seen.handler())
        .await?;
    let a_ids: HashSet<String> = acked_by_a.ids().into_iter().collect();
    b_seen
        .wait_until("every message handled by A or B", cx.secs(60.0), |seen| {
            let mut union = a_ids.clone();
            union.extend(seen.iter().map(|d| d.id().to_owned()));
            union.is_superset(&all)
        })
        .await?;
    b.shutdown(cx.secs(10.0)).await;
    let b_ids: HashSet<String> = b_seen.ids().into_iter().collect();
    assert!(
        stuck.is_subset(&b_ids),
        "the stuck messages were redelivered to B"
    );
    let duplicates = b_ids.intersection(&a_ids).count() + (b_seen.len() - b_ids.len());
    crate::loud(&format!(
        "INFO {}: {} duplicates after the crash ({} acked by A, {} handled by B)",
        cx.case(),
        duplicates,
        a_ids.len(),
        b_seen.len()
    ));
    assert!(cx.eventually_drained(&topic, &group, cx.secs(10.0)).await?);
    let _ = conn_a.close().await;
    Ok(Outcome::Passed)
}

async fn next_delivery(
    sub: &mut Box<dyn polybus_core::Subscription>,
    within: Duration,
) -> Result<(Delivery, polybus_core::Acker), polybus_core::BoxError> {
    let until = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(until, sub.next()).await {
            Err(_) => return Err("timed out waiting for a delivery".into()),
            Ok(None) => return Err("subscription ended".into()),
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(Some(Ok(Event::Delivery(d, a)))) => return Ok((d, a)),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// Acking twice, releasing after an ack, and releasing twice are harmless: the
/// released message comes back once, and the group ends drained.
pub async fn settling_twice_is_harmless<H: Harness>(cx: Ctx<H>) -> CaseResult {
    if let Some(skip) = needs_at_least_once(&cx) {
        return Ok(skip);
    }
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "settle").await?;
    publish(&conn, &topic, (0..2).map(|i| numbered("settle", i)).collect()).await?;
    let mut sub = conn
        .consumer
        .subscribe(SubscribeOptions::new(&topic).group(&group).prefetch(4))
        .await?;
    let (first, first_acker) = next_delivery(&mut sub, cx.secs(30.0)).await?;
    let (second, second_acker) = next_delivery(&mut sub, cx.secs(30.0)).await?;
    assert_ne!(first.id(), second.id());
    first_acker.ack().await?;
    first_acker.ack().await?;
    first_acker.release(None).await?;
    second_acker.release(None).await?;
    second_acker.release(None).await?;
    let (again, again_acker) = next_delivery(&mut sub, cx.secs(30.0)).await?;
    assert_eq!(again.id(), second.id(), "the released message is redelivered");
    assert!(again.attempt() >= 2, "redelivery raises the attempt count");
    again_acker.ack().await?;
    again_acker.ack().await?;
    sub.close().await?;
    assert!(
        cx.eventually_drained(&topic, &group, cx.secs(10.0)).await?,
        "nothing pending or unacked after double settlement"
    );
    Ok(Outcome::Passed)
}

/// Two consumers in one group share the work: the union is everything, none is
/// handled twice, both get some.
pub async fn competing_consumers_share_work<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn_a = cx.connect().await?;
    let conn_b = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn_a, "compete").await?;
    let all = Recorder::new();
    let slow = |rec: Recorder, mine: Recorder| {
        move |d: Delivery| {
            let (rec, mine) = (rec.clone(), mine.clone());
            async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                mine.record(&d);
                rec.record(&d);
                HandlerResult::Ok(())
            }
        }
    };
    let (rec_a, rec_b) = (Recorder::new(), Recorder::new());
    let a = cx
        .runner(&conn_a, &topic, &group)
        .concurrency(4)
        .run(slow(all.clone(), rec_a.clone()))
        .await?;
    let b = cx
        .runner(&conn_b, &topic, &group)
        .concurrency(4)
        .run(slow(all.clone(), rec_b.clone()))
        .await?;
    let sent = publish(
        &conn_a,
        &topic,
        (0..200)
            .map(|i| numbered("compete", i).with_key(format!("k{}", i % 20)))
            .collect(),
    )
    .await?;
    all.wait_for(200, cx.secs(60.0)).await?;
    a.shutdown(cx.secs(10.0)).await;
    b.shutdown(cx.secs(10.0)).await;
    let got = all.all();
    assert_eq!(got.len(), 200, "none handled twice");
    let expected: HashSet<String> = sent.iter().map(|m| m.id.clone()).collect();
    assert_eq!(unique_ids(&got), expected);
    assert!(
        !rec_a.is_empty() && !rec_b.is_empty(),
        "both consumers got work ({} / {})",
        rec_a.len(),
        rec_b.len()
    );
    Ok(Outcome::Passed)
}

/// Every group gets every message.
pub async fn independent_groups_each_get_everything<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let topic = cx.topic(&conn, "groups").await?;
    let (g1, g2) = (cx.group_name("g1"), cx.group_name("g2"));
    for g in [&g1, &g2] {
        conn.consumer.declare_group(&topic, g, StartFrom::Latest).await?;
    }
    let messages: Vec<Message> = (0..50).map(|i| numbered("groups", i)).collect();
    let expected: HashSet<String> = messages.iter().map(|m| m.id.clone()).collect();
    let early = backlog_first(&cx);
    if early {
        publish(&conn, &topic, messages.clone()).await?;
    }
    let (r1, r2) = (Recorder::new(), Recorder::new());
    let h1 = cx.runner(&conn, &topic, &g1).run(r1.handler()).await?;
    let conn2 = cx.connect().await?;
    let h2 = cx.runner(&conn2, &topic, &g2).run(r2.handler()).await?;
    if !early {
        publish(&conn, &topic, messages).await?;
    }
    r1.wait_for(50, cx.secs(30.0)).await?;
    r2.wait_for(50, cx.secs(30.0)).await?;
    h1.shutdown(cx.secs(10.0)).await;
    h2.shutdown(cx.secs(10.0)).await;
    assert_eq!(unique_ids(&r1.all()), expected);
    assert_eq!(unique_ids(&r2.all()), expected);
    Ok(Outcome::Passed)
}

/// A new group starting from the earliest message replays what was published
/// before it existed; a new group starting at the latest does not.
pub async fn replay_from_earliest<H: Harness>(cx: Ctx<H>) -> CaseResult {
    if !cx.caps().replay {
        return Ok(Outcome::Skipped(format!(
            "{} cannot replay a topic for a new group (capabilities.replay = false)",
            cx.caps().backend
        )));
    }
    let conn = cx.connect().await?;
    let topic = cx.topic(&conn, "replay").await?;
    let old = publish(&conn, &topic, (0..30).map(|i| numbered("old", i)).collect()).await?;
    let (earliest, latest) = (cx.group_name("earliest"), cx.group_name("latest"));
    conn.consumer
        .declare_group(&topic, &earliest, StartFrom::Earliest)
        .await?;
    conn.consumer
        .declare_group(&topic, &latest, StartFrom::Latest)
        .await?;
    let new = publish(&conn, &topic, (30..35).map(|i| numbered("new", i)).collect()).await?;
    let (r_early, r_late) = (Recorder::new(), Recorder::new());
    let he = cx.runner(&conn, &topic, &earliest).run(r_early.handler()).await?;
    let hl = cx.runner(&conn, &topic, &latest).run(r_late.handler()).await?;
    r_early.wait_for(35, cx.secs(30.0)).await?;
    r_late.wait_for(5, cx.secs(30.0)).await?;
    assert!(cx.eventually_drained(&topic, &latest, cx.secs(10.0)).await?);
    he.shutdown(cx.secs(10.0)).await;
    hl.shutdown(cx.secs(10.0)).await;
    let all: HashSet<String> = old.iter().chain(&new).map(|m| m.id.clone()).collect();
    assert_eq!(unique_ids(&r_early.all()), all, "earliest replays everything");
    let new_ids: HashSet<String> = new.iter().map(|m| m.id.clone()).collect();
    assert_eq!(
        unique_ids(&r_late.all()),
        new_ids,
        "latest sees only what came after"
    );
    Ok(Outcome::Passed)
}

/// Handlers running longer than the broker's ack deadline, and messages waiting
/// behind them in their lane, are kept alive: none is redelivered while held.
pub async fn keep_alive_holds_slow_handlers<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let Some(deadline) = cx.caps().ack_deadline else {
        return Ok(Outcome::Skipped(format!(
            "{} has no ack deadline to keep alive (capabilities.ack_deadline = None)",
            cx.caps().backend
        )));
    };
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "keepalive").await?;
    let calls = Recorder::new();
    let handler = {
        let calls = calls.clone();
        move |d: Delivery| {
            let calls = calls.clone();
            async move {
                calls.record(&d);
                tokio::time::sleep(deadline.mul_f64(2.5)).await;
                HandlerResult::Ok(())
            }
        }
    };
    let handle = cx
        .runner(&conn, &topic, &group)
        .order(Order::ByKey)
        .run(handler)
        .await?;
    publish(
        &conn,
        &topic,
        (0..2).map(|i| numbered("ka", i).with_key("same")).collect(),
    )
    .await?;
    calls.wait_for(2, deadline * 10 + cx.secs(10.0)).await?;
    let report = handle.shutdown(deadline * 4 + cx.secs(10.0)).await;
    let attempts: Vec<u32> = calls.all().iter().map(Delivery::attempt).collect();
    assert_eq!(attempts, vec![1, 1], "neither message was redelivered while held");
    assert_eq!(report.handled, 2);
    assert!(cx.eventually_drained(&topic, &group, cx.secs(10.0)).await?);
    Ok(Outcome::Passed)
}

/// Shutdown lets slow in-flight handlers finish and acks them before it returns;
/// the group is drained afterwards.
pub async fn graceful_drain<H: Harness>(cx: Ctx<H>) -> CaseResult {
    if let Some(skip) = needs_at_least_once(&cx) {
        return Ok(skip);
    }
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "drain").await?;
    let started = Recorder::new();
    let finished = Recorder::new();
    let handler = {
        let (started, finished) = (started.clone(), finished.clone());
        move |d: Delivery| {
            let (started, finished) = (started.clone(), finished.clone());
            async move {
                started.record(&d);
                tokio::time::sleep(Duration::from_millis(500)).await;
                finished.record(&d);
                HandlerResult::Ok(())
            }
        }
    };
    let handle = cx
        .runner(&conn, &topic, &group)
        .order(Order::Unordered)
        .concurrency(4)
        .buffer(8)
        .run(handler)
        .await?;
    // Four run at once; the rest wait in the runner or the broker.
    let sent = publish(&conn, &topic, (0..12).map(|i| numbered("drain", i)).collect()).await?;
    started.wait_for(4, cx.secs(30.0)).await?;
    let report = handle.shutdown(cx.secs(20.0)).await;
    assert_eq!(
        finished.len(),
        started.len(),
        "every started handler finished before shutdown returned"
    );
    assert_eq!(report.handled as usize, finished.len());
    assert_eq!(report.abandoned, 0);
    // What was not handled was given back: the next consumer gets exactly the rest.
    let handled: HashSet<String> = finished.ids().into_iter().collect();
    let rest: HashSet<String> = sent
        .iter()
        .map(|m| m.id.clone())
        .filter(|id| !handled.contains(id))
        .collect();
    let conn2 = cx.connect().await?;
    let next = Recorder::new();
    let handle2 = cx.runner(&conn2, &topic, &group).run(next.handler()).await?;
    next.wait_until("the rest", cx.secs(30.0), |seen| {
        unique_ids(seen).is_superset(&rest)
    })
    .await?;
    handle2.shutdown(cx.secs(10.0)).await;
    assert!(
        unique_ids(&next.all()).is_disjoint(&handled),
        "acked messages are not redelivered"
    );
    assert!(cx.eventually_drained(&topic, &group, cx.secs(10.0)).await?);
    Ok(Outcome::Passed)
}

/// No handler starts after shutdown has returned, even with a backlog.
pub async fn no_handler_after_shutdown<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "noafter").await?;
    let backlog: Vec<Message> = (0..200).map(|i| numbered("noafter", i)).collect();
    let early = backlog_first(&cx);
    if early {
        publish(&conn, &topic, backlog.clone()).await?;
    }
    let started = Recorder::new();
    let closed = Arc::new(AtomicBool::new(false));
    let late = Arc::new(AtomicUsize::new(0));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let handler = {
        let state = (started.clone(), closed.clone(), late.clone(), in_flight.clone());
        move |d: Delivery| {
            let (started, closed, late, in_flight) = state.clone();
            async move {
                in_flight.fetch_add(1, Ordering::SeqCst);
                if closed.load(Ordering::SeqCst) {
                    late.fetch_add(1, Ordering::SeqCst);
                }
                started.record(&d);
                tokio::time::sleep(Duration::from_millis(5)).await;
                if closed.load(Ordering::SeqCst) {
                    late.fetch_add(1, Ordering::SeqCst);
                }
                in_flight.fetch_sub(1, Ordering::SeqCst);
                HandlerResult::Ok(())
            }
        }
    };
    let handle = cx
        .runner(&conn, &topic, &group)
        .order(Order::Unordered)
        .concurrency(4)
        .run(handler)
        .await?;
    if !early {
        publish(&conn, &topic, backlog).await?;
    }
    started.wait_for(20, cx.secs(30.0)).await?;
    handle.shutdown(cx.secs(10.0)).await;
    closed.store(true, Ordering::SeqCst);
    assert_eq!(
        in_flight.load(Ordering::SeqCst),
        0,
        "no handler is running when shutdown returns"
    );
    let count = started.len();
    // A negative check: give a stray handler a moment to show itself.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        late.load(Ordering::SeqCst),
        0,
        "a handler ran after shutdown returned"
    );
    assert_eq!(started.len(), count);
    assert!(handle.is_finished());
    Ok(Outcome::Passed)
}

/// The shutdown deadline cancels handlers that never finish; their messages are
/// released and redelivered to the next consumer.
pub async fn shutdown_deadline_cancels_stuck_handlers<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "stuck").await?;
    let started = Recorder::new();
    let handler = {
        let started = started.clone();
        move |d: Delivery| {
            let started = started.clone();
            async move {
                started.record(&d);
                futures::future::pending::<()>().await;
                HandlerResult::Ok(())
            }
        }
    };
    let handle = cx
        .runner(&conn, &topic, &group)
        .order(Order::Unordered)
        .concurrency(2)
        .run(handler)
        .await?;
    let sent = publish(&conn, &topic, (0..2).map(|i| numbered("stuck", i)).collect()).await?;
    started.wait_for(2, cx.secs(30.0)).await?;
    let deadline = Duration::from_millis(300);
    let began = tokio::time::Instant::now();
    let report = handle.shutdown(deadline).await;
    let took = began.elapsed();
    assert!(
        took < deadline + cx.secs(5.0),
        "shutdown returned {took:?} after a {deadline:?} deadline"
    );
    assert_eq!((report.abandoned, report.handled), (2, 0));
    if !cx.caps().at_least_once {
        // Nothing is redelivered on an at-most-once backend; the deadline held.
        return Ok(Outcome::Passed);
    }

    let conn2 = cx.connect().await?;
    let next = Recorder::new();
    let handle2 = cx.runner(&conn2, &topic, &group).run(next.handler()).await?;
    let expected: HashSet<String> = sent.iter().map(|m| m.id.clone()).collect();
    // At-least-once allows a duplicate; what must hold is that both come back.
    next.wait_until("both cancelled messages", cx.secs(30.0), |seen| {
        unique_ids(seen).is_superset(&expected)
    })
    .await?;
    handle2.shutdown(cx.secs(10.0)).await;
    assert_eq!(
        unique_ids(&next.all()),
        expected,
        "the cancelled messages were redelivered"
    );
    assert!(cx.eventually_drained(&topic, &group, cx.secs(10.0)).await?);
    Ok(Outcome::Passed)
}

/// Shutdown from 10 tasks at once, and again afterwards, is safe and gives every
/// caller the same report.
pub async fn shutdown_is_idempotent<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "idem").await?;
    let recorder = Recorder::new();
    let handler = {
        let recorder = recorder.clone();
        move |d: Delivery| {
            let recorder = recorder.clone();
            async move {
                recorder.record(&d);
                if index_of(&d) == 9 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                HandlerResult::Ok(())
            }
        }
    };
    let handle = cx.runner(&conn, &topic, &group).run(handler).await?;
    publish(&conn, &topic, (0..10).map(|i| numbered("idem", i)).collect()).await?;
    recorder.wait_for(10, cx.secs(30.0)).await?;
    // The last handler still runs while ten tasks shut down at once with different
    // deadlines, all long enough for it to finish.
    let timeout = cx.secs(10.0);
    let calls = (0..10u64).map(|i| {
        let handle = handle.clone();
        tokio::spawn(async move { handle.shutdown(timeout + Duration::from_millis(100 * i)).await })
    });
    let reports = futures::future::try_join_all(calls).await?;
    let again = handle.shutdown(timeout).await;
    assert!(
        reports.iter().all(|r| *r == again),
        "every caller gets the same report"
    );
    assert_eq!((again.handled, again.abandoned), (10, 0));
    assert!(handle.is_finished());
    Ok(Outcome::Passed)
}

/// `close` delivers everything accepted; `send` after `close` is an error.
pub async fn producer_close_flushes<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "close").await?;
    let conn2 = cx.connect().await?;
    let recorder = Recorder::new();
    // Where a declared group keeps messages, the consumer starts after the close.
    let early = (!backlog_first(&cx)).then(|| cx.runner(&conn2, &topic, &group).run(recorder.handler()));
    let early = match early {
        Some(run) => Some(run.await?),
        None => None,
    };
    let producer = Arc::clone(&conn.producer);
    let sends: Vec<_> = (0..20)
        .map(|i| {
            let producer = Arc::clone(&producer);
            let topic = topic.clone();
            tokio::spawn(async move {
                let m = numbered("close", i);
                let id = m.id.clone();
                producer.send(&topic, m).await.map(|_| id)
            })
        })
        .collect();
    let mut accepted = HashSet::new();
    for send in sends {
        accepted.insert(send.await??);
    }
    conn.producer.close().await?;
    let after = conn.producer.send(&topic, numbered("close", 99)).await;
    assert!(
        matches!(after, Err(Error::Closed(_))),
        "send after close: {after:?}"
    );
    assert!(!after.unwrap_err().is_retryable());
    let handle = match early {
        Some(handle) => handle,
        None => cx.runner(&conn2, &topic, &group).run(recorder.handler()).await?,
    };
    recorder.wait_for(20, cx.secs(30.0)).await?;
    handle.shutdown(cx.secs(10.0)).await;
    assert_eq!(
        unique_ids(&recorder.all()),
        accepted,
        "everything accepted before close arrives"
    );
    Ok(Outcome::Passed)
}

/// In-flight handlers never exceed the configured concurrency.
pub async fn concurrency_is_bounded<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "bound").await?;
    let backlog: Vec<Message> = (0..100).map(|i| numbered("bound", i)).collect();
    let early = backlog_first(&cx);
    if early {
        publish(&conn, &topic, backlog.clone()).await?;
    }
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let recorder = Recorder::new();
    let handler = {
        let (in_flight, peak, recorder) = (in_flight.clone(), peak.clone(), recorder.clone());
        move |d: Delivery| {
            let (in_flight, peak, recorder) = (in_flight.clone(), peak.clone(), recorder.clone());
            async move {
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                recorder.record(&d);
                HandlerResult::Ok(())
            }
        }
    };
    let handle = cx
        .runner(&conn, &topic, &group)
        .order(Order::Unordered)
        .concurrency(4)
        .run(handler)
        .await?;
    if !early {
        publish(&conn, &topic, backlog).await?;
    }
    recorder.wait_for(100, cx.secs(60.0)).await?;
    handle.shutdown(cx.secs(10.0)).await;
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak <= 4, "concurrency 4 but {peak} handlers ran at once");
    assert!(peak >= 2, "handlers did run concurrently (peak {peak})");
    Ok(Outcome::Passed)
}

/// Connecting to an address where no broker listens fails with a retryable error
/// within the configured timeout, never a hang.
pub async fn unreachable_broker_errors_in_time<H: Harness>(cx: Ctx<H>) -> CaseResult {
    if !cx.caps().networked {
        return Ok(Outcome::Skipped(format!(
            "{} runs in process; there is no broker to be unreachable",
            cx.caps().backend
        )));
    }
    let timeout = cx.secs(3.0);
    let began = tokio::time::Instant::now();
    let result = tokio::time::timeout(timeout * 3, async {
        let conn = cx.harness().connect_unreachable(timeout).await?;
        conn.producer.send("unreachable", Message::new("x")).await?;
        Ok::<_, Error>(conn)
    })
    .await;
    let took = began.elapsed();
    match result {
        Err(_) => panic!("no error within {:?}: the client hangs", timeout * 3),
        Ok(Ok(_)) => panic!("connecting to an unreachable broker succeeded"),
        Ok(Err(e)) => {
            assert!(
                e.is_retryable(),
                "an unreachable broker is a retryable error: {e}"
            );
            assert!(
                took < timeout + cx.secs(2.0),
                "the error took {took:?} with a {timeout:?} timeout"
            );
        }
    }
    Ok(Outcome::Passed)
}

/// Topic and group names outside the portable grammar are rejected with a typed
/// error naming what is wrong, everywhere a name is taken.
pub async fn invalid_names_are_rejected<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let good = cx.topic(&conn, "names").await?;
    let too_long = "t".repeat(121);
    let longest = cx.harness().unique_name("t");
    let longest = format!(
        "{longest}{}",
        "t".repeat(polybus_core::names::MAX_TOPIC_LEN - longest.len())
    );
    cx.track(&longest);
    conn.consumer.declare_topic(&longest).await?;
    let over = format!("{longest}x");
    assert!(
        matches!(
            conn.consumer.declare_topic(&over).await,
            Err(Error::InvalidName {
                kind: NameKind::Topic,
                ..
            })
        ),
        "declaring a topic whose dead-letter topic would not fit is rejected"
    );
    let run = conn.runner().topic(&over).run(Recorder::new().handler()).await;
    assert!(
        matches!(&run, Err(Error::InvalidName { .. })),
        "a runner on a topic without room for .dlq is rejected"
    );
    conn.producer
        .send(
            &polybus_core::names::dead_letter_topic(&longest),
            Message::new("fits"),
        )
        .await?;
    for bad in [
        "",
        "has space",
        "slash/name",
        "ünïcode",
        "star*",
        too_long.as_str(),
    ] {
        let declared = conn.consumer.declare_topic(bad).await;
        assert!(
            matches!(
                &declared,
                Err(Error::InvalidName {
                    kind: NameKind::Topic,
                    ..
                })
            ),
            "declare_topic({bad:?}): {declared:?}"
        );
        let sent = conn.producer.send(bad, Message::new("x")).await;
        assert!(
            matches!(
                &sent,
                Err(Error::InvalidName {
                    kind: NameKind::Topic,
                    ..
                })
            ),
            "send to {bad:?}"
        );
        let group = conn.consumer.declare_group(&good, bad, StartFrom::Latest).await;
        assert!(
            matches!(
                &group,
                Err(Error::InvalidName {
                    kind: NameKind::Group,
                    ..
                })
            ),
            "declare_group(.., {bad:?}): {group:?}"
        );
        let sub = conn.consumer.subscribe(SubscribeOptions::new(bad)).await;
        assert!(
            matches!(&sub, Err(Error::InvalidName { .. })),
            "subscribe to {bad:?}"
        );
        let run = conn
            .runner()
            .topic(&good)
            .group(bad)
            .run(Recorder::new().handler())
            .await;
        assert!(
            matches!(&run, Err(Error::InvalidName { .. })),
            "runner in group {bad:?}"
        );
    }
    let message = Error::InvalidName {
        kind: NameKind::Topic,
        name: "has space".into(),
        reason: "x",
    }
    .to_string();
    assert!(message.contains("has space") && message.contains("topic"));
    Ok(Outcome::Passed)
}
