//! RabbitMQ behaviour beyond the shared suite: unroutable messages with
//! `mandatory`, and single-active-consumer groups. Skips loudly without
//! `POLYBUS_TEST_AMQP_URL` (a failure under `POLYBUS_TEST_REQUIRE_BROKERS=1`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use polybus_conformance::Recorder;
use polybus_core::{Delivery, Error, HandlerResult, Message, Order, StartFrom};
use polybus_rabbitmq::{RabbitConfig, RabbitConsumer, group_queue};

#[path = "support/common.rs"]
mod common;
use common::{config, declare_and_send, drain_payloads, next_delivery, numbered, shuffled, take, unique};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_messages_are_an_error_only_when_mandatory() {
    let Some(config) = config("unroutable_messages_are_an_error_only_when_mandatory") else {
        return;
    };
    let topic = unique("unroutable");
    let relaxed = polybus_rabbitmq::connect_with(config.clone()).await.unwrap();
    relaxed.consumer.declare_topic(&topic).await.unwrap();
    // No group is bound: an event nobody listens to is normal by default.
    relaxed.producer.send(&topic, Message::new("x")).await.unwrap();
    let strict = polybus_rabbitmq::connect_with(config.clone().mandatory(true))
        .await
        .unwrap();
    let err = strict.producer.send(&topic, Message::new("x")).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    // Once a group is bound, the same strict send goes through.
    relaxed
        .consumer
        .declare_group(&topic, "g", StartFrom::Latest)
        .await
        .unwrap();
    strict.producer.send(&topic, Message::new("y")).await.unwrap();
    let admin = RabbitConsumer::connect(&config).await.unwrap();
    admin
        .delete_topic(&topic, &[group_queue(&topic, "g")])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_active_consumer_keeps_key_order_across_instances() {
    let Some(config) = config("single_active_consumer_keeps_key_order_across_instances") else {
        return;
    };
    let config = config.single_active_consumer(true);
    let topic = unique("sac");
    let a = polybus_rabbitmq::connect_with(config.clone()).await.unwrap();
    let b = polybus_rabbitmq::connect_with(config.clone()).await.unwrap();
    assert!(a.consumer.capabilities().key_order_across_instances);
    a.consumer.declare_topic(&topic).await.unwrap();
    a.consumer
        .declare_group(&topic, "g", StartFrom::Latest)
        .await
        .unwrap();
    let seen: Arc<Mutex<HashMap<String, Vec<usize>>>> = Arc::default();
    let all = Recorder::new();
    let handler = |instance: &'static str| {
        let (seen, all) = (Arc::clone(&seen), all.clone());
        move |d: Delivery| {
            let (seen, all) = (Arc::clone(&seen), all.clone());
            async move {
                let seq: usize = d.header("seq").and_then(|s| s.parse().ok()).unwrap();
                let key = d.key().unwrap_or_default().to_owned();
                seen.lock().unwrap().entry(key).or_default().push(seq);
                tokio::time::sleep(Duration::from_micros(fastrand_like(seq))).await;
                let _ = instance;
                all.record(&d);
                HandlerResult::Ok(())
            }
        }
    };
    let ha = a
        .runner()
        .topic(&topic)
        .group("g")
        .order(Order::ByKey)
        .concurrency(4)
        .run(handler("a"))
        .await
        .unwrap();
    let hb = b
        .runner()
        .topic(&topic)
        .group("g")
        .order(Order::ByKey)
        .concurrency(4)
        .run(handler("b"))
        .await
        .unwrap();
    let mut seq = HashMap::<usize, usize>::new();
    for i in 0..400 {
        let key = (i / 5) % 8;
        let n = seq.entry(key).or_default();
        let m = Message::new(format!("m{i}"))
            .with_key(format!("k{key}"))
            .with_header("seq", n.to_string());
        *n += 1;
        a.producer.send(&topic, m).await.unwrap();
    }
    all.wait_for(400, Duration::from_secs(60)).await.unwrap();
    ha.shutdown(Duration::from_secs(10)).await;
    hb.shutdown(Duration::from_secs(10)).await;
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(seen.len(), 8);
    for (key, seqs) in &seen {
        assert_eq!(
            *seqs,
            (0..50).collect::<Vec<_>>(),
            "key {key} in publish order across both instances"
        );
    }
    let admin = RabbitConsumer::connect(&config).await.unwrap();
    admin
        .delete_topic(&topic, &[group_queue(&topic, "g")])
        .await
        .unwrap();
}

