//! TLS, authentication and permissions against NATS servers that require them
//! (issue 16). The servers come from `scripts/brokers.sh` (`ensure_secure_nats`):
//! `POLYBUS_TEST_NATS_SECURE_URL` (TLS + user/password),
//! `POLYBUS_TEST_NATS_LIMITED_URL` (a user denied `secret.>`),
//! `POLYBUS_TEST_NATS_MTLS_URL` (mutual TLS + token) and `POLYBUS_TEST_TLS_DIR`
//! (the test CA and certificates). The NKey test starts its own server with a
//! key generated here. Every test skips loudly without its variables.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use polybus_conformance::secrets::{assert_no_leak, capture_logs, error_text};
use polybus_conformance::{Recorder, broker_url, timeout_multiplier};
use polybus_core::{Error, Message, StartFrom};
use polybus_nats::NatsConfig;

/// The conformance suite's roundtrip, ack, dead-letter and shutdown cases
/// through TLS and a user and password.
mod secured_smoke {
    polybus_conformance::conformance_suite!(@cases super::support::NatsHarness<false, true>;
        roundtrip,
        ack_is_final,
        permanent_error_dead_letters,
        max_attempts_then_dead_letter,
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

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s * timeout_multiplier())
}

fn tls_file(name: &str) -> Option<PathBuf> {
    broker_url("POLYBUS_TEST_TLS_DIR", name).map(|d| PathBuf::from(d).join(name))
}

/// Replaces the password (or token) of a URL.
fn with_credentials(url: &str, credentials: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    format!("{scheme}://{credentials}@{host}")
}

/// The password of a `scheme://user:password@…` URL (or its token).
fn secret_of(url: &str) -> String {
    let info = url.split_once("://").unwrap().1.rsplit_once('@').unwrap().0;
    info.split_once(':').map_or(info, |(_, p)| p).to_owned()
}

fn config(url: &str) -> NatsConfig {
    NatsConfig::from_url(url).unwrap().connect_timeout(secs(3.0))
}

/// Connects, asserting the failure is `expected`, not retryable, and fast.
async fn refused(config: NatsConfig, expected: fn(&Error) -> bool) -> Error {
    let started = Instant::now();
    let Err(err) = polybus_nats::connect_with(config.clone()).await else {
        panic!("the connection must be refused");
    };
    let took = started.elapsed();
    assert!(expected(&err), "unexpected error: {err:?}");
    assert!(!err.is_retryable(), "{err} must not be retryable");
    assert!(took < config.connect_timeout + secs(1.0), "took {took:?}: {err}");
    err
}

/// Sends one message and receives it through a runner.
async fn roundtrip(config: NatsConfig) -> polybus_core::Result<()> {
    let conn = polybus_nats::connect_with(config.storage(polybus_nats::Storage::Memory)).await?;
    let topic = format!("secured-{}", &uuid_like());
    polybus_conformance::roundtrip_once(&conn, &topic, secs(10.0)).await?;
    conn.close().await
}

