//! Checks across the whole config that serde cannot do: names unique,
//! references exist, each driver has the keys it needs. Every problem is
//! collected with the path of the value it concerns.

use std::collections::HashSet;

use super::*;

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
    devices(config, &mut p);
    mappings(config, &mut p);
    commands(config, &mut p);
    bridges(config, &mut p);
    p.0
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
        if !l.bind.ip().is_loopback() && b.users.is_empty() {
            p.add(
                path,
                format!(
                    "listener on {} is reachable beyond this machine, so `broker.users` must list \
                     at least one user (create a hash with `edgebridge passwd <user>`), \
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
    }
}
