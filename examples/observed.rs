//! An observed service: a runner whose metrics are served as Prometheus text on
//! `/metrics`.
//!
//! ```text
//! cargo run --example observed --features metrics
//! curl http://127.0.0.1:9464/metrics
//! ```
//!
//! Runs on the in-memory broker by default; set `POLYBUS_URL` (e.g.
//! `nats://127.0.0.1:4222`, with the matching feature) for a real one, and
//! `METRICS_ADDR` for another listening address. It publishes a few orders
//! every second (one in ten cannot be billed and is dead-lettered) and handles
//! them until Ctrl-C.

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use polybus::{
    Connection, Delivery, HandlerError, HandlerResult, Message, RetryPolicy, RunHandle, StartFrom,
};

/// Latency buckets in seconds for every `…duration` histogram: the `metrics`
/// facade cannot set buckets, the exporter does.
pub const SECONDS: [f64; 12] = [
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0,
];

/// The topic and group the example uses.
pub const TOPIC: &str = "orders";
/// The example's consumer group.
pub const GROUP: &str = "billing";

/// The listening address in `METRICS_ADDR` (`value`), or the default
/// `127.0.0.1:9464`, with a message that names the variable when it is not one.
pub fn metrics_addr(value: Option<&str>) -> Result<SocketAddr, String> {
    let value = value.unwrap_or("127.0.0.1:9464");
    value
        .parse()
        .map_err(|e| format!("METRICS_ADDR={value:?} is not an address like 127.0.0.1:9464: {e}"))
}

/// Installs the Prometheus exporter (an HTTP listener on `addr`) as the global
/// `metrics` recorder. Call once, before starting runners. Refuses port 0
/// (the exporter binds the port itself and cannot say which one the system
/// picked, so nobody could scrape it) and says which address when it cannot
/// listen there (e.g. the port is taken).
pub fn install_exporter(addr: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    if addr.port() == 0 {
        return Err(format!(
            "METRICS_ADDR {addr} has port 0: choose a fixed port (the exporter cannot report the one the system would pick)"
        )
        .into());
    }
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("duration".into()), &SECONDS)?
        .install()
        .map_err(|e| format!("cannot serve /metrics on {addr}: {e}"))?;
    polybus::observe::describe_metrics();
    Ok(())
}

/// Bills one order: `poison` cannot be billed (permanent failure, dead-lettered).
async fn bill(delivery: Delivery) -> HandlerResult {
    if delivery.payload().as_ref() == b"poison" {
        return Err(HandlerError::permanent("this order cannot be billed"));
    }
    Ok(())
}

/// Declares the topic and group and starts the billing runner.
pub async fn start(conn: &Connection, lag_every: Duration) -> polybus::Result<RunHandle> {
    conn.consumer.declare_topic(TOPIC).await?;
    conn.consumer
        .declare_group(TOPIC, GROUP, StartFrom::Latest)
        .await?;
    conn.runner()
        .topic(TOPIC)
        .group(GROUP)
        .retry(RetryPolicy::attempts(3))
        .lag_interval(Some(lag_every))
        .run(bill)
        .await
}

/// Publishes `n` orders; every tenth (the 10th, 20th, …) is a poison one.
pub async fn publish_orders(conn: &Connection, n: usize) -> polybus::Result<()> {
    for i in 1..=n {
        let payload = if i % 10 == 0 {
            "poison".to_owned()
        } else {
            format!("order {i}")
        };
        conn.producer
            .send(
                TOPIC,
                Message::new(payload).with_key(format!("customer-{}", i % 4)),
            )
            .await?;
    }
    Ok(())
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = metrics_addr(std::env::var("METRICS_ADDR").ok().as_deref())?;
    install_exporter(addr)?;
    let url = std::env::var("POLYBUS_URL").unwrap_or_else(|_| "memory://observed-example".into());
    let conn = polybus::connect(&url).await?;
    let handle = start(&conn, Duration::from_secs(5)).await?;
    println!("billing orders; scrape http://{addr}/metrics (Ctrl-C to stop)");
    let publisher = {
        let conn = conn.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = publish_orders(&conn, 10).await {
                    eprintln!("publishing failed: {e}");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let report = handle
        .run_until(tokio::signal::ctrl_c(), Duration::from_secs(10))
        .await;
    publisher.abort();
    println!(
        "handled {}, dead-lettered {}, retried {}",
        report.handled, report.dead_lettered, report.retried
    );
    conn.close().await?;
    Ok(())
}
