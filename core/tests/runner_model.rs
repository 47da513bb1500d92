//! Model-based property test of the runner's dispatcher (issue 11).
//!
//! A scripted subscription yields random deliveries (random keys); the handler
//! does, per message and attempt, what the script says (succeed, fail retryably
//! or permanently, panic, run slowly, never finish); some acks fail; the runner
//! is shut down at a random moment with a random deadline. Time is virtual
//! (tokio's paused clock), so backoffs and deadlines cost nothing. Every run is
//! checked against the rules of the contract:
//!
//! * at most `concurrency` handlers run at once;
//! * the runner never holds more than `concurrency + buffer + backoff_capacity`
//!   deliveries;
//! * same-key messages start in delivery order, one at a time;
//! * a message is attempted at most `max_attempts` times and never after its ack;
//! * every delivery ends exactly one way: acked after success, dead-lettered then
//!   acked, released, or its ack failed (left to the broker);
//! * shutdown returns within its deadline plus a small bound.
//!
//! Cases: `PROPTEST_CASES` (default 2,000: about 10 s here).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use polybus_core::{
    AckHandle, Acker, Capabilities, Consumer, Delivery, Error, Event, HandlerError, HandlerResult, Message,
    Order, Origin, Producer, Result, RetryPolicy, Runner, StartFrom, SubscribeOptions, Subscription,
    async_trait,
};
use proptest::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Act {
    Ok,
    Retry,
    Permanent,
    Panic,
    Slow(u64),
    Never,
}

