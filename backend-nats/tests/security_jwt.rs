//! Operator mode (JWT authentication, issue 16): an operator, an account and
//! users are made here with the `nkeys` crate — `nsc` is not packaged — and
//! their JWTs encoded by hand (header and claims in base64url, signed with the
//! issuer's ed25519 NKey). A private `nats-server` trusts the operator and has
//! the account preloaded (`resolver: MEMORY`). A credentials file connects; a
//! file whose seed does not match its JWT, and a user of an account the server
//! does not know, are refused with `Error::Unauthenticated`, fast.
//! Needs `nats-server` only.

use std::path::Path;
use std::time::{Duration, Instant};

use nkeys::KeyPair;
use polybus_conformance::processes::{spawn, wait_for_port};
use polybus_conformance::secrets::{assert_no_leak, base64url, capture_logs, error_text};
use polybus_conformance::{Recorder, free_port, timeout_multiplier};
use polybus_core::{Error, Message};
use polybus_nats::NatsConfig;

const TEST: &str = "operator_mode_credentials_files";

/// A JWT: `header.claims.signature`, signed by `issuer`.
fn jwt(issuer: &KeyPair, subject: &str, name: &str, nats: &str) -> String {
    jwt_expiring(issuer, subject, name, nats, None)
}

/// A JWT that expires at `exp` (seconds since the epoch), if given.
fn jwt_expiring(issuer: &KeyPair, subject: &str, name: &str, nats: &str, exp: Option<u64>) -> String {
    let header = base64url(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let exp = exp.map(|e| format!(r#""exp":{e},"#)).unwrap_or_default();
    let claims = format!(
        r#"{{"jti":"{subject}{iat}","iat":{iat},{exp}"iss":"{}","name":"{name}","sub":"{subject}","nats":{nats}}}"#,
        issuer.public_key()
    );
    let signed = format!("{header}.{}", base64url(claims.as_bytes()));
    let signature = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", base64url(&signature))
}

fn account_jwt(operator: &KeyPair, account: &KeyPair) -> String {
    jwt(
        operator,
        &account.public_key(),
        "polybus",
        r#"{"limits":{"subs":-1,"data":-1,"payload":-1,"imports":-1,"exports":-1,"wildcards":true,"conn":-1,"leaf":-1},"type":"account","version":2}"#,
    )
}

fn user_jwt(account: &KeyPair, user: &KeyPair) -> String {
    user_jwt_expiring(account, user, None)
}

fn user_jwt_expiring(account: &KeyPair, user: &KeyPair, exp: Option<u64>) -> String {
    jwt_expiring(
        account,
        &user.public_key(),
        "app",
        r#"{"pub":{},"sub":{},"subs":-1,"data":-1,"payload":-1,"type":"user","version":2}"#,
        exp,
    )
}

/// A `.creds` file as `nsc` writes it.
fn write_creds(path: &Path, jwt: &str, seed: &str) {
    std::fs::write(
        path,
        format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        ),
    )
    .unwrap();
}

#[test]
fn operator_mode_credentials_files() {
    let operator = KeyPair::new_operator();
    let account = KeyPair::new_account();
    let stranger_account = KeyPair::new_account();
    let user = KeyPair::new_user();
    let other_user = KeyPair::new_user();
    let dir = std::env::temp_dir().join(format!("polybus-jwt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let operator_file = dir.join("operator.jwt");
    std::fs::write(
        &operator_file,
        jwt(
            &operator,
            &operator.public_key(),
            "polybus-test",
            r#"{"type":"operator","version":2}"#,
        ),
    )
    .unwrap();
    let port = free_port().unwrap();
    let conf = dir.join("operator.conf");
    std::fs::write(
        &conf,
        format!(
            "listen: 127.0.0.1:{port}\noperator: \"{}\"\nresolver: MEMORY\nresolver_preload: {{\n  {}: \"{}\"\n}}\n",
            operator_file.display(),
            account.public_key(),
            account_jwt(&operator, &account)
        ),
    )
    .unwrap();
    let Some(_server) = spawn("nats-server", &["-c", conf.to_str().unwrap()], TEST) else {
        return;
    };
    assert!(
        wait_for_port(port, Duration::from_secs(5)),
        "nats-server in operator mode"
    );

    let good = dir.join("good.creds");
    write_creds(&good, &user_jwt(&account, &user), &user.seed().unwrap());
    // The JWT of one user with the seed of another: the nonce signature fails.
    let mismatched = dir.join("mismatched.creds");
    write_creds(
        &mismatched,
        &user_jwt(&account, &user),
        &other_user.seed().unwrap(),
    );
    // A user of an account the server has never heard of.
    let stranger = dir.join("stranger.creds");
    write_creds(
        &stranger,
        &user_jwt(&stranger_account, &other_user),
        &other_user.seed().unwrap(),
    );

    let timeout = Duration::from_secs_f64(3.0 * timeout_multiplier());
    let config = |creds: &Path| {
        NatsConfig::from_url(&format!(
            "nats://127.0.0.1:{port}?mode=core&creds={}",
            creds.display()
        ))
        .unwrap()
        .connect_timeout(timeout)
    };
    let logs = capture_logs();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut texts = String::new();
    rt.block_on(async {
        let conn = polybus_nats::connect_with(config(&good))
            .await
            .expect("the credentials file connects");
        let recorder = Recorder::new();
        let handle = conn
            .runner()
            .topic("jwt.topic")
            .group("g")
            .run(recorder.handler())
            .await
            .unwrap();
        conn.producer
            .send("jwt.topic", Message::new("signed"))
            .await
            .unwrap();
        recorder
            .wait_for(1, timeout * 3)
            .await
            .expect("the message arrives");
        handle.shutdown(timeout).await;
        conn.close().await.unwrap();

        for (what, creds) in [("mismatched seed", &mismatched), ("unknown account", &stranger)] {
            let started = Instant::now();
            let result = polybus_nats::connect_with(config(creds)).await;
            let took = started.elapsed();
            match result {
                Err(e @ Error::Unauthenticated { .. }) => {
                    assert!(!e.is_retryable());
                    assert!(took < timeout + Duration::from_secs(1), "{what} took {took:?}");
                    texts.push_str(&error_text(&e));
                }
                Err(e) => panic!("{what}: expected Unauthenticated, got {e:?}"),
                Ok(_) => panic!("{what}: the connection must be refused"),
            }
        }
    });
    texts.push_str(&logs.text());
    assert_no_leak(&texts, &[&user.seed().unwrap(), &other_user.seed().unwrap()]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Credential rotation without a restart: a user JWT that expires makes the
/// server close the connection ("User Authentication Expired"); the client
/// reconnects, reading the credentials file again, so a file replaced before
/// then (a renewed JWT, here even another user's key) keeps the producer and
/// the runner going. With the file read once (async-nats's
/// `credentials_file`), every reconnect sends the expired JWT and is refused.
#[test]
fn a_replaced_credentials_file_is_used_at_the_next_reconnect() {
    const TEST: &str = "a_replaced_credentials_file_is_used_at_the_next_reconnect";
    let operator = KeyPair::new_operator();
    let account = KeyPair::new_account();
    let (user, renewed_user) = (KeyPair::new_user(), KeyPair::new_user());
    let dir = std::env::temp_dir().join(format!("polybus-jwt-rotate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let operator_file = dir.join("operator.jwt");
    std::fs::write(
        &operator_file,
        jwt(
            &operator,
            &operator.public_key(),
            "polybus-test",
            r#"{"type":"operator","version":2}"#,
        ),
    )
    .unwrap();
    let port = free_port().unwrap();
    let conf = dir.join("operator.conf");
    std::fs::write(
        &conf,
        format!(
            "listen: 127.0.0.1:{port}\noperator: \"{}\"\nresolver: MEMORY\nresolver_preload: {{\n  {}: \"{}\"\n}}\n",
            operator_file.display(),
            account.public_key(),
            account_jwt(&operator, &account)
        ),
    )
    .unwrap();
    let Some(_server) = spawn("nats-server", &["-c", conf.to_str().unwrap()], TEST) else {
        return;
    };
    assert!(
        wait_for_port(port, Duration::from_secs(5)),
        "nats-server in operator mode"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let lifetime = 3;
    let creds = dir.join("app.creds");
    write_creds(
        &creds,
        &user_jwt_expiring(&account, &user, Some(now + lifetime)),
        &user.seed().unwrap(),
    );
    let m = timeout_multiplier();
    let config = NatsConfig::from_url(&format!(
        "nats://127.0.0.1:{port}?mode=core&creds={}",
        creds.display()
    ))
    .unwrap()
    .connect_timeout(Duration::from_secs_f64(3.0 * m));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = polybus_nats::connect_with(config)
            .await
            .expect("the first credentials connect");
        let recorder = Recorder::new();
        let handle = conn
            .runner()
            .topic("rotated")
            .group("g")
            .run(recorder.handler())
            .await
            .unwrap();
        conn.producer
            .send("rotated", Message::new("before"))
            .await
            .unwrap();
        recorder
            .wait_for(1, Duration::from_secs_f64(5.0 * m))
            .await
            .expect("received with the first credentials");

        // Renewed before the old JWT expires, as a credentials agent would.
        write_creds(
            &creds,
            &user_jwt(&account, &renewed_user),
            &renewed_user.seed().unwrap(),
        );
        tokio::time::sleep(Duration::from_secs(lifetime + 1)).await;

        // Both connections were closed at the expiry and must be back, with the
        // renewed credentials: a message sent now arrives (core NATS loses what
        // is sent while the consumer is away, so send until one arrives).
        let limit = Instant::now() + Duration::from_secs_f64(15.0 * m);
        let mut sent = 1;
        while recorder.len() < 2 {
            assert!(
                Instant::now() < limit,
                "nothing arrives after the expiry: the reconnects were refused ({sent} sent)"
            );
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                conn.producer.send("rotated", Message::new("after")),
            )
            .await;
            sent += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(handle.state(), polybus_core::RunState::Running);
        conn.producer
            .send("rotated", Message::new("settled"))
            .await
            .expect("sends work again");
        handle.shutdown(Duration::from_secs(5)).await;
        let _ = conn.close().await;
    });
    let _ = std::fs::remove_dir_all(&dir);
}
