//! The embedded broker. rumqttd's `Broker::start()` never returns and only
//! logs bind errors, so we build its router and servers ourselves on our
//! runtime: a busy port is a startup error, and shutdown closes listeners.

mod auth;
mod supervisor;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::{v4::V4, v5::V5};
use rumqttd::{
    ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings, TlsConfig,
};
use tokio::task::JoinHandle;

pub use auth::{hash_password, Users};
pub use supervisor::{listener_restarts, note_listener_panic, watch_layer};

use supervisor::{supervise, watch_listener_panics};

use crate::config::{BrokerConfig, Config, ListenerProtocol};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("listener {addr} stopped at startup: {reason}")]
    Listener { addr: SocketAddr, reason: String },
    #[error("listener {addr}: TLS file {path} does not exist")]
    TlsFile { addr: SocketAddr, path: String },
    #[error("cannot open an in-process link to the broker: {0}")]
    Link(String),
}

/// Longest client id accepted on a listener with users (rumqttd itself
/// only bounds it by the packet size). MQTT 3.1.1 requires 23 bytes to
/// work; 256 leaves room for UUIDs and hostnames.
pub const MAX_CLIENT_ID_LEN: usize = 256;

type LinkFactory = dyn Fn(&str, bool) -> Result<(LinkTx, LinkRx), BrokerError> + Send + Sync;

/// Starts one listener's rumqttd server task (captures the router).
type ServerFactory = dyn Fn(ServerSettings, ListenerProtocol) -> JoinHandle<()> + Send + Sync;

/// A running embedded broker.
pub struct EmbeddedBroker {
    links: Arc<LinkFactory>,
    listeners: Vec<(SocketAddr, ListenerProtocol)>,
    servers: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    supervisor: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// What [`EmbeddedBroker::open_listeners`] starts.
    specs: Vec<(ListenerProtocol, ServerSettings)>,
    spawn_server: Arc<ServerFactory>,
}

impl EmbeddedBroker {
    /// Starts the router and checks every listener's address (a busy port
    /// is an error here); the listeners open with
    /// [`EmbeddedBroker::open_listeners`], once the gateway's own clients
    /// (the bridges) are subscribed, so that no LAN message is missed.
    pub async fn start(config: &Config) -> Result<EmbeddedBroker, BrokerError> {
        let b = &config.broker;
        watch_listener_panics();
        let router = Router::new(0, router_config(b));
        // The router runs on its own OS thread for the life of the process
        // (rumqttd has no way to stop it); everything else is ours.
        let router_tx = router.spawn();
        let tx = router_tx.clone();
        let links: Arc<LinkFactory> = Arc::new(move |id: &str, clean: bool| {
            LinkBuilder::new(id, tx.clone())
                .clean_session(clean)
                .build()
                .map(|(t, r, _)| (t, r))
                .map_err(|e| BrokerError::Link(e.to_string()))
        });
        let spawn_server: Arc<ServerFactory> = Arc::new(move |settings, protocol| {
            let tx = router_tx.clone();
            let addr = settings.listen;
            tokio::spawn(async move {
                let result = match protocol {
                    ListenerProtocol::Mqtt => {
                        Server::new(settings, tx, V4).start(LinkType::Remote).await
                    }
                    ListenerProtocol::Mqtt5 => {
                        Server::new(settings, tx, V5).start(LinkType::Remote).await
                    }
                    ListenerProtocol::Ws => {
                        Server::new(settings, tx, V4)
                            .start(LinkType::Websocket)
                            .await
                    }
                };
                if let Err(e) = result {
                    tracing::error!(%addr, error = %e, "listener stopped");
                }
            })
        });
        let users = Users::new(&b.users);
        let mut listeners = Vec::new();
        let mut specs = Vec::new();
        for l in &b.listeners {
            let addr = resolve_port(l.bind)?;
            let tls = match &l.tls {
                None => None,
                Some(t) => {
                    let cert = config.resolve(&t.cert);
                    let key = config.resolve(&t.key);
                    for p in [&cert, &key] {
                        if !p.exists() {
                            return Err(BrokerError::TlsFile {
                                addr,
                                path: p.display().to_string(),
                            });
                        }
                    }
                    Some(TlsConfig::Rustls {
                        capath: None,
                        certpath: cert.display().to_string(),
                        keypath: key.display().to_string(),
                    })
                }
            };
            let mut settings = ServerSettings {
                name: format!("{:?}-{addr}", l.protocol).to_lowercase(),
                listen: addr,
                tls,
                next_connection_delay_ms: 0,
                connections: ConnectionSettings {
                    connection_timeout_ms: 10_000,
                    max_payload_size: b.max_payload_size.0 as usize,
                    max_inflight_count: 100,
                    auth: None,
                    external_auth: None,
                    dynamic_filters: true,
                },
            };
            if !users.is_empty() {
                let users = users.clone();
                settings.set_auth_handler(move |client: String, user, pass| {
                    let users = users.clone();
                    async move {
                        // rumqttd keeps every client id it has seen for the
                        // life of the process; bound what a client can make
                        // it keep.
                        if client.len() > MAX_CLIENT_ID_LEN {
                            tracing::warn!(
                                len = client.len(),
                                max = MAX_CLIENT_ID_LEN,
                                "client id too long: refused"
                            );
                            return false;
                        }
                        users.check(user, pass).await
                    }
                });
            }
            specs.push((l.protocol, settings));
            listeners.push((addr, l.protocol));
        }
        Ok(EmbeddedBroker {
            links,
            listeners,
            servers: Arc::new(std::sync::Mutex::new(Vec::new())),
            supervisor: std::sync::Mutex::new(None),
            specs,
            spawn_server,
        })
    }

