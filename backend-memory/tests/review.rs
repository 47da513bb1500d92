//! Hostile review of the runner's fault paths (issue 11), on the in-memory
//! broker. Each test names the defect it proves; time is virtual where the test
//! measures durations, and every test is bounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use polybus_core::{
    Delivery, Ended, Error, HandlerError, HandlerResult, Message, RetryPolicy, RunState, StartFrom,
};
use polybus_memory::{AckFault, MemoryBroker};
use tokio::time::Instant;

fn quick() -> RetryPolicy {
    RetryPolicy::attempts(3).backoff(Duration::from_millis(10), Duration::from_millis(50))
}

fn refused() -> Error {
    Error::Backend {
        backend: "memory",
        message: "access to t.dlq refused (injected)".into(),
        retryable: false,
        source: None,
    }
}

async fn broker_with_group() -> MemoryBroker {
    let broker = MemoryBroker::new();
    broker
        .connection()
        .consumer
        .declare_group("t", "g", StartFrom::Latest)
        .await
        .unwrap();
    broker
}

/// Waits (bounded) until `f` holds.
async fn until(mut f: impl FnMut() -> bool) {
    let limit = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < limit, "condition never held");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A handler for key `slow` that never finishes, and for key `bad` that fails
/// permanently.
fn slow_and_bad() -> impl Fn(Delivery) -> BoxedHandler + Clone {
    |d: Delivery| -> BoxedHandler {
        Box::pin(async move {
            if d.key() == Some("slow") {
                std::future::pending::<()>().await;
            }
            Err(HandlerError::permanent("bad"))
        })
    }
}

type BoxedHandler = std::pin::Pin<Box<dyn std::future::Future<Output = HandlerResult> + Send>>;

/// The runner fails by itself (its dead letter is refused by the environment)
/// while another handler is still running; the application, seeing `Failed`,
/// calls `shutdown(500 ms)`. The failure drain gives running handlers the whole
/// settle timeout (30 s by default) and ignores the later shutdown's deadline,
/// so `shutdown(500 ms)` returns after ~30 s.
#[tokio::test(start_paused = true)]
async fn shutdown_during_a_failure_drain_keeps_its_deadline() {
    let broker = broker_with_group().await;
    let conn = broker.connection();
    broker.fail_publishes("t.dlq", 1, refused);
    let handle = conn
        .runner()
        .topic("t")
        .group("g")
        .concurrency(2)
        .retry(quick())
        .run(slow_and_bad())
        .await
        .unwrap();
    conn.producer
        .send("t", Message::new("s").with_key("slow"))
        .await
        .unwrap();
    conn.producer
        .send("t", Message::new("b").with_key("bad"))
        .await
        .unwrap();
    until(|| handle.error().is_some()).await;
    let asked = Instant::now();
    let report = handle.shutdown(Duration::from_millis(500)).await;
    let took = asked.elapsed();
    assert!(report.error().is_some(), "{report:?}");
    assert!(
        took <= Duration::from_millis(500) + Duration::from_secs(3),
        "shutdown(500 ms) took {took:?}"
    );
}

