//! Typed events: handlers that take a decoded event and extractors instead of a
//! raw [`Delivery`], a router that dispatches one subscription by event type, and
//! a publisher that sends typed events as CloudEvents.
//!
//! An event type implements [`Event`] (with [`event!`](crate::event) or by
//! hand): its CloudEvents `type` is a constant, so no call site repeats it.
//! A typed handler is an async function or closure whose **first argument is
//! the event**, followed by any of these extractors, in any order:
//!
//! | argument | what it gives |
//! |---|---|
//! | [`Meta`] | the delivery's metadata: id, key, topic, attempt, headers, and the CloudEvents attributes (type, source, id, subject, time, extensions) |
//! | [`State<S>`] | a clone of the application state given to [`Events::new`] |
//! | [`Publisher`] | sends follow-up events (same binding, codec and source) |
//! | [`Delivery`] | the raw delivery |
//!
//! Settlement is the same as for any handler: `Ok` acks, errors retry or
//! dead-letter. A payload that does not decode is a **permanent** error whose
//! reason names the Rust type, the event type, the media type and the
//! deserializer's error; an unknown content type is permanent too (dead-lettered).
//!
//! ```
//! use polybus_core::typed::{Events, Meta, Publisher, State};
//! use polybus_core::{HandlerResult, event};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct RideCreated { ride_id: String, rider: String }
//! event!(RideCreated => "rides.ride-created", key = |e| &e.ride_id);
//!
//! #[derive(Serialize, Deserialize)]
//! struct ChauffeurFound { ride_id: String, chauffeur: String }
//! event!(ChauffeurFound => "rides.chauffeur-found", key = |e| &e.ride_id);
//!
//! #[derive(Clone)]
//! struct Fleet { nearest: String }
//!
//! async fn on_created(ride: RideCreated, meta: Meta, State(fleet): State<Fleet>, out: Publisher) -> HandlerResult {
//!     println!("{} from {:?}", ride.ride_id, meta.source());
//!     let found = ChauffeurFound { ride_id: ride.ride_id, chauffeur: fleet.nearest };
//!     out.publish("rides", &found).await?;
//!     Ok(())
//! }
//!
//! # fn build(conn: polybus_core::Connection) {
//! let events = Events::new(&conn, Fleet { nearest: "ada".into() });
//! let router = events.router().on(on_created);   // then conn.runner()….run(router)
//! # let _ = router; }
//! ```
//!
//! A handler whose arguments cannot be extracted does not compile, and the error
//! names the argument:
//!
//! ```compile_fail
//! # use polybus_core::typed::Events;
//! # use polybus_core::{HandlerResult, event};
//! # #[derive(serde::Serialize, serde::Deserialize)]
//! # struct RideCreated { ride_id: String }
//! # event!(RideCreated => "rides.ride-created");
//! // error[E0277]: `fn(RideCreated, String) -> … {on_created}` is not a typed polybus handler
//! //   = note: a typed handler is an async fn or closure taking an `Event` type first, then …
//! async fn on_created(ride: RideCreated, note: String) -> HandlerResult { Ok(()) }
//! # fn build(events: Events) {
//! let handler = events.handler(on_created);
//! # }
//! ```

use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::backend::{Connection, Producer};
use crate::cloudevents::{Binding, CloudEvent};
use crate::error::Result;
use crate::message::{Delivery, Message};

mod codec;
mod extract;
mod router;

pub use codec::Codec;
pub use extract::{EventHandler, FromParts, Meta, Parts, State};
pub use router::{Router, RouterStats, TypedHandler, UnknownType};

/// An event type: a payload with a fixed CloudEvents `type`.
///
/// Implement it with [`event!`](crate::event), or by hand:
///
/// ```
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct RideAccepted { ride_id: String, chauffeur: String }
///
/// impl polybus_core::typed::Event for RideAccepted {
///     const TYPE: &'static str = "rides.ride-accepted";
///     fn key(&self) -> Option<&str> { Some(&self.ride_id) }
/// }
/// ```
pub trait Event: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The CloudEvents `type` (e.g. `rides.ride-created`): the router dispatches
    /// by it and [`Publisher::publish`] sends it.
    const TYPE: &'static str;

    /// The ordering key (usually the aggregate's id): events with the same key
    /// are handled in order. [`Publisher::publish`] sends it as the message key
    /// and as the CloudEvents `subject`. `None` by default.
    fn key(&self) -> Option<&str> {
        None
    }
}

/// Implements [`typed::Event`](crate::typed::Event) for a type:
/// `event!(Type => "event.type")`, or with an ordering key taken from the event,
/// `event!(Type => "event.type", key = |e| &e.ride_id)`.
#[macro_export]
macro_rules! event {
    ($ty:ty => $name:expr) => {
        impl $crate::typed::Event for $ty {
            const TYPE: &'static str = $name;
        }
    };
    ($ty:ty => $name:expr, key = |$event:ident| $key:expr) => {
        impl $crate::typed::Event for $ty {
            const TYPE: &'static str = $name;
            fn key(&self) -> ::core::option::Option<&str> {
                let $event = self;
                ::core::option::Option::Some($key)
            }
        }
    };
}

/// The CloudEvents `source` polybus writes unless told otherwise.
pub const DEFAULT_SOURCE: &str = "/polybus";

