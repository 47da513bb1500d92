//! What a handler sends carries the trace context it was handled in, whether a
//! tracer records or not: with the no-op tracer provider (the runner then
//! builds no `process` span) the handler's sends carry the incoming
//! `traceparent`/`tracestate` unchanged; with an SDK tracer, a sampled
//! delivery gets a recorded `process` span (id and attempt attributes
//! included) whose child `send` span is the reply's parent, and an unsampled
//! one still propagates its trace (flags `00`) with nothing exported.
//!
//! One test: the tracer provider is global to the process, and a runner takes
//! its tracer when it starts.
#![cfg(all(feature = "opentelemetry", feature = "memory"))]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::trace::{SpanId, SpanKind, TraceContextExt, TraceId};
use opentelemetry::{Context, Value, global};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use polybus::memory::MemoryBroker;
use polybus::{Connection, Delivery, HandlerResult, Message, StartFrom};
use tokio::sync::mpsc;

/// Every span ended, kept in memory.
#[derive(Debug, Clone, Default)]
struct Spans(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Spans {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

impl Spans {
    fn in_trace(&self, trace: TraceId) -> Vec<SpanData> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.span_context.trace_id() == trace)
            .cloned()
            .collect()
    }
}

/// What the relay's handler saw and what its reply carried.
#[derive(Debug)]
struct Relayed {
    /// The handler's current span context: (trace, span, sampled).
    current: (TraceId, SpanId, bool),
    /// The reply's `traceparent` and `tracestate` as consumed.
    traceparent: Option<String>,
    tracestate: Option<String>,
}

/// Starts (now, under the current global tracer provider) a runner on `in`
/// whose handler sends a reply to `out`, and a runner that collects the
/// replies; sends each message to `in` and returns what was relayed, in order.
async fn relay(run: &str, messages: Vec<Message>) -> Vec<Relayed> {
    let broker = MemoryBroker::new();
    let conn: Connection = broker.connection();
    let (topic_in, topic_out) = (format!("{run}.in"), format!("{run}.out"));
    for topic in [&topic_in, &topic_out] {
        conn.consumer
            .declare_group(topic, "g", StartFrom::Earliest)
            .await
            .expect("declare");
    }
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let relay = conn
        .runner()
        .topic(&topic_in)
        .group("g")
        .run({
            let (producer, topic_out) = (Arc::clone(&conn.producer), topic_out.clone());
            move |_d: Delivery| {
                let (producer, topic_out, seen_tx) =
                    (Arc::clone(&producer), topic_out.clone(), seen_tx.clone());
                async move {
                    let cx = Context::current();
                    let span = cx.span();
                    let sc = span.span_context();
                    seen_tx
                        .send((sc.trace_id(), sc.span_id(), sc.is_sampled()))
                        .unwrap();
                    producer
                        .send(&topic_out, Message::new("reply"))
                        .await
                        .expect("reply");
                    HandlerResult::Ok(())
                }
            }
        })
        .await
        .expect("run relay");
    let (reply_tx, mut reply_rx) = mpsc::unbounded_channel();
    let replies = conn
        .runner()
        .topic(&topic_out)
        .group("g")
        .run(move |d: Delivery| {
            let reply = (
                d.header("traceparent").map(str::to_owned),
                d.header("tracestate").map(str::to_owned),
            );
            reply_tx.send(reply).unwrap();
            async { HandlerResult::Ok(()) }
        })
        .await
        .expect("run replies");
    let mut relayed = Vec::new();
    for message in messages {
        conn.producer.send(&topic_in, message).await.expect("send");
        let wait = Duration::from_secs(10);
        let current = tokio::time::timeout(wait, seen_rx.recv()).await.unwrap().unwrap();
        let (traceparent, tracestate) = tokio::time::timeout(wait, reply_rx.recv())
            .await
            .unwrap()
            .unwrap();
        relayed.push(Relayed {
            current,
            traceparent,
            tracestate,
        });
    }
    relay.shutdown(Duration::from_secs(5)).await;
    replies.shutdown(Duration::from_secs(5)).await;
    relayed
}

const SAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const UNSAMPLED: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
const STATE: &str = "congo=t61rcWkgMzE";

fn incoming(traceparent: Option<&str>, tracestate: Option<&str>) -> Message {
    let mut message = Message::new("in");
    if let Some(parent) = traceparent {
        message = message.with_header("traceparent", parent);
    }
    if let Some(state) = tracestate {
        message = message.with_header("tracestate", state);
    }
    message
}

