//! The core producer's send markers under attack (issue 16, hostile review).
//!
//! A core `send` publishes its data, then a marker to a never-read
//! subscription of its own, and waits until the marker's slow-consumer event
//! has been handled: the server's `-ERR` for a denied publish comes before it.
//! These tests try to break that bookkeeping: sends cancelled while they wait,
//! hundreds of concurrent sends to a denied subject, server restarts while
//! sends are in flight, and a send after `close`. Each starts a private
//! `nats-server` (user `app` denied `secret.>`), so it needs `nats-server`
//! only and skips loudly without it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use polybus_conformance::processes::{Process, spawn, wait_for_port};
use polybus_conformance::{free_port, timeout_multiplier};
use polybus_core::{Error, Message, Producer};
use polybus_nats::{CoreProducer, Mode, NatsConfig};

struct Server {
    process: Option<Process>,
    port: u16,
    file: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl Server {
    fn start(test: &str) -> Option<Server> {
        // Named after the test: tests run in parallel, and a directory shared
        // by two (it was named after the name's length) let one restart its
        // server from the other's configuration (its port).
        let dir = std::env::temp_dir().join(format!("polybus-nats-markers-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port().unwrap();
        let file = dir.join("server.conf");
        std::fs::write(
            &file,
            format!(
                "listen: 127.0.0.1:{port}\nauthorization {{ users = [\n  \
                 {{ user: app, password: app-pw-123, permissions: {{ publish: {{ deny: [\"secret.>\"] }} }} }}\n] }}\n"
            ),
        )
        .unwrap();
        let process = spawn("nats-server", &["-c", file.to_str().unwrap()], test)?;
        assert!(wait_for_port(port, Duration::from_secs(5)), "nats-server");
        Some(Server {
            process: Some(process),
            port,
            file,
            dir,
        })
    }

    /// Kills the server and starts it again on the same port.
    fn restart(&mut self, test: &str) {
        // Killed and reaped before the new one takes the port.
        drop(self.process.take());
        self.process = Some(spawn("nats-server", &["-c", self.file.to_str().unwrap()], test).unwrap());
        assert!(
            wait_for_port(self.port, Duration::from_secs(5)),
            "nats-server restarted"
        );
    }

    fn config(&self) -> NatsConfig {
        NatsConfig::from_url(&format!("nats://app:app-pw-123@127.0.0.1:{}", self.port))
            .unwrap()
            .mode(Mode::Core)
            .connect_timeout(secs(3.0))
            .request_timeout(secs(5.0))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s * timeout_multiplier())
}

/// Allowed sends, one at a time, each `Ok` well within the request timeout;
/// then a denied one, `PermissionDenied` at once.
async fn still_precise(producer: &CoreProducer, what: &str) {
    for i in 0..5 {
        let started = Instant::now();
        let sent = producer.send("allowed.after", Message::new("fine")).await;
        assert!(
            sent.is_ok(),
            "{what}: allowed send {i} after it: {sent:?} after {:?}",
            started.elapsed()
        );
        assert!(
            started.elapsed() < secs(2.0),
            "{what}: allowed send {i} took {:?}",
            started.elapsed()
        );
    }
    let started = Instant::now();
    let err = producer
        .send("secret.after", Message::new("no"))
        .await
        .expect_err("a denied send after it must fail");
    assert!(matches!(err, Error::PermissionDenied { .. }), "{what}: {err:?}");
    assert!(
        started.elapsed() < secs(2.0),
        "{what}: denied send took {:?}",
        started.elapsed()
    );
}

/// Sends whose callers drop them while they wait for their marker (a
/// `select!`, a timeout) must not leave the producer's bookkeeping behind:
/// the sends after them are confirmed by their own markers, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_sends_leave_later_sends_exact() {
    const TEST: &str = "cancelled_sends_leave_later_sends_exact";
    let Some(server) = Server::start(TEST) else {
        return;
    };
    let producer = CoreProducer::connect(&server.config()).await.unwrap();
    for _ in 0..40 {
        for _ in 0..100 {
            // Polled once: the data and the marker are published, then the
            // caller gives up on it.
            let _ = producer.send("allowed.storm", Message::new("x")).now_or_never();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    still_precise(&producer, "after 4,000 cancelled sends").await;
    producer.close().await.unwrap();
}

/// Hundreds of tasks sending to one denied subject: each fails with
/// `PermissionDenied`, and the producer stays exact afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_concurrent_denied_sends_leave_later_sends_exact() {
    const TEST: &str = "hundreds_of_concurrent_denied_sends_leave_later_sends_exact";
    let Some(server) = Server::start(TEST) else {
        return;
    };
    let producer = Arc::new(CoreProducer::connect(&server.config()).await.unwrap());
    let tasks: Vec<_> = (0..400)
        .map(|i| {
            let producer = Arc::clone(&producer);
            tokio::spawn(async move {
                for _ in 0..5 {
                    let sent = producer.send("secret.same", Message::new("no")).await;
                    assert!(
                        matches!(sent, Err(Error::PermissionDenied { .. })),
                        "task {i}: {sent:?}"
                    );
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    still_precise(&producer, "after 2,000 concurrent denied sends").await;
    producer.close().await.unwrap();
}

/// Server restarts (twelve) while many sends to denied subjects are in flight: a send
/// may fail with a retryable connection error (the server may or may not have
/// seen it) but never returns `Ok` for a subject the server refuses, and
/// the producer is exact again once the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_never_confirms_a_denied_send() {
    const TEST: &str = "a_restart_never_confirms_a_denied_send";
    let Some(mut server) = Server::start(TEST) else {
        return;
    };
    let producer = Arc::new(CoreProducer::connect(&server.config()).await.unwrap());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let producer = Arc::clone(&producer);
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let mut n = 0u64;
                let mut confirmed = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    // A subject of its own: one send's -ERR cannot stand in
                    // for another's.
                    let subject = format!("secret.{i}.{n}");
                    match producer.send(&subject, Message::new("no")).await {
                        Ok(()) => confirmed.push(subject),
                        Err(Error::PermissionDenied { .. }) => {}
                        Err(e) => assert!(e.is_retryable(), "task {i}: {e:?}"),
                    }
                }
                confirmed
            })
        })
        .collect();
    // Twelve restarts: a send whose data went out on the dead connection and
    // whose marker went out on the new one was confirmed in about one run of
    // four with six.
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.restart(TEST);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut confirmed = Vec::new();
    for task in tasks {
        confirmed.extend(task.await.unwrap());
    }
    assert!(
        confirmed.is_empty(),
        "{} sends to denied subjects returned Ok, e.g. {:?}",
        confirmed.len(),
        &confirmed[..confirmed.len().min(5)]
    );
    // Let the reconnect settle (sends during it may fail as connection errors).
    let until = Instant::now() + secs(10.0);
    while producer.send("allowed.probe", Message::new("x")).await.is_err() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    still_precise(&producer, "after restarts").await;
    producer.close().await.unwrap();
}

/// The server gone for good while thousands of sends are made at once: each
/// ends within its request timeout (with a retryable error), none waits for
/// the server to come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_during_an_outage_end_within_their_timeout() {
    const TEST: &str = "sends_during_an_outage_end_within_their_timeout";
    let Some(mut server) = Server::start(TEST) else {
        return;
    };
    let config = server.config().request_timeout(secs(1.0));
    let producer = Arc::new(CoreProducer::connect(&config).await.unwrap());
    producer.send("allowed.before", Message::new("x")).await.unwrap();
    drop(server.process.take());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let sends: Vec<_> = (0..3000)
        .map(|i| {
            let producer = Arc::clone(&producer);
            tokio::spawn(async move { (i, producer.send("allowed.during", Message::new("x")).await) })
        })
        .collect();
    let limit = secs(1.0) + secs(3.0);
    let all = tokio::time::timeout(limit, futures::future::join_all(sends)).await;
    let Ok(results) = all else {
        panic!(
            "sends still waiting {:?} after the outage began (timeout 1 s)",
            started.elapsed()
        );
    };
    for result in results {
        let (i, sent) = result.unwrap();
        match sent {
            Err(e) => assert!(e.is_retryable(), "send {i}: {e:?}"),
            Ok(()) => panic!("send {i} cannot be confirmed without a server"),
        }
    }
}

/// `send` and `flush` after `close` are `Closed`, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_after_close_is_closed() {
    const TEST: &str = "send_after_close_is_closed";
    let Some(server) = Server::start(TEST) else {
        return;
    };
    let producer = CoreProducer::connect(&server.config()).await.unwrap();
    producer.send("allowed.x", Message::new("x")).await.unwrap();
    producer.close().await.unwrap();
    let started = Instant::now();
    let err = producer.send("allowed.x", Message::new("x")).await.unwrap_err();
    assert!(matches!(err, Error::Closed(_)), "{err:?}");
    assert!(started.elapsed() < secs(1.0));
}

/// Restarts while the producer is idle (no send between them, so no marker
/// subscription is installed after the first): sends afterwards are exact,
/// and a denied one made right after each restart is never `Ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_restarts_leave_the_producer_exact() {
    const TEST: &str = "idle_restarts_leave_the_producer_exact";
    let Some(mut server) = Server::start(TEST) else {
        return;
    };
    let producer = CoreProducer::connect(&server.config()).await.unwrap();
    producer.send("allowed.before", Message::new("x")).await.unwrap();
    for round in 0..4 {
        for _ in 0..3 {
            server.restart(TEST);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let until = Instant::now() + secs(10.0);
        loop {
            match producer
                .send(&format!("secret.idle.{round}"), Message::new("no"))
                .await
            {
                Ok(()) => panic!("round {round}: a denied send after idle restarts returned Ok"),
                Err(Error::PermissionDenied { .. }) => break,
                Err(e) => {
                    assert!(e.is_retryable(), "round {round}: {e:?}");
                    assert!(Instant::now() < until, "round {round}: not back: {e:?}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        still_precise(&producer, "after idle restarts").await;
    }
    producer.close().await.unwrap();
}
