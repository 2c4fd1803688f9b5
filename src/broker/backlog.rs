//! A bound on what waits for one network client.
//!
//! rmqtt hands each routed message to a session through an unbounded
//! channel; its own bound (`max_queued_messages`) applies only once the
//! session has taken the message from that channel, which it cannot do
//! while it is stuck writing to a slow client. A subscriber slower than a
//! fast publisher (the gateway's own pipeline publishes in-process, with
//! no TCP connection to slow it down) would grow memory without limit:
//! 349.5 MiB was measured with one TCP subscriber on `#` and 200 000
//! readings a second.
//!
//! So every message routed to a client is counted here until the client's
//! session delivers it or drops it (rmqtt's `MessageDelivered` and
//! `MessageDropped` hooks); beyond [`Backlog::limit`] waiting messages,
//! further ones are dropped for that client, counted and logged as
//! `queue_full`, as Mosquitto drops for a client past its
//! `max_queued_messages`. Other clients and the gateway's own subscribers
//! are not affected.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use rmqtt::types::ClientId;

pub struct Backlog {
    limit: u64,
    waiting: Mutex<HashMap<ClientId, u64>>,
}

impl Backlog {
    /// Room beyond `max_queued_messages` for the messages on their way
    /// into a session's queue (a burst a client that keeps up takes in
    /// stride: 50 ms of the pipeline at 200 000 readings a second).
    pub const ON_THE_WAY: u64 = 10_000;

    pub fn new(max_queued_messages: usize) -> Backlog {
        Backlog {
            limit: u64::try_from(max_queued_messages)
                .unwrap_or(u64::MAX)
                .saturating_add(Self::ON_THE_WAY),
            waiting: Mutex::default(),
        }
    }

    /// Messages that may wait for one client.
    #[cfg(test)]
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Counts one more message for `client`; whether it may be sent (false:
    /// drop it and report the drop, which counts it out again).
    pub fn admit(&self, client: &ClientId) -> bool {
        let mut waiting = self.lock();
        let n = waiting.entry(client.clone()).or_insert(0);
        *n += 1;
        *n <= self.limit
    }

    /// One message for `client` delivered or dropped.
    pub fn done(&self, client: &str) {
        let mut waiting = self.lock();
        if let Some(n) = waiting.get_mut(client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                waiting.remove(client);
            }
        }
    }

    /// A new connection for `client`: what its previous one had waiting was
    /// handed over or thrown away with it.
    pub fn reset(&self, client: &str) {
        self.lock().remove(client);
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<ClientId, u64>> {
        // A poisoned lock only means a panic elsewhere; the counts are whole.
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beyond_the_limit_messages_are_refused_until_some_are_taken() {
        let b = Backlog::new(2);
        let c = ClientId::from("slow");
        let limit = b.limit();
        assert_eq!(limit, 2 + Backlog::ON_THE_WAY);
        for _ in 0..limit {
            assert!(b.admit(&c));
        }
        assert!(!b.admit(&c), "one past the limit");
        b.done("slow"); // the refused one, reported as dropped
        assert!(!b.admit(&c), "still full");
        b.done("slow");
        b.done("slow"); // one delivered
        assert!(b.admit(&c));
        assert!(
            b.admit(&ClientId::from("other")),
            "others are not held back"
        );
        b.reset("slow");
        assert!(b.admit(&c));
    }

    #[test]
    fn counts_never_go_below_zero() {
        let b = Backlog::new(0);
        b.done("x");
        b.done("x");
        let c = ClientId::from("x");
        for _ in 0..b.limit() {
            assert!(b.admit(&c));
        }
        assert!(!b.admit(&c));
    }
}
