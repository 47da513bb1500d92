//! The polybus side of the backend benchmarks (`backend-*/benches`), written once:
//! each bench compares these against its raw client on the same broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use polybus_core::{Bytes, Connection, Delivery, HandlerResult, Message, Order};
use tokio::sync::Notify;

/// `name` from the environment as a number, or `default`.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median (the upper one of an even count).
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Sends `n` messages of `payload` to `topic` with `in_flight` sends pipelined,
/// each resolving on the broker's confirmation; returns how long it took.
/// While [`observe`] is on, every send is made inside a span of one trace (as
/// a traced service sends), so each one starts a `send` span and carries
/// `traceparent`.
pub async fn publish(
    conn: &Connection,
    topic: &str,
    n: usize,
    payload: &Bytes,
    in_flight: usize,
) -> Duration {
    let began = Instant::now();
    #[cfg(all(feature = "metrics", feature = "opentelemetry"))]
    let traced = observed::caller_context();
    futures::stream::iter(0..n)
        .map(|_| {
            let message = Message::new(payload.clone());
            let send = async move { conn.producer.send(topic, message).await.expect("send") };
            #[cfg(all(feature = "metrics", feature = "opentelemetry"))]
            let send = {
                use opentelemetry::context::FutureExt;
                send.with_context(traced.clone())
            };
            send
        })
        .buffer_unordered(in_flight)
        .for_each(|_| async {})
        .await;
    began.elapsed()
}

/// Whether this build can turn observation on (the crate's `metrics` and
/// `opentelemetry` features).
pub fn observation_available() -> bool {
    cfg!(all(feature = "metrics", feature = "opentelemetry"))
}

/// Turns polybus's metrics and tracing on (`true`) or off for what starts
/// next: on, a `metrics` recorder keeps every series in atomics (what an
/// exporter keeps between scrapes) and an OpenTelemetry SDK tracer provider
/// samples every span into a batch exporter; off, the recorder hands out
/// no-op handles and the tracer provider is the no-op one (the hooks stay
/// compiled in). A runner registers its handles when it starts and `send` on
/// the first send of a topic on a thread, so measure each side on its own
/// topics. Does nothing without [`observation_available`].
pub fn observe(on: bool) {
    #[cfg(all(feature = "metrics", feature = "opentelemetry"))]
    observed::set(on);
    #[cfg(not(all(feature = "metrics", feature = "opentelemetry")))]
    let _ = on;
}

/// Drains `n` messages of `group` on `topic` through the runner (unordered,
/// `concurrency` handlers, `bound` held at most) with a no-op handler that the
/// runner acks; returns how long it took.
pub async fn consume(
    conn: &Connection,
    topic: &str,
    group: &str,
    n: usize,
    concurrency: usize,
    bound: usize,
) -> Duration {
    let count = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(Notify::new());
    let began = Instant::now();
    let handle = conn
        .runner()
        .topic(topic)
        .group(group)
        .order(Order::Unordered)
        .concurrency(concurrency)
        .buffer(bound.saturating_sub(concurrency))
        .run({
            let (count, done) = (Arc::clone(&count), Arc::clone(&done));
            move |_d: Delivery| {
                let (count, done) = (Arc::clone(&count), Arc::clone(&done));
                async move {
                    if count.fetch_add(1, Ordering::Relaxed) + 1 == n {
                        done.notify_one();
                    }
                    HandlerResult::Ok(())
                }
            }
        })
        .await
        .expect("run");
    done.notified().await;
    let took = began.elapsed();
    handle.shutdown(Duration::from_secs(10)).await;
    took
}

