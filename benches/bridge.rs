//! Bridge benchmark: messages per second from a local publisher through a
//! bridge to a subscriber on a "cloud" Mosquitto, edgebridge side by side
//! with a Mosquitto bridge doing the same job in the same run; then the
//! backlog drain rate after an outage and the peak memory meanwhile.
//!
//! ```text
//! cargo bench --profile dev --bench bridge -- [messages] [payload bytes]
//! cargo bench --bench bridge -- 100000      # release build: real numbers
//! ```
//! Needs /usr/sbin/mosquitto. Results: `BENCHMARKS.md`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgebridge::config::Config;
use edgebridge::config::ListenerProtocol;
use edgebridge::gateway::Gateway;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

/// A Mosquitto child process, killed on drop.
struct Broker {
    child: Option<Child>,
    conf: std::path::PathBuf,
    port: u16,
}

impl Broker {
    fn start(dir: &Path, name: &str, extra: &str) -> Broker {
        let port = free_port();
        let conf = dir.join(format!("{name}.conf"));
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings false\nallow_anonymous true\nuser root\n\
                 persistence true\npersistence_location {}/{name}-\nautosave_interval 0\n\
                 max_queued_messages 0\nmessage_size_limit 0\nlog_dest none\n\
                 listener {port} 127.0.0.1\n{extra}",
                dir.display()
            ),
        )
        .expect("write mosquitto config");
        let mut b = Broker {
            child: None,
            conf,
            port,
        };
        b.restart();
        b
    }

    fn restart(&mut self) {
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// Counts messages on `site/bench/data` at the cloud broker; reports each
/// probe and the instant the `n`th data message arrived.
struct Counter {
    events: mpsc::UnboundedReceiver<(String, Instant)>,
}

async fn counter(port: u16, id: &str, q: u8, clean: bool) -> Counter {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_clean_session(clean)
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(1000);
    let (client, mut el) = AsyncClient::new(o, 100);
    let (tx, events) = mpsc::unbounded_channel();
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(c))) if !c.session_present => {
                    let _ = client.try_subscribe("site/#", qos(q));
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready_tx.take() {
                        let _ = r.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send((p.topic, Instant::now())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let _ = ready.await;
    Counter { events }
}

impl Counter {
    /// Waits for `n` data messages (or `limit`); returns how many arrived
    /// and when the last one did.
    async fn data(&mut self, n: usize, limit: Duration) -> (usize, Option<Instant>) {
        let deadline = tokio::time::Instant::now() + limit;
        let mut count = 0;
        let mut last = None;
        while count < n {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some((t, at))) if t == "site/bench/data" => {
                    count += 1;
                    last = Some(at);
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        (count, last)
    }

    async fn probe_seen(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while let Ok(Some((t, _))) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            if t == "site/bench/probe" {
                return true;
            }
        }
        false
    }
}

/// A publisher on the local broker.
async fn publisher(port: u16, id: &str) -> AsyncClient {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30)).set_inflight(100);
    let (client, mut el) = AsyncClient::new(o, 1000);
    tokio::spawn(async move {
        loop {
            if el.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    client
}

/// Publishes probes until the cloud sees one: the path is up.
async fn wait_path(publisher: &AsyncClient, counter: &mut Counter) {
    for _ in 0..100 {
        publisher
            .publish("bench/probe", QoS::AtLeastOnce, false, "p")
            .await
            .expect("publish probe");
        if counter.probe_seen(Duration::from_millis(300)).await {
            return;
        }
    }
    panic!("the bridge never delivered a probe");
}

/// Publishes `n` messages and waits until the cloud got them: msg/s.
async fn throughput(
    local_port: u16,
    cloud_port: u16,
    q: u8,
    n: usize,
    payload: &[u8],
    tag: &str,
) -> (f64, usize) {
    let mut counter = counter(cloud_port, &format!("bench-sub-{tag}-{q}"), q, true).await;
    let publisher = publisher(local_port, &format!("bench-pub-{tag}-{q}")).await;
    wait_path(&publisher, &mut counter).await;
    let start = Instant::now();
    for _ in 0..n {
        publisher
            .publish("bench/data", qos(q), false, payload.to_vec())
            .await
            .expect("publish");
    }
    let (got, last) = counter.data(n, Duration::from_secs(300)).await;
    let secs = last.map(|l| (l - start).as_secs_f64()).unwrap_or(f64::NAN);
    (got as f64 / secs, got)
}

/// Peak resident memory of this process so far, in KiB (Linux).
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

async fn gateway(data: &Path, cloud_port: u16, q: u8) -> Gateway {
    let yaml = format!(
        "gateway: {{ id: bench, data_dir: {} }}\nbroker:\n  listeners:\n    - {{ bind: \"127.0.0.1:0\", protocol: mqtt }}\n\
         bridges:\n  - name: cloud\n    url: mqtt://127.0.0.1:{cloud_port}\n    reconnect: {{ min: 100ms, max: 500ms }}\n    \
         forward: [ {{ topics: \"bench/#\", remote_prefix: \"site/\", qos: {q} }} ]\n",
        data.display()
    );
    let config = Config::from_text(Path::new("bench.yaml"), &yaml, |_| None).expect("config");
    Gateway::start(config).await.expect("gateway starts")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` adds flags such as `--bench`; take the numbers.
    let nums: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = nums.first().copied().unwrap_or(20_000);
    let size = nums.get(1).copied().unwrap_or(64);
    let payload = vec![b'x'; size];
    let dir = tempfile::tempdir().expect("temp dir");
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!("# bridge benchmark: {n} messages of {size} bytes, {profile} build\n");
    println!("| path | QoS | delivered | msg/s |");
    println!("|---|---|---|---|");

    let mut cloud = Broker::start(dir.path(), "cloud", "");
    for q in [0u8, 1] {
        // edgebridge: publisher -> embedded broker -> bridge -> cloud.
        let data = dir.path().join(format!("eb-{q}"));
        let gw = gateway(&data, cloud.port, q).await;
        let local = gw
            .listener(ListenerProtocol::Mqtt)
            .expect("listener")
            .port();
        let (rate, got) = throughput(local, cloud.port, q, n, &payload, "eb").await;
        println!("| edgebridge | {q} | {got} | {rate:.0} |");
        gw.shutdown().await;

        // Mosquitto bridge: publisher -> local mosquitto -> bridge -> cloud.
        let bridge_conf = format!(
            "connection bench{q}\naddress 127.0.0.1:{}\ntopic bench/# out {q} \"\" site/\ncleansession true\n",
            cloud.port
        );
        let local = Broker::start(dir.path(), &format!("local{q}"), &bridge_conf);
        let (mrate, mgot) = throughput(local.port, cloud.port, q, n, &payload, "mq").await;
        println!("| mosquitto bridge | {q} | {mgot} | {mrate:.0} |");
        println!(
            "| ratio edgebridge/mosquitto | {q} | | {:.2} |",
            rate / mrate
        );
    }

    // Backlog: the cloud is down while n messages are queued, then drains.
    let data = dir.path().join("eb-backlog");
    let mut sub = counter(cloud.port, "bench-sub-backlog", 1, false).await;
    let gw = gateway(&data, cloud.port, 1).await;
    let local = gw
        .listener(ListenerProtocol::Mqtt)
        .expect("listener")
        .port();
    let publisher = publisher(local, "bench-pub-backlog").await;
    wait_path(&publisher, &mut sub).await;
    let mut status = gw.bridges()[0].status.clone();
    cloud.stop();
    let _ = status.wait_for(|s| !s.connected).await;
    let rss_before = peak_rss_kib();
    for _ in 0..n {
        publisher
            .publish("bench/data", QoS::AtLeastOnce, false, payload.clone())
            .await
            .expect("publish");
    }
    let queued = tokio::time::timeout(
        Duration::from_secs(300),
        status.wait_for(|s| s.queue_depth >= n as u64),
    )
    .await
    .ok()
    .and_then(|r| r.ok().map(|s| s.queue_bytes));
    let Some(bytes) = queued else {
        panic!("backlog never reached {n}");
    };
    cloud.restart();
    let start = Instant::now();
    let (got, last) = sub.data(n, Duration::from_secs(600)).await;
    let secs = last.map(|l| (l - start).as_secs_f64()).unwrap_or(f64::NAN);
    println!(
        "\nbacklog: {got} of {n} messages ({} KiB queued) drained in {secs:.2}s = {:.0} msg/s (QoS 1)",
        bytes / 1024,
        got as f64 / secs
    );
    println!(
        "peak RSS of the benchmark process (gateway + clients): {} KiB before the outage, {} KiB after the drain",
        rss_before,
        peak_rss_kib()
    );
    gw.shutdown().await;
}
