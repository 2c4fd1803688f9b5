//! Checks across the whole config that serde cannot do: names unique,
//! references exist, each driver has the keys it needs. Every problem is
//! collected with the path of the value it concerns.

use std::collections::HashSet;
use std::time::Duration;

use super::*;

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
        if !(url.starts_with("mqtt://") || url.starts_with("tcp://")) {
            p.add(
                "broker.external",
                "must be a URL like mqtt://127.0.0.1:1883",
            );
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
        if let Err(e) = check_template(&m.topic, &["device", "point", "gateway"]) {
            p.add(at("topic"), e);
        } else if m.topic.contains(['+', '#']) {
            p.add(at("topic"), "a topic to publish cannot contain `+` or `#`");
        }
        if let PayloadFormat::Template(t) = &m.payload {
            if let Err(e) =
                check_template(t, &["value", "unit", "ts", "device", "point", "gateway"])
            {
                p.add(at("payload"), e);
            }
        }
    }
}

/// A template's `{name}` placeholders must be among `allowed`.
pub fn check_template(t: &str, allowed: &[&str]) -> Result<(), String> {
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            return Err(format!("unclosed `{{` in `{t}`"));
        };
        let name = &rest[open + 1..open + close];
        if !allowed.contains(&name) {
            return Err(format!(
                "unknown placeholder `{{{name}}}`; use {}",
                allowed
                    .iter()
                    .map(|a| format!("{{{a}}}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
        rest = &rest[open + close + 1..];
    }
    Ok(())
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
            match &b.url {
                None => p.add(
                    format!("bridges[{i}]"),
                    "a bridge needs `url` (or `onenet:`)",
                ),
                Some(u) if !(u.starts_with("mqtt://") || u.starts_with("mqtts://")) => {
                    p.add(at("url"), "must start with mqtt:// or mqtts://")
                }
                Some(_) => {}
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
            onenet(i, b, o, p);
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

/// What OneNET enforces, checked before we ever connect: it disconnects
/// (or bans) devices that break these rules.
fn onenet(i: usize, b: &BridgeConfig, o: &OneNetConfig, p: &mut Problems) {
    let at = |k: &str| format!("bridges[{i}].{k}");
    let oat = |k: &str| format!("bridges[{i}].onenet.{k}");
    let id_chars = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    if !id_chars(&o.product_id) {
        p.add(
            oat("product_id"),
            "must be the product id from the OneNET console (letters, digits, `_`, `-`, `.`)",
        );
    }
    if !id_chars(&o.device_name) {
        p.add(
            oat("device_name"),
            "must be the device name from the OneNET console (letters, digits, `_`, `-`, `.`)",
        );
    }
    if let Err(e) = crate::bridge::onenet::AccessKey::from_base64(&o.access_key) {
        p.add(oat("access_key"), e.to_string());
    }
    if o.token_ttl < std::time::Duration::from_secs(600) {
        p.add(
            oat("token_ttl"),
            "must be at least 10m (the bridge reconnects with a fresh token before it expires)",
        );
    }
    if o.batch_window.is_zero() || o.batch_window > std::time::Duration::from_secs(3600) {
        p.add(oat("batch_window"), "must be between 1ms and 1h");
    }
    if o.min_interval < std::time::Duration::from_millis(100)
        || o.min_interval > std::time::Duration::from_secs(3600)
    {
        p.add(
            oat("min_interval"),
            "must be between 100ms and 1h (OneNET accepts about one message per second)",
        );
    }
    if o.reply_timeout.is_zero() || o.reply_timeout > std::time::Duration::from_secs(60) {
        p.add(
            oat("reply_timeout"),
            "must be between 1ms and 60s (OneNET's API call waits for the reply)",
        );
    }
    if o.qos.0 == crate::model::Qos::ExactlyOnce {
        p.add(
            oat("qos"),
            "OneNET does not support QoS 2 (it disconnects the device); use 0 or 1",
        );
    }
    if let Some(ka) = b.keep_alive {
        if !(10..=1800).contains(&ka.as_secs()) || ka.subsec_nanos() != 0 {
            p.add(
                at("keep_alive"),
                "OneNET accepts a keep-alive of 10s to 1800s (whole seconds)",
            );
        }
    }
    if b.clean_session == Some(false) {
        p.add(
            at("clean_session"),
            "OneNET requires a clean session; remove `clean_session`",
        );
    }
    if b.will.is_some() {
        p.add(
            at("will"),
            "OneNET does not accept a will (it refuses the connection); remove `will`",
        );
    }
    if b.protocol == MqttProtocol::Mqtt5 {
        p.add(
            at("protocol"),
            "OneNET speaks MQTT 3.1.1 only; remove `protocol`",
        );
    }
    if b.queue.drain_rate.is_some() {
        p.add(
            at("queue.drain_rate"),
            "a OneNET bridge paces itself with `onenet.min_interval`; remove `drain_rate`",
        );
    }
    if b.queue.write_behind.is_some() {
        p.add(
            at("queue.write_behind"),
            "a OneNET bridge writes every post before sending it; remove `write_behind`",
        );
    }
    if let Some(u) = &b.url {
        if !(u.starts_with("mqtt://") || u.starts_with("mqtts://")) {
            p.add(at("url"), "must start with mqtt:// or mqtts://");
        }
    }
    for (key, present) in [
        ("client_id", b.client_id.is_some()),
        ("username", b.username.is_some()),
        ("password", b.password.is_some()),
    ] {
        if present {
            p.add(
                at(key),
                format!(
                    "a OneNET bridge derives `{key}` from `onenet:` (device name, product id, \
                     token); remove it"
                ),
            );
        }
    }
    if !b.forward.is_empty() {
        p.add(
            at("forward"),
            "a OneNET bridge publishes only under $sys/{pid}/{dev}/; map local topics with \
             `properties:` instead",
        );
    }
    if !b.subscribe.is_empty() {
        p.add(
            at("subscribe"),
            "a OneNET bridge receives property sets on onenet/<bridge>/set/<property> \
             (commands on onenet/<bridge>/cmd); remove `subscribe`",
        );
    }
    if let Some(tls) = &b.tls {
        if tls.cert.is_some() != tls.key.is_some() {
            p.add(at("tls"), "`cert` and `key` go together");
        }
    }
    let mut props = HashSet::new();
    for (j, r) in b.properties.iter().enumerate() {
        let pat = |k: &str| format!("bridges[{i}].properties[{j}].{k}");
        if r.topics.is_empty() {
            p.add(pat("topics"), "must be a local topic filter");
        }
        if !is_valid_name(&r.property) {
            p.add(
                pat("property"),
                "must be the identifier from the product's thing model (letters, digits, `_`, `-`)",
            );
        }
        if !props.insert((r.topics.as_str(), r.property.as_str())) {
            p.add(pat("property"), "duplicate topic and property pair");
        }
    }
    if !o.sub_devices.is_empty() && o.mode == OneNetMode::Datastream {
        p.add(
            oat("sub_devices"),
            "sub-devices need a thing-model (OneJSON) gateway product, not `mode: datastream`",
        );
    }
    // OneNET's limit per gateway.
    if o.sub_devices.len() > 1500 {
        p.add(
            oat("sub_devices"),
            "a OneNET gateway has at most 1500 sub-devices",
        );
    }
    let mut subs = HashSet::new();
    for (j, sd) in o.sub_devices.iter().enumerate() {
        let sat = |k: &str| format!("bridges[{i}].onenet.sub_devices[{j}].{k}");
        if !id_chars(&sd.product_id) {
            p.add(sat("product_id"), "must be the sub-device's product id");
        }
        if !id_chars(&sd.device_name) {
            p.add(sat("device_name"), "must be the sub-device's name");
        }
        if !subs.insert((sd.product_id.as_str(), sd.device_name.as_str())) {
            p.add(sat("device_name"), "this sub-device is listed twice");
        }
        if sd.product_id == o.product_id && sd.device_name == o.device_name {
            p.add(
                sat("device_name"),
                "the gateway cannot be its own sub-device",
            );
        }
        if let Err(e) = crate::bridge::onenet::AccessKey::from_base64(&sd.access_key) {
            p.add(sat("access_key"), e.to_string());
        }
        for (k, r) in sd.properties.iter().enumerate() {
            if r.topics.is_empty() {
                p.add(
                    sat(&format!("properties[{k}].topics")),
                    "must be a local topic filter",
                );
            }
            if !is_valid_name(&r.property) {
                p.add(
                    sat(&format!("properties[{k}].property")),
                    "must be the identifier from the sub-device's thing model",
                );
            }
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
mod onenet_tests {
    use std::path::Path;

    use crate::config::Config;

    const KEY: &str = "KuF3NT/jUBJ62LNBB/A8XZA9CqS3Cu79B/ABmfA1UCw=";

    fn load(bridge: &str) -> Result<Config, String> {
        let text = format!("gateway: {{ id: gw }}\nbridges:\n{bridge}");
        Config::from_text(Path::new("c.yaml"), &text, |_| None).map_err(|e| e.to_string())
    }

    fn onenet(extra_onenet: &str, extra_bridge: &str) -> String {
        format!(
            "  - name: cloud\n    onenet:\n      product_id: abc123\n      device_name: gw-001\n      \
             access_key: \"{KEY}\"\n{extra_onenet}{extra_bridge}    properties:\n      \
             - {{ topics: PV/data, property: power }}\n"
        )
    }

    #[test]
    fn onenet_defaults() {
        let c = load(&onenet("", "")).unwrap();
        let o = c.bridges[0].onenet.as_ref().unwrap();
        assert_eq!(o.token_ttl, std::time::Duration::from_secs(30 * 86400));
        assert_eq!(o.batch_window, std::time::Duration::from_secs(1));
        assert_eq!(o.min_interval, std::time::Duration::from_secs(1));
        assert_eq!(o.qos.0, crate::model::Qos::AtLeastOnce);
        assert_eq!(o.mode, crate::config::OneNetMode::Thing);
        assert_eq!(o.method, crate::config::SignMethod::Sha256);
        assert!(o.history_replay);
        assert!(!format!("{c:?}").contains(KEY), "access key in Debug");
    }

    #[test]
    fn onenet_options_parse() {
        let c = load(&onenet(
            "      mode: datastream\n      token_ttl: 1h\n      batch_window: 5s\n      \
             method: md5\n      qos: 0\n",
            "    keep_alive: 10s\n    url: mqtt://127.0.0.1:1883\n",
        ))
        .unwrap();
        let o = c.bridges[0].onenet.as_ref().unwrap();
        assert_eq!(o.mode, crate::config::OneNetMode::Datastream);
        assert_eq!(o.token_ttl, std::time::Duration::from_secs(3600));
        assert_eq!(o.batch_window, std::time::Duration::from_secs(5));
    }

    #[test]
    fn onenet_sub_devices_are_checked() {
        let sub = |name: &str, key: &str| {
            format!(
                "      sub_devices:\n        - {{ product_id: sub1, device_name: {name}, \
                 access_key: \"{key}\", properties: [ {{ topics: a/b, property: p }} ] }}\n"
            )
        };
        let c = load(&onenet(&sub("meter-1", KEY), "")).unwrap();
        let o = c.bridges[0].onenet.as_ref().unwrap();
        assert_eq!(o.sub_devices[0].device_name, "meter-1");
        assert!(!format!("{c:?}").contains(KEY));
        let e = load(&onenet(&sub("meter/1", "bad!"), "")).unwrap_err();
        assert!(e.contains("sub_devices[0].device_name"), "{e}");
        assert!(e.contains("sub_devices[0].access_key"), "{e}");
        let e = load(&onenet(
            &format!("      mode: datastream\n{}", sub("m", KEY)),
            "",
        ))
        .unwrap_err();
        assert!(e.contains("sub-devices need a thing-model"), "{e}");
    }

    #[test]
    fn onenet_qos_2_is_a_clear_error() {
        let e = load(&onenet("      qos: 2\n", "")).unwrap_err();
        assert!(e.contains("c.yaml:8:12:"), "{e}");
        assert!(
            e.contains("bridges[0].onenet.qos: OneNET does not support QoS 2"),
            "{e}"
        );
    }

    #[test]
    fn onenet_keep_alive_range() {
        for bad in ["5s", "1801s", "1h"] {
            let e = load(&onenet("", &format!("    keep_alive: {bad}\n"))).unwrap_err();
            assert!(e.contains("keep-alive of 10s to 1800s"), "{bad}: {e}");
        }
        for good in ["10s", "30m"] {
            load(&onenet("", &format!("    keep_alive: {good}\n"))).unwrap();
        }
    }

    #[test]
    fn onenet_rejects_what_onenet_rejects() {
        let cases = [
            ("", "    clean_session: false\n", "requires a clean session"),
            ("", "    password: x\n", "derives `password`"),
            (
                "",
                "    forward: [ { topics: \"#\" } ]\n",
                "publishes only under $sys",
            ),
            (
                "",
                "    subscribe: [ { topics: \"#\" } ]\n",
                "remove `subscribe`",
            ),
            (
                "      token_ttl: 1m\n",
                "",
                "token_ttl: must be at least 10m",
            ),
            (
                "      batch_window: 0s\n",
                "",
                "batch_window: must be between",
            ),
            (
                "      min_interval: 0s\n",
                "",
                "min_interval: must be between",
            ),
            ("", "    will: { topic: x }\n", "does not accept a will"),
            ("", "    protocol: mqtt5\n", "MQTT 3.1.1 only"),
            ("", "    queue: { drain_rate: 5 }\n", "remove `drain_rate`"),
            (
                "",
                "    queue: { write_behind: 20ms }\n",
                "remove `write_behind`",
            ),
        ];
        for (o, b, want) in cases {
            let e = load(&onenet(o, b)).unwrap_err();
            assert!(e.contains(want), "want `{want}` in: {e}");
        }
        let e = load(&onenet("", "").replace(KEY, "not base64!")).unwrap_err();
        assert!(
            e.contains("access_key: the OneNET access key is not valid base64"),
            "{e}"
        );
        assert!(!e.contains("not base64!"), "key leaked: {e}");
        let e = load(&onenet("", "").replace("gw-001", "gw/001")).unwrap_err();
        assert!(e.contains("onenet.device_name"), "{e}");
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
