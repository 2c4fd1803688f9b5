//! Device drivers end to end: the real gateway polls real Modbus servers
//! (tokio-modbus RTU over pseudo-terminals, TCP on loopback) and publishes
//! on its embedded broker, where a real MQTT client checks the values.

use std::time::Duration;

use tokio_modbus::prelude::*;

use crate::support::modbus_sim::{
    fixture_points, load_fixture, Req, RtuBus, Sim, Table, TcpDevice,
};
use crate::support::{self, Client};

const WAIT: Duration = Duration::from_secs(10);

fn status_topic(device: &str) -> String {
    format!("edgebridge/test-gw/devices/{device}/status")
}

/// A gateway config with `devices` and a mapping of every point to
/// `d/<device>/<point>` (payload `value`).
fn gateway_yaml(devices: &str, extra: &str) -> String {
    support::yaml_with_broker(&format!(
        "devices:\n{devices}mappings:\n  - {{ match: \"*/*\", topic: \"d/{{device}}/{{point}}\" }}\n{extra}"
    ))
}

fn points_yaml(points: &[&str]) -> String {
    points.iter().map(|p| format!("      - {p}\n")).collect()
}

/// Splits the request log of one slave into polls, each starting with
/// the poll's first request (`first`), and returns the last complete one.
fn last_complete_poll(reqs: &[Req], slave: u8, first: (u8, u16)) -> Vec<(u8, u16, u16)> {
    let mine: Vec<&Req> = reqs
        .iter()
        .filter(|r| r.slave == slave && (1..=4).contains(&r.function))
        .collect();
    let starts: Vec<usize> = mine
        .iter()
        .enumerate()
        .filter(|(_, r)| (r.function, r.address) == first)
        .map(|(i, _)| i)
        .collect();
    assert!(starts.len() >= 3, "too few polls: {mine:?}");
    let (a, b) = (starts[starts.len() - 2], starts[starts.len() - 1]);
    mine[a..b]
        .iter()
        .map(|r| (r.function, r.address, r.count))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtu_values_of_every_type_and_order_arrive_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::new();
    load_fixture(&sim, 1);
    sim.add_slave(2);
    sim.set_holding(2, 100, &[0x4049, 0x0FDB]); // f32 3.1415927
    let bus = RtuBus::start(&sim, &dir.path().join("ttyRS485"));
    let fixture = fixture_points();
    let pts: Vec<&str> = fixture.iter().map(|p| p.yaml).collect();
    let devices = format!(
        "  - name: inverter\n    driver: modbus-rtu\n    port: {port}\n    slave: 1\n    poll: 200ms\n    points:\n{pts}\
         \x20 - name: meter\n    driver: modbus-rtu\n    port: {port}\n    slave: 2\n    poll: 200ms\n    points:\n\
         \x20     - {{ name: pi, table: holding, address: 100, type: f32 }}\n",
        port = bus.path().display(),
        pts = points_yaml(&pts),
    );
    let gw = support::start(&gateway_yaml(&devices, "")).await;
    let mut c = Client::connect(
        support::mqtt_addr(&gw),
        "t-rtu",
        &["d/#", "edgebridge/test-gw/devices/+/status"],
    )
    .await;
    for p in &fixture {
        let got = c.expect(&format!("d/inverter/{}", p.name), WAIT).await;
        assert_eq!(got.payload, p.expected, "point {}", p.name);
    }
    assert_eq!(c.expect("d/meter/pi", WAIT).await.payload, "3.1415927");
    assert_eq!(
        c.expect(&status_topic("inverter"), WAIT).await.payload,
        "online"
    );
    assert_eq!(
        c.expect(&status_topic("meter"), WAIT).await.payload,
        "online"
    );
    // A few more polls, then look at what went over the wire.
    c.drain_where(Duration::from_millis(700), |_| true).await;
    gw.shutdown().await;
    // Both devices went through the one port: one coalesced read per table.
    let reqs = sim.requests();
    let poll = last_complete_poll(&reqs, 1, (1, 1));
    assert_eq!(poll, vec![(1, 1, 1), (2, 0, 1), (4, 10, 2), (3, 0, 41)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalescing_uses_the_fewest_requests_and_survives_exceptions() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::new();
    sim.add_slave(7);
    for a in 0..200u16 {
        sim.set_holding(7, a, &[a]);
    }
    // Register 23 does not exist on this device; it is in a gap, not a point.
    sim.set_exception(7, Table::Holding, 23);
    // Register 60 is a configured point that the device rejects.
    sim.set_exception(7, Table::Holding, 60);
    let bus = RtuBus::start(&sim, &dir.path().join("ttyA"));
    // Scattered points; max_gap 4, max_registers 10.
    let pts = [
        "{ name: a0, table: holding, address: 0 }",
        "{ name: a3, table: holding, address: 3 }", // gap 2: merged
        "{ name: a8, table: holding, address: 8, type: u32 }", // gap 4: merged, 0..10
        "{ name: a12, table: holding, address: 12 }", // 0..13 would be 13 > 10: new block
        "{ name: a20, table: holding, address: 20 }", // 12..21: gap 7 > 4: new block
        "{ name: a25, table: holding, address: 25 }", // 20..26 spans 23: exception
        "{ name: a58, table: holding, address: 58 }",
        "{ name: a59, table: holding, address: 59 }",
        "{ name: a60, table: holding, address: 60 }", // bad point
        "{ name: a61, table: holding, address: 61 }",
        "{ name: a150, table: holding, address: 150 }",
    ];
    let devices = format!(
        "  - name: plc\n    driver: modbus-rtu\n    port: {}\n    slave: 7\n    poll: 100ms\n    max_gap: 4\n    max_registers: 10\n    points:\n{}",
        bus.path().display(),
        points_yaml(&pts)
    );
    let yaml = support::yaml_with_broker(&format!(
        "devices:\n{devices}mappings:\n  - {{ match: \"*/*\", topic: \"j/{{device}}/{{point}}\", payload: json }}\n"
    ));
    let gw = support::start(&yaml).await;
    let mut c = Client::connect(support::mqtt_addr(&gw), "t-coalesce", &["j/#"]).await;
    // Good points keep reporting; the bad one reports its error.
    for (name, v) in [
        ("a0", 0),
        ("a25", 25),
        ("a59", 59),
        ("a61", 61),
        ("a150", 150),
    ] {
        let got = c
            .expect_where(WAIT, |g| {
                g.topic == format!("j/plc/{name}")
                    && g.payload.contains("\"value\":")
                    && !g.payload.contains("null")
            })
            .await
            .unwrap_or_else(|| panic!("no value for {name}"));
        let j: serde_json::Value = serde_json::from_str(&got.payload).unwrap();
        assert_eq!(j["value"], v, "{name}");
    }
    let bad = c.expect("j/plc/a60", WAIT).await;
    let j: serde_json::Value = serde_json::from_str(&bad.payload).unwrap();
    assert!(j["value"].is_null(), "{j}");
    assert!(j["error"].as_str().unwrap().contains("exception"), "{j}");
    // Let a few more polls run with the learned plan.
    c.drain_where(Duration::from_millis(600), |_| true).await;
    gw.shutdown().await;
    let reqs = sim.requests();
    // The first poll tried the coalesced blocks once and split the failing
    // ones; from then on every poll uses the learned plan.
    let first: Vec<(u8, u16, u16)> = reqs
        .iter()
        .take(4)
        .map(|r| (r.function, r.address, r.count))
        .collect();
    assert_eq!(first[..3], [(3, 0, 10), (3, 12, 1), (3, 20, 6)]);
    let poll = last_complete_poll(&reqs, 7, (3, 0));
    assert_eq!(
        poll,
        vec![
            (3, 0, 10),  // a0 a3 a8
            (3, 12, 1),  // a12
            (3, 20, 1),  // a20 (the gap at 23 is never read again)
            (3, 25, 1),  // a25
            (3, 58, 2),  // a58 a59, adjacent
            (3, 60, 1),  // a60 alone: still polled, still bad
            (3, 61, 1),  // a61
            (3, 150, 1), // a150
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_slave_goes_offline_without_slowing_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::new();
    sim.add_slave(1);
    sim.set_holding(1, 0, &[11]);
    sim.add_slave(2);
    sim.set_holding(2, 0, &[22]);
    sim.set_silent(2, true);
    let bus = RtuBus::start(&sim, &dir.path().join("ttyB"));
    let devices = format!(
        "  - {{ name: good, driver: modbus-rtu, port: {p}, slave: 1, poll: 100ms, timeout: 300ms, points: [{{ name: v, table: holding, address: 0 }}] }}\n\
         \x20 - {{ name: dead, driver: modbus-rtu, port: {p}, slave: 2, poll: 100ms, timeout: 300ms, offline_after: 2, points: [{{ name: v, table: holding, address: 0 }}] }}\n",
        p = bus.path().display()
    );
    let gw = support::start(&gateway_yaml(&devices, "")).await;
    let mut c = Client::connect(
        support::mqtt_addr(&gw),
        "t-dead",
        &["d/#", "edgebridge/test-gw/devices/+/status"],
    )
    .await;
    let off = c
        .expect_where(WAIT, |g| {
            g.topic == status_topic("dead") && g.payload != "online"
        })
        .await
        .expect("a status change away from online");
    let j: serde_json::Value = serde_json::from_str(&off.payload).unwrap();
    assert_eq!(j["status"], "offline");
    assert!(
        j["reason"]
            .as_str()
            .unwrap()
            .contains("no answer within 300ms"),
        "{j}"
    );
    // While the dead slave backs off, the good one keeps its rate: over a
    // window, its polls stay close to window / poll interval.
    let before = sim.reads(1);
    let dead_before = sim.count(2);
    let window = Duration::from_millis(2000);
    tokio::time::sleep(window).await;
    let good_polls = sim.reads(1) - before;
    let dead_polls = sim.count(2) - dead_before;
    // Ideal is 20; a dead slave polled at full rate would cost 300 ms (plus
    // the drain) of every cycle and leave the good one about 6.
    assert!(
        good_polls >= 12,
        "good device polled only {good_polls} times"
    );
    assert!(
        dead_polls <= 6,
        "dead device polled {dead_polls} times in backoff"
    );
    let got = c.expect("d/good/v", WAIT).await;
    assert_eq!(got.payload, "11");
    // It comes back by itself.
    sim.set_silent(2, false);
    c.expect_where(Duration::from_secs(40), |g| {
        g.topic == status_topic("dead") && g.payload == "online"
    })
    .await
    .expect("dead slave back online");
    assert_eq!(c.expect("d/dead/v", WAIT).await.payload, "22");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_answer_is_never_taken_for_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::new();
    // Slave 1 answers 20 ms after the gateway gave up on it.
    sim.add_slave(1);
    sim.set_holding(1, 0, &[111]);
    sim.set_delay(1, Duration::from_millis(120));
    sim.add_slave(2);
    sim.set_holding(2, 0, &[222]);
    let bus = RtuBus::start(&sim, &dir.path().join("ttyL"));
    let devices = format!(
        "  - {{ name: slow, driver: modbus-rtu, port: {p}, slave: 1, poll: 50ms, timeout: 100ms, offline_after: 1000, points: [{{ name: v, table: holding, address: 0 }}] }}\n\
         \x20 - {{ name: fast, driver: modbus-rtu, port: {p}, slave: 2, poll: 50ms, timeout: 300ms, offline_after: 1, points: [{{ name: v, table: holding, address: 0 }}] }}\n",
        p = bus.path().display()
    );
    let gw = support::start(&gateway_yaml(&devices, "")).await;
    let mut c = Client::connect(
        support::mqtt_addr(&gw),
        "t-late",
        &["d/#", "edgebridge/test-gw/devices/+/status"],
    )
    .await;
    assert_eq!(c.expect("d/fast/v", WAIT).await.payload, "222");
    let got = c.drain_where(Duration::from_millis(1500), |_| true).await;
    let fast: Vec<&str> = got
        .iter()
        .filter(|g| g.topic == "d/fast/v")
        .map(|g| g.payload.as_str())
        .collect();
    assert!(fast.len() >= 5, "{got:?}");
    assert!(fast.iter().all(|v| *v == "222"), "{got:?}");
    // The slow slave's late answers never showed up as a value, nor as a
    // failure of the other slave (which would be offline after one).
    assert!(!got.iter().any(|g| g.topic == "d/slow/v"), "{got:?}");
    assert!(
        !got.iter()
            .any(|g| g.topic == status_topic("fast") && g.payload != "online"),
        "{got:?}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplugged_adapter_goes_offline_and_comes_back_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::new();
    sim.add_slave(1);
    sim.set_holding(1, 0, &[1]);
    let mut bus = RtuBus::start(&sim, &dir.path().join("ttyUSB0"));
    let devices = format!(
        "  - {{ name: inv, driver: modbus-rtu, port: {}, slave: 1, poll: 100ms, points: [{{ name: v, table: holding, address: 0 }}] }}\n",
        bus.path().display()
    );
    let gw = support::start(&gateway_yaml(&devices, "")).await;
    let mut c = Client::connect(
        support::mqtt_addr(&gw),
        "t-unplug",
        &[
            "d/#",
            "edgebridge/test-gw/devices/+/status",
            "edgebridge/test-gw/devices/+/stats",
        ],
    )
    .await;
    assert_eq!(c.expect("d/inv/v", WAIT).await.payload, "1");
    assert_eq!(c.expect(&status_topic("inv"), WAIT).await.payload, "online");
    bus.unplug();
    // (The retained and the live `online` may both have arrived: skip to
    // the first status that is not `online`.)
    let off = c
        .expect_where(WAIT, |g| {
            g.topic == status_topic("inv") && g.payload != "online"
        })
        .await
        .expect("a status after the unplug");
    assert!(off.payload.contains("offline"), "{}", off.payload);
    // Replugged (a new PTY behind the same path) with a new value.
    sim.set_holding(1, 0, &[2]);
    bus.plug();
    c.expect_where(WAIT, |g| {
        g.topic == status_topic("inv") && g.payload == "online"
    })
    .await
    .expect("online again after the replug");
    c.expect_where(WAIT, |g| g.topic == "d/inv/v" && g.payload == "2")
        .await
        .expect("polling resumed");
    // The outage is counted; stats come with every online/offline change.
    let stats = c
        .expect_where(WAIT, |g| {
            g.topic == "edgebridge/test-gw/devices/inv/stats"
                && g.payload.contains("\"online\":true")
                && !g.payload.contains("\"transport_errors\":0")
        })
        .await
        .expect("stats published when it came back");
    let j: serde_json::Value = serde_json::from_str(&stats.payload).unwrap();
    // The loss, and each failed reopen while the path was gone.
    assert!(j["transport_errors"].as_u64().unwrap() >= 1, "{j}");
    assert_eq!(j["online"], true, "{j}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_port_at_start_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ttyLATE");
    let devices = format!(
        "  - {{ name: late, driver: modbus-rtu, port: {}, slave: 1, poll: 100ms, points: [{{ name: v, table: holding, address: 0 }}] }}\n",
        path.display()
    );
    let gw = support::start(&gateway_yaml(&devices, "")).await;
    let mut c = Client::connect(
        support::mqtt_addr(&gw),
        "t-late",
        &["d/#", "edgebridge/test-gw/devices/+/status"],
    )
    .await;
    let off = c
        .expect_where(WAIT, |g| {
            g.topic == status_topic("late") && g.payload != "online"
        })
        .await
        .expect("a status change away from online");
    assert!(off.payload.contains("cannot open"), "{}", off.payload);
    let sim = Sim::new();
    sim.add_slave(1);
    sim.set_holding(1, 0, &[5]);
    let _bus = RtuBus::start(&sim, &path);
    assert_eq!(c.expect("d/late/v", WAIT).await.payload, "5");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_write_coils_and_registers_and_report_results() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::new();
    sim.add_slave(1);
    let bus = RtuBus::start(&sim, &dir.path().join("ttyW"));
    let devices = format!(
        "  - name: inv\n    driver: modbus-rtu\n    port: {}\n    slave: 1\n    poll: 200ms\n    points:\n{}",
        bus.path().display(),
        points_yaml(&[
            "{ name: led, table: coil, address: 1, writable: true }",
            "{ name: limit, table: holding, address: 10, type: f32, order: CDAB, writable: true }",
            "{ name: setpoint, table: holding, address: 20, type: i16, scale: 0.1, writable: true }",
            "{ name: flags, table: holding, address: 30, bit: 2, writable: true }",
            "{ name: temp, table: holding, address: 40, type: i16 }",
        ])
    );
    let extra = "commands:\n  - { topic: cmd/led, write: inv/led }\n  - { topic: cmd/limit, write: inv/limit }\n  - { topic: cmd/setpoint, write: inv/setpoint }\n  - { topic: cmd/flags, write: inv/flags }\n";
    sim.set_holding(1, 30, &[0x8001]);
    let gw = support::start(&gateway_yaml(&devices, extra)).await;
    let mut c = Client::connect(support::mqtt_addr(&gw), "t-write", &["cmd/+/result", "d/#"]).await;
    let client = c.client.clone();
    let publish = |topic: &'static str, payload: &'static str| {
        let client = client.clone();
        async move {
            client
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .await
                .unwrap()
        }
    };
    publish("cmd/led", "on").await;
    let r = c.expect("cmd/led/result", WAIT).await;
    assert!(r.payload.contains("\"ok\":true"), "{}", r.payload);
    assert!(sim.coil(1, 1));
    publish("cmd/limit", "123.456").await;
    let r = c.expect("cmd/limit/result", WAIT).await;
    assert!(r.payload.contains("\"ok\":true"), "{}", r.payload);
    assert_eq!(sim.holding(1, 10, 2), vec![0xE979, 0x42F6]);
    publish("cmd/setpoint", "-21.5").await;
    let r = c.expect("cmd/setpoint/result", WAIT).await;
    assert!(r.payload.contains("\"ok\":true"), "{}", r.payload);
    assert_eq!(sim.holding(1, 20, 1), vec![(-215i16) as u16]);
    publish("cmd/flags", "1").await;
    let r = c.expect("cmd/flags/result", WAIT).await;
    assert!(r.payload.contains("\"ok\":true"), "{}", r.payload);
    assert_eq!(sim.holding(1, 30, 1), vec![0x8005], "only bit 2 changed");
    // Out of range for an i16 after scaling: a clear error, nothing written.
    publish("cmd/setpoint", "4000").await;
    let r = c.expect("cmd/setpoint/result", WAIT).await;
    let j: serde_json::Value = serde_json::from_str(&r.payload).unwrap();
    assert_eq!(j["ok"], false);
    assert!(
        j["error"]
            .as_str()
            .unwrap()
            .contains("out of range for i16"),
        "{j}"
    );
    assert_eq!(sim.holding(1, 20, 1), vec![(-215i16) as u16]);
    // The new values are read back by the next polls.
    c.expect_where(WAIT, |g| g.topic == "d/inv/led" && g.payload == "true")
        .await
        .expect("coil read back");
    c.expect_where(WAIT, |g| {
        g.topic == "d/inv/setpoint" && g.payload == "-21.5"
    })
    .await
    .expect("setpoint read back");
    // Read-only and unknown points are refused with a reason.
    let e = gw
        .devices()
        .write("inv", "temp", edgebridge::model::Value::Int(1))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("read-only"), "{e}");
    let e = gw
        .devices()
        .write("inv", "nope", edgebridge::model::Value::Int(1))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no point `nope`"), "{e}");
    gw.shutdown().await;
    let writes: Vec<u8> = sim
        .requests()
        .iter()
        .map(|r| r.function)
        .filter(|f| !(1..=4).contains(f))
        .collect();
    assert_eq!(
        writes,
        vec![5, 16, 6, 6],
        "FC05 coil, FC16 f32, FC06 i16, FC06 bit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_written_value_is_read_back_at_once() {
    let sim = Sim::new();
    sim.add_slave(1);
    let dev = TcpDevice::start(&sim).await;
    // Polled once an hour: only the write can explain a second reading.
    let devices = format!(
        "  - {{ name: relay, driver: modbus-tcp, address: \"{}\", poll: 1h, points: [{{ name: k1, table: coil, address: 4, writable: true }}] }}\n",
        dev.addr()
    );
    let extra = "commands:\n  - { topic: cmd/k1, write: relay/k1 }\n";
    let gw = support::start(&gateway_yaml(&devices, extra)).await;
    let mut c = Client::connect(
        support::mqtt_addr(&gw),
        "t-readback",
        &["d/#", "cmd/+/result"],
    )
    .await;
    // (The first poll may have happened before this client subscribed.)
    c.client
        .publish("cmd/k1", rumqttc::QoS::AtLeastOnce, false, "on")
        .await
        .unwrap();
    assert!(c
        .expect("cmd/k1/result", WAIT)
        .await
        .payload
        .contains("\"ok\":true"));
    c.expect_where(WAIT, |g| g.topic == "d/relay/k1" && g.payload == "true")
        .await
        .expect("read back without waiting for the next poll");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_between_the_requests_of_a_long_poll() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::new();
    sim.add_slave(1);
    // Every answer takes 20 ms: a poll of 8 blocks holds the bus ~200 ms.
    sim.set_delay(1, Duration::from_millis(20));
    let bus = RtuBus::start(&sim, &dir.path().join("ttyQ"));
    let pts: Vec<String> = (0..8)
        .map(|i| format!("{{ name: r{i}, table: holding, address: {} }}", i * 50))
        .chain(["{ name: led, table: coil, address: 0, writable: true }".to_string()])
        .collect();
    let pts: Vec<&str> = pts.iter().map(String::as_str).collect();
    let devices = format!(
        "  - name: big\n    driver: modbus-rtu\n    port: {}\n    slave: 1\n    poll: 10ms\n    points:\n{}",
        bus.path().display(),
        points_yaml(&pts)
    );
    let extra = "commands:\n  - { topic: cmd/led, write: big/led }\n";
    let gw = support::start(&gateway_yaml(&devices, extra)).await;
    let mut c = Client::connect(support::mqtt_addr(&gw), "t-ahead", &["cmd/+/result", "d/#"]).await;
    c.expect("d/big/r7", WAIT).await;
    for (i, v) in ["on", "off", "on", "off"].into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(37 * i as u64 + 25)).await;
        c.client
            .publish("cmd/led", rumqttc::QoS::AtLeastOnce, false, v)
            .await
            .unwrap();
        let r = c.expect("cmd/led/result", WAIT).await;
        assert!(r.payload.contains("\"ok\":true"), "{}", r.payload);
    }
    gw.shutdown().await;
    // Polls run back to back (coil block first, then holding 0, 50, ...).
    // A write that waited for the end of the poll would always be followed
    // by the first block; most are followed by the rest of the poll.
    let reqs = sim.requests();
    let mid_poll = reqs
        .windows(2)
        .filter(|w| w[0].function == 5 && !(w[1].function == 1 && w[1].address == 0))
        .count();
    assert!(
        mid_poll >= 1,
        "no write went between two reads of a poll: {reqs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_tcp_reads_writes_and_reconnects() {
    let sim = Sim::new();
    load_fixture(&sim, 1);
    let mut dev = TcpDevice::start(&sim).await;
    let devices = format!(
        "  - name: meter\n    driver: modbus-tcp\n    address: \"{}\"\n    slave: 1\n    poll: 100ms\n    multiple_writes: true\n    points:\n{}",
        dev.addr(),
        points_yaml(&[
            "{ name: f32_cdab, table: holding, address: 13, type: f32, order: CDAB }",
            "{ name: energy, table: input, address: 10, type: u32, order: CDAB }",
            "{ name: led, table: coil, address: 1, writable: true }",
        ])
    );
    let extra = "commands:\n  - { topic: cmd/led, write: meter/led }\n";
    let gw = support::start(&gateway_yaml(&devices, extra)).await;
    let mut c = Client::connect(
        support::mqtt_addr(&gw),
        "t-tcp",
        &["d/#", "cmd/+/result", "edgebridge/test-gw/devices/+/status"],
    )
    .await;
    assert_eq!(c.expect("d/meter/f32_cdab", WAIT).await.payload, "123.456");
    assert_eq!(c.expect("d/meter/energy", WAIT).await.payload, "123456");
    assert_eq!(
        c.expect(&status_topic("meter"), WAIT).await.payload,
        "online"
    );
    c.client
        .publish("cmd/led", rumqttc::QoS::AtLeastOnce, false, "true")
        .await
        .unwrap();
    let r = c.expect("cmd/led/result", WAIT).await;
    assert!(r.payload.contains("\"ok\":true"), "{}", r.payload);
    assert!(sim.coil(1, 1));
    // `multiple_writes: true`: FC 15 even for one coil.
    assert!(sim.requests().iter().any(|r| r.function == 15));
    assert!(!sim.requests().iter().any(|r| r.function == 5));
    // The PLC restarts: connection refused for a while.
    dev.stop();
    let off = c
        .expect_where(WAIT, |g| {
            g.topic == status_topic("meter") && g.payload != "online"
        })
        .await
        .expect("a status change away from online");
    assert!(off.payload.contains("offline"), "{}", off.payload);
    sim.set_input(1, 10, &[0xE241, 0x0001]);
    dev.restart().await;
    c.expect_where(WAIT, |g| {
        g.topic == status_topic("meter") && g.payload == "online"
    })
    .await
    .expect("online again after the restart");
    c.expect_where(WAIT, |g| {
        g.topic == "d/meter/energy" && g.payload == "123457"
    })
    .await
    .expect("polling resumed after reconnect");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_unit_behind_a_tcp_server_backs_off() {
    let sim = Sim::new();
    sim.add_slave(1);
    sim.set_holding(1, 0, &[1]);
    sim.add_slave(9);
    sim.set_silent(9, true);
    let dev = TcpDevice::start(&sim).await;
    let devices = format!(
        "  - {{ name: alive, driver: modbus-tcp, address: \"{a}\", slave: 1, poll: 100ms, points: [{{ name: v, table: holding, address: 0 }}] }}\n\
         \x20 - {{ name: gone, driver: modbus-tcp, address: \"{a}\", slave: 9, poll: 100ms, timeout: 100ms, offline_after: 2, points: [{{ name: v, table: holding, address: 0 }}] }}\n",
        a = dev.addr()
    );
    let gw = support::start(&gateway_yaml(&devices, "")).await;
    let mut c = Client::connect(
        support::mqtt_addr(&gw),
        "t-tcp-dead",
        &["d/#", "edgebridge/test-gw/devices/+/status"],
    )
    .await;
    let off = c
        .expect_where(WAIT, |g| {
            g.topic == status_topic("gone") && g.payload != "online"
        })
        .await
        .expect("a status change away from online");
    assert!(
        off.payload.contains("no answer within 100ms"),
        "{}",
        off.payload
    );
    let before = sim.count(9);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // In backoff (0.1, 0.2, 0.4, 0.8 s ...), not every 100 ms + timeout.
    let polled = sim.count(9) - before;
    assert!(polled <= 6, "dead unit polled {polled} times in 2 s");
    assert_eq!(c.expect("d/alive/v", WAIT).await.payload, "1");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_exception_is_a_device_failure_not_a_bad_address() {
    let sim = Sim::new();
    sim.add_slave(3);
    sim.set_holding(3, 0, &[1, 2, 3]);
    // A Modbus TCP gateway whose RTU device behind it is gone.
    sim.set_failing(3, Some(ExceptionCode::GatewayTargetDevice));
    let dev = TcpDevice::start(&sim).await;
    let devices = format!(
        "  - name: behind\n    driver: modbus-tcp\n    address: \"{}\"\n    slave: 3\n    poll: 100ms\n    offline_after: 2\n    points:\n{}",
        dev.addr(),
        points_yaml(&[
            "{ name: a, table: holding, address: 0 }",
            "{ name: b, table: holding, address: 1 }",
            "{ name: c, table: holding, address: 2 }",
        ])
    );
    let gw = support::start(&gateway_yaml(&devices, "")).await;
    let mut c = Client::connect(
        support::mqtt_addr(&gw),
        "t-gw-exc",
        &["d/#", "edgebridge/test-gw/devices/+/status"],
    )
    .await;
    let off = c
        .expect_where(WAIT, |g| {
            g.topic == status_topic("behind") && g.payload != "online"
        })
        .await
        .expect("a status change away from online");
    assert!(
        off.payload.contains("Gateway target device"),
        "{}",
        off.payload
    );
    // The device comes back: still one request per poll for the three
    // points, the plan was not split by the gateway's exception.
    sim.set_failing(3, None);
    assert_eq!(
        c.expect("d/behind/c", Duration::from_secs(20))
            .await
            .payload,
        "3"
    );
    c.drain_where(Duration::from_millis(400), |_| true).await;
    gw.shutdown().await;
    let reqs = sim.requests();
    assert!(
        reqs.iter()
            .all(|r| (r.function, r.address, r.count) == (3, 0, 3)),
        "{reqs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_line_is_counted_and_survived() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::new();
    sim.add_slave(1);
    sim.set_holding(1, 0, &[42]);
    // Slave 2 answers every request with a bad CRC.
    sim.add_slave(2);
    sim.set_garbage(2, true);
    let mut bus = RtuBus::start(&sim, &dir.path().join("ttyG"));
    let devices = format!(
        "  - {{ name: inv, driver: modbus-rtu, port: {p}, slave: 1, poll: 50ms, timeout: 100ms, points: [{{ name: v, table: holding, address: 0 }}] }}\n\
         \x20 - {{ name: noisy, driver: modbus-rtu, port: {p}, slave: 2, poll: 50ms, timeout: 100ms, offline_after: 3, points: [{{ name: v, table: holding, address: 0 }}] }}\n",
        p = bus.path().display()
    );
    let gw = support::start(&gateway_yaml(&devices, "")).await;
    let mut c = Client::connect(
        support::mqtt_addr(&gw),
        "t-garbage",
        &["d/#", "edgebridge/test-gw/devices/+/stats"],
    )
    .await;
    assert_eq!(c.expect("d/inv/v", WAIT).await.payload, "42");
    // Every poll of the noisy slave failed and was counted as a garbled
    // answer or a timeout (a frame that never completes); the stats come
    // with its going offline after 3 failed polls.
    let stats = c
        .expect("edgebridge/test-gw/devices/noisy/stats", WAIT)
        .await;
    let j: serde_json::Value = serde_json::from_str(&stats.payload).unwrap();
    let n = |k: &str| j[k].as_u64().unwrap();
    assert_eq!(j["online"], false, "{j}");
    assert_eq!((n("polls"), n("failed_polls")), (3, 3), "{j}");
    assert_eq!(n("garbled") + n("timeouts"), 3, "{j}");
    // Random bytes, and a well-formed answer with a wrong CRC, at random
    // moments while the gateway polls.
    let mut x: u32 = 0x1234_5678;
    for round in 0..40 {
        let mut junk = Vec::new();
        for _ in 0..(7 + round % 13) {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            junk.push((x >> 24) as u8);
        }
        bus.write_raw(&junk);
        bus.write_raw(&[0x01, 0x03, 0x02, 0x00, 0x2A, 0xDE, 0xAD]);
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    // Polling continues with correct values once the line is clean.
    sim.set_holding(1, 0, &[43]);
    c.expect_where(WAIT, |g| g.topic == "d/inv/v" && g.payload == "43")
        .await
        .expect("polling continues after garbage");
    c.drain_where(Duration::ZERO, |_| true).await;
    let seen = c
        .drain_where(Duration::from_millis(300), |g| g.topic == "d/inv/v")
        .await;
    assert!(seen.iter().all(|g| g.payload == "43"), "{seen:?}");
    let noisy = c
        .drain_where(Duration::ZERO, |g| g.topic == "d/noisy/v")
        .await;
    assert!(
        noisy.is_empty(),
        "a garbled answer became a reading: {noisy:?}"
    );
    gw.shutdown().await;
}

/// The simulator itself, without the gateway: several slaves on one PTY,
/// exceptions, silence, unplug and replug.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_serves_several_slaves_on_one_pty() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::new();
    load_fixture(&sim, 1);
    sim.add_slave(2);
    sim.set_holding(2, 0, &[7]);
    let mut bus = RtuBus::start(&sim, &dir.path().join("ttySIM0"));
    let port = tokio_serial::new(bus.path().to_string_lossy(), 9600);
    let stream = tokio_serial::SerialStream::open(&port).unwrap();
    let mut ctx = rtu::attach_slave(stream, Slave(1));
    let t = Duration::from_secs(2);
    let regs = tokio::time::timeout(t, ctx.read_holding_registers(0, 3))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(regs, vec![0x1234, 0xFFFE, 0xFEFF]);
    ctx.set_slave(Slave(2));
    let regs = tokio::time::timeout(t, ctx.read_holding_registers(0, 1))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(regs, vec![7]);
    sim.set_exception(2, Table::Holding, 5);
    let e = tokio::time::timeout(t, ctx.read_holding_registers(0, 10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e, Err(ExceptionCode::IllegalDataAddress));
    ctx.set_slave(Slave(3));
    assert!(
        tokio::time::timeout(Duration::from_millis(200), ctx.read_holding_registers(0, 1))
            .await
            .is_err()
    );
    assert_eq!(sim.count(1), 1);
    assert_eq!(sim.count(2), 2);
    assert_eq!(sim.count(3), 1);
    bus.unplug();
    ctx.set_slave(Slave(1));
    let r = tokio::time::timeout(t, ctx.read_holding_registers(0, 1)).await;
    assert!(matches!(r, Ok(Err(_))), "{r:?}");
    bus.plug();
    let stream = tokio_serial::SerialStream::open(&port).unwrap();
    let mut ctx = rtu::attach_slave(stream, Slave(1));
    let regs = tokio::time::timeout(t, ctx.read_holding_registers(0, 1))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(regs, vec![0x1234]);
}

/// Runs the real binary to completion (off the async threads, so the
/// simulator keeps serving meanwhile).
async fn edgebridge(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_edgebridge"))
            .args(&args)
            .env("EDGEBRIDGE_LOG", "warn")
            .output()
            .expect("edgebridge runs")
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_command_shows_every_order_and_a_devices_points() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::new();
    load_fixture(&sim, 1);
    let bus = RtuBus::start(&sim, &dir.path().join("ttyCLI"));
    let port = bus.path().display().to_string();
    // One-off: the f32 at 13 is stored word-swapped; CDAB shows it.
    let out = edgebridge(
        [
            "read",
            "--port",
            &port,
            "--slave",
            "1",
            "--address",
            "13",
            "--count",
            "2",
        ]
        .map(String::from)
        .to_vec(),
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f32_line = stdout
        .lines()
        .find(|l| l.contains(" f32 "))
        .expect("f32 line");
    let cols: Vec<&str> = f32_line.split_whitespace().collect();
    assert_eq!(cols[..2], ["13", "f32"], "{stdout}");
    assert_eq!(cols[3], "123.456", "CDAB column: {stdout}");
    assert_ne!(cols[2], "123.456", "ABCD column: {stdout}");
    // With the config: every point once, decoded as configured.
    let fixture = fixture_points();
    let pts: Vec<&str> = fixture.iter().map(|p| p.yaml).collect();
    let cfg = dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        format!(
            "gateway: {{ id: cli }}\ndevices:\n  - name: inverter\n    driver: modbus-rtu\n    port: {port}\n    slave: 1\n    points:\n{}",
            points_yaml(&pts)
        ),
    )
    .unwrap();
    let cfg = cfg.display().to_string();
    let out = edgebridge(
        ["-c", &cfg, "read", "--device", "inverter"]
            .map(String::from)
            .to_vec(),
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("inverter: slave 1 via"), "{stdout}");
    if std::env::var_os("SHOW_READ").is_some() {
        eprintln!("{stdout}");
    }
    assert!(stdout.contains("in 4 requests"), "{stdout}");
    for p in &fixture {
        let line = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(p.name))
            .unwrap_or_else(|| panic!("no line for {}: {stdout}", p.name));
        assert_eq!(line.split_whitespace().nth(1), Some(p.expected), "{line}");
    }
    // A device the config does not have: usage error.
    let out = edgebridge(
        ["-c", &cfg, "read", "--device", "nope"]
            .map(String::from)
            .to_vec(),
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    // A port that does not exist: runtime error with the reason.
    let out = edgebridge(
        ["read", "--port", "/dev/ttyNOPE9"]
            .map(String::from)
            .to_vec(),
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot open /dev/ttyNOPE9"));
    // While a gateway holds the port, `read` says so instead of disturbing
    // the bus.
    let gw = support::start(&gateway_yaml(
        &format!(
            "  - {{ name: inv, driver: modbus-rtu, port: {port}, slave: 1, poll: 100ms, points: [{{ name: v, table: holding, address: 0 }}] }}\n"
        ),
        "",
    ))
    .await;
    let mut c = Client::connect(support::mqtt_addr(&gw), "t-cli-busy", &["d/#"]).await;
    c.expect("d/inv/v", WAIT).await;
    let out = edgebridge(["read", "--port", &port].map(String::from).to_vec()).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("stop it first"), "{stderr}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_line_turns_each_line_into_a_reading() {
    let dir = tempfile::tempdir().unwrap();
    let mut port = crate::support::pty::LinePort::start(&dir.path().join("ttyGPS"));
    let yaml = support::yaml_with_broker(&format!(
        "devices:\n  - {{ name: gps, driver: serial-line, port: {}, baud: 4800, max_line_length: 20 }}\n\
         mappings:\n  - {{ match: gps/line, topic: gps/raw }}\n",
        port.path().display()
    ));
    let gw = support::start(&yaml).await;
    let mut c = Client::connect(
        support::mqtt_addr(&gw),
        "t-line",
        &[
            "gps/raw",
            "edgebridge/test-gw/devices/+/status",
            "edgebridge/test-gw/devices/+/stats",
        ],
    )
    .await;
    assert_eq!(c.expect(&status_topic("gps"), WAIT).await.payload, "online");
    port.send(b"$GPGGA,1\r\n$GPR").await;
    port.send(b"MC,2\r\n").await;
    assert_eq!(c.expect("gps/raw", WAIT).await.payload, "$GPGGA,1");
    assert_eq!(c.expect("gps/raw", WAIT).await.payload, "$GPRMC,2");
    // A line far over max_line_length is dropped, the next one arrives.
    port.send(&[b'x'; 300]).await;
    port.send(b"\nt=\xff21\nok\n").await;
    assert_eq!(c.expect("gps/raw", WAIT).await.payload, "t=\u{FFFD}21");
    assert_eq!(c.expect("gps/raw", WAIT).await.payload, "ok");
    // Unplugged and plugged in again: offline, online, lines again.
    port.unplug();
    let off = c
        .expect_where(WAIT, |g| {
            g.topic == status_topic("gps") && g.payload != "online"
        })
        .await
        .expect("a status change away from online");
    assert!(off.payload.contains("offline"), "{}", off.payload);
    // Counted, and published with the change: 4 lines, 1 oversize, 1 with
    // invalid UTF-8, 1 outage.
    let stats = c
        .expect_where(WAIT, |g| {
            g.topic == "edgebridge/test-gw/devices/gps/stats"
                && g.payload.contains("\"online\":false")
        })
        .await
        .expect("stats with the outage");
    let j: serde_json::Value = serde_json::from_str(&stats.payload).unwrap();
    assert_eq!(
        j,
        serde_json::json!({"lines": 4, "oversize": 1, "invalid_utf8": 1, "transport_errors": 1, "online": false})
    );
    port.plug();
    c.expect_where(WAIT, |g| {
        g.topic == status_topic("gps") && g.payload == "online"
    })
    .await
    .expect("online again after the replug");
    port.send(b"back\n").await;
    assert_eq!(c.expect("gps/raw", WAIT).await.payload, "back");
    gw.shutdown().await;
}
