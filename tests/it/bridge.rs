//! Cloud bridges against a real Mosquitto (`.ci/run` runs these).

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use edgebridge::bridge::mqtt::{
    client_config, remote_client, Endpoint, RemoteEvent, RemoteOptions,
};
use edgebridge::bridge::{Bridge, BridgeSpec, BridgeStatus, LocalLink};
use edgebridge::config::{Config, MqttProtocol};
use edgebridge::model::Message;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::support::mosquitto::{Mosquitto, Security};

const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- helpers

/// The bridge's local side for these tests: messages the test pushes play
/// the local bus; what the bridge publishes locally is collected. With
/// `echo`, local publishes matching `echo` come back like a broker would
/// deliver them to the bridge's own subscription.
struct TestLink {
    rx: mpsc::Receiver<Message>,
    out: mpsc::UnboundedSender<Message>,
    loopback: Option<(String, mpsc::Sender<Message>)>,
}

impl LocalLink for TestLink {
    async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }

    async fn publish(&mut self, m: Message) -> Result<(), String> {
        if let Some((filter, tx)) = &self.loopback {
            if edgebridge::topic::matches(filter, &m.topic) {
                tx.send(m.clone()).await.map_err(|e| e.to_string())?;
            }
        }
        self.out.send(m).map_err(|e| e.to_string())
    }

    fn echoes_own_publishes(&self) -> bool {
        self.loopback.is_some()
    }
}

struct Running {
    local: mpsc::Sender<Message>,
    published: mpsc::UnboundedReceiver<Message>,
    status: watch::Receiver<BridgeStatus>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _data: Option<tempfile::TempDir>,
}

impl Running {
    async fn wait_status(&mut self, what: &str, f: impl Fn(&BridgeStatus) -> bool) -> BridgeStatus {
        let r = tokio::time::timeout(WAIT, self.status.wait_for(|s| f(s)))
            .await
            .map(|r| r.map(|s| s.clone()));
        match r {
            Ok(Ok(s)) => s,
            _ => panic!(
                "timed out waiting for {what}; status {:?}",
                *self.status.borrow()
            ),
        }
    }

    async fn publish(&self, topic: &str, payload: impl Into<Bytes>) {
        self.local
            .send(Message::new(topic, payload.into()))
            .await
            .expect("bridge is running");
    }

    /// The next locally published message that is not a status update.
    async fn next_downlink(&mut self) -> Message {
        loop {
            let m = tokio::time::timeout(WAIT, self.published.recv())
                .await
                .expect("timed out waiting for a downlink message")
                .expect("bridge ended");
            if !m.topic.starts_with("edgebridge/") {
                return m;
            }
        }
    }

    async fn stop(self) -> tempfile::TempDir {
        self.shutdown.cancel();
        self.task.await.expect("bridge task panicked");
        self._data.expect("data dir")
    }
}

fn config(bridge_yaml: &str, data_dir: &Path) -> Config {
    let text = format!(
        "gateway: {{ id: gw-it, data_dir: {} }}\nbridges:\n{bridge_yaml}",
        data_dir.display()
    );
    Config::from_text(Path::new("it.yaml"), &text, |_| None).unwrap_or_else(|e| panic!("{e}"))
}

