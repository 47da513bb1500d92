//! How a [`Message`]'s id, key and timestamp travel as broker headers, written once
//! for every backend whose broker carries string headers (Kafka, NATS, AMQP).
//!
//! A backend sends [`encode`]'s pairs as headers and rebuilds the message with
//! [`decode`]. Messages from producers that are not polybus (no id header) get a
//! fallback id from the broker's position, so every delivery has an id.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::message::{HeaderValue, Headers, Message};

/// The header carrying the message id.
pub const ID: &str = "polybus-id";
/// The header carrying the ordering key.
pub const KEY: &str = "polybus-key";
/// The header carrying the creation time, in milliseconds since the Unix epoch.
pub const TIMESTAMP: &str = "polybus-ts";

/// Every header to send for `message`: its user headers, its system headers, and
/// the id, key and timestamp under [`ID`], [`KEY`] and [`TIMESTAMP`].
///
/// Values are what the message holds: text for everything `send` accepted, but a
/// dead-letter copy of another producer's message may hold bytes that are not
/// UTF-8, or null values; a backend whose broker cannot carry those refuses
/// them with [`Error::InvalidHeader`](crate::Error::InvalidHeader) (the runner
/// then dead-letters a labelled stub).
pub fn encode(message: &Message) -> impl Iterator<Item = (&str, HeaderValue)> + '_ {
    let millis = message
        .timestamp
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let fixed = [
        Some((ID, HeaderValue::from(message.id.as_str()))),
        message.key.clone().map(|k| (KEY, HeaderValue::Bytes(k))),
        Some((TIMESTAMP, HeaderValue::from(millis.to_string()))),
    ];
    message
        .headers
        .iter()
        .chain(&message.system_headers)
        .map(|(k, v)| (k, v.clone()))
        .chain(fixed.into_iter().flatten())
}

/// Rebuilds a message from its payload and the headers a broker returned.
///
/// Keys starting with `polybus-` become system headers (except the id, key and
/// timestamp, which fill their fields); everything else is a user header. Without
/// an id header, the id is `fallback_id()`; without a timestamp, it is now.
pub fn decode(
    payload: Bytes,
    headers: impl IntoIterator<Item = (String, HeaderValue)>,
    fallback_id: impl FnOnce() -> String,
) -> Message {
    let (user, mut system): (Headers, Headers) = Message::split_headers(headers);
    let id = system
        .remove(ID)
        .and_then(|v| v.as_str().map(str::to_owned))
        .filter(|id| !id.is_empty());
    let key = system.remove(KEY).and_then(|v| match v {
        HeaderValue::Bytes(b) => Some(b),
        HeaderValue::Null => None,
    });
    let timestamp = system
        .remove(TIMESTAMP)
        .and_then(|ms| ms.as_str()?.parse::<u64>().ok())
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
        tombstone: false,
    }
}

/// The value of [`dlq_headers::RAW_HEADERS`](crate::dlq_headers::RAW_HEADERS) for
/// headers polybus could not decode: a JSON array of `{"name": <base64>,
/// "value": <base64> | null}`, in order (standard base64 with padding). Text
/// only, so it fits every broker's headers.
pub fn raw_headers_label<'a>(headers: impl IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>) -> String {
    use base64::Engine as _;
    let b64 = &base64::engine::general_purpose::STANDARD;
    let entries: Vec<serde_json::Value> = headers
        .into_iter()
        .map(|(name, value)| {
            serde_json::json!({
                "name": b64.encode(name),
                "value": value.map(|v| b64.encode(v)),
            })
        })
        .collect();
    serde_json::Value::Array(entries).to_string()
}

/// One raw header: its name's bytes and its value's bytes (`None`: null).
pub type RawHeader = (Vec<u8>, Option<Vec<u8>>);

/// Reads a [`raw_headers_label`] back into names and values.
pub fn parse_raw_headers_label(label: &str) -> Option<Vec<RawHeader>> {
    use base64::Engine as _;
    let b64 = &base64::engine::general_purpose::STANDARD;
    let entries: Vec<serde_json::Value> = serde_json::from_str(label).ok()?;
    entries
        .iter()
        .map(|e| {
            let name = b64.decode(e.get("name")?.as_str()?).ok()?;
            let value = match e.get("value")? {
                serde_json::Value::Null => None,
                v => Some(b64.decode(v.as_str()?).ok()?),
            };
            Some((name, value))
        })
        .collect()
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
        original.system_headers.insert("polybus-dlq-reason", "bad");
        original.timestamp = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let headers: Vec<(String, HeaderValue)> = encode(&original).map(|(k, v)| (k.to_owned(), v)).collect();
        let back = decode(original.payload.clone(), headers, || {
            unreachable!("the id travels")
        });
        assert_eq!(back, original);
    }

    #[test]
    fn raw_headers_label_round_trips_any_bytes() {
        let raw: Vec<(Vec<u8>, Option<Vec<u8>>)> = vec![
            (vec![0xff, b'k'], Some(vec![0, 1, 2])),
            (b"plain".to_vec(), None),
            (b"plain".to_vec(), Some(Vec::new())),
        ];
        let label = raw_headers_label(raw.iter().map(|(n, v)| (&n[..], v.as_deref())));
        assert!(!label.contains('\n') && !label.contains('\r'));
        assert_eq!(parse_raw_headers_label(&label), Some(raw));
    }

    #[test]
    fn foreign_message_gets_a_fallback_id() {
        let back = decode(
            Bytes::from_static(b"x"),
            [("a".to_owned(), HeaderValue::from("b"))],
            || "s:7".into(),
        );
        assert_eq!(back.id, "s:7");
        assert_eq!(back.key, None);
        assert_eq!(back.headers.get("a"), Some("b"));
    }
}
