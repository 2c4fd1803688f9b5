//! The running OneNET bridge: two tasks around the bridge's durable queue
//! (`intake.rs`, `connection.rs`); this file opens and starts them.
//!
//! - **intake** reads the local topics of `properties:` from the bus, batches
//!   them per window and appends one post per window to the queue; it also
//!   passes results of local handlers (`onenet/<bridge>/set/+/result`,
//!   `onenet/<bridge>/cmd/result`) to the connection task. It keeps running
//!   while OneNET is unreachable, so an outage only grows the queue.
//! - **connection** owns the rumqttc client: it connects with a fresh token
//!   (and reconnects with a fresh one before it expires), sends queued posts
//!   at most one per `min_interval` and deletes each only after its PUBACK,
//!   answers post replies, and turns property sets and commands into local
//!   messages, answering each once the handlers reported (or timed out).
//!
//! Each connection gets its own rumqttc client (a token is fixed in its
//! options, and a reconnect after a long outage needs a fresh one), polled
//! in a task of its own (`connection::drive`) because cancelling `poll()` mid-way can
//! drop a half-made connection; OneNET allows only a few logins per second.

mod connection;
mod intake;

use connection::Connection;
pub use intake::parse_result;
use intake::Intake;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde_json::Value as Json;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::batch::{Batch, Batcher, Sample};
use super::connect::{bundled_tls, refresh_after, Credentials};
use super::datastream::{self, DpIdCounter, DpRejected};
use super::downlink::{Requests, Step};
use super::sub::{self, Identity};
use super::thing::{self, IdCounter, PropertyGet, PropertyPost, PropertySet, Reply};
use super::token::TokenError;
use super::topics::Topics;
use super::uplink::{Pacer, PostBook};
use crate::bridge::mqtt::{
    client_config, remote_client, AckTracker, Backoff, Endpoint, RemoteConnection, RemoteError,
    RemoteEvent, RemoteOptions, RemoteSender, TlsError,
};
use crate::bridge::queue::inbox::{Inbox, Numbered};
use crate::bridge::queue::{Queue, QueueError, QueueLimits, QueuedMessage};
use crate::bridge::{status_topic, BridgeStatus, BusLink, LocalLink, RunningBridge};
use crate::bus::{Bus, BusError};
use crate::config::{
    BridgeConfig, Config, MqttProtocol, OneNetConfig, OneNetMode, SubDeviceConfig,
};
use crate::model::{now_ms, Message, Qos};
use crate::topic::matches;

/// Problems that stop a OneNET bridge from starting.
#[derive(Debug, thiserror::Error)]
pub enum OneNetError {
    #[error("bridge `{bridge}` has no `onenet:` block")]
    NotOneNet { bridge: String },
    #[error("bridge `{bridge}`: {source}")]
    Token { bridge: String, source: TokenError },
    #[error("bridge `{bridge}`: {detail}")]
    Url { bridge: String, detail: String },
    #[error("bridge `{bridge}`: {source}")]
    Tls { bridge: String, source: TlsError },
    #[error("bridge `{bridge}`: {detail}")]
    BundledCa { bridge: String, detail: String },
    #[error("bridge `{bridge}`: {source}")]
    Queue { bridge: String, source: QueueError },
    #[error("bridge `{bridge}`: {source}")]
    Bus { bridge: String, source: BusError },
    #[error("bridge `{bridge}`: inbox: {source}")]
    Inbox {
        bridge: String,
        source: std::io::Error,
    },
}

/// Local topic where property `prop` of a set request is published.
pub fn set_topic(bridge: &str, prop: &str) -> String {
    format!("onenet/{bridge}/set/{prop}")
}

/// Local topic where a data-stream command is published.
pub fn cmd_topic(bridge: &str) -> String {
    format!("onenet/{bridge}/cmd")
}

