//! The workers that run attempts: a bounded set of long-lived tasks fed by the
//! dispatcher, instead of one spawned task per handled message.
//!
//! The dispatcher decides *what* runs (lanes, the concurrency bound, backoff);
//! the pool only runs it. Each job names a **slot** (the dispatcher's record of
//! what is running); its [`Done`] comes back with that slot.
//!
//! * **One job per worker at a time**, and at least as many workers as jobs
//!   outstanding (a worker is spawned when a job would otherwise wait), so a slow
//!   handler never delays another job. Workers never exceed the concurrency bound.
//! * **Panic isolation**: each attempt runs inside `catch_unwind`, and so does
//!   dropping what it held; a panic that escapes the attempt's own guard is still
//!   a failed attempt ([`panicked`]).
//! * **Handlers run on their own tasks**, never inside the dispatcher: a handler
//!   that blocks its thread blocks its worker, not the dispatcher, so shutdown
//!   still cancels at its deadline (it aborts the workers) and returns. Before
//!   running a next job straight after reporting one, a worker yields once, so a
//!   dispatcher its report woke (queued behind the worker on the same thread)
//!   runs first and cannot be stranded by a handler that then blocks the thread.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::FutureExt;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;

use super::worker::{self, Done, Settings};
use crate::backend::Acker;
use crate::error::Error;
use crate::message::Delivery;
use crate::middleware::Pipeline;

/// No slot: the worker is idle.
const IDLE: usize = usize::MAX;

/// One attempt of one delivery, for a worker.
pub(super) struct Job {
    pub(super) slot: usize,
    pub(super) delivery: Delivery,
    pub(super) acker: Acker,
}

/// What the pool tells the dispatcher.
pub(super) enum PoolEvent {
    /// An attempt ended.
    Finished(Finished),
    /// A worker task ended without being asked to (it never should: everything
    /// it runs is guarded), or was aborted; `slot` is what it was running.
    WorkerEnded { worker: u64, slot: Option<usize> },
}

/// What the dispatcher hears back: the slot and how its attempt ended.
pub(super) struct Finished {
    pub(super) slot: usize,
    pub(super) done: Done,
}

struct Queue {
    jobs: Mutex<VecDeque<Job>>,
    available: Notify,
    closed: AtomicBool,
}

impl Queue {
    fn jobs(&self) -> MutexGuard<'_, VecDeque<Job>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pop(&self) -> Option<Job> {
        self.jobs().pop_front()
    }

    /// The next job, waiting for one; `None` once the pool is closed.
    async fn next(&self) -> Option<Job> {
        loop {
            if let Some(job) = self.pop() {
                return Some(job);
            }
            let notified = self.available.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(job) = self.pop() {
                return Some(job);
            }
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            notified.await;
        }
    }
}

/// The workers of one runner.
pub(super) struct Pool {
    queue: Arc<Queue>,
    pipeline: Pipeline,
    settings: Arc<Settings>,
    limit: usize,
    workers: JoinSet<()>,
    /// The workers alive, by the pool's own id.
    alive: Vec<u64>,
    next_worker: u64,
    results_tx: mpsc::UnboundedSender<PoolEvent>,
    results: mpsc::UnboundedReceiver<PoolEvent>,
}

impl Pool {
    /// A pool of at most `limit` workers (started as jobs need them).
    pub(super) fn new(pipeline: Pipeline, settings: Arc<Settings>, limit: usize) -> Self {
        let (results_tx, results) = mpsc::unbounded_channel();
        Pool {
            queue: Arc::new(Queue {
                jobs: Mutex::new(VecDeque::new()),
                available: Notify::new(),
                closed: AtomicBool::new(false),
            }),
            pipeline,
            settings,
            limit: limit.max(1),
            workers: JoinSet::new(),
            alive: Vec::new(),
            next_worker: 0,
            results_tx,
            results,
        }
    }

    /// Hands `job` to a worker. `outstanding`: jobs submitted and not yet
    /// finished, this one included (at most the pool's limit).
    pub(super) fn submit(&mut self, job: Job, outstanding: usize) {
        self.queue.jobs().push_back(job);
        if self.alive.len() < outstanding.min(self.limit) {
            self.spawn_worker();
        } else {
            self.queue.available.notify_one();
        }
    }

    fn spawn_worker(&mut self) {
        self.next_worker += 1;
        let exit = Exit {
            worker: self.next_worker,
            slot: IDLE,
            results: self.results_tx.clone(),
            clean: false,
        };
        let work = work(
            Arc::clone(&self.queue),
            self.pipeline.clone(),
            Arc::clone(&self.settings),
            exit,
        );
        self.workers.spawn(work);
        self.alive.push(self.next_worker);
    }

