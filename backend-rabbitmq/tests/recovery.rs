//! Connection recovery: a small TCP proxy sits between the client and RabbitMQ,
//! and the test cuts every connection through it mid-stream (other tests running
//! in parallel are not disturbed). Runs when `POLYBUS_TEST_AMQP_URL` is set.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use polybus_conformance::{Recorder, broker_url, loud, timeout_multiplier};
use polybus_core::{Delivery, HandlerResult, Message, Order, StartFrom};
use polybus_rabbitmq::{RabbitConfig, RabbitConsumer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Forwards 127.0.0.1:<port> to the broker; `cut` drops every open connection.
struct Proxy {
    port: u16,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(broker: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a proxy port");
        let port = listener.local_addr().unwrap().port();
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let links = Arc::clone(&links);
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let broker = broker.clone();
                    let link = tokio::spawn(async move {
                        if let Ok(mut upstream) = TcpStream::connect(&broker).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                        }
                    });
                    links.lock().unwrap().push(link);
                }
            }
        });
        Proxy { port, links, accept }
    }

    fn cut(&self) -> usize {
        let links: Vec<_> = self.links.lock().unwrap().drain(..).collect();
        let n = links.iter().filter(|l| !l.is_finished()).count();
        for link in links {
            link.abort();
        }
        n
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// `amqp://user:pass@host:port/vhost` → (the URL through the proxy, host:port).
fn through_proxy(url: &str, port: u16) -> (String, String) {
    let (scheme, rest) = url.split_once("://").expect("an amqp:// URL");
    let (creds, rest) = rest.rsplit_once('@').map_or(("", rest), |(c, r)| (c, r));
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let broker = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:5672")
    };
    let at = if creds.is_empty() {
        String::new()
    } else {
        format!("{creds}@")
    };
    (format!("{scheme}://{at}127.0.0.1:{port}/{path}"), broker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn producer_and_consumer_recover_from_a_cut_connection() {
    let Some(url) = broker_url(
        "POLYBUS_TEST_AMQP_URL",
        "producer_and_consumer_recover_from_a_cut_connection",
    ) else {
        return;
    };
    let secs = |s: f64| Duration::from_secs_f64(s * timeout_multiplier());
    let (_, broker) = through_proxy(&url, 0);
    let proxy = Proxy::start(broker).await;
    let (proxied, _) = through_proxy(&url, proxy.port);
    let mut config = RabbitConfig::new(&proxied).unwrap();
    config.request_timeout = secs(20.0);
    let conn = polybus_rabbitmq::connect_with(config.clone()).await.unwrap();
    let topic = format!("recovery-{}", &Message::new("").id[..8]);
    conn.consumer.declare_topic(&topic).await.unwrap();
    conn.consumer
        .declare_group(&topic, "workers", StartFrom::Latest)
        .await
        .unwrap();

    // Messages marked "hold" never finish on their first delivery: they are
    // unacknowledged when the connection is cut and must come back.
    let handled = Recorder::new();
    let held = Recorder::new();
    let handler = {
        let (handled, held) = (handled.clone(), held.clone());
        move |d: Delivery| {
            let (handled, held) = (handled.clone(), held.clone());
            async move {
                if d.header("hold").is_some() && d.attempt() == 1 {
                    held.record(&d);
                    futures::future::pending::<()>().await;
                }
                handled.record(&d);
                HandlerResult::Ok(())
            }
        }
    };
    let runner = conn
        .runner()
        .topic(&topic)
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
        conn.producer.send(&topic, m.clone()).await.unwrap();
        sent.push(m);
    }
    handled.wait_for(10, secs(30.0)).await.unwrap();
    held.wait_for(3, secs(30.0)).await.unwrap();

    let cut = proxy.cut();
    assert!(
        cut >= 2,
        "the producer's and the consumer's connections were cut ({cut})"
    );
    // Sends right after the cut wait for recovery or fail with a retryable error.
    let mut failed = 0;
    for i in 0..5 {
        let m = Message::new(format!("outage-{i}"));
        match conn.producer.send(&topic, m.clone()).await {
            Ok(()) => sent.push(m),
            Err(e) => {
                assert!(e.is_retryable(), "a send during the outage failed for good: {e}");
                failed += 1;
            }
        }
    }
    loud(&format!(
        "INFO recovery: {} of 5 sends during the outage succeeded after recovery, {failed} failed retryably",
        5 - failed
    ));
    for i in 0..10 {
        let m = Message::new(format!("after-{i}"));
        conn.producer.send(&topic, m.clone()).await.unwrap();
        sent.push(m);
    }
    let all: HashSet<String> = sent.iter().map(|m| m.id.clone()).collect();
    handled
        .wait_until(
            "every confirmed message handled after recovery",
            secs(60.0),
            |seen| {
                let ids: HashSet<String> = seen.iter().map(|d| d.id().to_owned()).collect();
                ids.is_superset(&all)
            },
        )
        .await
        .unwrap();
    let held_ids: HashSet<String> = held.ids().into_iter().collect();
    assert!(
        handled
            .all()
            .iter()
            .filter(|d| held_ids.contains(d.id()))
            .all(|d| d.attempt() >= 2),
        "the held messages came back as redeliveries"
    );
    runner.shutdown(secs(2.0)).await;
    let _ = conn.close().await;
    let admin = RabbitConsumer::connect(&RabbitConfig::new(&url).unwrap())
        .await
        .unwrap();
    admin
        .delete_topic(&topic, &[polybus_rabbitmq::group_queue(&topic, "workers")])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_private_subscription_recovers_too() {
    let Some(url) = broker_url("POLYBUS_TEST_AMQP_URL", "a_private_subscription_recovers_too") else {
        return;
    };
    let secs = |s: f64| Duration::from_secs_f64(s * timeout_multiplier());
    let (_, broker) = through_proxy(&url, 0);
    let proxy = Proxy::start(broker).await;
    let (proxied, _) = through_proxy(&url, proxy.port);
    let mut config = RabbitConfig::new(&proxied).unwrap();
    config.request_timeout = secs(20.0);
    let conn = polybus_rabbitmq::connect_with(config).await.unwrap();
    let topic = format!("recovery-private-{}", &Message::new("").id[..8]);
    conn.consumer.declare_topic(&topic).await.unwrap();
    // No group: an exclusive, auto-delete queue that lapin must redeclare.
    let seen = Recorder::new();
    let runner = conn.runner().topic(&topic).run(seen.handler()).await.unwrap();
    conn.producer.send(&topic, Message::new("before")).await.unwrap();
    seen.wait_for(1, secs(30.0)).await.unwrap();
    assert!(proxy.cut() >= 2);
    // Give recovery a moment to redeclare the private queue and its binding,
    // then publish: messages sent once it is back reach the subscription.
    let after = Message::new("after");
    let until = tokio::time::Instant::now() + secs(30.0);
    loop {
        conn.producer
            .send(&topic, after.clone().with_id(Message::new("").id))
            .await
            .unwrap();
        if seen.len() >= 2 || tokio::time::Instant::now() > until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        seen.len() >= 2,
        "the private subscription receives again after recovery"
    );
    runner.shutdown(secs(5.0)).await;
    let _ = conn.close().await;
    let admin = RabbitConsumer::connect(&RabbitConfig::new(&url).unwrap())
        .await
        .unwrap();
    admin.delete_topic(&topic, &[]).await.unwrap();
}

/// Issue 12 item 6: a subscription that also consumes a queue of the old
/// `<topic>.<group>` name still reconnects after that queue was deleted (it
/// would be refused with 404 on every attempt).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscription_reconnects_after_its_old_name_queue_is_gone() {
    let Some(url) = broker_url(
        "POLYBUS_TEST_AMQP_URL",
        "a_subscription_reconnects_after_its_old_name_queue_is_gone",
    ) else {
        return;
    };
    let secs = |s: f64| Duration::from_secs_f64(s * timeout_multiplier());
    let (_, broker) = through_proxy(&url, 0);
    let proxy = Proxy::start(broker).await;
    let (proxied, _) = through_proxy(&url, proxy.port);
    let mut config = RabbitConfig::new(&proxied).unwrap();
    config.request_timeout = secs(5.0);
    let conn = polybus_rabbitmq::connect_with(config.clone()).await.unwrap();
    let topic = format!("recovery-legacy-{}", &Message::new("").id[..8]);
    let old = format!("{topic}.g");
    conn.consumer.declare_topic(&topic).await.unwrap();
    // What the previous version declared for group "g", with a backlog.
    let raw = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = raw.create_channel().await.unwrap();
    channel
        .queue_declare(
            old.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            old.as_str().into(),
            topic.as_str().into(),
            "#".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    conn.producer.send(&topic, Message::new("backlog")).await.unwrap();
    let mut sub = conn
        .consumer
        .subscribe(polybus_core::SubscribeOptions::new(&topic).group("g"))
        .await
        .unwrap();
    let mut payloads = Vec::new();
    let mut errors = Vec::new();
    let mut receive = async |sub: &mut Box<dyn polybus_core::Subscription>| {
        let until = tokio::time::Instant::now() + secs(20.0);
        while tokio::time::Instant::now() < until {
            match tokio::time::timeout_at(until, sub.next()).await {
                Ok(Some(Ok(polybus_core::Event::Delivery(d, acker)))) => {
                    acker.ack().await.unwrap();
                    return Some(String::from_utf8_lossy(&d.message().payload).into_owned());
                }
                Ok(Some(Err(e))) => errors.push(e.to_string()),
                Ok(Some(Ok(_))) => {}
                Ok(None) | Err(_) => break,
            }
        }
        None
    };
    payloads.push(receive(&mut sub).await);
    // The old queue is drained and deleted; then the connection drops.
    channel
        .queue_delete(old.as_str().into(), Default::default())
        .await
        .unwrap();
    let _ = raw.close(200, "bye".into()).await;
    assert!(proxy.cut() >= 1);
    conn.producer.send(&topic, Message::new("after")).await.unwrap();
    payloads.push(receive(&mut sub).await);
    let _ = sub.close().await;
    let _ = conn.close().await;
    let admin = RabbitConsumer::connect(&RabbitConfig::new(&url).unwrap())
        .await
        .unwrap();
    admin
        .delete_topic(&topic, &[polybus_rabbitmq::group_queue(&topic, "g"), old])
        .await
        .unwrap();
    assert_eq!(
        payloads,
        [Some("backlog".to_owned()), Some("after".to_owned())],
        "errors while reconnecting: {errors:?}"
    );
}
