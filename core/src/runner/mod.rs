//! The runner: concurrency, ordering lanes, retries, dead letters, backpressure,
//! keep-alives and shutdown, written once for every backend.
//!
//! How a delivery moves through the runner:
//!
//! 1. The runner pulls from the subscription only while it has room (see the
//!    bound below), so a slow handler never lets memory grow with the backlog
//!    (the backend's prefetch is set to the same bound).
//! 2. Each delivery joins a **lane**: one per key with [`Order::ByKey`], one for
//!    everything with [`Order::Sequential`], its own lane otherwise. A lane is a
//!    FIFO queue; only its head runs, so same-key messages are handled one at a
//!    time in delivery order while other lanes run concurrently.
//! 3. The head runs through the middleware and the handler. `Ok` acks it. A
//!    retryable error — or a panic anywhere before the ack — puts it into backoff
//!    *at the head of its lane*, still held (and kept alive), then runs it again
//!    with its attempt raised; only its own lane waits, and other keys keep being
//!    pulled and handled. A permanent error, or the last allowed attempt failing,
//!    publishes a byte-exact copy to `<topic>.dlq` with `polybus-dlq-*` headers,
//!    waits for the broker's confirmation, then acks.
//! 4. A dead-letter publish that fails is retried (with backoff) only while the
//!    error is retryable. If the message itself makes it impossible (too large,
//!    a header the broker refuses), a labelled stub is dead-lettered instead
//!    (`polybus-dlq-stub` says what was left out) and the original acked, so one
//!    record never stops a group. If the environment refuses it (producer closed,
//!    access denied, an invalid dead-letter topic), the message is released and
//!    the runner ends with that error ([`ShutdownReport::error`],
//!    [`RunHandle::state`]). A subscription error that no retry can fix ends the
//!    runner the same way.
//! 5. Every ack, release and keep-alive is bounded by the settle timeout
//!    ([`Runner::settle_timeout`]); one that fails or times out is counted in
//!    [`ShutdownReport::settle_failures`] and leaves redelivery to the broker.
//! 6. [`RunHandle::shutdown`] stops pulling, asks the subscription to stop
//!    consuming, releases held deliveries that have not started (or, for
//!    positional-ack backends, drains them within the deadline), waits for
//!    running handlers until the deadline, cancels and releases the rest, then
//!    closes the subscription.
//!
//! **Memory bound.** With `max_held = concurrency + buffer`, the runner holds at
//! most `concurrency + buffer + backoff_capacity` deliveries: it pulls while fewer
//! than `max_held` are *not* parked behind a lane in backoff, and while fewer than
//! `backoff_capacity` more are.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::watch;

use crate::backend::{CatchUpProbe, Consumer, Producer, StartFrom, SubscribeOptions, Subscription};
use crate::error::{Error, Result};
use crate::handler::Handler;
use crate::middleware::{Middleware, Pipeline};
use crate::names;
use crate::observe::Observer;

mod catch_up;
mod dispatcher;
mod handle;
mod lanes;
mod pool;
mod worker;

pub use handle::{CatchUp, Ended, NotCaughtUp, RunHandle, RunState, ShutdownReport};

use dispatcher::{Dispatcher, Limits};
use handle::{Counters, Shared};
use worker::Settings;

/// How deliveries are ordered relative to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Order {
    /// No ordering: up to `concurrency` deliveries run at once.
    Unordered,
    /// Same-key deliveries run one at a time in delivery order; different keys
    /// (and keyless messages) run concurrently. The default.
    #[default]
    ByKey,
    /// One delivery at a time, in delivery order.
    Sequential,
}

/// No backoff is longer than a day, whatever the policy says.
const MAX_BACKOFF: Duration = Duration::from_secs(24 * 3600);

/// How failed deliveries are retried in process.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, counting the first and broker redeliveries; after the last
    /// one fails, the message is dead-lettered. At least 1.
    pub max_attempts: u32,
    /// Backoff before the second attempt.
    pub initial_backoff: Duration,
    /// The longest backoff.
    pub max_backoff: Duration,
    /// Growth of the backoff per attempt.
    pub multiplier: f64,
    /// Random spread of each backoff, as a fraction (0.2 = ±20 %).
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// The default policy with `max_attempts` attempts.
    pub fn attempts(max_attempts: u32) -> Self {
        RetryPolicy {
            max_attempts: max_attempts.max(1),
            ..RetryPolicy::default()
        }
    }

    /// Sets the first and the longest backoff.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    /// The backoff after failed attempt number `attempt` (1-based), with jitter.
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let multiplier = if self.multiplier.is_finite() {
            self.multiplier.max(1.0)
        } else {
            1.0
        };
        let base = self.initial_backoff.as_secs_f64() * multiplier.powi(exponent);
        let capped = base
            .min(self.max_backoff.as_secs_f64())
            .min(MAX_BACKOFF.as_secs_f64());
        let jitter = if self.jitter.is_finite() {
            self.jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let spread = jitter * (fastrand::f64() * 2.0 - 1.0);
        let secs = capped * (1.0 + spread);
        if secs.is_finite() && secs > 0.0 {
            Duration::from_secs_f64(secs.min(MAX_BACKOFF.as_secs_f64()))
        } else {
            Duration::ZERO
        }
    }
}

