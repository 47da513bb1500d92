//! Hostile review of the runner's shutdown against a subscription and acker
//! that misbehave (hang or panic in `stop`, `close` and `release`). Time is
//! virtual (tokio's paused clock); every test is bounded.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use polybus_core::{
    AckHandle, Acker, Capabilities, Consumer, Delivery, Ended, Error, Event, HandlerResult, Message, Origin,
    Producer, Result, Runner, StartFrom, SubscribeOptions, Subscription, async_trait,
};
use tokio::time::Instant;

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    Hang,
    Panic,
}

async fn fault(f: Fault, what: &str) {
    match f {
        Fault::None => {}
        Fault::Hang => std::future::pending::<()>().await,
        Fault::Panic => panic!("review: {what} panics"),
    }
}

#[derive(Default)]
struct Counts {
    releases: AtomicUsize,
    acks: AtomicUsize,
}

struct Ack {
    release: Fault,
    counts: Arc<Counts>,
}

#[async_trait]
impl AckHandle for Ack {
    async fn ack(&self) -> Result<()> {
        self.counts.acks.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn release(&self, _delay: Option<Duration>) -> Result<()> {
        fault(self.release, "release").await;
        self.counts.releases.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct Sub {
    queue: VecDeque<(Delivery, Acker)>,
    stop: Fault,
    close: Fault,
}

#[async_trait]
impl Subscription for Sub {
    async fn next(&mut self) -> Option<Result<Event>> {
        match self.queue.pop_front() {
            Some((d, a)) => Some(Ok(Event::Delivery(d, a))),
            None => std::future::pending().await,
        }
    }

    async fn stop(&mut self) -> Result<()> {
        fault(self.stop, "stop").await;
        Ok(())
    }

    async fn close(self: Box<Self>) -> Result<()> {
        fault(self.close, "close").await;
        Ok(())
    }
}

struct NullProducer;

#[async_trait]
impl Producer for NullProducer {
    fn max_payload(&self) -> usize {
        1 << 20
    }

    async fn publish(&self, _topic: &str, _message: Message) -> Result<()> {
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

struct NullConsumer;

#[async_trait]
impl Consumer for NullConsumer {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("review", 1 << 20)
    }

    async fn declare_topic_unchecked(&self, _topic: &str) -> Result<()> {
        Ok(())
    }

    async fn declare_group_unchecked(&self, _topic: &str, _group: &str, _start: StartFrom) -> Result<()> {
        Ok(())
    }

    async fn subscribe_unchecked(&self, _options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        Err(Error::Unsupported("review".into()))
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

fn sub(n: usize, release: Fault, stop: Fault, close: Fault, counts: &Arc<Counts>) -> Box<Sub> {
    let queue = (0..n)
        .map(|i| {
            let origin = Origin {
                topic: "t".into(),
                ..Origin::default()
            };
            let delivery = Delivery::new(Message::new(format!("m{i}")).with_key("k"), origin, 1);
            let acker = Acker::new(Ack {
                release,
                counts: Arc::clone(counts),
            });
            (delivery, acker)
        })
        .collect();
    Box::new(Sub { queue, stop, close })
}

fn runner() -> Runner {
    Runner::new(Arc::new(NullConsumer), Arc::new(NullProducer)).topic("t")
}

/// A handler that never finishes: the first message runs, the others wait in
/// its lane.
async fn never(_d: Delivery) -> HandlerResult {
    std::future::pending().await
}

/// Shutdown(1 s) must return within its deadline plus a small bound (the model
/// test allows 4 s) even when the subscription's `stop` and `close` hang. The
/// runner waits up to 5 s for `stop` (not bounded by the deadline) and then up
/// to `max(settle_timeout, 30 s)` for `close`: about 36 s.
#[tokio::test(start_paused = true)]
async fn shutdown_keeps_its_deadline_when_stop_and_close_hang() {
    let counts = Arc::new(Counts::default());
    let handle = runner()
        .settle_timeout(Duration::from_secs(1))
        .run_subscription(sub(3, Fault::None, Fault::Hang, Fault::Hang, &counts), never)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let asked = Instant::now();
    let report = handle.shutdown(Duration::from_secs(1)).await;
    let took = asked.elapsed();
    assert_eq!(report.ended, Some(Ended::Shutdown), "{report:?}");
    assert!(
        took <= Duration::from_secs(1) + Duration::from_secs(4),
        "shutdown(1 s) took {took:?}"
    );
}

/// A subscription whose `stop` and `close` panic: shutdown still releases
/// everything and ends cleanly (tried: passes).
#[tokio::test(start_paused = true)]
async fn shutdown_survives_stop_and_close_panicking() {
    let counts = Arc::new(Counts::default());
    let handle = runner()
        .run_subscription(sub(3, Fault::None, Fault::Panic, Fault::Panic, &counts), never)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let report = handle.shutdown(Duration::from_millis(200)).await;
    assert_eq!(report.ended, Some(Ended::Shutdown), "{report:?}");
    assert_eq!((report.abandoned, report.released), (1, 2), "{report:?}");
    assert_eq!(counts.releases.load(Ordering::SeqCst), 3);
}

/// Releases that hang at shutdown (default settle timeout, 30 s) are cut off
/// 5 s after the deadline by aborting the side tasks, and nothing counts them:
/// the report says 3 deliveries were given back (`abandoned` 1, `released` 2),
/// `settle_failures` 0 and `is_clean()` — although no release took effect.
#[tokio::test(start_paused = true)]
async fn releases_that_hang_at_shutdown_are_reported() {
    let counts = Arc::new(Counts::default());
    let handle = runner()
        .run_subscription(sub(3, Fault::Hang, Fault::None, Fault::None, &counts), never)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let asked = Instant::now();
    let report = handle.shutdown(Duration::from_millis(200)).await;
    let took = asked.elapsed();
    assert!(took <= Duration::from_secs(10), "shutdown took {took:?}");
    assert_eq!(counts.releases.load(Ordering::SeqCst), 0);
    assert_eq!(report.settle_failures, 3, "{report:?}");
    assert!(!report.is_clean(), "{report:?}");
}

/// A release that panics in one delivery of a batch must not keep the other
/// deliveries of the batch from being released (tried).
#[tokio::test(start_paused = true)]
async fn a_panicking_release_is_a_settle_failure() {
    let counts = Arc::new(Counts::default());
    let handle = runner()
        .run_subscription(sub(3, Fault::Panic, Fault::None, Fault::None, &counts), never)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let report = handle.shutdown(Duration::from_millis(200)).await;
    assert_eq!(report.ended, Some(Ended::Shutdown), "{report:?}");
    assert_eq!(report.settle_failures, 3, "{report:?}");
    assert!(!report.is_clean());
}
