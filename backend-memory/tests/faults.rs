//! The runner's fault paths driven by the in-memory broker's fault helpers
//! (issue 11): faults injected in the broker itself rather than around it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use polybus_core::{
    Delivery, Error, HandlerError, HandlerResult, Message, RetryPolicy, RunState, StartFrom, SubscribeOptions,
};
use polybus_memory::{AckFault, MemoryBroker, MemoryConfig};

fn quick() -> RetryPolicy {
    RetryPolicy::attempts(3).backoff(Duration::from_millis(10), Duration::from_millis(50))
}

/// A handler that outlives its lease: the ack finds the lease gone. The old
/// acker returned `Ok` and the runner counted it handled while the broker
/// redelivered it; now the failed ack is reported and the message is handled
/// again (at-least-once), not counted as handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_after_the_lease_expired_is_reported_not_counted() {
    let broker = MemoryBroker::with_config(MemoryConfig::default().ack_deadline(Duration::from_secs(30)));
    let conn = broker.connection();
    conn.consumer
        .declare_group("t", "g", StartFrom::Latest)
        .await
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (calls, broker) = (Arc::clone(&calls), broker.clone());
        move |_d: Delivery| {
            let (calls, broker) = (Arc::clone(&calls), broker.clone());
            async move {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    // The broker gives up on this delivery while it is handled.
                    broker.expire_leases();
                }
                HandlerResult::Ok(())
            }
        }
    };
    let handle = conn.runner().topic("t").group("g").run(handler).await.unwrap();
    conn.producer.send("t", Message::new("x")).await.unwrap();
    broker.wait_until_settled(Duration::from_secs(10)).await.unwrap();
    let report = handle.shutdown(Duration::from_secs(5)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2, "redelivered and handled again");
    assert_eq!((report.handled, report.settle_failures), (1, 1), "{report:?}");
    assert!(!report.is_clean());
}

/// Acks that hang are bounded by the settle timeout; acks that fail are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_and_failing_acks_are_bounded_and_counted() {
    let broker = MemoryBroker::new();
    let conn = broker.connection();
    conn.consumer
        .declare_group("t", "g", StartFrom::Latest)
        .await
        .unwrap();
    broker.inject_ack_faults(AckFault::Hang, 1);
    broker.inject_ack_faults(AckFault::Fail, 1);
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = Arc::clone(&calls);
        move |_d: Delivery| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { HandlerResult::Ok(()) }
        }
    };
    let handle = conn
        .runner()
        .topic("t")
        .group("g")
        .settle_timeout(Duration::from_millis(300))
        .run(handler)
        .await
        .unwrap();
    for i in 0..3 {
        conn.producer
            .send("t", Message::new(format!("{i}")).with_key("k"))
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(5), async {
        while handle.stats().handled < 1 || handle.stats().settle_failures < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the key moved on past the hung and the failed ack");
    let report = handle.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.settle_failures, 2, "{report:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

/// A non-retryable subscription error ends the runner with that error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_subscription_ends_the_runner_with_its_error() {
    let broker = MemoryBroker::new();
    let conn = broker.connection();
    conn.consumer
        .declare_group("t", "g", StartFrom::Latest)
        .await
        .unwrap();
    let handle = conn
        .runner()
        .topic("t")
        .group("g")
        .run(|_d: Delivery| async { HandlerResult::Ok(()) })
        .await
        .unwrap();
    assert_eq!(handle.state(), RunState::Running);
    broker.fail_subscriptions(|| Error::Unsupported("access revoked (injected)".into()));
    let report = tokio::time::timeout(Duration::from_secs(5), handle.wait())
        .await
        .expect("the runner ends");
    assert!(
        matches!(report.error(), Some(Error::Unsupported(_))),
        "{report:?}"
    );
    assert_eq!(handle.state(), RunState::Failed);
    // A retryable one only pauses pulling.
    let handle = conn
        .runner()
        .topic("t")
        .group("g")
        .run(|_d: Delivery| async { HandlerResult::Ok(()) })
        .await
        .unwrap();
    broker.fail_subscriptions(|| Error::connection("memory", "blip (injected)"));
    conn.producer.send("t", Message::new("after")).await.unwrap();
    broker.wait_until_settled(Duration::from_secs(5)).await.unwrap();
    assert_eq!(handle.state(), RunState::Running);
    let report = handle.shutdown(Duration::from_secs(5)).await;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.handled, 1);
}

