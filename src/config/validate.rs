//! Checks across the whole config that serde cannot do: names unique,
//! references exist, each driver has the keys it needs. Every problem is
//! collected with the path of the value it concerns.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::*;
use crate::pipeline::mapping::{Field, Template};

/// One validation problem; `path` is like `devices[1].points[0].name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
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
    driver_settings(config, &mut p);
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
        let kind = d.driver;
        let needs = |p: &mut Problems, key: &str, present: bool| {
            if !present {
                p.add(
                    format!("devices[{i}]"),
                    format!("driver `{}` needs `{key}`", kind.name()),
                );
            }
        };
        let forbids = |p: &mut Problems, key: &str, present: bool| {
            if present {
                p.add(
                    at(key),
                    format!("`{key}` does not apply to driver `{}`", kind.name()),
                );
            }
        };
        let serial_keys = d.baud.is_some()
            || d.parity.is_some()
            || d.data_bits.is_some()
            || d.stop_bits.is_some();
        match kind {
            DriverKind::Simulator => {
                forbids(p, "port", d.port.is_some());
                forbids(p, "address", d.address.is_some());
                forbids(p, "slave", d.slave.is_some());
            }
            DriverKind::ModbusRtu => {
                needs(p, "port", d.port.is_some());
                forbids(p, "address", d.address.is_some());
            }
            DriverKind::ModbusTcp => {
                needs(p, "address", d.address.is_some());
                forbids(p, "port", d.port.is_some());
                forbids(p, "baud", serial_keys);
            }
            DriverKind::SerialLine => {
                needs(p, "port", d.port.is_some());
                forbids(p, "address", d.address.is_some());
                forbids(p, "slave", d.slave.is_some());
            }
        }
        if let Some(bits) = d.data_bits {
            if !(5..=8).contains(&bits) {
                p.add(at("data_bits"), "must be 5, 6, 7 or 8");
            }
        }
        if let Some(bits) = d.stop_bits {
            if !(1..=2).contains(&bits) {
                p.add(at("stop_bits"), "must be 1 or 2");
            }
        }
        if let Some(addr) = &d.address {
            if addr
                .rsplit_once(':')
                .and_then(|(_, port)| port.parse::<u16>().ok())
                .is_none()
            {
                p.add(at("address"), "must be host:port, e.g. 192.168.1.50:502");
            }
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
            point(kind, pt, &pat, &format!("devices[{i}].points[{j}]"), p);
        }
    }
}