    /// The next finished attempt, or a worker that ended. Cancel-safe.
    pub(super) async fn next(&mut self) -> PoolEvent {
        match self.results.recv().await {
            Some(event) => self.seen(event),
            // The pool keeps a sender itself.
            None => std::future::pending().await,
        }
    }

    /// An event that is already waiting, if any.
    pub(super) fn try_next(&mut self) -> Option<PoolEvent> {
        self.results.try_recv().ok().map(|event| self.seen(event))
    }

    fn seen(&mut self, event: PoolEvent) -> PoolEvent {
        if let PoolEvent::WorkerEnded { worker, .. } = &event {
            self.alive.retain(|alive| alive != worker);
        }
        event
    }

    /// Cancels every worker (shutdown deadline): running attempts are dropped.
    pub(super) fn abort_all(&mut self) {
        self.queue.closed.store(true, Ordering::Release);
        self.queue.available.notify_waiters();
        self.workers.abort_all();
    }

    /// Waits for the workers to end after [`abort_all`](Pool::abort_all);
    /// `false` if some did not by `until` (they block their threads: detached).
    pub(super) async fn join_aborted(&mut self, until: tokio::time::Instant) -> bool {
        loop {
            tokio::select! {
                joined = self.workers.join_next() => if joined.is_none() { return true },
                _ = tokio::time::sleep_until(until) => {
                    self.workers.detach_all();
                    return false;
                }
            }
        }
    }

    /// How many worker tasks have not ended (for the log of a stuck shutdown).
    pub(super) fn workers(&self) -> usize {
        self.workers.len()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.queue.closed.store(true, Ordering::Release);
        self.queue.available.notify_waiters();
    }
}

/// Tells the dispatcher when a worker ends other than by the pool closing
/// (aborted at the shutdown deadline, or a panic that escaped every guard), and
/// which slot it was running.
struct Exit {
    worker: u64,
    slot: usize,
    results: mpsc::UnboundedSender<PoolEvent>,
    clean: bool,
}

impl Drop for Exit {
    fn drop(&mut self) {
        if !self.clean {
            let slot = (self.slot != IDLE).then_some(self.slot);
            let _ = self.results.send(PoolEvent::WorkerEnded {
                worker: self.worker,
                slot,
            });
        }
    }
}

/// One worker: takes jobs until the pool closes or it is aborted.
async fn work(queue: Arc<Queue>, pipeline: Pipeline, settings: Arc<Settings>, mut exit: Exit) {
    let mut reported = false;
    loop {
        let job = match queue.pop() {
            Some(job) => {
                if reported {
                    // Let the dispatcher our last report woke run first (see the
                    // module docs), then take the job.
                    tokio::task::yield_now().await;
                }
                job
            }
            None => match queue.next().await {
                Some(job) => job,
                None => break,
            },
        };
        let slot = job.slot;
        exit.slot = slot;
        let done = run_job(&pipeline, &settings, job).await;
        exit.slot = IDLE;
        reported = exit
            .results
            .send(PoolEvent::Finished(Finished { slot, done }))
            .is_ok();
        if !reported {
            break;
        }
    }
    exit.clean = true;
}

/// Runs one attempt; a panic that escapes it (or dropping what it held) is a
/// failed attempt, never the end of the worker.
async fn run_job(pipeline: &Pipeline, settings: &Settings, job: Job) -> Done {
    let Job { delivery, acker, .. } = job;
    let attempt = AssertUnwindSafe(worker::attempt(pipeline, settings, &delivery, &acker))
        .catch_unwind()
        .await;
    let done = match attempt {
        Ok(done) => done,
        Err(_) => panicked(settings, &delivery, &acker),
    };
    let dropped = std::panic::catch_unwind(AssertUnwindSafe(move || drop((delivery, acker))));
    if dropped.is_err() {
        tracing::error!("dropping a delivery panicked");
    }
    done
}

/// An attempt that panicked outside the attempt's own guard. If its delivery
/// was settled, it is done; otherwise the attempt failed: retry within the
/// attempt limit, or stop (its message is released) since the dead-letter path
/// itself cannot be trusted.
pub(super) fn panicked(settings: &Settings, delivery: &Delivery, acker: &Acker) -> Done {
    if acker.is_settled() {
        return Done::AckFailed;
    }
    let attempt = delivery.attempt();
    if attempt < settings.retry.max_attempts {
        Done::Retry(settings.retry.delay_after(attempt))
    } else {
        Done::Fatal(Error::Backend {
            backend: "polybus",
            message: "a worker panicked outside its guard on the last attempt".into(),
            retryable: false,
            source: None,
        })
    }
}
