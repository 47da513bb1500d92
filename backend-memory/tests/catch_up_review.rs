//! Hostile review of catch-up mode (issue 14) on the in-memory broker: each
//! test is a way a production run could see "caught up" too early, never, or
//! twice. Bounded; time is real (the watcher asks at least once a second).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use polybus_core::{
    CatchUp, Delivery, Ended, HandlerError, HandlerResult, Message, NotCaughtUp, Order, RetryPolicy,
    StartFrom,
};
use polybus_memory::MemoryBroker;

type Seen = Arc<Mutex<Vec<String>>>;

fn payload(d: &Delivery) -> String {
    String::from_utf8_lossy(d.payload()).into_owned()
}

async fn send(broker: &MemoryBroker, topic: &str, payloads: &[&str], key: &str) {
    let conn = broker.connection();
    for p in payloads {
        conn.producer
            .send(topic, Message::new(p.to_string()).with_key(key))
            .await
            .unwrap();
    }
}

async fn report(handle: &polybus_core::RunHandle) -> Result<(), NotCaughtUp> {
    tokio::time::timeout(Duration::from_secs(15), handle.caught_up())
        .await
        .expect("a catch-up report within 15 s")
}

/// The last message of the backlog fails (retryably) twice and waits out its
/// backoff in between: the report must wait for its third attempt.
#[tokio::test]
async fn the_report_waits_for_a_retry_in_backoff() {
    let broker = MemoryBroker::new();
    send(&broker, "t", &["a", "b", "flaky"], "k").await;
    let seen: Seen = Arc::default();
    let attempts = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let handler = {
        let (seen, attempts) = (seen.clone(), attempts.clone());
        move |d: Delivery| {
            let (seen, attempts) = (seen.clone(), attempts.clone());
            async move {
                if payload(&d) == "flaky" && attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
                    return Err(HandlerError::retryable("not yet"));
                }
                seen.lock().unwrap().push(payload(&d));
                HandlerResult::Ok(())
            }
        }
    };
    let handle = broker
        .connection()
        .runner()
        .topic("t")
        .group("g")
        .start(StartFrom::Earliest)
        .retry(RetryPolicy::attempts(5).backoff(Duration::from_millis(300), Duration::from_millis(300)))
        .catch_up(CatchUp::Follow)
        .run(handler)
        .await
        .unwrap();
    report(&handle).await.unwrap();
    assert!(
        seen.lock().unwrap().contains(&"flaky".to_owned()),
        "caught up while the last message waited for a retry: {:?}",
        seen.lock().unwrap()
    );
    handle.shutdown(Duration::from_secs(5)).await;
}

/// A backlog every message of which is dead-lettered is caught up (a dead
/// letter settles), and the report says so once.
#[tokio::test]
async fn a_backlog_of_dead_letters_is_caught_up() {
    let broker = MemoryBroker::new();
    send(&broker, "t", &["x", "y", "z"], "k").await;
    let handle = broker
        .connection()
        .runner()
        .topic("t")
        .group("g")
        .start(StartFrom::Earliest)
        .catch_up(CatchUp::Stop)
        .run(|_: Delivery| async { Err::<(), _>(HandlerError::permanent("bad")) })
        .await
        .unwrap();
    report(&handle).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(15), handle.wait())
        .await
        .expect("Stop mode ends");
    assert_eq!(ended.ended, Some(Ended::CaughtUp), "{ended:?}");
    assert_eq!(ended.dead_lettered, 3, "{ended:?}");
    // Asked again after the end: the same answer.
    report(&handle).await.unwrap();
}

