//! TLS and SASL against Kafka-protocol brokers that require them (issue 16).
//! `scripts/brokers.sh` `ensure_secure_kafka` starts two private tansu 0.6.0
//! brokers with `--authentication`: `POLYBUS_TEST_KAFKA_SASL_URL` (SCRAM-SHA-512
//! user; `POLYBUS_TEST_KAFKA_SASL256_URL` a SCRAM-SHA-256 one) on a plain
//! listener, and `POLYBUS_TEST_KAFKA_SECURE_URL` (SCRAM-SHA-512 over TLS with a
//! client certificate) behind a socat TLS terminator, because tansu 0.6.0
//! cannot serve TLS itself (see the README, Security (Kafka)). The refused
//! certificates are presented by socat endpoints started here
//! (`POLYBUS_TEST_TLS_DIR`). Every test skips loudly without its variables.

mod support;

use std::future::Future;
use std::time::{Duration, Instant};

use polybus_conformance::processes::{REFUSED_SERVER_CERTS, refused_tls_endpoint, tls_file};
use polybus_conformance::secrets::{assert_no_leak, capture_logs, error_text, percent_encode};
use polybus_conformance::{Harness, Setup, broker_url, timeout_multiplier};
use polybus_core::{Capabilities, Connection, Error, Result, async_trait};
use polybus_kafka::{KafkaConfig, KafkaConsumer, SaslMechanism};

const SASL_ENV: &str = "POLYBUS_TEST_KAFKA_SASL_URL";
const SASL256_ENV: &str = "POLYBUS_TEST_KAFKA_SASL256_URL";
const SECURE_ENV: &str = "POLYBUS_TEST_KAFKA_SECURE_URL";

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s * timeout_multiplier())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn run<T>(f: impl Future<Output = T>) -> T {
    runtime().block_on(f)
}

/// The URL's settings plus the test settings of the other Kafka suites (one
/// record per batch for tansu, short timeouts).
fn config(url: &str) -> KafkaConfig {
    let base = support::test_config("x:1");
    let mut c = KafkaConfig::from_url(url).unwrap();
    c.partitions = base.partitions;
    c.session_timeout = base.session_timeout;
    c.max_poll_interval = base.max_poll_interval;
    c.revoke_timeout = base.revoke_timeout;
    c.commit_interval = base.commit_interval;
    c.connect_timeout(secs(5.0)).set("batch.num.messages", "1")
}

/// The password of a `kafka://user:password@…` URL.
fn password_of(url: &str) -> String {
    let info = url.split_once("://").unwrap().1.split_once('@').unwrap().0;
    info.split_once(':').unwrap().1.to_owned()
}

/// The URL with other credentials.
fn with_credentials(url: &str, credentials: &str) -> String {
    let rest = url.split_once("://").unwrap().1.split_once('@').unwrap().1;
    format!("kafka://{credentials}@{rest}")
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{nanos}")
}

/// Connects, asserting the failure is `expected`, final, and within the
/// connect timeout (not a reconnect loop).
async fn refused(config: KafkaConfig, expected: fn(&Error) -> bool) -> Error {
    let limit = config.connect_timeout + secs(1.0);
    let started = Instant::now();
    let Err(err) = polybus_kafka::connect_with(config).await else {
        panic!("the connection must be refused");
    };
    let took = started.elapsed();
    assert!(expected(&err), "unexpected error: {err:?}");
    assert!(!err.is_retryable(), "{err} must not be retryable");
    assert!(took < limit, "took {took:?}: {err}");
    err
}

/// The error of a connect that must fail.
async fn connect_error(config: KafkaConfig) -> Error {
    match polybus_kafka::connect_with(config).await {
        Err(e) => e,
        Ok(_) => panic!("the connection must be refused"),
    }
}

fn unauthenticated(e: &Error) -> bool {
    matches!(e, Error::Unauthenticated { .. })
}

fn tls(e: &Error) -> bool {
    matches!(e, Error::Tls { .. })
}

async fn roundtrip(config: KafkaConfig) -> Result<()> {
    let conn = polybus_kafka::connect_with(config).await?;
    polybus_conformance::roundtrip_once(&conn, &unique("secured"), secs(20.0)).await?;
    conn.close().await
}

