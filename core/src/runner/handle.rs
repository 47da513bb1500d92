//! The handle to a running runner: shutdown, waiting, state, and the report of
//! how it ended.

use std::future::Future;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::time::later;

/// How a runner ended.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Ended {
    /// [`RunHandle::shutdown`] stopped it.
    Shutdown,
    /// The subscription ended by itself (its consumer was closed) and every held
    /// delivery was settled.
    SubscriptionEnded,
    /// An error that no retry can fix stopped it: the subscription failed (access
    /// revoked, the group deleted, a terminal broker status), or a dead letter
    /// was refused by the environment (producer closed, invalid dead-letter
    /// topic). Held deliveries were released.
    Failed(Arc<Error>),
    /// [`RunHandle::abort`] ended it without settling anything.
    Aborted,
    /// A catch-up run in [`CatchUp::Stop`] mode handled and settled every
    /// message that existed when it began, then shut down gracefully (as
    /// `shutdown` does, with the settle timeout as its deadline).
    CaughtUp,
}

/// What a catch-up run does once it has caught up ([`Runner::catch_up`](super::Runner::catch_up)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CatchUp {
    /// Shut down gracefully once caught up: the run ends with [`Ended::CaughtUp`]
    /// (a rebuild that stops before the service starts serving).
    Stop,
    /// Report it and keep following the log (a projection that goes on
    /// applying new events after the rebuild).
    Follow,
}

/// Why [`RunHandle::caught_up`] will never report "caught up".
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum NotCaughtUp {
    /// The runner was not started in catch-up mode ([`Runner::catch_up`](super::Runner::catch_up)).
    NotRequested,
    /// The runner ended before it caught up; how it ended (see
    /// [`ShutdownReport::ended`] and [`RunHandle::error`]).
    Ended(Ended),
    /// The backend could not tell whether the group caught up (a
    /// non-retryable error of its [`CatchUpProbe`](crate::CatchUpProbe)). The runner goes on.
    Probe(Arc<Error>),
}

impl std::fmt::Display for NotCaughtUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotCaughtUp::NotRequested => f.write_str("the runner was not started in catch-up mode"),
            NotCaughtUp::Ended(Ended::Failed(e)) => write!(f, "the runner failed before it caught up: {e}"),
            NotCaughtUp::Ended(ended) => write!(f, "the runner ended before it caught up ({ended:?})"),
            NotCaughtUp::Probe(e) => write!(f, "cannot tell whether the runner caught up: {e}"),
        }
    }
}

impl std::error::Error for NotCaughtUp {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            NotCaughtUp::Ended(Ended::Failed(e)) | NotCaughtUp::Probe(e) => Some(&**e),
            _ => None,
        }
    }
}

/// Where a catch-up run is: waiting, caught up, or never going to be.
pub(super) type CatchUpState = Option<std::result::Result<(), NotCaughtUp>>;

/// Two `Failed` values are equal when they share the same error (every caller of
/// one runner gets the same `Arc`).
impl PartialEq for Ended {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Ended::Failed(a), Ended::Failed(b)) => Arc::ptr_eq(a, b),
            _ => std::mem::discriminant(self) == std::mem::discriminant(other),
        }
    }
}

/// Where a runner is in its life; cheap to read (for readiness and liveness
/// probes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RunState {
    /// Taking and handling deliveries.
    Running,
    /// Stopped taking deliveries; finishing, settling and releasing what it holds
    /// (after `shutdown`, or after a fatal error — see [`RunHandle::error`]).
    Draining,
    /// Ended by `shutdown`, by its subscription ending, or by `abort`.
    Stopped,
    /// Ended by an error ([`RunHandle::error`] tells which).
    Failed,
}

const RUNNING: u8 = 0;
const DRAINING: u8 = 1;
const STOPPED: u8 = 2;
const FAILED: u8 = 3;

/// What a runner did over its whole life, and how it ended.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Deliveries handled successfully and acked.
    pub handled: u64,
    /// Deliveries published to the dead-letter topic and acked (one whose ack
    /// then failed counts in `settle_failures` instead).
    pub dead_lettered: u64,
    /// Attempts that failed and were retried in process.
    pub retried: u64,
    /// Deliveries given back to the broker unhandled (on shutdown, revocation,
    /// an overloaded handler, or a dead letter the environment refused). An
    /// overloaded message the runner holds for its backoff (a broker without
    /// delayed redelivery) counts when it is given back.
    pub released: u64,
    /// Handlers cancelled at the shutdown deadline (their messages were released).
    pub abandoned: u64,
    /// Acks and releases that did not take effect or timed out (the broker
    /// redelivers those messages). A handled or dead-lettered message whose ack
    /// failed counts here, not in `handled` or `dead_lettered`; a release that
    /// failed, timed out or was cut off at the end of shutdown counts here too.
    pub settle_failures: u64,
    /// Dead-letter publishes that failed (each retry counts).
    pub dead_letter_failures: u64,
    /// The runner was aborted (crashed) rather than shut down: nothing was settled
    /// after that point.
    pub aborted: bool,
    /// How the runner ended; `None` while it runs (in [`RunHandle::stats`]).
    pub ended: Option<Ended>,
}