/// Keep-alive when the bridge sets none (OneNET allows 10 s to 1800 s).
const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(60);
/// Queue ids of messages that do not come from the queue (replies).
const NOT_QUEUED: i64 = -1;
/// How often the queue's `max_age` is applied and a changed status published.
const REPORT_EVERY: Duration = Duration::from_secs(5);
/// Queued posts merged into one `thing/history/post`, at most.
const HISTORY_MAX: usize = 50;
/// Payload bytes of one history post, about at most.
const HISTORY_BYTES: usize = 128 * 1024;
/// Posts handed to the client and not yet acknowledged, at most.
const MAX_IN_FLIGHT: usize = 4;
/// Posts kept in memory while the queue refuses appends.
const MAX_UNSAVED: usize = 1000;
/// Local handler results waiting for the connection task.
const RESULT_QUEUE: usize = 64;

/// A result of a local handler: `(key, outcome)`; the key is the property
/// (thing mode) or `cmd` (data streams).
type HandlerResult = (String, Result<(), String>);

/// A OneNET bridge whose settings were checked and whose queue is open;
/// [`OneNetBridge::start`] subscribes it on the bus and runs it.
pub struct OneNetBridge {
    name: String,
    o: OneNetConfig,
    base: RemoteOptions,
    routes: Vec<(String, String)>,
    queue: Queue,
    /// See `queue/inbox.rs`: written by the broker before the PUBACK in
    /// strict mode; what a strict run left in it is taken in at start.
    inbox: Arc<Inbox>,
    recovered: Vec<Numbered>,
    strict: bool,
    status_topic: String,
    reconnect: crate::config::ReconnectConfig,
    subs: Vec<SubDeviceConfig>,
}

impl std::fmt::Debug for OneNetBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OneNetBridge")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The key, the URL and the TLS settings of OneNET bridge `b`, checked
/// (TLS files read) without connecting anywhere; for `edgebridge check`.
pub fn check_files(config: &Config, b: &BridgeConfig) -> Result<(), OneNetError> {
    match &b.onenet {
        Some(o) => connection_settings(config, b, o).map(|_| ()),
        None => Err(OneNetError::NotOneNet {
            bridge: b.name.clone(),
        }),
    }
}

type TlsConfig = Option<Arc<rustls::ClientConfig>>;

fn connection_settings(
    config: &Config,
    b: &BridgeConfig,
    o: &OneNetConfig,
) -> Result<(Endpoint, TlsConfig), OneNetError> {
    let bridge = b.name.clone();
    // Fail now on a bad key rather than on every connect.
    Credentials::new(o, SystemTime::now()).map_err(|source| OneNetError::Token {
        bridge: bridge.clone(),
        source,
    })?;
    let url = b.url.as_deref().unwrap_or(super::DEFAULT_URL);
    let endpoint = Endpoint::parse(url).map_err(|e| OneNetError::Url {
        bridge: bridge.clone(),
        detail: e.to_string(),
    })?;
    if !endpoint.tls {
        return Ok((endpoint, None));
    }
    let ca = b.tls.as_ref().and_then(|t| t.ca.as_deref());
    let client = b
        .tls
        .as_ref()
        .and_then(|t| t.cert.as_deref().zip(t.key.as_deref()));
    let tls = if ca.is_some() || client.is_some() {
        let ca = ca.map(|p| config.resolve(p));
        let cert = client.map(|(c, k)| (config.resolve(c), config.resolve(k)));
        let cfg = client_config(
            ca.as_deref(),
            cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
        )
        .map_err(|source| OneNetError::Tls {
            bridge: bridge.clone(),
            source,
        })?;
        Arc::new(cfg)
    } else {
        bundled_tls().map_err(|detail| OneNetError::BundledCa { bridge, detail })?
    };
    Ok((endpoint, Some(tls)))
}

