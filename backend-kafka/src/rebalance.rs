//! The consumer's callbacks, run on the poll thread inside librdkafka's `poll`:
//! assignments (each partition gets a queue of its own before it is assigned)
//! and revocations, which tell the runner, wait (bounded by the revoke
//! timeout) until it has finished or given back what it holds of the revoked
//! partitions, commit, and only then let librdkafka hand them on.

use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use polybus_core::{Event, Partition, Result};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::oneshot;

use crate::subscription::{Command, Shared, State};

/// The consumer's callbacks, run on the poll thread.
pub(crate) struct Context {
    shared: Arc<Shared>,
    first_assignment: Mutex<Option<oneshot::Sender<Result<()>>>>,
    /// The consumer itself, to split partition queues off in the callback.
    consumer: OnceLock<Weak<BaseConsumer<Context>>>,
    revoke_timeout: Duration,
}

impl ClientContext for Context {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", facility = fac, "{log_message}")
            }
            L::Warning => tracing::warn!(target: "librdkafka", facility = fac, "{log_message}"),
            _ => tracing::debug!(target: "librdkafka", facility = fac, "{log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", error = %error, "{reason}");
    }
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<Partition> {
    tpl.elements()
        .iter()
        .map(|e| Partition {
            topic: e.topic().to_owned(),
            partition: e.partition(),
        })
        .collect()
}

impl Context {
    /// Callbacks for a subscription; `first` is told of the first assignment.
    pub(crate) fn new(
        shared: Arc<Shared>,
        first: oneshot::Sender<Result<()>>,
        revoke_timeout: Duration,
    ) -> Self {
        Context {
            shared,
            first_assignment: Mutex::new(Some(first)),
            consumer: OnceLock::new(),
            revoke_timeout,
        }
    }

    /// Lets the callbacks reach the consumer they belong to (set once, right
    /// after it is created).
    pub(crate) fn set_consumer(&self, consumer: &Arc<BaseConsumer<Context>>) {
        let _ = self.consumer.set(Arc::downgrade(consumer));
    }

    /// Tells the runner about an assignment and wakes `subscribe` on the first.
    pub(crate) fn assigned(&self, tpl: &TopicPartitionList) {
        let partitions = partitions_of(tpl);
        tracing::debug!(?partitions, "partitions assigned");
        self.shared.push_control(Ok(Event::Assigned(partitions)));
        self.first_assignment_done(Ok(()));
    }

    /// Ends `subscribe`'s wait for the first assignment (once).
    pub(crate) fn first_assignment_done(&self, result: Result<()>) {
        let first = self
            .first_assignment
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(first) = first {
            let _ = first.send(result);
        }
    }

