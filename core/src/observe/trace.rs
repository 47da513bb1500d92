//! Trace context across the broker (feature `opentelemetry`).
//!
//! * `send` starts a `send <topic>` PRODUCER span — only when the caller is
//!   inside a trace (the current OpenTelemetry context has a valid span):
//!   polybus does not start traces by itself — and writes its context into the
//!   message as plain W3C Trace Context headers, `traceparent` and `tracestate`
//!   (portable header names every broker carries).
//! * The runner extracts that context from each delivery and runs every handler
//!   attempt inside a `process <topic>` CONSUMER span whose **parent** is the
//!   producer's span. The messaging conventions allow the creation context as
//!   the parent when a span processes one message and has no ambient context,
//!   which is the runner's case (one span per delivery, started by the runner):
//!   so the handler's spans are in the producer's trace. Retries are new
//!   `process` spans under the same parent.
//! * A dead letter is a byte-exact copy, so it keeps the original `traceparent`;
//!   its publish is a `send <topic>.dlq` PRODUCER span that **links** to the
//!   original context (it is not injected into the copy).
//!
//! Spans are made with the global tracer provider (`opentelemetry::global`),
//! instrumentation scope `polybus`: a runner takes its tracer once when it
//! starts (none when the provider is the no-op one: then no `process` span is
//! built, and the handler runs in the producer's context so what it sends
//! still carries the incoming `traceparent`); `send` asks the provider at each
//! send made inside a trace. A span's message id and delivery attempt are set
//! only when the span records (the sampler kept it).

use std::future::Future;
use std::str::FromStr;

use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};

use opentelemetry::context::FutureExt;
use opentelemetry::global::{BoxedSpan, BoxedTracer};
use opentelemetry::trace::{
    Link, SamplingDecision, SamplingResult, Span, SpanBuilder, SpanContext, SpanId, SpanKind, Status,
    TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
};
use opentelemetry::{Context, KeyValue, Value, global};

use super::{DESTINATION, ERROR_TYPE, GROUP, OPERATION, OPERATION_TYPE, SYSTEM, error_type};
use crate::error::{Error, Result};
use crate::headers::Headers;
use crate::message::{Delivery, Message};

/// The W3C Trace Context header with the trace id, parent span id and flags.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C Trace Context header with vendor-specific trace state.
pub const TRACESTATE: &str = "tracestate";

const SCOPE: &str = "polybus";

/// `traceparent` for a span context (version 00), hex-encoded by hand into a
/// fixed buffer (what `format!` with the ids' `Display` cost was about a
/// tenth of the traced core path, see BENCHMARKS.md).
fn traceparent(cx: &SpanContext) -> String {
    let mut out = [b'-'; 55];
    out[..2].copy_from_slice(b"00");
    encode_hex(&mut out[3..35], &cx.trace_id().to_bytes());
    encode_hex(&mut out[36..52], &cx.span_id().to_bytes());
    encode_hex(&mut out[53..55], &[cx.trace_flags().to_u8()]);
    String::from_utf8(out.to_vec()).expect("hex digits and dashes are ASCII")
}

/// `bytes` as lower-case hex digits into `out` (twice as long).
fn encode_hex(out: &mut [u8], bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0x0f)];
    }
}

/// Each byte's value as a lower-case hex digit, or `0xff`.
const HEX_VALUE: [u8; 256] = {
    let mut table = [0xff; 256];
    let mut c = 0;
    while c < 10 {
        table[b'0' as usize + c] = c as u8;
        c += 1;
    }
    let mut c = 0;
    while c < 6 {
        table[b'a' as usize + c] = 10 + c as u8;
        c += 1;
    }
    table
};

/// The value of at most 16 lower-case hex digits, `None` for anything else.
fn lower_hex(digits: &[u8]) -> Option<u64> {
    let (mut value, mut bad) = (0u64, 0u8);
    for &c in digits {
        let digit = HEX_VALUE[usize::from(c)];
        bad |= digit;
        value = (value << 4) | u64::from(digit & 0x0f);
    }
    (bad & 0xf0 == 0).then_some(value)
}

