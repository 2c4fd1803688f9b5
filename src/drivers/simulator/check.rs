//! What a simulator device's config must be.

use crate::config::{DataType, DeviceConfig, Problems};
use crate::drivers::check::{At, DriverChecks};

pub const CHECKS: DriverChecks = DriverChecks {
    device_keys: &["poll"],
    point_keys: &["wave", "min", "max", "period", "value", "type"],
    check,
};

fn check(d: &DeviceConfig, at: At, p: &mut Problems) {
    for (j, pt) in d.points.iter().enumerate() {
        if pt.wave.is_none() {
            p.add(at.point(j), "a simulator point needs `wave`");
        }
        if let (Some(min), Some(max)) = (pt.min, pt.max) {
            if min > max {
                p.add(at.point_key(j, "min"), "`min` is greater than `max`");
            }
        }
        if pt.period.is_some_and(|d| d.is_zero()) {
            p.add(at.point_key(j, "period"), "must be longer than 0s");
        }
        if pt.data_type == Some(DataType::String) {
            p.add(
                at.point_key(j, "type"),
                "simulator points are numbers or `bool`",
            );
        }
    }
}
