//! One attempt of one delivery: the handler through its middleware, then what
//! its outcome asks for (ack, a retry, a dead letter), with every panic on the
//! way caught and counted as a failed attempt.
//!
//! What can happen to an attempt, and what the dispatcher is told ([`Done`]):
//!
//! * the handler succeeds → ack (bounded by the settle timeout) → `Acked`, or
//!   `AckFailed` when the ack did not take effect (the broker redelivers it);
//! * it fails (error or panic, anywhere before the ack) and attempts remain and
//!   the error is not permanent → `Retry(backoff)`;
//! * otherwise → a byte-exact copy goes to `<topic>.dlq` and, once the broker
//!   confirmed it, the original is acked → `DeadLettered`. A dead-letter publish
//!   that fails is retried while the error is retryable; one the *message* makes
//!   impossible (too large, a header the broker refuses) is replaced by a labelled
//!   stub; one the *environment* refuses (producer closed, name invalid, access
//!   denied) → `Fatal`: the message is released and the runner ends with it.
//!
//! A panic after the ack was sent never makes the message run again.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::FutureExt;

use super::RetryPolicy;
use super::handle::Counters;
use crate::backend::{Acker, Producer};
use crate::error::{Error, Result};
use crate::handler::HandlerError;
use crate::message::{Delivery, Message, dlq_headers};
use crate::middleware::Pipeline;
use crate::names;
use crate::observe::Observer;

/// What the runner needs to settle and dead-letter, shared by every worker.
pub(super) struct Settings {
    pub(super) retry: RetryPolicy,
    pub(super) group: Option<String>,
    pub(super) producer: Arc<dyn Producer>,
    pub(super) settle_timeout: Duration,
    pub(super) counters: Arc<Counters>,
    pub(super) observe: Observer,
}

/// How one attempt ended.
#[derive(Debug)]
pub(super) enum Done {
    /// Handled and acked.
    Acked,
    /// Handled, but the ack did not take effect or timed out: the broker will
    /// deliver it again.
    AckFailed,
    /// Copied to the dead-letter topic (confirmed), then acked (`ack_failed`: the
    /// ack did not take effect).
    DeadLettered { ack_failed: bool },
    /// Failed; run it again after this backoff.
    Retry(Duration),
    /// The dead letter was refused for a reason that no retry can fix: give the
    /// message back and end the runner with this error.
    Fatal(Error),
    /// Cancelled at the shutdown deadline.
    Cancelled,
    /// The handler is overloaded: give the message back to the broker.
    Release,
}

// Where an attempt is, so a panic can be mapped to what already happened.
const HANDLING: u8 = 0;
const DEAD_LETTERING: u8 = 1;
const ACKING_HANDLED: u8 = 2;
const ACKING_DEAD_LETTERED: u8 = 3;

/// Runs one attempt of one delivery and settles it. Never panics.
pub(super) async fn attempt(
    pipeline: &Pipeline,
    settings: &Settings,
    delivery: &Delivery,
    acker: &Acker,
) -> Done {
    let stage = AtomicU8::new(HANDLING);
    let work = AssertUnwindSafe(run(pipeline, settings, delivery, acker, &stage))
        .catch_unwind()
        .await;
    let panic = match work {
        Ok(done) => return done,
        Err(panic) => panic_text(&*panic),
    };
    match stage.load(Ordering::Acquire) {
        ACKING_HANDLED => {
            tracing::error!(id = delivery.id(), panic = %panic, "panic while acking; the message is not handled again");
            Done::AckFailed
        }
        ACKING_DEAD_LETTERED => {
            tracing::error!(id = delivery.id(), panic = %panic, "panic while acking a dead-lettered message");
            Done::DeadLettered { ack_failed: true }
        }
        DEAD_LETTERING => {
            // The dead-letter publish itself panicked (a backend bug, or a message
            // the client library cannot take): try the labelled stub once.
            tracing::error!(id = delivery.id(), panic = %panic, "dead-letter publish panicked; sending a labelled stub");
            let reason = format!("the dead-letter publish panicked: {panic}");
            // The stub goes through the same loop as any dead letter: retried
            // while the error is retryable, a smaller stub if the message is refused.
            let stub = AssertUnwindSafe(async {
                let message = stub_copy(settings, delivery, &reason, 0);
                dead_letter_from(settings, delivery, &reason, message, 1).await
            });
            match stub.catch_unwind().await {
                Ok(Ok(())) => ack_dead_lettered(settings, delivery, acker).await,
                Ok(Err(e)) => Done::Fatal(e),
                Err(again) => Done::Fatal(Error::Backend {
                    backend: "polybus",
                    message: format!(
                        "dead-letter publish panicked twice (the second time on a labelled stub): {}",
                        panic_text(&*again)
                    ),
                    retryable: false,
                    source: None,
                }),
            }
        }
        _ => {
            // A panic outside the handler's own guard (in a middleware's future
            // constructor, an error's methods, …): a failed attempt like any other.
            tracing::error!(id = delivery.id(), panic = %panic, "panic while handling; counted as a failed attempt");
            let failure = Failure {
                permanent: false,
                reason: format!("panicked: {panic}"),
            };
            let after = AssertUnwindSafe(after_failure(settings, delivery, acker, failure, &stage));
            match after.catch_unwind().await {
                Ok(done) => done,
                Err(again) => Done::Fatal(Error::Backend {
                    backend: "polybus",
                    message: format!("panic while dead-lettering: {}", panic_text(&*again)),
                    retryable: false,
                    source: None,
                }),
            }
        }
    }
}

