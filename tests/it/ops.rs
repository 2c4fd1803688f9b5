//! Running as a service: the systemd unit, the sd_notify protocol from the
//! real binary, `config default`, and the health summary.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::net::UnixDatagram;

use crate::support::{self, Client};

/// The unit's `[Service]` settings; repeated keys keep every value.
fn unit_settings() -> HashMap<String, Vec<String>> {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/edgebridge.service");
    let text = std::fs::read_to_string(unit).unwrap();
    let mut section = String::new();
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            section = line.to_string();
            continue;
        }
        let (k, v) = line.split_once('=').expect("key=value");
        out.entry(format!("{section}{k}"))
            .or_default()
            .push(v.to_string());
    }
    out
}

#[test]
fn the_unit_runs_a_hardened_notify_service() {
    let u = unit_settings();
    let one = |k: &str| -> &str {
        let v = u
            .get(&format!("[Service]{k}"))
            .unwrap_or_else(|| panic!("{k} missing"));
        assert_eq!(v.len(), 1, "{k} set more than once");
        &v[0]
    };
    assert_eq!(one("Type"), "notify");
    assert!(humantime::parse_duration(one("WatchdogSec")).is_ok());
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("User"), "edgebridge");
    assert!(one("SupplementaryGroups")
        .split(' ')
        .any(|g| g == "dialout"));
    assert_eq!(one("StateDirectory"), "edgebridge");
    assert_eq!(one("ConfigurationDirectory"), "edgebridge");
    assert_eq!(
        one("ExecStartPre"),
        "/usr/bin/edgebridge check --config /etc/edgebridge/config.yaml"
    );
    assert_eq!(
        one("ExecStart"),
        "/usr/bin/edgebridge run --config /etc/edgebridge/config.yaml"
    );
    // Reload checks first; a failing check stops before the SIGHUP.
    assert_eq!(
        u["[Service]ExecReload"],
        [
            "/usr/bin/edgebridge check --config /etc/edgebridge/config.yaml",
            "/bin/kill -HUP $MAINPID"
        ]
    );
    for (k, v) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
    ] {
        assert_eq!(one(k), v, "{k}");
    }
    let families: Vec<&str> = one("RestrictAddressFamilies").split(' ').collect();
    for f in ["AF_UNIX", "AF_INET", "AF_INET6"] {
        assert!(families.contains(&f), "{f} not allowed");
    }
    assert_eq!(one("CapabilityBoundingSet"), "CAP_NET_BIND_SERVICE");
    // It would hide /dev/ttyUSB* from the serial drivers.
    assert!(!u.contains_key("[Service]PrivateDevices"));
    assert_eq!(u["[Install]WantedBy"], ["multi-user.target"]);
}

