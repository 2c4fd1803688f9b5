//! The bridges on the gateway's bus: one bus client per bridge, subscribed
//! to its `forward` filters, and the startup of all configured bridges.

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Bridge, BridgeError, BridgeSpec, BridgeStatus, LocalLink};
use crate::bus::{Bus, BusError, Forwarder, SubscriptionTx};
use crate::config::Config;
use crate::model::Message;

/// Messages between the bus client's receiving task and the bridge.
const LINK_QUEUE: usize = 4096;

/// A bridge's client on the local bus. The receiving half is read by a
/// task of its own (see [`crate::bus::SubscriptionRx::forward_to`]) that
/// hands messages over a channel, which the bridge can wait on in `select!`
/// safely.
pub struct BusLink {
    rx: mpsc::Receiver<Message>,
    tx: SubscriptionTx,
    echoes: bool,
    _reader: Forwarder,
}

impl BusLink {
    /// Subscribes bus client `client_id` to `filters`.
    pub async fn new(
        bus: &Bus,
        client_id: &str,
        filters: &[(String, crate::model::Qos)],
        inbox: Option<std::sync::Arc<super::queue::inbox::Inbox>>,
    ) -> Result<BusLink, BusError> {
        let sub = bus.subscribe_with_inbox(client_id, filters, inbox).await?;
        let (sub_rx, tx) = sub.split();
        let (fwd, rx) = mpsc::channel(LINK_QUEUE);
        let reader = sub_rx.forward_to("bridge-rx", fwd)?;
        Ok(BusLink {
            rx,
            tx,
            echoes: bus.echoes_own_publishes(),
            _reader: reader,
        })
    }
}

impl LocalLink for BusLink {
    async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }

    async fn publish(&mut self, message: Message) -> Result<(), String> {
        self.tx.publish(message).await.map_err(|e| e.to_string())
    }

    /// The embedded broker keeps a client's own publishes from it
    /// (no-local); MQTT 3.1.1 on an external bus has no such thing.
    fn echoes_own_publishes(&self) -> bool {
        self.echoes
    }
}

/// A bridge started by [`start_all`] or [`start`].
pub struct RunningBridge {
    pub name: String,
    pub status: watch::Receiver<BridgeStatus>,
    pub task: JoinHandle<()>,
    /// Stops this bridge alone (a config reload); a child of the token
    /// that stops them all.
    pub stop: CancellationToken,
}

/// Errors starting the configured bridges.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bridge(#[from] BridgeError),
    #[error("bridge `{bridge}`: {source}")]
    Bus { bridge: String, source: BusError },
    #[error(transparent)]
    OneNet(#[from] super::onenet::run::OneNetError),
}

/// Opens the queues and starts every bridge of `config` (OneNET ones too),
/// subscribed on `bus` before this returns (so nothing published after it
/// is missed). They stop when `shutdown` is cancelled, keeping whatever is
/// unacknowledged in their queues.
pub async fn start_all(
    config: &Config,
    bus: &Bus,
    shutdown: &CancellationToken,
) -> Result<Vec<RunningBridge>, StartError> {
    // Open everything first, so a bad certificate in the second bridge does
    // not leave the first one running.
    let mut bridges = Vec::new();
    let mut onenet = Vec::new();
    for b in &config.bridges {
        if b.onenet.is_some() {
            let (config, b) = (config.clone(), b.clone());
            onenet.push(
                crate::ops::blocking(move || super::onenet::run::OneNetBridge::open(&config, &b))
                    .await?,
            );
            continue;
        }
        bridges.push(open(BridgeSpec::from_config(b, config)?).await?);
    }
    let mut running = Vec::new();
    for bridge in bridges {
        running.push(start(bridge, bus, shutdown.child_token()).await?);
    }
    for bridge in onenet {
        running.push(bridge.start(bus, shutdown).await?);
    }
    Ok(running)
}

/// Opens (and if needed recovers) a bridge's queue and inbox on the
/// blocking pool: [`Bridge::open`] for async callers.
pub async fn open(spec: BridgeSpec) -> Result<Bridge, BridgeError> {
    crate::ops::blocking(move || Bridge::open(spec)).await
}

/// Subscribes an opened bridge on `bus` and runs it until `stop`.
pub async fn start(
    bridge: Bridge,
    bus: &Bus,
    stop: CancellationToken,
) -> Result<RunningBridge, StartError> {
    let name = bridge.spec().name.clone();
    let client_id = format!("edgebridge-bridge-{name}");
    let link = BusLink::new(
        bus,
        &client_id,
        &bridge.spec().local_filters(),
        bridge.strict_inbox(),
    )
    .await
    .map_err(|source| StartError::Bus {
        bridge: name.clone(),
        source,
    })?;
    let status = bridge.status();
    crate::ops::metrics::watch_bridge(&name, status.clone());
    let task = tokio::spawn(bridge.run(link, stop.clone()));
    Ok(RunningBridge {
        name,
        status,
        task,
        stop,
    })
}

/// Reads and checks the files that the generic bridges of `config` point to
/// (CA, client certificate and key), without connecting anywhere; for
/// `edgebridge check`. One message per problem.
pub fn check_files(config: &Config) -> Vec<String> {
    config
        .bridges
        .iter()
        .filter_map(|b| match b.onenet {
            Some(_) => super::onenet::run::check_files(config, b)
                .err()
                .map(|e| e.to_string()),
            None => BridgeSpec::from_config(b, config)
                .err()
                .map(|e| e.to_string()),
        })
        .collect()
}
