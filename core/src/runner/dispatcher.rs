//! The dispatcher: one task per runner that pulls deliveries, keeps the
//! ordering lanes, starts workers within the concurrency bound, puts failed
//! heads into backoff, keeps held deliveries alive, and shuts down.
//!
//! **Memory bound.** Let `max_held = concurrency + buffer` and `parked` be the
//! deliveries held in lanes whose head is in backoff (the head and everything
//! queued behind it). The dispatcher pulls only while `held - parked < max_held`
//! and `held < max_held + backoff_capacity`, so
//!
//! ```text
//! held ≤ concurrency + buffer + backoff_capacity
//! ```
//!
//! always, and a lane in backoff never stops other keys from being pulled and
//! handled until `backoff_capacity` deliveries wait behind backoffs.

use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::time::DelayQueue;

use super::Order;
use super::handle::{Counters, Ended, Shared, ShutdownReport};
use super::lanes::{Head, Held, IdMap, IdSet, Lane, LaneId, SEQUENTIAL, Slots};
use super::pool::{self, Finished, Job, Pool, PoolEvent};
use super::worker::{self, Done, Settings};
use crate::backend::{Acker, Event, Partition, Subscription};
use crate::error::{Error, Result};
use crate::message::Delivery;
use crate::middleware::Pipeline;
use crate::names;
use crate::observe::Outcome;
use crate::time::later;

pub(super) struct Limits {
    pub(super) concurrency: usize,
    pub(super) max_held: usize,
    pub(super) backoff_capacity: usize,
}

pub(super) struct Dispatcher {
    sub: Box<dyn Subscription>,
    settings: Arc<Settings>,
    order: Order,
    limits: Limits,
    positional: bool,
    /// The broker honours a release's delay (`Capabilities::delayed_release`);
    /// without it the runner waits out an overloaded message's backoff itself.
    broker_delays: bool,
    keep_alive: Option<Duration>,
    lanes: IdMap<Lane>,
    /// The lane of each message key that has one ([`Order::ByKey`]).
    keyed: HashMap<bytes::Bytes, LaneId>,
    ready: VecDeque<LaneId>,
    /// Which lane's head runs in which slot of the pool.
    running: Slots,
    pool: Pool,
    backoff: DelayQueue<LaneId>,
    /// Lanes whose head is in backoff.
    parked_lanes: IdSet,
    held: usize,
    /// The last lane id handed out ([`SEQUENTIAL`] is 0).
    next_lane: LaneId,
    counters: Arc<Counters>,
    side: JoinSet<()>,
    /// Partitions taken away from this subscription (until assigned again).
    revoked: HashSet<Partition>,
    /// Topics whose dead-letter topic name has been checked.
    checked_topics: HashSet<String>,
    shared: Arc<Shared>,
    /// The error that ends the runner, once one has happened.
    fatal: Option<Arc<Error>>,
}

