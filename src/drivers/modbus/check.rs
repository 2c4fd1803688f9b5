//! What a Modbus device's config must be: the keys each transport takes,
//! the protocol's limits, and point layouts that fit one request and the
//! address space.

use crate::config::{DataType, DeviceConfig, DriverKind, PointConfig, Problems, Table};
use crate::drivers::check::{check_line_settings, needs, At, DriverChecks};

/// Keys of both transports.
const POINT_KEYS: &[&str] = &[
    "table", "address", "type", "order", "scale", "offset", "bit", "length",
];

pub const RTU: DriverChecks = DriverChecks {
    device_keys: &[
        "poll",
        "timeout",
        "port",
        "baud",
        "parity",
        "data_bits",
        "stop_bits",
        "slave",
        "max_gap",
        "max_registers",
        "max_bits",
        "inter_frame_delay",
        "offline_after",
        "multiple_writes",
    ],
    point_keys: POINT_KEYS,
    check,
};

pub const TCP: DriverChecks = DriverChecks {
    device_keys: &[
        "poll",
        "timeout",
        "address",
        "slave",
        "max_gap",
        "max_registers",
        "max_bits",
        "offline_after",
        "multiple_writes",
    ],
    point_keys: POINT_KEYS,
    check,
};

fn check(d: &DeviceConfig, at: At, p: &mut Problems) {
    match d.driver {
        DriverKind::ModbusRtu => {
            needs(d, "port", d.port.is_some(), at, p);
            check_line_settings(d, at, p);
            match d.slave {
                None => p.add(
                    at.device(),
                    "driver `modbus-rtu` needs `slave` (the device's address on the bus, 1-247)",
                ),
                Some(s) if !(1..=247).contains(&s) => p.add(
                    at.key("slave"),
                    "must be 1-247 on a serial bus (0 is broadcast, which devices never answer)",
                ),
                _ => {}
            }
        }
        _ => {
            needs(d, "address", d.address.is_some(), at, p);
            if let Some(addr) = &d.address {
                if addr
                    .rsplit_once(':')
                    .and_then(|(_, port)| port.parse::<u16>().ok())
                    .is_none()
                {
                    p.add(
                        at.key("address"),
                        "must be host:port, e.g. 192.168.1.50:502",
                    );
                }
            }
        }
    }
    if d.timeout.is_some_and(|t| t.is_zero()) {
        p.add(at.key("timeout"), "must be longer than 0s");
    }
    if d.offline_after == Some(0) {
        p.add(at.key("offline_after"), "must be at least 1");
    }
    if d.max_registers.is_some_and(|n| !(1..=125).contains(&n)) {
        p.add(
            at.key("max_registers"),
            "must be 1 to 125 (the Modbus limit)",
        );
    }
    if d.max_bits.is_some_and(|n| !(1..=2000).contains(&n)) {
        p.add(at.key("max_bits"), "must be 1 to 2000 (the Modbus limit)");
    }
    if d.points.is_empty() {
        p.add(at.device(), "a Modbus device needs `points`");
    }
    let max_regs = d.max_registers.unwrap_or(125).clamp(1, 125);
    for (j, pt) in d.points.iter().enumerate() {
        point(pt, max_regs, at, j, p);
    }
}

/// A Modbus point must say where it is, fit the address space and one
/// request, and its keys must make sense for its type.
fn point(pt: &PointConfig, max_regs: u16, at: At, j: usize, p: &mut Problems) {
    let key = |k: &str| at.point_key(j, k);
    let Some(table) = pt.table else {
        p.add(
            at.point(j),
            "a Modbus point needs `table` (coil, discrete, input or holding)",
        );
        return;
    };
    if pt.address.is_none() {
        p.add(at.point(j), "a Modbus point needs `address`");
    }
    let ty = pt.data_type();
    let bit_table = matches!(table, Table::Coil | Table::Discrete);
    if bit_table && ty != DataType::Bool {
        p.add(key("type"), "coils and discrete inputs are `bool`");
    }
    if !bit_table && ty == DataType::Bool && pt.bit.is_none() {
        p.add(key("type"), "a `bool` from a register needs `bit` (0-15)");
    }
    if pt.bit.is_some_and(|bit| bit > 15 || bit_table) {
        p.add(
            key("bit"),
            "`bit` selects 0-15 of an input or holding register",
        );
    }
    if ty == DataType::String && pt.length.unwrap_or(0) == 0 {
        p.add(
            at.point(j),
            "a `string` point needs `length` (in registers)",
        );
    }
    if pt.writable && matches!(table, Table::Discrete | Table::Input) {
        p.add(
            key("writable"),
            "only coils and holding registers can be written",
        );
    }
    let span = match ty {
        DataType::String => pt.length.unwrap_or(1),
        _ if bit_table => 1,
        _ => ty.registers(),
    };
    if !bit_table && span > max_regs {
        p.add(
            key("type"),
            format!(
                "this point needs {span} registers but the device reads at most {max_regs} \
                 (`max_registers`)"
            ),
        );
    }
    if pt
        .address
        .is_some_and(|a| u32::from(a) + u32::from(span) > 65536)
    {
        p.add(
            key("address"),
            "the point runs past the last address (65535)",
        );
    }
    if pt.length.is_some() && ty != DataType::String {
        p.add(key("length"), "`length` applies to `string` points only");
    }
    if pt.bit.is_some() && pt.data_type.is_some_and(|t| t != DataType::Bool) {
        p.add(
            key("bit"),
            "a `bit` point is a `bool`; remove `type` or use `type: bool`",
        );
    }
    if matches!(ty, DataType::Bool | DataType::String) {
        if pt.scale.is_some() {
            p.add(key("scale"), "`scale` applies to numeric points only");
        }
        if pt.offset.is_some() {
            p.add(key("offset"), "`offset` applies to numeric points only");
        }
    }
    if bit_table && pt.order.is_some() {
        p.add(key("order"), "coils and discrete inputs have no byte order");
    }
    if pt.scale.is_some_and(|s| s == 0.0 || !s.is_finite()) {
        p.add(key("scale"), "must be a non-zero number");
    }
}
