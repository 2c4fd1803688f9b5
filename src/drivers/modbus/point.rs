//! A Modbus point as the poller uses it: the config's optional keys
//! resolved once, with its place in the device's register map.

use std::sync::Arc;

use crate::config::{PointConfig, Table};

use super::decode::Format;

/// One configured point of a Modbus device.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub name: Arc<str>,
    pub unit: Option<Arc<str>>,
    pub table: Table,
    /// 0-based address of the first register or bit.
    pub address: u16,
    pub format: Format,
    pub writable: bool,
}

impl Point {
    /// `None` when the point lacks `table` or `address`; validation
    /// rejects such configs before a driver starts.
    pub fn from_config(p: &PointConfig) -> Option<Point> {
        Some(Point {
            name: Arc::from(p.name.as_str()),
            unit: p.unit.as_deref().map(Arc::from),
            table: p.table?,
            address: p.address?,
            format: Format::from_point(p),
            writable: p.writable,
        })
    }

    /// Registers (or bits, for coils and discrete inputs) the point covers.
    pub fn span(&self) -> u16 {
        if is_bit_table(self.table) {
            1
        } else {
            self.format.registers()
        }
    }
}

/// Coils and discrete inputs hold bits; the other tables hold registers.
pub fn is_bit_table(t: Table) -> bool {
    matches!(t, Table::Coil | Table::Discrete)
}

/// The config spelling of a table.
pub fn table_name(t: Table) -> &'static str {
    match t {
        Table::Coil => "coil",
        Table::Discrete => "discrete",
        Table::Input => "input",
        Table::Holding => "holding",
    }
}