impl OneNetBridge {
    /// Checks what can be checked before connecting (the key, the URL, TLS
    /// files) and opens the bridge's durable queue.
    pub fn open(config: &Config, b: &BridgeConfig) -> Result<OneNetBridge, OneNetError> {
        let bridge = b.name.clone();
        let Some(o) = b.onenet.clone() else {
            return Err(OneNetError::NotOneNet { bridge });
        };
        let (endpoint, tls) = connection_settings(config, b, &o)?;
        let base = RemoteOptions {
            protocol: MqttProtocol::Mqtt,
            endpoint,
            client_id: o.device_name.clone(),
            username: None,
            password: None,
            keep_alive: b.keep_alive.unwrap_or(DEFAULT_KEEP_ALIVE),
            clean_session: true,
            will: None,
            tls,
            max_packet_size: 256 * 1024 + 1024,
            max_inflight: MAX_IN_FLIGHT as u16 + 2,
        };
        let data_dir = config.resolve(&config.gateway.data_dir);
        let (queue, _) =
            Queue::open(&data_dir, &bridge, QueueLimits::from(&b.queue)).map_err(|source| {
                OneNetError::Queue {
                    bridge: bridge.clone(),
                    source,
                }
            })?;
        let (inbox, recovered) =
            Inbox::open(&data_dir, &bridge, queue.inbox_mark()).map_err(|source| {
                OneNetError::Inbox {
                    bridge: bridge.clone(),
                    source,
                }
            })?;
        if !recovered.is_empty() {
            tracing::info!(bridge = %bridge, messages = recovered.len(),
                "acknowledged messages from before the last stop taken from the inbox into the queue");
        }
        Ok(OneNetBridge {
            inbox,
            recovered,
            strict: b.queue.strict,
            status_topic: status_topic(&config.gateway.id, &bridge),
            name: bridge,
            routes: b
                .properties
                .iter()
                .map(|p| (p.topics.clone(), p.property.clone()))
                .chain(o.sub_devices.iter().enumerate().flat_map(|(n, sd)| {
                    sd.properties
                        .iter()
                        .map(move |p| (p.topics.clone(), format!("{n}/{}", p.property)))
                }))
                .collect(),
            subs: o.sub_devices.clone(),
            o,
            base,
            queue,
            reconnect: b.reconnect,
        })
    }

    /// Subscribes on the bus (before this returns, so nothing published
    /// afterwards is missed) and runs the bridge until `shutdown`; what is
    /// not acknowledged stays in the queue.
    pub async fn start(
        self,
        bus: &Bus,
        shutdown: &CancellationToken,
    ) -> Result<RunningBridge, OneNetError> {
        let OneNetBridge {
            name,
            o,
            base,
            routes,
            queue,
            inbox,
            recovered,
            strict,
            status_topic,
            reconnect,
            subs,
        } = self;
        let mut filters: Vec<(String, Qos)> = routes
            .iter()
            .map(|(t, _)| (t.clone(), Qos::AtLeastOnce))
            .collect();
        filters.push((result_filter(&name, o.mode), Qos::AtLeastOnce));
        let link = BusLink::new(
            bus,
            &format!("edgebridge-onenet-{name}"),
            &filters,
            strict.then(|| inbox.clone()),
        )
        .await
        .map_err(|source| OneNetError::Bus {
            bridge: name.clone(),
            source,
        })?;
        let queue = Arc::new(Mutex::new(queue));
        let topics = Topics::new(&o.product_id, &o.device_name);
        let queued = Arc::new(Notify::new());
        let (results_tx, results_rx) = mpsc::channel(RESULT_QUEUE);
        let intake = Intake {
            bridge: name.clone(),
            mode: o.mode,
            qos: o.qos.0,
            routes,
            topics: topics.clone(),
            batcher: Batcher::new(o.batch_window, keep_per_window(o.mode)),
            ids: IdCounter::starting_at(initial_id()),
            dp_ids: DpIdCounter::default(),
            queue: queue.clone(),
            queued: queued.clone(),
            results: results_tx,
            subs: subs.iter().map(Identity::of).collect(),
            unsaved: Default::default(),
            inbox,
            recovered,
            taken_seq: 0,
            marked: 0,
        };
        let initial = BridgeStatus {
            since: now_ms(),
            ..BridgeStatus::default()
        };
        let (status_tx, status) = watch::channel(initial.clone());
        let connection = Connection {
            bridge: name.clone(),
            o: o.clone(),
            base,
            topics,
            queue,
            queued,
            results: results_rx,
            bus: bus.clone(),
            status_topic,
            status: initial,
            status_tx,
            backoff: Backoff::new(reconnect.min, reconnect.max),
            acks: AckTracker::new(),
            pacer: Pacer::new(o.min_interval),
            book: PostBook::default(),
            requests: Requests::new(o.reply_timeout),
            last_sent: 0,
            published: None,
            next_report: Instant::now() + REPORT_EVERY,
            subs,
            control: VecDeque::new(),
            control_ids: IdCounter::starting_at(initial_id() / 2),
            latest: BTreeMap::new(),
            merged: Default::default(),
            history_ids: IdCounter::starting_at(initial_id() / 3),
        };
        tracing::info!(bridge = %name, product = %o.product_id, device = %o.device_name,
            url = ?connection.base.endpoint, mode = ?o.mode, "OneNET bridge starting");
        let (a, b) = (shutdown.clone(), shutdown.clone());
        let task = tokio::spawn(async move {
            tokio::join!(intake.run(link, a), connection.run(b));
        });
        crate::ops::metrics::watch_bridge(&name, status.clone());
        Ok(RunningBridge {
            name,
            status,
            task,
            stop: shutdown.clone(),
        })
    }
}

