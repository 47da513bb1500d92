//! Pull statuses that never clear, and group consumers made by other tools
//! (issue 12, items 9 and 10). Skips loudly without `POLYBUS_TEST_NATS_URL`.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use polybus_conformance::broker_url;
use polybus_core::{Error, Event, Message, StartFrom, SubscribeOptions, Subscription};
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

async fn admin(config: &NatsConfig) -> jetstream::Context {
    let client = async_nats::connect(config.servers[0].as_str()).await.unwrap();
    jetstream::new(client)
}

async fn next_delivery(
    sub: &mut Box<dyn Subscription>,
    within: Duration,
) -> (polybus_core::Delivery, polybus_core::Acker) {
    match tokio::time::timeout(within, sub.next()).await {
        Ok(Some(Ok(Event::Delivery(d, a)))) => (d, a),
        other => panic!("expected a delivery within {within:?}, got {other:?}"),
    }
}

async fn cleanup(config: &NatsConfig, topic: &str) {
    JetStreamConsumer::connect(config)
        .await
        .unwrap()
        .delete_topic(topic)
        .await
        .unwrap();
}

/// A durable deleted while no pull request is open: the next pull gets "503 No
/// Responders". That ends the subscription with an error naming the group
/// (before: retried every 250 ms forever, `next()` never returned).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_group_consumer_ends_the_subscription() {
    let Some(config) = config("a_deleted_group_consumer_ends_the_subscription") else {
        return;
    };
    let topic = unique("deleted");
    let conn = polybus_nats::connect_with(config.clone()).await.unwrap();
    conn.consumer.declare_topic(&topic).await.unwrap();
    let mut sub = conn
        .consumer
        .subscribe(SubscribeOptions::new(&topic).group("g").prefetch(1))
        .await
        .unwrap();
    conn.producer.send(&topic, Message::new("one")).await.unwrap();
    // Held: all credit is out, so no pull request is open.
    let (_, acker) = next_delivery(&mut sub, Duration::from_secs(10)).await;
    let js = admin(&config).await;
    js.get_stream(stream_name(&topic))
        .await
        .unwrap()
        .delete_consumer("g")
        .await
        .unwrap();
    // Credit comes back, the pump pulls, and the server has nobody to answer.
    let _ = acker.release(None).await;
    let result = tokio::time::timeout(Duration::from_secs(10), sub.next()).await;
    match result {
        Ok(Some(Err(e))) => {
            assert!(!e.is_retryable(), "{e}");
            assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
            assert!(e.to_string().contains("'g'"), "names the group: {e}");
        }
        other => panic!("expected the subscription to end with an error, got {other:?}"),
    }
    sub.close().await.unwrap();
    cleanup(&config, &topic).await;
}