/// Dead-letter publishes refused by the broker: a retryable refusal is retried,
/// an environment refusal (access denied) ends the runner and keeps the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_refusals_from_the_broker() {
    let broker = MemoryBroker::new();
    let conn = broker.connection();
    conn.consumer
        .declare_group("t", "g", StartFrom::Latest)
        .await
        .unwrap();
    broker.fail_publishes("t.dlq", 2, || Error::timeout("publish", Duration::from_secs(1)));
    let handle = conn
        .runner()
        .topic("t")
        .group("g")
        .retry(quick())
        .run(|_d: Delivery| async { Err(HandlerError::permanent("bad")) })
        .await
        .unwrap();
    conn.producer.send("t", Message::new("one")).await.unwrap();
    broker.wait_until_settled(Duration::from_secs(10)).await.unwrap();
    assert_eq!(broker.published("t.dlq").len(), 1);
    let report = handle.shutdown(Duration::from_secs(5)).await;
    assert_eq!((report.dead_lettered, report.dead_letter_failures), (1, 2));

    broker.fail_publishes("t.dlq", 1, || Error::Backend {
        backend: "memory",
        message: "access to t.dlq refused (injected)".into(),
        retryable: false,
        source: None,
    });
    let handle = conn
        .runner()
        .topic("t")
        .group("g")
        .retry(quick())
        .run(|_d: Delivery| async { Err(HandlerError::permanent("bad")) })
        .await
        .unwrap();
    conn.producer.send("t", Message::new("two")).await.unwrap();
    let report = tokio::time::timeout(Duration::from_secs(5), handle.wait())
        .await
        .expect("the runner ends instead of retrying for ever");
    assert!(
        matches!(report.error(), Some(Error::Backend { .. })),
        "{report:?}"
    );
    assert_eq!(
        broker.published("t.dlq").len(),
        1,
        "nothing more was dead-lettered"
    );
    assert_eq!(
        broker.group_stats("t", "g").map(|s| s.pending),
        Some(1),
        "the message was released back to the group"
    );
}

/// A dead-letter publish that panics is replaced by a labelled stub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_dead_letter_publish_sends_a_stub() {
    let broker = MemoryBroker::new();
    let conn = broker.connection();
    conn.consumer
        .declare_group("t", "g", StartFrom::Latest)
        .await
        .unwrap();
    broker.fail_publishes("t.dlq", 1, || panic!("client library bug (injected)"));
    let handle = conn
        .runner()
        .topic("t")
        .group("g")
        .run(|_d: Delivery| async { Err(HandlerError::permanent("bad")) })
        .await
        .unwrap();
    conn.producer
        .send("t", Message::new("x").with_header("h", "v"))
        .await
        .unwrap();
    broker.wait_until_settled(Duration::from_secs(10)).await.unwrap();
    let report = handle.shutdown(Duration::from_secs(5)).await;
    let dead = broker.published("t.dlq");
    assert_eq!(dead.len(), 1);
    assert!(dead[0].system_headers.contains_key("polybus-dlq-stub"));
    assert_eq!(report.dead_lettered, 1);
}

