//! The embedded broker: rmqtt (a conformant MQTT 3.1, 3.1.1 and 5 broker
//! library) on the gateway's runtime, with edgebridge's parts around it.
//!
//! ```text
//!  LAN clients ──TCP/WS──▶ rmqtt listeners ──┐        (tls.rs: TLS in front)
//!                                            ▼
//!        hooks.rs: login, ACL, counting ──▶ rmqtt sessions, routing,
//!                                            │   retained (rmqtt-retainer)
//!  gateway parts ──publish()──▶ forwards ────┤
//!                                            ▼
//!                          local.rs: Tap ──▶ in-process subscribers
//!                                            (bridges, rules, commands)
//! ```
//!
//! Routing, sessions, QoS and retained messages are rmqtt's. Ours are: the
//! listeners' settings (below), who may log in and what they may do
//! (`access.rs`, `hooks.rs`), keep-alive and expiry rules (`fitter.rs`),
//! the in-process clients (`local.rs`), `$SYS` (`sys.rs`), TLS (`tls.rs`),
//! `max_connections` (`admission.rs`) and keeping retained messages and
//! persistent sessions across restarts (`persist.rs`, `sessions.rs`).

mod admission;
mod backlog;
mod fence;
mod fitter;
mod hooks;
mod local;
pub use local::Durable;
mod persist;
mod router;
mod sessions;
mod share;
mod sys;
mod takeover;
mod tls;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::num::NonZeroU16;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rmqtt::codec::types::Publish as CodecPublish;
use rmqtt::context::ServerContext;
use rmqtt::hook::Type;
use rmqtt::net::{Builder, Listener};
use rmqtt::server::MqttServer;
use rmqtt::session::SessionState;
use rmqtt::types::{From as Origin, Id, Publish};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use crate::access::{hash_password, Users};
use crate::access::{AccessControl, AccessError};
pub use fitter::keep_alive_limit;
pub use hooks::{acl_denied, dropped, logins_refused};
pub use local::{STALL_LIMIT, SUBSCRIBER_QUEUE};

use crate::config::{BrokerConfig, Config, ListenerProtocol};
use crate::model::{Message, Qos};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen on {addr}: {reason}")]
    Bind { addr: SocketAddr, reason: String },
    #[error("listener {addr}: {reason}")]
    Listener { addr: SocketAddr, reason: String },
    #[error("listener {addr}: TLS file {path} does not exist")]
    TlsFile { addr: SocketAddr, path: String },
    #[error("listener {addr}: {source}")]
    Tls {
        addr: SocketAddr,
        source: tls::TlsError,
    },
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error("the embedded broker: {0}")]
    Setup(String),
}

/// Longest client id accepted (MQTT 3.1.1 requires 23 bytes to work; 256
/// leaves room for UUIDs and host names, and bounds what a client can make
/// the broker keep per session).
pub const MAX_CLIENT_ID_LEN: usize = 256;

/// QoS 1 and 2 messages a client may have unacknowledged towards the broker.
/// MQTT 3.1.1 clients cannot learn a limit, so it is the protocol's own
/// maximum: a client is never disconnected for its window.
const INBOUND_WINDOW: u16 = u16::MAX;

/// How long a stop waits for the sessions to go offline before saving.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

/// Extra room in a packet beyond `max_payload_size`: topic and properties.
const PACKET_OVERHEAD: u32 = 64 * 1024;

/// A running embedded broker.
pub struct EmbeddedBroker {
    scx: ServerContext,
    local: Arc<local::LocalClients>,
    gate: hooks::Gate,
    listeners: Vec<(SocketAddr, ListenerProtocol)>,
    /// Bound, not yet served: taken by [`EmbeddedBroker::open_listeners`].
    pending: Mutex<Vec<Pending>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    retained_file: PathBuf,
    sessions_file: PathBuf,
    sys_interval: Duration,
    started: Instant,
}

