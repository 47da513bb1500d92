//! A lapin delivery as a polybus one: headers, attempt count, id.

use polybus_core::{Acker, Bytes, Delivery, Event, HeaderValue, Origin, wire};

use super::RabbitSubscription;
use super::settle::RabbitAck;
use crate::{TYPES, header_value, is_broker_header, types_label, value_text};

impl RabbitSubscription {
    pub(super) fn delivery(&self, topic: String, delivery: lapin::message::Delivery) -> Event {
        // The channel's ack book learns of the tag before anyone can ack it.
        let tag = delivery.delivery_tag;
        if let Some(acks) = &self.acks {
            acks.delivered(tag);
        }
        let table = delivery.properties.headers().as_ref();
        let delivery_count = table
            .and_then(|t| t.inner().get("x-delivery-count"))
            .and_then(value_text)
            .and_then(|c| c.parse::<u32>().ok());
        // The label is ours to make: one arriving from the wire is dropped.
        let fields: Vec<(&str, &lapin::types::AMQPValue)> = table
            .map(|table| {
                table
                    .inner()
                    .iter()
                    .map(|(k, v)| (k.as_str(), v))
                    .filter(|(k, _)| !is_broker_header(k) && *k != TYPES)
                    .collect()
            })
            .unwrap_or_default();
        let mut headers: Vec<(String, HeaderValue)> = fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), header_value(v)))
            .collect();
        // The AMQP `content_type` property is the `content-type` header (the
        // CloudEvents AMQP binding's `datacontenttype`), unless one is in the table.
        if let Some(ct) = delivery.properties.content_type()
            && !headers
                .iter()
                .any(|(k, _)| k == polybus_core::cloudevents::CONTENT_TYPE)
        {
            headers.push((
                polybus_core::cloudevents::CONTENT_TYPE.to_owned(),
                HeaderValue::from(ct.as_str()),
            ));
        }
        let types = types_label(fields.iter().copied());
        let attempt = match delivery_count {
            Some(count) => count.saturating_add(1),
            None if delivery.redelivered => 2,
            None => 1,
        };
        // A message without an id (a foreign publisher) gets one from its
        // content, so a redelivery has the same id.
        let fallback = match delivery.properties.message_id() {
            Some(id) => id.as_str().to_owned(),
            None if headers.iter().any(|(k, _)| k == wire::ID) => String::new(),
            None => content_id(
                &delivery.data,
                &headers,
                delivery.properties.timestamp().unwrap_or(0),
            ),
        };
        if let Some(types) = types {
            headers.push((TYPES.to_owned(), HeaderValue::from(types)));
        }
        let message = wire::decode(Bytes::from(delivery.data), headers, || fallback);
        let origin = Origin {
            topic,
            group: self.group.clone(),
            partition: None,
            sequence: None,
        };
        Event::Delivery(
            Delivery::new(message, origin, attempt),
            Acker::new(RabbitAck {
                acker: delivery.acker,
                tag,
                acks: self.acks.clone(),
                alive: self.alive.subscribe(),
                channel: self.channel.clone(),
            }),
        )
    }
}

/// The id of a message that came without one: `amqp-` and a 64-bit FNV-1a hash
/// of its payload, headers (without the broker's) and timestamp property. The
/// same on every redelivery; two identical messages get the same id.
fn content_id(payload: &[u8], headers: &[(String, HeaderValue)], timestamp: u64) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        // Each field is length-prefixed, so fields cannot run into each other.
        for byte in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(payload);
    let mut sorted: Vec<&(String, HeaderValue)> = headers.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, value) in sorted {
        eat(key.as_bytes());
        match value.as_bytes() {
            Some(bytes) => eat(bytes),
            None => eat(b"\xff(null)"),
        }
    }
    eat(&timestamp.to_le_bytes());
    format!("amqp-{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ids_are_stable_and_follow_the_content() {
        let headers = vec![("a".to_owned(), HeaderValue::from("1"))];
        let id = content_id(b"x", &headers, 7);
        assert_eq!(id, content_id(b"x", &headers, 7));
        assert_ne!(id, content_id(b"y", &headers, 7));
        assert_ne!(id, content_id(b"x", &[], 7));
        assert_ne!(id, content_id(b"x", &headers, 8));
        // Length prefixes: moving bytes between fields changes the id.
        let ab = vec![("ab".to_owned(), HeaderValue::from(""))];
        let a_b = vec![("a".to_owned(), HeaderValue::from("b"))];
        assert_ne!(content_id(b"", &ab, 0), content_id(b"", &a_b, 0));
        assert!(id.starts_with("amqp-") && id.len() == 21, "{id}");
    }
}
