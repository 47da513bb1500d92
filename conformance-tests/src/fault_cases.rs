//! Conformance cases for the runner's fault paths (dead letters, panics,
//! backoff, fatal errors, settlement, shutdown), run on every backend with the
//! faults injected through [`crate::faults`] around the real broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use polybus_core::{
    Connection, Delivery, Ended, Error, HandlerError, HandlerResult, Message, Order, Producer, RetryPolicy,
    RunState, Runner, StartFrom, SubscribeOptions,
};

use crate::cases::{dead_letter_listener, index_of, needs_at_least_once, numbered, publish};
use crate::faults::{AckFault, FaultyProducer, FaultySubscription};
use crate::{CaseResult, Ctx, Harness, Outcome, Recorder};

fn quick_retry() -> RetryPolicy {
    RetryPolicy::attempts(5).backoff(Duration::from_millis(20), Duration::from_millis(200))
}

/// A runner on `topic`/`group` whose dead letters go through `producer`.
fn runner_with<H: Harness>(
    cx: &Ctx<H>,
    conn: &Connection,
    producer: Arc<dyn Producer>,
    topic: &str,
    group: &str,
) -> Runner {
    cx.harness().tune_runner(
        Runner::new(Arc::clone(&conn.consumer), producer)
            .topic(topic)
            .group(group)
            .retry(quick_retry()),
    )
}

/// A handler that counts its calls and fails every one with a permanent error.
fn always_refuses(
    calls: Recorder,
) -> impl Fn(Delivery) -> futures::future::BoxFuture<'static, HandlerResult> {
    move |d: Delivery| {
        let calls = calls.clone();
        Box::pin(async move {
            calls.record(&d);
            Err(HandlerError::permanent("refused by the test handler"))
        })
    }
}

/// Issue 11, item 1: the dead-letter copy keeps the message's bytes — a long key,
/// a long header value, a long id, a binary payload — and only polybus's own
/// headers are added.
pub async fn dead_letter_copy_is_byte_exact<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "dlqexact").await?;
    let (dead, dlq_handle) = dead_letter_listener(&cx, &conn, &topic).await?;
    let calls = Recorder::new();
    let handle = cx
        .runner(&conn, &topic, &group)
        .run(always_refuses(calls.clone()))
        .await?;
    let payload: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
    let message = Message::new(payload)
        .with_key(format!("key-{}", "k".repeat(1500)))
        .with_header("big", format!("Zürich-{}", "v".repeat(2000)))
        .with_header("empty", "")
        .with_id(format!("id-{}", "i".repeat(1100)));
    conn.producer.send(&topic, message.clone()).await?;
    let got = dead.wait_for(1, cx.secs(30.0)).await?;
    let report = handle.shutdown(cx.secs(10.0)).await;
    dlq_handle.shutdown(cx.secs(10.0)).await;
    let d = &got[0];
    assert_eq!(d.payload(), &message.payload, "payload");
    assert_eq!(d.key_bytes(), message.key.as_ref(), "key (1,504 bytes)");
    assert_eq!(d.message().headers, message.headers, "user headers");
    assert_eq!(d.id(), message.id, "id (1,103 bytes)");
    let info = d.dead_letter().expect("dead-letter headers");
    assert!(info.stub.is_none(), "an exact copy, not a stub: {:?}", info.stub);
    let original = info
        .original_timestamp
        .expect("the original time travels in a header");
    let drift = original
        .duration_since(message.timestamp)
        .or_else(|e| Ok::<_, std::convert::Infallible>(e.duration()))
        .unwrap_or_default();
    assert!(
        drift < Duration::from_secs(1),
        "original timestamp kept ({drift:?} off)"
    );
    assert_eq!((report.dead_lettered, report.handled), (1, 0));
    assert!(report.is_clean(), "{report:?}");
    assert!(cx.eventually_drained(&topic, &group, cx.secs(10.0)).await?);
    Ok(Outcome::Passed)
}