/// A listener bound at start and served once the gateway is ready.
enum Pending {
    /// rmqtt serves it directly (plain TCP or WebSocket).
    Direct(ListenerId, Listener),
    /// TLS: our front on the public socket, rmqtt on a loopback one.
    Tls {
        id: ListenerId,
        public: StdListener,
        acceptor: tokio_rustls::TlsAcceptor,
        inner: Listener,
    },
}

type ListenerId = u16;

impl EmbeddedBroker {
    /// Sets the broker up and binds every listener (a busy port is an
    /// error here), without serving them yet: they open with
    /// [`EmbeddedBroker::open_listeners`], once the gateway's own clients
    /// (the bridges) are subscribed, so that no LAN message is missed.
    pub async fn start(config: &Config) -> Result<EmbeddedBroker, BrokerError> {
        let b = &config.broker;
        let scx = ServerContext::new()
            // rmqtt refuses logins ("server unavailable") while the
            // machine's load average is high; a gateway next to a busy
            // PLC must still serve its devices.
            .busy_check_enable(false)
            .plugins_config_map_add("rmqtt-retainer", RETAINER_CONFIG)
            .build()
            .await;
        rmqtt_retainer::register(&scx, true, true)
            .await
            .map_err(|e| BrokerError::Setup(format!("retained messages: {e}")))?;
        let local = Arc::new(local::LocalClients::default());
        let fence = Arc::new(fence::Fence::default());
        let admission = Arc::new(admission::Admission::new(b.max_connections));
        let backlog = Arc::new(backlog::Backlog::new(b.max_queued_messages));
        *scx.extends.shared_mut().await = Box::new(local::Tap::new(
            &scx,
            local.clone(),
            fence.clone(),
            admission.clone(),
            backlog.clone(),
        ));
        *scx.extends.router_mut().await = Box::new(router::SerialRouter::new(&scx));
        *scx.extends.fitter_mgr_mut().await = Box::new(fitter::Fitters {
            max_keep_alive: u16::try_from(b.max_keep_alive.as_secs()).unwrap_or(u16::MAX),
        });
        *scx.extends.shared_subscription_mut().await = Box::new(share::RoundRobin::default());

        let gate = hooks::Gate::new(
            scx.clone(),
            AccessControl::from_config(config)?,
            usize::try_from(b.max_payload_size.0).unwrap_or(usize::MAX),
            fence,
            admission,
            backlog,
        );
        let register = scx.extends.hook_mgr().register();
        for typ in [
            Type::ClientAuthenticate,
            Type::ClientDisconnected,
            Type::ClientConnected,
            Type::SessionTerminated,
            Type::ClientSubscribe,
            Type::ClientSubscribeCheckAcl,
            Type::SessionSubscribed,
            Type::MessagePublishCheckAcl,
            Type::MessageExpiryCheck,
            Type::MessageDelivered,
            Type::MessageDropped,
        ] {
            register.add(typ, Box::new(gate.clone())).await;
        }
        register.start().await;

        let mut listeners = Vec::new();
        let mut pending = Vec::new();
        for (i, l) in b.listeners.iter().enumerate() {
            let id = ListenerId::try_from(i + 1).unwrap_or(ListenerId::MAX);
            match &l.tls {
                None => {
                    let listener = bind(settings(b, l.bind), l.protocol)?;
                    let addr = listener
                        .local_addr()
                        .map_err(|e| BrokerError::Setup(e.to_string()))?;
                    listeners.push((addr, l.protocol));
                    pending.push(Pending::Direct(id, listener));
                }
                Some(t) => {
                    let (cert, key) = (config.resolve(&t.cert), config.resolve(&t.key));
                    for p in [&cert, &key] {
                        if !p.exists() {
                            return Err(BrokerError::TlsFile {
                                addr: l.bind,
                                path: p.display().to_string(),
                            });
                        }
                    }
                    let acceptor =
                        tls::acceptor(&cert, &key).map_err(|source| BrokerError::Tls {
                            addr: l.bind,
                            source,
                        })?;
                    let bind_err = |e: std::io::Error| BrokerError::Bind {
                        addr: l.bind,
                        reason: e.to_string(),
                    };
                    let public = StdListener::bind(l.bind).map_err(bind_err)?;
                    let addr = public.local_addr().map_err(bind_err)?;
                    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
                    let inner = bind(settings(b, loopback).proxy_protocol(true), l.protocol)?;
                    listeners.push((addr, l.protocol));
                    pending.push(Pending::Tls {
                        id,
                        public,
                        acceptor,
                        inner,
                    });
                }
            }
        }
        let data_dir = config.resolve(&config.gateway.data_dir);
        let retained_file = data_dir.join("broker-retained.json");
        let sessions_file = data_dir.join("broker-sessions.json");
        let listener_cfgs = pending
            .iter()
            .map(|p| match p {
                Pending::Direct(id, l) | Pending::Tls { id, inner: l, .. } => (*id, l.cfg.clone()),
            })
            .collect();
        let broker = EmbeddedBroker {
            scx,
            local,
            gate,
            listeners,
            pending: Mutex::new(pending),
            tasks: Mutex::new(Vec::new()),
            retained_file,
            sessions_file,
            sys_interval: b.sys_interval,
            started: Instant::now(),
        };
        broker.restore_retained().await;
        sessions::restore(&broker.scx, &broker.sessions_file, &listener_cfgs).await;
        Ok(broker)
    }

