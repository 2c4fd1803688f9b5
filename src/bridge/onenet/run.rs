//! The running OneNET bridge: two tasks around the bridge's durable queue.
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
//! in a task of its own ([`drive`]) because cancelling `poll()` mid-way can
//! drop a half-made connection; OneNET allows only a few logins per second.

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
use crate::bridge::queue::{Queue, QueueError, QueueLimits, QueuedMessage};
use crate::bridge::topic::matches;
use crate::bridge::{status_topic, BridgeStatus, BusLink, LocalLink, RunningBridge};
use crate::bus::{Bus, BusError};
use crate::config::{
    BridgeConfig, Config, MqttProtocol, OneNetConfig, OneNetMode, SubDeviceConfig,
};
use crate::model::{now_ms, Message, Qos};

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
        Ok(OneNetBridge {
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
            status_topic,
            reconnect,
            subs,
        } = self;
        let mut filters: Vec<(String, Qos)> = routes
            .iter()
            .map(|(t, _)| (t.clone(), Qos::AtLeastOnce))
            .collect();
        filters.push((result_filter(&name, o.mode), Qos::AtLeastOnce));
        let link = BusLink::new(bus, &format!("edgebridge-onenet-{name}"), &filters)
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
        Ok(RunningBridge { name, status, task })
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

struct Intake {
    bridge: String,
    mode: OneNetMode,
    qos: Qos,
    routes: Vec<(String, String)>,
    topics: Topics,
    batcher: Batcher,
    ids: IdCounter,
    dp_ids: DpIdCounter,
    queue: Arc<Mutex<Queue>>,
    queued: Arc<Notify>,
    results: mpsc::Sender<HandlerResult>,
    /// Sub-devices, by index (`<n>/<prop>` batch keys).
    subs: Vec<Identity>,
    /// Posts the queue refused (e.g. disk full), tried again with the next.
    unsaved: std::collections::VecDeque<Message>,
}

impl Intake {
    async fn run(mut self, mut link: BusLink, shutdown: CancellationToken) {
        loop {
            let due = self.batcher.due().map(Instant::from_std);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                msg = link.recv() => match msg {
                    Some(m) => self.on_local(m).await,
                    None => break,
                },
                _ = sleep_until(due) => self.flush(),
            }
            if self
                .batcher
                .due()
                .is_some_and(|d| d <= std::time::Instant::now())
            {
                self.flush();
            }
        }
        // Nothing that arrived is lost: what the bus already handed over
        // and the open window go to the queue.
        while let Ok(Some(m)) = tokio::time::timeout(Duration::ZERO, link.recv()).await {
            self.on_local(m).await;
        }
        self.flush();
    }

    async fn on_local(&mut self, m: Message) {
        if let Some(key) = self.result_key(&m.topic) {
            let outcome = parse_result(&m.payload);
            // Never block the intake of data on the downlink side.
            if let Err(e) = self.results.try_send((key, outcome)) {
                tracing::warn!(bridge = %self.bridge, error = %e, "a handler result was dropped");
            }
            return;
        }
        let Some(sample) = Sample::from_local(&m.payload, now_ms()) else {
            return;
        };
        let now = std::time::Instant::now();
        let mut matched = false;
        for (filter, prop) in &self.routes {
            if matches(filter, &m.topic) {
                self.batcher.push(prop, sample.clone(), now);
                matched = true;
            }
        }
        if matched {
            tracing::trace!(bridge = %self.bridge, topic = %m.topic, "property value");
        }
    }

    fn result_key(&self, topic: &str) -> Option<String> {
        let rest = topic.strip_prefix(&format!("onenet/{}/", self.bridge))?;
        match self.mode {
            OneNetMode::Thing => rest
                .strip_prefix("set/")?
                .strip_suffix("/result")
                .filter(|p| !p.is_empty() && !p.contains('/'))
                .map(str::to_string),
            OneNetMode::Datastream => (rest == "cmd/result").then(|| "cmd".to_string()),
        }
    }

    fn flush(&mut self) {
        if self.batcher.is_empty() {
            return;
        }
        let batch = self.batcher.take();
        let mut out: Vec<(String, Vec<u8>)> = Vec::new();
        match self.mode {
            OneNetMode::Thing => {
                // Keys `<n>/<prop>` belong to sub-device n; the rest to the
                // gateway itself.
                let (own, subs): (Batch, Batch) =
                    batch.into_iter().partition(|(k, _)| !k.contains('/'));
                if !own.is_empty() {
                    if let Some(post) = PropertyPost::from_batch(self.ids.next_id(), &own) {
                        out.push((self.topics.property_post(), post.to_bytes()));
                    }
                }
                let mut devices: BTreeMap<Identity, Batch> = BTreeMap::new();
                for (key, samples) in subs {
                    let Some((n, prop)) = key.split_once('/') else {
                        continue;
                    };
                    let Some(who) = n.parse::<usize>().ok().and_then(|n| self.subs.get(n)) else {
                        continue;
                    };
                    devices
                        .entry(who.clone())
                        .or_default()
                        .insert(prop.to_string(), samples);
                }
                for pack in sub::pack_posts(&mut self.ids, &devices) {
                    out.push((self.topics.pack_post(), pack.payload));
                }
            }
            OneNetMode::Datastream => {
                if let Some(p) = datastream::dp_post(self.dp_ids.next_id(), &batch) {
                    out.push((self.topics.dp_post(), p));
                }
            }
        }
        for (topic, payload) in out {
            self.unsaved.push_back(Message {
                topic,
                payload: Bytes::from(payload),
                qos: self.qos,
                retain: false,
            });
        }
        while self.unsaved.len() > MAX_UNSAVED {
            self.unsaved.pop_front();
            tracing::warn!(bridge = %self.bridge, "queue unwritable for long; oldest post dropped");
        }
        if self.unsaved.is_empty() {
            return;
        }
        let batch: Vec<Message> = self.unsaved.iter().cloned().collect();
        let appended = lock(&self.queue).append(&batch);
        match appended {
            Ok(_) => {
                self.unsaved.clear();
                self.queued.notify_one();
            }
            Err(e) => {
                // Kept in memory and tried again with the next post.
                tracing::error!(bridge = %self.bridge, error = %e, waiting = self.unsaved.len(),
                    "cannot queue a OneNET post")
            }
        }
    }
}

