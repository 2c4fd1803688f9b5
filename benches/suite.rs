//! The performance suite (issue 8): the release `edgebridge` binary as a
//! child process, side by side with Mosquitto where a comparison applies,
//! on 127.0.0.1, each broker on its own free port. Prints one table.
//!
//! ```text
//! bench/run.sh                 # release build, full run (about 13 minutes)
//! bench/run.sh --smoke         # seconds; what .ci/run may run
//! cargo bench --bench suite -- [--smoke] [--long SECONDS] [--outage SECONDS] [--messages N] [--rounds N] [--only short|long|bridge|latency|pipeline]
//! ```
//! The gateway is `target/release/edgebridge` (`target/debug/…` when the
//! suite itself is a debug build), or `$EDGEBRIDGE_BIN`. Needs
//! /usr/sbin/mosquitto. Publishers and subscribers are the same rumqttc
//! programs for both sides. Results: `BENCHMARKS.md`.

use std::collections::HashSet;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio_modbus::prelude::*;
use tokio_modbus::server::Service;

// ---------------------------------------------------------------- processes

/// Linux /proc figures of one process (all its threads).
#[derive(Debug, Clone, Copy, Default)]
struct ProcStats {
    cpu_s: f64,
    rss_kib: u64,
    hwm_kib: u64,
}

fn proc_stats(pid: u32) -> ProcStats {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    ProcStats {
        cpu_s: ticks / 100.0,
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn wait_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A Mosquitto child process, killed on drop.
struct Mosquitto {
    child: Option<Child>,
    conf: PathBuf,
    port: u16,
}

impl Mosquitto {
    fn start(dir: &Path, name: &str, extra: &str) -> Mosquitto {
        let port = free_port();
        let conf = dir.join(format!("{name}.conf"));
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings false\nallow_anonymous true\nuser root\n\
                 persistence true\npersistence_location {}/{name}-\nautosave_interval 0\n\
                 max_queued_messages 0\nmax_inflight_messages 100\nmessage_size_limit 0\n\
                 log_dest none\nlistener {port} 127.0.0.1\n{extra}",
                dir.display()
            ),
        )
        .expect("write mosquitto config");
        let mut m = Mosquitto {
            child: None,
            conf,
            port,
        };
        m.restart();
        m
    }

    fn restart(&mut self) {
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start /usr/sbin/mosquitto");
        self.child = Some(child);
        wait_port(self.port, "mosquitto");
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGTERM and wait (Mosquitto saves its persistent sessions).
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn gateway_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("EDGEBRIDGE_BIN") {
        // Absolute: the gateway runs in a temporary directory.
        return std::fs::canonicalize(&p).unwrap_or_else(|_| PathBuf::from(p));
    }
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(profile)
        .join("edgebridge")
}

/// The edgebridge binary running `config`, killed on drop.
struct Edgebridge {
    child: Child,
    /// From spawn to READY=1 on the notification socket (or, from a binary
    /// without it, the "gateway started" log line).
    ready_after: Duration,
}

impl Edgebridge {
    fn start(dir: &Path, name: &str, config: &str) -> Edgebridge {
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(&path, config).expect("write gateway config");
        // READY=1 comes over the systemd notification socket (`Type=notify`).
        let notify_path = dir.join(format!("{name}.notify"));
        let _ = std::fs::remove_file(&notify_path);
        let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).expect("notify socket");
        let spawned = Instant::now();
        let mut child = Command::new(gateway_binary())
            .arg("--config")
            .arg(&path)
            .arg("run")
            .env_remove("EDGEBRIDGE_LOG")
            .env("NOTIFY_SOCKET", &notify_path)
            .env_remove("JOURNAL_STREAM")
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", gateway_binary().display()));
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let log_tx = tx.clone();
        // Reads the log to the end (a full pipe would stall the gateway).
        std::thread::spawn(move || {
            let mut tx = Some(log_tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("gateway started") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send((false, Instant::now()));
                    }
                } else if line.contains("ERROR") {
                    eprintln!("edgebridge: {line}");
                }
            }
        });
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = notify.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "READY=1")
                {
                    let _ = tx.send((true, Instant::now()));
                    return;
                }
            }
        });
        // READY=1 if the binary sends it (ops); else the log line.
        let mut logged = None;
        let ready = loop {
            let wait = if logged.is_some() { 2 } else { 30 };
            match rx.recv_timeout(Duration::from_secs(wait)) {
                Ok((true, at)) => break at,
                Ok((false, at)) => logged = Some(at),
                Err(_) => break logged.expect("edgebridge never became ready"),
            }
        };
        Edgebridge {
            child,
            ready_after: ready - spawned,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Edgebridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- clients

fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Nanoseconds since the suite started (publisher and subscriber share the
/// clock: they are in this process).
fn now_ns() -> u64 {
    base().elapsed().as_nanos() as u64
}

/// A message as the subscriber saw it: topic, sequence number, send time.
struct Seen {
    topic: String,
    seq: u64,
    sent_ns: u64,
    at: Instant,
}

/// A subscriber; every publish it gets goes to `events`.
async fn subscriber(
    port: u16,
    id: &str,
    filter: &str,
    q: u8,
    clean: bool,
) -> mpsc::UnboundedReceiver<Seen> {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_clean_session(clean)
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(1000)
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = AsyncClient::new(o, 100);
    let (tx, events) = mpsc::unbounded_channel();
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    let filter = filter.to_string();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(c))) if !c.session_present => {
                    let _ = client.try_subscribe(filter.clone(), qos(q));
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready_tx.take() {
                        let _ = r.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let word = |i: usize| {
                        p.payload
                            .get(i..i + 8)
                            .and_then(|b| b.try_into().ok())
                            .map(u64::from_le_bytes)
                            .unwrap_or(0)
                    };
                    let seen = Seen {
                        seq: word(0),
                        sent_ns: word(8),
                        topic: p.topic,
                        at: Instant::now(),
                    };
                    if tx.send(seen).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    });
    // A bench must fail, not hang, when a broker does not answer.
    if !matches!(
        tokio::time::timeout(Duration::from_secs(30), ready).await,
        Ok(Ok(()))
    ) {
        panic!("subscriber {id} on port {port}: no SUBACK within 30 s");
    }
    events
}

