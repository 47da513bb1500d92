//! The catch-up probe of a JetStream subscription: each stream's end when a
//! catch-up run began, and whether every consumer's ack floor reached it.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::stream;
use async_trait::async_trait;
use polybus_core::{Error, Result};

use super::Shared;

/// Where each stream ended when a catch-up run began (see
/// [`JetStreamSubscription::catch_up_probe`]).
pub(super) struct JetStreamCatchUp {
    /// Topic, stream, consumer name, last stream sequence at the start.
    pub(super) ends: Vec<(String, stream::Stream, String, u64)>,
    pub(super) timeout: Duration,
    /// For the current names of ephemeral consumers, which a pump makes
    /// again (under a new name) when the server removes one.
    pub(super) shared: Arc<Shared>,
    /// No group: the consumers are ephemeral.
    pub(super) ephemeral: bool,
}

#[async_trait]
impl polybus_core::CatchUpProbe for JetStreamCatchUp {
    async fn caught_up(&self) -> Result<bool> {
        for (index, (topic, stream, consumer, end)) in self.ends.iter().enumerate() {
            // A recreated ephemeral consumer starts where the old one stopped:
            // its ack floor goes on from there.
            let current = self.shared.ephemeral_name(index);
            let consumer = current.as_deref().unwrap_or(consumer);
            let info = tokio::time::timeout(self.timeout, stream.consumer_info(consumer))
                .await
                .map_err(|_| {
                    Error::timeout(format!("reading the progress of topic '{topic}'"), self.timeout)
                })?;
            let info = match info {
                Ok(info) => info,
                // Removed, and its pump is making a new one: ask again.
                Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound && self.ephemeral => return Ok(false),
                Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {
                    return Err(Error::NotFound {
                        what: format!(
                            "the JetStream consumer of topic '{topic}' (deleted or recreated during the run)"
                        ),
                    });
                }
                Err(e) => {
                    return Err(crate::backend_error(
                        &format!("reading the progress of topic '{topic}'"),
                        e,
                        true,
                    ));
                }
            };
            let settled_all = info.num_pending == 0 && info.num_ack_pending == 0;
            if info.ack_floor.stream_sequence < *end && !settled_all {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
