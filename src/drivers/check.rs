//! The drivers' second pass over the config (Vector's way): serde has
//! read each device into the flat [`DeviceConfig`], with every key's place
//! known; here each driver's folder checks the keys it takes and what
//! they must be, and every problem is collected with its path. What no
//! single driver can see is checked here too: devices sharing a serial
//! port must agree on it.
//!
//! Adding a driver: a folder with a `check.rs` (its [`DriverChecks`]) and
//! one line in [`checks_for`].

use std::collections::HashMap;

use crate::config::{DeviceConfig, DriverKind, PointConfig, Problems};

use super::{modbus, serial_line, simulator};

/// What a driver says of its devices' config.
pub struct DriverChecks {
    /// Device keys it takes besides `name`, `driver` and `points`.
    pub device_keys: &'static [&'static str],
    /// Point keys it takes besides `name`, `unit` and `writable`.
    pub point_keys: &'static [&'static str],
    /// Everything else about one device.
    pub check: fn(&DeviceConfig, At, &mut Problems),
}

/// Where device number `.0` is in the file, for a problem's path.
#[derive(Debug, Clone, Copy)]
pub struct At(pub usize);

impl At {
    /// `devices[i]`.
    pub fn device(self) -> String {
        format!("devices[{}]", self.0)
    }

    /// `devices[i].key`.
    pub fn key(self, key: &str) -> String {
        format!("devices[{}].{key}", self.0)
    }

    /// `devices[i].points[j]`.
    pub fn point(self, j: usize) -> String {
        format!("devices[{}].points[{j}]", self.0)
    }

    /// `devices[i].points[j].key`.
    pub fn point_key(self, j: usize, key: &str) -> String {
        format!("devices[{}].points[{j}].{key}", self.0)
    }
}

/// The one place a driver kind is tied to its checks.
pub fn checks_for(kind: DriverKind) -> &'static DriverChecks {
    match kind {
        DriverKind::Simulator => &simulator::check::CHECKS,
        DriverKind::ModbusRtu => &modbus::check::RTU,
        DriverKind::ModbusTcp => &modbus::check::TCP,
        DriverKind::SerialLine => &serial_line::check::CHECKS,
    }
}

/// Checks every device with its driver's checks, then the serial ports
/// they share.
pub fn check_devices(devices: &[DeviceConfig], p: &mut Problems) {
    let mut ports: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, d) in devices.iter().enumerate() {
        let at = At(i);
        let checks = checks_for(d.driver);
        for key in d.driver_keys() {
            if !checks.device_keys.contains(&key) {
                p.add(
                    at.key(key),
                    format!(
                        "`{key}` applies to {} devices only, not `{}`",
                        takers(key, |c| c.device_keys),
                        d.driver.name()
                    ),
                );
            }
        }
        for (j, pt) in d.points.iter().enumerate() {
            point_keys(d.driver, pt, at, j, p);
        }
        (checks.check)(d, at, p);
        if let (true, Some(port)) = (d.driver.is_serial(), d.port.as_deref()) {
            ports.entry(port).or_default().push(i);
        }
    }
    let mut shared: Vec<(&str, Vec<usize>)> = ports.into_iter().collect();
    shared.sort_by_key(|(_, ds)| ds.first().copied());
    for (port, ds) in shared {
        serial_port_users(devices, port, &ds, p);
    }
}

fn point_keys(kind: DriverKind, pt: &PointConfig, at: At, j: usize, p: &mut Problems) {
    let checks = checks_for(kind);
    for key in pt.driver_keys() {
        if !checks.point_keys.contains(&key) {
            let takers = takers(key, |c| c.point_keys);
            p.add(
                at.point_key(j, key),
                format!(
                    "`{key}` applies to {takers} points only, not to those of `{}`",
                    kind.name()
                ),
            );
        }
    }
}

