//! "A message published after a SUBSCRIBE reached the broker goes to that
//! subscription", which a single-threaded broker like Mosquitto gives for
//! free. rmqtt handles each connection on its own task, so a SUBSCRIBE
//! still being processed (hooks, the subscription tree) can lose the race
//! against another client's PUBLISH that arrived a moment later, and that
//! message is missed. The fence closes the gap: a subscription in progress
//! holds new publishes back until it is in place. An entry that is never
//! released (a subscription that failed inside rmqtt) stops counting after
//! [`HOLD_LIMIT`], so the worst case is one publish held that long.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Longest time a subscription in progress holds publishes back.
pub const HOLD_LIMIT: Duration = Duration::from_millis(50);

#[derive(Default)]
pub struct Fence {
    /// (client id, filter) -> when its SUBSCRIBE started.
    pending: Mutex<HashMap<(String, String), Instant>>,
    /// `pending.len()`, read without the lock on every publish.
    count: AtomicUsize,
    done: Notify,
}

impl Fence {
    pub fn enter(&self, client_id: &str, filter: &str) {
        let mut p = self.lock();
        p.insert((client_id.to_string(), filter.to_string()), Instant::now());
        self.count.store(p.len(), Ordering::Release);
    }

    pub fn leave(&self, client_id: &str, filter: &str) {
        let mut p = self.lock();
        p.remove(&(client_id.to_string(), filter.to_string()));
        self.count.store(p.len(), Ordering::Release);
        drop(p);
        self.done.notify_waiters();
    }

    /// Waits while a subscription started less than [`HOLD_LIMIT`] ago is
    /// still in progress.
    pub async fn wait(&self) {
        while self.count.load(Ordering::Acquire) > 0 {
            let notified = self.done.notified();
            let oldest = {
                let mut p = self.lock();
                p.retain(|_, started| started.elapsed() < HOLD_LIMIT);
                self.count.store(p.len(), Ordering::Release);
                p.values().min().copied()
            };
            let Some(oldest) = oldest else { return };
            let left = HOLD_LIMIT.saturating_sub(oldest.elapsed());
            let _ = tokio::time::timeout(left, notified).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Instant>> {
        // A poisoned lock means a panic while editing a map: it is whole.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_publish_waits_for_a_subscription_in_progress() {
        let fence = Arc::new(Fence::default());
        fence.enter("b", "t");
        let f = fence.clone();
        let waiter = tokio::spawn(async move {
            let start = Instant::now();
            f.wait().await;
            start.elapsed()
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        fence.leave("b", "t");
        let waited = waiter.await.unwrap();
        assert!(waited >= Duration::from_millis(9), "{waited:?}");
        assert!(waited < HOLD_LIMIT, "{waited:?}");
    }

    #[tokio::test]
    async fn a_subscription_never_released_stops_holding_after_the_limit() {
        let fence = Fence::default();
        fence.enter("b", "t");
        let start = Instant::now();
        fence.wait().await;
        let waited = start.elapsed();
        assert!(
            waited >= HOLD_LIMIT && waited < HOLD_LIMIT * 3,
            "{waited:?}"
        );
        let start = Instant::now();
        fence.wait().await;
        assert!(
            start.elapsed() < Duration::from_millis(5),
            "a stale entry still holds"
        );
    }
}