/// Reads datagrams until one contains `line`; returns everything read.
async fn wait_for(sock: &UnixDatagram, line: &str, within: Duration, seen: &mut Vec<String>) {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = vec![0u8; 4096];
    loop {
        if seen.iter().any(|m| m.lines().any(|l| l == line)) {
            return;
        }
        match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            Ok(Ok(n)) => seen.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Ok(Err(e)) => panic!("notify socket: {e}"),
            Err(_) => panic!("no {line} within {within:?}; got {seen:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_watchdog_and_stopping_reach_the_notify_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let port = support::free_port();
    std::fs::write(
        dir.path().join("config.yaml"),
        format!(
            "gateway: {{ id: sd-gw }}\nbroker:\n  listeners:\n    - {{ bind: \"127.0.0.1:{port}\", protocol: mqtt }}\ndevices:\n  - {{ name: d, driver: simulator, poll: 100ms, points: [{{ name: p, wave: sine }}] }}\nmappings:\n  - {{ match: '*/*', topic: 'x/{{point}}' }}\n"
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_edgebridge"))
        .args(["run"])
        .current_dir(dir.path())
        .env("NOTIFY_SOCKET", &sock_path)
        // 1s: the gateway checks its health and pings every 500ms.
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    let bin = support::Binary {
        child,
        stderr_path: dir.path().join("stderr.log"),
    };
    let mut seen = Vec::new();
    wait_for(&sock, "READY=1", Duration::from_secs(10), &mut seen).await;
    // READY means serving: the broker accepts at once, the device is online.
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = Client::connect(addr, "t-sd", &["edgebridge/sd-gw/#", "x/p"]).await;
    let dev = c
        .expect("edgebridge/sd-gw/devices/d/status", Duration::from_secs(2))
        .await;
    assert_eq!(dev.payload, "online");
    let ready = seen.iter().find(|m| m.contains("READY=1")).unwrap();
    assert!(
        ready.contains("STATUS=serving: 1 device(s), 1 listener(s)"),
        "{ready}"
    );
    // Healthy: the watchdog is pinged, and the summary is on the bus.
    wait_for(&sock, "WATCHDOG=1", Duration::from_secs(5), &mut seen).await;
    let health = c
        .expect("edgebridge/sd-gw/health", Duration::from_secs(5))
        .await;
    let h: serde_json::Value = serde_json::from_str(&health.payload).unwrap();
    assert_eq!(h["healthy"], true, "{h}");
    assert_eq!(h["devices_online"], 1, "{h}");
    bin.signal("TERM");
    wait_for(&sock, "STOPPING=1", Duration::from_secs(5), &mut seen).await;
    assert!(
        bin.stderr().contains("SIGTERM: shutting down"),
        "{}",
        bin.stderr()
    );
}

#[test]
fn config_default_prints_the_shipped_config_and_it_checks() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_edgebridge"))
        .args(["config", "default"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let shipped = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.yaml")).unwrap();
    assert_eq!(out.stdout, shipped);
    std::fs::write(dir.path().join("config.yaml"), &out.stdout).unwrap();
    copy_shipped_rules(dir.path());
    let check = Command::new(env!("CARGO_BIN_EXE_edgebridge"))
        .args(["check"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_summary_counts_devices_and_round_trips() {
    let gw = support::start(&support::yaml_with_broker(
        "devices:\n  - { name: a, driver: simulator, poll: 50ms, points: [{ name: p, wave: sine }] }\n  - { name: b, driver: simulator, poll: 50ms, points: [{ name: p, wave: sine }] }\n",
    ))
    .await;
    let mut c = Client::connect(
        support::mqtt_addr(&gw),
        "t-health",
        &[
            "edgebridge/test-gw/health",
            "edgebridge/test-gw/devices/+/status",
        ],
    )
    .await;
    for d in ["a", "b"] {
        let topic = format!("edgebridge/test-gw/devices/{d}/status");
        c.expect_where(Duration::from_secs(2), |g| {
            g.topic == topic && g.payload == "online"
        })
        .await
        .expect("device online");
    }
    let summary = gw.health(Duration::from_secs(2)).await;
    assert!(summary.healthy, "{summary:?}");
    assert_eq!((summary.devices_online, summary.devices_total), (2, 2));
    let got = c
        .expect("edgebridge/test-gw/health", Duration::from_secs(2))
        .await;
    let v: serde_json::Value = serde_json::from_str(&got.payload).unwrap();
    assert_eq!(v["seq"], summary.seq);
    assert_eq!(v["devices_total"], 2);
    let second = gw.health(Duration::from_secs(2)).await;
    assert_eq!(second.seq, summary.seq + 1);
    gw.shutdown().await;
}

#[test]
fn the_packaged_config_is_the_shipped_one_with_the_state_directory() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shipped = std::fs::read_to_string(root.join("config.yaml")).unwrap();
    let packaged = std::fs::read_to_string(root.join("packaging/config.yaml")).unwrap();
    let differ: Vec<(&str, &str)> = shipped
        .lines()
        .zip(packaged.lines())
        .filter(|(a, b)| a != b)
        .collect();
    // After an edit of config.yaml, regenerate the packaged copy with:
    //   sed 's#^  data_dir: ./data .*#  data_dir: /var/lib/edgebridge   \# durable bridge queues (the service'"'"'s StateDirectory)#' \
    //     config.yaml > packaging/config.yaml
    let hint = "packaging/config.yaml must be config.yaml with only `data_dir` changed; \
                regenerate it with the sed command in this test";
    assert_eq!(shipped.lines().count(), packaged.lines().count(), "{hint}");
    assert_eq!(differ.len(), 1, "{hint}: {differ:?}");
    assert!(differ[0].0.trim_start().starts_with("data_dir: ./data"));
    assert!(differ[0]
        .1
        .trim_start()
        .starts_with("data_dir: /var/lib/edgebridge "));
    // Checked as the package lays it out: /etc/edgebridge/{config.yaml,rules/}.
    let etc = tempfile::tempdir().unwrap();
    std::fs::write(etc.path().join("config.yaml"), &packaged).unwrap();
    copy_shipped_rules(etc.path());
    let out = Command::new(env!("CARGO_BIN_EXE_edgebridge"))
        .args(["check", "--config"])
        .arg(etc.path().join("config.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `GET /metrics` over plain HTTP/1.0; the body.
pub async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics endpoint");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_string()
}

/// The value of the sample `series` (name with its labels as rendered).
pub fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Scrapes until `series` satisfies `pred`; its value.
pub async fn wait_sample(
    addr: std::net::SocketAddr,
    series: &str,
    within: Duration,
    pred: impl Fn(f64) -> bool,
) -> f64 {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let body = scrape(addr).await;
        if let Some(v) = sample(&body, series).filter(|v| pred(*v)) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} never as expected; last scrape:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_counts_polls_readings_messages_and_commands() {
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let mport = support::free_port();
    std::fs::write(
        dir.path().join("config.yaml"),
        format!(
            "gateway: {{ id: m-gw }}\nbroker:\n  listeners:\n    - {{ bind: \"127.0.0.1:{port}\", protocol: mqtt }}\nmetrics: {{ bind: \"127.0.0.1:{mport}\" }}\ndevices:\n  - {{ name: d, driver: simulator, poll: 50ms, points: [{{ name: p, wave: sine }}, {{ name: r, wave: constant, type: bool, writable: true }}] }}\nmappings:\n  - {{ match: '*/*', topic: 'x/{{point}}' }}\ncommands:\n  - {{ topic: cmd/r, write: d/r }}\n"
        ),
    )
    .unwrap();
    let bin = support::Binary::spawn(&["run"], dir.path());
    let maddr = format!("127.0.0.1:{mport}").parse().unwrap();
    support::wait_port(maddr, Duration::from_secs(10)).await;
    let polls = r#"edgebridge_device_polls_total{device="d"}"#;
    let first = wait_sample(maddr, polls, Duration::from_secs(5), |v| v >= 1.0).await;
    // Counters move as readings flow.
    wait_sample(maddr, polls, Duration::from_secs(5), |v| v > first).await;
    let body = scrape(maddr).await;
    let readings = sample(&body, r#"edgebridge_readings_total{device="d"}"#).unwrap();
    assert!(readings >= 2.0 * first, "two points per poll:\n{body}");
    assert!(sample(&body, "edgebridge_pipeline_messages_total").unwrap() >= 2.0);
    assert_eq!(
        sample(&body, r#"edgebridge_device_up{device="d"}"#),
        Some(1.0)
    );
    assert!(
        body.contains("# TYPE edgebridge_device_poll_duration_seconds histogram"),
        "{body}"
    );
    assert!(
        body.contains(r#"edgebridge_device_poll_duration_seconds_bucket{device="d",le="0.001"}"#)
    );
    assert!(
        sample(
            &body,
            r#"edgebridge_device_last_success_timestamp_seconds{device="d"}"#
        )
        .unwrap()
            > 1.7e9
    );
    assert!(body.contains("edgebridge_build_info{version=\""), "{body}");
    // A command, and a connected client, show up too.
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = Client::connect(addr, "t-metrics", &["cmd/r/result"]).await;
    c.client
        .publish("cmd/r", rumqttc::QoS::AtLeastOnce, false, "on")
        .await
        .unwrap();
    c.expect("cmd/r/result", Duration::from_secs(5)).await;
    wait_sample(
        maddr,
        r#"edgebridge_commands_total{device="d",result="ok"}"#,
        Duration::from_secs(2),
        |v| v == 1.0,
    )
    .await;
    // Sampled every 5s.
    wait_sample(
        maddr,
        "edgebridge_broker_connections",
        Duration::from_secs(12),
        |v| v >= 1.0,
    )
    .await;
    drop(bin);
}

#[test]
fn metrics_bind_must_not_take_a_listener_port() {
    let yaml = "gateway: { id: g }\nbroker:\n  listeners:\n    - { bind: \"127.0.0.1:1883\", protocol: mqtt }\nmetrics:\n  bind: 127.0.0.1:1883\n";
    let err = edgebridge::config::Config::from_text(Path::new("c.yaml"), yaml, |_| None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("c.yaml:6:9: metrics.bind: port 1883 is also used by broker.listeners[0]"),
        "{err}"
    );
}

const TWO_DEVICES: &str = "devices:
  - { name: a, driver: simulator, poll: 50ms, points: [{ name: p, wave: constant, value: 1 }] }
  - { name: b, driver: simulator, poll: 50ms, points: [{ name: p, wave: constant, value: 2 }] }
mappings:
  - { match: '*/*', topic: 'x/{device}/{point}' }
";

/// Status messages of `device` seen within `settle`.
async fn statuses(c: &mut Client, device: &str, settle: Duration) -> Vec<String> {
    let topic = format!("edgebridge/test-gw/devices/{device}/status");
    c.drain_where(settle, |g| g.topic == topic)
        .await
        .into_iter()
        .map(|g| g.payload)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_restarts_only_the_changed_device_and_switches_mappings() {
    let mut gw = support::start(&support::yaml_with_broker(TWO_DEVICES)).await;
    let mut c = Client::connect(
        support::mqtt_addr(&gw),
        "t-reload",
        &["edgebridge/test-gw/devices/+/status", "x/#", "y/#"],
    )
    .await;
    c.expect("x/a/p", Duration::from_secs(5)).await;
    c.expect("x/b/p", Duration::from_secs(5)).await;
    // Everything up to now (the start-up statuses) is history.
    c.drain_where(Duration::from_millis(100), |_| true).await;

    let changed = TWO_DEVICES
        .replace("value: 2 }", "value: 7 }")
        .replace("topic: 'x/{device}/{point}'", "topic: 'y/{device}/{point}'");
    let report = gw
        .reload(support::config(&support::yaml_with_broker(&changed)))
        .await
        .expect("reload applies");
    assert_eq!(report.devices.unchanged, ["a"]);
    assert_eq!(report.devices.restarted, ["b"]);
    assert!(report.devices.started.is_empty() && report.devices.stopped.is_empty());
    assert!(report.mappings_changed);
    assert!(report.needs_restart.is_empty(), "{report:?}");

    // The new mapping, with b's new value.
    let b = c
        .expect_where(Duration::from_secs(5), |g| {
            g.topic == "y/b/p" && g.payload == "7"
        })
        .await;
    assert!(b.is_some(), "b did not restart with its new value");
    c.expect("y/a/p", Duration::from_secs(5)).await;
    // b went offline and online again; a was never touched.
    let b_status = statuses(&mut c, "b", Duration::from_millis(300)).await;
    assert_eq!(b_status.len(), 2, "{b_status:?}");
    assert!(b_status[0].contains("offline"), "{b_status:?}");
    assert_eq!(b_status[1], "online");
    assert_eq!(
        statuses(&mut c, "a", Duration::ZERO).await,
        Vec::<String>::new()
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_devices_and_keeps_what_needs_a_restart() {
    let mut gw = support::start(&support::yaml_with_broker(TWO_DEVICES)).await;
    let addr = support::mqtt_addr(&gw);
    let mut c = Client::connect(
        addr,
        "t-reload2",
        &["edgebridge/test-gw/devices/+/status", "x/#"],
    )
    .await;
    c.expect("x/b/p", Duration::from_secs(5)).await;
    let mut new = support::config(&support::yaml_with_broker(
        &TWO_DEVICES.replace("name: b,", "name: c,"),
    ));
    new.broker.max_connections = 7;
    let report = gw.reload(new).await.expect("reload applies");
    assert_eq!(report.devices.unchanged, ["a"]);
    assert_eq!(report.devices.started, ["c"]);
    assert_eq!(report.devices.stopped, ["b"]);
    assert_eq!(report.needs_restart, ["broker"]);
    assert_eq!(
        gw.config().broker.max_connections,
        1000,
        "the running value stays"
    );
    c.expect("x/c/p", Duration::from_secs(5)).await;
    let gone = c
        .expect_where(Duration::from_secs(2), |g| {
            g.topic == "edgebridge/test-gw/devices/b/status"
                && g.payload.contains("removed from the config")
        })
        .await;
    assert!(gone.is_some());
    // Commands to a removed device get a clear answer.
    assert_eq!(
        gw.devices()
            .write("b", "p", edgebridge::model::Value::Int(1))
            .await
            .map_err(|e| e.to_string()),
        Err("no device named `b`".to_string())
    );
    // The listener did not move.
    assert_eq!(support::mqtt_addr(&gw), addr);
    gw.shutdown().await;
}

/// Waits until the binary's log contains `text`.
async fn wait_log(bin: &support::Binary, text: &str, within: Duration) -> String {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let log = bin.stderr();
        if log.contains(text) {
            return log;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no `{text}` in the log within {within:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rejects_a_broken_config_then_applies_a_fixed_one() {
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let head = format!(
        "gateway: {{ id: test-gw }}\nbroker:\n  listeners:\n    - {{ bind: \"127.0.0.1:{port}\", protocol: mqtt }}\n"
    );
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, format!("{head}{TWO_DEVICES}")).unwrap();
    let bin = support::Binary::spawn(&["run"], dir.path());
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    support::wait_port(addr, Duration::from_secs(10)).await;
    let mut c = Client::connect(
        addr,
        "t-hup",
        &["edgebridge/test-gw/devices/+/status", "x/#"],
    )
    .await;
    c.expect("x/b/p", Duration::from_secs(5)).await;
    c.drain_where(Duration::from_millis(100), |_| true).await;

    // Broken: a duplicate device name. Rejected, logged with its place,
    // and nothing changes.
    std::fs::write(
        &path,
        format!("{head}{}", TWO_DEVICES.replace("name: b,", "name: a,")),
    )
    .unwrap();
    bin.signal("HUP");
    let log = wait_log(
        &bin,
        "config rejected; the running config stays",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        log.contains("config.yaml:7:13: devices[1].name: duplicate device name `a`"),
        "{log}"
    );
    c.expect_where(Duration::from_secs(2), |g| g.topic == "x/b/p")
        .await
        .expect("b still runs");
    assert!(statuses(&mut c, "a", Duration::from_millis(200))
        .await
        .is_empty());
    assert!(statuses(&mut c, "b", Duration::ZERO).await.is_empty());

    // Fixed, with b changed: only b restarts.
    std::fs::write(
        &path,
        format!("{head}{}", TWO_DEVICES.replace("value: 2 }", "value: 9 }")),
    )
    .unwrap();
    bin.signal("HUP");
    wait_log(&bin, "config reloaded", Duration::from_secs(5)).await;
    c.expect_where(Duration::from_secs(5), |g| {
        g.topic == "x/b/p" && g.payload == "9"
    })
    .await
    .expect("b restarted with its new value");
    let b = statuses(&mut c, "b", Duration::from_millis(300)).await;
    assert_eq!(b.last().map(String::as_str), Some("online"), "{b:?}");
    assert!(statuses(&mut c, "a", Duration::ZERO).await.is_empty());
    assert!(
        plain(&bin.stderr()).contains("restarted=[\"b\"]"),
        "{}",
        bin.stderr()
    );
}

/// The text without ANSI colour codes.
fn plain(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\x1b') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        rest = match rest.find('m') {
            Some(m) => &rest[m + 1..],
            None => "",
        };
    }
    out.push_str(rest);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_modbus_timeouts_and_serial_bus_time() {
    use crate::support::modbus_sim::{RtuBus, Sim};
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::new();
    sim.add_slave(1);
    sim.set_holding(1, 0, &[42]);
    // Slave 2 was never added: it never answers.
    let bus = RtuBus::start(&sim, &dir.path().join("ttyRS485"));
    let port = support::free_port();
    let mport = support::free_port();
    std::fs::write(
        dir.path().join("config.yaml"),
        format!(
            "gateway: {{ id: mb-gw }}\nbroker:\n  listeners:\n    - {{ bind: \"127.0.0.1:{port}\", protocol: mqtt }}\nmetrics: {{ bind: \"127.0.0.1:{mport}\" }}\ndevices:\n  - {{ name: good, driver: modbus-rtu, port: {p}, slave: 1, poll: 100ms, timeout: 200ms, points: [{{ name: v, table: holding, address: 0 }}] }}\n  - {{ name: dead, driver: modbus-rtu, port: {p}, slave: 2, poll: 100ms, timeout: 200ms, points: [{{ name: v, table: holding, address: 0 }}] }}\n",
            p = bus.path().display()
        ),
    )
    .unwrap();
    let bin = support::Binary::spawn(&["run"], dir.path());
    let maddr = format!("127.0.0.1:{mport}").parse().unwrap();
    support::wait_port(maddr, Duration::from_secs(10)).await;
    let within = Duration::from_secs(10);
    // A device timeout increments its counter; the answering neighbour's
    // polls succeed and are timed.
    wait_sample(
        maddr,
        r#"edgebridge_device_timeouts_total{device="dead"}"#,
        within,
        |v| v >= 1.0,
    )
    .await;
    wait_sample(
        maddr,
        r#"edgebridge_device_polls_total{device="good"}"#,
        within,
        |v| v >= 2.0,
    )
    .await;
    let body = scrape(maddr).await;
    assert!(
        sample(&body, r#"edgebridge_device_timeouts_total{device="good"}"#).is_none(),
        "{body}"
    );
    assert!(sample(
        &body,
        r#"edgebridge_device_last_success_timestamp_seconds{device="good"}"#
    )
    .is_some());
    assert!(sample(
        &body,
        r#"edgebridge_device_last_success_timestamp_seconds{device="dead"}"#
    )
    .is_none());
    let count = format!(
        "edgebridge_serial_bus_request_duration_seconds_count{{port=\"{}\"}}",
        bus.path().display()
    );
    let busy = format!(
        "edgebridge_serial_bus_request_duration_seconds_sum{{port=\"{}\"}}",
        bus.path().display()
    );
    assert!(sample(&body, &count).unwrap_or(0.0) >= 3.0, "{body}");
    // Every timeout held the bus for at least the timeout.
    let timeouts = sample(&body, r#"edgebridge_device_timeouts_total{device="dead"}"#).unwrap();
    assert!(sample(&body, &busy).unwrap() >= 0.2 * timeouts, "{body}");
    drop(bin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_an_unchanged_rs485_bus_polling_and_restarts_a_changed_one_whole() {
    use crate::support::modbus_sim::{RtuBus, Sim};
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::new();
    for slave in [1, 2] {
        sim.add_slave(slave);
        sim.set_holding(slave, 0, &[slave as u16 * 10]);
    }
    let bus = RtuBus::start(&sim, &dir.path().join("ttyRS485"));
    let devices = |sim_value: u32, meter_poll: &str| {
        format!(
            "devices:\n  - {{ name: inv, driver: modbus-rtu, port: {p}, slave: 1, poll: 50ms, points: [{{ name: v, table: holding, address: 0 }}] }}\n  - {{ name: meter, driver: modbus-rtu, port: {p}, slave: 2, poll: {meter_poll}, points: [{{ name: v, table: holding, address: 0 }}] }}\n  - {{ name: s, driver: simulator, poll: 50ms, points: [{{ name: v, wave: constant, value: {sim_value} }}] }}\nmappings:\n  - {{ match: '*/*', topic: 'x/{{device}}/{{point}}' }}\n",
            p = bus.path().display()
        )
    };
    let mut gw = support::start(&support::yaml_with_broker(&devices(1, "50ms"))).await;
    let mut c = Client::connect(
        support::mqtt_addr(&gw),
        "t-rs485",
        &["edgebridge/test-gw/devices/+/status", "x/#"],
    )
    .await;
    c.expect("x/inv/v", Duration::from_secs(5)).await;
    c.expect("x/meter/v", Duration::from_secs(5)).await;
    c.drain_where(Duration::from_millis(100), |_| true).await;

    // Only the simulator changes: the bus is not touched.
    let report = gw
        .reload(support::config(&support::yaml_with_broker(&devices(
            2, "50ms",
        ))))
        .await
        .unwrap();
    assert_eq!(report.devices.restarted, ["s"]);
    let mut unchanged = report.devices.unchanged.clone();
    unchanged.sort();
    assert_eq!(unchanged, ["inv", "meter"]);
    let before = sim.reads(1);
    c.expect_where(Duration::from_secs(5), |g| {
        g.topic == "x/s/v" && g.payload == "2"
    })
    .await
    .expect("the simulator restarted");
    c.drain_where(Duration::from_millis(300), |g| g.topic == "x/inv/v")
        .await;
    assert!(sim.reads(1) > before, "the bus kept polling");
    for d in ["inv", "meter"] {
        assert!(
            statuses(&mut c, d, Duration::ZERO).await.is_empty(),
            "{d} was touched"
        );
    }
    let s = statuses(&mut c, "s", Duration::ZERO).await;
    assert_eq!(s.last().map(String::as_str), Some("online"), "{s:?}");

    // One device on the bus changes: the bus restarts as a whole (one
    // task owns the port), the simulator is left alone.
    let report = gw
        .reload(support::config(&support::yaml_with_broker(&devices(
            2, "80ms",
        ))))
        .await
        .unwrap();
    let mut restarted = report.devices.restarted.clone();
    restarted.sort();
    assert_eq!(restarted, ["inv", "meter"]);
    assert_eq!(report.devices.unchanged, ["s"]);
    let meter = statuses(&mut c, "meter", Duration::from_millis(500)).await;
    assert_eq!(
        meter.last().map(String::as_str),
        Some("online"),
        "{meter:?}"
    );
    c.expect("x/meter/v", Duration::from_secs(5)).await;
    assert!(statuses(&mut c, "s", Duration::ZERO).await.is_empty());
    gw.shutdown().await;
}

/// The shipped config names `./rules`, which `check` compiles: put a copy
/// of the repo's rules folder next to a copied config.
fn copy_shipped_rules(dir: &Path) {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    std::fs::create_dir(dir.join("rules")).unwrap();
    for f in std::fs::read_dir(rules).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join("rules").join(f.file_name().unwrap())).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_rule_calls_errors_and_time() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    std::fs::write(
        dir.path().join("rules/ok.rhai"),
        "fn on_reading(r) { publish(\"seen\", r.value); }\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("rules/bad.rhai"),
        "fn on_reading(r) {\n  r.value + \"x\" * 2\n}\n",
    )
    .unwrap();
    let port = support::free_port();
    let mport = support::free_port();
    std::fs::write(
        dir.path().join("config.yaml"),
        format!(
            "gateway: {{ id: r-gw }}\nbroker:\n  listeners:\n    - {{ bind: \"127.0.0.1:{port}\", protocol: mqtt }}\nmetrics: {{ bind: \"127.0.0.1:{mport}\" }}\nrules: {{ dir: ./rules }}\ndevices:\n  - {{ name: d, driver: simulator, poll: 50ms, points: [{{ name: p, wave: constant, value: 3 }}] }}\n"
        ),
    )
    .unwrap();
    let bin = support::Binary::spawn(&["run"], dir.path());
    let maddr = format!("127.0.0.1:{mport}").parse().unwrap();
    support::wait_port(maddr, Duration::from_secs(10)).await;
    let within = Duration::from_secs(5);
    wait_sample(
        maddr,
        r#"edgebridge_rule_calls_total{file="ok.rhai",function="on_reading"}"#,
        within,
        |v| v >= 2.0,
    )
    .await;
    wait_sample(
        maddr,
        r#"edgebridge_rule_errors_total{file="bad.rhai"}"#,
        within,
        |v| v >= 1.0,
    )
    .await;
    let body = scrape(maddr).await;
    assert!(
        sample(&body, r#"edgebridge_rule_errors_total{file="ok.rhai"}"#).is_none(),
        "{body}"
    );
    assert!(
        sample(
            &body,
            r#"edgebridge_rule_duration_seconds_count{file="ok.rhai"}"#
        )
        .unwrap()
            >= 2.0,
        "{body}"
    );
    // The rule's publishes are the pipeline's messages.
    assert!(
        sample(&body, "edgebridge_pipeline_messages_total").unwrap() >= 1.0,
        "{body}"
    );
    drop(bin);
}

/// How often Mosquitto saw `client_id` connect (its notice log).
fn connects(m: &crate::support::mosquitto::Mosquitto, client_id: &str) -> usize {
    m.log()
        .lines()
        .filter(|l| l.contains("New client connected") && l.contains(&format!(" as {client_id} ")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto: run by .ci/run"]
async fn reload_keeps_an_unchanged_bridge_connected_and_restarts_a_changed_one() {
    use crate::support::mosquitto::{Mosquitto, Security};
    let m = Mosquitto::start(Security::Plain);
    let data = tempfile::tempdir().unwrap();
    let remote_addr = format!("127.0.0.1:{}", m.port()).parse().unwrap();
    let mut cloud = Client::connect(remote_addr, "it-cloud-app", &["site/#", "moved/#"]).await;
    let yaml = |value: u32, prefix: &str| {
        format!(
            "gateway: {{ id: gw-it, data_dir: {data} }}\nbroker:\n  listeners:\n    - {{ bind: \"127.0.0.1:0\", protocol: mqtt }}\n\
             devices:\n  - {{ name: pv, driver: simulator, poll: 100ms, points: [{{ name: power, wave: constant, value: {value} }}] }}\n\
             mappings:\n  - {{ match: pv/power, topic: PV/data, qos: 1 }}\n\
             bridges:\n  - name: cloud\n    url: {url}\n    client_id: it-bridge\n    \
             forward: [ {{ topics: \"PV/#\", remote_prefix: \"{prefix}\", qos: 1 }} ]\n",
            data = data.path().display(),
            url = m.url(),
        )
    };
    let mut gw = support::start(&yaml(1, "site/gw-it/")).await;
    cloud
        .expect_where(Duration::from_secs(30), |g| {
            g.topic == "site/gw-it/PV/data" && g.payload == "1"
        })
        .await
        .expect("bridged");
    assert_eq!(connects(&m, "it-bridge"), 1, "{}", m.log());

    // A device changes, the bridge does not: same connection, new data.
    let report = gw
        .reload(support::config(&yaml(2, "site/gw-it/")))
        .await
        .unwrap();
    assert_eq!(report.bridges.unchanged, ["cloud"]);
    assert_eq!(report.devices.restarted, ["pv"]);
    cloud
        .expect_where(Duration::from_secs(30), |g| {
            g.topic == "site/gw-it/PV/data" && g.payload == "2"
        })
        .await
        .expect("the new value went through the same bridge");
    assert_eq!(
        connects(&m, "it-bridge"),
        1,
        "the remote saw a reconnect:\n{}",
        m.log()
    );

    // A bridge whose files do not check refuses the whole reload.
    let broken = yaml(3, "site/gw-it/").replace(
        "    client_id: it-bridge\n",
        "    client_id: it-bridge\n    tls: { ca: /nonexistent/ca.pem }\n",
    );
    assert!(gw.reload(support::config(&broken)).await.is_err());
    assert_eq!(
        gw.config().devices[0].points[0].value,
        Some(2.0),
        "nothing changed"
    );

    // The bridge changes: it restarts (one reconnect) with its new settings.
    let report = gw
        .reload(support::config(&yaml(2, "moved/")))
        .await
        .unwrap();
    assert_eq!(report.bridges.restarted, ["cloud"]);
    assert_eq!(report.devices.unchanged, ["pv"]);
    cloud
        .expect_where(Duration::from_secs(30), |g| g.topic == "moved/PV/data")
        .await
        .expect("bridged under the new prefix");
    assert_eq!(connects(&m, "it-bridge"), 2, "{}", m.log());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto: run by .ci/run"]
async fn bridge_metrics_health_and_a_sighup_that_keeps_the_bridge_connected() {
    use crate::support::mosquitto::{Mosquitto, Security};
    let m = Mosquitto::start(Security::Plain);
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let mport = support::free_port();
    let yaml = |value: u32| {
        format!(
            "gateway: {{ id: gw-hup, data_dir: ./data }}\nbroker:\n  listeners:\n    - {{ bind: \"127.0.0.1:{port}\", protocol: mqtt }}\n\
             metrics: {{ bind: \"127.0.0.1:{mport}\" }}\n\
             devices:\n  - {{ name: pv, driver: simulator, poll: 100ms, points: [{{ name: power, wave: constant, value: {value} }}] }}\n\
             mappings:\n  - {{ match: pv/power, topic: PV/data, qos: 1 }}\n\
             bridges:\n  - name: cloud\n    url: {url}\n    client_id: hup-bridge\n    \
             forward: [ {{ topics: \"PV/#\", remote_prefix: \"site/\", qos: 1 }} ]\n",
            url = m.url(),
        )
    };
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, yaml(1)).unwrap();
    let bin = support::Binary::spawn(&["run"], dir.path());
    let maddr = format!("127.0.0.1:{mport}").parse().unwrap();
    support::wait_port(maddr, Duration::from_secs(10)).await;
    let within = Duration::from_secs(30);
    wait_sample(
        maddr,
        r#"edgebridge_bridge_connected{bridge="cloud"}"#,
        within,
        |v| v == 1.0,
    )
    .await;
    wait_sample(
        maddr,
        r#"edgebridge_bridge_forwarded_total{bridge="cloud"}"#,
        within,
        |v| v >= 2.0,
    )
    .await;
    let body = scrape(maddr).await;
    assert!(
        sample(&body, r#"edgebridge_bridge_queue_messages{bridge="cloud"}"#).is_some(),
        "{body}"
    );
    assert!(
        sample(&body, r#"edgebridge_bridge_queue_bytes{bridge="cloud"}"#).is_some(),
        "{body}"
    );

    // The health summary lists the bridge.
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = Client::connect(addr, "t-bh", &["edgebridge/gw-hup/health"]).await;
    let h = c
        .expect("edgebridge/gw-hup/health", Duration::from_secs(5))
        .await;
    let h: serde_json::Value = serde_json::from_str(&h.payload).unwrap();
    assert_eq!(h["bridges"][0]["name"], "cloud", "{h}");

    // SIGHUP with only the device changed: the remote sees no reconnect.
    assert_eq!(connects(&m, "hup-bridge"), 1, "{}", m.log());
    std::fs::write(&path, yaml(2)).unwrap();
    bin.signal("HUP");
    wait_log(&bin, "config reloaded", Duration::from_secs(10)).await;
    let before = sample(
        &scrape(maddr).await,
        r#"edgebridge_bridge_forwarded_total{bridge="cloud"}"#,
    )
    .unwrap();
    wait_sample(
        maddr,
        r#"edgebridge_bridge_forwarded_total{bridge="cloud"}"#,
        within,
        |v| v >= before + 2.0,
    )
    .await;
    assert_eq!(
        connects(&m, "hup-bridge"),
        1,
        "the remote saw a reconnect:\n{}",
        m.log()
    );
    assert!(
        plain(&bin.stderr()).contains("bridges_unchanged=1"),
        "{}",
        bin.stderr()
    );
    assert_eq!(
        sample(
            &scrape(maddr).await,
            "edgebridge_config_reloads_total{result=\"ok\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_work_after_a_reload_that_restarts_their_device() {
    let yaml = |poll: &str| {
        support::yaml_with_broker(&format!(
            "devices:\n  - {{ name: d, driver: simulator, poll: {poll}, points: [{{ name: relay, wave: constant, type: bool, writable: true }}] }}\ncommands:\n  - {{ topic: cmd/relay, write: d/relay }}\n"
        ))
    };
    let mut gw = support::start(&yaml("100ms")).await;
    let mut c = Client::connect(
        support::mqtt_addr(&gw),
        "t-cmd-reload",
        &["cmd/relay/result"],
    )
    .await;
    let report = gw.reload(support::config(&yaml("200ms"))).await.unwrap();
    assert_eq!(report.devices.restarted, ["d"]);
    assert!(report.commands_changed);
    c.client
        .publish("cmd/relay", rumqttc::QoS::AtLeastOnce, false, "on")
        .await
        .unwrap();
    let r = c.expect("cmd/relay/result", Duration::from_secs(5)).await;
    assert!(r.payload.contains("\"ok\":true"), "{}", r.payload);
    // Exactly one answer: the old command subscription is gone.
    let more = c
        .drain_where(Duration::from_millis(300), |g| {
            g.topic == "cmd/relay/result"
        })
        .await;
    assert!(more.is_empty(), "{more:?}");
    gw.shutdown().await;
}
