//! Core-path throughput: messages per second from `send` through the runner to
//! an acked no-op handler on the in-memory backend, with no middleware and with
//! four pass-through layers, beside a raw tokio mpsc pipeline doing the same
//! hand-off (build a message, send it through a bounded channel, call a no-op
//! async handler, count it) in the same run.
//!
//! ```text
//! cargo bench --bench core_path
//! POLYBUS_BENCH_MESSAGES=200000 POLYBUS_BENCH_RUNS=7 cargo bench --bench core_path
//! # metrics hooks compiled in, no recorder; then with a Prometheus recorder installed:
//! cargo bench --bench core_path --features metrics
//! POLYBUS_BENCH_RECORDER=prometheus cargo bench --bench core_path --features metrics
//! ```
//!
//! `POLYBUS_BENCH_ONLY=raw|polybus0|polybus4` runs one pipeline only (what
//! `scripts/callgrind-core-path.sh` uses to count instructions per message).
//! With the features `metrics` and `opentelemetry` there are two more,
//! `observed0` and `observed4`: the same runners with a Prometheus recorder
//! and an OpenTelemetry SDK tracer (every span sampled, batch exporter)
//! installed, every send made inside a caller's trace (1,024 root spans taken
//! in turn). `POLYBUS_BENCH_SAMPLE_RATIO=0.01` samples with a parent-based
//! trace-id ratio sampler instead (about 1 % of the traces):
//!
//! ```text
//! cargo bench --bench core_path --features metrics,opentelemetry
//! FEATURES=metrics,opentelemetry scripts/callgrind-core-path.sh polybus4 observed4
//! POLYBUS_BENCH_SAMPLE_RATIO=0.01 FEATURES=metrics,opentelemetry scripts/callgrind-core-path.sh observed4
//! ```
//! `POLYBUS_BENCH_HELD=N` instead makes a runner hold N deliveries in backoff
//! and stop there (what `scripts/held-memory.sh` measures the heap of);
//! `POLYBUS_BENCH_HELD_MODE=published` only publishes the N messages (the
//! broker's own share, to subtract).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use polybus::memory::MemoryBroker;
use polybus::{Delivery, HandlerError, HandlerResult, Message, Next, Order, RetryPolicy, StartFrom, from_fn};
use tokio::sync::{Notify, mpsc};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn noop(_delivery: Delivery) -> HandlerResult {
    Ok(())
}

/// `observed`: on its own topic (send handles are registered per topic and
/// thread), every send made inside a span of one trace, as a traced service
/// sends (the observed pipelines run with a recorder and a tracer installed).
async fn polybus_once(n: usize, layers: usize, payload: &[u8], observed: bool) -> Duration {
    let topic = if observed { "observed" } else { "bench" };
    let broker = MemoryBroker::new();
    let conn = broker.connection();
    conn.consumer
        .declare_group(topic, "bench", StartFrom::Latest)
        .await
        .expect("declare");
    let count = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(Notify::new());
    let mut runner = conn
        .runner()
        .topic(topic)
        .group("bench")
        .order(Order::Unordered)
        .concurrency(16);
    for _ in 0..layers {
        runner = runner.layer(from_fn(|d: Delivery, next: Next| next.run(d)));
    }
    let handle = runner
        .run({
            let (count, done) = (Arc::clone(&count), Arc::clone(&done));
            move |d: Delivery| {
                let (count, done) = (Arc::clone(&count), Arc::clone(&done));
                async move {
                    noop(d).await?;
                    if count.fetch_add(1, Ordering::Relaxed) + 1 == n {
                        done.notify_one();
                    }
                    Ok(())
                }
            }
        })
        .await
        .expect("run");
    #[cfg(all(feature = "metrics", feature = "opentelemetry"))]
    let callers = if observed {
        observed::caller_contexts()
    } else {
        vec![opentelemetry::Context::new()]
    };
    let started = Instant::now();
    for i in 0..n {
        let send = conn.producer.send(topic, Message::new(payload.to_vec()));
        #[cfg(all(feature = "metrics", feature = "opentelemetry"))]
        let send = opentelemetry::context::FutureExt::with_context(send, callers[i % callers.len()].clone());
        #[cfg(not(all(feature = "metrics", feature = "opentelemetry")))]
        let _ = i;
        send.await.expect("send");
    }
    done.notified().await;
    broker
        .wait_until_settled(Duration::from_secs(60))
        .await
        .expect("every message acked");
    let elapsed = started.elapsed();
    handle.shutdown(Duration::from_secs(10)).await;
    elapsed
}

