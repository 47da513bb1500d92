//! The runner: concurrency, ordering lanes, retries, dead letters, backpressure,
//! keep-alives and shutdown, written once for every backend.
//!
//! How a delivery moves through the runner:
//!
//! 1. The runner pulls from the subscription only while it holds fewer than
//!    `concurrency + buffer` deliveries, so a slow handler never lets memory grow
//!    with the backlog (the backend's prefetch is set to the same bound).
//! 2. Each delivery joins a **lane**: one per key with [`Order::ByKey`], one for
//!    everything with [`Order::Sequential`], its own lane otherwise. A lane is a
//!    FIFO queue; only its head runs, so same-key messages are handled one at a
//!    time in delivery order while other lanes run concurrently.
//! 3. The head runs through the middleware and the handler (a panic is caught and
//!    counts as a retryable error). `Ok` acks it. A retryable error puts it into
//!    backoff *at the head of its lane*, still held (and kept alive), then runs it
//!    again with its attempt raised; only its own lane waits. A permanent error,
//!    or the last allowed attempt failing, publishes it to `<topic>.dlq` with
//!    `polybus-dlq-*` headers, waits for the broker's confirmation, then acks.
//! 4. [`RunHandle::shutdown`] stops pulling, releases held deliveries that have
//!    not started (or, for positional-ack backends, drains them within the
//!    deadline), waits for running handlers until the deadline, cancels and
//!    releases the rest, then closes the subscription.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinError, JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::time::{DelayQueue, delay_queue};

use crate::backend::{
    Acker, Consumer, Event, Partition, Producer, StartFrom, SubscribeOptions, Subscription,
};
use crate::error::{Error, Result};
use crate::handler::{Handler, HandlerError};
use crate::message::{Delivery, dlq_headers};
use crate::middleware::{Middleware, Pipeline};
use crate::names;
use crate::time::later;

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

/// Counts of what a runner did, over its whole life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Deliveries handled successfully and acked.
    pub handled: u64,
    /// Deliveries published to the dead-letter topic and acked.
    pub dead_lettered: u64,
    /// Attempts that failed and were retried in process.
    pub retried: u64,
    /// Deliveries given back to the broker unhandled (on shutdown, revocation, or
    /// a failed dead-letter publish).
    pub released: u64,
    /// Handlers cancelled at the shutdown deadline (their messages were released).
    pub abandoned: u64,
    /// The runner was aborted (crashed) rather than shut down: nothing was settled
    /// after that point.
    pub aborted: bool,
}

