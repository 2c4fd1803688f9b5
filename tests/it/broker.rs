//! The embedded broker as LAN clients meet it (issue 19): refused logins
//! answered, the ACL of the PV site, one port for every MQTT version,
//! delivered QoS, `$SYS`, retained messages and persistent sessions across
//! a restart, Mosquitto password files, and users/ACL reloaded without
//! dropping clients. The wire-level checks use raw packets, so that what is
//! asserted is exactly what goes over TCP.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use edgebridge::model::Qos;
use rumqttc::{QoS, SubscribeReasonCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{self, packet, Client};

fn string(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A CONNECT (clean session, keep-alive 0) for MQTT `level` 4 or 5.
fn connect(level: u8, id: &str, login: Option<(&str, &str)>) -> Vec<u8> {
    let mut b = Vec::new();
    string("MQTT", &mut b);
    b.push(level);
    b.push(0x02 | if login.is_some() { 0xC0 } else { 0 });
    b.extend_from_slice(&[0, 0]);
    if level == 5 {
        b.push(0); // no properties
    }
    string(id, &mut b);
    if let Some((u, p)) = login {
        string(u, &mut b);
        string(p, &mut b);
    }
    packet(0x10, &b)
}

/// Sends a CONNECT and returns the CONNACK's body (flags, code, ...), or
/// `None` when the connection closed without one.
async fn connack(addr: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut head = [0u8; 2];
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head)).await;
    if !matches!(read, Ok(Ok(_))) || head[0] != 0x20 {
        return None;
    }
    let mut body = vec![0u8; usize::from(head[1])];
    s.read_exact(&mut body).await.ok()?;
    Some(body)
}

