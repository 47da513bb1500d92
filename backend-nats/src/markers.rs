//! The core producer's send markers (issue 16): proof that the client's
//! event task has handled every server error read before a send's answer.
//!
//! async-nats hands a `-ERR` to the event callback through a queue served by a
//! task of its own, so a `-ERR` read before a round trip's answer may reach
//! polybus after the caller has seen the answer (measured: a yield or three is
//! not enough on a loaded machine). A marker goes through that same queue,
//! behind the `-ERR`: the producer's connection has a subscription buffer of
//! one message and a marker subscription of its own, filled once and never
//! read; every later marker published by a send after its data finds the
//! buffer full, and async-nats reports it as a slow-consumer event carrying
//! the subscription's id, in order with the server's errors. When the marker
//! event of a send has been handled, every `-ERR` the server sent before it
//! (so every refusal of that send's publish) has been recorded. The marker is
//! also the send's round trip: one message each way.
//!
//! What keeps the count exact (the hostile review of issue 16 broke each of
//! these in the first version, which counted every slow-consumer event and
//! freed a send's slot when the send returned):
//!
//! * **A slot per marker, not per waiting send.** At most [`IN_FLIGHT`]
//!   markers (and as many data publishes) are on their way: a slot is taken
//!   before the data is published and given back only when the marker's event
//!   is handled, not when the send returns, fails early on another send's
//!   `-ERR`, or is dropped by its caller. async-nats's event queue holds 128
//!   events and drops what does not fit; a dropped marker event used to shift
//!   every later count, so each lone send then waited out its timeout. A
//!   send that waits a whole timeout for a slot retires the subscription:
//!   markers whose events never come, of sends all dropped by their callers,
//!   held every slot for good (second review).
//! * **A subscription per generation.** A lost connection (or a marker not
//!   confirmed in time) retires the marker subscription: events about its id
//!   are ignored from then on, and the next send subscribes anew (a fresh
//!   subject, filled once). Markers published before a loss but written after
//!   the reconnect used to count for sends of the next generation, releasing
//!   them before their own `-ERR` arrived: `Ok` for a denied subject.
//! * **Slots outlive a retired subscription.** A retired subscription keeps
//!   its markers' slots (and stays subscribed) until each of its markers'
//!   events has come or [`Markers::start`]'s grace has passed: its markers
//!   and its sends' `-ERR`s may still be on their way, and giving the slots
//!   back at once let new sends add theirs to the same event queue. async-nats
//!   *drops* an event (a `-ERR` included) when its queue of 128 is full, and a
//!   dropped `-ERR` is a denied send confirmed `Ok` (seen in CI on a loaded
//!   machine: 4 of about 16,000 denied sends across six server restarts).
//! * **The data and its marker on one connection.** A send whose data was
//!   published before a retirement (a lost connection) and whose marker would
//!   be counted after it fails as lost instead: the data may have gone out on
//!   the dead connection and the marker on the new one, and the marker's event
//!   would then confirm a publish the server never saw, so never refused (seen
//!   in CI: 4 denied sends `Ok` across six restarts, after the first review).
//!   Every loss counts as a retirement, also one handled while no
//!   subscription is installed (after another loss, before the next send
//!   installs one: the second review found such a send confirmed `Ok`), and
//!   the client's own count of connections is compared too, after the
//!   marker's event, for a loss whose `Disconnected` event async-nats dropped.
//!   A loss while a subscription is installed fails the install: its first
//!   marker may be lost with the connection, leaving the buffer empty and
//!   the count one short.
//! * **No publish while the client is not connected.** async-nats queues
//!   commands while it reconnects and writes them all on reconnect; sends made
//!   during an outage fail at once (retryable) instead, so a reconnect does
//!   not unload a backlog of markers and `-ERR`s into the event queue.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use polybus_core::{Error, Result};
use tokio::sync::{Notify, Semaphore, broadcast};

use crate::BACKEND;
use crate::security::{Denied, Violation};

