//! The connection to a remote MQTT broker, built on rumqttc, with the parts
//! rumqttc leaves to its users:
//!
//! - [`RemoteOptions`]: everything needed to connect, from a
//!   `BridgeConfig` ([`RemoteOptions::from_config`]) or built by hand (the
//!   OneNET bridge sets its own credentials). TLS is rustls with the `ring`
//!   provider: system roots, a custom CA, client certificate and key; a
//!   missing or bad file is a [`SetupError`], never a panic.
//! - [`remote_client`]: one type over rumqttc's 3.1.1 and 5 clients, split
//!   into a [`RemoteSender`] and a [`RemoteConnection`] whose
//!   [`RemoteConnection::poll`] yields protocol-independent [`RemoteEvent`]s.
//!   After an error, [`RemoteConnection::reset`] makes rumqttc forget its
//!   in-memory pending publishes, because the caller resends from its
//!   durable queue.
//! - [`Backoff`]: exponential reconnect delays with jitter, capped.
//! - [`AckTracker`]: pairs each publish handed to rumqttc with its packet id
//!   (`Outgoing::Publish(pkid)` comes in request order) and that packet id
//!   with its PUBACK (QoS 1) or PUBCOMP (QoS 2).

mod acks;
mod backoff;
mod client;
mod endpoint;
mod options;
mod tls;

pub use acks::AckTracker;
pub use backoff::Backoff;
pub use client::{remote_client, RemoteConnection, RemoteError, RemoteEvent, RemoteSender};
pub use endpoint::Endpoint;
pub use options::{RemoteOptions, SetupError, Will};
pub use tls::{client_config, TlsError};