/// The drivers that take `key`, as a user would name them.
fn takers(key: &str, keys: fn(&DriverChecks) -> &'static [&'static str]) -> String {
    let mut names: Vec<&str> = DriverKind::ALL
        .into_iter()
        .filter(|k| keys(checks_for(*k)).contains(&key))
        .map(|k| k.name())
        .collect();
    // Both Modbus transports: say "Modbus".
    if names.contains(&"modbus-rtu") && names.contains(&"modbus-tcp") {
        names.retain(|n| !n.starts_with("modbus-"));
        names.push("Modbus");
    }
    names.join(" and ")
}

/// Serial settings shared by the drivers on a serial line.
pub fn check_line_settings(d: &DeviceConfig, at: At, p: &mut Problems) {
    if d.baud == Some(0) {
        p.add(at.key("baud"), "must be greater than 0, e.g. 9600");
    }
    if d.data_bits.is_some_and(|bits| !(5..=8).contains(&bits)) {
        p.add(at.key("data_bits"), "must be 5, 6, 7 or 8");
    }
    if d.stop_bits.is_some_and(|bits| !(1..=2).contains(&bits)) {
        p.add(at.key("stop_bits"), "must be 1 or 2");
    }
}

/// A key a driver cannot do without.
pub fn needs(d: &DeviceConfig, key: &str, present: bool, at: At, p: &mut Problems) {
    if !present {
        p.add(
            at.device(),
            format!("driver `{}` needs `{key}`", d.driver.name()),
        );
    }
}

/// Devices on one serial port: Modbus RTU devices may share it if they
/// agree on its settings and have distinct slave ids; a serial-line
/// device needs it alone.
fn serial_port_users(devices: &[DeviceConfig], port: &str, users: &[usize], p: &mut Problems) {
    let Some((&first, rest)) = users.split_first() else {
        return;
    };
    let d0 = &devices[first];
    let mut slaves: HashMap<u8, &str> = HashMap::new();
    if let Some(s) = d0.slave {
        slaves.insert(s, &d0.name);
    }
    for &i in rest {
        let d = &devices[i];
        let at = |k: &str| At(i).key(k);
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

#[cfg(test)]
mod tests {
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
    fn each_wrong_key_is_named_with_the_drivers_that_take_it() {
        let tcp_point = |pt: &str| {
            format!("  - {{ name: a, driver: modbus-tcp, address: \"h:502\", points: [{pt}] }}\n")
        };
        let cases = [
            (
                "  - { name: s, driver: simulator, port: /dev/ttyS0, points: [{ name: p, wave: sine }] }\n".to_string(),
                "c.yaml:3:41: devices[0].port: `port` applies to modbus-rtu and serial-line devices only, not `simulator`",
            ),
            (
                format!("  - {{ name: a, driver: modbus-tcp, address: \"h:502\", baud: 9600, {POINT} }}\n"),
                "`baud` applies to modbus-rtu and serial-line devices only, not `modbus-tcp`",
            ),
            (
                tcp_point("{ name: p, table: holding, address: 0, wave: sine }"),
                "`wave` applies to simulator points only, not to those of `modbus-tcp`",
            ),
            (
                "  - { name: s, driver: simulator, points: [{ name: p, wave: sine, table: coil }] }\n".to_string(),
                "`table` applies to Modbus points only, not to those of `simulator`",
            ),
            (
                "  - { name: gps, driver: serial-line, port: /dev/ttyS0, points: [{ name: fix, type: f32 }] }\n".to_string(),
                "`type` applies to simulator and Modbus points only",
            ),
        ];
        for (devices, needle) in cases {
            assert_one(&devices, needle);
        }
    }

    #[test]
    fn each_driver_needs_its_own_keys() {
        assert_one(
            &format!("  - {{ name: a, driver: modbus-tcp, {POINT} }}\n"),
            "driver `modbus-tcp` needs `address`",
        );
        assert_one(
            "  - { name: gps, driver: serial-line }\n",
            "driver `serial-line` needs `port`",
        );
        assert_one(
            "  - { name: s, driver: simulator, points: [{ name: p }] }\n",
            "a simulator point needs `wave`",
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
