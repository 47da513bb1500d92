//! A JetStream subscription: one pull loop ("pump") per topic, a shared buffer,
//! and the settlement handle of each delivery.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use polybus_core::{Acker, Bytes, Delivery, Error, Event, Origin, Result, Subscription};
use tokio::sync::{Notify, broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::poison::Poisoned;

mod ack;
mod catch_up;
mod pump;

use ack::{Credit, JetStreamAck, PoisonAck};
use catch_up::JetStreamCatchUp;
pub(crate) use pump::{Pump, PumpSetup};

/// Fetched messages not yet handed out, and the credit that bounds fetching.
/// Each topic's pump has its own share of the credit, so an idle topic cannot
/// starve a busy one.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Signalled when a message is buffered, a pump ends or fails.
    data: Notify,
    /// Signalled when a delivery is settled (credit returns).
    credit: Notify,
    per_pump: usize,
    pumps: usize,
    /// Per pump: bumped when its consumer is found deleted (or recreated), so
    /// deliveries from before cannot claim a settlement.
    generations: Vec<AtomicU64>,
    /// Ephemeral consumers to delete on close (a recreated one replaces its
    /// predecessor).
    ephemeral: Mutex<Vec<(usize, stream::Stream, String)>>,
    /// Poison messages found (pump, stream sequence) and not acknowledged yet:
    /// `true` while one is buffered or handed out.
    poisoned: Mutex<HashMap<(usize, u64), bool>>,
}

/// A fetched message: a JetStream delivery, or a poison message fetched by
/// sequence (see [`crate::poison`]). The common case is not boxed.
#[allow(clippy::large_enum_variant)]
enum Fetched {
    Js(jetstream::Message),
    Poisoned(Box<Poisoned>),
}

struct State {
    /// Fetched, not yet handed out: (pump, generation, message).
    buffer: VecDeque<(usize, u64, Fetched)>,
    /// Per pump: buffered + handed out and unsettled + asked for in a pull request.
    outstanding: Vec<usize>,
    failure: Option<Error>,
    /// How many pumps have stopped reading their inbox.
    ended: usize,
}

impl Shared {
    pub(crate) fn new(prefetch: usize, pumps: usize) -> Self {
        let pumps = pumps.max(1);
        Shared {
            state: Mutex::new(State {
                buffer: VecDeque::new(),
                outstanding: vec![0; pumps],
                failure: None,
                ended: 0,
            }),
            data: Notify::new(),
            credit: Notify::new(),
            per_pump: (prefetch / pumps).max(1),
            pumps,
            generations: (0..pumps).map(|_| AtomicU64::new(0)).collect(),
            ephemeral: Mutex::new(Vec::new()),
            poisoned: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn add_ephemeral(&self, pump: usize, stream: stream::Stream, name: String) {
        self.ephemeral
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((pump, stream, name));
    }

    /// The current name of pump `pump`'s ephemeral consumer (`None` for a group's).
    fn ephemeral_name(&self, pump: usize) -> Option<String> {
        self.ephemeral
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(p, _, _)| *p == pump)
            .map(|(_, _, name)| name.clone())
    }

    fn poisoned(&self) -> std::sync::MutexGuard<'_, HashMap<(usize, u64), bool>> {
        self.poisoned.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn generation(&self, pump: usize) -> u64 {
        self.generations[pump].load(Ordering::Acquire)
    }

    /// A pump asks for more only once this much credit is free (or none is
    /// outstanding), so pull requests stay large instead of one per ack.
    fn threshold(&self) -> usize {
        (self.per_pump / 2).max(1)
    }

    fn give_back(&self, pump: usize, n: usize) {
        if n > 0 {
            let mut state = self.lock();
            let Some(o) = state.outstanding.get_mut(pump) else {
                return;
            };
            let before = *o;
            *o = o.saturating_sub(n);
            let after = *o;
            drop(state);
            // Wake the pump only when its free credit crosses the threshold.
            let limit = self.per_pump.saturating_sub(self.threshold());
            if after == 0 || (before > limit && after <= limit) {
                self.credit.notify_waiters();
            }
        }
    }

    /// Records that a pump stopped reading (with `failure`, if any) and wakes the reader.
    fn pump_ended(&self, failure: Option<Error>) {
        let mut state = self.lock();
        state.ended += 1;
        if failure.is_some() {
            state.failure = failure;
        }
        drop(state);
        self.data.notify_waiters();
    }
}

pub(crate) struct JetStreamSubscription {
    pub(crate) shared: Arc<Shared>,
    pub(crate) pumps: Vec<JoinHandle<()>>,
    pub(crate) controls: Vec<mpsc::UnboundedSender<oneshot::Sender<()>>>,
    pub(crate) client: Client,
    pub(crate) group: Option<String>,
    pub(crate) consumer_closed: Arc<AtomicBool>,
    pub(crate) request_timeout: Duration,
    pub(crate) stopped: bool,
    /// The connection's permission violations and the topics they may
    /// concern: a pull request refused mid-run (permissions revoked) ends the
    /// subscription with [`Error::PermissionDenied`] instead of timing out.
    pub(crate) violations: (broadcast::Receiver<Arc<crate::security::Violation>>, Vec<String>),
    /// Each topic's stream and JetStream consumer (for catch-up probes).
    pub(crate) consumers: Vec<(String, stream::Stream, String)>,
}

impl Drop for JetStreamSubscription {
    fn drop(&mut self) {
        // A crash: stop fetching; nothing more is settled and the server redelivers
        // what was not acknowledged once AckWait runs out.
        for pump in &self.pumps {
            pump.abort();
        }
    }
}

impl JetStreamSubscription {
    /// The credit a delivery from `pump` (in its consumer's `generation`) holds.
    fn credit(&self, pump: usize, generation: u64) -> Credit {
        Credit {
            pump,
            generation,
            shared: Arc::clone(&self.shared),
            consumer_closed: Arc::clone(&self.consumer_closed),
            timeout: self.request_timeout,
            returned: AtomicBool::new(false),
        }
    }

