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

/// Whether this build can turn observation on (the crate's `metrics` and
/// `opentelemetry` features).
pub fn observation_available() -> bool {
    cfg!(all(feature = "metrics", feature = "opentelemetry"))
}

/// Turns polybus's metrics and tracing on (`true`) or off for what starts
/// next: on, a `metrics` recorder keeps every series in atomics (what an
/// exporter keeps between scrapes) and an OpenTelemetry SDK tracer provider
/// samples every span (or a share of the traces, see [`sample_ratio`]) into
/// a batch exporter; off, the recorder hands out no-op handles and the tracer
/// provider is the no-op one (the hooks stay compiled in). A runner registers its handles when it starts and `send` on
/// the first send of a topic on a thread, so measure each side on its own
/// topics. Does nothing without [`observation_available`].
pub fn observe(on: bool) {
    #[cfg(all(feature = "metrics", feature = "opentelemetry"))]
    observed::set(on);
    #[cfg(not(all(feature = "metrics", feature = "opentelemetry")))]
    let _ = on;
}

/// Runs `measure` with observation on ([`observe`]) when `on`, turning it off
/// again afterwards; as is otherwise. The [`OBSERVED`] variant is the polybus
/// variant's code run through this.
pub async fn observing<F: std::future::Future>(on: bool, measure: F) -> F::Output {
    if !on {
        return measure.await;
    }
    observe(true);
    let out = measure.await;
    observe(false);
    out
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

/// The switchable observation of [`observe`].
#[cfg(all(feature = "metrics", feature = "opentelemetry"))]
mod observed {
    use std::sync::atomic::{AtomicBool, Ordering};

    use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
    use metrics_util::registry::{AtomicStorage, Registry};
    use opentelemetry::trace::{TraceContextExt, Tracer, TracerProvider as _};
    use opentelemetry::{Context, global};
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};

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
            let mut builder = SdkTracerProvider::builder().with_batch_exporter(Discard);
            if let Some(ratio) = super::sample_ratio() {
                builder =
                    builder.with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))));
            }
            global::set_tracer_provider(builder.build());
        } else {
            global::set_tracer_provider(opentelemetry::trace::noop::NoopTracerProvider::new());
        }
    }

    /// How many caller contexts [`caller_contexts`] makes: sends take them in
    /// turn, so with a ratio sampler about that share of them is sampled.
    const CALLERS: usize = 1024;

    /// The contexts sends are made in while observation is on: each inside a
    /// root span of its own trace (made before the clock starts), so a ratio
    /// sampler keeps about its share of the sends' traces.
    pub(super) fn caller_contexts() -> Option<Vec<Context>> {
        if !ON.load(Ordering::Acquire) {
            return None;
        }
        let tracer = global::tracer_provider().tracer("polybus-bench");
        Some(
            (0..CALLERS)
                .map(|_| Context::new().with_span(tracer.start("bench publish")))
                .collect(),
        )
    }
}

