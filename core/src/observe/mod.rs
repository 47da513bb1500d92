//! Observability: the metrics polybus emits, and the hooks that emit them.
//!
//! With the `metrics` feature, the runner and [`Producer::send`](crate::Producer::send)
//! report through the [`metrics`](https://docs.rs/metrics) facade, so any exporter
//! the application installs (Prometheus, OpenTelemetry, StatsD, …) receives them.
//! Names and attributes follow the OpenTelemetry semantic conventions for
//! messaging where they exist (`messaging.*`); polybus's own start with
//! `polybus.`. Every duration is in seconds. No attribute carries an unbounded
//! value: topics, groups, backend names, operation names, outcomes and error
//! kinds only — never keys, ids or payload data.
//!
//! [`METRICS`] lists every metric with its type, unit and attributes; the README's
//! metric table is checked against it. Without the `metrics` feature the hooks
//! compile to nothing.
//!
//! Install the recorder **before** starting runners: a runner registers its
//! metric handles when it starts (and when it first sees a topic), so a recorder
//! installed later does not see that runner's metrics. The same holds for the
//! OpenTelemetry tracer provider (feature `opentelemetry`): a runner takes its
//! tracer when it starts (see the `trace` module).
//!
//! A runner started with no recorder installed has no metric hooks at all (no
//! handles, no clock readings) for its whole life; a thread's sends to a topic
//! are decided the same way on its first send there. polybus takes a
//! zero-sized recorder (a unit struct, like the facade's own `NoopRecorder`)
//! for none: the `metrics` facade cannot say whether a recorder is installed,
//! and every exporter's recorder holds state.

use std::time::Duration;

use crate::error::Error;

#[cfg(feature = "metrics")]
pub(crate) mod lag;
#[cfg(feature = "metrics")]
mod recorder;

#[cfg(feature = "opentelemetry")]
#[cfg_attr(docsrs, doc(cfg(feature = "opentelemetry")))]
pub mod trace;

/// Sends one validated message through `publish`, with the send's metrics and
/// its PRODUCER span (by feature); just `publish(message)` without them.
#[inline(always)]
pub(crate) async fn send<F, Fut>(
    system: &'static str,
    topic: &str,
    message: crate::message::Message,
    publish: F,
) -> crate::error::Result<()>
where
    F: FnOnce(crate::message::Message) -> Fut,
    Fut: std::future::Future<Output = crate::error::Result<()>>,
{
    #[cfg(feature = "metrics")]
    let started = recorder::send_started(system, topic);
    // Outside a trace the send is `publish(message)` and nothing else (its
    // future no larger); inside one the publish runs in the span's context.
    #[cfg(feature = "opentelemetry")]
    let result = {
        let mut message = message;
        match trace::start_send(system, topic, &mut message) {
            Some(active) => trace::in_span(active, publish(message)).await,
            None => publish(message).await,
        }
    };
    #[cfg(not(feature = "opentelemetry"))]
    let result = publish(message).await;
    #[cfg(feature = "metrics")]
    if let Some(started) = started {
        recorder::send_metrics(system, topic, started.elapsed(), &result);
    }
    #[cfg(not(any(feature = "metrics", feature = "opentelemetry")))]
    let _ = (system, topic);
    result
}

/// What kind of instrument a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetricKind {
    /// Only goes up.
    Counter,
    /// A value that is set (goes up and down).
    Gauge,
    /// A distribution of recorded values.
    Histogram,
}

impl MetricKind {
    /// `"counter"`, `"gauge"` or `"histogram"`.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

/// One metric polybus emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetricDescriptor {
    /// The metric's name (exporters may rewrite dots, e.g. Prometheus uses `_`).
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// UCUM unit: `s` for seconds, `{message}` etc. for counts.
    pub unit: &'static str,
    /// Every attribute (label) it may carry. Attributes without a value (no
    /// group, no error) are left out.
    pub attributes: &'static [&'static str],
    /// What it measures.
    pub description: &'static str,
}

