//! Per-connection limits the broker negotiates, where rmqtt's defaults are
//! not what MQTT (or Mosquitto) says. Everything else is rmqtt's own
//! `DefaultFitter`.

use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rmqtt::codec::types::{Publish, MQTT_LEVEL_5};
use rmqtt::fitter::{DefaultFitter, Fitter, FitterManager};
use rmqtt::types::{ConnectInfo, Disconnect, FitterType, Id, ListenerConfig};

/// "Never" for a retained message without an expiry of its own.
pub const NO_EXPIRY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

pub struct Fitters {
    /// The longest keep-alive an MQTT 5 client is granted (`broker.max_keep_alive`).
    pub max_keep_alive: u16,
}

impl FitterManager for Fitters {
    fn create(
        &self,
        conn_info: Arc<ConnectInfo>,
        id: Id,
        listen_cfg: ListenerConfig,
    ) -> FitterType {
        Arc::new(EdgeFitter {
            v5: conn_info.proto_ver() == MQTT_LEVEL_5,
            max_keep_alive: self.max_keep_alive,
            inner: DefaultFitter::new(conn_info, id, listen_cfg),
        })
    }
}

struct EdgeFitter {
    v5: bool,
    max_keep_alive: u16,
    inner: DefaultFitter,
}

/// The time without a packet after which a client with `keep_alive`
/// seconds is disconnected: one and a half times it (MQTT 3.1.1 §3.1.2.10,
/// MQTT 5 §3.1.2.10), rounded up to whole seconds, 0 for none. rmqtt adds
/// 3 s below 6 s instead.
pub fn keep_alive_limit(keep_alive: u16) -> u16 {
    keep_alive.saturating_add(keep_alive.div_ceil(2))
}

#[async_trait]
impl Fitter for EdgeFitter {
    /// Any keep-alive is accepted, 0 (none) included. An MQTT 5 client
    /// that asks for more than `max_keep_alive` is told to use that (the
    /// Server Keep Alive property, sent when it differs); an MQTT 3.1.1
    /// client cannot be told, so it gets what it asked for.
    fn keep_alive(&self, keep_alive: &mut u16) -> rmqtt::Result<u16> {
        if self.v5 && *keep_alive > self.max_keep_alive {
            *keep_alive = self.max_keep_alive;
        }
        Ok(keep_alive_limit(*keep_alive))
    }

    fn max_mqueue_len(&self) -> usize {
        self.inner.max_mqueue_len()
    }

    fn mqueue_rate_limit(&self) -> (NonZeroU32, Duration) {
        self.inner.mqueue_rate_limit()
    }

    fn max_inflight(&self) -> NonZeroU16 {
        self.inner.max_inflight()
    }

    fn session_expiry_interval(&self, d: Option<&Disconnect>) -> Duration {
        self.inner.session_expiry_interval(d)
    }

    /// rmqtt uses this only for how long a *retained* message is kept. A
    /// message with no expiry of its own must be kept until replaced; rmqtt
    /// takes the listener's default there, and 0 would mean "expired at
    /// once", so "no expiry" is a century here.
    fn message_expiry_interval(&self, publish: &Publish) -> Duration {
        publish
            .properties
            .as_ref()
            .and_then(|p| p.message_expiry_interval)
            .map(|s| Duration::from_secs(u64::from(s.get())))
            .unwrap_or(NO_EXPIRY)
    }

    fn max_client_topic_aliases(&self) -> u16 {
        self.inner.max_client_topic_aliases()
    }

    fn max_server_topic_aliases(&self) -> u16 {
        self.inner.max_server_topic_aliases()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn keep_alive_is_enforced_at_one_and_a_half_times() {
        assert_eq!(super::keep_alive_limit(0), 0);
        assert_eq!(super::keep_alive_limit(1), 2);
        assert_eq!(super::keep_alive_limit(2), 3);
        assert_eq!(super::keep_alive_limit(60), 90);
        assert_eq!(super::keep_alive_limit(u16::MAX), u16::MAX);
    }
}