#[test]
fn scram_sha_512_and_256_roundtrip() {
    let Some(url) = broker_url(SASL_ENV, "scram_sha_512_and_256_roundtrip") else {
        return;
    };
    let Some(url256) = broker_url(SASL256_ENV, "scram_sha_512_and_256_roundtrip") else {
        return;
    };
    run(async {
        roundtrip(config(&url)).await.unwrap();
        roundtrip(config(&url256)).await.unwrap();
        // The typed fields work as the URL does.
        let from_url = config(&url);
        let typed =
            config(&with_credentials(&url, "x:y").replace("sasl_mechanism=SCRAM-SHA-512", "partitions=4"));
        let mut typed = typed.sasl(SaslMechanism::ScramSha512, "polybus", password_of(&url));
        typed.brokers = from_url.brokers.clone();
        roundtrip(typed).await.unwrap();
    });
}

#[test]
fn wrong_password_unknown_user_and_wrong_mechanism_are_refused_fast() {
    let test = "wrong_password_unknown_user_and_wrong_mechanism_are_refused_fast";
    let Some(url) = broker_url(SASL_ENV, test) else {
        return;
    };
    run(async {
        let wrong = config(&with_credentials(&url, "polybus:not-the-password"));
        let err = refused(wrong, unauthenticated).await;
        assert!(err.to_string().contains("SCRAM"), "{err}");
        let unknown = config(&with_credentials(&url, &format!("nobody:{}", password_of(&url))));
        refused(unknown, unauthenticated).await;
        // The SCRAM-SHA-512 user has no SCRAM-SHA-256 credentials.
        let other = config(&url.replace("SCRAM-SHA-512", "SCRAM-SHA-256"));
        refused(other, unauthenticated).await;
        // No credentials at all: the broker answers nothing but the SASL
        // handshake, so this is the connect timeout, as a retryable error.
        let anonymous = KafkaConfig::from_url(&format!(
            "kafka://{}",
            url.split_once('@').unwrap().1.split_once('?').unwrap().0
        ))
        .unwrap()
        .connect_timeout(secs(2.0));
        let started = Instant::now();
        let err = connect_error(anonymous).await;
        assert!(started.elapsed() < secs(3.0), "{:?}", started.elapsed());
        assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    });
}

#[test]
fn sasl_ssl_with_mutual_tls_roundtrips() {
    let Some(url) = broker_url(SECURE_ENV, "sasl_ssl_with_mutual_tls_roundtrips") else {
        return;
    };
    run(async { roundtrip(config(&url)).await.unwrap() });
}

#[test]
fn untrusted_misnamed_and_missing_certificates_are_refused_fast() {
    let test = "untrusted_misnamed_and_missing_certificates_are_refused_fast";
    let Some(url) = broker_url(SECURE_ENV, test) else {
        return;
    };
    let Some(rogue) = tls_file("rogue-ca.pem", test) else {
        return;
    };
    run(async {
        let mut untrusted = config(&url);
        untrusted.tls_ca_file = Some(rogue.clone());
        let err = refused(untrusted, tls).await;
        assert!(err.to_string().contains("certificate verify failed"), "{err}");

        // `vm` resolves to 127.0.0.1 here but is not in the certificate.
        let mut misnamed = config(&url);
        misnamed.brokers = vec![misnamed.brokers[0].replacen("localhost", "vm", 1)];
        if std::net::ToSocketAddrs::to_socket_addrs(&(misnamed.brokers[0].as_str())).is_ok() {
            let err = refused(misnamed, tls).await;
            assert!(err.to_string().contains("sasl_ssl://vm:"), "{err}");
        }

        let mut no_client_cert = config(&url);
        no_client_cert.tls_client_cert = None;
        no_client_cert.tls_client_key = None;
        let err = refused(no_client_cert, tls).await;
        assert!(err.to_string().contains("alert certificate required"), "{err}");

        let mut rogue_client = config(&url);
        rogue_client.tls_client_cert = tls_file("rogue-client.pem", test);
        rogue_client.tls_client_key = tls_file("rogue-client-key.pem", test);
        let err = refused(rogue_client, tls).await;
        assert!(err.to_string().contains("alert unknown ca"), "{err}");
    });
}