impl Dispatcher {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        sub: Box<dyn Subscription>,
        pipeline: Pipeline,
        settings: Arc<Settings>,
        order: Order,
        limits: Limits,
        positional: bool,
        broker_delays: bool,
        keep_alive: Option<Duration>,
        checked_topics: HashSet<String>,
        shared: Arc<Shared>,
    ) -> Self {
        Dispatcher {
            sub,
            pool: Pool::new(pipeline, Arc::clone(&settings), limits.concurrency),
            counters: Arc::clone(&settings.counters),
            settings,
            order,
            limits,
            positional,
            broker_delays,
            keep_alive,
            lanes: IdMap::default(),
            keyed: HashMap::new(),
            ready: VecDeque::new(),
            running: Slots::default(),
            backoff: DelayQueue::new(),
            parked_lanes: IdSet::default(),
            held: 0,
            next_lane: SEQUENTIAL,
            side: JoinSet::new(),
            revoked: HashSet::new(),
            checked_topics,
            shared,
            fatal: None,
        }
    }

    fn keep_alive_timer(&self) -> tokio::time::Interval {
        let mut timer = tokio::time::interval(self.keep_alive.unwrap_or(Duration::from_secs(3600)));
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        timer
    }

    /// Deliveries held in lanes whose head is in backoff.
    fn parked(&self) -> usize {
        if self.parked_lanes.is_empty() {
            return 0;
        }
        self.parked_lanes
            .iter()
            .filter_map(|key| self.lanes.get(key))
            .map(|lane| lane.items.len())
            .sum()
    }

    fn has_room(&self) -> bool {
        if self.held >= self.limits.max_held.saturating_add(self.limits.backoff_capacity) {
            return false;
        }
        self.held < self.limits.max_held || self.held - self.parked() < self.limits.max_held
    }

    fn set_fatal(&mut self, error: Error) {
        if let Some(first) = &self.fatal {
            tracing::error!(error = %error, first = %first, "another fatal error while the runner stops");
            return;
        }
        tracing::error!(error = %error, "runner stops: {error}");
        self.fatal = Some(self.shared.fail(error));
    }

    pub(super) async fn run(mut self) -> ShutdownReport {
        let stop = self.shared.stop.clone();
        let mut keep_alive = self.keep_alive_timer();
        let mut subscription_open = true;
        // After a transient subscription error, pulling pauses until then.
        let mut pull_paused_until: Option<Instant> = None;
        // One wait for the stop signal for the whole loop (not one per wake-up).
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        loop {
            self.start_ready();
            // Take what the subscription already holds (room permitting) and start
            // it, without a round through `select!` per delivery.
            if !stop.is_cancelled() && self.take_ready(&mut subscription_open, &mut pull_paused_until) {
                self.start_ready();
            }
            self.settings
                .observe
                .load(self.held, self.running.len(), || self.parked());
            if self.fatal.is_some() {
                break;
            }
            if !subscription_open && self.held == 0 {
                tracing::debug!("subscription ended; runner stops");
                break;
            }
            let can_pull = subscription_open && pull_paused_until.is_none() && self.has_room();
            tokio::select! {
                biased;
                _ = &mut stopped => break,
                event = self.pool.next() => {
                    self.pool_event(event, false);
                    // Collect every other attempt that is already done in one go.
                    while let Some(event) = self.pool.try_next() {
                        self.pool_event(event, false);
                    }
                }
                Some(expired) = self.backoff.next(), if !self.backoff.is_empty() => {
                    let key = expired.into_inner();
                    self.parked_lanes.remove(&key);
                    if let Some(lane) = self.lanes.get_mut(&key) {
                        lane.backoff_key = None;
                        if lane.head == Head::Shed {
                            // An overloaded message's backoff is over: give it
                            // back now, with its lane.
                            self.release_lane(key, false);
                        } else {
                            lane.head = Head::Waiting;
                            self.ready.push_back(key);
                        }
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
                    // through `select!` each.
                    self.take_ready(&mut subscription_open, &mut pull_paused_until);
                }
            }
        }
        self.shared.draining();
        let stopping = Instant::now();
        let shutdown = stop.is_cancelled() && self.fatal.is_none();
        let deadline = match self.shared.deadline() {
            Some(deadline) if shutdown => deadline,
            // Ended by an error: running handlers get the settle timeout to finish.
            _ if self.fatal.is_some() => later(Instant::now(), self.settings.settle_timeout),
            _ => Instant::now() + Duration::from_secs(30),
        };
        self.finish(deadline, keep_alive).await;
        self.settings.observe.load(self.held, self.running.len(), || 0);
        self.settings.observe.shutdown(stopping.elapsed());
        let ended = match (&self.fatal, shutdown) {
            (Some(error), _) => Ended::Failed(Arc::clone(error)),
            (None, true) if self.shared.stopped_caught_up.load(Ordering::Acquire) => Ended::CaughtUp,
            (None, true) => Ended::Shutdown,
            (None, false) => Ended::SubscriptionEnded,
        };
        self.counters.report(Some(ended))
    }

    /// Takes the events the subscription has ready, while there is room.
    /// Returns whether it took any.
    fn take_ready(&mut self, subscription_open: &mut bool, pull_paused_until: &mut Option<Instant>) -> bool {
        let mut took = false;
        while *subscription_open && pull_paused_until.is_none() && self.fatal.is_none() && self.has_room() {
            match self.sub.try_next() {
                Some(event) => self.on_event(event, subscription_open, pull_paused_until),
                None => break,
            }
            took = true;
        }
        took
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
                *subscription_open = false;
                self.set_fatal(e);
            }
            None => *subscription_open = false,
        }
    }

    fn enqueue(&mut self, delivery: Delivery, acker: Acker) {
        self.settings.observe.received(&delivery);
        if !self.checked_topics.contains(delivery.topic()) {
            // Failures of this topic must be able to reach `<topic>.dlq`.
            if let Err(e) = names::validate_declared_topic(delivery.topic()) {
                Counters::bump(&self.counters.released, 1);
                self.settings
                    .observe
                    .outcome(delivery.topic(), Outcome::Released, 1);
                self.release_all(vec![acker]);
                self.set_fatal(e);
                return;
            }
            self.checked_topics.insert(delivery.topic().to_owned());
        }
        let (id, key) = match (self.order, delivery.key_bytes()) {
            (Order::Sequential, _) => (SEQUENTIAL, None),
            (Order::ByKey, Some(key)) => match self.keyed.get(key) {
                Some(id) => (*id, None),
                None => {
                    self.next_lane += 1;
                    self.keyed.insert(key.clone(), self.next_lane);
                    (self.next_lane, Some(key.clone()))
                }
            },
            _ => {
                self.next_lane += 1;
                (self.next_lane, None)
            }
        };
        let lane = self.lanes.entry(id).or_insert_with(|| Lane::new(key));
        lane.items.push_back(Held { delivery, acker });
        self.held += 1;
        if lane.items.len() == 1 {
            lane.head = Head::Waiting;
            self.ready.push_back(id);
        }
    }

    /// Removes a lane, and its key's entry.
    fn remove_lane(&mut self, id: LaneId) -> Option<Lane> {
        let lane = self.lanes.remove(&id)?;
        if let Some(key) = &lane.key {
            self.keyed.remove(key);
        }
        Some(lane)
    }

    fn start_ready(&mut self) {
        while self.running.len() < self.limits.concurrency && self.fatal.is_none() {
            let Some(id) = self.ready.pop_front() else {
                break;
            };
            let Some(lane) = self.lanes.get_mut(&id) else {
                continue;
            };
            if lane.head != Head::Waiting {
                continue;
            }
            let Some(head) = lane.items.front() else {
                continue;
            };
            lane.head = Head::Running;
            let job = Job {
                slot: 0,
                delivery: head.delivery.clone(),
                acker: head.acker.clone(),
            };
            let slot = self.running.start(id);
            self.pool.submit(Job { slot, ..job }, self.running.len());
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

    /// An attempt ended. `stopping`: retry nothing, give the rest of its lane back.
    fn finished(&mut self, finished: Finished, stopping: bool) {
        let Finished { slot, done } = finished;
        let Some(key) = self.running.finish(slot) else {
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
        let observe = &self.settings.observe;
        let retry = !stopping && !revoked && self.fatal.is_none();
        // An overloaded message on a broker that cannot delay its redelivery
        // waits out the backoff here (counted when it is released).
        let shed = retry && !self.broker_delays && matches!(done, Done::Release);
        if let Some(head) = lane.items.front().filter(|_| !shed) {
            observe_done(observe, &head.delivery, &done, retry);
        }
        match done {
            Done::Release if shed => {
                lane.head = Head::Shed;
                lane.backoff_key = Some(self.backoff.insert(key, self.settings.retry.initial_backoff));
                self.parked_lanes.insert(key);
                return;
            }
            Done::Retry(delay) if !stopping && !revoked && self.fatal.is_none() => {
                Counters::bump(&self.counters.retried, 1);
                if let Some(head) = lane.items.front_mut() {
                    head.delivery = head.delivery.with_attempt(head.delivery.attempt() + 1);
                }
                lane.head = Head::Backoff;
                lane.backoff_key = Some(self.backoff.insert(key, delay));
                self.parked_lanes.insert(key);
                return;
            }
            Done::Retry(_) | Done::Cancelled | Done::Release => {
                // Not handled: give it back with everything behind it in its lane, so
                // the key's order survives redelivery (and positional acks never
                // commit past it). An overloaded handler's message comes back after
                // the retry policy's first backoff, not at once, so an overload
                // that lasts does not turn into a redelivery loop.
                // (A broker that cannot delay a redelivery got it held above.)
                let delay = if matches!(done, Done::Release) && !stopping && self.broker_delays {
                    Some(self.settings.retry.initial_backoff)
                } else {
                    None
                };
                if matches!(done, Done::Cancelled) {
                    Counters::bump(&self.counters.abandoned, 1);
                } else {
                    Counters::bump(&self.counters.released, 1);
                }
                self.release_lane_after(key, true, delay);
                return;
            }
            Done::Fatal(error) => {
                Counters::bump(&self.counters.released, 1);
                self.release_lane(key, true);
                self.set_fatal(error);
                return;
            }
            Done::Acked => {
                Counters::bump(&self.counters.handled, 1);
                self.shared.settled.notify_one();
            }
            Done::AckFailed => Counters::bump(&self.counters.settle_failures, 1),
            // Like a handled message whose ack failed: counted once, as a settle
            // failure (the broker delivers it again).
            Done::DeadLettered { ack_failed: true } => Counters::bump(&self.counters.settle_failures, 1),
            Done::DeadLettered { ack_failed: false } => {
                Counters::bump(&self.counters.dead_lettered, 1);
                self.shared.settled.notify_one();
            }
        }
        lane.items.pop_front();
        self.held -= 1;
        if lane.items.is_empty() {
            self.remove_lane(key);
        } else {
            lane.head = Head::Waiting;
            self.ready.push_back(key);
        }
    }

    fn pool_event(&mut self, event: PoolEvent, stopping: bool) {
        match event {
            PoolEvent::Finished(finished) => self.finished(finished, stopping),
            PoolEvent::WorkerEnded { slot, .. } => {
                tracing::error!("a runner worker ended unexpectedly");
                self.worker_ended(slot, stopping);
            }
        }
    }

    /// A worker task ended by itself (workers guard everything they run, so
    /// this is a last resort): the attempt it was running, if any, failed.
    fn worker_ended(&mut self, slot: Option<usize>, stopping: bool) {
        let Some(slot) = slot else {
            return;
        };
        let head = self
            .running
            .get(slot)
            .and_then(|id| self.lanes.get(&id))
            .and_then(|lane| lane.items.front());
        let done = match head {
            Some(head) => pool::panicked(&self.settings, &head.delivery, &head.acker),
            None => Done::Cancelled,
        };
        self.finished(Finished { slot, done }, stopping);
    }

    /// Releases every held delivery that is not running and matches `pred`, with
    /// everything behind it in its lane (so a lane's order survives redelivery).
    fn release_where(&mut self, pred: impl Fn(&Held) -> bool) {
        let mut released = Vec::new();
        let mut emptied = Vec::new();
        for (&key, lane) in &mut self.lanes {
            let first = usize::from(lane.head == Head::Running);
            let found = lane.items.iter().skip(first).position(&pred);
            if let Some(pos) = found {
                let pos = pos + first;
                for h in lane.items.drain_from(pos) {
                    self.settings
                        .observe
                        .outcome(h.delivery.topic(), Outcome::Released, 1);
                    released.push(h.acker);
                }
                if pos == 0 {
                    if let Some(k) = lane.backoff_key.take() {
                        self.backoff.remove(&k);
                    }
                    self.parked_lanes.remove(&key);
                    lane.head = Head::Waiting;
                }
                if lane.items.is_empty() {
                    emptied.push(key);
                }
            }
        }
        for key in emptied {
            self.remove_lane(key);
        }
        self.held -= released.len();
        Counters::bump(&self.counters.released, released.len() as u64);
        self.release_all(released);
    }

    /// Releases a whole lane; `head_counted`: its head was already counted.
    fn release_lane(&mut self, key: LaneId, head_counted: bool) {
        self.release_lane_after(key, head_counted, None);
    }

    /// [`release_lane`](Self::release_lane), asking the broker to redeliver
    /// after `delay`.
    fn release_lane_after(&mut self, key: LaneId, head_counted: bool, delay: Option<Duration>) {
        let Some(lane) = self.remove_lane(key) else {
            return;
        };
        self.parked_lanes.remove(&key);
        if let Some(k) = lane.backoff_key {
            self.backoff.remove(&k);
        }
        let n = lane.items.len();
        self.held -= n;
        let uncounted = if head_counted { n.saturating_sub(1) } else { n };
        Counters::bump(&self.counters.released, uncounted as u64);
        for h in lane.items.iter().skip(n - uncounted) {
            self.settings
                .observe
                .outcome(h.delivery.topic(), Outcome::Released, 1);
        }
        self.release_all_after(lane.items.into_iter().map(|h| h.acker).collect(), delay);
    }

    fn release_all(&mut self, ackers: Vec<Acker>) {
        self.release_all_after(ackers, None);
    }

    fn release_all_after(&mut self, ackers: Vec<Acker>, delay: Option<Duration>) {
        if ackers.is_empty() {
            return;
        }
        let settings = Arc::clone(&self.settings);
        self.side.spawn(async move {
            // Every release not yet known to have taken effect is a settle failure
            // if this task ends early: a release that panics stops its batch, and
            // shutdown aborts releases still pending at its end.
            let unsettled = Unsettled {
                left: AtomicU64::new(ackers.len() as u64),
                counters: Arc::clone(&settings.counters),
            };
            let releases = ackers.iter().map(|a| {
                let (settings, unsettled) = (&settings, &unsettled);
                async move {
                    let result = worker::settle(settings, "release", a.release(delay)).await;
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "release did not take effect; the broker will redeliver");
                        Counters::bump(&settings.counters.settle_failures, 1);
                    }
                    unsettled.left.fetch_sub(1, Ordering::Relaxed);
                }
            });
            if AssertUnwindSafe(futures::future::join_all(releases))
                .catch_unwind()
                .await
                .is_err()
            {
                tracing::error!("a release panicked; the broker will redeliver");
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
        let ackers: Vec<Acker> = self
            .lanes
            .values()
            .flat_map(|lane| lane.items.iter().map(|h| h.acker.clone()))
            .collect();
        if ackers.is_empty() {
            return;
        }
        let settings = Arc::clone(&self.settings);
        self.side.spawn(async move {
            let calls = ackers
                .iter()
                .map(|a| worker::settle(&settings, "keep-alive", a.keep_alive()));
            if let Ok(results) = AssertUnwindSafe(futures::future::join_all(calls))
                .catch_unwind()
                .await
            {
                for e in results.into_iter().filter_map(|r| r.err()) {
                    tracing::debug!(error = %e, "keep-alive failed");
                }
            }
        });
    }

    async fn finish(&mut self, deadline: Instant, mut keep_alive: tokio::time::Interval) {
        // Stop the broker from sending more before giving anything back, so what
        // is released goes to another consumer (or a later one), not straight back
        // into this subscription's prefetch at the cost of a delivery attempt.
        //
        // Shutdown returns by `deadline + SHUTDOWN_GRACE` whatever the
        // subscription does: `stop` gets what is left before the deadline (at
        // most 5 s), the cancel and release waits end 1 s after it, and `close`
        // gets what is left of the grace (at least 2 s). A `close` cut off that
        // way loses, at worst, a final commit: duplicates, never loss.
        let stop_limit = self
            .settings
            .settle_timeout
            .min(Duration::from_secs(5))
            .min(deadline.saturating_duration_since(Instant::now()))
            .max(Duration::from_millis(100));
        match tokio::time::timeout(stop_limit, AssertUnwindSafe(self.sub.stop()).catch_unwind()).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "stopping the subscription failed"),
            Ok(Err(_)) => tracing::error!("stopping the subscription panicked"),
            Err(_) => tracing::warn!(after = ?stop_limit, "stopping the subscription timed out"),
        }
        // Give back at once what has not started: every lane in backoff, and (unless
        // acks are positional, where fetched messages are drained instead — or the
        // runner failed) every waiting delivery.
        let in_backoff: Vec<LaneId> = self.parked_lanes.iter().copied().collect();
        for key in in_backoff {
            self.release_lane(key, false);
        }
        let drain = self.positional && self.fatal.is_none();
        if !drain {
            self.release_where(|_| true);
        }
        // Let running handlers finish (and, when draining, start what waits), keeping
        // held deliveries alive meanwhile. A `shutdown` called meanwhile (after the
        // runner failed by itself) brings the deadline forward to its own.
        let stop = self.shared.stop.clone();
        let mut deadline = deadline;
        loop {
            if let Some(asked) = self.shared.deadline() {
                deadline = deadline.min(asked);
            }
            if drain {
                self.start_ready();
            }
            if self.running.is_empty() {
                break;
            }
            tokio::select! {
                event = self.pool.next() => self.pool_event(event, true),
                _ = keep_alive.tick(), if self.keep_alive.is_some() => self.keep_alive_all(),
                _ = stop.cancelled(), if !stop.is_cancelled() => {}
                // A shutdown during a catch-up run's own drain (its deadline is earlier).
                _ = self.shared.deadline_moved.notified() => {}
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        // The deadline has passed: cancel what still runs; its messages are released.
        if !self.running.is_empty() {
            tracing::warn!(
                running = self.running.len(),
                "shutdown deadline reached; cancelling handlers"
            );
            self.pool.abort_all();
            let cancel_wait = Instant::now().max(deadline) + Duration::from_secs(1);
            let joined = self.pool.join_aborted(cancel_wait).await;
            // Attempts that finished before they were cancelled count as such;
            // the others are released below.
            while let Some(event) = self.pool.try_next() {
                if let PoolEvent::Finished(finished) = event {
                    self.finished(finished, true);
                }
            }
            if !joined {
                // A handler blocking its thread cannot be cancelled: give its
                // message back anyway and stop waiting for it.
                tracing::error!(
                    stuck = self.pool.workers(),
                    "handlers did not yield to cancellation; releasing their messages"
                );
            }
            let cancelled = self.running.drain();
            Counters::bump(&self.counters.abandoned, cancelled.len() as u64);
            for key in &cancelled {
                if let Some(head) = self.lanes.get(key).and_then(|lane| lane.items.front()) {
                    self.settings
                        .observe
                        .outcome(head.delivery.topic(), Outcome::Cancelled, 1);
                }
            }
            for key in cancelled {
                self.release_lane(key, true);
            }
        }
        self.pool.abort_all();
        self.release_where(|_| true);
        // Wait for releases to reach the broker before closing.
        let settle_limit = later(deadline.max(Instant::now()), Duration::from_secs(1));
        while !self.side.is_empty() {
            tokio::select! {
                _ = self.side.join_next() => {}
                _ = tokio::time::sleep_until(settle_limit) => self.side.abort_all(),
            }
        }
        let hard_end = later(deadline, SHUTDOWN_GRACE);
        let close_limit = hard_end
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(2));
        let sub = std::mem::replace(&mut self.sub, Box::new(Closed));
        match tokio::time::timeout(close_limit, AssertUnwindSafe(sub.close()).catch_unwind()).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "closing the subscription failed"),
            Ok(Err(_)) => tracing::error!("closing the subscription panicked"),
            Err(_) => tracing::warn!(after = ?close_limit, "closing the subscription timed out"),
        }
    }
}

