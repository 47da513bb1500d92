//! Hostile review of coalesced acks (issue 15): configurations and
//! interleavings the first tests did not try. Skips loudly without
//! `POLYBUS_TEST_AMQP_URL` (a failure under `POLYBUS_TEST_REQUIRE_BROKERS=1`).

use std::collections::HashMap;
use std::time::Duration;

use polybus_conformance::Recorder;
use polybus_core::{Delivery, HandlerResult, Message, Order, StartFrom, SubscribeOptions};
use polybus_rabbitmq::{RabbitConfig, RabbitConsumer, group_queue};

#[path = "support/common.rs"]
mod common;
use common::{config, declare_and_send, drain_payloads, next_delivery, numbered, shuffled, take, unique};

async fn delete(config: &RabbitConfig, topics: &[&str]) {
    let admin = RabbitConsumer::connect(config).await.unwrap();
    for topic in topics {
        let _ = admin.delete_topic(topic, &[group_queue(topic, "g")]).await;
    }
}

/// `ack_coalescing(Some(Duration::MAX))` ("coalesce as long as it takes"):
/// an ack above a held tag computed its deadline as `Instant + Duration::MAX`,
/// which panicked the channel's ack task. Every ack on the channel was then
/// answered `NotSettled` while the channel stayed open, so nothing was ever
/// acked again: the prefetch filled and the subscription stalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coalescing_bound_past_what_an_instant_holds_still_acks() {
    let Some(config) = config("a_coalescing_bound_past_what_an_instant_holds_still_acks") else {
        return;
    };
    let config = config.ack_coalescing(Some(Duration::MAX));
    let topic = unique("review-max-bound");
    let conn = polybus_rabbitmq::connect_with(config.clone()).await.unwrap();
    declare_and_send(&conn, &topic, 3).await;
    let options = SubscribeOptions::new(&topic).group("g").prefetch(3);
    let mut sub = conn.consumer.subscribe(options).await.unwrap();
    let held = take(&mut sub, 3).await;
    // m0001 is acked above the held m0000: it waits for it.
    let above = {
        let acker = held[1].1.clone();
        tokio::spawn(async move { acker.ack().await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let head = held[0].1.ack().await;
    let above = tokio::time::timeout(Duration::from_secs(10), above).await;
    let last = held[2].1.ack().await;
    sub.close().await.unwrap();
    let back = drain_payloads(&conn, &topic, Duration::from_secs(2)).await;
    delete(&config, &[&topic]).await;
    head.unwrap_or_else(|e| panic!("the head's ack: {e}"));
    above
        .expect("the ack above the head was answered")
        .unwrap()
        .unwrap_or_else(|e| panic!("the ack above the head: {e}"));
    last.unwrap_or_else(|e| panic!("the last ack: {e}"));
    assert!(back.is_empty(), "acked messages came back: {back:?}");
}

/// Two topics in one subscription: two consumers on one channel, their tags
/// interleaved. Everything is acked out of order and concurrently, some acks
/// past the bound (a slow lower tag). Had any frame settled a tag twice or an
/// unknown one, the broker would close the channel (406) and the subscription
/// would reconnect and get the unacked messages again; so the channel must
/// still be the same one afterwards: a message sent later arrives on it as
/// a first delivery and nothing else is redelivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_consumers_on_one_channel_ack_out_of_order_and_keep_the_channel() {
    let Some(config) = config("two_consumers_on_one_channel_ack_out_of_order_and_keep_the_channel") else {
        return;
    };
    let (a, b) = (unique("review-two-a"), unique("review-two-b"));
    let conn = polybus_rabbitmq::connect_with(config.clone()).await.unwrap();
    let n = 150;
    declare_and_send(&conn, &a, n).await;
    declare_and_send(&conn, &b, n).await;
    let options = SubscribeOptions::new(&a).topic(&b).group("g").prefetch(2 * n);
    let mut sub = conn.consumer.subscribe(options).await.unwrap();
    let mut held = Vec::new();
    while held.len() < 2 * n {
        match next_delivery(&mut sub, Duration::from_secs(10)).await {
            Some(pair) => held.push(pair),
            None => break,
        }
    }
    if held.len() < 2 * n {
        sub.close().await.unwrap();
        delete(&config, &[&a, &b]).await;
        panic!("{} deliveries of {}", held.len(), 2 * n);
    }
    let acking: Vec<_> = shuffled(2 * n)
        .into_iter()
        .map(|i| {
            let acker = held[i].1.clone();
            tokio::spawn(async move {
                // Some acks come late (past the 2 ms bound), some at once.
                tokio::time::sleep(Duration::from_millis((i as u64 * 7) % 13)).await;
                (i, acker.ack().await)
            })
        })
        .collect();
    let mut failed = Vec::new();
    for task in acking {
        let (i, result) = task.await.unwrap();
        if let Err(e) = result {
            failed.push(format!("#{i}: {e}"));
        }
    }
    // Still the same channel: one later message arrives as a first delivery
    // and nothing acked comes back.
    conn.producer.send(&a, Message::new("later")).await.unwrap();
    let mut after = Vec::new();
    while let Some((d, acker)) = next_delivery(&mut sub, Duration::from_secs(2)).await {
        after.push((String::from_utf8_lossy(d.payload()).into_owned(), d.attempt()));
        acker.ack().await.unwrap();
    }
    sub.close().await.unwrap();
    let back_a = drain_payloads(&conn, &a, Duration::from_secs(2)).await;
    let back_b = drain_payloads(&conn, &b, Duration::from_secs(2)).await;
    delete(&config, &[&a, &b]).await;
    assert!(failed.is_empty(), "acks failed: {failed:?}");
    assert_eq!(after, vec![("later".to_owned(), 1)]);
    assert!(back_a.is_empty() && back_b.is_empty(), "{back_a:?} {back_b:?}");
}

/// The runner over one subscription: handlers of every speed (many past the
/// bound), permanent failures (dead-lettered, then acked) in the middle, a
/// few handlers that never finish, and a shutdown while acks are batched:
/// the waiting deliveries are released, the stuck ones cancelled and
/// released. No message may be lost (each was handled, dead-lettered or comes
/// back), and none may be handled twice during the run (a channel closed by
/// the broker would redeliver).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_runner_shut_down_mid_run_loses_nothing_and_redelivers_nothing() {
    let Some(config) = config("a_busy_runner_shut_down_mid_run_loses_nothing_and_redelivers_nothing") else {
        return;
    };
    let topic = unique("review-busy");
    let conn = polybus_rabbitmq::connect_with(config.clone()).await.unwrap();
    let n = 1500;
    declare_and_send(&conn, &topic, n).await;
    conn.consumer
        .declare_group(&format!("{topic}.dlq"), "g", StartFrom::Latest)
        .await
        .unwrap();
    let seen = Recorder::new();
    let handler = {
        let seen = seen.clone();
        move |d: Delivery| {
            let seen = seen.clone();
            async move {
                let i: u64 = String::from_utf8_lossy(d.payload())[1..].parse().unwrap();
                if i % 397 == 5 {
                    std::future::pending::<()>().await;
                }
                let pause = match i % 10 {
                    0 => 15_000,
                    1..=3 => 3_000,
                    _ => i * 31 % 900,
                };
                tokio::time::sleep(Duration::from_micros(pause)).await;
                seen.record(&d);
                if i % 50 == 7 {
                    return HandlerResult::Err(polybus_core::HandlerError::permanent("review: poison"));
                }
                HandlerResult::Ok(())
            }
        }
    };
    let handle = conn
        .runner()
        .topic(&topic)
        .group("g")
        .order(Order::Unordered)
        .concurrency(32)
        .buffer(300)
        .run(handler)
        .await
        .unwrap();
    seen.wait_for(n / 2, Duration::from_secs(120)).await.unwrap();
    handle.shutdown(Duration::from_millis(300)).await;
    let handled: Vec<String> = seen
        .all()
        .iter()
        .map(|d| String::from_utf8_lossy(d.payload()).into_owned())
        .collect();
    let back = drain_payloads(&conn, &topic, Duration::from_secs(3)).await;
    let dead = drain_payloads(&conn, &format!("{topic}.dlq"), Duration::from_secs(2)).await;
    delete(&config, &[&topic, &format!("{topic}.dlq")]).await;
    let mut count: HashMap<&str, usize> = HashMap::new();
    for p in &handled {
        *count.entry(p.as_str()).or_default() += 1;
    }
    let twice: Vec<_> = count.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "handled twice during the run: {twice:?}");
    let lost: Vec<String> = (0..n)
        .map(numbered)
        .filter(|m| !count.contains_key(m.as_str()) && !back.contains(m))
        .collect();
    assert!(lost.is_empty(), "lost: {lost:?}");
    let expected_dead: Vec<&String> = handled
        .iter()
        .filter(|p| p[1..].parse::<u64>().unwrap() % 50 == 7)
        .collect();
    for p in &expected_dead {
        assert!(
            dead.contains(p) || back.contains(p),
            "{p} failed permanently but is neither dead-lettered nor back"
        );
    }
    for i in (0..n as u64).filter(|i| i % 397 == 5) {
        let m = numbered(i as usize);
        if count.contains_key(m.as_str()) {
            continue;
        }
        assert!(back.contains(&m), "the stuck {m} did not come back");
    }
}

