//! `Subscription::stop`, releases at shutdown and truthful acks (issue 12,
//! item 12 and the runner issue). Skips loudly without `POLYBUS_TEST_NATS_URL`.

use std::collections::HashSet;
use std::time::Duration;

use polybus_conformance::broker_url;
use polybus_core::{Error, Event, Message, SubscribeOptions, Subscription};
use polybus_nats::{JetStreamConsumer, NatsConfig, Storage};

fn config(test: &str) -> Option<NatsConfig> {
    let url = broker_url("POLYBUS_TEST_NATS_URL", test)?;
    let mut config = NatsConfig::from_url(&url)
        .unwrap()
        .storage(Storage::Memory)
        .ack_wait(Duration::from_secs(30));
    config.pull_expiry = Duration::from_secs(5);
    Some(config)
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &Message::new("").id[..8])
}

async fn take(
    sub: &mut Box<dyn Subscription>,
    n: usize,
    within: Duration,
) -> Vec<(polybus_core::Delivery, polybus_core::Acker)> {
    let until = tokio::time::Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout_at(until, sub.next()).await {
            Ok(Some(Ok(Event::Delivery(d, a)))) => out.push((d, a)),
            Ok(Some(Ok(_))) => {}
            other => panic!(
                "after {} of {n} deliveries within {within:?}: {other:?}",
                out.len()
            ),
        }
    }
    out
}

/// The runner's shutdown, as the subscription sees it: it holds 21 deliveries,
/// calls `stop`, releases 20 of them at once and acks the last (a delivery
/// yielded before `stop` stays settleable), then closes. With AckWait 30 s, a
/// new subscription on the group must get all 20 back within a few seconds,
/// in every one of 20 rounds (before: a release could land in the old
/// subscription's open pull request after its inbox was gone, and wait out
/// AckWait).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn released_messages_reach_the_next_subscription_at_once() {
    let Some(config) = config("released_messages_reach_the_next_subscription_at_once") else {
        return;
    };
    let topic = unique("release");
    let conn = polybus_nats::connect_with(config.clone()).await.unwrap();
    conn.consumer.declare_topic(&topic).await.unwrap();
    conn.consumer
        .declare_group(&topic, "g", polybus_core::StartFrom::Latest)
        .await
        .unwrap();
    for round in 0..20 {
        let sent: Vec<Message> = (0..21).map(|i| Message::new(format!("r{round}-{i}"))).collect();
        conn.producer.send_batch(&topic, sent.clone()).await.unwrap();
        let mut a = conn
            .consumer
            .subscribe(SubscribeOptions::new(&topic).group("g").prefetch(64))
            .await
            .unwrap();
        let mut held = take(&mut a, 21, Duration::from_secs(10)).await;
        let (kept, kept_acker) = held.pop().unwrap();
        a.stop().await.unwrap();
        a.stop().await.unwrap(); // idempotent
        let releases = held.iter().map(|(_, acker)| acker.release(None));
        for r in futures::future::join_all(releases).await {
            r.unwrap();
        }
        kept_acker.ack().await.unwrap();
        a.close().await.unwrap();

        let expected: HashSet<String> = held.iter().map(|(d, _)| d.id().to_owned()).collect();
        let mut b = conn
            .consumer
            .subscribe(SubscribeOptions::new(&topic).group("g").prefetch(64))
            .await
            .unwrap();
        let mut seen = HashSet::new();
        let until = tokio::time::Instant::now() + Duration::from_secs(3);
        while seen.len() < expected.len() {
            match tokio::time::timeout_at(until, b.next()).await {
                Ok(Some(Ok(Event::Delivery(d, acker)))) => {
                    // nats-server 2.9 rolls its consumer's stream pointer back when
                    // it takes a NAKed message for redelivery while only an
                    // abandoned pull request waits: the newest message, acked
                    // above, would come again (and a released one would wait out
                    // AckWait). `stop` makes the server drop that request first.
                    assert_ne!(
                        d.id(),
                        kept.id(),
                        "round {round}: the message acked after stop came back"
                    );
                    seen.insert(d.id().to_owned());
                    acker.ack().await.unwrap();
                }
                Ok(Some(Ok(_))) => {}
                other => panic!(
                    "round {round}: {} of {} released messages reached the next subscription within 3 s \
                     (AckWait is 30 s); then {other:?}",
                    seen.len(),
                    expected.len()
                ),
            }
        }
        assert_eq!(seen, expected, "round {round}");
        b.stop().await.unwrap();
        b.close().await.unwrap();
    }
    JetStreamConsumer::connect(&config)
        .await
        .unwrap()
        .delete_topic(&topic)
        .await
        .unwrap();
}

/// Core NATS: after `stop`, nothing published later reaches the subscription;
/// `next` yields what had already arrived, then ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_core_subscription_takes_nothing_new() {
    let Some(config) = config("a_stopped_core_subscription_takes_nothing_new") else {
        return;
    };
    let topic = unique("corestop");
    let conn = polybus_nats::connect_with(config.mode(polybus_nats::Mode::Core))
        .await
        .unwrap();
    let mut sub = conn
        .consumer
        .subscribe(SubscribeOptions::new(&topic))
        .await
        .unwrap();
    for i in 0..3 {
        conn.producer
            .send(&topic, Message::new(format!("before-{i}")))
            .await
            .unwrap();
    }
    sub.stop().await.unwrap();
    for i in 0..3 {
        conn.producer
            .send(&topic, Message::new(format!("after-{i}")))
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
            Ok(Some(Ok(Event::Delivery(d, _)))) => {
                got.push(String::from_utf8_lossy(d.payload()).into_owned())
            }
            Ok(None) => break,
            other => panic!("after {got:?}: {other:?}"),
        }
    }
    assert_eq!(got, vec!["before-0", "before-1", "before-2"]);
    sub.close().await.unwrap();
}

/// An ack whose consumer (its connection) is closed did not take effect and
/// says so (before: an error that did not say nothing was settled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_after_the_consumer_closed_is_not_settled() {
    let Some(config) = config("an_ack_after_the_consumer_closed_is_not_settled") else {
        return;
    };
    let topic = unique("acktruth");
    let conn = polybus_nats::connect_with(config.clone()).await.unwrap();
    conn.consumer.declare_topic(&topic).await.unwrap();
    let mut sub = conn
        .consumer
        .subscribe(SubscribeOptions::new(&topic).group("g"))
        .await
        .unwrap();
    conn.producer.send(&topic, Message::new("x")).await.unwrap();
    let mut got = take(&mut sub, 1, Duration::from_secs(10)).await;
    let (_, acker) = got.pop().unwrap();
    conn.consumer.close().await.unwrap();
    match acker.ack().await {
        Err(Error::NotSettled { operation, .. }) => assert_eq!(operation, "ack"),
        other => panic!("expected NotSettled, got {other:?}"),
    }
    drop(sub);
    JetStreamConsumer::connect(&config)
        .await
        .unwrap()
        .delete_topic(&topic)
        .await
        .unwrap();
}
