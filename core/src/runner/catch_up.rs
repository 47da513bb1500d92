//! Catch-up mode: asks the backend's probe, after settlements, whether the
//! group has settled everything that was in the log when the run began;
//! reports it once, then stops the runner or lets it follow the log.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::FutureExt;
use tokio::time::Instant;

use super::handle::{CatchUp, NotCaughtUp, Shared};
use crate::backend::CatchUpProbe;
use crate::error::Error;
use crate::time::later;

/// The probe is asked again at the latest after this long without a
/// settlement (another member of the group may be the one settling).
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// At most one probe question per this long (a question may be a broker round trip).
const MIN_GAP: Duration = Duration::from_millis(20);

/// Waits until the probe says the group caught up, then reports it once and,
/// in [`CatchUp::Stop`] mode, shuts the runner down with `drain` as deadline.
/// Ends with the runner.
pub(super) async fn watch(probe: Box<dyn CatchUpProbe>, mode: CatchUp, shared: Arc<Shared>, drain: Duration) {
    let mut report = shared.report.clone();
    loop {
        // A permit stored by a settlement during the question wakes the wait below.
        // A panicking probe (a backend bug) is a probe that cannot tell: the
        // watcher must not die silently and leave `caught_up()` waiting.
        let answer = match std::panic::AssertUnwindSafe(probe.caught_up())
            .catch_unwind()
            .await
        {
            Ok(answer) => answer,
            Err(_) => Err(Error::Backend {
                backend: "polybus",
                message: "the backend's catch-up probe panicked".into(),
                retryable: false,
                source: None,
            }),
        };
        match answer {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, "catch-up: the backend could not tell yet; asking again");
            }
            Err(e) => {
                tracing::error!(error = %e, "catch-up: the backend cannot tell whether the group caught up");
                shared.set_catch_up(Err(NotCaughtUp::Probe(Arc::new(e))));
                return;
            }
        }
        tokio::select! {
            _ = shared.settled.notified() => {}
            _ = tokio::time::sleep(IDLE_CHECK) => {}
            _ = report.wait_for(Option::is_some) => return,
        }
        if report.borrow().is_some() {
            return;
        }
        tokio::time::sleep(MIN_GAP).await;
    }
    if !shared.set_catch_up(Ok(())) {
        // The runner ended first (that was reported instead).
        return;
    }
    tracing::info!(
        handled = shared.counters.handled.load(Ordering::Relaxed),
        ?mode,
        "catch-up: every message that was in the log when the run began is settled"
    );
    if mode == CatchUp::Stop {
        {
            let mut deadline = shared.deadline.lock().unwrap_or_else(|p| p.into_inner());
            if deadline.is_none() {
                *deadline = Some(later(Instant::now(), drain));
                shared.stopped_caught_up.store(true, Ordering::Release);
                shared.deadline_by_catch_up.store(true, Ordering::Release);
            }
        }
        shared.stop.cancel();
    }
}
