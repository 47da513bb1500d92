//! Time arithmetic shared by the runner and the backends.

use std::time::Duration;

use tokio::time::Instant;

/// `now + d`, saturating a century ahead instead of panicking on overflow, so a
/// caller's `Duration::MAX` (a deadline, a delay, an ack deadline) is "never".
pub fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saturates_instead_of_overflowing() {
        let now = Instant::now();
        assert_eq!(later(now, Duration::from_secs(1)), now + Duration::from_secs(1));
        assert!(later(now, Duration::MAX) > now + Duration::from_secs(365 * 24 * 3600));
    }
}
