//! The bridge task: local bus -> durable queue -> remote broker, and remote
//! subscriptions -> local bus.
//!
//! # How a message travels
//! 1. The bridge's subscription on the local bus yields a message matching
//!    a `forward` filter. It is mapped to its remote topic and QoS and
//!    appended to the queue (batched: everything already waiting goes into
//!    one transaction) before anything else happens to it. With
//!    `queue.write_behind` it is staged in memory instead while connected,
//!    and written only if still unacknowledged after that delay.
//! 2. While connected, the oldest queued messages are handed to rumqttc, at
//!    most `max_inflight` at a time, strictly in queue order.
//! 3. A message is deleted from the queue when the remote broker
//!    acknowledged it (batched with the next append, or within 20 ms):
//!    PUBACK (QoS 1), PUBCOMP (QoS 2), or, for QoS 0, once
//!    it was written to the socket.
//! 4. When the connection drops, everything not yet deleted is sent again,
//!    from the oldest, after the next CONNACK (at-least-once). rumqttc's own
//!    in-memory retransmission is switched off (see
//!    [`RemoteConnection::reset`]) so that one durable copy drives it.
//!
//! # Backlog and live data
//! Order is preserved, so live data queues behind a backlog. What keeps it
//! flowing is that the task never stops taking messages from the local bus
//! while it drains (appends and sends interleave in one loop), the drain is
//! clocked by the remote broker's acknowledgements (a window of
//! `max_inflight`), and `queue.drain_rate` can cap it so that a long backlog
//! does not take the whole uplink. The backlog drains by itself after a
//! reconnect; it does not wait for new data.
//!
//! # Connection handling
//! rumqttc's `poll()` must not be cancelled mid-way, so it runs in its own
//! task ([`drive`]) that forwards events over a channel. After an error it
//! waits until the bridge task has seen the error and answered with the
//! backoff delay; only then does it clear rumqttc's state, so publishes
//! handed over just before the error cannot come out after the reconnect
//! and confuse the packet id pairing.

use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use super::mqtt::{
    remote_client, AckTracker, Backoff, RemoteConnection, RemoteError, RemoteEvent, RemoteOptions,
    RemoteSender, SetupError,
};
use super::queue::inbox::Inbox;
use super::queue::{Queue, QueueError, QueueLimits, QueuedMessage};
use crate::config::{BridgeConfig, Config, ReconnectConfig, TopicRoute};
use crate::model::{now_ms, Message, Millis, Qos};
use crate::topic;

/// The bridge's side of the local bus: a subscription to its `forward`
/// filters, and a way to publish downlink messages and its status.
pub trait LocalLink: Send {
    /// The next message on one of the bridge's filters; `None` when the bus
    /// is gone. Must be cancel-safe (it is used in `select!`).
    fn recv(&mut self) -> impl Future<Output = Option<Message>> + Send;
    /// Publishes on the local bus.
    fn publish(&mut self, message: Message) -> impl Future<Output = Result<(), String>> + Send;
    /// Whether `recv` also yields what this link published itself. Then the
    /// bridge remembers each downlinked message for a few seconds and does
    /// not forward it when it comes back (the loop guard); without echo
    /// (no-local) nothing is needed.
    fn echoes_own_publishes(&self) -> bool;
}

/// Errors that stop a bridge from starting.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error("bridge `{bridge}`: {source}")]
    Queue { bridge: String, source: QueueError },
    #[error("bridge `{bridge}`: inbox: {source}")]
    Inbox {
        bridge: String,
        source: std::io::Error,
    },
}

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
            status_topic: status_topic(&config.gateway.id, &b.name),
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

/// The size of the PUBLISH packet for `m`, at most (fixed header, topic,
/// packet id, MQTT 5 properties length).
fn packet_size(m: &QueuedMessage) -> usize {
    5 + 2 + m.topic.len() + 2 + 1 + m.payload.len()
}

/// `edgebridge/<gateway>/bridges/<bridge>/status`.
pub fn status_topic(gateway_id: &str, bridge: &str) -> String {
    format!("edgebridge/{gateway_id}/bridges/{bridge}/status")
}

/// What a bridge reports: retained JSON on its status topic, and through
/// [`Bridge::status`] for the operations endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BridgeStatus {
    pub connected: bool,
    /// Messages waiting in the queue (in flight included).
    pub queue_depth: u64,
    pub queue_bytes: u64,
    /// Acknowledged by the remote broker (QoS 0: written) since start.
    pub forwarded: u64,
    /// Dropped by the queue limits, or refused by the remote broker.
    pub dropped: u64,
    /// Sent again after a reconnect.
    pub redelivered: u64,
    /// Received from the remote and published locally.
    pub received: u64,
    /// Connection attempts that failed or connections that broke.
    pub connection_errors: u64,
    /// The file system refuses new queue rows (see `DiskFull`); what could
    /// not be kept meanwhile is counted in `dropped`.
    pub disk_full: bool,
    pub last_error: Option<String>,
    /// When `connected` last changed, ms since the epoch.
    pub since: Millis,
}

