//! The metrics of the runner's fault paths and of the lag task when the broker
//! misbehaves, read back from a recording recorder (memory backend).
//!
//! The debugging recorder is process-global and its snapshot drains the
//! histograms it read, so the tests of this file take turns (`TURN`) and each
//! one filters on its own group.
#![cfg(all(feature = "metrics", feature = "memory"))]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use polybus::memory::{AckFault, MemoryBroker, MemoryConfig};
use polybus::observe;
use polybus::{
    Capabilities, Connection, Consumer, Delivery, Error, HandlerError, Message, RetryPolicy, RunState,
    StartFrom, SubscribeOptions, Subscription,
};
use tokio::time::Instant;

type Labels = Vec<(String, String)>;

struct Sample {
    name: String,
    labels: Labels,
    value: DebugValue,
}

fn recorder() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().expect("the only recorder in this test binary");
        snapshotter
    })
}

/// One test at a time (snapshots drain histograms).
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn snapshot() -> Vec<Sample> {
    recorder()
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
        .collect()
}

fn label<'a>(labels: &'a Labels, key: &str) -> Option<&'a str> {
    labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

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

fn histogram_len(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> usize {
    find(samples, name, with)
        .iter()
        .map(|s| match &s.value {
            DebugValue::Histogram(v) => v.len(),
            other => panic!("{name} is not a histogram: {other:?}"),
        })
        .sum()
}

fn gauge(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> Option<f64> {
    let found = find(samples, name, with);
    assert!(found.len() <= 1, "one {name} gauge with {with:?}");
    found.first().map(|s| match &s.value {
        DebugValue::Gauge(v) => v.into_inner(),
        other => panic!("{name} is not a gauge: {other:?}"),
    })
}

/// `polybus.handler.outcomes` of `group`, in the order ok, retried,
/// dead_lettered, released, cancelled, settle_failed.
fn outcomes(samples: &[Sample], group: &str) -> [u64; 6] {
    [
        "ok",
        "retried",
        "dead_lettered",
        "released",
        "cancelled",
        "settle_failed",
    ]
    .map(|o| {
        counter(
            samples,
            observe::OUTCOMES,
            &[("messaging.consumer.group.name", group), ("polybus.outcome", o)],
        )
    })
}

async fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn declared(broker: &MemoryBroker, topic: &str, group: &str) -> Connection {
    let conn = broker.connection();
    conn.consumer.declare_topic(topic).await.unwrap();
    conn.consumer
        .declare_group(topic, group, StartFrom::Latest)
        .await
        .unwrap();
    conn
}

/// How the wrapped consumer answers `lag`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LagMode {
    Fail,
    Hang,
    PanicThenAnswer(usize),
}

/// A memory consumer whose `lag` fails, hangs or panics.
struct BadLag {
    inner: Arc<dyn Consumer>,
    mode: LagMode,
    calls: Arc<AtomicUsize>,
    /// Calls still in flight (a hanging call counts until it is dropped).
    in_flight: Arc<AtomicUsize>,
}

struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[polybus::async_trait]
impl Consumer for BadLag {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn declare_topic_unchecked(&self, topic: &str) -> polybus::Result<()> {
        self.inner.declare_topic_unchecked(topic).await
    }

    async fn declare_group_unchecked(
        &self,
        topic: &str,
        group: &str,
        start: StartFrom,
    ) -> polybus::Result<()> {
        self.inner.declare_group_unchecked(topic, group, start).await
    }

    async fn subscribe_unchecked(&self, options: SubscribeOptions) -> polybus::Result<Box<dyn Subscription>> {
        self.inner.subscribe_unchecked(options).await
    }

    async fn close(&self) -> polybus::Result<()> {
        self.inner.close().await
    }

    async fn lag_unchecked(&self, topic: &str, group: &str) -> polybus::Result<u64> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let _in_flight = InFlight(Arc::clone(&self.in_flight));
        match self.mode {
            LagMode::Fail => Err(Error::Connection {
                backend: "memory",
                message: format!("broker down (call {call} for {group} on {topic})"),
                source: None,
            }),
            LagMode::Hang => std::future::pending().await,
            LagMode::PanicThenAnswer(panics) if call < panics => panic!("lag bug in the backend"),
            LagMode::PanicThenAnswer(_) => Ok(3),
        }
    }
}

