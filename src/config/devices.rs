//! Device and point settings. One flat struct per device holds the keys of
//! every driver, so that serde reports each wrong key with its exact place;
//! then each driver's folder checks the keys it takes and their values
//! (`drivers::check`).

use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DriverKind {
    Simulator,
    ModbusRtu,
    ModbusTcp,
    SerialLine,
}

impl DriverKind {
    /// Every driver, for messages that list them.
    pub const ALL: [DriverKind; 4] = [
        DriverKind::Simulator,
        DriverKind::ModbusRtu,
        DriverKind::ModbusTcp,
        DriverKind::SerialLine,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DriverKind::Simulator => "simulator",
            DriverKind::ModbusRtu => "modbus-rtu",
            DriverKind::ModbusTcp => "modbus-tcp",
            DriverKind::SerialLine => "serial-line",
        }
    }

    pub fn is_modbus(self) -> bool {
        matches!(self, DriverKind::ModbusRtu | DriverKind::ModbusTcp)
    }

    pub fn is_serial(self) -> bool {
        matches!(self, DriverKind::ModbusRtu | DriverKind::SerialLine)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    #[default]
    None,
    Even,
    Odd,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// `{device}` in topics; letters, digits, `_` and `-`.
    pub name: String,
    pub driver: DriverKind,
    /// Time between polls.
    #[serde(default, with = "humantime_serde")]
    pub poll: Option<Duration>,
    /// How long to wait for one answer (Modbus).
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Serial port path (modbus-rtu, serial-line). Devices may share one.
    #[serde(default)]
    pub port: Option<String>,
    #[serde(default)]
    pub baud: Option<u32>,
    #[serde(default)]
    pub parity: Option<Parity>,
    #[serde(default)]
    pub data_bits: Option<u8>,
    #[serde(default)]
    pub stop_bits: Option<u8>,
    /// Modbus slave / unit id.
    #[serde(default)]
    pub slave: Option<u8>,
    /// `host:port` of a Modbus TCP device.
    #[serde(default)]
    pub address: Option<String>,
    /// Largest gap (registers) merged into one read.
    #[serde(default)]
    pub max_gap: Option<u16>,
    /// Most registers in one read (default 125).
    #[serde(default)]
    pub max_registers: Option<u16>,
    /// Most coils/discrete inputs in one read (default 2000).
    #[serde(default)]
    pub max_bits: Option<u16>,
    /// Silence between frames on a shared serial bus.
    #[serde(default, with = "humantime_serde")]
    pub inter_frame_delay: Option<Duration>,
    /// Consecutive failed polls before the device is marked offline.
    #[serde(default)]
    pub offline_after: Option<u32>,
    /// Modbus: write with FC 15/16 even for one coil or register, for
    /// devices that do not implement FC 05/06.
    #[serde(default)]
    pub multiple_writes: Option<bool>,
    /// serial-line: line delimiter (default "\n").
    #[serde(default)]
    pub delimiter: Option<String>,
    /// serial-line: longer lines are dropped and counted.
    #[serde(default)]
    pub max_line_length: Option<usize>,
    #[serde(default)]
    pub points: Vec<PointConfig>,
}