    /// Gives each partition of `tpl` a queue of its own, woken into the poll
    /// loop when it gets data. Called before librdkafka starts fetching them.
    pub(crate) fn split(&self, tpl: &TopicPartitionList) {
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
            return;
        };
        let wake = self
            .shared
            .commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut queues = self.shared.queues();
        for e in tpl.elements() {
            let (topic, partition) = (e.topic(), e.partition());
            // An old handle goes first: dropping it switches the wake-up off.
            queues.retain(|(t, p, _)| !(t == topic && *p == partition));
            let Some(mut queue) = consumer.split_partition_queue(topic, partition) else {
                tracing::warn!(topic, partition, "no queue for an assigned partition");
                continue;
            };
            let wake = wake.clone();
            queue.set_nonempty_callback(move || {
                let _ = wake.send(Command::Wake);
            });
            queues.push((topic.to_owned(), partition, queue));
        }
    }

    /// Drops the queues of revoked partitions, emptied first (librdkafka would
    /// keep their outdated records until the client is destroyed).
    fn unsplit(&self, tpl: &TopicPartitionList) {
        let mut queues = self.shared.queues();
        queues.retain(|(topic, partition, queue)| {
            let revoked = tpl.find_partition(topic, *partition).is_some();
            if revoked {
                for _ in 0..100_000 {
                    if queue.poll(Duration::ZERO).is_none() {
                        break;
                    }
                }
            }
            !revoked
        });
    }

    /// Starts a new generation of the book for an assignment.
    pub(crate) fn assign(&self, tpl: &TopicPartitionList) {
        self.shared.lock().book.assign(tpl);
    }

    /// Waits for the runner to settle what it holds of the revoked partitions,
    /// commits them and forgets them.
    fn revoke(&self, consumer: &BaseConsumer<Context>, tpl: &TopicPartitionList) {
        let revoked = partitions_of(tpl);
        let mut state = self.shared.lock();
        if state.crashed {
            for p in &revoked {
                state.book.remove(&p.topic, p.partition);
            }
            return;
        }
        for p in &revoked {
            if let Some(part) = state.book.part(&p.topic, p.partition) {
                part.revoking = true;
            }
        }
        state.redeliver.retain(|r| {
            !revoked
                .iter()
                .any(|p| *p.topic == *r.topic && p.partition == r.partition)
        });
        let closing = state.closing;
        drop(state);
        if !closing {
            self.shared.push_control(Ok(Event::Revoked(revoked.clone())));
        }
        let held = |state: &mut State| -> usize {
            revoked
                .iter()
                .filter_map(|p| state.book.part(&p.topic, p.partition).map(|part| part.yielded()))
                .sum()
        };
        let until = Instant::now() + self.revoke_timeout;
        let mut state = self.shared.lock();
        while !state.closing && !state.crashed {
            let left = held(&mut state);
            let now = Instant::now();
            if left == 0 {
                break;
            }
            if now >= until {
                tracing::warn!(
                    held = left,
                    "revocation: the runner still holds messages of revoked partitions; \
                     the new owner will handle them again"
                );
                break;
            }
            state = self
                .shared
                .settled
                .wait_timeout(state, until - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let mut commit = TopicPartitionList::new();
        for p in &revoked {
            if let Some(position) = state
                .book
                .part(&p.topic, p.partition)
                .and_then(|part| part.position())
            {
                let _ = commit.add_partition_offset(&p.topic, p.partition, Offset::Offset(position));
            }
            state.book.remove(&p.topic, p.partition);
        }
        let crashed = state.crashed;
        drop(state);
        if crashed || commit.count() == 0 || consumer.assignment_lost() || self.shared.group.is_none() {
            return;
        }
        if let Err(e) = consumer.commit(&commit, CommitMode::Sync) {
            tracing::info!(
                error = %e,
                "commit on revocation refused; kept for the next assignment \
                 (a partition that moves to another member is handled again from its last commit)"
            );
            let mut state = self.shared.lock();
            for e in commit.elements() {
                if let Offset::Offset(position) = e.offset() {
                    state
                        .carried
                        .insert((e.topic().to_owned(), e.partition()), position);
                }
            }
        }
    }

    /// Starts partitions this member had when a revocation's commit was refused
    /// at the position it could not commit, and commits it now.
    fn apply_carried(&self, consumer: &BaseConsumer<Context>, tpl: &mut TopicPartitionList) {
        let carried = std::mem::take(&mut self.shared.lock().carried);
        if carried.is_empty() {
            return;
        }
        let mut commit = TopicPartitionList::new();
        for ((topic, partition), position) in carried {
            if tpl.find_partition(&topic, partition).is_some() {
                let offset = Offset::Offset(position);
                let _ = tpl.set_partition_offset(&topic, partition, offset);
                let _ = commit.add_partition_offset(&topic, partition, offset);
            }
        }
        if commit.count() > 0
            && let Err(e) = consumer.commit(&commit, CommitMode::Async)
        {
            tracing::warn!(error = %e, "committing carried positions failed");
        }
    }
}

impl ConsumerContext for Context {
    /// Replaces rdkafka's default rebalance handling (same steps, safe API) so
    /// that an assignment can start partitions at carried positions.
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.assign(tpl);
                self.apply_carried(consumer, tpl);
                self.split(tpl);
                let result = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                self.assigned(tpl);
                result
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.revoke(consumer, tpl);
                self.unsplit(tpl);
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                tracing::warn!(error = ?other, "Kafka rebalance failed; unassigning");
                self.revoke(consumer, tpl);
                self.unsplit(tpl);
                consumer.unassign()
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "applying a Kafka rebalance failed");
        }
    }

    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!(error = %e, "offset commit failed; it is sent again");
            let mut state = self.shared.lock();
            for e in offsets.elements() {
                if let Some(part) = state.book.part(e.topic(), e.partition()) {
                    part.sent = None;
                }
            }
        }
    }
}
