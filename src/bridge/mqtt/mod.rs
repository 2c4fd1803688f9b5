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
//!   The bridge engine uses one client per connection attempt, so rumqttc's
//!   in-memory pending publishes die with it: the durable queue resends.
//! - [`Backoff`]: exponential reconnect delays with jitter, capped: the one
//!   retry policy of every bridge (see `bridge/engine`).
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
