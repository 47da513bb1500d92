//! A user's permissions removed while its JetStream runner consumes (issue
//! 16): a private `nats-server` is reloaded (SIGHUP) with a configuration that
//! denies the user the stream's JetStream API; its next pull request is
//! refused (`-ERR 'Permissions Violation for Publish to
//! "$JS.API.CONSUMER.MSG.NEXT.…"'`), and the runner must end with
//! `Error::PermissionDenied` through its handle instead of seeing its pulls
//! time out forever. The same for core NATS: a reload that takes a subject
//! away ends the core runner subscribed to it (`-ERR 'Permissions Violation
//! for Subscription to …'`) and fails the next `send` to it. Needs
//! `nats-server` only.

use std::time::{Duration, Instant};

use polybus_conformance::processes::{spawn, wait_for_port};
use polybus_conformance::{Recorder, free_port, timeout_multiplier};
use polybus_core::{Error, Message, RunState, StartFrom};
use polybus_nats::NatsConfig;

const TEST: &str = "permissions_revoked_by_a_reload_end_the_runner";

fn conf(port: u16, store: &std::path::Path, permissions: &str) -> String {
    format!(
        "listen: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\" }}\n\
         authorization {{ users = [\n  {{ user: admin, password: admin-pw-1 }}\n  \
         {{ user: app, password: app-pw-123{permissions} }}\n] }}\n",
        store.display()
    )
}

#[test]
fn permissions_revoked_by_a_reload_end_the_runner() {
    let dir = std::env::temp_dir().join(format!("polybus-nats-revoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port().unwrap();
    let file = dir.join("server.conf");
    std::fs::write(&file, conf(port, &dir.join("store"), "")).unwrap();
    let Some(server) = spawn("nats-server", &["-c", file.to_str().unwrap()], TEST) else {
        return;
    };
    assert!(wait_for_port(port, Duration::from_secs(5)), "nats-server");
    let m = timeout_multiplier();
    let config = |user: &str| {
        let mut c = NatsConfig::from_url(&format!("nats://{user}@127.0.0.1:{port}"))
            .unwrap()
            .connect_timeout(Duration::from_secs_f64(3.0 * m))
            .storage(polybus_nats::Storage::Memory);
        c.pull_expiry = Duration::from_millis(500);
        c
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let admin = polybus_nats::connect_with(config("admin:admin-pw-1"))
            .await
            .unwrap();
        let topic = "revoked";
        admin.consumer.declare_topic(topic).await.unwrap();
        admin
            .consumer
            .declare_group(topic, "g", StartFrom::Latest)
            .await
            .unwrap();
        let app = polybus_nats::connect_with(config("app:app-pw-123"))
            .await
            .unwrap();
        let recorder = Recorder::new();
        let handle = app
            .runner()
            .topic(topic)
            .group("g")
            .run(recorder.handler())
            .await
            .unwrap();
        admin.producer.send(topic, Message::new("before")).await.unwrap();
        recorder
            .wait_for(1, Duration::from_secs(10))
            .await
            .expect("received before the revocation");

        // Reload with the stream's JetStream API denied to `app`.
        std::fs::write(
            &file,
            conf(
                port,
                &dir.join("store"),
                ", permissions: { publish: { deny: [\"$JS.API.>\"] } }",
            ),
        )
        .unwrap();
        let status = std::process::Command::new("kill")
            .args(["-HUP", &server.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let revoked = Instant::now();
        let limit = Duration::from_secs_f64(10.0 * m);
        while !handle.is_finished() && revoked.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (state, error) = (handle.state(), handle.error());
        assert_eq!(state, RunState::Failed, "the runner must end: {error:?}");
        let error = error.expect("the runner says why");
        assert!(matches!(&*error, Error::PermissionDenied { .. }), "{error:?}");
        assert!(!error.is_retryable());
        let _ = app.close().await;
        let _ = admin.close().await;
    });
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

const CORE_TEST: &str = "core_permissions_revoked_by_a_reload_end_the_runner_and_fail_sends";

#[test]
fn core_permissions_revoked_by_a_reload_end_the_runner_and_fail_sends() {
    let dir = std::env::temp_dir().join(format!("polybus-nats-revoke-core-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port().unwrap();
    let file = dir.join("server.conf");
    std::fs::write(&file, conf(port, &dir.join("store"), "")).unwrap();
    let Some(server) = spawn("nats-server", &["-c", file.to_str().unwrap()], CORE_TEST) else {
        return;
    };
    assert!(wait_for_port(port, Duration::from_secs(5)), "nats-server");
    let m = timeout_multiplier();
    let config = |user: &str| {
        NatsConfig::from_url(&format!("nats://{user}@127.0.0.1:{port}?mode=core"))
            .unwrap()
            .connect_timeout(Duration::from_secs_f64(3.0 * m))
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let admin = polybus_nats::connect_with(config("admin:admin-pw-1"))
            .await
            .unwrap();
        let app = polybus_nats::connect_with(config("app:app-pw-123"))
            .await
            .unwrap();
        let (topic, other) = ("revoked.core", "still.allowed");
        let recorder = Recorder::new();
        let handle = app
            .runner()
            .topic(topic)
            .group("g")
            .run(recorder.handler())
            .await
            .unwrap();
        let others = Recorder::new();
        let other_handle = app.runner().topic(other).run(others.handler()).await.unwrap();
        admin.producer.send(topic, Message::new("before")).await.unwrap();
        app.producer.send(topic, Message::new("mine")).await.unwrap();
        recorder
            .wait_for(2, Duration::from_secs(10))
            .await
            .expect("received before the revocation");

        // Reload with the topic denied to `app`, both ways.
        std::fs::write(
            &file,
            conf(
                port,
                &dir.join("store"),
                ", permissions: { publish: { deny: [\"revoked.>\"] }, subscribe: { deny: [\"revoked.>\"] } }",
            ),
        )
        .unwrap();
        let status = std::process::Command::new("kill")
            .args(["-HUP", &server.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let revoked = Instant::now();
        let limit = Duration::from_secs_f64(10.0 * m);
        while !handle.is_finished() && revoked.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (state, error) = (handle.state(), handle.error());
        assert_eq!(state, RunState::Failed, "the runner must end: {error:?}");
        let error = error.expect("the runner says why");
        assert!(matches!(&*error, Error::PermissionDenied { .. }), "{error:?}");
        assert!(error.to_string().contains(topic), "{error}");
        assert!(!error.is_retryable());

        // The next send to it fails (the reload is done: the runner saw it).
        let started = Instant::now();
        let err = app
            .producer
            .send(topic, Message::new("after"))
            .await
            .expect_err("a send to a revoked subject must fail");
        assert!(matches!(err, Error::PermissionDenied { .. }), "{err:?}");
        assert!(err.to_string().contains(topic), "{err}");
        assert!(started.elapsed() < Duration::from_secs_f64(3.0 * m));

        // What is still allowed keeps working on the same connections.
        assert_eq!(other_handle.state(), RunState::Running);
        app.producer.send(other, Message::new("fine")).await.unwrap();
        others
            .wait_for(1, Duration::from_secs(10))
            .await
            .expect("the other subject still flows");
        other_handle.shutdown(Duration::from_secs(5)).await;
        let _ = app.close().await;
        let _ = admin.close().await;
    });
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
