//! Helpers shared by the integration tests: free ports, a gateway started
//! in-process from YAML, an MQTT client that collects what it receives,
//! and the real binary as a child process.
#![allow(dead_code)]

pub mod modbus_sim;
pub mod onenet_standin;
pub mod pty;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use edgebridge::config::{Config, ListenerProtocol};
use edgebridge::gateway::Gateway;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

pub mod mosquitto;

/// A port that was free a moment ago (for processes that need a number).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// Parses a config from YAML text with the test's environment.
pub fn config(yaml: &str) -> Config {
    match Config::from_text(Path::new("test.yaml"), yaml, |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => panic!("test config does not load:\n{e}"),
    }
}

/// A config body with an embedded broker on port 0 (MQTT 3.1.1 + 5) and
/// `rest` appended (devices, mappings...).
pub fn yaml_with_broker(rest: &str) -> String {
    format!(
        "gateway: {{ id: test-gw, data_dir: {data} }}\nbroker:\n  listeners:\n    - {{ bind: \"127.0.0.1:0\", protocol: mqtt }}\n    - {{ bind: \"127.0.0.1:0\", protocol: mqtt5 }}\n{rest}",
        data = fresh_data_dir().display()
    )
}

/// A data folder of its own for each test (each runs on its own thread;
/// the same for every config one test makes, so that a reload sees the
/// same `data_dir`): gateways running side by side never read each other's
/// saved state.
pub fn fresh_data_dir() -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    thread_local! {
        static DIR: std::path::PathBuf = {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            std::env::temp_dir().join(format!("edgebridge-test-{}-{n}", std::process::id()))
        };
    }
    DIR.with(|d| d.clone())
}

/// Starts a gateway in this process.
pub async fn start(yaml: &str) -> Gateway {
    Gateway::start(config(yaml)).await.expect("gateway starts")
}

pub fn mqtt_addr(gw: &Gateway) -> SocketAddr {
    gw.listener(ListenerProtocol::Mqtt)
        .expect("an mqtt listener")
}

/// A received message.
#[derive(Debug, Clone)]
pub struct Got {
    pub topic: String,
    pub payload: String,
    pub qos: QoS,
    pub retain: bool,
}

/// An MQTT 3.1.1 client (rumqttc over TCP) that collects messages.
pub struct Client {
    pub client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Got>,
    /// Received but not yet asked for, in arrival order.
    backlog: Vec<Got>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    /// Connects and subscribes to `filters` at QoS 1; returns once the
    /// broker acknowledged the subscriptions.
    pub async fn connect(addr: SocketAddr, id: &str, filters: &[&str]) -> Client {
        Client::connect_with(addr, id, filters, None)
            .await
            .expect("connects")
    }

    pub async fn connect_with(
        addr: SocketAddr,
        id: &str,
        filters: &[&str],
        login: Option<(&str, &str)>,
    ) -> Result<Client, String> {
        let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(5));
        if let Some((u, p)) = login {
            o.set_credentials(u, p);
        }
        let (client, mut eventloop) = AsyncClient::new(o, 100);
        // Wait for CONNACK before handing the client out.
        loop {
            match tokio::time::timeout(Duration::from_secs(5), eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err("no CONNACK within 5s".into()),
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let mut pending = filters.len();
        for f in filters {
            client
                .subscribe(*f, QoS::AtLeastOnce)
                .await
                .map_err(|e| e.to_string())?;
        }
        while pending > 0 {
            match tokio::time::timeout(Duration::from_secs(5), eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => pending -= 1,
                // Retained messages arrive between the SUBACKs.
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    let _ = tx.send(got(&p));
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err("no SUBACK within 5s".into()),
            }
        }
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send(got(&p)).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        Ok(Client {
            client,
            rx,
            backlog: Vec::new(),
            task,
        })
    }

    /// The next message on `topic` within `within`.
    pub async fn expect(&mut self, topic: &str, within: Duration) -> Got {
        self.expect_where(within, |g| g.topic == topic)
            .await
            .unwrap_or_else(|| panic!("no message on {topic} within {within:?}"))
    }

    /// The first message (received earlier or within `within`) that
    /// satisfies `pred`; others stay for later calls.
    pub async fn expect_where(
        &mut self,
        within: Duration,
        pred: impl Fn(&Got) -> bool,
    ) -> Option<Got> {
        if let Some(i) = self.backlog.iter().position(&pred) {
            return Some(self.backlog.remove(i));
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(g)) if pred(&g) => return Some(g),
                Ok(Some(g)) => self.backlog.push(g),
                _ => return None,
            }
        }
    }

    /// Everything received so far that satisfies `pred`, waiting `settle`
    /// for more; removes them.
    pub async fn drain_where(&mut self, settle: Duration, pred: impl Fn(&Got) -> bool) -> Vec<Got> {
        let deadline = tokio::time::Instant::now() + settle;
        while let Ok(Some(g)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            self.backlog.push(g);
        }
        let (hit, keep): (Vec<Got>, Vec<Got>) = self.backlog.drain(..).partition(|g| pred(g));
        self.backlog = keep;
        hit
    }
}

fn got(p: &rumqttc::Publish) -> Got {
    Got {
        topic: p.topic.clone(),
        payload: String::from_utf8_lossy(&p.payload).into_owned(),
        qos: p.qos,
        retain: p.retain,
    }
}

/// The real binary, killed when dropped.
pub struct Binary {
    pub child: Child,
    pub stderr_path: PathBuf,
}

impl Binary {
    /// Runs `edgebridge <args>` with stderr captured to a file.
    pub fn spawn(args: &[&str], dir: &Path) -> Binary {
        let stderr_path = dir.join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let child = Command::new(env!("CARGO_BIN_EXE_edgebridge"))
            .args(args)
            .current_dir(dir)
            .env("EDGEBRIDGE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("edgebridge binary starts");
        Binary { child, stderr_path }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends a signal (`libc`-free: through the `kill` command).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{sig} failed");
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub async fn wait_port(addr: SocketAddr, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{addr} never opened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A raw MQTT packet: fixed header byte, remaining length, body (for tests
/// that assert exactly what goes over TCP).
pub fn packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![header];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        p.push(b);
        if n == 0 {
            break;
        }
    }
    p.extend_from_slice(body);
    p
}

/// A raw MQTT 3.1.1 connection to `addr` as `client_id` (clean session),
/// past its CONNACK: for tests that need nothing between a broker's answer
/// and what they do next (a kill right after a PUBACK).
pub async fn raw_connect(addr: SocketAddr, client_id: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let id = client_id.as_bytes();
    let mut connect = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    connect.extend_from_slice(&(id.len() as u16).to_be_bytes());
    connect.extend_from_slice(id);
    s.write_all(&packet(0x10, &connect)).await.expect("CONNECT");
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).await.expect("CONNACK");
    assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK");
    s
}
