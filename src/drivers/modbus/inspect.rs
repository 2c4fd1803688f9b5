//! What `edgebridge read` shows: registers read once and decoded every
//! way, so a field engineer can see which type and byte order gives a
//! sane number before writing the config.

use std::fmt::Write as _;

use crate::config::{DataType, Table, WordOrder};
use crate::model::Value;

use super::decode::{register_bytes, type_name, Format};
use super::device::Device;
use super::plan::{Block, Merge};
use super::point::{is_bit_table, table_name, Point};
use super::session::{BlockData, RequestError, Session};

const ORDERS: [WordOrder; 4] = [
    WordOrder::ABCD,
    WordOrder::CDAB,
    WordOrder::BADC,
    WordOrder::DCBA,
];

fn order_name(o: WordOrder) -> &'static str {
    match o {
        WordOrder::ABCD => "ABCD",
        WordOrder::CDAB => "CDAB",
        WordOrder::BADC => "BADC",
        WordOrder::DCBA => "DCBA",
    }
}

/// A value short enough for a table column.
fn short(v: &Value) -> String {
    match v {
        Value::Float(x) if x.is_finite() && *x != 0.0 && (x.abs() >= 1e15 || x.abs() < 1e-6) => {
            format!("{x:e}")
        }
        other => other.to_string(),
    }
}

/// Registers starting at `start`, decoded as every type in every order.
pub fn describe_registers(start: u16, regs: &[u16]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>7}  {:<6}  {:>6}  {:>6}",
        "address", "hex", "u16", "i16"
    );
    for (i, r) in regs.iter().enumerate() {
        let _ = writeln!(
            out,
            "{:>7}  0x{:04X}  {:>6}  {:>6}",
            usize::from(start) + i,
            r,
            r,
            *r as i16
        );
    }
    let wide = [
        (2, [DataType::U32, DataType::I32, DataType::F32]),
        (4, [DataType::U64, DataType::I64, DataType::F64]),
    ];
    for (n, types) in wide {
        if regs.len() < n {
            continue;
        }
        let header = format!(
            "{:>7}  {:<4}  {:<22}  {:<22}  {:<22}  {}",
            "address", "type", "ABCD", "CDAB", "BADC", "DCBA"
        );
        let _ = writeln!(out, "\n{}-bit values, every order:\n{header}", n * 16);
        for off in 0..=regs.len() - n {
            for ty in types {
                let _ = write!(out, "{:>7}  {:<4}", usize::from(start) + off, type_name(ty));
                for o in ORDERS {
                    let v = Format::of(ty, o)
                        .decode(&regs[off..])
                        .map(|v| short(&v))
                        .unwrap_or_default();
                    let _ = write!(out, "  {v:<22}");
                }
                out.truncate(out.trim_end().len());
                out.push('\n');
            }
        }
    }
    let ascii = |low_first: bool| -> String {
        register_bytes(regs, low_first)
            .map(|b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect()
    };
    let _ = writeln!(
        out,
        "\nas text: \"{}\" (high byte first), \"{}\" (low byte first)",
        ascii(false),
        ascii(true)
    );
    out
}

/// Coils or discrete inputs starting at `start`.
pub fn describe_bits(start: u16, bits: &[bool]) -> String {
    let mut out = String::new();
    for (i, b) in bits.iter().enumerate() {
        let _ = writeln!(out, "{:>7}  {}", usize::from(start) + i, b);
    }
    out
}

/// One point read by `edgebridge read --device`.
#[derive(Debug, Clone, PartialEq)]
pub struct PointRead {
    pub point: Point,
    /// The value with the configured type and order, and the raw
    /// registers (empty for coils), or why it could not be read.
    pub result: Result<(Value, Vec<u16>), String>,
}

/// Reads every point of `device` once, with its request plan. A block that
/// gets an exception is read point by point, so one bad address shows as
/// one error.
pub async fn read_device(device: &Device, session: &mut Session) -> Vec<PointRead> {
    let mut out: Vec<Option<PointRead>> = vec![None; device.points.len()];
    for block in device.plan().blocks() {
        match session.read(device.slave, block, device.timeout).await {
            Ok(data) => fill(device, block, &data, &mut out),
            Err(RequestError::Exception(_)) if block.points.len() > 1 => {
                for &i in &block.points {
                    let Some(p) = device.points.get(i) else {
                        continue;
                    };
                    let single = Block {
                        table: p.table,
                        start: p.address,
                        count: p.span(),
                        points: vec![i],
                        merge: Merge::Solo,
                    };
                    match session.read(device.slave, &single, device.timeout).await {
                        Ok(data) => fill(device, &single, &data, &mut out),
                        Err(e) => out[i] = Some(failed(p, &e)),
                    }
                }
            }
            Err(e) => {
                for &i in &block.points {
                    if let Some(p) = device.points.get(i) {
                        out[i] = Some(failed(p, &e));
                    }
                }
            }
        }
    }
    out.into_iter().flatten().collect()
}

fn failed(p: &Point, e: &RequestError) -> PointRead {
    PointRead {
        point: p.clone(),
        result: Err(e.to_string()),
    }
}

