//! How a [`Message`]'s id, key and timestamp travel as broker headers, written once
//! for every backend whose broker carries string headers (Kafka, NATS, AMQP).
//!
//! A backend sends [`encode`]'s pairs as headers and rebuilds the message with
//! [`decode`]. Messages from producers that are not polybus (no id header) get a
//! fallback id from the broker's position, so every delivery has an id.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::message::{Headers, Message};

/// The header carrying the message id.
pub const ID: &str = "polybus-id";
/// The header carrying the ordering key.
pub const KEY: &str = "polybus-key";
/// The header carrying the creation time, in milliseconds since the Unix epoch.
pub const TIMESTAMP: &str = "polybus-ts";

/// Every header to send for `message`: its user headers, its system headers, and
/// the id, key and timestamp under [`ID`], [`KEY`] and [`TIMESTAMP`].
pub fn encode(message: &Message) -> impl Iterator<Item = (&str, String)> + '_ {
    let millis = message
        .timestamp
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let fixed = [
        Some((ID, message.id.clone())),
        message.key.clone().map(|k| (KEY, k)),
        Some((TIMESTAMP, millis.to_string())),
    ];
    message
        .headers
        .iter()
        .chain(&message.system_headers)
        .map(|(k, v)| (k.as_str(), v.clone()))
        .chain(fixed.into_iter().flatten())
}

/// Rebuilds a message from its payload and the headers a broker returned.
///
/// Keys starting with `polybus-` become system headers (except the id, key and
/// timestamp, which fill their fields); everything else is a user header. Without
/// an id header, the id is `fallback_id()`; without a timestamp, it is now.
pub fn decode(
    payload: Bytes,
    headers: impl IntoIterator<Item = (String, String)>,
    fallback_id: impl FnOnce() -> String,
) -> Message {
    let (user, mut system): (Headers, Headers) = Message::split_headers(headers);
    let id = system.remove(ID).filter(|id| !id.is_empty());
    let key = system.remove(KEY);
    let timestamp = system
        .remove(TIMESTAMP)
        .and_then(|ms| ms.parse::<u64>().ok())
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
        .unwrap_or_else(SystemTime::now);
    // Built directly: `Message::new` would generate an id only to drop it.
    Message {
        payload,
        key,
        headers: user,
        system_headers: system,
        id: id.unwrap_or_else(fallback_id),
        timestamp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut original = Message::new("p")
            .with_key("k")
            .with_header("a", "1")
            .with_header("e", "");
        original
            .system_headers
            .insert("polybus-dlq-reason".into(), "bad".into());
        original.timestamp = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let headers: Vec<(String, String)> = encode(&original).map(|(k, v)| (k.to_owned(), v)).collect();
        let back = decode(original.payload.clone(), headers, || {
            unreachable!("the id travels")
        });
        assert_eq!(back, original);
    }

    #[test]
    fn foreign_message_gets_a_fallback_id() {
        let back = decode(
            Bytes::from_static(b"x"),
            [("a".to_owned(), "b".to_owned())],
            || "s:7".into(),
        );
        assert_eq!(back.id, "s:7");
        assert_eq!(back.key, None);
        assert_eq!(back.headers.get("a").map(String::as_str), Some("b"));
    }
}