/// `messaging.system`: the backend's name as in its capabilities (`memory`,
/// `kafka`, `rabbitmq`, `nats`, `nats-core`).
pub const SYSTEM: &str = "messaging.system";
/// `messaging.destination.name`: the topic.
pub const DESTINATION: &str = "messaging.destination.name";
/// `messaging.consumer.group.name`: the consumer group (left out without one).
pub const GROUP: &str = "messaging.consumer.group.name";
/// `messaging.operation.name`: `send`, `receive`, `process`, `ack`, `release`,
/// `keep_alive`, `dead_letter`.
pub const OPERATION: &str = "messaging.operation.name";
/// `messaging.operation.type`: `send`, `receive`, `process` or `settle`.
pub const OPERATION_TYPE: &str = "messaging.operation.type";
/// `error.type`: a fixed name per error kind (see [`error_type`]), only on failures.
pub const ERROR_TYPE: &str = "error.type";
/// `polybus.outcome`: `ok`, `retried`, `dead_lettered`, `released`,
/// `cancelled` or `settle_failed`.
pub const OUTCOME: &str = "polybus.outcome";

/// Messages sent (counter).
pub const SENT_MESSAGES: &str = "messaging.client.sent.messages";
/// Send and settle durations (histogram, seconds).
pub const OPERATION_DURATION: &str = "messaging.client.operation.duration";
/// Deliveries received by runners (counter).
pub const CONSUMED_MESSAGES: &str = "messaging.client.consumed.messages";
/// Handler durations (histogram, seconds).
pub const PROCESS_DURATION: &str = "messaging.process.duration";
/// How deliveries ended (counter).
pub const OUTCOMES: &str = "polybus.handler.outcomes";
/// Attempts per settled delivery (histogram).
pub const ATTEMPTS: &str = "polybus.delivery.attempts";
/// Deliveries held by a runner (gauge).
pub const HELD: &str = "polybus.runner.held";
/// Handlers running (gauge).
pub const RUNNING: &str = "polybus.runner.running";
/// Deliveries waiting behind a backoff (gauge).
pub const BACKOFF: &str = "polybus.runner.backoff";
/// Failed dead-letter publishes (counter).
pub const DEAD_LETTER_FAILURES: &str = "polybus.dead_letter.failures";
/// Shutdown durations (histogram, seconds).
pub const SHUTDOWN_DURATION: &str = "polybus.runner.shutdown.duration";
/// A group's backlog (gauge).
pub const LAG: &str = "polybus.consumer.lag";
/// Lag refreshes that failed (counter).
pub const LAG_FAILURES: &str = "polybus.consumer.lag.failures";