struct Failure {
    permanent: bool,
    reason: String,
}

async fn run(
    pipeline: &Pipeline,
    settings: &Settings,
    delivery: &Delivery,
    acker: &Acker,
    stage: &AtomicU8,
) -> Done {
    if let Some(reason) = delivery.undecodable_reason() {
        // Never shown to the handler: dead-lettered as the backend labelled it.
        let failure = Failure {
            permanent: true,
            reason: format!("undecodable record: {reason}"),
        };
        return after_failure(settings, delivery, acker, failure, stage).await;
    }
    let timer = settings.observe.timer();
    let call = AssertUnwindSafe(async { pipeline.call(delivery.clone()).await });
    let result = settings.observe.process(delivery, call.catch_unwind()).await;
    settings
        .observe
        .processed(delivery, timer, crate::observe::handler_error_type(&result));
    let failure = match result {
        Ok(Ok(())) => {
            stage.store(ACKING_HANDLED, Ordering::Release);
            return match settle(settings, "ack", acker.ack()).await {
                Ok(()) => Done::Acked,
                Err(e) => {
                    tracing::warn!(error = %e, id = delivery.id(), "ack did not take effect; the broker will redeliver");
                    Done::AckFailed
                }
            };
        }
        Ok(Err(error)) if error.is_overloaded() => return Done::Release,
        Ok(Err(error)) => describe(&error),
        Err(panic) => Failure {
            permanent: false,
            reason: format!("handler panicked: {}", panic_text(&*panic)),
        },
    };
    after_failure(settings, delivery, acker, failure, stage).await
}

/// A handler error as a failure, without letting a panicking `Display` escape.
fn describe(error: &HandlerError) -> Failure {
    let permanent = error.is_permanent();
    let reason = std::panic::catch_unwind(AssertUnwindSafe(|| error.to_string()))
        .unwrap_or_else(|panic| format!("(the error's Display panicked: {})", panic_text(&*panic)));
    Failure { permanent, reason }
}

async fn after_failure(
    settings: &Settings,
    delivery: &Delivery,
    acker: &Acker,
    failure: Failure,
    stage: &AtomicU8,
) -> Done {
    let attempt = delivery.attempt();
    if !failure.permanent && attempt < settings.retry.max_attempts {
        tracing::debug!(id = delivery.id(), attempt, error = %failure.reason, "retrying");
        return Done::Retry(settings.retry.delay_after(attempt));
    }
    let reason = if failure.permanent {
        failure.reason
    } else {
        format!("gave up after {attempt} attempts: {}", failure.reason)
    };
    stage.store(DEAD_LETTERING, Ordering::Release);
    if let Err(e) = dead_letter(settings, delivery, &reason).await {
        tracing::error!(
            error = %e,
            id = delivery.id(),
            topic = delivery.topic(),
            "the dead-letter publish was refused and cannot succeed; releasing the message and stopping the runner"
        );
        return Done::Fatal(e);
    }
    tracing::warn!(id = delivery.id(), topic = delivery.topic(), %reason, "dead-lettered");
    stage.store(ACKING_DEAD_LETTERED, Ordering::Release);
    ack_dead_lettered(settings, delivery, acker).await
}

async fn ack_dead_lettered(settings: &Settings, delivery: &Delivery, acker: &Acker) -> Done {
    match settle(settings, "ack", acker.ack()).await {
        Ok(()) => Done::DeadLettered { ack_failed: false },
        Err(e) => {
            tracing::warn!(error = %e, id = delivery.id(), "ack after dead letter did not take effect");
            Done::DeadLettered { ack_failed: true }
        }
    }
}