    /// Opens every listener; returns once all listen. Then a supervisor
    /// keeps them open (see `supervisor.rs`).
    pub async fn open_listeners(&self) -> Result<(), BrokerError> {
        let servers: Vec<JoinHandle<()>> = self
            .specs
            .iter()
            .map(|(protocol, settings)| (self.spawn_server)(settings.clone(), *protocol))
            .collect();
        // All listeners start at once; waiting for them one after the other
        // here costs the slowest, not the sum (start-to-ready, issue 8).
        for ((addr, protocol), task) in self.listeners.iter().zip(&servers) {
            if let Err(e) = wait_listening(*addr, task).await {
                for s in &servers {
                    s.abort();
                }
                return Err(e);
            }
            let auth = self
                .specs
                .iter()
                .any(|(_, s)| s.listen == *addr && s.connections.external_auth.is_some());
            tracing::info!(%addr, ?protocol, auth, "listening");
        }
        *self.servers.lock().unwrap_or_else(|e| e.into_inner()) = servers;
        let supervisor = tokio::spawn(supervise(
            self.servers.clone(),
            self.specs.clone(),
            self.spawn_server.clone(),
        ));
        *self.supervisor.lock().unwrap_or_else(|e| e.into_inner()) = Some(supervisor);
        Ok(())
    }

    /// The addresses actually listened on (port 0 resolved), in config order.
    pub fn listeners(&self) -> &[(SocketAddr, ListenerProtocol)] {
        &self.listeners
    }

    /// An in-process client link (no TCP, no auth).
    pub fn link(&self, client_id: &str, clean: bool) -> Result<(LinkTx, LinkRx), BrokerError> {
        (self.links)(client_id, clean)
    }

    /// Client connections open on the listeners right now. rumqttd does not
    /// count them for us (its meters need its own `start()`), so this asks
    /// the kernel's socket table.
    pub fn connections(&self) -> usize {
        let ports: Vec<u16> = self.listeners.iter().map(|(a, _)| a.port()).collect();
        established_on(&ports)
    }

    /// Listeners whose server task has ended although nobody closed them.
    pub fn dead_listeners(&self) -> Vec<SocketAddr> {
        let servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        servers
            .iter()
            .zip(&self.listeners)
            .filter(|(s, _)| s.is_finished())
            .map(|(_, (addr, _))| *addr)
            .collect()
    }

    /// Closes every listener. Connected clients' tasks end with the runtime.
    pub fn close_listeners(&self) {
        if let Some(s) = self
            .supervisor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            s.abort();
        }
        // A poisoned lock only means a panic elsewhere; the handles are fine.
        let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        for s in servers.drain(..) {
            s.abort();
        }
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.close_listeners();
    }
}

fn router_config(b: &BrokerConfig) -> RouterConfig {
    RouterConfig {
        max_connections: b.max_connections,
        max_outgoing_packet_count: 1024,
        // Each filter with traffic keeps up to size x count bytes of
        // topic + payload in memory even after delivery (see crates.md),
        // and about five times that in real memory for small messages
        // (the publish structs and their allocations): 4 x 1 MiB held
        // ~20 MiB with 100 Modbus devices (BENCHMARKS.md). 4 x 256 KiB
        // still lets a TCP subscriber lag ~15 000 small messages.
        max_segment_size: 256 << 10,
        max_segment_count: 4,
        ..Default::default()
    }
}

/// Binds once to find a busy port early (with a clear error) and to turn
/// port 0 into a concrete free port that rumqttd then binds.
fn resolve_port(addr: SocketAddr) -> Result<SocketAddr, BrokerError> {
    let l = StdListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?;
    l.local_addr()
        .map_err(|source| BrokerError::Bind { addr, source })
}

/// rumqttd gives no readiness signal, and probing by binding or connecting
/// would race with it or open a connection; the kernel's socket table
/// tells without side effects when the port is in LISTEN state.
async fn wait_listening(addr: SocketAddr, task: &JoinHandle<()>) -> Result<(), BrokerError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // A server task just spawned from this worker waits in its queue
        // behind us: let it bind before reading the (slow) socket table.
        tokio::task::yield_now().await;
        if task.is_finished() {
            return Err(BrokerError::Listener {
                addr,
                reason: "see the log line above".into(),
            });
        }
        if is_listening(addr) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BrokerError::Listener {
                addr,
                reason: "did not start listening within 5s".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Established TCP connections whose local port is one of `ports`
/// (Linux `/proc/net/tcp{,6}`): the clients of the embedded broker.
fn established_on(ports: &[u16]) -> usize {
    const ESTABLISHED: &str = "01";
    let suffixes: Vec<String> = ports.iter().map(|p| format!(":{p:04X}")).collect();
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .map(|table| {
            table
                .lines()
                .skip(1)
                .filter(|line| {
                    let mut cols = line.split_whitespace();
                    let local = cols.nth(1).unwrap_or_default();
                    let state = cols.nth(1).unwrap_or_default();
                    state == ESTABLISHED && suffixes.iter().any(|s| local.ends_with(s.as_str()))
                })
                .count()
        })
        .sum()
}

/// Is some socket listening on `addr`'s port? (Linux `/proc/net/tcp{,6}`.)
fn is_listening(addr: SocketAddr) -> bool {
    const LISTEN: &str = "0A";
    let port = format!(":{:04X}", addr.port());
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f).is_ok_and(|table| {
            table.lines().skip(1).any(|line| {
                let mut cols = line.split_whitespace();
                let local = cols.nth(1).unwrap_or_default();
                let state = cols.nth(1).unwrap_or_default();
                local.ends_with(&port) && state == LISTEN
            })
        })
    })
}
