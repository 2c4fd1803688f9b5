//! What a serial-line device's config must be.

use crate::config::{DeviceConfig, Problems};
use crate::drivers::check::{check_line_settings, needs, At, DriverChecks};

pub const CHECKS: DriverChecks = DriverChecks {
    // `poll` only so that its check below can say why it does not apply.
    device_keys: &[
        "poll",
        "port",
        "baud",
        "parity",
        "data_bits",
        "stop_bits",
        "delimiter",
        "max_line_length",
    ],
    // Its points are only named: rules make readings of its lines.
    point_keys: &[],
    check,
};

fn check(d: &DeviceConfig, at: At, p: &mut Problems) {
    needs(d, "port", d.port.is_some(), at, p);
    check_line_settings(d, at, p);
    if d.poll.is_some() {
        p.add(
            at.key("poll"),
            "a serial-line device is not polled: it reports each line as it arrives",
        );
    }
    if d.delimiter.as_deref() == Some("") {
        p.add(
            at.key("delimiter"),
            "must not be empty; the default is \"\\n\"",
        );
    }
    if d.max_line_length == Some(0) {
        p.add(at.key("max_line_length"), "must be at least 1");
    }
}