/// Issue 11, item 2: a dead-letter publish that fails with a retryable error is
/// retried until it succeeds; the message stays held meanwhile, then is acked.
pub async fn dead_letter_retryable_failure_is_retried<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "dlqretry").await?;
    let (dead, dlq_handle) = dead_letter_listener(&cx, &conn, &topic).await?;
    let faulty = FaultyProducer::new(Arc::clone(&conn.producer));
    let dlq = polybus_core::names::dead_letter_topic(&topic);
    faulty.fail_next(&dlq, 2, || Error::connection("test", "injected outage"));
    let calls = Recorder::new();
    let handle = runner_with(&cx, &conn, faulty.clone(), &topic, &group)
        .run(always_refuses(calls.clone()))
        .await?;
    let sent = publish(&conn, &topic, vec![numbered("dlqretry", 0)]).await?;
    let got = dead.wait_for(1, cx.secs(30.0)).await?;
    let report = handle.shutdown(cx.secs(10.0)).await;
    dlq_handle.shutdown(cx.secs(10.0)).await;
    assert_eq!(got[0].id(), sent[0].id);
    assert_eq!(faulty.injected(), 2);
    assert_eq!(
        (report.dead_lettered, report.dead_letter_failures, report.released),
        (1, 2, 0)
    );
    assert_eq!(
        calls.len(),
        1,
        "the handler is not run again for a dead-letter retry"
    );
    assert!(report.is_clean(), "{report:?}");
    assert!(cx.eventually_drained(&topic, &group, cx.secs(10.0)).await?);
    Ok(Outcome::Passed)
}

/// Issue 11, item 2: a dead letter the environment refuses for good (the
/// runner's producer was closed first, a common order in application code) is
/// not retried in a loop: the message is released, the runner ends with the
/// error through its handle, and nothing is lost.
pub async fn dead_letter_refused_ends_the_runner<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "dlqclosed").await?;
    let dead_producer = cx.connect().await?;
    let calls = Recorder::new();
    let handle = runner_with(&cx, &conn, Arc::clone(&dead_producer.producer), &topic, &group)
        .run(always_refuses(calls.clone()))
        .await?;
    dead_producer.producer.close().await?;
    let sent = publish(
        &conn,
        &topic,
        (0..2).map(|i| numbered("dlqclosed", i).with_key("k")).collect(),
    )
    .await?;
    let report = tokio::time::timeout(cx.secs(20.0), handle.wait())
        .await
        .map_err(|_| "the runner kept retrying a dead letter that can never succeed")?;
    assert!(
        matches!(report.error(), Some(Error::Closed(_))),
        "ends with the producer's error: {report:?}"
    );
    assert!(matches!(report.ended, Some(Ended::Failed(_))));
    assert_eq!(handle.state(), RunState::Failed);
    assert!(matches!(handle.error().as_deref(), Some(Error::Closed(_))));
    assert_eq!((report.dead_lettered, report.handled), (0, 0));
    assert!(report.released >= 1, "the message was given back: {report:?}");
    // Shutting down a failed runner returns the same report at once.
    let again = tokio::time::timeout(cx.secs(5.0), handle.shutdown(cx.secs(5.0))).await?;
    assert_eq!(again, report);
    if let Some(skip) = needs_at_least_once(&cx) {
        return Ok(skip);
    }
    // Nothing was lost: a healthy runner of the group gets both messages.
    let recorder = Recorder::new();
    let healthy = cx.runner(&conn, &topic, &group).run(recorder.handler()).await?;
    let got = recorder
        .wait_until("both messages again", cx.secs(30.0), |seen| {
            sent.iter().all(|m| seen.iter().any(|d| d.id() == m.id))
        })
        .await?;
    if cx.caps().key_order_across_instances {
        // Where the broker keeps key order across instances (Kafka), it holds
        // across this release too; elsewhere redeliveries may interleave
        // (DESIGN: "after a crash, redelivered messages may interleave").
        let order: Vec<usize> = got.iter().map(index_of).collect();
        let first_one = order.iter().position(|i| *i == 1).unwrap_or(0);
        assert!(
            order[..first_one].contains(&0),
            "the key's order survives the release: {order:?}"
        );
    }
    let _ = healthy.shutdown(cx.secs(10.0)).await;
    Ok(Outcome::Passed)
}

