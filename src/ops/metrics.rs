//! The Prometheus endpoint (opt-in `metrics: { bind: 127.0.0.1:9100 }`)
//! and every metric edgebridge records.
//!
//! Components record through the functions here, never with the `metrics`
//! macros directly, so the names below are the complete list and one place
//! owns each name, its labels and its help text. Without an endpoint no
//! recorder is installed and every call is a cheap no-op.
//!
//! Names follow Prometheus conventions: `edgebridge_` prefix, base units
//! (seconds, bytes), `_total` for counters.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics::{counter, gauge, histogram, Unit};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

use crate::bridge::BridgeStatus;
use crate::config::MetricsConfig;

/// Set once the endpoint's recorder is installed. Without it every
/// recording function returns at once (no label strings are built on the
/// hot paths) and watchers that only feed metrics are not started.
static INSTALLED: AtomicBool = AtomicBool::new(false);

fn enabled() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

/// Every metric name, with its help text, in the order the README lists
/// them.
pub mod names {
    /// Polls of a device (one per poll interval), whatever their outcome.
    pub const DEVICE_POLLS: &str = "edgebridge_device_polls_total";
    /// Polls that failed (an I/O or protocol error, a Modbus exception).
    pub const DEVICE_ERRORS: &str = "edgebridge_device_errors_total";
    /// Polls that got no answer within the device's `timeout`.
    pub const DEVICE_TIMEOUTS: &str = "edgebridge_device_timeouts_total";
    /// Unix time of the device's last successful poll.
    pub const DEVICE_LAST_SUCCESS: &str = "edgebridge_device_last_success_timestamp_seconds";
    /// How long a poll of a device took.
    pub const DEVICE_POLL_DURATION: &str = "edgebridge_device_poll_duration_seconds";
    /// 1 while the device's status is online, 0 while offline.
    pub const DEVICE_UP: &str = "edgebridge_device_up";
    /// Readings the drivers produced, per device.
    pub const READINGS: &str = "edgebridge_readings_total";
    /// How long one request on a serial port (an RS-485/RS-232 bus) held
    /// the bus, answer included. `rate(..._sum[5m])` is the bus utilisation
    /// (0..1).
    pub const SERIAL_BUS_REQUEST: &str = "edgebridge_serial_bus_request_duration_seconds";
    /// Messages the pipeline (mappings, rules) published on the bus.
    pub const PIPELINE_MESSAGES: &str = "edgebridge_pipeline_messages_total";
    /// Messages handed to the local bus by the gateway (pipeline, status,
    /// commands).
    pub const BUS_MESSAGES: &str = "edgebridge_bus_messages_total";
    /// Client connections open on the embedded broker's listeners.
    pub const BROKER_CONNECTIONS: &str = "edgebridge_broker_connections";
    /// Commands carried out, by `result` (`ok` / `error`).
    pub const COMMANDS: &str = "edgebridge_commands_total";
    /// Calls of a rule function, per file and function.
    pub const RULE_CALLS: &str = "edgebridge_rule_calls_total";
    /// Rule calls that failed (script error, limit, deadline).
    pub const RULE_ERRORS: &str = "edgebridge_rule_errors_total";
    /// How long a rule call took.
    pub const RULE_DURATION: &str = "edgebridge_rule_duration_seconds";
    /// 1 while the bridge is connected to its remote broker.
    pub const BRIDGE_CONNECTED: &str = "edgebridge_bridge_connected";
    /// Messages waiting in the bridge's durable queue.
    pub const BRIDGE_QUEUE_MESSAGES: &str = "edgebridge_bridge_queue_messages";
    /// Bytes in the bridge's durable queue.
    pub const BRIDGE_QUEUE_BYTES: &str = "edgebridge_bridge_queue_bytes";
    /// Messages the remote broker acknowledged.
    pub const BRIDGE_FORWARDED: &str = "edgebridge_bridge_forwarded_total";
    /// Messages dropped because the queue was full (oldest first).
    pub const BRIDGE_DROPPED: &str = "edgebridge_bridge_dropped_total";
    /// Messages sent again after a reconnect.
    pub const BRIDGE_REDELIVERED: &str = "edgebridge_bridge_redelivered_total";
    /// Config reloads (SIGHUP), by `result` (`ok` / `error`).
    pub const RELOADS: &str = "edgebridge_config_reloads_total";
    /// Logins the embedded broker refused (bad or missing credentials).
    pub const BROKER_LOGINS_REFUSED: &str = "edgebridge_broker_logins_refused_total";
    /// Subscriptions and publishes the broker's ACL denied, by `action`
    /// (`subscribe` / `publish`).
    pub const BROKER_ACL_DENIED: &str = "edgebridge_broker_acl_denied_total";
    /// Messages the broker dropped for a client (offline queue full,
    /// expired, refused by the client), by `reason`.
    pub const BROKER_DROPPED: &str = "edgebridge_broker_dropped_total";
    /// Messages dropped for an in-process subscriber (a bridge, the rules)
    /// that took nothing for 5 s.
    pub const BUS_DROPPED: &str = "edgebridge_bus_dropped_total";
    /// Always 1; the `version` label carries the build's version.
    pub const BUILD_INFO: &str = "edgebridge_build_info";
}