    /// Starts serving every listener, and the `$SYS` topics.
    pub async fn open_listeners(&self) -> Result<(), BrokerError> {
        let pending = std::mem::take(&mut *lock(&self.pending));
        let mut server = MqttServer::new(self.scx.clone());
        let mut tasks = Vec::new();
        for p in pending {
            match p {
                Pending::Direct(id, l) => server = server.listener_by_id(l, id),
                Pending::Tls {
                    id,
                    public,
                    acceptor,
                    inner,
                } => {
                    let inner_addr = inner
                        .local_addr()
                        .map_err(|e| BrokerError::Setup(e.to_string()))?;
                    let addr = public
                        .local_addr()
                        .map_err(|e| BrokerError::Setup(e.to_string()))?;
                    public
                        .set_nonblocking(true)
                        .and_then(|()| tokio::net::TcpListener::from_std(public))
                        .map(|public| {
                            tasks.push(tokio::spawn(tls::front(public, acceptor, inner_addr)))
                        })
                        .map_err(|e| BrokerError::Bind {
                            addr,
                            reason: e.to_string(),
                        })?;
                    server = server.listener_by_id(inner, id);
                }
            }
        }
        let server = server.build();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = server.run().await {
                tracing::error!(error = %e, "the broker's listeners stopped");
            }
        }));
        tasks.push(tokio::spawn(sys::publish_every(
            self.sys_source(),
            self.sys_interval,
        )));
        for (addr, protocol) in &self.listeners {
            tracing::info!(%addr, ?protocol, auth = self.gate.access().requires_login(), "listening");
        }
        lock(&self.tasks).extend(tasks);
        Ok(())
    }

    fn sys_source(&self) -> sys::Source {
        sys::Source {
            broker: self.publisher(),
            scx: self.scx.clone(),
            started: self.started,
        }
    }

    /// The addresses actually listened on (port 0 resolved), in config order.
    pub fn listeners(&self) -> &[(SocketAddr, ListenerProtocol)] {
        &self.listeners
    }

    /// Network clients connected right now (the gateway's own in-process
    /// clients are not connections).
    pub fn connections(&self) -> usize {
        usize::try_from(self.scx.connections.count()).unwrap_or(0)
    }

    /// Listeners whose server task has ended although nobody closed them.
    pub fn dead_listeners(&self) -> Vec<SocketAddr> {
        let tasks = lock(&self.tasks);
        if tasks.iter().any(|t| t.is_finished()) {
            self.listeners.iter().map(|(a, _)| *a).collect()
        } else {
            Vec::new()
        }
    }

    /// Puts the users and ACL of `config` (and of its password and ACL
    /// files, read again) in force for every later login, subscription and
    /// publish; connected clients stay. On an error the old ones stay.
    pub fn reload_access(&self, config: &Config) -> Result<(), BrokerError> {
        self.gate.access().reload(config)?;
        Ok(())
    }

    /// Closes every listener, disconnects every client and keeps the
    /// retained messages and persistent sessions for the next start.
    pub async fn shutdown(&self) {
        self.close_listeners();
        {
            let shared = self.scx.extends.shared().await;
            for entry in shared.iter() {
                if let Some(tx) = entry.tx() {
                    let _ = tx.unbounded_send(rmqtt::types::Message::Closed(
                        rmqtt::types::Reason::ConnectKicked(true),
                    ));
                }
            }
        }
        // Each session goes offline on its own task; a persistent one is
        // saved once it has.
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        while self.scx.connections.count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.save_retained().await;
        sessions::save(&self.scx, &self.sessions_file).await;
    }

    /// Closes every listener (no new connections).
    pub fn close_listeners(&self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }

    /// A handle that publishes in-process as client `client_id`.
    pub fn publisher_as(&self, client_id: &str) -> LocalPublisher {
        LocalPublisher {
            scx: self.scx.clone(),
            id: Id::new(self.scx.node.id(), 0, None, None, client_id.into(), None),
        }
    }

    fn publisher(&self) -> LocalPublisher {
        self.publisher_as("edgebridge-publisher")
    }

    /// A new in-process client `client_id` subscribed to `filters`: the
    /// retained messages matching them first, then everything published
    /// on them by anyone else.
    pub async fn subscribe(
        &self,
        client_id: &str,
        filters: &[String],
        durable: Option<Durable>,
    ) -> LocalSubscription {
        // Retained messages go ahead of live ones, as a broker sends them
        // right after the SUBACK; live ones wait in the channel meanwhile.
        let (key, rx) = self.local.add(client_id, filters.to_vec(), durable);
        let mut retained = std::collections::VecDeque::new();
        {
            let store = self.scx.extends.retain().await;
            for f in filters {
                if let Ok(found) = store.get(&f.as_str().into()).await {
                    retained.extend(found.into_iter().map(|(_, r)| {
                        let mut m = local::to_message(&r.publish);
                        m.retain = true;
                        m
                    }));
                }
            }
        }
        LocalSubscription {
            retained,
            rx,
            _guard: SubscriptionGuard {
                key,
                local: self.local.clone(),
            },
        }
    }

    async fn restore_retained(&self) {
        let publisher = self.publisher_as("edgebridge-retained");
        for m in persist::load(&self.retained_file) {
            publisher.publish(m).await;
        }
    }

    async fn save_retained(&self) {
        let all = {
            let store = self.scx.extends.retain().await;
            store.get(&"#".into()).await.unwrap_or_default()
        };
        let messages: Vec<Message> = all
            .into_iter()
            .filter(|(t, _)| !t.starts_with('$'))
            .map(|(_, r)| local::to_message(&r.publish))
            .collect();
        persist::save(&self.retained_file, &messages);
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.close_listeners();
    }
}

