//! The conformance suite every polybus backend must pass.
//!
//! The cases in [`cases`] are public async functions over the core traits. A
//! backend supplies a [`Harness`] (fresh connections, its capabilities, a
//! broker-side "drained" probe, …) and expands every case into its own test with
//! [`conformance_suite!`]:
//!
//! ```text
//! polybus_conformance::conformance_suite!(MyBackendHarness);
//! ```
//!
//! A case a backend cannot keep, by its declared [`Capabilities`], is skipped with
//! a visible `SKIP <case>: <reason>` line, never passed silently. A harness whose
//! broker is not configured (its `POLYBUS_TEST_…` variable is unset) skips every
//! case loudly; with `POLYBUS_TEST_REQUIRE_BROKERS=1` that skip is a failure.

use std::future::Future;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use polybus_core::{Capabilities, Connection, Result, RunHandle, Runner};

pub mod bench;
pub mod cases;
mod fault_cases;
pub mod faults;
mod foreign_cases;
mod lag_cases;
pub mod processes;
pub mod python;
mod replay_cases;
pub mod secrets;
mod support;
#[cfg(feature = "opentelemetry")]
mod trace_cases;
mod typed_cases;

pub use support::{Recorder, roundtrip_once};

/// The environment variable that turns a skip for a missing broker into a failure.
pub const REQUIRE_BROKERS_ENV: &str = "POLYBUS_TEST_REQUIRE_BROKERS";
/// The environment variable that scales every timeout and deadline of the suite.
pub const TIMEOUT_MULTIPLIER_ENV: &str = "POLYBUS_TEST_TIMEOUT_MULTIPLIER";

/// What a harness's setup found.
#[derive(Debug)]
pub enum Setup<H> {
    /// The broker is configured; run the case.
    Ready(H),
    /// The broker is not configured (say which variable to set).
    MissingBroker(String),
}

/// The result of a case that did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every assertion held.
    Passed,
    /// The backend declares it cannot keep this promise.
    Skipped(String),
}

/// What a case returns; an `Err` or a panic fails the test.
pub type CaseResult = std::result::Result<Outcome, polybus_core::BoxError>;

/// A record as another client of the broker (Java, Go, Python, C) may write it:
/// bytes everywhere, nothing checked against polybus's grammar.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForeignRecord {
    /// The payload; `None` is a null payload (a Kafka tombstone).
    pub payload: Option<Vec<u8>>,
    /// The key, any bytes.
    pub key: Option<Vec<u8>>,
    /// Headers in order: names and values as bytes, `None` for a null value;
    /// names may repeat.
    pub headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl ForeignRecord {
    /// A record with this payload and nothing else.
    pub fn new(payload: impl Into<Vec<u8>>) -> Self {
        ForeignRecord {
            payload: Some(payload.into()),
            ..ForeignRecord::default()
        }
    }

    /// Sets the key.
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header (a `None` value is null).
    pub fn header(mut self, name: impl Into<Vec<u8>>, value: Option<&[u8]>) -> Self {
        self.headers.push((name.into(), value.map(<[u8]>::to_vec)));
        self
    }
}

/// What a harness's foreign publisher did with a [`ForeignRecord`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Foreign {
    /// Written to the broker by its native client (or raw protocol bytes).
    Published,
    /// This broker cannot carry such a record (the case is skipped, saying why).
    Inexpressible(String),
}

/// What a backend supplies to run the suite.
#[polybus_core::async_trait]
pub trait Harness: Send + Sync + Sized + 'static {
    /// Prepares a harness for one case, reading the broker's address from the
    /// environment; [`Setup::MissingBroker`] when it is not set.
    async fn setup() -> Setup<Self>;

    /// What the backend under test promises (the suite's cases depend on these).
    fn capabilities(&self) -> Capabilities;

    /// A fresh producer and consumer, each on a new connection, tuned for tests
    /// (short ack deadlines and session timeouts, scaled by [`timeout_multiplier`]).
    async fn connect(&self) -> Result<Connection>;

    /// Asks the broker whether `group` has nothing pending and nothing unacked on
    /// `topic`.
    async fn drained(&self, topic: &str, group: &str) -> Result<bool>;

    /// A unique topic or group name starting with `prefix`.
    fn unique_name(&self, prefix: &str) -> String {
        let id = uuid::Uuid::new_v4().simple().to_string();
        format!("{prefix}-{}", &id[..12])
    }

    /// Ends a consumer without settling or committing anything, as a crash would.
    async fn crash(&self, handle: &RunHandle) {
        handle.abort().await;
    }

    /// Connects to an address where no broker listens, with `timeout` as the
    /// connection timeout. Only called when `capabilities().networked`.
    async fn connect_unreachable(&self, timeout: Duration) -> Result<Connection> {
        let _ = timeout;
        Err(polybus_core::Error::Unsupported(
            "this harness has no unreachable address".into(),
        ))
    }

    /// Deletes what a case created (its topics, their dead-letter topics and groups).
    async fn cleanup(&self, topics: &[String]) {
        let _ = topics;
    }

    /// Writes `record` to `topic` as a producer that is not polybus would, through
    /// the broker's native client: the hostile-input cases use it. The default
    /// has no foreign publisher (those cases are skipped, loudly).
    async fn publish_foreign(&self, topic: &str, record: &ForeignRecord) -> Result<Foreign> {
        let _ = (topic, record);
        Ok(Foreign::Inexpressible(
            "this harness has no foreign publisher".into(),
        ))
    }

    /// Adjusts every runner the suite builds (e.g. shorter keep-alive intervals).
    fn tune_runner(&self, runner: Runner) -> Runner {
        runner
    }
}