use names::*;

/// Histogram buckets for durations, in seconds: from a fast TCP read to a
/// slow RS-485 poll.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics endpoint on {addr}: {source}")]
    Endpoint {
        addr: SocketAddr,
        source: BuildError,
    },
    #[error("a metrics recorder is already installed in this process")]
    AlreadyInstalled,
}

/// The running endpoint.
pub struct Endpoint {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Endpoint {
    pub fn stop(self) {
        self.task.abort();
    }
}

/// How often histogram samples are folded into their buckets when nobody
/// scrapes (metrics-exporter-prometheus 0.13 has no upkeep of its own).
const UPKEEP: Duration = Duration::from_secs(5);

/// Binds the endpoint and installs the process-wide recorder. Must run
/// inside the tokio runtime; can succeed once per process.
pub fn install(config: &MetricsConfig) -> Result<Endpoint, MetricsError> {
    let addr = config.bind;
    let err = |source| MetricsError::Endpoint { addr, source };
    let mut builder = PrometheusBuilder::new().with_http_listener(addr);
    for h in [DEVICE_POLL_DURATION, RULE_DURATION, SERIAL_BUS_REQUEST] {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(h.to_string()), DURATION_BUCKETS)
            .map_err(err)?;
    }
    let (recorder, exporter) = builder.build().map_err(err)?;
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|_| MetricsError::AlreadyInstalled)?;
    INSTALLED.store(true, Ordering::Relaxed);
    describe();
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    let task = tokio::spawn(async move {
        // The exporter keeps every histogram sample until the next scrape
        // folds it into the buckets: with nobody scraping, memory would grow
        // by 8 bytes a sample for ever. Folding them here bounds it.
        let upkeep = async {
            let mut tick = tokio::time::interval(UPKEEP);
            loop {
                tick.tick().await;
                drop(handle.render());
            }
        };
        tokio::select! {
            r = exporter => if let Err(e) = r {
                tracing::error!(error = %e, "the metrics endpoint stopped");
            },
            () = upkeep => {}
        }
    });
    tracing::info!(%addr, "metrics endpoint listening");
    Ok(Endpoint { addr, task })
}

/// One metric's kind, unit and the help text the endpoint shows.
struct Metric {
    name: &'static str,
    kind: Kind,
    unit: Option<Unit>,
    help: &'static str,
}

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Metric {
    const fn counter(name: &'static str, unit: Option<Unit>, help: &'static str) -> Metric {
        Metric {
            name,
            kind: Kind::Counter,
            unit,
            help,
        }
    }

    const fn gauge(name: &'static str, unit: Option<Unit>, help: &'static str) -> Metric {
        Metric {
            name,
            kind: Kind::Gauge,
            unit,
            help,
        }
    }

    const fn histogram(name: &'static str, unit: Option<Unit>, help: &'static str) -> Metric {
        Metric {
            name,
            kind: Kind::Histogram,
            unit,
            help,
        }
    }
}

const SECONDS: Option<Unit> = Some(Unit::Seconds);
const BYTES: Option<Unit> = Some(Unit::Bytes);