/// Retained messages are kept in memory (rmqtt-retainer's `ram` store) and
/// written to `data_dir` at shutdown (`persist.rs`); no count limit, the
/// payload limit is the broker's own.
const RETAINER_CONFIG: &str = r#"
storage.type = "ram"
max_retained_messages = 0
max_payload_size = "16MB"
"#;

/// rmqtt's settings for one listener. Where rmqtt's default differs from
/// what MQTT or Mosquitto does, the value is chosen here (README, "The
/// embedded broker").
fn settings(b: &BrokerConfig, addr: SocketAddr) -> Builder {
    let max_packet = u32::try_from(b.max_payload_size.0)
        .unwrap_or(u32::MAX - PACKET_OVERHEAD)
        .saturating_add(PACKET_OVERHEAD);
    Builder::new()
        .name(format!("edgebridge/{addr}"))
        .laddr(addr)
        .nodelay(true)
        .reuseaddr(Some(true))
        .max_connections(b.max_connections)
        .max_handshaking_limit(b.max_connections.max(1))
        .max_packet_size(max_packet)
        // Every login goes to our hook (hooks.rs), which lets anyone in
        // while there are no users: a reload that adds users applies to
        // the listeners already open.
        .allow_anonymous(false)
        // MQTT allows keep-alive 0 (no keep-alive); Paho's clients use it.
        .allow_zero_keepalive(true)
        .min_keepalive(0)
        .max_keepalive(u16::MAX)
        .max_inflight(NonZeroU16::new(INBOUND_WINDOW).unwrap_or(NonZeroU16::MIN))
        .handshake_timeout(Duration::from_secs(10))
        .max_mqueue_len(b.max_queued_messages)
        .max_clientid_len(MAX_CLIENT_ID_LEN)
        // A persistent session (clean session false, or an MQTT 5 session
        // expiry) outlives its connection; 3.1.1 clients cannot say for how
        // long, so `session_expiry` says it.
        .session_expiry_interval(b.session_expiry)
        .max_session_expiry_interval(Duration::ZERO)
        // No message expiry that the publisher did not ask for.
        .message_expiry_interval(Duration::ZERO)
        // Mosquitto's max_topic_alias default.
        .max_topic_aliases(10)
}