/// Issue 11, item 2: a dead letter refused because of the message itself (too
/// large for the dead-letter topic) becomes a labelled stub, and the original is
/// acked, so one record never stops the group.
pub async fn dead_letter_too_large_sends_a_stub<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "dlqstub").await?;
    let (dead, dlq_handle) = dead_letter_listener(&cx, &conn, &topic).await?;
    let faulty = FaultyProducer::new(Arc::clone(&conn.producer));
    let dlq = polybus_core::names::dead_letter_topic(&topic);
    faulty.fail_next(&dlq, 1, || Error::PayloadTooLarge {
        size: 9_999_999,
        max: 1,
    });
    let handled = Recorder::new();
    let handler = {
        let handled = handled.clone();
        move |d: Delivery| {
            let handled = handled.clone();
            async move {
                if index_of(&d) == 0 {
                    return Err(HandlerError::permanent("poison"));
                }
                handled.record(&d);
                Ok(())
            }
        }
    };
    let handle = runner_with(&cx, &conn, faulty.clone(), &topic, &group)
        .run(handler)
        .await?;
    let sent = publish(
        &conn,
        &topic,
        (0..3).map(|i| numbered("dlqstub", i).with_key("k")).collect(),
    )
    .await?;
    let got = dead.wait_for(1, cx.secs(30.0)).await?;
    handled.wait_for(2, cx.secs(30.0)).await?;
    let report = handle.shutdown(cx.secs(10.0)).await;
    dlq_handle.shutdown(cx.secs(10.0)).await;
    let stub = &got[0];
    let info = stub.dead_letter().expect("dead-letter headers");
    let label = info.stub.expect("a labelled stub");
    assert!(label.contains("user headers left out"), "{label}");
    assert!(
        info.reason.contains("poison") && info.reason.contains("refused"),
        "{}",
        info.reason
    );
    assert_eq!(stub.id(), sent[0].id, "the stub keeps the id");
    assert_eq!(stub.key(), Some("k"), "and the key");
    assert_eq!(stub.payload(), &sent[0].payload, "and the payload that fits");
    assert_eq!(
        (report.dead_lettered, report.handled, report.dead_letter_failures),
        (1, 2, 1)
    );
    assert!(cx.eventually_drained(&topic, &group, cx.secs(10.0)).await?);
    Ok(Outcome::Passed)
}

/// Issue 11, item 3: panics outside the handler's own guard — in the error's
/// `Display`, in the dead-letter publish — are failed attempts bounded by
/// `max_attempts`, never an unlimited retry.
pub async fn panics_outside_the_handler_are_bounded<H: Harness>(cx: Ctx<H>) -> CaseResult {
    #[derive(Debug)]
    struct PanickyError;
    impl std::fmt::Display for PanickyError {
        fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            panic!("Display bug (expected by panics_outside_the_handler_are_bounded)")
        }
    }
    impl std::error::Error for PanickyError {}

    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "panicout").await?;
    let (dead, dlq_handle) = dead_letter_listener(&cx, &conn, &topic).await?;
    let faulty = FaultyProducer::new(Arc::clone(&conn.producer));
    faulty.panic_next(&polybus_core::names::dead_letter_topic(&topic), 1);
    let calls = Recorder::new();
    let handler = {
        let calls = calls.clone();
        move |d: Delivery| {
            let calls = calls.clone();
            async move {
                calls.record(&d);
                Err(HandlerError::retryable(PanickyError))
            }
        }
    };
    let handle = runner_with(&cx, &conn, faulty.clone(), &topic, &group)
        .retry(RetryPolicy::attempts(2).backoff(Duration::from_millis(10), Duration::from_millis(20)))
        .run(handler)
        .await?;
    let sent = publish(&conn, &topic, vec![numbered("panicout", 0)]).await?;
    let got = dead.wait_for(1, cx.secs(30.0)).await?;
    tokio::time::sleep(cx.secs(0.5)).await;
    let report = handle.shutdown(cx.secs(10.0)).await;
    dlq_handle.shutdown(cx.secs(10.0)).await;
    assert_eq!(
        calls.len(),
        2,
        "two attempts, then dead-lettered (not retried forever)"
    );
    assert_eq!(got[0].id(), sent[0].id);
    let info = got[0].dead_letter().expect("dead-letter headers");
    assert!(info.reason.contains("panicked"), "{}", info.reason);
    assert!(
        info.stub.is_some(),
        "the publish that panicked was replaced by a stub"
    );
    assert_eq!((report.retried, report.dead_lettered, report.handled), (1, 1, 0));
    assert!(cx.eventually_drained(&topic, &group, cx.secs(10.0)).await?);
    Ok(Outcome::Passed)
}

