//! Middleware: code that wraps every handler call.
//!
//! Layers are added with [`Runner::layer`](crate::Runner::layer) (or
//! [`Pipeline::layer`]). **The first layer added is the outermost: it sees each
//! delivery first and its result last.** Each layer decides whether and when to
//! call [`Next::run`].
//!
//! ```
//! use polybus_core::middleware::{from_fn, Next};
//! use polybus_core::Delivery;
//!
//! let log = from_fn(|delivery: Delivery, next: Next| async move {
//!     println!("handling {}", delivery.id());
//!     let result = next.run(delivery).await;
//!     println!("done: {}", result.is_ok());
//!     result
//! });
//! # let _ = log;
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tracing::Instrument;

use crate::error::Error;
use crate::handler::{Handler, HandlerError, HandlerResult};
use crate::message::Delivery;

/// Wraps the handling of a delivery.
pub trait Middleware: Send + Sync + 'static {
    /// Handles `delivery`, usually by calling `next.run(delivery)` somewhere inside.
    fn call(&self, delivery: Delivery, next: Next) -> BoxFuture<'static, HandlerResult>;
}

/// The rest of the chain after a middleware: the inner layers and the handler.
pub struct Next {
    pipeline: Arc<PipelineInner>,
    index: usize,
}

impl std::fmt::Debug for Next {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Next").field("index", &self.index).finish()
    }
}

impl Next {
    /// Runs the inner layers and the handler.
    pub fn run(self, delivery: Delivery) -> BoxFuture<'static, HandlerResult> {
        match self.pipeline.layers.get(self.index) {
            Some(layer) => {
                let layer = Arc::clone(layer);
                let next = Next {
                    pipeline: Arc::clone(&self.pipeline),
                    index: self.index + 1,
                };
                layer.call(delivery, next)
            }
            None => self.pipeline.handler.call(delivery),
        }
    }
}

impl Next {
    /// Which pipeline and position this is (the same for every delivery through
    /// one layer of one pipeline).
    #[cfg(feature = "tower")]
    pub(crate) fn identity(&self) -> (usize, usize) {
        (Arc::as_ptr(&self.pipeline) as *const () as usize, self.index)
    }

    /// Another handle to the same rest of the chain.
    #[cfg(feature = "tower")]
    pub(crate) fn fork(&self) -> Next {
        Next {
            pipeline: Arc::clone(&self.pipeline),
            index: self.index,
        }
    }
}

struct PipelineInner {
    layers: Vec<Arc<dyn Middleware>>,
    handler: Arc<dyn Handler>,
}

/// A handler with its middleware. The runner calls one per delivery; middleware
/// authors can call one directly in tests, with no broker at all:
///
/// ```
/// # tokio_test_block(async {
/// use polybus_core::{middleware::{self, Pipeline}, Delivery, Message, Origin, HandlerError};
/// let pipeline = Pipeline::new(|_d: Delivery| async { Err(HandlerError::retryable("down")) })
///     .layer(middleware::timeout(std::time::Duration::from_secs(1)));
/// let delivery = Delivery::new(Message::new("x"), Origin::default(), 1);
/// assert!(pipeline.call(delivery).await.is_err());
/// # });
/// # fn tokio_test_block(f: impl std::future::Future<Output = ()>) {
/// #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Clone)]
pub struct Pipeline {
    inner: Arc<PipelineInner>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("layers", &self.inner.layers.len())
            .finish()
    }
}

impl Pipeline {
    /// A pipeline with no middleware.
    pub fn new(handler: impl Handler) -> Self {
        Self::from_parts(Arc::new(handler), Vec::new())
    }

    pub(crate) fn from_parts(handler: Arc<dyn Handler>, layers: Vec<Arc<dyn Middleware>>) -> Self {
        Pipeline {
            inner: Arc::new(PipelineInner { layers, handler }),
        }
    }

    /// Adds a layer inside the ones already added.
    pub fn layer(self, middleware: impl Middleware) -> Self {
        let mut layers = self.inner.layers.clone();
        layers.push(Arc::new(middleware));
        Self::from_parts(Arc::clone(&self.inner.handler), layers)
    }

    /// Runs the middleware chain and the handler for `delivery`.
    pub fn call(&self, delivery: Delivery) -> BoxFuture<'static, HandlerResult> {
        Next {
            pipeline: Arc::clone(&self.inner),
            index: 0,
        }
        .run(delivery)
    }
}