/// Same through `run_until`: the signal fires after the runner failed by
/// itself; `run_until` must still return within its timeout.
#[tokio::test(start_paused = true)]
async fn run_until_with_a_signal_after_a_failure_keeps_its_deadline() {
    let broker = broker_with_group().await;
    let conn = broker.connection();
    broker.fail_publishes("t.dlq", 1, refused);
    let handle = conn
        .runner()
        .topic("t")
        .group("g")
        .concurrency(2)
        .retry(quick())
        .run(slow_and_bad())
        .await
        .unwrap();
    conn.producer
        .send("t", Message::new("s").with_key("slow"))
        .await
        .unwrap();
    conn.producer
        .send("t", Message::new("b").with_key("bad"))
        .await
        .unwrap();
    let start = Instant::now();
    let watcher = handle.clone();
    let signal = async move {
        until(|| watcher.error().is_some()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let report = handle.run_until(signal, Duration::from_millis(500)).await;
    let took = start.elapsed();
    assert!(report.error().is_some(), "{report:?}");
    assert!(took <= Duration::from_secs(4), "run_until took {took:?}");
}

/// A handler future whose `Drop` panics (a guard in user code) is cancelled at
/// the shutdown deadline on its last attempt. The cancellation surfaces as a
/// panicking `JoinError`, which the dispatcher maps through `worker_panicked`
/// to `Fatal`: a graceful shutdown reports `Failed` and counts the cancelled
/// handler as `released` instead of `abandoned`.
#[tokio::test(start_paused = true)]
async fn a_handler_panicking_in_drop_at_the_deadline_is_abandoned_not_fatal() {
    struct PanicOnDrop;
    impl Drop for PanicOnDrop {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                panic!("review: guard panics in drop");
            }
        }
    }
    let broker = broker_with_group().await;
    let conn = broker.connection();
    let handle = conn
        .runner()
        .topic("t")
        .group("g")
        .retry(RetryPolicy::attempts(1))
        .run(|_d: Delivery| async move {
            let _guard = PanicOnDrop;
            std::future::pending::<()>().await;
            HandlerResult::Ok(())
        })
        .await
        .unwrap();
    conn.producer.send("t", Message::new("x")).await.unwrap();
    until(|| broker.group_stats("t", "g").is_some_and(|s| s.unacked == 1)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let report = handle.shutdown(Duration::from_millis(100)).await;
    assert_eq!(report.ended, Some(Ended::Shutdown), "{report:?}");
    assert_eq!((report.abandoned, report.released), (1, 0), "{report:?}");
    assert_eq!(handle.state(), RunState::Stopped);
}

/// `abort` on a runner that has already failed turns its state from `Failed`
/// into `Stopped`: a liveness probe then sees a stopped runner, not a failed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_a_failure_keeps_the_failed_state() {
    let broker = broker_with_group().await;
    let conn = broker.connection();
    let handle = conn
        .runner()
        .topic("t")
        .group("g")
        .run(|_d: Delivery| async { HandlerResult::Ok(()) })
        .await
        .unwrap();
    broker.fail_subscriptions(|| Error::Unsupported("access revoked (injected)".into()));
    let report = tokio::time::timeout(Duration::from_secs(5), handle.wait())
        .await
        .expect("the runner ends");
    assert!(report.error().is_some());
    assert_eq!(handle.state(), RunState::Failed);
    handle.abort().await;
    assert_eq!(
        handle.state(),
        RunState::Failed,
        "abort rewrote how the runner ended"
    );
    assert!(handle.error().is_some());
}

/// The dead-letter publish panics (client-library bug), so a labelled stub is
/// sent; that stub's publish meets a *retryable* error (a timeout). The stub is
/// tried once and any error becomes `Fatal`: the runner ends with a retryable
/// error instead of retrying the stub with backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stub_after_a_panicking_publish_is_retried_on_a_retryable_error() {
    let broker = broker_with_group().await;
    let conn = broker.connection();
    let calls = Arc::new(AtomicUsize::new(0));
    {
        let calls = Arc::clone(&calls);
        broker.fail_publishes("t.dlq", 2, move || {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("review: client library bug (injected)");
            }
            Error::timeout("publish", Duration::from_secs(1))
        });
    }
    let handle = conn
        .runner()
        .topic("t")
        .group("g")
        .retry(quick())
        .run(|_d: Delivery| async { Err(HandlerError::permanent("bad")) })
        .await
        .unwrap();
    conn.producer.send("t", Message::new("x")).await.unwrap();
    let settled = broker.wait_until_settled(Duration::from_secs(5)).await;
    let report = handle.shutdown(Duration::from_secs(5)).await;
    assert!(report.error().is_none(), "a timeout ended the runner: {report:?}");
    settled.unwrap();
    let dead = broker.published("t.dlq");
    assert_eq!(dead.len(), 1);
    assert!(dead[0].system_headers.contains_key("polybus-dlq-stub"));
    assert_eq!(report.dead_lettered, 1);
}

