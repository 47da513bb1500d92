//! tower interop (feature `tower`): any [`tower::Layer`] as
//! polybus middleware, any `tower::Service<Delivery>` as a
//! handler, so tower's timeout, rate-limit, concurrency-limit and load-shed
//! layers (and your own) work unchanged.
//!
//! ```
//! # #[cfg(any())] {
//! use std::time::Duration;
//! use tower::ServiceBuilder;
//!
//! let handle = conn
//!     .runner()
//!     .topic("rides")
//!     // RateLimit is not Clone: put a buffer in front of it.
//!     .layer(polybus::tower::layer(ServiceBuilder::new().buffer(64).rate_limit(100, Duration::from_secs(1))))
//!     .layer(polybus::tower::layer(ServiceBuilder::new().load_shed().concurrency_limit(4)))
//!     .run(polybus::tower::service(tower::service_fn(handle_ride)))
//!     .await?;
//! # }
//! ```
//!
//! **Clone.** tower services take `&mut self` and reserve capacity in
//! `poll_ready`, so each delivery gets its own clone of the service (the tower
//! convention). A service that is not `Clone` (tower's `RateLimit`, for one)
//! goes behind `tower::buffer` (`ServiceBuilder::new().buffer(n)…`), which is.
//! A layer's service is built once per pipeline, on the first delivery, so its
//! state (a rate limit's window, a concurrency limit's permits) is shared by
//! every delivery of the runner.
//!
//! **Errors** become a [`HandlerError`] as `?` would make them: tower's
//! `Overloaded` (from `load_shed`) is [`HandlerError::overloaded`] — the runner
//! releases the message to the broker; it is not a failed attempt and is never
//! dead-lettered (the broker redelivers it, at once on most brokers). A
//! [`polybus::Error`](crate::Error) keeps its retryability (non-retryable is
//! permanent); anything else, tower's `Elapsed` from `timeout` included, is
//! retryable. A handler error from the layers and handler inside a tower layer
//! passes through it unchanged.

use std::future::poll_fn;
use std::sync::Mutex;
use std::task::{Context, Poll};

use ::tower::load_shed::error::Overloaded;
use ::tower::{Layer, Service};
use futures::future::BoxFuture;

use crate::error::{BoxError, Error};
use crate::handler::{Handler, HandlerError, HandlerResult};
use crate::message::Delivery;
use crate::middleware::{Middleware, Next};

/// Turns a tower error into a handler error (see the [module docs](self)).
fn handler_error(error: BoxError) -> HandlerError {
    let error = match error.downcast::<InnerError>() {
        Ok(inner) => return inner.0,
        Err(other) => other,
    };
    if error.is::<Overloaded>() {
        return HandlerError::overloaded(error);
    }
    match error.downcast_ref::<Error>() {
        Some(e) if !e.is_retryable() => HandlerError::permanent(error),
        _ => HandlerError::retryable(error),
    }
}

/// Waits until `service` is ready, then calls it.
async fn ready_call<S>(mut service: S, delivery: Delivery) -> HandlerResult
where
    S: Service<Delivery>,
    S::Error: Into<BoxError>,
{
    poll_fn(|cx| service.poll_ready(cx))
        .await
        .map_err(|e| handler_error(e.into()))?;
    service
        .call(delivery)
        .await
        .map(|_| ())
        .map_err(|e| handler_error(e.into()))
}

/// A handler made from a tower service, see [`service`].
pub struct ServiceHandler<S> {
    service: Mutex<S>,
}

impl<S> std::fmt::Debug for ServiceHandler<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServiceHandler")
    }
}

/// A handler from any `tower::Service<Delivery>` whose error converts into a
/// boxed error; its response is ignored. Each delivery is handled by a clone
/// (put a non-`Clone` service behind `tower::buffer`).
pub fn service<S>(service: S) -> ServiceHandler<S>
where
    S: Service<Delivery> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    ServiceHandler {
        service: Mutex::new(service),
    }
}

impl<S> Handler for ServiceHandler<S>
where
    S: Service<Delivery> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    fn call(&self, delivery: Delivery) -> BoxFuture<'static, HandlerResult> {
        let service = self.service.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Box::pin(ready_call(service, delivery))
    }
}

/// The rest of the pipeline (inner layers and the handler) as a tower service:
/// what a tower layer used as middleware wraps.
#[derive(Debug)]
pub struct NextService {
    next: Next,
}

impl Clone for NextService {
    fn clone(&self) -> Self {
        NextService {
            next: self.next.fork(),
        }
    }
}

/// The error of [`NextService`]: the inner handler's error, which comes out of
/// the tower layer unchanged.
#[derive(Debug)]
pub struct InnerError(HandlerError);

impl std::fmt::Display for InnerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for InnerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.cause())
    }
}

impl Service<Delivery> for NextService {
    type Response = ();
    type Error = InnerError;
    type Future = BoxFuture<'static, Result<(), InnerError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), InnerError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, delivery: Delivery) -> Self::Future {
        let run = self.next.fork().run(delivery);
        Box::pin(async move { run.await.map_err(InnerError) })
    }
}

/// A layer's service built for one (pipeline, position).
type Built<S> = ((usize, usize), S);

/// Middleware made from a tower layer, see [`layer`].
pub struct LayerMiddleware<L: Layer<NextService>> {
    layer: L,
    /// The layer's service per (pipeline, position), built on first use.
    built: Mutex<Vec<Built<L::Service>>>,
}

impl<L: Layer<NextService>> std::fmt::Debug for LayerMiddleware<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LayerMiddleware")
    }
}

/// Middleware from any tower layer whose service is `Clone` (put a buffer in
/// front of one that is not: `ServiceBuilder::new().buffer(n).layer(…)`). The
/// layer wraps the rest of the pipeline ([`NextService`]); its service is built
/// once per pipeline, so its state is shared by every delivery.
pub fn layer<L>(layer: L) -> LayerMiddleware<L>
where
    L: Layer<NextService> + Send + Sync + 'static,
    L::Service: Service<Delivery> + Clone + Send + 'static,
    <L::Service as Service<Delivery>>::Error: Into<BoxError>,
    <L::Service as Service<Delivery>>::Future: Send + 'static,
{
    LayerMiddleware {
        layer,
        built: Mutex::new(Vec::new()),
    }
}

impl<L> Middleware for LayerMiddleware<L>
where
    L: Layer<NextService> + Send + Sync + 'static,
    L::Service: Service<Delivery> + Clone + Send + 'static,
    <L::Service as Service<Delivery>>::Error: Into<BoxError>,
    <L::Service as Service<Delivery>>::Future: Send + 'static,
{
    fn call(&self, delivery: Delivery, next: Next) -> BoxFuture<'static, HandlerResult> {
        let id = next.identity();
        let service = {
            let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
            match built.iter().find(|(key, _)| *key == id) {
                Some((_, service)) => service.clone(),
                None => {
                    let service = self.layer.layer(NextService { next });
                    built.push((id, service.clone()));
                    service
                }
            }
        };
        Box::pin(ready_call(service, delivery))
    }
}
