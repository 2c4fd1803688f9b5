//! rhai rules in the running gateway: every API function through the
//! embedded broker, the sandbox (with the real binary's log), SIGHUP
//! reload, `edgebridge check` and `edgebridge rules test`, and a command
//! from MQTT to a device point.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::{self, Binary, Client, Got};

const WAIT: Duration = Duration::from_secs(5);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A temp folder with `rules/` holding `files`.
fn site(files: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    for (name, text) in files {
        std::fs::write(rules.join(name), text).unwrap();
    }
    (dir, rules)
}

/// A simulator device `sim` polled every 100 ms with the given points, the
/// `*/*` mapping to `devices/{device}/{point}` (bare value), and the rules.
fn yaml(rules: &Path, points: &str) -> String {
    support::yaml_with_broker(&format!(
        "devices:\n  - name: sim\n    driver: simulator\n    poll: 100ms\n    points:\n{points}mappings:\n  - {{ match: '*/*', topic: 'devices/{{device}}/{{point}}' }}\nrules: {{ dir: {}, deadline: 1s }}\n",
        rules.display()
    ))
}

fn json(g: &Got) -> serde_json::Value {
    serde_json::from_str(&g.payload).unwrap_or_else(|e| panic!("{}: {e}: {}", g.topic, g.payload))
}

const API_RULE: &str = r#"
const SUBSCRIBE = ["in/#"];

fn on_start() {
    state.count = 0;
    publish("out/started", "yes", #{ qos: 1, retain: true });
}

fn on_reading(r) {
    if r.point != "temp" { return; }
    state.count += 1;
    publish("out/reading", #{
        value: r.value, unit: r.unit, count: state.count, fresh: now_ms() - r.ts < 60000
    });
}

