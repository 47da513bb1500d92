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
use opentelemetry::global::BoxedTracer;
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
    let parent = parents.next()?.as_str()?.trim_matches([' ', '\t']);
    if parents.next().is_some() {
        // Several parents: none of them is the parent.
        return None;
    }
    let (trace, span, flags) = parse_traceparent(parent.as_bytes())?;
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

/// `"<operation> <topic>"` without the formatting machinery.
fn span_name(operation: &str, topic: &str) -> String {
    let mut name = String::with_capacity(operation.len() + 1 + topic.len());
    name.push_str(operation);
    name.push(' ');
    name.push_str(topic);
    name
}

fn end(cx: &Context, error: Option<&'static str>) {
    let span = cx.span();
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
    /// The runner's first topic, inline (no lock on the per-message path).
    first: OnceLock<TopicSpans>,
    topics: RwLock<HashMap<String, TopicSpans>>,
}

/// What every `process` span of one topic shares.
struct TopicSpans {
    topic: String,
    /// `process <topic>`.
    name: String,
    /// The topic as a shared attribute value.
    destination: Value,
}

impl TopicSpans {
    fn new(topic: &str) -> Self {
        TopicSpans {
            topic: topic.to_owned(),
            name: span_name("process", topic),
            destination: Value::from(std::sync::Arc::<str>::from(topic)),
        }
    }
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
            topics: RwLock::new(HashMap::new()),
        }
    }

    /// The span name and destination of `topic`'s `process` spans.
    fn topic(&self, topic: &str) -> (String, Value) {
        let pick = |t: &TopicSpans| (t.name.clone(), t.destination.clone());
        let first = self.first.get_or_init(|| TopicSpans::new(topic));
        if first.topic == topic {
            return pick(first);
        }
        if let Some(found) = self.topics.read().unwrap_or_else(|p| p.into_inner()).get(topic) {
            return pick(found);
        }
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        pick(
            topics
                .entry(topic.to_owned())
                .or_insert_with(|| TopicSpans::new(topic)),
        )
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
        let (name, destination) = self.topic(delivery.topic());
        let mut attributes = base(self.system, destination, "process");
        if let Some(group) = &self.group {
            attributes.push(KeyValue::new(GROUP, group.clone()));
        }
        let mut span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Consumer)
            .with_attributes(attributes)
            .start_with_context(tracer, &parent);
        if span.is_recording() {
            span.set_attribute(KeyValue::new(MESSAGE_ID, delivery.id().to_owned()));
            span.set_attribute(KeyValue::new(DELIVERY_ATTEMPT, i64::from(delivery.attempt())));
        }
        let cx = parent.with_span(span);
        let result = attempt.with_context(cx.clone()).await;
        end(&cx, error(&result));
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
        let destination = Value::from(dead_letter_topic.to_owned());
        let mut builder = tracer
            .span_builder(span_name("send", dead_letter_topic))
            .with_kind(SpanKind::Producer)
            .with_attributes(base(self.system, destination, "send"));
        if let Some(original) = extract(&delivery.message().headers) {
            builder = builder.with_links(vec![Link::with_context(original)]);
        }
        let span = builder.start_with_context(tracer, &Context::new());
        let cx = Context::new().with_span(span);
        let result = publish.with_context(cx.clone()).await;
        end(&cx, result.as_ref().err().map(|e: &Error| error_type(e)));
        result
    }
}

/// Whether the current context is inside a trace (has a valid span context):
/// only then does `send` start a span and write trace headers.
pub(crate) fn in_trace() -> bool {
    Context::map_current(|cx| cx.span().span_context().is_valid())
}

/// Sends `message` through `publish` inside a `send <topic>` PRODUCER span,
/// with the span's context written into the message's headers. Outside a
/// trace, sends it unchanged.
///
/// The tracer is the global provider's at each send (a producer has no state
/// of its own to keep one in); the message id attribute is set only when the
/// span records.
pub(crate) async fn send<F, Fut>(
    system: &'static str,
    topic: &str,
    mut message: Message,
    publish: F,
) -> Result<()>
where
    F: FnOnce(Message) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    if !in_trace() {
        return publish(message).await;
    }
    let current = Context::current();
    let tracer = global::tracer(SCOPE);
    let mut span = tracer
        .span_builder(span_name("send", topic))
        .with_kind(SpanKind::Producer)
        .with_attributes(base(system, Value::from(topic.to_owned()), "send"))
        .start_with_context(&tracer, &current);
    if span.is_recording() {
        span.set_attribute(KeyValue::new(MESSAGE_ID, message.id.clone()));
    }
    let span_context = span.span_context().clone();
    let cx = current.with_span(span);
    if span_context.is_valid() {
        message.headers.insert(TRACEPARENT, traceparent(&span_context));
        let state = span_context.trace_state().header();
        if state.is_empty() {
            message.headers.remove(TRACESTATE);
        } else {
            message.headers.insert(TRACESTATE, state);
        }
    }
    let result = publish(message).with_context(cx.clone()).await;
    end(&cx, result.as_ref().err().map(error_type));
    result
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
