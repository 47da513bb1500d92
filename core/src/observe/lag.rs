//! The consumer-lag gauge: a task per runner that asks the broker for its
//! group's backlog on an interval while the runner runs.
//!
//! A broker that fails to answer (an error, a call that hangs, a panic in the
//! backend) neither stops the gauge nor the runner: each failure counts in
//! `polybus.consumer.lag.failures` (by `error.type`, `timeout` for a call that
//! did not answer within the interval, `panic` for one that panicked), the first
//! failure of a topic is a warning and later ones at most one warning a minute
//! (debug lines in between), and the first answer after failures is logged.
//! The task ends with the runner; nothing waits for it (a call in flight is
//! dropped), so it never holds a shutdown.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::time::Instant;

use super::Observer;
use crate::backend::Consumer;
use crate::error::Error;

/// At most one warning per topic this often while its lag cannot be read.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// One topic's failure streak.
#[derive(Default)]
struct Streak {
    failures: u64,
    warned: Option<Instant>,
}

/// Refreshes the lag gauge of every topic in `topics` every `every` until
/// `ended` completes. Stops by itself (with one debug line) on a backend that
/// cannot report lag.
pub(crate) async fn refresh(
    consumer: Arc<dyn Consumer>,
    topics: Vec<String>,
    group: String,
    every: Duration,
    observe: Observer,
    ended: impl Future<Output = ()>,
) {
    let refresh = async {
        let mut timer = tokio::time::interval(every);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut streaks: Vec<Streak> = topics.iter().map(|_| Streak::default()).collect();
        let limit = every.max(Duration::from_secs(1));
        loop {
            timer.tick().await;
            for (topic, streak) in topics.iter().zip(&mut streaks) {
                let asked = AssertUnwindSafe(tokio::time::timeout(limit, consumer.lag(topic, &group)))
                    .catch_unwind()
                    .await;
                let (kind, error) = match asked {
                    Ok(Ok(Ok(lag))) => {
                        observe.lag(topic, lag);
                        if streak.failures > 0 {
                            tracing::info!(topic, failures = streak.failures, "consumer lag available again");
                        }
                        *streak = Streak::default();
                        continue;
                    }
                    Ok(Ok(Err(Error::Unsupported(why)))) => {
                        tracing::debug!(%why, "no consumer-lag gauge for this backend");
                        return;
                    }
                    Ok(Ok(Err(e))) => (super::error_type(&e), e.to_string()),
                    Ok(Err(_)) => ("timeout", format!("no answer within {limit:?}")),
                    Err(_) => ("panic", "the backend panicked".to_owned()),
                };
                observe.lag_failed(topic, kind);
                streak.failures += 1;
                let now = Instant::now();
                if streak
                    .warned
                    .is_none_or(|at| now.duration_since(at) >= WARN_EVERY)
                {
                    streak.warned = Some(now);
                    tracing::warn!(
                        topic,
                        group = group.as_str(),
                        failures = streak.failures,
                        %error,
                        "consumer lag not available; the gauge keeps its last value"
                    );
                } else {
                    tracing::debug!(topic, failures = streak.failures, %error, "consumer lag not available");
                }
            }
        }
    };
    tokio::select! {
        () = refresh => {}
        () = ended => {}
    }
}