/// The trace id, span id and flags of a `traceparent` value
/// (`vv-<32 hex>-<16 hex>-ff`, lower-case hex; version `ff` is invalid;
/// version `00` has exactly these four fields, a later version may append
/// `-` and more). Parsed by position, in one pass.
fn parse_traceparent(b: &[u8]) -> Option<(u128, u64, u8)> {
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let version = lower_hex(&b[..2])?;
    if version == 0xff || (b.len() > 55 && (version == 0 || b[55] != b'-')) {
        return None;
    }
    let trace = (u128::from(lower_hex(&b[3..19])?) << 64) | u128::from(lower_hex(&b[19..35])?);
    let span = lower_hex(&b[36..52])?;
    let flags = u8::try_from(lower_hex(&b[53..55])?).ok()?;
    Some((trace, span, flags))
}

/// `value` without leading and trailing spaces and tabs.
fn trim_blanks(value: &[u8]) -> &[u8] {
    let blank = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value.iter().position(|b| !blank(b)).unwrap_or(value.len());
    let end = value.iter().rposition(|b| !blank(b)).map_or(start, |i| i + 1);
    &value[start..end]
}

/// The longest `tracestate` kept (W3C Trace Context: vendors propagate at
/// least 512 characters; a longer one is dropped, not truncated).
pub const MAX_TRACESTATE: usize = 512;
/// The most `tracestate` list members kept (W3C Trace Context: 32).
const MAX_TRACESTATE_MEMBERS: usize = 32;

/// The remote span context in `traceparent` (and `tracestate`), if valid.
///
/// What any producer may have written is handled as W3C Trace Context says:
/// no `traceparent`, one that is not a single valid value (malformed, not
/// UTF-8, version `ff`, an all-zero trace or span id, or several
/// `traceparent` headers) → no parent (`None`: the handler's span starts a new
/// trace). A `tracestate` that is not valid or is over 512 characters or 32
/// members is dropped (the parent is kept): the context is injected into every
/// message the handler sends, so it must stay within the header grammar (no
/// CR/LF or other control characters) and small.
pub(crate) fn extract(headers: &Headers) -> Option<SpanContext> {
    let mut parents = headers.get_all(TRACEPARENT);
    let parent = trim_blanks(parents.next()?.as_bytes()?);
    if parents.next().is_some() {
        // Several parents: none of them is the parent.
        return None;
    }
    let (trace, span, flags) = parse_traceparent(parent)?;
    // The fields parsed are ASCII; a later version's tail must be text too
    // (no UTF-8 check on the common 55-byte value).
    if parent.len() > 55 && std::str::from_utf8(&parent[55..]).is_err() {
        return None;
    }
    let (trace_id, span_id) = (TraceId::from(trace), SpanId::from(span));
    let state = trace_state(headers).unwrap_or_default();
    let cx = SpanContext::new(trace_id, span_id, TraceFlags::new(flags & 1), true, state);
    cx.is_valid().then_some(cx)
}

/// Every `tracestate` header joined (W3C: several headers are one list), if
/// the whole list is valid and within the limits.
fn trace_state(headers: &Headers) -> Option<TraceState> {
    if !headers.contains_key(TRACESTATE) {
        return None;
    }
    let mut joined = String::new();
    for value in headers.get_all(TRACESTATE) {
        let value = value.as_str()?;
        if !joined.is_empty() {
            joined.push(',');
        }
        joined.push_str(value);
        if joined.len() > MAX_TRACESTATE {
            return None;
        }
    }
    // Printable ASCII only (the W3C grammar; opentelemetry's parser lets
    // control characters through in values).
    if !joined.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)) {
        return None;
    }
    let members = joined.split(',').filter(|m| !m.trim().is_empty()).count();
    if members > MAX_TRACESTATE_MEMBERS {
        return None;
    }
    TraceState::from_str(&joined).ok()
}

/// `messaging.message.id`: the message's id (span attribute only, never a
/// metric label).
const MESSAGE_ID: &str = "messaging.message.id";
/// `messaging.message.delivery_attempt` (span attribute only).
const DELIVERY_ATTEMPT: &str = "messaging.message.delivery_attempt";