/// Tracker id of a QoS 0 message sent without the queue (queue ids start
/// at 1).
const DIRECT: i64 = 0;
/// QoS 0 messages buffered in memory on their way past the queue, at most;
/// more wait in the queue.
const MAX_DIRECT: usize = 50_000;
/// Stored messages kept in memory, ready to send, at most; more are read
/// back from the queue when their turn comes.
const MAX_READY: usize = 4096;
/// Messages taken from the bus per queue transaction, at most.
const APPEND_BATCH: usize = 512;
/// How long acknowledged rows may wait before they are deleted (in one
/// transaction with the next appends, or on their own after this). A crash
/// before that sends them again: at least once, never lost.
const DELETE_DELAY: Duration = Duration::from_millis(20);
/// Connection events handled per turn of the loop, at most.
const ACK_BATCH: usize = 512;
/// Messages kept in memory while the disk refuses appends (e.g. full).
const MAX_UNSAVED: usize = 10_000;
/// `queue.write_behind` of a strict bridge that sets none.
const STRICT_WRITE_BEHIND: Duration = Duration::from_millis(50);
/// Messages per queue transaction while the disk is full.
const DISK_FULL_BATCH: usize = 32;
/// How long a downlinked message is remembered for the loop guard.
const ECHO_TTL: Duration = Duration::from_secs(10);
const ECHO_MAX: usize = 4096;

/// A bridge ready to run: its queue and inbox are open.
pub struct Bridge {
    spec: BridgeSpec,
    queue: Queue,
    inbox: Arc<Inbox>,
    /// Acknowledged to their publishers before the last stop and not in
    /// the queue yet: taken in first (see `queue/inbox.rs`).
    recovered: Vec<(u64, Message)>,
    status: watch::Sender<BridgeStatus>,
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
        let (queue, recovery) =
            Queue::open(&spec.data_dir, &spec.name, spec.limits).map_err(|source| {
                BridgeError::Queue {
                    bridge: spec.name.clone(),
                    source,
                }
            })?;
        // Opened whether or not the bridge is strict now: what a strict run
        // left in it was acknowledged and must not be lost.
        let (inbox, recovered) = Inbox::open(&spec.data_dir, &spec.name, queue.inbox_mark())
            .map_err(|source| BridgeError::Inbox {
                bridge: spec.name.clone(),
                source,
            })?;
        if !recovered.is_empty() {
            tracing::info!(bridge = %spec.name, messages = recovered.len(),
                "acknowledged messages from before the last stop taken from the inbox into the queue");
        }
        let stats = queue.stats();
        let mut initial = BridgeStatus {
            queue_depth: stats.depth,
            queue_bytes: stats.bytes,
            dropped: stats.dropped,
            since: now_ms(),
            ..BridgeStatus::default()
        };
        if let Some(detail) = recovery.detail {
            initial.last_error = Some(format!(
                "queue file was damaged ({detail}); {} messages salvaged",
                recovery.salvaged
            ));
        }
        let (status, _) = watch::channel(initial);
        Ok(Bridge {
            spec,
            queue,
            inbox,
            recovered,
            status,
        })
    }

    pub fn spec(&self) -> &BridgeSpec {
        &self.spec
    }

    /// The inbox the broker writes this bridge's QoS 1/2 messages to, in
    /// strict mode (`queue.strict`).
    pub fn strict_inbox(&self) -> Option<Arc<Inbox>> {
        self.spec.strict.then(|| self.inbox.clone())
    }

    /// Live status (for metrics and tests).
    pub fn status(&self) -> watch::Receiver<BridgeStatus> {
        self.status.subscribe()
    }

    /// Runs until `shutdown`, or until the local link closes. Whatever is
    /// not acknowledged stays in the queue for the next run.
    pub async fn run<L: LocalLink>(self, local: L, shutdown: CancellationToken) {
        use tracing::Instrument;
        let span = tracing::info_span!("bridge", bridge = %self.spec.name);
        Runner::new(self, local, shutdown)
            .run()
            .instrument(span)
            .await
    }
}

/// Events from the connection driver task.
type ConnEvent = Result<RemoteEvent, RemoteError>;