/// Builds and starts a consumer loop: topics, group, handler, middleware, limits.
///
/// ```no_run
/// # async fn demo(conn: polybus_core::Connection) -> polybus_core::Result<()> {
/// use polybus_core::{middleware, Delivery, HandlerResult, Order, RetryPolicy};
/// use std::time::Duration;
///
/// async fn on_ride(delivery: Delivery) -> HandlerResult { Ok(()) }
///
/// let handle = conn
///     .runner()
///     .topic("rides")
///     .group("ride-matcher")
///     .concurrency(8)
///     .order(Order::ByKey)
///     .retry(RetryPolicy::attempts(5))
///     .layer(middleware::tracing())
///     .run(on_ride)
///     .await?;
/// let report = handle.shutdown(Duration::from_secs(10)).await;
/// # Ok(()) }
/// ```
pub struct Runner {
    consumer: Arc<dyn Consumer>,
    producer: Arc<dyn Producer>,
    topics: Vec<String>,
    group: Option<String>,
    start: StartFrom,
    concurrency: usize,
    buffer: Option<usize>,
    order: Order,
    retry: RetryPolicy,
    layers: Vec<Arc<dyn Middleware>>,
    keep_alive: Option<Duration>,
    settle_timeout: Duration,
    backoff_capacity: Option<usize>,
    lag_interval: Option<Duration>,
    catch_up: Option<CatchUp>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("topics", &self.topics)
            .field("group", &self.group)
            .field("concurrency", &self.concurrency)
            .field("order", &self.order)
            .field("retry", &self.retry)
            .field("layers", &self.layers.len())
            .field("catch_up", &self.catch_up)
            .finish_non_exhaustive()
    }
}

impl Runner {
    /// A runner consuming through `consumer`; dead letters are sent with `producer`.
    pub fn new(consumer: Arc<dyn Consumer>, producer: Arc<dyn Producer>) -> Self {
        Runner {
            consumer,
            producer,
            topics: Vec::new(),
            group: None,
            start: StartFrom::Latest,
            concurrency: 16,
            buffer: None,
            order: Order::ByKey,
            retry: RetryPolicy::default(),
            layers: Vec::new(),
            keep_alive: None,
            settle_timeout: Duration::from_secs(30),
            backoff_capacity: None,
            lag_interval: Some(Duration::from_secs(15)),
            catch_up: None,
        }
    }