async fn raw_once(n: usize, payload: &[u8]) -> Duration {
    let (tx, mut rx) = mpsc::channel::<Message>(64);
    let count = Arc::new(AtomicUsize::new(0));
    let consumer = tokio::spawn({
        let count = Arc::clone(&count);
        async move {
            while let Some(message) = rx.recv().await {
                let delivery = Delivery::new(message, Default::default(), 1);
                noop(delivery).await.expect("noop");
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let started = Instant::now();
    for _ in 0..n {
        tx.send(Message::new(payload.to_vec())).await.expect("send");
    }
    drop(tx);
    consumer.await.expect("consumer");
    assert_eq!(count.load(Ordering::Relaxed), n);
    started.elapsed()
}

/// Publishes `n` messages and (unless `publish_only`) has a runner hold all of
/// them in backoff (each attempt fails retryably, the backoff is an hour);
/// returns once they are all held, printing the runner's counts.
async fn held(n: usize, publish_only: bool, payload: &[u8]) {
    let broker = MemoryBroker::new();
    let conn = broker.connection();
    conn.consumer
        .declare_group("bench", "bench", StartFrom::Latest)
        .await
        .expect("declare");
    for _ in 0..n {
        conn.producer
            .send("bench", Message::new(payload.to_vec()))
            .await
            .expect("send");
    }
    if publish_only {
        println!("published {n}");
        return;
    }
    let handle = conn
        .runner()
        .topic("bench")
        .group("bench")
        .order(Order::Unordered)
        .concurrency(16)
        .backoff_capacity(n)
        .retry(RetryPolicy::attempts(2).backoff(Duration::from_secs(3600), Duration::from_secs(3600)))
        .run(|_d: Delivery| async { Err::<(), _>(HandlerError::retryable("held")) })
        .await
        .expect("run");
    while handle.stats().retried < n as u64 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("held {n}: {:?}", handle.stats());
    // Measured here, at the peak; the process exits without a shutdown.
    std::process::exit(0);
}

fn median(mut rates: Vec<f64>) -> f64 {
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

fn main() {
    let n = env_or("POLYBUS_BENCH_MESSAGES", 100_000);
    let runs = env_or("POLYBUS_BENCH_RUNS", 5).max(1);
    let payload = vec![b'x'; 100];
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Some(n) = std::env::var("POLYBUS_BENCH_HELD")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        let publish_only = std::env::var("POLYBUS_BENCH_HELD_MODE").is_ok_and(|m| m == "published");
        runtime.block_on(held(n, publish_only, &payload));
        return;
    }
    let only = std::env::var("POLYBUS_BENCH_ONLY").ok();
    // The observed pipelines (features `metrics` and `opentelemetry`) run last:
    // the recorder and the tracer stay installed once they are.
    let mut pipelines: Vec<(&str, &str, Option<usize>, bool)> = vec![
        ("raw", "raw tokio mpsc", None, false),
        ("polybus0", "polybus, no middleware", Some(0), false),
        ("polybus4", "polybus, 4 middleware", Some(4), false),
    ];
    #[cfg(all(feature = "metrics", feature = "opentelemetry"))]
    pipelines.extend([
        ("observed0", "observed, no middleware", Some(0), true),
        ("observed4", "observed, 4 middleware", Some(4), true),
    ]);
    #[cfg(feature = "metrics")]
    let recorder = if std::env::var("POLYBUS_BENCH_RECORDER").is_ok_and(|v| v == "prometheus") {
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .expect("the Prometheus recorder");
        polybus::observe::describe_metrics();
        Some(handle)
    } else {
        None
    };
    #[cfg(feature = "metrics")]
    let observed = if recorder.is_some() {
        "metrics feature, Prometheus recorder installed"
    } else {
        "metrics feature, no recorder"
    };
    #[cfg(not(feature = "metrics"))]
    let observed = "metrics feature off";
    println!("core path: {n} messages of 100 bytes, median of {runs} runs, in-memory backend ({observed})");
    let mut results = Vec::new();
    for (tag, name, layers, observed) in pipelines {
        if only.as_deref().is_some_and(|only| only != tag) {
            continue;
        }
        #[cfg(all(feature = "metrics", feature = "opentelemetry"))]
        if observed {
            observed::install();
        }
        #[cfg(not(all(feature = "metrics", feature = "opentelemetry")))]
        let _ = observed;
        let rates: Vec<f64> = (0..runs)
            .map(|_| {
                let took = runtime.block_on(async {
                    match layers {
                        None => raw_once(n, &payload).await,
                        Some(layers) => polybus_once(n, layers, &payload, observed).await,
                    }
                });
                n as f64 / took.as_secs_f64()
            })
            .collect();
        let rate = median(rates);
        println!("{name:<24} {rate:>12.0} msg/s");
        results.push((name, rate));
    }
    if only.is_some() {
        return;
    }
    let raw = results[0].1;
    for (name, rate) in &results[1..] {
        println!("ratio {name} / raw: {:.3}", rate / raw);
    }
    if results.len() == 5 {
        for (plain, observed) in [(1, 3), (2, 4)] {
            println!(
                "ratio {} / {}: {:.3}",
                results[observed].0,
                results[plain].0,
                results[observed].1 / results[plain].1
            );
        }
    }
    #[cfg(feature = "metrics")]
    if let Some(handle) = recorder {
        // Proof that the recorder saw the runs: the rendered text has the series.
        let text = handle.render();
        assert!(
            text.contains("polybus_handler_outcomes"),
            "the recorder saw nothing"
        );
    }
}

/// The recorder and tracer of the observed pipelines.
#[cfg(all(feature = "metrics", feature = "opentelemetry"))]
mod observed {
    use std::sync::OnceLock;

    use opentelemetry::trace::{TraceContextExt, Tracer, TracerProvider as _};
    use opentelemetry::{Context, global};
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};

    /// Drops every span: the cost measured is polybus's and the SDK's (span
    /// creation, sampling, the batch processor's queue), not a network's.
    #[derive(Debug)]
    struct Discard;

    impl SpanExporter for Discard {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            drop(batch);
            Ok(())
        }
    }

    /// Installs (once) a Prometheus recorder (unless one is installed) and an
    /// OpenTelemetry SDK tracer provider that samples every span into a batch
    /// exporter.
    pub(super) fn install() {
        static DONE: OnceLock<()> = OnceLock::new();
        DONE.get_or_init(|| {
            if metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .is_ok()
            {
                polybus::observe::describe_metrics();
            }
            let mut builder = SdkTracerProvider::builder().with_batch_exporter(Discard);
            if let Some(ratio) = std::env::var("POLYBUS_BENCH_SAMPLE_RATIO")
                .ok()
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|r| (0.0..1.0).contains(r))
            {
                builder =
                    builder.with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))));
            }
            global::set_tracer_provider(builder.build());
        });
    }

    /// 1,024 contexts, each with the root span of its own trace (sampled, or
    /// not, by the provider's sampler), that the sends take in turn: sends
    /// made in them start `send` spans and carry `traceparent`.
    pub(super) fn caller_contexts() -> Vec<Context> {
        let tracer = global::tracer_provider().tracer("core-path-bench");
        (0..1024)
            .map(|_| Context::new().with_span(tracer.start("bench publish")))
            .collect()
    }
}
