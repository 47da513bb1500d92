//! Behaviour of the in-memory broker beyond the shared suite: leases, deadlines,
//! crashes, prefetch, and the runner's backpressure observed from the broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use polybus_core::{
    Delivery, Event, HandlerResult, Message, Order, StartFrom, SubscribeOptions, Subscription,
};
use polybus_memory::{MemoryBroker, MemoryConfig};

async fn next(sub: &mut Box<dyn Subscription>) -> (Delivery, polybus_core::Acker) {
    match tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
        Ok(Some(Ok(Event::Delivery(d, a)))) => (d, a),
        other => panic!("expected a delivery, got {other:?}"),
    }
}

#[tokio::test]
async fn an_expired_lease_is_redelivered_with_a_higher_attempt() {
    let broker = MemoryBroker::with_config(MemoryConfig::default().ack_deadline(Duration::from_millis(100)));
    let conn = broker.connection();
    conn.consumer
        .declare_group("t", "g", StartFrom::Latest)
        .await
        .unwrap();
    conn.producer.send("t", Message::new("x")).await.unwrap();
    let mut sub = conn
        .consumer
        .subscribe(SubscribeOptions::new("t").group("g"))
        .await
        .unwrap();
    let (first, stale) = next(&mut sub).await;
    assert_eq!(first.attempt(), 1);
    let (again, acker) = next(&mut sub).await;
    assert_eq!((again.id(), again.attempt()), (first.id(), 2));
    stale.ack().await.unwrap();
    assert!(
        !broker.is_settled("t", "g"),
        "a stale ack does not settle the new lease"
    );
    acker.ack().await.unwrap();
    assert!(broker.is_settled("t", "g"));
}

#[tokio::test]
async fn keep_alive_extends_the_deadline() {
    let broker = MemoryBroker::with_config(MemoryConfig::default().ack_deadline(Duration::from_millis(200)));
    let conn = broker.connection();
    conn.consumer
        .declare_group("t", "g", StartFrom::Latest)
        .await
        .unwrap();
    conn.producer.send("t", Message::new("x")).await.unwrap();
    let mut sub = conn
        .consumer
        .subscribe(SubscribeOptions::new("t").group("g"))
        .await
        .unwrap();
    let (_, acker) = next(&mut sub).await;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        acker.keep_alive().await.unwrap();
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(50), sub.next())
            .await
            .is_err(),
        "not redelivered while kept alive"
    );
    acker.ack().await.unwrap();
    assert!(broker.is_settled("t", "g"));
}

#[tokio::test]
async fn a_dropped_subscription_gives_its_leases_back_at_once() {
    let broker = MemoryBroker::new();
    let conn = broker.connection();
    conn.consumer
        .declare_group("t", "g", StartFrom::Latest)
        .await
        .unwrap();
    conn.producer.send("t", Message::new("x")).await.unwrap();
    let mut crashed = conn
        .consumer
        .subscribe(SubscribeOptions::new("t").group("g"))
        .await
        .unwrap();
    let (d, _acker) = next(&mut crashed).await;
    drop(crashed);
    let mut sub = conn
        .consumer
        .subscribe(SubscribeOptions::new("t").group("g"))
        .await
        .unwrap();
    let (again, acker) = next(&mut sub).await;
    assert_eq!(again.id(), d.id());
    acker.ack().await.unwrap();
}

#[tokio::test]
async fn prefetch_bounds_unsettled_deliveries() {
    let broker = MemoryBroker::new();
    let conn = broker.connection();
    conn.consumer
        .declare_group("t", "g", StartFrom::Latest)
        .await
        .unwrap();
    for i in 0..10 {
        conn.producer
            .send("t", Message::new(format!("{i}")))
            .await
            .unwrap();
    }
    let mut sub = conn
        .consumer
        .subscribe(SubscribeOptions::new("t").group("g").prefetch(3))
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(next(&mut sub).await.1);
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(100), sub.next())
            .await
            .is_err(),
        "a fourth delivery waits for a settlement"
    );
    held.pop().unwrap().ack().await.unwrap();
    next(&mut sub).await;
}

#[tokio::test]
async fn a_closed_consumer_ends_its_subscriptions_and_refuses_more() {
    let broker = MemoryBroker::new();
    let conn = broker.connection();
    let mut sub = conn.consumer.subscribe(SubscribeOptions::new("t")).await.unwrap();
    conn.consumer.close().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(1), sub.next())
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        conn.consumer.subscribe(SubscribeOptions::new("t")).await,
        Err(polybus_core::Error::Closed(_))
    ));
}

/// A slow handler with a long backlog: the runner never holds more than
/// concurrency + buffer unsettled deliveries, whatever the backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_does_not_pull_the_backlog_into_memory() {
    let broker = MemoryBroker::new();
    let conn = broker.connection();
    conn.consumer
        .declare_group("t", "g", StartFrom::Latest)
        .await
        .unwrap();
    for i in 0..500 {
        conn.producer
            .send("t", Message::new(format!("{i}")))
            .await
            .unwrap();
    }
    let handled = Arc::new(AtomicUsize::new(0));
    let handle = conn
        .runner()
        .topic("t")
        .group("g")
        .order(Order::Unordered)
        .concurrency(4)
        .buffer(6)
        .run({
            let handled = Arc::clone(&handled);
            move |_d: Delivery| {
                let handled = Arc::clone(&handled);
                async move {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    handled.fetch_add(1, Ordering::SeqCst);
                    HandlerResult::Ok(())
                }
            }
        })
        .await
        .unwrap();
    let mut peak = 0;
    while handled.load(Ordering::SeqCst) < 100 {
        peak = peak.max(broker.group_stats("t", "g").unwrap().unacked);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    handle.shutdown(Duration::from_secs(5)).await;
    assert!(peak <= 10, "at most concurrency + buffer = 10 held, saw {peak}");
    assert!(peak >= 4, "the runner did fill its slots (peak {peak})");
    let stats = broker.group_stats("t", "g").unwrap();
    assert_eq!(stats.unacked, 0, "shutdown released what it held");
    assert_eq!(stats.pending, 500 - handled.load(Ordering::SeqCst));
}

#[tokio::test]
async fn wait_until_settled_and_published_help_unit_tests() {
    let broker = MemoryBroker::new();
    let conn = broker.connection();
    let handle = conn
        .runner()
        .topic("t")
        .group("g")
        .run(|_d: Delivery| async { HandlerResult::Ok(()) })
        .await
        .unwrap();
    conn.producer.send("t", Message::new("a")).await.unwrap();
    conn.producer.send("t", Message::new("b")).await.unwrap();
    broker.wait_until_settled(Duration::from_secs(5)).await.unwrap();
    assert_eq!(handle.stats().handled, 2);
    let payloads: Vec<_> = broker.published("t").into_iter().map(|m| m.payload).collect();
    assert_eq!(payloads, ["a", "b"]);
    handle.shutdown(Duration::from_secs(5)).await;
}

#[test]
fn named_urls_share_a_broker_and_bad_urls_are_errors() {
    assert!(polybus_memory::connect("memory://").is_ok());
    assert!(matches!(
        polybus_memory::connect("kafka://x"),
        Err(polybus_core::Error::InvalidConfig(_))
    ));
}
