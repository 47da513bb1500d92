//! Typed events on every backend: a payload that does not decode is
//! dead-lettered with a reason naming the type, a router keeps an aggregate's
//! events in order across types, unknown types follow the router's policy, and
//! CloudEvents written by other producers (binary and structured mode) reach a
//! typed handler with their attributes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use polybus_core::typed::{Event as _, Events, Meta, UnknownType};
use polybus_core::{Delivery, HandlerError, HandlerResult, Message, event};
use serde::{Deserialize, Serialize};

use crate::cases::dead_letter_listener;
use crate::{CaseResult, Ctx, Foreign, ForeignRecord, Harness, Outcome, Recorder};

/// An account was opened (the first event of an aggregate).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountOpened {
    /// The aggregate id.
    pub account: String,
    /// The event's position in its aggregate.
    pub seq: u32,
}
event!(AccountOpened => "conformance.account-opened", key = |e| &e.account);

/// Money was deposited.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoneyDeposited {
    /// The aggregate id.
    pub account: String,
    /// The event's position in its aggregate.
    pub seq: u32,
    /// How much.
    pub amount: u64,
}
event!(MoneyDeposited => "conformance.money-deposited", key = |e| &e.account);

/// An event type no router in the suite handles.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountClosed {
    /// The aggregate id.
    pub account: String,
}
event!(AccountClosed => "conformance.account-closed", key = |e| &e.account);

/// A payload that does not decode, and a content type no codec reads, are each
/// dead-lettered at once with a reason naming the Rust type, the event type and
/// the cause; the events around them are handled.
pub async fn typed_decode_failure_dead_letters<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "typed-decode").await?;
    let (dead, dlq_handle) = dead_letter_listener(&cx, &conn, &topic).await?;
    let events = Events::new(&conn, ());
    let handled = Recorder::new();
    type Seen = Vec<(AccountOpened, Option<String>)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let handler = {
        let (handled, seen) = (handled.clone(), Arc::clone(&seen));
        events.handler(move |event: AccountOpened, meta: Meta| {
            let (handled, seen) = (handled.clone(), Arc::clone(&seen));
            async move {
                seen.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((event, meta.event_type().map(str::to_owned)));
                handled.record(meta.delivery());
                HandlerResult::Ok(())
            }
        })
    };
    let handle = cx.runner(&conn, &topic, &group).run(handler).await?;
    let publisher = events.publisher();
    let opened = |seq| AccountOpened {
        account: "a-1".into(),
        seq,
    };
    publisher.publish(&topic, &opened(0)).await?;
    let mut malformed = publisher.message(&opened(1))?;
    malformed.payload = "{\"account\": 7".into();
    conn.producer.send(&topic, malformed.clone()).await?;
    let mut xml = publisher.message(&opened(2))?;
    xml.payload = "<account/>".into();
    xml.headers.insert("content-type", "application/xml");
    conn.producer.send(&topic, xml.clone()).await?;
    publisher.publish(&topic, &opened(3)).await?;
    handled.wait_for(2, cx.secs(30.0)).await?;
    let dead_letters = dead.wait_for(2, cx.secs(30.0)).await?;
    let report = handle.shutdown(cx.secs(10.0)).await;
    dlq_handle.shutdown(cx.secs(10.0)).await;
    let got = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let ty = Some(AccountOpened::TYPE.to_owned());
    assert_eq!(got, vec![(opened(0), ty.clone()), (opened(3), ty)]);
    let reason_of = |id: &str| {
        let d = dead_letters
            .iter()
            .find(|d| d.id() == id)
            .unwrap_or_else(|| panic!("dead letter {id} missing"));
        let info = d.dead_letter().expect("dead-letter headers");
        assert_eq!(info.attempts, 1, "a decode failure is permanent");
        info.reason
    };
    let reason = reason_of(&malformed.id);
    for part in ["AccountOpened", AccountOpened::TYPE, "application/json", "line 1"] {
        assert!(reason.contains(part), "{part:?} missing from {reason:?}");
    }
    let reason = reason_of(&xml.id);
    for part in ["AccountOpened", "unsupported content type", "application/xml"] {
        assert!(reason.contains(part), "{part:?} missing from {reason:?}");
    }
    assert_eq!((report.handled, report.dead_lettered), (2, 2));
    Ok(Outcome::Passed)
}