fn point(
    kind: DriverKind,
    pt: &PointConfig,
    at: &dyn Fn(&str) -> String,
    here: &str,
    p: &mut Problems,
) {
    let sim_keys = pt.wave.is_some()
        || pt.min.is_some()
        || pt.max.is_some()
        || pt.period.is_some()
        || pt.value.is_some();
    let modbus_keys = pt.table.is_some()
        || pt.address.is_some()
        || pt.order.is_some()
        || pt.bit.is_some()
        || pt.length.is_some();
    match kind {
        DriverKind::Simulator => {
            if pt.wave.is_none() {
                p.add(here, "a simulator point needs `wave`");
            }
            if modbus_keys {
                p.add(
                    here,
                    "Modbus keys (table, address, type…) do not apply to simulator points",
                );
            }
            if let (Some(min), Some(max)) = (pt.min, pt.max) {
                if min > max {
                    p.add(at("min"), "`min` is greater than `max`");
                }
            }
            if pt.period.is_some_and(|d| d.is_zero()) {
                p.add(at("period"), "must be longer than 0s");
            }
            if pt.data_type == Some(DataType::String) {
                p.add(at("type"), "simulator points are numbers or `bool`");
            }
        }
        DriverKind::ModbusRtu | DriverKind::ModbusTcp => {
            if sim_keys {
                p.add(
                    here,
                    "simulator keys (wave, min, max…) do not apply to Modbus points",
                );
            }
            let Some(table) = pt.table else {
                p.add(
                    here,
                    "a Modbus point needs `table` (coil, discrete, input or holding)",
                );
                return;
            };
            if pt.address.is_none() {
                p.add(here, "a Modbus point needs `address`");
            }
            let ty = pt.data_type();
            let bit_table = matches!(table, Table::Coil | Table::Discrete);
            if bit_table && ty != DataType::Bool {
                p.add(at("type"), "coils and discrete inputs are `bool`");
            }
            if !bit_table && ty == DataType::Bool && pt.bit.is_none() {
                p.add(at("type"), "a `bool` from a register needs `bit` (0-15)");
            }
            if let Some(bit) = pt.bit {
                if bit > 15 || bit_table {
                    p.add(
                        at("bit"),
                        "`bit` selects 0-15 of an input or holding register",
                    );
                }
            }
            if ty == DataType::String && pt.length.unwrap_or(0) == 0 {
                p.add(here, "a `string` point needs `length` (in registers)");
            }
            if pt.writable && matches!(table, Table::Discrete | Table::Input) {
                p.add(
                    at("writable"),
                    "only coils and holding registers can be written",
                );
            }
        }
        DriverKind::SerialLine => {
            if sim_keys || modbus_keys || pt.data_type.is_some() {
                p.add(
                    here,
                    "serial-line points take only `name`, `unit` and `writable`",
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

/// Driver keys: serial ports shared consistently, Modbus limits, point
/// layouts that fit the protocol, serial-line framing.
fn driver_settings(config: &Config, p: &mut Problems) {
    // Devices on one serial port, by port, in file order.
    let mut ports: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, d) in config.devices.iter().enumerate() {
        let at = |k: &str| format!("devices[{i}].{k}");
        let kind = d.driver;
        if let (true, Some(port)) = (kind.is_serial(), d.port.as_deref()) {
            ports.entry(port).or_default().push(i);
        }
        let only = |p: &mut Problems, key: &str, present: bool, ok: bool, which: &str| {
            if present && !ok {
                p.add(
                    at(key),
                    format!(
                        "`{key}` applies to {which} devices only, not `{}`",
                        kind.name()
                    ),
                );
            }
        };
        only(
            p,
            "max_gap",
            d.max_gap.is_some(),
            kind.is_modbus(),
            "Modbus",
        );
        only(
            p,
            "max_registers",
            d.max_registers.is_some(),
            kind.is_modbus(),
            "Modbus",
        );
        only(
            p,
            "max_bits",
            d.max_bits.is_some(),
            kind.is_modbus(),
            "Modbus",
        );
        only(
            p,
            "timeout",
            d.timeout.is_some(),
            kind.is_modbus(),
            "Modbus",
        );
        only(
            p,
            "inter_frame_delay",
            d.inter_frame_delay.is_some(),
            kind == DriverKind::ModbusRtu,
            "modbus-rtu",
        );
        only(
            p,
            "offline_after",
            d.offline_after.is_some(),
            kind.is_modbus(),
            "Modbus",
        );
        only(
            p,
            "multiple_writes",
            d.multiple_writes.is_some(),
            kind.is_modbus(),
            "Modbus",
        );
        only(
            p,
            "delimiter",
            d.delimiter.is_some(),
            kind == DriverKind::SerialLine,
            "serial-line",
        );
        only(
            p,
            "max_line_length",
            d.max_line_length.is_some(),
            kind == DriverKind::SerialLine,
            "serial-line",
        );
        if kind == DriverKind::SerialLine && d.poll.is_some() {
            p.add(
                at("poll"),
                "a serial-line device is not polled: it reports each line as it arrives",
            );
        }
        if d.baud == Some(0) {
            p.add(at("baud"), "must be greater than 0, e.g. 9600");
        }
        if d.timeout.is_some_and(|t| t.is_zero()) {
            p.add(at("timeout"), "must be longer than 0s");
        }
        if d.offline_after == Some(0) {
            p.add(at("offline_after"), "must be at least 1");
        }
        if d.max_registers.is_some_and(|n| !(1..=125).contains(&n)) {
            p.add(at("max_registers"), "must be 1 to 125 (the Modbus limit)");
        }
        if d.max_bits.is_some_and(|n| !(1..=2000).contains(&n)) {
            p.add(at("max_bits"), "must be 1 to 2000 (the Modbus limit)");
        }
        if d.delimiter.as_deref() == Some("") {
            p.add(at("delimiter"), "must not be empty; the default is \"\\n\"");
        }
        if d.max_line_length == Some(0) {
            p.add(at("max_line_length"), "must be at least 1");
        }
        match (kind, d.slave) {
            (DriverKind::ModbusRtu, None) => p.add(
                format!("devices[{i}]"),
                "driver `modbus-rtu` needs `slave` (the device's address on the bus, 1-247)",
            ),
            (DriverKind::ModbusRtu, Some(s)) if !(1..=247).contains(&s) => p.add(
                at("slave"),
                "must be 1-247 on a serial bus (0 is broadcast, which devices never answer)",
            ),
            _ => {}
        }
        if kind.is_modbus() {
            if d.points.is_empty() {
                p.add(format!("devices[{i}]"), "a Modbus device needs `points`");
            }
            let max_regs = d.max_registers.unwrap_or(125).clamp(1, 125);
            for (j, pt) in d.points.iter().enumerate() {
                modbus_point_layout(
                    pt,
                    max_regs,
                    &|k| format!("devices[{i}].points[{j}].{k}"),
                    p,
                );
            }
        }
    }
    let mut shared: Vec<(&str, Vec<usize>)> = ports.into_iter().collect();
    shared.sort_by_key(|(_, ds)| ds.first().copied());
    for (port, ds) in shared {
        serial_port_users(config, port, &ds, p);
    }
}

fn serial_port_users(config: &Config, port: &str, users: &[usize], p: &mut Problems) {
    let Some((&first, rest)) = users.split_first() else {
        return;
    };
    let d0 = &config.devices[first];
    let mut slaves: HashMap<u8, &str> = HashMap::new();
    if let Some(s) = d0.slave {
        slaves.insert(s, &d0.name);
    }
    for &i in rest {
        let d = &config.devices[i];
        let at = |k: &str| format!("devices[{i}].{k}");
        if d.driver == DriverKind::SerialLine || d0.driver == DriverKind::SerialLine {
            p.add(
                at("port"),
                format!(
                    "port {port} is already used by device `{}`; a serial-line device needs \
                     a port of its own",
                    d0.name
                ),
            );
            continue;
        }
        if d.line_settings() != d0.line_settings() {
            p.add(
                at("port"),
                format!(
                    "devices on one port share its settings: `{}` uses {port} at {}, this \
                     device at {} (baud, parity, data_bits and stop_bits must agree)",
                    d0.name,
                    d0.line_settings(),
                    d.line_settings()
                ),
            );
        }
        if let Some(s) = d.slave {
            if let Some(other) = slaves.insert(s, &d.name) {
                p.add(
                    at("slave"),
                    format!("slave {s} on {port} is already device `{other}`"),
                );
            }
        }
    }
}

/// A Modbus point must fit the address space and one request, and its
/// keys must make sense for its type.
fn modbus_point_layout(
    pt: &PointConfig,
    max_regs: u16,
    at: &dyn Fn(&str) -> String,
    p: &mut Problems,
) {
    let ty = pt.data_type();
    let bit_table = matches!(pt.table, Some(Table::Coil) | Some(Table::Discrete));
    let span = match ty {
        DataType::String => pt.length.unwrap_or(1),
        _ if bit_table => 1,
        _ => ty.registers(),
    };
    if !bit_table && span > max_regs {
        p.add(
            at("type"),
            format!(
                "this point needs {span} registers but the device reads at most {max_regs} \
                 (`max_registers`)"
            ),
        );
    }
    if let Some(a) = pt.address {
        if u32::from(a) + u32::from(span) > 65536 {
            p.add(
                at("address"),
                "the point runs past the last address (65535)",
            );
        }
    }
    if pt.length.is_some() && ty != DataType::String {
        p.add(at("length"), "`length` applies to `string` points only");
    }
    if pt.bit.is_some() && pt.data_type.is_some_and(|t| t != DataType::Bool) {
        p.add(
            at("bit"),
            "a `bit` point is a `bool`; remove `type` or use `type: bool`",
        );
    }
    if matches!(ty, DataType::Bool | DataType::String) {
        if pt.scale.is_some() {
            p.add(at("scale"), "`scale` applies to numeric points only");
        }
        if pt.offset.is_some() {
            p.add(at("offset"), "`offset` applies to numeric points only");
        }
    }
    if bit_table && pt.order.is_some() {
        p.add(at("order"), "coils and discrete inputs have no byte order");
    }
    if pt.scale.is_some_and(|s| s == 0.0 || !s.is_finite()) {
        p.add(at("scale"), "must be a non-zero number");
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
mod driver_tests {
    use std::path::Path;

    use crate::config::Config;

    fn problems(devices: &str) -> Vec<String> {
        let text = format!("gateway: {{ id: gw }}\ndevices:\n{devices}");
        match Config::from_text(Path::new("c.yaml"), &text, |_| None) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.into_iter().map(|e| e.to_string()).collect(),
        }
    }

    #[track_caller]
    fn assert_one(devices: &str, needle: &str) -> String {
        let p = problems(devices);
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(p[0].contains(needle), "{p:#?}");
        p[0].clone()
    }

    const POINT: &str = "points: [{ name: p, table: holding, address: 0 }]";

    #[test]
    fn a_shared_rs485_bus_is_fine() {
        let p = problems(&format!(
            "  - {{ name: a, driver: modbus-rtu, port: /dev/ttyUSB0, slave: 1, {POINT} }}\n\
             \x20 - {{ name: b, driver: modbus-rtu, port: /dev/ttyUSB0, slave: 2, baud: 9600, {POINT} }}\n"
        ));
        assert!(p.is_empty(), "{p:#?}");
    }

    #[test]
    fn devices_sharing_a_port_must_agree_on_its_settings() {
        let e = assert_one(
            &format!(
                "  - {{ name: a, driver: modbus-rtu, port: /dev/ttyUSB0, slave: 1, {POINT} }}\n\
                 \x20 - {{ name: b, driver: modbus-rtu, port: /dev/ttyUSB0, slave: 2, parity: even, {POINT} }}\n"
            ),
            "9600 8N1, this device at 9600 8E1",
        );
        assert!(e.starts_with("c.yaml:4:"), "{e}");
    }

    #[test]
    fn slave_ids_on_one_port_are_unique() {
        assert_one(
            &format!(
                "  - {{ name: a, driver: modbus-rtu, port: /dev/ttyUSB0, slave: 1, {POINT} }}\n\
                 \x20 - {{ name: b, driver: modbus-rtu, port: /dev/ttyUSB0, slave: 1, {POINT} }}\n"
            ),
            "slave 1 on /dev/ttyUSB0 is already device `a`",
        );
        // The same id on another port is another device.
        let p = problems(&format!(
            "  - {{ name: a, driver: modbus-rtu, port: /dev/ttyUSB0, slave: 1, {POINT} }}\n\
             \x20 - {{ name: b, driver: modbus-rtu, port: /dev/ttyUSB1, slave: 1, {POINT} }}\n"
        ));
        assert!(p.is_empty(), "{p:#?}");
    }

    #[test]
    fn serial_line_needs_its_own_port() {
        assert_one(
            &format!(
                "  - {{ name: a, driver: modbus-rtu, port: /dev/ttyS0, slave: 1, {POINT} }}\n\
                 \x20 - {{ name: gps, driver: serial-line, port: /dev/ttyS0 }}\n"
            ),
            "a serial-line device needs a port of its own",
        );
    }

    #[test]
    fn rtu_needs_a_slave_in_range() {
        assert_one(
            &format!("  - {{ name: a, driver: modbus-rtu, port: /dev/ttyS0, {POINT} }}\n"),
            "needs `slave`",
        );
        assert_one(
            &format!(
                "  - {{ name: a, driver: modbus-rtu, port: /dev/ttyS0, slave: 0, {POINT} }}\n"
            ),
            "must be 1-247",
        );
    }

    #[test]
    fn modbus_limits() {
        assert_one(
            &format!("  - {{ name: a, driver: modbus-tcp, address: \"h:502\", max_registers: 126, {POINT} }}\n"),
            "must be 1 to 125",
        );
        assert_one(
            &format!(
                "  - {{ name: a, driver: modbus-tcp, address: \"h:502\", max_bits: 0, {POINT} }}\n"
            ),
            "must be 1 to 2000",
        );
        assert_one(
            "  - { name: a, driver: modbus-tcp, address: \"h:502\", max_registers: 2,\n\
             \x20     points: [{ name: e, table: input, address: 0, type: u64 }] }\n",
            "needs 4 registers but the device reads at most 2",
        );
        assert_one(
            "  - { name: a, driver: modbus-tcp, address: \"h:502\",\n\
             \x20     points: [{ name: e, table: input, address: 65534, type: u64 }] }\n",
            "past the last address",
        );
        assert_one(
            "  - { name: a, driver: modbus-tcp, address: \"h:502\" }\n",
            "needs `points`",
        );
    }

    #[test]
    fn point_keys_fit_the_type() {
        let dev = |pt: &str| {
            format!("  - {{ name: a, driver: modbus-tcp, address: \"h:502\", points: [{pt}] }}\n")
        };
        assert_one(
            &dev("{ name: s, table: holding, address: 0, type: u16, length: 4 }"),
            "`length` applies to `string` points only",
        );
        assert_one(
            &dev("{ name: s, table: holding, address: 0, type: string, length: 4, scale: 2 }"),
            "`scale` applies to numeric points only",
        );
        assert_one(
            &dev("{ name: s, table: holding, address: 0, type: u16, bit: 3 }"),
            "a `bit` point is a `bool`",
        );
        assert_one(
            &dev("{ name: s, table: coil, address: 0, order: CDAB }"),
            "no byte order",
        );
        assert_one(
            &dev("{ name: s, table: holding, address: 0, scale: 0 }"),
            "non-zero",
        );
        assert!(problems(&dev("{ name: s, table: holding, address: 3, bit: 15 }")).is_empty());
    }

    #[test]
    fn keys_of_other_drivers_are_rejected() {
        assert_one(
            "  - { name: gps, driver: serial-line, port: /dev/ttyS0, max_gap: 3 }\n",
            "`max_gap` applies to Modbus devices only",
        );
        assert_one(
            &format!("  - {{ name: a, driver: modbus-tcp, address: \"h:502\", delimiter: \";\", {POINT} }}\n"),
            "`delimiter` applies to serial-line devices only",
        );
        assert_one(
            &format!("  - {{ name: a, driver: modbus-tcp, address: \"h:502\", inter_frame_delay: 5ms, {POINT} }}\n"),
            "modbus-rtu devices only",
        );
        assert_one(
            "  - { name: gps, driver: serial-line, port: /dev/ttyS0, delimiter: \"\" }\n",
            "must not be empty",
        );
        assert_one(
            "  - { name: gps, driver: serial-line, port: /dev/ttyS0, poll: 1s }\n",
            "not polled",
        );
    }

    #[test]
    fn defaults_follow_the_line_speed() {
        let text = format!(
            "gateway: {{ id: gw }}\ndevices:\n\
             \x20 - {{ name: a, driver: modbus-rtu, port: /dev/ttyS0, slave: 1, {POINT} }}\n\
             \x20 - {{ name: b, driver: modbus-rtu, port: /dev/ttyS1, slave: 1, baud: 115200, {POINT} }}\n"
        );
        let c = Config::from_text(Path::new("c.yaml"), &text, |_| None).unwrap();
        let (a, b) = (&c.devices[0], &c.devices[1]);
        assert_eq!(a.line_settings().to_string(), "9600 8N1");
        // 256 bytes * 10 bits at 9600 baud = 266.6 ms, + 200 ms.
        assert_eq!(a.request_timeout().as_millis(), 466);
        assert_eq!(b.request_timeout().as_millis(), 222);
        // t3.5 at 9600 is 4 ms; at 115200 the 1.75 ms floor applies.
        assert_eq!(a.frame_gap().as_micros(), 3645);
        assert_eq!(b.frame_gap().as_micros(), 1750);
        assert_eq!(a.offline_threshold(), 3);
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
