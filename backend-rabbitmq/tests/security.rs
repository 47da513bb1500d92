//! TLS, authentication and permissions against a RabbitMQ node that requires
//! them (issue 16). The node comes from `scripts/brokers.sh`
//! (`ensure_secure_rabbitmq`): only a TLS listener with `verify_peer` and
//! `fail_if_no_peer_cert`, the user `polybus` in the vhost `polybus-secure`.
//! Variables: `POLYBUS_TEST_AMQP_SECURE_URL` (amqps, user and password),
//! `POLYBUS_TEST_TLS_DIR` (the test CA, client certificate and a rogue CA) and
//! `POLYBUS_TEST_AMQP_SECURE_CTL` (`rabbitmqctl` for that node: listing queues
//! for cleanup, adding a limited user). Every test skips loudly without them.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use polybus_conformance::secrets::{assert_no_leak, capture_logs, error_text, percent_encode};
use polybus_conformance::{Harness, Setup, broker_url, timeout_multiplier};
use polybus_core::{Capabilities, Connection, Consumer, Error, Message, Result, StartFrom, async_trait};
use polybus_rabbitmq::{RabbitConfig, RabbitConsumer};

const URL_ENV: &str = "POLYBUS_TEST_AMQP_SECURE_URL";
const CTL_ENV: &str = "POLYBUS_TEST_AMQP_SECURE_CTL";
const VHOST: &str = "polybus-secure";

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s * timeout_multiplier())
}

fn tls_dir() -> Option<PathBuf> {
    std::env::var("POLYBUS_TEST_TLS_DIR").ok().map(PathBuf::from)
}