fn users_yaml(extra: &str) -> String {
    let hash = edgebridge::broker::hash_password("evse-pw").unwrap();
    let admin = edgebridge::broker::hash_password("admin-pw").unwrap();
    support::yaml_with_broker(extra).replace(
        "broker:\n",
        &format!(
            "broker:\n  users:\n    - {{ username: evse, password_hash: \"{hash}\" }}\n    - {{ username: admin, password_hash: \"{admin}\" }}\n"
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_logins_get_a_connack_with_the_reason() {
    let gw = support::start(&users_yaml("")).await;
    let addr = support::mqtt_addr(&gw);
    let before = edgebridge::broker::logins_refused();
    // MQTT 3.1.1: return code 5 (not authorised), as Mosquitto answers.
    let wrong = connack(addr, &connect(4, "t-wrong", Some(("evse", "nope")))).await;
    assert_eq!(wrong.as_deref(), Some(&[0, 5][..]), "wrong password");
    let unknown = connack(addr, &connect(4, "t-unknown", Some(("mallory", "x")))).await;
    assert_eq!(unknown.as_deref(), Some(&[0, 5][..]), "unknown user");
    let anonymous = connack(addr, &connect(4, "t-anon", None)).await;
    assert_eq!(anonymous.as_deref(), Some(&[0, 5][..]), "no credentials");
    // MQTT 5: reason 0x86, bad user name or password.
    let v5 = connack(addr, &connect(5, "t-wrong5", Some(("evse", "nope"))))
        .await
        .expect("a v5 CONNACK");
    assert_eq!(v5[1], 0x86, "v5 reason: {v5:?}");
    // The right password gets in on the same listener, both versions.
    let ok = connack(addr, &connect(4, "t-ok", Some(("evse", "evse-pw")))).await;
    assert_eq!(ok.as_deref(), Some(&[0, 0][..]));
    let ok5 = connack(addr, &connect(5, "t-ok5", Some(("evse", "evse-pw"))))
        .await
        .unwrap();
    assert_eq!(ok5[1], 0, "v5 success: {ok5:?}");
    assert!(edgebridge::broker::logins_refused() >= before + 4);
    gw.shutdown().await;
}

/// The README's PV site: the charger (`evse`) may read `PV/#` and nothing
/// else; `admin` may do everything.
fn pv_site_acl() -> &'static str {
    "  acl:\n    - { user: evse, topic: \"PV/#\", access: read }\n    - { user: admin, topic: \"#\", access: readwrite }\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charger_reads_pv_and_nothing_else() {
    let yaml = users_yaml(
        "devices:\n  - { name: pv, driver: simulator, poll: 100ms, points: [{ name: power, wave: sine }] }\nmappings:\n  - { match: pv/power, topic: PV/data }\n",
    )
    .replace("broker:\n", &format!("broker:\n{}", pv_site_acl()));
    let gw = support::start(&yaml).await;
    let addr = support::mqtt_addr(&gw);
    let denied_before = edgebridge::broker::acl_denied();
    let mut charger = Client::connect_with(addr, "t-evse", &["PV/#"], Some(("evse", "evse-pw")))
        .await
        .expect("the charger logs in and may subscribe PV/#");
    charger.expect("PV/data", Duration::from_secs(5)).await;

    // A subscription outside PV/# is refused in the SUBACK (0x80).
    let mut o = rumqttc::MqttOptions::new("t-evse-raw", addr.ip().to_string(), addr.port());
    o.set_credentials("evse", "evse-pw");
    let (c, mut events) = rumqttc::AsyncClient::new(o, 10);
    c.subscribe("cmd/#", QoS::AtLeastOnce).await.unwrap();
    c.subscribe("#", QoS::AtLeastOnce).await.unwrap();
    let mut codes = Vec::new();
    while codes.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(5), events.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(a)))) => {
                codes.extend(a.return_codes)
            }
            Ok(Ok(_)) => {}
            other => panic!("no SUBACK: {other:?}"),
        }
    }
    assert_eq!(codes, [SubscribeReasonCode::Failure; 2]);

    // Its publish to cmd/relay never reaches the bus (the gateway's own
    // clients are not subject to the ACL, so they would see it).
    let mut bus = gw
        .bus()
        .subscribe(
            "edgebridge-test-cmd",
            &[("cmd/#".to_string(), Qos::AtLeastOnce)],
        )
        .await
        .unwrap();
    charger
        .client
        .publish("cmd/relay", QoS::AtLeastOnce, false, "on")
        .await
        .unwrap();
    // admin may publish there: the bus gets admin's, not the charger's.
    let admin = Client::connect_with(addr, "t-admin", &[], Some(("admin", "admin-pw")))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    admin
        .client
        .publish("cmd/relay", QoS::AtLeastOnce, false, "from-admin")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), bus.recv())
        .await
        .expect("admin's command arrives")
        .unwrap();
    assert_eq!(
        got.payload, "from-admin",
        "the charger's publish got through"
    );
    assert!(edgebridge::broker::acl_denied() >= denied_before + 3);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_the_acl_and_keeps_connected_clients() {
    let yaml = users_yaml("").replace("broker:\n", &format!("broker:\n{}", pv_site_acl()));
    let mut gw = support::start(&yaml).await;
    let addr = support::mqtt_addr(&gw);
    let mut charger = Client::connect_with(addr, "t-evse", &["PV/#"], Some(("evse", "evse-pw")))
        .await
        .unwrap();
    // The new ACL also lets the charger read its own status topics.
    let reloaded = yaml.replace(
        "    - { user: admin",
        "    - { user: evse, topic: \"evse/#\", access: read }\n    - { user: admin",
    );
    gw.reload(support::config(&reloaded)).await.expect("reload");
    let admin = Client::connect_with(addr, "t-admin", &[], Some(("admin", "admin-pw")))
        .await
        .unwrap();
    admin
        .client
        .publish("PV/data", QoS::AtLeastOnce, false, "still here")
        .await
        .unwrap();
    let got = charger.expect("PV/data", Duration::from_secs(5)).await;
    assert_eq!(
        got.payload, "still here",
        "the connected charger was dropped"
    );
    Client::connect_with(addr, "t-evse2", &["evse/#"], Some(("evse", "evse-pw")))
        .await
        .expect("the new rule applies to a new subscription");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_port_serves_3_1_1_and_5_and_delivers_at_the_lower_qos() {
    let gw = support::start(&support::yaml_with_broker("")).await;
    let addr = support::mqtt_addr(&gw);
    // An MQTT 5 subscriber at QoS 2 on the `mqtt` listener...
    let mut o = rumqttc::v5::MqttOptions::new("t-v5", addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(5));
    let (v5, mut events) = rumqttc::v5::AsyncClient::new(o, 10);
    v5.subscribe("q/#", rumqttc::v5::mqttbytes::QoS::ExactlyOnce)
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), events.poll()).await {
            Ok(Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::SubAck(_)))) => {
                break
            }
            Ok(Ok(_)) => {}
            other => panic!("v5 client: {other:?}"),
        }
    }
    // ...gets a 3.1.1 client's QoS 0 and QoS 1 publishes at QoS 0 and 1.
    let pub3 = Client::connect(addr, "t-v3", &[]).await;
    pub3.client
        .publish("q/zero", QoS::AtMostOnce, false, "0")
        .await
        .unwrap();
    pub3.client
        .publish("q/one", QoS::AtLeastOnce, false, "1")
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(5), events.poll()).await {
            Ok(Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::Publish(
                p,
            )))) => got.push((String::from_utf8_lossy(&p.topic).into_owned(), p.qos as u8)),
            Ok(Ok(_)) => {}
            other => panic!("v5 client: {other:?}"),
        }
    }
    got.sort();
    assert_eq!(got, [("q/one".to_string(), 1), ("q/zero".to_string(), 0)]);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sys_topics_are_published_and_subscribing_to_them_is_fine() {
    let yaml = support::yaml_with_broker("").replace("broker:\n", "broker:\n  sys_interval: 1s\n");
    let gw = support::start(&yaml).await;
    let addr = support::mqtt_addr(&gw);
    let mut c = Client::connect(addr, "t-sys", &["$SYS/#"]).await;
    let uptime = c.expect("$SYS/broker/uptime", Duration::from_secs(5)).await;
    assert!(uptime.payload.ends_with(" seconds"), "{}", uptime.payload);
    // The retained value from before this client may say 0; the next
    // round counts it.
    c.expect_where(Duration::from_secs(5), |g| {
        g.topic == "$SYS/broker/clients/connected" && g.payload.parse::<u32>().unwrap_or(0) >= 1
    })
    .await
    .expect("$SYS/broker/clients/connected counts this client");
    let version = c
        .expect("$SYS/broker/version", Duration::from_secs(5))
        .await;
    assert!(
        version.payload.starts_with("edgebridge "),
        "{}",
        version.payload
    );
    // Still connected a round later.
    c.expect("$SYS/broker/uptime", Duration::from_secs(3)).await;
    // `#` does not match `$SYS` (MQTT 3.1.1 §4.7.2).
    let mut all = Client::connect(addr, "t-all", &["#"]).await;
    let sys = all
        .drain_where(Duration::from_millis(1500), |g| g.topic.starts_with('$'))
        .await;
    assert!(sys.is_empty(), "{sys:?}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "gateway: {{ id: keep, data_dir: {} }}\nbroker:\n  listeners:\n    - {{ bind: \"127.0.0.1:0\", protocol: mqtt }}\n",
        dir.path().display()
    );
    let gw = support::start(&yaml).await;
    let c = Client::connect(support::mqtt_addr(&gw), "t-keep", &[]).await;
    c.client
        .publish("site/setpoint", QoS::AtLeastOnce, true, "42")
        .await
        .unwrap();
    c.client
        .publish("site/cleared", QoS::AtLeastOnce, true, "x")
        .await
        .unwrap();
    c.client
        .publish("site/cleared", QoS::AtLeastOnce, true, "")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(c);
    gw.shutdown().await;

    let gw = support::start(&yaml).await;
    let mut c = Client::connect(support::mqtt_addr(&gw), "t-keep2", &["site/#"]).await;
    let got = c.expect("site/setpoint", Duration::from_secs(5)).await;
    assert_eq!((got.payload.as_str(), got.retain), ("42", true));
    let cleared = c
        .drain_where(Duration::from_millis(500), |g| g.topic == "site/cleared")
        .await;
    assert!(
        cleared.is_empty(),
        "a cleared retained message came back: {cleared:?}"
    );
    gw.shutdown().await;
}

/// A persistent session (clean session false) outlives a restart: its
/// subscription, the messages queued for it before the stop, and those
/// published after the start before it reconnects all reach it, in order,
/// with `session present`. Its password is not written to disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_sessions_survive_a_restart() {
    let yaml = users_yaml("");
    let data_dir = yaml
        .split("data_dir: ")
        .nth(1)
        .and_then(|rest| rest.split(" }").next())
        .map(std::path::PathBuf::from)
        .unwrap();
    let durable = |addr: SocketAddr| {
        let mut o = rumqttc::MqttOptions::new("t-durable", addr.ip().to_string(), addr.port());
        o.set_clean_session(false);
        o.set_credentials("evse", "evse-pw");
        rumqttc::AsyncClient::new(o, 10)
    };
    let publisher = |addr: SocketAddr| {
        let mut o = rumqttc::MqttOptions::new("t-pub", addr.ip().to_string(), addr.port());
        o.set_credentials("admin", "admin-pw");
        o
    };
    let publish = |addr: SocketAddr, payload: &'static str| async move {
        let (c, mut events) = rumqttc::AsyncClient::new(publisher(addr), 10);
        c.publish("away/x", QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(5), events.poll()).await {
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => break,
                Ok(Ok(_)) => {}
                other => panic!("no PUBACK: {other:?}"),
            }
        }
        c.disconnect().await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(1), events.poll()).await;
    };

    let gw = support::start(&yaml).await;
    let addr = support::mqtt_addr(&gw);
    let (c, mut events) = durable(addr);
    c.subscribe("away/#", QoS::AtLeastOnce).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), events.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            other => panic!("no SUBACK: {other:?}"),
        }
    }
    c.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(2), events.poll()).await;
    drop(events);
    tokio::time::sleep(Duration::from_millis(200)).await;
    publish(addr, "before the restart").await;
    gw.shutdown().await;

    let saved = std::fs::read_to_string(data_dir.join("broker-sessions.json"))
        .expect("the sessions were saved");
    assert!(saved.contains("t-durable"), "{saved}");
    assert!(!saved.contains("evse-pw"), "a password was saved: {saved}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data_dir.join("broker-sessions.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "readable by others: {mode:o}");

    let gw = support::start(&yaml).await;
    let addr = support::mqtt_addr(&gw);
    publish(addr, "after the restart").await;
    let (_c, mut events) = durable(addr);
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while got.len() < 2 {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a)))) => {
                assert!(
                    a.session_present,
                    "session present after the restart: {a:?}"
                );
            }
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => {
                got.push(String::from_utf8_lossy(&p.payload).to_string());
            }
            Ok(Ok(_)) => {}
            other => panic!("got {got:?}, then {other:?}"),
        }
    }
    assert_eq!(got, ["before the restart", "after the restart"]);
    gw.shutdown().await;

    // A damaged file (a crash while it was written by hand, a full disk)
    // is reported and the gateway starts without the sessions.
    std::fs::write(data_dir.join("broker-sessions.json"), "[{\"connect\": 1").unwrap();
    let gw = support::start(&yaml).await;
    let ok = connack(
        support::mqtt_addr(&gw),
        &connect(4, "t-after-damage", Some(("evse", "evse-pw"))),
    )
    .await;
    assert_eq!(ok.as_deref(), Some(&[0, 0][..]));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mosquitto_password_file_logs_users_in() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mosquitto.passwd");
    let yaml = support::yaml_with_broker("").replace(
        "broker:\n",
        &format!("broker:\n  password_file: {}\n", fixture.display()),
    );
    let gw = support::start(&yaml).await;
    let addr = support::mqtt_addr(&gw);
    // `$7$` (PBKDF2-SHA512, what mosquitto_passwd 2.x writes) and `$6$`.
    for user in ["evse", "legacy"] {
        let pw = format!("{user}-pw");
        let ok = connack(addr, &connect(4, &format!("t-{user}"), Some((user, &pw)))).await;
        assert_eq!(ok.as_deref(), Some(&[0, 0][..]), "{user}");
    }
    let bad = connack(addr, &connect(4, "t-bad", Some(("evse", "wrong")))).await;
    assert_eq!(bad.as_deref(), Some(&[0, 5][..]));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_zero_is_accepted_and_persistent_sessions_queue() {
    let gw = support::start(&support::yaml_with_broker("")).await;
    let addr = support::mqtt_addr(&gw);
    // Keep-alive 0 (Paho's default): accepted.
    let ok = connack(addr, &connect(4, "t-ka0", None)).await;
    assert_eq!(ok.as_deref(), Some(&[0, 0][..]));

    // A persistent session gets QoS 1 messages published while it was away.
    let mut o = rumqttc::MqttOptions::new("t-persist", addr.ip().to_string(), addr.port());
    o.set_clean_session(false);
    let (c, mut events) = rumqttc::AsyncClient::new(o.clone(), 10);
    c.subscribe("away/#", QoS::AtLeastOnce).await.unwrap();
    loop {
        if let Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)))) =
            tokio::time::timeout(Duration::from_secs(5), events.poll()).await
        {
            break;
        }
    }
    c.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(2), events.poll()).await;
    drop(events);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let p = Client::connect(addr, "t-pub", &[]).await;
    p.client
        .publish("away/1", QoS::AtLeastOnce, false, "queued")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_c, mut events) = rumqttc::AsyncClient::new(o, 10);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => {
                assert_eq!(p.payload, "queued");
                break;
            }
            Ok(Ok(_)) => {}
            other => panic!("the queued message never came: {other:?}"),
        }
    }
    gw.shutdown().await;
}

