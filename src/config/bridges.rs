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

#[derive(Debug, Clone, PartialEq, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicRoute {
    /// An MQTT filter.
    pub topics: String,
    #[serde(default)]
    pub remote_prefix: String,
    #[serde(default)]
    pub qos: QosLevel,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
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
    /// While connected, send a message before it is written and write it
    /// only if it is still unacknowledged after this long (write-behind);
    /// unset: every message is on disk before it is sent.
    #[serde(default, with = "humantime_serde")]
    pub write_behind: Option<Duration>,
    /// A QoS 1/2 message from a LAN client (or a driver) for this bridge
    /// is acknowledged only once it is on disk (the bridge's inbox log);
    /// `false`: once the broker has taken it.
    #[serde(default = "default_strict")]
    pub strict: bool,
}

fn default_strict() -> bool {
    true
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_bytes: default_queue_bytes(),
            max_age: None,
            drain_rate: None,
            write_behind: None,
            strict: true,
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

/// Which kind of OneNET product the device belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OneNetMode {
    /// Thing model (OneJSON): `thing/property/post`, `thing/property/set`.
    #[default]
    Thing,
    /// Older data-stream products: `dp/post/json`, `cmd/request/+`.
    Datastream,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OneNetConfig {
    /// The product id from the OneNET console (the MQTT username).
    pub product_id: String,
    /// The device name in that product (the MQTT client id).
    pub device_name: String,
    /// The device's access key (base64, as the console shows it).
    pub access_key: Secret,
    /// HMAC of the token: md5, sha1 or sha256.
    #[serde(default)]
    pub method: SignMethod,
    /// Thing model (default) or data streams.
    #[serde(default)]
    pub mode: OneNetMode,
    /// How long each token is valid; the bridge reconnects with a fresh
    /// token before it expires.
    #[serde(default = "default_token_ttl", with = "humantime_serde")]
    pub token_ttl: Duration,
    /// Property changes within this window go out as one post.
    #[serde(default = "default_one_second", with = "humantime_serde")]
    pub batch_window: Duration,
    /// Least time between two messages to OneNET (it accepts about one per
    /// second per device); also paces the replay after an outage.
    #[serde(default = "default_one_second", with = "humantime_serde")]
    pub min_interval: Duration,
    /// How long a property set or command waits for the device writes
    /// before OneNET gets a timeout reply.
    #[serde(default = "default_reply_timeout", with = "humantime_serde")]
    pub reply_timeout: Duration,
    /// QoS of uplink messages: 0 or 1 (OneNET has no QoS 2).
    #[serde(default = "default_onenet_qos")]
    pub qos: QosLevel,
    /// After an outage, send the backlog as `thing/history/post` messages
    /// of up to 50 queued posts each (every value with its own time), so it
    /// drains within OneNET's rate; the newest post still goes as a
    /// property post. `false`: replay post by post.
    #[serde(default = "default_history_replay")]
    pub history_replay: bool,
    /// OneNET devices this gateway reports for (thing model only): added
    /// to the gateway's topology, logged in, and posted with
    /// `thing/pack/post`.
    #[serde(default)]
    pub sub_devices: Vec<SubDeviceConfig>,
}

/// A OneNET sub-device behind this gateway.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubDeviceConfig {
    /// The sub-device's product id (its product's node type is
    /// "sub-device" in the OneNET console).
    pub product_id: String,
    /// The sub-device's name in that product.
    pub device_name: String,
    /// The sub-device's own access key (base64); signs its `topo/add`.
    pub access_key: Secret,
    /// HMAC of its token; default: the gateway's `method`.
    #[serde(default)]
    pub method: Option<SignMethod>,
    /// Local topic -> property of this sub-device.
    #[serde(default)]
    pub properties: Vec<PropertyRoute>,
}

fn default_token_ttl() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
}

fn default_one_second() -> Duration {
    Duration::from_secs(1)
}

fn default_reply_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_history_replay() -> bool {
    true
}

fn default_onenet_qos() -> QosLevel {
    QosLevel(crate::model::Qos::AtLeastOnce)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PropertyRoute {
    /// Local topic filter.
    pub topics: String,
    /// Thing-model property identifier (or data stream name).
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
    fn write_behind_is_a_short_duration() {
        let bridge = |v: &str| {
            format!("  - name: cloud\n    url: mqtt://h:1\n    queue: {{ write_behind: {v} }}\n")
        };
        assert_eq!(errors(&bridge("20ms")), "");
        let e = errors(&bridge("2s"));
        assert!(e.contains("queue.write_behind: must be at most 1s"), "{e}");
        assert!(errors(&bridge("soon")).contains("c.yaml:5:"));
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
        assert_eq!(b.queue.write_behind, None, "strict by default");
        assert_eq!(b.reconnect.min, std::time::Duration::from_secs(1));
    }
}