/// A router on one subscription dispatches two event types by their type
/// header; with ordering by key, each aggregate's events are handled in publish
/// order across types, also when some fail once and are retried.
pub async fn router_keeps_key_order_across_types<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "typed-order").await?;
    let events = Events::new(&conn, ());
    let log: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let handled = Recorder::new();
    let record = {
        let (log, handled) = (Arc::clone(&log), handled.clone());
        move |account: String, seq: u32, delivery: &Delivery| {
            log.lock().unwrap_or_else(|p| p.into_inner()).push((account, seq));
            handled.record(delivery);
        }
    };
    let on_opened = {
        let record = record.clone();
        move |e: AccountOpened, d: Delivery| {
            let record = record.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..5))).await;
                record(e.account, e.seq, &d);
                HandlerResult::Ok(())
            }
        }
    };
    let on_deposited = move |e: MoneyDeposited, meta: Meta| {
        let record = record.clone();
        async move {
            if e.seq.is_multiple_of(4) && meta.attempt() == 1 {
                return Err(HandlerError::retryable("try again"));
            }
            tokio::time::sleep(Duration::from_millis(fastrand::u64(0..5))).await;
            record(e.account, e.seq, meta.delivery());
            Ok(())
        }
    };
    let router = events.router().on(on_opened).on(on_deposited);
    let stats = router.stats();
    let handle = cx
        .runner(&conn, &topic, &group)
        .order(polybus_core::Order::ByKey)
        .run(router)
        .await?;
    let (accounts, per_account) = (5, 12u32);
    let publisher = events.publisher();
    for seq in 0..per_account {
        for a in 0..accounts {
            let account = format!("acct-{a}");
            if seq == 0 {
                publisher.publish(&topic, &AccountOpened { account, seq }).await?;
            } else {
                let amount = u64::from(seq) * 10;
                publisher
                    .publish(&topic, &MoneyDeposited { account, seq, amount })
                    .await?;
            }
        }
    }
    let total = accounts * per_account as usize;
    handled.wait_for(total, cx.secs(60.0)).await?;
    let report = handle.shutdown(cx.secs(10.0)).await;
    let log = log.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for a in 0..accounts {
        let account = format!("acct-{a}");
        let order: Vec<u32> = log
            .iter()
            .filter(|(k, _)| *k == account)
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(order, (0..per_account).collect::<Vec<_>>(), "{account}");
    }
    assert_eq!(stats.unknown(), 0);
    assert_eq!(report.dead_lettered, 0);
    Ok(Outcome::Passed)
}

/// Deliveries whose type has no handler (or that carry no type) are
/// acknowledged and counted by default, and dead-lettered, naming the type,
/// under [`UnknownType::DeadLetter`].
pub async fn router_unknown_type_policy<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let conn = cx.connect().await?;
    let events = Events::new(&conn, ());
    let publisher = events.publisher();
    let closed = AccountClosed { account: "a".into() };
    let opened = |seq| AccountOpened {
        account: "a".into(),
        seq,
    };
    for policy in [UnknownType::Acknowledge, UnknownType::DeadLetter] {
        let (topic, group) = cx.topic_and_group(&conn, "typed-unknown").await?;
        let (dead, dlq_handle) = dead_letter_listener(&cx, &conn, &topic).await?;
        let handled = Recorder::new();
        let on_opened = {
            let handled = handled.clone();
            move |_: AccountOpened, d: Delivery| {
                let handled = handled.clone();
                async move {
                    handled.record(&d);
                    HandlerResult::Ok(())
                }
            }
        };
        let router = events.router().on(on_opened).unknown(policy);
        let stats = router.stats();
        let handle = cx.runner(&conn, &topic, &group).run(router).await?;
        publisher.publish(&topic, &opened(0)).await?;
        let unknown = publisher.message(&closed)?;
        conn.producer.send(&topic, unknown.clone()).await?;
        let untyped = Message::new("no type at all").with_key("a");
        conn.producer.send(&topic, untyped.clone()).await?;
        publisher.publish(&topic, &opened(1)).await?;
        handled.wait_for(2, cx.secs(30.0)).await?;
        match policy {
            UnknownType::DeadLetter => {
                let dl = dead.wait_for(2, cx.secs(30.0)).await?;
                let reason = |id: &str| {
                    dl.iter()
                        .find(|d| d.id() == id)
                        .and_then(|d| d.dead_letter())
                        .map(|i| i.reason)
                        .unwrap_or_default()
                };
                assert!(
                    reason(&unknown.id).contains(AccountClosed::TYPE),
                    "{:?}",
                    reason(&unknown.id)
                );
                assert!(
                    reason(&untyped.id).contains("no event type"),
                    "{:?}",
                    reason(&untyped.id)
                );
            }
            _ => assert!(cx.eventually_drained(&topic, &group, cx.secs(10.0)).await?),
        }
        let report = handle.shutdown(cx.secs(10.0)).await;
        dlq_handle.shutdown(cx.secs(10.0)).await;
        assert_eq!(stats.unknown(), 2, "{policy:?}");
        let expected = if policy == UnknownType::DeadLetter { 2 } else { 0 };
        assert_eq!(report.dead_lettered, expected, "{policy:?}");
    }
    Ok(Outcome::Passed)
}

