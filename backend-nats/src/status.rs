//! What a status reply to a JetStream pull request means, as a table.
//!
//! A pull request (`$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`) is answered
//! by messages and by status messages (a code and a description). Each status
//! falls in one class, decided here by a pure function so the table can be read
//! and tested on its own:
//!
//! | status | class |
//! |---|---|
//! | 100 idle heartbeat / flow control | ignored |
//! | 404 No Messages, 408 Request Timeout, 409 Batch Completed | the request is over: ask again |
//! | 409 Exceeded MaxRequestBatch of N | adjust: ask for at most N |
//! | 409 Exceeded MaxRequestExpires of D | adjust: expire before D |
//! | 409 Exceeded MaxRequestMaxBytes of N | adjust: ask for at most N bytes |
//! | 409 Exceeded MaxWaiting, Leadership Change, Server Shutdown | transient: retry with backoff, bounded |
//! | 503 No Responders | ask the consumer's info: missing consumer (terminal, or recreated if ephemeral) or JetStream unavailable (transient) |
//! | 409 Consumer Deleted | consumer gone: terminal for a group, recreated if ephemeral |
//! | 409 Consumer is push based, 409 Message Size Exceeds MaxBytes, 400 Bad Request, 423 pin mismatch | terminal: the subscription ends with a non-retryable error |
//! | anything else | transient (unknown), bounded |

use std::time::Duration;

/// What the pump does about one status reply to its pull request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PullStatus {
    /// A heartbeat: nothing to do.
    Ignore,
    /// The pull request is over (expired, nothing more): ask again at once.
    Done,
    /// The consumer allows at most this many messages per request.
    MaxBatch(usize),
    /// The consumer allows pull requests to wait at most this long.
    MaxExpires(Duration),
    /// The consumer allows at most this many bytes per request.
    MaxBytes(usize),
    /// Try again after a backoff; give up (visibly) after a bound.
    Transient,
    /// Nobody serves the consumer's subject: the consumer or JetStream is gone.
    NoResponders,
    /// The consumer was deleted.
    ConsumerDeleted,
    /// Nothing will change by asking again: the subscription ends.
    Terminal,
}

/// Classifies a status reply by its code and description.
pub(crate) fn classify(code: u16, description: &str) -> PullStatus {
    let lower = description.trim().to_ascii_lowercase();
    match code {
        100 => PullStatus::Ignore,
        404 | 408 => PullStatus::Done,
        503 => PullStatus::NoResponders,
        400 | 423 => PullStatus::Terminal,
        409 => {
            if let Some(n) = after(&lower, "exceeded maxrequestbatch of") {
                return n
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .map_or(PullStatus::Terminal, PullStatus::MaxBatch);
            }
            if let Some(d) = after(&lower, "exceeded maxrequestexpires of") {
                return parse_go_duration(d)
                    .filter(|d| !d.is_zero())
                    .map_or(PullStatus::Terminal, PullStatus::MaxExpires);
            }
            if let Some(n) = after(&lower, "exceeded maxrequestmaxbytes of") {
                return n
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .map_or(PullStatus::Terminal, PullStatus::MaxBytes);
            }
            if lower.contains("consumer deleted") {
                PullStatus::ConsumerDeleted
            } else if lower.contains("push based")
                || lower.contains("message size exceeds maxbytes")
                || lower.contains("bad request")
                || lower.contains("pin")
            {
                PullStatus::Terminal
            } else if lower.contains("batch completed") {
                PullStatus::Done
            } else {
                // Exceeded MaxWaiting, Leadership Change, Server Shutdown and
                // anything new: worth another try, within a bound.
                PullStatus::Transient
            }
        }
        _ => PullStatus::Transient,
    }
}

fn after<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.find(prefix).map(|at| text[at + prefix.len()..].trim())
}