/// The ordered-by-key runner on a quorum group queue (the default): many
/// deliveries wait in their key's lane (held) while later keys are acked,
/// some fail once and retry in process (held past the bound), the acks of a
/// lane's messages come in lane order, not tag order. Every message must be
/// handled successfully exactly once, in key order, with no broker
/// redelivery, and nothing may be left in the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_ordered_runner_on_a_quorum_queue_settles_each_message_once() {
    let Some(config) = config("the_ordered_runner_on_a_quorum_queue_settles_each_message_once") else {
        return;
    };
    let topic = unique("review-ordered");
    let conn = polybus_rabbitmq::connect_with(config.clone()).await.unwrap();
    conn.consumer
        .declare_group(&topic, "g", StartFrom::Latest)
        .await
        .unwrap();
    let (keys, per_key) = (40usize, 25usize);
    for seq in 0..per_key {
        for key in 0..keys {
            conn.producer
                .send(
                    &topic,
                    Message::new(format!("k{key:02}-{seq:02}")).with_key(format!("k{key:02}")),
                )
                .await
                .unwrap();
        }
    }
    let seen = Recorder::new();
    let failed_once = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let handler = {
        let seen = seen.clone();
        move |d: Delivery| {
            let (seen, failed_once) = (seen.clone(), failed_once.clone());
            async move {
                let payload = String::from_utf8_lossy(d.payload()).into_owned();
                let seq: u64 = payload[4..].parse().unwrap();
                let key: u64 = payload[1..3].parse().unwrap();
                tokio::time::sleep(Duration::from_micros((key * 37 + seq * 11) % 4000)).await;
                if (key + seq).is_multiple_of(13) && failed_once.lock().unwrap().insert(payload.clone()) {
                    return HandlerResult::Err(polybus_core::HandlerError::retryable("review: once"));
                }
                seen.record(&d);
                HandlerResult::Ok(())
            }
        }
    };
    let retry = polybus_core::RetryPolicy {
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        ..polybus_core::RetryPolicy::default()
    };
    let handle = conn
        .runner()
        .topic(&topic)
        .group("g")
        .order(Order::ByKey)
        .concurrency(16)
        .buffer(200)
        .retry(retry)
        .run(handler)
        .await
        .unwrap();
    let all = seen.wait_for(keys * per_key, Duration::from_secs(120)).await;
    handle.shutdown(Duration::from_secs(2)).await;
    let back = drain_payloads(&conn, &topic, Duration::from_secs(2)).await;
    delete(&config, &[&topic]).await;
    let all = all.unwrap();
    let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
    for d in &all {
        let payload = String::from_utf8_lossy(d.payload()).into_owned();
        by_key.entry(payload[..3].to_owned()).or_default().push(payload);
    }
    for (key, got) in &by_key {
        let want: Vec<String> = (0..per_key).map(|seq| format!("{key}-{seq:02}")).collect();
        assert_eq!(got, &want, "key {key}: handled out of order or twice");
    }
    assert_eq!(all.len(), keys * per_key);
    assert!(back.is_empty(), "settled messages came back: {back:?}");
}

