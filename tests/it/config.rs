//! Config loading: the shipped file parses, and each kind of mistake names
//! its file, line and column.

use std::path::Path;

use edgebridge::config::Config;

fn errors(yaml: &str) -> String {
    let env = |k: &str| (k == "SET_VAR").then(|| "value".to_string());
    match Config::from_text(Path::new("site.yaml"), yaml, env) {
        Ok(_) => panic!("config unexpectedly valid:\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

const BASE: &str = "gateway:\n  id: gw\n";

#[test]
fn shipped_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.yaml");
    let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.gateway.id, "gw-001");
    assert!(c.devices.iter().any(|d| d.name == "demo-pv"));
    // PV/data and PV/sunshine come from rules/pv.rhai.
    assert!(c.rules.is_some_and(|r| r.dir.ends_with("rules")));
}

#[test]
fn wrong_type_names_the_place() {
    let e = errors(&format!(
        "{BASE}devices:\n  - name: pv\n    driver: modbus-tcp\n    address: \"h:502\"\n    slave: 300\n"
    ));
    assert!(
        e.starts_with("site.yaml:7:12: devices[0].slave: invalid value: integer `300`"),
        "{e}"
    );
}

#[test]
fn unknown_key_names_the_place() {
    let e = errors(&format!("{BASE}  colour: blue\n"));
    assert!(
        e.starts_with("site.yaml:3:3: gateway: unknown field `colour`"),
        "{e}"
    );
}

#[test]
fn missing_key_names_the_parent() {
    let e = errors("gateway:\n  data_dir: /tmp\n");
    assert!(
        e.starts_with("site.yaml:2:3: gateway: missing field `id`"),
        "{e}"
    );
}

#[test]
fn duplicate_device_and_dangling_mapping_are_all_reported() {
    let e = errors(&format!(
        "{BASE}devices:\n  - {{ name: pv, driver: simulator, points: [{{ name: p, wave: sine }}] }}\n  - {{ name: pv, driver: simulator }}\nmappings:\n  - {{ match: meter/energy, topic: x }}\n  - {{ match: pv/nope, topic: y }}\n"
    ));
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(lines.len(), 3, "{e}");
    assert!(
        lines[0].starts_with("site.yaml:5:13: devices[1].name: duplicate device name `pv`"),
        "{e}"
    );
    assert!(
        lines[1].starts_with("site.yaml:7:14: mappings[0].match: no device named `meter`"),
        "{e}"
    );
    assert!(
        lines[2].starts_with("site.yaml:8:14: mappings[1].match: device `pv` has no point `nope`"),
        "{e}"
    );
}

#[test]
fn unset_variable_names_the_place() {
    let e = errors(&format!(
        "{BASE}bridges:\n  - name: cloud\n    url: mqtt://h:1883\n    username: ${{SET_VAR}}\n    password: ${{NOT_SET_ANYWHERE}}\n"
    ));
    assert_eq!(
        e,
        "site.yaml:7:15: environment variable `NOT_SET_ANYWHERE` is not set"
    );
}

#[test]
fn bad_duration_names_the_place() {
    let e = errors(&format!(
        "{BASE}devices:\n  - name: pv\n    driver: simulator\n    poll: 5 parsecs\n"
    ));
    assert!(e.starts_with("site.yaml:6:11: devices[0].poll:"), "{e}");
}

#[test]
fn non_loopback_listener_needs_users() {
    let e = errors(&format!(
        "{BASE}broker:\n  listeners:\n    - {{ bind: \"0.0.0.0:1883\", protocol: mqtt }}\n"
    ));
    assert!(e.starts_with("site.yaml:5:15: broker.listeners[0].bind: listener on 0.0.0.0:1883 is reachable beyond this machine"), "{e}");
    assert!(e.contains("edgebridge passwd"), "{e}");
}

#[test]
fn commands_must_target_writable_points() {
    let e = errors(&format!(
        "{BASE}devices:\n  - {{ name: pv, driver: simulator, points: [{{ name: p, wave: sine }}] }}\ncommands:\n  - {{ topic: cmd/p, write: pv/p }}\n"
    ));
    assert!(
        e.contains("commands[0].write: point `pv/p` is not `writable: true`"),
        "{e}"
    );
}

#[test]
fn every_driver_kind_parses() {
    let yaml = format!(
        "{BASE}devices:\n  - {{ name: a, driver: modbus-rtu, port: /dev/ttyUSB0, baud: 9600, parity: even, slave: 1, points: [{{ name: p, table: holding, address: 0, type: f32, order: CDAB }}] }}\n  - {{ name: b, driver: modbus-tcp, address: \"127.0.0.1:502\", points: [{{ name: c, table: coil, address: 1, writable: true }}] }}\n  - {{ name: c, driver: serial-line, port: /dev/ttyUSB1 }}\n"
    );
    let c =
        Config::from_text(Path::new("x.yaml"), &yaml, |_| None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.devices.len(), 3);
}