impl ShutdownReport {
    /// The error that stopped the runner, if one did.
    pub fn error(&self) -> Option<&Error> {
        match &self.ended {
            Some(Ended::Failed(e)) => Some(e),
            _ => None,
        }
    }

    /// Whether the runner was shut down (by `shutdown`, or after catching up in
    /// [`CatchUp::Stop`] mode) and every settlement took effect.
    pub fn is_clean(&self) -> bool {
        matches!(self.ended, Some(Ended::Shutdown | Ended::CaughtUp)) && self.settle_failures == 0
    }
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) handled: AtomicU64,
    pub(super) dead_lettered: AtomicU64,
    pub(super) retried: AtomicU64,
    pub(super) released: AtomicU64,
    pub(super) abandoned: AtomicU64,
    pub(super) settle_failures: AtomicU64,
    pub(super) dead_letter_failures: AtomicU64,
}

impl Counters {
    pub(super) fn bump(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }

    pub(super) fn report(&self, ended: Option<Ended>) -> ShutdownReport {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ShutdownReport {
            handled: load(&self.handled),
            dead_lettered: load(&self.dead_lettered),
            retried: load(&self.retried),
            released: load(&self.released),
            abandoned: load(&self.abandoned),
            settle_failures: load(&self.settle_failures),
            dead_letter_failures: load(&self.dead_letter_failures),
            aborted: matches!(ended, Some(Ended::Aborted)),
            ended,
        }
    }
}

/// What the runner task and its handles share.
pub(super) struct Shared {
    pub(super) stop: CancellationToken,
    pub(super) deadline: Mutex<Option<Instant>>,
    pub(super) report: watch::Receiver<Option<ShutdownReport>>,
    pub(super) task: Mutex<Option<JoinHandle<()>>>,
    pub(super) counters: Arc<Counters>,
    state: AtomicU8,
    error: OnceLock<Arc<Error>>,
    /// `None` until a catch-up run caught up or cannot any more; `Some(Err(NotRequested))`
    /// from the start for other runs.
    pub(super) catch_up: watch::Sender<CatchUpState>,
    /// Woken after each settlement, for the catch-up watcher.
    pub(super) settled: tokio::sync::Notify,
    /// The stop was asked by a catch-up run in [`CatchUp::Stop`] mode.
    pub(super) stopped_caught_up: std::sync::atomic::AtomicBool,
    /// The deadline was set by a catch-up run in [`CatchUp::Stop`] mode, not
    /// by a `shutdown` call: the first `shutdown` may bring it forward.
    pub(super) deadline_by_catch_up: std::sync::atomic::AtomicBool,
    /// Woken when `shutdown` brings the deadline forward during a drain.
    pub(super) deadline_moved: tokio::sync::Notify,
}

impl Shared {
    pub(super) fn new(report: watch::Receiver<Option<ShutdownReport>>, counters: Arc<Counters>) -> Self {
        Shared {
            stop: CancellationToken::new(),
            deadline: Mutex::new(None),
            report,
            task: Mutex::new(None),
            counters,
            state: AtomicU8::new(RUNNING),
            error: OnceLock::new(),
            catch_up: watch::Sender::new(None),
            settled: tokio::sync::Notify::new(),
            stopped_caught_up: std::sync::atomic::AtomicBool::new(false),
            deadline_by_catch_up: std::sync::atomic::AtomicBool::new(false),
            deadline_moved: tokio::sync::Notify::new(),
        }
    }

    /// Settles the catch-up state once; returns whether this call did.
    pub(super) fn set_catch_up(&self, state: std::result::Result<(), NotCaughtUp>) -> bool {
        self.catch_up.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(state);
                true
            } else {
                false
            }
        })
    }

    /// The first fatal error (later ones are logged by the caller).
    pub(super) fn fail(&self, error: Error) -> Arc<Error> {
        let error = Arc::new(error);
        let _ = self.error.set(Arc::clone(&error));
        Arc::clone(self.error.get().unwrap_or(&error))
    }

    pub(super) fn fatal(&self) -> Option<Arc<Error>> {
        self.error.get().cloned()
    }

    pub(super) fn draining(&self) {
        let _ = self
            .state
            .compare_exchange(RUNNING, DRAINING, Ordering::AcqRel, Ordering::Acquire);
    }

    pub(super) fn ended(&self, ended: &Ended) {
        let state = if matches!(ended, Ended::Failed(_)) {
            FAILED
        } else {
            STOPPED
        };
        self.state.store(state, Ordering::Release);
    }

    /// The shutdown deadline, if `shutdown` was called.
    pub(super) fn deadline(&self) -> Option<Instant> {
        *self.deadline.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Controls a running consumer loop. Cheap to clone; every clone controls the same
/// runner, and dropping them all does not stop it.
///
/// A runner ends by [`shutdown`](RunHandle::shutdown), by its subscription
/// ending, or by an error no retry can fix; [`wait`](RunHandle::wait) and
/// `shutdown` return a [`ShutdownReport`] saying which (see
/// [`ShutdownReport::error`]), and [`state`](RunHandle::state) tells at any time.
#[derive(Clone)]
pub struct RunHandle {
    pub(super) shared: Arc<Shared>,
}

impl std::fmt::Debug for RunHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunHandle")
            .field("state", &self.state())
            .field("stats", &self.stats())
            .finish()
    }
}

