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

/// The pipelining depths a bench runs at (sends in flight, prefetch): the
/// comma-separated `POLYBUS_BENCH_DEPTH`, by default 256 and 1,000.
pub fn depths() -> Vec<usize> {
    list_or("POLYBUS_BENCH_DEPTH", &[256, 1000])
}

/// `name` from the environment as a comma-separated list of numbers, or `default`.
pub fn list_or(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.split(',')
                .filter_map(|x| x.trim().parse().ok())
                .collect::<Vec<_>>()
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_vec())
}

/// The size of every benchmark message.
pub const PAYLOAD_BYTES: usize = 100;

/// A 100-byte payload whose first 8 bytes are `seq` (little endian): consumers
/// read it back to count what they lost and what they got twice.
pub fn payload(seq: usize) -> Bytes {
    let mut bytes = vec![b'x'; PAYLOAD_BYTES];
    bytes[..8].copy_from_slice(&(seq as u64).to_le_bytes());
    Bytes::from(bytes)
}

/// The sequence number [`payload`] wrote.
pub fn seq_of(payload: &[u8]) -> usize {
    payload
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(usize::MAX, |b| u64::from_le_bytes(b) as usize)
}

/// A fresh id in polybus's format (what a same-wire raw loop sends).
pub fn wire_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Which of `n` sequence numbers a consumer has seen, shared by its tasks.
#[derive(Debug)]
pub struct Seen {
    bits: Vec<std::sync::atomic::AtomicU64>,
    distinct: AtomicUsize,
    duplicates: AtomicUsize,
    foreign: AtomicUsize,
    n: usize,
    done: Notify,
}

/// What a consumer got beyond or short of `n` distinct messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Check {
    /// Messages never received (by the time the consumer gave up).
    pub lost: usize,
    /// Messages received more than once.
    pub duplicated: usize,
}

impl Seen {
    /// Nothing seen of `n`.
    pub fn new(n: usize) -> Arc<Self> {
        Arc::new(Seen {
            bits: (0..n.div_ceil(64)).map(|_| Default::default()).collect(),
            distinct: AtomicUsize::new(0),
            duplicates: AtomicUsize::new(0),
            foreign: AtomicUsize::new(0),
            n,
            done: Notify::new(),
        })
    }

    /// Marks the message with this payload seen; true when it was the last
    /// one missing.
    pub fn mark(&self, payload: &[u8]) -> bool {
        let seq = seq_of(payload);
        if seq >= self.n {
            self.foreign.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let bit = 1u64 << (seq % 64);
        if self.bits[seq / 64].fetch_or(bit, Ordering::Relaxed) & bit != 0 {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if self.distinct.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
            self.done.notify_one();
            return true;
        }
        false
    }

    /// Whether every message has been seen.
    pub fn complete(&self) -> bool {
        self.distinct.load(Ordering::Acquire) >= self.n
    }

    /// Waits until every message has been seen, or until nothing new arrived
    /// for `idle`.
    pub async fn wait(&self, idle: Duration) {
        loop {
            let before = self.distinct.load(Ordering::Acquire);
            if before >= self.n {
                return;
            }
            let notified = self.done.notified();
            if self.complete() {
                return;
            }
            if tokio::time::timeout(idle, notified).await.is_err()
                && self.distinct.load(Ordering::Acquire) == before
            {
                return;
            }
        }
    }

    /// Lost and duplicated so far (a message from outside `0..n` counts as a
    /// duplicate).
    pub fn check(&self) -> Check {
        Check {
            lost: self.n - self.distinct.load(Ordering::Acquire).min(self.n),
            duplicated: self.duplicates.load(Ordering::Relaxed) + self.foreign.load(Ordering::Relaxed),
        }
    }
}

/// How long a bench consumer waits with no new message before it reports the
/// rest lost.
pub const IDLE: Duration = Duration::from_secs(30);

/// Sends [`payload`]s `0..n` to `topic` through polybus, `in_flight` sends
/// pipelined, each resolving on the broker's confirmation.
pub async fn publish_seq(conn: &Connection, topic: &str, n: usize, in_flight: usize) -> Duration {
    let began = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let message = Message::new(payload(i));
            async move { conn.producer.send(topic, message).await.expect("send") }
        })
        .buffer_unordered(in_flight)
        .for_each(|_| async {})
        .await;
    began.elapsed()
}

/// Drains [`payload`]s `0..n` of `group` on `topic` through the runner
/// (unordered, `concurrency` handlers, `bound` held at most) with a handler that
/// only marks what it saw; returns the time until the last one was handled and
/// what was lost or duplicated (duplicates counted until shutdown).
pub async fn consume_seq(
    conn: &Connection,
    topic: &str,
    group: &str,
    n: usize,
    concurrency: usize,
    bound: usize,
) -> (Duration, Check) {
    let seen = Seen::new(n);
    let began = Instant::now();
    let handle = conn
        .runner()
        .topic(topic)
        .group(group)
        .order(Order::Unordered)
        .concurrency(concurrency)
        .buffer(bound.saturating_sub(concurrency))
        .run({
            let seen = Arc::clone(&seen);
            move |d: Delivery| {
                seen.mark(d.payload());
                async { HandlerResult::Ok(()) }
            }
        })
        .await
        .expect("run");
    seen.wait(IDLE).await;
    let took = began.elapsed();
    handle.shutdown(Duration::from_secs(10)).await;
    (took, seen.check())
}