/// A topic whose dead-letter topic name would be invalid is refused when the
/// runner starts, for `run_subscription` too; a delivery from such a topic that
/// the runner was not told about ends it at once (the delivery is released).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_names_are_checked_when_the_runner_starts() {
    let broker = MemoryBroker::new();
    let conn = broker.connection();
    let long = "x".repeat(118);
    let sub = conn
        .consumer
        .subscribe(SubscribeOptions::new(&long).group("g").start(StartFrom::Earliest))
        .await
        .unwrap();
    let refused = conn
        .runner()
        .topic(&long)
        .run_subscription(sub, |_d: Delivery| async { HandlerResult::Ok(()) });
    assert!(matches!(refused, Err(Error::InvalidName { .. })));

    conn.producer.send(&long, Message::new("x")).await.unwrap();
    let sub = conn
        .consumer
        .subscribe(
            SubscribeOptions::new(&long)
                .group("g2")
                .start(StartFrom::Earliest),
        )
        .await
        .unwrap();
    let handle = conn
        .runner()
        .run_subscription(sub, |_d: Delivery| async { HandlerResult::Ok(()) })
        .unwrap();
    let report = tokio::time::timeout(Duration::from_secs(5), handle.wait())
        .await
        .expect("ends at the first delivery");
    assert!(
        matches!(report.error(), Some(Error::InvalidName { .. })),
        "{report:?}"
    );
    assert_eq!((report.handled, report.released), (0, 1));
}

/// A dead-letter publish that keeps failing retryably is not retried for ever:
/// after 20 tries the message is released and the runner ends with the error
/// (before: retried until shutdown, the runner reported nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_outage_ends_the_runner_after_bounded_retries() {
    let broker = MemoryBroker::new();
    let conn = broker.connection();
    conn.consumer
        .declare_group("t", "g", StartFrom::Latest)
        .await
        .unwrap();
    broker.fail_publishes("t.dlq", 1000, || Error::connection("memory", "outage (injected)"));
    let handle = conn
        .runner()
        .topic("t")
        .group("g")
        .retry(quick())
        .run(|_d: Delivery| async { Err(HandlerError::permanent("bad")) })
        .await
        .unwrap();
    conn.producer.send("t", Message::new("x")).await.unwrap();
    let report = tokio::time::timeout(Duration::from_secs(10), handle.wait())
        .await
        .expect("the runner ends instead of retrying the dead letter for ever");
    assert!(
        matches!(report.error(), Some(Error::Connection { .. })),
        "{report:?}"
    );
    assert_eq!(report.dead_letter_failures, 20, "{report:?}");
    assert_eq!(
        broker.group_stats("t", "g").map(|s| s.pending),
        Some(1),
        "released, not lost"
    );
}

/// An undecodable record whose dead-letter copy is refused (too large for the
/// dead-letter topic) is dead-lettered as a stub; the stub used to drop the
/// record's `polybus-dlq-raw-headers` label, the only trace of its headers.
/// A small label is now kept (a large one is named in the stub's note).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stub_of_an_undecodable_record_keeps_its_raw_headers_label() {
    let broker = MemoryBroker::new();
    let conn = broker.connection();
    conn.consumer
        .declare_group("t", "g", StartFrom::Latest)
        .await
        .unwrap();
    broker.fail_publishes("t.dlq", 1, || Error::PayloadTooLarge { size: 2, max: 1 });
    let handle = conn
        .runner()
        .topic("t")
        .group("g")
        .run(|_d: Delivery| async { HandlerResult::Ok(()) })
        .await
        .unwrap();
    let label = polybus_core::wire::raw_headers_label([(&b"\xffname"[..], Some(&b"v"[..]))]);
    let mut record = Message::new("payload");
    record
        .system_headers
        .insert(polybus_core::dlq_headers::RAW_HEADERS, label.as_str());
    broker.insert_undecodable("t", record, "header name is not UTF-8");
    broker.wait_until_settled(Duration::from_secs(10)).await.unwrap();
    let report = handle.shutdown(Duration::from_secs(5)).await;
    let dead = broker.published("t.dlq");
    assert_eq!(dead.len(), 1, "{report:?}");
    assert!(
        dead[0].system_headers.contains_key("polybus-dlq-stub"),
        "{dead:?}"
    );
    assert_eq!(
        dead[0].system_headers.get(polybus_core::dlq_headers::RAW_HEADERS),
        Some(label.as_str()),
        "the stub keeps the raw headers: {:?}",
        dead[0].system_headers
    );
}
