//! Handler arguments (extractors) and the typed-handler trait.

use std::future::Future;
use std::time::SystemTime;

use futures::future::BoxFuture;

use super::{Codec, Event, Events, Publisher};
use crate::cloudevents::{Binding, CloudEvent};
use crate::handler::{HandlerError, HandlerResult};
use crate::message::{Delivery, Origin};

/// What extractors are built from: the delivery and, when it carried one, its
/// CloudEvent's attributes.
#[derive(Debug, Clone)]
pub struct Parts {
    delivery: Delivery,
    cloud_event: Option<CloudEvent>,
}

impl Parts {
    /// The delivery.
    pub fn delivery(&self) -> &Delivery {
        &self.delivery
    }

    /// The CloudEvents attributes, if the delivery was a CloudEvent.
    pub fn cloud_event(&self) -> Option<&CloudEvent> {
        self.cloud_event.as_ref()
    }
}

/// Decodes `delivery` as `E`. With `check_type`, a CloudEvent of another type
/// is refused (the router has already matched it).
pub(crate) fn decode<E: Event>(
    delivery: Delivery,
    binding: Binding,
    check_type: bool,
) -> Result<(E, Parts), HandlerError> {
    let rust_type = std::any::type_name::<E>();
    let incoming = CloudEvent::read(&delivery, binding)
        .map_err(|e| HandlerError::permanent(format!("cannot decode {rust_type} (type {}): {e}", E::TYPE)))?;
    let (data, content_type, cloud_event) = match incoming {
        Some(incoming) => {
            let ct = incoming.attributes.datacontenttype.clone();
            (incoming.data, ct, Some(incoming.attributes))
        }
        None => (
            delivery.payload().clone(),
            CloudEvent::content_type(&delivery).map(str::to_owned),
            None,
        ),
    };
    if check_type
        && let Some(ce) = &cloud_event
        && ce.ty != E::TYPE
    {
        return Err(HandlerError::permanent(format!(
            "this handler takes {rust_type} (type {}), not events of type {:?}",
            E::TYPE,
            ce.ty
        )));
    }
    let codec = Codec::for_media_type(content_type.as_deref()).ok_or_else(|| {
        let known: Vec<&str> = Codec::ALL.iter().map(|c| c.media_type()).collect();
        HandlerError::permanent(format!(
            "cannot decode {rust_type} (type {}): unsupported content type {:?} (this build reads {})",
            E::TYPE,
            content_type.as_deref().unwrap_or_default(),
            known.join(", ")
        ))
    })?;
    let event = codec.decode::<E>(&data).map_err(|e| {
        HandlerError::permanent(format!(
            "cannot decode {rust_type} (type {}) from {}: {e}",
            E::TYPE,
            codec.media_type()
        ))
    })?;
    Ok((
        event,
        Parts {
            delivery,
            cloud_event,
        },
    ))
}

/// A handler argument built from the delivery and the [`Events`] context.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be an argument of a typed polybus handler",
    label = "not an extractor",
    note = "a typed handler takes the event first, then any of `Meta`, `State<S>` (S: the state given to `Events::new`), `Publisher` or `Delivery`"
)]
pub trait FromParts<S>: Sized + Send + 'static {
    /// Builds the argument; an error fails the delivery like a handler error.
    fn from_parts(parts: &Parts, events: &Events<S>) -> Result<Self, HandlerError>;
}

/// The application state given to [`Events::new`], cloned for each call
/// (wrap large or shared state in an `Arc`).
#[derive(Debug, Clone, Copy, Default)]
pub struct State<S>(pub S);

impl<S: Clone + Send + Sync + 'static> FromParts<S> for State<S> {
    fn from_parts(_: &Parts, events: &Events<S>) -> Result<Self, HandlerError> {
        Ok(State(events.state().clone()))
    }
}

impl<S: Clone + Send + Sync + 'static> FromParts<S> for Publisher {
    fn from_parts(_: &Parts, events: &Events<S>) -> Result<Self, HandlerError> {
        Ok(events.publisher())
    }
}

impl<S> FromParts<S> for Delivery {
    fn from_parts(parts: &Parts, _: &Events<S>) -> Result<Self, HandlerError> {
        Ok(parts.delivery.clone())
    }
}

