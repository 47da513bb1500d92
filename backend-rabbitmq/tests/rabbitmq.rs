//! RabbitMQ behaviour beyond the shared suite: unroutable messages with
//! `mandatory`, and single-active-consumer groups. Skips loudly without
//! `POLYBUS_TEST_AMQP_URL` (a failure under `POLYBUS_TEST_REQUIRE_BROKERS=1`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use polybus_conformance::{Recorder, broker_url};
use polybus_core::{Delivery, Error, HandlerResult, Message, Order, StartFrom};
use polybus_rabbitmq::{RabbitConfig, RabbitConsumer, group_queue};

fn config(test: &str) -> Option<RabbitConfig> {
    let url = broker_url("POLYBUS_TEST_AMQP_URL", test)?;
    Some(RabbitConfig::new(&url).unwrap())
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &Message::new("").id[..8])
}

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
async fn next_delivery(
    sub: &mut Box<dyn polybus_core::Subscription>,
    within: Duration,
) -> Option<(Delivery, polybus_core::Acker)> {
    match tokio::time::timeout(within, sub.next()).await {
        Ok(Some(Ok(polybus_core::Event::Delivery(d, a)))) => Some((d, a)),
        Ok(Some(Ok(other))) => panic!("unexpected event {other:?}"),
        Ok(Some(Err(e))) => panic!("subscription failed: {e}"),
        Ok(None) | Err(_) => None,
    }
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
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(
            next_delivery(&mut first, Duration::from_secs(10))
                .await
                .expect("a delivery"),
        );
    }
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
