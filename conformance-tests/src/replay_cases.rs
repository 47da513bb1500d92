//! Replay to a point in time and repositioning an existing group, on every
//! backend that declares the capability (`replay_from_time`, `reposition`).

use std::collections::HashSet;
use std::time::Duration;

use polybus_core::{CatchUp, Delivery, Ended, Error, HandlerResult, Message, StartFrom};

use crate::cases::{numbered, publish, unique_ids};
use crate::{CaseResult, Ctx, Harness, Outcome, Recorder};

/// A new group starting at a point in time gets exactly the messages appended
/// at or after it. A backend that cannot seek by time refuses such a start
/// with `Error::Unsupported` (checked, then the case is skipped).
pub async fn replay_from_timestamp<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let topic = cx.topic(&conn, "replay-time").await?;
    if !cx.caps().replay_from_time {
        if !conn.consumer.capabilities().replay_from_time {
            let group = cx.group_name("at");
            let start = StartFrom::Timestamp(std::time::SystemTime::now());
            let refused = conn.consumer.declare_group(&topic, &group, start).await;
            assert!(matches!(refused, Err(Error::Unsupported(_))), "{refused:?}");
        }
        return Ok(Outcome::Skipped(format!(
            "{} under test cannot start a group at a point in time (capabilities.replay_from_time = false); \
             where the backend says so, declaring one is Error::Unsupported",
            cx.caps().backend
        )));
    }
    let old = publish(&conn, &topic, (0..10).map(|i| numbered("old", i)).collect()).await?;
    // Millisecond timestamps: keep clear of the boundary on both sides.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let at = std::time::SystemTime::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let new = publish(&conn, &topic, (10..20).map(|i| numbered("new", i)).collect()).await?;
    let group = cx.group_name("at");
    conn.consumer
        .declare_group(&topic, &group, StartFrom::Timestamp(at))
        .await?;
    let later = publish(&conn, &topic, (20..25).map(|i| numbered("later", i)).collect()).await?;
    let recorder = Recorder::new();
    let handle = cx.runner(&conn, &topic, &group).run(recorder.handler()).await?;
    recorder.wait_for(15, cx.secs(30.0)).await?;
    assert!(cx.eventually_drained(&topic, &group, cx.secs(10.0)).await?);
    handle.shutdown(cx.secs(10.0)).await;
    let expected: HashSet<String> = new.iter().chain(&later).map(|m| m.id.clone()).collect();
    let got = unique_ids(&recorder.all());
    let early: Vec<&String> = old.iter().map(|m| &m.id).filter(|id| got.contains(*id)).collect();
    assert!(
        early.is_empty(),
        "messages from before the time were replayed: {early:?}"
    );
    assert_eq!(got, expected, "exactly the messages at or after the time");
    Ok(Outcome::Passed)
}

