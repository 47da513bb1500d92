//! tower layers as middleware and tower services as handlers, inside a runner
//! on the memory backend.
#![cfg(all(feature = "tower", feature = "memory"))]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use polybus::memory::MemoryBroker;
use polybus::{Connection, Delivery, Error, HandlerResult, Message, RetryPolicy, RunHandle, StartFrom};
use tokio::time::Instant;
use tower::ServiceBuilder;

async fn setup(topic: &str, messages: usize) -> Connection {
    let conn = MemoryBroker::new().connection();
    conn.consumer.declare_topic(topic).await.unwrap();
    conn.consumer
        .declare_group(topic, "g", StartFrom::Latest)
        .await
        .unwrap();
    for i in 0..messages {
        conn.producer
            .send(topic, Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    conn
}

async fn settle_all(handle: &RunHandle, messages: u64) -> polybus::ShutdownReport {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let stats = handle.stats();
        if stats.handled + stats.dead_lettered >= messages {
            break;
        }
        assert!(Instant::now() < until, "not settled in time: {stats:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    handle.shutdown(Duration::from_secs(5)).await
}

/// Counts handlers running at once and remembers the most.
#[derive(Default)]
struct Gauge {
    now: AtomicUsize,
    max: AtomicUsize,
    starts: Mutex<Vec<Instant>>,
}

impl Gauge {
    fn handler(
        self: &Arc<Self>,
        work: Duration,
    ) -> impl Fn(Delivery) -> futures::future::BoxFuture<'static, HandlerResult> + Send + Sync + 'static {
        let gauge = Arc::clone(self);
        move |_d: Delivery| {
            let gauge = Arc::clone(&gauge);
            Box::pin(async move {
                gauge.starts.lock().unwrap().push(Instant::now());
                let now = gauge.now.fetch_add(1, Ordering::SeqCst) + 1;
                gauge.max.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(work).await;
                gauge.now.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            })
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_layer_bounds_handlers_inside_a_runner() {
    let conn = setup("limited", 12).await;
    let gauge = Arc::new(Gauge::default());
    let handle = conn
        .runner()
        .topic("limited")
        .group("g")
        .concurrency(8)
        .layer(polybus::tower::layer(tower::limit::ConcurrencyLimitLayer::new(2)))
        .run(gauge.handler(Duration::from_millis(20)))
        .await
        .unwrap();
    let report = settle_all(&handle, 12).await;
    assert_eq!(
        (report.handled, report.dead_lettered, report.released),
        (12, 0, 0)
    );
    let max = gauge.max.load(Ordering::SeqCst);
    assert!(max <= 2, "{max} handlers ran at once under a limit of 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_layer_paces_handlers_inside_a_runner() {
    let conn = setup("paced", 9).await;
    let gauge = Arc::new(Gauge::default());
    let per = Duration::from_millis(300);
    // RateLimit is not Clone: a buffer in front of it.
    let limit = ServiceBuilder::new().buffer(16).rate_limit(3, per);
    let handle = conn
        .runner()
        .topic("paced")
        .group("g")
        .concurrency(8)
        .layer(polybus::tower::layer(limit))
        .run(gauge.handler(Duration::ZERO))
        .await
        .unwrap();
    let report = settle_all(&handle, 9).await;
    assert_eq!((report.handled, report.dead_lettered), (9, 0));
    let starts = gauge.starts.lock().unwrap().clone();
    assert_eq!(starts.len(), 9);
    // At most 3 calls per window: the 4th and 7th call each waited for a new
    // window, so 9 calls span at least two windows after the first.
    let first = starts[0];
    let early = starts.iter().filter(|t| **t < first + per / 2).count();
    assert!(early <= 3, "{early} handlers started within half a window");
    let span = starts[8] - first;
    assert!(
        span >= per * 2 - per / 2,
        "9 calls at 3 per {per:?} took only {span:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_shed_overload_releases_and_never_dead_letters() {
    let conn = setup("shed", 10).await;
    let gauge = Arc::new(Gauge::default());
    let shed = ServiceBuilder::new().load_shed().concurrency_limit(1);
    let handle = conn
        .runner()
        .topic("shed")
        .group("g")
        .concurrency(4)
        // One attempt only: an overload counted as a failed attempt would
        // dead-letter at once.
        .retry(RetryPolicy::attempts(1))
        .layer(polybus::tower::layer(shed))
        .run(gauge.handler(Duration::from_millis(10)))
        .await
        .unwrap();
    let report = settle_all(&handle, 10).await;
    assert_eq!(report.handled, 10, "{report:?}");
    assert_eq!(report.dead_lettered, 0, "{report:?}");
    assert!(report.released > 0, "nothing was shed: {report:?}");
    assert_eq!(gauge.max.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tower_service_is_a_handler_and_its_errors_keep_their_meaning() {
    let conn = setup("svc", 3).await;
    let seen = Arc::new(AtomicUsize::new(0));
    let service = tower::service_fn({
        let seen = Arc::clone(&seen);
        move |d: Delivery| {
            let seen = Arc::clone(&seen);
            async move {
                seen.fetch_add(1, Ordering::SeqCst);
                match &d.payload()[..] {
                    // Non-retryable polybus error: permanent, dead-lettered at once.
                    b"m1" => Err(Error::InvalidConfig("bad ride".into())),
                    _ => Ok(()),
                }
            }
        }
    });
    // A timeout layer around it: its `Elapsed` never fires here.
    let service = ServiceBuilder::new()
        .timeout(Duration::from_secs(5))
        .service(service);
    let handle = conn
        .runner()
        .topic("svc")
        .group("g")
        .retry(RetryPolicy::attempts(5))
        .run(polybus::tower::service(service))
        .await
        .unwrap();
    let report = settle_all(&handle, 3).await;
    assert_eq!((report.handled, report.dead_lettered, report.retried), (2, 1, 0));
    assert_eq!(seen.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tower_timeout_is_a_retryable_failure() {
    let conn = setup("slow", 1).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let handle = conn
        .runner()
        .topic("slow")
        .group("g")
        .retry(RetryPolicy::attempts(2).backoff(Duration::from_millis(5), Duration::from_millis(5)))
        .layer(polybus::tower::layer(tower::timeout::TimeoutLayer::new(
            Duration::from_millis(20),
        )))
        .run({
            let calls = Arc::clone(&calls);
            move |_d: Delivery| {
                let calls = Arc::clone(&calls);
                async move {
                    if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                        // Never finishes: only the timeout layer ends it.
                        std::future::pending::<()>().await;
                    }
                    Ok(())
                }
            }
        })
        .await
        .unwrap();
    let report = settle_all(&handle, 1).await;
    assert_eq!((report.handled, report.retried, report.dead_lettered), (1, 1, 0));
}

/// An overloaded service's message comes back after the retry policy's first
/// backoff, not at once: released with no delay, a lasting overload was a
/// redelivery loop as fast as the broker could hand the message out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_message_comes_back_after_a_backoff() {
    let conn = setup("overload", 1).await;
    let calls: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let handler = {
        let calls = Arc::clone(&calls);
        move |_d: Delivery| {
            let calls = Arc::clone(&calls);
            async move {
                let n = {
                    let mut calls = calls.lock().unwrap();
                    calls.push(Instant::now());
                    calls.len()
                };
                if n < 3 {
                    return Err(polybus::HandlerError::overloaded("busy"));
                }
                HandlerResult::Ok(())
            }
        }
    };
    let backoff = Duration::from_millis(200);
    let handle = conn
        .runner()
        .topic("overload")
        .group("g")
        .retry(RetryPolicy::attempts(10).backoff(backoff, backoff))
        .run(handler)
        .await
        .unwrap();
    let report = settle_all(&handle, 1).await;
    assert_eq!((report.handled, report.dead_lettered), (1, 0), "{report:?}");
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 3);
    for pair in calls.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= backoff - Duration::from_millis(20),
            "redelivered {gap:?} after an overload (backoff {backoff:?})"
        );
    }
}

/// A handler that is overloaded on its first `overloaded` calls and then
/// succeeds, remembering when it was called.
fn overloaded_then_ok(
    overloaded: usize,
    calls: &Arc<Mutex<Vec<Instant>>>,
) -> impl Fn(Delivery) -> futures::future::BoxFuture<'static, HandlerResult> + Send + Sync + 'static {
    let calls = Arc::clone(calls);
    move |_d: Delivery| {
        let calls = Arc::clone(&calls);
        Box::pin(async move {
            let n = {
                let mut calls = calls.lock().unwrap();
                calls.push(Instant::now());
                calls.len()
            };
            if n <= overloaded {
                return Err(polybus::HandlerError::overloaded("busy"));
            }
            Ok(())
        })
    }
}

/// A memory broker without delayed redelivery (like RabbitMQ and core NATS:
/// a release makes the message deliverable at once).
async fn setup_without_broker_delays(topic: &str, messages: usize) -> MemoryBroker {
    let broker = MemoryBroker::with_config(polybus::memory::MemoryConfig::default().delayed_release(false));
    let conn = broker.connection();
    conn.consumer.declare_topic(topic).await.unwrap();
    conn.consumer
        .declare_group(topic, "g", StartFrom::Latest)
        .await
        .unwrap();
    for i in 0..messages {
        conn.producer
            .send(topic, Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    broker
}

/// Where the broker cannot delay a redelivery (RabbitMQ, core NATS; Kafka
/// only by sleeping in the release), the runner waits out the backoff itself
/// before it gives an overloaded message back: released at once, a lasting
/// overload was a redelivery loop as fast as the broker could hand it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_message_comes_back_after_a_backoff_without_broker_delays() {
    let broker = setup_without_broker_delays("overload-nodelay", 1).await;
    let conn = broker.connection();
    let calls: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let backoff = Duration::from_millis(200);
    let handle = conn
        .runner()
        .topic("overload-nodelay")
        .group("g")
        .retry(RetryPolicy::attempts(10).backoff(backoff, backoff))
        .run(overloaded_then_ok(2, &calls))
        .await
        .unwrap();
    let report = settle_all(&handle, 1).await;
    assert_eq!(
        (report.handled, report.dead_lettered, report.released),
        (1, 0, 2),
        "{report:?}"
    );
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 3);
    for pair in calls.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= backoff - Duration::from_millis(20),
            "redelivered {gap:?} after an overload (backoff {backoff:?})"
        );
    }
}

/// A shutdown while an overloaded message waits out its backoff in the runner
/// gives it back at once (counted once as released): shutdown neither waits
/// for the backoff nor loses the message, and the next runner of the group
/// gets it without the backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_back_an_overloaded_message_at_once() {
    let broker = setup_without_broker_delays("overload-stop", 1).await;
    let conn = broker.connection();
    let calls: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let backoff = Duration::from_secs(10);
    let handle = conn
        .runner()
        .topic("overload-stop")
        .group("g")
        .retry(RetryPolicy::attempts(10).backoff(backoff, backoff))
        .run(overloaded_then_ok(1, &calls))
        .await
        .unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while calls.lock().unwrap().is_empty() {
        assert!(Instant::now() < until, "the handler was never called");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stopping = Instant::now();
    let report = handle.shutdown(Duration::from_secs(5)).await;
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
    assert_eq!(
        (report.handled, report.released, report.settle_failures),
        (0, 1, 0),
        "one overload, given back once at shutdown: {report:?}"
    );
    assert_eq!(calls.lock().unwrap().len(), 1, "handled again before the backoff");
    let next = conn
        .runner()
        .topic("overload-stop")
        .group("g")
        .run(overloaded_then_ok(0, &calls))
        .await
        .unwrap();
    let report = settle_all(&next, 1).await;
    assert_eq!(report.handled, 1, "{report:?}");
    let calls = calls.lock().unwrap().clone();
    let gap = calls[1] - calls[0];
    assert!(gap < backoff, "the next runner waited {gap:?} for it");
}