fn fill(device: &Device, block: &Block, data: &BlockData, out: &mut [Option<PointRead>]) {
    for &i in &block.points {
        let Some(p) = device.points.get(i) else {
            continue;
        };
        let off = usize::from(p.address.saturating_sub(block.start));
        let result = match data {
            BlockData::Bits(bits) => bits
                .get(off)
                .map(|b| (Value::Bool(*b), Vec::new()))
                .ok_or_else(|| "answer too short".to_string()),
            BlockData::Words(words) => {
                let regs: Vec<u16> = words
                    .iter()
                    .skip(off)
                    .take(p.span().into())
                    .copied()
                    .collect();
                p.format
                    .decode(&regs)
                    .map(|v| (v, regs))
                    .map_err(|e| e.to_string())
            }
        };
        if let Some(slot) = out.get_mut(i) {
            *slot = Some(PointRead {
                point: p.clone(),
                result,
            });
        }
    }
}

/// The table printed by `edgebridge read --device`: one line per point,
/// with the raw registers and, for multi-register numbers, the value in
/// the other orders.
pub fn describe_points(reads: &[PointRead]) -> String {
    let width = reads.iter().map(|r| r.point.name.len()).max().unwrap_or(4);
    let mut out = String::new();
    for r in reads {
        let p = &r.point;
        let place = if is_bit_table(p.table) {
            format!("{} {}", table_name(p.table), p.address)
        } else if let Some(bit) = p.format.bit {
            format!("{} {} bit {bit}", table_name(p.table), p.address)
        } else if p.format.registers() > 1 && p.format.ty != DataType::String {
            format!(
                "{} {} {} {}",
                table_name(p.table),
                p.address,
                type_name(p.format.ty),
                order_name(p.format.order)
            )
        } else {
            format!(
                "{} {} {}",
                table_name(p.table),
                p.address,
                type_name(p.format.ty)
            )
        };
        match &r.result {
            Err(e) => {
                let _ = writeln!(out, "{:<width$}  ERROR  {place}: {e}", p.name);
            }
            Ok((value, regs)) => {
                let unit = p.unit.as_deref().unwrap_or("");
                let shown = format!("{} {unit}", short(value));
                let _ = write!(out, "{:<width$}  {:<20}  {place}", p.name, shown.trim_end());
                if !regs.is_empty() {
                    let hex: Vec<String> = regs.iter().map(|r| format!("0x{r:04X}")).collect();
                    let _ = write!(out, "  [{}]", hex.join(" "));
                }
                let numeric = !matches!(p.format.ty, DataType::String | DataType::Bool);
                if numeric && p.format.registers() > 1 && p.table != Table::Coil {
                    let others: Vec<String> = ORDERS
                        .iter()
                        .filter(|o| **o != p.format.order)
                        .map(|o| {
                            let f = Format {
                                order: *o,
                                ..p.format.clone()
                            };
                            let v = f.decode(regs).map(|v| short(&v)).unwrap_or_default();
                            format!("{}={v}", order_name(*o))
                        })
                        .collect();
                    let _ = write!(out, "  other orders: {}", others.join(" "));
                }
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_show_every_order_side_by_side() {
        let text = describe_registers(100, &[0x42F6, 0xE979]);
        assert!(text.contains("    100  0x42F6   17142   17142"), "{text}");
        assert!(text.contains("    101  0xE979   59769   -5767"), "{text}");
        let f32_line = text
            .lines()
            .find(|l| l.contains("f32"))
            .expect("an f32 line");
        // ABCD gives the sane number; the other orders are shown next to it.
        assert!(
            f32_line.starts_with("    100  f32   123.456 "),
            "{f32_line}"
        );
        assert_eq!(f32_line.split_whitespace().count(), 6, "{f32_line}");
        assert!(
            !text.contains("64-bit"),
            "two registers have no 64-bit values"
        );
        assert!(text.contains("as text: \"B..y\""), "{text}");
    }

    #[test]
    fn tiny_and_huge_floats_use_exponents() {
        assert_eq!(short(&Value::Float(1.5e-20)), "1.5e-20");
        assert_eq!(short(&Value::Float(2.5)), "2.5");
        assert_eq!(short(&Value::Float(0.0)), "0");
    }

    #[test]
    fn points_show_value_registers_and_other_orders() {
        let point = |name: &str, ty, order, table| Point {
            name: name.into(),
            unit: Some("kW".into()),
            table,
            address: 0,
            format: Format::of(ty, order),
            writable: false,
        };
        let reads = vec![
            PointRead {
                point: point("power", DataType::F32, WordOrder::CDAB, Table::Holding),
                result: Ok((Value::Float(123.456), vec![0xE979, 0x42F6])),
            },
            PointRead {
                point: point("led", DataType::Bool, WordOrder::ABCD, Table::Coil),
                result: Err("no answer within 300ms".into()),
            },
        ];
        let text = describe_points(&reads);
        let first = text.lines().next().unwrap();
        assert!(first.starts_with("power  123.456 kW"), "{first}");
        assert!(
            first.contains("holding 0 f32 CDAB  [0xE979 0x42F6]"),
            "{first}"
        );
        assert!(first.contains("other orders: ABCD="), "{first}");
        assert!(
            text.contains("led    ERROR  coil 0: no answer within 300ms"),
            "{text}"
        );
    }
}