impl<S> FromParts<S> for Meta {
    fn from_parts(parts: &Parts, _: &Events<S>) -> Result<Self, HandlerError> {
        Ok(Meta(parts.clone()))
    }
}

/// A delivery's metadata for a typed handler: where it came from, which
/// attempt this is, its headers, and its CloudEvents attributes.
#[derive(Debug, Clone)]
pub struct Meta(Parts);

impl Meta {
    /// The raw delivery.
    pub fn delivery(&self) -> &Delivery {
        &self.0.delivery
    }

    /// The message id.
    pub fn id(&self) -> &str {
        self.0.delivery.id()
    }

    /// The key as text, if any.
    pub fn key(&self) -> Option<&str> {
        self.0.delivery.key()
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        self.0.delivery.topic()
    }

    /// Topic, group, partition and position.
    pub fn origin(&self) -> &Origin {
        self.0.delivery.origin()
    }

    /// Which attempt this is (1 on the first).
    pub fn attempt(&self) -> u32 {
        self.0.delivery.attempt()
    }

    /// The message's timestamp.
    pub fn timestamp(&self) -> SystemTime {
        self.0.delivery.message().timestamp
    }

    /// A user header's first value as text.
    pub fn header(&self, key: &str) -> Option<&str> {
        self.0.delivery.header(key)
    }

    /// The CloudEvents attributes, when the delivery was a CloudEvent.
    pub fn cloud_event(&self) -> Option<&CloudEvent> {
        self.0.cloud_event.as_ref()
    }

    /// The CloudEvents `type`.
    pub fn event_type(&self) -> Option<&str> {
        self.cloud_event().map(|c| c.ty.as_str())
    }

    /// The CloudEvents `source`.
    pub fn source(&self) -> Option<&str> {
        self.cloud_event().map(|c| c.source.as_str())
    }

    /// The CloudEvents `id` (the message id for events polybus sent).
    pub fn event_id(&self) -> Option<&str> {
        self.cloud_event().map(|c| c.id.as_str())
    }

    /// The CloudEvents `subject`.
    pub fn subject(&self) -> Option<&str> {
        self.cloud_event().and_then(|c| c.subject.as_deref())
    }

    /// The CloudEvents `time`.
    pub fn time(&self) -> Option<SystemTime> {
        self.cloud_event().and_then(|c| c.time)
    }

    /// A CloudEvents extension attribute.
    pub fn extension(&self, name: &str) -> Option<&str> {
        self.cloud_event()
            .and_then(|c| c.extensions.get(name))
            .map(String::as_str)
    }
}

/// An async function or closure usable as a typed handler: the event `E` first,
/// then extractors (`Args`), returning a [`HandlerResult`]. Implemented for
/// functions of up to seven arguments; see the [module docs](super).
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a typed polybus handler",
    note = "a typed handler is an async fn or closure taking an `Event` type first, then any of `Meta`, `State<S>`, `Publisher` or `Delivery`, and returning `HandlerResult`"
)]
pub trait EventHandler<E, Args, S>: Send + Sync + 'static {
    /// Calls the handler with the decoded event and the extracted arguments.
    fn call(&self, event: E, parts: Parts, events: &Events<S>) -> BoxFuture<'static, HandlerResult>;
}

macro_rules! impl_event_handler {
    ($($arg:ident),*) => {
        impl<F, Fut, E, S, $($arg,)*> EventHandler<E, ($($arg,)*), S> for F
        where
            F: Fn(E $(, $arg)*) -> Fut + Send + Sync + 'static,
            Fut: Future<Output = HandlerResult> + Send + 'static,
            E: Event,
            $($arg: FromParts<S>,)*
        {
            #[allow(non_snake_case, unused_variables)]
            fn call(&self, event: E, parts: Parts, events: &Events<S>) -> BoxFuture<'static, HandlerResult> {
                $(
                    let $arg = match $arg::from_parts(&parts, events) {
                        Ok(value) => value,
                        Err(error) => return Box::pin(async move { Err(error) }),
                    };
                )*
                Box::pin(self(event $(, $arg)*))
            }
        }
    };
}

impl_event_handler!();
impl_event_handler!(A1);
impl_event_handler!(A1, A2);
impl_event_handler!(A1, A2, A3);
impl_event_handler!(A1, A2, A3, A4);
impl_event_handler!(A1, A2, A3, A4, A5);
impl_event_handler!(A1, A2, A3, A4, A5, A6);
