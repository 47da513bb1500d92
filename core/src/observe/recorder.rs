//! The `metrics` side of the hooks: handles registered once per runner and per
//! topic, so the per-message cost is a few atomic operations (or nothing but a
//! branch when no recorder is installed).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Label, Unit};

use super::{
    ATTEMPTS, BACKOFF, CONSUMED_MESSAGES, DEAD_LETTER_FAILURES, DESTINATION, ERROR_TYPE, GROUP, HELD, LAG,
    LAG_FAILURES, METRICS, MetricKind, OPERATION, OPERATION_DURATION, OPERATION_TYPE, OUTCOME, OUTCOMES,
    Outcome, PROCESS_DURATION, RUNNING, SENT_MESSAGES, SHUTDOWN_DURATION, SYSTEM, error_type,
};
use crate::error::Error;
use crate::message::Delivery;

pub(super) fn describe_all() {
    for m in METRICS {
        let unit = if m.unit == "s" { Unit::Seconds } else { Unit::Count };
        match m.kind {
            MetricKind::Counter => metrics::describe_counter!(m.name, unit, m.description),
            MetricKind::Gauge => metrics::describe_gauge!(m.name, unit, m.description),
            MetricKind::Histogram => metrics::describe_histogram!(m.name, unit, m.description),
        }
    }
}

/// Whether a recorder is installed (for this thread or globally), as
/// polybus decides it: the current recorder is not zero-sized. The facade
/// uses `metrics::NoopRecorder` (a unit struct) when none is installed, and
/// gives no way to ask whether it is the one in use; every exporter's
/// recorder holds state. Asked when a runner starts and on a thread's first
/// send to a topic: without a recorder the hooks take no clock readings and
/// touch no handles.
///
/// The rule this makes (README, "Observability"): a zero-sized recorder (a
/// unit struct that forwards to statics) is taken for none, and polybus
/// emits nothing to it. (Comparing vtables with `NoopRecorder`'s does not
/// work: the facade's is another copy of it, as a debug build showed.)
pub(super) fn installed() -> bool {
    metrics::with_recorder(|recorder| std::mem::size_of_val(recorder) != 0)
}

/// The handles of successful sends to one topic.
#[derive(Clone)]
struct SendHandles {
    sent: Counter,
    duration: Histogram,
    /// A recorder was installed when they were registered: the send is
    /// timed and counted (else the handles are no-ops and it is neither).
    live: bool,
}

/// Send handles per backend, then per topic, with the last one used in front
/// (a thread usually sends to one topic at a time: a hit is two string
/// comparisons, no hashing).
#[derive(Default)]
struct SendCache {
    last: Option<(&'static str, String, SendHandles)>,
    all: HashMap<&'static str, HashMap<String, SendHandles>>,
}

thread_local! {
    /// Send handles, registered on a thread's first send to a topic (so, like
    /// a runner's, they belong to the recorder installed then). Per thread: a
    /// hit costs a comparison or a hash lookup and no shared atomics.
    static SEND_HANDLES: RefCell<SendCache> = RefCell::new(SendCache::default());
}

fn with_send_handles<R>(system: &'static str, topic: &str, f: impl FnOnce(&SendHandles) -> R) -> R {
    SEND_HANDLES.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some((s, t, handles)) = &cache.last
            && *s == system
            && t == topic
        {
            return f(handles);
        }
        let topics = cache.all.entry(system).or_default();
        let handles = match topics.get(topic) {
            Some(found) => found.clone(),
            None => {
                let labels = send_labels(system, topic, None);
                let mut with_type = labels.clone();
                with_type.push(Label::from_static_parts(OPERATION_TYPE, "send"));
                let made = SendHandles {
                    live: installed(),
                    sent: metrics::counter!(SENT_MESSAGES, labels),
                    duration: metrics::histogram!(OPERATION_DURATION, with_type),
                };
                topics.insert(topic.to_owned(), made.clone());
                made
            }
        };
        let result = f(&handles);
        cache.last = Some((system, topic.to_owned(), handles));
        result
    })
}

/// When a send to `topic` starts: `None` when this thread registered its
/// handles for `topic` without a recorder (then it is neither timed nor
/// counted, failures included, like a send through no-op handles).
pub(super) fn send_started(system: &'static str, topic: &str) -> Option<std::time::Instant> {
    with_send_handles(system, topic, |handles| handles.live).then(std::time::Instant::now)
}

fn send_labels(system: &'static str, topic: &str, error: Option<&'static str>) -> Vec<Label> {
    let mut labels = vec![
        Label::from_static_parts(SYSTEM, system),
        Label::new(DESTINATION, topic.to_owned()),
        Label::from_static_parts(OPERATION, "send"),
    ];
    if let Some(error) = error {
        labels.push(Label::from_static_parts(ERROR_TYPE, error));
    }
    labels
}