/// Markers (and data publishes) on their way at most. Across a reconnect two
/// generations' worth may be queued (markers and `-ERR`s of each): 4 × 24 is
/// well under async-nats's event queue of 128.
pub(crate) const IN_FLIGHT: usize = 24;

/// The markers of one core producer connection.
pub(crate) struct Markers {
    state: Mutex<MarkerState>,
    handled: Notify,
    /// Serializes installing a marker subscription and publishing a marker
    /// with counting it; holds the current subscription (never read).
    order: tokio::sync::Mutex<Option<Installed>>,
    /// One permit per marker on its way (see the module docs).
    slots: Semaphore,
}

struct Installed {
    subject: String,
    _subscriber: async_nats::Subscriber,
}

/// A retired marker subscription whose markers may still come.
struct Retired {
    sid: u64,
    /// Its markers published and not yet seen: each holds a slot.
    outstanding: u64,
    /// When the slots still held come back regardless.
    until: tokio::time::Instant,
    /// Kept subscribed (so its markers still raise events) until then.
    _subscriber: Option<async_nats::Subscriber>,
}

#[derive(Default)]
struct MarkerState {
    /// The id of the subscription whose events count; `None` once retired.
    sid: Option<u64>,
    /// Retired subscriptions whose markers still hold slots.
    retired: Vec<Retired>,
    /// How long a retired subscription's markers hold their slots at most.
    grace: Duration,
    /// Markers published and handled on it.
    published: u64,
    handled: u64,
    /// Bumped when a subscription is retired or installed.
    generation: u64,
    /// Bumped when a subscription is retired (the connection was lost, or a
    /// marker did not come).
    retirements: u64,
}

impl Default for Markers {
    fn default() -> Self {
        Markers {
            state: Mutex::new(MarkerState::default()),
            handled: Notify::new(),
            order: tokio::sync::Mutex::new(None),
            slots: Semaphore::new(IN_FLIGHT),
        }
    }
}

/// The subscription id in async-nats's `Debug` of a `Subscriber`
/// (`Subscriber { sid: 3, … }`): async-nats does not expose it otherwise, and
/// its slow-consumer events name nothing else.
fn parse_sid(shown: &str) -> Option<u64> {
    let rest = shown.strip_prefix("Subscriber { sid: ")?;
    let digits = rest.split(|c: char| !c.is_ascii_digit()).next()?;
    digits.parse().ok()
}

impl Markers {
    fn state(&self) -> MutexGuard<'_, MarkerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Handles a slow-consumer event of subscription `sid` (every one on this
    /// connection is a marker's; only the current subscription's count).
    pub(crate) fn event(&self, sid: u64) {
        let mut state = self.state();
        if state.sid == Some(sid) && state.handled < state.published {
            state.handled += 1;
            drop(state);
            self.slots.add_permits(1);
            self.handled.notify_waiters();
            return;
        }
        // A retired subscription's marker: its slot comes back.
        if let Some(i) = state
            .retired
            .iter()
            .position(|r| r.sid == sid && r.outstanding > 0)
        {
            state.retired[i].outstanding -= 1;
            if state.retired[i].outstanding == 0 {
                state.retired.swap_remove(i);
            }
            drop(state);
            self.slots.add_permits(1);
        }
    }

    /// Gives back the slots of retired subscriptions whose grace has passed;
    /// returns when the next one ends, if any is left.
    fn expire_retired(&self) -> Option<tokio::time::Instant> {
        let now = tokio::time::Instant::now();
        let mut state = self.state();
        let mut freed = 0u64;
        state.retired.retain(|r| {
            let keep = r.until > now;
            if !keep {
                freed += r.outstanding;
            }
            keep
        });
        let next = state.retired.iter().map(|r| r.until).min();
        drop(state);
        if freed > 0 {
            self.slots
                .add_permits(usize::try_from(freed).unwrap_or(IN_FLIGHT));
        }
        next
    }

