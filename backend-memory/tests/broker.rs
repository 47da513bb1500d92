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

/// A broker with `deadline` as its ack deadline, one message on `t`, and a
/// subscription of group `g` to it.
async fn one_message(deadline: Duration) -> (MemoryBroker, polybus_core::Connection, Box<dyn Subscription>) {
    let broker = MemoryBroker::with_config(MemoryConfig::default().ack_deadline(deadline));
    let conn = broker.connection();
    conn.consumer
        .declare_group("t", "g", StartFrom::Latest)
        .await
        .unwrap();
    conn.producer.send("t", Message::new("x")).await.unwrap();
    let sub = conn
        .consumer
        .subscribe(SubscribeOptions::new("t").group("g"))
        .await
        .unwrap();
    (broker, conn, sub)
}

#[tokio::test]
async fn an_expired_lease_is_redelivered_with_a_higher_attempt() {
    let (broker, _conn, mut sub) = one_message(Duration::from_millis(100)).await;
    let (first, stale) = next(&mut sub).await;
    assert_eq!(first.attempt(), 1);
    let (again, acker) = next(&mut sub).await;
    assert_eq!((again.id(), again.attempt()), (first.id(), 2));
    // The acker tells the truth: nothing was settled (issue 11, item 6; the old
    // acker returned Ok here).
    assert!(
        matches!(stale.ack().await, Err(polybus_core::Error::NotSettled { .. })),
        "a stale ack reports that it did not take effect"
    );
    assert!(
        !broker.is_settled("t", "g"),
        "a stale ack does not settle the new lease"
    );
    acker.ack().await.unwrap();
    assert!(broker.is_settled("t", "g"));
}

#[tokio::test]
async fn keep_alive_extends_the_deadline() {
    let (broker, _conn, mut sub) = one_message(Duration::from_millis(200)).await;
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
    let (_broker, conn, mut crashed) = one_message(Duration::from_secs(30)).await;
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

/// A producer whose first `failures` publishes to a dead-letter topic fail.
struct FlakyDeadLetters {
    inner: Arc<dyn polybus_core::Producer>,
    failures: AtomicUsize,
}

#[polybus_core::async_trait]
impl polybus_core::Producer for FlakyDeadLetters {
    fn max_payload(&self) -> usize {
        self.inner.max_payload()
    }
    async fn publish(&self, topic: &str, message: Message) -> polybus_core::Result<()> {
        if topic.ends_with(".dlq")
            && self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(polybus_core::Error::connection(
                "memory",
                "dead-letter topic unavailable",
            ));
        }
        self.inner.publish(topic, message).await
    }
    async fn flush(&self) -> polybus_core::Result<()> {
        self.inner.flush().await
    }
    async fn close(&self) -> polybus_core::Result<()> {
        self.inner.close().await
    }
}

/// A failed dead-letter publish keeps the message held and its key blocked until a
/// retry succeeds: nothing is released, nothing overtakes it, nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_dead_letter_publish_is_retried_and_keeps_key_order() {
    let broker = MemoryBroker::new();
    let conn = broker.connection();
    conn.consumer.declare_topic("t").await.unwrap();
    conn.consumer
        .declare_group("t", "g", StartFrom::Latest)
        .await
        .unwrap();
    conn.consumer
        .declare_group("t.dlq", "dlq", StartFrom::Latest)
        .await
        .unwrap();
    let producer = Arc::new(FlakyDeadLetters {
        inner: Arc::clone(&conn.producer),
        failures: AtomicUsize::new(3),
    });
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let handle = polybus_core::Runner::new(Arc::clone(&conn.consumer), producer)
        .topic("t")
        .group("g")
        .retry(
            polybus_core::RetryPolicy::attempts(3)
                .backoff(Duration::from_millis(5), Duration::from_millis(20)),
        )
        .run({
            let (order, broker) = (Arc::clone(&order), broker.clone());
            move |d: Delivery| {
                let (order, broker) = (Arc::clone(&order), broker.clone());
                async move {
                    if d.payload().as_ref() == b"poison" {
                        return Err(polybus_core::HandlerError::permanent("poison"));
                    }
                    order.lock().unwrap().push(format!(
                        "{}:{}",
                        String::from_utf8_lossy(d.payload()),
                        broker.published("t.dlq").len()
                    ));
                    Ok(())
                }
            }
        })
        .await
        .unwrap();
    for payload in ["poison", "after-1", "after-2"] {
        conn.producer
            .send("t", Message::new(payload).with_key("k"))
            .await
            .unwrap();
    }
    while broker.published("t.dlq").is_empty() || order.lock().unwrap().len() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let report = handle.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.released, 0, "never released back to the broker");
    assert_eq!(report.dead_lettered, 1);
    assert_eq!(broker.published("t.dlq").len(), 1, "dead-lettered exactly once");
    assert_eq!(
        *order.lock().unwrap(),
        ["after-1:1", "after-2:1"],
        "the key's later messages waited"
    );
    assert!(broker.is_settled("t", "g"));
}
