//! The poll thread: owns the subscription's consumer, polls its queue (where
//! rebalance callbacks run) every loop, takes records from the partition
//! queues round robin while the runner has room, books them and sends them to
//! the async side, and commits settled positions every commit interval.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use polybus_core::{Bytes, Delivery, Error, HeaderValue, Message as PolybusMessage, Origin, Result, wire};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message as _};
use tokio::sync::{mpsc, oneshot};

use crate::rebalance::Context;
use crate::subscription::{Command, Redelivery, Shared};
use crate::{BACKEND, map_error};

/// Owns the consumer on its thread.
pub(crate) struct Poller {
    pub(crate) consumer: Arc<BaseConsumer<Context>>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) items: mpsc::UnboundedSender<Redelivery>,
    pub(crate) commands: std_mpsc::Receiver<Command>,
    pub(crate) commit_interval: Duration,
    pub(crate) group: Option<String>,
    /// The group id the consumer uses (a private one without a group), for logs.
    pub(crate) topics_group: String,
}

/// At most this many records are booked under one lock.
const BATCH: usize = 64;

enum Flow {
    Close(oneshot::Sender<Result<()>>),
    Crash,
    Fatal,
}

impl Poller {
    pub(crate) fn run(self) {
        let mut next_queue = 0usize;
        let mut idle = false;
        let mut last_commit = Instant::now();
        // Where a batch's bookings go (kept, not allocated per batch).
        let mut booked = Vec::with_capacity(BATCH);
        tracing::debug!(group = %self.topics_group, "Kafka poll thread started");
        let flow = 'run: loop {
            // Commands first; when there was nothing to do, wait for one (new
            // data, room, close) a little.
            let first = if idle {
                match self.commands.recv_timeout(Duration::from_millis(100)) {
                    Ok(c) => Some(c),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => break Flow::Crash,
                }
            } else {
                None
            };
            for command in first
                .into_iter()
                .chain(std::iter::from_fn(|| self.commands.try_recv().ok()))
            {
                match command {
                    Command::Wake => {}
                    Command::Close(reply) => break 'run Flow::Close(reply),
                    Command::Crash => break 'run Flow::Crash,
                }
            }
            idle = true;
            // The consumer queue: rebalances (their callbacks run in here) and
            // errors. Records come through it only for a partition that could
            // not get a queue of its own.
            for _ in 0..64 {
                match self.consumer.poll(Duration::ZERO) {
                    None => break,
                    Some(Ok(message)) => {
                        idle = false;
                        if !self.on_message(&message) {
                            break 'run Flow::Crash;
                        }
                    }
                    Some(Err(e)) if self.on_error(&e) => break 'run Flow::Fatal,
                    Some(Err(_)) => {}
                }
            }
            if self.group.is_some() && last_commit.elapsed() >= self.commit_interval {
                last_commit = Instant::now();
                let tpl = self.shared.lock().book.positions(false);
                if tpl.count() > 0
                    && let Err(e) = self.consumer.commit(&tpl, CommitMode::Async)
                {
                    tracing::warn!(error = %e, "offset commit failed; it is sent again");
                }
            }
            // Partition queues, round robin, while the runner has room. librdkafka
            // stops fetching a partition whose queue is full (`queued.min.messages`,
            // `queued.max.messages.kbytes`), so nothing is paused or fetched twice.
            let mut room = self
                .shared
                .prefetch
                .saturating_sub(self.shared.lock().book.queued);
            if room == 0 {
                self.shared.starved.store(true, Ordering::Release);
                // Room made between the count and the flag would go unnoticed.
                if self.shared.lock().book.queued >= self.shared.prefetch {
                    continue;
                }
                self.shared.starved.store(false, Ordering::Release);
                room = 1;
            }
            // Records are booked a batch at a time (one lock per batch), then
            // decoded and sent in the order they were taken.
            let queues = self.shared.queues();
            let mut batch = Vec::new();
            let mut empty = 0;
            while room > 0 && empty < queues.len() {
                let (_, _, queue) = &queues[next_queue % queues.len()];
                next_queue = next_queue.wrapping_add(1);
                match queue.poll(Duration::ZERO) {
                    None => empty += 1,
                    Some(Ok(message)) => {
                        empty = 0;
                        room -= 1;
                        idle = false;
                        if batch.capacity() == 0 {
                            batch.reserve_exact(room.saturating_add(1).min(BATCH));
                        }
                        batch.push(message);
                        if batch.len() >= BATCH && !self.on_messages(&mut batch, &mut booked) {
                            break 'run Flow::Crash;
                        }
                    }
                    Some(Err(e)) => {
                        // What was taken before the error goes first.
                        if !self.on_messages(&mut batch, &mut booked) {
                            break 'run Flow::Crash;
                        }
                        if self.on_error(&e) {
                            break 'run Flow::Fatal;
                        }
                        empty += 1;
                    }
                }
            }
            if !self.on_messages(&mut batch, &mut booked) {
                break 'run Flow::Crash;
            }
        };
        // The partition queues hold the consumer too: let them go first, so that
        // dropping it closes it here (its revocation callback runs on this thread).
        self.shared.queues().clear();
        match flow {
            Flow::Close(reply) => {
                let result = self.commit_all();
                tracing::debug!(group = %self.topics_group, "Kafka subscription closing");
                drop(self.consumer); // leaves the group (the revocation commits again)
                let _ = reply.send(result);
            }
            Flow::Crash => {
                self.shared.lock().crashed = true;
                drop(self.consumer);
            }
            Flow::Fatal => {
                // A fatal error: stop taking messages, leave without committing more.
                {
                    let mut state = self.shared.lock();
                    state.crashed = true;
                    state.fatal = true;
                }
                drop(self.consumer);
            }
        }
        self.shared.lock().ended = true;
        self.shared.control_ready.notify_one();
    }

    /// Books a fetched message and sends it on; false when nobody listens any more.
    fn on_message(&self, message: &BorrowedMessage<'_>) -> bool {
        let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
        let Some((name, generation)) = self.shared.lock().book.fetched(topic, partition, offset) else {
            return true;
        };
        self.send(message, name, generation)
    }

    /// Books a batch of fetched messages under one lock, then sends them on
    /// in order, and empties the batch; false when nobody listens any more.
    fn on_messages(
        &self,
        batch: &mut Vec<BorrowedMessage<'_>>,
        booked: &mut Vec<Option<(Arc<str>, u64)>>,
    ) -> bool {
        if batch.is_empty() {
            return true;
        }
        booked.clear();
        {
            let mut state = self.shared.lock();
            booked.extend(
                batch
                    .iter()
                    .map(|m| state.book.fetched(m.topic(), m.partition(), m.offset())),
            );
        }
        let mut open = true;
        for (message, booked) in batch.drain(..).zip(booked.drain(..)) {
            if let Some((name, generation)) = booked
                && open
            {
                open = self.send(&message, name, generation);
            }
        }
        open
    }

    /// Decodes a booked message and sends it to the async side.
    fn send(&self, message: &BorrowedMessage<'_>, name: Arc<str>, generation: u64) -> bool {
        let (partition, offset) = (message.partition(), message.offset());
        let group = self.shared.group.clone();
        // No panic may escape into the poll thread: one would stop every
        // partition of the group. A record whose decoding panics is dead-lettered.
        let delivery = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            to_delivery(message, group.clone())
        }))
        .unwrap_or_else(|_| undecodable_after_panic(message, group));
        self.items
            .send(Redelivery {
                delivery,
                topic: name,
                partition,
                generation,
                offset,
            })
            .is_ok()
    }

    /// Reports a consumer error; true when it is fatal (the subscription ends).
    /// Authorization failures go to the runner (and to a `subscribe` still
    /// waiting) as non-retryable errors; librdkafka retries everything else.
    fn on_error(&self, e: &KafkaError) -> bool {
        use rdkafka::error::RDKafkaErrorCode as C;
        let code = e.rdkafka_error_code();
        let fatal = matches!(e, KafkaError::MessageConsumptionFatal(_)) || code == Some(C::Fatal);
        let refused = matches!(
            code,
            Some(
                C::TopicAuthorizationFailed
                    | C::GroupAuthorizationFailed
                    | C::ClusterAuthorizationFailed
                    | C::SaslAuthenticationFailed
                    | C::Authentication
            )
        );
        if fatal || refused {
            tracing::error!(error = %e, "Kafka consumer error; the subscription ends");
            let error = || Error::Backend {
                backend: BACKEND,
                message: format!("consuming: {e}"),
                retryable: false,
                source: None,
            };
            self.consumer.context().first_assignment_done(Err(error()));
            self.shared.push_control(Err(error()));
            return fatal;
        }
        tracing::warn!(error = %e, "Kafka consumer error (librdkafka retries)");
        false
    }

    /// Commits every partition's position synchronously (on close).
    fn commit_all(&self) -> Result<()> {
        if self.group.is_none() {
            return Ok(());
        }
        let tpl = self.shared.lock().book.positions(true);
        if tpl.count() == 0 {
            return Ok(());
        }
        self.consumer
            .commit(&tpl, CommitMode::Sync)
            .map_err(|e| map_error("committing offsets on close", e))
    }
}

