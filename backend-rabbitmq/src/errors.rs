//! How lapin errors map to polybus errors.

use lapin::Channel;
use polybus_core::Error;

use crate::BACKEND;

/// Whether the broker refused an operation on a channel (404 no such exchange
/// or queue, 406 precondition failed, …): the channel is closed, the connection
/// is fine, and trying the same again will not help.
pub(crate) fn is_refusal(e: &lapin::Error) -> bool {
    e.is_amqp_soft_error()
}

pub(crate) fn is_not_found(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(a)
        if matches!(a.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

/// Whether a channel is usable now or will be after lapin's recovery.
pub(crate) fn alive(channel: &Channel) -> bool {
    channel.status().connected() || channel.status().reconnecting()
}

/// Maps a lapin error: broker-side refusals are not retryable, lost connections are.
pub(crate) fn map_error(what: &str, e: lapin::Error) -> Error {
    let message = format!("{what}: {e}");
    if is_not_found(&e) {
        Error::NotFound { what: message }
    } else if crate::security::is_access_refused(&e) {
        // ACCESS_REFUSED on a channel: this user may not configure, write or
        // read the exchange or queue named in the message.
        Error::PermissionDenied {
            backend: BACKEND,
            message,
            source: Some(Box::new(e)),
        }
    } else if is_refusal(&e) || e.is_amqp_hard_error() || (e.is_amqp_error() && !e.can_be_recovered()) {
        Error::Backend {
            backend: BACKEND,
            message,
            retryable: false,
            source: Some(Box::new(e)),
        }
    } else if e.is_io_error() || e.can_be_recovered() {
        Error::Connection {
            backend: BACKEND,
            message,
            source: Some(Box::new(e)),
        }
    } else {
        Error::Backend {
            backend: BACKEND,
            message,
            retryable: true,
            source: Some(Box::new(e)),
        }
    }
}

/// The argument named by a broker refusal of a queue declaration that differs
/// from the existing queue (`PRECONDITION_FAILED - inequivalent arg 'x-…' for
/// queue …`). The reply text is the only place the broker names it.
pub(crate) fn inequivalent_arg(e: &lapin::Error) -> Option<String> {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    let lapin::ErrorKind::ProtocolError(amqp) = e.kind() else {
        return None;
    };
    if !matches!(
        amqp.kind(),
        AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
    ) {
        return None;
    }
    let text = amqp.get_message().as_str();
    let marker = "inequivalent arg '";
    let start = text.find(marker)? + marker.len();
    let len = text[start..].find('\'')?;
    Some(text[start..start + len].to_owned())
}
