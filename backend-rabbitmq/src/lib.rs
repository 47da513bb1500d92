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
//!   tag never acks another message after a reconnect. Acks of contiguous
//!   delivery tags are coalesced into one `basic.ack` with `multiple = true`
//!   per channel (never past a tag still held or being released; an ack above
//!   a held tag waits at most [`RabbitConfig::ack_coalescing`], 2 ms by
//!   default, then goes alone); an ack returns once its frame is written.
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
//! * Messages from other publishers: typed AMQP header values reach handlers as
//!   text and get their type back in dead-letter copies (the
//!   `polybus-amqp-types` system header). A message lapin cannot parse (a header
//!   name or `message_id` that is not UTF-8) drops the connection: the
//!   subscription then consumes with prefetch 1, so a quorum queue's delivery
//!   limit dead-letters only that message, and after a bounded number of losses
//!   in a row at the same point (classic queues: 3) it fails with a
//!   non-retryable error instead of reconnecting forever.
//!
//! ```no_run
//! # async fn demo() -> polybus_core::Result<()> {
//! let bus = polybus_rabbitmq::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
//! bus.consumer.declare_topic("rides").await?;
//! # Ok(()) }
//! ```

mod acks;
mod config;
mod consumer;
mod errors;
mod names;
mod producer;
mod security;
mod subscription;

use std::sync::Arc;

use lapin::types::{AMQPValue, ByteArray, DecimalValue, LongString};
use polybus_core::{Connection, Result};

pub use config::{DEFAULT_ACK_COALESCING, DEFAULT_DELIVERY_LIMIT, QueueType, RabbitConfig};
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

/// The system header that keeps the AMQP types of a delivery's typed header
/// values (see [`types_label`]); it is not published as such: the producer
/// re-encodes the values it names.
pub(crate) const TYPES: &str = "polybus-amqp-types";

/// The AMQP type letter of a scalar value whose text converts back exactly
/// (RabbitMQ's field type tags), or `None` for strings, void, tables and arrays.
fn type_tag(value: &AMQPValue) -> Option<char> {
    Some(match value {
        AMQPValue::Boolean(_) => 't',
        AMQPValue::ShortShortInt(_) => 'b',
        AMQPValue::ShortShortUInt(_) => 'B',
        AMQPValue::ShortInt(_) => 's',
        AMQPValue::ShortUInt(_) => 'u',
        AMQPValue::LongInt(_) => 'I',
        AMQPValue::LongUInt(_) => 'i',
        AMQPValue::LongLongInt(_) => 'l',
        AMQPValue::Float(_) => 'f',
        AMQPValue::Double(_) => 'd',
        AMQPValue::DecimalValue(_) => 'D',
        AMQPValue::Timestamp(_) => 'T',
        AMQPValue::ByteArray(_) => 'x',
        _ => None?,
    })
}

/// The value of [`TYPES`] for a delivery's headers: `<tag>=<name>` for each
/// typed scalar, comma-separated, with `%`, `,` and `=` in names percent-encoded;
/// `None` when every value is a string, void, a table or an array.
pub(crate) fn types_label<'a>(headers: impl IntoIterator<Item = (&'a str, &'a AMQPValue)>) -> Option<String> {
    let entries: Vec<String> = headers
        .into_iter()
        .filter_map(|(name, value)| {
            let tag = type_tag(value)?;
            let name = name.replace('%', "%25").replace(',', "%2C").replace('=', "%3D");
            Some(format!("{tag}={name}"))
        })
        .collect();
    (!entries.is_empty()).then(|| entries.join(","))
}

/// The names and type letters of a [`TYPES`] label (malformed entries are skipped).
pub(crate) fn parse_types_label(label: &str) -> Vec<(String, char)> {
    label
        .split(',')
        .filter_map(|entry| {
            let (tag, name) = entry.split_once('=')?;
            let mut tags = tag.chars();
            let tag = tags.next().filter(|_| tags.next().is_none())?;
            let name = name.replace("%3D", "=").replace("%2C", ",").replace("%25", "%");
            Some((name, tag))
        })
        .collect()
}