/// Issue 11, item 3: a panic after the ack (a client-library bug) never makes the
/// message run again; it is reported as a settlement failure.
pub async fn panic_after_ack_is_not_handled_again<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "ackpanic").await?;
    let sub = conn
        .consumer
        .subscribe(SubscribeOptions::new(&topic).group(&group).prefetch(16))
        .await?;
    let (sub, faults) = FaultySubscription::wrap(sub);
    faults.acks(AckFault::PanicAfterAck, 1);
    let calls = Recorder::new();
    let handle = cx
        .runner(&conn, &topic, &group)
        .order(Order::Sequential)
        .run_subscription(sub, calls.handler())?;
    // One key: one partition on partitioned brokers, so delivery order is
    // publish order.
    publish(
        &conn,
        &topic,
        (0..3).map(|i| numbered("ackpanic", i).with_key("k")).collect(),
    )
    .await?;
    calls.wait_for(3, cx.secs(30.0)).await?;
    tokio::time::sleep(cx.secs(1.0)).await;
    let report = handle.shutdown(cx.secs(10.0)).await;
    assert_eq!(faults.acks_injected(), 1);
    let indexes: Vec<usize> = calls.all().iter().map(index_of).collect();
    assert_eq!(indexes, vec![0, 1, 2], "each message handled once");
    assert_eq!((report.handled, report.settle_failures), (2, 1), "{report:?}");
    assert!(cx.eventually_drained(&topic, &group, cx.secs(10.0)).await?);
    Ok(Outcome::Passed)
}

/// Issue 11, item 4: while one key waits out a long backoff with more of its
/// messages queued behind it, other keys are pulled and handled.
pub async fn backoff_does_not_stall_other_keys<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "stall").await?;
    let handled = Recorder::new();
    let failed_once = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (handled, failed_once) = (handled.clone(), Arc::clone(&failed_once));
        move |d: Delivery| {
            let (handled, failed_once) = (handled.clone(), Arc::clone(&failed_once));
            async move {
                if d.key() == Some("a")
                    && index_of(&d) == 0
                    && failed_once.fetch_add(1, Ordering::SeqCst) == 0
                {
                    return Err(HandlerError::retryable("a is busy"));
                }
                handled.record(&d);
                Ok(())
            }
        }
    };
    let backoff = cx.secs(4.0);
    let retry = RetryPolicy {
        jitter: 0.0,
        ..RetryPolicy::attempts(5).backoff(backoff, backoff)
    };
    let handle = cx
        .runner(&conn, &topic, &group)
        .concurrency(2)
        .buffer(2)
        .retry(retry)
        .run(handler)
        .await?;
    let mut messages: Vec<Message> = (0..4).map(|i| numbered("stall", i).with_key("a")).collect();
    messages.push(numbered("stall", 4).with_key("b"));
    let start = tokio::time::Instant::now();
    publish(&conn, &topic, messages).await?;
    handled
        .wait_until("key b", backoff.mul_f64(0.6), |seen| {
            seen.iter().any(|d| d.key() == Some("b"))
        })
        .await
        .map_err(|e| format!("key b waited for key a's backoff: {e}"))?;
    let b_after = start.elapsed();
    let got = handled.wait_for(5, cx.secs(30.0)).await?;
    let report = handle.shutdown(cx.secs(10.0)).await;
    let a_order: Vec<usize> = got
        .iter()
        .filter(|d| d.key() == Some("a"))
        .map(index_of)
        .collect();
    assert_eq!(
        a_order,
        vec![0, 1, 2, 3],
        "key a keeps its order across the retry"
    );
    assert!(b_after < backoff, "b handled after {b_after:?}");
    assert_eq!((report.handled, report.retried), (5, 1));
    Ok(Outcome::Passed)
}

