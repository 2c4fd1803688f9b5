//! Cloud bridges: local topics forwarded to remote MQTT brokers through a
//! durable queue, and remote topics carried back down.
//!
//! - [`queue`]: the durable on-disk queue of one bridge.
//! - [`mqtt`]: the remote connection: options from a `BridgeConfig`
//!   (URL, TLS, protocol 3.1.1/5, session, will), reconnect backoff, and
//!   the packet-id to acknowledgement tracking that rumqttc does not do.
//! - [`onenet`]: China Mobile OneNET natively, on the same queue and
//!   connection.

mod local;
pub mod mqtt;
pub mod onenet;
pub mod queue;
mod task;

pub use local::{check_files, open, start, start_all, BusLink, RunningBridge, StartError};
pub use task::{status_topic, Bridge, BridgeError, BridgeSpec, BridgeStatus, LocalLink};