    /// Retires the current subscription (the connection was lost): its
    /// markers' slots are given back and their sends fail; the next send
    /// installs a new one. With `only` set, only if that generation is still
    /// the current one.
    pub(crate) fn retire(&self, only: Option<u64>) {
        let mut state = self.state();
        if only.is_some_and(|g| g != state.generation) {
            return;
        }
        if state.sid.is_none() {
            // Nothing installed (a loss right after another, or before any
            // send since): a send whose data went out before this loss and
            // that installs the next subscription must still see it.
            if only.is_none() {
                state.retirements += 1;
            }
            return;
        }
        let outstanding = state.published - state.handled;
        if let Some(sid) = state.sid.take()
            && outstanding > 0
        {
            let until = tokio::time::Instant::now() + state.grace;
            state.retired.push(Retired {
                sid,
                outstanding,
                until,
                _subscriber: None,
            });
        }
        state.published = 0;
        state.handled = 0;
        state.generation += 1;
        state.retirements += 1;
        drop(state);
        self.handled.notify_waiters();
    }

    /// Subscribes to a fresh marker subject and fills its one-message buffer;
    /// the caller holds the `order` lock. Returns the subject.
    async fn install(&self, client: &async_nats::Client, slot: &mut Option<Installed>) -> Result<String> {
        // A loss while installing may take the first marker with it: the
        // buffer would then stay empty on the next connection, and each marker
        // would fill it instead of raising an event (a count one short for
        // good: every send released by the next one's marker, the last one
        // waiting out its timeout).
        let connects = || {
            client
                .statistics()
                .connects
                .load(std::sync::atomic::Ordering::Acquire)
        };
        let (retirements, connected) = (self.state().retirements, connects());
        let subject = crate::probe_subject(client);
        let subscriber = client
            .subscribe(subject.clone())
            .await
            .map_err(|e| crate::backend_error("subscribing to the producer's marker subject", e, true))?;
        let sid = parse_sid(&format!("{subscriber:?}")).ok_or_else(|| Error::Backend {
            backend: BACKEND,
            message: "cannot identify the core producer's marker subscription (async-nats's Subscriber \
                      no longer shows its id)"
                .into(),
            retryable: false,
            source: None,
        })?;
        client
            .publish(subject.clone(), bytes::Bytes::new())
            .await
            .map_err(|e| crate::backend_error("publishing the producer's first marker", e, true))?;
        // Checked under the lock that installs it: a loss handled after
        // this retires the new subscription.
        let mut state = self.state();
        if state.retirements != retirements || connects() != connected {
            return Err(Error::Connection {
                backend: BACKEND,
                message: "the NATS connection was lost while the producer subscribed to its markers \
                          (core NATS: the message may or may not have been delivered)"
                    .into(),
                source: None,
            });
        }
        let old = slot.replace(Installed {
            subject: subject.clone(),
            _subscriber: subscriber,
        });
        state.sid = Some(sid);
        state.published = 0;
        state.handled = 0;
        state.generation += 1;
        // The retired subscription stays subscribed while its markers hold
        // slots; otherwise it is dropped (unsubscribed) here.
        if let Some(old) = old
            && let Some(old_sid) = parse_sid(&format!("{:?}", old._subscriber))
            && let Some(retired) = state.retired.iter_mut().find(|r| r.sid == old_sid)
        {
            retired._subscriber = Some(old._subscriber);
        }
        Ok(subject)
    }

    /// Installs the first marker subscription at connect; returns its subject.
    /// `grace` bounds how long a retired subscription's markers hold their
    /// slots (the producer's request timeout).
    pub(crate) async fn start(&self, client: &async_nats::Client, grace: Duration) -> Result<String> {
        self.state().grace = grace;
        let mut slot = self.order.lock().await;
        self.install(client, &mut slot).await
    }

