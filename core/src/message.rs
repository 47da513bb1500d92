//! Messages going out and deliveries coming in.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::names::{self, RESERVED_PREFIX};

/// Header keys of a dead-lettered message (reserved, see [`DeadLetter`]).
pub mod dlq_headers {
    /// Why the message was dead-lettered.
    pub const REASON: &str = "polybus-dlq-reason";
    /// The topic the message was originally consumed from.
    pub const TOPIC: &str = "polybus-dlq-topic";
    /// How many times the handler was attempted.
    pub const ATTEMPTS: &str = "polybus-dlq-attempts";
    /// The consumer group that gave up on the message, if any.
    pub const GROUP: &str = "polybus-dlq-group";
    /// The original message's timestamp, in milliseconds since the Unix epoch
    /// (the dead letter itself carries the time it was dead-lettered).
    pub const ORIGINAL_TIMESTAMP: &str = "polybus-dlq-original-ts";
    /// Present when the dead letter is a labelled stub rather than a byte-exact
    /// copy (the message could not be published as it was); says what was left out.
    pub const STUB: &str = "polybus-dlq-stub";
    /// The record's headers exactly as the broker returned them, when polybus
    /// could not decode them (a header name that is not UTF-8, say): a JSON
    /// array of `{"name": <base64>, "value": <base64> | null}` objects, in
    /// order (see [`wire::raw_headers_label`](crate::wire::raw_headers_label)).
    pub const RAW_HEADERS: &str = "polybus-dlq-raw-headers";
}

pub use crate::headers::{HeaderValue, Headers};

/// An event to publish, or the body of a delivery.
///
/// Payload, key, user headers and id round-trip unchanged on every backend.
/// What polybus sends follows the portable grammar (UTF-8 keys and header
/// values without CR/LF); what it receives keeps the broker's bytes (binary
/// keys, repeated header keys, non-UTF-8 and null header values, a null
/// payload), and a dead-letter copy carries them unchanged.
///
/// ```
/// use polybus_core::Message;
/// let msg = Message::new("hello").with_key("ride-42").with_header("source", "app");
/// assert_eq!(msg.key_str(), Some("ride-42"));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The payload bytes (may be empty, need not be UTF-8).
    pub payload: Bytes,
    /// The ordering key, as bytes: messages with the same key keep their order.
    /// `send` accepts UTF-8 keys without CR/LF (the portable grammar); a
    /// delivery from another producer may carry any bytes (Kafka keys are bytes).
    pub key: Option<Bytes>,
    /// User headers. Keys starting with `polybus-` are rejected on send.
    pub headers: Headers,
    /// The library's own headers (`polybus-…`), such as dead-letter information.
    /// Set by polybus, not by applications; not part of [`Message::headers`].
    pub system_headers: Headers,
    /// A unique id, a UUID v4 by default.
    pub id: String,
    /// When the message was created.
    pub timestamp: SystemTime,
    /// The record had no payload at all (a Kafka tombstone), as opposed to an
    /// empty one; `payload` is then empty. Only received, never sent by `send`.
    pub tombstone: bool,
}