/// A settlement call bounded by the settle timeout.
pub(super) async fn settle(
    settings: &Settings,
    operation: &'static str,
    call: impl Future<Output = Result<()>>,
) -> Result<()> {
    let timer = settings.observe.timer();
    let result = match tokio::time::timeout(settings.settle_timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(Error::timeout(operation, settings.settle_timeout)),
    };
    settings.observe.settle_call(operation, timer, &result);
    result
}

/// Whether a dead-letter publish failed because of the message itself (so a
/// smaller, labelled copy can succeed) rather than because of the environment.
fn caused_by_message(error: &Error) -> bool {
    matches!(
        error,
        Error::PayloadTooLarge { .. }
            | Error::InvalidHeader { .. }
            | Error::Codec { .. }
            | Error::MessageRejected { .. }
    )
}

/// Publishes the dead letter until the broker confirms it: the byte-exact copy,
/// or labelled stubs when the message makes the copy impossible. Retries
/// retryable failures with backoff for as long as it takes (each one logged and
/// counted; a shutdown cancels the attempt at its deadline, which releases the
/// message). Returns the error that no retry can fix.
async fn dead_letter(settings: &Settings, delivery: &Delivery, reason: &str) -> Result<()> {
    let message = dead_letter_copy(settings, delivery, reason);
    dead_letter_from(settings, delivery, reason, message, 0).await
}

/// How many times a dead-letter publish is tried while it fails retryably;
/// after that the message is released and the runner ends with the last
/// error (with the default backoff, a few minutes of outage).
pub(super) const DEAD_LETTER_ATTEMPTS: u32 = 20;

/// The dead-letter loop from `message`, with `level` stubs already used.
async fn dead_letter_from(
    settings: &Settings,
    delivery: &Delivery,
    reason: &str,
    mut message: Message,
    mut level: u8,
) -> Result<()> {
    let mut failures = 0u32;
    loop {
        let error = match publish_dead_letter(settings, delivery, message.clone()).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        Counters::bump(&settings.counters.dead_letter_failures, 1);
        settings.observe.dead_letter_failed(delivery.topic(), &error);
        if error.is_retryable() && failures + 1 >= DEAD_LETTER_ATTEMPTS {
            // A broker that refuses dead letters this long is an outage the
            // application must see: release the message and end the runner.
            tracing::error!(
                error = %error,
                id = delivery.id(),
                attempts = DEAD_LETTER_ATTEMPTS,
                "dead-letter publish kept failing; giving up"
            );
            return Err(error);
        }
        if error.is_retryable() {
            failures += 1;
            tracing::error!(
                error = %error,
                id = delivery.id(),
                failures,
                "dead-letter publish failed; retrying (the message stays held)"
            );
            tokio::time::sleep(settings.retry.delay_after(failures)).await;
            continue;
        }
        if caused_by_message(&error) && level < 2 {
            tracing::warn!(
                error = %error,
                id = delivery.id(),
                "the message cannot be dead-lettered as it is; sending a labelled stub"
            );
            let why = format!("{reason}; the exact copy was refused: {error}");
            message = stub_copy(settings, delivery, &why, level);
            level += 1;
            continue;
        }
        return Err(error);
    }
}

async fn publish_dead_letter(settings: &Settings, delivery: &Delivery, message: Message) -> Result<()> {
    let topic = names::dead_letter_topic(delivery.topic());
    names::validate_topic(&topic)?;
    let publish = settle(
        settings,
        "dead-letter publish",
        settings.producer.publish(&topic, message),
    );
    settings.observe.dead_letter(&topic, delivery, publish).await
}

/// Text made safe for a header value: no CR/LF, at most 1024 bytes. Used for
/// polybus's own headers only; the dead-letter copy keeps the message's bytes.
pub(super) fn header_safe(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect();
    truncate_at_char(&mut out, 1024);
    out
}

fn truncate_at_char(text: &mut String, max: usize) {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
}

/// The polybus headers every dead letter carries.
fn dead_letter_headers(settings: &Settings, delivery: &Delivery, reason: &str, message: &mut Message) {
    let original = delivery.message();
    let millis = original
        .timestamp
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let sys = &mut message.system_headers;
    sys.insert(dlq_headers::REASON, header_safe(reason));
    sys.insert(dlq_headers::TOPIC, delivery.topic());
    sys.insert(dlq_headers::ATTEMPTS, delivery.attempt().to_string());
    sys.insert(dlq_headers::ORIGINAL_TIMESTAMP, millis.to_string());
    match &settings.group {
        Some(group) => sys.insert(dlq_headers::GROUP, group.as_str()),
        None => {
            sys.remove(dlq_headers::GROUP);
        }
    }
    // A dead letter is kept from when it was dead-lettered: retention by time
    // must not delete it at once because the original was old.
    message.timestamp = SystemTime::now();
}

