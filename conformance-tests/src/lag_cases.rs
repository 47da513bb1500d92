//! Consumer lag: `Consumer::lag` reports a group's backlog.

use polybus_core::Error;

use crate::cases::{numbered, publish};
use crate::{CaseResult, Ctx, Harness, Outcome, Recorder};

/// A declared group with a known backlog reports it through `Consumer::lag`,
/// and reports 0 once a runner has handled everything. A backend that cannot
/// report lag says so with `Error::Unsupported` (the case is skipped).
pub async fn lag_counts_the_backlog<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "lag").await?;
    match conn.consumer.lag(&topic, &group).await {
        Err(Error::Unsupported(why)) => return Ok(Outcome::Skipped(format!("no consumer lag: {why}"))),
        Err(e) => return Err(e.into()),
        Ok(0) => {}
        Ok(n) => panic!("a new group on a new topic has a lag of {n}"),
    }
    const BACKLOG: u64 = 7;
    publish(
        &conn,
        &topic,
        (0..BACKLOG as usize).map(|i| numbered("lag", i)).collect(),
    )
    .await?;
    // Brokers update their counts asynchronously: poll until the backlog shows.
    let until = tokio::time::Instant::now() + cx.secs(10.0);
    let mut lag = conn.consumer.lag(&topic, &group).await?;
    while lag != BACKLOG && tokio::time::Instant::now() < until {
        assert!(
            lag < BACKLOG,
            "lag {lag} is more than the {BACKLOG} messages sent"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        lag = conn.consumer.lag(&topic, &group).await?;
    }
    assert_eq!(lag, BACKLOG, "the group's backlog");
    let recorder = Recorder::new();
    let handle = cx.runner(&conn, &topic, &group).run(recorder.handler()).await?;
    recorder.wait_for(BACKLOG as usize, cx.secs(30.0)).await?;
    let report = handle.shutdown(cx.secs(10.0)).await;
    assert_eq!(report.handled, BACKLOG);
    let until = tokio::time::Instant::now() + cx.secs(10.0);
    let mut lag = conn.consumer.lag(&topic, &group).await?;
    while lag != 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        lag = conn.consumer.lag(&topic, &group).await?;
    }
    assert_eq!(lag, 0, "no backlog once everything is handled and acked");
    Ok(Outcome::Passed)
}
