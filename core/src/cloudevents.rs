//! CloudEvents 1.0 on every backend: binary content mode as each protocol
//! binding specifies it, and the JSON structured mode on read.
//!
//! Which names a broker's headers use is a property of the backend, declared
//! once in its [`Capabilities::binding`](crate::Capabilities::binding):
//!
//! | binding | backends | attribute headers | `datacontenttype` |
//! |---|---|---|---|
//! | [`Binding::Kafka`] | Kafka | `ce_<name>` | `content-type` header |
//! | [`Binding::Amqp`] | RabbitMQ | `cloudEvents_<name>` sent; `cloudEvents_` and `cloudEvents:` read | the AMQP `content-type` property |
//! | [`Binding::Nats`] | NATS (JetStream and core) | `ce-<name>` (the 1.0.3 working draft) | `content-type` header |
//! | [`Binding::Http`] | memory | `ce-<name>` | `content-type` header |
//!
//! **AMQP 0-9-1.** The AMQP binding is written for AMQP 1.0, whose
//! application properties are named `cloudEvents:<name>`. RabbitMQ speaks 0-9-1:
//! polybus maps application properties onto the message's `headers` table and
//! sends `cloudEvents_<name>`, because `:` is outside polybus's portable header
//! grammar; it reads both `cloudEvents_` and `cloudEvents:`. Every attribute is
//! sent as a string (`time` as RFC 3339 text, not an AMQP timestamp); on read, a
//! numeric `time` is a native timestamp: seconds (0-9-1), or milliseconds (AMQP
//! 1.0) when it is 10^11 or more.
//! `datacontenttype` travels as the `content_type` basic property (the RabbitMQ
//! backend maps the `content-type` header onto it and back).
//!
//! **Reading.** A delivery whose `content-type` starts with
//! `application/cloudevents+json` is read in structured mode (attributes and
//! `data` or `data_base64` in the JSON body), whatever the binding: the NATS
//! binding before 1.0.3 defines only that mode. Otherwise the attribute headers
//! are read (binary mode); a message without a `specversion` header is not a
//! CloudEvent ([`CloudEvent::read`] returns `None`).
//!
//! **Ids.** polybus sends a typed event with the message id as its `id`. On
//! JetStream the message id is also the `Nats-Msg-Id`, so re-sending the same
//! event (same id) within the stream's duplicate window (2 minutes) is dropped
//! by the server as a duplicate: that is the point of an id, but a producer that
//! means to send a new event must give it a new id.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::message::{Delivery, Message};

/// The CloudEvents spec version polybus writes and reads.
pub const SPEC_VERSION: &str = "1.0";
/// The header carrying `datacontenttype` in binary mode (and the event format in
/// structured mode).
pub const CONTENT_TYPE: &str = "content-type";
/// The media type of the JSON event format (structured mode).
pub const STRUCTURED_JSON: &str = "application/cloudevents+json";

/// How CloudEvents attributes map onto a broker's message headers: one protocol
/// binding of the CloudEvents specification. See the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Binding {
    /// The Kafka protocol binding: `ce_` headers, `content-type`.
    Kafka,
    /// The AMQP protocol binding, mapped onto AMQP 0-9-1 headers:
    /// `cloudEvents_` sent, `cloudEvents_` and `cloudEvents:` read.
    Amqp,
    /// The NATS protocol binding (binary mode of the 1.0.3 working draft):
    /// `ce-` headers, `content-type`.
    Nats,
    /// The HTTP binding's header names (`ce-`, `content-type`): the in-memory
    /// broker's model.
    Http,
}

