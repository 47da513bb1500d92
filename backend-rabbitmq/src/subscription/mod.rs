//! Subscriptions: consumers on a connection of their own.
//!
//! * `open`: connecting, consuming, reconnecting with backoff;
//! * `poison`: messages lapin cannot parse (prefetch 1, failure counts);
//! * `delivery`: a lapin delivery as a polybus one;
//! * `settle`: ack and release (coalesced by [`crate::acks`]).

mod delivery;
mod open;
mod poison;
mod settle;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use futures::StreamExt;
use lapin::Channel;
use lapin::options::BasicCancelOptions;
use polybus_core::{Error, Event, Result, Subscription};

pub(crate) use self::open::Source;
use self::open::{DeliveryStream, Opened, Restored, close_opening, open_sources, reopen};
use crate::BACKEND;
use crate::acks::Acks;
use crate::config::RabbitConfig;
use crate::errors::map_error;

/// A subscription on a connection of its own, without lapin's auto-recovery:
/// when the connection drops, `next` reconnects with backoff, declares its
/// private queues again and consumes anew (the broker has already given every
/// unacknowledged delivery of the old connection back).
pub(crate) struct RabbitSubscription {
    config: RabbitConfig,
    sources: Vec<Source>,
    prefetch: u16,
    connection: Option<lapin::Connection>,
    channel: Option<Channel>,
    deliveries: futures::stream::SelectAll<DeliveryStream>,
    tags: Vec<String>,
    group: Option<String>,
    consumer_closed: Arc<AtomicBool>,
    /// `stop` cancelled the consumers: no reconnect, and the subscription ends
    /// once the deliveries already received are handed out.
    stopped: bool,
    /// Poison handling (see `parse_failed`): consuming with prefetch 1 since
    /// lapin last failed to parse a message, for this many more deliveries.
    careful: Option<u32>,
    /// Connections lost to a parse failure in a row, with no delivery between
    /// them: the same message every time.
    parse_failures: u32,
    /// A reconnection in progress (see `reconnect`).
    opening: Option<tokio::task::JoinHandle<Result<Opened>>>,
    /// Consumers being started again with the full prefetch (see
    /// `received_carefully`).
    restoring: Option<tokio::task::JoinHandle<Result<Restored>>>,
    /// Dropped when the current connection is lost: settlements still waiting
    /// on it end at once (see `RabbitAck`).
    alive: tokio::sync::watch::Sender<()>,
    /// The current channel's coalescing acknowledger (a new one per channel;
    /// `None` before the first connection or with coalescing off).
    acks: Option<Acks>,
}

impl Drop for RabbitSubscription {
    fn drop(&mut self) {
        // A crash: closing the connection hands every unacknowledged delivery
        // back to the broker, as a dead process's connection would.
        let (channel, connection) = (self.channel.take(), self.connection.take());
        let opening = self.opening.take();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Some(channel) = channel {
                    let _ = channel.close(200, "dropped".into()).await;
                }
                if let Some(connection) = connection {
                    let _ = connection.close(200, "dropped".into()).await;
                }
                close_opening(opening).await;
            });
        }
    }
}

impl RabbitSubscription {
    /// A subscription that is not connected yet (see `open`).
    pub(crate) fn new(
        config: RabbitConfig,
        sources: Vec<Source>,
        prefetch: u16,
        group: Option<String>,
        consumer_closed: Arc<AtomicBool>,
    ) -> Self {
        RabbitSubscription {
            config,
            sources,
            prefetch,
            connection: None,
            channel: None,
            deliveries: futures::stream::SelectAll::new(),
            tags: Vec::new(),
            group,
            consumer_closed,
            stopped: false,
            careful: None,
            parse_failures: 0,
            opening: None,
            restoring: None,
            alive: tokio::sync::watch::channel(()).0,
            acks: None,
        }
    }

    /// Connects and starts consuming.
    pub(crate) async fn open(&mut self) -> Result<()> {
        let opened = open_sources(&self.config, self.sources.clone(), self.current_prefetch()).await?;
        self.install(opened);
        Ok(())
    }

    /// The prefetch to consume with now: 1 while poison handling is careful.
    fn current_prefetch(&self) -> u16 {
        if self.careful.is_some() { 1 } else { self.prefetch }
    }

    fn install(&mut self, opened: Opened) {
        self.alive = tokio::sync::watch::channel(()).0;
        // A new channel, a new book: tags start again at 1, and the old
        // channel's deliveries keep the old book.
        self.acks = self
            .config
            .ack_coalescing
            .map(|bound| Acks::start(opened.channel.clone(), self.alive.subscribe(), bound));
        self.connection = Some(opened.connection);
        self.channel = Some(opened.channel);
        self.deliveries = opened.deliveries;
        self.tags = opened.tags;
        self.sources = opened.sources;
    }

