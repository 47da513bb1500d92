//! Fault injection over any backend: a [`FaultyProducer`] whose publishes to a
//! topic fail or panic on demand, and a [`FaultySubscription`] whose acks fail,
//! hang or panic and which can end with an error. Both wrap a real backend, so
//! the runner's fault paths are exercised against real brokers, not only the
//! in-memory one.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use polybus_core::{AckHandle, Acker, Error, Event, Message, Producer, Result, Subscription, async_trait};

type ErrorFn = Arc<dyn Fn() -> Error + Send + Sync>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

enum PublishFault {
    Fail(ErrorFn),
    Panic,
}

/// A producer that fails or panics on the next publishes to chosen topics, and
/// otherwise forwards to the real one.
pub struct FaultyProducer {
    inner: Arc<dyn Producer>,
    plans: Mutex<HashMap<String, VecDeque<PublishFault>>>,
    injected: AtomicUsize,
}

impl std::fmt::Debug for FaultyProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyProducer")
            .field("injected", &self.injected())
            .finish_non_exhaustive()
    }
}

impl FaultyProducer {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Producer>) -> Arc<Self> {
        Arc::new(FaultyProducer {
            inner,
            plans: Mutex::new(HashMap::new()),
            injected: AtomicUsize::new(0),
        })
    }

    /// The next `count` publishes to `topic` fail with `error()`.
    pub fn fail_next(&self, topic: &str, count: usize, error: impl Fn() -> Error + Send + Sync + 'static) {
        let error: ErrorFn = Arc::new(error);
        lock(&self.plans)
            .entry(topic.to_owned())
            .or_default()
            .extend((0..count).map(|_| PublishFault::Fail(Arc::clone(&error))));
    }

    /// The next `count` publishes to `topic` panic.
    pub fn panic_next(&self, topic: &str, count: usize) {
        lock(&self.plans)
            .entry(topic.to_owned())
            .or_default()
            .extend((0..count).map(|_| PublishFault::Panic));
    }

    /// How many faults were injected so far.
    pub fn injected(&self) -> usize {
        self.injected.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Producer for FaultyProducer {
    fn max_payload(&self) -> usize {
        self.inner.max_payload()
    }

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        let fault = lock(&self.plans).get_mut(topic).and_then(VecDeque::pop_front);
        match fault {
            Some(PublishFault::Fail(error)) => {
                self.injected.fetch_add(1, Ordering::SeqCst);
                Err(error())
            }
            Some(PublishFault::Panic) => {
                self.injected.fetch_add(1, Ordering::SeqCst);
                panic!("injected panic in publish to {topic} (FaultyProducer)")
            }
            None => self.inner.publish(topic, message).await,
        }
    }

    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

/// What a [`FaultySubscription`]'s acker does instead of acking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AckFault {
    /// Returns [`Error::NotSettled`] without acking.
    Fail,
    /// Never returns (nothing is acked).
    Hang,
    /// Acks, then panics.
    PanicAfterAck,
}

#[derive(Default)]
struct SubFaults {
    acks: Mutex<VecDeque<AckFault>>,
    fail_after: Mutex<Option<(usize, ErrorFn)>>,
    delivered: AtomicUsize,
    acks_injected: AtomicUsize,
}

/// Controls a [`FaultySubscription`] (the runner owns the subscription itself).
#[derive(Clone, Default)]
pub struct SubscriptionFaults {
    inner: Arc<SubFaults>,
}

impl std::fmt::Debug for SubscriptionFaults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionFaults")
            .field("delivered", &self.inner.delivered.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl SubscriptionFaults {
    /// The next `count` acks behave as `fault` says.
    pub fn acks(&self, fault: AckFault, count: usize) {
        lock(&self.inner.acks).extend(std::iter::repeat_n(fault, count));
    }

    /// After `deliveries` deliveries, `next` returns `error()` (once).
    pub fn fail_after(&self, deliveries: usize, error: impl Fn() -> Error + Send + Sync + 'static) {
        *lock(&self.inner.fail_after) = Some((deliveries, Arc::new(error)));
    }

    /// How many ack faults were applied.
    pub fn acks_injected(&self) -> usize {
        self.inner.acks_injected.load(Ordering::SeqCst)
    }
}

/// A subscription whose acks and `next` fail as its [`SubscriptionFaults`] say.
pub struct FaultySubscription {
    inner: Box<dyn Subscription>,
    faults: SubscriptionFaults,
}

impl FaultySubscription {
    /// Wraps `inner`; returns it with the handle that injects faults.
    pub fn wrap(inner: Box<dyn Subscription>) -> (Box<dyn Subscription>, SubscriptionFaults) {
        let faults = SubscriptionFaults::default();
        let sub = FaultySubscription {
            inner,
            faults: faults.clone(),
        };
        (Box::new(sub), faults)
    }

    fn due_failure(&self) -> Option<Error> {
        let mut fail_after = lock(&self.faults.inner.fail_after);
        let due = fail_after
            .as_ref()
            .is_some_and(|(n, _)| self.faults.inner.delivered.load(Ordering::SeqCst) >= *n);
        if due {
            fail_after.take().map(|(_, error)| error())
        } else {
            None
        }
    }

    fn wrap_event(&self, event: Option<Result<Event>>) -> Option<Result<Event>> {
        match event {
            Some(Ok(Event::Delivery(delivery, acker))) => {
                self.faults.inner.delivered.fetch_add(1, Ordering::SeqCst);
                let acker = Acker::new(FaultyAck {
                    inner: acker,
                    faults: Arc::clone(&self.faults.inner),
                });
                Some(Ok(Event::Delivery(delivery, acker)))
            }
            other => other,
        }
    }
}

#[async_trait]
impl Subscription for FaultySubscription {
    async fn next(&mut self) -> Option<Result<Event>> {
        if let Some(error) = self.due_failure() {
            return Some(Err(error));
        }
        let event = self.inner.next().await;
        self.wrap_event(event)
    }

    async fn control(&mut self) -> Option<Result<Event>> {
        self.inner.control().await
    }

    async fn stop(&mut self) -> Result<()> {
        self.inner.stop().await
    }

    async fn close(self: Box<Self>) -> Result<()> {
        self.inner.close().await
    }
}

struct FaultyAck {
    inner: Acker,
    faults: Arc<SubFaults>,
}

#[async_trait]
impl AckHandle for FaultyAck {
    async fn ack(&self) -> Result<()> {
        let fault = lock(&self.faults.acks).pop_front();
        if fault.is_some() {
            self.faults.acks_injected.fetch_add(1, Ordering::SeqCst);
        }
        match fault {
            Some(AckFault::Fail) => Err(Error::NotSettled {
                operation: "ack",
                reason: "injected by FaultySubscription".into(),
            }),
            Some(AckFault::Hang) => std::future::pending().await,
            Some(AckFault::PanicAfterAck) => {
                let _ = self.inner.ack().await;
                panic!("injected panic after the ack (FaultySubscription)")
            }
            None => self.inner.ack().await,
        }
    }

    async fn release(&self, delay: Option<Duration>) -> Result<()> {
        self.inner.release(delay).await
    }

    async fn keep_alive(&self) -> Result<()> {
        self.inner.keep_alive().await
    }
}
