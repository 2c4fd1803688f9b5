//! Modbus throughput and request economy, recorded in BENCHMARKS.md.
//!
//! `cargo bench --bench modbus_tcp` (release). For a quick look in a debug
//! build: `cargo test --bench modbus_tcp -- --full` (numbers are then far
//! lower; without `--full` it only runs a smoke pass).
//!
//! 1. Requests and bytes per poll cycle for scattered point maps: one
//!    request per point, coalesced without gaps, and with the default
//!    `max_gap` 8 (what edgebridge does), against the minimum (the points'
//!    own data).
//! 2. Polls per second of the whole gateway (modbus-tcp driver, pipeline,
//!    mappings, embedded broker) against a local tokio-modbus TCP server,
//!    with 1, 10 and 100 devices polled as fast as they answer.
//! 3. Bytes on the wire per poll, measured on a live session, against the
//!    computed value and the minimum.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgebridge::config::{Config, Table};
use edgebridge::drivers::modbus::device::Device;
use edgebridge::drivers::modbus::plan::{Limits, Plan, Span};
use edgebridge::drivers::modbus::session::{Endpoint, Session};
use edgebridge::gateway::Gateway;
use tokio_modbus::prelude::*;
use tokio_modbus::server::Service;

/// Bytes of a Modbus TCP read: request (MBAP 7 + fc, address, count 5)
/// and response (MBAP 7 + fc, byte count 2 + data).
fn tcp_read_bytes(table: Table, count: u16) -> u64 {
    let data = match table {
        Table::Coil | Table::Discrete => u64::from(count).div_ceil(8),
        _ => 2 * u64::from(count),
    };
    12 + 9 + data
}

/// The points' own data: what a poll must transfer at the very least.
fn payload_bytes(spans: &[Span]) -> u64 {
    spans
        .iter()
        .map(|s| match s.table {
            Table::Coil | Table::Discrete => 1,
            _ => 2 * u64::from(s.len),
        })
        .sum()
}

fn plan_bytes(plan: &Plan) -> u64 {
    plan.blocks()
        .iter()
        .map(|b| tcp_read_bytes(b.table, b.count))
        .sum()
}

/// `n` register points of 1 or 2 registers, 1 to 12 registers apart (a
/// typical sparse register map), from a fixed seed.
fn scattered(n: usize) -> Vec<Span> {
    let mut x: u32 = 0x2545_F491;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    let mut addr: u32 = 0;
    (0..n)
        .map(|_| {
            let len = 1 + (next() % 2) as u16;
            let span = Span {
                table: Table::Holding,
                start: addr as u16,
                len,
            };
            addr += u32::from(len) + next() % 12;
            span
        })
        .collect()
}

fn economy() {
    println!("## Requests and bytes per poll cycle (Modbus TCP framing)\n");
    println!("| points | one request per point | coalesced, max_gap 0 | coalesced, max_gap 8 (default) | max_gap 8, max_registers 32 | minimum payload |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for n in [10, 50, 100, 500] {
        let spans = scattered(n);
        let one_each: u64 = spans.iter().map(|s| tcp_read_bytes(s.table, s.len)).sum();
        let cell = |limits: Limits| {
            let plan = Plan::new(spans.clone(), limits);
            format!("{} req / {} B", plan.blocks().len(), plan_bytes(&plan))
        };
        let gap0 = Limits {
            max_gap: 0,
            ..Limits::default()
        };
        let small = Limits {
            max_registers: 32,
            ..Limits::default()
        };
        println!(
            "| {n} | {n} req / {one_each} B | {} | {} | {} | {} B |",
            cell(gap0),
            cell(Limits::default()),
            cell(small),
            payload_bytes(&spans)
        );
    }
    println!();
}

/// A Modbus TCP server whose holding/input registers hold their address.
struct Server {
    requests: Arc<AtomicU64>,
}

impl Service for Server {
    type Request = SlaveRequest<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = std::future::Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let words = |a: u16, n: u16| (a..a.saturating_add(n)).collect::<Vec<u16>>();
        std::future::ready(match req.request {
            Request::ReadHoldingRegisters(a, n) => Ok(Response::ReadHoldingRegisters(words(a, n))),
            Request::ReadInputRegisters(a, n) => Ok(Response::ReadInputRegisters(words(a, n))),
            Request::ReadCoils(_, n) => Ok(Response::ReadCoils(vec![true; n.into()])),
            _ => Err(ExceptionCode::IllegalFunction),
        })
    }
}

async fn start_server() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicU64::new(0));
    let counter = requests.clone();
    tokio::spawn(async move {
        let server = tokio_modbus::server::tcp::Server::new(listener);
        let on_connected = |stream, peer| {
            let requests = counter.clone();
            async move {
                tokio_modbus::server::tcp::accept_tcp_connection(stream, peer, |_| {
                    Ok(Some(Server {
                        requests: requests.clone(),
                    }))
                })
            }
        };
        let _ = server.serve(&on_connected, |_| {}).await;
    });
    (addr, requests)
}

