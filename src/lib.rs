#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use polybus_core::*;

/// The in-process broker (feature `memory`, on by default).
#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub use polybus_memory as memory;

/// The RabbitMQ backend (feature `rabbitmq`).
#[cfg(feature = "rabbitmq")]
#[cfg_attr(docsrs, doc(cfg(feature = "rabbitmq")))]
pub use polybus_rabbitmq as rabbitmq;

/// The Kafka backend, on rdkafka (feature `kafka`).
#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub use polybus_kafka as kafka;

/// The NATS backend: JetStream (default) and core NATS (feature `nats`).
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub use polybus_nats as nats;

/// Everything most applications need, for `use polybus::prelude::*`.
pub mod prelude {
    pub use polybus_core::typed::{Event, Events, Meta, Publisher, Router, State, UnknownType};
    pub use polybus_core::{
        CatchUp, Connection, Consumer, Delivery, Ended, HandlerError, HandlerResult, Message, Order,
        Producer, ProducerExt, RetryPolicy, RunHandle, RunState, StartFrom, event,
    };
}

/// Connects to the broker a URL names and returns its producer and consumer.
///
/// | scheme | backend | feature |
/// |---|---|---|
/// | `memory://` or `memory://<name>` | in-process broker (same name, same broker) | `memory` (default) |
/// | `kafka://[user:pass@]host:port,host:port[?option=value]` (`sasl_mechanism`, `tls`, `tls_ca`, …) | Kafka | `kafka` |
/// | `amqp://user:pass@host:port/vhost`, `amqps://…` | RabbitMQ | `rabbitmq` |
/// | `nats://host:port[,host:port][?mode=core]`, `tls://…`, `nats+tls://…` | NATS JetStream (core NATS with `mode=core`) | `nats` |
///
/// A scheme whose backend was not compiled in gives [`Error::InvalidConfig`]
/// naming the feature to enable. Credentials in the URL never appear in errors.
pub async fn connect(url: &str) -> Result<Connection> {
    let Some((scheme, _rest)) = url.split_once("://") else {
        return Err(Error::InvalidConfig(format!(
            "{:?} is not a broker URL: expected <scheme>://…, e.g. memory:// or nats://localhost:4222",
            redact_url(url)
        )));
    };
    match scheme {
        "memory" => {
            #[cfg(feature = "memory")]
            {
                polybus_memory::connect(url)
            }
            #[cfg(not(feature = "memory"))]
            {
                Err(missing_feature(scheme, "memory"))
            }
        }
        "amqp" | "amqps" => {
            #[cfg(feature = "rabbitmq")]
            {
                polybus_rabbitmq::connect(url).await
            }
            #[cfg(not(feature = "rabbitmq"))]
            {
                Err(missing_feature(scheme, "rabbitmq"))
            }
        }
        "nats" | "tls" | "nats+tls" => {
            #[cfg(feature = "nats")]
            {
                polybus_nats::connect(url).await
            }
            #[cfg(not(feature = "nats"))]
            {
                Err(missing_feature(scheme, "nats"))
            }
        }
        "kafka" => {
            #[cfg(feature = "kafka")]
            {
                polybus_kafka::connect(url).await
            }
            #[cfg(not(feature = "kafka"))]
            {
                Err(missing_feature(scheme, "kafka"))
            }
        }
        other => Err(Error::InvalidConfig(format!(
            "unknown broker URL scheme {other:?}: expected memory, kafka, amqp, amqps, nats, tls or nats+tls"
        ))),
    }
}

