//! Checks across the whole config that serde cannot do: names unique,
//! references exist, each driver has the keys it needs. Every problem is
//! collected with the path of the value it concerns.

use std::collections::HashSet;
use std::time::Duration;

use super::*;
use crate::pipeline::mapping::{Field, Template};

/// One validation problem; `path` is like `devices[1].points[0].name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

/// Problems collected over the whole config, each component adding its
/// own (see [`crate::drivers::check`]).
#[derive(Default)]
pub struct Problems(Vec<Problem>);

impl Problems {
    pub fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// A name used in topics: `[A-Za-z0-9_-]+`.
pub fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

pub fn validate(config: &Config) -> Vec<Problem> {
    let mut p = Problems::default();
    if !is_valid_name(&config.gateway.id) {
        p.add(
            "gateway.id",
            "must be non-empty and use only letters, digits, `_` and `-`",
        );
    }
    broker(config, &mut p);
    acl(config, &mut p);
    devices(config, &mut p);
    crate::drivers::check::check_devices(&config.devices, &mut p);
    mappings(config, &mut p);
    commands(config, &mut p);
    rules(config, &mut p);
    bridges(config, &mut p);
    metrics(config, &mut p);
    p.0
}

fn metrics(config: &Config, p: &mut Problems) {
    let Some(m) = &config.metrics else { return };
    if m.bind.port() == 0 {
        p.add("metrics.bind", "needs a port for Prometheus to scrape");
    }
    if !config.broker.enabled {
        return;
    }
    if let Some(i) = config
        .broker
        .listeners
        .iter()
        .position(|l| l.bind.port() == m.bind.port())
    {
        p.add(
            "metrics.bind",
            format!(
                "port {} is also used by broker.listeners[{i}]",
                m.bind.port()
            ),
        );
    }
}

fn broker(config: &Config, p: &mut Problems) {
    let b = &config.broker;
    if !b.enabled && b.external.is_none() {
        p.add(
            "broker.enabled",
            "the embedded broker is disabled, so `broker.external` must name the broker to use",
        );
    }
    if let Some(url) = &b.external {
        if let Err(e) = crate::bridge::mqtt::Endpoint::parse_plain(url) {
            p.add("broker.external", e.to_string());
        }
    }
    let mut seen = HashSet::new();
    for (i, l) in b.listeners.iter().enumerate() {
        let path = format!("broker.listeners[{i}].bind");
        if l.bind.port() != 0 && !seen.insert(l.bind.port()) {
            p.add(
                path.clone(),
                format!("port {} is used by another listener", l.bind.port()),
            );
        }
        if !l.bind.ip().is_loopback() && b.users.is_empty() && b.password_file.is_none() {
            p.add(
                path,
                format!(
                    "listener on {} is reachable beyond this machine, so `broker.users` must list \
                     at least one user (create a hash with `edgebridge passwd <user>`) \
                     or `broker.password_file` name a Mosquitto password file, \
                     or bind it to 127.0.0.1",
                    l.bind
                ),
            );
        }
    }
    let mut names = HashSet::new();
    for (i, u) in b.users.iter().enumerate() {
        if !names.insert(u.username.as_str()) {
            p.add(format!("broker.users[{i}].username"), "duplicate username");
        }
        if argon2::PasswordHash::new(u.password_hash.expose()).is_err() {
            p.add(
                format!("broker.users[{i}].password_hash"),
                "not a password hash; create one with `edgebridge passwd <user>`",
            );
        }
    }
}

/// `broker.acl`: each entry is a `topic` (optionally for a `user`) or a
/// `pattern` (for everyone), with a valid filter. The files are read by
/// `crate::access` (at start, on SIGHUP and by `edgebridge check`).
fn acl(config: &Config, p: &mut Problems) {
    for (i, r) in config.broker.acl.iter().enumerate() {
        let at = format!("broker.acl[{i}]");
        let filter = match (&r.topic, &r.pattern) {
            (Some(t), None) => t,
            (None, Some(pat)) => {
                if r.user.is_some() {
                    p.add(
                        format!("{at}.user"),
                        "a `pattern` applies to every client; use `topic` for one user's rule",
                    );
                }
                pat
            }
            _ => {
                p.add(at, "needs exactly one of `topic` or `pattern`");
                continue;
            }
        };
        let key = if r.topic.is_some() {
            "topic"
        } else {
            "pattern"
        };
        if let Err(e) = crate::topic::check_filter(filter) {
            p.add(format!("{at}.{key}"), e);
        }
        if r.user.as_deref() == Some("") {
            p.add(format!("{at}.user"), "an empty username matches nobody");
        }
    }
}

/// Things that load but deserve a second look, printed by `edgebridge
/// check`; a config with warnings still runs.
pub fn warnings(config: &Config) -> Vec<Problem> {
    let mut p = Problems::default();
    let b = &config.broker;
    if b.enabled && b.acl.is_empty() && b.acl_file.is_none() {
        for (i, l) in b.listeners.iter().enumerate() {
            if !l.bind.ip().is_loopback() {
                p.add(
                    format!("broker.listeners[{i}].bind"),
                    format!(
                        "listener on {} is reachable beyond this machine and there is no \
                         `broker.acl` or `broker.acl_file`: every user who logs in may publish \
                         and subscribe to every topic",
                        l.bind
                    ),
                );
            }
        }
    }
    for (i, l) in b.listeners.iter().enumerate() {
        if l.protocol == crate::config::ListenerProtocol::Mqtt5 {
            p.add(
                format!("broker.listeners[{i}].protocol"),
                "`mqtt5` is deprecated: a `mqtt` listener serves MQTT 3.1, 3.1.1 and 5 on one port \
                 (`mqtt5` still works, as a synonym)",
            );
        }
    }
    p.0
}

/// What every device needs, whatever its driver: a valid, unique name,
/// uniquely named points, a poll interval above zero. The drivers check
/// the rest.
fn devices(config: &Config, p: &mut Problems) {
    let mut names = HashSet::new();
    for (i, d) in config.devices.iter().enumerate() {
        let at = |k: &str| format!("devices[{i}].{k}");
        if !is_valid_name(&d.name) {
            p.add(
                at("name"),
                "must be non-empty and use only letters, digits, `_` and `-`",
            );
        }
        if !names.insert(d.name.as_str()) {
            p.add(at("name"), format!("duplicate device name `{}`", d.name));
        }
        if d.poll.is_some_and(|t| t.is_zero()) {
            p.add(at("poll"), "must be longer than 0s");
        }
        let mut points = HashSet::new();
        for (j, pt) in d.points.iter().enumerate() {
            let pat = |k: &str| format!("devices[{i}].points[{j}].{k}");
            if !is_valid_name(&pt.name) {
                p.add(
                    pat("name"),
                    "must be non-empty and use only letters, digits, `_` and `-`",
                );
            }
            if !points.insert(pt.name.as_str()) {
                p.add(
                    pat("name"),
                    format!("duplicate point `{}` in device `{}`", pt.name, d.name),
                );
            }
        }
    }
}

fn mappings(config: &Config, p: &mut Problems) {
    for (i, m) in config.mappings.iter().enumerate() {
        let at = |k: &str| format!("mappings[{i}].{k}");
        let Some((dev, pt)) = m.pattern.split_once('/') else {
            p.add(at("match"), "must be `device/point` (`*` matches any)");
            continue;
        };
        if pt.contains('/') {
            p.add(at("match"), "must be `device/point` (`*` matches any)");
            continue;
        }
        if dev != "*" {
            match config.devices.iter().find(|d| d.name == dev) {
                None => p.add(at("match"), format!("no device named `{dev}`")),
                Some(d) => {
                    // serial-line devices get their points from rules.
                    if pt != "*" && d.driver != DriverKind::SerialLine && d.point(pt).is_none() {
                        p.add(at("match"), format!("device `{dev}` has no point `{pt}`"));
                    }
                }
            }
        }
        if let Err(e) = Template::parse(&m.topic, Field::TOPIC) {
            p.add(at("topic"), e.to_string());
        } else if m.topic.contains(['+', '#']) {
            p.add(at("topic"), "a topic to publish cannot contain `+` or `#`");
        }
        if let PayloadFormat::Template(t) = &m.payload {
            if let Err(e) = Template::parse(t, Field::PAYLOAD) {
                p.add(at("payload"), e.to_string());
            }
        }
    }
}

/// The longest `rules.deadline` accepted: a rule that needs more is a
/// mistake, and every reading waits behind it.
const MAX_RULE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

fn rules(config: &Config, p: &mut Problems) {
    let Some(r) = &config.rules else {
        return;
    };
    if r.deadline.is_zero() || r.deadline > MAX_RULE_DEADLINE {
        p.add(
            "rules.deadline",
            "must be longer than 0s and at most 10s (the default is 10ms)",
        );
    }
    if r.dir.as_os_str().is_empty() {
        p.add("rules.dir", "must name a folder, e.g. ./rules");
    }
}

fn commands(config: &Config, p: &mut Problems) {
    for (i, c) in config.commands.iter().enumerate() {
        let at = |k: &str| format!("commands[{i}].{k}");
        if c.topic.is_empty() || c.topic.contains(['+', '#']) {
            p.add(at("topic"), "must be a topic without wildcards");
        }
        let (dev, pt) = c.target();
        match config.devices.iter().find(|d| d.name == dev) {
            None => p.add(
                at("write"),
                format!("no device named `{dev}` (write `device/point`)"),
            ),
            Some(d) => match d.point(pt) {
                None => p.add(at("write"), format!("device `{dev}` has no point `{pt}`")),
                Some(point) if !point.writable => p.add(
                    at("write"),
                    format!("point `{dev}/{pt}` is not `writable: true`"),
                ),
                Some(_) => {}
            },
        }
    }
}

fn bridges(config: &Config, p: &mut Problems) {
    let mut names = HashSet::new();
    for (i, b) in config.bridges.iter().enumerate() {
        let at = |k: &str| format!("bridges[{i}].{k}");
        if !is_valid_name(&b.name) {
            p.add(
                at("name"),
                "must be non-empty and use only letters, digits, `_` and `-`",
            );
        }
        if !names.insert(b.name.as_str()) {
            p.add(at("name"), format!("duplicate bridge name `{}`", b.name));
        }
        if b.onenet.is_none() {
            // `bridge_connection` checks the URL itself.
            if b.url.is_none() {
                p.add(
                    format!("bridges[{i}]"),
                    "a bridge needs `url` (or `onenet:`)",
                );
            }
            if !b.properties.is_empty() {
                p.add(
                    at("properties"),
                    "`properties` applies to OneNET bridges only",
                );
            }
        }
        bridge_connection(b, &at, p);
        for (list, routes) in [("forward", &b.forward), ("subscribe", &b.subscribe)] {
            for (j, r) in routes.iter().enumerate() {
                let here = format!("bridges[{i}].{list}[{j}]");
                if let Err(e) = crate::topic::check_filter(&r.topics) {
                    p.add(format!("{here}.topics"), e);
                }
                if r.remote_prefix.contains(['+', '#']) {
                    p.add(format!("{here}.remote_prefix"), "cannot contain `+` or `#`");
                }
            }
        }
        if let Some(o) = &b.onenet {
            crate::bridge::onenet::check::check(i, b, o, p);
        }
    }
}

/// Checks of the connection settings that rumqttc would otherwise answer
/// with a panic (keep-alive under 1s, zero inflight).
fn bridge_connection(b: &BridgeConfig, at: &dyn Fn(&str) -> String, p: &mut Problems) {
    if let Some(ka) = b.keep_alive {
        if !ka.is_zero() && ka < Duration::from_secs(1) {
            p.add(at("keep_alive"), "must be 0s (off) or at least 1s");
        }
        if ka > Duration::from_secs(u16::MAX as u64) {
            p.add(at("keep_alive"), "must be at most 65535s");
        }
    }
    if b.max_inflight == 0 {
        p.add(at("max_inflight"), "must be at least 1");
    }
    if b.reconnect.min.is_zero() {
        p.add(at("reconnect.min"), "must be longer than 0s");
    }
    if b.reconnect.max < b.reconnect.min {
        p.add(
            at("reconnect.max"),
            "must not be shorter than `reconnect.min`",
        );
    }
    if b.max_packet_size.0 < 128 || b.max_packet_size.0 > 268_435_455 {
        p.add(
            at("max_packet_size"),
            "must be between 128B and 256MiB (the MQTT maximum)",
        );
    }
    if b.queue.drain_rate == Some(0) {
        p.add(
            at("queue.drain_rate"),
            "must be at least 1 message per second",
        );
    }
    if b.queue.max_bytes.0 == 0 {
        p.add(at("queue.max_bytes"), "must be larger than 0");
    }
    if b.queue
        .write_behind
        .is_some_and(|d| d > Duration::from_secs(1))
    {
        p.add(
            at("queue.write_behind"),
            "must be at most 1s (it is how much a crash of the process may lose)",
        );
    }
    if let Some(tls) = &b.tls {
        if tls.cert.is_some() != tls.key.is_some() {
            p.add(
                at("tls"),
                "mutual TLS needs both `cert` and `key` (or neither)",
            );
        }
    }
    if let Some(url) = &b.url {
        if let Err(e) = crate::bridge::mqtt::Endpoint::parse(url) {
            p.add(at("url"), e.to_string());
        }
    }
    if let Some(will) = &b.will {
        if will.topic.is_empty() || will.topic.contains(['+', '#']) {
            p.add(at("will.topic"), "must be a topic without wildcards");
        }
    }
    if let Some(id) = &b.client_id {
        if id.is_empty() {
            p.add(at("client_id"), "must not be empty");
        }
    }
}

#[cfg(test)]
mod rules_tests {
    use std::path::Path;