/// Issue 11, item 5: a subscription error that no retry can fix ends the runner
/// visibly: `wait` returns the error, the state is `Failed`.
pub async fn fatal_subscription_error_is_reported<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "fatal").await?;
    let sub = conn
        .consumer
        .subscribe(SubscribeOptions::new(&topic).group(&group).prefetch(16))
        .await?;
    let (sub, faults) = FaultySubscription::wrap(sub);
    faults.fail_after(2, || Error::NotFound {
        what: "the group's consumer (deleted, injected by the test)".into(),
    });
    let calls = Recorder::new();
    let handle = cx
        .runner(&conn, &topic, &group)
        .run_subscription(sub, calls.handler())?;
    assert_eq!(handle.state(), RunState::Running);
    publish(&conn, &topic, (0..3).map(|i| numbered("fatal", i)).collect()).await?;
    let report = tokio::time::timeout(cx.secs(20.0), handle.wait())
        .await
        .map_err(|_| "the runner did not end after a fatal subscription error")?;
    assert!(
        matches!(report.error(), Some(Error::NotFound { .. })),
        "{report:?}"
    );
    assert_eq!(handle.state(), RunState::Failed);
    assert!(!report.is_clean());
    let run_until = handle.run_until(std::future::pending::<()>(), cx.secs(1.0)).await;
    assert!(run_until.error().is_some(), "run_until reports it too");
    Ok(Outcome::Passed)
}

/// Issue 11, item 6: an ack that never returns is bounded by the settle timeout:
/// it is reported, the key's next message is handled, and the broker keeps the
/// unacked message (it is delivered again).
pub async fn hung_ack_is_bounded<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "hungack").await?;
    let sub = conn
        .consumer
        .subscribe(SubscribeOptions::new(&topic).group(&group).prefetch(16))
        .await?;
    let (sub, faults) = FaultySubscription::wrap(sub);
    faults.acks(AckFault::Hang, 1);
    let calls = Recorder::new();
    let settle = cx.secs(1.0);
    let handle = cx
        .runner(&conn, &topic, &group)
        .settle_timeout(settle)
        .run_subscription(sub, calls.handler())?;
    let sent = publish(
        &conn,
        &topic,
        (0..2).map(|i| numbered("hungack", i).with_key("k")).collect(),
    )
    .await?;
    calls
        .wait_until("the key's second message", settle + cx.secs(10.0), |seen| {
            seen.iter().any(|d| index_of(d) == 1)
        })
        .await?;
    let report = handle.shutdown(cx.secs(10.0)).await;
    assert_eq!(faults.acks_injected(), 1);
    assert!(
        report.settle_failures >= 1,
        "the hung ack is reported: {report:?}"
    );
    if let Some(skip) = needs_at_least_once(&cx) {
        return Ok(skip);
    }
    // Not acked, so not lost: the group delivers it again.
    let again = Recorder::new();
    let next = cx.runner(&conn, &topic, &group).run(again.handler()).await?;
    let redelivered = calls.all().iter().filter(|d| d.id() == sent[0].id).count() > 1;
    if !redelivered {
        again
            .wait_until("the unacked message again", cx.secs(60.0), |seen| {
                seen.iter().any(|d| d.id() == sent[0].id)
            })
            .await?;
    }
    let _ = next.shutdown(cx.secs(10.0)).await;
    Ok(Outcome::Passed)
}