/// A `tls:` listener serves MQTT over TLS (rustls with ring, our own
/// front); a refused login there is logged with the client's real address.
/// The certificates come from the Mosquitto test support (openssl CLI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto and openssl (test certificates): run by .ci/run"]
async fn a_tls_listener_serves_mqtt_and_logs_the_real_peer() {
    use crate::support::mosquitto::{Mosquitto, Security};
    let mut m = Mosquitto::start(Security::Tls);
    let certs = m.certs().unwrap().clone();
    m.stop();
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let hash = edgebridge::broker::hash_password("evse-pw").unwrap();
    std::fs::write(
        dir.path().join("config.yaml"),
        format!(
            "gateway: {{ id: tls-gw, data_dir: {data} }}\nbroker:\n  users:\n    - {{ username: evse, password_hash: \"{hash}\" }}\n  listeners:\n    - {{ bind: \"127.0.0.1:{port}\", protocol: mqtt, tls: {{ cert: {cert}, key: {key} }} }}\n",
            data = dir.path().join("data").display(),
            cert = certs.server_cert.display(),
            key = certs.server_key.display(),
        ),
    )
    .unwrap();
    let bin = support::Binary::spawn(&["run"], dir.path());
    support::wait_port(
        format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(10),
    )
    .await;
    let tls = edgebridge::bridge::mqtt::client_config(Some(&certs.ca), None).unwrap();
    let connect = |id: &str, pw: &str| {
        let mut o = rumqttc::MqttOptions::new(id, "localhost", port);
        o.set_credentials("evse", pw);
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(tls.clone())),
        ));
        rumqttc::AsyncClient::new(o, 10)
    };
    let (_ok, mut events) = connect("t-tls", "evse-pw");
    match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
        Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a)))) => {
            assert_eq!(a.code, rumqttc::ConnectReturnCode::Success)
        }
        other => panic!("no CONNACK over TLS: {other:?}\n{}", bin.stderr()),
    }
    let (_bad, mut events) = connect("t-tls-bad", "wrong");
    let refused = tokio::time::timeout(Duration::from_secs(10), events.poll()).await;
    assert!(
        matches!(
            refused,
            Ok(Err(rumqttc::ConnectionError::ConnectionRefused(_)))
        ),
        "{refused:?}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = bin.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("login refused") && l.contains("t-tls-bad"))
        .unwrap_or_else(|| panic!("no refusal line:\n{log}"));
    assert!(
        line.contains("user=\"evse\"") || line.contains("user=evse"),
        "{line}"
    );
    assert!(line.contains("peer=\"127.0.0.1:"), "{line}");
    assert!(!line.contains("wrong"), "the password was logged: {line}");
}