impl Binding {
    /// The prefix polybus writes before each attribute name.
    pub fn prefix(self) -> &'static str {
        match self {
            Binding::Kafka => "ce_",
            Binding::Amqp => "cloudEvents_",
            Binding::Nats | Binding::Http => "ce-",
        }
    }

    /// The prefixes accepted on read (header names compared case-insensitively
    /// on NATS and HTTP, whose headers are case-insensitive, exactly elsewhere).
    pub fn read_prefixes(self) -> &'static [&'static str] {
        match self {
            Binding::Kafka => &["ce_"],
            Binding::Amqp => &["cloudEvents_", "cloudEvents:"],
            Binding::Nats | Binding::Http => &["ce-"],
        }
    }

    /// The header name carrying attribute `name` (e.g. `ce_type` on Kafka).
    pub fn header(self, name: &str) -> String {
        format!("{}{name}", self.prefix())
    }

    fn case_insensitive(self) -> bool {
        matches!(self, Binding::Nats | Binding::Http)
    }

    /// The attribute name a header carries under this binding, if it is one.
    fn attribute(self, header: &str) -> Option<&str> {
        self.read_prefixes().iter().find_map(|prefix| {
            let head = header.get(..prefix.len())?;
            let matches = if self.case_insensitive() {
                head.eq_ignore_ascii_case(prefix)
            } else {
                head == *prefix
            };
            matches.then(|| &header[prefix.len()..]).filter(|n| !n.is_empty())
        })
    }
}

/// How an event was carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// Attributes in headers, data as the payload.
    Binary,
    /// Attributes and data in one JSON document (`application/cloudevents+json`).
    Structured,
}

/// A CloudEvent's context attributes (everything but `data`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CloudEvent {
    /// `id`: unique per `source`.
    pub id: String,
    /// `source`: a URI reference naming what produced the event.
    pub source: String,
    /// `specversion`: `1.0`.
    pub specversion: String,
    /// `type`: what happened, e.g. `rides.ride-created`.
    pub ty: String,
    /// `subject`: what the event is about within the source (e.g. a ride id).
    pub subject: Option<String>,
    /// `time`: when it happened.
    pub time: Option<SystemTime>,
    /// `datacontenttype`: the media type of the data (JSON when absent).
    pub datacontenttype: Option<String>,
    /// `dataschema`: a URI of the data's schema.
    pub dataschema: Option<String>,
    /// Extension attributes, as text.
    pub extensions: BTreeMap<String, String>,
    /// How the event arrived (binary when built locally).
    pub mode: Mode,
}

/// A CloudEvent read from a delivery: its attributes and its data's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// The context attributes.
    pub attributes: CloudEvent,
    /// The data, encoded as `datacontenttype` says (the payload in binary mode).
    pub data: Bytes,
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::Codec {
        action: "decode",
        source: format!("not a valid CloudEvent: {}", reason.into()).into(),
    }
}

/// Whether `name` may be an extension attribute name (CloudEvents 1.0: lower-case
/// ASCII letters and digits; the spec recommends at most 20 characters).
pub fn is_attribute_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

const CORE: [&str; 8] = [
    "id",
    "source",
    "specversion",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
];

impl CloudEvent {
    /// Attributes for a new event of type `ty` from `source`, with a fresh id and
    /// the current time.
    pub fn new(ty: impl Into<String>, source: impl Into<String>) -> Self {
        CloudEvent {
            id: uuid::Uuid::new_v4().to_string(),
            source: source.into(),
            specversion: SPEC_VERSION.to_owned(),
            ty: ty.into(),
            subject: None,
            time: Some(SystemTime::now()),
            datacontenttype: None,
            dataschema: None,
            extensions: BTreeMap::new(),
            mode: Mode::Binary,
        }
    }

    /// Sets an extension attribute. Names are lower-case ASCII letters and
    /// digits and not a core attribute's name; anything else is an
    /// [`Error::InvalidHeader`].
    pub fn with_extension(mut self, name: &str, value: impl Into<String>) -> Result<Self> {
        if !is_attribute_name(name) || CORE.contains(&name) || name == "data" || name == "data_base64" {
            return Err(Error::InvalidHeader {
                key: name.to_owned(),
                reason: "a CloudEvents extension name is lower-case ASCII letters and digits, not a core attribute",
            });
        }
        self.extensions.insert(name.to_owned(), value.into());
        Ok(self)
    }