/// Issue 11, item 7: shutdown stops consumption before it releases, so a message
/// that waited unstarted costs one delivery per graceful restart, not two.
pub async fn shutdown_release_costs_one_attempt<H: Harness>(cx: Ctx<H>) -> CaseResult {
    if let Some(skip) = needs_at_least_once(&cx) {
        return Ok(skip);
    }
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "relatt").await?;
    let started = Recorder::new();
    let handler = {
        let started = started.clone();
        move |d: Delivery| {
            let started = started.clone();
            async move {
                started.record(&d);
                // Never finishes by itself: cancelled at the shutdown deadline.
                std::future::pending::<()>().await;
                HandlerResult::Ok(())
            }
        }
    };
    let handle = cx
        .runner(&conn, &topic, &group)
        .concurrency(1)
        .buffer(8)
        .run(handler)
        .await?;
    let sent = publish(&conn, &topic, (0..6).map(|i| numbered("relatt", i)).collect()).await?;
    started.wait_for(1, cx.secs(30.0)).await?;
    // Let the runner take the rest into its buffer.
    tokio::time::sleep(cx.secs(1.0)).await;
    let report = handle.shutdown(cx.secs(0.5)).await;
    assert_eq!(report.abandoned, 1, "{report:?}");
    let recorder = Recorder::new();
    let next = cx.runner(&conn, &topic, &group).run(recorder.handler()).await?;
    let got = recorder
        .wait_until("every message", cx.secs(60.0), |seen| {
            sent.iter().all(|m| seen.iter().any(|d| d.id() == m.id))
        })
        .await?;
    let _ = next.shutdown(cx.secs(10.0)).await;
    for d in &got {
        assert!(
            d.attempt() <= 2,
            "message {} arrived at attempt {} after one graceful restart",
            index_of(d),
            d.attempt()
        );
    }
    Ok(Outcome::Passed)
}

/// The runner's prefetch leaves room for backoff parking, and the time of a
/// dead letter is when it was dead-lettered (retention by time keeps it).
pub async fn dead_letter_is_timestamped_now<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "dlqtime").await?;
    let dlq = polybus_core::names::dead_letter_topic(&topic);
    let dlq_group = cx.group_name("dlq");
    conn.consumer
        .declare_group(&dlq, &dlq_group, StartFrom::Latest)
        .await?;
    let dead = Recorder::new();
    let dlq_handle = cx.runner(&conn, &dlq, &dlq_group).run(dead.handler()).await?;
    let calls = Recorder::new();
    let handle = cx
        .runner(&conn, &topic, &group)
        .run(always_refuses(calls.clone()))
        .await?;
    let mut old = numbered("dlqtime", 0);
    old.timestamp = SystemTime::now() - Duration::from_secs(30 * 24 * 3600);
    conn.producer.send(&topic, old.clone()).await?;
    let got = dead.wait_for(1, cx.secs(30.0)).await?;
    let _ = handle.shutdown(cx.secs(10.0)).await;
    let _ = dlq_handle.shutdown(cx.secs(10.0)).await;
    let info = got[0].dead_letter().expect("dead-letter headers");
    let original = info.original_timestamp.expect("original time header");
    let off = |a: SystemTime, b: SystemTime| a.duration_since(b).unwrap_or_else(|e| e.duration());
    assert!(
        off(original, old.timestamp) < Duration::from_secs(1),
        "original time kept"
    );
    assert!(
        off(got[0].message().timestamp, SystemTime::now()) < Duration::from_secs(300),
        "the dead letter is stamped when it was dead-lettered, not 30 days ago"
    );
    Ok(Outcome::Passed)
}