/// Beyond `max_connections` a client is told "server unavailable" (it
/// retries), not "not authorised" (which clients take as final), and it is
/// not let in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_beyond_max_connections_are_told_to_retry() {
    let yaml = users_yaml("").replace("broker:\n", "broker:\n  max_connections: 2\n");
    let gw = support::start(&yaml).await;
    let addr = support::mqtt_addr(&gw);
    let login = Some(("evse", "evse-pw"));
    let mut held = Vec::new();
    for i in 0..2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&connect(4, &format!("t-held{i}"), login))
            .await
            .unwrap();
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack).await.unwrap();
        assert_eq!(ack, [0x20, 2, 0, 0]);
        held.push(s);
    }
    let v3 = connack(addr, &connect(4, "t-third", login)).await;
    assert_eq!(
        v3.as_deref(),
        Some(&[0, 3][..]),
        "3.1.1: server unavailable"
    );
    let v5 = connack(addr, &connect(5, "t-third5", login)).await.unwrap();
    assert_eq!(v5[1], 0x88, "5: server unavailable, got {v5:?}");
    // Even a client id already connected is not taken over.
    let same = connack(addr, &connect(4, "t-held0", login)).await;
    assert_eq!(same.as_deref(), Some(&[0, 3][..]));
    let mut buf = [0u8; 1];
    held[0].set_nodelay(true).unwrap();
    let still = tokio::time::timeout(Duration::from_millis(300), held[0].read(&mut buf)).await;
    assert!(still.is_err(), "the held connection was closed: {still:?}");
    // A connection that ends gives its place back.
    drop(held.remove(0));
    let mut after = None;
    for _ in 0..50 {
        after = connack(addr, &connect(4, "t-after", login)).await;
        if after.as_deref() == Some(&[0, 0][..]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        after.as_deref(),
        Some(&[0, 0][..]),
        "a freed place is given"
    );
    drop(held);
    gw.shutdown().await;
}

