//! China Mobile OneNET, natively. Where things are:
//!
//! - the wire: [`token`] (the MQTT password), [`topics`] (everything under
//!   `$sys/{pid}/{dev}/`), [`thing`] (OneJSON posts, replies, property
//!   set/get, history), [`datastream`] (older `dp/post/json` and `cmd`),
//!   [`sub`] (sub-devices: topo/add, login, pack/post);
//! - the bookkeeping, free of I/O: [`batch`] (local payload -> timed value,
//!   windows), [`uplink`] (post replies per property), [`downlink`]
//!   (answering each request once: 200, error or timeout), [`connect`]
//!   (CONNECT credentials, token refresh, the bundled CA);
//! - its config: [`check`] (what OneNET enforces, checked at load);
//! - the running bridge: [`run`], the OneNET profile on the bridge engine
//!   (`bridge/engine`, the same queue, connection, retries, acks, pace and
//!   status as every bridge), started by `bridge::start_all`.

pub mod batch;
pub mod check;
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