/// Every metric polybus emits. The README's "Observability" table lists the
/// same rows (a test compares them).
pub const METRICS: &[MetricDescriptor] = &[
    MetricDescriptor {
        name: SENT_MESSAGES,
        kind: MetricKind::Counter,
        unit: "{message}",
        attributes: &[SYSTEM, DESTINATION, OPERATION, ERROR_TYPE],
        description: "Messages passed to `send`/`send_batch`; with `error.type` when the send failed",
    },
    MetricDescriptor {
        name: OPERATION_DURATION,
        kind: MetricKind::Histogram,
        unit: "s",
        attributes: &[SYSTEM, DESTINATION, GROUP, OPERATION, OPERATION_TYPE, ERROR_TYPE],
        description: "Duration of a send (until the broker took it), an ack, a release, a keep-alive or a dead-letter publish",
    },
    MetricDescriptor {
        name: CONSUMED_MESSAGES,
        kind: MetricKind::Counter,
        unit: "{message}",
        attributes: &[SYSTEM, DESTINATION, GROUP, OPERATION],
        description: "Deliveries a runner received from the broker (redeliveries included)",
    },
    MetricDescriptor {
        name: PROCESS_DURATION,
        kind: MetricKind::Histogram,
        unit: "s",
        attributes: &[SYSTEM, DESTINATION, GROUP, OPERATION, ERROR_TYPE],
        description: "Duration of one handler attempt, middleware included; `error.type` is `retryable`, `permanent`, `overloaded` or `panic` when it failed",
    },
    MetricDescriptor {
        name: OUTCOMES,
        kind: MetricKind::Counter,
        unit: "{message}",
        attributes: &[SYSTEM, DESTINATION, GROUP, OUTCOME],
        description: "How deliveries ended: ok (acked), retried (one per failed attempt retried in process), dead_lettered, released, cancelled (at the shutdown deadline), settle_failed (the ack did not take effect)",
    },
    MetricDescriptor {
        name: ATTEMPTS,
        kind: MetricKind::Histogram,
        unit: "{attempt}",
        attributes: &[SYSTEM, DESTINATION, GROUP, OUTCOME],
        description: "The attempt on which a delivery was acked (`ok`) or dead-lettered",
    },
    MetricDescriptor {
        name: HELD,
        kind: MetricKind::Gauge,
        unit: "{message}",
        attributes: &[SYSTEM, GROUP],
        description: "Deliveries a runner holds (waiting, running, in backoff)",
    },
    MetricDescriptor {
        name: RUNNING,
        kind: MetricKind::Gauge,
        unit: "{message}",
        attributes: &[SYSTEM, GROUP],
        description: "Handlers running",
    },
    MetricDescriptor {
        name: BACKOFF,
        kind: MetricKind::Gauge,
        unit: "{message}",
        attributes: &[SYSTEM, GROUP],
        description: "Deliveries held in lanes whose head waits out a retry backoff",
    },
    MetricDescriptor {
        name: DEAD_LETTER_FAILURES,
        kind: MetricKind::Counter,
        unit: "{failure}",
        attributes: &[SYSTEM, DESTINATION, GROUP, ERROR_TYPE],
        description: "Dead-letter publishes that failed (each retry counts)",
    },
    MetricDescriptor {
        name: SHUTDOWN_DURATION,
        kind: MetricKind::Histogram,
        unit: "s",
        attributes: &[SYSTEM, GROUP],
        description: "From the runner's stop (shutdown or a fatal error) to its end",
    },
    MetricDescriptor {
        name: LAG,
        kind: MetricKind::Gauge,
        unit: "{message}",
        attributes: &[SYSTEM, DESTINATION, GROUP],
        description: "The group's backlog as the broker reports it (see `Consumer::lag`); a property of the group: aggregate across instances with max, not sum",
    },
    MetricDescriptor {
        name: LAG_FAILURES,
        kind: MetricKind::Counter,
        unit: "{failure}",
        attributes: &[SYSTEM, DESTINATION, GROUP, ERROR_TYPE],
        description: "Lag refreshes that failed (the gauge keeps its last value); `error.type` is the error's kind, `timeout` when the broker did not answer within the interval, `panic` when the backend panicked",
    },
];

/// Registers the description and unit of every metric in [`METRICS`] with the
/// installed recorder (exporters show them as `# HELP` lines). Call it once after
/// installing the recorder.
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub fn describe_metrics() {
    recorder::describe_all();
}

/// The `error.type` value for an error: a fixed name per kind of error.
pub fn error_type(error: &Error) -> &'static str {
    match error {
        Error::Connection { .. } => "connection",
        Error::Timeout { .. } => "timeout",
        Error::NotFound { .. } => "not_found",
        Error::InvalidName { .. } => "invalid_name",
        Error::InvalidHeader { .. } => "invalid_header",
        Error::InvalidConfig(_) => "invalid_config",
        Error::PayloadTooLarge { .. } => "payload_too_large",
        Error::Unsupported(_) => "unsupported",
        Error::Closed(_) => "closed",
        Error::Codec { .. } => "codec",
        Error::NotSettled { .. } => "not_settled",
        Error::MessageRejected { .. } => "message_rejected",
        Error::Unauthenticated { .. } => "unauthenticated",
        Error::PermissionDenied { .. } => "permission_denied",
        Error::Tls { .. } => "tls",
        Error::Backend { .. } => "backend",
    }
}

