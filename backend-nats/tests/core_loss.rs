//! Core NATS loses messages when the consumer is slower than the publishers
//! (at-most-once); the loss is counted, never silent (issue 12, item 11).
//! Skips loudly without `POLYBUS_TEST_NATS_URL`.

use std::sync::Arc;
use std::time::Duration;

use polybus_conformance::broker_url;
use polybus_core::{Connection, Event, Message, SubscribeOptions};
use polybus_nats::{CoreConsumer, CoreProducer, Mode, NatsConfig};

/// A subscriber that reads nothing while 1,000 messages arrive, with a buffer
/// of 64: async-nats drops the rest, and the consumer counts them (before:
/// only a debug line).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_mode_counts_what_the_client_dropped() {
    let Some(url) = broker_url(
        "POLYBUS_TEST_NATS_URL",
        "core_mode_counts_what_the_client_dropped",
    ) else {
        return;
    };
    let config = NatsConfig::from_url(&url)
        .unwrap()
        .mode(Mode::Core)
        .subscription_capacity(64);
    let consumer = Arc::new(CoreConsumer::connect(&config).await.unwrap());
    let dropped = consumer.drop_counter();
    let conn = Connection {
        producer: Arc::new(CoreProducer::connect(&config).await.unwrap()),
        consumer: consumer.clone(),
    };
    let topic = format!("coreloss-{}", &Message::new("").id[..8]);
    let mut sub = conn
        .consumer
        .subscribe(SubscribeOptions::new(&topic))
        .await
        .unwrap();
    let sent = 1000u64;
    let batch: Vec<Message> = (0..sent).map(|i| Message::new(format!("m{i}"))).collect();
    conn.producer.send_batch(&topic, batch).await.unwrap();
    // Every message has reached the client once this round trip is back.
    conn.producer.flush().await.unwrap();
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while dropped.dropped() == 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut received = 0u64;
    while let Ok(Some(Ok(Event::Delivery(..)))) =
        tokio::time::timeout(Duration::from_millis(500), sub.next()).await
    {
        received += 1;
    }
    let counted = dropped.dropped();
    eprintln!("core loss: sent {sent}, received {received}, counted as dropped {counted}");
    // How many get through depends on how far the client's reader has got when
    // the test starts reading (a loaded machine lets more in); what matters is
    // that messages were lost and the loss was counted.
    assert!(
        received < sent,
        "a buffer of 64 cannot hold {sent}: received {received}"
    );
    assert!(
        counted > 0,
        "the loss must be counted (received {received} of {sent})"
    );
    assert!(received + counted <= sent, "never more than was lost");
    assert_eq!(consumer.dropped(), counted);
    sub.close().await.unwrap();
    let _ = conn.close().await;
}