/// Repositioning an existing group ("rebuild the projection"): refused while
/// the group has a member; once stopped, moved to the earliest message it gets
/// everything again, and moved to a time it gets what was appended from then.
/// A backend without the capability refuses with `Error::Unsupported`.
pub async fn reposition_group_replays<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "reposition").await?;
    if !cx.caps().reposition {
        let refused = conn
            .consumer
            .reposition_group(&topic, &group, StartFrom::Earliest)
            .await;
        assert!(matches!(refused, Err(Error::Unsupported(_))), "{refused:?}");
        return Ok(Outcome::Skipped(format!(
            "{} cannot reposition an existing group (capabilities.reposition = false); it says so with Error::Unsupported",
            cx.caps().backend
        )));
    }
    let first = publish(&conn, &topic, (0..5).map(|i| numbered("first", i)).collect()).await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let at = std::time::SystemTime::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = publish(&conn, &topic, (5..8).map(|i| numbered("second", i)).collect()).await?;
    let ids = |ms: &[Message]| ms.iter().map(|m| m.id.clone()).collect::<HashSet<_>>();
    let all: HashSet<String> = ids(&first).union(&ids(&second)).cloned().collect();
    // Consume everything once.
    let recorder = Recorder::new();
    let handle = cx.runner(&conn, &topic, &group).run(recorder.handler()).await?;
    recorder.wait_for(8, cx.secs(30.0)).await?;
    assert!(cx.eventually_drained(&topic, &group, cx.secs(10.0)).await?);
    let refused = conn
        .consumer
        .reposition_group(&topic, &group, StartFrom::Earliest)
        .await;
    assert!(
        matches!(&refused, Err(Error::InvalidConfig(m)) if m.contains("active member")),
        "repositioning a group with a member is refused, saying why: {refused:?}"
    );
    handle.shutdown(cx.secs(10.0)).await;
    let missing = conn
        .consumer
        .reposition_group(&topic, &cx.group_name("missing"), StartFrom::Earliest)
        .await;
    assert!(matches!(missing, Err(Error::NotFound { .. })), "{missing:?}");
    for (start, expected) in [
        (StartFrom::Earliest, all.clone()),
        (StartFrom::Timestamp(at), ids(&second)),
    ] {
        if matches!(start, StartFrom::Timestamp(_)) && !cx.caps().replay_from_time {
            crate::loud(&format!(
                "SKIP {} (to a time): {} under test cannot seek by time (capabilities.replay_from_time = false); \
                 the rest of the case ran",
                cx.case(),
                cx.caps().backend
            ));
            continue;
        }
        conn.consumer.reposition_group(&topic, &group, start).await?;
        let again = Recorder::new();
        let handle = cx.runner(&conn, &topic, &group).run(again.handler()).await?;
        again.wait_for(expected.len(), cx.secs(30.0)).await?;
        assert!(cx.eventually_drained(&topic, &group, cx.secs(10.0)).await?);
        handle.shutdown(cx.secs(10.0)).await;
        assert_eq!(
            unique_ids(&again.all()),
            expected,
            "after repositioning to {start:?}"
        );
    }
    Ok(Outcome::Passed)
}