/// A network subscriber that takes nothing while the gateway publishes
/// fast in-process cannot make the gateway hold everything for it: past
/// `max_queued_messages` plus a fixed margin waiting for that client, the
/// rest are dropped for it and counted. The in-process subscribers get
/// every message, and the slow client is still served afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_takes_nothing_does_not_grow_the_gateway() {
    const N: usize = 40_000;
    let yaml =
        support::yaml_with_broker("").replace("broker:\n", "broker:\n  max_queued_messages: 100\n");
    let gw = support::start(&yaml).await;
    let addr = support::mqtt_addr(&gw);
    // Counted for the whole process (other tests only add to it).
    let before = edgebridge::broker::dropped();

    // The slow client: subscribes, then reads nothing.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(&connect(4, "t-slow", None)).await.unwrap();
    let mut ack = [0u8; 4];
    slow.read_exact(&mut ack).await.unwrap();
    let mut sub = vec![0, 1];
    string("slow/#", &mut sub);
    sub.push(0);
    slow.write_all(&packet(0x82, &sub)).await.unwrap();
    let mut suback = [0u8; 5];
    slow.read_exact(&mut suback).await.unwrap();
    assert_eq!(suback, [0x90, 3, 0, 1, 0]);

    let mut bus = gw
        .bus()
        .subscribe(
            "edgebridge-test-slow",
            &[("slow/#".to_string(), Qos::AtMostOnce)],
        )
        .await
        .unwrap();
    let reader = tokio::spawn(async move {
        let mut n = 0;
        while n < N {
            tokio::time::timeout(Duration::from_secs(30), bus.recv())
                .await
                .expect("the in-process subscriber gets everything")
                .unwrap();
            n += 1;
        }
    });
    let payload = vec![b'x'; 1024];
    for i in 0..N {
        gw.bus()
            .publish(edgebridge::model::Message::new(
                format!("slow/{}", i % 10),
                payload.clone(),
            ))
            .await;
    }
    reader.await.unwrap();
    gw.bus().flush(Duration::from_secs(10)).await;
    let dropped = edgebridge::broker::dropped() - before;
    // At most 100 + 10 000 wait in the gateway, and some megabytes in the
    // sockets' buffers; the rest were dropped for the slow client.
    assert!(
        dropped >= 15_000,
        "only {dropped} of {N} dropped for a client that read nothing"
    );

    // The slow client is still connected and served.
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, slow.read(&mut buf)).await {
        assert!(n > 0, "the slow client was disconnected");
        got += n;
        if got > 1024 * 1024 {
            break;
        }
    }
    assert!(got > 1024 * 1024, "the slow client got {got} bytes");
    gw.shutdown().await;
}

