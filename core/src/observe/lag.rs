//! The consumer-lag gauge: a task per runner that asks the broker for its
//! group's backlog on an interval while the runner runs.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::Observer;
use crate::backend::Consumer;
use crate::error::Error;

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
        loop {
            timer.tick().await;
            for topic in &topics {
                let asked =
                    tokio::time::timeout(every.max(Duration::from_secs(1)), consumer.lag(topic, &group));
                match asked.await {
                    Ok(Ok(lag)) => observe.lag(topic, lag),
                    Ok(Err(Error::Unsupported(why))) => {
                        tracing::debug!(%why, "no consumer-lag gauge for this backend");
                        return;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, topic, "consumer lag not available this time"),
                    Err(_) => tracing::debug!(topic, "asking for consumer lag timed out"),
                }
            }
        }
    };
    tokio::select! {
        () = refresh => {}
        () = ended => {}
    }
}
