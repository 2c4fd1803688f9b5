//! Interop with Mosquitto's command-line clients against the real binary.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{self, Binary};

struct Running {
    _bin: Binary,
    _dir: tempfile::TempDir,
    port: u16,
}

async fn gateway() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let config = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.yaml"))
        .unwrap()
        .replace("127.0.0.1:1883", &format!("127.0.0.1:{port}"))
        .replace(
            "dir: ./rules",
            concat!("dir: ", env!("CARGO_MANIFEST_DIR"), "/rules"),
        );
    std::fs::write(dir.path().join("config.yaml"), config).unwrap();
    let bin = Binary::spawn(&["run"], dir.path());
    support::wait_port(
        format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(10),
    )
    .await;
    Running {
        _bin: bin,
        _dir: dir,
        port,
    }
}

/// Runs mosquitto_sub until it got `count` messages (or `secs` passed).
fn sub(port: u16, topic: &str, count: u32, secs: u32) -> std::process::Child {
    Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            topic,
            "-v",
            "-q",
            "2",
        ])
        .args(["-C", &count.to_string(), "-W", &secs.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub (apt-get install mosquitto-clients)")
}

fn output(child: std::process::Child) -> String {
    String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
}

fn publish(port: u16, topic: &str, msg: &str, extra: &[&str]) {
    let ok = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            topic,
            "-m",
            msg,
        ])
        .args(extra)
        .status()
        .expect("mosquitto_pub")
        .success();
    assert!(ok, "mosquitto_pub failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto-clients: run by .ci/run"]
async fn mosquitto_sub_sees_pv_data() {
    let gw = gateway().await;
    let out = output(sub(gw.port, "PV/#", 4, 10));
    assert!(out.lines().any(|l| l.starts_with("PV/data ")), "{out}");
    assert!(
        out.lines()
            .any(|l| l == "PV/sunshine true" || l == "PV/sunshine false"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto-clients: run by .ci/run"]
async fn qos1_and_qos2_publishes_arrive() {
    let gw = gateway().await;
    let s = sub(gw.port, "lan/#", 2, 10);
    tokio::time::sleep(Duration::from_millis(500)).await; // let the subscription land
    publish(gw.port, "lan/q1", "one", &["-q", "1"]);
    publish(gw.port, "lan/q2", "two", &["-q", "2"]);
    let out = output(s);
    assert!(out.contains("lan/q1 one"), "{out}");
    assert!(out.contains("lan/q2 two"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mosquitto-clients: run by .ci/run"]
async fn retained_message_reaches_a_later_subscriber() {
    let gw = gateway().await;
    publish(gw.port, "lan/retained", "kept", &["-q", "1", "-r"]);
    let out = output(sub(gw.port, "lan/retained", 1, 5));
    assert_eq!(out.trim(), "lan/retained kept");
}
