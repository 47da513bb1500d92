//! RabbitMQ backend for [polybus](https://docs.rs/polybus), on
//! [lapin](https://docs.rs/lapin).
//!
//! * A topic is a durable **topic exchange** named like the topic; its
//!   `<topic>.dlq` exchange and a durable `<topic>.dlq` queue (which keeps dead
//!   letters even before anyone consumes them) are declared with it.
//! * A group is a durable queue `<topic>~<group>` ([`group_queue`]; `~` is
//!   outside the portable grammar, so no two (topic, group) pairs share a queue)
//!   bound to the exchange with `#`: a **quorum** queue by default
//!   ([`QueueType::Classic`] as an option), so declaring a group keeps
//!   everything published from then on. Quorum group queues declare
//!   `x-delivery-limit` ([`RabbitConfig::delivery_limit`], 20 by default) with
//!   at-least-once dead-lettering to `<topic>.dlq`. Queue arguments belong to
//!   the group's queue only. A queue of the old `<topic>.<group>` name is
//!   unbound and consumed until empty. A subscription without a group gets an
//!   exclusive, auto-delete classic queue. A topic with no group keeps nothing
//!   (`Capabilities::retains_without_group` is false).
//! * `send` publishes a persistent message and resolves on the publisher
//!   confirm; concurrent sends pipeline their confirms on one channel. A broker
//!   nack is an error; an unroutable message is not, unless
//!   [`RabbitConfig::mandatory`] is set (then each send holds one of a few
//!   confirm channels until its confirm, so a returned message answers its own
//!   send).
//! * Consumers use `basic.qos` prefetch equal to the runner's bound (split between
//!   the topics of one subscription). Release is
//!   `basic.nack` with requeue (RabbitMQ has no delayed requeue, so the runner
//!   retries in process). Settlement goes through lapin's per-delivery acker,
//!   which is single-use and poisoned when its channel dies, so a stale delivery
//!   tag never acks another message after a reconnect.
//! * `amqps://` connections verify the server's certificate (a CA file of
//!   their own or the system roots), optionally present a client certificate,
//!   and may check another server name ([`RabbitConfig::tls_ca_file`],
//!   [`RabbitConfig::tls_client_auth`], [`RabbitConfig::tls_server_name`], or
//!   the URL's `tls_ca`, `tls_cert`, `tls_key`, `tls_server_name`). A refused
//!   login, vhost or handshake fails at once with a non-retryable
//!   `Unauthenticated`, `PermissionDenied` or `Tls` error; a refused operation
//!   on an exchange or queue is `PermissionDenied`.
//! * Connections recover by themselves: the producer's through lapin's
//!   auto-recovery (a `send` during an outage waits for recovery within the
//!   request timeout or fails with a retryable error), each subscription's by
//!   reconnecting its own connection with backoff and consuming anew.
//!
//! ```no_run
//! # async fn demo() -> polybus_core::Result<()> {
//! let bus = polybus_rabbitmq::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
//! bus.consumer.declare_topic("rides").await?;
//! # Ok(()) }
//! ```

mod config;
mod consumer;
mod errors;
mod names;
mod producer;
mod security;
mod subscription;

use std::sync::Arc;

use lapin::types::{AMQPValue, LongString};
use polybus_core::{Connection, Result};

pub use config::{DEFAULT_DELIVERY_LIMIT, QueueType, RabbitConfig};
pub use consumer::RabbitConsumer;
pub use names::{SEPARATOR, dead_letter_queue, group_queue};
pub use producer::RabbitProducer;

const BACKEND: &str = "rabbitmq";

/// Connects with a URL: a producer and a consumer, each on its own connection.
pub async fn connect(url: &str) -> Result<Connection> {
    connect_with(RabbitConfig::new(url)?).await
}

/// Connects with a full configuration.
pub async fn connect_with(config: RabbitConfig) -> Result<Connection> {
    Ok(Connection {
        producer: Arc::new(RabbitProducer::connect(&config).await?),
        consumer: Arc::new(RabbitConsumer::connect(&config).await?),
    })
}

/// Headers RabbitMQ adds on delivery (not the user's).
pub(crate) fn is_broker_header(key: &str) -> bool {
    matches!(key, "x-delivery-count" | "x-death")
        || key.starts_with("x-first-death-")
        || key.starts_with("x-last-death-")
}

pub(crate) fn long(value: impl Into<String>) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.into()))
}

/// An AMQP header value as a polybus header value: long strings and byte
/// arrays keep their bytes (UTF-8 or not), `Void` is null, and the other typed
/// values (numbers, booleans, timestamps, decimals, tables, arrays) become their
/// text, so handlers see them; a dead-letter copy carries that text as a long
/// string (the AMQP type is not kept).
pub(crate) fn header_value(value: &AMQPValue) -> polybus_core::HeaderValue {
    use polybus_core::HeaderValue;
    match value {
        AMQPValue::LongString(s) => HeaderValue::from(s.as_bytes()),
        AMQPValue::ByteArray(b) => HeaderValue::from(b.as_slice()),
        AMQPValue::Void => HeaderValue::Null,
        other => match value_text(other) {
            Some(text) => HeaderValue::from(text),
            None => HeaderValue::from(format!("{other:?}")),
        },
    }
}

/// A polybus header value as an AMQP one: bytes as a long string, null as void.
pub(crate) fn amqp_value(value: &polybus_core::HeaderValue) -> AMQPValue {
    match value.as_bytes() {
        Some(bytes) => AMQPValue::LongString(LongString::from(bytes.to_vec())),
        None => AMQPValue::Void,
    }
}

pub(crate) fn value_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::LongLongInt(i) => Some(i.to_string()),
        AMQPValue::LongInt(i) => Some(i.to_string()),
        AMQPValue::LongUInt(i) => Some(i.to_string()),
        AMQPValue::ShortInt(i) => Some(i.to_string()),
        AMQPValue::ShortUInt(i) => Some(i.to_string()),
        AMQPValue::ShortShortInt(i) => Some(i.to_string()),
        AMQPValue::ShortShortUInt(i) => Some(i.to_string()),
        AMQPValue::Float(f) => Some(f.to_string()),
        AMQPValue::Double(f) => Some(f.to_string()),
        AMQPValue::Timestamp(t) => Some(t.to_string()),
        AMQPValue::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}
