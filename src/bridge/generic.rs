//! The generic MQTT profile: forwards local topics to any MQTT broker with
//! a prefix (`forward`), and carries remote topics back down
//! (`subscribe`). Everything else (queue, connection, retries, acks, pace,
//! status) is the engine's (`bridge/engine`).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::engine::{
    self, Actions, BridgeStatus, LocalLink, Next, OpenError, Opened, Outgoing, Profile, Settings,
    Window,
};
use super::mqtt::{RemoteOptions, SetupError};
use super::queue::inbox::Inbox;
use super::queue::{QueueLimits, QueuedMessage};
use crate::config::{BridgeConfig, Config, ReconnectConfig, TopicRoute};
use crate::model::{Message, Qos};
use crate::topic;

/// Errors that stop a bridge from starting.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error(transparent)]
    Open(#[from] OpenError),
}

/// `queue.write_behind` of a strict bridge that sets none.
const STRICT_WRITE_BEHIND: Duration = Duration::from_millis(50);
/// How long a downlinked message is remembered for the loop guard.
const ECHO_TTL: Duration = Duration::from_secs(10);
const ECHO_MAX: usize = 4096;

/// Everything a bridge needs, resolved from the config.
#[derive(Debug, Clone)]
pub struct BridgeSpec {
    pub name: String,
    pub remote: RemoteOptions,
    /// Local -> remote.
    pub forward: Vec<TopicRoute>,
    /// Remote -> local.
    pub subscribe: Vec<TopicRoute>,
    pub data_dir: PathBuf,
    pub limits: QueueLimits,
    pub drain_rate: Option<u32>,
    /// `queue.write_behind` (zero counts as unset).
    pub write_behind: Option<Duration>,
    pub reconnect: ReconnectConfig,
    /// Retained status topic: `edgebridge/<id>/bridges/<name>/status`.
    pub status_topic: String,
    /// Each message keeps its own QoS instead of the route's (the external
    /// broker's publisher, `bus.rs`).
    pub keep_message_qos: bool,
    /// `queue.strict`: QoS 1/2 messages reach the bridge through its inbox
    /// log, written before the publisher's acknowledgement.
    pub strict: bool,
}

impl BridgeSpec {
    /// The spec of a generic MQTT bridge; reads and checks TLS files.
    pub fn from_config(b: &BridgeConfig, config: &Config) -> Result<BridgeSpec, BridgeError> {
        let remote =
            RemoteOptions::from_config(b, &config.gateway.id, &|p: &Path| config.resolve(p))?;
        Ok(BridgeSpec {
            name: b.name.clone(),
            remote,
            forward: b.forward.clone(),
            subscribe: b.subscribe.clone(),
            data_dir: config.resolve(&config.gateway.data_dir),
            limits: QueueLimits::from(&b.queue),
            drain_rate: b.queue.drain_rate,
            // In strict mode a message is on disk in the inbox before the
            // bridge sees it, so the queue need not write it before it is
            // sent: written only if still unacknowledged after a moment.
            write_behind: b
                .queue
                .write_behind
                .filter(|d| !d.is_zero())
                .or(b.queue.strict.then_some(STRICT_WRITE_BEHIND)),
            reconnect: b.reconnect,
            status_topic: engine::status_topic(&config.gateway.id, &b.name),
            keep_message_qos: false,
            strict: b.queue.strict,
        })
    }

    /// The filters to subscribe to on the local bus.
    pub fn local_filters(&self) -> Vec<(String, Qos)> {
        self.forward
            .iter()
            .map(|r| (r.topics.clone(), r.qos.0))
            .collect()
    }

    /// Remote topic and QoS for a local topic: the first matching `forward`
    /// route; `None` if none matches.
    pub fn uplink(&self, local_topic: &str) -> Option<(String, Qos)> {
        self.forward
            .iter()
            .find(|r| topic::matches(&r.topics, local_topic))
            .map(|r| (format!("{}{local_topic}", r.remote_prefix), r.qos.0))
    }

    /// Local topic for a remote one: the first `subscribe` route whose
    /// prefixed filter matches, with the prefix stripped.
    pub fn downlink(&self, remote_topic: &str) -> Option<String> {
        self.subscribe.iter().find_map(|r| {
            let local = remote_topic.strip_prefix(r.remote_prefix.as_str())?;
            topic::matches(&r.topics, local).then(|| local.to_string())
        })
    }

    /// The remote filters to subscribe to. With a persistent session, QoS 2
    /// is asked as QoS 1: rumqttc forgets incoming QoS 2 state when the
    /// connection drops, and fails on the PUBREL the broker resends after
    /// resuming the session, again on every reconnect.
    pub fn remote_filters(&self) -> Vec<(String, Qos)> {
        self.subscribe
            .iter()
            .map(|r| {
                let qos = if self.remote.clean_session {
                    r.qos.0
                } else {
                    r.qos.0.min(Qos::AtLeastOnce)
                };
                (format!("{}{}", r.remote_prefix, r.topics), qos)
            })
            .collect()
    }
}

/// A generic MQTT bridge ready to run: its queue and inbox are open.
pub struct Bridge {
    spec: BridgeSpec,
    opened: Opened,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("name", &self.spec.name)
            .finish_non_exhaustive()
    }
}

impl Bridge {
    /// Opens (and if needed recovers) the bridge's queue.
    pub fn open(spec: BridgeSpec) -> Result<Bridge, BridgeError> {
        let opened = Opened::open(&spec.name, &spec.data_dir, spec.limits)?;
        Ok(Bridge { spec, opened })
    }

