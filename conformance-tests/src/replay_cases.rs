//! Replay to a point in time and repositioning an existing group, on every
//! backend that declares the capability (`replay_from_time`, `reposition`).

use std::collections::HashSet;
use std::time::Duration;

use polybus_core::{Error, Message, StartFrom};

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
    assert!(refused.is_err(), "repositioning a group with a member is refused");
    handle.shutdown(cx.secs(10.0)).await;
    assert!(matches!(
        conn.consumer
            .reposition_group(&topic, &cx.group_name("missing"), StartFrom::Earliest)
            .await,
        Err(Error::NotFound { .. })
    ));
    for (start, expected) in [
        (StartFrom::Earliest, all.clone()),
        (StartFrom::Timestamp(at), ids(&second)),
    ] {
        if matches!(start, StartFrom::Timestamp(_)) && !cx.caps().replay_from_time {
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