/// CloudEvents written by another producer under the backend's binding (binary
/// mode, with the binding's other accepted prefix where it has one) and in
/// structured mode reach a typed handler with type, source, id, subject, time
/// and extensions.
pub async fn cloudevents_from_other_producers<H: Harness>(cx: Ctx<H>) -> CaseResult {
    let binding = cx.caps().binding;
    let conn = cx.connect().await?;
    let (topic, group) = cx.topic_and_group(&conn, "typed-foreign").await?;
    let events = Events::new(&conn, ());
    let seen: Arc<Mutex<Vec<(MoneyDeposited, Meta)>>> = Arc::default();
    let handled = Recorder::new();
    let on_deposited = {
        let (seen, handled) = (Arc::clone(&seen), handled.clone());
        move |e: MoneyDeposited, meta: Meta| {
            let (seen, handled) = (Arc::clone(&seen), handled.clone());
            async move {
                handled.record(meta.delivery());
                seen.lock().unwrap_or_else(|p| p.into_inner()).push((e, meta));
                HandlerResult::Ok(())
            }
        }
    };
    let handle = cx
        .runner(&conn, &topic, &group)
        .run(events.router().on(on_deposited).unknown(UnknownType::DeadLetter))
        .await?;
    let prefixes = binding.read_prefixes();
    let mut records = Vec::new();
    for (i, prefix) in prefixes.iter().enumerate() {
        let h = |name: &str| format!("{prefix}{name}").into_bytes();
        let data = format!(r#"{{"account":"f","seq":{i},"amount":5}}"#);
        records.push(
            ForeignRecord::new(data)
                .key("f")
                .header(h("specversion"), Some(b"1.0"))
                .header(h("type"), Some(b"conformance.money-deposited"))
                .header(h("source"), Some(b"/other-producer"))
                .header(h("id"), Some(format!("foreign-{i}").as_bytes()))
                .header(h("subject"), Some(b"f"))
                .header(h("time"), Some(b"2018-04-05T03:56:24Z"))
                .header(h("traceparent"), Some(b"00-trace"))
                .header("content-type", Some(b"application/json")),
        );
    }
    let n = prefixes.len() as u32;
    let structured = format!(
        r#"{{"specversion":"1.0","type":"conformance.money-deposited","source":"/other-producer","id":"foreign-{n}","subject":"f","time":"2018-04-05T03:56:24Z","traceparent":"00-trace","datacontenttype":"application/json","data":{{"account":"f","seq":{n},"amount":5}}}}"#
    );
    records.push(ForeignRecord::new(structured).key("f").header(
        "content-type",
        Some(b"application/cloudevents+json; charset=UTF-8"),
    ));
    for record in &records {
        if let Foreign::Inexpressible(why) = cx.harness().publish_foreign(&topic, record).await? {
            handle.shutdown(cx.secs(10.0)).await;
            return Ok(Outcome::Skipped(format!("no foreign publisher: {why}")));
        }
    }
    handled.wait_for(records.len(), cx.secs(30.0)).await?;
    let report = handle.shutdown(cx.secs(10.0)).await;
    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    seen.sort_by_key(|(e, _)| e.seq);
    assert_eq!(seen.len(), records.len());
    for (i, (event, meta)) in seen.iter().enumerate() {
        assert_eq!(event.seq, i as u32);
        assert_eq!(
            meta.event_type(),
            Some("conformance.money-deposited"),
            "{binding:?} #{i}"
        );
        assert_eq!(meta.source(), Some("/other-producer"));
        assert_eq!(meta.event_id(), Some(format!("foreign-{i}").as_str()));
        assert_eq!(meta.subject(), Some("f"));
        assert_eq!(meta.time(), Some(UNIX_EPOCH + Duration::from_secs(1_522_900_584)));
        assert_eq!(meta.extension("traceparent"), Some("00-trace"));
    }
    assert_eq!(report.dead_lettered, 0);
    Ok(Outcome::Passed)
}