/// A QoS 2 publisher with 65 535 messages in flight (every packet id in
/// use, no PUBREL yet) is not disconnected: MQTT 3.1.1 clients cannot
/// learn a limit. Then each is released and delivered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos2_publisher_may_use_every_packet_id() {
    const N: u16 = u16::MAX;
    let gw = support::start(&support::yaml_with_broker("")).await;
    let addr = support::mqtt_addr(&gw);
    let mut bus = gw
        .bus()
        .subscribe(
            "edgebridge-test-q2",
            &[("q2/#".to_string(), Qos::ExactlyOnce)],
        )
        .await
        .unwrap();
    // The bus is read all along, as the bridges read it (a full in-process
    // subscriber holds publishers back).
    let reader = tokio::spawn(async move {
        let mut seen = std::collections::HashSet::new();
        while seen.len() < usize::from(N) {
            let m = tokio::time::timeout(Duration::from_secs(60), bus.recv())
                .await
                .expect("all delivered")
                .unwrap();
            assert!(
                seen.insert(m.payload.to_vec()),
                "delivered twice: {:?}",
                m.payload
            );
        }
        let extra = tokio::time::timeout(Duration::from_millis(300), bus.recv()).await;
        assert!(extra.is_err(), "a message was delivered again: {extra:?}");
    });
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&connect(4, "t-q2", None)).await.unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await.unwrap();
    assert_eq!(ack, [0x20, 2, 0, 0]);
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let mut all = Vec::new();
        for id in 1..=N {
            let mut b = Vec::new();
            string("q2/x", &mut b);
            b.extend_from_slice(&id.to_be_bytes());
            b.extend_from_slice(&id.to_be_bytes());
            all.extend(packet(0x34, &b)); // PUBLISH, QoS 2
        }
        wr.write_all(&all).await.unwrap();
        wr
    });
    // One PUBREC per packet id, and the connection stays open.
    let mut recs = 0u32;
    let mut frame = [0u8; 4];
    while recs < u32::from(N) {
        tokio::time::timeout(Duration::from_secs(30), rd.read_exact(&mut frame))
            .await
            .unwrap_or_else(|_| panic!("only {recs} PUBRECs"))
            .unwrap_or_else(|e| panic!("disconnected after {recs} PUBRECs: {e}"));
        assert_eq!(frame[0], 0x50, "not a PUBREC: {frame:?}");
        recs += 1;
    }
    let mut wr = writer.await.unwrap();
    let rels: Vec<u8> = (1..=N)
        .flat_map(|id| {
            let [a, b] = id.to_be_bytes();
            [0x62, 2, a, b]
        })
        .collect();
    wr.write_all(&rels).await.unwrap();
    let mut comps = 0u32;
    while comps < u32::from(N) {
        tokio::time::timeout(Duration::from_secs(30), rd.read_exact(&mut frame))
            .await
            .expect("PUBCOMP")
            .unwrap();
        assert_eq!(frame[0], 0x70, "not a PUBCOMP: {frame:?}");
        comps += 1;
    }
    // Exactly once each.
    reader.await.unwrap();
    gw.shutdown().await;
}

