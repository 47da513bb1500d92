//! Interop with the official CloudEvents SDK for Python, in both directions:
//! events the SDK builds (binary and structured mode, through its protocol
//! binding and the broker's Python client) reach a typed polybus handler with
//! their attributes, and events polybus publishes are parsed by the SDK.
//!
//! The Python side is `scripts/cloudevents_interop.py`, run with the
//! interpreter in `POLYBUS_TEST_PYTHON` (set by `ensure_python_clients` in
//! `scripts/brokers.sh`, which installs `cloudevents`, `kafka-python`, `pika`
//! and `nats-py`, pinned).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use polybus_core::typed::{Events, Meta};
use polybus_core::{BoxError, Connection, HandlerResult, StartFrom, event};
use serde::{Deserialize, Serialize};

use crate::Recorder;

/// The environment variable naming the Python interpreter with the clients.
pub const PYTHON_ENV: &str = "POLYBUS_TEST_PYTHON";

/// The interpreter from `POLYBUS_TEST_PYTHON`, or `None` after a loud `SKIP`
/// line (a failure under `POLYBUS_TEST_REQUIRE_BROKERS=1`).
pub fn interpreter(test: &str) -> Option<String> {
    crate::broker_url(PYTHON_ENV, test)
}

/// The event the SDK side sends and receives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InteropRideCreated {
    /// The ride.
    pub ride_id: String,
    /// Its index in the run.
    pub seq: u32,
}
event!(InteropRideCreated => "interop.ride-created", key = |e| &e.ride_id);

fn script() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/cloudevents_interop.py").to_owned()
}

/// What the SDK printed for one event it parsed.
#[derive(Debug, Deserialize)]
struct Parsed {
    id: String,
    source: String,
    #[serde(rename = "type")]
    ty: String,
    subject: Option<String>,
    time: Option<f64>,
    datacontenttype: Option<String>,
    data: InteropRideCreated,
}

const EVENTS: u32 = 4;

