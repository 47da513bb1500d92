//! Settling one JetStream delivery (and a poison message fetched by sequence).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream;
use async_nats::jetstream::message::AckKind;
use async_trait::async_trait;
use polybus_core::{AckHandle, Bytes, Error, Result};

use crate::BACKEND;

use super::Shared;

/// What every settlement handle of a subscription holds: the pump credit its
/// delivery took (given back once), and what tells whether settling it can
/// still take effect.
pub(super) struct Credit {
    pub(super) pump: usize,
    pub(super) generation: u64,
    pub(super) shared: Arc<Shared>,
    pub(super) consumer_closed: Arc<AtomicBool>,
    pub(super) timeout: Duration,
    pub(super) returned: AtomicBool,
}

impl Credit {
    /// Gives the credit back to the pump; `true` only the first time.
    fn give_back(&self) -> bool {
        let first = !self.returned.swap(true, Ordering::AcqRel);
        if first {
            self.shared.give_back(self.pump, 1);
        }
        first
    }

    /// `NotSettled` when settling can no longer take effect: the consumer
    /// was closed, or the JetStream consumer that delivered it was deleted
    /// (or recreated).
    fn check(&self, operation: &'static str) -> Result<()> {
        let not_settled = |reason: &str| Error::NotSettled {
            operation,
            reason: reason.into(),
        };
        if self.consumer_closed.load(Ordering::Acquire) {
            return Err(not_settled("the NATS consumer (its connection) was closed"));
        }
        if self.shared.generation(self.pump) != self.generation {
            return Err(not_settled(
                "the JetStream consumer that delivered it was deleted",
            ));
        }
        Ok(())
    }
}

/// Settles one JetStream delivery.
///
/// On a live connection an ack, NAK or in-progress ack is one message to the
/// server with no reply (as async-nats's `ack` does): a reply for every ack
/// would cost a round trip per message in each handler slot. It tells the
/// truth where that can be known: `NotSettled` when the consumer was closed,
/// when the delivery's JetStream consumer was deleted (or recreated), or when
/// the client refuses the publish; while the connection is down, it asks for
/// the server's reply (a "double ack") within the request timeout instead of
/// queueing blindly.
pub(super) struct JetStreamAck {
    pub(super) message: jetstream::Message,
    pub(super) credit: Credit,
}

impl JetStreamAck {
    fn give_back(&self) {
        self.credit.give_back();
    }

    async fn send(&self, kind: AckKind, operation: &'static str) -> Result<()> {
        let not_settled = |reason: String| Error::NotSettled { operation, reason };
        self.credit.check(operation)?;
        let Some(reply) = self.message.message.reply.clone() else {
            return Err(not_settled("not a JetStream delivery (no reply subject)".into()));
        };
        let client = self.message.context.client();
        let payload: Bytes = kind.into();
        if client.connection_state() == async_nats::connection::State::Connected {
            return client
                .publish(reply, payload)
                .await
                .map_err(|e| not_settled(format!("the NATS client refused it: {e}")));
        }
        // Disconnected: a queued ack may or may not arrive in time; ask the
        // server to confirm it.
        match tokio::time::timeout(self.credit.timeout, client.request(reply, payload)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => Err(not_settled(
                "nobody serves its ack subject (the consumer is gone)".into(),
            )),
            Ok(Err(e)) => Err(Error::Backend {
                backend: BACKEND,
                message: format!("{operation} while reconnecting: {e}"),
                retryable: true,
                source: Some(Box::new(e)),
            }),
            Err(_) => Err(Error::timeout(
                format!("{operation} while reconnecting to NATS"),
                self.credit.timeout,
            )),
        }
    }
}

/// Settles a poison message (fetched by sequence) through the consumer's ack
/// subject built for its stream sequence. The ack asks for the server's reply,
/// so it is known to have landed.
pub(super) struct PoisonAck {
    pub(super) client: Client,
    pub(super) ack_subject: String,
    pub(super) sequence: u64,
    pub(super) credit: Credit,
    pub(super) acked: AtomicBool,
}

impl PoisonAck {
    fn give_back(&self) {
        if self.credit.give_back() {
            let key = (self.credit.pump, self.sequence);
            let mut known = self.credit.shared.poisoned();
            if self.acked.load(Ordering::Acquire) {
                known.remove(&key);
            } else if let Some(in_flight) = known.get_mut(&key) {
                // Not acked: offered again after the next reconnect.
                *in_flight = false;
            }
        }
    }
}

impl Drop for PoisonAck {
    fn drop(&mut self) {
        self.give_back();
    }
}

#[async_trait]
impl AckHandle for PoisonAck {
    async fn ack(&self) -> Result<()> {
        let result = async {
            self.credit.check("ack")?;
            match tokio::time::timeout(
                self.credit.timeout,
                self.client.request(self.ack_subject.clone(), AckKind::Ack.into()),
            )
            .await
            {
                Ok(Ok(_)) => {
                    self.acked.store(true, Ordering::Release);
                    Ok(())
                }
                Ok(Err(e)) => Err(Error::NotSettled {
                    operation: "ack",
                    reason: format!(
                        "the ack of stream sequence {} was not confirmed: {e}",
                        self.sequence
                    ),
                }),
                Err(_) => Err(Error::timeout(
                    "acking a message fetched by sequence",
                    self.credit.timeout,
                )),
            }
        }
        .await;
        self.give_back();
        result
    }

    async fn release(&self, delay: Option<Duration>) -> Result<()> {
        let result = async {
            self.credit.check("release")?;
            self.client
                .publish(
                    self.ack_subject.clone(),
                    AckKind::Nak(delay.filter(|d| !d.is_zero())).into(),
                )
                .await
                .map_err(|e| Error::NotSettled {
                    operation: "release",
                    reason: format!("the NATS client refused it: {e}"),
                })
        }
        .await;
        self.give_back();
        result
    }

    async fn keep_alive(&self) -> Result<()> {
        self.credit.check("keep-alive")?;
        self.client
            .publish(self.ack_subject.clone(), AckKind::Progress.into())
            .await
            .map_err(|e| Error::NotSettled {
                operation: "keep-alive",
                reason: format!("the NATS client refused it: {e}"),
            })
    }
}

impl Drop for JetStreamAck {
    fn drop(&mut self) {
        self.give_back();
    }
}

#[async_trait]
impl AckHandle for JetStreamAck {
    async fn ack(&self) -> Result<()> {
        let result = self.send(AckKind::Ack, "ack").await;
        self.give_back();
        result
    }

    async fn release(&self, delay: Option<Duration>) -> Result<()> {
        let result = self
            .send(AckKind::Nak(delay.filter(|d| !d.is_zero())), "release")
            .await;
        self.give_back();
        result
    }

    async fn keep_alive(&self) -> Result<()> {
        self.send(AckKind::Progress, "keep-alive").await
    }
}