/// A connection to `broker` whose consumer's `lag` behaves as `mode`.
fn with_bad_lag(broker: &MemoryBroker, mode: LagMode) -> (Connection, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let conn = broker.connection();
    let calls = Arc::new(AtomicUsize::new(0));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let consumer = BadLag {
        inner: conn.consumer,
        mode,
        calls: Arc::clone(&calls),
        in_flight: Arc::clone(&in_flight),
    };
    (
        Connection {
            producer: conn.producer,
            consumer: Arc::new(consumer),
        },
        calls,
        in_flight,
    )
}

fn lag_failures(samples: &[Sample], group: &str, error: &str) -> u64 {
    counter(
        samples,
        observe::LAG_FAILURES,
        &[("messaging.consumer.group.name", group), ("error.type", error)],
    )
}

/// A broker that fails every lag call: each failure is counted (by
/// `error.type`, never the error's text), the runner keeps running and
/// handling, and the lag task stops asking once the runner has shut down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_lag_calls_are_counted_and_the_runner_keeps_running() {
    let _turn = TURN.lock().await;
    recorder();
    let broker = MemoryBroker::new();
    declared(&broker, "lag-down", "lag-down-g").await;
    let (conn, calls, _) = with_bad_lag(&broker, LagMode::Fail);
    let handle = conn
        .runner()
        .topic("lag-down")
        .group("lag-down-g")
        .lag_interval(Some(Duration::from_millis(10)))
        .run(|_d: Delivery| async { Ok(()) })
        .await
        .unwrap();
    wait_for("5 lag calls", Duration::from_secs(10), || {
        calls.load(Ordering::SeqCst) >= 5
    })
    .await;
    conn.producer
        .send("lag-down", Message::new("still handled"))
        .await
        .unwrap();
    wait_for("the message handled", Duration::from_secs(10), || {
        handle.stats().handled == 1
    })
    .await;
    assert_eq!(handle.state(), RunState::Running);
    let report = handle.shutdown(Duration::from_secs(5)).await;
    assert!(report.is_clean(), "{report:?}");
    let after = calls.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        calls.load(Ordering::SeqCst) <= after + 1,
        "the lag task kept asking after shutdown"
    );
    let samples = snapshot();
    let failures = lag_failures(&samples, "lag-down-g", "connection");
    assert!(
        failures >= 5,
        "{failures} lag failures counted for {after} failed calls"
    );
    assert!(failures <= after as u64);
    for s in find(&samples, observe::LAG_FAILURES, &[]) {
        for (k, v) in &s.labels {
            assert!(!v.contains("broker down"), "{k}={v}: an error's text in a label");
        }
    }
    assert_eq!(
        gauge(
            &samples,
            observe::LAG,
            &[("messaging.consumer.group.name", "lag-down-g")]
        ),
        None,
        "no lag value was ever read"
    );
}