/// Counts the releases of a batch that never finished as settle failures.
struct Unsettled {
    left: AtomicU64,
    counters: Arc<Counters>,
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        Counters::bump(&self.counters.settle_failures, self.left.load(Ordering::Relaxed));
    }
}

/// How long after its deadline a shutdown may take, at most, to cancel, release
/// and close (plus the time a handler blocking its thread takes to notice).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Stands in for the subscription once it has been closed.
struct Closed;

#[async_trait::async_trait]
impl Subscription for Closed {
    async fn next(&mut self) -> Option<Result<Event>> {
        None
    }

    async fn close(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

/// Reports how an attempt ended (`retry`: a retry it asks for is allowed).
fn observe_done(observe: &crate::observe::Observer, delivery: &Delivery, done: &Done, retry: bool) {
    match done {
        Done::Retry(_) if retry => observe.outcome(delivery.topic(), Outcome::Retried, 1),
        Done::Retry(_) | Done::Fatal(_) | Done::Release => {
            observe.outcome(delivery.topic(), Outcome::Released, 1)
        }
        Done::Cancelled => observe.outcome(delivery.topic(), Outcome::Cancelled, 1),
        Done::Acked => observe.settled(delivery, Outcome::Ok),
        Done::AckFailed | Done::DeadLettered { ack_failed: true } => {
            observe.outcome(delivery.topic(), Outcome::SettleFailed, 1)
        }
        Done::DeadLettered { ack_failed: false } => observe.settled(delivery, Outcome::DeadLettered),
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
