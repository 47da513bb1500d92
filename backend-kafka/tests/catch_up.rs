//! Catch-up mode against a broker that writes several records per batch:
//! tansu reports the high watermark as the last batch's base offset + 1, so
//! an end read from it stops short of the last batch's other records.
//! Runs on the real broker of `POLYBUS_TEST_KAFKA_BROKERS` (skipped loudly
//! without it) and on the mock cluster.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use polybus_conformance::{Harness, Recorder, timeout_multiplier};
use polybus_core::{CatchUp, Delivery, HandlerResult, Message, Order, StartFrom};
use support::harness;

async fn catch_up_waits_for_the_whole_last_batch<const REAL: bool>() {
    let test = "catch_up_waits_for_the_whole_last_batch";
    let Some(h) = harness::<REAL>(test).await else {
        return;
    };
    // The harness sends one record per batch (for tansu's sake); this test
    // wants batches of many.
    let config = h
        .config
        .clone()
        .set("batch.num.messages", "10000")
        .set("linger.ms", "100");
    let conn = h.connect_with(config).await.expect("connect");
    let topic = h.unique_name("catch-up-batch");
    conn.consumer.declare_topic(&topic).await.expect("declare");
    let messages: Vec<Message> = (0..40)
        .map(|i| Message::new(format!("m-{i}")).with_key(format!("k{}", i % 2)))
        .collect();
    let ids: HashSet<String> = messages.iter().map(|m| m.id.clone()).collect();
    conn.producer.send_batch(&topic, messages).await.expect("send");
    // Slow, one at a time: a report that came early would find records of
    // the last batch not handled yet.
    let recorder = Recorder::new();
    let handler = {
        let recorder = recorder.clone();
        move |delivery: Delivery| {
            let recorder = recorder.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                recorder.record(&delivery);
                HandlerResult::Ok(())
            }
        }
    };
    let handle = conn
        .runner()
        .topic(&topic)
        .start(StartFrom::Earliest)
        .order(Order::Sequential)
        .catch_up(CatchUp::Follow)
        .run(handler)
        .await
        .expect("run");
    tokio::time::timeout(
        Duration::from_secs_f64(40.0 * timeout_multiplier()),
        handle.caught_up(),
    )
    .await
    .expect("a catch-up report")
    .expect("caught up");
    let got: HashSet<String> = recorder.ids().into_iter().collect();
    let missing = ids.difference(&got).count();
    assert_eq!(missing, 0, "caught up with {missing} of 40 records not handled");
    handle.shutdown(Duration::from_secs(10)).await;
    h.cleanup(&[topic]).await;
}

#[test]
fn catch_up_waits_for_the_whole_last_batch_on_mock() {
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(catch_up_waits_for_the_whole_last_batch::<false>());
}

#[test]
fn catch_up_waits_for_the_whole_last_batch_on_broker() {
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(catch_up_waits_for_the_whole_last_batch::<true>());
}

/// A run that starts at the log's end (`Latest`) has nothing to catch up
/// on, however the last batch was written: tansu reports the high watermark
/// inside a batch of many records, where a consumer starting there is given
/// nothing of that batch.
async fn catch_up_from_latest_after_a_batch<const REAL: bool>(group: bool) {
    let test = "catch_up_from_latest_after_a_batch";
    let Some(h) = harness::<REAL>(test).await else {
        return;
    };
    let config = h
        .config
        .clone()
        .set("batch.num.messages", "10000")
        .set("linger.ms", "100");
    let conn = h.connect_with(config).await.expect("connect");
    let topic = h.unique_name("catch-up-latest");
    conn.consumer.declare_topic(&topic).await.expect("declare");
    let messages: Vec<Message> = (0..20)
        .map(|i| Message::new(format!("m-{i}")).with_key("k"))
        .collect();
    conn.producer.send_batch(&topic, messages).await.expect("send");
    let mut runner = conn
        .runner()
        .topic(&topic)
        .start(StartFrom::Latest)
        .catch_up(CatchUp::Follow);
    if group {
        runner = runner.group(h.unique_name("g"));
    }
    let handle = runner
        .run(|_: Delivery| async { HandlerResult::Ok(()) })
        .await
        .expect("run");
    let report = tokio::time::timeout(
        Duration::from_secs_f64(15.0 * timeout_multiplier()),
        handle.caught_up(),
    )
    .await;
    let handled = handle.stats().handled;
    handle.shutdown(Duration::from_secs(10)).await;
    h.cleanup(&[topic]).await;
    report
        .unwrap_or_else(|_| panic!("no catch-up report for a run from the end ({handled} handled)"))
        .expect("caught up");
}

#[test]
fn catch_up_from_latest_after_a_batch_on_broker() {
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(catch_up_from_latest_after_a_batch::<true>(false));
}

#[test]
fn catch_up_from_latest_after_a_batch_in_a_group_on_broker() {
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(catch_up_from_latest_after_a_batch::<true>(true));
}

/// A second member joins the group while a catch-up member is working
/// through the backlog: partitions move to it mid-run. The report must come
/// (from the group's commits for the partitions moved away) and only once
/// both members have handled every record that was there at the start.
async fn catch_up_across_a_rebalance<const REAL: bool>() {
    let test = "catch_up_across_a_rebalance";
    let Some(h) = harness::<REAL>(test).await else {
        return;
    };
    let conn = h.connect_with(h.config.clone()).await.expect("connect");
    let topic = h.unique_name("catch-up-rebalance");
    let group = h.unique_name("g");
    conn.consumer.declare_topic(&topic).await.expect("declare");
    let messages: Vec<Message> = (0..40)
        .map(|i| Message::new(format!("m-{i}")).with_key(format!("k{i}")))
        .collect();
    let ids: HashSet<String> = messages.iter().map(|m| m.id.clone()).collect();
    conn.producer.send_batch(&topic, messages).await.expect("send");
    let recorder = Recorder::new();
    let slow = |recorder: Recorder| {
        move |delivery: Delivery| {
            let recorder = recorder.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                recorder.record(&delivery);
                HandlerResult::Ok(())
            }
        }
    };
    let a = conn
        .runner()
        .topic(&topic)
        .group(&group)
        .start(StartFrom::Earliest)
        .order(Order::Sequential)
        .catch_up(CatchUp::Follow)
        .run(slow(recorder.clone()))
        .await
        .expect("run a");
    while recorder.ids().len() < 5 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let conn_b = h.connect_with(h.config.clone()).await.expect("connect b");
    let b = conn_b
        .runner()
        .topic(&topic)
        .group(&group)
        .order(Order::Sequential)
        .run(slow(recorder.clone()))
        .await
        .expect("run b");
    let report = tokio::time::timeout(
        Duration::from_secs_f64(60.0 * timeout_multiplier()),
        a.caught_up(),
    )
    .await;
    let got: HashSet<String> = recorder.ids().into_iter().collect();
    let missing = ids.difference(&got).count();
    a.shutdown(Duration::from_secs(10)).await;
    b.shutdown(Duration::from_secs(10)).await;
    h.cleanup(&[topic]).await;
    report
        .unwrap_or_else(|_| panic!("no catch-up report across a rebalance ({missing} of 40 not handled)"))
        .expect("caught up");
    assert_eq!(missing, 0, "caught up with {missing} of 40 records not handled");
}

#[test]
fn catch_up_across_a_rebalance_on_mock() {
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(catch_up_across_a_rebalance::<false>());
}

#[test]
fn catch_up_across_a_rebalance_on_broker() {
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(catch_up_across_a_rebalance::<true>());
}
