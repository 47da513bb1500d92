//! One topic's pull loop ("pump"): pull requests sized by free credit, the
//! inbox read in every state, in-progress acks for buffered messages, status
//! handling, and the poison scan after a connection loss.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use polybus_core::{Bytes, Error};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::BACKEND;
use crate::consumer_config::PullLimits;
use crate::poison;
use crate::status::{PullStatus, Transient, classify};

use super::{Fetched, Shared};

/// Connection losses in a row, each right after the server delivered
/// messages to this consumer that never arrived, with no poison message found
/// and nothing received in between, after which the subscription ends.
const LOSSES_WITHOUT_PROGRESS: u32 = 5;

/// At most this many stream sequences are fetched by sequence after one
/// connection loss (the rest after the next).
const SCAN_LIMIT: u64 = 4096;

/// One open pull request.
struct Request {
    reply: String,
    remaining: usize,
    deadline: Instant,
}

/// Everything a pump needs to know about its consumer.
pub(crate) struct PumpSetup {
    pub(crate) index: usize,
    pub(crate) client: Client,
    pub(crate) js: jetstream::Context,
    pub(crate) shared: Arc<Shared>,
    pub(crate) stream: stream::Stream,
    pub(crate) consumer: String,
    pub(crate) topic: String,
    /// `None` for an ephemeral consumer, which is recreated if the server removes it.
    pub(crate) group: Option<String>,
    /// The ephemeral consumer's configuration (to recreate it).
    pub(crate) ephemeral_config: Option<pull::Config>,
    /// The last stream sequence the consumer had delivered when it was created.
    pub(crate) start_sequence: u64,
    pub(crate) inbox: String,
    pub(crate) limits: PullLimits,
    pub(crate) keep_alive: Duration,
    pub(crate) retry_limit: Duration,
    pub(crate) consumer_closed: Arc<AtomicBool>,
}

/// One topic's pull loop: asks for as many messages as its credit allows,
/// buffers them, and keeps the buffered ones alive with in-progress acks. It
/// reads its inbox in every state, so late deliveries from an abandoned request
/// are buffered (and kept alive) too, never left unseen in the client.
///
/// On `stop` it drains its inbox: the server drops our interest (and so every
/// open pull request) before it sees anything sent after it, and what it sent
/// before is still read and buffered.
pub(crate) struct Pump {
    setup: PumpSetup,
    next_subject: String,
    /// The highest stream sequence seen (to recreate an ephemeral consumer).
    last_sequence: u64,
    transient: Transient,
    /// The client's connect count when last looked at (a change: the
    /// connection was lost and is back).
    connects: u64,
    /// Stream sequences up to this one were checked for poison.
    scanned_through: u64,
    /// A message arrived since the last connection loss.
    received_since_loss: bool,
    /// The consumer's `delivered.consumer_seq` at the last connection loss.
    delivered_at_loss: u64,
    /// Connection losses in a row without progress (see [`LOSSES_WITHOUT_PROGRESS`]).
    losses: u32,
}

enum Flow {
    Continue,
    /// The inbox ended (drained after stop, or the connection closed).
    InboxEnded,
    Status(PullStatus, String),
}

/// How a pump's status handling ended.
enum After {
    Continue,
    Fail(Error),
}

impl Pump {
    pub(crate) fn new(setup: PumpSetup) -> Self {
        let next_subject = format!(
            "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
            setup.stream.cached_info().config.name,
            setup.consumer
        );
        let transient = Transient::new(setup.retry_limit);
        let last_sequence = setup.start_sequence;
        let connects = setup.client.statistics().connects.load(Ordering::Relaxed);
        Pump {
            setup,
            next_subject,
            last_sequence,
            transient,
            connects,
            scanned_through: 0,
            received_since_loss: false,
            delivered_at_loss: 0,
            losses: 0,
        }
    }