    /// Writes these attributes onto `message` in binary content mode: one header
    /// per attribute with the binding's prefix, `datacontenttype` as
    /// `content-type`. Replaces headers of the same names.
    pub fn write_binary(&self, message: &mut Message, binding: Binding) {
        let mut put = |name: &str, value: &str| {
            message.headers.insert(binding.header(name), value);
        };
        put("specversion", &self.specversion);
        put("id", &self.id);
        put("source", &self.source);
        put("type", &self.ty);
        if let Some(subject) = &self.subject {
            put("subject", subject);
        }
        if let Some(time) = self.time {
            put("time", &crate::time::to_rfc3339(time));
        }
        if let Some(schema) = &self.dataschema {
            put("dataschema", schema);
        }
        for (name, value) in &self.extensions {
            put(name, value);
        }
        if let Some(content_type) = &self.datacontenttype {
            message.headers.insert(CONTENT_TYPE, content_type.as_str());
        }
    }

    /// The `type` of a delivery, read from its headers only (binary mode), for
    /// routing without decoding the payload. `None` when there is none.
    pub fn type_of(delivery: &Delivery, binding: Binding) -> Option<&str> {
        delivery
            .message()
            .headers
            .iter()
            .find(|(k, _)| {
                binding
                    .attribute(k)
                    .is_some_and(|a| a.eq_ignore_ascii_case("type"))
            })
            .and_then(|(_, v)| v.as_str())
    }

    /// The delivery's `content-type` header (name matched case-insensitively).
    pub fn content_type(delivery: &Delivery) -> Option<&str> {
        delivery
            .message()
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(CONTENT_TYPE))
            .and_then(|(_, v)| v.as_str())
    }

    /// Reads a delivery as a CloudEvent: structured mode when its content type
    /// is `application/cloudevents+json`, else binary mode under `binding`.
    /// `Ok(None)` for a message that carries no CloudEvent (no `specversion`
    /// header); an [`Error::Codec`] (permanent) for one that claims to be a
    /// CloudEvent but is not a valid one.
    pub fn read(delivery: &Delivery, binding: Binding) -> Result<Option<Incoming>> {
        let content_type = Self::content_type(delivery);
        if let Some(ct) = content_type {
            let lower = ct.trim().to_ascii_lowercase();
            if lower.starts_with("application/cloudevents") {
                if lower.starts_with(STRUCTURED_JSON) {
                    return read_structured(delivery.payload()).map(Some);
                }
                return Err(invalid(format!("unsupported event format {ct:?}")));
            }
        }
        let mut attributes: BTreeMap<String, String> = BTreeMap::new();
        for (key, value) in &delivery.message().headers {
            let Some(name) = binding.attribute(key) else {
                continue;
            };
            let name = name.to_ascii_lowercase();
            let text = value
                .as_str()
                .ok_or_else(|| invalid(format!("header {key:?} is not UTF-8 text")))?;
            attributes.entry(name).or_insert_with(|| text.to_owned());
        }
        if !attributes.contains_key("specversion") {
            return Ok(None);
        }
        let mut event = from_attributes(attributes, binding)?;
        event.datacontenttype = content_type.map(str::to_owned);
        Ok(Some(Incoming {
            attributes: event,
            data: delivery.payload().clone(),
        }))
    }
}

fn from_attributes(mut attrs: BTreeMap<String, String>, binding: Binding) -> Result<CloudEvent> {
    let mut required = |name: &str| {
        attrs
            .remove(name)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| invalid(format!("missing {name:?}")))
    };
    let specversion = required("specversion")?;
    if specversion != SPEC_VERSION {
        return Err(invalid(format!("unsupported specversion {specversion:?}")));
    }
    let id = required("id")?;
    let source = required("source")?;
    let ty = required("type")?;
    let time = match attrs.remove("time") {
        None => None,
        Some(text) => Some(
            parse_time(&text, binding).ok_or_else(|| invalid(format!("time {text:?} is not RFC 3339")))?,
        ),
    };
    Ok(CloudEvent {
        id,
        source,
        specversion,
        ty,
        subject: attrs.remove("subject"),
        time,
        datacontenttype: attrs.remove("datacontenttype"),
        dataschema: attrs.remove("dataschema"),
        extensions: attrs,
        mode: Mode::Binary,
    })
}