/// The `error.type` of a handler attempt: `None` when it succeeded.
pub(crate) fn handler_error_type(
    result: &std::thread::Result<crate::handler::HandlerResult>,
) -> Option<&'static str> {
    match result {
        Ok(Ok(())) => None,
        Ok(Err(e)) if e.is_overloaded() => Some("overloaded"),
        Ok(Err(e)) if e.is_permanent() => Some("permanent"),
        Ok(Err(_)) => Some("retryable"),
        Err(_) => Some("panic"),
    }
}

/// How a delivery ended in a runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok,
    Retried,
    DeadLettered,
    Released,
    Cancelled,
    SettleFailed,
}

#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
impl Outcome {
    pub(crate) const ALL: [Outcome; 6] = [
        Outcome::Ok,
        Outcome::Retried,
        Outcome::DeadLettered,
        Outcome::Released,
        Outcome::Cancelled,
        Outcome::SettleFailed,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Retried => "retried",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Released => "released",
            Outcome::Cancelled => "cancelled",
            Outcome::SettleFailed => "settle_failed",
        }
    }
}

/// A started timer ([`Observer::timer`]); nothing without the `metrics`
/// feature, and no clock reading for a runner without a recorder.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timer {
    #[cfg(feature = "metrics")]
    started: Option<std::time::Instant>,
}

impl Timer {
    #[cfg(feature = "metrics")]
    pub(crate) fn elapsed(&self) -> Duration {
        self.started.map_or(Duration::ZERO, |started| started.elapsed())
    }
}

/// A runner's metric hooks. Without the `metrics` feature it is empty and
/// every hook compiles to nothing.
#[derive(Clone, Default)]
pub(crate) struct Observer {
    #[cfg(feature = "metrics")]
    metrics: Option<std::sync::Arc<recorder::RunnerMetrics>>,
    #[cfg(feature = "opentelemetry")]
    trace: Option<std::sync::Arc<trace::RunnerTracer>>,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer").finish_non_exhaustive()
    }
}

#[allow(clippy::unused_self)]
impl Observer {
    /// The hooks of a runner on `system` (the backend's name) in `group`.
    /// Without a recorder installed at this moment the runner has no metric
    /// hooks at all (no handles, no clock readings), for good.
    pub(crate) fn new(system: &'static str, group: Option<&str>) -> Self {
        let _ = (system, group);
        #[cfg(feature = "metrics")]
        let recording = recorder::installed();
        #[cfg(feature = "metrics")]
        if !recording {
            // Discoverable: a zero-sized recorder is taken for none.
            tracing::debug!(
                "no metrics recorder installed (or a zero-sized one, taken for none): this runner records no metrics"
            );
        }
        Observer {
            #[cfg(feature = "metrics")]
            metrics: recording.then(|| std::sync::Arc::new(recorder::RunnerMetrics::new(system, group))),
            #[cfg(feature = "opentelemetry")]
            trace: Some(std::sync::Arc::new(trace::RunnerTracer::new(system, group))),
        }
    }

    /// Starts a timer for a handler attempt or a settlement call: no clock
    /// reading when the runner has no recorder.
    #[inline(always)]
    pub(crate) fn timer(&self) -> Timer {
        Timer {
            #[cfg(feature = "metrics")]
            started: self.metrics.is_some().then(std::time::Instant::now),
        }
    }

    /// Runs one handler attempt inside its `process <topic>` span (feature
    /// `opentelemetry`).
    #[inline(always)]
    pub(crate) async fn process(
        &self,
        delivery: &crate::message::Delivery,
        attempt: impl std::future::Future<Output = std::thread::Result<crate::handler::HandlerResult>>,
    ) -> std::thread::Result<crate::handler::HandlerResult> {
        #[cfg(feature = "opentelemetry")]
        match &self.trace {
            Some(trace) => trace.process(delivery, attempt, handler_error_type).await,
            None => attempt.await,
        }
        #[cfg(not(feature = "opentelemetry"))]
        {
            let _ = delivery;
            attempt.await
        }
    }

