//! The real binary: `check`, `passwd`, and a clean shutdown on SIGTERM.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{self, Binary, Client};

fn edgebridge(args: &[&str], dir: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_edgebridge"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("binary runs")
}

#[test]
fn check_reports_every_problem_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.yaml"),
        "gateway:\n  id: gw\ndevices:\n  - { name: a, driver: simulator, points: [{ name: p, wave: sine }] }\n  - { name: a, driver: simulator }\nmappings:\n  - { match: b/p, topic: x }\n",
    )
    .unwrap();
    let out = edgebridge(&["check"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config.yaml:5:13: devices[1].name: duplicate device name `a`"),
        "{err}"
    );
    assert!(
        err.contains("config.yaml:7:14: mappings[0].match: no device named `b`"),
        "{err}"
    );
    assert!(err.contains("2 problem(s)"), "{err}");
}

#[test]
fn check_accepts_the_shipped_config() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = edgebridge(&["check", "--config", "config.yaml"], root);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn run_with_a_broken_config_exits_2_before_starting() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.yaml"), "gateway: [\n").unwrap();
    let out = edgebridge(&["run"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("config.yaml:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwd_hash_logs_in() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgebridge"))
        .args(["passwd", "evse"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"s3cret\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(
        line.starts_with("- { username: evse, password_hash: \"$argon2id$"),
        "{line}"
    );
    assert!(!line.contains("s3cret"));
    let yaml = format!(
        "gateway: {{ id: gw }}\nbroker:\n  listeners:\n    - {{ bind: \"0.0.0.0:0\", protocol: mqtt }}\n  users:\n  {line}"
    );
    let gw = support::start(&yaml).await;
    let port = support::mqtt_addr(&gw).port();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(
        Client::connect_with(addr, "t-pw", &[], Some(("evse", "s3cret")))
            .await
            .is_ok()
    );
    assert!(
        Client::connect_with(addr, "t-pw2", &[], Some(("evse", "nope")))
            .await
            .is_err()
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_0_quickly_and_goes_offline() {
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    std::fs::write(
        dir.path().join("config.yaml"),
        format!(
            "gateway: {{ id: sig-gw }}\nbroker:\n  listeners:\n    - {{ bind: \"127.0.0.1:{port}\", protocol: mqtt }}\ndevices:\n  - {{ name: d, driver: simulator, poll: 100ms, points: [{{ name: p, wave: sine }}] }}\nmappings:\n  - {{ match: '*/*', topic: 'x/{{point}}' }}\n"
        ),
    )
    .unwrap();
    let mut bin = Binary::spawn(&["run"], dir.path());
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    support::wait_port(addr, Duration::from_secs(10)).await;
    let mut c = Client::connect(addr, "t-sig", &["edgebridge/sig-gw/status", "x/p"]).await;
    c.expect("x/p", Duration::from_secs(5)).await;
    bin.signal("TERM");
    let started = Instant::now();
    let status = loop {
        if let Some(s) = bin.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "still running 2s after SIGTERM\n{}",
            bin.stderr()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(status.code(), Some(0), "{}", bin.stderr());
    let offline = c
        .expect_where(Duration::from_secs(2), |g| {
            g.topic == "edgebridge/sig-gw/status" && g.payload == "offline"
        })
        .await;
    assert!(offline.is_some(), "no offline status before exit");
}