/// A durable made by another tool with `max_batch: 2`: polybus asks for at
/// most 2 per request (before: "409 Exceeded MaxRequestBatch of 2" forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_with_a_small_max_batch_still_delivers() {
    let Some(config) = config("a_consumer_with_a_small_max_batch_still_delivers") else {
        return;
    };
    let topic = unique("maxbatch");
    let conn = polybus_nats::connect_with(config.clone()).await.unwrap();
    conn.consumer.declare_topic(&topic).await.unwrap();
    let js = admin(&config).await;
    js.get_stream(stream_name(&topic))
        .await
        .unwrap()
        .create_consumer(consumer::pull::Config {
            durable_name: Some("g".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_batch: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    for i in 0..10 {
        conn.producer
            .send(&topic, Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    let mut sub = conn
        .consumer
        .subscribe(SubscribeOptions::new(&topic).group("g").prefetch(32))
        .await
        .unwrap();
    for _ in 0..10 {
        let (_, acker) = next_delivery(&mut sub, Duration::from_secs(10)).await;
        acker.ack().await.unwrap();
    }
    sub.close().await.unwrap();
    cleanup(&config, &topic).await;
}

/// A subscription without a group whose ephemeral consumer the server removed
/// (as after an outage longer than its inactivity threshold) gets a new one,
/// starting after the last message it saw; a delivery from the old consumer
/// can no longer be settled and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_ephemeral_consumer_is_recreated() {
    let Some(config) = config("a_removed_ephemeral_consumer_is_recreated") else {
        return;
    };
    let topic = unique("ephemeral");
    let conn = polybus_nats::connect_with(config.clone()).await.unwrap();
    conn.consumer.declare_topic(&topic).await.unwrap();
    let mut sub = conn
        .consumer
        .subscribe(SubscribeOptions::new(&topic).prefetch(2))
        .await
        .unwrap();
    conn.producer.send(&topic, Message::new("before")).await.unwrap();
    let (first, first_acker) = next_delivery(&mut sub, Duration::from_secs(10)).await;
    assert_eq!(&first.payload()[..], b"before");
    let js = admin(&config).await;
    let stream = js.get_stream(stream_name(&topic)).await.unwrap();
    let names: Vec<String> = futures::StreamExt::collect::<Vec<_>>(stream.consumer_names())
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    stream.delete_consumer(&names[0]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = Message::new("after");
    conn.producer.send(&topic, sent.clone()).await.unwrap();
    let (second, second_acker) = next_delivery(&mut sub, Duration::from_secs(15)).await;
    assert_eq!(
        second.id(),
        sent.id,
        "the new consumer starts after the last message seen"
    );
    second_acker.ack().await.unwrap();
    match first_acker.ack().await {
        Err(Error::NotSettled { .. }) => {}
        other => panic!("an ack for the deleted consumer must say it did not settle: {other:?}"),
    }
    sub.close().await.unwrap();
    cleanup(&config, &topic).await;
}

/// Group consumers created by another tool with settings polybus cannot work
/// with are refused at subscribe, naming the setting (before: only AckWait
/// was checked, and delivery stopped silently or went wrong).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_group_consumers_that_cannot_work_are_refused() {
    let Some(config) = config("existing_group_consumers_that_cannot_work_are_refused") else {
        return;
    };
    let topic = unique("refused");
    let conn = polybus_nats::connect_with(config.clone()).await.unwrap();
    conn.consumer.declare_topic(&topic).await.unwrap();
    let js = admin(&config).await;
    let stream = js.get_stream(stream_name(&topic)).await.unwrap();
    let base = consumer::Config {
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        ..Default::default()
    };
    let mut cases: Vec<(&str, consumer::Config)> = Vec::new();
    for (field, policy) in [
        ("ack_policy", consumer::AckPolicy::None),
        ("ack_policy", consumer::AckPolicy::All),
    ] {
        let mut c = base.clone();
        c.ack_policy = policy;
        cases.push((field, c));
    }
    let mut c = base.clone();
    c.max_deliver = 3;
    cases.push(("MaxDeliver", c));
    let mut c = base.clone();
    c.headers_only = true;
    cases.push(("headers_only", c));
    let mut c = base.clone();
    c.deliver_subject = Some(format!("push.{topic}"));
    cases.push(("deliver_subject", c));
    let mut c = base.clone();
    c.max_deliver = 5;
    c.backoff = vec![Duration::from_secs(1), Duration::from_secs(60)];
    cases.push(("backoff", c));
    let mut c = base.clone();
    c.ack_wait = Duration::from_secs(5);
    cases.push(("AckWait", c));
    for (i, (field, mut c)) in cases.into_iter().enumerate() {
        let group = format!("g{i}");
        c.durable_name = Some(group.clone());
        stream
            .create_consumer(c)
            .await
            .unwrap_or_else(|e| panic!("creating the {field} case: {e}"));
        let result = conn
            .consumer
            .subscribe(SubscribeOptions::new(&topic).group(&group))
            .await;
        match result {
            Err(Error::InvalidConfig(m)) => assert!(m.contains(field), "{field}: {m}"),
            Err(e) => panic!("{field}: expected InvalidConfig, got {e:?}"),
            Ok(sub) => {
                let _ = sub.close().await;
                panic!("{field}: a consumer with this setting was accepted");
            }
        }
        let declared = conn
            .consumer
            .declare_group(&topic, &group, StartFrom::Latest)
            .await;
        assert!(
            matches!(declared, Err(Error::InvalidConfig(_))),
            "{field}: {declared:?}"
        );
    }

    // Request limits are adapted to instead: a short max_expires and a small
    // max_bytes (which bounds only requests that ask for bytes) still deliver.
    let mut c = base.clone();
    c.durable_name = Some("limits".into());
    c.max_expires = Duration::from_secs(1);
    c.max_bytes = 100;
    stream.create_consumer(c).await.unwrap();
    let mut sub = conn
        .consumer
        .subscribe(SubscribeOptions::new(&topic).group("limits"))
        .await
        .unwrap();
    let big = Message::new(vec![7u8; 1000]);
    conn.producer.send(&topic, big.clone()).await.unwrap();
    let (d, acker) = next_delivery(&mut sub, Duration::from_secs(10)).await;
    assert_eq!(d.id(), big.id);
    acker.ack().await.unwrap();
    sub.close().await.unwrap();
    cleanup(&config, &topic).await;
}

/// Issue 11 (item 5) on a real broker: the group's consumer is deleted while a
/// runner consumes it. The runner ends by itself and reports the error through
/// its handle (`wait`, `state`, `error`) instead of returning a normal report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_whose_consumer_is_deleted_reports_the_error() {
    let Some(config) = config("a_runner_whose_consumer_is_deleted_reports_the_error") else {
        return;
    };
    let topic = unique("runnerdel");
    let conn = polybus_nats::connect_with(config.clone()).await.unwrap();
    conn.consumer.declare_topic(&topic).await.unwrap();
    conn.consumer
        .declare_group(&topic, "g", StartFrom::Latest)
        .await
        .unwrap();
    let handled = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handler = {
        let handled = std::sync::Arc::clone(&handled);
        move |_d: polybus_core::Delivery| {
            handled.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { polybus_core::HandlerResult::Ok(()) }
        }
    };
    let handle = conn.runner().topic(&topic).group("g").run(handler).await.unwrap();
    conn.producer.send(&topic, Message::new("one")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while handled.load(std::sync::atomic::Ordering::SeqCst) < 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the first message is handled");
    assert_eq!(handle.state(), polybus_core::RunState::Running);
    admin(&config)
        .await
        .get_stream(stream_name(&topic))
        .await
        .unwrap()
        .delete_consumer("g")
        .await
        .unwrap();
    let report = tokio::time::timeout(Duration::from_secs(30), handle.wait())
        .await
        .expect("the runner ends once its consumer is gone");
    let error = report.error().expect("the report carries the error");
    assert!(!error.is_retryable(), "{error}");
    assert!(error.to_string().contains('g'), "names the group: {error}");
    assert_eq!(handle.state(), polybus_core::RunState::Failed);
    assert!(handle.error().is_some());
    cleanup(&config, &topic).await;
}