    /// Consumes `topic` (call again for more topics).
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topics.push(topic.into());
        self
    }

    /// Consumes as a member of `group`. Without a group the subscription is
    /// private and keeps nothing once closed.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Where the group starts if it does not exist yet.
    pub fn start(mut self, start: StartFrom) -> Self {
        self.start = start;
        self
    }

    /// How many handlers may run at once (default 16; 1 with [`Order::Sequential`]).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// How many deliveries may wait beyond those running (default: `concurrency`,
    /// at least 8). Waiting, running and retrying deliveries together never exceed
    /// `concurrency + buffer`.
    pub fn buffer(mut self, buffer: usize) -> Self {
        self.buffer = Some(buffer);
        self
    }

    /// The ordering mode (default [`Order::ByKey`]).
    pub fn order(mut self, order: Order) -> Self {
        self.order = order;
        self
    }

    /// The retry policy.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Adds a middleware layer inside those already added: the first layer added
    /// sees each delivery first.
    pub fn layer(mut self, middleware: impl Middleware) -> Self {
        self.layers.push(Arc::new(middleware));
        self
    }

    /// How often held deliveries are kept alive (default: a third of the backend's
    /// ack deadline; never if it has none).
    pub fn keep_alive_interval(mut self, every: Duration) -> Self {
        self.keep_alive = Some(every);
        self
    }

    /// How long an ack, release, keep-alive or dead-letter publish may take
    /// before the runner gives up on it (default 30 s). A timed-out ack is
    /// reported in [`ShutdownReport::settle_failures`] and the broker redelivers
    /// the message; a timed-out dead-letter publish is retried.
    pub fn settle_timeout(mut self, timeout: Duration) -> Self {
        self.settle_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// How many deliveries may be held behind lanes whose head is in backoff,
    /// beyond `concurrency + buffer` (default: `concurrency + buffer`). While a
    /// key waits out a backoff, its later messages park here and other keys keep
    /// flowing; the runner holds at most `concurrency + buffer + backoff_capacity`
    /// deliveries.
    pub fn backoff_capacity(mut self, capacity: usize) -> Self {
        self.backoff_capacity = Some(capacity);
        self
    }

    /// How often the `polybus.consumer.lag` gauge asks the broker for the
    /// group's backlog (default 15 s; `None` never asks). Only with the `metrics`
    /// feature and a group; a backend that cannot report lag is asked once.
    pub fn lag_interval(mut self, every: Option<Duration>) -> Self {
        self.lag_interval = every.map(|d| d.max(Duration::from_millis(10)));
        self
    }

    /// Runs in catch-up mode (for rebuilding a projection before serving):
    /// [`run`](Runner::run) reads where the log ends as it subscribes, and
    /// [`RunHandle::caught_up`] resolves once every message that existed then
    /// has been handled and settled (a log with nothing left for the group:
    /// at once). Then the run stops gracefully ([`CatchUp::Stop`], ending with
    /// [`Ended::CaughtUp`]) or goes on following the log ([`CatchUp::Follow`]).
    /// Messages published after `run` began are never waited for.
    ///
    /// Start with [`start`](Runner::start) (`Earliest` for a new group, or no
    /// group, to rebuild from the beginning). Only where
    /// [`Capabilities::catch_up`](crate::Capabilities::catch_up) says so:
    /// elsewhere `run` fails with [`Error::Unsupported`].
    pub fn catch_up(mut self, mode: CatchUp) -> Self {
        self.catch_up = Some(mode);
        self
    }

    fn limits(&self) -> Result<Limits> {
        if self.concurrency == 0 {
            return Err(Error::InvalidConfig("concurrency must be at least 1".into()));
        }
        let concurrency = if self.order == Order::Sequential {
            1
        } else {
            self.concurrency
        };
        let buffer = self.buffer.unwrap_or(concurrency.max(8));
        let max_held = concurrency.saturating_add(buffer);
        Ok(Limits {
            concurrency,
            max_held,
            backoff_capacity: self.backoff_capacity.unwrap_or(max_held),
        })
    }

    /// Checks that every consumed topic's dead-letter topic is a valid name.
    fn checked_topics(&self) -> Result<HashSet<String>> {
        for topic in &self.topics {
            // Failures must be able to reach `<topic>.dlq`.
            names::validate_declared_topic(topic)?;
        }
        Ok(self.topics.iter().cloned().collect())
    }

    /// Subscribes (returning once the subscription is ready) and starts handling
    /// in the background. Returns the handle at once after that; errors such as bad
    /// names or an unreachable broker come back here.
    pub async fn run(self, handler: impl Handler) -> Result<RunHandle> {
        if self.topics.is_empty() {
            return Err(Error::InvalidConfig("the runner needs at least one topic".into()));
        }
        let limits = self.limits()?;
        self.checked_topics()?;
        // Before subscribing: a refused handler must not declare the group
        // (fixing its start) or join it (a rebalance for its live members).
        handler.validate()?;
        if self.catch_up.is_some() && !self.consumer.capabilities().catch_up {
            return Err(Error::Unsupported(format!(
                "{} cannot run in catch-up mode: it cannot tell where its log ends (capabilities.catch_up = false)",
                self.consumer.capabilities().backend
            )));
        }
        let prefetch = limits.max_held.saturating_add(limits.backoff_capacity);
        let mut options = SubscribeOptions::new(self.topics[0].clone())
            .start(self.start)
            .prefetch(prefetch);
        for topic in &self.topics[1..] {
            options = options.topic(topic.clone());
        }
        if let Some(group) = &self.group {
            options = options.group(group.clone());
        }
        let mut subscription = self.consumer.subscribe(options).await?;
        let probe = match self.catch_up {
            None => None,
            Some(_) => match read_the_end(&mut *subscription).await {
                Ok(probe) => Some(probe),
                Err(e) => {
                    let _ = subscription.close().await;
                    return Err(e);
                }
            },
        };
        self.launch(subscription, handler, probe)
    }

    /// Starts handling deliveries from a subscription that is already open.
    ///
    /// The topics given with [`topic`](Runner::topic) are checked at once (their
    /// dead-letter topic names must be valid); a delivery from any other topic is
    /// checked when it first arrives, and an invalid one ends the runner with
    /// [`Error::InvalidName`] (the delivery is released).
    ///
    /// Catch-up mode needs [`run`](Runner::run) (the log's end is read as it
    /// subscribes): with it, this is [`Error::InvalidConfig`].
    pub fn run_subscription(
        self,
        subscription: Box<dyn Subscription>,
        handler: impl Handler,
    ) -> Result<RunHandle> {
        if self.catch_up.is_some() {
            return Err(Error::InvalidConfig(
                "catch-up mode reads where the log ends as it subscribes: use Runner::run".into(),
            ));
        }
        self.launch(subscription, handler, None)
    }

    fn launch(
        self,
        subscription: Box<dyn Subscription>,
        handler: impl Handler,
        probe: Option<Box<dyn CatchUpProbe>>,
    ) -> Result<RunHandle> {
        handler.validate()?;
        let limits = self.limits()?;
        let checked_topics = self.checked_topics()?;
        let caps = self.consumer.capabilities();
        let keep_alive = self
            .keep_alive
            .or_else(|| caps.ack_deadline.map(|d| d / 3))
            .map(|d| d.max(Duration::from_millis(10)));
        let counters = Arc::new(Counters::default());
        let (tx, rx) = watch::channel(None);
        let observe = Observer::new(caps.backend, self.group.as_deref());
        #[cfg(feature = "metrics")]
        let lag = match (&self.group, self.lag_interval) {
            (Some(group), Some(every)) => Some(crate::observe::lag::refresh(
                Arc::clone(&self.consumer),
                self.topics.clone(),
                group.clone(),
                every,
                observe.clone(),
                {
                    let mut report = rx.clone();
                    async move {
                        let _ = report.wait_for(Option::is_some).await;
                    }
                },
            )),
            _ => None,
        };
        let settings = Arc::new(Settings {
            retry: self.retry,
            group: self.group,
            producer: self.producer,
            settle_timeout: self.settle_timeout,
            counters: Arc::clone(&counters),
            observe,
        });
        let shared = Arc::new(Shared::new(rx, Arc::clone(&counters)));
        let catch_up = self.catch_up;
        if catch_up.is_none() {
            shared.set_catch_up(Err(NotCaughtUp::NotRequested));
        }
        let dispatcher = Dispatcher::new(
            subscription,
            Pipeline::from_parts(Arc::new(handler), self.layers),
            settings,
            self.order,
            limits,
            caps.positional_acks,
            caps.delayed_release,
            keep_alive,
            checked_topics,
            Arc::clone(&shared),
        );
        let task = tokio::spawn({
            let shared = Arc::clone(&shared);
            async move {
                // The dispatcher catches panics everywhere it calls out; this guard
                // makes a bug in the dispatcher itself a reported failure too.
                let report = match std::panic::AssertUnwindSafe(dispatcher.run())
                    .catch_unwind()
                    .await
                {
                    Ok(report) => report,
                    Err(_) => {
                        let error = shared.fail(Error::Backend {
                            backend: "polybus",
                            message: "the runner's dispatcher panicked".into(),
                            retryable: false,
                            source: None,
                        });
                        tracing::error!(%error, "runner failed");
                        counters.report(Some(Ended::Failed(error)))
                    }
                };
                if let Some(ended) = &report.ended {
                    shared.ended(ended);
                    shared.set_catch_up(Err(NotCaughtUp::Ended(ended.clone())));
                }
                let _ = tx.send(Some(report));
            }
        });
        *shared.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        if let (Some(mode), Some(probe)) = (catch_up, probe) {
            tokio::spawn(catch_up::watch(
                probe,
                mode,
                Arc::clone(&shared),
                self.settle_timeout,
            ));
        }
        #[cfg(feature = "metrics")]
        if let Some(lag) = lag {
            tokio::spawn(lag);
        }
        Ok(RunHandle { shared })
    }
}