/// Two topics, one of them empty, and a held head on an ordered lane: caught
/// up only once the slow head and the messages queued behind it are handled.
#[tokio::test]
async fn two_topics_one_empty_and_a_held_lane() {
    let broker = MemoryBroker::new();
    broker.connection().consumer.declare_topic("empty").await.unwrap();
    send(&broker, "t", &["slow", "k1", "k2"], "k").await;
    let seen: Seen = Arc::default();
    let handler = {
        let seen = seen.clone();
        move |d: Delivery| {
            let seen = seen.clone();
            async move {
                if payload(&d) == "slow" {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                }
                seen.lock().unwrap().push(payload(&d));
                HandlerResult::Ok(())
            }
        }
    };
    let handle = broker
        .connection()
        .runner()
        .topic("t")
        .topic("empty")
        .group("g")
        .start(StartFrom::Earliest)
        .order(Order::ByKey)
        .catch_up(CatchUp::Follow)
        .run(handler)
        .await
        .unwrap();
    report(&handle).await.unwrap();
    let got: HashSet<String> = seen.lock().unwrap().iter().cloned().collect();
    assert_eq!(got.len(), 3, "caught up with {got:?} handled");
    handle.shutdown(Duration::from_secs(5)).await;
}

/// Stop mode loses nothing: messages published during the run and not
/// handled by it are there for the next run of the group.
#[tokio::test]
async fn stop_mode_leaves_later_messages_to_the_next_run() {
    let broker = MemoryBroker::new();
    let before: Vec<String> = (0..10).map(|i| format!("b{i}")).collect();
    let refs: Vec<&str> = before.iter().map(String::as_str).collect();
    send(&broker, "t", &refs, "k").await;
    let seen: Seen = Arc::default();
    let handler = |seen: Seen| {
        move |d: Delivery| {
            let seen = seen.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                seen.lock().unwrap().push(payload(&d));
                HandlerResult::Ok(())
            }
        }
    };
    let conn = broker.connection();
    let handle = conn
        .runner()
        .topic("t")
        .group("g")
        .start(StartFrom::Earliest)
        .concurrency(4)
        .order(Order::Unordered)
        .catch_up(CatchUp::Stop)
        .run(handler(seen.clone()))
        .await
        .unwrap();
    let after: Vec<String> = (0..10).map(|i| format!("a{i}")).collect();
    let refs: Vec<&str> = after.iter().map(String::as_str).collect();
    send(&broker, "t", &refs, "k").await;
    let ended = tokio::time::timeout(Duration::from_secs(15), handle.wait())
        .await
        .expect("Stop mode ends");
    assert_eq!(ended.ended, Some(Ended::CaughtUp), "{ended:?}");
    let handle = conn
        .runner()
        .topic("t")
        .group("g")
        .catch_up(CatchUp::Stop)
        .run(handler(seen.clone()))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(15), handle.wait())
        .await
        .expect("the second Stop run ends");
    let got: HashSet<String> = seen.lock().unwrap().iter().cloned().collect();
    let lost: Vec<&String> = before
        .iter()
        .chain(&after)
        .filter(|p| !got.contains(*p))
        .collect();
    assert!(lost.is_empty(), "lost {lost:?}");
}

/// A private (no group) replay in Stop mode from the beginning.
#[tokio::test]
async fn a_private_replay_stops_at_the_end() {
    let broker = MemoryBroker::new();
    send(&broker, "t", &["1", "2", "3"], "k").await;
    let handle = broker
        .connection()
        .runner()
        .topic("t")
        .start(StartFrom::Earliest)
        .catch_up(CatchUp::Stop)
        .run(|_: Delivery| async { HandlerResult::Ok(()) })
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(15), handle.wait())
        .await
        .expect("Stop mode ends");
    assert_eq!(ended.ended, Some(Ended::CaughtUp), "{ended:?}");
    assert_eq!(ended.handled, 3);
}

mod panicking {
    //! A backend (memory underneath) whose catch-up probe panics: a bug in a
    //! third-party backend's probe.
    use std::sync::Arc;

    use polybus_core::{
        Capabilities, CatchUpProbe, Consumer, Event, Result, StartFrom, SubscribeOptions, Subscription,
        async_trait,
    };

    pub(crate) struct PanickyConsumer(pub(crate) Arc<dyn Consumer>);

