//! The core of [polybus](https://docs.rs/polybus): traits, message types, errors,
//! the runner and built-in middleware.
//!
//! Backend crates depend on this crate only; applications depend on the `polybus`
//! facade, which re-exports everything here.
//!
//! * [`Producer`] and [`Consumer`] (with [`Subscription`] and [`Acker`]) are the
//!   small backend interface.
//! * [`Handler`]s (plain async functions and closures) and [`Middleware`]
//!   (`middleware::from_fn`) are what applications write.
//! * The [`Runner`] joins them and owns concurrency, ordering lanes, retries, dead
//!   letters, backpressure, keep-alives and shutdown.
//! * [`typed`] adds typed handlers with extractors, a router by event type and
//!   codecs; [`cloudevents`] maps CloudEvents onto each broker's headers.

#![cfg_attr(docsrs, feature(doc_cfg))]

mod backend;
pub mod cloudevents;
mod error;
mod gate;
mod handler;
mod headers;
mod message;
pub mod middleware;
pub mod names;
pub mod observe;
mod runner;
pub mod time;
#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub mod tower;
pub mod typed;
pub mod wire;

pub use async_trait::async_trait;
pub use backend::{
    AckHandle, Acker, Capabilities, CatchUpProbe, Connection, Consumer, Event, Partition, Producer,
    ProducerExt, StartFrom, SubscribeOptions, Subscription,
};
pub use bytes::Bytes;
pub use error::{BoxError, Error, NameKind, Result, percent_decode, redact_url};
pub use gate::{SendGate, SendGuard};
pub use handler::{FailureKind, Handler, HandlerError, HandlerResult};
pub use message::{DeadLetter, Delivery, HeaderValue, Headers, Message, Origin, dlq_headers};
pub use middleware::{Middleware, Next, Pipeline, from_fn};
pub use runner::{
    CatchUp, Ended, NotCaughtUp, Order, RetryPolicy, RunHandle, RunState, Runner, ShutdownReport,
};
