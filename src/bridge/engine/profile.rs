//! What a profile supplies to the engine: who the bridge is on the remote
//! broker, how local messages become remote ones and back, and what it
//! answers. Everything here is free of I/O: a profile says what to do in
//! [`Actions`], the engine does it.

use std::collections::VecDeque;

use bytes::Bytes;
use tokio::time::Instant;

use crate::bridge::mqtt::{AckTracker, RemoteOptions};
use crate::bridge::queue::QueuedMessage;
use crate::model::{Message, Qos};

/// One kind of remote peer: a generic MQTT broker
/// ([`crate::bridge::Bridge`]) or OneNET. A closed set, implemented in
/// this crate only.
pub trait Profile: Send {
    /// The options of the next connection attempt (OneNET signs a fresh
    /// token for each).
    fn connect_options(&mut self) -> Result<RemoteOptions, String>;

    /// While connected: when the connection must be replaced by a new one
    /// (OneNET's token expires). The engine says goodbye and reconnects at
    /// once, without counting an error.
    fn renew_at(&self) -> Option<Instant> {
        None
    }

    /// Whether the local link hands back what the bridge publishes itself
    /// (see [`super::LocalLink::echoes_own_publishes`]).
    fn set_echoes(&mut self, _echoes: bool) {}

    /// A message from the local bus or the inbox: its remote form for the
    /// queue, if it goes up at once. A profile that batches keeps it and
    /// returns the batch from [`Profile::on_due`].
    fn uplink(&mut self, m: Message, out: &mut Actions) -> Option<Message>;

    /// Nothing taken so far waits inside the profile (an open batch
    /// window): everything taken is in the queue or on its way to it.
    fn holds_nothing(&self) -> bool {
        true
    }

    /// The profile's next timer (a batch window, a request's deadline).
    fn due(&self, _connected: bool) -> Option<Instant> {
        None
    }

    /// The timer of [`Profile::due`] fired (or something else woke the
    /// engine): do what is due.
    fn on_due(&mut self, _now: Instant, _connected: bool, _out: &mut Actions) {}

    /// The bridge stops: whatever the profile holds goes to `out.queue`.
    fn flush(&mut self, _out: &mut Actions) {}

    /// CONNACK: the remote filters to subscribe to.
    fn on_connected(&mut self, session_present: bool) -> Vec<(String, Qos)>;

    /// Messages sent ahead of the queue after a CONNACK, one per pace step
    /// (OneNET's sub-device logins); the queue waits behind them.
    fn next_control(&mut self) -> Option<(String, Bytes)> {
        None
    }

    /// Whether [`Profile::next_control`] has something.
    fn has_control(&self) -> bool {
        false
    }

    /// How many unsent queued messages [`Profile::next_out`] wants to see.
    fn lookahead(&self) -> usize {
        1
    }

    /// The next thing to send, from the oldest unsent queued messages
    /// (`ready`, in queue order; `newest`: it holds every unsent message).
    /// Takes what it uses from `ready`.
    fn next_out(&mut self, ready: &mut VecDeque<QueuedMessage>, newest: bool) -> Option<Next>;

    /// A message from the remote broker on one of the subscriptions.
    fn on_remote(&mut self, m: Message, out: &mut Actions);
}

/// What the engine hands to the client next.
#[derive(Debug)]
pub enum Next {
    Send(Outgoing),
    /// Queued messages that must not be sent: deleted.
    Drop {
        ids: Vec<i64>,
        why: String,
    },
}

/// One publish made of one or more queued messages.
#[derive(Debug)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Bytes,
    pub qos: Qos,
    pub retain: bool,
    /// The newest queued message it carries.
    pub id: i64,
    /// Every queued message it carries, when it is more than `id` (a
    /// OneNET history post); deleted together on its acknowledgement.
    pub merged: Vec<i64>,
}

impl Outgoing {
    /// A queued message sent as it is.
    pub fn of(m: QueuedMessage) -> Outgoing {
        Outgoing {
            topic: m.topic,
            payload: m.payload,
            qos: m.qos,
            retain: m.retain,
            id: m.id,
            merged: Vec::new(),
        }
    }
}

/// What a profile asks the engine to do.
#[derive(Debug, Default)]
pub struct Actions {
    /// Remote messages for the durable queue, in order.
    pub queue: Vec<Message>,
    /// QoS 0 messages sent at once, past the queue (answers to requests);
    /// dropped when not connected.
    pub replies: Vec<(String, Bytes)>,
    /// Published on the local bus; `true`: counted in `received`.
    pub local: Vec<(Message, bool)>,
    /// Requests from the remote counted in `received`.
    pub received: u64,
    /// Shown as the status's `last_error`.
    pub error: Option<String>,
}

impl Actions {
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
            && self.replies.is_empty()
            && self.local.is_empty()
            && self.received == 0
            && self.error.is_none()
    }
}

/// What limits the messages handed to the client and not yet done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// QoS 1/2 messages waiting for their acknowledgement (MQTT's receive
    /// window, `max_inflight`); QoS 0 is bounded by the client's queue.
    AwaitingAck(usize),
    /// Everything handed over and not yet written or acknowledged.
    InFlight(usize),
}

impl Window {
    pub fn size(self) -> usize {
        match self {
            Window::AwaitingAck(n) | Window::InFlight(n) => n,
        }
    }

    pub fn is_open(self, tracker: &AckTracker) -> bool {
        match self {
            Window::AwaitingAck(n) => tracker.awaiting_ack() < n,
            Window::InFlight(n) => tracker.in_flight() < n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_count_what_they_say() {
        let mut t = AckTracker::new();
        t.sent(1, Qos::AtMostOnce);
        t.sent(2, Qos::AtLeastOnce);
        assert!(Window::AwaitingAck(2).is_open(&t), "QoS 0 awaits no ack");
        assert!(
            !Window::InFlight(2).is_open(&t),
            "everything handed over counts"
        );
        assert_eq!(t.on_outgoing_publish(0), Some(1));
        assert!(Window::InFlight(2).is_open(&t));
    }
}
