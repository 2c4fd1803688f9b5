//! Packet id to acknowledgement tracking. rumqttc's `publish()` returns no
//! packet id, but its event loop emits `Outgoing::Publish(pkid)` for every
//! publish in the order the requests were queued (pkid 0 for QoS 0), and
//! `Incoming::PubAck(pkid)` / `Incoming::PubComp(pkid)` when the broker
//! acknowledges. Only one task publishes through the client, so the order
//! holds.

use std::collections::{HashMap, VecDeque};

use crate::model::Qos;

/// Tracks queue ids from "handed to rumqttc" to "acknowledged".
#[derive(Debug, Default)]
pub struct AckTracker {
    /// Handed to the client, packet id not yet known; in request order.
    unassigned: VecDeque<(i64, Qos)>,
    /// QoS 1/2 publishes on the wire, by packet id.
    inflight: HashMap<u16, i64>,
    /// How many of `unassigned` are QoS 1/2.
    unassigned_acked: usize,
}

impl AckTracker {
    pub fn new() -> AckTracker {
        AckTracker::default()
    }

    /// Queue message `id` was handed to the client.
    pub fn sent(&mut self, id: i64, qos: Qos) {
        if qos != Qos::AtMostOnce {
            self.unassigned_acked += 1;
        }
        self.unassigned.push_back((id, qos));
    }

    /// `Outgoing::Publish(pkid)`: the oldest unassigned publish was written.
    /// Returns the queue id if it is now done (QoS 0 needs no ack).
    pub fn on_outgoing_publish(&mut self, pkid: u16) -> Option<i64> {
        let (id, qos) = self.unassigned.pop_front()?;
        if qos != Qos::AtMostOnce {
            self.unassigned_acked -= 1;
        }
        if qos == Qos::AtMostOnce || pkid == 0 {
            return Some(id);
        }
        if let Some(old) = self.inflight.insert(pkid, id) {
            // Cannot happen with in-order acks; if a broker misbehaves, the
            // older message stays in the queue and is sent again later.
            tracing::warn!(pkid, old, new = id, "packet id reused before its ack");
        }
        None
    }

    /// PUBACK (QoS 1) or PUBCOMP (QoS 2) for `pkid`: returns the queue id
    /// that can now be deleted.
    pub fn on_ack(&mut self, pkid: u16) -> Option<i64> {
        self.inflight.remove(&pkid)
    }

    /// Messages handed to the client and not yet done.
    pub fn in_flight(&self) -> usize {
        self.unassigned.len() + self.inflight.len()
    }

    /// QoS 1/2 messages handed to the client and not yet acknowledged: what
    /// MQTT's receive window (`max_inflight`) limits.
    pub fn awaiting_ack(&self) -> usize {
        self.unassigned_acked + self.inflight.len()
    }

    /// The connection is gone: forget everything. Returns the queue ids that
    /// were in flight; they are still in the queue and will be sent again.
    pub fn reset(&mut self) -> Vec<i64> {
        self.unassigned_acked = 0;
        let mut ids: Vec<i64> = self.unassigned.drain(..).map(|(id, _)| id).collect();
        ids.extend(self.inflight.drain().map(|(_, id)| id));
        ids.sort_unstable();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_packet_ids_with_acks() {
        let mut t = AckTracker::new();
        t.sent(10, Qos::AtLeastOnce);
        t.sent(11, Qos::AtMostOnce);
        t.sent(12, Qos::ExactlyOnce);
        assert_eq!(t.in_flight(), 3);
        assert_eq!(t.awaiting_ack(), 2, "QoS 0 waits for no ack");
        assert_eq!(t.on_outgoing_publish(1), None);
        assert_eq!(
            t.on_outgoing_publish(0),
            Some(11),
            "QoS 0 is done once written"
        );
        assert_eq!(t.on_outgoing_publish(2), None);
        assert_eq!(t.on_ack(2), Some(12));
        assert_eq!(t.on_ack(2), None, "a second ack is ignored");
        assert_eq!(t.awaiting_ack(), 1);
        assert_eq!(t.on_ack(1), Some(10));
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.awaiting_ack(), 0);
    }

    #[test]
    fn reset_returns_everything_in_flight() {
        let mut t = AckTracker::new();
        t.sent(5, Qos::AtLeastOnce);
        t.sent(6, Qos::AtLeastOnce);
        t.on_outgoing_publish(7);
        assert_eq!(t.reset(), [5, 6]);
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.awaiting_ack(), 0);
        assert_eq!(t.on_ack(7), None);
    }
}
