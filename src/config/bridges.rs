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
    /// Message the remote broker publishes when this bridge drops off.
    #[serde(default)]
    pub will: Option<WillConfig>,
    /// Delays between reconnect attempts (exponential, with jitter).
    #[serde(default)]
    pub reconnect: ReconnectConfig,
    /// QoS 1/2 messages sent but not yet acknowledged, at most (1-65535).
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// Largest MQTT packet sent to or accepted from the remote broker.
    #[serde(default = "default_max_packet_size")]
    pub max_packet_size: ByteSize,
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

fn default_max_inflight() -> u16 {
    100
}

fn default_max_packet_size() -> ByteSize {
    ByteSize(1 << 20)
}

/// A last will: published by the remote broker when the bridge disappears.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WillConfig {
    /// Remote topic (no wildcards).
    pub topic: String,
    #[serde(default)]
    pub payload: String,
    #[serde(default)]
    pub qos: QosLevel,
    #[serde(default)]
    pub retain: bool,
}

/// Reconnect backoff: the delay doubles from `min` up to `max`, each delay
/// jittered into its upper half so that many gateways do not reconnect in
/// step.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconnectConfig {
    /// First delay after a failed attempt.
    #[serde(default = "default_reconnect_min", with = "humantime_serde")]
    pub min: Duration,
    /// Longest delay.
    #[serde(default = "default_reconnect_max", with = "humantime_serde")]
    pub max: Duration,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        ReconnectConfig {
            min: default_reconnect_min(),
            max: default_reconnect_max(),
        }
    }
}

fn default_reconnect_min() -> Duration {
    Duration::from_secs(1)
}

fn default_reconnect_max() -> Duration {
    Duration::from_secs(60)
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
    /// Messages per second sent at most, which caps how fast a backlog
    /// drains; unset: as fast as the remote broker acknowledges
    /// (`max_inflight` at a time).
    #[serde(default)]
    pub drain_rate: Option<u32>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_bytes: default_queue_bytes(),
            max_age: None,
            drain_rate: None,
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    fn errors(bridge_yaml: &str) -> String {
        let text = format!("gateway: {{ id: gw-1 }}\nbridges:\n{bridge_yaml}");
        match Config::from_text(Path::new("c.yaml"), &text, |_| None) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn bridge_settings_are_checked_with_their_place() {
        let e = errors(
            "  - name: cloud\n    url: mqtt://h:1\n    keep_alive: 500ms\n    max_inflight: 0\n    \
             reconnect: { min: 5s, max: 1s }\n    forward:\n      - { topics: \"PV/#/x\" }\n",
        );
        assert!(e.contains("c.yaml:5:"), "{e}");
        assert!(
            e.contains("keep_alive: must be 0s (off) or at least 1s"),
            "{e}"
        );
        assert!(e.contains("max_inflight: must be at least 1"), "{e}");
        assert!(e.contains("reconnect.max: must not be shorter"), "{e}");
        assert!(
            e.contains("forward[0].topics: invalid filter `PV/#/x`"),
            "{e}"
        );
    }

    #[test]
    fn bad_urls_and_half_mutual_tls() {
        let e = errors("  - name: cloud\n    url: mqtts://h:notaport\n    tls: { cert: c.pem }\n");
        assert!(e.contains("invalid port"), "{e}");
        assert!(e.contains("needs both `cert` and `key`"), "{e}");
    }

    #[test]
    fn defaults_are_sane() {
        let text = "gateway: { id: gw-1 }\nbridges:\n  - { name: c, url: \"mqtt://h\" }\n";
        let c = Config::from_text(Path::new("c.yaml"), text, |_| None).unwrap();
        let b = &c.bridges[0];
        assert_eq!(b.max_inflight, 100);
        assert_eq!(b.queue.max_bytes.0, 64 << 20);
        assert_eq!(b.reconnect.min, std::time::Duration::from_secs(1));
    }
}
