//! Catch-up mode on JetStream under a hostile server (issue 14 review).
//! Skips loudly without `POLYBUS_TEST_NATS_URL`.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use polybus_conformance::broker_url;
use polybus_core::{CatchUp, Delivery, Ended, HandlerResult, Message, Order, StartFrom};
use polybus_nats::{JetStreamConsumer, NatsConfig, Storage, stream_name};

fn config(test: &str) -> Option<NatsConfig> {
    let url = broker_url("POLYBUS_TEST_NATS_URL", test)?;
    let mut config = NatsConfig::from_url(&url)
        .unwrap()
        .storage(Storage::Memory)
        .ack_wait(Duration::from_secs(30));
    config.pull_expiry = Duration::from_secs(2);
    Some(config)
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &Message::new("").id[..8])
}

/// A private replay (no group) in Stop mode whose ephemeral consumer the
/// server removes mid-run (as after an outage longer than its inactivity
/// threshold): the pump makes a new one where the old one stopped, and the
/// replay must still end at the log's end instead of running forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_survives_its_ephemeral_consumer_being_recreated() {
    let Some(config) = config("a_replay_survives_its_ephemeral_consumer_being_recreated") else {
        return;
    };
    let topic = unique("cu-ephemeral");
    let conn = polybus_nats::connect_with(config.clone()).await.unwrap();
    conn.consumer.declare_topic(&topic).await.unwrap();
    for i in 0..20 {
        conn.producer
            .send(&topic, Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    let handled = Arc::new(AtomicUsize::new(0));
    let handler = {
        let handled = handled.clone();
        move |_: Delivery| {
            let handled = handled.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                handled.fetch_add(1, Ordering::SeqCst);
                HandlerResult::Ok(())
            }
        }
    };
    let handle = conn
        .runner()
        .topic(&topic)
        .start(StartFrom::Earliest)
        .order(Order::Sequential)
        .buffer(2)
        .catch_up(CatchUp::Stop)
        .run(handler)
        .await
        .unwrap();
    while handled.load(Ordering::SeqCst) < 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = async_nats::connect(config.servers[0].as_str()).await.unwrap();
    let stream = jetstream::new(client)
        .get_stream(stream_name(&topic))
        .await
        .unwrap();
    let names: Vec<String> = futures::StreamExt::collect::<Vec<_>>(stream.consumer_names())
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    stream.delete_consumer(&names[0]).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(30), handle.wait()).await;
    let caught_up = handle.caught_up().await;
    let done = handled.load(Ordering::SeqCst);
    if ended.is_err() {
        handle.shutdown(Duration::from_secs(5)).await;
    }
    JetStreamConsumer::connect(&config)
        .await
        .unwrap()
        .delete_topic(&topic)
        .await
        .unwrap();
    let ended = ended.unwrap_or_else(|_| {
        panic!("the Stop replay did not end within 30 s ({done} of 20 handled; catch-up: {caught_up:?})")
    });
    assert_eq!(ended.ended, Some(Ended::CaughtUp), "{ended:?}");
}

/// The stream's last message at the start was deleted (an interior delete,
/// or a max-msgs limit dropping it) and new messages keep arriving, so the
/// consumer is never idle: the report must still come, from the ack floor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_last_message_under_live_traffic() {
    let Some(config) = config("a_deleted_last_message_under_live_traffic") else {
        return;
    };
    let topic = unique("cu-deleted");
    let conn = polybus_nats::connect_with(config.clone()).await.unwrap();
    conn.consumer.declare_topic(&topic).await.unwrap();
    for i in 0..10 {
        conn.producer
            .send(&topic, Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    let client = async_nats::connect(config.servers[0].as_str()).await.unwrap();
    let stream = jetstream::new(client)
        .get_stream(stream_name(&topic))
        .await
        .unwrap();
    assert!(
        stream.delete_message(10).await.unwrap(),
        "deleted the last message"
    );
    let seen: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let traffic = {
        let producer = conn.producer.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            for i in 0.. {
                let _ = producer.send(&topic, Message::new(format!("live{i}"))).await;
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
    };
    let handle = conn
        .runner()
        .topic(&topic)
        .group(unique("g"))
        .start(StartFrom::Earliest)
        .catch_up(CatchUp::Follow)
        .run({
            let seen = seen.clone();
            move |d: Delivery| {
                let seen = seen.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(40)).await;
                    seen.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(d.payload()).into_owned());
                    HandlerResult::Ok(())
                }
            }
        })
        .await
        .unwrap();
    let report = tokio::time::timeout(Duration::from_secs(20), handle.caught_up()).await;
    let backlog = seen.lock().unwrap().iter().filter(|p| p.starts_with('m')).count();
    traffic.abort();
    handle.shutdown(Duration::from_secs(5)).await;
    JetStreamConsumer::connect(&config)
        .await
        .unwrap()
        .delete_topic(&topic)
        .await
        .unwrap();
    report
        .expect("a catch-up report within 20 s under live traffic")
        .expect("caught up");
    assert_eq!(
        backlog, 9,
        "caught up with {backlog} of the 9 messages left handled"
    );
}

/// The backlog's last message is one async-nats cannot parse (a header value
/// that is not UTF-8, from another client): it costs the connection, is
/// fetched by sequence and dead-lettered. The report must still come, after
/// it and the rest are settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_message_at_the_end_is_caught_up() {
    let Some(url) = broker_url(support::URL_ENV, "a_poison_message_at_the_end_is_caught_up") else {
        return;
    };
    let config = support::test_config(&url, false);
    let conn = polybus_nats::connect_with(config.clone()).await.unwrap();
    let (topic, group) = (unique("cu-poison"), unique("g"));
    conn.consumer.declare_topic(&topic).await.unwrap();
    conn.consumer
        .declare_topic(&polybus_core::names::dead_letter_topic(&topic))
        .await
        .unwrap();
    for i in 0..5 {
        conn.producer
            .send(&topic, Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    let poison = polybus_conformance::ForeignRecord::new("poison").header("X-City", Some(b"Z\xfcrich"));
    support::foreign::publish(&url, &topic, &poison, true)
        .await
        .unwrap();
    let handle = conn
        .runner()
        .topic(&topic)
        .group(&group)
        .start(StartFrom::Earliest)
        .catch_up(CatchUp::Stop)
        .run(|_: Delivery| async { HandlerResult::Ok(()) })
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(40), handle.wait()).await;
    if ended.is_err() {
        handle.shutdown(Duration::from_secs(5)).await;
    }
    let _ = JetStreamConsumer::connect(&config)
        .await
        .unwrap()
        .delete_topic(&topic)
        .await;
    let ended = ended.expect("the Stop run ends within 40 s");
    assert_eq!(ended.ended, Some(Ended::CaughtUp), "{ended:?}");
    assert_eq!((ended.handled, ended.dead_lettered), (5, 1), "{ended:?}");
}