impl Message {
    /// A message with this payload, a fresh id and the current time.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Message {
            payload: payload.into(),
            key: None,
            headers: Headers::new(),
            system_headers: Headers::new(),
            id: new_id(),
            timestamp: SystemTime::now(),
            tombstone: false,
        }
    }

    /// A message whose payload is `value` as JSON.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self> {
        let payload = serde_json::to_vec(value).map_err(|e| Error::Codec {
            action: "encode",
            source: Box::new(e),
        })?;
        Ok(Message::new(payload))
    }

    /// Sets the ordering key (text or bytes; `send` accepts UTF-8 without CR/LF).
    pub fn with_key(mut self, key: impl AsRef<[u8]>) -> Self {
        self.key = Some(Bytes::copy_from_slice(key.as_ref()));
        self
    }

    /// The key as text, if there is one and it is UTF-8.
    pub fn key_str(&self) -> Option<&str> {
        self.key.as_deref().and_then(|k| std::str::from_utf8(k).ok())
    }

    /// Sets a user header (replacing earlier values of the same key).
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<HeaderValue>) -> Self {
        self.headers.insert(key, value);
        self
    }

    /// Sets the id (by default a fresh UUID).
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Checks what a producer must check before sending: the topic name, the
    /// header grammar, reserved keys, and the payload against `max_payload`.
    pub fn validate(&self, topic: &str, max_payload: usize) -> Result<()> {
        names::validate_topic(topic)?;
        let mut seen = std::collections::HashSet::new();
        for (key, value) in &self.headers {
            names::validate_header_key(key)?;
            if key.starts_with(RESERVED_PREFIX) {
                return Err(Error::InvalidHeader {
                    key: key.to_owned(),
                    reason: "keys starting with 'polybus-' are reserved",
                });
            }
            if !seen.insert(key) {
                return Err(Error::InvalidHeader {
                    key: key.to_owned(),
                    reason: "a key may appear once in what polybus sends (repeated keys are not portable)",
                });
            }
            validate_text_value(key, value)?;
        }
        for (key, value) in &self.system_headers {
            names::validate_header_key(key)?;
            if !key.starts_with(RESERVED_PREFIX) {
                return Err(Error::InvalidHeader {
                    key: key.to_owned(),
                    reason: "system header keys must start with 'polybus-'",
                });
            }
            validate_text_value(key, value)?;
        }
        if let Some(key) = &self.key {
            let text = std::str::from_utf8(key).map_err(|_| Error::InvalidHeader {
                key: "message key".into(),
                reason: "a key polybus sends must be UTF-8 (binary keys are received, not sent)",
            })?;
            names::validate_header_value("message key", text)?;
        }
        if self.tombstone {
            return Err(Error::Unsupported(
                "sending a null payload (tombstone) is not portable; send an empty payload".into(),
            ));
        }
        if self.id.is_empty() {
            return Err(Error::InvalidHeader {
                key: "message id".into(),
                reason: "must not be empty",
            });
        }
        names::validate_header_value("message id", &self.id)?;
        if self.payload.len() > max_payload {
            return Err(Error::PayloadTooLarge {
                size: self.payload.len(),
                max: max_payload,
            });
        }
        Ok(())
    }

    /// Splits a flat header list as a broker returns it into user headers and
    /// `polybus-` system headers. For backends.
    pub fn split_headers(all: impl IntoIterator<Item = (String, HeaderValue)>) -> (Headers, Headers) {
        let mut user = Headers::new();
        let mut system = Headers::new();
        for (k, v) in all {
            if k.starts_with(RESERVED_PREFIX) {
                system.append(k, v);
            } else {
                user.append(k, v);
            }
        }
        (user, system)
    }
}

/// A fresh message id: a random UUID v4 in its usual 36-character lowercase
/// form (the wire format every polybus version reads), written straight into
/// the string rather than through `Display`.
pub(crate) fn new_id() -> String {
    let mut buffer = uuid::Uuid::encode_buffer();
    let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buffer);
    String::from(&*text)
}

/// A header value polybus may send: UTF-8 text without CR/LF.
fn validate_text_value(key: &str, value: &HeaderValue) -> Result<()> {
    match value {
        HeaderValue::Null => Err(Error::InvalidHeader {
            key: key.to_owned(),
            reason: "null values are not portable (received, not sent)",
        }),
        HeaderValue::Bytes(_) => {
            let text = value.as_str().ok_or_else(|| Error::InvalidHeader {
                key: key.to_owned(),
                reason: "a value polybus sends must be UTF-8 text",
            })?;
            names::validate_header_value(key, text)
        }
    }
}

/// Where a delivery came from, as far as the broker tells.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Origin {
    /// The topic it was published to.
    pub topic: String,
    /// The consumer group it was delivered to, if any.
    pub group: Option<String>,
    /// The partition, on partitioned brokers (Kafka).
    pub partition: Option<i32>,
    /// The position in the topic, partition or stream, where the broker has one.
    pub sequence: Option<u64>,
}

#[derive(Debug)]
struct DeliveryInner {
    message: Message,
    origin: Origin,
    undecodable: Option<String>,
}

