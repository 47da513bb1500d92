use std::sync::{Arc, Mutex};
use std::time::Duration;

use polybus_core::{BoxError, Delivery, Handler, HandlerResult};
use tokio::sync::Notify;

/// Records deliveries from handlers and lets a case wait for them without sleeping.
#[derive(Clone, Default)]
pub struct Recorder {
    inner: Arc<RecorderInner>,
}

#[derive(Default)]
struct RecorderInner {
    seen: Mutex<Vec<Delivery>>,
    changed: Notify,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").field("len", &self.len()).finish()
    }
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a delivery.
    pub fn record(&self, delivery: &Delivery) {
        self.inner
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(delivery.clone());
        self.inner.changed.notify_waiters();
    }

    /// How many deliveries were recorded.
    pub fn len(&self) -> usize {
        self.inner.seen.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Everything recorded, in order.
    pub fn all(&self) -> Vec<Delivery> {
        self.inner.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The ids recorded, in order.
    pub fn ids(&self) -> Vec<String> {
        self.all().iter().map(|d| d.id().to_owned()).collect()
    }

    /// Waits until `done` holds for what was recorded, or fails after `within`.
    pub async fn wait_until(
        &self,
        what: &str,
        within: Duration,
        done: impl Fn(&[Delivery]) -> bool,
    ) -> Result<Vec<Delivery>, BoxError> {
        let until = tokio::time::Instant::now() + within;
        loop {
            let changed = self.inner.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let seen = self.inner.seen.lock().unwrap_or_else(|p| p.into_inner());
                if done(&seen) {
                    return Ok(seen.clone());
                }
            }
            if tokio::time::timeout_at(until, changed).await.is_err() {
                let n = self.len();
                return Err(format!("timed out after {within:?} waiting for {what} ({n} recorded)").into());
            }
        }
    }

    /// Waits until at least `n` deliveries were recorded.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Result<Vec<Delivery>, BoxError> {
        self.wait_until(&format!("{n} deliveries"), within, |seen| seen.len() >= n)
            .await
    }

    /// A handler that records each delivery and succeeds.
    pub fn handler(&self) -> impl Handler + use<> {
        let recorder = self.clone();
        move |delivery: Delivery| {
            let recorder = recorder.clone();
            async move {
                recorder.record(&delivery);
                HandlerResult::Ok(())
            }
        }
    }
}

/// One message through `conn`, end to end: declares `topic` and a group `g` on
/// it, runs a runner, sends one message, waits up to `within` for it, and
/// checks the runner shuts down cleanly within `within / 2`. For smoke runs over a connection set
/// up some special way (TLS, credentials).
pub async fn roundtrip_once(
    conn: &polybus_core::Connection,
    topic: &str,
    within: Duration,
) -> polybus_core::Result<()> {
    use polybus_core::{Message, StartFrom};
    conn.consumer.declare_topic(topic).await?;
    conn.consumer.declare_group(topic, "g", StartFrom::Latest).await?;
    let recorder = Recorder::new();
    let handle = conn
        .runner()
        .topic(topic)
        .group("g")
        .run(recorder.handler())
        .await?;
    conn.producer.send(topic, Message::new("over TLS")).await?;
    let got = recorder.wait_for(1, within).await.expect("the message arrives");
    assert_eq!(got[0].payload().as_ref(), b"over TLS");
    let report = handle.shutdown(within / 2).await;
    assert!(report.is_clean(), "{report:?}");
    Ok(())
}