/// Every metric the gateway records.
#[rustfmt::skip] // a table: one metric a line
const METRICS: &[Metric] = &[
    Metric::counter(DEVICE_POLLS, None, "Polls of a device, whatever their outcome."),
    Metric::counter(DEVICE_ERRORS, None, "Polls that failed with an error."),
    Metric::counter(DEVICE_TIMEOUTS, None, "Polls that got no answer in time."),
    Metric::gauge(DEVICE_LAST_SUCCESS, SECONDS, "Unix time of the last successful poll."),
    Metric::histogram(DEVICE_POLL_DURATION, SECONDS, "How long a poll took."),
    Metric::gauge(DEVICE_UP, None, "1 while the device is online."),
    Metric::counter(READINGS, None, "Readings produced by the drivers."),
    Metric::histogram(SERIAL_BUS_REQUEST, SECONDS, "How long a request held a serial bus."),
    Metric::counter(PIPELINE_MESSAGES, None, "Messages published by mappings and rules."),
    Metric::counter(BUS_MESSAGES, None, "Messages the gateway handed to the local bus."),
    Metric::gauge(BROKER_CONNECTIONS, None, "Client connections on the embedded broker."),
    Metric::counter(COMMANDS, None, "Device commands carried out, by result."),
    Metric::counter(RULE_CALLS, None, "Calls of rule functions."),
    Metric::counter(RULE_ERRORS, None, "Rule calls that failed."),
    Metric::histogram(RULE_DURATION, SECONDS, "How long a rule call took."),
    Metric::gauge(BRIDGE_CONNECTED, None, "1 while the bridge is connected."),
    Metric::gauge(BRIDGE_QUEUE_MESSAGES, None, "Messages in the bridge's durable queue."),
    Metric::gauge(BRIDGE_QUEUE_BYTES, BYTES, "Bytes in the bridge's durable queue."),
    Metric::counter(BRIDGE_FORWARDED, None, "Messages acknowledged by the remote broker."),
    Metric::counter(BRIDGE_DROPPED, None, "Messages dropped from a full queue."),
    Metric::counter(BRIDGE_REDELIVERED, None, "Messages sent again after a reconnect."),
    Metric::counter(RELOADS, None, "Config reloads, by result."),
    Metric::counter(BROKER_LOGINS_REFUSED, None, "Logins the embedded broker refused."),
    Metric::counter(BROKER_ACL_DENIED, None,
        "Subscriptions and publishes denied by the broker's ACL, by action."),
    Metric::counter(BROKER_DROPPED, None, "Messages the broker dropped for a client, by reason."),
    Metric::counter(BUS_DROPPED, None, "Messages dropped for a stalled in-process subscriber."),
    Metric::gauge(BUILD_INFO, None, "Always 1; the version label tells the build."),
];

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    for m in METRICS {
        let (name, help) = (m.name, m.help);
        match (m.kind, m.unit) {
            (Kind::Counter, Some(u)) => describe_counter!(name, u, help),
            (Kind::Counter, None) => describe_counter!(name, help),
            (Kind::Gauge, Some(u)) => describe_gauge!(name, u, help),
            (Kind::Gauge, None) => describe_gauge!(name, help),
            (Kind::Histogram, Some(u)) => describe_histogram!(name, u, help),
            (Kind::Histogram, None) => describe_histogram!(name, help),
        }
    }
}

/// How one poll of a device ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollOutcome {
    Ok,
    Error,
    Timeout,
}

/// One poll of `device` that took `elapsed`.
pub fn device_poll(device: &str, outcome: PollOutcome, elapsed: Duration) {
    if !enabled() {
        return;
    }
    let d = device.to_string();
    counter!(DEVICE_POLLS, "device" => d.clone()).increment(1);
    histogram!(DEVICE_POLL_DURATION, "device" => d.clone()).record(elapsed.as_secs_f64());
    match outcome {
        PollOutcome::Ok => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            gauge!(DEVICE_LAST_SUCCESS, "device" => d).set(now.as_secs_f64());
        }
        PollOutcome::Error => counter!(DEVICE_ERRORS, "device" => d).increment(1),
        PollOutcome::Timeout => counter!(DEVICE_TIMEOUTS, "device" => d).increment(1),
    }
}

pub fn device_up(device: &str, up: bool) {
    if !enabled() {
        return;
    }
    gauge!(DEVICE_UP, "device" => device.to_string()).set(if up { 1.0 } else { 0.0 });
}

pub fn readings(device: &str, n: usize) {
    if !enabled() {
        return;
    }
    counter!(READINGS, "device" => device.to_string()).increment(n as u64);
}

/// Time `port` (e.g. `/dev/ttyUSB0`) was held by one request and its
/// answer (or its timeout).
pub fn serial_bus_request(port: &str, busy: Duration) {
    if !enabled() {
        return;
    }
    histogram!(SERIAL_BUS_REQUEST, "port" => port.to_string()).record(busy.as_secs_f64());
}