    fn delivery(&self, pump: usize, generation: u64, fetched: Fetched) -> Event {
        let msg = match fetched {
            Fetched::Js(msg) => msg,
            Fetched::Poisoned(p) => {
                let p = *p;
                let origin = Origin {
                    topic: p.subject.clone(),
                    group: self.group.clone(),
                    partition: None,
                    sequence: Some(p.sequence),
                };
                tracing::warn!(target: "polybus_nats", topic = p.subject, sequence = p.sequence, reason = p.reason, "undecodable message; dead-lettering it");
                let acker = Acker::new(PoisonAck {
                    client: self.client.clone(),
                    ack_subject: p.ack_subject,
                    sequence: p.sequence,
                    credit: self.credit(pump, generation),
                    acked: AtomicBool::new(false),
                });
                return Event::Delivery(Delivery::undecodable(p.message, origin, 1, p.reason), acker);
            }
        };
        let info = msg.info().ok();
        let (attempt, sequence) = match &info {
            Some(info) => (
                u32::try_from(info.delivered.max(1)).unwrap_or(u32::MAX),
                Some(info.stream_sequence),
            ),
            None => (1, None),
        };
        let topic = msg.message.subject.to_string();
        // The id of a message that carries none (a foreign publisher's): its
        // stream position, formatted only when it is needed.
        let message = crate::headers::decode(
            msg.message.payload.clone(),
            msg.message.headers.as_ref(),
            || match &info {
                Some(info) => format!("{}:{}", info.stream, info.stream_sequence),
                None => polybus_core::Message::new(Bytes::new()).id,
            },
        );
        let origin = Origin {
            topic,
            group: self.group.clone(),
            partition: None,
            sequence,
        };
        let acker = Acker::new(JetStreamAck {
            message: msg,
            credit: self.credit(pump, generation),
        });
        Event::Delivery(Delivery::new(message, origin, attempt), acker)
    }