fn result_filter(bridge: &str, mode: OneNetMode) -> String {
    match mode {
        OneNetMode::Thing => format!("onenet/{bridge}/set/+/result"),
        OneNetMode::Datastream => format!("{}/result", cmd_topic(bridge)),
    }
}

/// A thing-model post carries one value per property; a data-stream post
/// takes several points per stream.
fn keep_per_window(mode: OneNetMode) -> usize {
    match mode {
        OneNetMode::Thing => 1,
        OneNetMode::Datastream => 100,
    }
}

/// Post ids continue from the clock after a restart, so replies to posts
/// from before the restart are not taken for new ones.
fn initial_id() -> u64 {
    (now_ms().max(1) as u64) % 1_000_000_000_000
}

fn lock(q: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    // A panic while holding the lock cannot leave the queue inconsistent:
    // every change is one SQLite transaction.
    q.lock().unwrap_or_else(|e| e.into_inner())
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridge(extra: &str) -> (Config, BridgeConfig) {
        let text = format!(
            "gateway: {{ id: gw }}\nbridges:\n  - name: one\n    onenet:\n      product_id: p1\n      \
             device_name: d1\n      access_key: \"KuF3NT/jUBJ62LNBB/A8XZA9CqS3Cu79B/ABmfA1UCw=\"\n{extra}"
        );
        let c = Config::from_text(std::path::Path::new("/etc/eb/c.yaml"), &text, |_| None)
            .unwrap_or_else(|e| panic!("{e}"));
        let b = c.bridges[0].clone();
        (c, b)
    }

    #[test]
    fn tls_uses_the_bundled_ca_unless_overridden() {
        let (c, b) = bridge("    url: mqtts://mqtts.heclouds.com:8883\n");
        check_files(&c, &b).unwrap();
        let (_, tls) = connection_settings(&c, &b, b.onenet.as_ref().unwrap()).unwrap();
        assert!(tls.is_some());
        let (c, b) = bridge("");
        let (endpoint, tls) = connection_settings(&c, &b, b.onenet.as_ref().unwrap()).unwrap();
        assert_eq!(
            (endpoint.host.as_str(), endpoint.port, tls.is_none()),
            ("mqtts.heclouds.com", 1883, true)
        );
        let (c, b) =
            bridge("    url: mqtts://mqtts.heclouds.com:8883\n    tls: { ca: nope.pem }\n");
        let e = check_files(&c, &b).unwrap_err().to_string();
        assert!(e.contains("/etc/eb/nope.pem"), "{e}");
    }

    #[test]
    fn handler_results_parse() {
        assert_eq!(
            parse_result(br#"{"ok":true,"device":"d","point":"p"}"#),
            Ok(())
        );
        assert_eq!(
            parse_result(br#"{"ok":false,"error":"illegal data address"}"#),
            Err("illegal data address".into())
        );
        assert_eq!(parse_result(br#"{"code":200}"#), Ok(()));
        assert_eq!(
            parse_result(br#"{"code":500,"msg":"no"}"#),
            Err("no".into())
        );
        assert_eq!(parse_result(b"OK"), Ok(()));
        assert_eq!(parse_result(b"jammed"), Err("jammed".into()));
    }
}
