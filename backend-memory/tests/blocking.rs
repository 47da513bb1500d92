//! A handler that blocks its thread (`std::thread::sleep`, a blocking client)
//! cannot be cancelled, but it must not stop `shutdown` from returning by its
//! deadline plus the grace: handlers run on the runner's worker tasks, never
//! inside the dispatcher that carries out the shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use polybus_core::{Delivery, HandlerResult, Message, Order, StartFrom};
use polybus_memory::MemoryBroker;

/// How long the blocking handler holds its thread: longer than the deadline
/// plus the grace, so a shutdown that waited for it would be late.
const BLOCK: Duration = Duration::from_secs(6);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_blocking_its_thread_cannot_hold_up_shutdown() {
    let broker = MemoryBroker::new();
    let conn = broker.connection();
    conn.consumer
        .declare_group("t", "g", StartFrom::Latest)
        .await
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let (blocking_tx, blocking_rx) = tokio::sync::oneshot::channel();
    let blocking_tx = Arc::new(std::sync::Mutex::new(Some(blocking_tx)));
    let handler = {
        let calls = Arc::clone(&calls);
        move |_d: Delivery| {
            let (calls, blocking_tx) = (Arc::clone(&calls), Arc::clone(&blocking_tx));
            async move {
                // The first message is handled; the second blocks its thread
                // right after the same worker reported the first.
                if calls.fetch_add(1, Ordering::SeqCst) == 1 {
                    if let Some(tx) = blocking_tx.lock().unwrap().take() {
                        let _ = tx.send(());
                    }
                    std::thread::sleep(BLOCK);
                }
                HandlerResult::Ok(())
            }
        }
    };
    let handle = conn
        .runner()
        .topic("t")
        .group("g")
        .order(Order::Sequential)
        .run(handler)
        .await
        .unwrap();
    conn.producer.send("t", Message::new("handled")).await.unwrap();
    conn.producer.send("t", Message::new("blocks")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), blocking_rx)
        .await
        .expect("the second handler started")
        .unwrap();

    let deadline = Duration::from_millis(300);
    let started = Instant::now();
    let report = tokio::time::timeout(Duration::from_secs(5), handle.shutdown(deadline))
        .await
        .expect("shutdown returned");
    let took = started.elapsed();
    // Deadline, then 1 s for cancelled handlers to yield, then the release.
    assert!(took < deadline + Duration::from_secs(3), "shutdown took {took:?}");
    assert_eq!(report.handled, 1, "{report:?}");
    assert_eq!(report.abandoned, 1, "{report:?}");
    let stats = broker.group_stats("t", "g").unwrap();
    assert_eq!(
        (stats.pending, stats.unacked),
        (1, 0),
        "the blocked message was given back"
    );
}
