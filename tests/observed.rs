//! Starts `examples/observed.rs`'s service on the memory broker, sends a known
//! number of orders, scrapes its Prometheus endpoint over HTTP and checks the
//! counters, the duration histogram and the lag gauge.
#![cfg(all(feature = "metrics", feature = "memory"))]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "../examples/observed.rs"]
#[allow(dead_code, unreachable_pub)]
mod observed;

/// One sample line: name, labels, value.
type Line = (String, BTreeMap<String, String>, f64);

fn parse(text: &str) -> Vec<Line> {
    let mut lines = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("name and value");
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = labels
            .split(',')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once('=').expect("label=value");
                (k.to_owned(), v.trim_matches('"').to_owned())
            })
            .collect();
        lines.push((name.to_owned(), labels, value.parse().expect("a number")));
    }
    lines
}

/// The value of the one series named `name` (or `name_total`) with these labels.
fn value(lines: &[Line], name: &str, with: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = lines
        .iter()
        .filter(|(n, labels, _)| {
            (n == name || *n == format!("{name}_total"))
                && with
                    .iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
        .collect();
    assert_eq!(found.len(), 1, "one {name} series with {with:?}, found {found:?}");
    found[0]
}

async fn scrape(addr: SocketAddr) -> String {
    let mut last_error = None;
    for _ in 0..100 {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(mut stream) => {
                let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
                stream.write_all(request.as_bytes()).await.unwrap();
                let mut response = String::new();
                stream.read_to_string(&mut response).await.unwrap();
                assert!(response.starts_with("HTTP/1.1 200"), "{response}");
                let body = response.split_once("\r\n\r\n").expect("headers end").1;
                return body.to_owned();
            }
            Err(e) => last_error = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the metrics endpoint never answered: {last_error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_serves_its_metrics_over_http() {
    let addr: SocketAddr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    observed::install_exporter(addr).unwrap();
    let conn = polybus::memory::MemoryBroker::new().connection();
    let handle = observed::start(&conn, Duration::from_millis(20)).await.unwrap();
    observed::publish_orders(&conn, 20).await.unwrap();
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let stats = handle.stats();
        if stats.handled + stats.dead_lettered == 20 {
            break;
        }
        assert!(tokio::time::Instant::now() < until, "not settled: {stats:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Let the lag gauge be refreshed after the last ack.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = scrape(addr).await;
    let lines = parse(&text);
    let orders = [
        ("messaging_system", "memory"),
        ("messaging_destination_name", "orders"),
    ];
    let billing = |extra: &[(&'static str, &'static str)]| {
        let mut all = orders.to_vec();
        all.push(("messaging_consumer_group_name", "billing"));
        all.extend_from_slice(extra);
        all
    };
    assert_eq!(
        value(&lines, "messaging_client_sent_messages", &orders),
        20.0,
        "{text}"
    );
    assert_eq!(
        value(&lines, "messaging_client_consumed_messages", &billing(&[])),
        20.0
    );
    assert_eq!(
        value(
            &lines,
            "polybus_handler_outcomes",
            &billing(&[("polybus_outcome", "ok")])
        ),
        18.0
    );
    assert_eq!(
        value(
            &lines,
            "polybus_handler_outcomes",
            &billing(&[("polybus_outcome", "dead_lettered")])
        ),
        2.0
    );
    // The handler-duration histogram, with the example's buckets: 18
    // successful attempts, 2 permanent failures.
    let ok_attempts: Vec<&Line> = lines
        .iter()
        .filter(|(n, labels, _)| {
            n == "messaging_process_duration_count" && !labels.contains_key("error_type")
        })
        .collect();
    assert_eq!(ok_attempts.len(), 1, "{text}");
    assert_eq!(ok_attempts[0].2, 18.0);
    assert_eq!(
        value(
            &lines,
            "messaging_process_duration_count",
            &billing(&[("error_type", "permanent")])
        ),
        2.0
    );
    let buckets: Vec<&str> = lines
        .iter()
        .filter(|(n, labels, _)| {
            n == "messaging_process_duration_bucket" && !labels.contains_key("error_type")
        })
        .filter_map(|(_, labels, _)| labels.get("le").map(String::as_str))
        .collect();
    assert_eq!(
        buckets,
        [
            "0.0001", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.5", "1", "5",
            "+Inf"
        ],
        "{text}"
    );
    // The +Inf bucket of the successful attempts holds all 18 (the series
    // with `error_type` are other series).
    let inf: Vec<f64> = lines
        .iter()
        .filter(|(n, labels, _)| {
            n == "messaging_process_duration_bucket"
                && !labels.contains_key("error_type")
                && labels.get("le").map(String::as_str) == Some("+Inf")
        })
        .map(|(_, _, v)| *v)
        .collect();
    assert_eq!(inf, [18.0]);
    // Everything was acked: the group has no backlog.
    assert_eq!(value(&lines, "polybus_consumer_lag", &billing(&[])), 0.0);
    assert_eq!(conn.consumer.lag("orders", "billing").await.unwrap(), 0);
    assert!(text.contains("# HELP messaging_client_sent_messages"), "{text}");
    handle.shutdown(Duration::from_secs(5)).await;
}
