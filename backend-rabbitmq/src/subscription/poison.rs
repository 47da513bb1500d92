//! Messages lapin cannot parse: consuming with prefetch 1 after a parse
//! failure, counting failures in a row, and going back to the full prefetch.

use lapin::options::BasicCancelOptions;
use polybus_core::{Error, Result};

use super::RabbitSubscription;
use super::open::{Restored, start_consumers};
use crate::BACKEND;
use crate::config::{DEFAULT_DELIVERY_LIMIT, QueueType};
use crate::errors::map_error;

impl RabbitSubscription {
    /// lapin could not parse a frame (a message whose header name or
    /// `message_id` is not UTF-8: lapin's short strings are `String`s) and
    /// dropped the connection; the broker requeues everything this connection
    /// held. From now on the subscription consumes with prefetch 1, so the
    /// messages ahead of the unparsable one are received, handled and acked one
    /// at a time before it is sent again, and only the unparsable message is
    /// counted against a quorum queue's delivery limit, which then moves it to
    /// `<topic>.dlq`. Without such a limit (a classic queue) nothing can move
    /// it: after a bounded number of losses in a row with no delivery between
    /// them, the subscription ends with a non-retryable error.
    pub(super) fn parse_failed(&mut self, e: lapin::Error) -> Option<Error> {
        self.parse_failures += 1;
        self.careful = Some(u32::from(self.prefetch).max(1));
        let queues: Vec<&str> = self.sources.iter().map(|s| s.queue.as_str()).collect();
        let limit = self.parse_failure_limit();
        tracing::warn!(
            target: "polybus_rabbitmq",
            error = %e,
            queues = ?queues,
            failures = self.parse_failures,
            limit,
            "lapin cannot parse a message (a header name or message_id that is not UTF-8?); reconnecting with prefetch 1"
        );
        if self.parse_failures < limit {
            return None;
        }
        let hint = if self.all_limited() {
            "the queue's delivery limit should have dead-lettered it to '<topic>.dlq' by now: \
             check the queue's x-delivery-limit policy"
        } else {
            "a classic queue has no delivery limit, so nothing can move it: take it out of the \
             queue by other means (e.g. the management UI's get messages, or a shovel) or use \
             quorum group queues (RabbitConfig::queue_type)"
        };
        Some(Error::Backend {
            backend: BACKEND,
            message: format!(
                "the AMQP client cannot parse a message in '{}' ({e}): the connection was lost \
                 {} times in a row at the same message without receiving any other; a header \
                 name or message_id that is not UTF-8 (written by another client) does this; {hint}",
                queues.join("', '"),
                self.parse_failures,
            ),
            retryable: false,
            source: Some(Box::new(e)),
        })
    }

    /// Whether every source is a group queue with a delivery limit (quorum).
    fn all_limited(&self) -> bool {
        self.config.queue_type == QueueType::Quorum && self.sources.iter().all(|s| !s.private)
    }

    /// How many parse failures in a row end the subscription: one more than a
    /// quorum queue delivers a message before dead-lettering it (its limit + 1),
    /// or 3 where nothing limits deliveries.
    fn parse_failure_limit(&self) -> u32 {
        if self.all_limited() {
            self.config
                .delivery_limit
                .unwrap_or(DEFAULT_DELIVERY_LIMIT)
                .saturating_add(2)
        } else {
            3
        }
    }

    /// Counts a delivery received in careful mode; after as many as the normal
    /// prefetch, the consumers are started again with it, in a task (so `next`
    /// stays cancel-safe): cancelled and re-consumed on the same channel, so
    /// the deliveries already received stay settleable. `next` takes the new
    /// consumers when the task ends.
    pub(super) fn received_carefully(&mut self) {
        let Some(left) = self.careful else {
            return;
        };
        if left > 1 {
            self.careful = Some(left - 1);
            return;
        }
        self.careful = None;
        if self.prefetch <= 1 || self.restoring.is_some() {
            return;
        }
        let (Some(channel), false) = (self.channel.clone(), self.stopped) else {
            return;
        };
        let (tags, sources, prefetch, limit) = (
            self.tags.clone(),
            self.sources.clone(),
            self.prefetch,
            self.config.request_timeout,
        );
        self.restoring = Some(tokio::spawn(async move {
            let resumed = async {
                for tag in &tags {
                    channel
                        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                        .await
                        .map_err(|e| map_error("cancelling a careful consumer", e))?;
                }
                start_consumers(&channel, &sources, prefetch, false).await
            };
            match tokio::time::timeout(limit, resumed).await {
                Ok(result) => result,
                Err(_) => Err(Error::timeout("restoring the prefetch", limit)),
            }
        }));
    }

    /// Takes the consumers a finished restore started.
    pub(super) fn restored(&mut self, joined: std::result::Result<Result<Restored>, tokio::task::JoinError>) {
        self.restoring = None;
        match joined {
            Ok(Ok((streams, tags))) => {
                for stream in streams {
                    self.deliveries.push(stream);
                }
                self.tags = tags;
                tracing::info!(target: "polybus_rabbitmq", prefetch = self.prefetch, "consuming with the full prefetch again");
            }
            // The connection is failing: the stream reports it (or ends) and
            // `next` reconnects.
            Ok(Err(e)) => {
                tracing::warn!(target: "polybus_rabbitmq", error = %e, "could not restore the prefetch")
            }
            Err(e) => tracing::warn!(target: "polybus_rabbitmq", error = %e, "restoring the prefetch failed"),
        }
    }
}