fn ids(traceparent: &str) -> (TraceId, SpanId, &str) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    (
        TraceId::from_hex(parts[1]).unwrap(),
        SpanId::from_hex(parts[2]).unwrap(),
        parts[3],
    )
}

fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handlers_sends_carry_its_trace_with_or_without_a_tracer() {
    // 1. No tracer provider installed (the global no-op one): no `process`
    // span is built, and the reply carries the incoming context unchanged.
    let relayed = relay(
        "noop",
        vec![
            incoming(Some(SAMPLED), Some(STATE)),
            incoming(Some(UNSAMPLED), None),
            incoming(None, None),
        ],
    )
    .await;
    for (i, parent) in [SAMPLED, UNSAMPLED].into_iter().enumerate() {
        let (trace, span, flags) = ids(parent);
        assert_eq!(relayed[i].current, (trace, span, flags == "01"), "message {i}");
        assert_eq!(relayed[i].traceparent.as_deref(), Some(parent), "message {i}");
    }
    assert_eq!(relayed[0].tracestate.as_deref(), Some(STATE));
    assert_eq!(relayed[1].tracestate, None);
    // Outside a trace the reply is sent as it is: no trace headers.
    assert_eq!(relayed[2].current.0, TraceId::INVALID);
    assert_eq!(
        (
            relayed[2].traceparent.as_deref(),
            relayed[2].tracestate.as_deref()
        ),
        (None, None)
    );

    // 2. An SDK tracer (its default sampler: parent-based, always on).
    let spans = Spans::default();
    global::set_tracer_provider(
        SdkTracerProvider::builder()
            .with_simple_exporter(spans.clone())
            .build(),
    );
    let relayed = relay(
        "sdk",
        vec![
            incoming(Some(SAMPLED), Some(STATE)),
            incoming(Some(UNSAMPLED), None),
        ],
    )
    .await;

    // Sampled: process (child of the producer's span) → send (its child) → the reply.
    let (trace, parent_span, _) = ids(SAMPLED);
    let reply = relayed[0].traceparent.as_deref().expect("a traceparent");
    let (reply_trace, reply_span, reply_flags) = ids(reply);
    assert_eq!((reply_trace, reply_flags), (trace, "01"));
    assert_eq!(relayed[0].tracestate.as_deref(), Some(STATE));
    let exported = spans.in_trace(trace);
    let process = exported
        .iter()
        .find(|s| s.name == "process sdk.in")
        .expect("a process span");
    assert_eq!(process.span_kind, SpanKind::Consumer);
    assert_eq!(process.parent_span_id, parent_span);
    assert!(process.parent_span_is_remote);
    assert_eq!(relayed[0].current, (trace, process.span_context.span_id(), true));
    for key in [
        "messaging.system",
        "messaging.destination.name",
        "messaging.operation.name",
        "messaging.operation.type",
        "messaging.consumer.group.name",
        "messaging.message.id",
        "messaging.message.delivery_attempt",
    ] {
        assert!(attribute(process, key).is_some(), "process has {key}");
    }
    assert_eq!(
        attribute(process, "messaging.destination.name"),
        Some(&Value::from("sdk.in"))
    );
    assert_eq!(
        attribute(process, "messaging.message.delivery_attempt"),
        Some(&Value::I64(1))
    );
    let send = exported
        .iter()
        .find(|s| s.name == "send sdk.out")
        .expect("a send span");
    assert_eq!(send.span_kind, SpanKind::Producer);
    assert_eq!(send.parent_span_id, process.span_context.span_id());
    assert_eq!(send.span_context.span_id(), reply_span);
    assert!(attribute(send, "messaging.message.id").is_some());

    // Unsampled: the trace still travels (flags 00), nothing is exported.
    let (trace, parent_span, _) = ids(UNSAMPLED);
    let reply = relayed[1].traceparent.as_deref().expect("a traceparent");
    let (reply_trace, reply_span, reply_flags) = ids(reply);
    assert_eq!((reply_trace, reply_flags), (trace, "00"));
    assert_ne!(
        reply_span, parent_span,
        "the reply's parent is the handler's send span"
    );
    assert_eq!(relayed[1].current.0, trace);
    assert!(!relayed[1].current.2);
    assert!(
        spans.in_trace(trace).is_empty(),
        "nothing exported for an unsampled trace"
    );
}