#[test]
fn expired_future_and_misnamed_server_certificates_are_refused() {
    let test = "kafka_expired_future_and_misnamed_server_certificates_are_refused";
    let Some(ca) = tls_file("ca.pem", test) else {
        return;
    };
    run(async {
        for (cert, _) in REFUSED_SERVER_CERTS {
            let Some((_endpoint, port)) = refused_tls_endpoint(cert, test) else {
                return;
            };
            let c = KafkaConfig::from_url(&format!("kafka://localhost:{port}"))
                .unwrap()
                .tls_ca_file(&ca)
                .connect_timeout(secs(3.0));
            let err = refused(c, tls).await;
            // librdkafka reports OpenSSL's "certificate verify failed" for all
            // three, without the X.509 reason (expired, not yet valid, name).
            assert!(
                err.to_string().contains("certificate verify failed"),
                "{cert}: {err}"
            );
        }
    });
}

#[test]
fn tls_or_sasl_against_a_listener_without_them_fails_within_the_timeout() {
    let test = "tls_or_sasl_against_a_listener_without_them_fails_within_the_timeout";
    let Some(sasl_url) = broker_url(SASL_ENV, test) else {
        return;
    };
    let Some(ca) = tls_file("ca.pem", test) else {
        return;
    };
    run(async {
        // TLS to tansu's plain listener: tansu waits for a frame, the
        // handshake never completes, and librdkafka reports nothing but a
        // broker down: a bounded, retryable connection error at the connect
        // timeout that says TLS may be the cause (a listener that closes the
        // connection instead is reported as `Error::Tls`).
        let c = config(&sasl_url).tls_ca_file(&ca).connect_timeout(secs(3.0));
        let started = Instant::now();
        let err = connect_error(c).await;
        assert!(started.elapsed() < secs(4.0), "{:?}", started.elapsed());
        match &err {
            Error::Tls { .. } => {}
            Error::Connection { message, .. } => assert!(message.contains("TLS is on"), "{err}"),
            other => panic!("{other:?}"),
        }
        // SASL to a broker that does not authenticate (the shared tansu).
        if let Ok(brokers) = std::env::var(support::BROKERS_ENV)
            && std::net::TcpStream::connect(brokers.split(',').next().unwrap_or_default()).is_ok()
        {
            let c = KafkaConfig::from_url(&format!(
                "kafka://u:some-password@{brokers}?sasl_mechanism=SCRAM-SHA-512"
            ))
            .unwrap()
            .connect_timeout(secs(3.0));
            // tansu without `--authentication` still answers the SASL
            // handshake, offering only SCRAM-SHA-512 and then refusing it.
            let err = refused(c, unauthenticated).await;
            assert!(err.to_string().contains("SASL"), "{err}");
        }
    });
}

#[test]
fn no_secret_leaks_from_failed_and_successful_connections() {
    let test = "kafka_no_secret_leaks_from_failed_and_successful_connections";
    let Some(url) = broker_url(SECURE_ENV, test) else {
        return;
    };
    let logs = capture_logs();
    let password = password_of(&url);
    let wrong = "Wr0ng/pass+word=?&";
    let mut texts = String::new();
    run(async {
        let good = config(&url);
        texts.push_str(&format!("{good:?}\n"));
        roundtrip(good).await.unwrap();
        let failed = config(&with_credentials(
            &url,
            &format!("polybus:{}", percent_encode(wrong)),
        ));
        texts.push_str(&format!("{failed:?}\n"));
        let err = refused(failed, unauthenticated).await;
        texts.push_str(&error_text(&err));
        let bad_url = format!("{url}&partitions=zero");
        texts.push_str(&error_text(&KafkaConfig::from_url(&bad_url).unwrap_err()));
    });
    texts.push_str(&logs.text());
    assert!(
        logs.text().contains("librdkafka") || logs.text().contains("polybus_kafka"),
        "logs are captured"
    );
    assert_no_leak(&texts, &[&password, wrong]);
}

/// The conformance suite's harness over SASL_SSL with mutual TLS.
struct SecureHarness {
    config: KafkaConfig,
    admin: KafkaConsumer,
}

