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
//! instrumentation scope `polybus`.

use std::future::Future;
use std::str::FromStr;

use opentelemetry::context::FutureExt;
use opentelemetry::trace::{
    Link, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
};
use opentelemetry::{Context, KeyValue, global};

use super::{DESTINATION, ERROR_TYPE, GROUP, OPERATION, OPERATION_TYPE, SYSTEM, error_type};
use crate::error::{Error, Result};
use crate::headers::Headers;
use crate::message::{Delivery, Message};

/// The W3C Trace Context header with the trace id, parent span id and flags.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C Trace Context header with vendor-specific trace state.
pub const TRACESTATE: &str = "tracestate";

const SCOPE: &str = "polybus";

/// `traceparent` for a span context (version 00), hex-encoded by hand (what
/// `format!` with the ids' `Display` cost was about a tenth of the traced
/// core path, see BENCHMARKS.md).
fn traceparent(cx: &SpanContext) -> String {
    let mut out = String::with_capacity(55);
    out.push_str("00-");
    push_hex(&mut out, &cx.trace_id().to_bytes());
    out.push('-');
    push_hex(&mut out, &cx.span_id().to_bytes());
    out.push('-');
    push_hex(&mut out, &[cx.trace_flags().to_u8()]);
    out
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
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
    let mut parts = parent.split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    // Version 00 has exactly four fields; later versions may append more.
    if !is_lower_hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if !is_lower_hex(trace, 32) || !is_lower_hex(span, 16) || !is_lower_hex(flags, 2) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
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

fn base(system: &'static str, topic: &str, operation: &'static str) -> Vec<KeyValue> {
    vec![
        KeyValue::new(SYSTEM, system),
        KeyValue::new(DESTINATION, topic.to_owned()),
        KeyValue::new(OPERATION, operation),
        KeyValue::new(OPERATION_TYPE, operation),
    ]
}

fn end(cx: &Context, error: Option<&'static str>) {
    let span = cx.span();
    if let Some(kind) = error {
        span.set_attribute(KeyValue::new(ERROR_TYPE, kind));
        span.set_status(Status::error(kind));
    }
    span.end();
}

/// Sends `message` through `publish` inside a `send <topic>` PRODUCER span,
/// with the span's context written into the message's headers. Outside a
/// trace, sends it unchanged.
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
    let current = Context::current();
    if !current.span().span_context().is_valid() {
        return publish(message).await;
    }
    let mut attributes = base(system, topic, "send");
    attributes.push(KeyValue::new("messaging.message.id", message.id.clone()));
    let tracer = global::tracer(SCOPE);
    let span = tracer
        .span_builder(format!("send {topic}"))
        .with_kind(SpanKind::Producer)
        .with_attributes(attributes)
        .start_with_context(&tracer, &current);
    let cx = current.with_span(span);
    let span_context = cx.span().span_context().clone();
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

/// Runs one handler attempt inside a `process <topic>` CONSUMER span, child of
/// the producer's context carried by the delivery (a new trace without one).
pub(crate) async fn process<T>(
    system: &'static str,
    group: Option<&str>,
    delivery: &Delivery,
    attempt: impl Future<Output = T>,
    error: impl FnOnce(&T) -> Option<&'static str>,
) -> T {
    let parent = match extract(&delivery.message().headers) {
        Some(remote) => Context::new().with_remote_span_context(remote),
        None => Context::new(),
    };
    let mut attributes = base(system, delivery.topic(), "process");
    if let Some(group) = group {
        attributes.push(KeyValue::new(GROUP, group.to_owned()));
    }
    attributes.push(KeyValue::new("messaging.message.id", delivery.id().to_owned()));
    attributes.push(KeyValue::new(
        "messaging.message.delivery_attempt",
        i64::from(delivery.attempt()),
    ));
    let tracer = global::tracer(SCOPE);
    let span = tracer
        .span_builder(format!("process {}", delivery.topic()))
        .with_kind(SpanKind::Consumer)
        .with_attributes(attributes)
        .start_with_context(&tracer, &parent);
    let cx = parent.with_span(span);
    let result = attempt.with_context(cx.clone()).await;
    end(&cx, error(&result));
    result
}

/// Publishes a dead letter inside a `send <dead-letter topic>` PRODUCER span
/// linked to the original's context (the copy keeps the original headers).
pub(crate) async fn dead_letter(
    system: &'static str,
    dead_letter_topic: &str,
    delivery: &Delivery,
    publish: impl Future<Output = Result<()>>,
) -> Result<()> {
    let mut builder = global::tracer(SCOPE)
        .span_builder(format!("send {dead_letter_topic}"))
        .with_kind(SpanKind::Producer)
        .with_attributes(base(system, dead_letter_topic, "send"));
    if let Some(original) = extract(&delivery.message().headers) {
        builder = builder.with_links(vec![Link::with_context(original)]);
    }
    let tracer = global::tracer(SCOPE);
    let span = builder.start_with_context(&tracer, &Context::new());
    let cx = Context::new().with_span(span);
    let result = publish.with_context(cx.clone()).await;
    end(&cx, result.as_ref().err().map(|e: &Error| error_type(e)));
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