/// Records one `send` (or one message of `send_batch`): the sent-messages counter
/// and the operation duration, with `error.type` when it failed.
pub(super) fn send_metrics(system: &'static str, topic: &str, took: Duration, result: &Result<(), Error>) {
    match result {
        Ok(()) => with_send_handles(system, topic, |handles| {
            handles.sent.increment(1);
            handles.duration.record(took.as_secs_f64());
        }),
        Err(e) => {
            let mut labels = send_labels(system, topic, Some(error_type(e)));
            metrics::counter!(SENT_MESSAGES, labels.iter()).increment(1);
            labels.push(Label::from_static_parts(OPERATION_TYPE, "send"));
            metrics::histogram!(OPERATION_DURATION, labels).record(took.as_secs_f64());
        }
    }
}

/// One topic's handles in one runner.
pub(super) struct TopicMetrics {
    topic: String,
    pub(super) consumed: Counter,
    process_ok: Histogram,
    pub(super) outcomes: [Counter; Outcome::ALL.len()],
    attempts_ok: Histogram,
    attempts_dead_lettered: Histogram,
    /// Registered on the first lag read: a gauge registered at once would
    /// show a backlog of 0 for a group whose lag was never read (a backend
    /// that cannot tell, a broker that keeps failing).
    lag: OnceLock<Gauge>,
    lag_labels: Vec<Label>,
}

impl TopicMetrics {
    pub(super) fn set_lag(&self, lag: u64) {
        self.lag
            .get_or_init(|| metrics::gauge!(LAG, self.lag_labels.iter()))
            .set(lag as f64);
    }
}

/// One runner's handles.
pub(super) struct RunnerMetrics {
    system: &'static str,
    group: Option<String>,
    first: OnceLock<TopicMetrics>,
    topics: RwLock<HashMap<String, TopicMetrics>>,
    pub(super) held: Gauge,
    pub(super) running: Gauge,
    pub(super) backoff: Gauge,
    pub(super) shutdown: Histogram,
    /// Successful ack / release / keep-alive / dead-letter publish durations.
    settle_ok: [Histogram; SETTLE_OPERATIONS.len()],
}

/// The runner's settlement calls: its name in polybus, then `messaging.operation.name`
/// and `messaging.operation.type`.
const SETTLE_OPERATIONS: [(&str, &str, &str); 4] = [
    ("ack", "ack", "settle"),
    ("release", "release", "settle"),
    ("keep-alive", "keep_alive", "settle"),
    ("dead-letter publish", "dead_letter", "send"),
];

impl RunnerMetrics {
    pub(super) fn new(system: &'static str, group: Option<&str>) -> Self {
        let group = group.map(str::to_owned);
        let base = base_labels(system, group.as_deref(), None);
        let settle_ok = SETTLE_OPERATIONS.map(|(_, name, kind)| {
            let mut labels = base.clone();
            labels.push(Label::from_static_parts(OPERATION, name));
            labels.push(Label::from_static_parts(OPERATION_TYPE, kind));
            metrics::histogram!(OPERATION_DURATION, labels)
        });
        RunnerMetrics {
            system,
            held: metrics::gauge!(HELD, base.iter()),
            running: metrics::gauge!(RUNNING, base.iter()),
            backoff: metrics::gauge!(BACKOFF, base.iter()),
            shutdown: metrics::histogram!(SHUTDOWN_DURATION, base.iter()),
            settle_ok,
            group,
            first: OnceLock::new(),
            topics: RwLock::new(HashMap::new()),
        }
    }

    /// Calls `f` with the handles of `topic` (registered the first time it is
    /// seen). The runner's first topic is kept inline: no lock, no reference
    /// count on the per-message path.
    pub(super) fn with_topic<R>(&self, topic: &str, f: impl FnOnce(&TopicMetrics) -> R) -> R {
        let first = match self.first.get() {
            Some(first) => first,
            None => self.first.get_or_init(|| self.register(topic)),
        };
        if first.topic == topic {
            return f(first);
        }
        if let Some(found) = self.topics.read().unwrap_or_else(|p| p.into_inner()).get(topic) {
            return f(found);
        }
        let made = self.register(topic);
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        f(topics.entry(topic.to_owned()).or_insert(made))
    }

    fn register(&self, topic: &str) -> TopicMetrics {
        let base = base_labels(self.system, self.group.as_deref(), Some(topic));
        let with = |key: &'static str, value: &'static str| {
            let mut labels = base.clone();
            labels.push(Label::from_static_parts(key, value));
            labels
        };
        TopicMetrics {
            topic: topic.to_owned(),
            consumed: metrics::counter!(CONSUMED_MESSAGES, with(OPERATION, "receive")),
            process_ok: metrics::histogram!(PROCESS_DURATION, with(OPERATION, "process")),
            outcomes: Outcome::ALL.map(|o| metrics::counter!(OUTCOMES, with(OUTCOME, o.as_str()))),
            attempts_ok: metrics::histogram!(ATTEMPTS, with(OUTCOME, Outcome::Ok.as_str())),
            attempts_dead_lettered: metrics::histogram!(
                ATTEMPTS,
                with(OUTCOME, Outcome::DeadLettered.as_str())
            ),
            lag: OnceLock::new(),
            lag_labels: base,
        }
    }

