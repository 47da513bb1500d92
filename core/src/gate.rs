//! [`SendGate`]: what a producer needs for `close` to deliver everything accepted.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

use crate::error::{Error, Result};

/// The closed flag, in the top bit of [`SendGate`]'s state; the rest counts
/// the sends in flight.
const CLOSED: usize = 1 << (usize::BITS - 1);

/// Counts sends in flight and closes once: after [`close`](SendGate::close)
/// starts, [`enter`](SendGate::enter) fails with [`Error::Closed`], and `close`
/// returns once every send that entered before has finished.
///
/// Entering and leaving are one atomic operation each (no lock, no wake-up)
/// unless the last send in flight leaves while someone waits for idle.
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
    /// [`CLOSED`] | sends in flight.
    state: AtomicUsize,
    /// Woken when the count drops to zero.
    idle: Notify,
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
            state: AtomicUsize::new(0),
            idle: Notify::new(),
        }
    }

    /// Registers a send; fails with [`Error::Closed`] once closing has begun.
    pub fn enter(&self) -> Result<SendGuard<'_>> {
        let mut state = self.state.load(Ordering::Relaxed);
        loop {
            if state & CLOSED != 0 {
                return Err(Error::Closed(self.what));
            }
            // The count cannot reach the flag bit: each send holds memory.
            match self
                .state
                .compare_exchange_weak(state, state + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Ok(SendGuard { gate: self }),
                Err(now) => state = now,
            }
        }
    }

    /// Whether closing has begun.
    pub fn is_closed(&self) -> bool {
        self.state.load(Ordering::Acquire) & CLOSED != 0
    }

    /// How many sends are in flight.
    fn in_flight(&self) -> usize {
        self.state.load(Ordering::SeqCst) & !CLOSED
    }

    /// Waits until no send is in flight (sends may start again afterwards): what
    /// `flush` needs when every send resolves on the broker's confirmation.
    pub async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            // Registered before the count is read: a send that leaves after
            // the read wakes this wait.
            idle.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Refuses new sends and waits until those in flight have finished.
    pub async fn close(&self) {
        self.state.fetch_or(CLOSED, Ordering::SeqCst);
        self.wait_idle().await;
    }
}

impl Drop for SendGuard<'_> {
    fn drop(&mut self) {
        let before = self.gate.state.fetch_sub(1, Ordering::SeqCst);
        if before & !CLOSED == 1 {
            self.gate.idle.notify_waiters();
        }
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

    /// Many senders entering and leaving on several threads while the gate
    /// closes: `close` returns only once every admitted send has left, and no
    /// send is admitted after it began.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn close_under_concurrent_sends_waits_for_every_admitted_send() {
        for round in 0..50 {
            let gate = Arc::new(SendGate::new("producer"));
            let inside = Arc::new(AtomicUsize::new(0));
            let senders: Vec<_> = (0..8)
                .map(|_| {
                    let (gate, inside) = (Arc::clone(&gate), Arc::clone(&inside));
                    tokio::spawn(async move {
                        loop {
                            let Ok(guard) = gate.enter() else { return };
                            inside.fetch_add(1, Ordering::SeqCst);
                            tokio::task::yield_now().await;
                            inside.fetch_sub(1, Ordering::SeqCst);
                            drop(guard);
                        }
                    })
                })
                .collect();
            tokio::time::sleep(Duration::from_micros(200 * round)).await;
            tokio::time::timeout(Duration::from_secs(5), gate.close())
                .await
                .expect("close returns");
            assert_eq!(
                inside.load(Ordering::SeqCst),
                0,
                "round {round}: a send was still in flight"
            );
            assert!(gate.enter().is_err());
            for s in senders {
                s.await.unwrap();
            }
            // Idle again, and waiting for idle returns at once.
            tokio::time::timeout(Duration::from_secs(1), gate.wait_idle())
                .await
                .expect("idle");
        }
    }

    #[tokio::test]
    async fn wait_idle_wakes_when_the_last_send_leaves() {
        let gate = Arc::new(SendGate::new("producer"));
        let first = gate.enter().unwrap();
        let second = gate.enter().unwrap();
        let waiting = {
            let gate = Arc::clone(&gate);
            tokio::spawn(async move { gate.wait_idle().await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(first);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "one send is still in flight");
        drop(second);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
        // Sends may start again after idle.
        assert!(gate.enter().is_ok());
    }
}
