//! Checks an existing group consumer's settings against what polybus needs.
//!
//! A group's durable consumer may have been created by another tool (or another
//! polybus configuration). Settings that would stop delivery silently, or break
//! the contract, are refused with [`Error::InvalidConfig`] naming the field;
//! request limits are adapted to instead (pull requests ask for no more than
//! the consumer allows). Nothing is updated on the server: another tool that
//! created the consumer may depend on its settings.

use std::time::Duration;

use async_nats::jetstream::consumer::{self, AckPolicy};
use polybus_core::{Error, Result};

/// What this polybus configuration needs from a group's consumer.
#[derive(Debug, Clone)]
pub(crate) struct Wanted {
    /// The configured AckWait: keep-alives come every third of it.
    pub(crate) ack_wait: Duration,
    /// The configured MaxDeliver (`None`: unlimited).
    pub(crate) max_deliver: Option<u32>,
    /// How long pull requests wait (`NatsConfig::pull_expiry`).
    pub(crate) pull_expiry: Duration,
}

/// Limits a pull request must respect, taken from the consumer's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PullLimits {
    /// At most this many messages per request (`max_batch`).
    pub(crate) batch: Option<usize>,
    /// How long a request waits (`pull_expiry`, shortened to the consumer's `max_expires`).
    pub(crate) expires: Duration,
    /// At most this many bytes per request (`max_bytes`), sent only once the
    /// server asked for it.
    pub(crate) max_bytes: Option<usize>,
}

impl PullLimits {
    /// No limit from the consumer.
    pub(crate) fn new(expires: Duration) -> Self {
        PullLimits {
            batch: None,
            expires,
            max_bytes: None,
        }
    }