/// A mapping's `qos:` is the QoS its messages have on the local bus: a
/// LAN client subscribed at QoS 2 gets a `qos: 1` mapping's messages at
/// QoS 1 and a `qos: 0` mapping's at QoS 0 (issue 18: with rumqttd every
/// in-process publish went out at QoS 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mappings_qos_is_the_qos_on_the_local_bus() {
    let yaml = support::yaml_with_broker(
        "devices:\n  - { name: d, driver: simulator, poll: 50ms, points: [{ name: a, wave: sine }, { name: b, wave: sine }] }\n\
         mappings:\n  - { match: 'd/a', topic: 'q/one', qos: 1 }\n  - { match: 'd/b', topic: 'q/zero', qos: 0 }\n",
    );
    let gw = support::start(&yaml).await;
    let addr = support::mqtt_addr(&gw);
    let o = rumqttc::MqttOptions::new("t-qos", addr.ip().to_string(), addr.port());
    let (c, mut events) = rumqttc::AsyncClient::new(o, 10);
    c.subscribe("q/#", QoS::ExactlyOnce).await.unwrap();
    let mut seen = std::collections::HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while seen.len() < 2 {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => {
                seen.insert(p.topic.clone(), p.qos);
            }
            Ok(Ok(_)) => {}
            other => panic!("got {seen:?}, then {other:?}"),
        }
    }
    assert_eq!(seen["q/one"], QoS::AtLeastOnce);
    assert_eq!(seen["q/zero"], QoS::AtMostOnce);
    gw.shutdown().await;
}