/// How many times `run` asks a subscription where its log ends before giving
/// up on a retryable error.
const END_READ_ATTEMPTS: u32 = 3;

/// Asks `subscription` for its catch-up probe, again after a retryable error
/// (a connection lost meanwhile: on JetStream a message the client cannot
/// parse costs the connection as the subscription starts fetching, and the
/// subscription recovers on its own while `run` waits).
async fn read_the_end(subscription: &mut dyn Subscription) -> Result<Box<dyn CatchUpProbe>> {
    let mut attempt = 1;
    loop {
        match subscription.catch_up_probe().await {
            Err(e) if e.is_retryable() && attempt < END_READ_ATTEMPTS => {
                tracing::warn!(error = %e, attempt, "catch-up: reading where the log ends failed; trying again");
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let policy = RetryPolicy {
            jitter: 0.0,
            ..RetryPolicy::default().backoff(Duration::from_millis(100), Duration::from_secs(1))
        };
        assert_eq!(policy.delay_after(1), Duration::from_millis(100));
        assert_eq!(policy.delay_after(2), Duration::from_millis(200));
        assert_eq!(policy.delay_after(10), Duration::from_secs(1));
        let jittered = RetryPolicy::default().backoff(Duration::from_millis(100), Duration::from_secs(1));
        for _ in 0..100 {
            let d = jittered.delay_after(1);
            assert!(
                d >= Duration::from_millis(80) && d <= Duration::from_millis(120),
                "{d:?}"
            );
        }
    }
}