/// Parses a Go duration as the server prints it (`1s`, `500ms`, `1m30s`, `1.5s`, `250µs`).
pub(crate) fn parse_go_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    if text == "0" || text == "0s" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..number_end].parse().ok()?;
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" | "μs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total += value * scale;
    }
    Duration::try_from_secs_f64(total).ok()
}

/// Backoff and bound for transient statuses: 250 ms doubling to 5 s, and an
/// error once the same trouble has lasted `limit` without a delivery in between.
#[derive(Debug)]
pub(crate) struct Transient {
    limit: Duration,
    since: Option<tokio::time::Instant>,
    attempts: u32,
}

impl Transient {
    pub(crate) fn new(limit: Duration) -> Self {
        Transient {
            limit,
            since: None,
            attempts: 0,
        }
    }

    /// Something worked: the next trouble starts a new count.
    pub(crate) fn reset(&mut self) {
        self.since = None;
        self.attempts = 0;
    }

    /// One more transient failure at `now`: the pause before the next try, or
    /// `None` once the trouble has lasted past the bound.
    pub(crate) fn failed(&mut self, now: tokio::time::Instant) -> Option<Duration> {
        let since = *self.since.get_or_insert(now);
        if now.duration_since(since) >= self.limit {
            return None;
        }
        let pause = Duration::from_millis(250).saturating_mul(1 << self.attempts.min(5));
        self.attempts += 1;
        Some(pause.min(Duration::from_secs(5)))
    }

    /// How long the trouble has lasted.
    pub(crate) fn lasted(&self, now: tokio::time::Instant) -> Duration {
        self.since.map_or(Duration::ZERO, |s| now.duration_since(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table() {
        use PullStatus::*;
        let cases: &[(u16, &str, PullStatus)] = &[
            (100, "Idle Heartbeat", Ignore),
            (100, "FlowControl Request", Ignore),
            (404, "No Messages", Done),
            (408, "Request Timeout", Done),
            (409, "Batch Completed", Done),
            (409, "Exceeded MaxRequestBatch of 2", MaxBatch(2)),
            (
                409,
                "Exceeded MaxRequestExpires of 1s",
                MaxExpires(Duration::from_secs(1)),
            ),
            (
                409,
                "Exceeded MaxRequestExpires of 1.5s",
                MaxExpires(Duration::from_millis(1500)),
            ),
            (409, "Exceeded MaxRequestMaxBytes of 1024", MaxBytes(1024)),
            (409, "Exceeded MaxRequestBatch of zero", Terminal),
            (409, "Exceeded MaxWaiting", Transient),
            (409, "Leadership Change", Transient),
            (409, "Server Shutdown", Transient),
            (409, "Something New", Transient),
            (409, "Consumer Deleted", ConsumerDeleted),
            (409, "Consumer is push based", Terminal),
            (409, "Message Size Exceeds MaxBytes", Terminal),
            (400, "Bad Request", Terminal),
            (423, "Nats-Pin-Id mismatch", Terminal),
            (503, "", NoResponders),
            (500, "Internal Error", Transient),
        ];
        for (code, description, expected) in cases {
            assert_eq!(&classify(*code, description), expected, "{code} {description}");
        }
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("250µs"), Some(Duration::from_micros(250)));
        assert_eq!(parse_go_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_go_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("soon"), None);
        assert_eq!(parse_go_duration(""), None);
    }

    #[test]
    fn transient_trouble_is_bounded() {
        let start = tokio::time::Instant::now();
        let mut t = Transient::new(Duration::from_secs(10));
        assert_eq!(t.failed(start), Some(Duration::from_millis(250)));
        assert_eq!(t.failed(start), Some(Duration::from_millis(500)));
        for _ in 0..10 {
            assert!(t.failed(start + Duration::from_secs(1)).unwrap() <= Duration::from_secs(5));
        }
        assert_eq!(t.failed(start + Duration::from_secs(10)), None);
        t.reset();
        assert_eq!(
            t.failed(start + Duration::from_secs(11)),
            Some(Duration::from_millis(250))
        );
    }
}