fn start_bridge(bridge_yaml: &str, data: tempfile::TempDir, echo: Option<&str>) -> Running {
    let config = config(bridge_yaml, data.path());
    let spec =
        BridgeSpec::from_config(&config.bridges[0], &config).unwrap_or_else(|e| panic!("{e}"));
    let bridge = Bridge::open(spec).unwrap_or_else(|e| panic!("{e}"));
    let status = bridge.status();
    let (local, rx) = mpsc::channel(20_000);
    let (out, published) = mpsc::unbounded_channel();
    let link = TestLink {
        rx,
        out,
        loopback: echo.map(|f| (f.to_string(), local.clone())),
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(bridge.run(link, shutdown.clone()));
    Running {
        local,
        published,
        status,
        shutdown,
        task,
        _data: Some(data),
    }
}

/// A subscriber on the remote broker: (topic, payload) of every message.
/// It keeps reconnecting (its session persists when `clean` is false).
async fn remote_subscriber(
    port: u16,
    id: &str,
    filter: &str,
    clean: bool,
) -> (AsyncClient, mpsc::UnboundedReceiver<(String, Bytes)>) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_clean_session(clean)
        .set_keep_alive(Duration::from_secs(5))
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    let sub = client.clone();
    let filter = filter.to_string();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(c))) if !c.session_present => {
                    let _ = sub.try_subscribe(filter.clone(), QoS::ExactlyOnce);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready_tx.take() {
                        let _ = r.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send((p.topic.clone(), p.payload.clone())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(WAIT, ready_rx)
        .await
        .expect("remote subscriber did not get SUBACK")
        .expect("subscriber ended");
    (client, rx)
}

/// The number a test published as the payload.
fn seq_of(payload: &Bytes) -> usize {
    std::str::from_utf8(payload).unwrap().parse().unwrap()
}

/// Reads the remote subscriber until every number in `0..n` has arrived
/// (after those in `already` read), and asserts that each arrived the first
/// time in order; repeats (at least once) are allowed.
async fn expect_every_number_in_order(
    seen: &mut mpsc::UnboundedReceiver<(String, Bytes)>,
    n: usize,
    already: &[usize],
) {
    let mut got = Vec::with_capacity(n);
    let mut set = std::collections::HashSet::new();
    for &i in already {
        if set.insert(i) {
            got.push(i);
        }
    }
    while set.len() < n {
        let i = seq_of(&next_remote(seen).await.1);
        if set.insert(i) {
            got.push(i);
        }
    }
    assert!(got.iter().copied().eq(0..n), "not in order");
}

async fn next_remote(rx: &mut mpsc::UnboundedReceiver<(String, Bytes)>) -> (String, Bytes) {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("timed out waiting for a message on the remote broker")
        .expect("subscriber ended")
}

fn options(url: &str, tls: Option<rustls::ClientConfig>) -> RemoteOptions {
    RemoteOptions {
        protocol: MqttProtocol::Mqtt,
        endpoint: Endpoint::parse(url).unwrap(),
        client_id: "it-bridge".into(),
        username: None,
        password: None,
        keep_alive: Duration::from_secs(5),
        clean_session: true,
        will: None,
        tls: tls.map(std::sync::Arc::new),
        max_packet_size: 1 << 20,
        max_inflight: 10,
    }
}

/// Polls until CONNACK or the first error.
async fn first_connect(opts: &RemoteOptions) -> Result<bool, String> {
    let (_sender, mut client) = remote_client(opts);
    let r = tokio::time::timeout(Duration::from_secs(10), client.poll())
        .await
        .map_err(|_| "no answer within 10s".to_string())?;
    match r {
        Ok(RemoteEvent::Connected { session_present }) => Ok(session_present),
        Ok(other) => Err(format!("unexpected first event {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

fn tls(ca: &Path, client: Option<(&PathBuf, &PathBuf)>) -> rustls::ClientConfig {
    client_config(Some(ca), client.map(|(c, k)| (c.as_path(), k.as_path()))).unwrap()
}

fn data_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

// ------------------------------------------------------------------ tests

#[tokio::test]
#[ignore = "needs mosquitto: run by .ci/run"]
async fn tls_connects_with_the_right_ca_and_fails_clearly_with_a_wrong_one() {
    let m = Mosquitto::start(Security::Tls);
    let certs = m.certs().unwrap().clone();
    first_connect(&options(&m.url(), Some(tls(&certs.ca, None))))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", m.log()));
    let err = first_connect(&options(&m.url(), Some(tls(&certs.wrong_ca, None))))
        .await
        .unwrap_err();
    assert!(
        err.contains("invalid peer certificate") && err.contains("UnknownIssuer"),
        "{err}"
    );
}

#[tokio::test]
#[ignore = "needs mosquitto: run by .ci/run"]
async fn mutual_tls_needs_the_client_certificate() {
    let m = Mosquitto::start(Security::MutualTls);
    let c = m.certs().unwrap().clone();
    first_connect(&options(
        &m.url(),
        Some(tls(&c.ca, Some((&c.client_cert, &c.client_key)))),
    ))
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", m.log()));
    assert!(first_connect(&options(&m.url(), Some(tls(&c.ca, None))))
        .await
        .is_err());
}

/// Uplink and downlink through Mosquitto, MQTT 3.1.1 and 5, QoS 0, 1, 2.
#[tokio::test]
#[ignore = "needs mosquitto: run by .ci/run"]
async fn uplink_and_downlink_both_protocols_every_qos() {
    let m = Mosquitto::start(Security::Plain);
    let (remote, mut seen) = remote_subscriber(m.port(), "it-cloud-app", "site/#", true).await;
    for protocol in ["mqtt", "mqtt5"] {
        for qos in 0..=2u8 {
            let yaml = format!(
                "  - name: cloud\n    url: {}\n    protocol: {protocol}\n    client_id: gw-{protocol}-{qos}\n    \
                 forward: [ {{ topics: \"PV/#\", remote_prefix: \"site/gw/\", qos: {qos} }} ]\n    \
                 subscribe: [ {{ topics: \"cmd/#\", remote_prefix: \"down/gw/\", qos: {qos} }} ]\n",
                m.url()
            );
            // Retained, so the bridge gets it whenever its SUBSCRIBE lands.
            let cmd = format!("on-{protocol}-{qos}");
            remote
                .publish("down/gw/cmd/led", QoS::AtLeastOnce, true, cmd.clone())
                .await
                .unwrap();
            let mut b = start_bridge(&yaml, data_dir(), None);
            b.wait_status("connected", |s| s.connected).await;
            let payload = format!("{protocol}-{qos}");
            b.publish("PV/data", payload.clone()).await;
            let (topic, body) = next_remote(&mut seen).await;
            assert_eq!(
                (topic.as_str(), body.as_ref()),
                ("site/gw/PV/data", payload.as_bytes())
            );

            let down = b.next_downlink().await;
            assert_eq!(down.topic, "cmd/led", "prefix stripped");
            assert_eq!(down.payload, Bytes::from(cmd));
            let s = b
                .wait_status("forwarded", |s| s.forwarded == 1 && s.queue_depth == 0)
                .await;
            assert_eq!(s.received, 1);
            b.stop().await;
        }
    }
}

/// A command that came down from the cloud is published locally; the
/// bridge's own forward filter matches it, but it is not sent back up.
#[tokio::test]
#[ignore = "needs mosquitto: run by .ci/run"]
async fn loop_guard_does_not_send_downlink_back() {
    let m = Mosquitto::start(Security::Plain);
    let (remote, mut seen) = remote_subscriber(m.port(), "it-cloud-app", "site/#", true).await;
    let yaml = format!(
        "  - name: cloud\n    url: {}\n    \
         forward: [ {{ topics: \"cmd/#\", remote_prefix: \"site/\", qos: 1 }} ]\n    \
         subscribe: [ {{ topics: \"cmd/#\", remote_prefix: \"site/\", qos: 1 }} ]\n",
        m.url()
    );
    let mut b = start_bridge(&yaml, data_dir(), Some("cmd/#"));
    b.wait_status("connected", |s| s.connected).await;
    // Wait until the bridge's SUBSCRIBE is in: a retained probe comes down.
    remote
        .publish("site/cmd/probe", QoS::AtLeastOnce, true, "p")
        .await
        .unwrap();
    assert_eq!(b.next_downlink().await.topic, "cmd/probe");
    let (t, _) = next_remote(&mut seen).await;
    assert_eq!(t, "site/cmd/probe", "the cloud app sees its own probe");

    remote
        .publish("site/cmd/led", QoS::AtLeastOnce, false, "on")
        .await
        .unwrap();
    assert_eq!(
        next_remote(&mut seen).await.0,
        "site/cmd/led",
        "the cloud app's own publish"
    );
    assert_eq!(b.next_downlink().await.topic, "cmd/led");
    // A local message after it: order is kept, so an echo would come first.
    b.publish("cmd/marker", "m").await;
    let (t, _) = next_remote(&mut seen).await;
    assert_eq!(
        t, "site/cmd/marker",
        "the downlinked command was forwarded back"
    );
    b.stop().await;
}

/// Mosquitto down, 10 000 numbered messages published locally, Mosquitto
/// up again: all arrive, in order.
#[tokio::test]
#[ignore = "needs mosquitto: run by .ci/run"]
async fn outage_with_10000_messages_loses_nothing_and_keeps_order() {
    let mut m = Mosquitto::start(Security::Plain);
    let (_remote, mut seen) = remote_subscriber(m.port(), "it-cloud-app", "site/#", false).await;
    let yaml = format!(
        "  - name: cloud\n    url: {}\n    reconnect: {{ min: 100ms, max: 500ms }}\n    \
         forward: [ {{ topics: \"PV/#\", remote_prefix: \"site/\", qos: 1 }} ]\n",
        m.url()
    );
    let mut b = start_bridge(&yaml, data_dir(), None);
    b.wait_status("connected", |s| s.connected).await;
    m.stop();
    b.wait_status("disconnected", |s| !s.connected).await;
    const N: usize = 10_000;
    for i in 0..N {
        b.publish("PV/seq", i.to_string()).await;
    }
    b.wait_status("all queued", |s| s.queue_depth == N as u64)
        .await;
    m.restart();
    expect_every_number_in_order(&mut seen, N, &[]).await;
    let s = b.wait_status("drained", |s| s.queue_depth == 0).await;
    assert_eq!(s.forwarded, N as u64);
    b.stop().await;
}

/// With `queue.write_behind`, messages sent before they are written still
/// survive an outage that starts mid-stream: the connection loss writes
/// what is unacknowledged, and after the reconnect everything arrives, in
/// order; afterwards the queue file is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto: run by .ci/run"]
async fn write_behind_loses_nothing_when_the_uplink_breaks_mid_stream() {
    let mut m = Mosquitto::start(Security::Plain);
    let (_remote, mut seen) = remote_subscriber(m.port(), "it-cloud-app", "site/#", false).await;
    let yaml = format!(
        "  - name: cloud\n    url: {}\n    reconnect: {{ min: 100ms, max: 500ms }}\n    \
         queue: {{ write_behind: 50ms }}\n    \
         forward: [ {{ topics: \"PV/#\", remote_prefix: \"site/\", qos: 1 }} ]\n",
        m.url()
    );
    let mut b = start_bridge(&yaml, data_dir(), None);
    b.wait_status("connected", |s| s.connected).await;
    const N: usize = 4_000;
    let mut first = Vec::new();
    for i in 0..N {
        b.publish("PV/seq", i.to_string()).await;
        if i == N / 2 {
            // Some of the first half have arrived: the uplink is live.
            first.push(seq_of(&next_remote(&mut seen).await.1));
            m.stop();
        }
    }
    b.wait_status("disconnected", |s| !s.connected).await;
    m.restart();
    expect_every_number_in_order(&mut seen, N, &first).await;
    b.wait_status("drained", |s| s.queue_depth == 0).await;
    let dir = b.stop().await;
    let (q, _) = edgebridge::bridge::queue::Queue::open(
        dir.path(),
        "cloud",
        edgebridge::bridge::queue::QueueLimits {
            max_bytes: 1 << 20,
            max_age: None,
        },
    )
    .unwrap();
    assert_eq!(q.stats().depth, 0, "acknowledged rows were deleted");
}

/// QoS 0 skips the durable queue only while nothing waits ahead of it:
/// live, queued during an outage, and live again while that backlog drains,
/// each QoS keeps its order and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto: run by .ci/run"]
async fn qos0_and_qos1_keep_their_order_live_queued_and_while_draining() {
    const N: u32 = 1000;
    let mut m = Mosquitto::start(Security::Plain);
    let yaml = format!(
        "  - name: cloud\n    url: {}\n    reconnect: {{ min: 1s, max: 1s }}\n    \
         forward: [ {{ topics: \"fast/#\", remote_prefix: \"site/\", qos: 0 }}, \
         {{ topics: \"slow/#\", remote_prefix: \"site/\", qos: 1 }} ]\n",
        m.url()
    );
    let mut b = start_bridge(&yaml, data_dir(), None);
    let (_remote, mut seen) = remote_subscriber(m.port(), "it-mixed-1", "site/#", true).await;
    b.wait_status("connected", |s| s.connected).await;
    let publish_range = |b: &Running, from: u32, to: u32| {
        let local = b.local.clone();
        async move {
            for i in from..to {
                let (topic, payload) = if i % 2 == 0 {
                    ("fast/x", format!("{i}"))
                } else {
                    ("slow/x", format!("{i}"))
                };
                local
                    .send(Message::new(topic, Bytes::from(payload)))
                    .await
                    .unwrap();
            }
        }
    };
    // Live: QoS 0 goes past the queue.
    publish_range(&b, 0, N).await;
    let mut streams = Streams::default();
    while streams.count() < N as usize {
        streams.add(next_remote(&mut seen).await);
    }
    streams.assert_in_order(0..N);

    // Outage: everything is queued.
    m.stop();
    b.wait_status("disconnected", |s| !s.connected).await;
    publish_range(&b, N, 2 * N).await;
    b.wait_status("all queued", |s| s.queue_depth == N as u64)
        .await;
    m.restart();
    let (_remote, mut seen) = remote_subscriber(m.port(), "it-mixed-2", "site/#", true).await;
    // Live again, one message a millisecond, while the bridge reconnects
    // (within a second) and drains: new QoS 0 must not overtake the backlog.
    let live = tokio::spawn({
        let local = b.local.clone();
        async move {
            for i in 2 * N..3 * N {
                let topic = if i % 2 == 0 { "fast/x" } else { "slow/x" };
                local
                    .send(Message::new(topic, Bytes::from(format!("{i}"))))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });
    let mut streams = Streams::default();
    while streams.count() < 2 * N as usize {
        streams.add(next_remote(&mut seen).await);
    }
    live.await.unwrap();
    streams.assert_in_order(N..3 * N);
    b.wait_status("drained", |s| s.queue_depth == 0).await;
    b.stop().await;
}

/// What a remote subscriber saw of the `fast` (QoS 0) and `slow` (QoS 1)
/// streams, duplicates (QoS 1 redelivery) removed.
#[derive(Default)]
struct Streams {
    fast: Vec<u32>,
    slow: Vec<u32>,
}

impl Streams {
    fn add(&mut self, (topic, payload): (String, Bytes)) {
        let i: u32 = std::str::from_utf8(&payload).unwrap().parse().unwrap();
        let stream = match topic.as_str() {
            "site/fast/x" => &mut self.fast,
            "site/slow/x" => &mut self.slow,
            other => panic!("unexpected topic {other}"),
        };
        if !stream.contains(&i) {
            stream.push(i);
        }
    }

    fn count(&self) -> usize {
        self.fast.len() + self.slow.len()
    }

    fn assert_in_order(&self, range: std::ops::Range<u32>) {
        let fast: Vec<u32> = range.clone().filter(|i| i % 2 == 0).collect();
        let slow: Vec<u32> = range.filter(|i| i % 2 == 1).collect();
        assert_eq!(self.fast, fast, "QoS 0 stream out of order or incomplete");
        assert_eq!(self.slow, slow, "QoS 1 stream out of order or incomplete");
    }
}

/// A small `max_bytes`: the oldest are dropped and counted, the newest
/// arrive.
#[tokio::test]
#[ignore = "needs mosquitto: run by .ci/run"]
async fn small_queue_drops_the_oldest_and_reports_how_many() {
    let mut m = Mosquitto::start(Security::Plain);
    let (_remote, mut seen) = remote_subscriber(m.port(), "it-cloud-app", "site/#", false).await;
    m.stop();
    // Each message counts its remote topic (12) + payload (3) + 32 bytes: 47;
    // room for 20.
    let yaml = format!(
        "  - name: cloud\n    url: {}\n    reconnect: {{ min: 100ms, max: 300ms }}\n    \
         queue: {{ max_bytes: 940 }}\n    \
         forward: [ {{ topics: \"PV/#\", remote_prefix: \"site/\", qos: 1 }} ]\n",
        m.url()
    );
    let mut b = start_bridge(&yaml, data_dir(), None);
    for i in 0..100 {
        b.publish("PV/data", format!("{i:03}")).await;
    }
    let s = b
        .wait_status("drops", |s| s.dropped == 80 && s.queue_depth == 20)
        .await;
    assert!(s.queue_bytes <= 940);
    // The bridge itself publishes nothing about it: its status goes to the
    // gateway's status task (`edgebridge/<id>/bridges/<name>/status`, see
    // `the_status_task_publishes_a_bridges_drops`).
    while let Ok(m) = b.published.try_recv() {
        assert!(!m.topic.starts_with("edgebridge/"), "{}", m.topic);
    }
    m.restart();
    for i in 80..100 {
        let (_, p) = next_remote(&mut seen).await;
        assert_eq!(p, Bytes::from(format!("{i:03}")));
    }
    b.stop().await;
}

/// The remote accepts TCP and hangs up at once. Counted attempts stay
/// within what the backoff schedule allows (no storm).
#[tokio::test]
#[ignore = "needs mosquitto: run by .ci/run"]
async fn reconnect_storm_stays_within_the_backoff_schedule() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (count_tx, mut count_rx) = mpsc::unbounded_channel();
    let acceptor = tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            drop(sock);
            let _ = count_tx.send(tokio::time::Instant::now());
        }
    });
    let (min, max) = (Duration::from_millis(100), Duration::from_millis(400));
    let yaml = format!(
        "  - name: cloud\n    url: mqtt://127.0.0.1:{port}\n    reconnect: {{ min: 100ms, max: 400ms }}\n    \
         forward: [ {{ topics: \"PV/#\", qos: 1 }} ]\n"
    );
    let mut b = start_bridge(&yaml, data_dir(), None);
    let window = Duration::from_secs(3);
    let first = tokio::time::timeout(WAIT, count_rx.recv())
        .await
        .unwrap()
        .unwrap();
    b.wait_status("errors", |s| s.connection_errors >= 1).await;
    tokio::time::sleep_until(first + window).await;
    let mut attempts = vec![first];
    while let Ok(t) = count_rx.try_recv() {
        if t <= first + window {
            attempts.push(t);
        }
    }
    // The most attempts the schedule allows in the window: each delay is at
    // least half of min(max, min * 2^n).
    let mut allowed = 1;
    let mut elapsed = Duration::ZERO;
    for n in 0.. {
        let ceiling = (min * 2u32.pow(n.min(20))).min(max);
        elapsed += ceiling / 2;
        if elapsed > window {
            break;
        }
        allowed += 1;
    }
    assert!(attempts.len() >= 3, "it keeps trying: {}", attempts.len());
    assert!(
        attempts.len() <= allowed,
        "{} attempts in {window:?}, schedule allows {allowed}",
        attempts.len()
    );
    let s = b.stop().await;
    drop(s);
    acceptor.abort();
}

// ------------------------------------------------ through the real gateway

/// A gateway config: embedded broker on port `port` (0: any), the given
/// data dir, and `rest` (devices, mappings, bridges).
fn gateway_yaml(data: &Path, port: u16, rest: &str) -> String {
    format!(
        "gateway: {{ id: gw-it, data_dir: {} }}\nbroker:\n  listeners:\n    - {{ bind: \"127.0.0.1:{port}\", protocol: mqtt }}\n{rest}",
        data.display()
    )
}

/// A LAN client that publishes the moment the gateway's port opens (as
/// one does when it reconnects after a gateway restart): its first message
/// reaches the cloud, because the listeners open only once the bridges are
/// subscribed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto: run by .ci/run"]
async fn a_message_published_the_moment_the_port_opens_is_bridged() {
    use tokio::io::AsyncWriteExt;
    let m = Mosquitto::start(Security::Plain);
    let (_remote, mut seen) = remote_subscriber(m.port(), "it-early-app", "site/#", true).await;
    let data = data_dir();
    let port = crate::support::free_port();
    let yaml = gateway_yaml(
        data.path(),
        port,
        &format!(
            "bridges:\n  - name: cloud\n    url: {}\n    forward: [ {{ topics: \"lan/#\", remote_prefix: \"site/\", qos: 1 }} ]\n",
            m.url()
        ),
    );
    std::fs::write(data.path().join("config.yaml"), yaml).unwrap();
    let _bin = crate::support::Binary::spawn(&["run"], data.path());
    let addr = format!("127.0.0.1:{port}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        if let Ok(s) = tokio::net::TcpStream::connect(&addr).await {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the port never opened"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    // CONNECT (MQTT 3.1.1, clean session, id "t-early") and a QoS 0
    // PUBLISH on lan/first, written together without waiting for CONNACK.
    let mut bytes = vec![0x10, 19, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30, 0, 7];
    bytes.extend_from_slice(b"t-early");
    bytes.extend_from_slice(&[0x30, 2 + 9 + 5, 0, 9]);
    bytes.extend_from_slice(b"lan/first");
    bytes.extend_from_slice(b"hello");
    s.write_all(&bytes).await.unwrap();
    let (topic, payload) = next_remote(&mut seen).await;
    assert_eq!(topic, "site/lan/first");
    assert_eq!(&payload[..], b"hello");
}

const PV: &str = "devices:
  - name: demo-pv
    driver: simulator
    poll: 200ms
    points:
      - { name: power, wave: constant, value: 2500, unit: W }
mappings:
  - { match: demo-pv/power, topic: PV/data, qos: 1 }
";

/// Simulator -> mapping -> embedded broker -> bridge -> Mosquitto, and a
/// cloud command -> Mosquitto -> bridge -> embedded broker -> LAN client;
/// the bridge's retained status on the local broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto: run by .ci/run"]
async fn gateway_bridges_readings_up_and_commands_down() {
    let m = Mosquitto::start(Security::Plain);
    let (remote, mut seen) = remote_subscriber(m.port(), "it-cloud-app", "site/#", true).await;
    let data = data_dir();
    let yaml = gateway_yaml(
        data.path(),
        0,
        &format!(
            "{PV}bridges:\n  - name: cloud\n    url: {}\n    \
             forward: [ {{ topics: \"PV/#\", remote_prefix: \"site/gw-it/\", qos: 1 }} ]\n    \
             subscribe: [ {{ topics: \"cmd/#\", remote_prefix: \"site/gw-it/\", qos: 1 }} ]\n",
            m.url()
        ),
    );
    let gw = crate::support::start(&yaml).await;
    let mut lan = crate::support::Client::connect(
        crate::support::mqtt_addr(&gw),
        "it-lan",
        &["cmd/#", "edgebridge/gw-it/bridges/cloud/status"],
    )
    .await;
    let (topic, payload) = next_remote(&mut seen).await;
    assert_eq!(topic, "site/gw-it/PV/data");
    assert_eq!(payload, Bytes::from("2500"));

    lan.expect_where(WAIT, |g| {
        g.topic == "edgebridge/gw-it/bridges/cloud/status"
            && g.payload.contains("\"connected\":true")
    })
    .await
    .expect("a connected status");
    // The status is retained: a client that subscribes now gets it. (The
    // one above may have come live, with the retain flag clear.)
    let mut late = crate::support::Client::connect(
        crate::support::mqtt_addr(&gw),
        "it-late",
        &["edgebridge/gw-it/bridges/cloud/status"],
    )
    .await;
    let status = late
        .expect_where(WAIT, |g| g.payload.contains("\"connected\":true"))
        .await
        .expect("the retained connected status");
    assert!(status.retain);

    // Retained, so it does not matter when the bridge's SUBSCRIBE lands.
    remote
        .publish("site/gw-it/cmd/led", QoS::AtLeastOnce, true, "on")
        .await
        .unwrap();
    let cmd = lan.expect("cmd/led", WAIT).await;
    assert_eq!(cmd.payload, "on");
    gw.shutdown().await;
}

/// On the embedded broker the bridge's bus client does not get its own
/// downlink publishes back (no-local): a cloud command is not echoed up
/// although the forward filter matches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto: run by .ci/run"]
async fn gateway_does_not_echo_cloud_commands_back() {
    let m = Mosquitto::start(Security::Plain);
    let (remote, mut seen) = remote_subscriber(m.port(), "it-cloud-app", "site/#", true).await;
    let data = data_dir();
    let yaml = gateway_yaml(
        data.path(),
        0,
        &format!(
            "bridges:\n  - name: cloud\n    url: {}\n    \
             forward: [ {{ topics: \"cmd/#\", remote_prefix: \"site/\", qos: 1 }} ]\n    \
             subscribe: [ {{ topics: \"cmd/#\", remote_prefix: \"site/\", qos: 1 }} ]\n",
            m.url()
        ),
    );
    let gw = crate::support::start(&yaml).await;
    let mut lan =
        crate::support::Client::connect(crate::support::mqtt_addr(&gw), "it-lan", &["cmd/#"]).await;
    remote
        .publish("site/cmd/probe", QoS::AtLeastOnce, true, "p")
        .await
        .unwrap();
    assert_eq!(next_remote(&mut seen).await.0, "site/cmd/probe");
    lan.expect("cmd/probe", WAIT).await;
    remote
        .publish("site/cmd/led", QoS::AtLeastOnce, false, "on")
        .await
        .unwrap();
    assert_eq!(next_remote(&mut seen).await.0, "site/cmd/led");
    lan.expect("cmd/led", WAIT).await;
    // A LAN client's own command goes up; an echo would have come first.
    lan.client
        .publish("cmd/marker", QoS::AtLeastOnce, false, "m")
        .await
        .unwrap();
    assert_eq!(next_remote(&mut seen).await.0, "site/cmd/marker");
    gw.shutdown().await;
}

/// During an outage, messages are queued; the real binary is killed with
/// SIGKILL, then the binary and the cloud broker come back: every queued
/// message arrives, in order (through a paced drain).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto: run by .ci/run"]
async fn kill_9_during_an_outage_loses_nothing_queued() {
    let mut m = Mosquitto::start(Security::Plain);
    let (_remote, mut seen) = remote_subscriber(m.port(), "it-cloud-app", "site/#", false).await;
    m.stop();
    let dir = data_dir();
    let port = crate::support::free_port();
    let yaml = gateway_yaml(
        Path::new("./data"),
        port,
        &format!(
            "bridges:\n  - name: cloud\n    url: {}\n    reconnect: {{ min: 100ms, max: 500ms }}\n    \
             queue: {{ drain_rate: 5000 }}\n    \
             forward: [ {{ topics: \"PV/#\", remote_prefix: \"site/\", qos: 1 }} ]\n",
            m.url()
        ),
    );
    std::fs::write(dir.path().join("config.yaml"), yaml).unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    let mut bin = crate::support::Binary::spawn(&["run"], dir.path());
    crate::support::wait_port(addr, WAIT).await;
    let mut lan =
        crate::support::Client::connect(addr, "it-lan", &["edgebridge/gw-it/bridges/cloud/status"])
            .await;
    // The bridge's first status says it is subscribed on the local bus.
    lan.expect("edgebridge/gw-it/bridges/cloud/status", WAIT)
        .await;
    const N: usize = 2_000;
    for i in 0..N {
        lan.client
            .publish("PV/seq", QoS::AtLeastOnce, false, i.to_string())
            .await
            .unwrap();
    }
    // The bridge reports its queue depth on its status topic.
    let depth = format!("\"queue_depth\":{N},");
    if lan
        .expect_where(WAIT * 2, |g| g.payload.contains(&depth))
        .await
        .is_none()
    {
        let statuses = lan.drain_where(Duration::ZERO, |_| true).await;
        panic!(
            "never queued {N}; last status {:?}; gateway log:\n{}",
            statuses.last(),
            bin.stderr()
        );
    }
    drop(lan);
    bin.signal("KILL");
    let _ = bin.child.wait();

    m.restart();
    let bin2 = crate::support::Binary::spawn(&["run"], dir.path());
    let mut got = Vec::with_capacity(N);
    let mut set = std::collections::HashSet::new();
    while set.len() < N {
        let (_, p) = tokio::time::timeout(WAIT * 2, seen.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {N} arrived; gateway log:\n{}",
                    set.len(),
                    bin2.stderr()
                )
            })
            .unwrap();
        let i: usize = std::str::from_utf8(&p).unwrap().parse().unwrap();
        if set.insert(i) {
            got.push(i);
        }
    }
    assert!(got.iter().copied().eq(0..N), "not in order");
    drop(bin2);
}

/// A message larger than `max_packet_size` would fail the connection on
/// every attempt; it is dropped and counted, and what follows still flows.
#[tokio::test]
#[ignore = "needs mosquitto: run by .ci/run"]
async fn an_oversized_message_does_not_block_the_queue() {
    let m = Mosquitto::start(Security::Plain);
    let (_remote, mut seen) = remote_subscriber(m.port(), "it-cloud-app", "site/#", true).await;
    let yaml = format!(
        "  - name: cloud\n    url: {}\n    max_packet_size: 1KiB\n    \
         forward: [ {{ topics: \"PV/#\", remote_prefix: \"site/\", qos: 1 }} ]\n",
        m.url()
    );
    let mut b = start_bridge(&yaml, data_dir(), None);
    b.wait_status("connected", |s| s.connected).await;
    b.publish("PV/big", vec![b'x'; 4096]).await;
    b.publish("PV/small", "ok").await;
    let (topic, _) = next_remote(&mut seen).await;
    assert_eq!(topic, "site/PV/small");
    let s = b
        .wait_status("counted", |s| s.dropped == 1 && s.queue_depth == 0)
        .await;
    assert!(s.connected, "the connection survived");
    assert!(s.last_error.unwrap().contains("max_packet_size"));
    b.stop().await;
}

/// A bridge over mutual TLS forwards; one trusting the wrong CA says why it
/// cannot connect in its status.
#[tokio::test]
#[ignore = "needs mosquitto: run by .ci/run"]
async fn bridge_over_mutual_tls_and_a_clear_error_with_the_wrong_ca() {
    let m = Mosquitto::start(Security::MutualTls);
    let c = m.certs().unwrap().clone();
    // The test subscriber needs TLS too; use the bridge's own client types.
    let mut sub_opts = options(
        &m.url(),
        Some(tls(&c.ca, Some((&c.client_cert, &c.client_key)))),
    );
    sub_opts.client_id = "it-cloud-app".into();
    let (sender, mut conn) = remote_client(&sub_opts);
    let (tx, mut seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = conn.poll().await {
            match ev {
                RemoteEvent::Connected { .. } => {
                    let _ =
                        sender.subscribe(&[("site/#".into(), edgebridge::model::Qos::AtLeastOnce)]);
                }
                RemoteEvent::Subscribed { .. } => {
                    let _ = tx.send(None);
                }
                RemoteEvent::Received(msg) => {
                    let _ = tx.send(Some(msg));
                }
                _ => {}
            }
        }
    });
    assert!(tokio::time::timeout(WAIT, seen.recv())
        .await
        .unwrap()
        .unwrap()
        .is_none());
    let yaml = |ca: &Path| {
        format!(
            "  - name: cloud\n    url: {}\n    tls: {{ ca: {}, cert: {}, key: {} }}\n    \
             forward: [ {{ topics: \"PV/#\", remote_prefix: \"site/\", qos: 1 }} ]\n",
            m.url(),
            ca.display(),
            c.client_cert.display(),
            c.client_key.display()
        )
    };
    let mut b = start_bridge(&yaml(&c.ca), data_dir(), None);
    b.wait_status("connected", |s| s.connected).await;
    b.publish("PV/data", "2.5").await;
    let got = tokio::time::timeout(WAIT, seen.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (got.topic.as_str(), got.payload.as_ref()),
        ("site/PV/data", &b"2.5"[..])
    );
    b.stop().await;

    let mut wrong = start_bridge(&yaml(&c.wrong_ca), data_dir(), None);
    let s = wrong
        .wait_status("an error", |s| s.last_error.is_some())
        .await;
    let e = s.last_error.unwrap();
    assert!(
        e.contains("invalid peer certificate") && e.contains("check `tls.ca`"),
        "{e}"
    );
    assert!(!s.connected);
    wrong.stop().await;
}

/// With `clean_session: false` the cloud keeps the bridge's session: a
/// command sent while the gateway was down arrives when it comes back.
#[tokio::test]
#[ignore = "needs mosquitto: run by .ci/run"]
async fn persistent_session_gets_commands_sent_while_away() {
    let m = Mosquitto::start(Security::Plain);
    let (remote, _seen) = remote_subscriber(m.port(), "it-cloud-app", "site/#", true).await;
    let yaml = format!(
        "  - name: cloud\n    url: {}\n    protocol: mqtt5\n    client_id: gw-persistent\n    clean_session: false\n    \
         subscribe: [ {{ topics: \"cmd/#\", remote_prefix: \"site/\", qos: 2 }} ]\n",
        m.url()
    );
    let mut b = start_bridge(&yaml, data_dir(), None);
    b.wait_status("connected", |s| s.connected).await;
    // Make sure the subscription is in place before going away (retained:
    // it comes whenever the SUBSCRIBE lands).
    remote
        .publish("site/cmd/probe", QoS::AtLeastOnce, true, "p")
        .await
        .unwrap();
    assert_eq!(b.next_downlink().await.topic, "cmd/probe");
    let data = b.stop().await;

    remote
        .publish("site/cmd/led", QoS::AtLeastOnce, false, "on")
        .await
        .unwrap();
    let mut b = start_bridge(&yaml, data, None);
    let mut cmd = b.next_downlink().await;
    while cmd.topic == "cmd/probe" {
        cmd = b.next_downlink().await;
    }
    assert_eq!(
        (cmd.topic.as_str(), cmd.payload.as_ref()),
        ("cmd/led", &b"on"[..])
    );
    b.stop().await;
}

/// `edgebridge check` reads the bridge's certificate files: a missing CA is
/// a config problem (exit 2) with the path in the message, not a panic.
#[tokio::test]
async fn check_reports_a_missing_ca_file() {
    let dir = data_dir();
    std::fs::write(
        dir.path().join("config.yaml"),
        "gateway: { id: gw-it }\nbridges:\n  - name: cloud\n    url: mqtts://cloud.example:8883\n    \
         tls: { ca: certs/missing-ca.pem }\n    forward: [ { topics: \"PV/#\" } ]\n",
    )
    .unwrap();
    let mut bin = crate::support::Binary::spawn(&["check"], dir.path());
    let status = bin.child.wait().unwrap();
    assert_eq!(status.code(), Some(2));
    let err = bin.stderr();
    assert!(
        err.contains("bridge `cloud`: cannot read CA file") && err.contains("certs/missing-ca.pem"),
        "{err}"
    );
}

/// `kill -9` while the bridge is busy forwarding: after a restart nothing
/// is missing (no holes up to the highest number delivered), order holds,
/// and only a window's worth was sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto: run by .ci/run"]
async fn kill_9_while_forwarding_leaves_no_holes() {
    let m = Mosquitto::start(Security::Plain);
    let (_remote, mut seen) = remote_subscriber(m.port(), "it-cloud-app", "site/#", false).await;
    let dir = data_dir();
    let port = crate::support::free_port();
    let yaml = gateway_yaml(
        Path::new("./data"),
        port,
        &format!(
            "bridges:\n  - name: cloud\n    url: {}\n    reconnect: {{ min: 100ms, max: 500ms }}\n    \
             forward: [ {{ topics: \"PV/#\", remote_prefix: \"site/\", qos: 1 }} ]\n",
            m.url()
        ),
    );
    std::fs::write(dir.path().join("config.yaml"), yaml).unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let status_topic = "edgebridge/gw-it/bridges/cloud/status";

    let mut bin = crate::support::Binary::spawn(&["run"], dir.path());
    crate::support::wait_port(addr, WAIT).await;
    let lan = crate::support::Client::connect(addr, "it-lan", &[status_topic]).await;
    let mut lan = lan;
    lan.expect(status_topic, WAIT).await;
    const N: usize = 3_000;
    let publisher = lan.client.clone();
    tokio::spawn(async move {
        for i in 0..N {
            if publisher
                .publish("PV/seq", QoS::AtLeastOnce, false, i.to_string())
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut got: Vec<usize> = Vec::new();
    while got.len() < N / 3 {
        let (_, p) = next_remote(&mut seen).await;
        got.push(std::str::from_utf8(&p).unwrap().parse().unwrap());
    }
    bin.signal("KILL");
    let _ = bin.child.wait();
    drop(lan);
    let before_kill = got.iter().copied().max().unwrap();

    let bin2 = crate::support::Binary::spawn(&["run"], dir.path());
    crate::support::wait_port(addr, WAIT).await;
    let mut lan = crate::support::Client::connect(addr, "it-lan-2", &[status_topic]).await;
    lan.expect_where(WAIT * 2, |g| {
        g.payload.contains("\"connected\":true") && g.payload.contains("\"queue_depth\":0,")
    })
    .await
    .unwrap_or_else(|| panic!("the queue never drained; log:\n{}", bin2.stderr()));
    // Everything acknowledged has been handed to the subscriber by now or
    // is on its way; collect until the subscriber goes quiet.
    while let Ok(Some((_, p))) = tokio::time::timeout(Duration::from_secs(1), seen.recv()).await {
        got.push(std::str::from_utf8(&p).unwrap().parse().unwrap());
    }
    let max = got.iter().copied().max().unwrap();
    assert!(max >= before_kill);
    let mut first = Vec::new();
    let mut set = std::collections::HashSet::new();
    for &i in &got {
        if set.insert(i) {
            first.push(i);
        }
    }
    assert!(
        first.iter().copied().eq(0..=max),
        "holes or disorder up to {max}: {} distinct of {}",
        first.len(),
        max + 1
    );
    let duplicates = got.len() - first.len();
    eprintln!("kill -9 while forwarding: up to {max} delivered, {duplicates} duplicates, {before_kill} before the kill");
    assert!(duplicates <= 100 + 512, "{duplicates} duplicates");
    drop(bin2);
}

/// With `broker.enabled: false` the bus is an external broker (here a
/// second Mosquitto): bridging and the loop guard work the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto: run by .ci/run"]
async fn bridging_works_on_an_external_bus_broker() {
    let cloud = Mosquitto::start(Security::Plain);
    let local = Mosquitto::start(Security::Plain);
    let (remote, mut seen) = remote_subscriber(cloud.port(), "it-cloud-app", "site/#", true).await;
    let data = data_dir();
    let yaml = format!(
        "gateway: {{ id: gw-it, data_dir: {} }}\nbroker: {{ enabled: false, external: {} }}\n\
         bridges:\n  - name: cloud\n    url: {}\n    \
         forward: [ {{ topics: \"cmd/#\", remote_prefix: \"site/\", qos: 1 }} ]\n    \
         subscribe: [ {{ topics: \"cmd/#\", remote_prefix: \"site/\", qos: 1 }} ]\n",
        data.path().display(),
        local.url(),
        cloud.url()
    );
    let gw = crate::support::start(&yaml).await;
    let local_addr: std::net::SocketAddr = format!("127.0.0.1:{}", local.port()).parse().unwrap();
    let mut lan = crate::support::Client::connect(local_addr, "it-lan", &["cmd/#"]).await;
    remote
        .publish("site/cmd/probe", QoS::AtLeastOnce, true, "p")
        .await
        .unwrap();
    assert_eq!(next_remote(&mut seen).await.0, "site/cmd/probe");
    lan.expect("cmd/probe", WAIT).await;
    lan.client
        .publish("cmd/marker", QoS::AtLeastOnce, false, "m")
        .await
        .unwrap();
    assert_eq!(
        next_remote(&mut seen).await.0,
        "site/cmd/marker",
        "the downlinked probe was echoed back"
    );
    gw.shutdown().await;
}

/// Issue 19: one LAN publisher as fast as it goes (`mosquitto_pub -l`), the
/// bridge on the other side of the embedded broker. 100 000 QoS 0 messages
/// arrive at the bridge (and so at the cloud, forwarded at QoS 1) at
/// ≥ 99.9 %, 20 000 QoS 1 at 100 %: the broker slows a publisher down for a
/// bridge that is behind instead of dropping (rumqttd delivered 73–100 %).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto: run by .ci/run"]
async fn a_burst_from_one_lan_publisher_reaches_the_bridge() {
    use std::io::Write;
    let m = Mosquitto::start(Security::Plain);
    let (_remote, mut seen) = remote_subscriber(m.port(), "it-burst-app", "site/#", true).await;
    let data = data_dir();
    let port = crate::support::free_port();
    let yaml = gateway_yaml(
        data.path(),
        port,
        &format!(
            "bridges:\n  - name: cloud\n    url: {}\n    forward: [ {{ topics: \"burst/#\", remote_prefix: \"site/\", qos: 1 }} ]\n",
            m.url()
        ),
    );
    std::fs::write(data.path().join("config.yaml"), yaml).unwrap();
    let bin = crate::support::Binary::spawn(&["run"], data.path());
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    crate::support::wait_port(addr, Duration::from_secs(10)).await;
    for (qos, n, needed) in [(0u8, 100_000usize, 99_900usize), (1, 20_000, 20_000)] {
        let topic = format!("burst/q{qos}");
        let mut publisher = std::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-i", "it-burst"])
            .args(["-t", &topic, "-q", &qos.to_string(), "-l"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("mosquitto_pub");
        let lines: String = (0..n).map(|i| format!("{i}\n")).collect();
        publisher
            .stdin
            .take()
            .unwrap()
            .write_all(lines.as_bytes())
            .unwrap();
        let status = tokio::task::spawn_blocking(move || publisher.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "mosquitto_pub failed");
        let remote = format!("site/{topic}");
        let mut got = std::collections::HashSet::new();
        // Until all arrived, or nothing more for 10 s.
        while got.len() < n {
            match tokio::time::timeout(Duration::from_secs(10), seen.recv()).await {
                Ok(Some((t, p))) if t == remote => {
                    got.insert(seq_of(&p));
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        eprintln!(
            "burst, QoS {qos}: {} of {n} arrived at the cloud",
            got.len()
        );
        assert!(
            got.len() >= needed,
            "QoS {qos}: {} of {n} arrived (needed {needed})\n{}",
            got.len(),
            bin.stderr()
        );
    }
}

/// A small tmpfs mounted for one test, unmounted when dropped (even when
/// the test fails). `None` when not root: the caller says it skipped.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs(dir))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    /// Takes every byte left, in a file of its own; removing the file gives
    /// them back.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.path().join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

/// Issue 13: the queue's disk fills during a cloud outage. Nothing is lost
/// uncounted (what reaches the cloud plus `dropped` is everything), the
/// bridge keeps taking messages (the publisher never blocks), the status
/// says `disk_full`, and when the cloud comes back the backlog drains in
/// order while the disk is still full; storing then resumes by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto and root (a 4 MiB tmpfs): run by .ci/run"]
async fn a_full_disk_during_an_outage_loses_nothing_uncounted() {
    const N: usize = 30_000;
    let Some(fs) = Tmpfs::mount("4m") else {
        eprintln!("SKIPPED a_full_disk_during_an_outage_loses_nothing_uncounted: not root (it mounts a tmpfs)");
        return;
    };
    let mut m = Mosquitto::start(Security::Plain);
    let (_remote, mut seen) = remote_subscriber(m.port(), "it-cloud-full", "site/#", false).await;
    m.stop();
    // max_bytes beyond what the disk holds: the disk is what fills.
    let yaml = format!(
        "  - name: cloud\n    url: {}\n    reconnect: {{ min: 100ms, max: 300ms }}\n    \
         queue: {{ max_bytes: 6MiB }}\n    \
         forward: [ {{ topics: \"PV/#\", remote_prefix: \"site/\", qos: 1 }} ]\n",
        m.url()
    );
    // Other files take part of the disk (logs, say); deleting them at the
    // end is the space that comes back.
    let ballast = fs.path().join("ballast");
    std::fs::write(&ballast, vec![1u8; 1 << 20]).unwrap();
    let data = fs.path().join("data");
    let cfg = config(&yaml, &data);
    let spec = BridgeSpec::from_config(&cfg.bridges[0], &cfg).unwrap();
    let bridge = Bridge::open(spec).unwrap();
    let mut status = bridge.status();
    let (local, rx) = mpsc::channel(1000);
    let (out, _published) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(bridge.run(
        TestLink {
            rx,
            out,
            loopback: None,
        },
        shutdown.clone(),
    ));

    // 30 000 × ~250 B: more than the 4 MiB disk holds. The publisher must
    // never be held up by the full disk.
    let pad = "x".repeat(200);
    tokio::time::timeout(Duration::from_secs(60), async {
        for i in 0..N {
            local
                .send(Message::new("PV/data", format!("{i:06}{pad}")))
                .await
                .unwrap();
        }
    })
    .await
    .expect("the bridge kept taking messages while the disk was full");
    let full = tokio::time::timeout(WAIT, status.wait_for(|s| s.disk_full && s.dropped > 0))
        .await
        .expect("disk_full and drops in the status")
        .unwrap()
        .clone();
    let queued = full.queue_depth;
    assert!(queued > 1000, "{full:?}");
    // Whatever the queue's own pages do not hold stays taken.
    let filler = fs.fill();

    // The cloud is back while the disk is still full: the backlog drains,
    // and everything is accounted for: at the cloud, or counted as dropped.
    m.restart();
    let parse = |p: &Bytes| {
        std::str::from_utf8(&p[..6])
            .unwrap()
            .parse::<usize>()
            .unwrap()
    };
    let mut got = std::collections::BTreeSet::new();
    let mut order_ok = true;
    let mut last = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let dropped = status.borrow().dropped;
        if got.len() as u64 + dropped == N as u64 {
            break;
        }
        match tokio::time::timeout_at(deadline, seen.recv()).await {
            Ok(Some((_, p))) => {
                let i = parse(&p);
                if got.insert(i) {
                    order_ok &= last.is_none_or(|l| l < i);
                    last = Some(i);
                }
            }
            _ => panic!(
                "{} reached the cloud and {dropped} were dropped, of {N}: {:?}",
                got.len(),
                *status.borrow()
            ),
        }
        if got.len() == 1000 {
            assert!(
                std::fs::metadata(&filler).is_ok(),
                "the disk is still full while the backlog drains"
            );
        }
    }
    assert!(order_ok, "messages reached the cloud out of order");
    assert!(
        got.len() as u64 >= queued,
        "only {} reached the cloud; {queued} were queued when the disk filled",
        got.len()
    );
    // Space comes back: the state ends.
    std::fs::remove_file(&filler).unwrap();
    std::fs::remove_file(&ballast).unwrap();
    local
        .send(Message::new("PV/data", format!("{N:06}{pad}")))
        .await
        .unwrap();
    if tokio::time::timeout(WAIT, status.wait_for(|s| !s.disk_full))
        .await
        .is_err()
    {
        panic!(
            "disk_full never ended once there was room: {:?}",
            *status.borrow()
        );
    }
    shutdown.cancel();
    task.await.unwrap();
    drop(fs);
}

/// Issue 13: in external-broker mode (`broker.enabled: false`) the broker
/// is away for 30 s. The readings taken meanwhile are queued on disk and
/// all arrive, in order, once it is back; the gateway is back within 5 s
/// of the broker; the driver never stalls (no gap in the readings' times).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto: run by .ci/run"]
async fn external_broker_mode_stores_and_forwards_through_an_outage() {
    const POLL_MS: i64 = 100;
    let mut site = Mosquitto::start(Security::Plain);
    let (_app, mut seen) = remote_subscriber(site.port(), "it-site-app", "PV/#", false).await;
    let data = data_dir();
    let yaml = format!(
        "gateway: {{ id: gw-ext, data_dir: {} }}\nbroker: {{ enabled: false, external: {} }}\n\
         devices:\n  - {{ name: pv, driver: simulator, poll: {POLL_MS}ms, points: [{{ name: p, wave: ramp }}] }}\n\
         mappings:\n  - {{ match: 'pv/p', topic: 'PV/p', payload: json, qos: 1 }}\n",
        data.path().display(),
        site.url()
    );
    let gw = crate::support::start(&yaml).await;
    let ts_of = |p: &Bytes| -> i64 {
        let v: serde_json::Value = serde_json::from_slice(p).unwrap();
        v["ts"].as_i64().unwrap()
    };
    let mut times = vec![ts_of(&next_remote(&mut seen).await.1)];
    site.stop();
    tokio::time::sleep(Duration::from_secs(30)).await;
    // The stalled stage shows in the health summary (and the metrics).
    let summary = gw.health(Duration::from_millis(500)).await;
    let ext = summary
        .bridges
        .iter()
        .find(|b| b.name == "external-broker")
        .unwrap_or_else(|| panic!("no external-broker in the health summary: {summary:?}"));
    assert!(!ext.connected && ext.queue_messages > 0, "{ext:?}");
    site.restart();
    let back = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let restarted = tokio::time::Instant::now();
    let mut first_new = None;
    while restarted.elapsed() < Duration::from_secs(10) {
        let Ok(Some((_, p))) = tokio::time::timeout(Duration::from_secs(1), seen.recv()).await
        else {
            continue;
        };
        let ts = ts_of(&p);
        if ts >= back && first_new.is_none() {
            first_new = Some(restarted.elapsed());
        }
        times.push(ts);
    }
    gw.shutdown().await;
    let first_new = first_new.expect("no reading taken after the restart arrived");
    assert!(
        first_new <= Duration::from_secs(6),
        "the gateway was back {first_new:?} after the broker"
    );
    times.dedup();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "out of order");
    let gaps: Vec<i64> = times
        .windows(2)
        .map(|w| w[1] - w[0])
        .filter(|d| *d > 4 * POLL_MS)
        .collect();
    assert!(
        gaps.is_empty(),
        "readings missing (gaps in ms: {gaps:?}) over {} readings",
        times.len()
    );
    assert!(times.len() > 350, "only {} readings", times.len());
}

/// A PUBACK means stored (`queue.strict`, the default): a LAN client
/// publishes a burst at QoS 1 and the gateway is killed with SIGKILL the
/// moment the last PUBACK arrives, before the bridge has had time to put
/// the newest messages in its queue. After a restart every acknowledged
/// message reaches the cloud (the newest ones from the bridge's inbox).
/// With `write_behind` the bridge keeps the newest messages in memory while
/// the cloud acknowledges them, so there the inbox is what saves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto: run by .ci/run"]
async fn kill_9_right_after_puback_loses_nothing() {
    let restarted = kill_9_after_puback("").await;
    eprintln!("kill -9 after PUBACK: inbox after the restart: {restarted:?}");
    let restarted = kill_9_after_puback("queue: { write_behind: 1s }").await;
    assert!(
        restarted.is_some(),
        "with write_behind the newest messages can only have come from the inbox"
    );
}

/// Runs the burst and the kill with `queue_yaml` for the bridge; returns
/// the restarted gateway's log line saying what it took from the inbox.
async fn kill_9_after_puback(queue_yaml: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let m = Mosquitto::start(Security::Plain);
    let (_remote, mut seen) = remote_subscriber(m.port(), "it-cloud-app", "site/#", false).await;
    let dir = data_dir();
    let port = crate::support::free_port();
    let yaml = gateway_yaml(
        Path::new("./data"),
        port,
        &format!(
            "bridges:\n  - name: cloud\n    url: {}\n    reconnect: {{ min: 100ms, max: 500ms }}\n    \
             {queue_yaml}\n    \
             forward: [ {{ topics: \"PV/#\", remote_prefix: \"site/\", qos: 1 }} ]\n",
            m.url()
        ),
    );
    std::fs::write(dir.path().join("config.yaml"), yaml).unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let status_topic = "edgebridge/gw-it/bridges/cloud/status";

    let bin = crate::support::Binary::spawn(&["run"], dir.path());
    crate::support::wait_port(addr, WAIT).await;
    let mut lan = crate::support::Client::connect(addr, "it-lan", &[status_topic]).await;
    lan.expect_where(WAIT, |g| g.payload.contains("\"connected\":true"))
        .await
        .expect("the bridge connects");

    // A raw client, so that nothing sits between the PUBACK and the kill.
    const N: u16 = 3_000;
    let mut s = crate::support::raw_connect(addr, "it-burst").await;
    let mut burst = Vec::new();
    for i in 0..N {
        let topic = b"PV/seq";
        let mut body = vec![0, topic.len() as u8];
        body.extend_from_slice(topic);
        body.extend_from_slice(&(i + 1).to_be_bytes());
        body.extend_from_slice(i.to_string().as_bytes());
        burst.extend(crate::support::packet(0x32, &body));
    }
    s.write_all(&burst).await.unwrap();
    // PUBACKs (4 bytes each) come in order; the last one acknowledges N.
    let mut acks = vec![0u8; 4 * usize::from(N)];
    tokio::time::timeout(WAIT, s.read_exact(&mut acks))
        .await
        .expect("every PUBACK within 30 s")
        .unwrap();
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    let killed = unsafe { libc::kill(bin.child.id() as libc::pid_t, libc::SIGKILL) };
    assert_eq!(killed, 0);
    assert_eq!(&acks[acks.len() - 4..], &[0x40, 2, (N >> 8) as u8, N as u8]);
    drop(s);
    drop(lan);
    let mut bin = bin;
    let _ = bin.child.wait();

    let bin2 = crate::support::Binary::spawn(&["run"], dir.path());
    let mut set = std::collections::HashSet::new();
    while set.len() < usize::from(N) {
        match tokio::time::timeout(WAIT, seen.recv()).await {
            Ok(Some((_, p))) => {
                set.insert(std::str::from_utf8(&p).unwrap().parse::<u16>().unwrap());
            }
            _ => panic!(
                "only {} of {N} acknowledged messages reached the cloud; first missing {:?}; log after the restart:\n{}",
                set.len(),
                (0..N).find(|i| !set.contains(i)),
                bin2.stderr()
            ),
        }
    }
    // The log is read once the restarted bridge is up (everything may have
    // reached the cloud before the kill).
    crate::support::wait_port(addr, WAIT).await;
    let mut lan = crate::support::Client::connect(addr, "it-lan-2", &[status_topic]).await;
    lan.expect_where(WAIT, |g| g.payload.contains("\"connected\":true"))
        .await
        .expect("the bridge connects after the restart");
    bin2.stderr()
        .lines()
        .find(|l| l.contains("taken from the inbox"))
        .map(str::to_string)
}

/// Strict mode's promise for the gateway's own readings: when a QoS 1
/// publish on the bus returns, the message is in the bridge's inbox on
/// disk, also while the cloud is unreachable. A QoS 0 message and a topic
/// the bridge does not forward never go there. For a generic bridge and
/// for a OneNET bridge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_is_in_the_inbox_when_its_publish_returns() {
    let dead = crate::support::free_port();
    readings_land_in_the_inbox(&format!(
        "bridges:\n  - name: promise-mqtt\n    url: mqtt://127.0.0.1:{dead}\n    \
         forward: [ {{ topics: \"PV/#\", qos: 1 }} ]\n"
    ))
    .await;
    readings_land_in_the_inbox(&format!(
        "bridges:\n  - name: promise-onenet\n    url: mqtt://127.0.0.1:{dead}\n    \
         onenet: {{ product_id: abc123, device_name: gw-001, access_key: \"{}\" }}\n    \
         properties: [ {{ topics: \"PV/#\", property: power }} ]\n",
        crate::support::onenet_standin::SAMPLE_KEY
    ))
    .await;
}

async fn readings_land_in_the_inbox(bridges_yaml: &str) {
    let yaml = crate::support::yaml_with_broker(bridges_yaml);
    let gw = crate::support::start(&yaml).await;
    let data = gw.config().resolve(&gw.config().gateway.data_dir);
    let prefix = format!("bridge-{}.inbox-", gw.config().bridges[0].name);
    let inbox = || -> Vec<u8> {
        let mut all = Vec::new();
        for e in std::fs::read_dir(&data).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                all.extend(std::fs::read(e.path()).unwrap());
            }
        }
        all
    };
    let holds =
        |all: &[u8], needle: &str| all.windows(needle.len()).any(|w| w == needle.as_bytes());
    for i in 0..50 {
        let mut m = Message::new(
            "PV/data",
            format!("{{\"v\":{i},\"tag\":\"reading-{i:03}\"}}"),
        );
        m.qos = edgebridge::model::Qos::AtLeastOnce;
        gw.bus().publish(m).await;
        assert!(
            holds(&inbox(), &format!("reading-{i:03}")),
            "reading {i} was published and is not in the inbox ({bridges_yaml})"
        );
    }
    gw.bus()
        .publish(Message::new("PV/data", "qos0-reading"))
        .await;
    let mut other = Message::new("other/data", "not-forwarded");
    other.qos = edgebridge::model::Qos::AtLeastOnce;
    gw.bus().publish(other).await;
    let all = inbox();
    assert!(
        !holds(&all, "qos0-reading"),
        "a QoS 0 message went to the inbox"
    );
    assert!(
        !holds(&all, "not-forwarded"),
        "a topic the bridge does not forward went to the inbox"
    );
    gw.shutdown().await;
}

/// A bridge's status reaches `edgebridge/<id>/bridges/<name>/status`
/// through the gateway's status task: here a cloud that is never there and
/// a queue with room for 20 messages of the 100 published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_task_publishes_a_bridges_drops() {
    let nobody = crate::support::free_port();
    let yaml = crate::support::yaml_with_broker(&format!(
        "bridges:\n  - name: cloud\n    url: mqtt://127.0.0.1:{nobody}\n    \
         reconnect: {{ min: 1s, max: 1s }}\n    queue: {{ max_bytes: 940 }}\n    \
         forward: [ {{ topics: \"PV/#\", remote_prefix: \"site/\", qos: 1 }} ]\n"
    ));
    let gw = crate::support::start(&yaml).await;
    let topic = "edgebridge/test-gw/bridges/cloud/status";
    let mut c =
        crate::support::Client::connect(crate::support::mqtt_addr(&gw), "it-status", &[topic])
            .await;
    let first = c.expect(topic, WAIT).await;
    assert!(first.retain, "the bridge status is retained");
    for i in 0..100 {
        let mut m = Message::new("PV/data", format!("{i:03}"));
        m.qos = edgebridge::model::Qos::AtLeastOnce;
        gw.bus().publish(m).await;
    }
    let drops = c
        .expect_where(WAIT, |g| {
            g.topic == topic && g.payload.contains("\"dropped\":80,")
        })
        .await;
    let drops = drops.expect("the status never showed the 80 dropped messages");
    let json: serde_json::Value = serde_json::from_str(&drops.payload).unwrap();
    assert_eq!(json["queue_depth"], 20, "{json}");
    assert_eq!(json["connected"], false, "{json}");
    gw.shutdown().await;
}
