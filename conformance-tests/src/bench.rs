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
pub async fn publish(
    conn: &Connection,
    topic: &str,
    n: usize,
    payload: &Bytes,
    in_flight: usize,
) -> Duration {
    let began = Instant::now();
    futures::stream::iter(0..n)
        .map(|_| {
            let message = Message::new(payload.clone());
            async move { conn.producer.send(topic, message).await.expect("send") }
        })
        .buffer_unordered(in_flight)
        .for_each(|_| async {})
        .await;
    began.elapsed()
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
/// With `POLYBUS_BENCH_RECORDER=atomic` (and this crate's `metrics` feature)
/// it first installs a `metrics` recorder that keeps every series in atomics,
/// as an exporter does between scrapes, so the run includes the cost of
/// recording polybus's metrics.
pub fn runtime() -> tokio::runtime::Runtime {
    #[cfg(feature = "metrics")]
    if std::env::var("POLYBUS_BENCH_RECORDER").is_ok_and(|v| v == "atomic") {
        recorder::install();
        println!("(a metrics recorder is installed)");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// The four measurements of a raw-against-polybus bench, run after run: sending
/// (raw, polybus) and consuming with acks (raw, polybus), each over `n` messages.
#[derive(Debug)]
pub struct Rates {
    n: usize,
    runs: [Vec<f64>; 4],
}

impl Rates {
    /// Rates of measurements over `n` messages each.
    pub fn new(n: usize) -> Self {
        Rates {
            n,
            runs: Default::default(),
        }
    }

    /// Records one run's durations (raw send, polybus send, raw consume,
    /// polybus consume) and prints them as rates.
    pub fn record(&mut self, run: usize, [raw_send, pb_send, raw_con, pb_con]: [Duration; 4]) {
        let rate = |d: Duration| self.n as f64 / d.as_secs_f64();
        for (i, d) in [raw_send, pb_send, raw_con, pb_con].into_iter().enumerate() {
            self.runs[i].push(rate(d));
        }
        println!(
            "run {run}: publish raw {:.0}/s polybus {:.0}/s | consume+ack raw {:.0}/s polybus {:.0}/s",
            rate(raw_send),
            rate(pb_send),
            rate(raw_con),
            rate(pb_con)
        );
    }

    /// Prints the median of every measurement and the polybus/raw ratios.
    pub fn report(self) {
        let [raw_send, pb_send, raw_con, pb_con] = self.runs.map(median);
        println!(
            "median publish:     raw {raw_send:.0}/s, polybus {pb_send:.0}/s, ratio {:.2}",
            pb_send / raw_send
        );
        println!(
            "median consume+ack: raw {raw_con:.0}/s, polybus {pb_con:.0}/s, ratio {:.2}",
            pb_con / raw_con
        );
    }
}

/// A recorder keeping every series in atomics (metrics-util's registry, the
/// storage exporters use).
#[cfg(feature = "metrics")]
mod recorder {
    use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
    use metrics_util::registry::{AtomicStorage, Registry};

    struct Atomic(Registry<Key, AtomicStorage>);

    impl Recorder for Atomic {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            self.0
                .get_or_create_counter(key, |c| Counter::from_arc(c.clone()))
        }

        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            self.0.get_or_create_gauge(key, |g| Gauge::from_arc(g.clone()))
        }

        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            self.0
                .get_or_create_histogram(key, |h| Histogram::from_arc(h.clone()))
        }
    }

    pub(super) fn install() {
        let _ = metrics::set_global_recorder(Atomic(Registry::atomic()));
        polybus_core::observe::describe_metrics();
    }
}
