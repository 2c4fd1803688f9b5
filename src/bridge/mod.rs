//! Cloud bridges: local topics forwarded to remote brokers through a
//! durable queue, and remote topics carried back down. One engine, several
//! profiles:
//!
//! - [`engine`]: the bridge connection engine every bridge runs on: queue
//!   and inbox intake, connect with the one retry policy, the rumqttc
//!   client, ack tracking, pace, resume from the queue, the full-disk path,
//!   status. A `Profile` supplies only identity, topic mapping, payload
//!   format and downlink handling.
//! - profiles: the generic MQTT bridge ([`Bridge`], `generic.rs`: topics
//!   forwarded with a prefix) and [`onenet`] (China Mobile OneNET: a token
//!   per connection, thing-model posts, property sets and replies).
//! - [`queue`]: the durable on-disk queue (and inbox) of one bridge.
//! - [`mqtt`]: the remote connection's parts: options from a
//!   `BridgeConfig` (URL, TLS, protocol 3.1.1/5, session, will), the
//!   reconnect backoff, and the packet-id to acknowledgement tracking that
//!   rumqttc does not do.

pub mod engine;
mod generic;
mod local;
pub mod mqtt;
pub mod onenet;
pub mod queue;

pub use engine::{status_topic, BridgeStatus, LocalLink};
pub use generic::{Bridge, BridgeError, BridgeSpec};
pub use local::{check_files, open, start, start_all, BusLink, RunningBridge, StartError};