/// The factor every timeout of the suite is multiplied by, from
/// `POLYBUS_TEST_TIMEOUT_MULTIPLIER` (default 1; slow CI machines set more).
pub fn timeout_multiplier() -> f64 {
    std::env::var(TIMEOUT_MULTIPLIER_ENV)
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|m| *m > 0.0)
        .unwrap_or(1.0)
}

/// Whether `POLYBUS_TEST_REQUIRE_BROKERS=1` is set.
pub fn brokers_required() -> bool {
    std::env::var(REQUIRE_BROKERS_ENV).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// The broker address in `var` for a broker-backed test outside the suite, or
/// `None` after a loud `SKIP <test>` line when it is unset. Panics instead when
/// `POLYBUS_TEST_REQUIRE_BROKERS=1`, as the suite does.
pub fn broker_url(var: &str, test: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) => Some(url),
        Err(_) => {
            assert!(
                !brokers_required(),
                "{REQUIRE_BROKERS_ENV}=1 but {var} is not set ({test})"
            );
            loud(&format!("SKIP {test}: set {var}"));
            None
        }
    }
}

/// A port on 127.0.0.1 where nothing listens (bound, then let go), for the
/// unreachable-broker case and for brokers a test starts itself.
pub fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| polybus_core::Error::InvalidConfig(format!("no free port: {e}")))
}