/// A lag call that never answers counts as a `timeout` failure after the
/// interval (at least 1 s), does not hold the shutdown, and is dropped with the
/// runner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_lag_call_is_a_counted_timeout_and_does_not_hold_shutdown() {
    let _turn = TURN.lock().await;
    recorder();
    let broker = MemoryBroker::new();
    declared(&broker, "lag-hang", "lag-hang-g").await;
    let (conn, calls, in_flight) = with_bad_lag(&broker, LagMode::Hang);
    let handle = conn
        .runner()
        .topic("lag-hang")
        .group("lag-hang-g")
        .lag_interval(Some(Duration::from_millis(10)))
        .run(|_d: Delivery| async { Ok(()) })
        .await
        .unwrap();
    wait_for("a timed-out lag call", Duration::from_secs(10), || {
        calls.load(Ordering::SeqCst) >= 2
    })
    .await;
    let stopping = Instant::now();
    let report = handle.shutdown(Duration::from_secs(5)).await;
    assert!(
        stopping.elapsed() < Duration::from_millis(500),
        "shutdown took {:?}",
        stopping.elapsed()
    );
    assert!(report.is_clean(), "{report:?}");
    wait_for("the hanging lag call dropped", Duration::from_secs(2), || {
        in_flight.load(Ordering::SeqCst) == 0
    })
    .await;
    let samples = snapshot();
    assert!(lag_failures(&samples, "lag-hang-g", "timeout") >= 1);
}

/// A backend whose `lag` panics: counted as `panic`, and the gauge keeps
/// refreshing (it is not silently gone for the rest of the run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_lag_call_is_counted_and_the_gauge_keeps_refreshing() {
    let _turn = TURN.lock().await;
    recorder();
    let broker = MemoryBroker::new();
    declared(&broker, "lag-panic", "lag-panic-g").await;
    let (conn, calls, _) = with_bad_lag(&broker, LagMode::PanicThenAnswer(2));
    let handle = conn
        .runner()
        .topic("lag-panic")
        .group("lag-panic-g")
        .lag_interval(Some(Duration::from_millis(10)))
        .run(|_d: Delivery| async { Ok(()) })
        .await
        .unwrap();
    wait_for("lag asked after the panics", Duration::from_secs(10), || {
        calls.load(Ordering::SeqCst) >= 4
    })
    .await;
    assert_eq!(handle.state(), RunState::Running);
    let report = handle.shutdown(Duration::from_secs(5)).await;
    assert!(report.is_clean(), "{report:?}");
    let samples = snapshot();
    assert_eq!(lag_failures(&samples, "lag-panic-g", "panic"), 2);
    assert_eq!(
        gauge(
            &samples,
            observe::LAG,
            &[("messaging.consumer.group.name", "lag-panic-g")]
        ),
        Some(3.0)
    );
}

