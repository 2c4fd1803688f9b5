//! Reconnect delays: rumqttc reconnects at once on the next `poll()`, so
//! without this a dead broker costs thousands of attempts per second.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Exponential backoff with "equal jitter": attempt `n` waits a random time
/// in `[d/2, d]` where `d = min(max, min * 2^n)`. The lower half is fixed, so
/// the number of attempts in any window has a hard upper bound (what the
/// reconnect-storm test counts), and the random half spreads many gateways
/// that lost the same broker.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
    connected_at: Option<Instant>,
    rng: StdRng,
}

/// A connection must have lasted this long before the delays start over;
/// a broker that accepts and then drops us at once keeps backing off.
const STABLE: Duration = Duration::from_secs(10);

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
            connected_at: None,
            rng: StdRng::from_entropy(),
        }
    }

    /// The upper bound `d` of attempt `n` (before jitter).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.ceiling(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        let half = d / 2;
        let jitter_ns = self
            .rng
            .gen_range(0..=half.as_nanos().min(u64::MAX as u128) as u64);
        half + Duration::from_nanos(jitter_ns)
    }

    /// A CONNACK arrived.
    pub fn connected(&mut self) {
        self.connected_at = Some(Instant::now());
    }

    /// The connection ended: start over only if it was stable.
    pub fn disconnected(&mut self) {
        if self
            .connected_at
            .take()
            .is_some_and(|t| t.elapsed() >= STABLE)
        {
            self.attempt = 0;
        }
    }

    /// Attempts since the last stable connection.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_with_jitter_up_to_the_cap() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        let mut b = Backoff::new(min, max);
        let mut ceilings = Vec::new();
        for n in 0..10 {
            let d = b.next_delay();
            let c = b.ceiling(n);
            assert!(
                d >= c / 2 && d <= c,
                "attempt {n}: {d:?} not in [{:?}, {c:?}]",
                c / 2
            );
            ceilings.push(c.as_millis());
        }
        assert_eq!(
            ceilings,
            [100, 200, 400, 800, 1600, 2000, 2000, 2000, 2000, 2000]
        );
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(b.ceiling(1000), Duration::from_secs(60));
    }

    #[test]
    fn short_connections_keep_backing_off() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        b.next_delay();
        b.next_delay();
        b.connected();
        b.disconnected();
        assert_eq!(b.attempt(), 2);
    }
}