/// The attributes a span gets when it is built (what a sampler sees), with
/// room for the two set afterwards on a recording span (id, attempt).
fn base(system: &'static str, destination: Value, operation: &'static str) -> Vec<KeyValue> {
    let mut attributes = Vec::with_capacity(7);
    attributes.push(KeyValue::new(SYSTEM, system));
    attributes.push(KeyValue::new(DESTINATION, destination));
    attributes.push(KeyValue::new(OPERATION, operation));
    attributes.push(KeyValue::new(OPERATION_TYPE, operation));
    attributes
}

/// A span builder with its fields set in place (the builder is large: each
/// `with_…` call moves it).
fn builder(name: &'static str, kind: SpanKind, attributes: Vec<KeyValue>) -> SpanBuilder {
    let mut builder = SpanBuilder::from_name(name);
    builder.span_kind = Some(kind);
    builder.attributes = Some(attributes);
    builder
}

/// `"<operation> <topic>"` without the formatting machinery.
fn span_name(operation: &str, topic: &str) -> String {
    let mut name = String::with_capacity(operation.len() + 1 + topic.len());
    name.push_str(operation);
    name.push(' ');
    name.push_str(topic);
    name
}

/// A context with a polybus span active, and whether that span records.
pub(super) struct Active {
    cx: Context,
    recording: bool,
}

/// `cx` with `span` active. A span that does not record (the sampler
/// dropped it) is carried by its span context alone: the API gives such a
/// span nothing to do (attributes, events, status and `end` are ignored; the
/// SDK calls no span processor for it), and its context is all that a child
/// span or an injected `traceparent` reads. That saves, per unsampled span,
/// the second box `Context::with_span` puts around the global API's boxed
/// span, and the clock reading and lock of its `end`.
fn with_span(cx: &Context, span: BoxedSpan) -> Active {
    if span.is_recording() {
        Active {
            cx: cx.with_span(span),
            recording: true,
        }
    } else {
        Active {
            cx: cx.with_remote_span_context(span.span_context().clone()),
            recording: false,
        }
    }
}

/// Ends the span of `active` (nothing for one that does not record), with
/// `error.type` and an error status when `error` names one.
fn end(active: &Active, error: Option<&'static str>) {
    if !active.recording {
        return;
    }
    let span = active.cx.span();
    if let Some(kind) = error {
        span.set_attribute(KeyValue::new(ERROR_TYPE, kind));
        span.set_status(Status::error(kind));
    }
    span.end();
}

/// Whether `tracer` makes spans at all: the global no-op provider's tracer
/// does not. Asked with a span whose sampling decision is given as `Drop`, so
/// an SDK tracer neither samples nor records nor exports it (and does not
/// call its sampler): it only gives it ids, which the no-op tracer does not
/// (its spans carry their parent's context, here none).
fn makes_spans(tracer: &BoxedTracer) -> bool {
    let mut probe = SpanBuilder::from_name("polybus tracer probe");
    probe.sampling_result = Some(SamplingResult {
        decision: SamplingDecision::Drop,
        attributes: Vec::new(),
        trace_state: TraceState::default(),
    });
    tracer
        .build_with_context(probe, &Context::new())
        .span_context()
        .is_valid()
}

/// The span names and destination of one topic, made once per topic for the
/// life of the process: a span builder takes its name as a
/// `Cow<'static, str>`, so a name borrowed from here costs no allocation per
/// span (an owned one did: two allocations per message even when the sampler
/// drops the span). Topics are a bounded set (they are metric labels too), and
/// so is this table.
struct TopicNames {
    topic: Box<str>,
    /// `send <topic>`.
    send: String,
    /// `process <topic>`.
    process: String,
    /// The topic as a shared attribute value (cloning it counts a reference).
    destination: Value,
}

