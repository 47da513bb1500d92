//! Messages to and from NATS headers, with fallible conversions only.

use std::str::FromStr;

use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use polybus_core::{Bytes, Error, Message, Result, wire};

/// Header keys NATS itself interprets (`Nats-Msg-Id`, `Nats-Expected-Stream`, …).
const SERVER_PREFIX: &str = "nats-";

/// Whether NATS itself interprets this header key (`Nats-…`, any case).
fn is_server_header(key: &str) -> bool {
    key.as_bytes()
        .get(..SERVER_PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(SERVER_PREFIX.as_bytes()))
}

/// The headers for `message`. With `dedup` (JetStream) the id travels as
/// `Nats-Msg-Id`, which the server also uses to drop duplicate publishes;
/// otherwise as `polybus-id`.
pub(crate) fn encode(message: &Message, dedup: bool) -> Result<HeaderMap> {
    let mut map = HeaderMap::new();
    for (key, value) in wire::encode(message) {
        if dedup && key == wire::ID {
            continue;
        }
        if is_server_header(key) {
            return Err(Error::InvalidHeader {
                key: key.to_owned(),
                reason: "keys starting with 'Nats-' are interpreted by the NATS server",
            });
        }
        let name = HeaderName::from_str(key).map_err(|_| Error::InvalidHeader {
            key: key.to_owned(),
            reason: "not a valid NATS header name",
        })?;
        let text = value.as_str().ok_or_else(|| Error::InvalidHeader {
            key: key.to_owned(),
            reason: "NATS header values are text: this one is null or not UTF-8",
        })?;
        let value = HeaderValue::from_str(text).map_err(|_| Error::InvalidHeader {
            key: key.to_owned(),
            reason: "not a valid NATS header value",
        })?;
        map.append(name, value);
    }
    if dedup {
        let id = HeaderValue::from_str(&message.id).map_err(|_| Error::InvalidHeader {
            key: "message id".into(),
            reason: "not a valid NATS header value",
        })?;
        map.insert(async_nats::header::NATS_MESSAGE_ID, id);
    }
    Ok(map)
}

/// Rebuilds a message; the server's own `Nats-` headers are left out, except
/// `Nats-Msg-Id`, which is the id when there is no `polybus-id`.
pub(crate) fn decode(
    payload: Bytes,
    headers: Option<&HeaderMap>,
    fallback_id: impl FnOnce() -> String,
) -> Message {
    let msg_id = headers
        .and_then(|map| map.get(async_nats::header::NATS_MESSAGE_ID))
        .map(|v| v.as_str().to_owned())
        .filter(|id| !id.is_empty());
    let fallback_id = move || msg_id.unwrap_or_else(fallback_id);
    let pairs = headers
        .into_iter()
        .flat_map(|map| map.iter())
        .filter(|(name, _)| !is_server_header(name.as_ref()))
        .flat_map(|(name, values)| {
            let name: &str = name.as_ref();
            values
                .iter()
                .map(move |v| (name.to_owned(), polybus_core::HeaderValue::from(v.as_str())))
        });
    wire::decode(payload, pairs, fallback_id)
}

/// The bytes these headers take on the wire (`NATS/1.0\r\n`, `k: v\r\n` lines, `\r\n`).
pub(crate) fn wire_len(map: &HeaderMap) -> usize {
    12 + map
        .iter()
        .flat_map(|(k, vs)| {
            let k: &str = k.as_ref();
            vs.iter().map(move |v| k.len() + v.as_str().len() + 4)
        })
        .sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let m = Message::new("x")
            .with_key("k")
            .with_header("unicode", "héllo ✓")
            .with_header("empty", "");
        let map = encode(&m, true).unwrap();
        assert_eq!(map.get("Nats-Msg-Id").map(|v| v.as_str()), Some(m.id.as_str()));
        let back = decode(m.payload.clone(), Some(&map), || unreachable!());
        assert_eq!(
            (back.id, back.key, back.headers),
            (m.id.clone(), m.key.clone(), m.headers.clone())
        );
        for key in ["Nats-Expected-Stream", "nats-msg-id"] {
            let bad = Message::new("x").with_header(key, "v");
            assert!(
                matches!(encode(&bad, true), Err(Error::InvalidHeader { .. })),
                "{key}"
            );
        }
        assert!(wire_len(&map) > m.id.len());
    }
}
