//! A JetStream subscription: one pull loop ("pump") per topic, a shared buffer,
//! and the settlement handle of each delivery.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use futures::StreamExt;
use polybus_core::{AckHandle, Acker, Bytes, Delivery, Error, Event, Origin, Result, Subscription};
use tokio::sync::{Notify, broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::BACKEND;
use crate::consumer_config::PullLimits;
use crate::poison::{self, Poisoned};
use crate::status::{PullStatus, Transient, classify};

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

/// Connection losses in a row, each right after the server delivered
/// messages to this consumer that never arrived, with no poison message found
/// and nothing received in between, after which the subscription ends.
const LOSSES_WITHOUT_PROGRESS: u32 = 5;

/// At most this many stream sequences are fetched by sequence after one
/// connection loss (the rest after the next).
const SCAN_LIMIT: u64 = 4096;

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
                    pump,
                    generation,
                    shared: Arc::clone(&self.shared),
                    consumer_closed: Arc::clone(&self.consumer_closed),
                    timeout: self.request_timeout,
                    returned: AtomicBool::new(false),
                    acked: AtomicBool::new(false),
                });
                return Event::Delivery(Delivery::undecodable(p.message, origin, 1, p.reason), acker);
            }
        };
        let (attempt, sequence, fallback) = match msg.info() {
            Ok(info) => (
                u32::try_from(info.delivered.max(1)).unwrap_or(u32::MAX),
                Some(info.stream_sequence),
                format!("{}:{}", info.stream, info.stream_sequence),
            ),
            Err(_) => (1, None, String::new()),
        };
        let topic = msg.message.subject.to_string();
        let message =
            crate::headers::decode(msg.message.payload.clone(), msg.message.headers.as_ref(), || {
                if fallback.is_empty() {
                    polybus_core::Message::new(Bytes::new()).id
                } else {
                    fallback
                }
            });
        let origin = Origin {
            topic,
            group: self.group.clone(),
            partition: None,
            sequence,
        };
        let acker = Acker::new(JetStreamAck {
            message: msg,
            pump,
            generation,
            shared: Arc::clone(&self.shared),
            consumer_closed: Arc::clone(&self.consumer_closed),
            timeout: self.request_timeout,
            returned: AtomicBool::new(false),
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

/// Where each stream ended when a catch-up run began (see
/// [`JetStreamSubscription::catch_up_probe`]).
struct JetStreamCatchUp {
    /// Topic, stream, consumer name, last stream sequence at the start.
    ends: Vec<(String, stream::Stream, String, u64)>,
    timeout: Duration,
    /// For the current names of ephemeral consumers, which a pump makes
    /// again (under a new name) when the server removes one.
    shared: Arc<Shared>,
    /// No group: the consumers are ephemeral.
    ephemeral: bool,
}

#[async_trait]
impl polybus_core::CatchUpProbe for JetStreamCatchUp {
    async fn caught_up(&self) -> Result<bool> {
        for (index, (topic, stream, consumer, end)) in self.ends.iter().enumerate() {
            // A recreated ephemeral consumer starts where the old one stopped:
            // its ack floor goes on from there.
            let current = self.shared.ephemeral_name(index);
            let consumer = current.as_deref().unwrap_or(consumer);
            let info = tokio::time::timeout(self.timeout, stream.consumer_info(consumer))
                .await
                .map_err(|_| {
                    Error::timeout(format!("reading the progress of topic '{topic}'"), self.timeout)
                })?;
            let info = match info {
                Ok(info) => info,
                // Removed, and its pump is making a new one: ask again.
                Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound && self.ephemeral => return Ok(false),
                Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {
                    return Err(Error::NotFound {
                        what: format!(
                            "the JetStream consumer of topic '{topic}' (deleted or recreated during the run)"
                        ),
                    });
                }
                Err(e) => {
                    return Err(crate::backend_error(
                        &format!("reading the progress of topic '{topic}'"),
                        e,
                        true,
                    ));
                }
            };
            let settled_all = info.num_pending == 0 && info.num_ack_pending == 0;
            if info.ack_floor.stream_sequence < *end && !settled_all {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Settles one JetStream delivery.
///
/// On a live connection an ack, NAK or in-progress ack is one message to the
/// server with no reply (as async-nats's `ack` does): a reply for every ack
/// would cost a round trip per message in each handler slot. It tells the
/// truth where that can be known: `NotSettled` when the consumer was closed,
/// when the delivery's JetStream consumer was deleted (or recreated), or when
/// the client refuses the publish; while the connection is down, it asks for
/// the server's reply (a "double ack") within the request timeout instead of
/// queueing blindly.
struct JetStreamAck {
    message: jetstream::Message,
    pump: usize,
    generation: u64,
    shared: Arc<Shared>,
    consumer_closed: Arc<AtomicBool>,
    timeout: Duration,
    returned: AtomicBool,
}

impl JetStreamAck {
    fn give_back(&self) {
        if !self.returned.swap(true, Ordering::AcqRel) {
            self.shared.give_back(self.pump, 1);
        }
    }

    async fn send(&self, kind: AckKind, operation: &'static str) -> Result<()> {
        let not_settled = |reason: String| Error::NotSettled { operation, reason };
        if self.consumer_closed.load(Ordering::Acquire) {
            return Err(not_settled(
                "the NATS consumer (its connection) was closed".into(),
            ));
        }
        if self.shared.generation(self.pump) != self.generation {
            return Err(not_settled(
                "the JetStream consumer that delivered it was deleted".into(),
            ));
        }
        let Some(reply) = self.message.message.reply.clone() else {
            return Err(not_settled("not a JetStream delivery (no reply subject)".into()));
        };
        let client = self.message.context.client();
        let payload: Bytes = kind.into();
        if client.connection_state() == async_nats::connection::State::Connected {
            return client
                .publish(reply, payload)
                .await
                .map_err(|e| not_settled(format!("the NATS client refused it: {e}")));
        }
        // Disconnected: a queued ack may or may not arrive in time; ask the
        // server to confirm it.
        match tokio::time::timeout(self.timeout, client.request(reply, payload)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => Err(not_settled(
                "nobody serves its ack subject (the consumer is gone)".into(),
            )),
            Ok(Err(e)) => Err(Error::Backend {
                backend: BACKEND,
                message: format!("{operation} while reconnecting: {e}"),
                retryable: true,
                source: Some(Box::new(e)),
            }),
            Err(_) => Err(Error::timeout(
                format!("{operation} while reconnecting to NATS"),
                self.timeout,
            )),
        }
    }
}

/// Settles a poison message (fetched by sequence) through the consumer's ack
/// subject built for its stream sequence. The ack asks for the server's reply,
/// so it is known to have landed.
struct PoisonAck {
    client: Client,
    ack_subject: String,
    sequence: u64,
    pump: usize,
    generation: u64,
    shared: Arc<Shared>,
    consumer_closed: Arc<AtomicBool>,
    timeout: Duration,
    returned: AtomicBool,
    acked: AtomicBool,
}

impl PoisonAck {
    fn give_back(&self) {
        if !self.returned.swap(true, Ordering::AcqRel) {
            self.shared.give_back(self.pump, 1);
            let mut known = self.shared.poisoned();
            if self.acked.load(Ordering::Acquire) {
                known.remove(&(self.pump, self.sequence));
            } else if let Some(in_flight) = known.get_mut(&(self.pump, self.sequence)) {
                // Not acked: offered again after the next reconnect.
                *in_flight = false;
            }
        }
    }

    fn check(&self, operation: &'static str) -> Result<()> {
        let not_settled = |reason: &str| Error::NotSettled {
            operation,
            reason: reason.into(),
        };
        if self.consumer_closed.load(Ordering::Acquire) {
            return Err(not_settled("the NATS consumer (its connection) was closed"));
        }
        if self.shared.generation(self.pump) != self.generation {
            return Err(not_settled(
                "the JetStream consumer that delivered it was deleted",
            ));
        }
        Ok(())
    }
}

impl Drop for PoisonAck {
    fn drop(&mut self) {
        self.give_back();
    }
}

#[async_trait]
impl AckHandle for PoisonAck {
    async fn ack(&self) -> Result<()> {
        let result = async {
            self.check("ack")?;
            match tokio::time::timeout(
                self.timeout,
                self.client.request(self.ack_subject.clone(), AckKind::Ack.into()),
            )
            .await
            {
                Ok(Ok(_)) => {
                    self.acked.store(true, Ordering::Release);
                    Ok(())
                }
                Ok(Err(e)) => Err(Error::NotSettled {
                    operation: "ack",
                    reason: format!(
                        "the ack of stream sequence {} was not confirmed: {e}",
                        self.sequence
                    ),
                }),
                Err(_) => Err(Error::timeout(
                    "acking a message fetched by sequence",
                    self.timeout,
                )),
            }
        }
        .await;
        self.give_back();
        result
    }

    async fn release(&self, delay: Option<Duration>) -> Result<()> {
        let result = async {
            self.check("release")?;
            self.client
                .publish(
                    self.ack_subject.clone(),
                    AckKind::Nak(delay.filter(|d| !d.is_zero())).into(),
                )
                .await
                .map_err(|e| Error::NotSettled {
                    operation: "release",
                    reason: format!("the NATS client refused it: {e}"),
                })
        }
        .await;
        self.give_back();
        result
    }

    async fn keep_alive(&self) -> Result<()> {
        self.check("keep-alive")?;
        self.client
            .publish(self.ack_subject.clone(), AckKind::Progress.into())
            .await
            .map_err(|e| Error::NotSettled {
                operation: "keep-alive",
                reason: format!("the NATS client refused it: {e}"),
            })
    }
}

impl Drop for JetStreamAck {
    fn drop(&mut self) {
        self.give_back();
    }
}

#[async_trait]
impl AckHandle for JetStreamAck {
    async fn ack(&self) -> Result<()> {
        let result = self.send(AckKind::Ack, "ack").await;
        self.give_back();
        result
    }

    async fn release(&self, delay: Option<Duration>) -> Result<()> {
        let result = self
            .send(AckKind::Nak(delay.filter(|d| !d.is_zero())), "release")
            .await;
        self.give_back();
        result
    }

    async fn keep_alive(&self) -> Result<()> {
        self.send(AckKind::Progress, "keep-alive").await
    }
}