/// `POLYBUS_BENCH_SAMPLE_RATIO`: with a value in `[0, 1)`, the observed
/// variant's tracer samples with a parent-based trace-id ratio sampler at that
/// ratio (what production tracing usually runs, e.g. `0.01`) instead of
/// sampling every span.
pub fn sample_ratio() -> Option<f64> {
    std::env::var("POLYBUS_BENCH_SAMPLE_RATIO")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|r| (0.0..1.0).contains(r))
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
/// While [`observe`] is on, every send is made inside a caller's span (as a
/// traced service sends; the sends take 1,024 root spans, each its own trace,
/// in turn), so each one starts a `send` span and carries `traceparent`;
/// while it is off, the sends are not wrapped at all.
pub async fn publish_seq(conn: &Connection, topic: &str, n: usize, in_flight: usize) -> Duration {
    #[cfg(all(feature = "metrics", feature = "opentelemetry"))]
    let traced = observed::caller_contexts();
    let began = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let message = Message::new(payload(i));
            let send = async move { conn.producer.send(topic, message).await.expect("send") };
            #[cfg(all(feature = "metrics", feature = "opentelemetry"))]
            let send = {
                use futures::future::Either;
                use opentelemetry::context::FutureExt;
                match &traced {
                    Some(traced) => Either::Left(send.with_context(traced[i % traced.len()].clone())),
                    None => Either::Right(send),
                }
            };
            send
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
pub const VARIANTS: [&str; 4] = ["raw", "same-wire raw", "polybus", "polybus observed"];

/// The index in [`VARIANTS`] of polybus with its metrics and tracing on: the
/// polybus variant's publish and consume run through [`observing`], on topics
/// of their own. Runs only with [`observation_available`].
pub const OBSERVED: usize = 3;

/// How many variants run in rotation: all of [`VARIANTS`], or without
/// [`OBSERVED`] when this build cannot observe.
fn rotation() -> usize {
    if observation_available() {
        VARIANTS.len()
    } else {
        OBSERVED
    }
}

/// The order the variants run in for `run`: each goes first, second, third
/// (and fourth) in turn, so drift in the machine hits all of them. For
/// profiling, `POLYBUS_BENCH_VARIANTS` (comma-separated indexes into
/// [`VARIANTS`]) runs only some (the others are reported as 0 msg/s);
/// [`OBSERVED`] is left out when [`observation_available`] is false.
pub fn order(run: usize) -> Vec<usize> {
    let count = rotation();
    let r = run % count;
    let only = list_or("POLYBUS_BENCH_VARIANTS", &[0, 1, 2, 3]);
    (0..count)
        .map(|i| (r + i) % count)
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

/// The number of variants of a [`Table`].
const V: usize = VARIANTS.len();

/// `a / b` as a table cell, or "—" when either side did not run (0 msg/s).
fn ratio(a: f64, b: f64, decimals: usize) -> String {
    if a > 0.0 && b > 0.0 {
        format!("**{:.*}**", decimals, a / b)
    } else {
        "—".into()
    }
}

/// Publish and consume+ack rates of the variants over runs, at one depth, and
/// the client CPU each used per message.
#[derive(Debug)]
pub struct Table {
    title: String,
    n: usize,
    publish: [Vec<f64>; V],
    consume: [Vec<f64>; V],
    publish_cpu: [Vec<f64>; V],
    consume_cpu: [Vec<f64>; V],
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

    /// Records one run (durations indexed like [`VARIANTS`]; zero for a
    /// variant that did not run) and prints it.
    pub fn record(&mut self, run: usize, publish: [Duration; V], consume: [(Duration, Check); V]) {
        let rate = |d: Duration| {
            if d.is_zero() {
                0.0
            } else {
                self.n as f64 / d.as_secs_f64()
            }
        };
        let mut line = format!("  run {run}:");
        for v in 0..rotation() {
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
    pub fn record_cpu(&mut self, publish: [Duration; V], consume: [Duration; V]) {
        let per_message = |d: Duration| d.as_secs_f64() * 1e6 / self.n as f64;
        for v in 0..rotation() {
            self.publish_cpu[v].push(per_message(publish[v]));
            self.consume_cpu[v].push(per_message(consume[v]));
        }
    }

    /// Prints the medians, the ratios of polybus to both raw baselines and of
    /// observed polybus to plain polybus as a Markdown table.
    pub fn report(&self) {
        let runs = self.publish[0].len();
        let observed = observation_available();
        println!(
            "\n{} — median of {runs} runs, {} messages each",
            self.title, self.n
        );
        if observed {
            println!(
                "| measurement | raw msg/s | same-wire raw msg/s | polybus msg/s | polybus observed msg/s \
                 | polybus / raw | polybus / same-wire | observed / polybus |"
            );
            println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        } else {
            println!(
                "| measurement | raw msg/s | same-wire raw msg/s | polybus msg/s | polybus / raw | polybus / same-wire |"
            );
            println!("|---|---:|---:|---:|---:|---:|");
        }
        for (name, rates) in [("publish", &self.publish), ("consume + ack", &self.consume)] {
            let [raw, wire, pb, obs] = [0, 1, 2, 3].map(|v| median(rates[v].clone()));
            let (to_raw, to_wire) = (ratio(pb, raw, 2), ratio(pb, wire, 2));
            if observed {
                println!(
                    "| {name} | {raw:.0} | {wire:.0} | {pb:.0} | {obs:.0} | {to_raw} | {to_wire} | {} |",
                    ratio(obs, pb, 3)
                );
            } else {
                println!("| {name} | {raw:.0} | {wire:.0} | {pb:.0} | {to_raw} | {to_wire} |");
            }
        }
        if !self.publish_cpu[0].is_empty() {
            println!(
                "\nclient CPU per message (µs, user + system, every thread of the bench process; median):"
            );
            let shown = rotation();
            println!("| measurement | {} |", VARIANTS[..shown].join(" | "));
            println!("|---|{}", "---:|".repeat(shown));
            for (name, cpu) in [
                ("publish", &self.publish_cpu),
                ("consume + ack", &self.consume_cpu),
            ] {
                let cells: Vec<String> = (0..shown)
                    .map(|v| format!("{:.1}", median(cpu[v].clone())))
                    .collect();
                println!("| {name} | {} |", cells.join(" | "));
            }
        }
        if self.bad.is_empty() {
            println!("every run: 0 lost, 0 duplicated\n");
        } else {
            println!("NOT CLEAN: {}\n", self.bad.join("; "));
        }
    }
}

/// The resident set of this process, in KiB (0 where `/proc` cannot tell).
pub fn rss_kib() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// What [`slow_consumer_rss`] measured.
#[derive(Debug, Clone, Copy)]
pub struct Rss {
    /// The process's resident set just before the runner subscribed, KiB.
    pub before_kib: usize,
    /// The largest resident set sampled while the runner consumed, KiB.
    pub peak_kib: usize,
    /// Messages handled while sampling.
    pub handled: usize,
}

impl Rss {
    /// `peak − before`, in MiB.
    pub fn growth_mib(&self) -> f64 {
        self.peak_kib.saturating_sub(self.before_kib) as f64 / 1024.0
    }
}

/// Fills `topic` with `n` [`payload`]s for a group `slow` (declared first, so
/// it starts at the earliest message), then measures [`slow_consumer_rss`]
/// for `seconds` on a second connection made by `connect` (so the publisher's
/// buffers are gone), after a second's settling; prints one line naming
/// `what`. Returns the figures.
pub async fn backlog_rss<F, Fut>(
    what: &str,
    conn: Connection,
    connect: F,
    topic: &str,
    n: usize,
    seconds: usize,
) -> Rss
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Connection>,
{
    conn.consumer.declare_topic(topic).await.expect("topic");
    conn.consumer
        .declare_group(topic, "slow", polybus_core::StartFrom::Earliest)
        .await
        .expect("group");
    let published = publish_seq(&conn, topic, n, 1000).await;
    eprintln!("published {n} in {:.1} s", published.as_secs_f64());
    drop(conn);
    let slow = connect().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = slow_consumer_rss(&slow, topic, "slow", seconds).await;
    println!(
        "{what}, backlog {n} messages of {PAYLOAD_BYTES} bytes: RSS before subscribing {:.1} MiB, \
         peak while consuming {:.1} MiB (+{:.1} MiB), handled {} in {seconds} s",
        rss.before_kib as f64 / 1024.0,
        rss.peak_kib as f64 / 1024.0,
        rss.growth_mib(),
        rss.handled
    );
    rss
}

/// The memory a slow consumer takes with a backlog: a runner on `group` of
/// `topic` (unordered, concurrency 4, bound 1,000) whose handler sleeps 1 ms
/// per message consumes for `seconds` while the process's resident set is
/// sampled every 100 ms; then it shuts down. Fill the topic first, and let the
/// connection settle, so `before` holds the clients' own memory.
pub async fn slow_consumer_rss(conn: &Connection, topic: &str, group: &str, seconds: usize) -> Rss {
    let before_kib = rss_kib();
    let handled = Arc::new(AtomicUsize::new(0));
    let handle = conn
        .runner()
        .topic(topic)
        .group(group)
        .order(Order::Unordered)
        .concurrency(4)
        .buffer(1000 - 4)
        .run({
            let handled = Arc::clone(&handled);
            move |_d: Delivery| {
                let handled = Arc::clone(&handled);
                async move {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    handled.fetch_add(1, Ordering::Relaxed);
                    HandlerResult::Ok(())
                }
            }
        })
        .await
        .expect("run");
    let mut peak_kib = before_kib;
    for _ in 0..seconds * 10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak_kib = peak_kib.max(rss_kib());
    }
    let handled = handled.load(Ordering::Relaxed);
    handle.shutdown(Duration::from_secs(10)).await;
    Rss {
        before_kib,
        peak_kib,
        handled,
    }
}
