//! The bridge connection engine, one for every profile: local bus ->
//! durable queue -> remote broker, and remote messages -> local bus.
//!
//! The engine ([`run`]) owns everything about getting messages across: it
//! takes messages from the local bus and the inbox, stores them in the
//! queue, connects with the one retry policy (`link.rs`), drives the rumqttc
//! client, pairs publishes with their acknowledgements, paces, resumes from
//! the queue after every reconnect, survives a full disk, and reports its
//! status. A [`Profile`] supplies only what differs between remote peers:
//! its identity and connect options, how local messages map to remote ones
//! (a generic bridge forwards topics with a prefix; OneNET batches values
//! into thing-model posts), what to subscribe to, and how remote messages
//! become local messages or answers.
//!
//! # How a message travels
//! 1. A local message matching the bridge's filters is handed to the
//!    profile; what it returns (at once, or at the end of a batch window)
//!    is appended to the queue (batched: everything already waiting goes
//!    into one transaction) before anything else happens to it. With
//!    `queue.write_behind` it is staged in memory instead while connected,
//!    and written only if still unacknowledged after that delay.
//! 2. While connected, the oldest queued messages are handed to rumqttc,
//!    strictly in queue order, within the profile's window (`max_inflight`
//!    messages awaiting their ack; OneNET: a few posts) and pace
//!    (`queue.drain_rate`; OneNET: `min_interval`).
//! 3. A message is deleted from the queue when the remote broker
//!    acknowledged it (batched with the next append, or within 20 ms):
//!    PUBACK (QoS 1), PUBCOMP (QoS 2), or, for QoS 0, once it was written
//!    to the socket.
//! 4. When the connection drops, everything not yet deleted is sent again,
//!    from the oldest, after the next CONNACK (at-least-once).
//!
//! # How the bridge retries
//! One answer for every profile (`link.rs`): each attempt gets a fresh
//! client; after a failed attempt or a broken connection the next attempt
//! waits for `reconnect.min`, doubling up to `reconnect.max`, with jitter
//! (`mqtt::Backoff`); the delays start over only after a connection that
//! lasted. Meanwhile the bridge keeps taking local messages into the queue.
//!
//! # Backlog and live data
//! Order is preserved, so live data queues behind a backlog. What keeps it
//! flowing is that the engine never stops taking messages from the local
//! bus while it drains (appends and sends interleave in one loop), the
//! drain is clocked by the remote broker's acknowledgements, and the pace
//! can cap it so that a long backlog does not take the whole uplink. The
//! backlog drains by itself after a reconnect; it does not wait for new
//! data.
//!
//! # Files
//! `runner.rs` the loop; `link.rs` connections and retries; `pacer.rs`;
//! `disk.rs` the full-disk state; `profile.rs` the profile interface. The
//! profiles: `bridge/generic.rs` and `bridge/onenet/run/profile.rs`.

mod disk;
mod link;
mod pacer;
mod profile;
mod runner;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use pacer::Pacer;
pub use profile::{Actions, Next, Outgoing, Profile, Window};

use super::queue::inbox::Inbox;
use super::queue::{Queue, QueueError, QueueLimits};
use crate::config::ReconnectConfig;
use crate::model::{now_ms, Message, Millis};

/// The bridge's side of the local bus: a subscription to its filters, and
/// a way to publish downlink messages and its status.
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

/// `edgebridge/<gateway>/bridges/<bridge>/status`.
pub fn status_topic(gateway_id: &str, bridge: &str) -> String {
    format!("edgebridge/{gateway_id}/bridges/{bridge}/status")
}

/// What a bridge reports: retained JSON on its status topic, and through
/// a watch channel for the operations endpoints.
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

/// The engine's settings, the same for every profile.
#[derive(Debug, Clone)]
pub struct Settings {
    pub name: String,
    /// Where the queue is (reopened from there after damage).
    pub data_dir: PathBuf,
    pub limits: QueueLimits,
    /// `queue.write_behind` (zero counts as unset).
    pub write_behind: Option<Duration>,
    pub reconnect: ReconnectConfig,
    /// Retained status topic: `edgebridge/<id>/bridges/<name>/status`.
    pub status_topic: String,
    /// `queue.strict`: QoS 1/2 messages reach the bridge through its inbox
    /// log, written before the publisher's acknowledgement.
    pub strict: bool,
    /// At most one send per this (`queue.drain_rate`, OneNET's
    /// `min_interval`).
    pub pace: Option<Duration>,
    pub window: Window,
    /// Larger publishes are dropped, counted (rumqttc would fail the whole
    /// connection on them).
    pub max_packet_size: usize,
    /// QoS 0 messages go straight to the connection while nothing waits
    /// ahead of them, as in Mosquitto's bridge.
    pub qos0_past_queue: bool,
    /// How the logs name the remote peer: "the remote broker", "OneNET".
    pub peer: &'static str,
}

/// Errors opening a bridge's queue and inbox.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("bridge `{bridge}`: {source}")]
    Queue { bridge: String, source: QueueError },
    #[error("bridge `{bridge}`: inbox: {source}")]
    Inbox {
        bridge: String,
        source: std::io::Error,
    },
}

/// A bridge's durable state, opened (and if needed recovered).
pub struct Opened {
    pub(crate) queue: Queue,
    pub(crate) inbox: Arc<Inbox>,
    /// Acknowledged to their publishers before the last stop and not in
    /// the queue yet: taken in first (see `queue/inbox.rs`).
    pub(crate) recovered: Vec<(u64, Message)>,
    pub(crate) status: watch::Sender<BridgeStatus>,
}

impl Opened {
    /// Opens the queue and the inbox of bridge `name` under `data_dir`.
    pub fn open(
        name: &str,
        data_dir: &std::path::Path,
        limits: QueueLimits,
    ) -> Result<Opened, OpenError> {
        let (queue, recovery) =
            Queue::open(data_dir, name, limits).map_err(|source| OpenError::Queue {
                bridge: name.to_string(),
                source,
            })?;
        // Opened whether or not the bridge is strict now: what a strict run
        // left in it was acknowledged and must not be lost.
        let (inbox, recovered) =
            Inbox::open(data_dir, name, queue.inbox_mark()).map_err(|source| OpenError::Inbox {
                bridge: name.to_string(),
                source,
            })?;
        if !recovered.is_empty() {
            tracing::info!(bridge = %name, messages = recovered.len(),
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
        Ok(Opened {
            queue,
            inbox,
            recovered,
            status,
        })
    }

    /// The inbox the broker writes QoS 1/2 messages to in strict mode.
    pub fn inbox(&self) -> &Arc<Inbox> {
        &self.inbox
    }

    /// Live status (for metrics and tests).
    pub fn status(&self) -> watch::Receiver<BridgeStatus> {
        self.status.subscribe()
    }
}

/// Runs a bridge until `shutdown`, or until the local link closes.
/// Whatever is not acknowledged stays in the queue for the next run.
pub async fn run<L: LocalLink, P: Profile>(
    settings: Settings,
    opened: Opened,
    profile: P,
    local: L,
    shutdown: CancellationToken,
) {
    use tracing::Instrument;
    let span = tracing::info_span!("bridge", bridge = %settings.name);
    runner::Runner::new(settings, opened, profile, local, shutdown)
        .run()
        .instrument(span)
        .await
}