#[derive(Debug, Clone)]
struct Msg {
    key: Option<u8>,
    acts: Vec<Act>,
    ack_fails: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Ev {
    Start(usize, u32),
    Finish(usize, u32, bool),
    Ack(usize),
    AckFailed(usize),
    Release(usize),
    DeadLetter(usize),
}

#[derive(Default)]
struct World {
    log: Mutex<Vec<Ev>>,
    running: AtomicUsize,
    max_running: AtomicUsize,
    outstanding: AtomicUsize,
    max_outstanding: AtomicUsize,
    pulled: Mutex<Vec<usize>>,
}

impl World {
    fn push(&self, ev: Ev) {
        self.log.lock().unwrap().push(ev);
    }
}

fn bump_max(gauge: &AtomicUsize, max: &AtomicUsize) {
    let now = gauge.fetch_add(1, Ordering::SeqCst) + 1;
    max.fetch_max(now, Ordering::SeqCst);
}

struct FakeAck {
    id: usize,
    fails: bool,
    world: Arc<World>,
}

impl Drop for FakeAck {
    fn drop(&mut self) {
        self.world.outstanding.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl AckHandle for FakeAck {
    async fn ack(&self) -> Result<()> {
        if self.fails {
            self.world.push(Ev::AckFailed(self.id));
            return Err(Error::NotSettled {
                operation: "ack",
                reason: "scripted".into(),
            });
        }
        self.world.push(Ev::Ack(self.id));
        Ok(())
    }

    async fn release(&self, _delay: Option<Duration>) -> Result<()> {
        self.world.push(Ev::Release(self.id));
        Ok(())
    }
}

struct FakeSub {
    queue: VecDeque<(Delivery, Acker)>,
}

#[async_trait]
impl Subscription for FakeSub {
    async fn next(&mut self) -> Option<Result<Event>> {
        match self.queue.pop_front() {
            Some((d, a)) => Some(Ok(Event::Delivery(d, a))),
            None => std::future::pending().await,
        }
    }

    async fn close(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

struct FakeProducer {
    world: Arc<World>,
}

#[async_trait]
impl Producer for FakeProducer {
    fn max_payload(&self) -> usize {
        1 << 20
    }

    async fn publish(&self, _topic: &str, message: Message) -> Result<()> {
        let id: usize = message.headers.get("n").unwrap().parse().unwrap();
        self.world.push(Ev::DeadLetter(id));
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

struct FakeConsumer;

#[async_trait]
impl Consumer for FakeConsumer {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("model", 1 << 20)
    }

    async fn declare_topic_unchecked(&self, _topic: &str) -> Result<()> {
        Ok(())
    }

    async fn declare_group_unchecked(&self, _topic: &str, _group: &str, _start: StartFrom) -> Result<()> {
        Ok(())
    }

    async fn subscribe_unchecked(&self, _options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        Err(Error::Unsupported("scripted".into()))
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// Records the end of a handler call and decrements the running gauge, however
/// the call ends (success, error, panic, cancellation).
struct Running {
    world: Arc<World>,
    id: usize,
    attempt: u32,
    ok: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.world.push(Ev::Finish(self.id, self.attempt, self.ok));
        self.world.running.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug, Clone)]
struct Scenario {
    messages: Vec<Msg>,
    order: Order,
    concurrency: usize,
    buffer: usize,
    backoff_capacity: usize,
    max_attempts: u32,
    shutdown_after_ms: u64,
    deadline_ms: u64,
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        6 => Just(Act::Ok),
        3 => Just(Act::Retry),
        1 => Just(Act::Permanent),
        1 => Just(Act::Panic),
        2 => (1u64..400).prop_map(Act::Slow),
        1 => Just(Act::Never),
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let msg = (
        prop::option::weighted(0.8, 0u8..4),
        prop::collection::vec(act(), 0..4),
        prop::bool::weighted(0.05),
    )
        .prop_map(|(key, acts, ack_fails)| Msg { key, acts, ack_fails });
    (
        prop::collection::vec(msg, 1..40),
        prop_oneof![
            Just(Order::ByKey),
            Just(Order::Unordered),
            Just(Order::Sequential)
        ],
        1usize..5,
        0usize..4,
        0usize..6,
        1u32..4,
        0u64..3000,
        0u64..2000,
    )
        .prop_map(
            |(
                messages,
                order,
                concurrency,
                buffer,
                backoff_capacity,
                max_attempts,
                shutdown_after_ms,
                deadline_ms,
            )| {
                Scenario {
                    messages,
                    order,
                    concurrency,
                    buffer,
                    backoff_capacity,
                    max_attempts,
                    shutdown_after_ms,
                    deadline_ms,
                }
            },
        )
}

async fn run(s: &Scenario) -> (Vec<Ev>, Arc<World>, Duration) {
    let world = Arc::new(World::default());
    let mut queue = VecDeque::new();
    for (i, m) in s.messages.iter().enumerate() {
        let mut message = Message::new(format!("m{i}")).with_header("n", i.to_string());
        if let Some(k) = m.key {
            message = message.with_key(format!("k{k}"));
        }
        let origin = Origin {
            topic: "t".into(),
            ..Origin::default()
        };
        world.outstanding.fetch_add(1, Ordering::SeqCst);
        let ack = FakeAck {
            id: i,
            fails: m.ack_fails,
            world: Arc::clone(&world),
        };
        queue.push_back((Delivery::new(message, origin, 1), Acker::new(ack)));
    }
    // Yielding counts as holding: count the max as the runner pulls.
    let sub = CountingSub {
        inner: FakeSub { queue },
        world: Arc::clone(&world),
    };
    let scripts: Arc<HashMap<usize, Vec<Act>>> = Arc::new(
        s.messages
            .iter()
            .enumerate()
            .map(|(i, m)| (i, m.acts.clone()))
            .collect(),
    );
    let handler = {
        let (world, scripts) = (Arc::clone(&world), Arc::clone(&scripts));
        move |d: Delivery| {
            let (world, scripts) = (Arc::clone(&world), Arc::clone(&scripts));
            async move {
                let id: usize = d.header("n").unwrap().parse().unwrap();
                let attempt = d.attempt();
                world.push(Ev::Start(id, attempt));
                bump_max(&world.running, &world.max_running);
                let mut running = Running {
                    world: Arc::clone(&world),
                    id,
                    attempt,
                    ok: false,
                };
                let act = scripts[&id].get(attempt as usize - 1).copied().unwrap_or(Act::Ok);
                let result: HandlerResult = match act {
                    Act::Ok => Ok(()),
                    Act::Retry => Err(HandlerError::retryable("scripted")),
                    Act::Permanent => Err(HandlerError::permanent("scripted")),
                    Act::Panic => panic!("scripted panic"),
                    Act::Slow(ms) => {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        Ok(())
                    }
                    Act::Never => std::future::pending().await,
                };
                running.ok = result.is_ok();
                result
            }
        }
    };
    let runner = Runner::new(
        Arc::new(FakeConsumer),
        Arc::new(FakeProducer {
            world: Arc::clone(&world),
        }),
    )
    .order(s.order)
    .concurrency(s.concurrency)
    .buffer(s.buffer)
    .backoff_capacity(s.backoff_capacity)
    .settle_timeout(Duration::from_secs(1))
    .retry(
        RetryPolicy::attempts(s.max_attempts).backoff(Duration::from_millis(50), Duration::from_millis(400)),
    );
    let handle = runner.run_subscription(Box::new(sub), handler).unwrap();
    tokio::time::sleep(Duration::from_millis(s.shutdown_after_ms)).await;
    let asked = tokio::time::Instant::now();
    let report = handle.shutdown(Duration::from_millis(s.deadline_ms)).await;
    let took = asked.elapsed();
    assert!(report.error().is_none(), "{report:?}");
    let log = world.log.lock().unwrap().clone();
    (log, world, took)
}

struct CountingSub {
    inner: FakeSub,
    world: Arc<World>,
}

#[async_trait]
impl Subscription for CountingSub {
    async fn next(&mut self) -> Option<Result<Event>> {
        let event = self.inner.next().await;
        if let Some(Ok(Event::Delivery(d, _))) = &event {
            self.world
                .pulled
                .lock()
                .unwrap()
                .push(d.header("n").unwrap().parse().unwrap());
            // `outstanding` counts every delivery not yet dropped by the runner;
            // the ones still in the script's queue are subtracted here.
            let held = self.world.outstanding.load(Ordering::SeqCst) - self.inner.queue.len();
            self.world.max_outstanding.fetch_max(held, Ordering::SeqCst);
        }
        event
    }

    async fn close(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

fn check(s: &Scenario, log: &[Ev], world: &World, took: Duration) -> std::result::Result<(), TestCaseError> {
    let concurrency = if s.order == Order::Sequential {
        1
    } else {
        s.concurrency
    };
    let max_held = concurrency + s.buffer;
    prop_assert!(
        world.max_running.load(Ordering::SeqCst) <= concurrency,
        "concurrency bound"
    );
    prop_assert!(
        world.max_outstanding.load(Ordering::SeqCst) <= max_held + s.backoff_capacity,
        "held {} > concurrency + buffer + backoff_capacity = {}",
        world.max_outstanding.load(Ordering::SeqCst),
        max_held + s.backoff_capacity
    );
    // Shutdown: deadline + the 2 s grace for cancellation + release/close slack.
    prop_assert!(
        took <= Duration::from_millis(s.deadline_ms) + Duration::from_secs(4),
        "shutdown took {took:?}"
    );
    let n = s.messages.len();
    let mut acked = vec![false; n];
    let mut ends = vec![0usize; n];
    let mut starts = vec![0u32; n];
    let mut dead = vec![false; n];
    let mut last_ok = vec![false; n];
    let mut running_key: HashMap<u8, usize> = HashMap::new();
    let mut last_start_of_key: HashMap<u8, usize> = HashMap::new();
    for ev in log {
        match *ev {
            Ev::Start(id, attempt) => {
                prop_assert!(!acked[id], "message {id} started after its ack");
                starts[id] += 1;
                prop_assert_eq!(attempt, starts[id], "attempts count up by one");
                prop_assert!(attempt <= s.max_attempts, "attempt {} over the limit", attempt);
                if let (Order::ByKey | Order::Sequential, Some(k)) = (s.order, s.messages[id].key) {
                    if let Some(prev) = last_start_of_key.get(&k) {
                        prop_assert!(*prev <= id, "key {k}: message {id} started after {prev}");
                    }
                    last_start_of_key.insert(k, id);
                    if let Some(other) = running_key.get(&k) {
                        prop_assert!(*other == id, "key {k}: {id} started while {other} ran");
                    }
                    running_key.insert(k, id);
                }
                last_ok[id] = false;
            }
            Ev::Finish(id, _, ok) => {
                last_ok[id] = ok;
                if let Some(k) = s.messages[id].key {
                    running_key.remove(&k);
                }
            }
            Ev::DeadLetter(id) => {
                prop_assert!(!dead[id], "dead-lettered twice");
                dead[id] = true;
            }
            Ev::Ack(id) => {
                prop_assert!(
                    last_ok[id] || dead[id],
                    "message {id} acked without success or dead letter"
                );
                acked[id] = true;
                ends[id] += 1;
            }
            Ev::AckFailed(id) | Ev::Release(id) => ends[id] += 1,
        }
    }
    for (id, ended) in ends.iter().enumerate() {
        prop_assert!(*ended <= 1, "message {id} settled {ended} times");
    }
    // Everything the runner pulled was settled exactly once (acked, released, or
    // its ack failed and the broker keeps it).
    for id in world.pulled.lock().unwrap().iter() {
        prop_assert_eq!(
            ends[*id],
            1,
            "message {} was pulled but not settled exactly once",
            id
        );
    }
    prop_assert_eq!(
        world.outstanding.load(Ordering::SeqCst),
        0,
        "after shutdown the runner holds nothing (its subscription is closed too)"
    );
    Ok(())
}

fn quiet_scripted_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let scripted = info
                .payload()
                .downcast_ref::<&str>()
                .is_some_and(|m| m.starts_with("scripted"));
            if !scripted {
                default(info);
            }
        }));
    });
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000),
        failure_persistence: None,
        .. ProptestConfig::default()
    })]

    #[test]
    fn the_dispatcher_keeps_the_contract(s in scenario()) {
        quiet_scripted_panics();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let (log, world, took) = runtime.block_on(run(&s));
        check(&s, &log, &world, took)?;
    }
}
