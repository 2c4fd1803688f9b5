//! Everything needed to connect to a remote broker, independent of the
//! protocol version, and its translation into rumqttc's option types.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::endpoint::{Endpoint, UrlError};
use super::tls::{client_config, TlsError};
use crate::config::{BridgeConfig, MqttProtocol, Secret};
use crate::model::Qos;

/// A bridge whose connection settings cannot work; reported at startup.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("bridge `{bridge}`: {source}")]
    Url { bridge: String, source: UrlError },
    #[error("bridge `{bridge}`: {source}")]
    Tls { bridge: String, source: TlsError },
    #[error("bridge `{bridge}` has no `url`")]
    MissingUrl { bridge: String },
    #[error("bridge `{bridge}`: `tls` settings need an mqtts:// url")]
    TlsNeedsMqtts { bridge: String },
}

/// A last will, as sent in CONNECT.
#[derive(Debug, Clone, PartialEq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: Qos,
    pub retain: bool,
}

/// Connection settings for one remote broker. Build it with
/// [`RemoteOptions::from_config`], or fill the fields directly (e.g. with
/// computed credentials).
#[derive(Clone)]
pub struct RemoteOptions {
    pub protocol: MqttProtocol,
    pub endpoint: Endpoint,
    /// Never empty: rumqttc panics on a persistent session without one.
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// 0 turns keep-alive off; otherwise at least 1s.
    pub keep_alive: Duration,
    pub clean_session: bool,
    pub will: Option<Will>,
    /// Set for `mqtts://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Largest packet in either direction (rumqttc's default is 10 KiB).
    pub max_packet_size: usize,
    /// Unacknowledged QoS 1/2 publishes at most.
    pub max_inflight: u16,
}

impl std::fmt::Debug for RemoteOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteOptions")
            .field("protocol", &self.protocol)
            .field("endpoint", &self.endpoint)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password)
            .field("keep_alive", &self.keep_alive)
            .field("clean_session", &self.clean_session)
            .field("will", &self.will)
            .field("tls", &self.tls.is_some())
            .field("max_packet_size", &self.max_packet_size)
            .field("max_inflight", &self.max_inflight)
            .finish()
    }
}

