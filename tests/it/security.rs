//! Security review, as tests: who may connect, what the broker bounds, and
//! that secrets stay out of every output of the real binary.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use edgebridge::broker::{hash_password, MAX_CLIENT_ID_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{self, Client};

/// Distinctive values, so that a grep for them finds nothing else.
const CLOUD_PASSWORD: &str = "cl0ud-PW-9f3a1c";
const ONENET_KEY: &str = "MG4zbjN0LUtFWS03ZDJiNGUtc2Vrcml0";
const EXTERNAL_PASSWORD: &str = "ext-PW-5e8c0a";
const MQTT_PASSWORD: &str = "mqtt-PW-1b6d9f";
const WRONG_PASSWORD: &str = "wr0ng-PW-3c7a2e";

/// A config with every kind of secret: bridge password, OneNET key and a
/// broker user's hash (the hash is secret too: it can be attacked offline).
fn secret_config(port: u16, mport: u16, hash: &str) -> String {
    format!(
        r#"gateway: {{ id: sec-gw }}
metrics: {{ bind: "127.0.0.1:{mport}" }}
broker:
  listeners:
    - {{ bind: "127.0.0.1:{port}", protocol: mqtt }}
  users:
    - {{ username: evse, password_hash: "{hash}" }}
devices:
  - {{ name: d, driver: simulator, poll: 100ms, points: [{{ name: p, wave: sine }}] }}
bridges:
  - name: cloud
    url: mqtt://127.0.0.1:9
    client_id: sec-gw
    username: sec-gw
    password: ${{EB_TEST_CLOUD_PASSWORD}}
    forward:
      - {{ topics: "PV/#", remote_prefix: "site/" }}
  - name: onenet
    url: mqtt://127.0.0.1:9
    onenet:
      product_id: abc123
      device_name: sec-gw
      access_key: ${{EB_TEST_ONENET_KEY}}
"#
    )
}

fn edgebridge(args: &[&str], dir: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_edgebridge"));
    c.args(args)
        .current_dir(dir)
        .env("EB_TEST_CLOUD_PASSWORD", CLOUD_PASSWORD)
        .env("EB_TEST_ONENET_KEY", ONENET_KEY)
        .env("EB_TEST_EXTERNAL_PASSWORD", EXTERNAL_PASSWORD);
    c
}

fn assert_no_secret(what: &str, text: &str, hash: &str) {
    for s in [
        CLOUD_PASSWORD,
        ONENET_KEY,
        EXTERNAL_PASSWORD,
        MQTT_PASSWORD,
        WRONG_PASSWORD,
        hash,
    ] {
        assert!(!text.contains(s), "{what} shows a secret `{s}`:\n{text}");
    }
    // The hash's salt+digest part alone must not show either.
    let digest = hash.rsplit('$').next().unwrap_or(hash);
    assert!(
        !text.contains(digest),
        "{what} shows the hash digest:\n{text}"
    );
}