/// `rabbitmqctl` for the secured node, with `args`; its stdout.
fn ctl(args: &[&str]) -> Option<String> {
    let line = std::env::var(CTL_ENV).ok()?;
    let mut words = line.split_whitespace();
    let program = words.next()?;
    let out = std::process::Command::new(program)
        .args(words)
        .args(args)
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The queues of the secured vhost whose names start with `topic~`.
fn queues_of(topic: &str) -> Vec<String> {
    let Some(out) = ctl(&["list_queues", "-p", VHOST, "name", "-q", "--no-table-headers"]) else {
        return Vec::new();
    };
    let prefix = format!("{topic}{}", polybus_rabbitmq::SEPARATOR);
    out.lines()
        .map(str::trim)
        .filter(|q| q.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

/// The secured URL with the test CA and the client certificate (mutual TLS).
fn config(url: &str) -> RabbitConfig {
    let dir = tls_dir().expect("POLYBUS_TEST_TLS_DIR is set with the secured URL");
    RabbitConfig::new(url)
        .unwrap()
        .tls_ca_file(dir.join("ca.pem"))
        .tls_client_auth(dir.join("client.pem"), dir.join("client-key.pem"))
        .connect_timeout(secs(3.0))
}

/// The conformance suite's harness over the secured node.
struct SecureHarness {
    config: RabbitConfig,
    admin: RabbitConsumer,
}

#[async_trait]
impl Harness for SecureHarness {
    async fn setup() -> Setup<Self> {
        let Ok(url) = std::env::var(URL_ENV) else {
            return Setup::MissingBroker(format!(
                "set {URL_ENV} (scripts/brokers.sh: ensure_secure_rabbitmq)"
            ));
        };
        let config = config(&url).connect_timeout(secs(5.0));
        let admin = RabbitConsumer::connect(&config)
            .await
            .unwrap_or_else(|e| panic!("{URL_ENV} is set but the secured RabbitMQ refuses: {e}"));
        Setup::Ready(SecureHarness { config, admin })
    }

    fn capabilities(&self) -> Capabilities {
        self.admin.capabilities()
    }

    async fn connect(&self) -> Result<Connection> {
        polybus_rabbitmq::connect_with(self.config.clone()).await
    }

    async fn drained(&self, topic: &str, group: &str) -> Result<bool> {
        Ok(self.admin.ready_messages(topic, group).await? == 0)
    }

    async fn cleanup(&self, topics: &[String]) {
        for topic in topics {
            if let Err(e) = self.admin.delete_topic(topic, &queues_of(topic)).await {
                eprintln!("cleanup of {topic}: {e}");
            }
            let dlq = polybus_core::names::dead_letter_topic(topic);
            let _ = self.admin.delete_topic(&dlq, &queues_of(&dlq)).await;
        }
    }
}

/// The conformance suite's roundtrip, ack, dead-letter and shutdown cases
/// through mutual TLS, a user and password, and a non-default vhost.
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

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{nanos:x}", std::process::id())
}

/// Replaces the user and password of a URL.
fn with_credentials(url: &str, credentials: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    format!("{scheme}://{credentials}@{host}")
}

/// The password of an `amqps://user:password@…` URL.
fn password_of(url: &str) -> String {
    let info = url.split_once("://").unwrap().1.rsplit_once('@').unwrap().0;
    info.split_once(':').unwrap().1.to_owned()
}

/// Connects, asserting the failure matches `expected`, is not retryable, and
/// comes within the connect timeout (no retry loop).
async fn refused(config: RabbitConfig, expected: fn(&Error) -> bool) -> Error {
    let started = Instant::now();
    let Err(err) = polybus_rabbitmq::connect_with(config.clone()).await else {
        panic!("the connection must be refused");
    };
    let took = started.elapsed();
    assert!(expected(&err), "unexpected error: {err:?}");
    assert!(!err.is_retryable(), "{err} must not be retryable");
    assert!(took < config.connect_timeout, "took {took:?}: {err}");
    err
}

/// Declares a topic and a group, sends one message, receives it through a
/// runner, and deletes what it made.
async fn roundtrip(config: RabbitConfig) -> Result<()> {
    let conn = polybus_rabbitmq::connect_with(config).await?;
    let topic = unique("secured");
    polybus_conformance::roundtrip_once(&conn, &topic, secs(10.0)).await?;
    conn.close().await?;
    Ok(())
}

#[test]
fn tls_settings_from_url_query_roundtrip() {
    let Some(url) = broker_url(URL_ENV, "tls_settings_from_url_query_roundtrip") else {
        return;
    };
    let dir = tls_dir().unwrap();
    let with_query = format!(
        "{url}?tls_ca={}&tls_cert={}&tls_key={}",
        percent_encode(&dir.join("ca.pem").display().to_string()),
        percent_encode(&dir.join("client.pem").display().to_string()),
        percent_encode(&dir.join("client-key.pem").display().to_string()),
    );
    let c = RabbitConfig::new(&with_query).unwrap();
    assert_eq!(c.tls_ca_file, Some(dir.join("ca.pem")));
    assert_eq!(c.tls_client_key, Some(dir.join("client-key.pem")));
    runtime().block_on(roundtrip(c)).unwrap();
}

#[test]
fn wrong_password_and_unknown_user_are_refused_fast() {
    let Some(url) = broker_url(URL_ENV, "wrong_password_and_unknown_user_are_refused_fast") else {
        return;
    };
    let unauthenticated = |e: &Error| matches!(e, Error::Unauthenticated { .. });
    runtime().block_on(async {
        let err = refused(
            config(&with_credentials(&url, "polybus:wrong-password")),
            unauthenticated,
        )
        .await;
        assert!(err.to_string().contains("ACCESS_REFUSED"), "{err}");
        refused(
            config(&with_credentials(&url, "nobody:whatever1")),
            unauthenticated,
        )
        .await;
    });
}

#[test]
fn unknown_vhost_is_refused_fast() {
    let Some(url) = broker_url(URL_ENV, "unknown_vhost_is_refused_fast") else {
        return;
    };
    let other = url.replacen(&format!("/{VHOST}"), "/no-such-vhost", 1);
    runtime().block_on(async {
        let err = refused(config(&other), |e| matches!(e, Error::PermissionDenied { .. })).await;
        assert!(err.to_string().contains("no-such-vhost"), "{err}");
    });
}

#[test]
fn untrusted_certificate_and_wrong_server_name_are_refused() {
    let Some(url) = broker_url(URL_ENV, "untrusted_certificate_and_wrong_server_name_are_refused") else {
        return;
    };
    let dir = tls_dir().unwrap();
    let tls = |e: &Error| matches!(e, Error::Tls { .. });
    runtime().block_on(async {
        let untrusted = config(&url).tls_ca_file(dir.join("rogue-ca.pem"));
        let err = refused(untrusted, tls).await;
        assert!(err.to_string().contains("UnknownIssuer"), "{err}");

        let wrong_name = config(&url).tls_server_name("wrong.example");
        let err = refused(wrong_name, tls).await;
        assert!(err.to_string().contains("not valid for name"), "{err}");

        // The override is what is checked: the right name through it works.
        let right_name = config(&url.replacen("@localhost:", "@127.0.0.1:", 1)).tls_server_name("localhost");
        roundtrip(right_name).await.unwrap();

        // The system roots do not know the test CA: no CA file, no connection.
        let mut system_roots = config(&url);
        system_roots.tls_ca_file = None;
        refused(system_roots, tls).await;
    });
}

#[test]
fn missing_or_untrusted_client_certificate_is_refused() {
    let Some(url) = broker_url(URL_ENV, "missing_or_untrusted_client_certificate_is_refused") else {
        return;
    };
    let dir = tls_dir().unwrap();
    // The server refuses after the client's side of the handshake (TLS 1.3):
    // the refusal is a TLS alert read on the first frame.
    let tls = |e: &Error| matches!(e, Error::Tls { .. });
    runtime().block_on(async {
        let mut no_cert = config(&url);
        no_cert.tls_client_cert = None;
        no_cert.tls_client_key = None;
        let err = refused(no_cert, tls).await;
        assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");
        let rogue =
            config(&url).tls_client_auth(dir.join("rogue-client.pem"), dir.join("rogue-client-key.pem"));
        refused(rogue, tls).await;
    });
}

#[test]
fn unreadable_tls_files_and_tls_on_plain_amqp_are_configuration_errors() {
    let started = Instant::now();
    let rt = runtime();
    let c = RabbitConfig::new("amqps://u:p@127.0.0.1:1/v?tls_ca=/nonexistent/ca.pem").unwrap();
    let err = rt
        .block_on(polybus_rabbitmq::connect_with(c.clone()))
        .err()
        .unwrap();
    assert!(
        matches!(&err, Error::InvalidConfig(m) if m.contains("/nonexistent/ca.pem")),
        "{err:?}"
    );
    let mut c = c;
    c.tls_ca_file = None;
    c.tls_client_cert = Some("/nonexistent/cert.pem".into());
    let err = rt
        .block_on(polybus_rabbitmq::connect_with(c.clone()))
        .err()
        .unwrap();
    assert!(
        matches!(&err, Error::InvalidConfig(m) if m.contains("go together")),
        "{err:?}"
    );
    let c = c.tls_client_auth("/nonexistent/cert.pem", "/nonexistent/key.pem");
    let err = rt.block_on(polybus_rabbitmq::connect_with(c)).err().unwrap();
    assert!(
        matches!(&err, Error::InvalidConfig(m) if m.contains("/nonexistent/cert.pem")),
        "{err:?}"
    );
    let plain = RabbitConfig::new("amqp://u:p@127.0.0.1:1/v?tls_ca=/tmp/ca.pem").unwrap();
    let err = rt.block_on(polybus_rabbitmq::connect_with(plain)).err().unwrap();
    assert!(
        matches!(&err, Error::InvalidConfig(m) if m.contains("amqps")),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn permission_denied_at_declare_send_and_subscribe() {
    let Some(url) = broker_url(URL_ENV, "permission_denied_at_declare_send_and_subscribe") else {
        return;
    };
    if broker_url(CTL_ENV, "permission_denied_at_declare_send_and_subscribe").is_none() {
        return;
    }
    // A user who may configure, write and read only `allowed-…` objects.
    let user = format!("limited-{}", std::process::id());
    let pass = unique("pw");
    ctl(&["add_user", &user, &pass]);
    ctl(&[
        "set_permissions",
        "-p",
        VHOST,
        &user,
        "^allowed-.*",
        "^allowed-.*",
        "^allowed-.*",
    ]);
    let limited = config(&with_credentials(&url, &format!("{user}:{pass}")));
    let rt = runtime();
    let result = rt.block_on(async {
        let admin = RabbitConsumer::connect(&config(&url)).await?;
        let secret = unique("secret");
        admin.declare_topic(&secret).await?;
        admin.declare_group(&secret, "g", StartFrom::Latest).await?;

        let conn = polybus_rabbitmq::connect_with(limited).await?;
        let denied = |e: &Error, name: &str| {
            assert!(matches!(e, Error::PermissionDenied { .. }), "{e:?}");
            assert!(!e.is_retryable());
            assert!(e.to_string().contains(name), "{e}");
        };
        let started = Instant::now();
        let err = conn.consumer.declare_topic(&unique("secret")).await.unwrap_err();
        denied(&err, "secret-");
        let err = conn.producer.send(&secret, Message::new("x")).await.unwrap_err();
        denied(&err, &secret);
        let err = match conn
            .consumer
            .subscribe(polybus_core::SubscribeOptions::new(&secret).group("g"))
            .await
        {
            Err(e) => e,
            Ok(_) => panic!("subscribing to a denied queue must fail"),
        };
        denied(&err, &secret);
        assert!(started.elapsed() < secs(3.0), "{:?}", started.elapsed());

        // The same user may use its own topics on the same connection.
        let allowed = unique("allowed");
        conn.consumer.declare_topic(&allowed).await?;
        conn.producer.send(&allowed, Message::new("fine")).await?;
        let _ = conn.close().await;
        for topic in [&secret, &allowed] {
            let _ = admin.delete_topic(topic, &queues_of(topic)).await;
        }
        Ok::<(), Error>(())
    });
    ctl(&["delete_user", &user]);
    result.unwrap();
}

#[test]
fn no_secret_leaks_from_failed_and_successful_connections() {
    let Some(url) = broker_url(URL_ENV, "no_secret_leaks_from_failed_and_successful_connections") else {
        return;
    };
    let key_file = tls_dir().unwrap().join("client-key.pem");
    let logs = capture_logs();
    let password = password_of(&url);
    let wrong = "Wr0ng/pass+word=?&";
    let mut texts = String::new();
    runtime().block_on(async {
        let good = config(&url);
        texts.push_str(&format!("{good:?}\n"));
        roundtrip(good).await.unwrap();
        let failed = config(&with_credentials(
            &url,
            &format!("polybus:{}", percent_encode(wrong)),
        ));
        texts.push_str(&format!("{failed:?}\n"));
        let err = refused(failed, |e| matches!(e, Error::Unauthenticated { .. })).await;
        texts.push_str(&error_text(&err));
        // Failures after the credentials were sent or while TLS was set up.
        let wrong_vhost = url.replacen(&format!("/{VHOST}"), "/no-such-vhost", 1);
        let err = refused(config(&wrong_vhost), |e| {
            matches!(e, Error::PermissionDenied { .. })
        })
        .await;
        texts.push_str(&error_text(&err));
        let rogue = config(&url).tls_ca_file(tls_dir().unwrap().join("rogue-ca.pem"));
        let err = refused(rogue, |e| matches!(e, Error::Tls { .. })).await;
        texts.push_str(&error_text(&err));
        let mut no_cert = config(&url);
        no_cert.tls_client_cert = None;
        no_cert.tls_client_key = None;
        let err = refused(no_cert, |e| matches!(e, Error::Tls { .. })).await;
        texts.push_str(&error_text(&err));
        let err = RabbitConfig::new(&format!("amqps://u:{password}@h:port/v"))
            .err()
            .unwrap();
        texts.push_str(&error_text(&err));
    });
    texts.push_str(&logs.text());
    assert!(texts.contains("lapin"), "the logs were captured");
    let key = std::fs::read_to_string(key_file).unwrap();
    let key_body: String = key.lines().filter(|l| !l.starts_with("-----")).take(2).collect();
    assert_no_leak(&texts, &[&password, wrong, &key_body]);
}
