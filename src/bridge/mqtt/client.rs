//! One client type over rumqttc's MQTT 3.1.1 and MQTT 5 clients.

use bytes::Bytes;

use super::options::{qos_v4, qos_v5, RemoteOptions};
use crate::config::MqttProtocol;
use crate::model::{Message, Qos};

/// What happened on the connection, independent of the protocol version.
#[derive(Debug, Clone, PartialEq)]
pub enum RemoteEvent {
    /// CONNACK accepted. Without a session the broker forgot our
    /// subscriptions: subscribe again.
    Connected { session_present: bool },
    /// A publish was written to the socket with this packet id (0 for
    /// QoS 0); comes in the order the publishes were queued.
    Published { pkid: u16 },
    /// PUBACK (QoS 1) or PUBCOMP (QoS 2): the broker has the message.
    Acked { pkid: u16 },
    /// MQTT 5: the broker answered with a failure reason; sending the same
    /// message again would fail the same way.
    Refused { pkid: u16, reason: String },
    /// A message on one of our subscriptions.
    Received(Message),
    /// SUBACK; `refused` filters were not granted.
    Subscribed { refused: usize },
    /// Pings and the other half of QoS 2 flows.
    Other,
}

/// A connection problem: logged, shown in the status, then retried after a
/// backoff delay.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoteError {
    #[error("{0}")]
    Connection(String),
    #[error("the connection's request queue is full")]
    Busy,
    #[error("the connection is closed")]
    Closed,
}

enum Loop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

#[derive(Clone)]
enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// The event loop half of a remote connection: poll it in a loop in a task
/// of its own. Dropping a `poll()` future in the middle (e.g. in a
/// `select!`) can lose a half-written packet and its `Published` event, so
/// only cancel it to stop for good.
pub struct RemoteConnection {
    inner: Loop,
}

/// The request half: queues publishes and subscribes for the event loop.
/// Only one task should publish through it, so that `Published` events
/// pair with publishes in order (see [`super::AckTracker`]).
#[derive(Clone)]
pub struct RemoteSender {
    inner: Client,
}

impl std::fmt::Debug for RemoteConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteConnection").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for RemoteSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSender").finish_non_exhaustive()
    }
}

/// Requests the connection holds beyond the window: QoS 0 publishes sent
/// past the queue while the socket is busy.
const QOS0_ROOM: usize = 1024;

/// Creates a client for `options`; it connects on the first
/// [`RemoteConnection::poll`].
pub fn remote_client(options: &RemoteOptions) -> (RemoteSender, RemoteConnection) {
    // Room for a full window of publishes plus subscribes, and for a burst
    // of QoS 0 (which no window limits): what does not fit waits in the
    // durable queue, which is slower.
    let cap = options.max_inflight as usize + 16 + QOS0_ROOM;
    let (client, inner) = match options.protocol {
        MqttProtocol::Mqtt => {
            let (client, eventloop) = rumqttc::AsyncClient::new(options.v4(), cap);
            (Client::V4(client), Loop::V4(Box::new(eventloop)))
        }
        MqttProtocol::Mqtt5 => {
            let (client, eventloop) = rumqttc::v5::AsyncClient::new(options.v5(), cap);
            (Client::V5(client), Loop::V5(Box::new(eventloop)))
        }
    };
    (RemoteSender { inner: client }, RemoteConnection { inner })
}

impl RemoteConnection {
    /// The next event; connects first when not connected. After an error
    /// the bridge engine drops the client and makes a new one for the next
    /// attempt, so that rumqttc never retransmits from memory: the durable
    /// queue resends.
    pub async fn poll(&mut self) -> Result<RemoteEvent, RemoteError> {
        match &mut self.inner {
            Loop::V4(eventloop) => eventloop
                .poll()
                .await
                .map(event_v4)
                .map_err(|e| connection_error(e.to_string())),
            Loop::V5(eventloop) => eventloop
                .poll()
                .await
                .map(event_v5)
                .map_err(|e| connection_error(e.to_string())),
        }
    }
}

impl RemoteSender {
    /// Queues a publish; it is written on a following `poll`. Never waits.
    pub fn publish(
        &self,
        topic: &str,
        payload: Bytes,
        qos: Qos,
        retain: bool,
    ) -> Result<(), RemoteError> {
        match &self.inner {
            Client::V4(client) => client
                .try_publish(topic, qos_v4(qos), retain, payload)
                .map_err(client_error),
            Client::V5(client) => client
                .try_publish(topic, qos_v5(qos), retain, payload)
                .map_err(client_error),
        }
    }

    /// Queues one SUBSCRIBE for all `filters`.
    pub fn subscribe(&self, filters: &[(String, Qos)]) -> Result<(), RemoteError> {
        if filters.is_empty() {
            return Ok(());
        }
        match &self.inner {
            Client::V4(client) => client
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|(f, q)| rumqttc::SubscribeFilter::new(f.clone(), qos_v4(*q))),
                )
                .map_err(client_error),
            Client::V5(client) => {
                client
                    .try_subscribe_many(filters.iter().map(|(f, q)| {
                        rumqttc::v5::mqttbytes::v5::Filter::new(f.clone(), qos_v5(*q))
                    }))
                    .map_err(client_error)
            }
        }
    }

    /// Queues a DISCONNECT (a clean goodbye: the broker drops the will).
    pub fn disconnect(&self) -> Result<(), RemoteError> {
        match &self.inner {
            Client::V4(client) => client.try_disconnect().map_err(client_error),
            Client::V5(client) => client.try_disconnect().map_err(client_error),
        }
    }
}