/// Writes a line straight to the process's stderr, past the test harness's output
/// capture, so skips are always visible.
pub fn loud(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// The context a case runs in: the harness, unique names, scaled timeouts, and the
/// list of topics to clean up afterwards.
pub struct Ctx<H> {
    harness: Arc<H>,
    case: &'static str,
    created: Arc<Mutex<Vec<String>>>,
}

impl<H> Clone for Ctx<H> {
    fn clone(&self) -> Self {
        Ctx {
            harness: Arc::clone(&self.harness),
            case: self.case,
            created: Arc::clone(&self.created),
        }
    }
}

impl<H: Harness> Ctx<H> {
    /// The harness.
    pub fn harness(&self) -> &H {
        &self.harness
    }

    /// The case's name.
    pub fn case(&self) -> &'static str {
        self.case
    }

    /// The backend's capabilities.
    pub fn caps(&self) -> Capabilities {
        self.harness.capabilities()
    }

    /// `secs` seconds, scaled by the timeout multiplier.
    pub fn secs(&self, secs: f64) -> Duration {
        Duration::from_secs_f64(secs * timeout_multiplier())
    }

    /// A fresh connection.
    pub async fn connect(&self) -> Result<Connection> {
        self.harness.connect().await
    }

    /// A unique group name.
    pub fn group_name(&self, prefix: &str) -> String {
        self.harness.unique_name(prefix)
    }

    /// Remembers a topic created outside [`Ctx::topic`] for cleanup.
    pub fn track(&self, topic: &str) {
        self.created
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(topic.to_owned());
    }

    /// Declares a unique topic (and its dead-letter topic), remembered for cleanup.
    pub async fn topic(&self, conn: &Connection, prefix: &str) -> Result<String> {
        let topic = self.harness.unique_name(prefix);
        self.track(&topic);
        conn.consumer.declare_topic(&topic).await?;
        Ok(topic)
    }

    /// Declares a unique topic and a unique group on it (starting at the latest
    /// message), both remembered for cleanup.
    pub async fn topic_and_group(&self, conn: &Connection, prefix: &str) -> Result<(String, String)> {
        let topic = self.topic(conn, prefix).await?;
        let group = self.group_name("g");
        conn.consumer
            .declare_group(&topic, &group, polybus_core::StartFrom::Latest)
            .await?;
        Ok((topic, group))
    }

    /// A runner on `topic` in `group` with quick retries, tuned by the harness.
    pub fn runner(&self, conn: &Connection, topic: &str, group: &str) -> Runner {
        let retry = polybus_core::RetryPolicy::attempts(5)
            .backoff(Duration::from_millis(20), Duration::from_millis(200));
        self.harness
            .tune_runner(conn.runner().topic(topic).group(group).retry(retry))
    }

    /// Polls the broker's drained probe until it says yes or `within` passes.
    pub async fn eventually_drained(&self, topic: &str, group: &str, within: Duration) -> Result<bool> {
        let until = tokio::time::Instant::now() + within;
        loop {
            if self.harness.drained(topic, group).await? {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= until {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Runs one case against a fresh harness of type `H` on its own multi-threaded
/// runtime; used by [`conformance_suite!`]. Panics (fails the test) when the case
/// fails, times out, or needs a broker that `POLYBUS_TEST_REQUIRE_BROKERS=1` demands.
pub fn run_case<H, F, Fut>(case: &'static str, body: F)
where
    H: Harness,
    F: FnOnce(Ctx<H>) -> Fut + Send + 'static,
    Fut: Future<Output = CaseResult> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a tokio runtime for the case");
    let outcome = runtime.block_on(async move {
        let harness = match H::setup().await {
            Setup::Ready(h) => Arc::new(h),
            Setup::MissingBroker(reason) => {
                if brokers_required() {
                    panic!("{case}: {REQUIRE_BROKERS_ENV}=1 but the broker is not configured: {reason}");
                }
                return Outcome::Skipped(format!("no broker configured ({reason})"));
            }
        };
        let cx = Ctx {
            harness: Arc::clone(&harness),
            case,
            created: Arc::new(Mutex::new(Vec::new())),
        };
        let created = Arc::clone(&cx.created);
        let limit = Duration::from_secs_f64(120.0 * timeout_multiplier());
        let result = tokio::time::timeout(limit, tokio::spawn(body(cx))).await;
        let topics = created.lock().unwrap_or_else(|p| p.into_inner()).clone();
        harness.cleanup(&topics).await;
        match result {
            Err(_) => panic!("{case}: timed out after {limit:?}"),
            Ok(Err(join)) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            Ok(Err(join)) => panic!("{case}: {join}"),
            Ok(Ok(Err(e))) => panic!("{case} failed: {e}"),
            Ok(Ok(Ok(outcome))) => outcome,
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    if let Outcome::Skipped(reason) = outcome {
        loud(&format!("SKIP {case}: {reason}"));
    }
}

/// Expands every conformance case into a `#[test]` for the harness type given.
///
/// ```text
/// polybus_conformance::conformance_suite!(MemoryHarness);
/// ```
#[macro_export]
macro_rules! conformance_suite {
    ($harness:ty) => {
        $crate::conformance_suite!(@cases $harness;
            roundtrip,
            edge_payloads,
            topics_are_isolated,
            concurrent_publishers,
            key_order_under_concurrency,
            key_order_across_retries,
            sequential_mode,
            ack_is_final,
            retryable_error_is_retried,
            permanent_error_dead_letters,
            max_attempts_then_dead_letter,
            panic_is_retried,
            crashed_consumer_work_is_redelivered,
            settling_twice_is_harmless,
            competing_consumers_share_work,
            independent_groups_each_get_everything,
            replay_from_earliest,
            replay_from_timestamp,
            reposition_group_replays,
            catch_up_reports_once_after_the_backlog,
            keep_alive_holds_slow_handlers,
            graceful_drain,
            no_handler_after_shutdown,
            shutdown_deadline_cancels_stuck_handlers,
            shutdown_is_idempotent,
            producer_close_flushes,
            concurrency_is_bounded,
            unreachable_broker_errors_in_time,
            invalid_names_are_rejected,
            dead_letter_copy_is_byte_exact,
            dead_letter_retryable_failure_is_retried,
            dead_letter_refused_ends_the_runner,
            dead_letter_too_large_sends_a_stub,
            dead_letter_is_timestamped_now,
            panics_outside_the_handler_are_bounded,
            panic_after_ack_is_not_handled_again,
            backoff_does_not_stall_other_keys,
            fatal_subscription_error_is_reported,
            hung_ack_is_bounded,
            shutdown_release_costs_one_attempt,
            overloaded_message_comes_back_after_a_backoff,
            foreign_binary_keys_keep_their_lanes,
            foreign_headers_keep_their_bytes,
            foreign_tombstone_is_not_an_empty_payload,
            foreign_undecodable_record_is_dead_lettered,
            foreign_payload_over_the_send_limit_does_not_stop_the_group,
            trace_crosses_the_broker,
            lag_counts_the_backlog,
            typed_decode_failure_dead_letters,
            router_keeps_key_order_across_types,
            router_unknown_type_policy,
            cloudevents_from_other_producers,
        );
    };
    (@cases $harness:ty; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::run_case::<$harness, _, _>(stringify!($case), $crate::cases::$case::<$harness>);
            }
        )*
    };
}