fn bind(settings: Builder, protocol: ListenerProtocol) -> Result<Listener, BrokerError> {
    let addr = settings.laddr;
    let listener = settings.bind().map_err(|e| BrokerError::Bind {
        addr,
        reason: e.to_string(),
    })?;
    match protocol {
        ListenerProtocol::Mqtt | ListenerProtocol::Mqtt5 => listener.tcp(),
        ListenerProtocol::Ws => listener.ws(),
    }
    .map_err(|e| BrokerError::Listener {
        addr,
        reason: e.to_string(),
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere; the data is whole.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Publishes into the broker in-process, as one client id (so that its
/// own in-process subscription does not get its publishes back).
#[derive(Clone)]
pub struct LocalPublisher {
    scx: ServerContext,
    id: Id,
}

impl LocalPublisher {
    /// Routes `msg` to every subscriber (network and in-process), stores
    /// or clears it as retained. Waits while an in-process subscriber is
    /// full (see `local.rs`).
    pub async fn publish(&self, msg: Message) {
        let publish = Publish {
            inner: Box::new(CodecPublish {
                dup: false,
                retain: msg.retain,
                qos: qos(msg.qos),
                topic: msg.topic.into(),
                packet_id: None,
                payload: msg.payload,
                properties: None,
            }),
            target_clientid: None,
            delay_interval: None,
            create_time: Some(rmqtt::utils::timestamp_millis()),
        };
        let from = Origin::from_system(self.id.clone());
        if let Err(e) = SessionState::forwards(&self.scx, from, publish, false, None).await {
            tracing::warn!(error = %e, "the broker did not take an in-process publish");
        }
    }
}

fn qos(q: Qos) -> rmqtt::codec::types::QoS {
    use rmqtt::codec::types::QoS;
    match q {
        Qos::AtMostOnce => QoS::AtMostOnce,
        Qos::AtLeastOnce => QoS::AtLeastOnce,
        Qos::ExactlyOnce => QoS::ExactlyOnce,
    }
}

/// The receiving side of an in-process client.
pub struct LocalSubscription {
    /// Retained messages found when subscribing, delivered first.
    retained: std::collections::VecDeque<Message>,
    rx: mpsc::Receiver<Message>,
    _guard: SubscriptionGuard,
}

impl LocalSubscription {
    /// The next message; `None` once the broker is gone.
    pub async fn recv(&mut self) -> Option<Message> {
        match self.retained.pop_front() {
            Some(m) => Some(m),
            None => self.rx.recv().await,
        }
    }
}

/// Unregisters the subscriber when the subscription is dropped.
struct SubscriptionGuard {
    key: u64,
    local: Arc<local::LocalClients>,
}

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        self.local.remove(self.key);
    }
}
