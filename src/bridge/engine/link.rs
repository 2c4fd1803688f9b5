//! The connection to the remote broker and the one retry policy.
//!
//! Every connection attempt gets a client of its own, built from the
//! profile's options at that moment (so OneNET's token is fresh), and a
//! task ([`drive`]) that polls it: rumqttc's `poll()` must not be cancelled
//! mid-way, so it never runs in the engine's `select!`. The task ends with
//! the first error, and the client with it: publishes handed over just
//! before the error cannot come out after the reconnect and confuse the
//! packet id pairing, and rumqttc's in-memory retransmission never runs
//! (the durable queue resends).
//!
//! After an error the next attempt waits for [`Backoff`]'s delay; the
//! engine keeps taking local messages meanwhile.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bridge::mqtt::{
    remote_client, Backoff, RemoteConnection, RemoteError, RemoteEvent, RemoteOptions, RemoteSender,
};
use crate::config::ReconnectConfig;

/// Events from the connection task.
pub type ConnEvent = Result<RemoteEvent, RemoteError>;

/// Connection events waiting for the engine, at most.
const EVENTS: usize = 1024;

/// One connection attempt: its client and the task polling it.
struct Live {
    sender: RemoteSender,
    events: mpsc::Receiver<ConnEvent>,
    stop: CancellationToken,
    driver: tokio::task::JoinHandle<()>,
}

/// The current connection, if any, and when to try the next one.
pub struct Connector {
    live: Option<Live>,
    backoff: Backoff,
    retry_at: Option<Instant>,
}

impl Connector {
    /// Tries the first connection at once.
    pub fn new(reconnect: ReconnectConfig) -> Connector {
        Connector {
            live: None,
            backoff: Backoff::new(reconnect.min, reconnect.max),
            retry_at: Some(Instant::now()),
        }
    }

    /// Starts a connection attempt with `options`.
    pub fn connect(&mut self, options: &RemoteOptions) {
        let (sender, conn) = remote_client(options);
        let (events_tx, events) = mpsc::channel(EVENTS);
        let stop = CancellationToken::new();
        let driver = tokio::spawn(drive(conn, events_tx, stop.clone()));
        self.retry_at = None;
        self.live = Some(Live {
            sender,
            events,
            stop,
            driver,
        });
    }

    /// When the next attempt is due, while there is no connection.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at.filter(|_| self.live.is_none())
    }

    /// The client of the current attempt.
    pub fn sender(&self) -> Option<&RemoteSender> {
        self.live.as_ref().map(|l| &l.sender)
    }

    /// The next connection event; waits forever without a connection.
    /// Cancel-safe.
    pub async fn next(&mut self) -> ConnEvent {
        match &mut self.live {
            Some(live) => match live.events.recv().await {
                Some(ev) => ev,
                None => Err(RemoteError::Connection("connection task ended".into())),
            },
            None => std::future::pending().await,
        }
    }

    /// A connection event that is already waiting.
    pub fn try_next(&mut self) -> Option<ConnEvent> {
        self.live.as_mut()?.events.try_recv().ok()
    }

    /// A CONNACK arrived.
    pub fn connected(&mut self) {
        self.backoff.connected();
    }

    /// The attempt or the connection failed: it is dropped, and the next
    /// one waits for the returned delay.
    pub fn failed(&mut self) -> Duration {
        self.close_now();
        self.backoff.disconnected();
        let delay = self.backoff.next_delay();
        self.retry_at = Some(Instant::now() + delay);
        delay
    }

    /// Attempts since the last stable connection.
    pub fn attempt(&self) -> u32 {
        self.backoff.attempt()
    }

    /// Ends the connection on purpose (a goodbye was said): the next one
    /// may start at once.
    pub async fn close(&mut self, reconnect: bool) {
        if let Some(live) = self.live.take() {
            live.stop.cancel();
            let _ = live.driver.await;
        }
        self.backoff.disconnected();
        self.retry_at = reconnect.then(Instant::now);
    }

    fn close_now(&mut self) {
        if let Some(live) = self.live.take() {
            // The task ends by itself after an error; this covers the rest.
            live.stop.cancel();
        }
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        self.close_now();
    }
}

/// Polls one connection until it fails or `stop`.
async fn drive(
    mut conn: RemoteConnection,
    events: mpsc::Sender<ConnEvent>,
    stop: CancellationToken,
) {
    loop {
        let r = tokio::select! {
            r = conn.poll() => r,
            _ = stop.cancelled() => return,
        };
        let failed = r.is_err();
        if events.send(r).await.is_err() || failed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failures_back_off_and_a_goodbye_reconnects_at_once() {
        let min = Duration::from_millis(100);
        let mut c = Connector::new(ReconnectConfig {
            min,
            max: Duration::from_secs(1),
        });
        assert!(
            c.retry_at().is_some_and(|t| t <= Instant::now()),
            "the first attempt goes at once"
        );
        let first = c.failed();
        assert!(first >= min / 2 && first <= min, "{first:?}");
        let second = c.failed();
        assert!(second >= min && second <= 2 * min, "{second:?}");
        assert_eq!(c.attempt(), 2);
        let at = c.retry_at().expect("a retry is planned");
        assert!(at > Instant::now() + min / 2);
        // A goodbye on purpose (fresh credentials) counts no failure.
        c.close(true).await;
        assert!(c.retry_at().is_some_and(|t| t <= Instant::now()));
        c.close(false).await;
        assert_eq!(c.retry_at(), None, "stopped: no retry");
    }
}