#[async_trait]
impl Harness for SecureHarness {
    async fn setup() -> Setup<Self> {
        let Ok(url) = std::env::var(SECURE_ENV) else {
            return Setup::MissingBroker(format!(
                "set {SECURE_ENV} (scripts/brokers.sh: ensure_secure_kafka)"
            ));
        };
        let config = config(&url);
        let admin = KafkaConsumer::connect(config.clone())
            .await
            .unwrap_or_else(|e| panic!("{SECURE_ENV} is set but the secured Kafka refuses: {e}"));
        Setup::Ready(SecureHarness { config, admin })
    }

    fn capabilities(&self) -> Capabilities {
        polybus_core::Consumer::capabilities(&self.admin)
    }

    async fn connect(&self) -> Result<Connection> {
        polybus_kafka::connect_with(self.config.clone()).await
    }

    async fn drained(&self, topic: &str, group: &str) -> Result<bool> {
        Ok(self.admin.lag(topic, group).await? == 0)
    }
}

/// The conformance suite's roundtrip, ack, dead-letter and shutdown cases
/// through SASL (SCRAM-SHA-512) over mutual TLS.
mod secured_smoke {
    polybus_conformance::conformance_suite!(@cases super::SecureHarness;
        roundtrip,
        ack_is_final,
        permanent_error_dead_letters,
        graceful_drain,
        shutdown_is_idempotent,
        producer_close_flushes,
    );
}

/// Credential rotation without a restart (issue 16): a producer made with a
/// wrong password cannot deliver (tansu refuses its SCRAM login); once
/// `rotate_credentials` gives it the right one, librdkafka logs in again with
/// it and the record already waiting is delivered, by the same producer. A
/// consumer's later subscriptions are made with rotated credentials: wrong
/// ones are refused, the right ones (rotated back) work. Rotation without SASL
/// is a configuration error.
#[test]
fn rotated_credentials_are_used_by_the_next_login() {
    let Some(url) = broker_url(SASL_ENV, "rotated_credentials_are_used_by_the_next_login") else {
        return;
    };
    run(async {
        let right = config(&url);
        let password = password_of(&url);
        let topic = unique("rotated");
        let consumer = std::sync::Arc::new(KafkaConsumer::connect(right.clone()).await.unwrap());
        polybus_core::Consumer::declare_topic(&*consumer, &topic)
            .await
            .unwrap();
        polybus_core::Consumer::declare_group(&*consumer, &topic, "g", polybus_core::StartFrom::Earliest)
            .await
            .unwrap();

        let wrong = config(&with_credentials(&url, "polybus:not-the-password"));
        let producer = std::sync::Arc::new(polybus_kafka::KafkaProducer::new(&wrong).unwrap());
        let sending = tokio::spawn({
            let producer = std::sync::Arc::clone(&producer);
            let topic = topic.clone();
            async move {
                polybus_core::Producer::send(&*producer, &topic, polybus_core::Message::new("first")).await
            }
        });
        // Refused logins: nothing is delivered meanwhile.
        tokio::time::sleep(secs(2.0)).await;
        assert!(
            !sending.is_finished(),
            "a send with a wrong password cannot succeed: {sending:?}"
        );

        let rotated = Instant::now();
        producer.rotate_credentials("polybus", &password).unwrap();
        let first = tokio::time::timeout(secs(20.0), sending)
            .await
            .expect("the waiting record is delivered after the rotation")
            .unwrap();
        first.unwrap();
        eprintln!("delivered {:?} after the rotation", rotated.elapsed());
        polybus_core::Producer::send(&*producer, &topic, polybus_core::Message::new("second"))
            .await
            .unwrap();

        // The consumer's new subscriptions use rotated credentials.
        consumer
            .rotate_credentials("polybus", "not-the-password")
            .unwrap();
        let subscribing = Instant::now();
        let refused = polybus_core::Consumer::subscribe(
            &*consumer,
            polybus_core::SubscribeOptions::new(&topic).group("g"),
        )
        .await
        .err()
        .expect("a subscription with a wrong password must not start");
        let took = subscribing.elapsed();
        eprintln!("refused subscription after {took:?}: {refused}");
        // Refused as the login it is, and well within the request timeout.
        assert!(
            matches!(refused, Error::Unauthenticated { .. }),
            "a wrong password at subscribe is Unauthenticated, not {refused:?}"
        );
        assert!(took < secs(5.0), "refused after {took:?}");
        assert!(!format!("{refused} {refused:?}").contains("not-the-password"));
        consumer.rotate_credentials("polybus", &password).unwrap();
        let connection = Connection {
            producer: producer.clone(),
            consumer: consumer.clone(),
        };
        let recorder = polybus_conformance::Recorder::new();
        let handle = connection
            .runner()
            .topic(&topic)
            .group("g")
            .run(recorder.handler())
            .await
            .unwrap();
        recorder.wait_for(2, secs(20.0)).await.expect("both records");
        handle.shutdown(secs(10.0)).await;

        // Nothing to rotate without SASL; secrets stay out of the error.
        let plain = support::test_config("localhost:1");
        let producer = polybus_kafka::KafkaProducer::new(&plain).unwrap();
        let err = producer.rotate_credentials("u", "hunter2-secret").unwrap_err();
        assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
        assert!(!format!("{err} {err:?}").contains("hunter2"), "{err:?}");
        let _ = connection.close().await;
    });
}