impl RemoteOptions {
    /// Options for a generic MQTT bridge. `resolve` turns paths from the
    /// config (CA, client cert and key) into real paths (relative to the
    /// config file). Certificate files are read and checked here, so a
    /// missing or bad file fails at startup with a clear message.
    pub fn from_config(
        b: &BridgeConfig,
        gateway_id: &str,
        resolve: &dyn Fn(&Path) -> PathBuf,
    ) -> Result<RemoteOptions, SetupError> {
        let url = b.url.as_deref().ok_or_else(|| SetupError::MissingUrl {
            bridge: b.name.clone(),
        })?;
        let endpoint = Endpoint::parse(url).map_err(|source| SetupError::Url {
            bridge: b.name.clone(),
            source,
        })?;
        if b.tls.is_some() && !endpoint.tls {
            return Err(SetupError::TlsNeedsMqtts {
                bridge: b.name.clone(),
            });
        }
        let tls = if endpoint.tls {
            let ca = b.tls.as_ref().and_then(|t| t.ca.as_deref()).map(resolve);
            let cert = b.tls.as_ref().and_then(|t| t.cert.as_deref()).map(resolve);
            let key = b.tls.as_ref().and_then(|t| t.key.as_deref()).map(resolve);
            let client = cert.as_deref().zip(key.as_deref());
            let config =
                client_config(ca.as_deref(), client).map_err(|source| SetupError::Tls {
                    bridge: b.name.clone(),
                    source,
                })?;
            Some(Arc::new(config))
        } else {
            None
        };
        let client_id = b
            .client_id
            .clone()
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| format!("{gateway_id}-{}", b.name));
        Ok(RemoteOptions {
            protocol: b.protocol,
            endpoint,
            client_id,
            username: b.username.clone(),
            password: b.password.clone(),
            keep_alive: b.keep_alive.unwrap_or(Duration::from_secs(30)),
            clean_session: b.clean_session.unwrap_or(true),
            will: b.will.as_ref().map(|w| Will {
                topic: w.topic.clone(),
                payload: Bytes::from(w.payload.clone()),
                qos: w.qos.0,
                retain: w.retain,
            }),
            tls,
            max_packet_size: b.max_packet_size.0 as usize,
            max_inflight: b.max_inflight.max(1),
        })
    }

    /// rumqttc asserts (panics) on keep-alives between 0 and 1s.
    fn keep_alive(&self) -> Duration {
        if !self.keep_alive.is_zero() && self.keep_alive < Duration::from_secs(1) {
            Duration::from_secs(1)
        } else {
            self.keep_alive
        }
    }

    /// rumqttc asserts (panics) on a persistent session without client id.
    fn clean_session(&self) -> bool {
        self.clean_session || self.client_id.is_empty()
    }

    pub(super) fn v4(&self) -> rumqttc::MqttOptions {
        let mut o = rumqttc::MqttOptions::new(
            self.client_id.clone(),
            self.endpoint.host.clone(),
            self.endpoint.port,
        );
        o.set_keep_alive(self.keep_alive())
            .set_clean_session(self.clean_session())
            .set_max_packet_size(self.max_packet_size, self.max_packet_size)
            .set_inflight(self.max_inflight);
        if let Some(user) = &self.username {
            let pass = self.password.as_ref().map(|p| p.expose()).unwrap_or("");
            o.set_credentials(user.clone(), pass);
        }
        if let Some(w) = &self.will {
            o.set_last_will(rumqttc::LastWill::new(
                w.topic.clone(),
                w.payload.clone(),
                qos_v4(w.qos),
                w.retain,
            ));
        }
        if let Some(tls) = &self.tls {
            o.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        o
    }

    pub(super) fn v5(&self) -> rumqttc::v5::MqttOptions {
        use rumqttc::v5::mqttbytes::v5::LastWill;
        let mut o = rumqttc::v5::MqttOptions::new(
            self.client_id.clone(),
            self.endpoint.host.clone(),
            self.endpoint.port,
        );
        o.set_keep_alive(self.keep_alive())
            .set_clean_start(self.clean_session())
            .set_max_packet_size(Some(self.max_packet_size.min(u32::MAX as usize) as u32))
            .set_outgoing_inflight_upper_limit(self.max_inflight);
        if !self.clean_session() {
            // MQTT 5 ends a session at disconnect unless told otherwise.
            o.set_session_expiry_interval(Some(u32::MAX));
        }
        if let Some(user) = &self.username {
            let pass = self.password.as_ref().map(|p| p.expose()).unwrap_or("");
            o.set_credentials(user.clone(), pass);
        }
        if let Some(w) = &self.will {
            o.set_last_will(LastWill::new(
                w.topic.clone(),
                w.payload.to_vec(),
                qos_v5(w.qos),
                w.retain,
                None,
            ));
        }
        if let Some(tls) = &self.tls {
            o.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        o
    }
}

pub(super) fn qos_v4(q: Qos) -> rumqttc::QoS {
    match q {
        Qos::AtMostOnce => rumqttc::QoS::AtMostOnce,
        Qos::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        Qos::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
    }
}

pub(super) fn qos_v5(q: Qos) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS;
    match q {
        Qos::AtMostOnce => QoS::AtMostOnce,
        Qos::AtLeastOnce => QoS::AtLeastOnce,
        Qos::ExactlyOnce => QoS::ExactlyOnce,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn bridge(yaml: &str) -> BridgeConfig {
        let text = format!("gateway: {{ id: gw-1 }}\nbridges:\n{yaml}");
        let config = Config::from_text(Path::new("c.yaml"), &text, |_| None)
            .unwrap_or_else(|e| panic!("{e}"));
        config.bridges[0].clone()
    }

    #[test]
    fn options_from_config() {
        let b = bridge(
            "  - name: cloud\n    url: mqtt://127.0.0.1:1999\n    username: u\n    password: p\n    \
             keep_alive: 5s\n    clean_session: false\n    protocol: mqtt5\n    \
             will: { topic: gw/state, payload: gone, qos: 1, retain: true }\n",
        );
        let o = RemoteOptions::from_config(&b, "gw-1", &|p| p.to_path_buf()).unwrap();
        assert_eq!(o.client_id, "gw-1-cloud");
        assert_eq!(o.endpoint.port, 1999);
        assert!(!o.clean_session);
        assert_eq!(o.protocol, MqttProtocol::Mqtt5);
        assert!(o.tls.is_none());
        assert!(
            !format!("{o:?}").contains("\"p\""),
            "password must not show in Debug"
        );
        let v4 = o.v4();
        assert_eq!(v4.keep_alive(), Duration::from_secs(5));
        assert!(!v4.clean_session());
        assert_eq!(v4.max_packet_size(), 1 << 20);
        assert!(v4.last_will().unwrap().retain);
        let v5 = o.v5();
        assert!(!v5.clean_start());
        assert_eq!(v5.session_expiry_interval(), Some(u32::MAX));
    }

    #[test]
    fn missing_ca_is_a_clear_startup_error() {
        let b = bridge(
            "  - name: cloud\n    url: mqtts://broker.example:8883\n    tls: { ca: certs/ca.pem }\n",
        );
        let e =
            RemoteOptions::from_config(&b, "gw-1", &|p| Path::new("/etc/eb").join(p)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "bridge `cloud`: cannot read CA file /etc/eb/certs/ca.pem: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn tls_settings_need_mqtts() {
        let b = bridge("  - name: cloud\n    url: mqtt://h:1\n    tls: { ca: ca.pem }\n");
        let e = RemoteOptions::from_config(&b, "gw-1", &|p| p.to_path_buf()).unwrap_err();
        assert!(matches!(e, SetupError::TlsNeedsMqtts { .. }));
    }
}