/// Polls the rumqttc event loop forever (see the module docs). After an
/// error, waits for the delay from the bridge task before reconnecting.
async fn drive(
    mut conn: RemoteConnection,
    events: mpsc::Sender<ConnEvent>,
    mut resume: mpsc::Receiver<Duration>,
    stop: CancellationToken,
) {
    loop {
        let r = tokio::select! {
            r = conn.poll() => r,
            _ = stop.cancelled() => return,
        };
        let failed = r.is_err();
        if events.send(r).await.is_err() {
            return;
        }
        if failed {
            let delay = tokio::select! {
                d = resume.recv() => match d { Some(d) => d, None => return },
                _ = stop.cancelled() => return,
            };
            conn.reset();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// Spaces sends to at most `rate` per second. Unused time is not banked,
/// so a quiet minute does not allow a burst afterwards.
#[derive(Debug)]
struct Pacer {
    step: Duration,
    next: Instant,
}

impl Pacer {
    fn new(rate: u32, now: Instant) -> Pacer {
        Pacer {
            step: Duration::from_secs(1) / rate.max(1),
            next: now,
        }
    }

    /// May one message go now? If so, the next one may go one step later.
    fn take(&mut self, now: Instant) -> bool {
        if self.next > now {
            return false;
        }
        self.next = self.next.max(now) + self.step;
        true
    }
}

/// Remembers downlinked messages that the bridge's own forward filters
/// will hand back to it, so they are not sent back up (loop guard).
#[derive(Default)]
struct EchoGuard {
    expected: VecDeque<(Instant, String, Bytes)>,
}

impl EchoGuard {
    fn expect(&mut self, topic: &str, payload: &Bytes) {
        self.expire();
        if self.expected.len() >= ECHO_MAX {
            self.expected.pop_front();
        }
        self.expected
            .push_back((Instant::now(), topic.to_string(), payload.clone()));
    }

    fn is_echo(&mut self, topic: &str, payload: &Bytes) -> bool {
        self.expire();
        match self
            .expected
            .iter()
            .position(|(_, t, p)| t == topic && p == payload)
        {
            Some(i) => {
                self.expected.remove(i);
                true
            }
            None => false,
        }
    }

    fn expire(&mut self) {
        while self
            .expected
            .front()
            .is_some_and(|(at, _, _)| at.elapsed() > ECHO_TTL)
        {
            self.expected.pop_front();
        }
    }
}

struct Runner<L> {
    spec: BridgeSpec,
    queue: Queue,
    status_tx: watch::Sender<BridgeStatus>,
    status: BridgeStatus,
    published_status: Option<BridgeStatus>,
    local: L,
    local_open: bool,
    shutdown: CancellationToken,
    sender: RemoteSender,
    events: mpsc::Receiver<ConnEvent>,
    resume: mpsc::Sender<Duration>,
    driver_stop: CancellationToken,
    driver: tokio::task::JoinHandle<()>,
    tracker: AckTracker,
    backoff: Backoff,
    connected: bool,
    /// Highest queue id handed to rumqttc on this connection.
    cursor: i64,
    ready: VecDeque<QueuedMessage>,
    /// Mapped to remote topic/QoS, waiting for the next append.
    unsaved: Vec<Message>,
    /// QoS 0 messages taken while connected with nothing waiting ahead of
    /// them, waiting only for room in the connection's request queue. Always
    /// older than anything unsent in the queue, so they go first.
    direct: VecDeque<Message>,
    /// Ids of the last append (kept to reuse its allocation).
    appended: Vec<(usize, i64)>,
    acked: Vec<i64>,
    echo: EchoGuard,
    /// Messages the remote broker refused (MQTT 5 reason codes).
    refused: u64,
    /// With `drain_rate`: spaces the sends.
    pacer: Option<Pacer>,
    /// When the last queue write failed (they are retried a second later).
    flush_failed_at: Option<Instant>,
    /// Set while the file system refuses appends (see [`DiskFull`]).
    disk_full: Option<DiskFull>,
    inbox: Arc<Inbox>,
    /// The last inbox record taken.
    taken_seq: u64,
    /// Messages may wait in the inbox.
    inbox_due: bool,
}

/// A full disk is a state, logged when it starts and when it ends: while
/// it lasts, appends are tried once a second, what is already queued keeps
/// draining (deleting rows needs no new space, see `queue::DiskBudget`),
/// the bridge keeps taking messages from the bus (the gateway's publishers
/// never wait on it), and past [`MAX_UNSAVED`] in memory the oldest of those
/// are dropped and counted in `dropped`.
#[derive(Debug)]
struct DiskFull {
    since: Instant,
    retry_at: Instant,
    /// Messages dropped because they could not be stored.
    lost: u64,
}

impl<L: LocalLink> Runner<L> {
    fn new(bridge: Bridge, local: L, shutdown: CancellationToken) -> Runner<L> {
        let Bridge {
            spec,
            queue,
            inbox,
            recovered,
            status: status_tx,
        } = bridge;
        let (sender, conn) = remote_client(&spec.remote);
        let (events_tx, events) = mpsc::channel(1024);
        let (resume, resume_rx) = mpsc::channel(1);
        let driver_stop = CancellationToken::new();
        let driver = tokio::spawn(drive(conn, events_tx, resume_rx, driver_stop.clone()));
        let status = status_tx.borrow().clone();
        let backoff = Backoff::new(spec.reconnect.min, spec.reconnect.max);
        let spec_pacer = spec.drain_rate.map(|r| Pacer::new(r, Instant::now()));
        let mut runner = Runner {
            spec,
            queue,
            status_tx,
            status,
            published_status: None,
            local,
            local_open: true,
            shutdown,
            sender,
            events,
            resume,
            driver_stop,
            driver,
            tracker: AckTracker::new(),
            backoff,
            connected: false,
            cursor: 0,
            ready: VecDeque::new(),
            unsaved: Vec::new(),
            direct: VecDeque::new(),
            appended: Vec::new(),
            acked: Vec::new(),
            echo: EchoGuard::default(),
            refused: 0,
            disk_full: None,
            pacer: spec_pacer,
            flush_failed_at: None,
            inbox,
            taken_seq: 0,
            inbox_due: true,
        };
        for (seq, m) in recovered {
            runner.map_uplink(m);
            runner.taken_seq = seq;
        }
        runner
    }

    /// Takes what the broker wrote to the inbox, up to a batch, when
    /// something may be there (a strict bridge was woken by it, or the
    /// last batch was full).
    fn take_inbox(&mut self) {
        if !self.inbox_due {
            return;
        }
        let batch = self.inbox.take(APPEND_BATCH);
        self.inbox_due = batch.len() == APPEND_BATCH;
        for (seq, m) in batch {
            self.map_uplink(m);
            self.taken_seq = seq;
        }
    }

    /// Room for more messages from the bus or the inbox.
    fn has_room(&self) -> bool {
        self.unsaved.len() < MAX_UNSAVED || self.disk_full.is_some()
    }

    async fn run(mut self) {
        tracing::info!(url = ?self.spec.remote.endpoint, depth = self.status.queue_depth,
            "bridge starting");
        self.publish_status(true).await;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.has_room() {
                self.take_inbox();
            }
            self.persist();
            self.fill_window();
            let rate_wait = self.rate_limited();
            let write_at = self.write_at();
            // Not `biased`: a steady stream of acks during a drain must not
            // starve the local bus (live data keeps being queued).
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                ev = self.events.recv() => match ev {
                    Some(ev) => {
                        self.on_event(ev).await;
                        // Take the events that are already waiting too, so a
                        // batch of acks becomes one delete transaction.
                        for _ in 0..ACK_BATCH {
                            match self.events.try_recv() {
                                Ok(ev) => self.on_event(ev).await,
                                Err(_) => break,
                            }
                        }
                    }
                    None => {
                        tracing::error!("connection task ended unexpectedly");
                        break;
                    }
                },
                _ = self.inbox.arrived(), if self.spec.strict && self.has_room() => {
                    self.inbox_due = true;
                }
                m = self.local.recv(), if self.local_open && self.has_room() => {
                    match m {
                        Some(m) => self.take_local(m).await,
                        None => {
                            tracing::info!("local bus closed");
                            self.local_open = false;
                            break;
                        }
                    }
                }
                _ = sleep_until(self.pacer.as_ref().map_or_else(Instant::now, |p| p.next)), if rate_wait => {}
                _ = sleep_until(write_at.unwrap_or_else(Instant::now)), if write_at.is_some() => {}
                _ = tick.tick() => {
                    if self.disk_full.is_some() && !self.queue.recheck_room() {
                        self.disk_room_again();
                    }
                    self.expire();
                    self.publish_status(false).await;
                }
            }
        }
        self.stop().await;
    }

    /// A message from the local bus, plus whatever else is already waiting.
    async fn take_local(&mut self, first: Message) {
        self.map_uplink(first);
        while self.unsaved.len() < APPEND_BATCH {
            // `timeout(ZERO, f)` polls `f` once: takes what is ready, never waits.
            match tokio::time::timeout(Duration::ZERO, self.local.recv()).await {
                Ok(Some(m)) => self.map_uplink(m),
                Ok(None) => {
                    self.local_open = false;
                    break;
                }
                Err(_) => break,
            }
        }
    }

    fn map_uplink(&mut self, m: Message) {
        if self.echo.is_echo(&m.topic, &m.payload) {
            tracing::trace!(topic = %m.topic, "not forwarding a message that came from this bridge");
            return;
        }
        let Some((remote_topic, qos)) = self.spec.uplink(&m.topic) else {
            return;
        };
        let qos = if self.spec.keep_message_qos {
            m.qos
        } else {
            qos
        };
        let m = Message {
            topic: remote_topic,
            payload: m.payload,
            qos,
            retain: m.retain,
        };
        if qos == Qos::AtMostOnce && self.direct.len() < MAX_DIRECT && self.nothing_waiting() {
            // QoS 0 promises at most once: while connected with nothing
            // waiting ahead of it, it goes straight to the connection, as in
            // Mosquitto's bridge, through a memory buffer that absorbs bursts
            // (the disk would slow the bridge down just when it must keep
            // up). Offline, or behind a backlog, it is queued like
            // everything else; order is kept either way.
            self.direct.push_back(m);
            // With more buffered, the connection was full a moment ago: the
            // next round of the loop tries again.
            if self.direct.len() == 1 {
                self.send_direct();
            }
            return;
        }
        self.unsaved.push(m);
        if let Some(full) = &mut self.disk_full {
            if self.unsaved.len() >= MAX_UNSAVED + APPEND_BATCH {
                // Nowhere to keep them: the oldest go, counted.
                let n = self.unsaved.len() - MAX_UNSAVED;
                self.unsaved.drain(..n);
                full.lost += n as u64;
                self.refused += n as u64;
            }
        }
    }

    /// Hands buffered QoS 0 messages to the connection while it has room.
    fn send_direct(&mut self) {
        while let Some(m) = self.direct.front() {
            match self
                .sender
                .publish(&m.topic, m.payload.clone(), m.qos, m.retain)
            {
                Ok(()) => {
                    self.tracker.sent(DIRECT, Qos::AtMostOnce);
                    self.direct.pop_front();
                }
                Err(_) => return,
            }
        }
        if self.direct.capacity() > 1024 {
            self.direct.shrink_to(1024);
        }
    }

    /// Buffered QoS 0 messages go to the durable queue, ahead of anything
    /// newer (the connection is gone, or the bridge stops).
    fn spill_direct(&mut self) {
        if !self.direct.is_empty() {
            let newer = std::mem::take(&mut self.unsaved);
            self.unsaved.extend(self.direct.drain(..));
            self.unsaved.extend(newer);
            self.direct.shrink_to(1024);
        }
    }

    /// Connected, not paced, and every message taken so far has been handed
    /// to the connection: a new message may skip the queue.
    fn nothing_waiting(&self) -> bool {
        self.connected
            && self.pacer.is_none()
            && self.unsaved.is_empty()
            && self.ready.is_empty()
            && self.all_handed_over()
    }

    /// `ready` holds every message of the queue not yet handed over.
    fn ready_holds_all_unsent(&self) -> bool {
        match self.ready.back() {
            None => self.all_handed_over(),
            Some(newest) => newest.id == self.queue.last_id(),
        }
    }

    /// Every message in the queue has been handed to the connection.
    fn all_handed_over(&self) -> bool {
        self.queue.is_empty() || self.queue.last_id() <= self.cursor
    }

    /// Appends waiting messages and deletes acknowledged ones.
    /// Appends up to `max` waiting messages; whether they were stored.
    fn append_unsaved(&mut self, max: usize) -> bool {
        let batch_len = self.unsaved.len().min(max);
        // While connected and `ready` holds every unsent message, the new
        // ones join it as they are stored, instead of being read back.
        let keep = self.connected && self.ready.len() < MAX_READY && self.ready_holds_all_unsent();
        let mut ids = std::mem::take(&mut self.appended);
        // With `write_behind`, while connected, messages are staged and
        // written after that delay unless acknowledged before; otherwise
        // (and always offline) they are on disk before they are sent.
        // Not while the disk is full: staged messages would hold back the
        // small delete-only writes that drain the queue then.
        let stored =
            if self.connected && self.spec.write_behind.is_some() && self.disk_full.is_none() {
                self.queue.stage(&self.unsaved[..batch_len], &mut ids)
            } else {
                self.queue
                    .append_with_ids(&self.unsaved[..batch_len], &mut ids)
            };
        match stored {
            Ok(_) if self.disk_full.is_some() => {
                // Stored in pages the drain freed, or in new room: the
                // episode ends only when the file system has room.
                if !self.queue.disk_full() {
                    self.disk_room_again();
                }
                self.unsaved.drain(..batch_len);
                self.ready.clear();
            }
            Ok((dropped, _)) if dropped > 0 => {
                self.unsaved.drain(..batch_len);
                // Some of the peeked messages may be gone now.
                self.ready.clear();
            }
            Ok((_, ts)) if keep => {
                let mut stored = ids.iter().peekable();
                for (i, m) in self.unsaved.drain(..batch_len).enumerate() {
                    if let Some(&(_, id)) = stored.next_if(|(at, _)| *at == i) {
                        self.ready.push_back(QueuedMessage {
                            id,
                            ts,
                            topic: m.topic,
                            payload: m.payload,
                            qos: m.qos,
                            retain: m.retain,
                        });
                    }
                }
            }
            Ok(_) => {
                self.unsaved.drain(..batch_len);
            }
            Err(e) => {
                self.appended = ids;
                self.queue_failed(e);
                return false;
            }
        }
        self.appended = ids;
        true
    }

    fn persist(&mut self) {
        let retry_later = self
            .disk_full
            .as_ref()
            .is_some_and(|f| Instant::now() < f.retry_at);
        if !self.unsaved.is_empty() && !retry_later {
            if self.disk_full.is_some() {
                // Small transactions while the disk is full: the WAL cannot
                // grow, only reuse its room.
                for _ in 0..64 {
                    if self.unsaved.is_empty() || !self.append_unsaved(DISK_FULL_BATCH) {
                        break;
                    }
                }
            } else {
                self.append_unsaved(APPEND_BATCH * 4);
            }
        }
        if self.write_at().is_some_and(|at| at <= Instant::now()) {
            self.flush_staged();
        }
        // Everything taken from the inbox is in the queue (or dropped,
        // counted): the queue records that with its next write, and the
        // inbox lets go of what the queue has recorded.
        if self.unsaved.is_empty() {
            self.queue.mark_inbox(self.taken_seq);
        }
        self.inbox.release(self.queue.inbox_mark());
        // Deleted with the next write (at most `flush_delay` later); a
        // crash before that sends them again: at least once.
        self.queue.ack_later(&self.acked);
        self.acked.clear();
        self.sync_queue_stats();
    }

    /// How long staged messages and acknowledged rows wait for a write.
    fn flush_delay(&self) -> Duration {
        self.spec.write_behind.unwrap_or(DELETE_DELAY)
    }

    /// Writes staged messages and deletes acknowledged rows now.
    fn flush_staged(&mut self) {
        match self.queue.flush() {
            Ok(()) => self.flush_failed_at = None,
            Err(e) => {
                // A full or broken disk: try again in a second, not on
                // every turn of the loop.
                self.flush_failed_at = Some(Instant::now());
                self.queue_failed(e);
            }
        }
    }

    /// When the waiting queue writes are due: `flush_delay` after the
    /// oldest, or a second after a failed attempt.
    fn write_at(&self) -> Option<Instant> {
        let due = Instant::from_std(self.queue.unwritten_since()?) + self.flush_delay();
        Some(match self.flush_failed_at {
            Some(failed) => due.max(failed + Duration::from_secs(1)),
            None => due,
        })
    }

    /// The disk took a write again: the end of a disk-full episode.
    fn disk_room_again(&mut self) {
        if let Some(full) = self.disk_full.take() {
            tracing::warn!(
                lost = full.lost,
                after = ?full.since.elapsed(),
                "the disk has room again: the queue stores messages again ({} could not be kept while it was full, counted in dropped)",
                full.lost
            );
            self.status.last_error = None;
        }
    }

    fn queue_failed(&mut self, e: QueueError) {
        if e.is_disk_full() {
            let now = Instant::now();
            match &mut self.disk_full {
                Some(full) => {
                    full.retry_at = now + Duration::from_secs(1);
                    tracing::debug!(error = %e, "disk still full");
                }
                None => {
                    tracing::warn!(path = %self.queue.path().display(), waiting = self.unsaved.len(),
                        "disk full: the queue cannot store new messages; what is queued keeps draining, new messages wait in memory (up to {MAX_UNSAVED}, then the oldest are dropped and counted) until there is room again");
                    self.disk_full = Some(DiskFull {
                        since: now,
                        retry_at: now + Duration::from_secs(1),
                        lost: 0,
                    });
                }
            }
            self.status.last_error = Some(format!("disk full: {e}"));
            return;
        }
        tracing::error!(error = %e, "queue operation failed");
        self.status.last_error = Some(e.to_string());
        if e.is_corrupt() {
            match Queue::open(&self.spec.data_dir, &self.spec.name, self.spec.limits) {
                Ok((queue, recovery)) => {
                    tracing::warn!(salvaged = recovery.salvaged, "queue reopened after damage");
                    self.queue = queue;
                    // Resend everything from the start of the recovered queue.
                    self.cursor = 0;
                    self.ready.clear();
                }
                Err(e) => tracing::error!(error = %e, "queue could not be reopened"),
            }
        }
    }

    fn sync_queue_stats(&mut self) {
        let stats = self.queue.stats();
        self.status.queue_depth = stats.depth;
        self.status.queue_bytes = stats.bytes;
        self.status.dropped = stats.dropped + self.refused;
        self.status.disk_full = self.disk_full.is_some();
    }

    /// Waiting for the pacer with something to send.
    fn rate_limited(&self) -> bool {
        self.connected
            && !self.queue.is_empty()
            && self.pacer.as_ref().is_some_and(|p| p.next > Instant::now())
    }

    /// Hands the oldest unsent messages to rumqttc, up to the window.
    fn fill_window(&mut self) {
        if !self.connected {
            return;
        }
        // Buffered QoS 0 is older than anything unsent in the queue.
        self.send_direct();
        if !self.direct.is_empty() {
            return;
        }
        let window = self.spec.remote.max_inflight as usize;
        // The window counts what waits for an ack; QoS 0 is bounded by the
        // connection's request queue (a full one refuses, see below).
        while self.tracker.awaiting_ack() < window {
            if let Some(pacer) = &mut self.pacer {
                if !pacer.take(Instant::now()) {
                    return;
                }
            }
            if self.ready.is_empty() {
                if self.all_handed_over() {
                    // Nothing unsent on disk: spare the query.
                    return;
                }
                match self.queue.peek_after(self.cursor, window.max(64)) {
                    Ok(batch) if batch.is_empty() => return,
                    Ok(batch) => self.ready.extend(batch),
                    Err(e) => {
                        self.queue_failed(e);
                        return;
                    }
                }
            }
            let Some(m) = self.ready.pop_front() else {
                return;
            };
            if packet_size(&m) > self.spec.remote.max_packet_size {
                // rumqttc would fail the whole connection on it, again
                // after every reconnect: drop it instead, loudly.
                tracing::warn!(id = m.id, topic = %m.topic, bytes = m.payload.len(),
                    max_packet_size = self.spec.remote.max_packet_size,
                    "message larger than max_packet_size dropped");
                self.status.last_error = Some(format!(
                    "a {}-byte message on {} exceeds max_packet_size and was dropped",
                    m.payload.len(),
                    m.topic
                ));
                self.refused += 1;
                self.acked.push(m.id);
                self.cursor = m.id;
                continue;
            }
            match self
                .sender
                .publish(&m.topic, m.payload.clone(), m.qos, m.retain)
            {
                Ok(()) => {
                    self.tracker.sent(m.id, m.qos);
                    self.cursor = m.id;
                }
                Err(e) => {
                    // Busy or closed: try again on the next round.
                    tracing::debug!(error = %e, "remote request queue refused a publish");
                    self.ready.push_front(m);
                    return;
                }
            }
        }
    }

    async fn on_event(&mut self, ev: ConnEvent) {
        match ev {
            Ok(RemoteEvent::Connected { session_present }) => {
                self.connected = true;
                self.backoff.connected();
                self.status.connected = true;
                self.status.since = now_ms();
                self.cursor = 0;
                self.ready.clear();
                tracing::info!(
                    session_present,
                    backlog = self.queue.stats().depth,
                    "connected to the remote broker"
                );
                if !session_present {
                    if let Err(e) = self.sender.subscribe(&self.spec.remote_filters()) {
                        tracing::warn!(error = %e, "could not queue the remote subscriptions");
                    }
                }
                self.publish_status(true).await;
            }
            Ok(RemoteEvent::Published { pkid }) => {
                if let Some(id) = self.tracker.on_outgoing_publish(pkid) {
                    if id != DIRECT {
                        self.acked.push(id);
                    }
                    self.status.forwarded += 1;
                }
            }
            Ok(RemoteEvent::Acked { pkid }) => {
                if let Some(id) = self.tracker.on_ack(pkid) {
                    self.acked.push(id);
                    self.status.forwarded += 1;
                }
            }
            Ok(RemoteEvent::Refused { pkid, reason }) => {
                if let Some(id) = self.tracker.on_ack(pkid) {
                    tracing::warn!(id, reason = %reason, "remote broker refused a message; dropped");
                    self.acked.push(id);
                    self.refused += 1;
                    self.status.last_error = Some(format!("remote refused a message: {reason}"));
                }
            }
            Ok(RemoteEvent::Received(m)) => self.downlink(m).await,
            Ok(RemoteEvent::Subscribed { refused }) => {
                if refused > 0 {
                    let e = format!("remote broker refused {refused} subscription(s)");
                    tracing::warn!("{e}");
                    self.status.last_error = Some(e);
                }
            }
            Ok(RemoteEvent::Other) => {}
            Err(e) => self.disconnected(e).await,
        }
    }

    async fn disconnected(&mut self, e: RemoteError) {
        let was_connected = self.connected;
        self.connected = false;
        self.backoff.disconnected();
        let mut unacked = self.tracker.reset();
        // QoS 0 sent past the queue is not sent again (at most once); what
        // had not reached the connection yet is kept in the queue.
        unacked.retain(|&id| id != DIRECT);
        // An outage may last: what is only in memory goes to disk now.
        self.flush_staged();
        self.spill_direct();
        self.status.redelivered += unacked.len() as u64;
        self.ready.clear();
        self.cursor = 0;
        self.status.connection_errors += 1;
        self.status.last_error = Some(e.to_string());
        let delay = self.backoff.next_delay();
        if was_connected {
            self.status.connected = false;
            self.status.since = now_ms();
            tracing::warn!(error = %e, unacked = unacked.len(), retry_in = ?delay,
                "connection to the remote broker lost");
            self.publish_status(true).await;
        } else {
            tracing::debug!(error = %e, attempt = self.backoff.attempt(), retry_in = ?delay,
                "cannot connect to the remote broker");
            if self.backoff.attempt() == 1 || self.backoff.attempt().is_multiple_of(10) {
                tracing::warn!(error = %e, attempt = self.backoff.attempt(), retry_in = ?delay,
                    "cannot connect to the remote broker");
            }
        }
        // The driver clears rumqttc's state only now that the tracker is
        // reset, then waits `delay` and reconnects.
        let _ = self.resume.send(delay).await;
    }

    async fn downlink(&mut self, m: Message) {
        let Some(local_topic) = self.spec.downlink(&m.topic) else {
            tracing::debug!(topic = %m.topic, "remote message matches no subscribe route");
            return;
        };
        if self.local.echoes_own_publishes() && self.spec.uplink(&local_topic).is_some() {
            self.echo.expect(&local_topic, &m.payload);
        }
        let local = Message {
            topic: local_topic,
            payload: m.payload,
            qos: m.qos,
            retain: m.retain,
        };
        match self.local.publish(local).await {
            Ok(()) => self.status.received += 1,
            Err(e) => tracing::warn!(error = %e, "could not publish a downlink message locally"),
        }
    }

    fn expire(&mut self) {
        match self.queue.expire() {
            Ok(n) if n > 0 => {
                // Expired rows may have been in `ready`; peeking again skips them.
                self.ready.clear();
            }
            Ok(_) => {}
            Err(e) => self.queue_failed(e),
        }
        self.sync_queue_stats();
    }

    /// Publishes the retained status when it changed (or `force`).
    async fn publish_status(&mut self, force: bool) {
        self.sync_queue_stats();
        self.status_tx.send_replace(self.status.clone());
        if !force && self.published_status.as_ref() == Some(&self.status) {
            return;
        }
        let payload = match serde_json::to_vec(&self.status) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode bridge status");
                return;
            }
        };
        let m = Message {
            topic: self.spec.status_topic.clone(),
            payload: Bytes::from(payload),
            qos: Qos::AtMostOnce,
            retain: true,
        };
        match self.local.publish(m).await {
            Ok(()) => self.published_status = Some(self.status.clone()),
            Err(e) => tracing::debug!(error = %e, "could not publish bridge status"),
        }
    }

    /// Saves what is waiting, says goodbye to the remote broker (briefly),
    /// and stops the connection task.
    async fn stop(mut self) {
        // From here everything goes to the queue: nothing new is sent.
        let connected = std::mem::replace(&mut self.connected, false);
        self.spill_direct();
        // Take what already reached the bridge's link, without waiting.
        while self.unsaved.len() < MAX_UNSAVED {
            let before = self.taken_seq;
            self.inbox_due = true;
            self.take_inbox();
            if self.taken_seq == before {
                break;
            }
        }
        while self.local_open && self.unsaved.len() < MAX_UNSAVED {
            match tokio::time::timeout(Duration::ZERO, self.local.recv()).await {
                Ok(Some(m)) => self.map_uplink(m),
                _ => break,
            }
        }
        self.persist();
        if connected {
            let _ = self.sender.disconnect();
            // Let the driver write the DISCONNECT; acks that arrive
            // meanwhile are still recorded.
            let deadline = Instant::now() + Duration::from_millis(500);
            while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
                match ev {
                    Ok(RemoteEvent::Published { pkid }) => {
                        if let Some(id) = self.tracker.on_outgoing_publish(pkid) {
                            if id != DIRECT {
                                self.acked.push(id);
                            }
                        }
                    }
                    Ok(RemoteEvent::Acked { pkid }) => {
                        if let Some(id) = self.tracker.on_ack(pkid) {
                            self.acked.push(id);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            self.persist();
        }
        self.flush_staged();
        self.inbox.release(self.queue.inbox_mark());
        self.driver_stop.cancel();
        let _ = (&mut self.driver).await;
        self.status.connected = false;
        self.status.since = now_ms();
        self.publish_status(true).await;
        tracing::info!(depth = self.status.queue_depth, "bridge stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_spaces_sends_and_banks_no_burst() {
        let t0 = Instant::now();
        let mut p = Pacer::new(10, t0);
        assert!(p.take(t0));
        assert!(!p.take(t0), "one step (100ms) must pass");
        assert!(!p.take(t0 + Duration::from_millis(99)));
        assert!(p.take(t0 + Duration::from_millis(100)));
        // After a long pause: one send now, then one per step again.
        let later = t0 + Duration::from_secs(60);
        assert!(p.take(later));
        assert!(!p.take(later), "quiet time is not banked");
        assert!(p.take(later + Duration::from_millis(100)));
    }

    #[test]
    fn echo_guard_swallows_each_expected_message_once() {
        let mut g = EchoGuard::default();
        let on = Bytes::from("on");
        g.expect("cmd/led", &on);
        assert!(!g.is_echo("cmd/led", &Bytes::from("off")));
        assert!(g.is_echo("cmd/led", &on));
        assert!(!g.is_echo("cmd/led", &on), "a second, real message passes");
    }

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
