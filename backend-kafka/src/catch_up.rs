//! Catch-up probes: where each partition's log ended when a catch-up run
//! began (its high watermark), and whether the group's position has reached
//! it on every partition.
//!
//! A partition's position is the subscription's own commit position while it
//! holds the partition (its lowest unsettled offset, or the offset after the
//! last one fetched: `offsets::Part::position`), otherwise the group's
//! committed offset (another member holds it, or nothing was fetched yet), or
//! for a subscription in no group the offset it was assigned at. It has
//! caught up when the position is at or past the end: every record before
//! the end was settled (a commit never passes an unsettled record).
//!
//! **tansu**: its high watermark is the last record batch's base offset + 1,
//! so with batches of several records the end read here is the start of the
//! last batch and the probe may report before the rest of that batch is
//! handled. With `batch.num.messages=1` (as the real-broker tests run it) it
//! is exact; Apache Kafka's high watermark is exact.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use polybus_core::{CatchUpProbe, Error, Result, async_trait};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};

use crate::consumer::{blocking, partition_count};
use crate::subscription::Shared;
use crate::{BACKEND, KafkaConfig, map_error};

/// One partition's end at the start, and where its position started.
struct End {
    topic: String,
    partition: i32,
    /// The high watermark when the run began.
    end: i64,
    /// The low watermark then: a position below it counts as at it.
    low: i64,
}

/// Made by `KafkaSubscription::catch_up_probe`.
pub(crate) struct KafkaCatchUp {
    shared: Arc<Shared>,
    ends: Vec<End>,
    /// A client of the group that never joins it (reads committed offsets).
    group: Option<Arc<BaseConsumer>>,
    /// Without a group: the offset each partition was assigned at.
    assigned: HashMap<(String, i32), i64>,
    timeout: Duration,
}

impl KafkaCatchUp {
    /// Reads the high watermark of every partition of `topics` now.
    pub(crate) async fn new(
        config: &KafkaConfig,
        shared: Arc<Shared>,
        topics: &[String],
        assigned: HashMap<(String, i32), i64>,
    ) -> Result<Self> {
        let meta: BaseConsumer = config
            .client_config()
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| map_error("creating the Kafka metadata client", e))?;
        let group = match &shared.group {
            Some(group) => Some(Arc::new(
                config
                    .client_config()
                    .set("group.id", group)
                    .set("enable.auto.commit", "false")
                    .create::<BaseConsumer>()
                    .map_err(|e| map_error("creating a Kafka group client", e))?,
            )),
            None => None,
        };
        let timeout = config.request_timeout;
        let topics = topics.to_vec();
        let ends = blocking(move || {
            let mut ends = Vec::new();
            for topic in topics {
                let count = partition_count(&meta, &topic, timeout)?.ok_or_else(|| Error::NotFound {
                    what: format!("Kafka topic {topic}"),
                })?;
                for partition in 0..count {
                    let (low, end) = meta
                        .fetch_watermarks(&topic, partition, timeout)
                        .map_err(|e| map_error("reading watermarks", e))?;
                    ends.push(End {
                        topic: topic.clone(),
                        partition,
                        end,
                        low,
                    });
                }
            }
            Ok(ends)
        })
        .await?;
        Ok(KafkaCatchUp {
            shared,
            ends,
            group,
            assigned,
            timeout,
        })
    }

    /// The partitions whose end this subscription's own book does not show
    /// as reached.
    fn open_locally(&self) -> Vec<&End> {
        let mut state = self.shared.lock();
        self.ends
            .iter()
            .filter(|e| {
                if e.end <= e.low {
                    return false;
                }
                let local = state
                    .book
                    .part(&e.topic, e.partition)
                    .and_then(|part| part.position())
                    .or_else(|| self.assigned.get(&(e.topic.clone(), e.partition)).copied());
                local.is_none_or(|position| position < e.end)
            })
            .collect()
    }
}

#[async_trait]
impl CatchUpProbe for KafkaCatchUp {
    async fn caught_up(&self) -> Result<bool> {
        let open = self.open_locally();
        if open.is_empty() {
            return Ok(true);
        }
        let Some(group) = &self.group else {
            return Ok(false);
        };
        // Partitions another member holds, or none fetched yet: the group's commits.
        let mut tpl = TopicPartitionList::new();
        for e in &open {
            tpl.add_partition(&e.topic, e.partition);
        }
        let wanted: Vec<(String, i32, i64, i64)> = open
            .iter()
            .map(|e| (e.topic.clone(), e.partition, e.end, e.low))
            .collect();
        let group = Arc::clone(group);
        let timeout = self.timeout;
        blocking(move || {
            let found = group
                .committed_offsets(tpl, timeout)
                .map_err(|e| map_error("reading committed offsets", e))?;
            for (topic, partition, end, low) in wanted {
                let committed = match found.find_partition(&topic, partition).map(|p| p.offset()) {
                    Some(Offset::Offset(o)) => o.max(low),
                    _ => return Ok(false),
                };
                if committed < end {
                    return Ok(false);
                }
            }
            Ok(true)
        })
        .await
        .map_err(|e| match e {
            Error::Backend { message, source, .. } => Error::Backend {
                backend: BACKEND,
                message,
                retryable: true,
                source,
            },
            other => other,
        })
    }
}