    pub(super) fn processed(&self, delivery: &Delivery, took: Duration, error: Option<&'static str>) {
        let secs = took.as_secs_f64();
        match error {
            None => self.with_topic(delivery.topic(), |t| t.process_ok.record(secs)),
            Some(kind) => {
                let mut labels = base_labels(self.system, self.group.as_deref(), Some(delivery.topic()));
                labels.push(Label::from_static_parts(OPERATION, "process"));
                labels.push(Label::from_static_parts(ERROR_TYPE, kind));
                metrics::histogram!(PROCESS_DURATION, labels).record(secs);
            }
        }
    }

    pub(super) fn settled(&self, delivery: &Delivery, outcome: Outcome) {
        self.with_topic(delivery.topic(), |topic| {
            topic.outcomes[outcome as usize].increment(1);
            let attempts = match outcome {
                Outcome::Ok => &topic.attempts_ok,
                Outcome::DeadLettered => &topic.attempts_dead_lettered,
                _ => return,
            };
            attempts.record(f64::from(delivery.attempt()));
        });
    }

    pub(super) fn settle_call(&self, operation: &'static str, took: Duration, result: &Result<(), Error>) {
        let Some(index) = SETTLE_OPERATIONS.iter().position(|(op, _, _)| *op == operation) else {
            return;
        };
        let secs = took.as_secs_f64();
        match result {
            Ok(()) => self.settle_ok[index].record(secs),
            Err(e) => {
                let (_, name, kind) = SETTLE_OPERATIONS[index];
                let mut labels = base_labels(self.system, self.group.as_deref(), None);
                labels.push(Label::from_static_parts(OPERATION, name));
                labels.push(Label::from_static_parts(OPERATION_TYPE, kind));
                labels.push(Label::from_static_parts(ERROR_TYPE, error_type(e)));
                metrics::histogram!(OPERATION_DURATION, labels).record(secs);
            }
        }
    }

    pub(super) fn lag_failed(&self, topic: &str, error: &'static str) {
        let mut labels = base_labels(self.system, self.group.as_deref(), Some(topic));
        labels.push(Label::from_static_parts(ERROR_TYPE, error));
        metrics::counter!(LAG_FAILURES, labels).increment(1);
    }

    pub(super) fn dead_letter_failed(&self, topic: &str, error: &Error) {
        let mut labels = base_labels(self.system, self.group.as_deref(), Some(topic));
        labels.push(Label::from_static_parts(ERROR_TYPE, error_type(error)));
        metrics::counter!(DEAD_LETTER_FAILURES, labels).increment(1);
    }
}

fn base_labels(system: &'static str, group: Option<&str>, topic: Option<&str>) -> Vec<Label> {
    let mut labels = vec![Label::from_static_parts(SYSTEM, system)];
    if let Some(topic) = topic {
        labels.push(Label::new(DESTINATION, topic.to_owned()));
    }
    if let Some(group) = group {
        labels.push(Label::new(GROUP, group.to_owned()));
    }
    labels
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

    use super::installed;

    static FORWARDED: AtomicU64 = AtomicU64::new(0);

    /// A zero-sized recorder that records (into a static): taken for none.
    struct Forwarding;

    struct ToStatic;

    impl metrics::CounterFn for ToStatic {
        fn increment(&self, value: u64) {
            FORWARDED.fetch_add(value, Ordering::Relaxed);
        }
        fn absolute(&self, value: u64) {
            FORWARDED.store(value, Ordering::Relaxed);
        }
    }

    impl Recorder for Forwarding {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
            Counter::from_arc(Arc::new(ToStatic))
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    #[test]
    fn a_recorder_is_installed_when_it_is_not_zero_sized() {
        // No recorder in this test binary: the facade's NoopRecorder.
        assert!(!installed());
        metrics::with_local_recorder(&metrics::NoopRecorder, || assert!(!installed()));
        let sized = sized_recorder();
        metrics::with_local_recorder(&sized, || assert!(installed()));
        // The documented limit: a zero-sized recorder that records is taken
        // for none (it still receives what others record through it).
        metrics::with_local_recorder(&Forwarding, || {
            assert!(!installed());
            metrics::counter!("x").increment(3);
        });
        assert_eq!(FORWARDED.load(Ordering::Relaxed), 3);
    }

    /// A recorder with state (not zero-sized).
    fn sized_recorder() -> impl Recorder {
        struct Sized(#[allow(dead_code)] u64);
        impl Recorder for Sized {
            fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
            fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
            fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
            fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
                Counter::noop()
            }
            fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
                Gauge::noop()
            }
            fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
                Histogram::noop()
            }
        }
        Sized(0)
    }
}