/// On an idle channel, an ack above a held tag is answered within (about)
/// the bound: nothing else wakes the ack task, so its deadline must.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_above_a_held_tag_on_an_idle_channel_is_answered_within_the_bound() {
    let Some(config) = config("an_ack_above_a_held_tag_on_an_idle_channel_is_answered_within_the_bound")
    else {
        return;
    };
    let config = config.ack_coalescing(Some(Duration::from_millis(50)));
    let topic = unique("review-idle");
    let conn = polybus_rabbitmq::connect_with(config.clone()).await.unwrap();
    declare_and_send(&conn, &topic, 3).await;
    let options = SubscribeOptions::new(&topic).group("g").prefetch(3);
    let mut sub = conn.consumer.subscribe(options).await.unwrap();
    let held = take(&mut sub, 3).await;
    let started = tokio::time::Instant::now();
    let second = held[1].1.ack().await;
    let waited = started.elapsed();
    // The head is now known to be slow: the next ack above it goes at once.
    let started = tokio::time::Instant::now();
    let third = held[2].1.ack().await;
    let then = started.elapsed();
    held[0].1.ack().await.unwrap();
    sub.close().await.unwrap();
    let back = drain_payloads(&conn, &topic, Duration::from_secs(2)).await;
    delete(&config, &[&topic]).await;
    second.unwrap();
    third.unwrap();
    assert!(
        waited >= Duration::from_millis(45) && waited < Duration::from_millis(1000),
        "{waited:?}"
    );
    assert!(then < Duration::from_millis(45), "{then:?}");
    assert!(back.is_empty(), "{back:?}");
}