/// The byte-exact copy: payload, key, id and every header as received; only
/// polybus's own dead-letter headers (and the timestamp) are set.
fn dead_letter_copy(settings: &Settings, delivery: &Delivery, reason: &str) -> Message {
    let mut message = delivery.message().clone();
    dead_letter_headers(settings, delivery, reason, &mut message);
    message
}

/// The largest raw-headers label (of an undecodable record) a stub keeps.
const STUB_RAW_HEADERS_MAX: usize = 4096;

/// A labelled stub for a message that cannot be dead-lettered as it is: its id
/// and key when they are valid, as much of its payload as fits (`level` 0: half
/// the producer's maximum; later levels: none), no user headers (at `level` 0
/// an undecodable record's raw-headers label when it is at most
/// [`STUB_RAW_HEADERS_MAX`] bytes), and a `polybus-dlq-stub` header saying what
/// was left out.
fn stub_copy(settings: &Settings, delivery: &Delivery, reason: &str, level: u8) -> Message {
    let original = delivery.message();
    let mut notes = Vec::new();
    let keep = if level == 0 {
        original.payload.len().min(settings.producer.max_payload() / 2)
    } else {
        0
    };
    if keep < original.payload.len() {
        notes.push(format!(
            "payload truncated to {keep} of {} bytes",
            original.payload.len()
        ));
    }
    let fits = |v: &str| v.len() <= 1024 && names::validate_header_value("", v).is_ok() && !v.is_empty();
    let key = original
        .key
        .clone()
        .filter(|k| std::str::from_utf8(k).is_ok_and(fits));
    if original.key.is_some() && key.is_none() {
        notes.push("key left out".to_owned());
    }
    let id = if fits(&original.id) {
        original.id.clone()
    } else {
        notes.push("id replaced".to_owned());
        crate::message::new_id()
    };
    if !original.headers.is_empty() {
        let listed: Vec<&str> = original.headers.keys().collect();
        notes.push(format!(
            "{} user headers left out: {}",
            original.headers.len(),
            listed.join(",")
        ));
    }
    let mut message = Message {
        payload: original.payload.slice(..keep),
        key,
        headers: Default::default(),
        system_headers: Default::default(),
        id,
        timestamp: original.timestamp,
        tombstone: original.tombstone,
    };
    if let Some(raw) = original.system_headers.get(dlq_headers::RAW_HEADERS) {
        if level == 0 && raw.len() <= STUB_RAW_HEADERS_MAX {
            message.system_headers.insert(dlq_headers::RAW_HEADERS, raw);
        } else {
            notes.push(format!("raw headers left out ({} bytes of label)", raw.len()));
        }
    }
    dead_letter_headers(settings, delivery, reason, &mut message);
    let mut label = format!("labelled copy: {}", notes.join("; "));
    truncate_at_char(&mut label, 1024);
    message
        .system_headers
        .insert(dlq_headers::STUB, header_safe(&label));
    message
}

fn panic_text(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_fit_in_a_header() {
        assert_eq!(header_safe("a\r\nb"), "a  b");
        assert!(header_safe(&"é".repeat(1000)).len() <= 1024);
    }

    #[test]
    fn refusals_are_told_apart() {
        let message_caused = [
            Error::PayloadTooLarge { size: 2, max: 1 },
            Error::MessageRejected {
                backend: "kafka",
                message: "MessageSizeTooLarge".into(),
                source: None,
            },
            Error::InvalidHeader {
                key: "k".into(),
                reason: "r",
            },
        ];
        for e in &message_caused {
            assert!(caused_by_message(e) && !e.is_retryable(), "{e}");
        }
        let environment = [
            Error::Closed("producer"),
            Error::NotFound { what: "t.dlq".into() },
            Error::Backend {
                backend: "rabbitmq",
                message: "ACCESS_REFUSED".into(),
                retryable: false,
                source: None,
            },
        ];
        for e in &environment {
            assert!(!caused_by_message(e) && !e.is_retryable(), "{e}");
        }
    }

    #[test]
    fn a_panicking_display_is_a_reason_not_a_panic() {
        #[derive(Debug)]
        struct Nasty;
        impl std::fmt::Display for Nasty {
            fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                panic!("display bug")
            }
        }
        impl std::error::Error for Nasty {}
        let failure = describe(&HandlerError::permanent(Nasty));
        assert!(failure.permanent);
        assert!(failure.reason.contains("display bug"), "{}", failure.reason);
    }
}