/// Runs both directions on `conn`: `backend` is `kafka`, `rabbitmq` or `nats`
/// and `address` what the Python client connects to.
pub async fn cloudevents_interop(
    conn: &Connection,
    python: &str,
    backend: &str,
    address: &str,
) -> Result<(), BoxError> {
    python_to_polybus(conn, python, backend, address).await?;
    polybus_to_python(conn, python, backend, address).await
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

async fn python_to_polybus(
    conn: &Connection,
    python: &str,
    backend: &str,
    address: &str,
) -> Result<(), BoxError> {
    let topic = unique("ce-from-python");
    conn.consumer.declare_topic(&topic).await?;
    conn.consumer
        .declare_group(&topic, "g", StartFrom::Earliest)
        .await?;
    let events = Events::new(conn, ());
    let seen: Arc<Mutex<Vec<(InteropRideCreated, Meta)>>> = Arc::default();
    let handled = Recorder::new();
    let handler = {
        let (seen, handled) = (Arc::clone(&seen), handled.clone());
        move |e: InteropRideCreated, meta: Meta| {
            let (seen, handled) = (Arc::clone(&seen), handled.clone());
            async move {
                handled.record(meta.delivery());
                seen.lock().unwrap_or_else(|p| p.into_inner()).push((e, meta));
                HandlerResult::Ok(())
            }
        }
    };
    let handle = conn
        .runner()
        .topic(&topic)
        .group("g")
        .run(
            events
                .router()
                .on(handler)
                .unknown(polybus_core::typed::UnknownType::DeadLetter),
        )
        .await?;
    let args = [
        script(),
        backend.into(),
        address.into(),
        topic.clone(),
        "produce".into(),
        EVENTS.to_string(),
    ];
    let python = python.to_owned();
    let output = tokio::task::spawn_blocking(move || Command::new(python).args(args).output()).await??;
    if !output.status.success() {
        return Err(format!(
            "the Python producer failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    handled.wait_for(EVENTS as usize, Duration::from_secs(30)).await?;
    let report = handle.shutdown(Duration::from_secs(10)).await;
    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    seen.sort_by_key(|(e, _)| e.seq);
    for (i, (event, meta)) in seen.iter().enumerate() {
        let i = i as u32;
        assert_eq!(
            event,
            &InteropRideCreated {
                ride_id: format!("ride-{i}"),
                seq: i
            },
            "{backend}"
        );
        assert_eq!(meta.event_type(), Some("interop.ride-created"));
        assert_eq!(meta.source(), Some("/python-sdk"));
        assert_eq!(meta.event_id(), Some(format!("py-{i}").as_str()));
        assert_eq!(meta.subject(), Some(format!("ride-{i}").as_str()));
        assert_eq!(meta.extension("traceparent"), Some("00-python"));
        let age = meta
            .time()
            .and_then(|t| t.elapsed().ok())
            .expect("a time in the past");
        assert!(age < Duration::from_secs(120), "{backend}: time {age:?} ago");
    }
    assert_eq!(seen.len(), EVENTS as usize);
    assert_eq!(report.dead_lettered, 0, "{backend}");
    Ok(())
}

async fn polybus_to_python(
    conn: &Connection,
    python: &str,
    backend: &str,
    address: &str,
) -> Result<(), BoxError> {
    let topic = unique("ce-to-python");
    conn.consumer.declare_topic(&topic).await?;
    let args = [
        script(),
        backend.into(),
        address.into(),
        topic.clone(),
        "consume".into(),
        EVENTS.to_string(),
    ];
    let mut child = Command::new(python)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let reader = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        let mut ready = Some(ready_tx);
        let mut parsed = Vec::new();
        for line in lines.by_ref() {
            let line = line?;
            if line == "READY" {
                if let Some(tx) = ready.take() {
                    let _ = tx.send(());
                }
            } else {
                parsed.push(line);
            }
        }
        std::io::Result::Ok(parsed)
    });
    tokio::time::timeout(Duration::from_secs(30), ready_rx)
        .await
        .map_err(|_| "the Python consumer never got ready")?
        .map_err(|_| "the Python consumer ended before it was ready")?;
    let publisher = Events::new(conn, ()).publisher().with_source("/polybus-interop");
    let mut sent = Vec::new();
    for seq in 0..EVENTS {
        let event = InteropRideCreated {
            ride_id: format!("ride-{seq}"),
            seq,
        };
        let message = publisher.message(&event)?;
        sent.push((message.id.clone(), message.timestamp));
        conn.producer.send(&topic, message).await?;
    }
    let lines = reader.await??;
    let status = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
    if !status.status.success() {
        return Err(format!(
            "the Python consumer failed: {}",
            String::from_utf8_lossy(&status.stderr)
        )
        .into());
    }
    let mut parsed: Vec<Parsed> = lines
        .iter()
        .map(|l| serde_json::from_str(l))
        .collect::<Result<_, _>>()?;
    parsed.sort_by_key(|p| p.data.seq);
    assert_eq!(parsed.len(), EVENTS as usize, "{backend}: {lines:?}");
    for (p, (id, timestamp)) in parsed.iter().zip(&sent) {
        let i = p.data.seq;
        assert_eq!(&p.id, id, "{backend}: the CloudEvents id is the message id");
        assert_eq!(p.ty, "interop.ride-created");
        assert_eq!(p.source, "/polybus-interop");
        assert_eq!(p.subject.as_deref(), Some(format!("ride-{i}").as_str()));
        assert_eq!(p.datacontenttype.as_deref(), Some("application/json"));
        let sent_ms = timestamp.duration_since(UNIX_EPOCH)?.as_millis() as f64;
        let got_ms = p.time.ok_or("no time")? * 1000.0;
        assert!(
            (got_ms - sent_ms).abs() < 2.0,
            "{backend}: time {got_ms} vs {sent_ms}"
        );
    }
    Ok(())
}