/// A publisher on a local broker.
async fn publisher(port: u16, id: &str) -> AsyncClient {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30)).set_inflight(100);
    let (client, mut el) = AsyncClient::new(o, 1000);
    tokio::spawn(async move {
        loop {
            if el.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    client
}

/// A 64-byte (at least 16) payload: sequence number, send time, padding.
fn payload(seq: u64, size: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(size.max(16));
    p.extend_from_slice(&seq.to_le_bytes());
    p.extend_from_slice(&now_ns().to_le_bytes());
    p.resize(size.max(16), b'x');
    p
}

/// Publishes probes until the subscriber sees one: the path is up.
async fn wait_path(publisher: &AsyncClient, events: &mut mpsc::UnboundedReceiver<Seen>) {
    for _ in 0..200 {
        publisher
            .publish("bench/probe", QoS::AtLeastOnce, false, "p")
            .await
            .expect("publish probe");
        let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
        while let Ok(Some(s)) = tokio::time::timeout_at(deadline, events.recv()).await {
            if s.topic.ends_with("bench/probe") {
                return;
            }
        }
    }
    panic!("the bridge never delivered a probe");
}

/// Drops whatever already arrived.
fn drain_now(events: &mut mpsc::UnboundedReceiver<Seen>) {
    while events.try_recv().is_ok() {}
}

// ---------------------------------------------------------------- the table

struct Row {
    scenario: String,
    system: &'static str,
    result: String,
    cpu_s: String,
    peak_rss: String,
    final_rss: String,
    target: String,
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn row(
    scenario: impl Into<String>,
    system: &'static str,
    result: impl Into<String>,
    cpu_s: Option<f64>,
    stats: Option<ProcStats>,
    target: impl Into<String>,
) -> Row {
    Row {
        scenario: scenario.into(),
        system,
        result: result.into(),
        cpu_s: cpu_s.map(|c| format!("{c:.2}")).unwrap_or_default(),
        peak_rss: stats.map(|s| mib(s.hwm_kib)).unwrap_or_default(),
        final_rss: stats.map(|s| mib(s.rss_kib)).unwrap_or_default(),
        target: target.into(),
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

// ---------------------------------------------------------------- configs

fn bridge_gateway_yaml(data: &Path, cloud_port: u16, local_port: u16, q: u8) -> String {
    format!(
        "gateway: {{ id: bench, data_dir: {} }}\nbroker:\n  listeners:\n    - {{ bind: \"127.0.0.1:{local_port}\", protocol: mqtt }}\n\
         bridges:\n  - name: cloud\n    url: mqtt://127.0.0.1:{cloud_port}\n    reconnect: {{ min: 100ms, max: 500ms }}\n    max_inflight: 100\n    \
         forward: [ {{ topics: \"bench/#\", remote_prefix: \"site/\", qos: {q} }} ]\n",
        data.display()
    )
}

fn rules_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("rules")
}

/// The shipped config.yaml with its listeners on free ports and its data
/// and rules folders made absolute.
fn shipped_config(data: &Path) -> (String, u16) {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.yaml"))
        .expect("read config.yaml");
    let port = free_port();
    let text = text
        .replace("127.0.0.1:1883", &format!("127.0.0.1:{port}"))
        .replace("data_dir: ./data", &format!("data_dir: {}", data.display()))
        .replace("dir: ./rules", &format!("dir: {}", rules_dir().display()));
    (text, port)
}

// ---------------------------------------------------------------- scenarios

/// The gateway's retained bridge status (JSON), read from its local broker.
async fn bridge_status(port: u16) -> String {
    let mut o = MqttOptions::new("status-reader", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(o, 10);
    let read = async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.try_subscribe("edgebridge/+/bridges/+/status", QoS::AtMostOnce);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    return String::from_utf8_lossy(&p.payload).into_owned();
                }
                Ok(_) => {}
                Err(e) => return format!("no status: {e}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .unwrap_or_else(|_| "no status within 5 s".into())
}

/// Publishes `n` messages as fast as the client goes; waits until the
/// subscriber got them. (msg/s, delivered, bridging process CPU s.)
async fn burst(
    local: u16,
    cloud: &Mosquitto,
    q: u8,
    n: u64,
    size: usize,
    tag: &str,
    pid: u32,
) -> (f64, u64, f64) {
    let cloud_pid = cloud.pid();
    let mut events = subscriber(cloud.port, &format!("sub-{tag}-{q}"), "site/#", q, true).await;
    let publisher = publisher(local, &format!("pub-{tag}-{q}")).await;
    wait_path(&publisher, &mut events).await;
    drain_now(&mut events);
    let cpu0 = proc_stats(pid).cpu_s;
    let cloud_cpu0 = proc_stats(cloud_pid).cpu_s;
    let start = Instant::now();
    let producer = {
        let publisher = publisher.clone();
        tokio::spawn(async move {
            for seq in 0..n {
                publisher
                    .publish("bench/data", qos(q), false, payload(seq, size))
                    .await
                    .expect("publish");
            }
            start.elapsed()
        })
    };
    let mut seen = HashSet::new();
    let mut last = start;
    let mut quiet = Duration::from_secs(60);
    while (seen.len() as u64) < n {
        match tokio::time::timeout(quiet, events.recv()).await {
            Ok(Some(s)) if s.topic == "site/bench/data" => {
                seen.insert(s.seq);
                last = s.at;
                // Once flowing, 3 s of silence means the rest is lost.
                quiet = Duration::from_secs(3);
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    let published = producer.await.unwrap_or_default();
    eprintln!(
        "{tag} QoS {q}: published in {:.2} s, last arrival at {:.2} s, cloud broker {:.2} CPU s",
        published.as_secs_f64(),
        (last - start).as_secs_f64(),
        proc_stats(cloud_pid).cpu_s - cloud_cpu0
    );
    let cpu = proc_stats(pid).cpu_s - cpu0;
    let got = seen.len() as u64;
    (got as f64 / (last - start).as_secs_f64(), got, cpu)
}

/// The bridge comparison, `rounds` times (edgebridge, then Mosquitto, per
/// QoS per round); the table gets each round and, with more than one, the
/// median ratio, which is what the target is judged on.
async fn bridge_throughput(dir: &Path, n: u64, rounds: u64, rows: &mut Vec<Row>) {
    let cloud = Mosquitto::start(dir, "cloud", "");
    for q in [0u8, 1] {
        let scenario =
            format!("bridge QoS {q}, {n} × 64 B, publisher → bridge → Mosquitto → subscriber");
        let mut ratios = Vec::new();
        let mut all_lossless = true;
        for round in 1..=rounds {
            let local_port = free_port();
            let name = format!("bridge-q{q}-r{round}");
            let gw = Edgebridge::start(
                dir,
                &name,
                &bridge_gateway_yaml(&dir.join(&name), cloud.port, local_port, q),
            );
            let tag = format!("eb{round}");
            let (rate, got, cpu) = burst(local_port, &cloud, q, n, 64, &tag, gw.pid()).await;
            let eb_stats = proc_stats(gw.pid());
            // Its own count of what it forwarded tells where a loss was.
            tokio::time::sleep(Duration::from_millis(1100)).await;
            eprintln!(
                "{tag} QoS {q}: bridge status {}",
                bridge_status(local_port).await
            );
            drop(gw);

            let conf = format!(
                "connection bench{q}\naddress 127.0.0.1:{}\ntopic bench/# out {q} \"\" site/\ncleansession true\n",
                cloud.port
            );
            let local = Mosquitto::start(dir, &format!("local{q}-r{round}"), &conf);
            let tag = format!("mq{round}");
            let (mrate, mgot, mcpu) = burst(local.port, &cloud, q, n, 64, &tag, local.pid()).await;
            let mq_stats = proc_stats(local.pid());
            drop(local);

            let ratio = rate / mrate;
            let lossless = got == n;
            all_lossless &= lossless;
            ratios.push(ratio);
            let label = if rounds > 1 {
                format!("{scenario}, round {round}")
            } else {
                scenario.clone()
            };
            rows.push(row(
                &label,
                "edgebridge",
                format!("{rate:.0} msg/s, {got}/{n} delivered"),
                Some(cpu),
                Some(eb_stats),
                format!(
                    "ratio {ratio:.2}{}",
                    if q == 1 && !lossless { ", LOSS" } else { "" }
                ),
            ));
            rows.push(row(
                &label,
                "mosquitto",
                format!("{mrate:.0} msg/s, {mgot}/{n} delivered"),
                Some(mcpu),
                Some(mq_stats),
                "",
            ));
        }
        ratios.sort_by(f64::total_cmp);
        // With an even count, the mean of the middle two (not the upper one).
        let mid = ratios.len() / 2;
        let median = if ratios.len() % 2 == 0 {
            (ratios[mid - 1] + ratios[mid]) / 2.0
        } else {
            ratios[mid]
        };
        let range = if ratios.len() > 1 {
            format!(
                " (min {:.2}, max {:.2}, {} rounds)",
                ratios[0],
                ratios[ratios.len() - 1],
                ratios.len()
            )
        } else {
            String::new()
        };
        rows.push(row(
            &scenario,
            "edgebridge",
            format!("median ratio {median:.2}{range}"),
            None,
            None,
            format!(
                "ratio ≥ 1.0{}: {}",
                if q == 1 { ", no loss" } else { "" },
                verdict(median >= 1.0 && (q == 0 || all_lossless))
            ),
        ));
    }
}

/// 1 000 msg/s for `secs`, latency publish → cloud subscriber.
async fn paced_latency(local: u16, cloud: u16, tag: &str, secs: u64) -> (Vec<u64>, u64, u64) {
    let mut events = subscriber(cloud, &format!("lat-{tag}"), "site/#", 1, true).await;
    let publisher = publisher(local, &format!("latpub-{tag}")).await;
    wait_path(&publisher, &mut events).await;
    drain_now(&mut events);
    let n = secs * 1000;
    let producer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        for seq in 0..n {
            tick.tick().await;
            publisher
                .publish("bench/data", QoS::AtLeastOnce, false, payload(seq, 64))
                .await
                .expect("publish");
        }
    });
    let mut lat = Vec::with_capacity(n as usize);
    while (lat.len() as u64) < n {
        match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
            Ok(Some(s)) if s.topic == "site/bench/data" => {
                let at = s.at.duration_since(base()).as_nanos() as u64;
                lat.push(at.saturating_sub(s.sent_ns));
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    let _ = producer.await;
    let got = lat.len() as u64;
    lat.sort_unstable();
    (lat, got, n)
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1e6
}

async fn latency(dir: &Path, secs: u64, rows: &mut Vec<Row>) {
    let cloud = Mosquitto::start(dir, "cloud-lat", "");
    let local_port = free_port();
    let gw = Edgebridge::start(
        dir,
        "latency",
        &bridge_gateway_yaml(&dir.join("eb-lat"), cloud.port, local_port, 1),
    );
    let cpu0 = proc_stats(gw.pid()).cpu_s;
    let (lat, got, n) = paced_latency(local_port, cloud.port, "eb", secs).await;
    let cpu = proc_stats(gw.pid()).cpu_s - cpu0;
    let stats = proc_stats(gw.pid());
    drop(gw);
    let p99 = pct(&lat, 0.99);
    let scenario =
        format!("latency at 1 000 msg/s, QoS 1, {secs} s, publish → cloud subscriber (ms)");
    rows.push(row(
        &scenario,
        "edgebridge",
        format!(
            "p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}; {got}/{n}",
            pct(&lat, 0.5),
            pct(&lat, 0.9),
            p99,
            pct(&lat, 1.0)
        ),
        Some(cpu),
        Some(stats),
        format!("p99 ≤ 5 ms: {}", verdict(p99 <= 5.0 && got == n)),
    ));
    let conf = format!(
        "connection lat\naddress 127.0.0.1:{}\ntopic bench/# out 1 \"\" site/\ncleansession true\n",
        cloud.port
    );
    let local = Mosquitto::start(dir, "local-lat", &conf);
    let cpu0 = proc_stats(local.pid()).cpu_s;
    let (lat, got, n) = paced_latency(local.port, cloud.port, "mq", secs).await;
    let cpu = proc_stats(local.pid()).cpu_s - cpu0;
    rows.push(row(
        &scenario,
        "mosquitto",
        format!(
            "p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}; {got}/{n}",
            pct(&lat, 0.5),
            pct(&lat, 0.9),
            pct(&lat, 0.99),
            pct(&lat, 1.0)
        ),
        Some(cpu),
        Some(proc_stats(local.pid())),
        "",
    ));
}

/// Simulator (2 000 points every 10 ms, 200 000 readings/s offered) → pv.rhai
/// → `*/*` json mapping → embedded broker → one TCP subscriber.
async fn pipeline(dir: &Path, secs: u64, rows: &mut Vec<Row>) {
    let port = free_port();
    let points = 2000;
    let mut yaml = format!(
        "gateway: {{ id: bench, data_dir: {} }}\nbroker:\n  listeners:\n    - {{ bind: \"127.0.0.1:{port}\", protocol: mqtt }}\n\
         rules: {{ dir: {} }}\n\
         devices:\n  - name: demo-pv\n    driver: simulator\n    poll: 10ms\n    points:\n      - {{ name: power, wave: sine, min: 0, max: 5000, period: 60s, unit: W }}\n",
        dir.join("eb-pipe").display(),
        rules_dir().display()
    );
    for i in 1..points {
        yaml.push_str(&format!(
            "      - {{ name: p{i}, wave: sine, min: 0, max: 5000, period: 60s, unit: W }}\n"
        ));
    }
    yaml.push_str(
        "mappings:\n  - { match: '*/*', topic: 'devices/{device}/{point}', payload: json }\n",
    );
    let gw = Edgebridge::start(dir, "pipeline", &yaml);
    let mut events = subscriber(port, "pipe-sub", "devices/#", 0, true).await;
    // Warm up: data flows.
    let _ = tokio::time::timeout(Duration::from_secs(10), events.recv()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    drain_now(&mut events);
    let cpu0 = proc_stats(gw.pid()).cpu_s;
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut n = 0u64;
    while Instant::now() < end {
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(100), events.recv()).await {
            n += 1;
            while events.try_recv().is_ok() {
                n += 1;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = proc_stats(gw.pid()).cpu_s - cpu0;
    let rate = n as f64 / elapsed;
    rows.push(row(
        format!("pipeline: simulator {points} points / 10 ms → pv.rhai → json mapping → broker → TCP subscriber, {secs} s"),
        "edgebridge",
        format!("{rate:.0} readings/s at the subscriber"),
        Some(cpu),
        Some(proc_stats(gw.pid())),
        format!("≥ 100 000/s: {}", verdict(rate >= 100_000.0)),
    ));
}

async fn startup(dir: &Path, rows: &mut Vec<Row>) {
    let mut times = Vec::new();
    for i in 0..7 {
        let data = dir.join(format!("eb-start{i}"));
        let (yaml, _) = shipped_config(&data);
        let gw = Edgebridge::start(dir, &format!("start{i}"), &yaml);
        times.push(gw.ready_after);
    }
    times.sort();
    let median = times[times.len() / 2].as_secs_f64() * 1e3;
    let max = times[times.len() - 1].as_secs_f64() * 1e3;
    rows.push(row(
        "start → READY=1 (broker listening, devices started), shipped config, 7 runs",
        "edgebridge",
        format!("median {median:.1} ms, max {max:.1} ms"),
        None,
        None,
        format!("≤ 200 ms: {}", verdict(max <= 200.0)),
    ));
}

fn binary_size(rows: &mut Vec<Row>) {
    let bin = gateway_binary();
    let size = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
    let stripped = dir_tmp().join("edgebridge.stripped");
    let stripped_size = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(&bin)
        .status()
        .ok()
        .filter(|s| s.success())
        .and_then(|_| std::fs::metadata(&stripped).ok())
        .map(|m| m.len())
        .unwrap_or(size);
    let mib = stripped_size as f64 / (1024.0 * 1024.0);
    rows.push(row(
        format!("binary size, stripped ({})", bin.display()),
        "edgebridge",
        format!("{stripped_size} bytes = {mib:.2} MiB"),
        None,
        None,
        format!("≤ 15 MB (10^6 B): {}", verdict(stripped_size <= 15_000_000)),
    ));
}

fn dir_tmp() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"))
        .path()
        .to_path_buf()
}

/// Samples a process's RSS every `every` for `secs`; (first sample after a
/// minute or at a quarter of the run, peak, final).
async fn watch_rss(pid: u32, secs: u64, every: Duration) -> (u64, ProcStats, Vec<u64>) {
    let start = Instant::now();
    // Warm-up: the broker's buffers and the allocator's arenas fill up
    // to their bounds in the first minutes; growth is measured after it.
    let settle = Duration::from_secs(secs / 4);
    let mut settled = 0;
    let mut samples = Vec::new();
    while start.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(every).await;
        let s = proc_stats(pid);
        samples.push(s.rss_kib);
        if settled == 0 && start.elapsed() >= settle {
            settled = s.rss_kib;
        }
    }
    (settled, proc_stats(pid), samples)
}

async fn memory_shipped(dir: PathBuf, secs: u64) -> Row {
    let (yaml, _) = shipped_config(&dir.join("eb-shipped"));
    let gw = Edgebridge::start(&dir, "shipped", &yaml);
    let (_, end, _) = watch_rss(gw.pid(), secs, Duration::from_secs(1)).await;
    row(
        format!("resident memory, shipped config.yaml, after {secs} s"),
        "edgebridge",
        format!("RSS {} MiB", mib(end.rss_kib)),
        Some(end.cpu_s),
        Some(end),
        format!("≤ 20 MB: {}", verdict(end.rss_kib * 1024 <= 20_000_000)),
    )
}

/// Holding registers that change every second (address + seconds).
struct Registers;

impl Service for Registers {
    type Request = SlaveRequest<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = std::future::Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let t = (now_ns() / 1_000_000_000) as u16;
        let words = |a: u16, n: u16| {
            (a..a.saturating_add(n))
                .map(|w| w.wrapping_add(t))
                .collect::<Vec<u16>>()
        };
        std::future::ready(match req.request {
            Request::ReadHoldingRegisters(a, n) => Ok(Response::ReadHoldingRegisters(words(a, n))),
            Request::ReadInputRegisters(a, n) => Ok(Response::ReadInputRegisters(words(a, n))),
            _ => Err(ExceptionCode::IllegalFunction),
        })
    }
}

async fn modbus_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind modbus server");
    let addr = listener.local_addr().expect("modbus server address");
    tokio::spawn(async move {
        let server = tokio_modbus::server::tcp::Server::new(listener);
        let on_connected = |stream, peer| async move {
            tokio_modbus::server::tcp::accept_tcp_connection(stream, peer, |_| Ok(Some(Registers)))
        };
        let _ = server.serve(&on_connected, |_| {}).await;
    });
    addr
}

/// 100 Modbus TCP devices × 20 points at 1 s, pv.rhai, json mapping, a
/// QoS 1 bridge to a Mosquitto with a subscriber counting what arrives.
async fn memory_modbus(dir: PathBuf, secs: u64) -> Row {
    let addr = modbus_server().await;
    let cloud = Mosquitto::start(&dir, "cloud-modbus", "");
    let received = Arc::new(AtomicU64::new(0));
    let mut events = subscriber(cloud.port, "modbus-sub", "site/#", 1, true).await;
    let counter = received.clone();
    tokio::spawn(async move {
        while events.recv().await.is_some() {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let mut yaml = format!(
        "gateway: {{ id: bench, data_dir: {} }}\nbroker:\n  listeners:\n    - {{ bind: \"127.0.0.1:{}\", protocol: mqtt }}\n\
         rules: {{ dir: {} }}\n\
         mappings:\n  - {{ match: '*/*', topic: 'devices/{{device}}/{{point}}', payload: json }}\n\
         bridges:\n  - name: cloud\n    url: mqtt://127.0.0.1:{}\n    forward: [ {{ topics: \"devices/#\", remote_prefix: \"site/\", qos: 1 }} ]\n\
         devices:\n",
        dir.join("eb-modbus").display(),
        free_port(),
        rules_dir().display(),
        cloud.port
    );
    for d in 0..100 {
        yaml.push_str(&format!(
            "  - name: m{d}\n    driver: modbus-tcp\n    address: \"{addr}\"\n    slave: 1\n    poll: 1s\n    points:\n"
        ));
        for p in 0..20 {
            let ty = if p % 2 == 0 { "f32" } else { "u16" };
            yaml.push_str(&format!(
                "      - {{ name: p{p}, table: holding, address: {}, type: {ty} }}\n",
                p * 4
            ));
        }
    }
    let gw = Edgebridge::start(&dir, "modbus", &yaml);
    let every = Duration::from_secs(if secs >= 120 { 10 } else { 1 });
    let (settled, end, samples) = watch_rss(gw.pid(), secs, every).await;
    let after: Vec<u64> = samples.iter().copied().skip(samples.len() / 4).collect();
    let lo = after.iter().copied().min().unwrap_or(0);
    let hi = after.iter().copied().max().unwrap_or(0);
    let got = received.load(Ordering::Relaxed);
    let flat = end.rss_kib <= settled + 1024;
    row(
        format!("100 Modbus TCP devices × 20 points at 1 s, pv.rhai, QoS 1 bridge, {secs} s"),
        "edgebridge",
        format!(
            "RSS {} MiB at {}s, {}–{} MiB after, {} MiB at the end; {} msg/s at the cloud",
            mib(settled),
            secs / 4,
            mib(lo),
            mib(hi),
            mib(end.rss_kib),
            got / secs.max(1)
        ),
        Some(end.cpu_s),
        Some(end),
        format!(
            "≤ 40 MB and flat: {}",
            verdict(end.hwm_kib * 1024 <= 40_000_000 && flat)
        ),
    )
}

/// Live data at 1 000 msg/s; the cloud is down for `outage_s`, then back;
/// drain rate = messages queued during the outage / time until the
/// subscriber has them, while live data keeps coming.
async fn backlog(dir: PathBuf, outage_s: u64) -> Row {
    let mut cloud = Mosquitto::start(&dir, "cloud-backlog", "");
    let local_port = free_port();
    let gw = Edgebridge::start(
        &dir,
        "backlog",
        &bridge_gateway_yaml(&dir.join("eb-backlog"), cloud.port, local_port, 1),
    );
    let mut events = subscriber(cloud.port, "backlog-sub", "site/#", 1, false).await;
    let publisher = publisher(local_port, "backlog-pub").await;
    wait_path(&publisher, &mut events).await;
    drain_now(&mut events);
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicU64::new(0));
    let producer = {
        let next = next.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            while stop.load(Ordering::Relaxed) == 0 {
                tick.tick().await;
                let seq = next.fetch_add(1, Ordering::Relaxed);
                publisher
                    .publish("bench/data", QoS::AtLeastOnce, false, payload(seq, 64))
                    .await
                    .expect("publish");
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let down_at = next.load(Ordering::Relaxed);
    cloud.stop();
    tokio::time::sleep(Duration::from_secs(outage_s)).await;
    let up_seq = next.load(Ordering::Relaxed);
    let cpu0 = proc_stats(gw.pid()).cpu_s;
    cloud.restart();
    let up = Instant::now();
    let mut seen = HashSet::new();
    // Every sequence number below this one has arrived.
    let mut low = down_at;
    let mut caught_up = None;
    let deadline = up + Duration::from_secs(600);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Some(s)) if s.topic == "site/bench/data" => {
                seen.insert(s.seq);
                while seen.contains(&low) {
                    low += 1;
                }
                if low >= up_seq {
                    caught_up = Some(s.at);
                    break;
                }
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    stop.store(1, Ordering::Relaxed);
    let _ = producer.await;
    let cpu = proc_stats(gw.pid()).cpu_s - cpu0;
    let backlog = up_seq - down_at;
    let missing = (down_at..up_seq).filter(|q| !seen.contains(q)).count();
    let (rate, secs) = match caught_up {
        Some(at) => {
            let s = (at - up).as_secs_f64();
            (backlog as f64 / s, s)
        }
        None => (0.0, f64::NAN),
    };
    row(
        format!("backlog drain after a {outage_s} s outage at 1 000 msg/s (live data keeps flowing), QoS 1"),
        "edgebridge",
        format!(
            "{backlog} queued, drained in {secs:.1} s = {rate:.0} msg/s; {missing} missing"
        ),
        Some(cpu),
        Some(proc_stats(gw.pid())),
        format!("≥ 20 000 msg/s: {}", verdict(rate >= 20_000.0 && missing == 0)),
    )
}

// ---------------------------------------------------------------- main

fn print_table(rows: &[Row]) {
    println!("| scenario | system | result | CPU s | peak RSS MiB | final RSS MiB | target |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.scenario, r.system, r.result, r.cpu_s, r.peak_rss, r.final_rss, r.target
        );
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    base();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1)?.parse::<u64>().ok())
    };
    let long = value("--long").unwrap_or(if smoke { 5 } else { 600 });
    // The outage of the backlog scenario: the target is for 10 minutes,
    // whatever `--long` says for the memory scenarios.
    let outage = value("--outage").unwrap_or(long.min(600));
    let n = value("--messages").unwrap_or(if smoke { 2_000 } else { 100_000 });
    let short = if smoke { 2 } else { 20 };
    let rounds = value("--rounds").unwrap_or(1).max(1);
    let bin = gateway_binary();
    assert!(
        bin.exists(),
        "{} is missing: build it first (bench/run.sh does)",
        bin.display()
    );
    let dir = dir_tmp();
    println!(
        "# edgebridge suite: {} ({}), {} CPUs, long scenarios {long} s\n",
        bin.display(),
        if cfg!(debug_assertions) {
            "suite is a debug build"
        } else {
            "release"
        },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    // `--only short` or `--only long`: one half of the suite.
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str);
    let mut rows = Vec::new();
    if only == Some("bridge") {
        bridge_throughput(&dir, n, rounds, &mut rows).await;
    } else if only == Some("latency") {
        latency(&dir, short, &mut rows).await;
    } else if only == Some("pipeline") {
        pipeline(&dir, short.min(10), &mut rows).await;
    } else if only != Some("long") {
        binary_size(&mut rows);
        startup(&dir, &mut rows).await;
        bridge_throughput(&dir, n, rounds, &mut rows).await;
        latency(&dir, short, &mut rows).await;
        pipeline(&dir, short.min(10), &mut rows).await;
    }
    if only.is_none() || only == Some("long") {
        // The long ones run together (they are light): memory on the
        // shipped config, 100 Modbus devices, and the outage.
        let (a, b, c) = tokio::join!(
            memory_shipped(dir.clone(), long),
            memory_modbus(dir.clone(), long),
            backlog(dir.clone(), outage)
        );
        rows.extend([a, b, c]);
    }
    println!();
    print_table(&rows);
}
