//! OneNET: the stand-in enforces OneNET's rules (checked here with a plain
//! rumqttc client), and the gateway's OneNET bridge works against it.

use std::time::{Duration, SystemTime};

use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Packet, QoS};
use serde_json::json;

use crate::support::onenet_standin::{StandIn, SAMPLE_KEY};
use edgebridge::bridge::onenet::{token, AccessKey};
use edgebridge::config::{Secret, SignMethod};

const WAIT: Duration = Duration::from_secs(10);

fn token_for(s: &StandIn, key: &str, et: u64) -> String {
    let key = AccessKey::from_base64(&Secret::new(key)).unwrap();
    let res = token::device_resource(&s.product_id, &s.device_name);
    token::token(&key, SignMethod::Sha256, &res, et)
}

fn valid_et() -> u64 {
    token::expiry(SystemTime::now(), Duration::from_secs(3600))
}

fn options(s: &StandIn, client_id: &str, password: String) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", s.addr().port());
    o.set_credentials(s.product_id.clone(), password);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(true);
    o
}

/// Polls until the CONNACK or the connection error.
async fn connect(o: MqttOptions) -> Result<(AsyncClient, EventLoop), ConnectionError> {
    let (client, mut ev) = AsyncClient::new(o, 16);
    loop {
        match tokio::time::timeout(WAIT, ev.poll())
            .await
            .expect("no CONNACK")
        {
            Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok((client, ev)),
            Ok(_) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Polls until the connection ends; returns what arrived.
async fn drain_until_closed(ev: &mut EventLoop) -> Vec<Packet> {
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, ev.poll())
            .await
            .expect("still connected")
        {
            Ok(Event::Incoming(p)) => got.push(p),
            Ok(_) => {}
            Err(_) => return got,
        }
    }
}

async fn standin() -> StandIn {
    StandIn::start("abc123", "gw-001", SAMPLE_KEY).await
}

#[tokio::test]
async fn standin_accepts_a_correct_device_and_answers_posts() {
    let s = standin().await;
    s.set_known_properties(&["power"]);
    let (client, mut ev) = connect(options(&s, "gw-001", token_for(&s, SAMPLE_KEY, valid_et())))
        .await
        .expect("accepted");
    let t = s.topics();
    client
        .subscribe(t.property_post_reply(), QoS::AtLeastOnce)
        .await
        .unwrap();
    // Outside the device's prefix: refused (and not a disconnect).
    client.subscribe("PV/#", QoS::AtMostOnce).await.unwrap();
    let post = json!({"id":"1","version":"1.0","params":{"power":{"value":2.5,"time":1}}});
    let bad = json!({"id":"2","version":"1.0","params":{"nope":{"value":1}}});
    let mut sent = false;
    let mut replies = Vec::new();
    while replies.len() < 2 {
        match tokio::time::timeout(WAIT, ev.poll())
            .await
            .unwrap()
            .unwrap()
        {
            Event::Incoming(Packet::SubAck(ack)) if sent => {
                assert_eq!(format!("{:?}", ack.return_codes), "[Failure]");
            }
            Event::Incoming(Packet::SubAck(ack)) => {
                // OneNET grants QoS 0 at most.
                assert_eq!(format!("{:?}", ack.return_codes), "[Success(AtMostOnce)]");
                client
                    .publish(t.property_post(), QoS::AtLeastOnce, false, post.to_string())
                    .await
                    .unwrap();
                client
                    .publish(t.property_post(), QoS::AtLeastOnce, false, bad.to_string())
                    .await
                    .unwrap();
                sent = true;
            }
            Event::Incoming(Packet::Publish(p)) => {
                assert_eq!(p.topic, t.property_post_reply());
                replies.push(serde_json::from_slice::<serde_json::Value>(&p.payload).unwrap());
            }
            _ => {}
        }
    }
    assert_eq!(replies[0], json!({"id":"1","code":200,"msg":"success"}));
    assert_eq!(replies[1]["code"], 2404);
    assert_eq!(s.state().property_posts().len(), 2);
    assert_eq!(s.state().refused_subscriptions, ["PV/#"]);
}

#[tokio::test]
async fn standin_refuses_bad_connects() {
    let s = standin().await;
    let other_key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let expired = token_for(&s, SAMPLE_KEY, 1_000_000_000);
    let cases: Vec<(&str, MqttOptions)> = vec![
        (
            "wrong key",
            options(&s, "gw-001", token_for(&s, other_key, valid_et())),
        ),
        ("expired token", options(&s, "gw-001", expired)),
        (
            "wrong client id",
            options(&s, "gw-002", token_for(&s, SAMPLE_KEY, valid_et())),
        ),
        ("garbage token", options(&s, "gw-001", "hunter2".into())),
        ("will", {
            let mut o = options(&s, "gw-001", token_for(&s, SAMPLE_KEY, valid_et()));
            o.set_last_will(LastWill::new(
                s.topics().property_post(),
                "x",
                QoS::AtMostOnce,
                false,
            ));
            o
        }),
        ("keep-alive 5 s", {
            let mut o = options(&s, "gw-001", token_for(&s, SAMPLE_KEY, valid_et()));
            o.set_keep_alive(Duration::from_secs(5));
            o
        }),
        ("persistent session", {
            let mut o = options(&s, "gw-001", token_for(&s, SAMPLE_KEY, valid_et()));
            o.set_clean_session(false);
            o
        }),
    ];
    for (what, o) in cases {
        match connect(o).await {
            Err(ConnectionError::ConnectionRefused(_)) => {}
            Err(e) => panic!("{what}: refused with the wrong error {e}"),
            Ok(_) => panic!("{what}: was accepted"),
        }
    }
    let st = s.state();
    assert_eq!(st.connects.len(), 7);
    assert!(st.connects.iter().all(|c| !c.accepted));
    assert_eq!(st.connects[1].reason.as_deref(), Some("token expired"));
}

#[tokio::test]
async fn standin_disconnects_on_what_onenet_forbids() {
    let s = standin().await;
    let t = s.topics();
    let cases = [
        ("QoS 2 publish", t.property_post(), QoS::ExactlyOnce, false),
        (
            "retained publish",
            t.property_post(),
            QoS::AtLeastOnce,
            true,
        ),
        (
            "publish outside the device prefix",
            "PV/data".to_string(),
            QoS::AtLeastOnce,
            false,
        ),
    ];
    for (i, (what, topic, qos, retain)) in cases.into_iter().enumerate() {
        let (client, mut ev) =
            connect(options(&s, "gw-001", token_for(&s, SAMPLE_KEY, valid_et())))
                .await
                .expect("accepted");
        client.publish(topic, qos, retain, "1").await.unwrap();
        let got = drain_until_closed(&mut ev).await;
        assert!(
            !got.iter()
                .any(|p| matches!(p, Packet::PubAck(_) | Packet::PubRec(_))),
            "{what}: acknowledged: {got:?}"
        );
        let v = s
            .wait_for("violation", WAIT, |st| st.violations.get(i).cloned())
            .await;
        assert!(v.starts_with(what), "{what}: {v}");
    }
    assert!(s.state().published.is_empty());
}

#[tokio::test]
async fn the_cli_token_is_accepted_by_the_standin() {
    let s = standin().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgebridge"))
        .args([
            "onenet",
            "token",
            "--product-id",
            "abc123",
            "--device",
            "gw-001",
            "--ttl",
            "1h",
        ])
        .env("ONENET_KEY", SAMPLE_KEY)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(!String::from_utf8_lossy(&out.stderr).contains(SAMPLE_KEY));
    connect(options(&s, "gw-001", token))
        .await
        .expect("accepted");
}
