//! A group's offsets, read and written from outside the group: the committed
//! offsets, where a start point puts each partition, fixing a new group's
//! start, and repositioning an existing group (refused while it has members).
//! Blocking librdkafka calls; [`crate::consumer`] runs them off the async
//! threads.

use std::time::Duration;

use polybus_core::{Error, Result, StartFrom};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use crate::consumer::consumer_config;
use crate::security::{self, GroupClient};
use crate::{KafkaConfig, map_error};

/// The committed offset of each partition of `topic` for `client`'s group.
pub(crate) fn committed(
    client: &GroupClient,
    config: &KafkaConfig,
    topic: &str,
    count: i32,
) -> Result<Vec<Option<i64>>> {
    let mut tpl = TopicPartitionList::new();
    for partition in 0..count {
        tpl.add_partition(topic, partition);
    }
    let found = security::refusable(config, client, config.request_timeout, |within| {
        client.committed_offsets(tpl.clone(), within)
    })?
    .map_err(|e| map_error("reading committed offsets", e))?;
    let mut offsets = Vec::with_capacity(count as usize);
    for partition in 0..count {
        let Some(elem) = found.find_partition(topic, partition) else {
            offsets.push(None);
            continue;
        };
        // A partition whose offset could not be read is not "never committed":
        // fixing a start over it would skip messages.
        elem.error()
            .map_err(|e| map_error(&format!("reading the committed offset of {topic}/{partition}"), e))?;
        offsets.push(match elem.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        });
    }
    Ok(offsets)
}

/// Where `start` puts a partition: its low or high watermark, or for a time
/// the first offset whose record timestamp is at or after it (`offsets_for_times`;
/// the high watermark when there is none).
pub(crate) fn start_offset(
    meta: &BaseConsumer,
    topic: &str,
    partition: i32,
    start: StartFrom,
    timeout: Duration,
) -> Result<i64> {
    let (low, high) = meta
        .fetch_watermarks(topic, partition, timeout)
        .map_err(|e| map_error("reading watermarks", e))?;
    let Some(millis) = start.timestamp_millis() else {
        return Ok(if start == StartFrom::Earliest { low } else { high });
    };
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(millis))
        .map_err(|e| map_error("building offsets", e))?;
    let found = meta
        .offsets_for_times(tpl, timeout)
        .map_err(|e| map_error("looking up offsets for a time", e))?;
    Ok(match found.find_partition(topic, partition).map(|p| p.offset()) {
        Some(Offset::Offset(offset)) => offset.clamp(low, high),
        _ => high,
    })
}