/// The catch-up probe (hostile review of issue 16) is made with the
/// consumer's credentials as they are now, not as they were when the
/// subscription was opened, and a refused login there is a fast, final
/// `Unauthenticated` instead of a retryable timeout: after the consumer is
/// rotated to a wrong password, a new probe is refused; rotated back, it
/// works.
#[test]
fn catch_up_probes_use_rotated_credentials_and_are_refused_fast() {
    let Some(url) = broker_url(
        SASL_ENV,
        "catch_up_probes_use_rotated_credentials_and_are_refused_fast",
    ) else {
        return;
    };
    run(async {
        let right = config(&url);
        let password = password_of(&url);
        let topic = unique("probe-rotated");
        let consumer = KafkaConsumer::connect(right).await.unwrap();
        polybus_core::Consumer::declare_topic(&consumer, &topic)
            .await
            .unwrap();
        let mut sub = polybus_core::Consumer::subscribe(
            &consumer,
            polybus_core::SubscribeOptions::new(&topic).group("g"),
        )
        .await
        .unwrap();
        consumer
            .rotate_credentials("polybus", "not-the-password")
            .unwrap();
        let started = Instant::now();
        let refused = match sub.catch_up_probe().await {
            Ok(_) => panic!("a probe made after a rotation to a wrong password must be refused"),
            Err(e) => e,
        };
        let took = started.elapsed();
        eprintln!("probe refused after {took:?}: {refused}");
        assert!(unauthenticated(&refused), "{refused:?}");
        assert!(!refused.is_retryable());
        assert!(took < secs(5.0), "refused after {took:?}");
        assert!(!format!("{refused} {refused:?}").contains("not-the-password"));
        consumer.rotate_credentials("polybus", &password).unwrap();
        let probe = sub.catch_up_probe().await.unwrap();
        // An empty topic: nothing to wait for.
        assert!(probe.caught_up().await.unwrap());
        let _ = sub.close().await;
        let _ = polybus_core::Consumer::close(&consumer).await;
    });
}