/// A message as a handler receives it: the message, where it came from, and which
/// attempt this is. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Delivery {
    inner: Arc<DeliveryInner>,
    attempt: u32,
}

impl Delivery {
    /// A delivery of `message` from `origin`; `attempt` is the broker's delivery
    /// count (1 on first delivery). For backends.
    pub fn new(message: Message, origin: Origin, attempt: u32) -> Self {
        Delivery {
            inner: Arc::new(DeliveryInner {
                message,
                origin,
                undecodable: None,
            }),
            attempt: attempt.max(1),
        }
    }

    /// A record the backend could not turn into a normal delivery (a header
    /// name that is not UTF-8, a header the client library cannot parse, …).
    /// `message` is the best labelled copy the backend could build (payload
    /// intact; the raw headers in [`dlq_headers::RAW_HEADERS`] where it has
    /// them); `reason` says what was wrong. The runner does not call the handler
    /// for it: it dead-letters it at once with that reason, then acks it, so the
    /// records behind it are handled. For backends.
    pub fn undecodable(message: Message, origin: Origin, attempt: u32, reason: impl Into<String>) -> Self {
        Delivery {
            inner: Arc::new(DeliveryInner {
                message,
                origin,
                undecodable: Some(reason.into()),
            }),
            attempt: attempt.max(1),
        }
    }

    /// Why this record could not be decoded, if it could not (see
    /// [`Delivery::undecodable`]). Handlers never see such deliveries.
    pub fn undecodable_reason(&self) -> Option<&str> {
        self.inner.undecodable.as_deref()
    }

    /// The message.
    pub fn message(&self) -> &Message {
        &self.inner.message
    }

    /// The payload bytes.
    pub fn payload(&self) -> &Bytes {
        &self.inner.message.payload
    }

    /// The key as text, if the message has one and it is UTF-8 (see
    /// [`key_bytes`](Delivery::key_bytes) for keys from other producers, which
    /// may be any bytes).
    pub fn key(&self) -> Option<&str> {
        self.inner.message.key_str()
    }

    /// The key's bytes, if the message has one.
    pub fn key_bytes(&self) -> Option<&Bytes> {
        self.inner.message.key.as_ref()
    }

    /// A user header's first value as text (`None` if absent, null or not UTF-8;
    /// see [`Headers::get_value`] through [`message`](Delivery::message)).
    pub fn header(&self, key: &str) -> Option<&str> {
        self.inner.message.headers.get(key)
    }

    /// Whether the record had no payload at all (a Kafka tombstone).
    pub fn is_tombstone(&self) -> bool {
        self.inner.message.tombstone
    }

    /// The message id.
    pub fn id(&self) -> &str {
        &self.inner.message.id
    }

    /// The topic the message was published to.
    pub fn topic(&self) -> &str {
        &self.inner.origin.topic
    }

    /// Where the message came from.
    pub fn origin(&self) -> &Origin {
        &self.inner.origin
    }

    /// Which attempt this is, counting broker redeliveries and in-process retries;
    /// 1 on the first.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// This delivery with another attempt number.
    pub fn with_attempt(&self, attempt: u32) -> Self {
        Delivery {
            inner: Arc::clone(&self.inner),
            attempt,
        }
    }

    /// Decodes the payload as JSON.
    ///
    /// A payload that does not decode gives [`Error::Codec`], which is not
    /// retryable: returned from a handler with `?`, it dead-letters the message.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.inner.message.payload).map_err(|e| Error::Codec {
            action: "decode",
            source: Box::new(e),
        })
    }

    /// The dead-letter information, when this message was dead-lettered by polybus.
    pub fn dead_letter(&self) -> Option<DeadLetter> {
        let sys = &self.inner.message.system_headers;
        Some(DeadLetter {
            reason: sys.get(dlq_headers::REASON)?.to_owned(),
            topic: sys.get(dlq_headers::TOPIC)?.to_owned(),
            attempts: sys.get(dlq_headers::ATTEMPTS)?.parse().ok()?,
            group: sys.get(dlq_headers::GROUP).map(str::to_owned),
            original_timestamp: sys
                .get(dlq_headers::ORIGINAL_TIMESTAMP)
                .and_then(|ms| ms.parse::<u64>().ok())
                .map(|ms| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)),
            stub: sys.get(dlq_headers::STUB).map(str::to_owned),
        })
    }
}

