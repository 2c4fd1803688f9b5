//! The one pacer of every profile: `queue.drain_rate` of a generic bridge,
//! `min_interval` of OneNET.

use std::time::Duration;

use tokio::time::Instant;

/// At most one send per `step`. Unused time is not banked, so a quiet
/// minute does not allow a burst afterwards.
#[derive(Debug)]
pub struct Pacer {
    step: Duration,
    next: Instant,
}

impl Pacer {
    pub fn new(step: Duration, now: Instant) -> Pacer {
        Pacer { step, next: now }
    }

    /// At most `rate` sends per second.
    pub fn per_second(rate: u32, now: Instant) -> Pacer {
        Pacer::new(Duration::from_secs(1) / rate.max(1), now)
    }

    /// When the next send may go.
    pub fn next(&self) -> Instant {
        self.next
    }

    pub fn ready(&self, now: Instant) -> bool {
        self.next <= now
    }

    /// Something was sent at `now` (a reply, which does not wait for the
    /// pace but counts against it).
    pub fn sent(&mut self, now: Instant) {
        self.next = now + self.step;
    }

    /// May one message go now? If so, the next one may go one step later.
    pub fn take(&mut self, now: Instant) -> bool {
        if !self.ready(now) {
            return false;
        }
        self.sent(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_spaces_sends_and_banks_no_burst() {
        let t0 = Instant::now();
        let mut p = Pacer::per_second(10, t0);
        assert!(p.take(t0));
        assert!(!p.take(t0), "one step (100ms) must pass");
        assert!(!p.take(t0 + Duration::from_millis(99)));
        assert!(p.take(t0 + Duration::from_millis(100)));
        // After a long pause: one send now, then one per step again.
        let later = t0 + Duration::from_secs(60);
        assert!(p.take(later));
        assert!(!p.take(later), "quiet time is not banked");
        assert!(p.take(later + Duration::from_millis(100)));
    }

    #[test]
    fn an_interval_pacer_spaces_messages() {
        let t0 = Instant::now();
        let mut p = Pacer::new(Duration::from_secs(1), t0);
        assert!(p.ready(t0));
        p.sent(t0);
        assert!(!p.ready(t0 + Duration::from_millis(999)));
        assert!(p.ready(t0 + Duration::from_secs(1)));
        assert_eq!(p.next(), t0 + Duration::from_secs(1));
    }
}