/// rumqttc's text, with a hint where the fix is in the config.
fn connection_error(text: String) -> RemoteError {
    let hint = if text.contains("UnknownIssuer") {
        " (the broker's certificate is not signed by a CA we trust: check `tls.ca`)"
    } else if text.contains("NotValidForName") {
        " (the broker's certificate is not for this host name: check `url`)"
    } else if text.contains("CertificateRequired") || text.contains("certificate required") {
        " (the broker wants a client certificate: set `tls.cert` and `tls.key`)"
    } else {
        ""
    };
    RemoteError::Connection(format!("{text}{hint}"))
}

fn client_error<E: std::fmt::Display>(e: E) -> RemoteError {
    let text = e.to_string();
    if text.contains("full") || text.contains("Full") {
        RemoteError::Busy
    } else {
        RemoteError::Closed
    }
}

fn qos_from_v4(q: rumqttc::QoS) -> Qos {
    match q {
        rumqttc::QoS::AtMostOnce => Qos::AtMostOnce,
        rumqttc::QoS::AtLeastOnce => Qos::AtLeastOnce,
        rumqttc::QoS::ExactlyOnce => Qos::ExactlyOnce,
    }
}

fn qos_from_v5(q: rumqttc::v5::mqttbytes::QoS) -> Qos {
    use rumqttc::v5::mqttbytes::QoS;
    match q {
        QoS::AtMostOnce => Qos::AtMostOnce,
        QoS::AtLeastOnce => Qos::AtLeastOnce,
        QoS::ExactlyOnce => Qos::ExactlyOnce,
    }
}

/// A 3.1.1 event as the bridge sees it.
fn event_v4(event: rumqttc::Event) -> RemoteEvent {
    use rumqttc::{Event, Outgoing, Packet};
    match event {
        Event::Incoming(Packet::ConnAck(c)) => RemoteEvent::Connected {
            session_present: c.session_present,
        },
        Event::Outgoing(Outgoing::Publish(pkid)) => RemoteEvent::Published { pkid },
        Event::Incoming(Packet::PubAck(a)) => RemoteEvent::Acked { pkid: a.pkid },
        Event::Incoming(Packet::PubComp(c)) => RemoteEvent::Acked { pkid: c.pkid },
        Event::Incoming(Packet::Publish(p)) => RemoteEvent::Received(Message {
            topic: p.topic,
            payload: p.payload,
            qos: qos_from_v4(p.qos),
            retain: p.retain,
        }),
        Event::Incoming(Packet::SubAck(s)) => RemoteEvent::Subscribed {
            refused: s
                .return_codes
                .iter()
                .filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                .count(),
        },
        _ => RemoteEvent::Other,
    }
}

/// An MQTT 5 event as the bridge sees it: a PUBACK or PUBREC with an
/// error reason is a refusal.
fn event_v5(event: rumqttc::v5::Event) -> RemoteEvent {
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, PubRecReason, SubscribeReasonCode};
    use rumqttc::v5::Event;
    use rumqttc::Outgoing;
    match event {
        Event::Incoming(Packet::ConnAck(c)) => RemoteEvent::Connected {
            session_present: c.session_present,
        },
        Event::Outgoing(Outgoing::Publish(pkid)) => RemoteEvent::Published { pkid },
        Event::Incoming(Packet::PubAck(a)) => match a.reason {
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers => {
                RemoteEvent::Acked { pkid: a.pkid }
            }
            other => RemoteEvent::Refused {
                pkid: a.pkid,
                reason: format!("{other:?}"),
            },
        },
        Event::Incoming(Packet::PubRec(r)) => match r.reason {
            PubRecReason::Success | PubRecReason::NoMatchingSubscribers => RemoteEvent::Other,
            other => RemoteEvent::Refused {
                pkid: r.pkid,
                reason: format!("{other:?}"),
            },
        },
        Event::Incoming(Packet::PubComp(c)) => RemoteEvent::Acked { pkid: c.pkid },
        Event::Incoming(Packet::Publish(p)) => RemoteEvent::Received(Message {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload,
            qos: qos_from_v5(p.qos),
            retain: p.retain,
        }),
        Event::Incoming(Packet::SubAck(s)) => RemoteEvent::Subscribed {
            refused: s
                .return_codes
                .iter()
                .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                .count(),
        },
        _ => RemoteEvent::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_and_refusals_by_protocol() {
        use rumqttc::v5::mqttbytes::v5::{Packet, PubAck, PubAckReason};
        let ack = |reason| {
            event_v5(rumqttc::v5::Event::Incoming(Packet::PubAck(PubAck {
                pkid: 7,
                reason,
                properties: None,
            })))
        };
        assert!(matches!(
            ack(PubAckReason::Success),
            RemoteEvent::Acked { pkid: 7 }
        ));
        assert!(matches!(
            ack(PubAckReason::QuotaExceeded),
            RemoteEvent::Refused { pkid: 7, .. }
        ));
        let v4 = event_v4(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(
            rumqttc::PubAck::new(9),
        )));
        assert!(matches!(v4, RemoteEvent::Acked { pkid: 9 }));
    }
}