/// Middleware made from an async closure, see [`from_fn`].
#[derive(Clone)]
pub struct FromFn<F>(F);

impl<F> std::fmt::Debug for FromFn<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FromFn")
    }
}

/// Middleware from `|delivery, next| async move { … next.run(delivery).await … }`.
pub fn from_fn<F, Fut>(f: F) -> FromFn<F>
where
    F: Fn(Delivery, Next) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    FromFn(f)
}

impl<F, Fut> Middleware for FromFn<F>
where
    F: Fn(Delivery, Next) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    fn call(&self, delivery: Delivery, next: Next) -> BoxFuture<'static, HandlerResult> {
        Box::pin((self.0)(delivery, next))
    }
}

/// A `tracing` span per delivery, see [`tracing()`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Tracing;

/// A span `polybus.handle` per delivery with its topic, key, id and attempt,
/// recording the outcome and the duration in milliseconds when it ends.
pub fn tracing() -> Tracing {
    Tracing
}

impl Middleware for Tracing {
    fn call(&self, delivery: Delivery, next: Next) -> BoxFuture<'static, HandlerResult> {
        let span = tracing::info_span!(
            "polybus.handle",
            topic = %delivery.topic(),
            key = delivery.key().unwrap_or(""),
            id = %delivery.id(),
            attempt = delivery.attempt(),
            outcome = tracing::field::Empty,
            duration_ms = tracing::field::Empty,
        );
        let inner = span.clone();
        Box::pin(
            async move {
                let started = Instant::now();
                let result = next.run(delivery).await;
                let outcome = match &result {
                    Ok(()) => "ok",
                    Err(e) if e.is_permanent() => "permanent_error",
                    Err(_) => "retryable_error",
                };
                inner.record("outcome", outcome);
                inner.record("duration_ms", started.elapsed().as_secs_f64() * 1000.0);
                if let Err(e) = &result {
                    tracing::warn!(error = %e, "handler failed");
                }
                result
            }
            .instrument(span),
        )
    }
}

/// A limit on each handler call, see [`timeout()`].
#[derive(Debug, Clone, Copy)]
pub struct Timeout(Duration);

/// Fails a handler call that runs longer than `limit` with a retryable
/// [`Error::Timeout`]; the call's future is dropped.
pub fn timeout(limit: Duration) -> Timeout {
    Timeout(limit)
}

impl Middleware for Timeout {
    fn call(&self, delivery: Delivery, next: Next) -> BoxFuture<'static, HandlerResult> {
        let limit = self.0;
        Box::pin(async move {
            match tokio::time::timeout(limit, next.run(delivery)).await {
                Ok(result) => result,
                Err(_) => Err(HandlerError::retryable(Error::timeout("handler", limit))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::message::{Message, Origin};

    fn delivery() -> Delivery {
        Delivery::new(Message::new("x"), Origin::default(), 1)
    }

    #[tokio::test]
    async fn first_layer_sees_the_delivery_first() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let layer = |name: &'static str| {
            let seen = Arc::clone(&seen);
            from_fn(move |d: Delivery, next: Next| {
                let seen = Arc::clone(&seen);
                async move {
                    seen.lock().unwrap().push(format!("{name} in"));
                    let r = next.run(d).await;
                    seen.lock().unwrap().push(format!("{name} out"));
                    r
                }
            })
        };
        let handler_seen = Arc::clone(&seen);
        let pipeline = Pipeline::new(move |_d: Delivery| {
            let seen = Arc::clone(&handler_seen);
            async move {
                seen.lock().unwrap().push("handler".into());
                Ok(())
            }
        })
        .layer(layer("outer"))
        .layer(layer("inner"));
        pipeline.call(delivery()).await.unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            ["outer in", "inner in", "handler", "inner out", "outer out"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_fails_slow_handlers_retryably() {
        let pipeline = Pipeline::new(|_d: Delivery| async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok(())
        })
        .layer(timeout(Duration::from_millis(50)));
        let err = pipeline.call(delivery()).await.unwrap_err();
        assert!(!err.is_permanent());
    }

    #[tokio::test]
    async fn tracing_passes_results_through() {
        let pipeline =
            Pipeline::new(|_d: Delivery| async { Err(HandlerError::permanent("bad")) }).layer(tracing());
        assert!(pipeline.call(delivery()).await.unwrap_err().is_permanent());
    }
}
