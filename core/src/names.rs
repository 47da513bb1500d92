//! The portable grammar for topic names, group names and headers.
//!
//! The same input is accepted or rejected the same way on every backend:
//!
//! * **topic and group names**: 1 to [`MAX_NAME_LEN`] (120) characters from ASCII
//!   letters, digits, `.`, `_` and `-`, where `.` separates non-empty segments
//!   (no leading, trailing or doubled `.`, since NATS subjects and AMQP routing
//!   keys cannot carry empty segments). A topic that is *declared* or consumed by a
//!   runner has at most [`MAX_TOPIC_LEN`] (116), so its `<topic>.dlq` fits too.
//!   (The bounds leave room for RabbitMQ's `<topic>~<group>` queues, 255 at most.)
//! * **header keys**: 1 to [`MAX_HEADER_KEY_LEN`] printable ASCII characters
//!   (`!` to `~`) other than `:`. Keys starting with [`RESERVED_PREFIX`] belong to
//!   the library.
//! * **header values**: any UTF-8 without carriage return or line feed.

use crate::error::{Error, NameKind, Result};

/// The longest topic or group name, in bytes.
pub const MAX_NAME_LEN: usize = 120;
/// The longest topic name, in bytes: [`MAX_NAME_LEN`] less room for [`DLQ_SUFFIX`].
pub const MAX_TOPIC_LEN: usize = MAX_NAME_LEN - DLQ_SUFFIX.len();
/// The longest header key, in bytes.
pub const MAX_HEADER_KEY_LEN: usize = 128;
/// Header keys with this prefix are reserved for polybus itself.
pub const RESERVED_PREFIX: &str = "polybus-";
/// The suffix of a topic's dead-letter topic.
pub const DLQ_SUFFIX: &str = ".dlq";

fn check_name(kind: NameKind, name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("must not be empty")
    } else if name.len() > MAX_NAME_LEN {
        Some("longer than 120 characters")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("only ASCII letters, digits, '.', '_' and '-' are allowed")
    } else if name.starts_with('.') || name.ends_with('.') || name.contains("..") {
        // Dots separate non-empty segments: brokers that route on dotted names
        // (NATS subjects, AMQP routing keys) cannot carry empty segments.
        Some("'.' must separate non-empty segments (no leading, trailing or doubled '.')")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidName {
            kind,
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Checks a topic name against the portable grammar.
pub fn validate_topic(name: &str) -> Result<()> {
    check_name(NameKind::Topic, name)
}

/// Checks a topic that is declared or consumed by a runner: the portable grammar,
/// and room for its dead-letter topic `<topic>.dlq` (at most [`MAX_TOPIC_LEN`]).
pub fn validate_declared_topic(name: &str) -> Result<()> {
    validate_topic(name)?;
    if name.len() > MAX_TOPIC_LEN {
        return Err(Error::InvalidName {
            kind: NameKind::Topic,
            name: name.to_owned(),
            reason: "longer than 116 characters: no room for its '<topic>.dlq'",
        });
    }
    Ok(())
}

/// Checks a consumer group name against the portable grammar.
pub fn validate_group(name: &str) -> Result<()> {
    check_name(NameKind::Group, name)
}

/// Checks a header key against the portable grammar (reserved keys pass).
pub fn validate_header_key(key: &str) -> Result<()> {
    let reason = if key.is_empty() {
        Some("key must not be empty")
    } else if key.len() > MAX_HEADER_KEY_LEN {
        Some("key longer than 128 characters")
    } else if !key.bytes().all(|b| (b'!'..=b'~').contains(&b) && b != b':') {
        Some("key must be printable ASCII without spaces or ':'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidHeader {
            key: key.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Checks a header value: UTF-8 (guaranteed by `&str`) without CR or LF.
pub fn validate_header_value(key: &str, value: &str) -> Result<()> {
    // No early exit: the whole scan vectorises, and values are short.
    if value
        .bytes()
        .fold(false, |found, b| found | (b == b'\r') | (b == b'\n'))
    {
        return Err(Error::InvalidHeader {
            key: key.to_owned(),
            reason: "value must not contain CR or LF",
        });
    }
    Ok(())
}

/// The dead-letter topic of `topic`: `<topic>.dlq`.
pub fn dead_letter_topic(topic: &str) -> String {
    format!("{topic}{DLQ_SUFFIX}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portable_names() {
        for ok in ["rides", "rides-fulfillment", "a.b_c-1", &"x".repeat(116)] {
            validate_declared_topic(ok).unwrap();
            validate_topic(&dead_letter_topic(ok)).unwrap();
            validate_group(ok).unwrap();
        }
        validate_group(&"x".repeat(120)).unwrap();
        validate_topic(&"x".repeat(120)).unwrap();
        assert!(validate_declared_topic(&"x".repeat(117)).is_err());
        for bad in [
            "",
            "has space",
            "a/b",
            "ünï",
            "a:b",
            "*",
            ".a",
            "a.",
            "a..b",
            &"x".repeat(121),
        ] {
            assert!(matches!(
                validate_topic(bad),
                Err(Error::InvalidName {
                    kind: NameKind::Topic,
                    ..
                })
            ));
            assert!(matches!(
                validate_group(bad),
                Err(Error::InvalidName {
                    kind: NameKind::Group,
                    ..
                })
            ));
        }
    }

    #[test]
    fn header_grammar() {
        validate_header_key("content-type").unwrap();
        validate_header_key("x_trace.id").unwrap();
        for bad in ["", "a b", "a:b", "é", "tab\t", &"k".repeat(129)] {
            assert!(validate_header_key(bad).is_err(), "{bad:?}");
        }
        validate_header_value("k", "héllo ✓ 日本").unwrap();
        validate_header_value("k", "").unwrap();
        assert!(validate_header_value("k", "a\r\nb").is_err());
    }
}