    /// Takes the credit for one pull request (0: not enough free).
    fn take_credit(&self) -> usize {
        let shared = &self.setup.shared;
        let mut state = shared.lock();
        let mine = &mut state.outstanding[self.setup.index];
        let free = shared.per_pump.saturating_sub(*mine);
        let credits = if free >= shared.threshold() || (*mine == 0 && free > 0) {
            self.setup.limits.cap(free)
        } else {
            0
        };
        *mine += credits;
        credits
    }

    pub(crate) async fn run(
        mut self,
        mut replies: async_nats::Subscriber,
        mut control: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
    ) {
        let shared = Arc::clone(&self.setup.shared);
        let index = self.setup.index;
        let mut tick = tokio::time::interval(self.setup.keep_alive.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut request: Option<Request> = None;
        let mut request_no: u64 = 0;
        let mut paused_until: Option<Instant> = None;
        let mut stopped = false;
        let mut inbox_open = true;
        loop {
            if !stopped && self.setup.consumer_closed.load(Ordering::Acquire) {
                shared.pump_ended(None);
                return;
            }
            let credit_returned = shared.credit.notified();
            tokio::pin!(credit_returned);
            credit_returned.as_mut().enable();
            let connected = self.setup.client.connection_state() == async_nats::connection::State::Connected;
            let connects = self.setup.client.statistics().connects.load(Ordering::Relaxed);
            if connected && !stopped && connects != self.connects {
                // The connection was lost and is back: the open pull request died
                // with it, and what it had delivered may have been what killed it.
                self.connects = connects;
                let had_request = request.is_some();
                if let Some(r) = request.take() {
                    shared.give_back(index, r.remaining);
                }
                if let After::Fail(e) = self.after_reconnect(had_request).await {
                    shared.pump_ended(Some(e));
                    return;
                }
                continue;
            }
            if !stopped && request.is_none() && paused_until.is_none() && connected {
                let credits = self.take_credit();
                if credits > 0 {
                    request_no += 1;
                    let reply = format!("{}.{request_no}", self.setup.inbox);
                    let body = self.setup.limits.request_body(credits);
                    match self
                        .setup
                        .client
                        .publish_with_reply(self.next_subject.clone(), reply.clone(), body.into())
                        .await
                    {
                        Ok(()) => {
                            // A request lost in a reconnect never ends: ask again after this.
                            let deadline =
                                Instant::now() + self.setup.limits.expires + Duration::from_secs(2);
                            request = Some(Request {
                                reply,
                                remaining: credits,
                                deadline,
                            });
                        }
                        Err(e) => {
                            shared.give_back(index, credits);
                            if self.setup.consumer_closed.load(Ordering::Acquire) {
                                shared.pump_ended(None);
                                return;
                            }
                            tracing::warn!(target: "polybus_nats", error = %e, "pull request failed; retrying");
                            paused_until = Some(Instant::now() + Duration::from_millis(200));
                        }
                    }
                }
            }
            let waiting_for_credit = !stopped && request.is_none() && paused_until.is_none();
            let request_deadline = request.as_ref().map(|r| r.deadline);
            tokio::select! {
                biased;
                Some(done) = control.recv(), if !stopped => {
                    stopped = true;
                    // UNSUB (and a PING behind it): the server drops the open pull
                    // request once it sees no interest, and everything this
                    // client sends later (the runner's NAKs) comes after it.
                    if inbox_open {
                        let _ = replies.drain().await;
                    }
                    if let Some(r) = request.take() {
                        shared.give_back(index, r.remaining);
                    }
                    self.clear_abandoned_request().await;
                    let _ = done.send(());
                }
                incoming = replies.next(), if inbox_open => {
                    match self.on_incoming(incoming, &mut request) {
                        Flow::Continue => {}
                        Flow::InboxEnded => {
                            inbox_open = false;
                            if let Some(r) = request.take() {
                                shared.give_back(index, r.remaining);
                            }
                            shared.pump_ended(None);
                            if !stopped {
                                // The connection was closed: the subscription ends.
                                return;
                            }
                            // Stopped: keep what is buffered alive until close.
                        }
                        Flow::Status(status, description) => {
                            if let Some(r) = request.take() {
                                shared.give_back(index, r.remaining);
                            }
                            match self.on_status(status, &description, &mut paused_until).await {
                                After::Continue => {}
                                After::Fail(e) => {
                                    shared.pump_ended(Some(e));
                                    return;
                                }
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(request_deadline.unwrap_or_else(Instant::now)), if request_deadline.is_some() => {
                    // No reply at all, not even its expiry: lost in a reconnect, or
                    // nobody serves the consumer's subject any more (on some
                    // servers a deleted consumer's requests go unanswered).
                    if let Some(r) = request.take() {
                        shared.give_back(index, r.remaining);
                    }
                    if let After::Fail(e) = self.unanswered(&mut paused_until).await {
                        shared.pump_ended(Some(e));
                        return;
                    }
                }
                _ = tokio::time::sleep_until(paused_until.unwrap_or_else(Instant::now)), if paused_until.is_some() => {
                    paused_until = None;
                }
                _ = credit_returned, if waiting_for_credit && connected => {}
                _ = tokio::time::sleep(Duration::from_millis(100)), if !connected && !stopped => {}
                // A reconnect can be quicker than the state seen above: look again.
                _ = tokio::time::sleep(Duration::from_millis(250)), if !stopped => {}
                _ = tick.tick() => self.keep_buffered_alive().await,
            }
        }
    }

    /// Makes the server forget the pull request abandoned by the drain before
    /// anything is released. nats-server (2.9 at least) keeps a request whose
    /// inbox is gone in its waiting list until it next looks at that list, and
    /// a NAKed message it takes for redelivery while only such a request waits
    /// is dropped from its redelivery queue ("We will redo this one" rolls the
    /// stream pointer back instead): the message waits out AckWait, and the
    /// newest delivered message is sent again. A short pull request from a live
    /// inbox makes the server walk the list (removing ours) and is answered by
    /// a 408 or by one message, which is buffered (and released on close).
    async fn clear_abandoned_request(&mut self) {
        let client = self.setup.client.clone();
        let probe = client.new_inbox();
        let Ok(mut answers) = client.subscribe(probe.clone()).await else {
            return;
        };
        let body = r#"{"batch":1,"expires":20000000}"#;
        if client
            .publish_with_reply(self.next_subject.clone(), probe, body.into())
            .await
            .is_ok()
            && let Ok(Some(answer)) = tokio::time::timeout(Duration::from_secs(2), answers.next()).await
        {
            let mut none = None;
            let _ = self.on_incoming(Some(answer), &mut none);
        }
        let _ = answers.unsubscribe().await;
    }

    /// Buffers a delivery, or returns a status for the pull request in flight.
    fn on_incoming(&mut self, incoming: Option<async_nats::Message>, request: &mut Option<Request>) -> Flow {
        let Some(msg) = incoming else {
            return Flow::InboxEnded;
        };
        let shared = &self.setup.shared;
        let index = self.setup.index;
        match msg.status {
            None | Some(async_nats::StatusCode::OK) => {
                let message = jetstream::Message {
                    message: msg,
                    context: self.setup.js.clone(),
                };
                if let Ok(info) = message.info() {
                    self.last_sequence = self.last_sequence.max(info.stream_sequence);
                }
                self.transient.reset();
                self.received_since_loss = true;
                let generation = shared.generation(index);
                let mut state = shared.lock();
                match request {
                    Some(r) if r.remaining > 0 => {
                        r.remaining -= 1;
                        if r.remaining == 0 {
                            // The server has sent all it was asked for.
                            *request = None;
                        }
                    }
                    // A late delivery from an abandoned request: held all the same.
                    _ => state.outstanding[index] += 1,
                }
                let was_empty = state.buffer.is_empty();
                state.buffer.push_back((index, generation, Fetched::Js(message)));
                drop(state);
                // `next` only waits on an empty buffer.
                if was_empty {
                    shared.data.notify_waiters();
                }
                Flow::Continue
            }
            Some(status) => {
                if request.as_ref().map(|r| r.reply.as_str()) != Some(msg.subject.as_str()) {
                    // A heartbeat, or the end of an earlier, abandoned request.
                    return Flow::Continue;
                }
                let description = msg.description.clone().unwrap_or_default();
                match classify(status.as_u16(), &description) {
                    PullStatus::Ignore => Flow::Continue,
                    other => Flow::Status(other, format!("{status} {description}")),
                }
            }
        }
    }

    /// Acts on a status that ended the pull request (see [`crate::status`]).
    async fn on_status(
        &mut self,
        status: PullStatus,
        description: &str,
        paused_until: &mut Option<Instant>,
    ) -> After {
        let (topic, consumer) = (self.setup.topic.clone(), self.setup.consumer.clone());
        match status {
            PullStatus::Ignore => After::Continue,
            PullStatus::Done => {
                self.transient.reset();
                After::Continue
            }
            PullStatus::MaxBatch(n) => {
                tracing::warn!(target: "polybus_nats", topic, consumer, max_batch = n, "the consumer limits pull requests; asking for fewer messages");
                self.setup.limits.batch = Some(n);
                After::Continue
            }
            PullStatus::MaxExpires(d) => {
                tracing::warn!(target: "polybus_nats", topic, consumer, max_expires = ?d, "the consumer limits pull requests; expiring them sooner");
                self.setup.limits.expires = self.setup.limits.expires.min(d);
                After::Continue
            }
            PullStatus::MaxBytes(n) => {
                tracing::warn!(target: "polybus_nats", topic, consumer, max_bytes = n, "the consumer limits pull requests; asking for fewer bytes");
                self.setup.limits.max_bytes = Some(n);
                After::Continue
            }
            PullStatus::Transient => self.transient_trouble(description, paused_until),
            PullStatus::NoResponders => match self.setup.stream.consumer_info(&consumer).await {
                Err(e)
                    if matches!(
                        e.kind(),
                        ConsumerInfoErrorKind::NotFound | ConsumerInfoErrorKind::StreamNotFound
                    ) =>
                {
                    self.consumer_gone(&format!("{description}; consumer info: {e}"), paused_until)
                        .await
                }
                // Found, or JetStream itself did not answer: unavailable for now.
                Ok(_) => self.transient_trouble(description, paused_until),
                Err(e) => self.transient_trouble(&format!("{description}; consumer info: {e}"), paused_until),
            },
            PullStatus::ConsumerDeleted => self.consumer_gone(description, paused_until).await,
            PullStatus::Terminal => {
                tracing::error!(target: "polybus_nats", topic, consumer, status = description, "pull consumer unusable; the subscription ends");
                After::Fail(Error::Backend {
                    backend: BACKEND,
                    message: format!(
                        "pull request to consumer '{consumer}' for topic '{topic}' refused by the server: {description}"
                    ),
                    retryable: false,
                    source: None,
                })
            }
        }
    }

    /// A pull request that got no reply at all: ask again if the consumer is
    /// there; otherwise it is gone (or JetStream is unavailable).
    async fn unanswered(&mut self, paused_until: &mut Option<Instant>) -> After {
        let description = "no reply to the pull request";
        match self.setup.stream.consumer_info(&self.setup.consumer).await {
            Ok(_) => After::Continue,
            Err(e)
                if matches!(
                    e.kind(),
                    ConsumerInfoErrorKind::NotFound | ConsumerInfoErrorKind::StreamNotFound
                ) =>
            {
                self.consumer_gone(&format!("{description}; consumer info: {e}"), paused_until)
                    .await
            }
            Err(e) => self.transient_trouble(&format!("{description}; consumer info: {e}"), paused_until),
        }
    }

    fn transient_trouble(&mut self, description: &str, paused_until: &mut Option<Instant>) -> After {
        let now = Instant::now();
        let (topic, consumer) = (&self.setup.topic, &self.setup.consumer);
        match self.transient.failed(now) {
            Some(pause) => {
                tracing::warn!(target: "polybus_nats", topic, consumer, status = description, ?pause, "pull request ended by the server; retrying");
                *paused_until = Some(now + pause);
                After::Continue
            }
            None => {
                let lasted = self.transient.lasted(now);
                tracing::error!(target: "polybus_nats", topic, consumer, status = description, ?lasted, "pull requests keep failing; the subscription ends");
                After::Fail(Error::Backend {
                    backend: BACKEND,
                    message: format!(
                        "pull requests to consumer '{consumer}' for topic '{topic}' failed for {lasted:?} \
                         (pull_retry_limit): last status {description}"
                    ),
                    retryable: true,
                    source: None,
                })
            }
        }
    }

    /// The consumer is gone: a group's ends the subscription; an ephemeral one
    /// is created again where the old one stopped.
    async fn consumer_gone(&mut self, description: &str, paused_until: &mut Option<Instant>) -> After {
        let shared = &self.setup.shared;
        let index = self.setup.index;
        shared.generations[index].fetch_add(1, Ordering::AcqRel);
        let (topic, consumer) = (self.setup.topic.clone(), self.setup.consumer.clone());
        let Some(config) = self.setup.ephemeral_config.clone() else {
            let group = self.setup.group.clone().unwrap_or_default();
            tracing::error!(target: "polybus_nats", topic, group, status = description, "the group's consumer was deleted; the subscription ends");
            return After::Fail(Error::NotFound {
                what: format!(
                    "NATS group '{group}' on topic '{topic}' (durable consumer '{consumer}' on stream '{}' was deleted: {description})",
                    self.setup.stream.cached_info().config.name
                ),
            });
        };
        let mut config = config;
        config.deliver_policy = DeliverPolicy::ByStartSequence {
            start_sequence: self.last_sequence + 1,
        };
        match self.setup.stream.create_consumer(config).await {
            Ok(created) => {
                let name = created.cached_info().name.clone();
                tracing::warn!(target: "polybus_nats", topic, old = consumer, new = name, from = self.last_sequence + 1, "the subscription's ephemeral consumer was removed by the server; created it again");
                self.next_subject = format!(
                    "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
                    self.setup.stream.cached_info().config.name,
                    name
                );
                self.setup.consumer = name.clone();
                let mut ephemeral = shared.ephemeral.lock().unwrap_or_else(|p| p.into_inner());
                ephemeral.retain(|(pump, _, _)| *pump != index);
                ephemeral.push((index, self.setup.stream.clone(), name));
                self.transient.reset();
                After::Continue
            }
            Err(e) => self.transient_trouble(
                &format!("{description}; recreating the ephemeral consumer: {e}"),
                paused_until,
            ),
        }
    }

    /// After a connection loss: finds the messages the consumer delivered that
    /// async-nats cannot parse (see [`crate::poison`]) and buffers each as an
    /// undecodable delivery. A loss right after the server delivered messages
    /// we never received, with no poison found and nothing received since the
    /// last one, counts; after [`LOSSES_WITHOUT_PROGRESS`] in a row the
    /// subscription ends with a non-retryable error instead of looping.
    async fn after_reconnect(&mut self, had_request: bool) -> After {
        let (topic, consumer) = (self.setup.topic.clone(), self.setup.consumer.clone());
        let info = match self.setup.stream.consumer_info(&consumer).await {
            Ok(info) => info.clone(),
            Err(e) => {
                tracing::warn!(target: "polybus_nats", topic, consumer, error = %e, "consumer info after a reconnect failed; not looking for poison messages this time");
                return After::Continue;
            }
        };
        let shared = Arc::clone(&self.setup.shared);
        let index = self.setup.index;
        let stream = self.setup.stream.cached_info().config.name.clone();
        let floor = info.ack_floor.stream_sequence;
        let delivered = info.delivered.stream_sequence;
        // Poison found before and released since (not acked): offer it again.
        let mut candidates: Vec<u64> = shared
            .poisoned()
            .iter()
            .filter(|((pump, seq), in_flight)| *pump == index && !**in_flight && *seq > floor)
            .map(|((_, seq), _)| *seq)
            .collect();
        candidates.sort_unstable();
        let from = self.scanned_through.max(floor) + 1;
        let to = delivered.min(from.saturating_add(SCAN_LIMIT - 1));
        if from <= to {
            candidates.extend(from..=to);
        }
        let mut found = 0usize;
        for seq in candidates {
            match poison::fetch_if_poisoned(
                &self.setup.client,
                &stream,
                &consumer,
                seq,
                Duration::from_secs(5),
            )
            .await
            {
                Ok(Some(p)) => {
                    {
                        let mut known = shared.poisoned();
                        if known.get(&(index, seq)) == Some(&true) {
                            continue;
                        }
                        known.insert((index, seq), true);
                    }
                    found += 1;
                    let generation = shared.generation(index);
                    let mut state = shared.lock();
                    state.outstanding[index] += 1;
                    state
                        .buffer
                        .push_back((index, generation, Fetched::Poisoned(Box::new(p))));
                    drop(state);
                    shared.data.notify_waiters();
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(target: "polybus_nats", topic, consumer, sequence = seq, error = %e, "fetching a message by sequence failed; looking again after the next reconnect");
                    self.scanned_through = self.scanned_through.max(seq.saturating_sub(1).min(to));
                    break;
                }
            }
            self.scanned_through = self.scanned_through.max(seq);
        }
        let progress = found > 0 || self.received_since_loss;
        let unseen = info.delivered.consumer_sequence > self.delivered_at_loss;
        self.received_since_loss = false;
        self.delivered_at_loss = info.delivered.consumer_sequence;
        if progress {
            self.losses = 0;
            if found > 0 {
                tracing::warn!(target: "polybus_nats", topic, consumer, found, "messages the NATS client cannot parse cost the connection; fetched them by sequence to dead-letter them");
            }
            return After::Continue;
        }
        if !(had_request && unseen) {
            return After::Continue;
        }
        self.losses += 1;
        tracing::warn!(
            target: "polybus_nats",
            topic, consumer, losses = self.losses, ack_floor = floor, delivered,
            "the NATS connection was lost right after the server delivered messages that never arrived, and no message the client cannot parse was found"
        );
        if self.losses < LOSSES_WITHOUT_PROGRESS {
            return After::Continue;
        }
        tracing::error!(target: "polybus_nats", topic, consumer, losses = self.losses, "the subscription ends: the connection keeps dropping at the same point");
        After::Fail(Error::Backend {
            backend: BACKEND,
            message: format!(
                "the NATS connection of consumer '{consumer}' on topic '{topic}' was lost {} times in a row right \
                 after the server delivered messages (stream sequences {}..={delivered}) that never arrived, \
                 with nothing received in between: a message the client cannot read (and polybus could not \
                 identify) stops this group",
                self.losses,
                floor + 1
            ),
            retryable: false,
            source: None,
        })
    }

    /// In-progress acks for fetched messages the runner has not taken yet.
    async fn keep_buffered_alive(&self) {
        let replies: Vec<_> = {
            let state = self.setup.shared.lock();
            state
                .buffer
                .iter()
                .filter(|(pump, _, _)| *pump == self.setup.index)
                .filter_map(|(_, _, m)| match m {
                    Fetched::Js(m) => m.message.reply.as_ref().map(ToString::to_string),
                    Fetched::Poisoned(p) => Some(p.ack_subject.clone()),
                })
                .collect()
        };
        for reply in replies {
            let _ = self
                .setup
                .client
                .publish(reply, Bytes::from_static(b"+WPI"))
                .await;
        }
    }
}