/// The names of `topic`, made the first time any runner or send of the
/// process sees it.
fn topic_names(topic: &str) -> &'static TopicNames {
    static ALL: OnceLock<RwLock<HashMap<Box<str>, &'static TopicNames>>> = OnceLock::new();
    let all = ALL.get_or_init(RwLock::default);
    if let Some(found) = all.read().unwrap_or_else(|p| p.into_inner()).get(topic) {
        return found;
    }
    let mut all = all.write().unwrap_or_else(|p| p.into_inner());
    all.entry(topic.into()).or_insert_with(|| {
        Box::leak(Box::new(TopicNames {
            topic: topic.into(),
            send: span_name("send", topic),
            process: span_name("process", topic),
            destination: Value::from(std::sync::Arc::<str>::from(topic)),
        }))
    })
}

thread_local! {
    /// The names of the topic this thread last sent to in a trace (a hit is
    /// one string comparison, no lock).
    static LAST_SENT: std::cell::Cell<Option<&'static TopicNames>> = const { std::cell::Cell::new(None) };
}

/// [`topic_names`] for a send, through this thread's last entry.
fn sent_topic(topic: &str) -> &'static TopicNames {
    LAST_SENT.with(|last| match last.get() {
        Some(names) if *names.topic == *topic => names,
        _ => {
            let names = topic_names(topic);
            last.set(Some(names));
            names
        }
    })
}

/// The tracer of a runner's `process` and dead-letter spans and what they
/// share, made once when the runner starts.
///
/// The tracer is the global provider's at that moment (like the metric
/// handles, which belong to the recorder installed then): install the tracer
/// provider before starting runners. With the no-op provider there is no
/// tracer, and a handler attempt runs in the producer's context (extracted
/// from the delivery) without a span of its own, so what the handler sends
/// still carries the incoming `traceparent` unchanged, as it did through the
/// no-op tracer's spans.
pub(crate) struct RunnerTracer {
    /// `None`: the global provider was the no-op one.
    tracer: Option<BoxedTracer>,
    system: &'static str,
    group: Option<Value>,
    /// The runner's first topic (no lock on the per-message path).
    first: OnceLock<&'static TopicNames>,
}

impl RunnerTracer {
    /// The global provider's tracer (none for the no-op provider), for a
    /// runner on `system` in `group`.
    pub(crate) fn new(system: &'static str, group: Option<&str>) -> Self {
        let tracer = global::tracer(SCOPE);
        RunnerTracer {
            tracer: makes_spans(&tracer).then_some(tracer),
            system,
            group: group.map(|g| Value::from(std::sync::Arc::<str>::from(g))),
            first: OnceLock::new(),
        }
    }

    /// The names of `topic`'s spans.
    fn topic(&self, topic: &str) -> &'static TopicNames {
        let first = *self.first.get_or_init(|| topic_names(topic));
        if *first.topic == *topic {
            first
        } else {
            topic_names(topic)
        }
    }

    /// Runs one handler attempt inside a `process <topic>` CONSUMER span,
    /// child of the producer's context carried by the delivery (a new trace
    /// without one). The span's id and attempt attributes are set only when
    /// the span records (the sampler kept it).
    pub(crate) async fn process<T>(
        &self,
        delivery: &Delivery,
        attempt: impl Future<Output = T>,
        error: impl FnOnce(&T) -> Option<&'static str>,
    ) -> T {
        let parent = match extract(&delivery.message().headers) {
            Some(remote) => Context::new().with_remote_span_context(remote),
            None => Context::new(),
        };
        let Some(tracer) = &self.tracer else {
            // No tracer: no span; the handler runs in the producer's context.
            return attempt.with_context(parent).await;
        };
        let names = self.topic(delivery.topic());
        let mut attributes = base(self.system, names.destination.clone(), "process");
        if let Some(group) = &self.group {
            attributes.push(KeyValue::new(GROUP, group.clone()));
        }
        let mut span = tracer.build_with_context(
            builder(names.process.as_str(), SpanKind::Consumer, attributes),
            &parent,
        );
        if span.is_recording() {
            span.set_attribute(KeyValue::new(MESSAGE_ID, delivery.id().to_owned()));
            span.set_attribute(KeyValue::new(DELIVERY_ATTEMPT, i64::from(delivery.attempt())));
        }
        let active = with_span(&parent, span);
        let result = attempt.with_context(active.cx.clone()).await;
        end(&active, error(&result));
        result
    }

    /// Publishes a dead letter inside a `send <dead-letter topic>` PRODUCER
    /// span linked to the original's context (the copy keeps the original
    /// headers).
    pub(crate) async fn dead_letter(
        &self,
        dead_letter_topic: &str,
        delivery: &Delivery,
        publish: impl Future<Output = Result<()>>,
    ) -> Result<()> {
        let Some(tracer) = &self.tracer else {
            return publish.with_context(Context::new()).await;
        };
        let names = topic_names(dead_letter_topic);
        let attributes = base(self.system, names.destination.clone(), "send");
        let mut builder = builder(names.send.as_str(), SpanKind::Producer, attributes);
        if let Some(original) = extract(&delivery.message().headers) {
            builder.links = Some(vec![Link::with_context(original)]);
        }
        let span = tracer.build_with_context(builder, &Context::new());
        let active = with_span(&Context::new(), span);
        let result = publish.with_context(active.cx.clone()).await;
        end(&active, result.as_ref().err().map(|e: &Error| error_type(e)));
        result
    }
}