fn parse_time(text: &str, binding: Binding) -> Option<SystemTime> {
    if let Some(t) = crate::time::parse_rfc3339(text) {
        return Some(t);
    }
    // A native AMQP timestamp arrives as a number: seconds in 0-9-1,
    // milliseconds in 1.0 (as the Python SDK's AMQP binding sends it). A number
    // of 10^11 or more is taken as milliseconds (10^11 s is the year 5138).
    if binding == Binding::Amqp {
        let n = text.parse::<u64>().ok()?;
        return Some(if n >= 100_000_000_000 {
            UNIX_EPOCH + Duration::from_millis(n)
        } else {
            UNIX_EPOCH + Duration::from_secs(n)
        });
    }
    None
}

fn read_structured(payload: &[u8]) -> Result<Incoming> {
    use base64::Engine as _;
    let serde_json::Value::Object(mut doc) = serde_json::from_slice(payload)
        .map_err(|e| invalid(format!("structured mode body is not JSON: {e}")))?
    else {
        return Err(invalid("structured mode body is not a JSON object"));
    };
    let data = doc.remove("data");
    let data_base64 = doc.remove("data_base64");
    let mut attrs = BTreeMap::new();
    for (name, value) in doc {
        let text = match value {
            serde_json::Value::String(s) => s,
            serde_json::Value::Null => continue,
            other => other.to_string(),
        };
        attrs.insert(name.to_ascii_lowercase(), text);
    }
    let mut attributes = from_attributes(attrs, Binding::Http)?;
    attributes.mode = Mode::Structured;
    let data = match (data, data_base64) {
        (Some(_), Some(_)) => return Err(invalid("both data and data_base64")),
        (None, Some(serde_json::Value::String(b64))) => base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|e| invalid(format!("data_base64: {e}")))?,
        (None, Some(_)) => return Err(invalid("data_base64 is not a string")),
        (None, None) | (Some(serde_json::Value::Null), None) => Vec::new(),
        (Some(value), None) => {
            let json = attributes
                .datacontenttype
                .as_deref()
                .is_none_or(is_json_media_type);
            match value {
                // Text data of a non-JSON media type is the text itself.
                serde_json::Value::String(text) if !json => text.into_bytes(),
                value => serde_json::to_vec(&value).map_err(|e| invalid(e.to_string()))?,
            }
        }
    };
    Ok(Incoming {
        attributes,
        data: Bytes::from(data),
    })
}

