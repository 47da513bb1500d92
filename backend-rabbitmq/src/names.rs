//! Pure name mapping from portable names to RabbitMQ objects.
//!
//! | portable | RabbitMQ |
//! |---|---|
//! | topic `t` | durable topic exchange `t` |
//! | dead-letter topic `t.dlq` | exchange `t.dlq`, and the queue `t.dlq` that keeps dead letters |
//! | group `g` of topic `t` | durable queue `t~g` |
//! | subscription without a group | exclusive queue `t~private~<id>` |
//!
//! `~` is outside the portable grammar (letters, digits, `.`, `_`, `-`), so the
//! first `~` of a queue name splits it back into its topic and the rest, and a
//! group name cannot contain one: two different (topic, group) pairs never share
//! a queue, no group queue is a dead-letter queue (those hold no `~`), and no
//! private queue is a group queue (`private~<id>` is not a valid group). No group
//! name is reserved. Versions before issue 12 named group queues `t.g`, which
//! was ambiguous (`x` + `b.c` and `x.b` + `c`; group `dlq` of `x` was the
//! dead-letter queue `x.dlq`); see [`legacy_group_queue`].

/// What separates a topic from the rest of a queue name: outside the portable
/// grammar, so the mapping is injective.
pub const SEPARATOR: char = '~';

/// The durable queue that holds `group`'s messages of `topic`: `<topic>~<group>`.
pub fn group_queue(topic: &str, group: &str) -> String {
    format!("{topic}{SEPARATOR}{group}")
}

/// The durable queue that keeps `topic`'s dead letters: `<topic>.dlq`, named
/// like the dead-letter topic (whose exchange it is bound to).
pub fn dead_letter_queue(topic: &str) -> String {
    polybus_core::names::dead_letter_topic(topic)
}

/// The exclusive queue of a subscription without a group: `<topic>~private~<id>`.
pub(crate) fn private_queue(topic: &str, id: &str) -> String {
    format!("{topic}{SEPARATOR}private{SEPARATOR}{id}")
}

/// The name versions before issue 12 gave `group`'s queue: `<topic>.<group>`.
/// Not injective; `None` when it is the topic's dead-letter queue (group
/// `dlq`), whose backlog is dead letters and stays where it is.
pub(crate) fn legacy_group_queue(topic: &str, group: &str) -> Option<String> {
    let name = format!("{topic}.{group}");
    (name != dead_letter_queue(topic)).then_some(name)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Every portable name of up to three characters over a small alphabet
    /// that covers the separators in use.
    fn names() -> Vec<String> {
        let alphabet = ["a", "b", ".", "d", "l", "q"];
        let mut out: Vec<String> = vec![String::new()];
        let mut all = Vec::new();
        for _ in 0..3 {
            out = out
                .iter()
                .flat_map(|p| alphabet.iter().map(move |c| format!("{p}{c}")))
                .collect();
            all.extend(out.iter().cloned());
        }
        all.push("dlq".into());
        all.push("b.dlq".into());
        all.sort();
        all.dedup();
        all.retain(|n| polybus_core::names::validate_group(n).is_ok());
        all
    }

    #[test]
    fn queue_names_are_injective() {
        let names = names();
        let mut seen: HashMap<String, String> = HashMap::new();
        let mut claim = |queue: String, owner: String| {
            if let Some(other) = seen.insert(queue.clone(), owner.clone()) {
                panic!("{queue} is both {other} and {owner}");
            }
        };
        for topic in &names {
            claim(dead_letter_queue(topic), format!("dead letters of {topic}"));
            claim(private_queue(topic, "0123"), format!("private of {topic}"));
            for group in &names {
                claim(group_queue(topic, group), format!("group {group} of {topic}"));
            }
        }
    }

    #[test]
    fn the_old_names_were_ambiguous() {
        assert_eq!(legacy_group_queue("x", "b.c"), legacy_group_queue("x.b", "c"));
        assert_eq!(legacy_group_queue("x", "dlq"), None);
        assert_ne!(group_queue("x", "b.c"), group_queue("x.b", "c"));
        assert_eq!(group_queue("rides.created", "billing"), "rides.created~billing");
    }
}
