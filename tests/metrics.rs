//! The metrics a runner and `send` emit, read back from a recording recorder
//! after a known number of messages through the memory backend.
//!
//! One test function: the debugging recorder is process-global and its
//! snapshot drains what it read.
#![cfg(all(feature = "metrics", feature = "memory"))]

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use polybus::memory::MemoryBroker;
use polybus::observe::{self, METRICS};
use polybus::{Delivery, HandlerError, Message, RetryPolicy, StartFrom};
use tokio::sync::Notify;

type Labels = Vec<(String, String)>;

struct Sample {
    name: String,
    labels: Labels,
    value: DebugValue,
}

fn label<'a>(labels: &'a Labels, key: &str) -> Option<&'a str> {
    labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// The samples named `name` whose labels include every pair in `with`.
fn find<'a>(samples: &'a [Sample], name: &str, with: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.name == name && with.iter().all(|(k, v)| label(&s.labels, k) == Some(*v)))
        .collect()
}

fn counter(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> u64 {
    find(samples, name, with)
        .iter()
        .map(|s| match &s.value {
            DebugValue::Counter(n) => *n,
            other => panic!("{name} is not a counter: {other:?}"),
        })
        .sum()
}

fn histogram(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> Vec<f64> {
    let mut values: Vec<f64> = find(samples, name, with)
        .iter()
        .flat_map(|s| match &s.value {
            DebugValue::Histogram(v) => v.iter().map(|x| x.into_inner()).collect::<Vec<_>>(),
            other => panic!("{name} is not a histogram: {other:?}"),
        })
        .collect();
    values.sort_by(f64::total_cmp);
    values
}

fn gauge(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    let found = find(samples, name, with);
    assert_eq!(found.len(), 1, "one {name} gauge with {with:?}");
    match &found[0].value {
        DebugValue::Gauge(v) => v.into_inner(),
        other => panic!("{name} is not a gauge: {other:?}"),
    }
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_and_send_metrics_have_the_expected_values() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().expect("the only recorder in this test binary");
    observe::describe_metrics();

    let broker = MemoryBroker::new();
    let conn = broker.connection();
    conn.consumer.declare_topic("orders").await.unwrap();
    conn.consumer
        .declare_group("orders", "billing", StartFrom::Latest)
        .await
        .unwrap();

    // Phase 1: 10 messages, 7 succeed at once, 2 fail once (retryable) then
    // succeed, 1 fails permanently and is dead-lettered.
    for i in 0..10 {
        let payload = match i {
            3 | 6 => "flaky",
            9 => "poison",
            _ => "fine",
        };
        let message = Message::new(payload).with_key(format!("customer-{i}"));
        conn.producer.send("orders", message).await.unwrap();
    }
    let failed_once = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let handler = {
        let failed_once = Arc::clone(&failed_once);
        move |d: Delivery| {
            let failed_once = Arc::clone(&failed_once);
            async move {
                match &d.payload()[..] {
                    b"poison" => Err(HandlerError::permanent("cannot bill this")),
                    b"flaky" if failed_once.lock().unwrap().insert(d.id().to_owned()) => {
                        Err(HandlerError::retryable("billing service down"))
                    }
                    _ => Ok(()),
                }
            }
        }
    };
    let handle = conn
        .runner()
        .topic("orders")
        .group("billing")
        .retry(RetryPolicy::attempts(3).backoff(Duration::from_millis(5), Duration::from_millis(10)))
        .lag_interval(Some(Duration::from_millis(10)))
        .run(handler)
        .await
        .unwrap();
    wait_for("10 messages settled", || {
        let s = handle.stats();
        s.handled + s.dead_lettered == 10
    })
    .await;
    let report = handle.shutdown(Duration::from_secs(5)).await;
    assert_eq!((report.handled, report.dead_lettered, report.retried), (9, 1, 2));

    // Phase 2: a backlog of 5 on another group, held by handlers that wait.
    conn.consumer.declare_topic("backlog").await.unwrap();
    conn.consumer
        .declare_group("backlog", "slow", StartFrom::Latest)
        .await
        .unwrap();
    for _ in 0..5 {
        conn.producer
            .send("backlog", Message::new("later"))
            .await
            .unwrap();
    }
    let gate = Arc::new(Notify::new());
    let started = Arc::new(AtomicU32::new(0));
    let slow = conn
        .runner()
        .topic("backlog")
        .group("slow")
        .lag_interval(Some(Duration::from_millis(10)))
        .run({
            let (gate, started) = (Arc::clone(&gate), Arc::clone(&started));
            move |_d: Delivery| {
                let (gate, started) = (Arc::clone(&gate), Arc::clone(&started));
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    gate.notified().await;
                    Ok(())
                }
            }
        })
        .await
        .unwrap();
    wait_for("5 handlers running", || started.load(Ordering::SeqCst) == 5).await;
    // Several lag refreshes while nothing can be acked.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(conn.consumer.lag("backlog", "slow").await.unwrap(), 5);

    let samples: Vec<Sample> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _unit, _desc, value)| Sample {
            name: key.key().name().to_owned(),
            labels: key
                .key()
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect(),
            value,
        })
        .collect();
    gate.notify_waiters();
    let ended = slow.shutdown(Duration::from_secs(5)).await;
    assert_eq!(ended.handled, 5);

    let orders = [
        ("messaging.system", "memory"),
        ("messaging.destination.name", "orders"),
    ];
    let billing = [
        ("messaging.system", "memory"),
        ("messaging.consumer.group.name", "billing"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut all = orders.to_vec();
        all.push(("messaging.consumer.group.name", "billing"));
        all.extend_from_slice(extra);
        all
    };

    // Sends: 10 to orders, through `send`; the dead letter goes through
    // `publish` and is not a send.
    assert_eq!(
        counter(
            &samples,
            observe::SENT_MESSAGES,
            &[("messaging.destination.name", "orders")]
        ),
        10
    );
    assert!(find(&samples, observe::SENT_MESSAGES, &[("error.type", "closed")]).is_empty());
    assert!(
        find(
            &samples,
            observe::SENT_MESSAGES,
            &[("messaging.destination.name", "orders.dlq")]
        )
        .is_empty()
    );
    let send_durations = histogram(
        &samples,
        observe::OPERATION_DURATION,
        &[
            ("messaging.destination.name", "orders"),
            ("messaging.operation.name", "send"),
        ],
    );
    assert_eq!(send_durations.len(), 10);
    assert!(
        send_durations.iter().all(|s| (0.0..5.0).contains(s)),
        "{send_durations:?}"
    );

    // Received once each (retries stay in process).
    assert_eq!(counter(&samples, observe::CONSUMED_MESSAGES, &with(&[])), 10);
    // Handler attempts: 9 succeeded, 2 failed retryably, 1 permanently.
    let ok = histogram(&samples, observe::PROCESS_DURATION, &with(&[]))
        .len()
        .saturating_sub(3);
    assert_eq!(ok, 9);
    assert_eq!(
        histogram(
            &samples,
            observe::PROCESS_DURATION,
            &with(&[("error.type", "retryable")])
        )
        .len(),
        2
    );
    assert_eq!(
        histogram(
            &samples,
            observe::PROCESS_DURATION,
            &with(&[("error.type", "permanent")])
        )
        .len(),
        1
    );
    // Outcomes.
    let outcome = |o: &'static str| counter(&samples, observe::OUTCOMES, &with(&[("polybus.outcome", o)]));
    assert_eq!(
        [
            outcome("ok"),
            outcome("retried"),
            outcome("dead_lettered"),
            outcome("released"),
            outcome("cancelled"),
            outcome("settle_failed"),
        ],
        [9, 2, 1, 0, 0, 0]
    );
    // Attempts: 7 on the first, 2 on the second; the dead letter on the first.
    assert_eq!(
        histogram(&samples, observe::ATTEMPTS, &with(&[("polybus.outcome", "ok")])),
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0]
    );
    assert_eq!(
        histogram(
            &samples,
            observe::ATTEMPTS,
            &with(&[("polybus.outcome", "dead_lettered")])
        ),
        [1.0]
    );
    // Settlement: 10 acks, 1 dead-letter publish; no failures.
    let mut acks = billing.to_vec();
    acks.push(("messaging.operation.name", "ack"));
    assert_eq!(histogram(&samples, observe::OPERATION_DURATION, &acks).len(), 10);
    let mut dead_letter = billing.to_vec();
    dead_letter.push(("messaging.operation.name", "dead_letter"));
    assert_eq!(
        histogram(&samples, observe::OPERATION_DURATION, &dead_letter).len(),
        1
    );
    assert!(find(&samples, observe::DEAD_LETTER_FAILURES, &[]).is_empty());
    // One shutdown; the runner was empty when it ended.
    assert_eq!(histogram(&samples, observe::SHUTDOWN_DURATION, &billing).len(), 1);
    assert_eq!(gauge(&samples, observe::HELD, &billing), 0.0);

    // The blocked runner: 5 held and running, none in backoff, lag 5.
    let slow_group = [
        ("messaging.system", "memory"),
        ("messaging.consumer.group.name", "slow"),
    ];
    assert_eq!(gauge(&samples, observe::HELD, &slow_group), 5.0);
    assert_eq!(gauge(&samples, observe::RUNNING, &slow_group), 5.0);
    assert_eq!(gauge(&samples, observe::BACKOFF, &slow_group), 0.0);
    let mut slow_topic = slow_group.to_vec();
    slow_topic.push(("messaging.destination.name", "backlog"));
    assert_eq!(gauge(&samples, observe::LAG, &slow_topic), 5.0);

    // Every emitted metric is in the descriptor list with only its attributes,
    // and no label carries a key, an id or payload data.
    let allowed_values: HashSet<&str> = [
        "memory",
        "orders",
        "backlog",
        "billing",
        "slow",
        "send",
        "receive",
        "process",
        "ack",
        "release",
        "keep_alive",
        "dead_letter",
        "settle",
        "ok",
        "retried",
        "dead_lettered",
        "released",
        "cancelled",
        "settle_failed",
        "retryable",
        "permanent",
    ]
    .into_iter()
    .collect();
    for sample in &samples {
        let descriptor = METRICS
            .iter()
            .find(|m| m.name == sample.name)
            .unwrap_or_else(|| panic!("{} is not in observe::METRICS", sample.name));
        for (k, v) in &sample.labels {
            assert!(
                descriptor.attributes.contains(&k.as_str()),
                "{} has an undeclared attribute {k}",
                sample.name
            );
            assert!(allowed_values.contains(v.as_str()), "{}: {k}={v}", sample.name);
        }
    }
}