/// Catch-up mode ("rebuild the projection, then serve"): a run started with
/// `Runner::catch_up` reports "caught up" once, after every message that was
/// in the log when `run` began was handled and settled, and never waits for
/// one published after that.
///
/// * Follow mode: 20 messages before the run, 5 after it began whose handlers
///   wait until "caught up" was reported (so it cannot need them, or the case
///   times out); at the report all 20 were handled, then the 5 go through and
///   the run keeps following.
/// * Stop mode, in a new group and without a group: all 25 are handled, 3
///   more are published after `run`, and the run ends by itself with
///   `Ended::CaughtUp`, cleanly.
/// * A log with nothing for the group (a new group at the latest message)
///   reports at once and ends.
///
/// A backend that cannot tell where its log ends refuses catch-up mode with
/// `Error::Unsupported` (checked, then the case is skipped).
pub async fn catch_up_reports_once_after_the_backlog<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let topic = cx.topic(&conn, "catch-up").await?;
    if !cx.caps().catch_up {
        if !conn.consumer.capabilities().catch_up {
            let group = cx.group_name("cu");
            let refused = cx
                .runner(&conn, &topic, &group)
                .start(StartFrom::Earliest)
                .catch_up(CatchUp::Stop)
                .run(Recorder::new().handler())
                .await;
            assert!(matches!(refused, Err(Error::Unsupported(_))), "{refused:?}");
        }
        return Ok(Outcome::Skipped(format!(
            "{} cannot tell where its log ends (capabilities.catch_up = false); \
             it refuses catch-up mode with Error::Unsupported",
            cx.caps().backend
        )));
    }
    let keyed = |prefix: &'static str| move |i: usize| numbered(prefix, i).with_key(format!("k{}", i % 4));
    let before = publish(&conn, &topic, (0..20).map(keyed("before")).collect()).await?;
    let before_ids: HashSet<String> = before.iter().map(|m| m.id.clone()).collect();

    // Follow: later messages are held until the report, so it cannot wait for them.
    let group = cx.group_name("follow");
    let recorder = Recorder::new();
    let (reported_tx, reported) = tokio::sync::watch::channel(false);
    let handler = {
        let recorder = recorder.clone();
        move |delivery: Delivery| {
            let recorder = recorder.clone();
            let mut reported = reported.clone();
            async move {
                if delivery.payload().starts_with(b"after") {
                    let _ = reported.wait_for(|r| *r).await;
                }
                recorder.record(&delivery);
                HandlerResult::Ok(())
            }
        }
    };
    let handle = cx
        .runner(&conn, &topic, &group)
        .start(StartFrom::Earliest)
        .concurrency(16)
        .catch_up(CatchUp::Follow)
        .run(handler)
        .await?;
    let after = publish(
        &conn,
        &topic,
        (0..5)
            .map(|i| numbered("after", i).with_key(format!("a{i}")))
            .collect(),
    )
    .await?;
    tokio::time::timeout(cx.secs(30.0), handle.caught_up())
        .await
        .map_err(
            |_| "no catch-up report within 30 s: did it wait for messages published after the run began?",
        )?
        .map_err(|e| format!("catch-up failed: {e}"))?;
    let at_report = unique_ids(&recorder.all());
    let missing: Vec<&String> = before_ids.iter().filter(|id| !at_report.contains(*id)).collect();
    assert!(missing.is_empty(), "caught up before handling {missing:?}");
    assert!(handle.is_caught_up());
    let _ = reported_tx.send(true);
    recorder
        .wait_until("every message", cx.secs(30.0), |seen| {
            let ids = unique_ids(seen);
            before_ids
                .iter()
                .chain(after.iter().map(|m| &m.id))
                .all(|id| ids.contains(id))
        })
        .await?;
    assert_eq!(
        handle.state(),
        polybus_core::RunState::Running,
        "Follow keeps running"
    );
    let late = publish(&conn, &topic, vec![numbered("late", 0).with_key("late")]).await?;
    recorder
        .wait_until("a message published after the report", cx.secs(30.0), |seen| {
            seen.iter().any(|d| d.id() == late[0].id)
        })
        .await?;
    assert!(handle.caught_up().await.is_ok(), "the report stays");
    let report = handle.shutdown(cx.secs(10.0)).await;
    assert_eq!(report.ended, Some(Ended::Shutdown), "{report:?}");

    // Stop, in a new group and without one: the run ends by itself.
    let existing: HashSet<String> = before_ids
        .iter()
        .cloned()
        .chain(after.iter().chain(&late).map(|m| m.id.clone()))
        .collect();
    for grouped in [true, false] {
        let recorder = Recorder::new();
        let runner = if grouped {
            cx.runner(&conn, &topic, &cx.group_name("stop"))
        } else {
            cx.harness().tune_runner(conn.runner().topic(&topic))
        };
        let handle = runner
            .start(StartFrom::Earliest)
            .catch_up(CatchUp::Stop)
            .run(recorder.handler())
            .await?;
        publish(
            &conn,
            &topic,
            (0..3).map(|i| numbered("later", i).with_key("later")).collect(),
        )
        .await?;
        let report = tokio::time::timeout(cx.secs(40.0), handle.wait())
            .await
            .map_err(|_| format!("the Stop run (group: {grouped}) did not end within 40 s"))?;
        assert_eq!(
            report.ended,
            Some(Ended::CaughtUp),
            "group: {grouped}: {report:?}"
        );
        assert!(report.is_clean(), "{report:?}");
        assert!(handle.caught_up().await.is_ok());
        let got = unique_ids(&recorder.all());
        let missing: Vec<&String> = existing.iter().filter(|id| !got.contains(*id)).collect();
        assert!(
            missing.is_empty(),
            "group: {grouped}: stopped without {missing:?}"
        );
    }

    // Nothing for the group at the start: reported at once.
    let handle = cx
        .runner(&conn, &topic, &cx.group_name("empty"))
        .start(StartFrom::Latest)
        .catch_up(CatchUp::Stop)
        .run(Recorder::new().handler())
        .await?;
    let report = tokio::time::timeout(cx.secs(20.0), handle.wait())
        .await
        .map_err(|_| "a run with nothing to catch up did not end within 20 s")?;
    assert_eq!(report.ended, Some(Ended::CaughtUp), "{report:?}");
    Ok(Outcome::Passed)
}
