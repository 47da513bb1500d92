//! Handlers and the outcome that drives settlement.

use std::fmt;
use std::future::Future;

use futures::future::BoxFuture;

use crate::error::{BoxError, Error};
use crate::message::Delivery;

/// What a handler returns. `Ok` acks the message; an error retries it or
/// dead-letters it, according to [`HandlerError::kind`].
pub type HandlerResult = Result<(), HandlerError>;

/// Whether a failed message is worth another attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureKind {
    /// Try again in process after a backoff, up to the retry policy's limit.
    Retryable,
    /// Never try again: dead-letter the message at once.
    Permanent,
    /// Not a failure of the message: the handler (or a middleware in front of it,
    /// such as tower's `load_shed`) is overloaded. The runner gives the message
    /// back to the broker for redelivery: no attempt is counted in process and it
    /// is never dead-lettered for this.
    Overloaded,
}

/// A handler's failure: a cause and whether retrying can help.
///
/// Any `std::error::Error` converts with `?`. Its kind is taken from the error
/// itself: a [`polybus_core::Error`](crate::Error) keeps its
/// [`is_retryable`](crate::Error::is_retryable) (so a payload that does not decode
/// is permanent); any other error is retryable. Say it explicitly with
/// [`HandlerError::retryable`] or [`HandlerError::permanent`].
pub struct HandlerError {
    kind: FailureKind,
    source: BoxError,
}

impl HandlerError {
    /// A failure worth retrying (a timeout, a dependency down, …).
    pub fn retryable(cause: impl Into<BoxError>) -> Self {
        HandlerError {
            kind: FailureKind::Retryable,
            source: cause.into(),
        }
    }

    /// A failure that retrying cannot fix (a malformed event, a broken invariant).
    pub fn permanent(cause: impl Into<BoxError>) -> Self {
        HandlerError {
            kind: FailureKind::Permanent,
            source: cause.into(),
        }
    }

    /// The handler cannot take the message now; the runner releases it to the
    /// broker (see [`FailureKind::Overloaded`]).
    pub fn overloaded(cause: impl Into<BoxError>) -> Self {
        HandlerError {
            kind: FailureKind::Overloaded,
            source: cause.into(),
        }
    }

    /// Whether the handler reported it is overloaded (the message is released).
    pub fn is_overloaded(&self) -> bool {
        self.kind == FailureKind::Overloaded
    }

    /// Retryable, permanent or overloaded.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }

    /// Whether the message should be dead-lettered without another attempt.
    pub fn is_permanent(&self) -> bool {
        self.kind == FailureKind::Permanent
    }

    /// The underlying cause.
    pub fn cause(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("kind", &self.kind)
            .field("cause", &self.source)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(error: E) -> Self {
        let source: BoxError = Box::new(error);
        let kind = match source.downcast_ref::<Error>() {
            Some(e) if !e.is_retryable() => FailureKind::Permanent,
            _ => FailureKind::Retryable,
        };
        HandlerError { kind, source }
    }
}

/// Handles one delivery. Async functions and closures taking a [`Delivery`] and
/// returning a [`HandlerResult`] are handlers:
///
/// ```
/// use polybus_core::{Delivery, HandlerResult};
/// async fn on_ride_created(delivery: Delivery) -> HandlerResult {
///     let ride: serde_json::Value = delivery.json()?;
///     println!("{ride}");
///     Ok(())
/// }
/// # fn is_handler<H: polybus_core::Handler>(_: H) {}
/// # is_handler(on_ride_created);
/// ```
pub trait Handler: Send + Sync + 'static {
    /// Handles `delivery`.
    fn call(&self, delivery: Delivery) -> BoxFuture<'static, HandlerResult>;

    /// Checks the handler's own configuration before the runner starts it: a
    /// runner refuses to run a handler that returns an error here (for
    /// example a [`Router`](crate::typed::Router) with two handlers for one
    /// event type is [`Error::InvalidConfig`]). The default accepts.
    fn validate(&self) -> Result<(), Error> {
        Ok(())
    }
}

impl<F, Fut> Handler for F
where
    F: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    fn call(&self, delivery: Delivery) -> BoxFuture<'static, HandlerResult> {
        Box::pin(self(delivery))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_comes_from_the_error() {
        let decode: HandlerError = Error::Codec {
            action: "decode",
            source: "bad".into(),
        }
        .into();
        assert!(decode.is_permanent());
        let io: HandlerError = std::io::Error::other("down").into();
        assert_eq!(io.kind(), FailureKind::Retryable);
        let conn: HandlerError = Error::connection("kafka", "refused").into();
        assert_eq!(conn.kind(), FailureKind::Retryable);
        assert!(HandlerError::permanent("bad ride").is_permanent());
        assert_eq!(HandlerError::retryable("later").to_string(), "later");
    }
}