/// Fixes the start of a group that has never committed on `topic`: every
/// partition gets the start offset (low or high watermark) committed. A group
/// with a commit on any partition is left alone: its start was fixed when it
/// was first declared, and a partition it has no commit for (added to the
/// topic later, or whose commit expired) starts at its earliest offset
/// (`auto.offset.reset=earliest`), so nothing published after the declaration
/// is skipped.
///
/// Kafka has no conditional commit, so two declarations at once may both
/// commit. The watermarks are read *before* the group's commits: a declaration
/// that commits after another one read them before that one's commit landed,
/// hence before that one returned, so it never moves the group's start past a
/// record published after any declaration returned.
pub(crate) fn fix_group_start(
    meta: &BaseConsumer,
    group: &GroupClient,
    config: &KafkaConfig,
    topic: &str,
    count: i32,
    start: StartFrom,
) -> Result<()> {
    let timeout = config.request_timeout;
    let mut starts = Vec::with_capacity(count as usize);
    for partition in 0..count {
        starts.push(start_offset(meta, topic, partition, start, timeout)?);
    }
    if committed(group, config, topic, count)?
        .iter()
        .any(Option::is_some)
    {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    for (partition, offset) in starts.into_iter().enumerate() {
        tpl.add_partition_offset(topic, partition as i32, Offset::Offset(offset))
            .map_err(|e| map_error("building offsets", e))?;
    }
    group
        .commit(&tpl, CommitMode::Sync)
        .map_err(|e| map_error(&format!("fixing the start of a group on {topic}"), e))
}

/// Moves an existing group on `topic` to `start`: refused while the group has
/// members ([`Error::InvalidConfig`] naming how many), [`Error::NotFound`] for
/// a group that has never committed on the topic; otherwise every partition
/// gets its start offset committed (low watermark for `Earliest`, high for
/// `Latest`, `offsets_for_times` for a time).
///
/// The commit comes from a client outside the group, which Kafka accepts for a
/// group with no members. A broker that refuses it (librdkafka's mock cluster
/// refuses any commit from a non-member once the group has existed) gets it
/// from a short-lived member instead ([`commit_as_member`]).
pub(crate) fn reposition_group(
    config: &KafkaConfig,
    meta: &BaseConsumer,
    group: &GroupClient,
    name: &str,
    topic: &str,
    count: i32,
    start: StartFrom,
) -> Result<()> {
    let timeout = config.request_timeout;
    let described = active_members(meta, name, timeout)?;
    if let Some(members) = described
        && members > 0
    {
        return Err(Error::InvalidConfig(format!(
            "group {name:?} on {topic:?} has {members} active member(s): stop them before repositioning it"
        )));
    }
    if committed(group, config, topic, count)?
        .iter()
        .all(Option::is_none)
    {
        return Err(Error::NotFound {
            what: format!("Kafka group {name:?} on topic {topic} (it has never committed there)"),
        });
    }
    let mut tpl = TopicPartitionList::new();
    for partition in 0..count {
        let offset = start_offset(meta, topic, partition, start, timeout)?;
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
            .map_err(|e| map_error("building offsets", e))?;
    }
    match group.commit(&tpl, CommitMode::Sync) {
        Ok(()) => Ok(()),
        Err(e) => match e.rdkafka_error_code() {
            // Refused because the committer is no member: a member joined
            // since the check, or the broker wants commits from members only.
            Some(RDKafkaErrorCode::UnknownMemberId | RDKafkaErrorCode::IllegalGeneration) => {
                commit_as_member(config, name, topic, count, &tpl)
            }
            Some(code @ RDKafkaErrorCode::RebalanceInProgress) => Err(Error::InvalidConfig(format!(
                "group {name:?} on {topic:?} has active members (the broker refused the new offsets: {code:?}): \
                 stop them before repositioning it"
            ))),
            _ => Err(map_error(&format!("repositioning group {name:?} on {topic}"), e)),
        },
    }
}

/// Commits `tpl` as a member of `name`: joins the group on `topic`, and
/// commits only if it was assigned every partition (otherwise another member
/// holds some: [`Error::InvalidConfig`]), then leaves. Joining makes live
/// members rebalance, so this is the fallback where the broker cannot
/// describe groups and refuses commits from outside.
fn commit_as_member(
    config: &KafkaConfig,
    name: &str,
    topic: &str,
    count: i32,
    tpl: &TopicPartitionList,
) -> Result<()> {
    let member: BaseConsumer = consumer_config(config, name)
        .create()
        .map_err(|e| map_error("creating a Kafka group member", e))?;
    member
        .subscribe(&[topic])
        .map_err(|e| map_error("joining the group to reposition it", e))?;
    let limit = config.session_timeout + config.request_timeout;
    let until = std::time::Instant::now() + limit;
    let assigned = loop {
        // Fetched records are neither stored nor committed (auto commit and
        // offset store are off).
        let _ = member.poll(Duration::from_millis(100));
        let assignment = member
            .assignment()
            .map_err(|e| map_error("reading the assignment", e))?;
        if assignment.count() > 0 {
            break assignment;
        }
        if std::time::Instant::now() >= until {
            return Err(Error::timeout(
                format!("joining group {name:?} on {topic} to reposition it"),
                limit,
            ));
        }
    };
    let held = (0..count)
        .filter(|p| assigned.find_partition(topic, *p).is_some())
        .count();
    if held < count as usize {
        return Err(Error::InvalidConfig(format!(
            "group {name:?} on {topic:?} has other active members (they hold {} of {count} partitions): \
             stop them before repositioning it",
            count as usize - held
        )));
    }
    member
        .commit(tpl, CommitMode::Sync)
        .map_err(|e| map_error(&format!("repositioning group {name:?} on {topic}"), e))
}

/// How many members `group` has now (ListGroups + DescribeGroups; 0 for an
/// unknown group), or `None` where the broker cannot describe groups
/// (librdkafka's mock cluster): then the broker's refusal of a commit from
/// outside a group with members is what refuses the reposition.
fn active_members(meta: &BaseConsumer, group: &str, timeout: Duration) -> Result<Option<usize>> {
    let list = match meta.fetch_group_list(Some(group), timeout) {
        Ok(list) => list,
        Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::UnsupportedFeature) => return Ok(None),
        Err(e) => return Err(map_error(&format!("describing group {group:?}"), e)),
    };
    Ok(Some(
        list.groups()
            .iter()
            .filter(|g| g.name() == group)
            .map(|g| g.members().len())
            .sum(),
    ))
}