/// A panicking handler, an ack that times out and a dead-letter publish that
/// fails: each counted once with its outcome, and no label carries a key, an
/// id or an error's text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_paths_are_counted_once_with_their_outcome() {
    let _turn = TURN.lock().await;
    recorder();
    let broker = MemoryBroker::with_config(MemoryConfig::default().ack_deadline(Duration::from_millis(300)));
    let conn = declared(&broker, "faulty", "faulty-g").await;
    // The first ack hangs (past the settle timeout), then the broker
    // redelivers that message; the dead letter fails twice before it is taken.
    broker.inject_ack_faults(AckFault::Hang, 1);
    broker.fail_publishes("faulty.dlq", 2, || Error::Connection {
        backend: "memory",
        message: "dlq broker hiccup 5f3a".into(),
        source: None,
    });
    let panics = Arc::new(Mutex::new(0u32));
    let handler = {
        let panics = Arc::clone(&panics);
        move |d: Delivery| {
            let panics = Arc::clone(&panics);
            async move {
                if d.payload().as_ref() == b"panics" {
                    *panics.lock().unwrap() += 1;
                    panic!("handler bug for {}", d.id());
                }
                Ok(())
            }
        }
    };
    let handle = conn
        .runner()
        .topic("faulty")
        .group("faulty-g")
        .concurrency(1)
        .settle_timeout(Duration::from_millis(100))
        .retry(RetryPolicy::attempts(2).backoff(Duration::from_millis(5), Duration::from_millis(10)))
        .run(handler)
        .await
        .unwrap();
    conn.producer
        .send("faulty", Message::new("acked late").with_key("customer-17"))
        .await
        .unwrap();
    conn.producer
        .send("faulty", Message::new("panics").with_key("customer-18"))
        .await
        .unwrap();
    wait_for("both settled", Duration::from_secs(20), || {
        let s = handle.stats();
        s.handled == 1 && s.dead_lettered == 1
    })
    .await;
    let report = handle.shutdown(Duration::from_secs(5)).await;
    assert_eq!(
        (
            report.handled,
            report.retried,
            report.dead_lettered,
            report.settle_failures,
            report.dead_letter_failures
        ),
        (1, 1, 1, 1, 2),
        "{report:?}"
    );
    assert_eq!(*panics.lock().unwrap(), 2);
    let samples = snapshot();
    let g = ("messaging.consumer.group.name", "faulty-g");
    // ok once (the redelivery), retried once and dead-lettered once (the
    // panics), one ack that did not take effect.
    assert_eq!(outcomes(&samples, "faulty-g"), [1, 1, 1, 0, 0, 1]);
    assert_eq!(
        counter(&samples, observe::CONSUMED_MESSAGES, &[g]),
        3,
        "received: two messages and one redelivery"
    );
    assert_eq!(
        histogram_len(&samples, observe::PROCESS_DURATION, &[g, ("error.type", "panic")]),
        2
    );
    assert_eq!(
        histogram_len(
            &samples,
            observe::OPERATION_DURATION,
            &[g, ("messaging.operation.name", "ack"), ("error.type", "timeout")]
        ),
        1
    );
    assert_eq!(
        counter(
            &samples,
            observe::DEAD_LETTER_FAILURES,
            &[g, ("error.type", "connection")]
        ),
        2
    );
    assert_eq!(
        histogram_len(
            &samples,
            observe::OPERATION_DURATION,
            &[
                g,
                ("messaging.operation.name", "dead_letter"),
                ("error.type", "connection")
            ]
        ),
        2
    );
    for s in samples.iter().filter(|s| label(&s.labels, g.0) == Some(g.1)) {
        for (k, v) in &s.labels {
            assert!(
                !v.contains("customer") && !v.contains("5f3a") && !v.contains("bug"),
                "{}: {k}={v}",
                s.name
            );
        }
    }
}

/// An overloaded message that waits out its backoff in the runner (a broker
/// without delayed redelivery) and is given back by the shutdown is one
/// `released` outcome, not two, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overload_given_back_at_shutdown_is_one_released_outcome() {
    let _turn = TURN.lock().await;
    recorder();
    let broker = MemoryBroker::with_config(MemoryConfig::default().delayed_release(false));
    let conn = declared(&broker, "shed-stop", "shed-stop-g").await;
    let calls = Arc::new(AtomicUsize::new(0));
    let handle = conn
        .runner()
        .topic("shed-stop")
        .group("shed-stop-g")
        .retry(RetryPolicy::attempts(5).backoff(Duration::from_secs(10), Duration::from_secs(10)))
        .run({
            let calls = Arc::clone(&calls);
            move |_d: Delivery| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err(HandlerError::overloaded("busy")) }
            }
        })
        .await
        .unwrap();
    conn.producer.send("shed-stop", Message::new("m")).await.unwrap();
    wait_for("the overload", Duration::from_secs(10), || {
        calls.load(Ordering::SeqCst) >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let report = handle.shutdown(Duration::from_secs(5)).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "handled again before its backoff"
    );
    assert_eq!((report.released, report.settle_failures), (1, 0), "{report:?}");
    let samples = snapshot();
    assert_eq!(outcomes(&samples, "shed-stop-g"), [0, 0, 0, 1, 0, 0]);
    assert_eq!(
        histogram_len(
            &samples,
            observe::PROCESS_DURATION,
            &[
                ("messaging.consumer.group.name", "shed-stop-g"),
                ("error.type", "overloaded")
            ]
        ),
        1
    );
}