/// Starts a `send <topic>` PRODUCER span when the current context is inside
/// a trace (has a valid span context) and writes the span's context into the
/// message's headers; returns the context to publish in (end it with [`end`]).
/// Outside a trace, `None` and the message unchanged.
///
/// The tracer is the global provider's at each send (a producer has no state
/// of its own to keep one in); the span's name and destination are the
/// topic's shared ones, and the message id attribute is set only when the
/// span records, so an unsampled span allocates only what the SDK needs.
pub(super) fn start_send(system: &'static str, topic: &str, message: &mut Message) -> Option<Active> {
    let current = Context::map_current(|cx| cx.span().span_context().is_valid().then(|| cx.clone()))?;
    let names = sent_topic(topic);
    let tracer = global::tracer(SCOPE);
    let attributes = base(system, names.destination.clone(), "send");
    let mut span = tracer.build_with_context(
        builder(names.send.as_str(), SpanKind::Producer, attributes),
        &current,
    );
    if span.is_recording() {
        span.set_attribute(KeyValue::new(MESSAGE_ID, message.id.clone()));
    }
    let span_context = span.span_context().clone();
    if span_context.is_valid() {
        message.headers.insert(TRACEPARENT, traceparent(&span_context));
        let state = span_context.trace_state().header();
        if state.is_empty() {
            message.headers.remove(TRACESTATE);
        } else {
            message.headers.insert(TRACESTATE, state);
        }
    }
    Some(with_span(&current, span))
}

/// Runs `publish` (the send of a message [`start_send`] prepared) in the
/// span's context, then ends the span.
pub(super) async fn in_span(active: Active, publish: impl Future<Output = Result<()>>) -> Result<()> {
    let result = publish.with_context(active.cx.clone()).await;
    end(&active, result.as_ref().err().map(error_type));
    result
}