#[derive(Debug, Default)]
struct Counters {
    handled: AtomicU64,
    dead_lettered: AtomicU64,
    retried: AtomicU64,
    released: AtomicU64,
    abandoned: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, AtomicOrdering::Relaxed);
    }

    fn report(&self, aborted: bool) -> ShutdownReport {
        ShutdownReport {
            handled: self.handled.load(AtomicOrdering::Relaxed),
            dead_lettered: self.dead_lettered.load(AtomicOrdering::Relaxed),
            retried: self.retried.load(AtomicOrdering::Relaxed),
            released: self.released.load(AtomicOrdering::Relaxed),
            abandoned: self.abandoned.load(AtomicOrdering::Relaxed),
            aborted,
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

    fn limits(&self) -> Result<(usize, usize)> {
        if self.concurrency == 0 {
            return Err(Error::InvalidConfig("concurrency must be at least 1".into()));
        }
        let concurrency = if self.order == Order::Sequential {
            1
        } else {
            self.concurrency
        };
        let buffer = self.buffer.unwrap_or(concurrency.max(8));
        Ok((concurrency, concurrency.saturating_add(buffer)))
    }

    /// Subscribes (returning once the subscription is ready) and starts handling
    /// in the background. Returns the handle at once after that; errors such as bad
    /// names or an unreachable broker come back here.
    pub async fn run(self, handler: impl Handler) -> Result<RunHandle> {
        if self.topics.is_empty() {
            return Err(Error::InvalidConfig("the runner needs at least one topic".into()));
        }
        let (_, max_held) = self.limits()?;
        for topic in &self.topics {
            // Failures must be able to reach `<topic>.dlq`.
            names::validate_declared_topic(topic)?;
        }
        let mut options = SubscribeOptions::new(self.topics[0].clone())
            .start(self.start)
            .prefetch(max_held);
        for topic in &self.topics[1..] {
            options = options.topic(topic.clone());
        }
        if let Some(group) = &self.group {
            options = options.group(group.clone());
        }
        let subscription = self.consumer.subscribe(options).await?;
        self.run_subscription(subscription, handler)
    }

    /// Starts handling deliveries from a subscription that is already open.
    pub fn run_subscription(
        self,
        subscription: Box<dyn Subscription>,
        handler: impl Handler,
    ) -> Result<RunHandle> {
        let (concurrency, max_held) = self.limits()?;
        let caps = self.consumer.capabilities();
        let keep_alive = self
            .keep_alive
            .or_else(|| caps.ack_deadline.map(|d| d / 3))
            .map(|d| d.max(Duration::from_millis(10)));
        let counters = Arc::new(Counters::default());
        let settings = Arc::new(Settings {
            retry: self.retry,
            group: self.group,
            producer: self.producer,
        });
        let dispatcher = Dispatcher {
            sub: subscription,
            pipeline: Pipeline::from_parts(Arc::new(handler), self.layers),
            settings,
            order: self.order,
            concurrency,
            max_held,
            positional: caps.positional_acks,
            keep_alive,
            lanes: HashMap::new(),
            ready: VecDeque::new(),
            running: JoinSet::new(),
            running_lanes: HashMap::new(),
            backoff: DelayQueue::new(),
            held: 0,
            next_solo: 0,
            counters: Arc::clone(&counters),
            side: JoinSet::new(),
            revoked: HashSet::new(),
        };
        let stop = CancellationToken::new();
        let deadline = Arc::new(std::sync::Mutex::new(None));
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn({
            let stop = stop.clone();
            let deadline = Arc::clone(&deadline);
            async move {
                let report = dispatcher.run(stop, deadline).await;
                let _ = tx.send(Some(report));
            }
        });
        Ok(RunHandle {
            shared: Arc::new(HandleShared {
                stop,
                deadline,
                report: rx,
                task: std::sync::Mutex::new(Some(task)),
                counters,
            }),
        })
    }
}

struct HandleShared {
    stop: CancellationToken,
    deadline: Arc<std::sync::Mutex<Option<Instant>>>,
    report: watch::Receiver<Option<ShutdownReport>>,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
    counters: Arc<Counters>,
}

/// Controls a running consumer loop. Cheap to clone; every clone controls the same
/// runner, and dropping them all does not stop it.
#[derive(Clone)]
pub struct RunHandle {
    shared: Arc<HandleShared>,
}

impl std::fmt::Debug for RunHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunHandle")
            .field("stats", &self.stats())
            .field("finished", &self.is_finished())
            .finish()
    }
}

impl RunHandle {
    /// Stops gracefully and returns what the runner did.
    ///
    /// Stops taking deliveries, releases held deliveries that have not started
    /// (positional-ack backends drain them instead, within the deadline), lets
    /// running handlers finish and settles them, cancels those still running at
    /// `timeout` and releases their messages, then closes the subscription. After it
    /// returns no handler runs. Safe to call many times and from many tasks at
    /// once: the first call's deadline counts, every call gets the same report.
    ///
    /// Do not call it from inside a handler of the same runner: it waits for that
    /// handler, so it would wait out the whole deadline and then cancel it.
    pub async fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        {
            let mut deadline = self.shared.deadline.lock().unwrap_or_else(|p| p.into_inner());
            if deadline.is_none() {
                *deadline = Some(later(Instant::now(), timeout));
            }
        }
        self.shared.stop.cancel();
        self.wait().await
    }

    /// Waits until the runner has ended (after a shutdown, or because the
    /// subscription ended) and returns its report.
    pub async fn wait(&self) -> ShutdownReport {
        let mut rx = self.shared.report.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(report) => report.expect("waited for Some"),
            Err(_) => self.shared.counters.report(true),
        }
    }

    /// Runs until `signal` completes (for example `tokio::signal::ctrl_c()`), then
    /// shuts down with `timeout`. Returns early if the runner ends by itself.
    pub async fn run_until<F: Future>(&self, signal: F, timeout: Duration) -> ShutdownReport {
        tokio::select! {
            _ = signal => self.shutdown(timeout).await,
            report = self.wait() => report,
        }
    }

    /// Ends the runner at once **without settling anything**, as if the process
    /// crashed: running handlers are dropped, nothing more is acked or released,
    /// the subscription is dropped without a graceful close, and the broker
    /// redelivers what was not acked. For tests of crash recovery.
    pub async fn abort(&self) {
        let task = self.shared.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    /// What the runner has done so far.
    pub fn stats(&self) -> ShutdownReport {
        self.shared.counters.report(false)
    }

    /// Whether the runner has ended.
    pub fn is_finished(&self) -> bool {
        self.shared.report.borrow().is_some()
            || self
                .shared
                .task
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .is_none_or(|t| t.is_finished())
    }
}