/// Rounds of releases and out-of-order acks on one channel: every third
/// delivery of a round is released (requeued, so it comes back on the same
/// channel with a new tag, above tags still waiting in the book) and the rest
/// are acked concurrently in shuffled order. A closed channel (406 for a tag
/// settled twice or unknown) or a multiple ack covering a released tag would
/// show as a delivery count other than `n + releases`, or a message missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn released_deliveries_come_back_on_the_same_channel_among_coalesced_acks() {
    let Some(config) = config("released_deliveries_come_back_on_the_same_channel_among_coalesced_acks")
    else {
        return;
    };
    let topic = unique("review-requeue");
    let conn = polybus_rabbitmq::connect_with(config.clone()).await.unwrap();
    let n = 120;
    declare_and_send(&conn, &topic, n).await;
    let options = SubscribeOptions::new(&topic).group("g").prefetch(n);
    let mut sub = conn.consumer.subscribe(options).await.unwrap();
    let mut deliveries = 0usize;
    let mut releases = 0usize;
    let mut acked: HashMap<String, usize> = HashMap::new();
    let mut round = 0u64;
    let mut failed = Vec::new();
    while acked.len() < n && failed.is_empty() && round < 50 {
        round += 1;
        let mut batch = Vec::new();
        while let Some(pair) = next_delivery(&mut sub, Duration::from_millis(500)).await {
            batch.push(pair);
        }
        deliveries += batch.len();
        let tasks: Vec<_> = shuffled(batch.len())
            .into_iter()
            .map(|i| {
                let (d, acker) = (batch[i].0.clone(), batch[i].1.clone());
                let release = (i as u64 + round).is_multiple_of(3) && round < 6;
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(i as u64 % 5)).await;
                    let payload = String::from_utf8_lossy(d.payload()).into_owned();
                    let result = if release {
                        acker.release(None).await
                    } else {
                        acker.ack().await
                    };
                    (payload, release, result)
                })
            })
            .collect();
        for task in tasks {
            let (payload, release, result) = task.await.unwrap();
            if let Err(e) = result {
                failed.push(format!("{payload}: {e}"));
            } else if release {
                releases += 1;
            } else {
                *acked.entry(payload).or_default() += 1;
            }
        }
    }
    // Anything still coming is a redelivery nobody asked for.
    let extra = next_delivery(&mut sub, Duration::from_secs(2))
        .await
        .map(|(d, _)| String::from_utf8_lossy(d.payload()).into_owned());
    sub.close().await.unwrap();
    let back = drain_payloads(&conn, &topic, Duration::from_secs(2)).await;
    delete(&config, &[&topic]).await;
    assert!(failed.is_empty(), "settlements failed: {failed:?}");
    assert_eq!(acked.len(), n, "no progress after {round} rounds");
    assert_eq!(extra, None);
    assert!(back.is_empty(), "{back:?}");
    let twice: Vec<_> = acked.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "delivered again after its ack: {twice:?}");
    assert!(releases > 0);
    assert_eq!(
        deliveries,
        n + releases,
        "deliveries beyond the releases: a channel was lost"
    );
}

/// An ack waiting above a held tag that is then released: once the nack is
/// written nothing holds the floor, so the ack goes at once, not when the
/// bound runs out (with a long bound, a shutdown that releases the waiting
/// deliveries waited that long for the acks of the handlers that finished).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_waiting_on_a_released_tag_goes_once_the_nack_is_written() {
    let Some(config) = config("an_ack_waiting_on_a_released_tag_goes_once_the_nack_is_written") else {
        return;
    };
    let config = config.ack_coalescing(Some(Duration::from_secs(10)));
    let topic = unique("review-release-floor");
    let conn = polybus_rabbitmq::connect_with(config.clone()).await.unwrap();
    declare_and_send(&conn, &topic, 2).await;
    let options = SubscribeOptions::new(&topic).group("g").prefetch(2);
    let mut sub = conn.consumer.subscribe(options).await.unwrap();
    let mut held = Vec::new();
    while held.len() < 2 {
        match next_delivery(&mut sub, Duration::from_secs(10)).await {
            Some(pair) => held.push(pair),
            None => break,
        }
    }
    assert_eq!(held.len(), 2);
    let started = tokio::time::Instant::now();
    let above = {
        let acker = held[1].1.clone();
        tokio::spawn(async move { acker.ack().await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let released = held[0].1.release(None).await;
    let above = tokio::time::timeout(Duration::from_secs(15), above).await;
    let waited = started.elapsed();
    sub.close().await.unwrap();
    let back = drain_payloads(&conn, &topic, Duration::from_secs(2)).await;
    delete(&config, &[&topic]).await;
    released.unwrap();
    above.expect("answered").unwrap().unwrap();
    assert_eq!(back, vec!["m0000".to_owned()]);
    assert!(
        waited < Duration::from_secs(2),
        "the ack above the released tag waited {waited:?} (the bound is 10 s)"
    );
}