    /// Publishes the data (`publish`), then a marker, and waits until the
    /// marker's event is handled (so every `-ERR` before it is recorded),
    /// failing as soon as a violation that `concerns` the caller is seen in
    /// `seen` (made before the data was published).
    pub(crate) async fn confirm(
        &self,
        client: &async_nats::Client,
        timeout: Duration,
        seen: &mut broadcast::Receiver<Arc<Violation>>,
        concerns: impl Fn(&Violation) -> bool,
        publish: impl Future<Output = Result<()>>,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let expired = || Error::timeout("confirming a send with the NATS server", timeout);
        let lost = || Error::Connection {
            backend: BACKEND,
            message: "the NATS connection was lost (or the server did not confirm in time) before the \
                      send was confirmed (core NATS: the message may or may not have been delivered)"
                .into(),
            source: None,
        };
        // More violations recorded after this send's data than the watch
        // keeps: this send's own refusal may be among those lost.
        let lagged = || Error::Backend {
            backend: BACKEND,
            message: "too many permission violations at once to tell whether the NATS server refused \
                      this send (core NATS: the message may or may not have been delivered)"
                .into(),
            retryable: true,
            source: None,
        };
        // Taken before the data goes out, so `-ERR`s are bounded too.
        let slot = loop {
            let until = self.expire_retired().map_or(deadline, |next| next.min(deadline));
            match tokio::time::timeout_at(until, self.slots.acquire()).await {
                Ok(slot) => break slot.map_err(|_| Error::Closed("producer"))?,
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    // No slot came back for a whole timeout: the current
                    // subscription's markers are not coming (their sends may
                    // all be gone, so none would retire it). Retired, they
                    // hold their slots for the grace at most.
                    let generation = self.state().generation;
                    self.retire(Some(generation));
                    return Err(expired());
                }
                Err(_) => {}
            }
        };
        // Nothing is queued while the client reconnects (see the module docs).
        if client.connection_state() != async_nats::connection::State::Connected {
            return Err(Error::Connection {
                backend: BACKEND,
                message:
                    "the NATS connection is down (core NATS: nothing was sent; send again once it is back)"
                        .into(),
                source: None,
            });
        }
        // A retirement from here until the marker is counted means the data
        // may have gone out on the lost connection: its marker, on the next
        // one, would confirm a publish the server never saw (and so never
        // refused).
        let retirements = self.state().retirements;
        // Violations from here on only: what came while this send waited for
        // a slot is other sends' (and would only make it lag, below).
        *seen = seen.resubscribe();
        // The same for a reconnect whose `Disconnected` event never reached
        // polybus (async-nats drops events when its queue is full): a marker
        // written on a later connection than its data is caught by the
        // client's own count of connections, read after the marker's event.
        let connects = || {
            client
                .statistics()
                .connects
                .load(std::sync::atomic::Ordering::Acquire)
        };
        let connected = connects();
        // Every step is bounded by the send's deadline: while the
        // connection is down async-nats queues commands, and a full queue
        // would hold a publish until the server is back.
        tokio::time::timeout_at(deadline, publish)
            .await
            .map_err(|_| expired())??;
        let (target, generation, subject) = {
            let mut order = tokio::time::timeout_at(deadline, self.order.lock())
                .await
                .map_err(|_| expired())?;
            let current = self.state().sid.is_some();
            let subject = match &*order {
                Some(installed) if current => installed.subject.clone(),
                _ => tokio::time::timeout_at(deadline, self.install(client, &mut order))
                    .await
                    .map_err(|_| expired())??,
            };
            // Counted before it goes out: its event may be handled before
            // this task runs again (measured on a loaded machine). The slot
            // is given back when the event is handled (or the subscription
            // retired), whatever happens to this call.
            let (target, generation) = {
                let mut state = self.state();
                if state.retirements != retirements {
                    return Err(lost());
                }
                state.published += 1;
                (state.published, state.generation)
            };
            slot.forget();
            // A marker counted but never published (an error, or this call
            // dropped while the client's queue is full) would stall the count:
            // the subscription is retired instead.
            let unsent = RetireOnDrop {
                markers: self,
                generation: Some(generation),
            };
            tokio::time::timeout_at(deadline, client.publish(subject.clone(), bytes::Bytes::new()))
                .await
                .map_err(|_| expired())?
                .map_err(|e| crate::backend_error("publishing a NATS marker", e, true))?;
            unsent.disarm();
            (target, generation, subject)
        };
        let marker_refused = |v: &Violation| v.denied == Denied::Publish && v.subject == subject;
        loop {
            let handled = self.handled.notified();
            tokio::pin!(handled);
            handled.as_mut().enable();
            {
                let state = self.state();
                if state.generation != generation {
                    return Err(lost());
                }
                if state.handled >= target {
                    break;
                }
            }
            tokio::select! {
                biased;
                got = seen.recv() => match got {
                    Ok(v) if concerns(&v) => return Err(v.error()),
                    Ok(v) if marker_refused(&v) => {
                        // A refused marker raises no event: the count would
                        // stay one short (each later send timing out).
                        self.retire(Some(generation));
                        return Err(marker_error(&v));
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => return Err(lagged()),
                    Err(broadcast::error::RecvError::Closed) => return Err(Error::Closed("producer")),
                },
                () = &mut handled => {}
                () = tokio::time::sleep_until(deadline) => {
                    // A marker that never came: start afresh rather than let
                    // every later send wait for one more.
                    self.retire(Some(generation));
                    return Err(expired());
                }
            }
        }
        // The marker's event was raised after any reconnect that carried the
        // marker to another connection than its data.
        if connects() != connected {
            self.retire(Some(generation));
            return Err(lost());
        }
        // Everything the event task was given before the marker is recorded.
        loop {
            match seen.try_recv() {
                Ok(v) if concerns(&v) => return Err(v.error()),
                Ok(_) => {}
                Err(broadcast::error::TryRecvError::Lagged(_)) => return Err(lagged()),
                Err(_) => return Ok(()),
            }
        }
    }
}

