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