/// The multi-threaded runtime every backend bench runs in.
///
/// With this crate's `metrics` and `opentelemetry` features it first installs
/// the switchable recorder of [`observe`] (off).
pub fn runtime() -> tokio::runtime::Runtime {
    #[cfg(all(feature = "metrics", feature = "opentelemetry"))]
    observed::install();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// The measurements of a raw-against-polybus bench, run after run: sending
/// (raw, polybus) and consuming with acks (raw, polybus), each over `n`
/// messages, and polybus again with metrics and tracing on ([`observe`]).
#[derive(Debug)]
pub struct Rates {
    n: usize,
    runs: [Vec<f64>; 6],
}

impl Rates {
    /// Rates of measurements over `n` messages each.
    pub fn new(n: usize) -> Self {
        Rates {
            n,
            runs: Default::default(),
        }
    }

    fn rate(&self, d: Duration) -> f64 {
        self.n as f64 / d.as_secs_f64()
    }

    /// Records one run's durations (raw send, polybus send, raw consume,
    /// polybus consume) and prints them as rates.
    pub fn record(&mut self, run: usize, [raw_send, pb_send, raw_con, pb_con]: [Duration; 4]) {
        for (i, d) in [raw_send, pb_send, raw_con, pb_con].into_iter().enumerate() {
            let rate = self.rate(d);
            self.runs[i].push(rate);
        }
        println!(
            "run {run}: publish raw {:.0}/s polybus {:.0}/s | consume+ack raw {:.0}/s polybus {:.0}/s",
            self.rate(raw_send),
            self.rate(pb_send),
            self.rate(raw_con),
            self.rate(pb_con)
        );
    }

    /// Records one run's durations of polybus with metrics and tracing on
    /// (send, consume) and prints them as rates.
    pub fn record_observed(&mut self, run: usize, [send, consume]: [Duration; 2]) {
        let (send, consume) = (self.rate(send), self.rate(consume));
        self.runs[4].push(send);
        self.runs[5].push(consume);
        println!("run {run}: observed polybus: publish {send:.0}/s | consume+ack {consume:.0}/s");
    }

    /// Prints the median of every measurement and the polybus/raw ratios (and
    /// observed/plain polybus, when observed runs were recorded).
    pub fn report(self) {
        let [raw_send, pb_send, raw_con, pb_con, obs_send, obs_con] = self.runs.map(median);
        println!(
            "median publish:     raw {raw_send:.0}/s, polybus {pb_send:.0}/s, ratio {:.2}",
            pb_send / raw_send
        );
        println!(
            "median consume+ack: raw {raw_con:.0}/s, polybus {pb_con:.0}/s, ratio {:.2}",
            pb_con / raw_con
        );
        if !obs_send.is_nan() {
            println!(
                "observed (metrics + tracing) / plain polybus: publish {obs_send:.0}/s, ratio {:.3}; consume+ack {obs_con:.0}/s, ratio {:.3}",
                obs_send / pb_send,
                obs_con / pb_con
            );
        }
    }
}

/// The switchable observation of [`observe`].
#[cfg(all(feature = "metrics", feature = "opentelemetry"))]
mod observed {
    use std::sync::atomic::{AtomicBool, Ordering};

    use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
    use metrics_util::registry::{AtomicStorage, Registry};
    use opentelemetry::trace::{TraceContextExt, Tracer, TracerProvider as _};
    use opentelemetry::{Context, global};
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};

    static ON: AtomicBool = AtomicBool::new(false);

    /// Keeps every series in atomics (metrics-util's registry, the storage
    /// exporters use) while observation is on; no-op handles otherwise.
    struct Switch(Registry<Key, AtomicStorage>);

    impl Recorder for Switch {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            if !ON.load(Ordering::Acquire) {
                return Counter::noop();
            }
            self.0
                .get_or_create_counter(key, |c| Counter::from_arc(c.clone()))
        }

        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            if !ON.load(Ordering::Acquire) {
                return Gauge::noop();
            }
            self.0.get_or_create_gauge(key, |g| Gauge::from_arc(g.clone()))
        }

        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            if !ON.load(Ordering::Acquire) {
                return Histogram::noop();
            }
            self.0
                .get_or_create_histogram(key, |h| Histogram::from_arc(h.clone()))
        }
    }

    /// Drops every span (an exporter that sends nowhere: the cost measured is
    /// polybus's and the SDK's, not a network's).
    #[derive(Debug)]
    struct Discard;

    impl SpanExporter for Discard {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            drop(batch);
            Ok(())
        }
    }

    pub(super) fn install() {
        let _ = metrics::set_global_recorder(Switch(Registry::atomic()));
        polybus_core::observe::describe_metrics();
    }

    pub(super) fn set(on: bool) {
        ON.store(on, Ordering::Release);
        if on {
            let provider = SdkTracerProvider::builder().with_batch_exporter(Discard).build();
            global::set_tracer_provider(provider);
        } else {
            global::set_tracer_provider(opentelemetry::trace::noop::NoopTracerProvider::new());
        }
    }

    /// The context sends are made in: inside a span while observation is on.
    pub(super) fn caller_context() -> Context {
        if !ON.load(Ordering::Acquire) {
            return Context::new();
        }
        let tracer = global::tracer_provider().tracer("polybus-bench");
        Context::new().with_span(tracer.start("bench publish"))
    }
}