struct Settings {
    retry: RetryPolicy,
    group: Option<String>,
    producer: Arc<dyn Producer>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum LaneKey {
    Key(String),
    Solo(u64),
    Sequential,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Head {
    Waiting,
    Running,
    Backoff,
}

struct Held {
    delivery: Delivery,
    acker: Arc<Acker>,
}

struct Lane {
    items: VecDeque<Held>,
    head: Head,
    backoff_key: Option<delay_queue::Key>,
}

enum Done {
    Acked,
    DeadLettered,
    Retry(Duration),
    Cancelled,
}

struct Dispatcher {
    sub: Box<dyn Subscription>,
    pipeline: Pipeline,
    settings: Arc<Settings>,
    order: Order,
    concurrency: usize,
    max_held: usize,
    positional: bool,
    keep_alive: Option<Duration>,
    lanes: HashMap<LaneKey, Lane>,
    ready: VecDeque<LaneKey>,
    running: JoinSet<Done>,
    running_lanes: HashMap<tokio::task::Id, LaneKey>,
    backoff: DelayQueue<LaneKey>,
    held: usize,
    next_solo: u64,
    counters: Arc<Counters>,
    side: JoinSet<()>,
    /// Partitions taken away from this subscription (until assigned again).
    revoked: HashSet<Partition>,
}

impl Dispatcher {
    fn keep_alive_timer(&self) -> tokio::time::Interval {
        let mut timer = tokio::time::interval(self.keep_alive.unwrap_or(Duration::from_secs(3600)));
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        timer
    }

    async fn run(
        mut self,
        stop: CancellationToken,
        deadline: Arc<std::sync::Mutex<Option<Instant>>>,
    ) -> ShutdownReport {
        let mut keep_alive = self.keep_alive_timer();
        let mut subscription_open = true;
        // After a transient subscription error, pulling pauses until then.
        let mut pull_paused_until: Option<Instant> = None;
        loop {
            self.start_ready();
            if !subscription_open && self.held == 0 {
                tracing::debug!("subscription ended; runner stops");
                break;
            }
            let can_pull = subscription_open && self.held < self.max_held && pull_paused_until.is_none();
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                Some(joined) = self.running.join_next_with_id(), if !self.running.is_empty() => {
                    self.finished(joined, false);
                    // Collect every other worker that is already done in one go.
                    while let Some(joined) = self.running.try_join_next_with_id() {
                        self.finished(joined, false);
                    }
                }
                Some(expired) = self.backoff.next(), if !self.backoff.is_empty() => {
                    let key = expired.into_inner();
                    if let Some(lane) = self.lanes.get_mut(&key) {
                        lane.head = Head::Waiting;
                        lane.backoff_key = None;
                        self.ready.push_back(key);
                    }
                }
                _ = keep_alive.tick(), if self.keep_alive.is_some() => self.keep_alive_all(),
                Some(_) = self.side.join_next(), if !self.side.is_empty() => {}
                _ = tokio::time::sleep_until(pull_paused_until.unwrap_or_else(Instant::now)), if pull_paused_until.is_some() => {
                    pull_paused_until = None;
                }
                // When full (or pausing after an error), only control events: a
                // revocation must get through even then.
                event = pull(&mut *self.sub, can_pull), if subscription_open => {
                    self.on_event(event, &mut subscription_open, &mut pull_paused_until);
                    if !can_pull {
                        continue;
                    }
                    // Take the events that are already waiting without a round
                    // through `select!` each (`next` is cancel-safe, so polling it
                    // once and dropping it when it is not ready loses nothing).
                    while subscription_open && pull_paused_until.is_none() && self.held < self.max_held {
                        match self.sub.next().now_or_never() {
                            Some(event) => self.on_event(event, &mut subscription_open, &mut pull_paused_until),
                            None => break,
                        }
                    }
                }
            }
        }
        let deadline = deadline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(30));
        self.finish(deadline, keep_alive).await
    }