    #[async_trait]
    impl Consumer for PanickyConsumer {
        fn capabilities(&self) -> Capabilities {
            self.0.capabilities()
        }
        async fn declare_topic_unchecked(&self, topic: &str) -> Result<()> {
            self.0.declare_topic_unchecked(topic).await
        }
        async fn declare_group_unchecked(&self, topic: &str, group: &str, start: StartFrom) -> Result<()> {
            self.0.declare_group_unchecked(topic, group, start).await
        }
        async fn subscribe_unchecked(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
            Ok(Box::new(PanickySubscription(
                self.0.subscribe_unchecked(options).await?,
            )))
        }
        async fn close(&self) -> Result<()> {
            self.0.close().await
        }
    }

    struct PanickySubscription(Box<dyn Subscription>);

    #[async_trait]
    impl Subscription for PanickySubscription {
        async fn next(&mut self) -> Option<Result<Event>> {
            self.0.next().await
        }
        fn try_next(&mut self) -> Option<Option<Result<Event>>> {
            self.0.try_next()
        }
        async fn control(&mut self) -> Option<Result<Event>> {
            self.0.control().await
        }
        async fn stop(&mut self) -> Result<()> {
            self.0.stop().await
        }
        async fn close(self: Box<Self>) -> Result<()> {
            self.0.close().await
        }
        async fn catch_up_probe(&mut self) -> Result<Box<dyn CatchUpProbe>> {
            Ok(Box::new(Panics))
        }
    }

    struct Panics;

    #[async_trait]
    impl CatchUpProbe for Panics {
        async fn caught_up(&self) -> Result<bool> {
            panic!("a bug in the backend's probe");
        }
    }
}

/// A probe that panics: `caught_up()` must say it cannot tell
/// (`NotCaughtUp::Probe`), as for a probe error, instead of waiting forever
/// with the watcher task gone.
#[tokio::test]
async fn a_panicking_probe_is_reported() {
    let broker = MemoryBroker::new();
    send(&broker, "t", &["a"], "k").await;
    let conn = broker.connection();
    let consumer = Arc::new(panicking::PanickyConsumer(conn.consumer.clone()));
    let handle = polybus_core::Runner::new(consumer, conn.producer.clone())
        .topic("t")
        .group("g")
        .start(StartFrom::Earliest)
        .catch_up(CatchUp::Follow)
        .run(|_: Delivery| async { HandlerResult::Ok(()) })
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), handle.caught_up()).await;
    handle.shutdown(Duration::from_secs(5)).await;
    let got = got.expect("caught_up() never answered: the probe's panic killed the watcher silently");
    assert!(matches!(got, Err(NotCaughtUp::Probe(_))), "{got:?}");
}

/// A Stop run caught up and began its drain (with the settle timeout, 30 s
/// by default, as deadline) while a handler for a later message still runs;
/// then the application shuts down with 500 ms (SIGTERM). The shorter
/// deadline must hold: the drain must not keep the process for 30 s.
#[tokio::test(start_paused = true)]
async fn shutdown_during_a_stop_drain_keeps_its_deadline() {
    let broker = MemoryBroker::new();
    send(&broker, "t", &["a"], "k").await;
    let started = Arc::new(tokio::sync::Notify::new());
    let handler = {
        let started = started.clone();
        move |d: Delivery| {
            let started = started.clone();
            async move {
                if payload(&d) == "slow" {
                    started.notify_one();
                    std::future::pending::<()>().await;
                }
                // The backlog's message waits until the later one runs.
                started.notified().await;
                started.notify_one();
                HandlerResult::Ok(())
            }
        }
    };
    let handle = broker
        .connection()
        .runner()
        .topic("t")
        .group("g")
        .start(StartFrom::Earliest)
        .concurrency(4)
        .order(Order::Unordered)
        .catch_up(CatchUp::Stop)
        .run(handler)
        .await
        .unwrap();
    send(&broker, "t", &["slow"], "s").await;
    report(&handle).await.unwrap();
    let asked = tokio::time::Instant::now();
    let ended = handle.shutdown(Duration::from_millis(500)).await;
    let took = asked.elapsed();
    assert!(
        took <= Duration::from_secs(3),
        "shutdown(500 ms) during the Stop drain took {took:?} ({ended:?})"
    );
}