/// Sends typed events as CloudEvents in binary content mode under the
/// backend's [`Binding`], encoded with one [`Codec`] (JSON by default).
///
/// Cheap to clone; also a handler argument (see the [module docs](self)).
#[derive(Clone)]
pub struct Publisher {
    producer: Arc<dyn Producer>,
    binding: Binding,
    codec: Codec,
    source: Arc<str>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("binding", &self.binding)
            .field("codec", &self.codec)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// A publisher on `producer` writing CloudEvents under `binding`.
    pub fn new(producer: Arc<dyn Producer>, binding: Binding) -> Self {
        Publisher {
            producer,
            binding,
            codec: Codec::Json,
            source: Arc::from(DEFAULT_SOURCE),
        }
    }

    /// Encodes payloads with `codec` (its media type becomes `datacontenttype`).
    pub fn with_codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// Sets the CloudEvents `source` (a URI reference such as `/rides-service`).
    pub fn with_source(mut self, source: impl AsRef<str>) -> Self {
        self.source = Arc::from(source.as_ref());
        self
    }

    /// The binding this publisher writes.
    pub fn binding(&self) -> Binding {
        self.binding
    }

    /// The codec this publisher encodes with.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// The producer underneath.
    pub fn producer(&self) -> &Arc<dyn Producer> {
        &self.producer
    }

    /// The message [`publish`](Publisher::publish) would send: the encoded event
    /// as payload, its key, and the CloudEvents headers (`id` is the message id,
    /// `type` is `E::TYPE`, `subject` is the key, `time` is now). Add headers or
    /// change the key before sending it with [`Producer::send`].
    pub fn message<E: Event>(&self, event: &E) -> Result<Message> {
        let mut message = Message::new(self.codec.encode(event)?);
        let mut attributes = CloudEvent::new(E::TYPE, &*self.source);
        attributes.id = message.id.clone();
        attributes.time = Some(message.timestamp);
        attributes.datacontenttype = Some(self.codec.media_type().to_owned());
        if let Some(key) = event.key() {
            message = message.with_key(key);
            attributes.subject = Some(key.to_owned());
        }
        attributes.write_binary(&mut message, self.binding);
        Ok(message)
    }

    /// Sends `event` to `topic` (see [`message`](Publisher::message)); resolves
    /// when the broker has it.
    pub async fn publish<E: Event>(&self, topic: &str, event: &E) -> Result<()> {
        let message = self.message(event)?;
        self.producer.send(topic, message).await
    }
}

/// The typed side of a connection: application state, the binding, and a
/// [`Publisher`]; makes typed handlers and routers.
///
/// ```
/// # fn demo(conn: polybus_core::Connection) {
/// use polybus_core::typed::Events;
/// let events = Events::new(&conn, ()).with_source("/rides-service");
/// let publisher = events.publisher();
/// # }
/// ```
#[derive(Clone)]
pub struct Events<S = ()> {
    state: S,
    binding: Binding,
    publisher: Publisher,
}

impl<S> std::fmt::Debug for Events<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("binding", &self.binding)
            .field("publisher", &self.publisher)
            .finish_non_exhaustive()
    }
}

impl<S: Clone + Send + Sync + 'static> Events<S> {
    /// Typed events on `conn`, with `state` for [`State`] arguments. The binding
    /// is the backend's ([`Capabilities::binding`](crate::Capabilities::binding)).
    pub fn new(conn: &Connection, state: S) -> Self {
        let binding = conn.consumer.capabilities().binding;
        Events {
            state,
            binding,
            publisher: Publisher::new(Arc::clone(&conn.producer), binding),
        }
    }

    /// Sets the CloudEvents `source` of what this side publishes.
    pub fn with_source(mut self, source: impl AsRef<str>) -> Self {
        self.publisher = self.publisher.with_source(source);
        self
    }

    /// Encodes what this side publishes with `codec` (JSON by default). Reading
    /// always goes by each message's content type.
    pub fn with_codec(mut self, codec: Codec) -> Self {
        self.publisher = self.publisher.with_codec(codec);
        self
    }

    /// The application state.
    pub fn state(&self) -> &S {
        &self.state
    }

    /// The binding deliveries are read with.
    pub fn binding(&self) -> Binding {
        self.binding
    }

    /// A publisher for typed events.
    pub fn publisher(&self) -> Publisher {
        self.publisher.clone()
    }

    /// A [`Handler`](crate::Handler) that decodes every delivery as `E` and calls
    /// `handler`. A delivery whose CloudEvents `type` is not `E::TYPE` is a
    /// permanent error (dead-lettered); one without a `type` is decoded as `E`.
    /// For several types on one topic, use a [`router`](Events::router).
    pub fn handler<E, Args, H>(&self, handler: H) -> TypedHandler
    where
        E: Event,
        H: EventHandler<E, Args, S>,
        Args: 'static,
    {
        TypedHandler::new(Arc::new(self.clone()), handler)
    }

    /// A router dispatching by event type (see [`Router`]).
    pub fn router(&self) -> Router<S> {
        Router::new(Arc::new(self.clone()))
    }

    /// Decodes `delivery` as `E` by its content type (JSON without one), with
    /// its CloudEvents attributes when it carries them; the error is permanent
    /// and names the type. For tests and hand-written handlers.
    pub fn decode<E: Event>(
        &self,
        delivery: &Delivery,
    ) -> std::result::Result<(E, Parts), crate::HandlerError> {
        extract::decode::<E>(delivery.clone(), self.binding, true)
    }
}