/// A TCP proxy in front of `target` that closes the next `close` connections
/// at once (a broker restarting, a load balancer shedding) and forwards the
/// others (threads: the test's runtime has no tokio io utilities).
fn flaky_proxy(target: String) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::Ordering::SeqCst;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let close = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let closing = std::sync::Arc::clone(&close);
    std::thread::spawn(move || {
        for inbound in listener.incoming() {
            let Ok(inbound) = inbound else { break };
            if closing.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok() {
                drop(inbound);
                continue;
            }
            let Ok(outbound) = std::net::TcpStream::connect(&target) else {
                continue;
            };
            let (mut in_read, mut out_write) = (inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
            let (mut out_read, mut in_write) = (outbound, inbound);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut in_read, &mut out_write);
                let _ = out_write.shutdown(std::net::Shutdown::Both);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut out_read, &mut in_write);
                let _ = in_write.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (port, close)
}

/// A TLS connection closed during its handshake once (a broker restarting)
/// is not a TLS refusal: a group request after a successful connect goes on
/// (librdkafka reconnects) or fails as retryable, never as a final `Tls`.
#[test]
fn a_connection_closed_once_in_the_tls_handshake_is_not_a_refusal() {
    let Some(url) = broker_url(
        SECURE_ENV,
        "a_connection_closed_once_in_the_tls_handshake_is_not_a_refusal",
    ) else {
        return;
    };
    run(async {
        let (host_port, rest) = url.split_once('@').unwrap().1.split_once('?').unwrap();
        let target_port = host_port.rsplit_once(':').unwrap().1;
        let (port, close) = flaky_proxy(format!("127.0.0.1:{target_port}"));
        let proxied = url.replace(
            &format!("localhost:{target_port}?"),
            &format!("localhost:{port}?"),
        );
        assert!(proxied.contains(&format!(":{port}?{rest}")), "proxied URL");
        let consumer = KafkaConsumer::connect(config(&proxied)).await.unwrap();
        let topic = unique("tls-flaky");
        polybus_core::Consumer::declare_topic(&consumer, &topic)
            .await
            .unwrap();
        // Every new client bootstraps through the proxy: the next ones are
        // closed at once, as a restarting broker would.
        close.store(2, std::sync::atomic::Ordering::SeqCst);
        let lag = consumer.lag(&topic, "g").await;
        match &lag {
            Ok(_) => {}
            Err(e) => assert!(
                e.is_retryable() && !matches!(e, Error::Tls { .. }),
                "a handshake cut short once is not a final TLS refusal: {e:?}"
            ),
        }
        let _ = polybus_core::Consumer::close(&consumer).await;
    });
}

/// Rotations racing subscriptions being opened, closed and dropped, a
/// catch-up probe's client, concurrent rotations, and rotations of a closed
/// producer and consumer (hostile review of issue 16): nothing deadlocks or
/// panics, every subscription opened meanwhile works, and the rotation
/// made last is the one later clients use.
#[test]
fn rotations_race_subscriptions_probes_and_close() {
    let Some(url) = broker_url(SASL_ENV, "rotations_race_subscriptions_probes_and_close") else {
        return;
    };
    run(async {
        let password = password_of(&url);
        let consumer = std::sync::Arc::new(KafkaConsumer::connect(config(&url)).await.unwrap());
        let topic = unique("rotation-race");
        polybus_core::Consumer::declare_topic(&*consumer, &topic)
            .await
            .unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let rotators: Vec<_> = (0..3)
            .map(|_| {
                let consumer = std::sync::Arc::clone(&consumer);
                let stop = std::sync::Arc::clone(&stop);
                let password = password.clone();
                tokio::spawn(async move {
                    let mut n = 0u32;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        consumer.rotate_credentials("polybus", &password).unwrap();
                        n += 1;
                        tokio::task::yield_now().await;
                    }
                    n
                })
            })
            .collect();
        for i in 0..6 {
            let mut sub = polybus_core::Consumer::subscribe(
                &*consumer,
                polybus_core::SubscribeOptions::new(&topic).group(format!("g{i}")),
            )
            .await
            .unwrap_or_else(|e| panic!("subscription {i} while rotating: {e:?}"));
            let probe = sub.catch_up_probe().await.unwrap();
            assert!(probe.caught_up().await.unwrap());
            if i % 2 == 0 {
                sub.close().await.unwrap();
            } else {
                drop(sub); // a crash: the poll thread ends on its own
            }
            drop(probe);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut rotations = 0;
        for rotator in rotators {
            rotations += rotator.await.unwrap();
        }
        eprintln!("{rotations} rotations raced 6 subscriptions");
        // The last rotation wins for what is made later.
        consumer
            .rotate_credentials("polybus", "not-the-password")
            .unwrap();
        let refused = polybus_core::Consumer::subscribe(
            &*consumer,
            polybus_core::SubscribeOptions::new(&topic).group("g-late"),
        )
        .await
        .err()
        .expect("made after a rotation to a wrong password");
        assert!(unauthenticated(&refused), "{refused:?}");
        polybus_core::Consumer::close(&*consumer).await.unwrap();
        // Rotating a closed consumer or producer is harmless.
        consumer.rotate_credentials("polybus", &password).unwrap();
        let producer = polybus_kafka::KafkaProducer::new(&config(&url)).unwrap();
        polybus_core::Producer::close(&producer).await.unwrap();
        producer.rotate_credentials("polybus", &password).unwrap();
    });
}