/// A meter-like device: 12 points in three tables.
const POINTS: &str = "      - { name: v1, table: holding, address: 0, type: f32 }
      - { name: v2, table: holding, address: 2, type: f32 }
      - { name: v3, table: holding, address: 4, type: f32 }
      - { name: i1, table: holding, address: 10, type: f32 }
      - { name: p, table: holding, address: 14, type: i32, scale: 0.1 }
      - { name: e, table: holding, address: 20, type: u64 }
      - { name: t, table: holding, address: 40, type: i16, scale: 0.1 }
      - { name: model, table: holding, address: 100, type: string, length: 8 }
      - { name: f, table: input, address: 0 }
      - { name: s, table: input, address: 3 }
      - { name: run, table: coil, address: 0 }
      - { name: alarm, table: coil, address: 9 }
";

fn config(addr: SocketAddr, devices: usize) -> Config {
    let mut yaml = String::from(
        "gateway: { id: bench, data_dir: /tmp/edgebridge-bench }\n\
         broker:\n  listeners: [{ bind: \"127.0.0.1:0\", protocol: mqtt }]\n\
         mappings:\n  - { match: \"*/*\", topic: \"d/{device}/{point}\" }\n\
         devices:\n",
    );
    for i in 0..devices {
        yaml.push_str(&format!(
            "  - name: m{i}\n    driver: modbus-tcp\n    address: \"{addr}\"\n    slave: 1\n    poll: 1ms\n    points:\n{POINTS}"
        ));
    }
    Config::from_text(Path::new("bench.yaml"), &yaml, |_| None).expect("bench config")
}

async fn throughput(window: Duration) {
    let (probe, _) = start_server().await;
    let per_poll = Device::from_config(&config(probe, 1).devices[0])
        .plan()
        .blocks()
        .len();
    println!("## Polls per second, whole gateway, local Modbus TCP server\n");
    println!(
        "Each device: 12 points in {per_poll} requests per poll, `poll: 1ms` (as fast as it \
         answers), its own TCP connection; every reading mapped to a topic on the embedded broker.\n"
    );
    println!("| devices | polls/s | requests/s | readings/s |");
    println!("|---:|---:|---:|---:|");
    for devices in [1usize, 10, 100] {
        let (addr, requests) = start_server().await;
        let cfg = config(addr, devices);
        let per_poll = Device::from_config(&cfg.devices[0]).plan().blocks().len() as u64;
        let gw = Gateway::start(cfg).await.expect("gateway starts");
        tokio::time::sleep(Duration::from_millis(500)).await; // connect, warm up
        let r0 = requests.load(Ordering::Relaxed);
        let t0 = Instant::now();
        tokio::time::sleep(window).await;
        let r1 = requests.load(Ordering::Relaxed);
        let secs = t0.elapsed().as_secs_f64();
        gw.shutdown().await;
        let rps = (r1 - r0) as f64 / secs;
        let polls = rps / per_poll as f64;
        println!(
            "| {devices} | {polls:.0} | {rps:.0} | {:.0} |",
            polls * 12.0
        );
    }
    println!();
}

async fn wire_bytes() {
    println!("## Bytes on the wire per poll, measured\n");
    let (addr, _) = start_server().await;
    let cfg = config(addr, 1);
    let device = Device::from_config(&cfg.devices[0]);
    let mut device = device;
    let mut session = Session::new(Endpoint::Tcp {
        address: addr.to_string(),
    });
    session
        .open(Duration::from_secs(1))
        .await
        .expect("connects");
    let polls = 100u64;
    for _ in 0..polls {
        let (_, r) = device.poll(&mut session).await;
        r.expect("poll ok");
    }
    let (rx, tx) = session.counters();
    let spans = device.spans();
    let computed = plan_bytes(device.plan());
    let one_each: u64 = spans.iter().map(|s| tcp_read_bytes(s.table, s.len)).sum();
    println!("| | bytes per poll |");
    println!("|---|---:|");
    println!("| measured (sent + received) | {} |", (rx + tx) / polls);
    println!(
        "| computed for the plan ({} requests) | {computed} |",
        device.plan().blocks().len()
    );
    println!(
        "| one request per point ({} requests) | {one_each} |",
        spans.len()
    );
    println!("| minimum (the points' data) | {} |", payload_bytes(&spans));
    println!();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--bench" || a == "--full");
    economy();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        wire_bytes().await;
        let window = if full {
            Duration::from_secs(5)
        } else {
            Duration::from_millis(300)
        };
        throughput(window).await;
    });
    // The embedded broker's router thread never ends.
    rt.shutdown_timeout(Duration::from_millis(200));
}
