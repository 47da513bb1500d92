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
//! **tansu** reports the high watermark as the last record batch's base
//! offset + 1, so with batches of several records it stops short of the last
//! batch's other records. So the end is also checked against what can be
//! fetched: the records from `high - 1` on, read once at the start (a fetch
//! from a batch's base returns the whole batch); a record stamped at or
//! before the moment the watermarks were read moves the end past it. On
//! Kafka that read returns the record at `high - 1` (and perhaps records
//! appended since, stamped later: not counted), so the end stays the high
//! watermark. The stamp is the record's timestamp (the producer's clock for
//! create time): a producer whose clock runs ahead can make a record of the
//! last batch look later, and the report come before it. A partition the run
//! starts on at or past the high watermark (a `Latest` start, a group whose
//! commit is there) keeps the high watermark as its end: tansu gives a
//! consumer starting inside a batch nothing of it, so waiting for the rest of
//! that batch never ended.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use polybus_core::{CatchUpProbe, Error, Result, async_trait};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Message as _, Timestamp};
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

/// The last offset of each partition that can be fetched from `high - 1`
/// and was stamped at or before `read_at` (see the module docs), where it
/// is past `high - 1`.
fn fetchable_ends(
    config: &rdkafka::ClientConfig,
    ends: &[&End],
    read_at: SystemTime,
    timeout: Duration,
) -> Result<HashMap<(String, i32), i64>> {
    let mut tpl = TopicPartitionList::new();
    let mut waiting = 0usize;
    for e in ends.iter().filter(|e| e.end > e.low) {
        tpl.add_partition_offset(&e.topic, e.partition, Offset::Offset(e.end - 1))
            .map_err(|err| map_error("building offsets", err))?;
        waiting += 1;
    }
    let mut found = HashMap::new();
    if waiting == 0 {
        return Ok(found);
    }
    let reader: BaseConsumer = config
        .clone()
        // librdkafka wants a group id to assign; this reader never joins or commits.
        .set(
            "group.id",
            format!("polybus-private-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .map_err(|e| map_error("creating a Kafka reader", e))?;
    reader
        .assign(&tpl)
        .map_err(|e| map_error("assigning partitions to read their ends", e))?;
    let read_at = read_at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let until = Instant::now() + timeout;
    // Each partition is read until its end of partition: what was there at
    // the start, and what came since (not counted unless stamped before).
    while waiting > 0 && Instant::now() < until {
        match reader.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(record)) => {
                let stamped = match record.timestamp() {
                    Timestamp::CreateTime(t) | Timestamp::LogAppendTime(t) => t,
                    Timestamp::NotAvailable => i64::MAX,
                };
                if stamped <= read_at {
                    let last = found
                        .entry((record.topic().to_owned(), record.partition()))
                        .or_insert(record.offset());
                    *last = (*last).max(record.offset());
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => waiting -= 1,
            Some(Err(e)) => return Err(map_error("reading where the partitions end", e)),
        }
    }
    Ok(found)
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
        let meta_config = config.client_config();
        let group_client = group.clone();
        let starts = assigned.clone();
        let ends = blocking(move || {
            let mut ends: Vec<End> = Vec::new();
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
            let read_at = SystemTime::now();
            // Where the run starts on each partition: a partition it starts at
            // or past the high watermark on has nothing before it to wait for
            // (on tansu the rest of the last batch there is never given to a
            // consumer starting inside it).
            let starts = match &group_client {
                None => starts,
                Some(group) => {
                    let mut tpl = TopicPartitionList::new();
                    for e in &ends {
                        tpl.add_partition(&e.topic, e.partition);
                    }
                    let found = group
                        .committed_offsets(tpl, timeout)
                        .map_err(|e| map_error("reading committed offsets", e))?;
                    ends.iter()
                        .filter_map(|e| {
                            match found.find_partition(&e.topic, e.partition).map(|p| p.offset()) {
                                Some(Offset::Offset(o)) => Some(((e.topic.clone(), e.partition), o)),
                                _ => None,
                            }
                        })
                        .collect()
                }
            };
            let open: Vec<&End> = ends
                .iter()
                .filter(|e| {
                    starts
                        .get(&(e.topic.clone(), e.partition))
                        .is_none_or(|start| *start < e.end)
                })
                .collect();
            let fetchable = fetchable_ends(&meta_config, &open, read_at, timeout)?;
            for end in &mut ends {
                if let Some(last) = fetchable.get(&(end.topic.clone(), end.partition)) {
                    end.end = end.end.max(last + 1);
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
