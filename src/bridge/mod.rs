//! Cloud bridges: local topics forwarded to remote MQTT brokers through a
//! durable queue, and remote topics carried back down.
//!
//! - [`queue`]: the durable on-disk queue of one bridge.
//! - [`mqtt`]: the remote connection: options from a `BridgeConfig`
//!   (URL, TLS, protocol 3.1.1/5, session, will), reconnect backoff, and
//!   the packet-id to acknowledgement tracking that rumqttc does not do.
//! - [`onenet`]: China Mobile OneNET natively, on the same queue and
//!   connection.

pub mod engine;
mod generic;
mod local;
pub mod mqtt;
pub mod onenet;
pub mod queue;

pub use engine::{status_topic, BridgeStatus, LocalLink};
pub use generic::{Bridge, BridgeError, BridgeSpec};
pub use local::{check_files, start, start_all, BusLink, RunningBridge, StartError};
