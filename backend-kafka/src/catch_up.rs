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

use crate::consumer::{Settings, blocking, topic_partitions};
use crate::security::{self, GroupClient};
use crate::subscription::Shared;
use crate::{BACKEND, map_error};

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
///
/// Each partition is read through a queue of its own until its own end of
/// partition: librdkafka's end-of-partition event names the partition but
/// not the topic, and comes again each time a partition that grew is read
/// to its new end, so counting those events on one queue could end the read
/// before another partition was read at all (the hostile review of issue 16
/// proved it: `a_partition_that_grows_cannot_end_the_read_of_another`).
fn fetchable_ends(
    config: &rdkafka::ClientConfig,
    ends: &[&End],
    read_at: SystemTime,
    timeout: Duration,
) -> Result<HashMap<(String, i32), i64>> {
    let mut found = HashMap::new();
    let wanted: Vec<&&End> = ends.iter().filter(|e| e.end > e.low).collect();
    if wanted.is_empty() {
        return Ok(found);
    }
    let reader: Arc<BaseConsumer> = Arc::new(
        config
            .clone()
            // librdkafka wants a group id to assign; this reader never joins or commits.
            .set(
                "group.id",
                format!("polybus-private-{}", uuid::Uuid::new_v4().simple()),
            )
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .create()
            .map_err(|e| map_error("creating a Kafka reader", e))?,
    );
    let mut tpl = TopicPartitionList::new();
    let mut pending = Vec::with_capacity(wanted.len());
    for e in &wanted {
        tpl.add_partition_offset(&e.topic, e.partition, Offset::Offset(e.end - 1))
            .map_err(|err| map_error("building offsets", err))?;
        let queue = reader
            .split_partition_queue(&e.topic, e.partition)
            .ok_or_else(|| Error::Backend {
                backend: BACKEND,
                message: format!(
                    "cannot read where {}/{} ends: librdkafka gave no queue for it",
                    e.topic, e.partition
                ),
                retryable: true,
                source: None,
            })?;
        pending.push(((e.topic.clone(), e.partition), queue));
    }
    reader
        .assign(&tpl)
        .map_err(|e| map_error("assigning partitions to read their ends", e))?;
    let read_at = read_at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let until = Instant::now() + timeout;
    // Each partition is read until its end of partition: what was there at
    // the start, and what came since (not counted unless stamped before).
    while !pending.is_empty() && Instant::now() < until {
        // Errors and other events of the client come on its main queue.
        if let Some(Err(e)) = reader.poll(Duration::ZERO) {
            return Err(map_error("reading where the partitions end", e));
        }
        let mut idle = true;
        let mut index = 0;
        while index < pending.len() {
            let (key, queue) = &pending[index];
            let mut ended = false;
            while let Some(event) = queue.poll(Duration::ZERO) {
                idle = false;
                match event {
                    Ok(record) => {
                        let stamped = match record.timestamp() {
                            Timestamp::CreateTime(t) | Timestamp::LogAppendTime(t) => t,
                            Timestamp::NotAvailable => i64::MAX,
                        };
                        if stamped <= read_at {
                            let last = found.entry(key.clone()).or_insert(record.offset());
                            *last = (*last).max(record.offset());
                        }
                    }
                    Err(rdkafka::error::KafkaError::PartitionEOF(_)) => {
                        ended = true;
                        break;
                    }
                    Err(e) => return Err(map_error("reading where the partitions end", e)),
                }
            }
            if ended {
                pending.swap_remove(index);
            } else {
                index += 1;
            }
        }
        if idle {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(found)
}

/// Made by `KafkaSubscription::catch_up_probe`.
pub(crate) struct KafkaCatchUp {
    shared: Arc<Shared>,
    ends: Vec<End>,
    /// A client of the group that never joins it (reads committed offsets);
    /// listed in `shared.probes`, so a rotation reaches it.
    group: Option<Arc<GroupClient>>,
    /// The consumer's settings (for redacting the current secrets).
    settings: Settings,
    /// Without a group: the offset each partition was assigned at.
    assigned: HashMap<(String, i32), i64>,
    timeout: Duration,
}

/// A refused login or TLS handshake as the final error it is; anything else
/// as `map_error` says.
fn answered<T>(what: &str, result: Result<rdkafka::error::KafkaResult<T>>) -> Result<T> {
    result?.map_err(|e| map_error(what, e))
}

impl KafkaCatchUp {
    /// Reads the high watermark of every partition of `topics` now, with the
    /// consumer's current credentials; a refused login is
    /// [`Error::Unauthenticated`] at once, not a timeout.
    pub(crate) async fn new(
        settings: &Settings,
        shared: Arc<Shared>,
        topics: &[String],
        assigned: HashMap<(String, i32), i64>,
    ) -> Result<Self> {
        // Made and listed while the settings are held: a rotation either
        // came before (and these clients are made with its credentials) or
        // comes after (and finds the group client in the list).
        let (config, group) = {
            let current = settings.read().unwrap_or_else(|p| p.into_inner());
            let config = Arc::clone(&current);
            let group = match &shared.group {
                Some(group) => {
                    let client = Arc::new(security::group_client(&config, group)?);
                    shared
                        .probes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Arc::downgrade(&client));
                    Some(client)
                }
                None => None,
            };
            (config, group)
        };
        let meta = security::watched_client(&config)?;
        let timeout = config.request_timeout;
        let topics = topics.to_vec();
        let group_client = group.clone();
        let starts = assigned.clone();
        let ends = blocking(move || {
            let mut ends: Vec<End> = Vec::new();
            for topic in topics {
                let metadata = answered(
                    &format!("reading metadata of {topic}"),
                    security::refusable(&config, &meta, timeout, |within| {
                        meta.fetch_metadata(Some(&topic), within)
                    }),
                )?;
                let count = topic_partitions(&metadata, &topic)?.ok_or_else(|| Error::NotFound {
                    what: format!("Kafka topic {topic}"),
                })?;
                for partition in 0..count {
                    let (low, end) = answered(
                        "reading watermarks",
                        security::refusable(&config, &meta, timeout, |within| {
                            meta.fetch_watermarks(&topic, partition, within)
                        }),
                    )?;
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
                    let found = answered(
                        "reading committed offsets",
                        security::refusable(&config, group, timeout, |within| {
                            group.committed_offsets(tpl.clone(), within)
                        }),
                    )?;
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
            let fetchable = fetchable_ends(&config.client_config(), &open, read_at, timeout)?;
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
            settings: Arc::clone(settings),
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
        let config = Arc::clone(&self.settings.read().unwrap_or_else(|p| p.into_inner()));
        blocking(move || {
            let found = answered(
                "reading committed offsets",
                security::refusable(&config, &group, timeout, |within| {
                    group.committed_offsets(tpl.clone(), within)
                }),
            )?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};

    fn produce(producer: &BaseProducer, topic: &str, n: usize) {
        for i in 0..n {
            let payload = format!("{i}");
            producer
                .send(BaseRecord::<(), String>::to(topic).payload(&payload))
                .unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();
    }

    /// librdkafka's end-of-partition event carries no topic and comes again
    /// each time a growing partition is read to its new end: two of them for
    /// partition 0 of topic `a` must not end the read of partition 0 of topic
    /// `b` (whose leader answers slowly here) before `b` was read.
    #[test]
    fn a_partition_that_grows_cannot_end_the_read_of_another() {
        let mock = MockCluster::new(2).unwrap();
        mock.create_topic("a", 1, 1).unwrap();
        mock.create_topic("b", 1, 1).unwrap();
        mock.partition_leader("a", 0, Some(1)).unwrap();
        mock.partition_leader("b", 0, Some(2)).unwrap();
        let mut config = rdkafka::ClientConfig::new();
        config.set("bootstrap.servers", mock.bootstrap_servers());
        let producer: BaseProducer = config.create().unwrap();
        produce(&producer, "a", 3);
        produce(&producer, "b", 3);
        let read_at = SystemTime::now() + Duration::from_millis(1);
        std::thread::sleep(Duration::from_millis(5));
        let a = End {
            topic: "a".into(),
            partition: 0,
            end: 3,
            low: 0,
        };
        let b = End {
            topic: "b".into(),
            partition: 0,
            end: 3,
            low: 0,
        };
        mock.broker_round_trip_time(2, Duration::from_millis(1500))
            .unwrap();
        // `a` keeps growing while its end is read.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let growing = std::thread::spawn({
            let stop = Arc::clone(&stop);
            let producer: BaseProducer = config.create().unwrap();
            move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    produce(&producer, "a", 1);
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        });
        let started = Instant::now();
        let found = fetchable_ends(&config, &[&a, &b], read_at, Duration::from_secs(20));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        growing.join().unwrap();
        let found = found.unwrap();
        assert_eq!(
            found.get(&("b".to_owned(), 0)),
            Some(&2),
            "topic b was never read ({found:?} after {:?})",
            started.elapsed()
        );
        assert_eq!(found.get(&("a".to_owned(), 0)), Some(&2), "{found:?}");
    }
}