/// Why and where from a message was dead-lettered (read from its `polybus-` headers).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The handler's error, or "too many attempts: …".
    pub reason: String,
    /// The topic it was consumed from.
    pub topic: String,
    /// How many attempts were made.
    pub attempts: u32,
    /// The group that consumed it.
    pub group: Option<String>,
    /// When the original message was created (the dead letter's own timestamp
    /// is when it was dead-lettered).
    pub original_timestamp: Option<SystemTime>,
    /// `Some(what was left out)` when this is a labelled stub, not a byte-exact
    /// copy: the original could not be published as it was (too large, or
    /// refused by the broker because of its content).
    pub stub: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_rejects_reserved_and_oversized() {
        let ok = Message::new("x").with_header("k", "v");
        ok.validate("t", 10).unwrap();
        assert!(matches!(
            Message::new("x").with_header("polybus-x", "v").validate("t", 10),
            Err(Error::InvalidHeader { .. })
        ));
        assert!(matches!(
            Message::new(vec![0u8; 11]).validate("t", 10),
            Err(Error::PayloadTooLarge { size: 11, max: 10 })
        ));
        assert!(matches!(
            Message::new("x").validate("bad topic", 10),
            Err(Error::InvalidName { .. })
        ));
    }

    #[test]
    fn what_polybus_sends_follows_the_portable_grammar() {
        let invalid = |m: Message| matches!(m.validate("t", 100), Err(Error::InvalidHeader { .. }));
        assert!(
            invalid(Message::new("x").with_key([0u8, 0, 0, 0xff, 0xfe, 7])),
            "binary key"
        );
        assert!(
            invalid(Message::new("x").with_header("h", vec![0xffu8])),
            "non-UTF-8 value"
        );
        assert!(
            invalid(Message::new("x").with_header("h", HeaderValue::Null)),
            "null value"
        );
        let mut repeated = Message::new("x");
        repeated.headers.append("h", "1");
        repeated.headers.append("h", "2");
        assert!(invalid(repeated), "repeated key");
        let mut tombstone = Message::new("");
        tombstone.tombstone = true;
        assert!(matches!(tombstone.validate("t", 100), Err(Error::Unsupported(_))));
        Message::new("x")
            .with_key("ride-1")
            .with_header("h", "Zürich")
            .validate("t", 100)
            .unwrap();
    }

    #[test]
    fn deliveries_keep_binary_keys() {
        let mut m = Message::new("x");
        m.key = Some(Bytes::from_static(&[0, 0, 0, 0xff, 0xfe, 7]));
        let d = Delivery::new(m, Origin::default(), 1);
        assert_eq!(d.key(), None, "not text");
        assert_eq!(
            d.key_bytes().map(|k| &k[..]),
            Some(&[0u8, 0, 0, 0xff, 0xfe, 7][..])
        );
    }

    #[test]
    fn fresh_ids_are_hyphenated_lowercase_uuids() {
        let id = Message::new("x").id;
        let parsed = uuid::Uuid::parse_str(&id).expect("a UUID");
        assert_eq!(id, parsed.hyphenated().to_string());
        assert_eq!(parsed.get_version_num(), 4);
        assert_ne!(id, Message::new("x").id);
    }

    #[test]
    fn json_decode_error_is_permanent() {
        let d = Delivery::new(Message::new("not json"), Origin::default(), 1);
        let err = d.json::<u32>().unwrap_err();
        assert!(!err.is_retryable());
    }

    #[test]
    fn split_headers_separates_reserved() {
        let (user, sys) = Message::split_headers([
            ("a".to_string(), HeaderValue::from("1")),
            ("polybus-id".to_string(), HeaderValue::from("2")),
        ]);
        assert_eq!(user.len(), 1);
        assert_eq!(sys.len(), 1);
    }
}