impl DeviceConfig {
    /// The keys set on this device besides `name`, `driver` and `points`
    /// (each driver says which it takes).
    pub fn driver_keys(&self) -> impl Iterator<Item = &'static str> {
        [
            ("poll", self.poll.is_some()),
            ("timeout", self.timeout.is_some()),
            ("port", self.port.is_some()),
            ("baud", self.baud.is_some()),
            ("parity", self.parity.is_some()),
            ("data_bits", self.data_bits.is_some()),
            ("stop_bits", self.stop_bits.is_some()),
            ("slave", self.slave.is_some()),
            ("address", self.address.is_some()),
            ("max_gap", self.max_gap.is_some()),
            ("max_registers", self.max_registers.is_some()),
            ("max_bits", self.max_bits.is_some()),
            ("inter_frame_delay", self.inter_frame_delay.is_some()),
            ("offline_after", self.offline_after.is_some()),
            ("multiple_writes", self.multiple_writes.is_some()),
            ("delimiter", self.delimiter.is_some()),
            ("max_line_length", self.max_line_length.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
    }

    pub fn poll_interval(&self) -> Duration {
        self.poll.unwrap_or(Duration::from_secs(1))
    }

    pub fn point(&self, name: &str) -> Option<&PointConfig> {
        self.points.iter().find(|p| p.name == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Table {
    Coil,
    Discrete,
    Input,
    Holding,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    Bool,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
    String,
}

impl DataType {
    /// Registers a value of this type occupies (strings: see `length`).
    pub fn registers(self) -> u16 {
        match self {
            DataType::Bool | DataType::U16 | DataType::I16 | DataType::String => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::U64 | DataType::I64 | DataType::F64 => 4,
        }
    }
}

/// Byte and word order of multi-register values; letters name bytes from
/// most to least significant as they arrive on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum WordOrder {
    /// Big-endian: high word first, high byte first.
    #[default]
    ABCD,
    /// Little-endian: low word first, low byte first.
    DCBA,
    /// High word first, bytes swapped in each word.
    BADC,
    /// Low word first, high byte first in each word.
    CDAB,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Wave {
    Sine,
    Square,
    Ramp,
    Random,
    Constant,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointConfig {
    /// `{point}` in topics.
    pub name: String,
    #[serde(default)]
    pub unit: Option<String>,
    /// Commands and rules may write this point.
    #[serde(default)]
    pub writable: bool,
    // --- simulator ---
    #[serde(default)]
    pub wave: Option<Wave>,
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    pub period: Option<Duration>,
    /// The value of a `constant` wave (default `min`).
    #[serde(default)]
    pub value: Option<f64>,
    // --- modbus ---
    #[serde(default)]
    pub table: Option<Table>,
    /// 0-based register or coil address.
    #[serde(default)]
    pub address: Option<u16>,
    #[serde(default, rename = "type")]
    pub data_type: Option<DataType>,
    #[serde(default)]
    pub order: Option<WordOrder>,
    /// value = raw * scale + offset.
    #[serde(default)]
    pub scale: Option<f64>,
    #[serde(default)]
    pub offset: Option<f64>,
    /// A single bit (0-15) of a register, read as bool.
    #[serde(default)]
    pub bit: Option<u8>,
    /// Length of a string, in registers.
    #[serde(default)]
    pub length: Option<u16>,
}

impl PointConfig {
    /// The keys set on this point besides `name`, `unit` and `writable`
    /// (each driver says which it takes).
    pub fn driver_keys(&self) -> impl Iterator<Item = &'static str> {
        [
            ("wave", self.wave.is_some()),
            ("min", self.min.is_some()),
            ("max", self.max.is_some()),
            ("period", self.period.is_some()),
            ("value", self.value.is_some()),
            ("table", self.table.is_some()),
            ("address", self.address.is_some()),
            ("type", self.data_type.is_some()),
            ("order", self.order.is_some()),
            ("scale", self.scale.is_some()),
            ("offset", self.offset.is_some()),
            ("bit", self.bit.is_some()),
            ("length", self.length.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
    }

    /// The point's type, with the table's default.
    pub fn data_type(&self) -> DataType {
        self.data_type.unwrap_or(match self.table {
            Some(Table::Coil) | Some(Table::Discrete) => DataType::Bool,
            _ if self.bit.is_some() => DataType::Bool,
            _ => DataType::U16,
        })
    }
}

/// Default serial speed.
pub const DEFAULT_BAUD: u32 = 9600;
/// Default consecutive failed polls before a device is marked offline.
pub const DEFAULT_OFFLINE_AFTER: u32 = 3;

/// Speed and framing of a serial line; devices sharing a port must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineSettings {
    pub baud: u32,
    pub parity: Parity,
    pub data_bits: u8,
    pub stop_bits: u8,
}

impl LineSettings {
    /// Time on the wire for `bytes` characters (start, data, parity, stop
    /// bits each).
    pub fn transmit_time(&self, bytes: u32) -> Duration {
        let parity = u64::from(self.parity != Parity::None);
        let bits_per_char = 1 + u64::from(self.data_bits) + parity + u64::from(self.stop_bits);
        let micros = u64::from(bytes) * bits_per_char * 1_000_000 / u64::from(self.baud.max(1));
        Duration::from_micros(micros)
    }
}

impl std::fmt::Display for LineSettings {
    /// `9600 8N1`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = match self.parity {
            Parity::None => 'N',
            Parity::Even => 'E',
            Parity::Odd => 'O',
        };
        write!(f, "{} {}{}{}", self.baud, self.data_bits, p, self.stop_bits)
    }
}

impl DeviceConfig {
    /// The serial settings with their defaults (9600 8N1).
    pub fn line_settings(&self) -> LineSettings {
        LineSettings {
            baud: self.baud.unwrap_or(DEFAULT_BAUD),
            parity: self.parity.unwrap_or_default(),
            data_bits: self.data_bits.unwrap_or(8),
            stop_bits: self.stop_bits.unwrap_or(1),
        }
    }

    /// How long to wait for one Modbus answer. Default: 1 s on TCP; on a
    /// serial line 200 ms plus the time of a longest frame (256 bytes) at
    /// the configured speed, so slow lines get a fitting timeout.
    pub fn request_timeout(&self) -> Duration {
        if let Some(t) = self.timeout {
            return t;
        }
        match self.driver {
            DriverKind::ModbusRtu => {
                Duration::from_millis(200) + self.line_settings().transmit_time(256)
            }
            _ => Duration::from_secs(1),
        }
    }

    /// Silence kept between two frames on a serial bus. Default: the
    /// Modbus t3.5 (3.5 characters, at least 1.75 ms).
    pub fn frame_gap(&self) -> Duration {
        self.inter_frame_delay.unwrap_or_else(|| {
            let t = self.line_settings().transmit_time(7) / 2;
            t.max(Duration::from_micros(1750))
        })
    }

    /// Consecutive failed polls before the device is marked offline.
    pub fn offline_threshold(&self) -> u32 {
        self.offline_after.unwrap_or(DEFAULT_OFFLINE_AFTER).max(1)
    }
}
