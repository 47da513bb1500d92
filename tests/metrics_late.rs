//! The rule for a recorder installed late: a runner started while no
//! recorder was installed emits no metrics for its whole life (it takes no
//! clock readings for them either), and a thread's sends to a topic are
//! decided on its first send there (a runner's topics are decided when it
//! starts); runners started and topics first sent to after the recorder are
//! seen.
//!
//! Its own test binary: the recorder is process-global.
#![cfg(all(feature = "metrics", feature = "memory"))]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use polybus::memory::MemoryBroker;
use polybus::observe::{CONSUMED_MESSAGES, DESTINATION, GROUP, PROCESS_DURATION, SENT_MESSAGES};
use polybus::{Delivery, Message, StartFrom};

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(
            tokio::time::Instant::now() < until,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// One thread: every send and handler runs on the test's thread, so which
// sends that thread made before the recorder is known.
#[tokio::test(flavor = "current_thread")]
async fn a_recorder_installed_after_a_runner_started_is_not_seen_by_that_runner() {
    let broker = MemoryBroker::new();
    let conn = broker.connection();
    conn.consumer.declare_topic("orders").await.unwrap();
    conn.consumer.declare_topic("refunds").await.unwrap();
    for group in ["early", "late"] {
        conn.consumer
            .declare_group("orders", group, StartFrom::Latest)
            .await
            .unwrap();
    }
    conn.consumer
        .declare_group("refunds", "early", StartFrom::Latest)
        .await
        .unwrap();
    let handled = Arc::new(AtomicU32::new(0));
    let counting = || {
        let handled = Arc::clone(&handled);
        move |_d: Delivery| {
            handled.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        }
    };

    // Before the recorder: a runner (of `orders` and `refunds`), and a send to
    // `orders` from this thread.
    let early = conn
        .runner()
        .topic("orders")
        .topic("refunds")
        .group("early")
        .run(counting())
        .await
        .unwrap();
    conn.producer
        .send("orders", Message::new("before"))
        .await
        .unwrap();
    wait_for("the first message handled", || {
        handled.load(Ordering::SeqCst) == 1
    })
    .await;

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().expect("the only recorder in this test binary");

    // After it: another runner; two more sends to `orders`, one to `refunds`.
    let late = conn
        .runner()
        .topic("orders")
        .group("late")
        .run(counting())
        .await
        .unwrap();
    for _ in 0..2 {
        conn.producer.send("orders", Message::new("after")).await.unwrap();
    }
    conn.producer
        .send("refunds", Message::new("after"))
        .await
        .unwrap();
    // Both groups were declared before the first send: each has the three
    // sent to `orders`; `early` has the one sent to `refunds` too.
    wait_for("every message handled", || handled.load(Ordering::SeqCst) == 7).await;
    early.shutdown(Duration::from_secs(5)).await;
    late.shutdown(Duration::from_secs(5)).await;

    let samples = snapshotter.snapshot().into_vec();
    let with = |name: &str, key: &str, value: &str| {
        samples
            .iter()
            .filter(|(k, _, _, _)| {
                k.key().name() == name && k.key().labels().any(|l| l.key() == key && l.value() == value)
            })
            .map(|(_, _, _, v)| v)
            .collect::<Vec<_>>()
    };
    // The runner started after the recorder: seen, durations included.
    assert_eq!(with(CONSUMED_MESSAGES, GROUP, "late"), [&DebugValue::Counter(3)]);
    match &with(PROCESS_DURATION, GROUP, "late")[..] {
        [DebugValue::Histogram(values)] => assert_eq!(values.len(), 3),
        other => panic!("process durations of the late runner: {other:?}"),
    }
    // The runner started before it: nothing at all, though it handled the
    // messages sent after, on a topic it saw first after the recorder too.
    let early_series: Vec<_> = samples
        .iter()
        .filter(|(k, _, _, _)| k.key().labels().any(|l| l.key() == GROUP && l.value() == "early"))
        .map(|(k, _, _, _)| k.key().name().to_owned())
        .collect();
    assert!(
        early_series.is_empty(),
        "the early runner emitted {early_series:?}"
    );
    // This thread sent to `orders` before the recorder: its sends there stay
    // unseen; its first send to `refunds` came after, and is counted.
    assert!(with(SENT_MESSAGES, DESTINATION, "orders").is_empty());
    assert_eq!(
        with(SENT_MESSAGES, DESTINATION, "refunds"),
        [&DebugValue::Counter(1)]
    );
}