    /// Handles one event from the subscription.
    fn on_event(
        &mut self,
        event: Option<Result<Event>>,
        subscription_open: &mut bool,
        pull_paused_until: &mut Option<Instant>,
    ) {
        match event {
            Some(Ok(Event::Delivery(delivery, acker))) => self.enqueue(delivery, acker),
            Some(Ok(Event::Assigned(partitions))) => {
                for p in &partitions {
                    self.revoked.remove(p);
                }
            }
            Some(Ok(Event::Revoked(partitions))) => self.revoke(partitions),
            Some(Err(e)) if e.is_retryable() => {
                tracing::warn!(error = %e, "subscription error; pulling again shortly");
                *pull_paused_until = Some(Instant::now() + Duration::from_millis(100));
            }
            Some(Err(e)) => {
                tracing::error!(error = %e, "subscription failed; runner stops taking messages");
                *subscription_open = false;
            }
            None => *subscription_open = false,
        }
    }

    fn enqueue(&mut self, delivery: Delivery, acker: Acker) {
        let key = match (self.order, delivery.key()) {
            (Order::Sequential, _) => LaneKey::Sequential,
            (Order::ByKey, Some(key)) => LaneKey::Key(key.to_owned()),
            _ => {
                self.next_solo += 1;
                LaneKey::Solo(self.next_solo)
            }
        };
        let lane = self.lanes.entry(key.clone()).or_insert_with(|| Lane {
            items: VecDeque::new(),
            head: Head::Waiting,
            backoff_key: None,
        });
        lane.items.push_back(Held {
            delivery,
            acker: Arc::new(acker),
        });
        self.held += 1;
        if lane.items.len() == 1 {
            lane.head = Head::Waiting;
            self.ready.push_back(key);
        }
    }

    fn start_ready(&mut self) {
        while self.running.len() < self.concurrency {
            let Some(key) = self.ready.pop_front() else {
                break;
            };
            let Some(lane) = self.lanes.get_mut(&key) else {
                continue;
            };
            if lane.head != Head::Waiting {
                continue;
            }
            let Some(head) = lane.items.front() else {
                continue;
            };
            lane.head = Head::Running;
            let work = handle_one(
                self.pipeline.clone(),
                Arc::clone(&self.settings),
                head.delivery.clone(),
                Arc::clone(&head.acker),
            );
            let abort: AbortHandle = self.running.spawn(work);
            self.running_lanes.insert(abort.id(), key);
        }
    }

    fn is_revoked(&self, delivery: &Delivery) -> bool {
        let origin = delivery.origin();
        !self.revoked.is_empty()
            && origin.partition.is_some_and(|partition| {
                self.revoked.contains(&Partition {
                    topic: origin.topic.clone(),
                    partition,
                })
            })
    }