#[test]
fn check_and_debug_never_show_secrets() {
    let hash = hash_password(MQTT_PASSWORD).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(
        &path,
        secret_config(support::free_port(), support::free_port(), &hash),
    )
    .unwrap();

    let out = edgebridge(&["check"], dir.path()).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert_no_secret("`edgebridge check`", &text, &hash);

    // A config with errors next to the secrets: the messages name the
    // place, never the value.
    let broken = secret_config(support::free_port(), support::free_port(), &hash)
        .replace("username: sec-gw", "username: sec-gw\n    passwrd: oops")
        .replace(
            "broker:\n",
            "broker:\n  external_password: ${EB_TEST_EXTERNAL_PASSWORD}\n  enabled: maybe\n",
        );
    std::fs::write(&path, broken).unwrap();
    let out = edgebridge(&["check"], dir.path()).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert_no_secret("`edgebridge check` of a broken config", &text, &hash);

    // Debug of the loaded config (what a `?config` log field would print).
    let yaml = secret_config(1883, 9100, &hash).replace(
        "broker:\n",
        "broker:\n  external_password: ${EB_TEST_EXTERNAL_PASSWORD}\n",
    );
    let env = |k: &str| match k {
        "EB_TEST_CLOUD_PASSWORD" => Some(CLOUD_PASSWORD.to_string()),
        "EB_TEST_ONENET_KEY" => Some(ONENET_KEY.to_string()),
        "EB_TEST_EXTERNAL_PASSWORD" => Some(EXTERNAL_PASSWORD.to_string()),
        _ => None,
    };
    let config =
        edgebridge::config::Config::from_text(std::path::Path::new("c.yaml"), &yaml, env).unwrap();
    assert_no_secret("Debug of Config", &format!("{config:?}"), &hash);
    assert_no_secret("pretty Debug of Config", &format!("{config:#?}"), &hash);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_of_a_running_gateway_never_show_secrets() {
    let hash = hash_password(MQTT_PASSWORD).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let mport = support::free_port();
    std::fs::write(
        dir.path().join("config.yaml"),
        secret_config(port, mport, &hash),
    )
    .unwrap();
    let log = dir.path().join("stderr.log");
    let child = edgebridge(&["run"], dir.path())
        .env("EDGEBRIDGE_LOG", "trace")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.path().join("stdout.log")).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut bin = support::Binary {
        child,
        stderr_path: log.clone(),
    };
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    support::wait_port(addr, Duration::from_secs(10)).await;
    // A good login, a bad one and no login: all go through the logs.
    let good = Client::connect_with(addr, "t-good", &["#"], Some(("evse", MQTT_PASSWORD))).await;
    assert!(good.is_ok(), "{:?}", good.err());
    assert!(
        Client::connect_with(addr, "t-bad", &[], Some(("evse", WRONG_PASSWORD)))
            .await
            .is_err()
    );
    assert!(Client::connect_with(addr, "t-none", &[], None)
        .await
        .is_err());
    let mut good = good.unwrap();
    // Something flowed through the gateway while tracing.
    good.expect("edgebridge/sec-gw/status", Duration::from_secs(5))
        .await;
    // The metrics endpoint shows no secret either.
    let mut m = TcpStream::connect(("127.0.0.1", mport)).await.unwrap();
    m.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut page = String::new();
    m.read_to_string(&mut page).await.unwrap();
    assert!(page.contains("edgebridge_"), "no metrics: {page}");
    assert_no_secret("the metrics page", &page, &hash);
    assert!(!page.contains("sign="), "a OneNET token in the metrics");
    drop(good);
    bin.signal("TERM");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while bin.child.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "no exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = std::fs::read_to_string(&log).unwrap()
        + std::fs::read_to_string(dir.path().join("stdout.log"))
            .unwrap()
            .as_str();
    assert!(
        text.contains("TRACE") || text.contains("DEBUG"),
        "not a trace log:\n{text}"
    );
    assert_no_secret("the gateway's trace log", &text, &hash);
    // Nor the OneNET token derived from the key (its password on the wire).
    assert!(
        !text.contains("sign="),
        "a OneNET token in the log:\n{text}"
    );

    // The data dir and every queue file in it are private to the service
    // user (queued messages may carry anything the devices measure).
    use std::os::unix::fs::PermissionsExt as _;
    let data = dir.path().join("data");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "data dir mode");
    let files: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        files.iter().any(|f| f.to_string_lossy().contains("queue")),
        "no queue file in {files:?}"
    );
    for f in files {
        assert_eq!(mode(&f) & 0o077, 0, "{} is readable by others", f.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_users_every_listener_needs_a_login_and_long_client_ids_are_refused() {
    let hash = hash_password(MQTT_PASSWORD).unwrap();
    let yaml = format!(
        "gateway: {{ id: auth-gw }}\nbroker:\n  listeners:\n    - {{ bind: \"127.0.0.1:0\", protocol: mqtt }}\n  users:\n    - {{ username: evse, password_hash: \"{hash}\" }}\n"
    );
    let gw = support::start(&yaml).await;
    let addr = support::mqtt_addr(&gw);
    // Loopback too: once users exist, nobody gets in without a login.
    assert!(Client::connect_with(addr, "t-anon", &[], None)
        .await
        .is_err());
    assert!(
        Client::connect_with(addr, "t-wrong", &[], Some(("evse", WRONG_PASSWORD)))
            .await
            .is_err()
    );
    assert!(
        Client::connect_with(addr, "t-nouser", &[], Some(("nobody", MQTT_PASSWORD)))
            .await
            .is_err()
    );
    let max_id = "i".repeat(MAX_CLIENT_ID_LEN);
    assert!(
        Client::connect_with(addr, &max_id, &[], Some(("evse", MQTT_PASSWORD)))
            .await
            .is_ok()
    );
    let long_id = "i".repeat(MAX_CLIENT_ID_LEN + 1);
    assert!(
        Client::connect_with(addr, &long_id, &[], Some(("evse", MQTT_PASSWORD)))
            .await
            .is_err()
    );
    // A flood of parallel logins is answered (queued, not crashed), and a
    // good login still works afterwards (once the queue drained: argon2 is
    // slow in a debug build).
    let flood: Vec<_> = (0..6)
        .map(|i| {
            tokio::spawn(async move {
                Client::connect_with(addr, &format!("t-flood-{i}"), &[], Some(("evse", "x")))
                    .await
                    .is_err()
            })
        })
        .collect();
    for f in flood {
        assert!(f.await.unwrap(), "a wrong password got in");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match Client::connect_with(addr, "t-after", &[], Some(("evse", MQTT_PASSWORD))).await {
            Ok(_) => break,
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "no good login after the flood: {e}"
            ),
        }
    }
    gw.shutdown().await;
}

#[test]
fn a_listener_beyond_loopback_without_users_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.yaml"),
        "gateway: { id: gw }\nbroker:\n  listeners:\n    - { bind: \"0.0.0.0:0\", protocol: mqtt }\n",
    )
    .unwrap();
    let out = edgebridge(&["run"], dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("reachable beyond this machine"), "{err}");
}

