//! Cloud bridge settings: a generic MQTT bridge, or OneNET with `onenet:`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{ByteSize, QosLevel, Secret};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MqttProtocol {
    /// MQTT 3.1.1.
    #[default]
    Mqtt,
    /// MQTT 5.
    Mqtt5,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    pub name: String,
    /// `mqtt://host:port` or `mqtts://host:port`.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub protocol: MqttProtocol,
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<Secret>,
    #[serde(default)]
    pub tls: Option<BridgeTls>,
    #[serde(default, with = "humantime_serde")]
    pub keep_alive: Option<Duration>,
    /// `false` keeps the session (and queued QoS>0 messages) on the remote.
    #[serde(default)]
    pub clean_session: Option<bool>,
    /// Local -> remote.
    #[serde(default)]
    pub forward: Vec<TopicRoute>,
    /// Remote -> local.
    #[serde(default)]
    pub subscribe: Vec<TopicRoute>,
    #[serde(default)]
    pub queue: QueueConfig,
    /// Makes this a OneNET bridge.
    #[serde(default)]
    pub onenet: Option<OneNetConfig>,
    /// OneNET: local topic -> thing-model property.
    #[serde(default)]
    pub properties: Vec<PropertyRoute>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeTls {
    /// PEM CA certificates to trust instead of the system roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// PEM client certificate for mutual TLS.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM client key for mutual TLS.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicRoute {
    /// An MQTT filter.
    pub topics: String,
    #[serde(default)]
    pub remote_prefix: String,
    #[serde(default)]
    pub qos: QosLevel,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Past this the oldest messages are dropped (and counted).
    #[serde(default = "default_queue_bytes")]
    pub max_bytes: ByteSize,
    /// Messages older than this are dropped (and counted).
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_bytes: default_queue_bytes(),
            max_age: None,
        }
    }
}

fn default_queue_bytes() -> ByteSize {
    ByteSize(64 << 20)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SignMethod {
    Md5,
    Sha1,
    #[default]
    Sha256,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OneNetConfig {
    pub product_id: String,
    pub device_name: String,
    pub access_key: Secret,
    #[serde(default)]
    pub method: SignMethod,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PropertyRoute {
    /// Local topic filter.
    pub topics: String,
    /// Thing-model property identifier.
    pub property: String,
}
