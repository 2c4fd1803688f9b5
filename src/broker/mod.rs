//! The embedded broker. rumqttd's `Broker::start()` never returns and only
//! logs bind errors, so we build its router and servers ourselves on our
//! runtime: a busy port is a startup error, and shutdown closes listeners.

mod auth;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::{v4::V4, v5::V5};
use rumqttd::{
    ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings, TlsConfig,
};
use tokio::task::JoinHandle;

pub use auth::{hash_password, Users};

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
    supervisor: JoinHandle<()>,
}

impl EmbeddedBroker {
    /// Starts the router and every listener; returns once all listen.
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
        let mut servers = Vec::new();
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
            let task = spawn_server(settings.clone(), l.protocol);
            specs.push(settings);
            listeners.push((addr, l.protocol));
            servers.push(task);
        }
        // All listeners start at once; waiting for them one after the other
        // here costs the slowest, not the sum (start-to-ready, issue 8).
        for ((addr, protocol), task) in listeners.iter().zip(&servers) {
            if let Err(e) = wait_listening(*addr, task).await {
                for s in &servers {
                    s.abort();
                }
                return Err(e);
            }
            tracing::info!(%addr, ?protocol, auth = !users.is_empty(), "listening");
        }
        let servers = Arc::new(std::sync::Mutex::new(servers));
        let supervisor = tokio::spawn(supervise(
            servers.clone(),
            listeners.iter().map(|(_, p)| *p).zip(specs).collect(),
            spawn_server,
        ));
        Ok(EmbeddedBroker {
            links,
            listeners,
            servers,
            supervisor,
        })
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
        self.supervisor.abort();
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

/// Panics inside rumqttd's connection handling (`server/broker.rs`) seen
/// by the panic hook. rumqttd 0.20 can panic there while holding a
/// listener's will-handler mutex under fast client reconnects (rumqtt issue
/// #1062); the poisoned mutex then makes every later CONNECT on that
/// listener panic too. Restarting the listener's server gives it a fresh
/// mutex; connected clients are not affected.
static LISTENER_PANICS: AtomicU64 = AtomicU64::new(0);
/// Times the supervisor restarted the listeners.
static LISTENER_RESTARTS: AtomicU64 = AtomicU64::new(0);

/// How often the listeners were restarted after a rumqttd panic.
pub fn listener_restarts() -> u64 {
    LISTENER_RESTARTS.load(Ordering::Relaxed)
}

/// Is a panic at `file` one in rumqttd's per-connection server code?
fn is_listener_panic(file: &str) -> bool {
    file.contains("rumqttd") && file.replace('\\', "/").ends_with("server/broker.rs")
}

/// Counts a listener panic; the supervisor restarts the listeners.
pub fn note_listener_panic() {
    LISTENER_PANICS.fetch_add(1, Ordering::Relaxed);
}

/// Installs (once per process) a panic hook that notes rumqttd listener
/// panics and then reports the panic as before.
fn watch_listener_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.location().is_some_and(|l| is_listener_panic(l.file())) {
                note_listener_panic();
            }
            previous(info);
        }));
    });
}

/// Restarts every listener after a noted rumqttd panic, at most once a
/// second, so that a poisoned listener never locks LAN clients out.
async fn supervise(
    servers: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    specs: Vec<(ListenerProtocol, ServerSettings)>,
    spawn_server: Arc<ServerFactory>,
) {
    let mut seen = LISTENER_PANICS.load(Ordering::Relaxed);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = LISTENER_PANICS.load(Ordering::Relaxed);
        if now == seen {
            continue;
        }
        seen = now;
        tracing::warn!(
            panics = now,
            "a connection task panicked inside rumqttd (known rumqttd 0.20 bug, rumqtt#1062); \
             restarting the broker's listeners so new clients can connect"
        );
        crate::ops::metrics::broker_listener_restart();
        let old: Vec<JoinHandle<()>> = {
            let mut s = servers.lock().unwrap_or_else(|e| e.into_inner());
            s.drain(..).collect()
        };
        for task in old {
            task.abort();
            let _ = task.await;
        }
        let mut fresh = Vec::new();
        for (protocol, settings) in &specs {
            let addr = settings.listen;
            let task = spawn_server(settings.clone(), *protocol);
            if let Err(e) = wait_listening(addr, &task).await {
                tracing::error!(%addr, error = %e, "listener did not come back");
            }
            fresh.push(task);
        }
        *servers.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
        LISTENER_RESTARTS.fetch_add(1, Ordering::Relaxed);
    }
}

fn router_config(b: &BrokerConfig) -> RouterConfig {
    RouterConfig {
        max_connections: b.max_connections,
        max_outgoing_packet_count: 200,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_rumqttd_server_panics_restart_listeners() {
        assert!(is_listener_panic(
            "/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/rumqttd-0.20.0/src/server/broker.rs"
        ));
        assert!(is_listener_panic(
            r"C:\cargo\rumqttd-0.20.0\src\server\broker.rs"
        ));
        assert!(!is_listener_panic(
            "/root/.cargo/registry/src/x/rumqttd-0.20.0/src/protocol/v5/mod.rs"
        ));
        assert!(!is_listener_panic("src/broker/mod.rs"));
    }
}