/// A header value converted back to the AMQP type `tag` names, or `None` when
/// its text does not parse as one (a changed value stays a long string).
pub(crate) fn typed_value(tag: char, value: &polybus_core::HeaderValue) -> Option<AMQPValue> {
    let bytes = value.as_bytes()?;
    if tag == 'x' {
        return Some(AMQPValue::ByteArray(ByteArray::from(bytes.to_vec())));
    }
    let text = std::str::from_utf8(bytes).ok()?;
    Some(match tag {
        't' => AMQPValue::Boolean(text.parse().ok()?),
        'b' => AMQPValue::ShortShortInt(text.parse().ok()?),
        'B' => AMQPValue::ShortShortUInt(text.parse().ok()?),
        's' => AMQPValue::ShortInt(text.parse().ok()?),
        'u' => AMQPValue::ShortUInt(text.parse().ok()?),
        'I' => AMQPValue::LongInt(text.parse().ok()?),
        'i' => AMQPValue::LongUInt(text.parse().ok()?),
        'l' => AMQPValue::LongLongInt(text.parse().ok()?),
        'f' => AMQPValue::Float(text.parse().ok()?),
        'd' => AMQPValue::Double(text.parse().ok()?),
        'T' => AMQPValue::Timestamp(text.parse().ok()?),
        'D' => {
            let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
            let scale = u8::try_from(fraction.len()).ok()?;
            if whole.is_empty() || !whole.bytes().chain(fraction.bytes()).all(|b| b.is_ascii_digit()) {
                return None;
            }
            let value = format!("{whole}{fraction}").parse().ok()?;
            AMQPValue::DecimalValue(DecimalValue { scale, value })
        }
        _ => return None,
    })
}

/// A decimal's exact text: its digits with the point `scale` places from the right.
fn decimal_text(decimal: &DecimalValue) -> String {
    let digits = decimal.value.to_string();
    let scale = usize::from(decimal.scale);
    if scale == 0 {
        return digits;
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (whole, fraction) = padded.split_at(padded.len() - scale);
    format!("{whole}.{fraction}")
}

/// An AMQP header value as a polybus header value: long strings and byte
/// arrays keep their bytes (UTF-8 or not), `Void` is null, and the other typed
/// values become their text, so handlers see them: numbers, booleans and
/// timestamps (seconds) as Rust prints them (floats in their shortest exact
/// form), decimals as their exact digits (`12.50`), tables and arrays as a
/// debug rendering. A dead-letter copy gets the scalars' types back
/// ([`TYPES`]); tables and arrays travel as that text.
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
        AMQPValue::DecimalValue(d) => Some(decimal_text(d)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use polybus_core::HeaderValue;

    #[test]
    fn typed_scalars_convert_back_exactly() {
        let values = [
            AMQPValue::Boolean(true),
            AMQPValue::ShortShortInt(-7),
            AMQPValue::ShortShortUInt(250),
            AMQPValue::ShortInt(-30_000),
            AMQPValue::ShortUInt(65_000),
            AMQPValue::LongInt(i32::MIN),
            AMQPValue::LongUInt(u32::MAX),
            AMQPValue::LongLongInt(i64::MIN),
            AMQPValue::Float(0.1),
            AMQPValue::Double(-1.0e-300),
            AMQPValue::Double(f64::MAX),
            AMQPValue::Timestamp(1_700_000_000),
            AMQPValue::DecimalValue(DecimalValue { scale: 3, value: 5 }),
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 1250,
            }),
            AMQPValue::DecimalValue(DecimalValue { scale: 0, value: 42 }),
            AMQPValue::ByteArray(ByteArray::from(vec![0, 0xff, 7])),
        ];
        for value in values {
            let tag = type_tag(&value).expect("a scalar");
            let text = header_value(&value);
            assert_eq!(
                typed_value(tag, &text),
                Some(value.clone()),
                "{value:?} as {text:?}"
            );
        }
        assert_eq!(
            header_value(&AMQPValue::DecimalValue(DecimalValue { scale: 3, value: 5 })),
            HeaderValue::from("0.005")
        );
        assert_eq!(typed_value('I', &HeaderValue::from("not a number")), None);
        assert_eq!(typed_value('D', &HeaderValue::from("-1.5")), None);
    }

    #[test]
    fn types_labels_round_trip_any_name() {
        let int = AMQPValue::LongInt(1);
        let text = AMQPValue::LongString("x".into());
        let stamp = AMQPValue::Timestamp(2);
        let label = types_label([("a,b=c%d", &int), ("plain", &text), ("t", &stamp)]).unwrap();
        assert_eq!(
            parse_types_label(&label),
            vec![("a,b=c%d".to_owned(), 'I'), ("t".to_owned(), 'T')]
        );
        assert_eq!(types_label([("plain", &text)]), None);
    }
}
