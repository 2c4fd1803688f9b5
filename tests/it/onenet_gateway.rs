//! The gateway's OneNET bridge against the stand-in: real gateway, real
//! simulator, real TCP, OneNET's rules enforced by the stand-in.

use std::time::Duration;

use serde_json::{json, Value as Json};

use crate::support::onenet_standin::{StandIn, SAMPLE_KEY};
use crate::support::{self, Client};

const WAIT: Duration = Duration::from_secs(15);

struct Setup {
    _dir: tempfile::TempDir,
    yaml: String,
}

/// A gateway config with its own data dir, an embedded broker on port 0,
/// `devices` (YAML) and a OneNET bridge `cloud` pointing at `s`.
fn setup(s: &StandIn, devices: &str, onenet_extra: &str, bridge_extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "gateway: {{ id: test-gw, data_dir: {data} }}
broker:
  listeners:
    - {{ bind: \"127.0.0.1:0\", protocol: mqtt }}
{devices}
bridges:
  - name: cloud
    url: {url}
    reconnect: {{ min: 100ms, max: 500ms }}
    onenet:
      product_id: {pid}
      device_name: {dev}
      access_key: \"{key}\"
{onenet_extra}{bridge_extra}",
        data = dir.path().display(),
        url = s.url(),
        pid = s.product_id,
        dev = s.device_name,
        key = SAMPLE_KEY,
    );
    Setup { _dir: dir, yaml }
}

async fn standin() -> StandIn {
    StandIn::start("abc123", "gw-001", SAMPLE_KEY).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_flows_to_onenet_as_properties() {
    let s = standin().await;
    s.set_known_properties(&["power", "sunshine"]);
    let devices = "devices:
  - name: pv
    driver: simulator
    poll: 200ms
    points:
      - { name: power, wave: constant, value: 2500, unit: W }
      - { name: sunshine, wave: square, period: 1h }
mappings:
  - { match: pv/power, topic: PV/data, scale: 0.001 }
  - { match: pv/sunshine, topic: PV/sunshine }
";
    let props = "    properties:
      - { topics: PV/data, property: power }
      - { topics: PV/sunshine, property: sunshine }
";
    let cfg = setup(&s, devices, "", props);
    let before = edgebridge::model::now_ms();
    let gw = support::start(&cfg.yaml).await;
    let (power, sunshine) = s
        .wait_for("a post with both properties", WAIT, |st| {
            let v = st.posted_values();
            let p = v.iter().find(|(k, _, _)| k == "power").cloned();
            let q = v.iter().find(|(k, _, _)| k == "sunshine").cloned();
            p.zip(q)
        })
        .await;
    assert_eq!(power.1, json!(2.5), "numbers as numbers");
    assert_eq!(sunshine.1, json!(true), "booleans as booleans");
    assert!(
        power.2 >= before && power.2 <= edgebridge::model::now_ms(),
        "time in ms"
    );
    let mut local = Client::connect(
        support::mqtt_addr(&gw),
        "t-status",
        &["edgebridge/test-gw/bridges/cloud/status"],
    )
    .await;
    let status = local
        .expect_where(WAIT, |g| g.payload.contains("\"connected\":true"))
        .await;
    assert!(status.is_some(), "bridge status never said connected");
    let running = gw
        .bridges()
        .iter()
        .find(|b| b.name == "cloud")
        .expect("listed");
    let mut live = running.status.clone();
    tokio::time::timeout(WAIT, live.wait_for(|st| st.connected && st.forwarded >= 1))
        .await
        .expect("live status: connected with a post acknowledged")
        .unwrap();
    {
        let st = s.state();
        let c = &st.connects[0];
        assert!(c.accepted, "{c:?}");
        assert_eq!(c.client_id, "gw-001");
        assert!(st.violations.is_empty(), "{:?}", st.violations);
        let post = st.property_posts()[0].json();
        assert_eq!(post["version"], "1.0");
        let id = post["id"].as_str().unwrap();
        assert!(
            id.len() <= 13 && id.bytes().all(|b| b.is_ascii_digit()),
            "{id}"
        );
        assert!(st
            .property_posts()
            .iter()
            .all(|r| r.qos == rumqttc::QoS::AtLeastOnce));
        let subs = &st.subscriptions;
        assert!(subs.contains(&s.topics().property_set()), "{subs:?}");
        assert!(subs.contains(&s.topics().property_post_reply()), "{subs:?}");
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_local_data_is_batched_to_at_most_one_post_per_second() {
    let s = standin().await;
    // 50 readings per second.
    let devices = "devices:
  - name: pv
    driver: simulator
    poll: 20ms
    points:
      - { name: power, wave: ramp, min: 0, max: 1000, period: 10s }
mappings:
  - { match: pv/power, topic: PV/data }
";
    let cfg = setup(
        &s,
        devices,
        "",
        "    properties:\n      - { topics: PV/data, property: power }\n",
    );
    let gw = support::start(&cfg.yaml).await;
    let mut local = Client::connect(support::mqtt_addr(&gw), "t-local", &["PV/data"]).await;
    s.wait_for("4 posts", WAIT, |st| {
        (st.property_posts().len() >= 4).then_some(())
    })
    .await;
    let readings = local
        .drain_where(Duration::ZERO, |g| g.topic == "PV/data")
        .await
        .len();
    {
        let st = s.state();
        let posts = st.property_posts();
        // Posts leave at least a second apart; allow for scheduling jitter
        // in when the stand-in sees them.
        assert_eq!(
            st.max_posts_within(Duration::from_millis(950)),
            1,
            "more than 1 post/s"
        );
        assert!(
            readings > 2 * posts.len(),
            "{readings} local readings should have been merged into {} posts",
            posts.len()
        );
        // Each post carries one value per property, with its own time, and
        // times only move forward.
        let times: Vec<i64> = st.posted_values().iter().map(|(_, _, t)| *t).collect();
        assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
        assert!(st.violations.is_empty(), "{:?}", st.violations);
    }
    gw.shutdown().await;
}

const RELAY: &str = "devices:
  - name: pv
    driver: simulator
    poll: 200ms
    points:
      - { name: relay, wave: constant, value: 0, type: bool, writable: true }
mappings:
  - { match: pv/relay, topic: PV/relay }
commands:
  - { topic: onenet/cloud/set/relay, write: pv/relay }
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_property_set_reaches_a_writable_point_and_is_answered() {
    let s = standin().await;
    let cfg = setup(
        &s,
        RELAY,
        "      reply_timeout: 1s\n",
        "    properties:\n      - { topics: PV/relay, property: relay }\n",
    );
    let gw = support::start(&cfg.yaml).await;
    let set_topic = s.topics().property_set();
    s.wait_for("the set subscription", WAIT, |st| {
        st.subscriptions.contains(&set_topic).then_some(())
    })
    .await;
    s.wait_for("relay=false posted", WAIT, |st| {
        st.posted_values()
            .iter()
            .any(|(k, v, _)| k == "relay" && *v == json!(false))
            .then_some(())
    })
    .await;

    // A set that the device carries out: 200, and the point changes.
    let id = s.send_property_set(json!({"relay": true}));
    let reply = s.wait_for("set_reply", WAIT, |st| st.set_reply(&id)).await;
    assert_eq!(reply, json!({"id": id, "code": 200, "msg": "success"}));
    s.wait_for("relay=true posted", WAIT, |st| {
        st.posted_values()
            .iter()
            .any(|(k, v, _)| k == "relay" && *v == json!(true))
            .then_some(())
    })
    .await;

    // A property get is answered with the latest values sent.
    let id = s.send_property_get(&["relay"]);
    let reply = s.wait_for("get_reply", WAIT, |st| st.get_reply(&id)).await;
    assert_eq!(reply["code"], 200, "{reply}");
    assert_eq!(reply["data"], json!({"relay": true}), "{reply}");

    // A value the point cannot take: an error reply with the reason.
    let id = s.send_property_set(json!({"relay": "maybe"}));
    let reply = s.wait_for("set_reply", WAIT, |st| st.set_reply(&id)).await;
    assert_eq!(reply["code"], 500, "{reply}");
    assert!(
        reply["msg"].as_str().unwrap().starts_with("relay: "),
        "{reply}"
    );

    // A property nobody handles: a timeout reply, never silence.
    let id = s.send_property_set(json!({"fan": 3}));
    let reply = s.wait_for("set_reply", WAIT, |st| st.set_reply(&id)).await;
    assert_eq!(reply["code"], 504, "{reply}");
    assert_eq!(reply["msg"], "timeout: no answer for fan");

    // Only the device's own topics were used.
    assert!(
        s.state().violations.is_empty(),
        "{:?}",
        s.state().violations
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_properties_are_counted() {
    let s = standin().await;
    s.set_known_properties(&["power"]);
    let devices = "devices:
  - name: pv
    driver: simulator
    poll: 200ms
    points:
      - { name: power, wave: constant, value: 1 }
mappings:
  - { match: pv/power, topic: PV/data }
";
    let cfg = setup(
        &s,
        devices,
        "",
        "    properties:\n      - { topics: PV/data, property: nope }\n",
    );
    let gw = support::start(&cfg.yaml).await;
    let mut local = Client::connect(
        support::mqtt_addr(&gw),
        "t-status",
        &["edgebridge/test-gw/bridges/cloud/rejected"],
    )
    .await;
    let got = local
        .expect("edgebridge/test-gw/bridges/cloud/rejected", WAIT)
        .await;
    let counts: Json = serde_json::from_str(&got.payload).unwrap();
    assert!(counts["nope"].as_u64().unwrap() >= 1, "{counts}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_bridged_with_no_loss_and_original_times() {
    let s = standin().await;
    let devices = "devices:
  - name: pv
    driver: simulator
    poll: 500ms
    points:
      - { name: power, wave: ramp, min: 0, max: 1000, period: 1h }
mappings:
  - { match: pv/power, topic: PV/power, payload: json }
";
    let cfg = setup(
        &s,
        devices,
        "      batch_window: 200ms\n      min_interval: 200ms\n",
        "    properties:\n      - { topics: PV/power, property: power }\n",
    );
    let gw = support::start(&cfg.yaml).await;
    let mut local = Client::connect(support::mqtt_addr(&gw), "t-local", &["PV/power"]).await;
    s.wait_for("a first post", WAIT, |st| {
        st.property_posts().first().map(|_| ())
    })
    .await;

    s.begin_outage();
    s.wait_for("the device offline", WAIT, |st| (!st.online).then_some(()))
        .await;
    let connects_before = s.state().connects.len();
    // Forget readings from before the outage.
    local.drain_where(Duration::ZERO, |_| true).await;
    // Readings made while OneNET is unreachable, with their times.
    let mut during = Vec::new();
    while during.len() < 6 {
        let g = local.expect("PV/power", WAIT).await;
        let v: Json = serde_json::from_str(&g.payload).unwrap();
        during.push(v["ts"].as_i64().unwrap());
    }
    assert!(
        s.state().property_posts().iter().all(|r| {
            let t = r.json()["params"]["power"]["time"].as_i64().unwrap();
            t < during[0]
        }),
        "nothing from the outage can have arrived yet"
    );
    s.end_outage();

    let last = *during.last().unwrap();
    s.wait_for("the outage's readings", WAIT, |st| {
        st.posted_values()
            .iter()
            .any(|(_, _, t)| *t >= last)
            .then_some(())
    })
    .await;
    {
        let st = s.state();
        assert!(st.connects.len() > connects_before, "reconnected");
        assert!(
            !st.history_posts().is_empty(),
            "the backlog went out as history"
        );
        assert!(st.connects.last().unwrap().accepted);
        let posted: Vec<i64> = st.posted_values().iter().map(|(_, _, t)| *t).collect();
        // Original times: every posted time is a reading's own time, and every
        // reading of the outage is there (each had its own window).
        for ts in &during {
            assert!(
                posted.contains(ts),
                "reading at {ts} lost; posted: {posted:?}"
            );
        }
        // At-least-once: a post whose PUBACK was lost in the outage comes
        // again, so a time may repeat; it never goes backwards.
        assert!(
            posted.windows(2).all(|w| w[0] <= w[1]),
            "order kept: {posted:?}"
        );
        assert!(st.violations.is_empty(), "{:?}", st.violations);
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datastream_mode_posts_points_and_answers_commands() {
    let s = standin().await;
    let devices = "devices:
  - name: pv
    driver: simulator
    poll: 200ms
    points:
      - { name: power, wave: constant, value: 7 }
      - { name: relay, wave: constant, value: 0, type: bool, writable: true }
mappings:
  - { match: pv/power, topic: PV/data }
commands:
  - { topic: onenet/cloud/cmd, write: pv/relay }
";
    let cfg = setup(
        &s,
        devices,
        "      mode: datastream\n",
        "    properties:\n      - { topics: PV/data, property: power }\n",
    );
    let gw = support::start(&cfg.yaml).await;
    let dp = s
        .wait_for("a dp post", WAIT, |st| {
            st.dp_posts().first().map(|r| r.json())
        })
        .await;
    assert!(dp["id"].as_i64().unwrap() > 0, "{dp}");
    let points = dp["dp"]["power"].as_array().unwrap();
    assert_eq!(points[0]["v"].as_f64(), Some(7.0), "{dp}");
    assert!(
        points[0]["t"].as_i64().unwrap() < 10_000_000_000,
        "t in seconds"
    );
    let filter = s.topics().cmd_request_filter();
    s.wait_for("the cmd subscription", WAIT, |st| {
        st.subscriptions.contains(&filter).then_some(())
    })
    .await;
    s.send_command("c-1", b"on");
    let resp = s
        .wait_for("cmd response", WAIT, |st| st.cmd_response("c-1"))
        .await;
    let resp: Json = serde_json::from_slice(&resp).unwrap();
    assert_eq!(resp["code"], 200, "{resp}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_never_logs_the_key_or_the_token() {
    let s = standin().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "gateway: {{ id: test-gw, data_dir: ./data }}
broker:
  listeners:
    - {{ bind: \"127.0.0.1:0\", protocol: mqtt }}
devices:
  - name: pv
    driver: simulator
    poll: 200ms
    points:
      - {{ name: power, wave: constant, value: 1 }}
mappings:
  - {{ match: pv/power, topic: PV/data }}
bridges:
  - name: cloud
    url: {url}
    onenet:
      product_id: abc123
      device_name: gw-001
      access_key: \"{key}\"
    properties:
      - {{ topics: PV/data, property: power }}
",
        url = s.url(),
        key = SAMPLE_KEY,
    );
    std::fs::write(dir.path().join("config.yaml"), config).unwrap();
    let bin = support::Binary::spawn(&["run", "-c", "config.yaml"], dir.path());
    s.wait_for("a post from the binary", WAIT, |st| {
        st.property_posts().first().map(|_| ())
    })
    .await;
    bin.signal("TERM");
    let log = bin.stderr();
    assert!(log.contains("connected to OneNET"), "{log}");
    assert!(!log.contains(SAMPLE_KEY), "key in the log:\n{log}");
    assert!(!log.contains("sign="), "token in the log:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_reconnects_with_a_fresh_token_before_expiry() {
    let s = standin().await;
    let devices = "devices:
  - name: pv
    driver: simulator
    poll: 200ms
    points:
      - { name: power, wave: constant, value: 1 }
mappings:
  - { match: pv/power, topic: PV/data }
";
    let cfg = setup(
        &s,
        devices,
        "",
        "    properties:\n      - { topics: PV/data, property: power }\n",
    );
    // The config refuses lifetimes under 10 minutes; shorten it after
    // validation so that a refresh happens within the test.
    let mut config = support::config(&cfg.yaml);
    if let Some(o) = config.bridges[0].onenet.as_mut() {
        o.token_ttl = Duration::from_secs(3);
    }
    let gw = edgebridge::gateway::Gateway::start(config).await.unwrap();
    let n = s
        .wait_for("a second login", WAIT, |st| {
            (st.connects.iter().filter(|c| c.accepted).count() >= 2).then_some(st.connects.len())
        })
        .await;
    {
        let st = s.state();
        // The token was replaced before the stand-in had to refuse it, and
        // the first session ended with a DISCONNECT, not a violation.
        assert!(st.connects.iter().all(|c| c.accepted), "{:?}", st.connects);
        assert!(st.violations.is_empty(), "{:?}", st.violations);
        assert!(n >= 2);
        let (first, second) = (st.connects[0].token_et, st.connects[1].token_et);
        assert!(
            second > first,
            "the second login used a fresh token: {first:?} {second:?}"
        );
    }
    let before = s.state().property_posts().len();
    s.wait_for("posts after the refresh", WAIT, |st| {
        (st.property_posts().len() > before && st.online).then_some(())
    })
    .await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_devices_are_added_logged_in_and_packed() {
    let s = standin().await;
    const SUB_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    s.add_sub_device("subprod", "meter-1", SUB_KEY);
    s.add_sub_device("subprod", "meter-2", SUB_KEY);
    let devices = "devices:
  - name: m1
    driver: simulator
    poll: 200ms
    points:
      - { name: energy, wave: constant, value: 12 }
  - name: m2
    driver: simulator
    poll: 200ms
    points:
      - { name: energy, wave: constant, value: 34 }
mappings:
  - { match: '*/energy', topic: 'meters/{device}/energy' }
";
    let subs = format!(
        "      min_interval: 200ms
      sub_devices:
        - product_id: subprod
          device_name: meter-1
          access_key: \"{SUB_KEY}\"
          properties: [ {{ topics: meters/m1/energy, property: energy }} ]
        - product_id: subprod
          device_name: meter-2
          access_key: \"{SUB_KEY}\"
          properties: [ {{ topics: meters/m2/energy, property: energy }} ]
"
    );
    let cfg = setup(&s, devices, &subs, "");
    let gw = support::start(&cfg.yaml).await;
    let both = s
        .wait_for("both meters packed", WAIT, |st| {
            let v = st.packed_values();
            let m1 = v.iter().find(|e| e.1 == "meter-1").cloned();
            let m2 = v.iter().find(|e| e.1 == "meter-2").cloned();
            m1.zip(m2)
        })
        .await;
    assert_eq!(
        (both.0 .0.as_str(), both.0 .2.as_str()),
        ("subprod", "energy")
    );
    assert_eq!(both.0 .3.as_f64(), Some(12.0));
    assert_eq!(both.1 .3.as_f64(), Some(34.0));
    assert!(both.0 .4 > 1_700_000_000_000, "time in ms");
    {
        let st = s.state();
        // Every request was accepted: tokens verified, logins before posts.
        assert!(
            st.sub_replies.iter().all(|(_, code, _)| *code == 200),
            "{:?}",
            st.sub_replies
        );
        let kinds: Vec<&str> = st.sub_replies.iter().map(|(k, _, _)| k.as_str()).collect();
        assert_eq!(
            &kinds[..4],
            ["sub/topo/add", "sub/login", "sub/topo/add", "sub/login"]
        );
        assert!(st.topology.len() == 2 && st.logged_in.len() == 2);
        assert!(st.violations.is_empty(), "{:?}", st.violations);
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_queued_during_an_outage_survive_a_restart() {
    let s = standin().await;
    let devices = "devices:
  - name: pv
    driver: simulator
    poll: 300ms
    points:
      - { name: power, wave: ramp, min: 0, max: 1000, period: 1h }
mappings:
  - { match: pv/power, topic: PV/power, payload: json }
";
    let cfg = setup(
        &s,
        devices,
        "      batch_window: 100ms\n      min_interval: 100ms\n",
        "    properties:\n      - { topics: PV/power, property: power }\n",
    );
    // OneNET is down from the start: everything goes to the queue.
    s.begin_outage();
    let gw = support::start(&cfg.yaml).await;
    let mut local = Client::connect(support::mqtt_addr(&gw), "t-local", &["PV/power"]).await;
    let mut during = Vec::new();
    while during.len() < 4 {
        let g = local.expect("PV/power", WAIT).await;
        let v: Json = serde_json::from_str(&g.payload).unwrap();
        during.push(v["ts"].as_i64().unwrap());
    }
    drop(local);
    gw.shutdown().await;
    assert!(s.state().published.is_empty());

    // A new gateway process on the same data dir, OneNET back.
    s.end_outage();
    let gw = support::start(&cfg.yaml).await;
    let last = *during.last().unwrap();
    s.wait_for("the queued readings", WAIT, |st| {
        st.posted_values()
            .iter()
            .any(|(_, _, t)| *t >= last)
            .then_some(())
    })
    .await;
    {
        let st = s.state();
        let posted: Vec<i64> = st.posted_values().iter().map(|(_, _, t)| *t).collect();
        for ts in &during {
            assert!(
                posted.contains(ts),
                "reading at {ts} lost; posted: {posted:?}"
            );
        }
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_property_set_writes_a_modbus_register_and_is_answered_200() {
    use crate::support::modbus_sim::{Sim, TcpDevice};
    let sim = Sim::new();
    sim.add_slave(1);
    sim.set_holding(1, 5, &[7]);
    let dev = TcpDevice::start(&sim).await;
    let s = standin().await;
    let devices = format!(
        "devices:
  - name: plc
    driver: modbus-tcp
    address: \"{}\"
    slave: 1
    poll: 100ms
    points:
      - {{ name: setpoint, table: holding, address: 5, type: u16, writable: true }}
mappings:
  - {{ match: plc/setpoint, topic: plc/setpoint }}
commands:
  - {{ topic: onenet/cloud/set/setpoint, write: plc/setpoint }}
",
        dev.addr()
    );
    let cfg = setup(
        &s,
        &devices,
        "",
        "    properties:\n      - { topics: plc/setpoint, property: setpoint }\n",
    );
    let gw = support::start(&cfg.yaml).await;
    s.wait_for("setpoint=7 posted", WAIT, |st| {
        st.posted_values()
            .iter()
            .any(|(k, v, _)| k == "setpoint" && v.as_f64() == Some(7.0))
            .then_some(())
    })
    .await;
    let id = s.send_property_set(json!({"setpoint": 42}));
    let reply = s.wait_for("set_reply", WAIT, |st| st.set_reply(&id)).await;
    assert_eq!(reply, json!({"id": id, "code": 200, "msg": "success"}));
    // The register really holds the new value, and OneNET sees it.
    assert_eq!(sim.holding(1, 5, 1), [42]);
    s.wait_for("setpoint=42 posted", WAIT, |st| {
        st.posted_values()
            .iter()
            .any(|(k, v, _)| k == "setpoint" && v.as_f64() == Some(42.0))
            .then_some(())
    })
    .await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_drains_within_the_rate_while_new_data_keeps_coming() {
    let s = standin().await;
    // Two posts per second are produced, one message per second may go:
    // replaying post by post would never catch up. Readings are 500 ms
    // apart and the window is 100 ms, so that even on a loaded machine no
    // two readings share a window (the later would replace the earlier).
    let devices = "devices:
  - name: pv
    driver: simulator
    poll: 500ms
    points:
      - { name: power, wave: ramp, min: 0, max: 1000, period: 1h }
mappings:
  - { match: pv/power, topic: PV/power, payload: json }
";
    let cfg = setup(
        &s,
        devices,
        "      batch_window: 100ms\n",
        "    properties:\n      - { topics: PV/power, property: power }\n",
    );
    s.begin_outage();
    let gw = support::start(&cfg.yaml).await;
    let mut local = Client::connect(support::mqtt_addr(&gw), "t-local", &["PV/power"]).await;
    let mut during = Vec::new();
    while during.len() < 10 {
        let g = local.expect("PV/power", WAIT).await;
        let v: Json = serde_json::from_str(&g.payload).unwrap();
        during.push(v["ts"].as_i64().unwrap());
    }
    s.end_outage();
    // Caught up: a reading made after the outage arrives as the current
    // value, behind the whole backlog.
    let g = local.expect("PV/power", WAIT).await;
    let after: Json = serde_json::from_str(&g.payload).unwrap();
    let after = after["ts"].as_i64().unwrap();
    s.wait_for("live data after the backlog", WAIT, |st| {
        st.posted_values()
            .iter()
            .any(|(_, _, t)| *t >= after)
            .then_some(())
    })
    .await;
    {
        let st = s.state();
        let posted: Vec<i64> = st.posted_values().iter().map(|(_, _, t)| *t).collect();
        for ts in &during {
            assert!(posted.contains(ts), "reading at {ts} lost");
        }
        assert!(!st.history_posts().is_empty());
        assert_eq!(
            st.max_posts_within(Duration::from_millis(950)),
            1,
            "over 1 msg/s"
        );
        assert!(st.violations.is_empty(), "{:?}", st.violations);
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sub_device_backlog_drains_as_history_with_identities() {
    let s = standin().await;
    const SUB_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    s.add_sub_device("subprod", "meter-1", SUB_KEY);
    let devices = "devices:
  - name: m1
    driver: simulator
    poll: 500ms
    points:
      - { name: energy, wave: ramp, min: 0, max: 1000, period: 1h }
mappings:
  - { match: m1/energy, topic: meters/m1/energy, payload: json }
";
    let subs = format!(
        "      batch_window: 100ms
      sub_devices:
        - product_id: subprod
          device_name: meter-1
          access_key: \"{SUB_KEY}\"
          properties: [ {{ topics: meters/m1/energy, property: energy }} ]
"
    );
    let cfg = setup(&s, devices, &subs, "");
    s.begin_outage();
    let gw = support::start(&cfg.yaml).await;
    let mut local = Client::connect(support::mqtt_addr(&gw), "t-local", &["meters/#"]).await;
    let mut during = Vec::new();
    while during.len() < 8 {
        let g = local.expect("meters/m1/energy", WAIT).await;
        let v: Json = serde_json::from_str(&g.payload).unwrap();
        during.push(v["ts"].as_i64().unwrap());
    }
    s.end_outage();
    let last = *during.last().unwrap();
    s.wait_for("the sub-device's backlog", WAIT, |st| {
        st.packed_values()
            .iter()
            .any(|(_, dev, _, _, t)| dev == "meter-1" && *t >= last)
            .then_some(())
    })
    .await;
    {
        let st = s.state();
        let posted: Vec<i64> = st.packed_values().iter().map(|e| e.4).collect();
        for ts in &during {
            assert!(posted.contains(ts), "reading at {ts} lost");
        }
        assert!(
            !st.history_posts().is_empty(),
            "history used for the backlog"
        );
        assert!(
            st.sub_replies.iter().all(|(_, c, _)| *c == 200),
            "{:?}",
            st.sub_replies
        );
        assert_eq!(
            st.max_posts_within(Duration::from_millis(950)),
            1,
            "over 1 msg/s"
        );
    }
    gw.shutdown().await;
}

/// Strict mode (`queue.strict`, the default) with OneNET: a LAN client's
/// QoS 1 value is still in the bridge's batch window when the gateway is
/// killed with SIGKILL right after the PUBACK; after a restart it is posted
/// all the same (from the bridge's inbox).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_acknowledged_inside_the_batch_window_survives_kill_9() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = standin().await;
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let config = format!(
        "gateway: {{ id: test-gw, data_dir: ./data }}
broker:
  listeners:
    - {{ bind: \"127.0.0.1:{port}\", protocol: mqtt }}
bridges:
  - name: cloud
    url: {url}
    onenet:
      product_id: abc123
      device_name: gw-001
      access_key: \"{key}\"
      batch_window: 5s
    properties:
      - {{ topics: PV/data, property: power }}
",
        url = s.url(),
        key = SAMPLE_KEY,
    );
    std::fs::write(dir.path().join("config.yaml"), config).unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut bin = support::Binary::spawn(&["run", "-c", "config.yaml"], dir.path());
    support::wait_port(addr, WAIT).await;
    s.wait_for("the bridge logs in", WAIT, |st| {
        st.connects.iter().any(|c| c.accepted).then_some(())
    })
    .await;

    let mut c = support::raw_connect(addr, "it-lan").await;
    let mut publish = vec![0, 7];
    publish.extend_from_slice(b"PV/data");
    publish.extend_from_slice(&[0, 1]);
    publish.extend_from_slice(b"4242.5");
    c.write_all(&support::packet(0x32, &publish)).await.unwrap();
    let mut puback = [0u8; 4];
    c.read_exact(&mut puback).await.unwrap();
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    assert_eq!(
        unsafe { libc::kill(bin.child.id() as libc::pid_t, libc::SIGKILL) },
        0
    );
    assert_eq!(puback, [0x40, 2, 0, 1]);
    let _ = bin.child.wait();
    assert!(
        s.state().property_posts().is_empty(),
        "posted before the kill: the test did not kill inside the batch window"
    );

    let bin2 = support::Binary::spawn(&["run", "-c", "config.yaml"], dir.path());
    let posted = s
        .wait_for("the acknowledged value after the restart", WAIT, |st| {
            st.property_posts()
                .iter()
                .find(|p| String::from_utf8_lossy(&p.payload).contains("4242.5"))
                .map(|p| p.json())
        })
        .await;
    assert_eq!(
        posted["params"]["power"]["value"],
        json!(4242.5),
        "{posted}"
    );
    assert!(
        bin2.stderr().contains("taken from the inbox"),
        "{}",
        bin2.stderr()
    );
}