    use crate::config::Config;

    fn load(rules: &str) -> Result<Config, String> {
        Config::from_text(
            Path::new("c.yaml"),
            &format!("gateway: {{ id: gw }}\nrules:\n{rules}"),
            |_| None,
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn rules_deadline_defaults_to_10ms() {
        let c = load("  dir: ./rules\n").unwrap();
        let r = c.rules.unwrap();
        assert_eq!(r.deadline, std::time::Duration::from_millis(10));
        assert_eq!(r.dir, Path::new("./rules"));
    }

    #[test]
    fn a_zero_or_huge_deadline_is_refused_with_its_place() {
        for d in ["0s", "1m"] {
            let e = load(&format!("  dir: ./rules\n  deadline: {d}\n")).unwrap_err();
            assert!(
                e.starts_with("c.yaml:4:13: rules.deadline: must be longer"),
                "{e}"
            );
        }
        let e = load("  dir: ./rules\n  deadlin: 5ms\n").unwrap_err();
        assert!(
            e.starts_with("c.yaml:4:3: rules: unknown field `deadlin`"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod access_tests {
    use std::path::Path;

    use crate::config::{AclAccess, Config};

    fn load(broker: &str) -> Result<Config, String> {
        let text = format!("gateway: {{ id: gw }}\nbroker:\n{broker}");
        Config::from_text(Path::new("c.yaml"), &text, |_| None).map_err(|e| e.to_string())
    }

    #[test]
    fn acl_entries_parse_and_are_checked_with_their_place() {
        let c = load(
            "  acl:\n    - { user: evse, topic: \"PV/#\", access: read }\n    - { pattern: \"clients/%c/#\", access: readwrite }\n  acl_file: acl\n  password_file: passwd\n",
        )
        .unwrap();
        let b = &c.broker;
        assert_eq!(b.acl.len(), 2);
        assert_eq!(b.acl[0].access, AclAccess::Read);
        assert_eq!(b.acl_file.as_deref(), Some(Path::new("acl")));
        assert_eq!(
            c.resolve(b.password_file.as_deref().unwrap()),
            Path::new("passwd")
        );

        let e = load("  acl:\n    - { user: evse, access: read }\n").unwrap_err();
        assert!(
            e.starts_with("c.yaml:4:7: broker.acl[0]: needs exactly one"),
            "{e}"
        );
        let e =
            load("  acl:\n    - { user: evse, pattern: \"a/%u\", access: read }\n").unwrap_err();
        assert!(
            e.contains("broker.acl[0].user: a `pattern` applies to every client"),
            "{e}"
        );
        let e = load("  acl:\n    - { topic: \"a/#/b\", access: read }\n").unwrap_err();
        assert!(e.contains("broker.acl[0].topic: invalid filter"), "{e}");
        let e = load("  acl:\n    - { topic: a, access: everything }\n").unwrap_err();
        assert!(e.contains("unknown variant `everything`"), "{e}");
    }

    #[test]
    fn a_password_file_counts_as_users_beyond_loopback() {
        let open = "  listeners: [{ bind: \"0.0.0.0:1883\", protocol: mqtt }]\n";
        let e = load(open).unwrap_err();
        assert!(e.contains("or `broker.password_file`"), "{e}");
        let c = load(&format!("{open}  password_file: /etc/mosquitto/passwd\n")).unwrap();
        // Loads, but warns: anyone who logs in may do anything.
        let w = crate::config::validate::warnings(&c);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].path, "broker.listeners[0].bind");
        assert!(w[0]
            .message
            .contains("no `broker.acl` or `broker.acl_file`"));
        let c = load(&format!("{open}  password_file: p\n  acl_file: a\n")).unwrap();
        assert!(crate::config::validate::warnings(&c).is_empty());
        let c = load("  listeners: [{ bind: \"127.0.0.1:1883\", protocol: mqtt }]\n").unwrap();
        assert!(crate::config::validate::warnings(&c).is_empty());
    }

    /// Issue 13: a key given twice is reported where it repeats, not at
    /// the start of its block (serde's place).
    #[test]
    fn a_repeated_key_is_reported_where_it_repeats() {
        let text = "gateway: { id: gw }\ndevices:\n  - name: a\n    driver: simulator\n    poll: 1s\n    poll: 2s\n    points: [{ name: p, wave: sine }]\n";
        let e = Config::from_text(Path::new("c.yaml"), text, |_| None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.yaml:6:5: devices[0].poll: key given twice"),
            "{e}"
        );
    }

    #[test]
    fn mqtt5_listeners_load_with_a_deprecation_note() {
        let c = load("  listeners: [{ bind: \"127.0.0.1:1884\", protocol: mqtt5 }]\n").unwrap();
        let w = crate::config::validate::warnings(&c);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].path, "broker.listeners[0].protocol");
        assert!(w[0].message.contains("deprecated"), "{}", w[0].message);
    }

    #[test]
    fn debug_shows_no_hashes() {
        let c = load(
            "  users: [{ username: a, password_hash: \"$argon2id$v=19$m=8192,t=3,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo\" }]\n  password_file: p\n",
        );
        let text = format!("{c:?}");
        assert!(!text.contains("argon2id"), "{text}");
    }
}
