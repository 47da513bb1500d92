//! Trace context across the broker (polybus's `opentelemetry` feature): a
//! message sent inside a span is handled inside a span of the same trace, on
//! every backend; retries and dead letters keep the trace.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use opentelemetry::context::FutureExt;
use opentelemetry::trace::{Span, SpanId, SpanKind, TraceContextExt, TraceId, Tracer};
use opentelemetry::{Context, global};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use polybus_core::{Delivery, HandlerError, Message};

use crate::cases::{dead_letter_listener, index_of, numbered};
use crate::{CaseResult, Ctx, Harness, Outcome, Recorder};

/// What a handler attempt saw: the message's index, its current trace and the
/// `traceparent` header.
type Seen = (usize, TraceId, Option<String>);

/// Every span ended in this process, kept in memory.
#[derive(Debug, Clone, Default)]
struct Spans(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Spans {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).extend(batch);
        Ok(())
    }
}

impl Spans {
    fn in_trace(&self, trace: TraceId) -> Vec<SpanData> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|s| s.span_context.trace_id() == trace)
            .cloned()
            .collect()
    }
}

/// Installs (once per process) a global tracer provider that keeps every span.
fn spans() -> Spans {
    static SPANS: OnceLock<Spans> = OnceLock::new();
    SPANS
        .get_or_init(|| {
            let spans = Spans::default();
            let provider = SdkTracerProvider::builder()
                .with_simple_exporter(spans.clone())
                .build();
            global::set_tracer_provider(provider);
            spans
        })
        .clone()
}

/// A message sent inside a span is handled inside a span of the same trace:
/// the producer's `send <topic>` span is a child of the caller's span and its
/// context travels as `traceparent`; each handler attempt runs in a `process
/// <topic>` span whose parent is the producer's span (a retry too); a dead
/// letter keeps the original `traceparent` byte-exact and its publish span
/// links to it.
pub async fn trace_crosses_the_broker<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let spans = spans();
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "trace").await?;
    let (dead, dlq_handle) = dead_letter_listener(&cx, &conn, &topic).await?;
    // Message 0 fails once (retryable) then succeeds; message 1 fails permanently.
    let failed_once = Arc::new(Mutex::new(false));
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let handled = Recorder::new();
    let handler = {
        let (failed_once, seen, handled) = (Arc::clone(&failed_once), Arc::clone(&seen), handled.clone());
        move |d: Delivery| {
            let (failed_once, seen, handled) = (Arc::clone(&failed_once), Arc::clone(&seen), handled.clone());
            async move {
                let index = index_of(&d);
                // The handler's own span, under whatever context the runner set.
                let tracer = global::tracer("conformance-handler");
                let span = tracer.start("handle");
                let trace = span.span_context().trace_id();
                drop(span);
                seen.lock()
                    .unwrap()
                    .push((index, trace, d.header("traceparent").map(str::to_owned)));
                match index {
                    0 if !std::mem::replace(&mut *failed_once.lock().unwrap(), true) => {
                        Err(HandlerError::retryable("first attempt fails"))
                    }
                    1 => Err(HandlerError::permanent("never valid")),
                    _ => {
                        handled.record(&d);
                        Ok(())
                    }
                }
            }
        }
    };
    let handle = cx.runner(&conn, &topic, &group).run(handler).await?;

    // Each message is sent inside its own root span.
    let tracer = global::tracer("conformance");
    let mut roots: Vec<(TraceId, SpanId)> = Vec::new();
    for i in 0..2 {
        let root = tracer.start(format!("root {i}"));
        let ids = (root.span_context().trace_id(), root.span_context().span_id());
        let root_cx = Context::current_with_span(root);
        let message: Message = numbered("trace", i);
        conn.producer
            .send(&topic, message)
            .with_context(root_cx.clone())
            .await?;
        root_cx.span().end();
        roots.push(ids);
    }
    handled.wait_for(1, cx.secs(30.0)).await?;
    let dead_letters = dead.wait_for(1, cx.secs(30.0)).await?;
    handle.shutdown(cx.secs(10.0)).await;
    dlq_handle.shutdown(cx.secs(10.0)).await;

    let seen = seen.lock().unwrap().clone();
    let mut traceparents: HashMap<usize, String> = HashMap::new();
    for (i, (trace, root_span)) in roots.iter().enumerate() {
        let in_trace = spans.in_trace(*trace);
        let send_name = format!("send {topic}");
        let producer: Vec<&SpanData> = in_trace.iter().filter(|s| s.name == send_name).collect();
        assert_eq!(producer.len(), 1, "message {i}: one `send` span in its trace");
        let producer = producer[0];
        assert_eq!(producer.span_kind, SpanKind::Producer, "message {i}");
        assert_eq!(
            producer.parent_span_id, *root_span,
            "message {i}: `send` is a child of the caller's span"
        );
        let expected = format!("00-{}-{}-01", trace, producer.span_context.span_id());
        // What the handler saw: the producer's context, and its own span in the same trace.
        let attempts: Vec<_> = seen.iter().filter(|(index, _, _)| *index == i).collect();
        assert_eq!(
            attempts.len(),
            if i == 0 { 2 } else { 1 },
            "attempts of message {i}"
        );
        for (_, handler_trace, traceparent) in &attempts {
            assert_eq!(
                handler_trace, trace,
                "message {i}: the handler's span is in the producer's trace"
            );
            assert_eq!(
                traceparent.as_deref(),
                Some(expected.as_str()),
                "message {i}: traceparent"
            );
        }
        traceparents.insert(i, expected);
        let process_name = format!("process {topic}");
        let process: Vec<&SpanData> = in_trace.iter().filter(|s| s.name == process_name).collect();
        assert_eq!(
            process.len(),
            attempts.len(),
            "message {i}: one `process` span per attempt"
        );
        for span in &process {
            assert_eq!(span.span_kind, SpanKind::Consumer);
            assert_eq!(
                span.parent_span_id,
                producer.span_context.span_id(),
                "message {i}: `process` is a child of `send`"
            );
        }
        let handler_spans: Vec<&SpanData> = in_trace.iter().filter(|s| s.name == "handle").collect();
        assert_eq!(handler_spans.len(), attempts.len(), "message {i}: handler spans");
        for span in handler_spans {
            assert!(
                process
                    .iter()
                    .any(|p| p.span_context.span_id() == span.parent_span_id),
                "message {i}: the handler's span is a child of a `process` span"
            );
        }
    }
    // The dead letter keeps the original traceparent byte-exact, and its
    // publish links to the original context.
    let dead_letter = &dead_letters[0];
    assert_eq!(index_of(dead_letter), 1);
    assert_eq!(
        dead_letter.header("traceparent"),
        traceparents.get(&1).map(String::as_str),
        "the dead letter keeps the original traceparent"
    );
    let (trace, _) = roots[1];
    let dlq_send = format!("send {}", polybus_core::names::dead_letter_topic(&topic));
    let all = spans.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let linked = all.iter().any(|s| {
        s.name == dlq_send
            && s.span_kind == SpanKind::Producer
            && s.links.links.iter().any(|l| l.span_context.trace_id() == trace)
    });
    assert!(linked, "the dead-letter publish span links to the original trace");
    Ok(Outcome::Passed)
}