/// Retires a generation when dropped armed (see [`Markers::confirm`]).
struct RetireOnDrop<'a> {
    markers: &'a Markers,
    generation: Option<u64>,
}

impl RetireOnDrop<'_> {
    fn disarm(mut self) {
        self.generation = None;
    }
}

impl Drop for RetireOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(generation) = self.generation {
            self.markers.retire(Some(generation));
        }
    }
}

/// The error for a refused marker: the user may not use `_POLYBUS.PING.>`.
pub(crate) fn marker_error(v: &Violation) -> Error {
    match v.error() {
        Error::PermissionDenied {
            backend,
            message,
            source,
        } => Error::PermissionDenied {
            backend,
            message: format!(
                "{message} (a core NATS producer confirms each send with a marker message \
                 on `_POLYBUS.PING.>`: allow the user to publish and subscribe there)"
            ),
            source,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sids_are_read_from_the_debug_form() {
        assert_eq!(
            parse_sid("Subscriber { sid: 17, receiver: Receiver { chan: … } }"),
            Some(17)
        );
        assert_eq!(parse_sid("Subscriber { sid: 3 }"), Some(3));
        assert_eq!(parse_sid("Subscriber { id: 3 }"), None);
        assert_eq!(parse_sid("Subscriber { sid: x }"), None);
    }

    #[test]
    fn only_the_current_subscription_counts_and_retired_markers_keep_their_slots() {
        let markers = Markers::default();
        {
            let mut state = markers.state();
            state.sid = Some(5);
            state.published = 3;
        }
        // Three markers on their way: three slots taken.
        markers.slots.try_acquire_many(3).unwrap().forget();
        markers.event(4); // a retired subscription's: ignored
        assert_eq!(markers.state().handled, 0);
        markers.event(5);
        assert_eq!(markers.state().handled, 1);
        assert_eq!(markers.slots.available_permits(), IN_FLIGHT - 2);
        markers.retire(Some(0));
        let state = markers.state();
        assert_eq!(
            (state.sid, state.published, state.handled, state.generation),
            (None, 0, 0, 1)
        );
        drop(state);
        // The retired subscription's two markers still hold their slots…
        assert_eq!(markers.slots.available_permits(), IN_FLIGHT - 2);
        // …until their events come (one here)…
        markers.event(5);
        assert_eq!(markers.state().handled, 0);
        assert_eq!(markers.slots.available_permits(), IN_FLIGHT - 1);
        // …and no further than that.
        markers.event(5);
        markers.event(5);
        assert_eq!(markers.slots.available_permits(), IN_FLIGHT);
        // Retiring an older generation again does nothing.
        markers.retire(Some(0));
        assert_eq!(markers.slots.available_permits(), IN_FLIGHT);
    }
}

#[cfg(test)]
mod grace_tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_retired_subscriptions_slots_come_back_after_the_grace() {
        let markers = Markers::default();
        {
            let mut state = markers.state();
            state.grace = Duration::from_secs(5);
            state.sid = Some(7);
            state.published = 4;
        }
        markers.slots.try_acquire_many(4).unwrap().forget();
        markers.retire(None);
        assert_eq!(markers.slots.available_permits(), IN_FLIGHT - 4);
        let next = markers.expire_retired().expect("one retired subscription");
        assert_eq!(markers.slots.available_permits(), IN_FLIGHT - 4);
        tokio::time::sleep_until(next).await;
        assert_eq!(markers.expire_retired(), None);
        assert_eq!(markers.slots.available_permits(), IN_FLIGHT);
        // A late event of that subscription gives nothing back twice.
        markers.event(7);
        assert_eq!(markers.slots.available_permits(), IN_FLIGHT);
    }
}

#[cfg(test)]
mod loss_tests {
    use super::*;

    /// Markers started on a client of the shared test server whose
    /// slow-consumer events go to them (as the producer's event callback
    /// does), with the first marker in the buffer; `None` (skipped loudly)
    /// without `POLYBUS_TEST_NATS_URL`.
    async fn started(timeout: Duration) -> Option<(Arc<Markers>, async_nats::Client)> {
        let markers = Arc::new(Markers::default());
        let Ok(url) = std::env::var("POLYBUS_TEST_NATS_URL") else {
            assert!(
                std::env::var_os("POLYBUS_TEST_REQUIRE_BROKERS").is_none(),
                "POLYBUS_TEST_REQUIRE_BROKERS is set but POLYBUS_TEST_NATS_URL is not"
            );
            eprintln!("skipping: POLYBUS_TEST_NATS_URL is not set");
            return None;
        };
        let events = Arc::clone(&markers);
        let client = async_nats::ConnectOptions::new()
            .subscription_capacity(1)
            .event_callback(move |event| {
                let events = Arc::clone(&events);
                async move {
                    if let async_nats::Event::SlowConsumer(sid) = event {
                        events.event(sid);
                    }
                }
            })
            .connect(url)
            .await
            .expect("connecting to POLYBUS_TEST_NATS_URL");
        markers.start(&client, timeout).await.unwrap();
        // The first marker is in the buffer once the flush is answered.
        client.flush().await.unwrap();
        Some((markers, client))
    }

    /// Two losses in a row with no send between them: the first retires the
    /// subscription, and nothing is installed until the next send. A send
    /// whose data goes out on the connection lost second (its loss handled
    /// before the send installs a subscription and counts its marker) must
    /// fail as lost: its marker, on the third connection, would confirm a
    /// publish the server never saw.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_loss_while_no_subscription_is_installed_fails_the_send() {
        let timeout = Duration::from_secs(5);
        let Some((markers, client)) = started(timeout).await else {
            return;
        };
        let (violations, _) = broadcast::channel(16);
        let mut seen = violations.subscribe();
        markers
            .confirm(&client, timeout, &mut seen, |_| false, async { Ok(()) })
            .await
            .expect("a send is confirmed by its marker");
        // The first loss (its Disconnected event handled).
        markers.retire(None);
        // The data goes out, the connection is lost and that loss is handled
        // before the marker is counted.
        let data = async {
            markers.retire(None);
            Ok(())
        };
        let sent = markers
            .confirm(&client, timeout, &mut seen, |_| false, data)
            .await;
        assert!(
            matches!(sent, Err(Error::Connection { .. })),
            "a send whose data went out on a lost connection: {sent:?}"
        );
    }

    /// async-nats drops an event (a `Disconnected` included) when its queue
    /// of 128 is full. A reconnect between a send's data and its marker
    /// whose `Disconnected` event never reached polybus must still fail the
    /// send: its marker, on the new connection, would confirm a publish the
    /// server may never have seen.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reconnect_without_its_event_fails_the_send() {
        let timeout = Duration::from_secs(5);
        let Some((markers, client)) = started(timeout).await else {
            return;
        };
        let (violations, _) = broadcast::channel(16);
        let mut seen = violations.subscribe();
        // The data goes out, then the client reconnects; the Disconnected
        // event is lost (the test's callback drops it, as a full queue would).
        let data = async {
            let before = client
                .statistics()
                .connects
                .load(std::sync::atomic::Ordering::Relaxed);
            client.force_reconnect().await.unwrap();
            let until = tokio::time::Instant::now() + timeout;
            while client
                .statistics()
                .connects
                .load(std::sync::atomic::Ordering::Relaxed)
                == before
                || client.connection_state() != async_nats::connection::State::Connected
            {
                assert!(tokio::time::Instant::now() < until, "no reconnect");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(())
        };
        let sent = markers
            .confirm(&client, timeout, &mut seen, |_| false, data)
            .await;
        // (Its marker is sometimes not reported at all after a forced
        // reconnect: the send then times out, which is an error too.)
        assert!(
            matches!(sent, Err(Error::Connection { .. } | Error::Timeout { .. })),
            "a send whose data went out before a reconnect: {sent:?}"
        );
    }

    /// The violations a send watches are a broadcast of 1,024: a send not
    /// polled while more than that many are recorded after its own loses its
    /// own (`Lagged`), and must not take that for "not refused".
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_send_that_lagged_past_its_own_refusal_is_not_ok() {
        let timeout = Duration::from_secs(5);
        let Some((markers, client)) = started(timeout).await else {
            return;
        };
        let (violations, _) = broadcast::channel(1024);
        let mut seen = violations.subscribe();
        let data = async {
            // This send's refusal, then other sends' (a burst while this
            // task was not polled).
            let refusal = |subject: &str| {
                Arc::new(Violation {
                    denied: Denied::Publish,
                    subject: subject.to_owned(),
                })
            };
            violations.send(refusal("secret.mine")).unwrap();
            for i in 0..1100 {
                violations.send(refusal(&format!("secret.other.{i}"))).unwrap();
            }
            Ok(())
        };
        let sent = markers
            .confirm(
                &client,
                timeout,
                &mut seen,
                |v| v.denied == Denied::Publish && v.subject == "secret.mine",
                data,
            )
            .await;
        assert!(sent.is_err(), "a send whose refusal was lagged past: {sent:?}");
    }

    /// Every slot held by markers of the current subscription whose events
    /// never come (their sends dropped by their callers, so none times out
    /// and retires it; the events lost, e.g. a `Disconnected` event async-nats
    /// dropped): sends that time out waiting for a slot must not leave the
    /// producer stalled for good.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slots_held_by_markers_that_never_come_are_given_back() {
        let timeout = Duration::from_millis(300);
        let Some((markers, client)) = started(timeout).await else {
            return;
        };
        // Every slot held by a counted marker whose event never comes.
        markers.state().published = IN_FLIGHT as u64;
        markers.slots.try_acquire_many(IN_FLIGHT as u32).unwrap().forget();
        let (violations, _) = broadcast::channel(16);
        let mut seen = violations.subscribe();
        let first = markers
            .confirm(&client, timeout, &mut seen, |_| false, async { Ok(()) })
            .await;
        assert!(matches!(first, Err(Error::Timeout { .. })), "{first:?}");
        let until = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let sent = markers
                .confirm(&client, timeout, &mut seen, |_| false, async { Ok(()) })
                .await;
            if sent.is_ok() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "the producer stays stalled: {sent:?}"
            );
        }
    }
}