/// Each delivery is counted once: a dead-lettered message whose ack failed is
/// counted in `dead_lettered` *and* `settle_failures` (the docs say
/// `dead_lettered` counts copies "published ... and acked", and a handled
/// message whose ack failed counts only in `settle_failures`). The broker then
/// redelivers it and it is dead-lettered again: 2 deliveries, 3 counted.
#[tokio::test(start_paused = true)]
async fn a_dead_letter_whose_ack_failed_is_counted_once() {
    let broker = broker_with_group().await;
    let conn = broker.connection();
    broker.inject_ack_faults(AckFault::Fail, 1);
    let calls = Arc::new(AtomicUsize::new(0));
    let handle = conn
        .runner()
        .topic("t")
        .group("g")
        .retry(quick())
        .run({
            let calls = Arc::clone(&calls);
            move |_d: Delivery| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err(HandlerError::permanent("bad")) }
            }
        })
        .await
        .unwrap();
    conn.producer.send("t", Message::new("x")).await.unwrap();
    broker.wait_until_settled(Duration::from_secs(120)).await.unwrap();
    let report = handle.shutdown(Duration::from_secs(5)).await;
    let deliveries = calls.load(Ordering::SeqCst) as u64;
    assert_eq!(deliveries, 2, "redelivered once after the failed ack");
    let counted =
        report.handled + report.dead_lettered + report.released + report.abandoned + report.settle_failures;
    assert_eq!(counted, deliveries, "{report:?}");
}

/// `backoff_capacity(usize::MAX)` (or `buffer(usize::MAX)`) reads as "no
/// limit", and the builder accepts it (the prefetch saturates), but the
/// dispatcher adds `max_held + backoff_capacity` unchecked: it overflows (a
/// panic in debug builds), and the runner fails before handling anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unbounded_backoff_capacity_does_not_overflow() {
    let broker = broker_with_group().await;
    let conn = broker.connection();
    let handle = conn
        .runner()
        .topic("t")
        .group("g")
        .backoff_capacity(usize::MAX)
        .run(|_d: Delivery| async { HandlerResult::Ok(()) })
        .await
        .unwrap();
    conn.producer.send("t", Message::new("x")).await.unwrap();
    let settled = broker.wait_until_settled(Duration::from_secs(5)).await;
    let report = handle.shutdown(Duration::from_secs(5)).await;
    assert!(report.error().is_none(), "{report:?}");
    settled.unwrap();
    assert_eq!(report.handled, 1);
}

/// Attempts count up by one across a panic-retry and a retryable error, and the
/// dead letter's attempt header agrees (tried: passes).
#[tokio::test(start_paused = true)]
async fn attempts_after_a_panic_retry_count_up_by_one() {
    let broker = broker_with_group().await;
    let conn = broker.connection();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let handle = conn
        .runner()
        .topic("t")
        .group("g")
        .retry(quick())
        .run({
            let seen = Arc::clone(&seen);
            move |d: Delivery| {
                seen.lock().unwrap().push(d.attempt());
                async move {
                    if d.attempt() == 1 {
                        panic!("review: panic on the first attempt");
                    }
                    Err(HandlerError::retryable("again"))
                }
            }
        })
        .await
        .unwrap();
    conn.producer.send("t", Message::new("x")).await.unwrap();
    broker.wait_until_settled(Duration::from_secs(10)).await.unwrap();
    let report = handle.shutdown(Duration::from_secs(5)).await;
    assert_eq!(*seen.lock().unwrap(), vec![1, 2, 3]);
    let dead = broker.published("t.dlq");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].system_headers.get("polybus-dlq-attempts"), Some("3"));
    assert_eq!((report.retried, report.dead_lettered), (2, 1));
}