/// A local handler's result payload: the `commands:` result JSON
/// (`{"ok":true}` / `{"ok":false,"error":"…"}`), a reply-like JSON with
/// `code`, or text (`ok`, `success`, `200` are success; anything else is
/// the error).
pub fn parse_result(payload: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(payload);
    let text = text.trim();
    if let Ok(Json::Object(o)) = serde_json::from_str::<Json>(text) {
        let error = || {
            o.get("error")
                .or_else(|| o.get("msg"))
                .map(|e| match e {
                    Json::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .unwrap_or_else(|| text.to_string())
        };
        if let Some(ok) = o.get("ok").and_then(Json::as_bool) {
            return if ok { Ok(()) } else { Err(error()) };
        }
        if let Some(code) = o.get("code").and_then(Json::as_i64) {
            return if code == thing::CODE_OK {
                Ok(())
            } else {
                Err(error())
            };
        }
    }
    match text.to_ascii_lowercase().as_str() {
        "ok" | "success" | "200" | "true" => Ok(()),
        "" => Err("empty result".into()),
        _ => Err(text.to_string()),
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Why a connection ended.
enum End {
    Shutdown,
    /// The token is about to expire: reconnect with a fresh one at once.
    Refresh,
    Failed(String),
}

type ConnEvent = Result<RemoteEvent, RemoteError>;

/// Polls one connection until it fails or `stop`; each connection has its
/// own client, so that every connect carries a fresh token. `poll()` runs
/// in this task only: cancelling it mid-way (in a `select!`) could drop a
/// half-made connection or a half-written packet.
async fn drive(
    mut conn: RemoteConnection,
    events: mpsc::Sender<ConnEvent>,
    stop: CancellationToken,
) {
    loop {
        let r = tokio::select! {
            r = conn.poll() => r,
            _ = stop.cancelled() => return,
        };
        let failed = r.is_err();
        if events.send(r).await.is_err() || failed {
            return;
        }
    }
}

struct Connection {
    bridge: String,
    o: OneNetConfig,
    base: RemoteOptions,
    topics: Topics,
    queue: Arc<Mutex<Queue>>,
    queued: Arc<Notify>,
    results: mpsc::Receiver<HandlerResult>,
    bus: Bus,
    status_topic: String,
    status: BridgeStatus,
    status_tx: watch::Sender<BridgeStatus>,
    backoff: Backoff,
    acks: AckTracker,
    pacer: Pacer,
    book: PostBook,
    requests: Requests,
    /// Highest queue id handed to the client on this connection.
    last_sent: i64,
    /// What was last published on the status topic.
    published: Option<BridgeStatus>,
    /// Next housekeeping: queue expiry and a status update if it changed.
    next_report: Instant,
    subs: Vec<SubDeviceConfig>,
    /// Topology and login requests for the sub-devices, sent after each
    /// CONNACK ahead of any post.
    control: VecDeque<(String, Vec<u8>)>,
    control_ids: IdCounter,
    /// The latest value of each property sent, for `thing/property/get`.
    latest: BTreeMap<String, Json>,
    /// History posts in flight: last queue id -> every queue id merged.
    merged: std::collections::HashMap<i64, Vec<i64>>,
    history_ids: IdCounter,
}

/// How often the queue's `max_age` is applied and a changed status published.
const REPORT_EVERY: Duration = Duration::from_secs(5);

/// One connection's client halves.
struct Link {
    sender: RemoteSender,
    events: mpsc::Receiver<ConnEvent>,
    stop: CancellationToken,
    driver: tokio::task::JoinHandle<()>,
}

impl Connection {
    async fn run(mut self, shutdown: CancellationToken) {
        self.report().await;
        loop {
            let creds = match Credentials::new(&self.o, SystemTime::now()) {
                Ok(c) => c,
                Err(e) => {
                    // Checked at start; the key cannot change while running.
                    tracing::error!(bridge = %self.bridge, error = %e, "cannot make a token");
                    return;
                }
            };
            let mut options = self.base.clone();
            options.username = Some(creds.username);
            options.password = Some(creds.password);
            let (sender, conn) = remote_client(&options);
            let (events_tx, events) = mpsc::channel(256);
            let stop = CancellationToken::new();
            let driver = tokio::spawn(drive(conn, events_tx, stop.clone()));
            let mut link = Link {
                sender,
                events,
                stop,
                driver,
            };
            let refresh_at = Instant::now() + refresh_after(self.o.token_ttl);
            let end = self.session(&mut link, refresh_at, &shutdown).await;
            let was_connected = self.status.connected;
            match end {
                // Say goodbye while the acks can still be paired.
                End::Shutdown | End::Refresh => self.goodbye(link, was_connected).await,
                End::Failed(_) => {
                    link.stop.cancel();
                    let _ = link.driver.await;
                }
            }
            let unacked = self.acks.reset();
            self.merged.clear();
            self.last_sent = 0;
            self.backoff.disconnected();
            if was_connected {
                self.status.connected = false;
                self.status.since = now_ms();
                self.status.redelivered += unacked.len() as u64;
            }
            match end {
                End::Shutdown => {
                    self.report().await;
                    tracing::info!(bridge = %self.bridge, "OneNET bridge stopped");
                    return;
                }
                End::Refresh => {
                    tracing::info!(bridge = %self.bridge, "reconnecting with a fresh token");
                }
                End::Failed(reason) => {
                    self.status.connection_errors += 1;
                    self.status.last_error = Some(reason.clone());
                    let delay = self.backoff.next_delay();
                    if was_connected || self.backoff.attempt() == 1 {
                        tracing::warn!(bridge = %self.bridge, error = %reason,
                            retry_in = ?delay, "OneNET connection lost");
                    } else {
                        tracing::debug!(bridge = %self.bridge, error = %reason,
                            retry_in = ?delay, "cannot connect to OneNET");
                    }
                    self.report().await;
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            self.report().await;
                            return;
                        }
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// A clean DISCONNECT, briefly; acks that still arrive are recorded.
    async fn goodbye(&mut self, mut link: Link, connected: bool) {
        if connected && link.sender.disconnect().is_ok() {
            let deadline = Instant::now() + Duration::from_millis(300);
            while let Ok(Some(Ok(ev))) = tokio::time::timeout_at(deadline, link.events.recv()).await
            {
                self.on_ack_event(&ev);
            }
        }
        link.stop.cancel();
        let _ = link.driver.await;
    }

    async fn session(
        &mut self,
        link: &mut Link,
        refresh_at: Instant,
        shutdown: &CancellationToken,
    ) -> End {
        loop {
            let now = Instant::now();
            if self.status.connected {
                if now >= refresh_at {
                    return End::Refresh;
                }
                for step in self.requests.tick(now.into_std()) {
                    self.step(&link.sender, step).await;
                }
                if !self.send_control(&link.sender, now) {
                    self.send_next(&link.sender, now);
                }
            }
            if now >= self.next_report {
                self.next_report = now + REPORT_EVERY;
                self.housekeeping().await;
            }
            let wake = [
                Some(refresh_at),
                Some(self.next_report),
                self.requests.deadline().map(Instant::from_std),
                self.pacer.next_slot().map(Instant::from_std),
            ]
            .into_iter()
            .flatten()
            .filter(|t| *t > now)
            .min();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return End::Shutdown,
                ev = link.events.recv() => match ev {
                    Some(Ok(ev)) => self.on_event(&link.sender, ev).await,
                    Some(Err(e)) => return End::Failed(e.to_string()),
                    None => return End::Failed("connection task ended".into()),
                },
                Some((key, outcome)) = self.results.recv() => {
                    let steps = self.requests.result(&key, outcome, std::time::Instant::now());
                    for step in steps {
                        self.step(&link.sender, step).await;
                    }
                }
                _ = self.queued.notified() => {}
                _ = sleep_until(wake) => {}
            }
        }
    }

    /// Sends the next sub-device request if the pace allows it; `true` if
    /// one is waiting (posts wait behind them).
    fn send_control(&mut self, sender: &RemoteSender, now: Instant) -> bool {
        if self.control.is_empty() {
            return false;
        }
        if self.pacer.ready(now.into_std()) {
            if let Some((topic, payload)) = self.control.pop_front() {
                self.reply(sender, &topic, payload);
            }
        }
        true
    }

    /// Sends the next queued post if the pace allows it.
    fn send_next(&mut self, sender: &RemoteSender, now: Instant) {
        if !self.pacer.ready(now.into_std()) || self.acks.in_flight() >= MAX_IN_FLIGHT {
            return;
        }
        let want = if self.o.history_replay {
            HISTORY_MAX + 1
        } else {
            1
        };
        let peeked = match lock(&self.queue).peek_after(self.last_sent, want) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(bridge = %self.bridge, error = %e, "cannot read the queue");
                self.status.last_error = Some(e.to_string());
                return;
            }
        };
        if self.send_history(sender, &peeked, want, now) {
            return;
        }
        let Some(m) = peeked.into_iter().next() else {
            return;
        };
        if !self.topics.is_own(&m.topic) {
            // Only our own topics are ever queued; never publish elsewhere.
            tracing::error!(bridge = %self.bridge, topic = %m.topic,
                "dropping a queued message outside the device's topics");
            self.last_sent = m.id;
            let _ = lock(&self.queue).ack(&[m.id]);
            return;
        }
        let qos = match m.qos {
            Qos::ExactlyOnce => Qos::AtLeastOnce,
            q => q,
        };
        if let Err(e) = sender.publish(&m.topic, m.payload.clone(), qos, false) {
            tracing::debug!(bridge = %self.bridge, error = %e, "client refused a publish; retrying");
            return;
        }
        if m.topic == self.topics.property_post() {
            if let Ok(post) = PropertyPost::parse(&m.payload) {
                let props = post.properties().map(str::to_string).collect();
                self.book.sent(post.id.clone(), props);
                for (prop, v) in post.values() {
                    self.latest.insert(prop, v.value);
                }
            }
        } else if m.topic == self.topics.pack_post() {
            if let Some((id, labels)) = sub::pack_labels(&m.payload) {
                self.book.sent(id, labels);
            }
        }
        self.acks.sent(m.id, qos);
        self.last_sent = m.id;
        self.pacer.sent(now.into_std());
    }

    /// A backlog of property posts goes out as one history post (all but
    /// the newest, which stays a property post so the current value shows
    /// as current). `true` if one was sent.
    fn send_history(
        &mut self,
        sender: &RemoteSender,
        peeked: &[QueuedMessage],
        asked: usize,
        now: Instant,
    ) -> bool {
        // A run of the same kind: the gateway's property posts, or
        // sub-device packs (at most 10 sub-devices per history message).
        let Some(kind) = peeked.first().map(|m| m.topic.clone()) else {
            return false;
        };
        let packs = kind == self.topics.pack_post();
        if kind != self.topics.property_post() && !packs {
            return false;
        }
        let mut run: Vec<&QueuedMessage> = Vec::new();
        let mut bytes = 0;
        let mut devices = std::collections::BTreeSet::new();
        for m in peeked {
            if m.topic != kind
                || run.len() == HISTORY_MAX
                || bytes + m.payload.len() > HISTORY_BYTES
            {
                break;
            }
            if packs {
                let mut more = devices.clone();
                more.extend(sub::pack_identities(&m.payload));
                if more.len() > sub::MAX_DEVICES_PER_PACK {
                    break;
                }
                devices = more;
            }
            bytes += m.payload.len();
            run.push(m);
        }
        // The newest queued post is not history.
        if run.len() == peeked.len() && peeked.len() < asked {
            run.pop();
        }
        if run.len() < 2 {
            return false;
        }
        let id = self.history_ids.next_id();
        let (payload, props) = if packs {
            let payloads: Vec<&[u8]> = run.iter().map(|m| m.payload.as_ref()).collect();
            sub::history_from_packs(&id, &payloads)
        } else {
            let posts: Vec<PropertyPost> = run
                .iter()
                .filter_map(|m| PropertyPost::parse(&m.payload).ok())
                .collect();
            thing::history_post(&id, &posts)
        };
        let qos = match run[0].qos {
            Qos::ExactlyOnce => Qos::AtLeastOnce,
            q => q,
        };
        let topic = self.topics.history_post();
        if let Err(e) = sender.publish(&topic, Bytes::from(payload), qos, false) {
            tracing::debug!(bridge = %self.bridge, error = %e, "client refused a publish; retrying");
            return true;
        }
        let ids: Vec<i64> = run.iter().map(|m| m.id).collect();
        let last = ids[ids.len() - 1];
        tracing::debug!(bridge = %self.bridge, posts = ids.len(), "backlog sent as history");
        self.book.sent(id, props);
        self.merged.insert(last, ids);
        self.acks.sent(last, qos);
        self.last_sent = last;
        self.pacer.sent(now.into_std());
        true
    }

    /// Publish and acknowledgement events: a post leaves the queue once
    /// OneNET has it.
    fn on_ack_event(&mut self, ev: &RemoteEvent) {
        let done = match ev {
            RemoteEvent::Published { pkid } => self.acks.on_outgoing_publish(*pkid),
            RemoteEvent::Acked { pkid } => self.acks.on_ack(*pkid),
            RemoteEvent::Refused { pkid, reason } => {
                tracing::warn!(bridge = %self.bridge, %reason, "OneNET refused a message");
                self.acks.on_ack(*pkid)
            }
            _ => None,
        };
        if let Some(id) = done.filter(|id| *id != NOT_QUEUED) {
            let ids = self.merged.remove(&id).unwrap_or_else(|| vec![id]);
            let acked = lock(&self.queue).ack(&ids);
            match acked {
                Ok(()) => {
                    self.status.forwarded += ids.len() as u64;
                    self.sync_stats();
                    self.status_tx.send_replace(self.status.clone());
                }
                Err(e) => {
                    tracing::error!(bridge = %self.bridge, error = %e, "cannot delete a sent post")
                }
            }
        }
    }

    async fn on_event(&mut self, sender: &RemoteSender, ev: RemoteEvent) {
        match ev {
            RemoteEvent::Connected { .. } => {
                self.backoff.connected();
                self.status.connected = true;
                self.status.since = now_ms();
                self.last_sent = 0;
                let downlink = match self.o.mode {
                    OneNetMode::Thing => vec![
                        (self.topics.property_post_reply(), Qos::AtMostOnce),
                        (self.topics.property_set(), Qos::AtMostOnce),
                        (self.topics.property_get(), Qos::AtMostOnce),
                        (self.topics.history_post_reply(), Qos::AtMostOnce),
                    ],
                    OneNetMode::Datastream => vec![
                        (self.topics.dp_rejected(), Qos::AtMostOnce),
                        (self.topics.cmd_request_filter(), Qos::AtMostOnce),
                    ],
                };
                let mut downlink = downlink;
                self.control.clear();
                if !self.subs.is_empty() {
                    downlink.extend([
                        (self.topics.topo_add_reply(), Qos::AtMostOnce),
                        (self.topics.sub_login_reply(), Qos::AtMostOnce),
                        (self.topics.pack_post_reply(), Qos::AtMostOnce),
                    ]);
                    for sd in &self.subs {
                        let id = self.control_ids.next_id();
                        match sub::topo_add(
                            &id,
                            sd,
                            self.o.method,
                            SystemTime::now(),
                            self.o.token_ttl,
                        ) {
                            Ok(p) => self.control.push_back((self.topics.topo_add(), p)),
                            Err(e) => tracing::error!(bridge = %self.bridge,
                                sub_device = %Identity::of(sd).label(), error = %e,
                                "cannot sign the sub-device's topo/add"),
                        }
                        let id = self.control_ids.next_id();
                        let login = sub::login(&id, &Identity::of(sd));
                        self.control.push_back((self.topics.sub_login(), login));
                    }
                }
                if let Err(e) = sender.subscribe(&downlink) {
                    tracing::warn!(bridge = %self.bridge, error = %e, "cannot subscribe");
                }
                let backlog = lock(&self.queue).stats().depth;
                tracing::info!(bridge = %self.bridge, backlog, "connected to OneNET");
                self.report().await;
            }
            RemoteEvent::Received(m) => self.on_remote(sender, m).await,
            RemoteEvent::Subscribed { refused } if refused > 0 => {
                let e = format!("OneNET refused {refused} subscription(s)");
                tracing::warn!(bridge = %self.bridge, "{e}");
                self.status.last_error = Some(e);
            }
            other => self.on_ack_event(&other),
        }
    }

    async fn on_remote(&mut self, sender: &RemoteSender, m: Message) {
        let t = &self.topics;
        if m.topic == t.topo_add_reply() || m.topic == t.sub_login_reply() {
            match Reply::parse(&m.payload) {
                Ok(r) if r.is_ok() => {
                    tracing::debug!(bridge = %self.bridge, topic = %m.topic, id = %r.id, "ok")
                }
                Ok(r) => {
                    tracing::warn!(bridge = %self.bridge, topic = %m.topic, id = %r.id,
                        code = r.code, msg = r.msg.as_deref().unwrap_or(""),
                        "OneNET refused a sub-device request");
                    self.status.last_error = Some(format!(
                        "sub-device request refused: {} {}",
                        r.code,
                        r.msg.unwrap_or_default()
                    ));
                }
                Err(e) => tracing::warn!(bridge = %self.bridge, error = %e, "bad reply"),
            }
        } else if m.topic == t.property_post_reply()
            || m.topic == t.pack_post_reply()
            || m.topic == t.history_post_reply()
        {
            match Reply::parse(&m.payload) {
                Ok(reply) => {
                    if let Some(r) = self.book.reply(&reply) {
                        tracing::warn!(bridge = %self.bridge, id = %r.id, code = r.code,
                            msg = %r.msg, properties = ?r.properties, "OneNET rejected a post");
                        self.status.last_error =
                            Some(format!("post {} rejected: {} {}", r.id, r.code, r.msg));
                        let counts =
                            serde_json::to_string(self.book.rejected()).unwrap_or_default();
                        let topic =
                            format!("{}/rejected", self.status_topic.trim_end_matches("/status"));
                        self.bus
                            .publish(Message::new(topic, counts).retained())
                            .await;
                    }
                }
                Err(e) => tracing::warn!(bridge = %self.bridge, error = %e, "bad post reply"),
            }
        } else if m.topic == t.property_set() {
            match PropertySet::parse(&m.payload) {
                Ok(set) => {
                    tracing::info!(bridge = %self.bridge, id = %set.id,
                        properties = ?set.params.iter().map(|(k, _)| k).collect::<Vec<_>>(),
                        "property set from OneNET");
                    self.status.received += 1;
                    let steps =
                        self.requests
                            .request(set.id, set.params, std::time::Instant::now());
                    for step in steps {
                        self.step(sender, step).await;
                    }
                }
                Err((Some(id), e)) => {
                    tracing::warn!(bridge = %self.bridge, error = %e, "bad property set");
                    let topic = t.property_set_reply();
                    let reply = Reply::new(id, thing::CODE_BAD_REQUEST, e).to_bytes();
                    self.reply(sender, &topic, reply);
                }
                Err((None, e)) => {
                    tracing::warn!(bridge = %self.bridge, error = %e,
                        "property set without an id; cannot answer it");
                }
            }
        } else if m.topic == t.property_get() {
            // Answered from the latest values sent; OneNET's API call waits
            // for the reply.
            let topic = t.property_get_reply();
            let reply = match PropertyGet::parse(&m.payload) {
                Ok(get) => {
                    let data: serde_json::Map<String, Json> = self
                        .latest
                        .iter()
                        .filter(|(k, _)| get.params.is_empty() || get.params.contains(k))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    let mut r = Reply::new(get.id, thing::CODE_OK, "success");
                    r.data = Some(Json::Object(data));
                    Some(r)
                }
                Err((Some(id), e)) => Some(Reply::new(id, thing::CODE_BAD_REQUEST, e)),
                Err((None, e)) => {
                    tracing::warn!(bridge = %self.bridge, error = %e,
                        "property get without an id; cannot answer it");
                    None
                }
            };
            if let Some(r) = reply {
                self.reply(sender, &topic, r.to_bytes());
            }
        } else if let Some(cmd_id) = t.cmd_id(&m.topic) {
            self.status.received += 1;
            let value = Json::String(String::from_utf8_lossy(&m.payload).into_owned());
            let steps = self.requests.request(
                cmd_id.to_string(),
                vec![("cmd".to_string(), value)],
                std::time::Instant::now(),
            );
            for step in steps {
                self.step(sender, step).await;
            }
        } else if m.topic == t.dp_rejected() {
            match DpRejected::parse(&m.payload) {
                Ok(r) => tracing::warn!(bridge = %self.bridge, id = r.id, code = r.err_code,
                    msg = %r.err_msg, "OneNET rejected data points"),
                Err(e) => tracing::warn!(bridge = %self.bridge, error = %e, "bad dp rejection"),
            }
        } else {
            tracing::debug!(bridge = %self.bridge, topic = %m.topic, "unexpected message");
        }
    }

    async fn step(&mut self, sender: &RemoteSender, step: Step) {
        let mut steps = vec![step];
        while let Some(step) = steps.pop() {
            match step {
                Step::Dispatch { id, params } => {
                    for (key, value) in params {
                        let topic = match self.o.mode {
                            OneNetMode::Thing
                                if key.is_empty() || key.contains(['/', '+', '#']) =>
                            {
                                let more = self.requests.result(
                                    &key,
                                    Err("not a valid identifier".into()),
                                    std::time::Instant::now(),
                                );
                                steps.extend(more.into_iter().rev());
                                continue;
                            }
                            OneNetMode::Thing => set_topic(&self.bridge, &key),
                            OneNetMode::Datastream => cmd_topic(&self.bridge),
                        };
                        tracing::debug!(bridge = %self.bridge, %id, %topic, "dispatching");
                        self.bus
                            .publish(Message::new(topic, thing::local_payload(&value)))
                            .await;
                    }
                }
                Step::Answer(a) => {
                    if a.code != thing::CODE_OK {
                        tracing::warn!(bridge = %self.bridge, id = %a.id, code = a.code,
                            msg = %a.msg, "answering OneNET with an error");
                    }
                    let (topic, payload) = match self.o.mode {
                        OneNetMode::Thing => {
                            (self.topics.property_set_reply(), a.reply().to_bytes())
                        }
                        OneNetMode::Datastream => (
                            self.topics.cmd_response(&a.id),
                            datastream::cmd_response(
                                serde_json::json!({"code": a.code, "msg": a.msg})
                                    .to_string()
                                    .as_bytes(),
                            ),
                        ),
                    };
                    self.reply(sender, &topic, payload);
                }
            }
        }
    }

    /// Sends a reply at once (OneNET's API call waits for it); it counts
    /// against the pace of posts.
    fn reply(&mut self, sender: &RemoteSender, topic: &str, payload: Vec<u8>) {
        if !self.topics.is_own(topic) {
            return;
        }
        let qos = Qos::AtMostOnce;
        match sender.publish(topic, Bytes::from(payload), qos, false) {
            Ok(()) => {
                self.acks.sent(NOT_QUEUED, qos);
                self.pacer.sent(std::time::Instant::now());
            }
            Err(e) => tracing::warn!(bridge = %self.bridge, error = %e, "cannot send a reply"),
        }
    }

    /// Applies the queue's `max_age` and publishes the status if it changed.
    async fn housekeeping(&mut self) {
        let expired = lock(&self.queue).expire();
        match expired {
            Ok(n) if n > 0 => {
                tracing::warn!(bridge = %self.bridge, dropped = n, "old posts dropped (queue.max_age)");
                // Expired rows may be ahead of the cursor; peeking skips them.
            }
            Ok(_) => {}
            Err(e) => tracing::error!(bridge = %self.bridge, error = %e, "queue expiry failed"),
        }
        self.sync_stats();
        if self.published.as_ref() != Some(&self.status) {
            self.report().await;
        }
    }

    fn sync_stats(&mut self) {
        let stats = lock(&self.queue).stats();
        self.status.queue_depth = stats.depth;
        self.status.queue_bytes = stats.bytes;
        self.status.dropped = stats.dropped;
    }

    /// Publishes the retained status (`edgebridge/<id>/bridges/<name>/status`).
    async fn report(&mut self) {
        self.sync_stats();
        let payload = serde_json::to_vec(&self.status).unwrap_or_default();
        self.bus
            .publish(Message::new(self.status_topic.clone(), payload).retained())
            .await;
        self.published = Some(self.status.clone());
        self.status_tx.send_replace(self.status.clone());
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