/// The variants a broker bench compares, in table order.
pub const VARIANTS: [&str; 3] = ["raw", "same-wire raw", "polybus"];

/// The order the three variants run in for `run`: each goes first, second and
/// third in turn, so drift in the machine hits all of them. For profiling,
/// `POLYBUS_BENCH_VARIANTS` (comma-separated indexes into [`VARIANTS`]) runs
/// only some (the others are reported as 0 msg/s).
pub fn order(run: usize) -> Vec<usize> {
    let r = run % 3;
    let only = list_or("POLYBUS_BENCH_VARIANTS", &[0, 1, 2]);
    [r, (r + 1) % 3, (r + 2) % 3]
        .into_iter()
        .filter(|v| only.contains(v))
        .collect()
}

/// The CPU time this process has used so far (user and system, every thread;
/// clock-tick resolution). The broker's own CPU is not in it.
pub fn cpu_time() -> Duration {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            // Fields after the command name, which is in parentheses.
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = fields.get(11)?.parse().ok()?;
            let stime: u64 = fields.get(12)?.parse().ok()?;
            Some(utime + stime)
        })
        .unwrap_or(0);
    // Linux reports in USER_HZ, 100 per second on every common configuration.
    Duration::from_millis(ticks * 10)
}

/// Publish and consume+ack rates of the three variants over runs, at one depth,
/// and the client CPU each used per message.
#[derive(Debug)]
pub struct Table {
    title: String,
    n: usize,
    publish: [Vec<f64>; 3],
    consume: [Vec<f64>; 3],
    publish_cpu: [Vec<f64>; 3],
    consume_cpu: [Vec<f64>; 3],
    bad: Vec<String>,
}

impl Table {
    /// An empty table for `title`, `n` messages per measurement.
    pub fn new(title: impl Into<String>, n: usize) -> Self {
        Table {
            title: title.into(),
            n,
            publish: Default::default(),
            consume: Default::default(),
            publish_cpu: Default::default(),
            consume_cpu: Default::default(),
            bad: Vec::new(),
        }
    }

    /// Records one run (durations indexed like [`VARIANTS`]) and prints it.
    pub fn record(&mut self, run: usize, publish: [Duration; 3], consume: [(Duration, Check); 3]) {
        let rate = |d: Duration| {
            if d.is_zero() {
                0.0
            } else {
                self.n as f64 / d.as_secs_f64()
            }
        };
        let mut line = format!("  run {run}:");
        for v in 0..3 {
            let (p, (c, check)) = (rate(publish[v]), (rate(consume[v].0), consume[v].1));
            self.publish[v].push(p);
            self.consume[v].push(c);
            line += &format!(" {} {:.0}/{:.0}", VARIANTS[v], p, c);
            if check != Check::default() {
                let note = format!(
                    "run {run} {}: {} lost, {} duplicated",
                    VARIANTS[v], check.lost, check.duplicated
                );
                line += &format!(" [{note}]");
                self.bad.push(note);
            }
        }
        println!("{line} (publish/consume msg/s)");
    }

    /// Records one run's client CPU time per variant (indexed like [`VARIANTS`]).
    pub fn record_cpu(&mut self, publish: [Duration; 3], consume: [Duration; 3]) {
        let per_message = |d: Duration| d.as_secs_f64() * 1e6 / self.n as f64;
        for v in 0..3 {
            self.publish_cpu[v].push(per_message(publish[v]));
            self.consume_cpu[v].push(per_message(consume[v]));
        }
    }

    /// Prints the medians and the ratios of polybus to both raw baselines as a
    /// Markdown table.
    pub fn report(&self) {
        let runs = self.publish[0].len();
        println!(
            "\n{} — median of {runs} runs, {} messages each",
            self.title, self.n
        );
        println!(
            "| measurement | raw msg/s | same-wire raw msg/s | polybus msg/s | polybus / raw | polybus / same-wire |"
        );
        println!("|---|---:|---:|---:|---:|---:|");
        for (name, rates) in [("publish", &self.publish), ("consume + ack", &self.consume)] {
            let [raw, wire, pb] = [0, 1, 2].map(|v| median(rates[v].clone()));
            println!(
                "| {name} | {raw:.0} | {wire:.0} | {pb:.0} | **{:.2}** | **{:.2}** |",
                pb / raw,
                pb / wire
            );
        }
        if !self.publish_cpu[0].is_empty() {
            println!(
                "\nclient CPU per message (µs, user + system, every thread of the bench process; median):"
            );
            println!("| measurement | raw | same-wire raw | polybus |");
            println!("|---|---:|---:|---:|");
            for (name, cpu) in [
                ("publish", &self.publish_cpu),
                ("consume + ack", &self.consume_cpu),
            ] {
                let [raw, wire, pb] = [0, 1, 2].map(|v| median(cpu[v].clone()));
                println!("| {name} | {raw:.1} | {wire:.1} | {pb:.1} |");
            }
        }
        if self.bad.is_empty() {
            println!("every run: 0 lost, 0 duplicated\n");
        } else {
            println!("NOT CLEAN: {}\n", self.bad.join("; "));
        }
    }
}
