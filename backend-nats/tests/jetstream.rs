//! JetStream behaviour beyond the shared suite. Skips loudly without
//! `POLYBUS_TEST_NATS_URL` (a failure under `POLYBUS_TEST_REQUIRE_BROKERS=1`).

use std::time::Duration;

use polybus_conformance::{Recorder, broker_url};
use polybus_core::{Error, Event, Message, StartFrom, SubscribeOptions};
use polybus_nats::{JetStreamConsumer, NatsConfig, Storage};

fn config(test: &str) -> Option<NatsConfig> {
    let url = broker_url("POLYBUS_TEST_NATS_URL", test)?;
    Some(
        NatsConfig::from_url(&url)
            .unwrap()
            .storage(Storage::Memory)
            .ack_wait(Duration::from_secs(2)),
    )
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &Message::new("").id[..8])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_with_a_shorter_ack_wait_is_refused() {
    let Some(config) = config("a_group_with_a_shorter_ack_wait_is_refused") else {
        return;
    };
    let topic = unique("ackwait");
    let short = polybus_nats::connect_with(config.clone().ack_wait(Duration::from_secs(1)))
        .await
        .unwrap();
    short.consumer.declare_topic(&topic).await.unwrap();
    short
        .consumer
        .declare_group(&topic, "g", StartFrom::Latest)
        .await
        .unwrap();
    // Keep-alives every third of 5 s would come too late for a 1 s AckWait.
    let long = polybus_nats::connect_with(config.clone().ack_wait(Duration::from_secs(5)))
        .await
        .unwrap();
    let result = long
        .consumer
        .subscribe(SubscribeOptions::new(&topic).group("g"))
        .await;
    assert!(
        matches!(&result, Err(Error::InvalidConfig(m)) if m.contains("AckWait")),
        "{:?}",
        result.err()
    );
    JetStreamConsumer::connect(&config)
        .await
        .unwrap()
        .delete_topic(&topic)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_topic_does_not_starve_a_busy_one() {
    let Some(config) = config("an_idle_topic_does_not_starve_a_busy_one") else {
        return;
    };
    let (idle, busy) = (unique("idle"), unique("busy"));
    let conn = polybus_nats::connect_with(config.clone()).await.unwrap();
    for t in [&idle, &busy] {
        conn.consumer.declare_topic(t).await.unwrap();
    }
    let mut sub = conn
        .consumer
        .subscribe(SubscribeOptions::new(&idle).topic(&busy).group("g").prefetch(4))
        .await
        .unwrap();
    let recorder = Recorder::new();
    for i in 0..20 {
        conn.producer
            .send(&busy, Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while recorder.len() < 20 {
        match tokio::time::timeout_at(until, sub.next()).await {
            Ok(Some(Ok(Event::Delivery(d, acker)))) => {
                assert_eq!(d.topic(), busy);
                recorder.record(&d);
                acker.ack().await.unwrap();
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("after {} of 20: {other:?}", recorder.len()),
        }
    }
    sub.close().await.unwrap();
    let admin = JetStreamConsumer::connect(&config).await.unwrap();
    for t in [&idle, &busy] {
        admin.delete_topic(t).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_publish_is_stored_once() {
    let Some(config) = config("a_repeated_publish_is_stored_once") else {
        return;
    };
    let topic = unique("dedup");
    let conn = polybus_nats::connect_with(config.clone()).await.unwrap();
    conn.consumer.declare_topic(&topic).await.unwrap();
    conn.consumer
        .declare_group(&topic, "g", StartFrom::Earliest)
        .await
        .unwrap();
    // The same message sent twice (as a retry after a lost PubAck would), then
    // a marker: the server's duplicate window drops the second copy.
    let twice = Message::new("once");
    conn.producer.send(&topic, twice.clone()).await.unwrap();
    conn.producer.send(&topic, twice.clone()).await.unwrap();
    let marker = Message::new("marker");
    conn.producer.send(&topic, marker.clone()).await.unwrap();
    let recorder = Recorder::new();
    let handle = conn
        .runner()
        .topic(&topic)
        .group("g")
        .run(recorder.handler())
        .await
        .unwrap();
    recorder
        .wait_until("the marker", Duration::from_secs(30), |seen| {
            seen.iter().any(|d| d.id() == marker.id)
        })
        .await
        .unwrap();
    handle.shutdown(Duration::from_secs(10)).await;
    let copies = recorder.all().iter().filter(|d| d.id() == twice.id).count();
    assert_eq!(copies, 1, "Nats-Msg-Id deduplicates the repeated publish");
    JetStreamConsumer::connect(&config)
        .await
        .unwrap()
        .delete_topic(&topic)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_in_backoff_is_kept_alive() {
    let Some(config) = config("a_message_in_backoff_is_kept_alive") else {
        return;
    };
    let topic = unique("backoff");
    let conn = polybus_nats::connect_with(config.clone()).await.unwrap();
    conn.consumer.declare_topic(&topic).await.unwrap();
    conn.consumer
        .declare_group(&topic, "g", StartFrom::Latest)
        .await
        .unwrap();
    let calls = Recorder::new();
    let handler = {
        let calls = calls.clone();
        move |d: polybus_core::Delivery| {
            let calls = calls.clone();
            async move {
                calls.record(&d);
                if d.attempt() == 1 {
                    return Err(polybus_core::HandlerError::retryable("later"));
                }
                Ok(())
            }
        }
    };
    // The retry waits 2.5 × AckWait (2 s) in process: without in-progress acks
    // for the held message the server would redeliver it meanwhile.
    let retry =
        polybus_core::RetryPolicy::attempts(3).backoff(Duration::from_secs(5), Duration::from_secs(5));
    let handle = conn
        .runner()
        .topic(&topic)
        .group("g")
        .retry(retry)
        .run(handler)
        .await
        .unwrap();
    conn.producer.send(&topic, Message::new("slow")).await.unwrap();
    calls.wait_for(2, Duration::from_secs(30)).await.unwrap();
    // Long enough for a server redelivery and the in-process retry to both show
    // up, if the message was not kept alive while it waited.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let report = handle.shutdown(Duration::from_secs(10)).await;
    let attempts: Vec<u32> = calls.all().iter().map(polybus_core::Delivery::attempt).collect();
    assert_eq!(
        attempts,
        vec![1, 2],
        "retried once in process, never redelivered meanwhile"
    );
    assert_eq!((report.handled, report.retried, report.released), (1, 1, 0));
    JetStreamConsumer::connect(&config)
        .await
        .unwrap()
        .delete_topic(&topic)
        .await
        .unwrap();
}

/// A header block over JetStream's 64 KiB is refused at once as a message the
/// broker will never take (`MessageRejected`, not retryable), so a dead-letter
/// copy that large becomes a labelled stub instead of being retried for ever
/// (the server's refusal, err_code 10097, looked retryable).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_blocks_are_rejected_not_retried() {
    let Some(config) = config("oversized_header_blocks_are_rejected_not_retried") else {
        return;
    };
    let topic = unique("bighdr");
    let conn = polybus_nats::connect_with(config.clone()).await.unwrap();
    conn.consumer.declare_topic(&topic).await.unwrap();
    let message = Message::new("x").with_header("big", "v".repeat(70 * 1024));
    let started = std::time::Instant::now();
    let result = conn.producer.send(&topic, message).await;
    assert!(matches!(result, Err(Error::MessageRejected { .. })), "{result:?}");
    assert!(!result.unwrap_err().is_retryable());
    assert!(started.elapsed() < Duration::from_secs(2), "refused at once");
    let fits = Message::new("x").with_header("big", "v".repeat(60 * 1024));
    conn.producer.send(&topic, fits).await.unwrap();
    JetStreamConsumer::connect(&config)
        .await
        .unwrap()
        .delete_topic(&topic)
        .await
        .unwrap();
}