    /// After the connection dropped: reconnect with backoff, within the request
    /// timeout (then a retryable error; the next call tries again). The work
    /// runs in a task of its own, so `next` stays cancel-safe: a `next` dropped
    /// mid-reconnect (the runner polls it with `now_or_never`) leaves the task
    /// running, and the following call awaits the same task. (Reconnecting in
    /// the `next` future itself dropped half-open lapin connections and, about
    /// one run in five of the poison tests, stalled the subscription.)
    async fn reconnect(&mut self) -> Result<()> {
        let task = match self.opening.take() {
            Some(task) => task,
            None => {
                // Settlements waiting on the lost connection give up now.
                self.alive = tokio::sync::watch::channel(()).0;
                self.acks = None;
                if let Some(restoring) = self.restoring.take() {
                    restoring.abort();
                }
                self.deliveries = futures::stream::SelectAll::new();
                self.channel = None;
                let old = self.connection.take();
                let (config, sources, prefetch) =
                    (self.config.clone(), self.sources.clone(), self.current_prefetch());
                tokio::spawn(reopen(config, sources, prefetch, old))
            }
        };
        let task = self.opening.insert(task);
        let joined = task.await;
        self.opening = None;
        match joined {
            Ok(Ok(opened)) => {
                tracing::info!(target: "polybus_rabbitmq", "subscription reconnected");
                self.install(opened);
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(e) => Err(Error::Connection {
                backend: BACKEND,
                message: format!("reconnecting the subscription: the task ended: {e}"),
                source: None,
            }),
        }
    }
}

#[async_trait]
impl Subscription for RabbitSubscription {
    async fn next(&mut self) -> Option<Result<Event>> {
        loop {
            if self.consumer_closed.load(Ordering::Acquire) {
                return None;
            }
            let polled = match self.restoring.as_mut() {
                Some(task) => tokio::select! {
                    joined = task => {
                        self.restored(joined);
                        continue;
                    }
                    polled = self.deliveries.next() => polled,
                },
                None => self.deliveries.next().await,
            };
            let polled = match (polled, self.restoring.as_mut()) {
                // The careful consumer is cancelled and the new ones are not
                // pushed yet: wait for them instead of reconnecting.
                (None, Some(task)) => {
                    let joined = task.await;
                    self.restored(joined);
                    continue;
                }
                (polled, _) => polled,
            };
            match polled {
                Some((topic, Ok(delivery))) => {
                    self.parse_failures = 0;
                    self.received_carefully();
                    return Some(Ok(self.delivery(topic, delivery)));
                }
                Some((_, Err(e))) if self.stopped => {
                    // Stopped: nothing more is consumed, and the broker has given
                    // back what this connection held.
                    tracing::warn!(target: "polybus_rabbitmq", error = %e, "stopped subscription lost its connection");
                    return None;
                }
                Some((_, Err(e))) if matches!(e.kind(), lapin::ErrorKind::ParsingError(_)) => {
                    if let Some(fatal) = self.parse_failed(e) {
                        return Some(Err(fatal));
                    }
                }
                Some((_, Err(e))) => {
                    tracing::warn!(target: "polybus_rabbitmq", error = %e, "consumer lost its connection; reconnecting");
                }
                // Every consumer was cancelled by `stop` and what they had
                // received was handed out.
                None if self.stopped => return None,
                None => {}
            }
            if self.consumer_closed.load(Ordering::Acquire) {
                return None;
            }
            if let Err(e) = self.reconnect().await {
                return Some(Err(e));
            }
        }
    }

    /// Cancels this subscription's consumers (`basic.cancel`), so deliveries the
    /// runner releases from now on go to other consumers of the group instead of
    /// back into this one's prefetch. The channel stays open: deliveries already
    /// received can still be acked and released, and `next` hands out those
    /// lapin had buffered, then ends. Idempotent.
    async fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        if let Some(task) = self.restoring.as_mut() {
            // Its consumers must be cancelled too.
            if let Ok(joined) = tokio::time::timeout(self.config.request_timeout, task).await {
                self.restored(joined);
            }
        }
        let tags = std::mem::take(&mut self.tags);
        let Some(channel) = self.channel.clone() else {
            return Ok(());
        };
        let limit = self.config.request_timeout;
        let cancelling = async {
            for tag in &tags {
                channel
                    .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                    .await
                    .map_err(|e| map_error(&format!("cancelling consumer '{tag}'"), e))?;
            }
            Ok(())
        };
        match tokio::time::timeout(limit, cancelling).await {
            Ok(result) => result,
            Err(_) => Err(Error::timeout("cancelling the subscription's consumers", limit)),
        }
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        let limit = self.config.request_timeout;
        let (channel, connection) = (self.channel.take(), self.connection.take());
        let tags = std::mem::take(&mut self.tags);
        let opening = self.opening.take();
        let closing = async {
            close_opening(opening).await;
            if let Some(channel) = channel {
                for tag in &tags {
                    let _ = channel
                        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                        .await;
                }
                // Closing gives back what was delivered but not settled.
                let _ = channel.close(200, "bye".into()).await;
            }
            if let Some(connection) = connection {
                let _ = connection.close(200, "bye".into()).await;
            }
        };
        let _ = tokio::time::timeout(limit, closing).await;
        Ok(())
    }
}
