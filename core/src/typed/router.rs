//! Dispatching one subscription to typed handlers by event type.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::future::BoxFuture;

use super::extract::{self, EventHandler};
use super::{Event, Events};
use crate::cloudevents::{CloudEvent, STRUCTURED_JSON};
use crate::handler::{Handler, HandlerError, HandlerResult};
use crate::message::Delivery;

/// What a [`Router`] does with a delivery whose event type has no handler (or
/// that carries no event type at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum UnknownType {
    /// Acknowledge it and count it in [`RouterStats::unknown`] (the default):
    /// a topic shared by an entity's events carries types this service need not
    /// handle.
    #[default]
    Acknowledge,
    /// Dead-letter it at once (a permanent error naming the type).
    DeadLetter,
}

/// A router's counters, readable while it runs.
#[derive(Debug, Default)]
pub struct RouterStats {
    routed: AtomicU64,
    unknown: AtomicU64,
}

impl RouterStats {
    /// Deliveries handed to a registered handler (each attempt counts).
    pub fn routed(&self) -> u64 {
        self.routed.load(Ordering::Relaxed)
    }

    /// Deliveries with no handler for their type (acknowledged or dead-lettered
    /// by the [`UnknownType`] policy).
    pub fn unknown(&self) -> u64 {
        self.unknown.load(Ordering::Relaxed)
    }
}

type Route = Arc<dyn Fn(Delivery) -> BoxFuture<'static, HandlerResult> + Send + Sync>;

fn route<E, Args, S, H>(events: Arc<Events<S>>, handler: H, check_type: bool) -> Route
where
    E: Event,
    H: EventHandler<E, Args, S>,
    S: Clone + Send + Sync + 'static,
    Args: 'static,
{
    let handler = Arc::new(handler);
    let _args = PhantomData::<fn() -> Args>;
    Arc::new(
        move |delivery: Delivery| match extract::decode::<E>(delivery, events.binding(), check_type) {
            Ok((event, parts)) => handler.call(event, parts, &events),
            Err(error) => Box::pin(async move { Err(error) }),
        },
    )
}

/// One subscription, many event types: dispatches each delivery by its
/// CloudEvents `type` header (no payload decode for routing; a structured-mode
/// event is parsed for its type) to the typed handler registered for that type.
///
/// The router is one [`Handler`]: the runner's ordering applies to it as a
/// whole, so with [`Order::ByKey`](crate::Order::ByKey) an aggregate's events
/// stay in order whatever their types. Deliveries with a type nobody handles,
/// or none, follow the [`UnknownType`] policy (acknowledged and counted by
/// default). Registering a second handler for a type is a mistake the router
/// remembers: [`Router::validate`] reports it, and a runner refuses to run the
/// router ([`Error::InvalidConfig`](crate::Error::InvalidConfig) naming the type).
///
/// ```
/// # use polybus_core::{HandlerResult, event, typed::{Events, UnknownType}};
/// # #[derive(serde::Serialize, serde::Deserialize)] struct RideCreated {}
/// # #[derive(serde::Serialize, serde::Deserialize)] struct RideAccepted {}
/// # event!(RideCreated => "rides.ride-created");
/// # event!(RideAccepted => "rides.ride-accepted");
/// # async fn on_created(_: RideCreated) -> HandlerResult { Ok(()) }
/// # async fn on_accepted(_: RideAccepted) -> HandlerResult { Ok(()) }
/// # fn demo(events: Events) {
/// let router = events
///     .router()
///     .on(on_created)
///     .on(on_accepted)
///     .unknown(UnknownType::DeadLetter);
/// let stats = router.stats(); // read `stats.unknown()` while it runs
/// # }
/// ```
pub struct Router<S = ()> {
    events: Arc<Events<S>>,
    routes: HashMap<&'static str, Route>,
    unknown: UnknownType,
    stats: Arc<RouterStats>,
    /// Event types registered more than once (the first handler is kept).
    duplicates: Vec<&'static str>,
}

impl<S> std::fmt::Debug for Router<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut types: Vec<&&str> = self.routes.keys().collect();
        types.sort();
        f.debug_struct("Router")
            .field("types", &types)
            .field("unknown", &self.unknown)
            .finish_non_exhaustive()
    }
}