/// MQTT 3.1.1 CONNECT with a clean session.
fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    support::packet(0x10, &body)
}

/// Connects raw; `true` when a successful CONNACK came back.
async fn raw_connect(addr: SocketAddr, id: &str) -> (bool, TcpStream) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&connect_packet(id)).await.unwrap();
    let mut ack = [0u8; 4];
    let ok = matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut ack)).await,
        Ok(Ok(_))
    ) && ack == [0x20, 2, 0, 0];
    (ok, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_and_connection_limits_hold_and_others_keep_being_served() {
    let yaml = support::yaml_with_broker(
        "devices:\n  - { name: d, driver: simulator, poll: 50ms, points: [{ name: p, wave: sine }] }\nmappings:\n  - { match: '*/*', topic: 'x/{point}' }\n",
    )
    .replace("broker:\n", "broker:\n  max_payload_size: 1KiB\n  max_connections: 12\n");
    let gw = support::start(&yaml).await;
    let addr = support::mqtt_addr(&gw);
    let mut watcher = Client::connect(addr, "t-watch", &["x/p"]).await;

    // An oversized publish disconnects only its sender.
    let (ok, mut big) = raw_connect(addr, "t-big").await;
    assert!(ok);
    let mut body = vec![0, 5, b'b', b'i', b'g', b'/', b'x'];
    body.extend(std::iter::repeat_n(b'z', 2048));
    big.write_all(&support::packet(0x30, &body)).await.unwrap();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), big.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "an oversized publish did not close the connection: {closed:?}"
    );
    watcher.expect("x/p", Duration::from_secs(5)).await;

    // Connections past the limit are refused ("server unavailable"); the
    // watcher holds one of the 12, the gateway's own clients none.
    let mut open = Vec::new();
    let mut refused = false;
    for i in 0..16 {
        let (ok, s) = raw_connect(addr, &format!("t-c{i}")).await;
        if !ok {
            refused = true;
            break;
        }
        open.push(s);
    }
    assert!(refused, "the 12-connection limit let {} in", open.len() + 1);
    assert_eq!(open.len(), 11, "the watcher and 11 more fill the 12");
    drop(open);
    watcher.expect("x/p", Duration::from_secs(5)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (ok, _s) = raw_connect(addr, "t-again").await;
        if ok {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "slots never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.shutdown().await;
}

/// Rules have no way to the file system, the network or other processes:
/// every such attempt is a compile error or a failed call, and nothing
/// happens outside the sandbox.
#[test]
fn rules_cannot_touch_files_network_or_processes() {
    use edgebridge::model::{Quality, Reading, Value};
    use edgebridge::pipeline::rules::Rules;
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim.txt");
    let v = victim.display().to_string();
    let attempts: Vec<(&str, String)> = vec![
        ("read_file", format!("read_file(\"{v}\")")),
        ("write_file", format!("write_file(\"{v}\", \"x\")")),
        ("open_file", format!("open_file(\"{v}\")")),
        ("File", format!("File::open(\"{v}\")")),
        ("fs", format!("std::fs::write(\"{v}\", \"x\")")),
        ("system", format!("system(\"touch {v}\")")),
        ("exec", format!("exec(\"touch\", [\"{v}\"])")),
        (
            "command",
            format!("Command::new(\"touch\").arg(\"{v}\").spawn()"),
        ),
        ("spawn", format!("spawn(\"touch {v}\")")),
        ("connect", "connect(\"127.0.0.1:1883\")".to_string()),
        ("tcp", "TcpStream::connect(\"127.0.0.1:1883\")".to_string()),
        ("http", "http_get(\"http://127.0.0.1/\")".to_string()),
        ("env", "env(\"HOME\")".to_string()),
        ("exit", "exit(1)".to_string()),
        ("fn_ptr", format!("Fn(\"write_file\").call(\"{v}\", \"x\")")),
        (
            "curry",
            format!("let f = Fn(\"system\"); f.call(\"touch {v}\")"),
        ),
        ("eval", format!("eval(\"write_file(\\\"{v}\\\", 1)\")")),
        ("import", format!("import \"{v}\" as m;")),
    ];
    let reading = Reading {
        device: Arc::from("d"),
        point: Arc::from("p"),
        value: Value::Float(1.0),
        unit: None,
        ts: 1,
        quality: Quality::Good,
    };
    for (name, body) in attempts {
        let src = format!("fn on_reading(r) {{\n  {body};\n  publish(\"escaped\", \"yes\");\n}}\n");
        let path = dir.path().join(format!("{name}.rhai"));
        match Rules::from_sources(vec![(path, src.clone())], Duration::from_millis(100)) {
            // Rejected when compiled (eval, import, unknown syntax).
            Err(e) => assert!(!e.to_string().is_empty(), "{name}"),
            Ok(rules) => {
                let out = rules.on_reading(&reading);
                assert_eq!(
                    out.outcome.failures.len(),
                    1,
                    "{name}: `{body}` did not fail: {out:?}"
                );
                assert!(
                    out.outcome.publishes.is_empty(),
                    "{name}: the call went on after `{body}`"
                );
            }
        }
        assert!(!victim.exists(), "{name}: `{body}` touched the file system");
    }
}

/// Found by `fuzz/` (mqtt_decode): rumqttd 0.20's MQTT 5 decoder panics
/// (`unreachable!()`) on this CONNACK-typed packet with a bad property.
/// In the gateway the panic stays inside that connection's task: the
/// broker keeps serving other clients on every listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_that_panics_rumqttds_mqtt5_decoder_kills_only_its_connection() {
    use edgebridge::config::ListenerProtocol;
    let mut bad = vec![0x24];
    bad.extend(std::iter::repeat_n(0x19, 42));
    bad.extend([0x5b, 0x21, 0x00]);
    let yaml = support::yaml_with_broker(
        "devices:\n  - { name: d, driver: simulator, poll: 50ms, points: [{ name: p, wave: sine }] }\nmappings:\n  - { match: '*/*', topic: 'x/{point}' }\n",
    );
    let gw = support::start(&yaml).await;
    let v4 = support::mqtt_addr(&gw);
    let v5 = gw.listener(ListenerProtocol::Mqtt5).unwrap();
    let mut watcher = Client::connect(v4, "t-watch5", &["x/p"]).await;
    for _ in 0..3 {
        let mut s = TcpStream::connect(v5).await.unwrap();
        s.write_all(&bad).await.unwrap();
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "not closed: {r:?}");
    }
    watcher.expect("x/p", Duration::from_secs(5)).await;
    // New clients are still served on both listeners.
    let (ok, _s) = raw_connect(v4, "t-after4").await;
    assert!(ok);
    let mut s = TcpStream::connect(v5).await.unwrap();
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 30, 0];
    body.extend_from_slice(&[0, 8]);
    body.extend_from_slice(b"t-after5");
    s.write_all(&support::packet(0x10, &body)).await.unwrap();
    let mut ack = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut ack))
        .await
        .expect("CONNACK in time")
        .unwrap();
    assert_eq!(ack[0], 0x20, "a v5 CONNACK");
    gw.shutdown().await;
}

