//! [`SendGate`]: what a producer needs for `close` to deliver everything accepted.

use std::sync::Mutex;

use tokio::sync::watch;

use crate::error::{Error, Result};

/// Counts sends in flight and closes once: after [`close`](SendGate::close)
/// starts, [`enter`](SendGate::enter) fails with [`Error::Closed`], and `close`
/// returns once every send that entered before has finished.
///
/// ```
/// # async fn demo() -> polybus_core::Result<()> {
/// let gate = polybus_core::SendGate::new("producer");
/// {
///     let _in_flight = gate.enter()?; // held while the broker confirms
/// }
/// gate.close().await;
/// assert!(gate.enter().is_err());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct SendGate {
    what: &'static str,
    state: Mutex<(bool, usize)>,
    idle: watch::Sender<usize>,
}

/// Held by a send in flight; dropping it lets [`SendGate::close`] go on.
#[derive(Debug)]
pub struct SendGuard<'a> {
    gate: &'a SendGate,
}

impl SendGate {
    /// A gate for `what` (named in the `Closed` error, e.g. `"producer"`).
    pub fn new(what: &'static str) -> Self {
        SendGate {
            what,
            state: Mutex::new((false, 0)),
            idle: watch::channel(0).0,
        }
    }

    /// Registers a send; fails with [`Error::Closed`] once closing has begun.
    pub fn enter(&self) -> Result<SendGuard<'_>> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.0 {
            return Err(Error::Closed(self.what));
        }
        state.1 += 1;
        self.idle.send_replace(state.1);
        Ok(SendGuard { gate: self })
    }

    /// Whether closing has begun.
    pub fn is_closed(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    /// Waits until no send is in flight (sends may start again afterwards): what
    /// `flush` needs when every send resolves on the broker's confirmation.
    pub async fn wait_idle(&self) {
        let mut rx = self.idle.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Refuses new sends and waits until those in flight have finished.
    pub async fn close(&self) {
        let mut rx = self.idle.subscribe();
        {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.0 = true;
            self.idle.send_replace(state.1);
        }
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

impl Drop for SendGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.gate.state.lock().unwrap_or_else(|p| p.into_inner());
        state.1 -= 1;
        self.gate.idle.send_replace(state.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn close_waits_for_sends_in_flight() {
        let gate = Arc::new(SendGate::new("producer"));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let sender = {
            let gate = Arc::clone(&gate);
            tokio::spawn(async move {
                let _guard = gate.enter().unwrap();
                let _ = rx.await;
            })
        };
        tokio::task::yield_now().await;
        let closing = {
            let gate = Arc::clone(&gate);
            tokio::spawn(async move { gate.close().await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!closing.is_finished(), "close waits for the send in flight");
        assert!(matches!(gate.enter(), Err(Error::Closed("producer"))));
        tx.send(()).unwrap();
        sender.await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), closing)
            .await
            .unwrap()
            .unwrap();
    }
}