impl<S: Clone + Send + Sync + 'static> Router<S> {
    pub(crate) fn new(events: Arc<Events<S>>) -> Self {
        Router {
            events,
            routes: HashMap::new(),
            unknown: UnknownType::default(),
            stats: Arc::default(),
            duplicates: Vec::new(),
        }
    }

    /// Handles events of type `E::TYPE` with `handler` (its first argument's type).
    ///
    /// One handler per type: registering another one for a type that has one
    /// keeps the first and makes the router invalid ([`Router::validate`]; a
    /// runner refuses to run it), so a copy-pasted `.on(…)` is found before
    /// any event is handled instead of silently replacing a handler.
    pub fn on<E, Args, H>(mut self, handler: H) -> Self
    where
        E: Event,
        H: EventHandler<E, Args, S>,
        Args: 'static,
    {
        if self.routes.contains_key(E::TYPE) {
            if !self.duplicates.contains(&E::TYPE) {
                self.duplicates.push(E::TYPE);
            }
            return self;
        }
        let route = route(Arc::clone(&self.events), handler, false);
        self.routes.insert(E::TYPE, route);
        self
    }

    /// Checks the registrations: [`Error::InvalidConfig`](crate::Error::InvalidConfig)
    /// naming every event type that was given more than one handler. Runners
    /// call it before they start (see [`Handler::validate`]).
    pub fn validate(&self) -> crate::Result<()> {
        if self.duplicates.is_empty() {
            return Ok(());
        }
        Err(crate::Error::InvalidConfig(format!(
            "the router has more than one handler for event type(s) {}: register one handler per type",
            self.duplicates
                .iter()
                .map(|t| format!("{t:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }

    /// Sets what happens to deliveries of types without a handler.
    pub fn unknown(mut self, policy: UnknownType) -> Self {
        self.unknown = policy;
        self
    }

    /// The router's counters (shared: keep the `Arc` and read it while it runs).
    pub fn stats(&self) -> Arc<RouterStats> {
        Arc::clone(&self.stats)
    }

    /// The event types this router handles.
    pub fn types(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.routes.keys().copied()
    }

    fn event_type(&self, delivery: &Delivery) -> Result<Option<String>, HandlerError> {
        let binding = self.events.binding();
        if let Some(ty) = CloudEvent::type_of(delivery, binding) {
            return Ok(Some(ty.to_owned()));
        }
        let structured = CloudEvent::content_type(delivery)
            .is_some_and(|ct| ct.trim().to_ascii_lowercase().starts_with(STRUCTURED_JSON));
        if !structured {
            return Ok(None);
        }
        CloudEvent::read(delivery, binding)
            .map(|incoming| incoming.map(|i| i.attributes.ty))
            .map_err(HandlerError::permanent)
    }
}

impl<S: Clone + Send + Sync + 'static> Handler for Router<S> {
    fn validate(&self) -> crate::Result<()> {
        Router::validate(self)
    }

    fn call(&self, delivery: Delivery) -> BoxFuture<'static, HandlerResult> {
        let ty = match self.event_type(&delivery) {
            Ok(ty) => ty,
            Err(error) => return Box::pin(async move { Err(error) }),
        };
        if let Some(route) = ty.as_deref().and_then(|t| self.routes.get(t)) {
            self.stats.routed.fetch_add(1, Ordering::Relaxed);
            return route(delivery);
        }
        self.stats.unknown.fetch_add(1, Ordering::Relaxed);
        let what = match &ty {
            Some(ty) => format!("no handler for event type {ty:?}"),
            None => "the message carries no event type".to_owned(),
        };
        match self.unknown {
            UnknownType::Acknowledge => {
                tracing::debug!(
                    id = delivery.id(),
                    topic = delivery.topic(),
                    "{what}: acknowledged"
                );
                Box::pin(async { Ok(()) })
            }
            UnknownType::DeadLetter => Box::pin(async move { Err(HandlerError::permanent(what)) }),
        }
    }
}

/// A [`Handler`] for one event type, made by [`Events::handler`].
pub struct TypedHandler {
    route: Route,
}

impl std::fmt::Debug for TypedHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypedHandler").finish_non_exhaustive()
    }
}

impl TypedHandler {
    pub(crate) fn new<E, Args, S, H>(events: Arc<Events<S>>, handler: H) -> Self
    where
        E: Event,
        H: EventHandler<E, Args, S>,
        S: Clone + Send + Sync + 'static,
        Args: 'static,
    {
        TypedHandler {
            route: route(events, handler, true),
        }
    }
}

impl Handler for TypedHandler {
    fn call(&self, delivery: Delivery) -> BoxFuture<'static, HandlerResult> {
        (self.route)(delivery)
    }
}
