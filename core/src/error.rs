//! The one public error type of polybus.

use std::time::Duration;

/// A boxed error from a backend's client library, kept as the `source` of an [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Shorthand for `Result<T, polybus_core::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of name an [`Error::InvalidName`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NameKind {
    /// A topic name.
    Topic,
    /// A consumer group name.
    Group,
}

impl std::fmt::Display for NameKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NameKind::Topic => "topic",
            NameKind::Group => "group",
        })
    }
}

/// Every error polybus returns, keyed by what it means rather than by backend.
///
/// Backends keep their own client errors private and map them into one of these
/// variants, keeping the original as the [`source`](std::error::Error::source).
/// Use [`Error::is_retryable`] to decide whether trying again can help; never match
/// on the message text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker could not be reached, or the connection to it was lost.
    #[error("connection to {backend} failed: {message}")]
    Connection {
        /// The backend that failed (`"kafka"`, `"rabbitmq"`, …).
        backend: &'static str,
        /// What went wrong, with credentials removed.
        message: String,
        /// The client library's error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// An operation did not finish within its configured time.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// The operation that timed out.
        operation: String,
        /// The limit that ran out.
        after: Duration,
    },
    /// A topic, group or other resource does not exist.
    #[error("{what} not found")]
    NotFound {
        /// What was looked for.
        what: String,
    },
    /// A topic or group name outside the portable grammar.
    #[error("invalid {kind} name {name:?}: {reason}")]
    InvalidName {
        /// Topic or group.
        kind: NameKind,
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A header key or value outside the portable grammar, or a reserved key.
    #[error("invalid header {key:?}: {reason}")]
    InvalidHeader {
        /// The rejected key.
        key: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A configuration value or URL that cannot work.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A payload larger than the backend accepts.
    #[error("payload of {size} bytes exceeds the maximum of {max} bytes")]
    PayloadTooLarge {
        /// The payload's size in bytes.
        size: usize,
        /// The backend's maximum payload in bytes.
        max: usize,
    },
    /// The backend cannot do what was asked (see its capabilities).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The producer, consumer or subscription was closed.
    #[error("{0} is closed")]
    Closed(&'static str),
    /// A payload could not be encoded or decoded (for example as JSON).
    #[error("cannot {action} payload: {source}")]
    Codec {
        /// `"encode"` or `"decode"`.
        action: &'static str,
        /// The serializer's error.
        #[source]
        source: BoxError,
    },
    /// A settlement (ack, release or keep-alive) did not take effect because the
    /// delivery is no longer held by this consumer: its lease expired, its channel
    /// or connection closed, or its partition was revoked. The broker redelivers
    /// it (to this consumer or another); nothing was acknowledged.
    #[error("{operation} did not take effect: {reason}")]
    NotSettled {
        /// `"ack"`, `"release"` or `"keep-alive"`.
        operation: &'static str,
        /// Why the delivery is no longer held.
        reason: String,
    },
    /// The broker refused this particular message (too large for the broker or
    /// the topic, an invalid timestamp, content it cannot carry). Sending the
    /// same message again cannot help; a different one may succeed. The runner
    /// dead-letters a labelled stub when a dead-letter copy is refused this way.
    #[error("{backend} refused the message: {message}")]
    MessageRejected {
        /// The backend that refused it.
        backend: &'static str,
        /// Why, with credentials removed.
        message: String,
        /// The client library's error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// The broker refused the credentials: wrong password, unknown user, a bad
    /// token, NKey, credentials file or SASL mechanism. Trying again with the same
    /// credentials cannot help.
    #[error("{backend} refused the credentials: {message}")]
    Unauthenticated {
        /// The backend that refused them.
        backend: &'static str,
        /// What was refused, with every secret removed.
        message: String,
        /// The client library's error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// The broker accepted the credentials but refused an operation on a
    /// resource (a subject, queue, exchange, topic or virtual host).
    #[error("{backend} denied permission: {message}")]
    PermissionDenied {
        /// The backend that denied it.
        backend: &'static str,
        /// What was refused (the operation and the resource).
        message: String,
        /// The client library's error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// TLS could not be set up: an untrusted, expired or unreadable
    /// certificate, a server name that does not match the certificate, a client
    /// certificate the broker refused, or a TLS handshake the broker broke off.
    #[error("TLS with {backend} failed: {message}")]
    Tls {
        /// The backend whose connection failed.
        backend: &'static str,
        /// What went wrong, with every secret removed.
        message: String,
        /// The TLS library's error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// Any other failure of the backend's client or broker.
    #[error("{backend} error: {message}")]
    Backend {
        /// The backend that failed.
        backend: &'static str,
        /// What went wrong, with credentials removed.
        message: String,
        /// Whether trying again may succeed.
        retryable: bool,
        /// The client library's error, if any.
        #[source]
        source: Option<BoxError>,
    },
}

impl Error {
    /// Whether the same operation may succeed if tried again later.
    ///
    /// Lost connections, timeouts and transient broker errors are retryable; bad
    /// names, bad configuration, oversized payloads, decode failures and closed
    /// clients are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connection { .. } | Error::Timeout { .. } => true,
            Error::Backend { retryable, .. } => *retryable,
            Error::NotFound { .. }
            | Error::InvalidName { .. }
            | Error::InvalidHeader { .. }
            | Error::InvalidConfig(_)
            | Error::PayloadTooLarge { .. }
            | Error::Unsupported(_)
            | Error::Closed(_)
            | Error::NotSettled { .. }
            | Error::MessageRejected { .. }
            | Error::Unauthenticated { .. }
            | Error::PermissionDenied { .. }
            | Error::Tls { .. }
            | Error::Codec { .. } => false,
        }
    }

    /// A [`Error::Connection`] without a source.
    pub fn connection(backend: &'static str, message: impl Into<String>) -> Self {
        Error::Connection {
            backend,
            message: message.into(),
            source: None,
        }
    }

    /// A [`Error::Timeout`] for `operation` after `after`.
    pub fn timeout(operation: impl Into<String>, after: Duration) -> Self {
        Error::Timeout {
            operation: operation.into(),
            after,
        }
    }
}

/// Decodes the `%XX` escapes of a URL part (user, password, query value);
/// an invalid escape is kept as it is, and bytes that are not UTF-8 become
/// U+FFFD. Every backend's URL parser uses it, so one URL decodes the same way
/// on each.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes the password (and user) of a URL so it can appear in errors and logs.
///
/// `amqp://guest:secret@host:5672/%2f` becomes `amqp://***@host:5672/%2f`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***{}", &url[..scheme_end], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn percent_decoding_keeps_invalid_escapes() {
        assert_eq!(super::percent_decode("a%zzb%41"), "a%zzbA");
        assert_eq!(super::percent_decode("u%40x%3Ap%"), "u@x:p%");
    }

    use super::*;

    #[test]
    fn retryability_follows_meaning() {
        assert!(Error::connection("kafka", "refused").is_retryable());
        assert!(Error::timeout("send", Duration::from_secs(1)).is_retryable());
        assert!(!Error::Closed("producer").is_retryable());
        assert!(!Error::PayloadTooLarge { size: 2, max: 1 }.is_retryable());
        for refused in [
            Error::Unauthenticated {
                backend: "nats",
                message: "bad password".into(),
                source: None,
            },
            Error::PermissionDenied {
                backend: "nats",
                message: "publish to x".into(),
                source: None,
            },
            Error::Tls {
                backend: "nats",
                message: "unknown issuer".into(),
                source: None,
            },
        ] {
            assert!(!refused.is_retryable(), "{refused}");
        }
    }

    #[test]
    fn urls_lose_their_credentials() {
        assert_eq!(
            redact_url("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
    }
}
