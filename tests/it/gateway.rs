//! The gateway end to end, in-process: simulator -> mappings -> embedded
//! broker -> a real MQTT client over TCP.

use std::time::Duration;

use rumqttc::QoS;

use crate::support::{self, Client};

const SOLAR: &str = "devices:
  - name: demo-pv
    driver: simulator
    poll: 100ms
    points:
      - { name: power, wave: constant, value: 2500, unit: W }
      - { name: sunshine, wave: square, period: 1h }
      - { name: relay, wave: constant, value: 0, type: bool, writable: true }
mappings:
  - { match: demo-pv/power, topic: PV/data, scale: 0.001, unit: kW, qos: 1, retain: true, continue: true }
  - { match: demo-pv/sunshine, topic: PV/sunshine, qos: 1, retain: true }
  - { match: '*/*', topic: 'devices/{device}/{point}', payload: json }
commands:
  - { topic: cmd/relay, write: demo-pv/relay }
";

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pv_data_reaches_a_tcp_subscriber() {
    let gw = support::start(&support::yaml_with_broker(SOLAR)).await;
    let mut c = Client::connect(support::mqtt_addr(&gw), "t-sub", &["PV/#", "devices/#"]).await;
    let data = c.expect("PV/data", WAIT).await;
    assert_eq!(data.payload, "2.5");
    assert_eq!(data.qos, QoS::AtLeastOnce);
    let sun = c.expect("PV/sunshine", WAIT).await;
    assert_eq!(sun.payload, "true");
    let json = c.expect("devices/demo-pv/power", WAIT).await;
    let v: serde_json::Value = serde_json::from_str(&json.payload).unwrap();
    assert_eq!(v["value"], 2500.0);
    assert_eq!(v["unit"], "W");
    assert!(v["ts"].as_i64().unwrap() > 1_700_000_000_000);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_data_and_status_reach_a_late_subscriber() {
    let gw = support::start(&support::yaml_with_broker(SOLAR)).await;
    let addr = support::mqtt_addr(&gw);
    // Let a few polls happen first, then subscribe.
    let mut first = Client::connect(addr, "t-first", &["PV/data"]).await;
    first.expect("PV/data", WAIT).await;
    let mut late = Client::connect(
        addr,
        "t-late",
        &[
            "PV/data",
            "edgebridge/test-gw/status",
            "edgebridge/test-gw/devices/+/status",
        ],
    )
    .await;
    let data = late
        .expect_where(WAIT, |g| g.topic == "PV/data" && g.retain)
        .await;
    assert!(
        data.is_some(),
        "retained PV/data not delivered to a new subscriber"
    );
    let status = late.expect("edgebridge/test-gw/status", WAIT).await;
    assert_eq!((status.payload.as_str(), status.retain), ("online", true));
    let dev = late
        .expect("edgebridge/test-gw/devices/demo-pv/status", WAIT)
        .await;
    assert_eq!(dev.payload, "online");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_publishes_offline() {
    let gw = support::start(&support::yaml_with_broker(SOLAR)).await;
    let mut c = Client::connect(
        support::mqtt_addr(&gw),
        "t-status",
        &["edgebridge/test-gw/status"],
    )
    .await;
    assert_eq!(
        c.expect("edgebridge/test-gw/status", WAIT).await.payload,
        "online"
    );
    gw.shutdown().await;
    let offline = c
        .expect_where(WAIT, |g| {
            g.topic == "edgebridge/test-gw/status" && g.payload == "offline"
        })
        .await;
    assert!(offline.is_some(), "no offline status after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_topic_writes_a_point_and_reports() {
    let gw = support::start(&support::yaml_with_broker(SOLAR)).await;
    let mut c = Client::connect(
        support::mqtt_addr(&gw),
        "t-cmd",
        &["cmd/relay/result", "devices/demo-pv/relay"],
    )
    .await;
    c.client
        .publish("cmd/relay", QoS::AtLeastOnce, false, "on")
        .await
        .unwrap();
    let result = c.expect("cmd/relay/result", WAIT).await;
    assert!(result.payload.contains("\"ok\":true"), "{}", result.payload);
    let relay = c
        .expect_where(WAIT, |g| {
            g.topic == "devices/demo-pv/relay" && g.payload.contains("true")
        })
        .await;
    assert!(
        relay.is_some(),
        "the written value never showed in the readings"
    );
    c.client
        .publish("cmd/relay", QoS::AtLeastOnce, false, "maybe")
        .await
        .unwrap();
    let result = c.expect("cmd/relay/result", WAIT).await;
    assert!(
        result.payload.contains("\"ok\":false"),
        "{}",
        result.payload
    );
    assert!(
        result.payload.contains("not a boolean"),
        "{}",
        result.payload
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_listener_serves_data() {
    let gw = support::start(&support::yaml_with_broker(SOLAR)).await;
    let addr = gw
        .listener(edgebridge::config::ListenerProtocol::Mqtt5)
        .unwrap();
    let mut o = rumqttc::v5::MqttOptions::new("t-v5", addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = rumqttc::v5::AsyncClient::new(o, 10);
    client
        .subscribe("PV/data", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    let got = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::Publish(
                p,
            ))) = el.poll().await
            {
                return p.payload;
            }
        }
    })
    .await
    .expect("a PV/data publish over MQTT 5");
    assert_eq!(&got[..], b"2.5");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_port_is_a_clear_startup_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let yaml = format!(
        "gateway: {{ id: gw }}\nbroker:\n  listeners:\n    - {{ bind: \"127.0.0.1:{port}\", protocol: mqtt }}\n"
    );
    let err = edgebridge::gateway::Gateway::start(support::config(&yaml))
        .await
        .err()
        .expect("start fails");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{msg}"
    );
    assert!(msg.contains("in use"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_refuses_wrong_password() {
    let hash = edgebridge::broker::hash_password("right").unwrap();
    let yaml = format!(
        "gateway: {{ id: gw }}\nbroker:\n  listeners:\n    - {{ bind: \"127.0.0.1:0\", protocol: mqtt }}\n  users:\n    - {{ username: evse, password_hash: \"{hash}\" }}\n"
    );
    let gw = support::start(&yaml).await;
    let addr = support::mqtt_addr(&gw);
    assert!(
        Client::connect_with(addr, "t-good", &[], Some(("evse", "right")))
            .await
            .is_ok()
    );
    assert!(
        Client::connect_with(addr, "t-bad", &[], Some(("evse", "wrong")))
            .await
            .is_err()
    );
    assert!(Client::connect_with(addr, "t-none", &[], None)
        .await
        .is_err());
    assert!(
        Client::connect_with(addr, "t-who", &[], Some(("mallory", "right")))
            .await
            .is_err()
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_do_not_disturb_other_clients() {
    use tokio::io::AsyncWriteExt;
    let gw = support::start(&support::yaml_with_broker(SOLAR)).await;
    let addr = support::mqtt_addr(&gw);
    let mut c = Client::connect(addr, "t-good", &["PV/data"]).await;
    // Garbage instead of CONNECT, a CONNECT with a huge remaining length,
    // and a connection that just closes.
    let garbage: [&[u8]; 3] = [
        b"\xff\xff\xff\xff\xff\x00garbage",
        b"\x10\xff\xff\xff\x7f\x00\x04MQTT\x04",
        b"",
    ];
    for g in garbage {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(g).await;
        drop(s);
    }
    // The broker still serves the existing client and accepts new ones.
    c.drain_where(Duration::from_millis(200), |_| true).await;
    c.expect("PV/data", WAIT).await;
    let mut fresh = Client::connect(addr, "t-fresh", &["PV/data"]).await;
    fresh.expect("PV/data", WAIT).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_tls_certificate_is_a_clear_startup_error() {
    let yaml = "gateway: { id: gw }\nbroker:\n  listeners:\n    - { bind: \"127.0.0.1:0\", protocol: mqtt, tls: { cert: /nonexistent/server.crt, key: /nonexistent/server.key } }\n";
    let err = edgebridge::gateway::Gateway::start(support::config(yaml))
        .await
        .err()
        .expect("start fails");
    assert!(
        err.to_string()
            .contains("TLS file /nonexistent/server.crt does not exist"),
        "{err}"
    );
}

/// `ws` serves MQTT 3.1.1 and 5 on one port, as `mqtt` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_listener_serves_data() {
    let yaml = support::yaml_with_broker(SOLAR).replace(
        "protocol: mqtt5 }",
        "protocol: mqtt5 }\n    - { bind: \"127.0.0.1:0\", protocol: ws }",
    );
    let gw = support::start(&yaml).await;
    let addr = gw
        .listener(edgebridge::config::ListenerProtocol::Ws)
        .unwrap();
    let mut o = rumqttc::MqttOptions::new("t-ws", format!("ws://{addr}/mqtt"), addr.port());
    o.set_transport(rumqttc::Transport::Ws);
    o.set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = rumqttc::AsyncClient::new(o, 10);
    client.subscribe("PV/data", QoS::AtLeastOnce).await.unwrap();
    let got = tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => return p.payload,
                Ok(_) => {}
                Err(e) => panic!("websocket client: {e}"),
            }
        }
    })
    .await
    .expect("a PV/data publish over WebSocket");
    assert_eq!(&got[..], b"2.5");

    // The same listener speaks MQTT 5 too.
    let mut o = rumqttc::v5::MqttOptions::new("t-ws5", format!("ws://{addr}/mqtt"), addr.port());
    o.set_transport(rumqttc::Transport::Ws);
    o.set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = rumqttc::v5::AsyncClient::new(o, 10);
    client
        .subscribe("PV/data", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    let got = tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::Publish(
                    p,
                ))) => return p.payload,
                Ok(_) => {}
                Err(e) => panic!("MQTT 5 websocket client: {e}"),
            }
        }
    })
    .await
    .expect("a PV/data publish over WebSocket, MQTT 5");
    assert_eq!(&got[..], b"2.5");
    gw.shutdown().await;
}