pub fn pipeline_messages(n: usize) {
    if !enabled() {
        return;
    }
    counter!(PIPELINE_MESSAGES).increment(n as u64);
}

pub fn bus_message() {
    if !enabled() {
        return;
    }
    counter!(BUS_MESSAGES).increment(1);
}

pub fn broker_connections(n: usize) {
    if !enabled() {
        return;
    }
    gauge!(BROKER_CONNECTIONS).set(n as f64);
}

pub fn command(device: &str, ok: bool) {
    if !enabled() {
        return;
    }
    let result = if ok { "ok" } else { "error" };
    counter!(COMMANDS, "device" => device.to_string(), "result" => result).increment(1);
}

/// One call of `function` in rule file `file`.
pub fn rule_call(file: &str, function: &str, ok: bool, elapsed: Duration) {
    if !enabled() {
        return;
    }
    let f = file.to_string();
    counter!(RULE_CALLS, "file" => f.clone(), "function" => function.to_string()).increment(1);
    histogram!(RULE_DURATION, "file" => f.clone()).record(elapsed.as_secs_f64());
    if !ok {
        counter!(RULE_ERRORS, "file" => f).increment(1);
    }
}

pub fn bridge_connected(bridge: &str, connected: bool) {
    if !enabled() {
        return;
    }
    gauge!(BRIDGE_CONNECTED, "bridge" => bridge.to_string()).set(if connected { 1.0 } else { 0.0 });
}

pub fn bridge_queue(bridge: &str, messages: u64, bytes: u64) {
    if !enabled() {
        return;
    }
    gauge!(BRIDGE_QUEUE_MESSAGES, "bridge" => bridge.to_string()).set(messages as f64);
    gauge!(BRIDGE_QUEUE_BYTES, "bridge" => bridge.to_string()).set(bytes as f64);
}

pub fn bridge_forwarded(bridge: &str, n: u64) {
    if !enabled() {
        return;
    }
    counter!(BRIDGE_FORWARDED, "bridge" => bridge.to_string()).increment(n);
}

pub fn bridge_dropped(bridge: &str, n: u64) {
    if !enabled() {
        return;
    }
    counter!(BRIDGE_DROPPED, "bridge" => bridge.to_string()).increment(n);
}

pub fn bridge_redelivered(bridge: &str, n: u64) {
    if !enabled() {
        return;
    }
    counter!(BRIDGE_REDELIVERED, "bridge" => bridge.to_string()).increment(n);
}

/// Follows a bridge's status (cumulative since the bridge started) into
/// the bridge metrics until the bridge ends. Counters only ever grow: after
/// a restart of the bridge (a reload) its new counts are added on top.
pub fn watch_bridge(bridge: &str, mut status: tokio::sync::watch::Receiver<BridgeStatus>) {
    if !enabled() {
        return;
    }
    let bridge = bridge.to_string();
    tokio::spawn(async move {
        let mut last = (0u64, 0u64, 0u64);
        loop {
            let now = {
                let s = status.borrow_and_update();
                bridge_connected(&bridge, s.connected);
                bridge_queue(&bridge, s.queue_depth, s.queue_bytes);
                (s.forwarded, s.dropped, s.redelivered)
            };
            bridge_forwarded(&bridge, now.0.saturating_sub(last.0));
            bridge_dropped(&bridge, now.1.saturating_sub(last.1));
            bridge_redelivered(&bridge, now.2.saturating_sub(last.2));
            last = now;
            if status.changed().await.is_err() {
                // The bridge ended: it is not connected any more.
                bridge_connected(&bridge, false);
                return;
            }
        }
    });
}

pub fn reload(ok: bool) {
    if !enabled() {
        return;
    }
    counter!(RELOADS, "result" => if ok { "ok" } else { "error" }).increment(1);
}

pub fn broker_login_refused() {
    if !enabled() {
        return;
    }
    counter!(BROKER_LOGINS_REFUSED).increment(1);
}

/// `action`: `subscribe` or `publish`.
pub fn broker_acl_denied(action: &'static str) {
    if !enabled() {
        return;
    }
    counter!(BROKER_ACL_DENIED, "action" => action).increment(1);
}

pub fn broker_dropped(reason: &'static str) {
    if !enabled() {
        return;
    }
    counter!(BROKER_DROPPED, "reason" => reason).increment(1);
}

pub fn bus_dropped() {
    if !enabled() {
        return;
    }
    counter!(BUS_DROPPED).increment(1);
}
