//! Helpers shared by the RabbitMQ test binaries that drive subscriptions by
//! hand (`rabbitmq.rs`, `ack_review.rs`).
#![allow(dead_code)]

use std::time::Duration;

use polybus_conformance::broker_url;
use polybus_core::{Acker, Delivery, Message, StartFrom, SubscribeOptions};
use polybus_rabbitmq::RabbitConfig;

pub(crate) fn config(test: &str) -> Option<RabbitConfig> {
    let url = broker_url("POLYBUS_TEST_AMQP_URL", test)?;
    Some(RabbitConfig::new(&url).unwrap())
}

pub(crate) fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &Message::new("").id[..8])
}

pub(crate) async fn next_delivery(
    sub: &mut Box<dyn polybus_core::Subscription>,
    within: Duration,
) -> Option<(Delivery, Acker)> {
    match tokio::time::timeout(within, sub.next()).await {
        Ok(Some(Ok(polybus_core::Event::Delivery(d, a)))) => Some((d, a)),
        Ok(Some(Ok(other))) => panic!("unexpected event {other:?}"),
        Ok(Some(Err(e))) => panic!("subscription failed: {e}"),
        Ok(None) | Err(_) => None,
    }
}

/// Takes `n` deliveries, each within 10 s.
pub(crate) async fn take(sub: &mut Box<dyn polybus_core::Subscription>, n: usize) -> Vec<(Delivery, Acker)> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(
            next_delivery(sub, Duration::from_secs(10))
                .await
                .expect("a delivery"),
        );
    }
    held
}

/// The payload of the `i`th message [`declare_and_send`] sends.
pub(crate) fn numbered(i: usize) -> String {
    format!("m{i:04}")
}

/// Declares `(topic, "g")` and sends `n` messages, [`numbered`] from 0.
pub(crate) async fn declare_and_send(conn: &polybus_core::Connection, topic: &str, n: usize) {
    conn.consumer
        .declare_group(topic, "g", StartFrom::Latest)
        .await
        .unwrap();
    for i in 0..n {
        conn.producer
            .send(topic, Message::new(numbered(i)))
            .await
            .unwrap();
    }
}

/// Takes every delivery a fresh subscription of `(topic, "g")` gets within
/// `within` of quiet, acks each and returns their payloads, sorted.
pub(crate) async fn drain_payloads(
    conn: &polybus_core::Connection,
    topic: &str,
    within: Duration,
) -> Vec<String> {
    let options = SubscribeOptions::new(topic).group("g");
    let mut sub = conn.consumer.subscribe(options).await.unwrap();
    let mut payloads = Vec::new();
    while let Some((d, a)) = next_delivery(&mut sub, within).await {
        payloads.push(String::from_utf8_lossy(d.payload()).into_owned());
        a.ack().await.unwrap();
    }
    sub.close().await.unwrap();
    payloads.sort();
    payloads
}

/// A permutation of `0..n` (deterministic), for acking out of order.
pub(crate) fn shuffled(n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (i as u64).wrapping_mul(2_654_435_761) % 1009);
    order
}
