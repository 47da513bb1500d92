//! Pure name mapping from portable names to RabbitMQ objects.

/// The queue that holds `group`'s messages of `topic`.
pub fn group_queue(topic: &str, group: &str) -> String {
    format!("{topic}.{group}")
}
