//! China Mobile OneNET: the device token, its topics under
//! `$sys/{pid}/{dev}/`, OneJSON thing-model payloads and the older
//! data-stream payloads, and batching to OneNET's one message per second.

pub mod batch;
pub mod connect;
pub mod datastream;
pub mod downlink;
pub mod run;
pub mod sub;
pub mod thing;
pub mod token;
pub mod topics;
pub mod uplink;

pub use batch::{Batch, Batcher, Sample};
pub use token::{AccessKey, ParsedToken, TokenError};
pub use topics::Topics;

/// OneNET's MQTTS CA (`C=CN, O=CMIOT, CN=OneNET MQTTS`, valid to 2049),
/// shipped so TLS works with no extra files; `tls.ca` overrides it.
pub const CA_PEM: &str = include_str!("ca.pem");

/// Where OneNET devices connect when no `url` is given.
pub const DEFAULT_URL: &str = "mqtt://mqtts.heclouds.com:1883";