    /// A worker ended. `stopping`: retry nothing, give the rest of its lane back.
    fn finished(&mut self, joined: Result<(tokio::task::Id, Done), JoinError>, stopping: bool) {
        let (id, done) = match joined {
            Ok(pair) => pair,
            Err(e) if e.is_cancelled() => (e.id(), Done::Cancelled),
            Err(e) => {
                tracing::error!(error = %e, "worker task failed; retrying its message");
                (e.id(), Done::Retry(self.settings.retry.delay_after(1)))
            }
        };
        let Some(key) = self.running_lanes.remove(&id) else {
            return;
        };
        let revoked = self
            .lanes
            .get(&key)
            .and_then(|lane| lane.items.front())
            .is_some_and(|h| self.is_revoked(&h.delivery));
        let Some(lane) = self.lanes.get_mut(&key) else {
            return;
        };
        match done {
            Done::Retry(delay) if !stopping && !revoked => {
                Counters::bump(&self.counters.retried, 1);
                if let Some(head) = lane.items.front_mut() {
                    head.delivery = head.delivery.with_attempt(head.delivery.attempt() + 1);
                }
                lane.head = Head::Backoff;
                lane.backoff_key = Some(self.backoff.insert(key, delay));
                return;
            }
            Done::Retry(_) | Done::Cancelled => {
                // Not handled: give it back with everything behind it in its lane, so
                // the key's order survives redelivery (and positional acks never
                // commit past it).
                if matches!(done, Done::Cancelled) {
                    Counters::bump(&self.counters.abandoned, 1);
                } else {
                    Counters::bump(&self.counters.released, 1);
                }
                self.release_lane(&key, true);
                return;
            }
            Done::Acked => Counters::bump(&self.counters.handled, 1),
            Done::DeadLettered => Counters::bump(&self.counters.dead_lettered, 1),
        }
        lane.items.pop_front();
        self.held -= 1;
        if lane.items.is_empty() {
            self.lanes.remove(&key);
        } else {
            lane.head = Head::Waiting;
            self.ready.push_back(key);
        }
    }

    /// Releases every held delivery that is not running and matches `pred`, with
    /// everything behind it in its lane (so a lane's order survives redelivery).
    fn release_where(&mut self, pred: impl Fn(&Held) -> bool) {
        let mut released = Vec::new();
        let mut emptied = Vec::new();
        for (key, lane) in &mut self.lanes {
            let first = usize::from(lane.head == Head::Running);
            if let Some(pos) = lane.items.iter().skip(first).position(&pred) {
                let pos = pos + first;
                released.extend(lane.items.drain(pos..).map(|h| h.acker));
                if pos == 0 {
                    if let Some(k) = lane.backoff_key.take() {
                        self.backoff.remove(&k);
                    }
                    lane.head = Head::Waiting;
                }
                if lane.items.is_empty() {
                    emptied.push(key.clone());
                }
            }
        }
        for key in emptied {
            self.lanes.remove(&key);
        }
        self.held -= released.len();
        Counters::bump(&self.counters.released, released.len() as u64);
        self.release_all(released);
    }

    /// Releases a whole lane; `head_counted`: its head was already counted.
    fn release_lane(&mut self, key: &LaneKey, head_counted: bool) {
        let Some(lane) = self.lanes.remove(key) else {
            return;
        };
        if let Some(k) = lane.backoff_key {
            self.backoff.remove(&k);
        }
        let n = lane.items.len();
        self.held -= n;
        let uncounted = if head_counted { n.saturating_sub(1) } else { n };
        Counters::bump(&self.counters.released, uncounted as u64);
        self.release_all(lane.items.into_iter().map(|h| h.acker).collect());
    }

    fn release_all(&mut self, ackers: Vec<Arc<Acker>>) {
        if ackers.is_empty() {
            return;
        }
        self.side.spawn(async move {
            let releases = ackers.iter().map(|a| a.release(None));
            for result in futures::future::join_all(releases).await {
                if let Err(e) = result {
                    tracing::warn!(error = %e, "release failed; the broker will redeliver");
                }
            }
        });
    }

    fn revoke(&mut self, partitions: Vec<Partition>) {
        tracing::info!(
            ?partitions,
            "partitions revoked; releasing their waiting deliveries"
        );
        self.revoked.extend(partitions);
        let revoked = std::mem::take(&mut self.revoked);
        self.release_where(|held| {
            let origin = held.delivery.origin();
            origin.partition.is_some_and(|partition| {
                revoked.contains(&Partition {
                    topic: origin.topic.clone(),
                    partition,
                })
            })
        });
        self.revoked = revoked;
    }