/// An overloaded handler (`HandlerError::overloaded`, tower's `load_shed`)
/// gives its message back to come again after the retry policy's initial
/// backoff: where the broker delays redelivery (memory, JetStream) the broker
/// waits, elsewhere the runner holds the message for the backoff. A shutdown
/// during that backoff neither waits for it nor loses the message: it returns
/// at once, counts one release and no settle failure, and (where the runner
/// held it) the next runner of the group gets the message without the backoff.
pub async fn overloaded_message_comes_back_after_a_backoff<H: Harness>(cx: Ctx<H>) -> CaseResult {
    if let Some(skip) = needs_at_least_once(&cx) {
        return Ok(skip);
    }
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "shed").await?;
    let calls: Arc<std::sync::Mutex<Vec<(usize, tokio::time::Instant)>>> = Arc::default();
    let handler = {
        let calls = Arc::clone(&calls);
        move |d: Delivery| {
            let calls = Arc::clone(&calls);
            async move {
                let index = index_of(&d);
                let first = {
                    let mut calls = calls.lock().unwrap_or_else(|p| p.into_inner());
                    let first = !calls.iter().any(|(i, _)| *i == index);
                    calls.push((index, tokio::time::Instant::now()));
                    first
                };
                if first {
                    return Err(HandlerError::overloaded("busy"));
                }
                HandlerResult::Ok(())
            }
        }
    };
    let calls_of = |index: usize| -> Vec<tokio::time::Instant> {
        let calls = calls.lock().unwrap_or_else(|p| p.into_inner());
        calls
            .iter()
            .filter(|(i, _)| *i == index)
            .map(|(_, at)| *at)
            .collect()
    };
    // 1. Overloaded once, back after the backoff, then handled.
    let backoff = Duration::from_millis(400);
    let handle = cx
        .runner(&conn, &topic, &group)
        .retry(RetryPolicy::attempts(10).backoff(backoff, backoff))
        .run(handler.clone())
        .await?;
    publish(&conn, &topic, vec![numbered("shed", 0)]).await?;
    let until = tokio::time::Instant::now() + cx.secs(20.0);
    while handle.stats().handled < 1 {
        assert!(
            tokio::time::Instant::now() < until,
            "not handled: {:?}",
            handle.stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = handle.shutdown(cx.secs(10.0)).await;
    let seen = calls_of(0);
    assert_eq!(seen.len(), 2, "one overload, then handled");
    let gap = seen[1] - seen[0];
    assert!(
        gap >= backoff - Duration::from_millis(20),
        "came back {gap:?} after an overload (backoff {backoff:?})"
    );
    assert_eq!(
        (report.handled, report.dead_lettered, report.settle_failures),
        (1, 0, 0),
        "{report:?}"
    );

    // 2. A shutdown while an overloaded message waits out a long backoff.
    let backoff = Duration::from_secs(30);
    let handle = cx
        .runner(&conn, &topic, &group)
        .retry(RetryPolicy::attempts(10).backoff(backoff, backoff))
        .run(handler.clone())
        .await?;
    publish(&conn, &topic, vec![numbered("shed", 1)]).await?;
    let until = tokio::time::Instant::now() + cx.secs(20.0);
    while calls_of(1).is_empty() {
        assert!(
            tokio::time::Instant::now() < until,
            "message 1 never reached the handler"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = tokio::time::Instant::now();
    let report = handle.shutdown(cx.secs(5.0)).await;
    let took = stopping.elapsed();
    assert!(
        took < cx.secs(3.0),
        "shutdown took {took:?} with an overloaded message in its backoff"
    );
    assert_eq!(calls_of(1).len(), 1, "handled again before its backoff");
    assert_eq!(
        (report.handled, report.released, report.settle_failures),
        (0, 1, 0),
        "{report:?}"
    );
    if !cx.caps().delayed_release {
        // The runner held it: given back at shutdown, the next runner has it now.
        let handle = cx.runner(&conn, &topic, &group).run(handler).await?;
        let until = tokio::time::Instant::now() + cx.secs(20.0);
        while handle.stats().handled < 1 {
            assert!(
                tokio::time::Instant::now() < until,
                "the message given back at shutdown did not come back: {:?}",
                handle.stats()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        handle.shutdown(cx.secs(10.0)).await;
        let seen = calls_of(1);
        assert!(
            seen[1] - seen[0] < backoff,
            "the next runner waited out the backoff"
        );
    }
    Ok(Outcome::Passed)
}