    /// Publishes a dead letter of `delivery` to `topic` inside its span, linked
    /// to the original's trace (feature `opentelemetry`).
    #[inline(always)]
    pub(crate) async fn dead_letter(
        &self,
        topic: &str,
        delivery: &crate::message::Delivery,
        publish: impl std::future::Future<Output = crate::error::Result<()>>,
    ) -> crate::error::Result<()> {
        #[cfg(feature = "opentelemetry")]
        match &self.trace {
            Some(trace) => trace.dead_letter(topic, delivery, publish).await,
            None => publish.await,
        }
        #[cfg(not(feature = "opentelemetry"))]
        {
            let _ = (topic, delivery);
            publish.await
        }
    }

    /// A delivery was received.
    #[inline(always)]
    pub(crate) fn received(&self, delivery: &crate::message::Delivery) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.metrics {
            m.with_topic(delivery.topic(), |t| t.consumed.increment(1));
        }
        #[cfg(not(feature = "metrics"))]
        let _ = delivery;
    }

    /// One handler attempt ended; `error`: `None` when it succeeded, else the
    /// kind of failure (`retryable`, `permanent`, `overloaded`, `panic`).
    #[inline(always)]
    pub(crate) fn processed(
        &self,
        delivery: &crate::message::Delivery,
        timer: Timer,
        error: Option<&'static str>,
    ) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.metrics {
            m.processed(delivery, timer.elapsed(), error);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = (delivery, timer, error);
    }

    /// `n` deliveries of `topic` ended with `outcome`.
    #[inline(always)]
    pub(crate) fn outcome(&self, topic: &str, outcome: Outcome, n: u64) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.metrics {
            m.with_topic(topic, |t| t.outcomes[outcome as usize].increment(n));
        }
        #[cfg(not(feature = "metrics"))]
        let _ = (topic, outcome, n);
    }

    /// A delivery was settled for good (acked after success or dead-lettered):
    /// its outcome and the attempt it took.
    #[inline(always)]
    pub(crate) fn settled(&self, delivery: &crate::message::Delivery, outcome: Outcome) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.metrics {
            m.settled(delivery, outcome);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = (delivery, outcome);
    }

    /// A settlement call (`ack`, `release`, `keep-alive`, `dead-letter publish`)
    /// returned.
    #[inline(always)]
    pub(crate) fn settle_call(&self, operation: &'static str, timer: Timer, result: &Result<(), Error>) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.metrics {
            m.settle_call(operation, timer.elapsed(), result);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = (operation, timer, result);
    }

    /// The runner's current load.
    #[inline(always)]
    pub(crate) fn load(&self, held: usize, running: usize, backoff: impl FnOnce() -> usize) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.metrics {
            m.held.set(held as f64);
            m.running.set(running as f64);
            m.backoff.set(backoff() as f64);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = (held, running, backoff);
    }

    /// A dead-letter publish for a delivery of `topic` failed.
    #[inline(always)]
    pub(crate) fn dead_letter_failed(&self, topic: &str, error: &Error) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.metrics {
            m.dead_letter_failed(topic, error);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = (topic, error);
    }

    /// The runner stopped taking deliveries this long before it ended.
    #[inline(always)]
    pub(crate) fn shutdown(&self, took: Duration) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.metrics {
            m.shutdown.record(took.as_secs_f64());
        }
        #[cfg(not(feature = "metrics"))]
        let _ = took;
    }

    /// The group's backlog on `topic`.
    #[cfg(feature = "metrics")]
    pub(crate) fn lag(&self, topic: &str, lag: u64) {
        if let Some(m) = &self.metrics {
            m.with_topic(topic, |t| t.set_lag(lag));
        }
    }

    /// Asking for the backlog on `topic` failed (`error`: its `error.type`).
    #[cfg(feature = "metrics")]
    pub(crate) fn lag_failed(&self, topic: &str, error: &'static str) {
        if let Some(m) = &self.metrics {
            m.lag_failed(topic, error);
        }
    }
}