fn on_message(topic, payload) {
    let j = parse_json(payload);
    log("info", `api.rhai got ${topic}`);
    publish("out/echo", to_json(#{ topic: topic, doubled: j.n * 2 }));
    let r = write("sim", "led", j.led);
    publish("out/write", r.ok);
    let bad = write("sim", "temp", 1);
    publish("out/bad-write", bad.error);
}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_function_works_through_the_gateway() {
    let (_dir, rules) = site(&[("api.rhai", API_RULE)]);
    let gw = support::start(&yaml(
        &rules,
        "      - { name: temp, wave: constant, value: 21.5, unit: C }\n      - { name: led, wave: constant, value: 0, type: bool, writable: true }\n",
    ))
    .await;
    let addr = support::mqtt_addr(&gw);
    let mut c = Client::connect(addr, "t-api", &["out/#", "devices/sim/led"]).await;

    // on_start + publish with options: retained, so a later client gets it.
    assert_eq!(c.expect("out/started", WAIT).await.payload, "yes");
    let mut late = Client::connect(addr, "t-api-late", &["out/started"]).await;
    let started = late.expect("out/started", WAIT).await;
    assert_eq!((started.payload.as_str(), started.retain), ("yes", true));

    // on_reading, a map payload as JSON, now_ms, and state across calls.
    let first = json(&c.expect("out/reading", WAIT).await);
    let second = json(&c.expect("out/reading", WAIT).await);
    assert_eq!(first["value"], 21.5);
    assert_eq!(first["unit"], "C");
    assert_eq!(first["fresh"], true);
    assert_eq!(
        second["count"].as_i64().unwrap(),
        first["count"].as_i64().unwrap() + 1,
        "state.count survives between calls"
    );

    // on_message (SUBSCRIBE), parse_json, to_json, write, log.
    c.client
        .publish(
            "in/x",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"n":21,"led":true}"#,
        )
        .await
        .unwrap();
    let echo = json(&c.expect("out/echo", WAIT).await);
    assert_eq!(echo, serde_json::json!({"topic": "in/x", "doubled": 42}));
    assert_eq!(c.expect("out/write", WAIT).await.payload, "true");
    let bad = c.expect("out/bad-write", WAIT).await.payload;
    assert!(bad.contains("read-only"), "{bad}");
    let led = c
        .expect_where(WAIT, |g| {
            g.topic == "devices/sim/led" && g.payload == "true"
        })
        .await;
    assert!(led.is_some(), "the written point did not change");

    let mut status = Client::connect(addr, "t-api-status", &["edgebridge/test-gw/rules"]).await;
    let counters = json(&status.expect("edgebridge/test-gw/rules", WAIT).await);
    assert_eq!(counters["files"][0]["file"], "api.rhai", "{counters}");
    assert_eq!(counters["files"][0]["errors"], 0, "{counters}");

    let stats = gw.rules().expect("rules configured").stats().await;
    assert_eq!(stats.len(), 1);
    assert!(stats[0].calls >= 4, "{stats:?}");
    assert_eq!((stats[0].errors, stats[0].deadlines), (0, 0), "{stats:?}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_reading_changes_drops_or_passes_readings_and_errors_are_counted() {
    let (_dir, rules) = site(&[
        (
            "a.rhai",
            r#"fn on_reading(r) {
                if r.point == "noise" { return false; }
                if r.point == "power" { r.value = r.value / 1000.0; r.unit = "kW"; return r; }
            }"#,
        ),
        (
            "b.rhai",
            "fn on_reading(r) {\n  if r.point == \"other\" { r.value.nope() }\n}",
        ),
    ]);
    let gw = support::start(&yaml(
        &rules,
        "      - { name: power, wave: constant, value: 2500, unit: W }\n      - { name: noise, wave: constant, value: 7 }\n      - { name: other, wave: constant, value: 3 }\n",
    ))
    .await;
    let mut c = Client::connect(support::mqtt_addr(&gw), "t-change", &["devices/sim/#"]).await;
    assert_eq!(c.expect("devices/sim/power", WAIT).await.payload, "2.5");
    // A failing rule leaves the reading as it was.
    assert_eq!(c.expect("devices/sim/other", WAIT).await.payload, "3");
    // Three more polls went by; none of them published the dropped point.
    for _ in 0..3 {
        c.expect("devices/sim/power", WAIT).await;
    }
    let dropped = c
        .drain_where(Duration::ZERO, |g| g.topic == "devices/sim/noise")
        .await;
    assert!(dropped.is_empty(), "{dropped:?}");

    let stats = gw.rules().unwrap().stats().await;
    let by_file = |f: &str| stats.iter().find(|s| &*s.file == f).cloned().unwrap();
    assert_eq!(by_file("a.rhai").errors, 0, "{stats:?}");
    assert!(by_file("b.rhai").errors >= 1, "{stats:?}");
    gw.shutdown().await;
}

/// Polls the binary's stderr until it contains every needle.
async fn wait_log(bin: &Binary, needles: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = bin.stderr();
        if needles.iter().all(|n| log.contains(n)) {
            return log;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "log lacks one of {needles:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `edgebridge run` in `dir` on a free port; `rest` is appended to the config.
async fn run_binary(dir: &Path, rest: &str) -> (Binary, std::net::SocketAddr) {
    let port = support::free_port();
    std::fs::write(
        dir.join("config.yaml"),
        format!(
            "gateway: {{ id: rules-gw }}\nbroker:\n  listeners:\n    - {{ bind: \"127.0.0.1:{port}\", protocol: mqtt }}\n{rest}"
        ),
    )
    .unwrap();
    let bin = Binary::spawn(&["run"], dir);
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    support::wait_port(addr, Duration::from_secs(10)).await;
    (bin, addr)
}

const SIM: &str = "devices:\n  - name: sim\n    driver: simulator\n    poll: 100ms\n    points:\n      - { name: p, wave: constant, value: 1 }\n      - { name: good, wave: constant, value: 5 }\nmappings:\n  - { match: '*/*', topic: 'devices/{device}/{point}' }\nrules: { dir: ./rules }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_stops_runaway_rules_and_data_keeps_flowing() {
    let (dir, _) = site(&[
        (
            "loop.rhai",
            "fn on_reading(r) {\n  if r.point == \"p\" { loop { } }\n}",
        ),
        (
            "recurse.rhai",
            "fn down(n) { down(n + 1) }\nfn on_reading(r) {\n  if r.point == \"p\" { down(0) }\n}",
        ),
        (
            "string.rhai",
            "fn on_reading(r) {\n  if r.point == \"p\" { let s = \"x\"; loop { s += s; } }\n}",
        ),
    ]);
    let (bin, addr) = run_binary(dir.path(), SIM).await;
    let mut c = Client::connect(addr, "t-sandbox", &["devices/sim/#"]).await;
    let log = wait_log(
        &bin,
        &[
            "loop.rhai:1:1: on_reading: stopped after the 10ms deadline",
            "recurse.rhai:2:1: on_reading: Stack overflow",
            "string.rhai:1:1: on_reading: Length of string too large",
        ],
    )
    .await;
    // Each failure is logged with its file and counted.
    assert!(log.contains("rule failed"), "{log}");
    assert!(log.contains("rule=loop.rhai"), "{log}");
    // Readings still pass (the failed rules leave them unchanged).
    for _ in 0..3 {
        assert_eq!(c.expect("devices/sim/good", WAIT).await.payload, "5");
        assert_eq!(c.expect("devices/sim/p", WAIT).await.payload, "1");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_rules_keeps_state_and_rejects_a_broken_set() {
    let counter = r#"fn on_reading(r) { if r.point == "p" { state.n = (state.n ?? 0) + 1; publish("count", state.n); } }"#;
    let version = |v: u32| {
        format!(
            r#"fn on_start() {{ log("warn", "version {v} loaded"); print("printed by {v}"); }}
fn on_reading(r) {{ if r.point == "p" {{ publish("ver", "{v}"); }} }}"#
        )
    };
    let (dir, rules) = site(&[("counter.rhai", counter), ("version.rhai", &version(1))]);
    let (bin, addr) = run_binary(dir.path(), SIM).await;
    let mut c = Client::connect(addr, "t-reload", &["ver", "count"]).await;
    assert_eq!(c.expect("ver", WAIT).await.payload, "1");
    let mut before = 0;
    while before < 3 {
        before = c.expect("count", WAIT).await.payload.parse().unwrap();
    }

    std::fs::write(rules.join("version.rhai"), version(2)).unwrap();
    bin.signal("HUP");
    let v2 = c
        .expect_where(WAIT, |g| g.topic == "ver" && g.payload == "2")
        .await;
    assert!(
        v2.is_some(),
        "the new rule did not take over\n{}",
        bin.stderr()
    );
    let log = wait_log(
        &bin,
        &[
            "rules reloaded",
            "kept=[\"counter.rhai\"]",
            "version 2 loaded rule=\"version.rhai\"",
            "printed by 2 rule=version.rhai",
        ],
    )
    .await;
    assert!(log.contains("version 1 loaded"), "{log}");
    c.drain_where(Duration::ZERO, |g| g.topic == "count").await;
    let after: u64 = c.expect("count", WAIT).await.payload.parse().unwrap();
    assert!(
        after > before,
        "state of the unchanged file was lost: {after} after {before}"
    );

    // A broken set (here: `eval`) is rejected as a whole; version 2 stays.
    std::fs::write(
        rules.join("version.rhai"),
        "fn on_reading(r) {\n  eval(\"publish('ver', '3')\")\n}",
    )
    .unwrap();
    bin.signal("HUP");
    let log = wait_log(&bin, &["rules reload rejected", "version.rhai:2:3:"]).await;
    assert!(log.contains("eval"), "{log}");
    c.drain_where(Duration::ZERO, |g| g.topic == "ver").await;
    for _ in 0..3 {
        assert_eq!(c.expect("ver", WAIT).await.payload, "2");
    }
}

fn edgebridge(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_edgebridge"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("binary runs")
}

#[test]
fn check_and_run_reject_rules_that_do_not_compile() {
    let (dir, _) = site(&[
        ("a.rhai", "fn on_reading(r) { }"),
        ("b.rhai", "import \"other\" as o;\nfn on_reading(r) { }"),
    ]);
    std::fs::write(
        dir.path().join("config.yaml"),
        "gateway: { id: gw }\nrules: { dir: ./rules }\n",
    )
    .unwrap();
    for cmd in ["check", "run"] {
        let out = edgebridge(&[cmd], dir.path());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {err}");
        assert!(err.contains("rules/b.rhai:1:1: "), "{cmd}: {err}");
        assert!(err.contains("import"), "{cmd}: {err}");
    }
    std::fs::remove_file(dir.path().join("rules/b.rhai")).unwrap();
    let out = edgebridge(&["check"], dir.path());
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 rule file(s) ok"));

    // A rules folder that is not there.
    std::fs::write(
        dir.path().join("config.yaml"),
        "gateway: { id: gw }\nrules: { dir: ./nowhere }\n",
    )
    .unwrap();
    let out = edgebridge(&["check"], dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("nowhere: cannot read rules: `rules.dir` is not a folder"),
        "{err}"
    );
}

#[test]
fn rules_test_passes_the_shipped_fixtures() {
    let out = edgebridge(&["rules", "test"], repo());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("pv.test.yaml"), "{stdout}");
    assert!(stdout.contains("led.test.yaml"), "{stdout}");
    assert!(stdout.contains("nmea.test.yaml"), "{stdout}");
    assert!(stdout.trim_end().ends_with(" 0 failed"), "{stdout}");
}

#[test]
fn rules_test_fails_with_a_diff_on_a_wrong_expectation() {
    let pv = std::fs::read_to_string(repo().join("rules/pv.rhai")).unwrap();
    let (dir, rules) = site(&[("pv.rhai", &pv)]);
    let fixture = rules.join("wrong.test.yaml");
    std::fs::write(
        &fixture,
        "tests:\n  - name: deliberately wrong\n    steps:\n      - reading: { device: demo-pv, point: power, value: 2500, ts: 0 }\n        publishes:\n          - { topic: PV/data, payload: \"9.9\" }\n          - { topic: PV/sunshine, payload: \"false\" }\n",
    )
    .unwrap();
    let out = edgebridge(&["rules", "test", "rules/wrong.test.yaml"], dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    for needle in [
        "FAIL  deliberately wrong",
        "publishes differ (- expected, + actual):",
        "- PV/data \"9.9\"",
        "+ PV/data \"2.5\" qos=1 retain=true",
        "  PV/sunshine \"false\" qos=1 retain=true",
        "1 test, 1 failed",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?}:\n{stdout}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cmd_led_switches_a_point_through_the_shipped_led_rule() {
    let gw = support::start(&support::yaml_with_broker(&format!(
        "devices:\n  - name: demo-pv\n    driver: simulator\n    poll: 100ms\n    points:\n      - {{ name: led, wave: constant, value: 0, type: bool, writable: true }}\nmappings:\n  - {{ match: '*/*', topic: 'devices/{{device}}/{{point}}' }}\nrules: {{ dir: {}, deadline: 1s }}\n",
        repo().join("rules").display()
    )))
    .await;
    let mut c = Client::connect(
        support::mqtt_addr(&gw),
        "t-led",
        &["devices/demo-pv/led", "cmd/led/result"],
    )
    .await;
    assert_eq!(c.expect("devices/demo-pv/led", WAIT).await.payload, "false");
    c.client
        .publish("cmd/led", rumqttc::QoS::AtLeastOnce, false, "on")
        .await
        .unwrap();
    let result = json(&c.expect("cmd/led/result", WAIT).await);
    assert_eq!(result, serde_json::json!({"ok": true, "value": true}));
    let on = c
        .expect_where(WAIT, |g| {
            g.topic == "devices/demo-pv/led" && g.payload == "true"
        })
        .await;
    assert!(on.is_some(), "the LED point did not change");

    c.client
        .publish("cmd/led", rumqttc::QoS::AtLeastOnce, false, "purple")
        .await
        .unwrap();
    let refused = json(&c.expect("cmd/led/result", WAIT).await);
    assert_eq!(refused["ok"], false, "{refused}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_rule_neither_holds_up_nor_reorders_the_readings() {
    // Every call runs into the 10 ms deadline while the simulator polls
    // every 1 ms: the rules fall behind, and the batches taken while too
    // many wait skip them (mappings only) instead of making the driver
    // wait. The skipped ones must not overtake those still waiting for
    // the rules: the readings' times arrive in order.
    let (_dir, rules) = site(&[("slow.rhai", "fn on_reading(r) { loop { } }")]);
    let yaml = support::yaml_with_broker(&format!(
        "devices:\n  - name: sim\n    driver: simulator\n    poll: 1ms\n    points:\n      - {{ name: p, wave: ramp }}\nmappings:\n  - {{ match: '*/*', topic: 'devices/{{device}}/{{point}}', payload: '{{ts}}' }}\nrules: {{ dir: {} }}\n",
        rules.display()
    ));
    let gw = support::start(&yaml).await;
    let mut c = Client::connect(support::mqtt_addr(&gw), "t-slow", &["devices/sim/p"]).await;
    let rt = gw.rules().unwrap().clone();
    let mut last = 0u64;
    let mut in_order = |payload: &str| {
        let ts: u64 = payload.parse().unwrap();
        assert!(ts >= last, "a reading of {ts} arrived after one of {last}");
        last = ts;
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while rt.bypassed() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rules never fell behind"
        );
        in_order(&c.expect("devices/sim/p", WAIT).await.payload);
    }
    // Readings keep arriving, in order, while the rules are behind.
    for _ in 0..2000 {
        in_order(&c.expect("devices/sim/p", WAIT).await.payload);
    }
    assert!(rt.bypassed() > 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_waiting_on_a_full_pipeline_still_answers_a_rules_write() {
    // The rule's first `write()` goes to a Modbus device that never
    // answers (3 s timeout) while the simulator polls every 1 ms: the
    // pipeline's channel (1 024 batches) fills and the simulator waits for
    // room. The rule then writes to the simulator, which must answer while
    // it waits, or each side would wait for the other until the command
    // timeout (10 s).
    let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mute_addr = mute.local_addr().unwrap();
    let (_dir, rules) = site(&[(
        "w.rhai",
        r#"
        fn on_reading(r) {
            if r.device == "sim" && state.done == () {
                state.done = true;
                let dead = write("mute", "k", true);
                let live = write("sim", "p", 42);
                publish("result", `${dead.ok} ${live.ok} ${live.error}`);
            }
            r
        }
        "#,
    )]);
    let yaml = support::yaml_with_broker(&format!(
        "devices:\n  - name: sim\n    driver: simulator\n    poll: 1ms\n    points:\n      - {{ name: p, wave: ramp, writable: true }}\n  \
         - {{ name: mute, driver: modbus-tcp, address: \"{mute_addr}\", poll: 1h, timeout: 3s, points: [{{ name: k, table: coil, address: 1, writable: true }}] }}\n\
         rules: {{ dir: {}, deadline: 1s }}\n",
        rules.display()
    ));
    let gw = support::start(&yaml).await;
    let mut c = Client::connect(support::mqtt_addr(&gw), "t-full", &["result"]).await;
    let started = std::time::Instant::now();
    let result = c.expect("result", Duration::from_secs(30)).await;
    assert_eq!(
        result.payload,
        "false true ",
        "took {:?}",
        started.elapsed()
    );
    drop(mute);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_does_not_receive_its_own_messages() {
    // Subscribed to loop/#, answering on loop/<x>/re: without protection
    // every answer would trigger the next one, forever.
    let (_dir, rules) = site(&[(
        "echo.rhai",
        r#"
        const SUBSCRIBE = ["loop/#"];
        fn on_message(topic, payload) {
            state.n = (state.n ?? 0) + 1;
            publish(topic + "/re", payload);
            publish("calls", state.n);
        }
        "#,
    )]);
    let gw = support::start(&yaml(
        &rules,
        "      - { name: p, wave: constant, value: 1 }\n",
    ))
    .await;
    let mut c = Client::connect(support::mqtt_addr(&gw), "t-echo", &["calls", "loop/#"]).await;
    for (i, topic) in ["loop/a", "loop/b"].into_iter().enumerate() {
        c.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, "x")
            .await
            .unwrap();
        let calls = c.expect("calls", WAIT).await;
        assert_eq!(
            calls.payload,
            (i + 1).to_string(),
            "on_message ran for its own answer"
        );
        assert_eq!(c.expect(&format!("{topic}/re"), WAIT).await.payload, "x");
    }
    // Another client's message on the same topic as an answer still counts.
    c.client
        .publish("loop/a/re", rumqttc::QoS::AtLeastOnce, false, "from-lan")
        .await
        .unwrap();
    assert_eq!(c.expect("calls", WAIT).await.payload, "3");
    let answers_to_answers = c
        .drain_where(Duration::ZERO, |g| {
            g.topic.ends_with("/re/re") && g.payload == "x"
        })
        .await;
    assert!(answers_to_answers.is_empty(), "{answers_to_answers:?}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_line_turns_gps_lines_from_a_serial_port_into_readings() {
    let dir = tempfile::tempdir().unwrap();
    let mut port = crate::support::pty::LinePort::start(&dir.path().join("ttyGPS"));
    let gw = support::start(&support::yaml_with_broker(&format!(
        "devices:\n  - {{ name: gps, driver: serial-line, port: {}, baud: 4800 }}\nmappings:\n  - {{ match: '*/*', topic: 'devices/{{device}}/{{point}}', payload: json }}\nrules: {{ dir: {}, deadline: 1s }}\n",
        port.path().display(),
        repo().join("rules").display()
    )))
    .await;
    let mut c = Client::connect(
        support::mqtt_addr(&gw),
        "t-gps",
        &["devices/gps/#", "edgebridge/test-gw/devices/gps/status"],
    )
    .await;
    assert_eq!(
        c.expect("edgebridge/test-gw/devices/gps/status", WAIT)
            .await
            .payload,
        "online"
    );
    port.send(b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n")
        .await;
    let lat = json(&c.expect("devices/gps/lat", WAIT).await);
    assert_eq!(lat["value"], 48.1173);
    let alt = json(&c.expect("devices/gps/alt", WAIT).await);
    assert_eq!(
        (alt["value"].as_f64(), alt["unit"].as_str()),
        (Some(545.4), Some("m"))
    );
    assert_eq!(
        json(&c.expect("devices/gps/satellites", WAIT).await)["value"],
        8
    );
    // The line itself is a reading too.
    let line = json(&c.expect("devices/gps/line", WAIT).await);
    assert!(
        line["value"].as_str().unwrap().starts_with("$GPGGA"),
        "{line}"
    );
    // A corrupt line gives no position, and the next good one does.
    port.send(b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*48\r\n")
        .await;
    port.send(b"$GNGGA,001043.00,3351.7800,S,15112.6000,W,2,11,0.8,12.0,M,22.1,M,,*49\r\n")
        .await;
    let lat = json(&c.expect("devices/gps/lat", WAIT).await);
    assert_eq!(lat["value"], -33.863);
    gw.shutdown().await;
}

/// Issue 18: a serial-line device added by a reload (SIGHUP) reaches the
/// rules' `on_line` (the rules thread kept the device set of the start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serial_line_device_added_by_a_reload_reaches_on_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut port = crate::support::pty::LinePort::start(&dir.path().join("ttyGPS"));
    let rest = |devices: &str| {
        format!(
            "{devices}mappings:\n  - {{ match: '*/*', topic: 'devices/{{device}}/{{point}}', payload: json }}\nrules: {{ dir: {}, deadline: 1s }}\n",
            repo().join("rules").display()
        )
    };
    let mut gw = support::start(&support::yaml_with_broker(&rest(
        "devices:\n  - { name: sim, driver: simulator, poll: 1s, points: [{ name: p, wave: sine }] }\n",
    )))
    .await;
    let mut c = Client::connect(support::mqtt_addr(&gw), "t-gps-reload", &["devices/gps/#"]).await;
    let with_gps = support::yaml_with_broker(&rest(&format!(
        "devices:\n  - {{ name: sim, driver: simulator, poll: 1s, points: [{{ name: p, wave: sine }}] }}\n  - {{ name: gps, driver: serial-line, port: {}, baud: 4800 }}\n",
        port.path().display()
    )));
    let report = gw
        .reload(support::config(&with_gps))
        .await
        .expect("reload applies");
    assert_eq!(report.devices.started, ["gps"]);
    gw.reload_rules()
        .await
        .expect("rules configured")
        .expect("rules reload");
    tokio::time::sleep(Duration::from_millis(500)).await;
    port.send(b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n")
        .await;
    let lat = json(&c.expect("devices/gps/lat", WAIT).await);
    assert_eq!(lat["value"], 48.1173);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_converts_to_the_point_type_of_the_reloaded_config() {
    // `p` is untyped at start (a write passes its value as is) and a
    // `bool` after the reload: the rule's `write(…, 1)` must then become
    // `true`, as the new config says, not stay the number 1.
    let (_dir, rules) = site(&[(
        "w.rhai",
        r#"
        const SUBSCRIBE = ["set"];
        fn on_message(topic, payload) {
            let r = write("sim", "p", 1);
            publish("set/result", `${r.ok} ${r.error}`);
        }
        "#,
    )]);
    let config = |point: &str| {
        support::yaml_with_broker(&format!(
            "devices:\n  - {{ name: sim, driver: simulator, poll: 100ms, points: [{point}] }}\nmappings:\n  - {{ match: '*/*', topic: 'devices/{{device}}/{{point}}' }}\nrules: {{ dir: {}, deadline: 1s }}\n",
            rules.display()
        ))
    };
    let mut gw = support::start(&config(
        "{ name: p, wave: constant, min: 0, writable: true }",
    ))
    .await;
    let mut c = Client::connect(
        support::mqtt_addr(&gw),
        "t-write-type",
        &["devices/sim/p", "set/result"],
    )
    .await;
    let report = gw
        .reload(support::config(&config(
            "{ name: p, wave: constant, min: 0, type: bool, writable: true }",
        )))
        .await
        .expect("reload applies");
    assert_eq!(report.devices.restarted, ["sim"]);
    gw.reload_rules()
        .await
        .expect("rules configured")
        .expect("rules reload");
    c.client
        .publish("set", rumqttc::QoS::AtLeastOnce, false, "go")
        .await
        .unwrap();
    assert_eq!(c.expect("set/result", WAIT).await.payload, "true ");
    let written = c
        .expect_where(WAIT, |g| g.topic == "devices/sim/p" && g.payload == "true")
        .await;
    // Written as the old (untyped) point, the value would read `1`.
    assert!(
        written.is_some(),
        "the point never read `true` after the write"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cmd_led_switches_a_coil_on_a_modbus_rtu_device() {
    use crate::support::modbus_sim::{RtuBus, Sim};
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::new();
    sim.add_slave(1);
    let bus = RtuBus::start(&sim, &dir.path().join("ttyRS485"));
    // led.rhai writes demo-pv/led; here demo-pv is a Modbus RTU inverter.
    let gw = support::start(&support::yaml_with_broker(&format!(
        "devices:\n  - name: demo-pv\n    driver: modbus-rtu\n    port: {}\n    slave: 1\n    poll: 200ms\n    points:\n      - {{ name: led, table: coil, address: 1, writable: true }}\nmappings:\n  - {{ match: '*/*', topic: 'devices/{{device}}/{{point}}' }}\nrules: {{ dir: {}, deadline: 1s }}\n",
        bus.path().display(),
        repo().join("rules").display()
    )))
    .await;
    let mut c = Client::connect(
        support::mqtt_addr(&gw),
        "t-coil",
        &["devices/demo-pv/led", "cmd/led/result"],
    )
    .await;
    assert_eq!(c.expect("devices/demo-pv/led", WAIT).await.payload, "false");
    assert!(!sim.coil(1, 1));
    c.client
        .publish("cmd/led", rumqttc::QoS::AtLeastOnce, false, "on")
        .await
        .unwrap();
    let result = json(&c.expect("cmd/led/result", WAIT).await);
    assert_eq!(result, serde_json::json!({"ok": true, "value": true}));
    assert!(sim.coil(1, 1), "the coil was not written");
    let polled = c
        .expect_where(WAIT, |g| {
            g.topic == "devices/demo-pv/led" && g.payload == "true"
        })
        .await;
    assert!(polled.is_some(), "the next poll did not read the coil back");
    c.client
        .publish(
            "cmd/led",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"value": false}"#,
        )
        .await
        .unwrap();
    assert_eq!(json(&c.expect("cmd/led/result", WAIT).await)["ok"], true);
    assert!(!sim.coil(1, 1));
    gw.shutdown().await;
}
