//! A user's permissions removed while its runner consumes (issue 16). RabbitMQ
//! checks permissions when an operation starts, so a running consumer keeps
//! receiving until its connection is closed (`close_all_user_connections`);
//! then the runner must end with `Error::PermissionDenied` through its handle,
//! at once, instead of reconnecting in a loop. Against the secured node of
//! `scripts/brokers.sh` (`ensure_secure_rabbitmq`), with
//! `POLYBUS_TEST_AMQP_SECURE_URL`, `POLYBUS_TEST_AMQP_SECURE_CTL` and
//! `POLYBUS_TEST_TLS_DIR`; skips loudly without them.

use std::time::{Duration, Instant};

use polybus_conformance::{Recorder, broker_url, timeout_multiplier};
use polybus_core::{Error, Message, RunState, StartFrom};
use polybus_rabbitmq::RabbitConfig;

const TEST: &str = "permissions_cleared_mid_run_end_the_runner";
const VHOST: &str = "polybus-secure";

fn ctl(args: &[&str]) {
    let line = std::env::var("POLYBUS_TEST_AMQP_SECURE_CTL").unwrap();
    let mut words = line.split_whitespace();
    let out = std::process::Command::new(words.next().unwrap())
        .args(words)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn config(url: &str, credentials: &str) -> RabbitConfig {
    let mut config = secured(url, credentials);
    config.request_timeout = Duration::from_secs_f64(5.0 * timeout_multiplier());
    config
}

fn secured(url: &str, credentials: &str) -> RabbitConfig {
    let dir = std::path::PathBuf::from(std::env::var("POLYBUS_TEST_TLS_DIR").unwrap());
    let (scheme, rest) = url.split_once("://").unwrap();
    let host = rest.rsplit_once('@').unwrap().1;
    RabbitConfig::new(&format!("{scheme}://{credentials}@{host}"))
        .unwrap()
        .tls_ca_file(dir.join("ca.pem"))
        .tls_client_auth(dir.join("client.pem"), dir.join("client-key.pem"))
        .connect_timeout(Duration::from_secs_f64(3.0 * timeout_multiplier()))
}

#[test]
fn permissions_cleared_mid_run_end_the_runner() {
    let Some(url) = broker_url("POLYBUS_TEST_AMQP_SECURE_URL", TEST) else {
        return;
    };
    if broker_url("POLYBUS_TEST_AMQP_SECURE_CTL", TEST).is_none() {
        return;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let user = format!("revoked-{nanos}");
    let pass = format!("pw-{nanos}");
    ctl(&["add_user", &user, &pass]);
    ctl(&["set_permissions", "-p", VHOST, &user, ".*", ".*", ".*"]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let admin_credentials = url
        .split_once("://")
        .unwrap()
        .1
        .rsplit_once('@')
        .unwrap()
        .0
        .to_owned();
    let result = rt.block_on(async {
        let admin = polybus_rabbitmq::connect_with(config(&url, &admin_credentials)).await?;
        let topic = format!("revoked-{nanos}");
        admin.consumer.declare_topic(&topic).await?;
        admin
            .consumer
            .declare_group(&topic, "g", StartFrom::Latest)
            .await?;

        let conn = polybus_rabbitmq::connect_with(config(&url, &format!("{user}:{pass}"))).await?;
        let recorder = Recorder::new();
        let handle = conn
            .runner()
            .topic(&topic)
            .group("g")
            .run(recorder.handler())
            .await?;
        admin.producer.send(&topic, Message::new("before")).await?;
        recorder
            .wait_for(1, Duration::from_secs(10))
            .await
            .expect("received before the revocation");

        // RabbitMQ checks permissions when an operation starts (declare,
        // publish, consume): clearing them leaves the running consumer alone.
        ctl(&["clear_permissions", "-p", VHOST, &user]);
        admin.producer.send(&topic, Message::new("after")).await?;
        recorder
            .wait_for(2, Duration::from_secs(10))
            .await
            .expect("RabbitMQ keeps delivering to a consumer whose permissions were cleared");
        assert!(!handle.is_finished());
        // Closing the user's connections makes the revocation bite: the
        // subscription reconnects, the broker refuses the vhost.
        ctl(&["close_all_user_connections", &user, "permissions revoked"]);
        let revoked = Instant::now();
        let limit = Duration::from_secs_f64(10.0 * timeout_multiplier());
        while !handle.is_finished() && revoked.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let state = handle.state();
        let error = handle.error();
        eprintln!(
            "after {:?}: state {state:?}, error {error:?}, handled {}",
            revoked.elapsed(),
            recorder.len()
        );
        assert_eq!(
            state,
            RunState::Failed,
            "the runner must end, not reconnect forever: {error:?}"
        );
        let error = error.expect("the runner reports why it ended");
        assert!(matches!(&*error, Error::PermissionDenied { .. }), "{error:?}");
        assert!(!error.is_retryable());
        let _ = conn.close().await;
        let _ = admin.close().await;
        Ok::<(), Error>(())
    });
    ctl(&["delete_user", &user]);
    result.unwrap();
}
