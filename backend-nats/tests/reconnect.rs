//! A NATS server killed and started again under a running producer and consumer.
//!
//! The test starts its own `nats-server` (JetStream, file storage in a fresh
//! directory, a free port) so it disturbs no other test. It runs when
//! `POLYBUS_TEST_NATS_URL` is set (the same switch as the other broker tests) and
//! the `nats-server` binary is on the PATH (or in `POLYBUS_TEST_NATS_SERVER`).

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use polybus_conformance::{Recorder, brokers_required, loud, timeout_multiplier};
use polybus_core::{Delivery, HandlerResult, Message, Order, StartFrom};
use polybus_nats::{NatsConfig, Storage};

struct Server {
    binary: String,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Server {
    fn start(binary: &str) -> Server {
        let port = polybus_conformance::free_port().expect("a free port");
        let dir = std::env::temp_dir().join(format!("polybus-nats-{}", uuid_like()));
        std::fs::create_dir_all(&dir).expect("a store directory");
        let mut server = Server {
            binary: binary.to_owned(),
            port,
            dir,
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new(&self.binary)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < until,
                "nats-server did not listen in 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn uuid_like() -> String {
    Message::new("").id.replace('-', "")[..12].to_owned()
}

fn server_binary() -> Option<String> {
    if std::env::var("POLYBUS_TEST_NATS_URL").is_err() {
        return None;
    }
    let binary = std::env::var("POLYBUS_TEST_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
    Command::new(&binary)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| binary)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn producer_and_consumer_survive_a_server_restart() {
    let Some(binary) = server_binary() else {
        let why = "needs POLYBUS_TEST_NATS_URL set and nats-server on the PATH (or POLYBUS_TEST_NATS_SERVER)";
        assert!(
            !brokers_required(),
            "POLYBUS_TEST_REQUIRE_BROKERS=1 but the reconnect test {why}"
        );
        loud(&format!(
            "SKIP producer_and_consumer_survive_a_server_restart: {why}"
        ));
        return;
    };
    let secs = |s: f64| Duration::from_secs_f64(s * timeout_multiplier());
    let mut server = Server::start(&binary);
    let mut config = NatsConfig::from_url(&server.url())
        .unwrap()
        .ack_wait(secs(2.0))
        .storage(Storage::File);
    config.pull_expiry = Duration::from_secs(1);
    config.request_timeout = secs(10.0);
    let conn = polybus_nats::connect_with(config.clone()).await.unwrap();
    conn.consumer.declare_topic("restart.events").await.unwrap();
    conn.consumer
        .declare_group("restart.events", "workers", StartFrom::Latest)
        .await
        .unwrap();

    // Runner A handles everything except messages marked "hold", which it starts
    // and never finishes: they stay unacknowledged across the restart.
    let handled = Recorder::new();
    let held = Recorder::new();
    let handler = {
        let (handled, held) = (handled.clone(), held.clone());
        move |d: Delivery| {
            let (handled, held) = (handled.clone(), held.clone());
            async move {
                if d.header("hold").is_some() {
                    held.record(&d);
                    futures::future::pending::<()>().await;
                }
                handled.record(&d);
                HandlerResult::Ok(())
            }
        }
    };
    let a = conn
        .runner()
        .topic("restart.events")
        .group("workers")
        .order(Order::Unordered)
        .concurrency(8)
        .run(handler)
        .await
        .unwrap();
    let mut sent = Vec::new();
    for i in 0..13 {
        let mut m = Message::new(format!("before-{i}"));
        if i >= 10 {
            m = m.with_header("hold", "1");
        }
        conn.producer.send("restart.events", m.clone()).await.unwrap();
        sent.push(m);
    }
    handled.wait_for(10, secs(30.0)).await.unwrap();
    held.wait_for(3, secs(30.0)).await.unwrap();

    // Kill the server; sends during the outage wait or fail with a retryable error.
    server.kill();
    let producer = Arc::clone(&conn.producer);
    let outage_sends: Vec<_> = (0..5)
        .map(|i| {
            let producer = Arc::clone(&producer);
            tokio::spawn(async move {
                let m = Message::new(format!("outage-{i}"));
                let result = producer.send("restart.events", m.clone()).await;
                (m, result)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.spawn();
    let mut waited = 0;
    for send in outage_sends {
        let (m, result) = send.await.unwrap();
        match result {
            Ok(()) => {
                waited += 1;
                sent.push(m);
            }
            Err(e) => assert!(e.is_retryable(), "a send during the outage failed for good: {e}"),
        }
    }
    loud(&format!(
        "INFO reconnect: {waited} of 5 sends made during the outage waited and succeeded, the rest failed retryably"
    ));

    // After the restart the same producer and consumer carry on.
    for i in 0..10 {
        let m = Message::new(format!("after-{i}"));
        conn.producer.send("restart.events", m.clone()).await.unwrap();
        sent.push(m);
    }
    let expected_by_a: HashSet<String> = sent
        .iter()
        .filter(|m| !m.headers.contains_key("hold"))
        .map(|m| m.id.clone())
        .collect();
    handled
        .wait_until(
            "every sent message handled by A after the restart",
            secs(60.0),
            |seen| {
                let ids: HashSet<String> = seen.iter().map(|d| d.id().to_owned()).collect();
                ids.is_superset(&expected_by_a)
            },
        )
        .await
        .unwrap();

    // A crashes with the held messages unacknowledged; B gets them again.
    a.abort().await;
    let conn_b = polybus_nats::connect_with(config).await.unwrap();
    let b_seen = Recorder::new();
    let b = conn_b
        .runner()
        .topic("restart.events")
        .group("workers")
        .run(b_seen.handler())
        .await
        .unwrap();
    let held_ids: HashSet<String> = held.ids().into_iter().collect();
    b_seen
        .wait_until("the held messages redelivered to B", secs(60.0), |seen| {
            let ids: HashSet<String> = seen.iter().map(|d| d.id().to_owned()).collect();
            ids.is_superset(&held_ids)
        })
        .await
        .unwrap();
    let report = b.shutdown(secs(10.0)).await;
    assert!(report.handled >= 3);
    assert!(
        b_seen.all().iter().all(|d| d.attempt() >= 2),
        "B only sees redeliveries"
    );
    let _ = conn.close().await;
    let _ = conn_b.close().await;
}