    /// The body of a pull request for up to `credits` messages.
    pub(crate) fn request_body(&self, credits: usize) -> String {
        let expires = self.expires.as_nanos().min(i64::MAX as u128);
        match self.max_bytes {
            Some(bytes) => format!(r#"{{"batch":{credits},"expires":{expires},"max_bytes":{bytes}}}"#),
            None => format!(r#"{{"batch":{credits},"expires":{expires}}}"#),
        }
    }

    /// Limits the credit of one request to the consumer's `max_batch`.
    pub(crate) fn cap(&self, credits: usize) -> usize {
        self.batch.map_or(credits, |b| credits.min(b.max(1)))
    }
}

/// Checks an existing group consumer (`existing`, from the server) for `topic`:
/// `Ok` with the limits pull requests must respect, or `InvalidConfig` naming
/// the first setting that cannot work with polybus.
pub(crate) fn check_existing(
    existing: &consumer::Config,
    topic: &str,
    group: &str,
    wanted: &Wanted,
) -> Result<PullLimits> {
    let refuse = |field: &str, value: String, why: &str| {
        Err(Error::InvalidConfig(format!(
            "NATS group '{group}' on '{topic}' exists with {field} {value}: {why}; \
             delete the group's consumer (or use another group name)"
        )))
    };
    if let Some(subject) = &existing.deliver_subject {
        return refuse(
            "deliver_subject",
            format!("{subject:?}"),
            "it is a push consumer and polybus pulls",
        );
    }
    if existing.ack_policy != AckPolicy::Explicit {
        return refuse(
            "ack_policy",
            format!("{:?}", existing.ack_policy),
            "polybus acks each message on its own (AckPolicy Explicit): with None nothing is \
             redelivered, with All one ack settles every earlier message",
        );
    }
    if let Some(short) = existing.backoff.iter().find(|b| **b < wanted.ack_wait) {
        return refuse(
            "backoff",
            format!("{:?}", existing.backoff),
            &format!(
                "its step {short:?} replaces AckWait and is shorter than the configured ack_wait {:?}, \
                 so held messages would be redelivered before their keep-alive",
                wanted.ack_wait
            ),
        );
    }
    if existing.ack_wait < wanted.ack_wait {
        // Keep-alives every third of the configured AckWait would come too late
        // for the server's shorter one: held messages would be redelivered.
        return Err(Error::InvalidConfig(format!(
            "NATS group '{group}' on '{topic}' exists with AckWait {:?}, shorter than the configured {:?}; \
             configure ack_wait of at most {:?} or delete the group's consumer",
            existing.ack_wait, wanted.ack_wait, existing.ack_wait
        )));
    }
    if existing.max_deliver > 0 {
        let enough = wanted
            .max_deliver
            .is_some_and(|m| i64::from(m) <= existing.max_deliver);
        if !enough {
            return refuse(
                "MaxDeliver",
                existing.max_deliver.to_string(),
                &format!(
                    "the server would stop delivering a message silently after that many deliveries \
                     (releases count) while the configuration asks for {}",
                    wanted
                        .max_deliver
                        .map_or_else(|| "unlimited".to_owned(), |m| m.to_string())
                ),
            );
        }
    }
    // (`filter_subjects` and priority groups need servers 2.10 and 2.11 and
    // async-nats features this crate does not enable.)
    let filter = &existing.filter_subject;
    if !filter.is_empty() && !subject_matches(filter, topic) {
        return refuse(
            "filter_subject",
            format!("{filter:?}"),
            &format!("it does not take the topic's subject '{topic}', so nothing would be delivered"),
        );
    }
    if existing.headers_only {
        return refuse(
            "headers_only",
            "true".into(),
            "messages would arrive without their payloads",
        );
    }
    if !existing.inactive_threshold.is_zero() {
        return refuse(
            "inactive_threshold",
            format!("{:?}", existing.inactive_threshold),
            "the server deletes the group (and its position) while nobody consumes, so the \
             group would not keep every message published to the topic",
        );
    }
    let mut limits = PullLimits::new(wanted.pull_expiry);
    if existing.max_batch > 0 {
        limits.batch = Some(usize::try_from(existing.max_batch).unwrap_or(usize::MAX));
    }
    if !existing.max_expires.is_zero() {
        limits.expires = limits.expires.min(existing.max_expires);
    }
    // `max_bytes` limits only requests that ask for bytes; polybus asks for none
    // (it adapts if the server says otherwise), so any value works.
    Ok(limits)
}

/// Whether the filter `filter` (with `*` and `>` wildcards) takes `subject`.
fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted() -> Wanted {
        Wanted {
            ack_wait: Duration::from_secs(30),
            max_deliver: None,
            pull_expiry: Duration::from_secs(5),
        }
    }

    fn ok_config() -> consumer::Config {
        consumer::Config {
            durable_name: Some("g".into()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_deliver: -1,
            ..Default::default()
        }
    }

    fn refused_field(config: consumer::Config, wanted: &Wanted) -> String {
        match check_existing(&config, "orders.created", "g", wanted) {
            Err(Error::InvalidConfig(m)) => m,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn a_compatible_consumer_passes() {
        let limits = check_existing(&ok_config(), "orders.created", "g", &wanted()).unwrap();
        assert_eq!(limits, PullLimits::new(Duration::from_secs(5)));
        let mut c = ok_config();
        c.filter_subject = "orders.*".into();
        c.ack_wait = Duration::from_secs(60);
        c.max_bytes = 100;
        assert!(check_existing(&c, "orders.created", "g", &wanted()).is_ok());
    }

    #[test]
    fn request_limits_are_adapted() {
        let mut c = ok_config();
        c.max_batch = 2;
        c.max_expires = Duration::from_secs(1);
        let limits = check_existing(&c, "orders.created", "g", &wanted()).unwrap();
        assert_eq!(limits.batch, Some(2));
        assert_eq!(limits.expires, Duration::from_secs(1));
        assert_eq!(limits.cap(10), 2);
        assert_eq!(limits.request_body(2), r#"{"batch":2,"expires":1000000000}"#);
    }

    #[test]
    fn unworkable_settings_are_refused_by_name() {
        let w = wanted();
        let mut cases: Vec<(&str, consumer::Config)> = Vec::new();
        let mut c = ok_config();
        c.deliver_subject = Some("push.here".into());
        cases.push(("deliver_subject", c));
        for policy in [AckPolicy::None, AckPolicy::All] {
            let mut c = ok_config();
            c.ack_policy = policy;
            cases.push(("ack_policy", c));
        }
        let mut c = ok_config();
        c.ack_wait = Duration::from_secs(5);
        cases.push(("AckWait", c));
        let mut c = ok_config();
        c.backoff = vec![Duration::from_secs(1), Duration::from_secs(60)];
        cases.push(("backoff", c));
        let mut c = ok_config();
        c.max_deliver = 3;
        cases.push(("MaxDeliver", c));
        let mut c = ok_config();
        c.filter_subject = "orders.cancelled".into();
        cases.push(("filter_subject", c));
        let mut c = ok_config();
        c.headers_only = true;
        cases.push(("headers_only", c));
        let mut c = ok_config();
        c.inactive_threshold = Duration::from_secs(60);
        cases.push(("inactive_threshold", c));
        for (field, config) in cases {
            let message = refused_field(config, &w);
            assert!(message.contains(field), "{field}: {message}");
        }
    }

    #[test]
    fn max_deliver_is_refused_only_below_the_configured_one() {
        let mut c = ok_config();
        c.max_deliver = 10;
        let mut w = wanted();
        w.max_deliver = Some(5);
        assert!(check_existing(&c, "t", "g", &w).is_ok());
        w.max_deliver = Some(20);
        assert!(refused_field(c, &w).contains("MaxDeliver"));
    }

    #[test]
    fn filters_match_like_the_server() {
        assert!(subject_matches("a.b", "a.b"));
        assert!(subject_matches("a.*", "a.b"));
        assert!(subject_matches("a.>", "a.b.c"));
        assert!(subject_matches(">", "a"));
        assert!(!subject_matches("a.*", "a.b.c"));
        assert!(!subject_matches("a.b", "a.c"));
        assert!(!subject_matches("a.b.c", "a.b"));
    }
}