/// An MQTT 5 client with session expiry 0 that says DISCONNECT and
/// reconnects at once with clean start 0 has no session to resume: CONNACK
/// says "session present" 0 even while the old connection is still
/// closing (Paho's test_session_expiry failed 1 run in 5 on that race).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_is_never_present_on_a_quick_reconnect() {
    let gw = support::start(&support::yaml_with_broker("")).await;
    let addr = support::mqtt_addr(&gw);
    // CONNECT, MQTT 5, clean start 0, keep-alive 0, no properties (session
    // expiry 0), client id "t-expiry".
    let mut resume = Vec::new();
    string("MQTT", &mut resume);
    resume.extend_from_slice(&[5, 0x00, 0, 0, 0]);
    string("t-expiry", &mut resume);
    let resume = packet(0x10, &resume);
    for round in 0..20 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&connect(5, "t-expiry", None)).await.unwrap();
        let mut head = [0u8; 2];
        s.read_exact(&mut head).await.unwrap();
        let mut body = vec![0u8; usize::from(head[1])];
        s.read_exact(&mut body).await.unwrap();
        // SUBSCRIBE id 1, no properties, "expiry/#" QoS 1, then DISCONNECT.
        let mut sub = vec![0, 1, 0];
        string("expiry/#", &mut sub);
        sub.push(1);
        s.write_all(&packet(0x82, &sub)).await.unwrap();
        let mut suback = [0u8; 2];
        s.read_exact(&mut suback).await.unwrap();
        let mut rest = vec![0u8; usize::from(suback[1])];
        s.read_exact(&mut rest).await.unwrap();
        s.write_all(&[0xE0, 0x00]).await.unwrap();
        drop(s);
        let ack = connack(addr, &resume).await.expect("a CONNACK");
        assert_eq!(
            ack[0] & 1,
            0,
            "round {round}: session present after expiry 0: {ack:?}"
        );
        assert_eq!(ack[1], 0, "round {round}: {ack:?}");
    }
    gw.shutdown().await;
}