/// The error for a scheme whose backend this build leaves out.
#[allow(dead_code)]
fn missing_feature(scheme: &str, feature: &str) -> Error {
    Error::InvalidConfig(format!(
        "the {scheme}:// scheme needs the `{feature}` feature of polybus, which this build does not enable"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unknown_and_missing_schemes_are_clear_errors() {
        #[cfg(not(feature = "rabbitmq"))]
        {
            let err = connect("amqp://guest:secret@localhost:5672/%2f")
                .await
                .unwrap_err();
            let text = err.to_string();
            assert!(text.contains("`rabbitmq` feature"), "{text}");
            assert!(!text.contains("secret"));
        }
        #[cfg(not(feature = "kafka"))]
        {
            let err = connect("kafka://127.0.0.1:9092").await.unwrap_err();
            assert!(err.to_string().contains("`kafka` feature"), "{err}");
        }
        assert!(matches!(connect("ftp://x").await, Err(Error::InvalidConfig(_))));
        assert!(matches!(
            connect("localhost:9092").await,
            Err(Error::InvalidConfig(_))
        ));
    }

    #[cfg(feature = "rabbitmq")]
    #[tokio::test]
    async fn amqp_urls_reach_the_rabbitmq_backend() {
        let err = connect("amqp://guest:secret@127.0.0.1:bad/%2f")
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
        assert!(!err.to_string().contains("secret"), "{err}");
        // Nothing listens on port 1: a retryable error, not a hang.
        let err = connect("amqp://guest:secret@127.0.0.1:1/%2f").await.unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[cfg(feature = "kafka")]
    #[tokio::test]
    async fn kafka_urls_reach_the_kafka_backend() {
        for bad in [
            "kafka://127.0.0.1",
            "kafka://127.0.0.1:bad",
            "kafka://a:1,,b:2",
            "kafka://a:1/path",
        ] {
            let err = connect(bad).await.unwrap_err();
            assert!(matches!(err, Error::InvalidConfig(_)), "{bad}: {err}");
        }
        // Nothing listens on port 1: a retryable connection error within the
        // connect timeout, without the password.
        let started = std::time::Instant::now();
        let err = connect("kafka://user:secret@127.0.0.1:1?sasl_mechanism=SCRAM-SHA-512")
            .await
            .unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert!(!err.to_string().contains("secret"), "{err}");
        // Credentials without a mechanism would never be sent: refused.
        let err = connect("kafka://user:secret@127.0.0.1:1").await.unwrap_err();
        assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
        assert!(!err.to_string().contains("secret"), "{err}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "{:?}",
            started.elapsed()
        );
    }

    #[cfg(feature = "nats")]
    #[tokio::test]
    async fn nats_urls_reach_the_nats_backend() {
        let err = connect("nats://127.0.0.1:bad").await.unwrap_err();
        assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
        // Nothing listens on port 1: a retryable connection error, not a hang.
        let err = connect("nats://user:secret@127.0.0.1:1").await.unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    /// Every codec compiled in carries a typed event end to end: the publisher
    /// writes its media type, the runner decodes by it.
    #[cfg(all(feature = "memory", feature = "msgpack", feature = "cbor"))]
    #[tokio::test]
    async fn every_codec_carries_typed_events_end_to_end() {
        use std::sync::{Arc, Mutex};
        use typed::{Codec, Events, Meta};

        #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
        struct Measured {
            sensor: String,
            value: f64,
        }
        event!(Measured => "tests.measured", key = |e| &e.sensor);

        let bus = connect("memory://codecs-end-to-end").await.unwrap();
        bus.consumer
            .declare_group("m", "g", StartFrom::Latest)
            .await
            .unwrap();
        type Seen = Vec<(Measured, Option<String>)>;
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let handler = {
            let seen = Arc::clone(&seen);
            Events::new(&bus, ()).handler(move |m: Measured, meta: Meta| {
                let seen = Arc::clone(&seen);
                async move {
                    let content_type = meta.header("content-type").map(str::to_owned);
                    seen.lock().unwrap().push((m, content_type));
                    HandlerResult::Ok(())
                }
            })
        };
        let handle = bus.runner().topic("m").group("g").run(handler).await.unwrap();
        for (i, codec) in Codec::ALL.iter().enumerate() {
            let publisher = Events::new(&bus, ()).with_codec(*codec).publisher();
            let event = Measured {
                sensor: format!("s-{i}"),
                value: i as f64 + 0.5,
            };
            publisher.publish("m", &event).await.unwrap();
        }
        for _ in 0..200 {
            if seen.lock().unwrap().len() == Codec::ALL.len() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let report = handle.shutdown(std::time::Duration::from_secs(5)).await;
        let mut seen = seen.lock().unwrap().clone();
        seen.sort_by(|a, b| a.0.sensor.cmp(&b.0.sensor));
        let media: Vec<Option<String>> = seen.iter().map(|(_, ct)| ct.clone()).collect();
        let expected: Vec<Option<String>> = Codec::ALL
            .iter()
            .map(|c| Some(c.media_type().to_owned()))
            .collect();
        assert_eq!(media, expected);
        assert_eq!(seen[1].0.value, 1.5);
        assert_eq!(report.dead_lettered, 0);
    }

    #[cfg(feature = "memory")]
    #[tokio::test]
    async fn memory_urls_share_a_broker_by_name() {
        let a = connect("memory://shared-by-name").await.unwrap();
        let b = connect("memory://shared-by-name").await.unwrap();
        a.consumer
            .declare_group("t", "g", StartFrom::Latest)
            .await
            .unwrap();
        a.producer.send("t", Message::new("x")).await.unwrap();
        let mut sub = b
            .consumer
            .subscribe(SubscribeOptions::new("t").group("g"))
            .await
            .unwrap();
        match sub.next().await {
            Some(Ok(Event::Delivery(d, acker))) => {
                assert_eq!(d.payload().as_ref(), b"x");
                acker.ack().await.unwrap();
            }
            other => panic!("expected a delivery, got {other:?}"),
        }
    }
}
