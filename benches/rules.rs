//! What rules cost: nanoseconds per `on_reading` call, and readings per
//! second end to end (simulator -> pipeline -> embedded broker -> an MQTT
//! client over TCP) with no rules, a trivial rule and the shipped pv.rhai.
//!
//! `cargo bench --bench rules` (release). Results go to BENCHMARKS.md.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgebridge::config::{Config, ListenerProtocol};
use edgebridge::gateway::Gateway;
use edgebridge::model::{Quality, Reading, Value};
use edgebridge::pipeline::rules::Rules;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const TRIVIAL: &str = "fn on_reading(r) { }";

fn pv_source() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/pv.rhai"))
        .expect("rules/pv.rhai")
}

fn reading(device: &str, point: &str, value: f64, ts: i64) -> Reading {
    Reading {
        device: Arc::from(device),
        point: Arc::from(point),
        value: Value::Float(value),
        unit: Some(Arc::from("W")),
        ts,
        quality: Quality::Good,
    }
}

/// Median ns per call over 5 rounds of `n` calls.
fn per_call(rules: &Rules, device: &str, n: u32) -> f64 {
    let mut rounds = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        for i in 0..n {
            let r = reading(device, "power", 1500.0 + (i % 100) as f64, i as i64 * 1000);
            std::hint::black_box(rules.on_reading(&r));
        }
        rounds.push(t.elapsed().as_nanos() as f64 / n as f64);
    }
    rounds.sort_by(|a, b| a.total_cmp(b));
    rounds[2]
}

fn micro() {
    let deadline = Duration::from_secs(1);
    let none = Rules::empty(deadline);
    let trivial =
        Rules::from_sources(vec![(PathBuf::from("t.rhai"), TRIVIAL.into())], deadline).unwrap();
    let mut pv =
        Rules::from_sources(vec![(PathBuf::from("pv.rhai"), pv_source())], deadline).unwrap();
    pv.start();
    let n = 20_000;
    println!("| rule | ns per reading |");
    println!("|---|---|");
    println!(
        "| none (no `on_reading`) | {:.0} |",
        per_call(&none, "demo-pv", n)
    );
    println!(
        "| trivial `fn on_reading(r) {{ }}` | {:.0} |",
        per_call(&trivial, "demo-pv", n)
    );
    println!(
        "| pv.rhai, another device (returns at once) | {:.0} |",
        per_call(&pv, "meter", n)
    );
    println!(
        "| pv.rhai, demo-pv/power (2 publishes, hysteresis) | {:.0} |",
        per_call(&pv, "demo-pv", n)
    );
}

/// Messages per second a subscriber receives for `secs`, after a warm-up.
async fn end_to_end(rules: Option<&str>, points: usize, secs: u64) -> Rates {
    let dir = tempfile::tempdir().unwrap();
    let rules_dir = dir.path().join("rules");
    std::fs::create_dir(&rules_dir).unwrap();
    if let Some(src) = rules {
        std::fs::write(rules_dir.join("r.rhai"), src).unwrap();
    }
    let points: String = (0..points)
        .map(|i| format!("      - {{ name: p{i}, wave: ramp, unit: W }}\n"))
        .collect();
    let yaml = format!(
        "gateway: {{ id: bench, data_dir: {data} }}\nbroker:\n  listeners:\n    - {{ bind: \"127.0.0.1:0\", protocol: mqtt }}\ndevices:\n  - name: demo-pv\n    driver: simulator\n    poll: 1ms\n    points:\n      - {{ name: power, wave: ramp, max: 5000, unit: W }}\n{points}mappings:\n  - {{ match: '*/*', topic: 'b/{{device}}/{{point}}' }}\n{rules}",
        data = dir.path().display(),
        rules = if rules.is_some() {
            format!("rules: {{ dir: {}, deadline: 1s }}\n", rules_dir.display())
        } else {
            String::new()
        }
    );
    let config = Config::from_text(Path::new("bench.yaml"), &yaml, |_| None).unwrap();
    let gw = Gateway::start(config).await.unwrap();
    let addr = gw.listener(ListenerProtocol::Mqtt).unwrap();
    let mut o = MqttOptions::new("bench-sub", addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = AsyncClient::new(o, 100);
    client.subscribe("b/#", QoS::AtMostOnce).await.unwrap();
    client.subscribe("PV/#", QoS::AtMostOnce).await.unwrap();
    // Warm up for a second, then count for `secs`.
    let warm = Instant::now() + Duration::from_secs(1);
    while Instant::now() < warm {
        let _ = tokio::time::timeout(warm - Instant::now(), el.poll()).await;
    }
    let calls = |gw: &Gateway| {
        let rt = gw.rules().cloned();
        async move {
            match rt {
                Some(r) => r.stats().await.iter().map(|s| s.calls).sum::<u64>(),
                None => 0,
            }
        }
    };
    let skipped = |gw: &Gateway| gw.rules().map_or(0, |r| r.bypassed());
    let (calls0, skipped0) = (calls(&gw).await, skipped(&gw));
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut count = 0u64;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        match tokio::time::timeout(end - now, el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(_)))) => count += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("subscriber: {e}"),
            Err(_) => break,
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (calls1, skipped1) = (calls(&gw).await, skipped(&gw));
    gw.shutdown().await;
    Rates {
        received: count as f64 / elapsed,
        through_rules: (calls1 - calls0) as f64 / elapsed,
        skipped: (skipped1 - skipped0) as f64 / elapsed,
    }
}

struct Rates {
    received: f64,
    through_rules: f64,
    skipped: f64,
}

fn main() {
    println!("## ns per on_reading call\n");
    micro();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let points: usize = std::env::var("BENCH_POINTS")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(200);
    println!(
        "\n## End to end: simulator ({} points, poll 1ms, offering up to {} readings/s) -> subscriber\n",
        points + 1,
        (points + 1) * 1000
    );
    println!("| rules | messages/s received | readings/s through the rules | readings/s that skipped the rules |");
    println!("|---|---|---|---|");
    let pv = pv_source();
    for (name, src) in [
        ("none", None),
        ("trivial", Some(TRIVIAL)),
        ("pv.rhai", Some(pv.as_str())),
    ] {
        let r = rt.block_on(end_to_end(src, points, 4));
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} |",
            r.received, r.through_rules, r.skipped
        );
    }
}