/// Sends `message` through `publish` inside a `send <topic>` PRODUCER span,
/// with the span's context written into the message's headers. Outside a
/// trace, sends it unchanged. (What `observe::send` does, for the tests.)
#[cfg(test)]
async fn send<F, Fut>(system: &'static str, topic: &str, mut message: Message, publish: F) -> Result<()>
where
    F: FnOnce(Message) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    match start_send(system, topic, &mut message) {
        Some(active) => in_span(active, publish(message)).await,
        None => publish(message).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(parent: &str, state: Option<&str>) -> Headers {
        let mut h = Headers::new();
        h.insert(TRACEPARENT, parent);
        if let Some(state) = state {
            h.insert(TRACESTATE, state);
        }
        h
    }

    /// The split-based parser `parse_traceparent` replaced, kept as the
    /// reference it must agree with.
    fn reference(parent: &str) -> Option<(u128, u64, u8)> {
        fn is_lower_hex(s: &str, len: usize) -> bool {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        }
        let mut parts = parent.split('-');
        let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if !is_lower_hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        if !is_lower_hex(trace, 32) || !is_lower_hex(span, 16) || !is_lower_hex(flags, 2) {
            return None;
        }
        Some((
            u128::from_str_radix(trace, 16).ok()?,
            u64::from_str_radix(span, 16).ok()?,
            u8::from_str_radix(flags, 16).ok()?,
        ))
    }

    #[test]
    fn the_positional_parser_agrees_with_the_split_one() {
        const ALPHABET: &[u8] = b"0123456789abcdefABF-xff -\t\xc3\xa9";
        let base = PARENT.as_bytes().to_vec();
        let mut checked = 0;
        for round in 0..20_000 {
            let mut b = base.clone();
            // Versions 00, 01, ff and random ones, with mutations, cuts and tails.
            match round % 4 {
                0 => b[..2].copy_from_slice(b"01"),
                1 => b[..2].copy_from_slice(b"ff"),
                _ => {}
            }
            for _ in 0..fastrand::usize(0..3) {
                let i = fastrand::usize(..b.len());
                b[i] = ALPHABET[fastrand::usize(..ALPHABET.len())];
            }
            match fastrand::u8(..6) {
                0 => b.truncate(fastrand::usize(..=b.len())),
                1 => b.extend_from_slice(b"-extra"),
                2 => b.push(ALPHABET[fastrand::usize(..ALPHABET.len())]),
                3 => b.insert(fastrand::usize(..b.len()), b'-'),
                _ => {}
            }
            let Ok(text) = std::str::from_utf8(&b) else {
                continue;
            };
            assert_eq!(parse_traceparent(text.as_bytes()), reference(text), "{text:?}");
            checked += 1;
        }
        assert!(checked > 10_000);
        for ok in [
            PARENT,
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ] {
            assert!(parse_traceparent(ok.as_bytes()).is_some() && reference(ok).is_some());
        }
    }

    #[test]
    fn traceparent_round_trips() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = extract(&headers(parent, Some("congo=t61rcWkgMzE"))).unwrap();
        assert!(cx.is_sampled() && cx.is_remote());
        assert_eq!(traceparent(&cx), parent);
        assert_eq!(cx.trace_state().header(), "congo=t61rcWkgMzE");
        // Spaces and tabs around the value are not part of it.
        let padded = extract(&headers(&format!(" \t{parent}\t "), None)).unwrap();
        assert_eq!(traceparent(&padded), parent);
        assert!(extract(&headers(&format!("\n{parent}"), None)).is_none());
    }

    /// Headers as a foreign producer may write them: raw values, repeated keys.
    fn raw(entries: &[(&str, &[u8])]) -> Headers {
        let mut h = Headers::new();
        for (k, v) in entries {
            h.append(
                *k,
                crate::headers::HeaderValue::Bytes(bytes::Bytes::copy_from_slice(v)),
            );
        }
        h
    }

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn foreign_traceparents_that_are_not_one_valid_value_are_no_parent() {
        let other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        for (what, headers) in [
            (
                "not UTF-8",
                raw(&[(
                    TRACEPARENT,
                    b"00-4bf92f3577b34da6a3ce929d0e0e47\xff6-00f067aa0ba902b7-01",
                )]),
            ),
            ("null", {
                let mut h = Headers::new();
                h.append(TRACEPARENT, crate::headers::HeaderValue::Null);
                h
            }),
            (
                "two different",
                raw(&[(TRACEPARENT, PARENT.as_bytes()), (TRACEPARENT, other.as_bytes())]),
            ),
            (
                "two equal",
                raw(&[(TRACEPARENT, PARENT.as_bytes()), (TRACEPARENT, PARENT.as_bytes())]),
            ),
            (
                "a valid one after a bad one",
                raw(&[(TRACEPARENT, b"garbage"), (TRACEPARENT, PARENT.as_bytes())]),
            ),
            ("huge", raw(&[(TRACEPARENT, "0".repeat(1 << 20).as_bytes())])),
            (
                "all-zero trace id",
                raw(&[(
                    TRACEPARENT,
                    b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                )]),
            ),
            (
                "a later version with a tail that is not UTF-8",
                raw(&[(
                    TRACEPARENT,
                    b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-\xff",
                )]),
            ),
            (
                "version ff",
                raw(&[(
                    TRACEPARENT,
                    b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )]),
            ),
        ] {
            assert!(extract(&headers).is_none(), "{what}");
        }
    }

    fn state_of(entries: &[(&str, &[u8])]) -> String {
        let mut all = vec![(TRACEPARENT, PARENT.as_bytes())];
        all.extend_from_slice(entries);
        let cx = extract(&raw(&all)).expect("the parent is valid");
        cx.trace_state().header()
    }

    #[test]
    fn a_tracestate_outside_the_grammar_or_the_limits_is_dropped_and_the_parent_kept() {
        // CR/LF would be copied into the headers of every message the handler sends.
        assert_eq!(state_of(&[(TRACESTATE, b"congo=t61r\r\nx-injected: 1")]), "");
        assert_eq!(state_of(&[(TRACESTATE, b"congo=t\x01")]), "");
        assert_eq!(state_of(&[(TRACESTATE, b"congo=\xff")]), "");
        // Over 512 characters, and over 32 members.
        let long = format!("congo={}", "a".repeat(250)) + &format!(",rojo={}", "b".repeat(250)) + ",x=y";
        assert!(long.len() > MAX_TRACESTATE);
        assert_eq!(state_of(&[(TRACESTATE, long.as_bytes())]), "");
        let many: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        assert_eq!(state_of(&[(TRACESTATE, many.join(",").as_bytes())]), "");
        let huge = "k=v,".repeat(1 << 18);
        assert_eq!(state_of(&[(TRACESTATE, huge.as_bytes())]), "");
        // Within the limits it is kept; several headers are one list.
        assert_eq!(
            state_of(&[(TRACESTATE, b"congo=t61rcWkgMzE")]),
            "congo=t61rcWkgMzE"
        );
        assert_eq!(
            state_of(&[
                (TRACESTATE, b"congo=t61rcWkgMzE"),
                (TRACESTATE, b"rojo=00f067aa0ba902b7")
            ]),
            "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
        );
    }

    /// What a handler sends inside the context of a foreign record carries only
    /// valid header values: its `tracestate` came from the record.
    #[test]
    fn a_foreign_tracestate_does_not_reach_the_handlers_sends() {
        let foreign = raw(&[
            (TRACEPARENT, PARENT.as_bytes()),
            (TRACESTATE, b"congo=t61r\r\nx-injected: 1"),
        ]);
        let remote = extract(&foreign).expect("the parent is valid");
        let cx = Context::new().with_remote_span_context(remote);
        let sent = std::sync::Mutex::new(None);
        let publish = |m: Message| {
            *sent.lock().unwrap() = Some(m);
            async { Ok(()) }
        };
        futures::executor::block_on(send("memory", "out", Message::new("reply"), publish).with_context(cx))
            .unwrap();
        let sent = sent.lock().unwrap().take().expect("published");
        let parent = sent.headers.get(TRACEPARENT).expect("in the caller's trace");
        assert!(
            parent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{parent}"
        );
        for (key, value) in sent.headers.iter() {
            let value = value.as_str().expect("text");
            assert!(
                crate::names::validate_header_value(key, value).is_ok(),
                "{key}: {value:?}"
            );
        }
    }

    #[test]
    fn traceparent_is_lower_hex_of_the_ids() {
        for _ in 0..200 {
            let (trace, span, flags) = (fastrand::u128(1..), fastrand::u64(1..), fastrand::u8(..) & 1);
            let cx = SpanContext::new(
                TraceId::from(trace),
                SpanId::from(span),
                TraceFlags::new(flags),
                false,
                TraceState::default(),
            );
            assert_eq!(
                traceparent(&cx),
                format!("00-{trace:032x}-{span:016x}-{flags:02x}")
            );
        }
    }

    #[test]
    fn bad_traceparents_are_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(extract(&headers(bad, None)).is_none(), "{bad:?}");
        }
        // A later version may carry more fields.
        assert!(
            extract(&headers(
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
                None
            ))
            .is_some()
        );
    }
}