    /// Waits (bounded) until every pump has stopped reading its inbox.
    async fn pumps_ended(&self, timeout: Duration) {
        let until = Instant::now() + timeout;
        loop {
            let arrived = self.shared.data.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if self.shared.lock().ended >= self.shared.pumps {
                return;
            }
            if tokio::time::timeout_at(until, arrived).await.is_err() {
                return;
            }
        }
    }
}

#[async_trait]
impl Subscription for JetStreamSubscription {
    async fn next(&mut self) -> Option<Result<Event>> {
        loop {
            let arrived = self.shared.data.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            {
                let mut state = self.shared.lock();
                if let Some((pump, generation, msg)) = state.buffer.pop_front() {
                    drop(state);
                    return Some(Ok(self.delivery(pump, generation, msg)));
                }
                if let Some(e) = state.failure.take() {
                    return Some(Err(e));
                }
                if state.ended >= self.shared.pumps {
                    return None;
                }
            }
            if self.consumer_closed.load(Ordering::Acquire) {
                return None;
            }
            let (violations, topics) = &mut self.violations;
            tokio::select! {
                () = &mut arrived => {}
                seen = violations.recv() => match seen {
                    // JetStream API and acks only: a refused `send` to the
                    // topic fails that call, not this subscription.
                    Ok(v) if v.subject.starts_with("$JS.") && topics.iter().any(|t| v.concerns(t)) => {
                        tracing::warn!(target: "polybus_nats", subject = v.subject, "permission refused mid-run; ending the subscription");
                        return Some(Err(v.error()));
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    // The connection is gone; the pumps report that.
                    Err(broadcast::error::RecvError::Closed) => arrived.await,
                },
            }
        }
    }

    /// Each stream's last sequence now; caught up once every consumer's ack
    /// floor (the stream sequence up to which everything is acked) reaches it,
    /// or it has nothing pending and nothing unacked.
    async fn catch_up_probe(&mut self) -> Result<Box<dyn polybus_core::CatchUpProbe>> {
        let mut ends = Vec::with_capacity(self.consumers.len());
        for (topic, stream, consumer) in &self.consumers {
            let info = tokio::time::timeout(self.request_timeout, stream.get_info())
                .await
                .map_err(|_| {
                    Error::timeout(
                        format!("reading where topic '{topic}' ends"),
                        self.request_timeout,
                    )
                })?
                .map_err(|e| crate::backend_error(&format!("reading where topic '{topic}' ends"), e, true))?;
            ends.push((
                topic.clone(),
                stream.clone(),
                consumer.clone(),
                info.state.last_sequence,
            ));
        }
        Ok(Box::new(JetStreamCatchUp {
            ends,
            timeout: self.request_timeout,
            shared: Arc::clone(&self.shared),
            ephemeral: self.shared.ephemeral_name(0).is_some(),
        }))
    }

    async fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let mut acks = Vec::new();
        for control in &self.controls {
            let (done, acked) = oneshot::channel();
            if control.send(done).is_ok() {
                acks.push(acked);
            }
        }
        // Each pump answers once its UNSUB is queued on the connection, ahead
        // of anything the runner sends after this returns. A pump that has
        // ended drops its answer.
        let answered = tokio::time::timeout(self.request_timeout, futures::future::join_all(acks)).await;
        if answered.is_err() {
            return Err(Error::timeout(
                "stopping the NATS pull requests",
                self.request_timeout,
            ));
        }
        Ok(())
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        if !self.stopped {
            // Not stopped first: what the runner just released may be on its way
            // into our open pull request. Let it arrive (best effort: the server
            // redelivers asynchronously), then stop.
            let _ = crate::round_trip(&self.client, Duration::from_secs(5)).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = self.stop().await;
        }
        // The drained inboxes end once the server has seen the UNSUBs: all it sent
        // to our pull requests before that is buffered now.
        self.pumps_ended(self.request_timeout).await;
        for pump in &self.pumps {
            pump.abort();
        }
        for pump in std::mem::take(&mut self.pumps) {
            let _ = pump.await;
        }
        // Give back what was fetched but not handed out, at once. The server no
        // longer has a pull request of ours, so it goes to another consumer.
        let unhanded: Vec<_> = self.shared.lock().buffer.drain(..).collect();
        for (pump, _, fetched) in unhanded {
            match fetched {
                Fetched::Js(msg) => {
                    let _ = msg.ack_with(AckKind::Nak(None)).await;
                }
                Fetched::Poisoned(p) => {
                    self.shared.poisoned().insert((pump, p.sequence), false);
                    let _ = self
                        .client
                        .publish(p.ack_subject, AckKind::Nak(None).into())
                        .await;
                }
            }
        }
        let ephemeral: Vec<_> =
            std::mem::take(&mut *self.shared.ephemeral.lock().unwrap_or_else(|p| p.into_inner()));
        for (_, stream, name) in ephemeral {
            let _ = stream.delete_consumer(&name).await;
        }
        crate::round_trip(&self.client, self.request_timeout).await
    }
}
