//! Pipeline throughput: simulator readings -> mappings -> embedded broker
//! -> one MQTT subscriber over TCP, measured at the subscriber.
//!
//! `cargo bench --bench pipeline` (optionally `-- SECONDS`). Prints one row
//! per scenario; results go to BENCHMARKS.md by hand.

use std::path::Path;
use std::time::{Duration, Instant};

use edgebridge::config::{Config, ListenerProtocol};
use edgebridge::gateway::Gateway;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

fn config(points: usize, poll: &str, payload: &str) -> Config {
    let mut yaml = String::from(
        "gateway: { id: bench }\nbroker:\n  listeners:\n    - { bind: \"127.0.0.1:0\", protocol: mqtt }\ndevices:\n  - name: sim\n    driver: simulator\n",
    );
    yaml.push_str(&format!("    poll: {poll}\n    points:\n"));
    for i in 0..points {
        yaml.push_str(&format!(
            "      - {{ name: p{i}, wave: sine, min: 0, max: 5000, period: 60s, unit: W }}\n"
        ));
    }
    yaml.push_str(&format!(
        "mappings:\n  - {{ match: '*/*', topic: 'devices/{{device}}/{{point}}', payload: {payload} }}\n"
    ));
    Config::from_text(Path::new("bench.yaml"), &yaml, |_| None).expect("bench config")
}

async fn run(name: &str, config: Config, secs: u64) {
    let gw = Gateway::start(config).await.expect("gateway");
    let addr = gw.listener(ListenerProtocol::Mqtt).unwrap();
    let mut o = MqttOptions::new("bench-sub", addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = AsyncClient::new(o, 100);
    client
        .subscribe("devices/#", QoS::AtMostOnce)
        .await
        .unwrap();
    // Warm up until data flows.
    loop {
        if let Ok(Event::Incoming(Packet::Publish(_))) = el.poll().await {
            break;
        }
    }
    let start = Instant::now();
    let cpu0 = cpu_seconds();
    let mut n: u64 = 0;
    let end = start + Duration::from_secs(secs);
    while Instant::now() < end {
        if let Ok(Ok(Event::Incoming(Packet::Publish(_)))) =
            tokio::time::timeout(Duration::from_millis(100), el.poll()).await
        {
            n += 1;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    println!(
        "| {name} | {:.0} | {:.2} | {} |",
        n as f64 / elapsed,
        cpu / elapsed,
        rss_mib()
    );
    gw.shutdown().await;
}

/// User + system CPU seconds of this process (Linux /proc).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn rss_mib() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| format!("{:.1}", kb / 1024.0))
        .unwrap_or_else(|| "?".into())
}

fn main() {
    let secs: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!("| scenario | readings/s at the subscriber | CPU cores used (whole process) | peak RSS MiB (whole process) |");
    println!("|---|---|---|---|");
    rt.block_on(async {
        run(
            "1000 points every 10ms, value payload",
            config(1000, "10ms", "value"),
            secs,
        )
        .await;
        run(
            "1000 points every 10ms, json payload",
            config(1000, "10ms", "json"),
            secs,
        )
        .await;
        run(
            "2000 points every 5ms, value payload",
            config(2000, "5ms", "value"),
            secs,
        )
        .await;
    });
}