fn fastrand_like(seed: usize) -> u64 {
    (seed as u64).wrapping_mul(2_654_435_761) % 3000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_publish_does_not_break_the_producer() {
    let Some(config) = config("a_refused_publish_does_not_break_the_producer") else {
        return;
    };
    let topic = unique("refused");
    let conn = polybus_rabbitmq::connect_with(config.clone()).await.unwrap();
    // A topic nobody declared: the producer declares its exchange itself.
    conn.producer.send(&topic, Message::new("first")).await.unwrap();
    let admin = RabbitConsumer::connect(&config).await.unwrap();
    admin.delete_topic(&topic, &[]).await.unwrap();
    // The exchange is gone behind the producer's back: the broker refuses (404)
    // and closes the channel; that send fails for good…
    let err = conn
        .producer
        .send(&topic, Message::new("lost"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    assert!(!err.is_retryable());
    // …and the producer keeps working on a new channel.
    conn.producer.send(&topic, Message::new("again")).await.unwrap();
    admin.delete_topic(&topic, &[]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_headers_and_long_ids_round_trip() {
    let Some(config) = config("x_headers_and_long_ids_round_trip") else {
        return;
    };
    let topic = unique("xhdr");
    let conn = polybus_rabbitmq::connect_with(config.clone()).await.unwrap();
    conn.consumer.declare_topic(&topic).await.unwrap();
    conn.consumer
        .declare_group(&topic, "g", StartFrom::Latest)
        .await
        .unwrap();
    let recorder = Recorder::new();
    let handle = conn
        .runner()
        .topic(&topic)
        .group("g")
        .run(recorder.handler())
        .await
        .unwrap();
    let long_id = "i".repeat(300);
    let sent = Message::new("x")
        .with_id(long_id.clone())
        .with_key("k".repeat(300))
        .with_header("x-request-id", "abc");
    conn.producer.send(&topic, sent.clone()).await.unwrap();
    let got = recorder.wait_for(1, Duration::from_secs(30)).await.unwrap();
    handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!(got[0].id(), long_id);
    assert_eq!(got[0].message().key, sent.key);
    assert_eq!(got[0].header("x-request-id"), Some("abc"));
    let admin = RabbitConsumer::connect(&config).await.unwrap();
    admin
        .delete_topic(&topic, &[group_queue(&topic, "g")])
        .await
        .unwrap();
}

// ---- issue 12 -------------------------------------------------------------

/// A raw lapin channel on the test broker (for what polybus does not do: foreign
/// publishers, old-style queues, passive lookups).
async fn raw_channel(config: &RabbitConfig) -> (lapin::Connection, lapin::Channel) {
    let connection = lapin::Connection::connect(&config.url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    (connection, channel)
}

/// Ready messages in the queue named `queue` (a passive declare), or `None` if
/// it does not exist.
async fn ready_in(config: &RabbitConfig, queue: &str) -> Option<u32> {
    let (connection, channel) = raw_channel(config).await;
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

/// Issue 12 item 5: lapin hands a basic.return to whichever confirm of a
/// multiple-ack resolves first, so with many mandatory sends in flight a routed
/// send could be told `NotFound` and an unroutable one `Ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mandatory_returns_answer_their_own_send() {
    let Some(config) = config("mandatory_returns_answer_their_own_send") else {
        return;
    };
    let routed = unique("mand-routed");
    let unroutable = unique("mand-lost");
    // Classic queues confirm fast, so the broker acks many sends at once
    // (multiple acks), which is where returns were handed out wrongly.
    let conn = polybus_rabbitmq::connect_with(
        config
            .clone()
            .mandatory(true)
            .queue_type(polybus_rabbitmq::QueueType::Classic),
    )
    .await
    .unwrap();
    conn.consumer.declare_topic(&unroutable).await.unwrap();
    conn.consumer
        .declare_group(&routed, "g", StartFrom::Latest)
        .await
        .unwrap();
    let mut wrong = Vec::new();
    for round in 0..5 {
        let sends = (0..1000).map(|i| {
            let producer = Arc::clone(&conn.producer);
            let topic = if i % 2 == 0 {
                routed.clone()
            } else {
                unroutable.clone()
            };
            async move { (i, producer.send(&topic, Message::new(format!("m{i}"))).await) }
        });
        for (i, result) in futures::future::join_all(sends).await {
            let ok = matches!(
                (i % 2 == 0, &result),
                (true, Ok(())) | (false, Err(Error::NotFound { .. }))
            );
            if !ok {
                wrong.push(format!("round {round} send {i}: {result:?}"));
            }
        }
    }
    let admin = RabbitConsumer::connect(&config).await.unwrap();
    admin
        .delete_topic(&routed, &[group_queue(&routed, "g")])
        .await
        .unwrap();
    admin.delete_topic(&unroutable, &[]).await.unwrap();
    assert!(
        wrong.is_empty(),
        "{} sends got another send's answer, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
}

/// Issue 12 (runner): after `stop`, released deliveries go to other consumers
/// of the group, not back into this subscription's prefetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_keeps_released_deliveries_from_coming_back() {
    let Some(config) = config("stop_keeps_released_deliveries_from_coming_back") else {
        return;
    };
    let topic = unique("stop");
    let conn = polybus_rabbitmq::connect_with(config.clone()).await.unwrap();
    conn.consumer
        .declare_group(&topic, "g", StartFrom::Latest)
        .await
        .unwrap();
    let options = polybus_core::SubscribeOptions::new(&topic)
        .group("g")
        .prefetch(10);
    let mut first = conn.consumer.subscribe(options.clone()).await.unwrap();
    for i in 0..5 {
        conn.producer
            .send(&topic, Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    let held = take(&mut first, 5).await;
    first.stop().await.unwrap();
    first.stop().await.unwrap();
    for (_, acker) in &held {
        acker.release(None).await.unwrap();
    }
    let back = next_delivery(&mut first, Duration::from_secs(1)).await;
    let mut second = conn.consumer.subscribe(options).await.unwrap();
    let mut moved = 0;
    while let Some((_, acker)) = next_delivery(&mut second, Duration::from_secs(5)).await {
        acker.ack().await.unwrap();
        moved += 1;
        if moved == 5 {
            break;
        }
    }
    first.close().await.unwrap();
    second.close().await.unwrap();
    let admin = RabbitConsumer::connect(&config).await.unwrap();
    admin
        .delete_topic(&topic, &[group_queue(&topic, "g")])
        .await
        .unwrap();
    assert!(
        back.is_none(),
        "a released delivery came back after stop: {back:?}"
    );
    assert_eq!(moved, 5, "the new subscription gets them all");
}

/// Issue 12 (runner): an ack that did not take effect says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_on_a_closed_channel_is_not_settled() {
    let Some(config) = config("an_ack_on_a_closed_channel_is_not_settled") else {
        return;
    };
    let topic = unique("acktruth");
    let conn = polybus_rabbitmq::connect_with(config.clone()).await.unwrap();
    conn.consumer
        .declare_group(&topic, "g", StartFrom::Latest)
        .await
        .unwrap();
    let options = polybus_core::SubscribeOptions::new(&topic).group("g");
    let mut sub = conn.consumer.subscribe(options.clone()).await.unwrap();
    conn.producer.send(&topic, Message::new("x")).await.unwrap();
    let (_, acker) = next_delivery(&mut sub, Duration::from_secs(10))
        .await
        .expect("a delivery");
    // The connection goes away under the delivery (closing gives it back).
    sub.close().await.unwrap();
    let acked = acker.ack().await;
    let mut again = conn.consumer.subscribe(options).await.unwrap();
    let redelivered = next_delivery(&mut again, Duration::from_secs(10)).await;
    if let Some((_, a)) = &redelivered {
        a.ack().await.unwrap();
    }
    again.close().await.unwrap();
    let admin = RabbitConsumer::connect(&config).await.unwrap();
    admin
        .delete_topic(&topic, &[group_queue(&topic, "g")])
        .await
        .unwrap();
    assert!(
        matches!(acked, Err(Error::NotSettled { operation: "ack", .. })),
        "{acked:?}"
    );
    assert!(
        redelivered.is_some(),
        "the broker redelivers what was not settled"
    );
}

/// Issue 12 item 6: `<topic>.<group>` was not injective.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_group_pairs_never_share_a_queue() {
    assert_ne!(group_queue("x", "b.c"), group_queue("x.b", "c"));
    assert_ne!(group_queue("x", "dlq"), "x.dlq");
    let Some(config) = config("topic_group_pairs_never_share_a_queue") else {
        return;
    };
    let x = unique("inj");
    let xb = format!("{x}.b");
    let conn = polybus_rabbitmq::connect_with(config.clone()).await.unwrap();
    for (topic, group) in [(&x, "b.c"), (&xb, "c"), (&x, "dlq")] {
        conn.consumer
            .declare_group(topic, group, StartFrom::Latest)
            .await
            .unwrap();
    }
    conn.producer.send(&x, Message::new("to x")).await.unwrap();
    conn.producer.send(&xb, Message::new("to x.b")).await.unwrap();
    let admin = RabbitConsumer::connect(&config).await.unwrap();
    let counts = (
        admin.ready_messages(&x, "b.c").await.unwrap(),
        admin.ready_messages(&xb, "c").await.unwrap(),
        admin.ready_messages(&x, "dlq").await.unwrap(),
        ready_in(&config, &format!("{x}.dlq")).await,
    );
    admin
        .delete_topic(&x, &[group_queue(&x, "b.c"), group_queue(&x, "dlq")])
        .await
        .unwrap();
    admin.delete_topic(&xb, &[group_queue(&xb, "c")]).await.unwrap();
    assert_eq!(
        counts,
        (1, 1, 1, Some(0)),
        "(x, b.c), (x.b, c), (x, dlq) and x's dead-letter queue each hold their own"
    );
}

/// Issue 12 item 6: a group queue declared under the old `<topic>.<group>` name
/// keeps its backlog: the subscription consumes it, and it no longer receives
/// copies of new messages (no duplicates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_group_queue_is_drained_after_the_rename() {
    let Some(config) = config("an_old_group_queue_is_drained_after_the_rename") else {
        return;
    };
    let topic = unique("legacy");
    let old = format!("{topic}.g");
    let conn = polybus_rabbitmq::connect_with(config.clone()).await.unwrap();
    conn.consumer.declare_topic(&topic).await.unwrap();
    // What the previous version declared for group "g".
    let (raw, channel) = raw_channel(&config).await;
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            old.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            old.as_str().into(),
            topic.as_str().into(),
            "#".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let _ = raw.close(200, "bye".into()).await;
    for i in 0..3 {
        conn.producer
            .send(&topic, Message::new(format!("old{i}")))
            .await
            .unwrap();
    }
    let recorder = Recorder::new();
    let handle = conn
        .runner()
        .topic(&topic)
        .group("g")
        .run(recorder.handler())
        .await
        .unwrap();
    for i in 0..2 {
        conn.producer
            .send(&topic, Message::new(format!("new{i}")))
            .await
            .unwrap();
    }
    let got = recorder.wait_for(5, Duration::from_secs(30)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let all = recorder.all();
    handle.shutdown(Duration::from_secs(10)).await;
    let admin = RabbitConsumer::connect(&config).await.unwrap();
    let old_left = ready_in(&config, &old).await;
    admin
        .delete_topic(&topic, &[group_queue(&topic, "g"), old.clone()])
        .await
        .unwrap();
    let mut payloads: Vec<String> = all
        .iter()
        .map(|d| String::from_utf8_lossy(&d.message().payload).into_owned())
        .collect();
    payloads.sort();
    assert_eq!(got.len(), 5);
    assert_eq!(payloads, ["new0", "new1", "old0", "old1", "old2"], "each once");
    assert!(matches!(old_left, None | Some(0)), "{old_left:?}");
}

/// Issue 12 item 7: queue arguments belong to the group's queue only, so a
/// process with single active consumer and one without can share a topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_with_and_without_single_active_consumer_share_a_topic() {
    let Some(config) = config("groups_with_and_without_single_active_consumer_share_a_topic") else {
        return;
    };
    let topic = unique("sacmix");
    let off = polybus_rabbitmq::connect_with(config.clone()).await.unwrap();
    let on = polybus_rabbitmq::connect_with(config.clone().single_active_consumer(true))
        .await
        .unwrap();
    off.consumer
        .declare_group(&topic, "plain", StartFrom::Latest)
        .await
        .unwrap();
    let second = on
        .consumer
        .declare_group(&topic, "single", StartFrom::Latest)
        .await;
    // The same group with a different setting is a configuration error that
    // names the argument.
    let same = on
        .consumer
        .declare_group(&topic, "plain", StartFrom::Latest)
        .await;
    let admin = RabbitConsumer::connect(&config).await.unwrap();
    admin
        .delete_topic(
            &topic,
            &[group_queue(&topic, "plain"), group_queue(&topic, "single")],
        )
        .await
        .unwrap();
    second.unwrap();
    match same {
        Err(Error::InvalidConfig(message)) => {
            assert!(message.contains("x-single-active-consumer"), "{message}")
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

/// Issue 12 item 8: a message published without `message_id` (a foreign
/// publisher) keeps its id when it is redelivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_message_keeps_its_id_across_redeliveries() {
    let Some(config) = config("a_foreign_message_keeps_its_id_across_redeliveries") else {
        return;
    };
    let topic = unique("foreign");
    let conn = polybus_rabbitmq::connect_with(config.clone()).await.unwrap();
    conn.consumer
        .declare_group(&topic, "g", StartFrom::Latest)
        .await
        .unwrap();
    let mut sub = conn
        .consumer
        .subscribe(polybus_core::SubscribeOptions::new(&topic).group("g"))
        .await
        .unwrap();
    let (raw, channel) = raw_channel(&config).await;
    for payload in [&b"first"[..], b"second"] {
        channel
            .basic_publish(
                topic.as_str().into(),
                "".into(),
                Default::default(),
                payload,
                lapin::BasicProperties::default(),
            )
            .await
            .unwrap();
    }
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (d, acker) = next_delivery(&mut sub, Duration::from_secs(10))
            .await
            .expect("a delivery");
        ids.push((
            String::from_utf8_lossy(&d.message().payload).into_owned(),
            d.id().to_owned(),
        ));
        acker.release(None).await.unwrap();
    }
    let _ = raw.close(200, "bye".into()).await;
    sub.close().await.unwrap();
    let admin = RabbitConsumer::connect(&config).await.unwrap();
    admin
        .delete_topic(&topic, &[group_queue(&topic, "g")])
        .await
        .unwrap();
    let first: Vec<&String> = ids
        .iter()
        .filter(|(p, _)| p == "first")
        .map(|(_, id)| id)
        .collect();
    assert!(first.len() >= 2, "redelivered: {ids:?}");
    assert!(first.iter().all(|id| *id == first[0]), "same id: {ids:?}");
    let second = ids.iter().find(|(p, _)| p == "second").map(|(_, id)| id);
    assert_ne!(second, Some(first[0]), "different content, different id");
}

/// Issue 12 item 8: quorum group queues declare their delivery limit and
/// dead-letter route (checked through the broker's argument equivalence: a
/// declaration with the same arguments is accepted, one without is refused);
/// the dead-letter queue gets none of the group's arguments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_group_queues_declare_their_delivery_limit_and_dead_letter_route() {
    let Some(config) = config("quorum_group_queues_declare_their_delivery_limit_and_dead_letter_route")
    else {
        return;
    };
    let topic = unique("dlimit");
    let conn = polybus_rabbitmq::connect_with(config.clone().single_active_consumer(true))
        .await
        .unwrap();
    conn.consumer
        .declare_group(&topic, "g", StartFrom::Latest)
        .await
        .unwrap();
    let text = |s: &str| lapin::types::AMQPValue::LongString(s.into());
    let expected = [
        ("x-queue-type", text("quorum")),
        ("x-single-active-consumer", lapin::types::AMQPValue::Boolean(true)),
        (
            "x-delivery-limit",
            lapin::types::AMQPValue::LongLongInt(polybus_rabbitmq::DEFAULT_DELIVERY_LIMIT.into()),
        ),
        ("x-dead-letter-exchange", text(&format!("{topic}.dlq"))),
        ("x-dead-letter-strategy", text("at-least-once")),
        ("x-overflow", text("reject-publish")),
    ];
    let declare = |queue: String, arguments: Vec<(&'static str, lapin::types::AMQPValue)>| {
        let config = config.clone();
        async move {
            let (raw, channel) = raw_channel(&config).await;
            let mut table = lapin::types::FieldTable::default();
            for (k, v) in arguments {
                table.insert(k.into(), v);
            }
            let result = channel
                .queue_declare(
                    queue.as_str().into(),
                    lapin::options::QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    table,
                )
                .await
                .map(|_| ())
                .map_err(|e| e.to_string());
            let _ = raw.close(200, "bye".into()).await;
            result
        }
    };
    let same = declare(group_queue(&topic, "g"), expected.to_vec()).await;
    let without_limit = declare(group_queue(&topic, "g"), expected[..2].to_vec()).await;
    let other_limit = {
        let mut other = expected.to_vec();
        other[2].1 = lapin::types::AMQPValue::LongLongInt(7);
        declare(group_queue(&topic, "g"), other).await
    };
    let dead_letters_plain = declare(format!("{topic}.dlq"), Vec::new()).await;
    let admin = RabbitConsumer::connect(&config).await.unwrap();
    admin
        .delete_topic(&topic, &[group_queue(&topic, "g")])
        .await
        .unwrap();
    assert_eq!(same, Ok(()), "the group queue has exactly these arguments");
    // The broker names the first argument that differs.
    assert!(
        without_limit
            .as_ref()
            .is_err_and(|e| e.contains("inequivalent arg")),
        "{without_limit:?}"
    );
    assert!(
        other_limit
            .as_ref()
            .is_err_and(|e| e.contains("x-delivery-limit")),
        "{other_limit:?}"
    );
    assert_eq!(
        dead_letters_plain,
        Ok(()),
        "the dead-letter queue has no group arguments"
    );
}

/// Issue 12 item 8: past the delivery limit the broker dead-letters a message
/// to the topic's dead-letter queue (3.10 has no default limit to trip over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_dead_letters_past_the_delivery_limit() {
    let Some(config) = config("the_broker_dead_letters_past_the_delivery_limit") else {
        return;
    };
    let topic = unique("dlroute");
    let conn = polybus_rabbitmq::connect_with(config.clone().delivery_limit(Some(1)))
        .await
        .unwrap();
    conn.consumer
        .declare_group(&topic, "g", StartFrom::Latest)
        .await
        .unwrap();
    let mut sub = conn
        .consumer
        .subscribe(polybus_core::SubscribeOptions::new(&topic).group("g"))
        .await
        .unwrap();
    conn.producer.send(&topic, Message::new("poison")).await.unwrap();
    let mut attempts = Vec::new();
    while let Some((d, acker)) = next_delivery(&mut sub, Duration::from_secs(3)).await {
        attempts.push(d.attempt());
        acker.release(None).await.unwrap();
        assert!(attempts.len() <= 5, "never dead-lettered: {attempts:?}");
    }
    sub.close().await.unwrap();
    let mut dead = None;
    for _ in 0..50 {
        dead = ready_in(&config, &format!("{topic}.dlq")).await;
        if dead == Some(1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let admin = RabbitConsumer::connect(&config).await.unwrap();
    let in_group = admin.ready_messages(&topic, "g").await.unwrap();
    admin
        .delete_topic(&topic, &[group_queue(&topic, "g")])
        .await
        .unwrap();
    assert_eq!(attempts, [1, 2], "delivered twice (limit 1), then dead-lettered");
    assert_eq!(
        (dead, in_group),
        (Some(1), 0),
        "the broker moved it to {topic}.dlq"
    );
}

/// Issue 12 item 7: queues declared by an older version (a group queue without
/// the delivery limit, a dead-letter queue with single active consumer) stay
/// declarable: the declaration keeps them as they are and warns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_declared_with_older_arguments_stay_declarable() {
    let Some(config) = config("queues_declared_with_older_arguments_stay_declarable") else {
        return;
    };
    let topic = unique("olderargs");
    let (raw, channel) = raw_channel(&config).await;
    let text = |s: &str| lapin::types::AMQPValue::LongString(s.into());
    let older = [
        (group_queue(&topic, "g"), "x-queue-type", text("quorum")),
        (
            format!("{topic}.dlq"),
            "x-single-active-consumer",
            lapin::types::AMQPValue::Boolean(true),
        ),
    ];
    for (queue, key, value) in older {
        let mut table = lapin::types::FieldTable::default();
        table.insert(key.into(), value);
        channel
            .queue_declare(
                queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                table,
            )
            .await
            .unwrap();
    }
    let _ = raw.close(200, "bye".into()).await;
    let conn = polybus_rabbitmq::connect_with(config.clone()).await.unwrap();
    let declared = conn.consumer.declare_group(&topic, "g", StartFrom::Latest).await;
    if declared.is_ok() {
        conn.producer.send(&topic, Message::new("x")).await.unwrap();
    }
    let admin = RabbitConsumer::connect(&config).await.unwrap();
    let ready = admin.ready_messages(&topic, "g").await;
    admin
        .delete_topic(&topic, &[group_queue(&topic, "g")])
        .await
        .unwrap();
    declared.unwrap();
    assert_eq!(ready.unwrap(), 1, "the kept queue is bound and receives");
}

// ---- multiple acks (issue 15) ----------------------------------------------

/// Acks arrive out of order while one delivery in the middle is still held;
/// it is released only after everything above it was acked. A multiple ack
/// that covered it (sent before its nack, or past the held tag) would settle
/// it without its handler: it must come back, and none of the acked ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coalesced_acks_never_cover_a_released_delivery() {
    let Some(config) = config("coalesced_acks_never_cover_a_released_delivery") else {
        return;
    };
    // A long bound: the acks above the held delivery are still waiting in the
    // book when it is released.
    let config = config.ack_coalescing(Some(Duration::from_millis(500)));
    let topic = unique("acks-release");
    let conn = polybus_rabbitmq::connect_with(config.clone()).await.unwrap();
    let n = 60;
    declare_and_send(&conn, &topic, n).await;
    let options = polybus_core::SubscribeOptions::new(&topic).group("g").prefetch(n);
    let mut sub = conn.consumer.subscribe(options).await.unwrap();
    let held = take(&mut sub, n).await;
    // Released: m17 (after the acks above it) and m40 (before them).
    let (late, early) = (17, 40);
    held[early].1.release(None).await.unwrap();
    let acking: Vec<_> = shuffled(n)
        .into_iter()
        .filter(|&i| i != late && i != early)
        .map(|i| {
            let acker = held[i].1.clone();
            tokio::spawn(async move { (i, acker.ack().await) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    held[late].1.release(None).await.unwrap();
    let mut failed = Vec::new();
    for task in acking {
        let (i, result) = task.await.unwrap();
        if let Err(e) = result {
            failed.push(format!("{}: {e}", numbered(i)));
        }
    }
    sub.close().await.unwrap();
    let back = drain_payloads(&conn, &topic, Duration::from_secs(3)).await;
    let ready = ready_in(&config, &group_queue(&topic, "g")).await;
    let admin = RabbitConsumer::connect(&config).await.unwrap();
    admin
        .delete_topic(&topic, &[group_queue(&topic, "g")])
        .await
        .unwrap();
    assert!(failed.is_empty(), "acks failed: {failed:?}");
    assert_eq!(
        back,
        vec![numbered(late), numbered(early)],
        "exactly the released deliveries come back"
    );
    assert_eq!(ready, Some(0));
}

/// The runner (unordered, concurrency 64) acks out of order; one handler in
/// the middle never finishes, so the tags above it cannot be coalesced past
/// it. Its acks still go out within the bound (everything else is handled and
/// settled while it runs), and at shutdown it is released: it alone comes
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_handler_in_the_middle_delays_no_ack_and_alone_comes_back() {
    let Some(config) = config("a_slow_handler_in_the_middle_delays_no_ack_and_alone_comes_back") else {
        return;
    };
    let topic = unique("acks-slow");
    let conn = polybus_rabbitmq::connect_with(config.clone()).await.unwrap();
    conn.consumer
        .declare_group(&topic, "g", StartFrom::Latest)
        .await
        .unwrap();
    let n = 400;
    let stuck = 123;
    for i in 0..n {
        conn.producer
            .send(&topic, Message::new(format!("m{i:03}")))
            .await
            .unwrap();
    }
    let seen = Recorder::new();
    let handler = {
        let seen = seen.clone();
        move |d: Delivery| {
            let seen = seen.clone();
            async move {
                let i: usize = String::from_utf8_lossy(d.payload())[1..].parse().unwrap();
                if i == stuck {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(Duration::from_micros(fastrand_like(i) % 2000)).await;
                seen.record(&d);
                HandlerResult::Ok(())
            }
        }
    };
    let handle = conn
        .runner()
        .topic(&topic)
        .group("g")
        .order(Order::Unordered)
        .concurrency(64)
        .buffer(200)
        .run(handler)
        .await
        .unwrap();
    seen.wait_for(n - 1, Duration::from_secs(60)).await.unwrap();
    // Every ack above the stuck tag was written while it still runs: once
    // its handler is cancelled and its message released, nothing else is
    // unacknowledged.
    handle.shutdown(Duration::from_millis(500)).await;
    let back = drain_payloads(&conn, &topic, Duration::from_secs(3)).await;
    let ids = seen.ids();
    let handled_twice = ids.len() - ids.iter().collect::<std::collections::HashSet<_>>().len();
    let admin = RabbitConsumer::connect(&config).await.unwrap();
    admin
        .delete_topic(&topic, &[group_queue(&topic, "g")])
        .await
        .unwrap();
    assert_eq!(back, vec![format!("m{stuck:03}")]);
    assert_eq!(handled_twice, 0);
}

/// Acks waiting in the book (a held tag below them, a long bound) when the
/// connection goes away are not reported settled, and the broker redelivers
/// them; acks reported settled never come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ack_not_written_before_the_channel_is_lost_is_not_settled() {
    let Some(config) = config("an_ack_not_written_before_the_channel_is_lost_is_not_settled") else {
        return;
    };
    let config = config.ack_coalescing(Some(Duration::from_secs(30)));
    let topic = unique("acks-lost");
    let conn = polybus_rabbitmq::connect_with(config.clone()).await.unwrap();
    let n = 20;
    declare_and_send(&conn, &topic, n).await;
    let options = polybus_core::SubscribeOptions::new(&topic).group("g").prefetch(n);
    let mut sub = conn.consumer.subscribe(options).await.unwrap();
    let held = take(&mut sub, n).await;
    // 0..5 acked contiguously: one multiple ack, settled.
    for (_, acker) in &held[..5] {
        let acker = acker.clone();
        tokio::spawn(async move { acker.ack().await })
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // 6..20 acked above the held m05: they wait for it (30 s bound).
    let waiting: Vec<_> = (6..n)
        .map(|i| {
            let acker = held[i].1.clone();
            tokio::spawn(async move { (i, acker.ack().await) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The connection goes away under them.
    let closing = tokio::spawn(sub.close());
    let mut settled = vec![0, 1, 2, 3, 4];
    let mut not_settled = Vec::new();
    for task in waiting {
        match tokio::time::timeout(Duration::from_secs(10), task).await {
            Ok(Ok((i, Ok(())))) => settled.push(i),
            Ok(Ok((i, Err(Error::NotSettled { .. })))) => not_settled.push(i),
            other => panic!("an ack neither settled nor refused in time: {other:?}"),
        }
    }
    closing.await.unwrap().unwrap();
    let back = drain_payloads(&conn, &topic, Duration::from_secs(3)).await;
    let admin = RabbitConsumer::connect(&config).await.unwrap();
    admin
        .delete_topic(&topic, &[group_queue(&topic, "g")])
        .await
        .unwrap();
    for i in &settled {
        assert!(
            !back.contains(&numbered(*i)),
            "{} was reported settled but came back: {back:?}",
            numbered(*i)
        );
    }
    for i in not_settled.iter().chain(&[5]) {
        assert!(
            back.contains(&numbered(*i)),
            "{} was not settled and must come back: {back:?}",
            numbered(*i)
        );
    }
    assert_eq!(
        settled.len(),
        5,
        "the acks waiting for m05 were never written: {settled:?}"
    );
}