impl RunHandle {
    /// Stops gracefully and returns what the runner did and how it ended.
    ///
    /// Stops taking deliveries (and asks the broker to stop sending them), releases
    /// held deliveries that have not started (positional-ack backends drain them
    /// instead, within the deadline), lets running handlers finish and settles
    /// them, cancels those still running at `timeout` and releases their messages,
    /// then closes the subscription. After it returns no handler runs. Safe to
    /// call many times and from many tasks at once: the first call's deadline
    /// counts, every call gets the same report. If the runner had already ended by
    /// itself (an error), the report says so.
    ///
    /// Do not call it from inside a handler of the same runner: it waits for that
    /// handler, so it would wait out the whole deadline and then cancel it.
    pub async fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        {
            let mut deadline = self.shared.deadline.lock().unwrap_or_else(|p| p.into_inner());
            let asked = later(Instant::now(), timeout);
            match *deadline {
                None => *deadline = Some(asked),
                // A catch-up run stopping by itself drains with the settle
                // timeout; the first shutdown call's own deadline still counts.
                Some(set) if self.shared.deadline_by_catch_up.swap(false, Ordering::AcqRel) => {
                    *deadline = Some(set.min(asked));
                    self.shared.deadline_moved.notify_one();
                }
                Some(_) => {}
            }
        }
        self.shared.stop.cancel();
        self.wait().await
    }

    /// Waits until the runner has ended (after a shutdown, because the
    /// subscription ended, or because of an error) and returns its report.
    pub async fn wait(&self) -> ShutdownReport {
        let mut rx = self.shared.report.clone();
        let ended = match rx.wait_for(Option::is_some).await {
            Ok(report) => report.clone(),
            Err(_) => None,
        };
        ended.unwrap_or_else(|| self.shared.counters.report(Some(Ended::Aborted)))
    }

    /// Runs until `signal` completes (for example `tokio::signal::ctrl_c()`), then
    /// shuts down with `timeout`. Returns early if the runner ends by itself
    /// (check [`ShutdownReport::error`]).
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
        // A runner that had already ended keeps how it ended (a `Failed` runner
        // stays failed for its probes).
        if self.shared.report.borrow().is_none() {
            self.shared.ended(&Ended::Aborted);
        }
        self.shared.set_catch_up(Err(NotCaughtUp::Ended(Ended::Aborted)));
    }

    /// What the runner has done so far (`ended` is `None` while it runs).
    pub fn stats(&self) -> ShutdownReport {
        match self.shared.report.borrow().as_ref() {
            Some(report) => report.clone(),
            None => self.shared.counters.report(None),
        }
    }

    /// Where the runner is: running, draining, stopped or failed. Cheap; meant for
    /// health probes (ready while `Running`; a `Failed` runner will not recover).
    pub fn state(&self) -> RunState {
        match self.shared.state.load(Ordering::Acquire) {
            RUNNING => RunState::Running,
            DRAINING => RunState::Draining,
            STOPPED => RunState::Stopped,
            _ => RunState::Failed,
        }
    }

    /// The error that stopped (or is stopping) the runner, as soon as it is known.
    pub fn error(&self) -> Option<Arc<Error>> {
        self.shared.fatal()
    }

    /// Resolves once a catch-up run ([`Runner::catch_up`](super::Runner::catch_up))
    /// has handled and settled every message that existed in its log when
    /// [`Runner::run`](super::Runner::run) began; messages published after that
    /// are not waited for. Reported exactly once per run: every call, before or
    /// after, gets the same answer. Fails with [`NotCaughtUp`] when the runner
    /// was not started in catch-up mode, ended before catching up, or the
    /// backend could not tell.
    pub async fn caught_up(&self) -> std::result::Result<(), NotCaughtUp> {
        let mut rx = self.shared.catch_up.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(state) => state.clone().unwrap_or(Err(NotCaughtUp::NotRequested)),
            Err(_) => Err(NotCaughtUp::Ended(Ended::Aborted)),
        }
    }

    /// Whether a catch-up run has caught up (without waiting).
    pub fn is_caught_up(&self) -> bool {
        matches!(*self.shared.catch_up.borrow(), Some(Ok(())))
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