/// A client that resets its socket right after CONNECT (a crash, a pulled
/// cable) must lock nobody out: the same client id gets back in at once,
/// other clients connect, and connected clients are not disturbed. (With
/// rumqttd 0.20 this locked every later client out: rumqtt#1062.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_resets_during_connect_locks_nobody_out() {
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    std::fs::write(
        dir.path().join("config.yaml"),
        format!(
            "gateway: {{ id: reset-gw }}\nbroker:\n  listeners:\n    - {{ bind: \"127.0.0.1:{port}\", protocol: mqtt }}\n\
             devices:\n  - {{ name: d, driver: simulator, poll: 50ms, points: [{{ name: p, wave: sine }}] }}\n\
             mappings:\n  - {{ match: '*/*', topic: 'x/{{point}}' }}\n"
        ),
    )
    .unwrap();
    let bin = support::Binary::spawn(&["run"], dir.path());
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    support::wait_port(addr, Duration::from_secs(10)).await;
    let mut bystander = Client::connect(addr, "t-bystander", &["x/p"]).await;
    bystander.expect("x/p", Duration::from_secs(5)).await;

    for round in 0..5 {
        // CONNECT, then an immediate reset (linger 0) before the CONNACK.
        let s = TcpStream::connect(addr).await.unwrap();
        // Deprecated because a non-zero linger blocks in `close`; zero is
        // what a crashing client does: an immediate RST.
        #[allow(deprecated)]
        s.set_linger(Some(Duration::ZERO)).unwrap();
        let mut s = s;
        s.write_all(&connect_packet("t-churn")).await.unwrap();
        drop(s);
        // The same client id comes back, as a real client would (retrying
        // if the broker is still closing the old session).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if let Ok(mut s) = TcpStream::connect(addr).await {
                s.write_all(&connect_packet("t-churn")).await.unwrap();
                let mut ack = [0u8; 4];
                let r = tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut ack)).await;
                if matches!(r, Ok(Ok(_))) {
                    assert_eq!(ack, [0x20, 2, 0, 0], "round {round}: CONNACK refused");
                    break;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: the client id could not connect again\n{}",
                bin.stderr()
            );
        }
        let (ok, _s) = raw_connect(addr, &format!("t-other{round}")).await;
        assert!(ok, "round {round}: another client was refused");
    }
    bystander
        .drain_where(Duration::from_millis(100), |_| true)
        .await;
    bystander.expect("x/p", Duration::from_secs(5)).await;
    let log = bin.stderr();
    assert!(!log.contains("panicked"), "the broker panicked:\n{log}");
}