/// Whether a media type is JSON (`application/json`, `text/json`, `…+json`,
/// parameters ignored).
pub fn is_json_media_type(media_type: &str) -> bool {
    let essence = media_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Origin;

    fn delivery(message: Message) -> Delivery {
        Delivery::new(message, Origin::default(), 1)
    }

    #[test]
    fn binary_mode_round_trips_on_every_binding() {
        for binding in [Binding::Kafka, Binding::Amqp, Binding::Nats, Binding::Http] {
            let mut event = CloudEvent::new("rides.ride-created", "/rides")
                .with_extension("traceparent", "00-abc")
                .unwrap();
            event.subject = Some("ride-1".into());
            event.datacontenttype = Some("application/json".into());
            event.time = Some(UNIX_EPOCH + Duration::from_millis(1_522_900_584_123));
            let mut message = Message::new(r#"{"a":1}"#);
            event.write_binary(&mut message, binding);
            message
                .validate("t", 1 << 20)
                .expect("sendable under the portable grammar");
            let d = delivery(message);
            assert_eq!(CloudEvent::type_of(&d, binding), Some("rides.ride-created"));
            let back = CloudEvent::read(&d, binding).unwrap().unwrap();
            assert_eq!(back.attributes, event, "{binding:?}");
            assert_eq!(&back.data[..], br#"{"a":1}"#);
        }
    }

    #[test]
    fn amqp_reads_the_colon_prefix_and_numeric_times() {
        let d = delivery(
            Message::new("x")
                .with_header("cloudEvents:specversion", "1.0")
                .with_header("cloudEvents:id", "1")
                .with_header("cloudEvents:source", "/s")
                .with_header("cloudEvents:type", "t")
                .with_header("cloudEvents:time", "1522900584"),
        );
        let e = CloudEvent::read(&d, Binding::Amqp).unwrap().unwrap().attributes;
        assert_eq!(e.ty, "t");
        assert_eq!(e.time, Some(UNIX_EPOCH + Duration::from_secs(1_522_900_584)));
        assert_eq!(
            CloudEvent::read(&d, Binding::Kafka).unwrap(),
            None,
            "ce_ only on Kafka"
        );
        let ms = delivery(
            Message::new("x")
                .with_header("cloudEvents_specversion", "1.0")
                .with_header("cloudEvents_id", "1")
                .with_header("cloudEvents_source", "/s")
                .with_header("cloudEvents_type", "t")
                .with_header("cloudEvents_time", "1522900584123"),
        );
        let e = CloudEvent::read(&ms, Binding::Amqp).unwrap().unwrap().attributes;
        assert_eq!(
            e.time,
            Some(UNIX_EPOCH + Duration::from_millis(1_522_900_584_123)),
            "AMQP 1.0 milliseconds"
        );
    }

    #[test]
    fn nats_headers_are_case_insensitive() {
        let d = delivery(
            Message::new("x")
                .with_header("Ce-Specversion", "1.0")
                .with_header("Ce-Id", "1")
                .with_header("Ce-Source", "/s")
                .with_header("Ce-Type", "t")
                .with_header("Content-Type", "text/plain"),
        );
        let e = CloudEvent::read(&d, Binding::Nats).unwrap().unwrap().attributes;
        assert_eq!(
            (e.id.as_str(), e.datacontenttype.as_deref()),
            ("1", Some("text/plain"))
        );
        assert_eq!(CloudEvent::type_of(&d, Binding::Nats), Some("t"));
    }

    #[test]
    fn structured_mode_is_read_on_any_binding() {
        let body = r#"{"specversion":"1.0","id":"9","source":"/py","type":"t","time":"2018-04-05T03:56:24Z",
            "comexampleextension1":"value","num":5,"data":{"ride_id":"r"}}"#;
        let d = delivery(
            Message::new(body).with_header("content-type", "application/cloudevents+json; charset=UTF-8"),
        );
        let got = CloudEvent::read(&d, Binding::Kafka).unwrap().unwrap();
        assert_eq!(got.attributes.mode, Mode::Structured);
        assert_eq!(
            got.attributes.extensions.get("num").map(String::as_str),
            Some("5")
        );
        assert_eq!(&got.data[..], br#"{"ride_id":"r"}"#);
        let b64 = r#"{"specversion":"1.0","id":"9","source":"/py","type":"t","datacontenttype":"application/octet-stream","data_base64":"AAEC"}"#;
        let d = delivery(Message::new(b64).with_header("content-type", STRUCTURED_JSON));
        assert_eq!(
            &CloudEvent::read(&d, Binding::Nats).unwrap().unwrap().data[..],
            &[0, 1, 2]
        );
    }

    #[test]
    fn invalid_events_are_codec_errors_and_plain_messages_are_none() {
        assert_eq!(
            CloudEvent::read(&delivery(Message::new("x")), Binding::Kafka).unwrap(),
            None
        );
        let missing_id = delivery(
            Message::new("x")
                .with_header("ce_specversion", "1.0")
                .with_header("ce_source", "/s")
                .with_header("ce_type", "t"),
        );
        let err = CloudEvent::read(&missing_id, Binding::Kafka).unwrap_err();
        assert!(!err.is_retryable() && err.to_string().contains("\"id\""), "{err}");
        let avro = delivery(Message::new("x").with_header("content-type", "application/cloudevents+avro"));
        assert!(CloudEvent::read(&avro, Binding::Kafka).is_err());
        assert!(
            CloudEvent::new("t", "/s")
                .with_extension("Bad-Name", "v")
                .is_err()
        );
        assert!(CloudEvent::new("t", "/s").with_extension("id", "v").is_err());
    }
}