    pub fn spec(&self) -> &BridgeSpec {
        &self.spec
    }

    /// The inbox the broker writes this bridge's QoS 1/2 messages to, in
    /// strict mode (`queue.strict`).
    pub fn strict_inbox(&self) -> Option<Arc<Inbox>> {
        self.spec.strict.then(|| self.opened.inbox().clone())
    }

    /// Live status (for metrics and tests).
    pub fn status(&self) -> watch::Receiver<BridgeStatus> {
        self.opened.status()
    }

    /// Runs until `shutdown`, or until the local link closes. Whatever is
    /// not acknowledged stays in the queue for the next run.
    pub async fn run<L: LocalLink>(self, local: L, shutdown: CancellationToken) {
        let Bridge { spec, opened } = self;
        tracing::info!(bridge = %spec.name, url = ?spec.remote.endpoint, "MQTT bridge starting");
        let settings = Settings {
            name: spec.name.clone(),
            data_dir: spec.data_dir.clone(),
            limits: spec.limits,
            write_behind: spec.write_behind,
            reconnect: spec.reconnect,
            status_topic: spec.status_topic.clone(),
            strict: spec.strict,
            pace: spec
                .drain_rate
                .map(|rate| Duration::from_secs(1) / rate.max(1)),
            window: Window::AwaitingAck(spec.remote.max_inflight as usize),
            max_packet_size: spec.remote.max_packet_size,
            qos0_past_queue: true,
            peer: "the remote broker",
        };
        let profile = MqttProfile {
            spec,
            echoes: false,
            echo: topic::Echoes::new(ECHO_TTL, ECHO_MAX),
        };
        engine::run(settings, opened, profile, local, shutdown).await
    }
}

/// The generic profile: the bridge's routes, and the loop guard.
struct MqttProfile {
    spec: BridgeSpec,
    /// The local link hands back what the bridge publishes.
    echoes: bool,
    /// The loop guard: downlinked messages that the forward filters will
    /// hand back, not sent up again.
    echo: topic::Echoes,
}

impl Profile for MqttProfile {
    fn connect_options(&mut self) -> Result<RemoteOptions, String> {
        Ok(self.spec.remote.clone())
    }

    fn set_echoes(&mut self, echoes: bool) {
        self.echoes = echoes;
    }

    fn uplink(&mut self, m: Message, _out: &mut Actions) -> Option<Message> {
        if self
            .echo
            .is_echo(&m.topic, &m.payload, std::time::Instant::now())
        {
            tracing::trace!(topic = %m.topic, "not forwarding a message that came from this bridge");
            return None;
        }
        let (remote_topic, qos) = self.spec.uplink(&m.topic)?;
        let qos = if self.spec.keep_message_qos {
            m.qos
        } else {
            qos
        };
        Some(Message {
            topic: remote_topic,
            payload: m.payload,
            qos,
            retain: m.retain,
        })
    }

    fn on_connected(&mut self, session_present: bool) -> Vec<(String, Qos)> {
        if session_present {
            Vec::new()
        } else {
            self.spec.remote_filters()
        }
    }

    fn next_out(&mut self, ready: &mut VecDeque<QueuedMessage>, _newest: bool) -> Option<Next> {
        ready.pop_front().map(|m| Next::Send(Outgoing::of(m)))
    }

    fn on_remote(&mut self, m: Message, out: &mut Actions) {
        let Some(local_topic) = self.spec.downlink(&m.topic) else {
            tracing::debug!(topic = %m.topic, "remote message matches no subscribe route");
            return;
        };
        if self.echoes && self.spec.uplink(&local_topic).is_some() {
            self.echo
                .expect(&local_topic, &m.payload, std::time::Instant::now());
        }
        let local = Message {
            topic: local_topic,
            payload: m.payload,
            qos: m.qos,
            retain: m.retain,
        };
        out.local.push((local, true));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_map_topics_both_ways() {
        let text = "gateway: { id: gw }\nbridges:\n  - name: c\n    url: mqtt://h\n    \
                    forward: [ { topics: \"PV/#\", remote_prefix: \"site/gw/\", qos: 1 }, { topics: \"#\" } ]\n    \
                    subscribe: [ { topics: \"cmd/+\", remote_prefix: \"site/gw/\", qos: 2 } ]\n";
        let config = Config::from_text(Path::new("c.yaml"), text, |_| None).unwrap();
        let spec = BridgeSpec::from_config(&config.bridges[0], &config).unwrap();
        assert_eq!(
            spec.uplink("PV/data"),
            Some(("site/gw/PV/data".to_string(), Qos::AtLeastOnce))
        );
        assert_eq!(
            spec.uplink("x/y"),
            Some(("x/y".to_string(), Qos::AtMostOnce))
        );
        assert_eq!(
            spec.downlink("site/gw/cmd/led"),
            Some("cmd/led".to_string())
        );
        assert_eq!(spec.downlink("site/gw/cmd/led/x"), None);
        assert_eq!(spec.downlink("other/cmd/led"), None);
        assert_eq!(
            spec.remote_filters(),
            vec![("site/gw/cmd/+".to_string(), Qos::ExactlyOnce)]
        );
        assert_eq!(spec.status_topic, "edgebridge/gw/bridges/c/status");
        let mut persistent = spec.clone();
        persistent.remote.clean_session = false;
        assert_eq!(persistent.remote_filters()[0].1, Qos::AtLeastOnce);
    }
}