    fn keep_alive_all(&mut self) {
        let ackers: Vec<Arc<Acker>> = self
            .lanes
            .values()
            .flat_map(|lane| lane.items.iter().map(|h| Arc::clone(&h.acker)))
            .collect();
        if ackers.is_empty() {
            return;
        }
        self.side.spawn(async move {
            let calls = ackers.iter().map(|a| a.keep_alive());
            for result in futures::future::join_all(calls).await {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "keep-alive failed");
                }
            }
        });
    }

    async fn finish(mut self, deadline: Instant, mut keep_alive: tokio::time::Interval) -> ShutdownReport {
        // Give back at once what has not started: every lane in backoff, and (unless
        // acks are positional, where fetched messages are drained instead) every
        // waiting delivery.
        let in_backoff: Vec<LaneKey> = self
            .lanes
            .iter()
            .filter(|(_, lane)| lane.head == Head::Backoff)
            .map(|(key, _)| key.clone())
            .collect();
        for key in in_backoff {
            self.release_lane(&key, false);
        }
        if !self.positional {
            self.release_where(|_| true);
        }
        // Let running handlers finish (and, when draining, start what waits), keeping
        // held deliveries alive meanwhile.
        loop {
            if self.positional {
                self.start_ready();
            }
            if self.running.is_empty() {
                break;
            }
            tokio::select! {
                Some(joined) = self.running.join_next_with_id() => self.finished(joined, true),
                _ = keep_alive.tick(), if self.keep_alive.is_some() => self.keep_alive_all(),
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        // The deadline has passed: cancel what still runs; its messages are released.
        if !self.running.is_empty() {
            tracing::warn!(
                running = self.running.len(),
                "shutdown deadline reached; cancelling handlers"
            );
            self.running.abort_all();
            let cancel_wait = Instant::now() + Duration::from_secs(2);
            loop {
                tokio::select! {
                    joined = self.running.join_next_with_id() => match joined {
                        Some(joined) => self.finished(joined, true),
                        None => break,
                    },
                    _ = tokio::time::sleep_until(cancel_wait) => {
                        // A handler blocking its thread cannot be cancelled: give its
                        // message back anyway and stop waiting for it.
                        tracing::error!(
                            stuck = self.running.len(),
                            "handlers did not yield to cancellation; releasing their messages"
                        );
                        let stuck = self.running.len() as u64;
                        Counters::bump(&self.counters.abandoned, stuck);
                        let keys: Vec<LaneKey> = self.running_lanes.drain().map(|(_, key)| key).collect();
                        for key in keys {
                            self.release_lane(&key, true);
                        }
                        self.running.detach_all();
                        break;
                    }
                }
            }
        }
        self.release_where(|_| true);
        // Wait for releases to reach the broker before closing.
        let settle_limit = later(deadline.max(Instant::now()), Duration::from_secs(5));
        while !self.side.is_empty() {
            tokio::select! {
                _ = self.side.join_next() => {}
                _ = tokio::time::sleep_until(settle_limit) => self.side.abort_all(),
            }
        }
        if let Err(e) = self.sub.close().await {
            tracing::warn!(error = %e, "closing the subscription failed");
        }
        self.counters.report(false)
    }
}

/// The subscription's next event, or only its next control event when the
/// runner cannot take deliveries.
async fn pull(sub: &mut dyn Subscription, deliveries: bool) -> Option<Result<Event>> {
    if deliveries {
        sub.next().await
    } else {
        sub.control().await
    }
}

#[derive(Debug, thiserror::Error)]
#[error("handler panicked: {0}")]
struct Panicked(String);

/// Runs one attempt of one delivery and settles it.
async fn handle_one(
    pipeline: Pipeline,
    settings: Arc<Settings>,
    delivery: Delivery,
    acker: Arc<Acker>,
) -> Done {
    let attempt = delivery.attempt();
    let call = AssertUnwindSafe(async { pipeline.call(delivery.clone()).await });
    let error = match call.catch_unwind().await {
        Ok(Ok(())) => {
            if let Err(e) = acker.ack().await {
                tracing::warn!(error = %e, id = delivery.id(), "ack failed; the broker may redeliver");
            }
            return Done::Acked;
        }
        Ok(Err(error)) => error,
        Err(panic) => {
            let text = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".into());
            HandlerError::retryable(Panicked(text))
        }
    };
    if !error.is_permanent() && attempt < settings.retry.max_attempts {
        tracing::debug!(id = delivery.id(), attempt, error = %error, "retrying");
        return Done::Retry(settings.retry.delay_after(attempt));
    }
    let reason = if error.is_permanent() {
        error.to_string()
    } else {
        format!("gave up after {attempt} attempts: {error}")
    };
    // The message stays held (its lane blocked) until the dead letter is confirmed:
    // a failed publish is retried here with backoff, never turned into a release
    // that would let the key's next message overtake it. Shutdown cancels this
    // loop at its deadline, which releases the message.
    let mut failures = 0;
    loop {
        match dead_letter(&settings, &delivery, &reason).await {
            Ok(()) => break,
            Err(e) => {
                failures += 1;
                tracing::error!(
                    error = %e,
                    id = delivery.id(),
                    failures,
                    "dead-letter publish failed; retrying (the message stays held)"
                );
                tokio::time::sleep(settings.retry.delay_after(failures)).await;
            }
        }
    }
    tracing::warn!(id = delivery.id(), topic = delivery.topic(), %reason, "dead-lettered");
    if let Err(e) = acker.ack().await {
        tracing::warn!(error = %e, id = delivery.id(), "ack after dead letter failed");
    }
    Done::DeadLettered
}

/// Text made safe for a header value: no CR/LF, at most 1024 bytes.
fn header_safe(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect();
    if out.len() > 1024 {
        let mut cut = 1024;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

/// Publishes a copy of the delivery to `<topic>.dlq` with the reason headers.
///
/// The message may come from a producer that did not follow the portable grammar
/// (another client on the same broker), so it is made valid rather than checked:
/// header keys outside the grammar are dropped, values, key and id lose CR/LF.
async fn dead_letter(settings: &Settings, delivery: &Delivery, reason: &str) -> Result<()> {
    let original = delivery.message();
    let mut message = original.clone();
    message.headers = original
        .headers
        .iter()
        .filter(|(k, _)| names::validate_header_key(k).is_ok() && !k.starts_with(names::RESERVED_PREFIX))
        .map(|(k, v)| (k.clone(), header_safe(v)))
        .collect();
    if message.headers.len() < original.headers.len() {
        tracing::warn!(
            id = delivery.id(),
            dropped = original.headers.len() - message.headers.len(),
            "dead letter: dropped header keys outside the portable grammar"
        );
    }
    message.key = original.key.as_deref().map(header_safe);
    message.id = header_safe(&original.id);
    if message.id.is_empty() {
        message.id = uuid::Uuid::new_v4().to_string();
    }
    let sys = &mut message.system_headers;
    sys.retain(|k, _| names::validate_header_key(k).is_ok() && k.starts_with(names::RESERVED_PREFIX));
    sys.insert(dlq_headers::REASON.into(), header_safe(reason));
    sys.insert(dlq_headers::TOPIC.into(), delivery.topic().to_owned());
    sys.insert(dlq_headers::ATTEMPTS.into(), delivery.attempt().to_string());
    match &settings.group {
        Some(group) => sys.insert(dlq_headers::GROUP.into(), group.clone()),
        None => sys.remove(dlq_headers::GROUP),
    };
    let topic = names::dead_letter_topic(delivery.topic());
    names::validate_topic(&topic)?;
    settings.producer.publish(&topic, message).await
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

    #[test]
    fn reasons_fit_in_a_header() {
        assert_eq!(header_safe("a\r\nb"), "a  b");
        assert!(header_safe(&"é".repeat(1000)).len() <= 1024);
    }
}