/// The labelled copy of a record whose decoding panicked: its payload, its key
/// and its position; nothing else is trusted.
fn undecodable_after_panic(message: &BorrowedMessage<'_>, group: Option<String>) -> Delivery {
    let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
    tracing::error!(
        topic,
        partition,
        offset,
        "decoding a record panicked; dead-lettering it"
    );
    let mut copy = PolybusMessage::new(Bytes::copy_from_slice(message.payload().unwrap_or_default()));
    copy.key = message.key().map(Bytes::copy_from_slice);
    copy.id = format!("{topic}/{partition}/{offset}");
    copy.tombstone = message.payload().is_none();
    let origin = Origin {
        topic: topic.to_owned(),
        group,
        partition: Some(partition),
        sequence: Some(offset as u64),
    };
    Delivery::undecodable(copy, origin, 1, "decoding the record panicked")
}

/// Rebuilds the polybus message from a Kafka record, keeping its bytes: a binary
/// key stays the key, header values stay bytes (null stays null), a null payload
/// is a tombstone. A header *name* that is not UTF-8 cannot be a polybus header:
/// the record becomes an undecodable delivery (dead-lettered with every raw
/// header in `polybus-dlq-raw-headers`) instead of a panic in the poll thread.
pub(crate) fn to_delivery(message: &BorrowedMessage<'_>, group: Option<String>) -> Delivery {
    let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
    let origin = Origin {
        topic: topic.to_owned(),
        group,
        partition: Some(partition),
        sequence: Some(offset as u64),
    };
    let payload = Bytes::copy_from_slice(message.payload().unwrap_or_default());
    let fallback_id = || format!("{topic}/{partition}/{offset}");
    let raw = match crate::raw_headers::read(message) {
        Ok(raw) => raw,
        Err(cause) => {
            // librdkafka could not parse the header block (more than 100,000
            // headers, a truncated block), or a name could not be read whole:
            // the record is not "without headers".
            let mut copy = PolybusMessage::new(payload);
            copy.key = message.key().map(Bytes::copy_from_slice);
            copy.id = fallback_id();
            copy.tombstone = message.payload().is_none();
            if let Some(millis) = message
                .timestamp()
                .to_millis()
                .and_then(|ms| u64::try_from(ms).ok())
            {
                copy.timestamp = UNIX_EPOCH + Duration::from_millis(millis);
            }
            let reason = format!("{cause}; headers left out");
            tracing::warn!(topic, partition, offset, %reason, "undecodable record; dead-lettering it");
            return Delivery::undecodable(copy, origin, 1, reason);
        }
    };
    let mut headers: Vec<(String, HeaderValue)> = Vec::with_capacity(raw.len());
    let mut bad_names = 0usize;
    for header in &raw {
        match std::str::from_utf8(&header.name) {
            Ok(name) => headers.push((
                name.to_owned(),
                header
                    .value
                    .as_deref()
                    .map_or(HeaderValue::Null, HeaderValue::from),
            )),
            Err(_) => bad_names += 1,
        }
    }
    // The key and the timestamp are the record's own fields: a `polybus-key` or
    // `polybus-ts` header (polybus never writes them on Kafka) is another
    // producer's and stays a system header, so a dead-letter copy keeps it.
    // The id is the `polybus-id` header when there is exactly one and it can be
    // an id; otherwise every `polybus-id` header is kept as it came and the id
    // is the record's position.
    let (user, mut system) = PolybusMessage::split_headers(headers);
    let id = {
        let mut ids = system.get_all(wire::ID);
        match (ids.next().and_then(HeaderValue::as_str), ids.next()) {
            (Some(id), None) if !id.is_empty() => Some(id.to_owned()),
            _ => None,
        }
    };
    if id.is_some() {
        system.remove(wire::ID);
    }
    let timestamp = message
        .timestamp()
        .to_millis()
        .and_then(|ms| u64::try_from(ms).ok())
        .map_or_else(SystemTime::now, |ms| UNIX_EPOCH + Duration::from_millis(ms));
    let mut decoded = PolybusMessage {
        payload,
        key: message.key().map(Bytes::copy_from_slice),
        headers: user,
        system_headers: system,
        id: id.unwrap_or_else(fallback_id),
        timestamp,
        tombstone: message.payload().is_none(),
    };
    if bad_names > 0 {
        let label = wire::raw_headers_label(raw.iter().map(|h| (&h.name[..], h.value.as_deref())));
        decoded
            .system_headers
            .insert(polybus_core::dlq_headers::RAW_HEADERS, label);
        let reason =
            format!("{bad_names} header name(s) are not UTF-8 (raw headers in polybus-dlq-raw-headers)");
        tracing::warn!(topic, partition, offset, %reason, "undecodable record; dead-lettering it");
        return Delivery::undecodable(decoded, origin, 1, reason);
    }
    Delivery::new(decoded, origin, 1)
}