fn uuid_like() -> String {
    format!(
        "{:x}",
        Instant::now().elapsed().as_nanos() ^ u128::from(std::process::id()) << 40
    ) + &format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

#[test]
fn mutual_tls_with_a_token_roundtrips() {
    let Some(url) = broker_url("POLYBUS_TEST_NATS_MTLS_URL", "mutual_tls_with_a_token_roundtrips") else {
        return;
    };
    runtime().block_on(roundtrip(config(&url))).unwrap();
}

#[test]
fn url_credentials_are_sent() {
    // The user and password in the URL reach the server (async-nats ignores
    // them in server addresses: before issue 16 this was refused).
    let Some(url) = broker_url("POLYBUS_TEST_NATS_SECURE_URL", "url_credentials_are_sent") else {
        return;
    };
    runtime().block_on(roundtrip(config(&url))).unwrap();
}

#[test]
fn credentials_in_fields_work_too() {
    let Some(url) = broker_url("POLYBUS_TEST_NATS_SECURE_URL", "credentials_in_fields_work_too") else {
        return;
    };
    let password = secret_of(&url);
    let bare = url.replacen(&format!("polybus:{password}@"), "", 1);
    let mut c = config(&bare);
    c.user = Some("polybus".into());
    c.password = Some(password);
    runtime().block_on(roundtrip(c)).unwrap();
}

#[test]
fn wrong_password_unknown_user_and_no_credentials_are_refused() {
    let Some(url) = broker_url(
        "POLYBUS_TEST_NATS_SECURE_URL",
        "wrong_password_unknown_user_and_no_credentials_are_refused",
    ) else {
        return;
    };
    let unauthenticated = |e: &Error| matches!(e, Error::Unauthenticated { .. });
    runtime().block_on(async {
        refused(
            config(&with_credentials(&url, "polybus:wrong-password")),
            unauthenticated,
        )
        .await;
        refused(
            config(&with_credentials(&url, "nobody:whatever1")),
            unauthenticated,
        )
        .await;
        let bare = url
            .split_once('@')
            .map(|(s, h)| format!("{}://{h}", s.split_once("://").unwrap().0))
            .unwrap();
        refused(config(&bare), unauthenticated).await;
    });
}

#[test]
fn untrusted_certificate_and_wrong_server_name_are_refused() {
    let Some(url) = broker_url(
        "POLYBUS_TEST_NATS_SECURE_URL",
        "untrusted_certificate_and_wrong_server_name_are_refused",
    ) else {
        return;
    };
    let Some(rogue_ca) = tls_file("rogue-ca.pem") else {
        return;
    };
    let tls = |e: &Error| matches!(e, Error::Tls { .. });
    runtime().block_on(async {
        let mut untrusted = config(&url);
        untrusted.tls_ca_file = Some(rogue_ca);
        let err = refused(untrusted, tls).await;
        assert!(err.to_string().contains("UnknownIssuer"), "{err}");

        let mut wrong_name = config(&url);
        wrong_name.tls_server_name = Some("wrong.example".into());
        let err = refused(wrong_name, tls).await;
        assert!(err.to_string().contains("not valid for name"), "{err}");

        // The override is what is checked: the right name through it works.
        let mut right_name = config(&url.replacen("@localhost:", "@127.0.0.1:", 1));
        right_name.tls_server_name = Some("localhost".into());
        roundtrip(right_name).await.unwrap();

        // The system roots do not know the test CA: no CA file, no connection.
        let mut system_roots = config(&url);
        system_roots.tls_ca_file = None;
        refused(system_roots, tls).await;
    });
}

#[test]
fn mutual_tls_refuses_a_missing_or_untrusted_client_certificate() {
    let Some(url) = broker_url(
        "POLYBUS_TEST_NATS_MTLS_URL",
        "mutual_tls_refuses_a_missing_or_untrusted_client_certificate",
    ) else {
        return;
    };
    let (Some(cert), Some(key)) = (tls_file("rogue-client.pem"), tls_file("rogue-client-key.pem")) else {
        return;
    };
    runtime().block_on(async {
        // The server refuses after the client's side of the handshake is done
        // (TLS 1.3), so the refusal may come as TLS alert or as a closed
        // connection before INFO: both must be final.
        let final_refusal = |e: &Error| matches!(e, Error::Tls { .. } | Error::Unauthenticated { .. });
        let mut no_cert = config(&url);
        no_cert.tls_client_cert = None;
        no_cert.tls_client_key = None;
        refused(no_cert, final_refusal).await;
        let mut rogue = config(&url);
        rogue.tls_client_cert = Some(cert);
        rogue.tls_client_key = Some(key);
        refused(rogue, final_refusal).await;
    });
}

#[test]
fn unreadable_tls_files_are_configuration_errors() {
    let started = Instant::now();
    let mut c = NatsConfig::from_url("tls://127.0.0.1:1?tls_ca=/nonexistent/ca.pem").unwrap();
    let err = runtime()
        .block_on(polybus_nats::connect_with(c.clone()))
        .err()
        .unwrap();
    assert!(
        matches!(&err, Error::InvalidConfig(m) if m.contains("/nonexistent/ca.pem")),
        "{err:?}"
    );
    c.tls_ca_file = None;
    c.tls_client_cert = Some("/nonexistent/cert.pem".into());
    let err = runtime()
        .block_on(polybus_nats::connect_with(c.clone()))
        .err()
        .unwrap();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
    c.tls_client_key = Some("/nonexistent/key.pem".into());
    let err = runtime().block_on(polybus_nats::connect_with(c)).err().unwrap();
    assert!(
        matches!(&err, Error::InvalidConfig(m) if m.contains("/nonexistent/cert.pem")),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn permission_denied_at_send_declare_and_subscribe_is_fast_and_final() {
    let Some(url) = broker_url(
        "POLYBUS_TEST_NATS_LIMITED_URL",
        "permission_denied_at_send_declare_and_subscribe_is_fast_and_final",
    ) else {
        return;
    };
    runtime().block_on(async {
        // The request timeout is 10 s: an answer within 3 s comes from the -ERR.
        let conn = polybus_nats::connect_with(config(&url).storage(polybus_nats::Storage::Memory))
            .await
            .unwrap();
        let denied = |e: &Error, subject: &str| {
            assert!(matches!(e, Error::PermissionDenied { .. }), "{e:?}");
            assert!(!e.is_retryable());
            assert!(e.to_string().contains(subject), "{e}");
        };
        let started = Instant::now();
        let err = conn
            .producer
            .send("secret.orders", Message::new("x"))
            .await
            .unwrap_err();
        denied(&err, "secret.orders");
        assert!(started.elapsed() < secs(3.0), "{:?}", started.elapsed());

        let started = Instant::now();
        let err = conn.consumer.declare_topic("secret").await.unwrap_err();
        denied(&err, "$JS.API.STREAM.");
        assert!(started.elapsed() < secs(3.0), "{:?}", started.elapsed());

        let started = Instant::now();
        let err = conn
            .consumer
            .declare_group("secret", "g", StartFrom::Latest)
            .await
            .unwrap_err();
        denied(&err, "secret");
        assert!(started.elapsed() < secs(3.0), "{:?}", started.elapsed());

        let started = Instant::now();
        let err = match conn
            .consumer
            .subscribe(polybus_core::SubscribeOptions::new("secret").group("g"))
            .await
        {
            Err(e) => e,
            Ok(_) => panic!("subscribing to a denied topic must fail"),
        };
        denied(&err, "secret");
        assert!(started.elapsed() < secs(3.0), "{:?}", started.elapsed());

        // The same user may use other topics on the same connection.
        let topic = format!("allowed-{}", uuid_like());
        conn.consumer.declare_topic(&topic).await.unwrap();
        conn.producer.send(&topic, Message::new("fine")).await.unwrap();
        let _ = conn.close().await;
    });
}

/// Core NATS: the server refuses a publish or subscription with an
/// asynchronous `-ERR`; `send` and `subscribe` must fail with it (not look
/// successful), at once, and the same connection stays usable.
#[test]
fn core_permission_denied_at_send_and_subscribe_is_fast_and_final() {
    let Some(url) = broker_url(
        "POLYBUS_TEST_NATS_LIMITED_URL",
        "core_permission_denied_at_send_and_subscribe_is_fast_and_final",
    ) else {
        return;
    };
    runtime().block_on(async {
        let conn = polybus_nats::connect_with(config(&url).mode(polybus_nats::Mode::Core))
            .await
            .unwrap();
        let denied = |e: &Error, subject: &str| {
            assert!(matches!(e, Error::PermissionDenied { .. }), "{e:?}");
            assert!(!e.is_retryable());
            assert!(e.to_string().contains(&format!("'{subject}'")), "{e}");
        };
        // Many times, interleaved with allowed sends on the same connection:
        // each denied send fails, each allowed one succeeds.
        let allowed = format!("allowed-{}", uuid_like());
        for i in 0..200 {
            let started = Instant::now();
            let err = conn
                .producer
                .send("secret.orders", Message::new("x"))
                .await
                .expect_err(&format!("denied send {i} must fail"));
            denied(&err, "secret.orders");
            assert!(started.elapsed() < secs(3.0), "{:?}", started.elapsed());
            conn.producer
                .send(&allowed, Message::new("fine"))
                .await
                .unwrap_or_else(|e| panic!("allowed send {i}: {e:?}"));
        }
        // Concurrent sends: only the denied ones fail.
        let sends = (0..50).map(|i| {
            let producer = conn.producer.clone();
            let allowed = allowed.clone();
            async move {
                let topic = if i % 2 == 0 { "secret".to_owned() } else { allowed };
                (i, producer.send(&topic, Message::new("x")).await)
            }
        });
        for (i, result) in futures::future::join_all(sends).await {
            match (i % 2 == 0, result) {
                (true, Err(e)) => denied(&e, "secret"),
                (false, Ok(())) => {}
                (denied_topic, other) => panic!("send {i} (denied: {denied_topic}): {other:?}"),
            }
        }

        // A subscription is refused with an -ERR too. `subscribe` checks after
        // a round trip (and a few yields for async-nats's event task), and the
        // subscription keeps watching: either the call fails or the
        // subscription's first event is the refusal, within moments.
        let started = Instant::now();
        let err = match conn
            .consumer
            .subscribe(polybus_core::SubscribeOptions::new("secret.orders").group("g"))
            .await
        {
            Err(e) => e,
            Ok(mut sub) => match tokio::time::timeout(secs(3.0), sub.next()).await {
                Ok(Some(Err(e))) => e,
                other => panic!("subscribing to a denied subject must fail: {other:?}"),
            },
        };
        denied(&err, "secret.orders");
        assert!(started.elapsed() < secs(3.0), "{:?}", started.elapsed());
        // Through a runner: `run` fails, or the runner ends with the refusal.
        match conn.runner().topic("secret").run(Recorder::new().handler()).await {
            Err(e) => denied(&e, "secret"),
            Ok(handle) => {
                let limit = Instant::now() + secs(3.0);
                while !handle.is_finished() && Instant::now() < limit {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                assert_eq!(handle.state(), polybus_core::RunState::Failed);
                denied(&handle.error().expect("the runner says why"), "secret");
            }
        }

        // The same connections still work for what is allowed.
        roundtrip_on(&conn, &allowed).await;
        let _ = conn.close().await;
    });
}

/// One message through a runner on `topic`.
async fn roundtrip_on(conn: &polybus_core::Connection, topic: &str) {
    let recorder = Recorder::new();
    let handle = conn.runner().topic(topic).run(recorder.handler()).await.unwrap();
    conn.producer.send(topic, Message::new("fine")).await.unwrap();
    recorder
        .wait_for(1, secs(10.0))
        .await
        .expect("the message arrives");
    handle.shutdown(secs(5.0)).await;
}

#[test]
fn nkey_authentication() {
    // A server of its own, with a user NKey generated here.
    let user = nkeys::KeyPair::new_user();
    let other = nkeys::KeyPair::new_user();
    let dir = std::env::temp_dir().join(format!("polybus-nkey-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = polybus_conformance::free_port().unwrap();
    let conf = dir.join("nkey.conf");
    std::fs::write(
        &conf,
        format!(
            "listen: 127.0.0.1:{port}\nauthorization {{ users = [ {{ nkey: {} }} ] }}\n",
            user.public_key()
        ),
    )
    .unwrap();
    let Ok(mut server) = std::process::Command::new("nats-server")
        .arg("-c")
        .arg(&conf)
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        assert!(
            !polybus_conformance::brokers_required(),
            "nats-server is not installed"
        );
        polybus_conformance::loud("SKIP nkey_authentication: nats-server is not installed");
        return;
    };
    let seed = user.seed().unwrap();
    let seed_file = dir.join("user.nk");
    std::fs::write(&seed_file, &seed).unwrap();
    let logs = capture_logs();
    let result: polybus_core::Result<()> = runtime().block_on(async {
        let mut wait = 0;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() && wait < 50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            wait += 1;
        }
        let url = format!(
            "nats://127.0.0.1:{port}?mode=core&nkey_file={}",
            seed_file.display()
        );
        let mut texts = String::new();
        let good = config(&url);
        texts.push_str(&format!("{good:?}\n"));
        roundtrip_core(good).await?;
        let mut wrong = config(&format!("nats://127.0.0.1:{port}?mode=core"));
        wrong.nkey_seed = Some(other.seed().unwrap());
        let err = refused(wrong, |e| matches!(e, Error::Unauthenticated { .. })).await;
        texts.push_str(&error_text(&err));
        let mut garbage = config(&format!("nats://127.0.0.1:{port}?mode=core"));
        garbage.nkey_seed = Some("SUnot-a-seed-at-all".into());
        let err = refused(garbage, |e| matches!(e, Error::Unauthenticated { .. })).await;
        texts.push_str(&error_text(&err));
        texts.push_str(&without_async_nats_connect_trace(&logs.text()));
        assert_no_leak(&texts, &[&seed, &other.seed().unwrap(), "SUnot-a-seed-at-all"]);
        polybus_core::Result::Ok(())
    });
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result.unwrap();
}

async fn roundtrip_core(config: NatsConfig) -> polybus_core::Result<()> {
    let conn = polybus_nats::connect_with(config).await?;
    let topic = format!("nk-{}", uuid_like());
    let recorder = Recorder::new();
    let handle = conn
        .runner()
        .topic(&topic)
        .group("g")
        .run(recorder.handler())
        .await?;
    conn.producer.send(&topic, Message::new("signed")).await?;
    recorder
        .wait_for(1, secs(10.0))
        .await
        .expect("the message arrives");
    handle.shutdown(secs(5.0)).await;
    conn.close().await
}

#[test]
fn no_secret_leaks_from_failed_and_successful_connections() {
    let Some(url) = broker_url(
        "POLYBUS_TEST_NATS_SECURE_URL",
        "no_secret_leaks_from_failed_and_successful_connections",
    ) else {
        return;
    };
    let Some(mtls) = broker_url(
        "POLYBUS_TEST_NATS_MTLS_URL",
        "no_secret_leaks_from_failed_and_successful_connections",
    ) else {
        return;
    };
    let Some(key_file) = tls_file("client-key.pem") else {
        return;
    };
    let logs = capture_logs();
    let password = secret_of(&url);
    let token = secret_of(&mtls);
    let wrong = "Wr0ng/pass+word=?&";
    let mut texts = String::new();
    runtime().block_on(async {
        for c in [config(&url), config(&mtls)] {
            texts.push_str(&format!("{c:?}\n"));
            roundtrip(c).await.unwrap();
        }
        let failed = config(&with_credentials(
            &url,
            &format!("polybus:{}", polybus_conformance::secrets::percent_encode(wrong)),
        ));
        texts.push_str(&format!("{failed:?}\n"));
        let err = refused(failed, |e| matches!(e, Error::Unauthenticated { .. })).await;
        texts.push_str(&error_text(&err));
        let err = refused(config(&with_credentials(&mtls, wrong)), |e| {
            matches!(e, Error::Unauthenticated { .. })
        })
        .await;
        texts.push_str(&error_text(&err));
        let mut bad_url = NatsConfig::from_url(&format!("tls://u:{password}@h:port"))
            .err()
            .unwrap()
            .to_string();
        bad_url.push('\n');
        texts.push_str(&bad_url);
    });
    texts.push_str(&without_async_nats_connect_trace(&logs.text()));
    assert!(
        texts.contains("polybus_nats") || texts.contains("async_nats"),
        "the logs were captured"
    );
    let key = std::fs::read_to_string(key_file).unwrap();
    let key_body: String = key.lines().filter(|l| !l.starts_with("-----")).take(2).collect();
    assert_no_leak(&texts, &[&password, &token, wrong, &key_body]);
}

/// The log without async-nats's TRACE line of the CONNECT operation, which
/// holds the password or token as sent (async-nats 0.50, target
/// `async_nats::connection`; the README says to keep that target above TRACE).
/// Every other line, at every level, is searched.
fn without_async_nats_connect_trace(logs: &str) -> String {
    let (kept, dropped): (Vec<&str>, Vec<&str>) = logs
        .lines()
        .partition(|l| !(l.contains("async_nats::connection") && l.contains("write operation: CONNECT")));
    assert!(
        dropped.iter().all(|l| l.contains(" TRACE ")),
        "the CONNECT line was logged above TRACE: {dropped:?}"
    );
    kept.join("\n")
}
