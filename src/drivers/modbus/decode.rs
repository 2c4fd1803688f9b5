//! Registers and bits to [`Value`]s and back. This is the only place that
//! knows about byte and word order, scale and offset; the poller hands it
//! the registers of one point and gets a value.
//!
//! Orders name the bytes of the value from most to least significant as
//! they arrive on the wire (register by register, each high byte first):
//!
//! | order  | 32-bit 0xAABBCCDD arrives as | meaning                          |
//! |--------|------------------------------|----------------------------------|
//! | `ABCD` | `AABB CCDD`                  | big-endian (Modbus default)      |
//! | `CDAB` | `CCDD AABB`                  | low word first ("word swap")     |
//! | `BADC` | `BBAA DDCC`                  | bytes swapped in each register   |
//! | `DCBA` | `DDCC BBAA`                  | fully little-endian              |
//!
//! The same rule extends to 64-bit values (`CDAB` reverses the four
//! registers) and to single registers (`BADC`/`DCBA` swap the two bytes).
//! Strings are read register by register; only the byte order inside a
//! register matters for them (`BADC`/`DCBA`: low byte first).

use thiserror::Error;

use crate::config::{DataType, PointConfig, WordOrder};
use crate::model::Value;

/// Why registers could not become a value, or a value registers.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum CodecError {
    #[error("need {need} registers, got {got}")]
    Short { need: usize, got: usize },
    #[error("`{value}` is not a number")]
    NotANumber { value: String },
    #[error("`{value}` is not a boolean (use true/false, on/off or 1/0)")]
    NotABool { value: String },
    #[error("{value} is out of range for {ty}")]
    OutOfRange { value: String, ty: &'static str },
    #[error("text of {len} bytes does not fit {max} bytes ({registers} registers)")]
    TooLong {
        len: usize,
        max: usize,
        registers: u16,
    },
}

/// How one point's registers are interpreted.
#[derive(Debug, Clone, PartialEq)]
pub struct Format {
    pub ty: DataType,
    pub order: WordOrder,
    pub scale: Option<f64>,
    pub offset: Option<f64>,
    /// For a `bool` taken from one bit (0-15) of a register.
    pub bit: Option<u8>,
    /// Registers of a string.
    pub length: u16,
}

impl Format {
    pub fn from_point(p: &PointConfig) -> Format {
        Format {
            ty: p.data_type(),
            order: p.order.unwrap_or_default(),
            scale: p.scale,
            offset: p.offset,
            bit: p.bit,
            length: p.length.unwrap_or(1),
        }
    }

    /// A plain format: no scale, offset or bit.
    pub fn of(ty: DataType, order: WordOrder) -> Format {
        Format {
            ty,
            order,
            scale: None,
            offset: None,
            bit: None,
            length: 1,
        }
    }

    /// Registers the value occupies (1 for a bit of a register).
    pub fn registers(&self) -> u16 {
        match self.ty {
            DataType::String => self.length.max(1),
            _ => self.ty.registers(),
        }
    }

    /// Decodes the registers of this point (`regs` may be longer; the
    /// first [`Format::registers`] are used).
    pub fn decode(&self, regs: &[u16]) -> Result<Value, CodecError> {
        let need = self.registers() as usize;
        let regs = regs.get(..need).ok_or(CodecError::Short {
            need,
            got: regs.len(),
        })?;
        if self.ty == DataType::String {
            return Ok(Value::Text(decode_string(regs, self.order)));
        }
        if self.ty == DataType::Bool {
            let word = ordered_bytes(regs, self.order);
            let word = u16::from_be_bytes([word[0], word[1]]);
            return Ok(Value::Bool((word >> self.bit.unwrap_or(0)) & 1 == 1));
        }
        let raw = decode_raw(self.ty, &ordered_bytes(regs, self.order));
        if self.scale.is_none() && self.offset.is_none() {
            return Ok(raw);
        }
        let x = raw.as_f64().unwrap_or(f64::NAN);
        Ok(Value::Float(scaled(x, self.scale, self.offset)))
    }

    /// The value of a coil or discrete input.
    pub fn decode_bit(&self, bit: bool) -> Value {
        Value::Bool(bit)
    }

    /// Registers to write for `value` (inverse scale and offset, then the
    /// type and order). Not for `bit` points: see [`Format::encode_bit`].
    pub fn encode(&self, value: &Value) -> Result<Vec<u16>, CodecError> {
        let bytes = match self.ty {
            DataType::String => return encode_string(value, self.length, self.order),
            DataType::Bool => {
                let b = to_bool(value)?;
                return Ok(vec![u16::from(b)]);
            }
            ty => self.encode_number(ty, value)?,
        };
        Ok(from_ordered_bytes(bytes, self.order))
    }

    /// `word` with this point's bit set to `value` (read-modify-write of a
    /// `bit` point).
    pub fn encode_bit(&self, word: u16, value: &Value) -> Result<u16, CodecError> {
        let on = to_bool(value)?;
        // The bit is numbered in the register as decoded (after the order).
        let native = u16::from_be_bytes(to_arr2(&ordered_bytes(&[word], self.order)));
        let mask = 1u16 << self.bit.unwrap_or(0);
        let native = if on { native | mask } else { native & !mask };
        Ok(from_ordered_bytes(native.to_be_bytes().to_vec(), self.order)[0])
    }

    fn encode_number(&self, ty: DataType, value: &Value) -> Result<Vec<u8>, CodecError> {
        let scaled = self.scale.is_some() || self.offset.is_some();
        // Integers without scale are written exactly, not through an f64.
        if !scaled && !matches!(ty, DataType::F32 | DataType::F64) {
            if let Some(i) = exact_integer(value) {
                return int_bytes(ty, i, value);
            }
        }
        let x = to_f64(value)?;
        let raw = unscaled(x, self.scale, self.offset);
        match ty {
            DataType::F32 => Ok((raw as f32).to_be_bytes().to_vec()),
            DataType::F64 => Ok(raw.to_be_bytes().to_vec()),
            _ => {
                let r = raw.round();
                if !r.is_finite() || r < i128::MIN as f64 || r > i128::MAX as f64 {
                    return Err(out_of_range(value, ty));
                }
                int_bytes(ty, r as i128, value)
            }
        }
    }
}

/// The value of `regs` decoded as `ty` in `order`, without scale; used by
/// `edgebridge read` to show every order side by side.
pub fn decode_as(ty: DataType, order: WordOrder, regs: &[u16]) -> Result<Value, CodecError> {
    Format::of(ty, order).decode(regs)
}

/// value * scale + offset. A scale that is 1/n for a whole n (0.1, 0.01)
/// divides by n instead, so 3 * 0.1 gives 0.3 and not 0.30000000000000004.
pub fn scaled(raw: f64, scale: Option<f64>, offset: Option<f64>) -> f64 {
    let v = match scale {
        Some(s) => match reciprocal_integer(s) {
            Some(n) => raw / n,
            None => raw * s,
        },
        None => raw,
    };
    v + offset.unwrap_or(0.0)
}

/// The inverse of [`scaled`].
pub fn unscaled(value: f64, scale: Option<f64>, offset: Option<f64>) -> f64 {
    let v = value - offset.unwrap_or(0.0);
    match scale {
        Some(s) => match reciprocal_integer(s) {
            Some(n) => v * n,
            None => v / s,
        },
        None => v,
    }
}

fn reciprocal_integer(s: f64) -> Option<f64> {
    if s == 0.0 || !s.is_finite() {
        return None;
    }
    let inv = 1.0 / s;
    let n = inv.round();
    (n >= 2.0 && (inv - n).abs() <= 1e-9 * n).then_some(n)
}

/// Wire bytes of `regs` reordered to big-endian.
fn ordered_bytes(regs: &[u16], order: WordOrder) -> Vec<u8> {
    let mut bytes: Vec<u8> = regs.iter().flat_map(|r| r.to_be_bytes()).collect();
    reorder(&mut bytes, order);
    bytes
}

/// Big-endian bytes to registers in `order`; each reorder is its own
/// inverse.
fn from_ordered_bytes(mut bytes: Vec<u8>, order: WordOrder) -> Vec<u16> {
    reorder(&mut bytes, order);
    bytes
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect()
}

fn reorder(bytes: &mut [u8], order: WordOrder) {
    let swap_pairs = |b: &mut [u8]| b.chunks_exact_mut(2).for_each(|c| c.swap(0, 1));
    match order {
        WordOrder::ABCD => {}
        WordOrder::DCBA => bytes.reverse(),
        WordOrder::BADC => swap_pairs(bytes),
        WordOrder::CDAB => {
            bytes.reverse();
            swap_pairs(bytes);
        }
    }
}

fn to_arr2(b: &[u8]) -> [u8; 2] {
    [
        b.first().copied().unwrap_or(0),
        b.get(1).copied().unwrap_or(0),
    ]
}

fn decode_raw(ty: DataType, b: &[u8]) -> Value {
    let a2 = || [b[0], b[1]];
    let a4 = || [b[0], b[1], b[2], b[3]];
    let a8 = || [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]];
    match ty {
        DataType::U16 => Value::Int(u16::from_be_bytes(a2()).into()),
        DataType::I16 => Value::Int(i16::from_be_bytes(a2()).into()),
        DataType::U32 => Value::Int(u32::from_be_bytes(a4()).into()),
        DataType::I32 => Value::Int(i32::from_be_bytes(a4()).into()),
        DataType::U64 => {
            let u = u64::from_be_bytes(a8());
            i64::try_from(u).map_or(Value::UInt(u), Value::Int)
        }
        DataType::I64 => Value::Int(i64::from_be_bytes(a8())),
        DataType::F32 => Value::Float(f32_to_f64(f32::from_be_bytes(a4()))),
        DataType::F64 => Value::Float(f64::from_be_bytes(a8())),
        // Handled by the caller; kept total for safety.
        DataType::Bool => Value::Bool(b.iter().any(|x| *x != 0)),
        DataType::String => Value::Text(String::from_utf8_lossy(b).into_owned()),
    }
}

/// An f32 as the f64 with the same shortest decimal form, so a register
/// holding 21.7f32 reads as 21.7 and not 21.700000762939453.
fn f32_to_f64(x: f32) -> f64 {
    if x.is_finite() {
        x.to_string().parse().unwrap_or(f64::from(x))
    } else {
        f64::from(x)
    }
}

/// The bytes of `regs`, each register's high byte first unless
/// `low_first` (text with swapped bytes, as `BADC`/`DCBA` strings have).
pub fn register_bytes(regs: &[u16], low_first: bool) -> impl Iterator<Item = u8> + '_ {
    regs.iter().flat_map(move |r| {
        let [hi, lo] = r.to_be_bytes();
        if low_first {
            [lo, hi]
        } else {
            [hi, lo]
        }
    })
}

fn decode_string(regs: &[u16], order: WordOrder) -> String {
    let low_first = matches!(order, WordOrder::BADC | WordOrder::DCBA);
    let mut bytes: Vec<u8> = register_bytes(regs, low_first).collect();
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn encode_string(value: &Value, length: u16, order: WordOrder) -> Result<Vec<u16>, CodecError> {
    let text = value.to_string();
    let max = usize::from(length) * 2;
    if text.len() > max {
        return Err(CodecError::TooLong {
            len: text.len(),
            max,
            registers: length,
        });
    }
    let mut bytes = text.into_bytes();
    bytes.resize(max, 0);
    let low_first = matches!(order, WordOrder::BADC | WordOrder::DCBA);
    Ok(bytes
        .chunks_exact(2)
        .map(|c| {
            if low_first {
                u16::from_be_bytes([c[1], c[0]])
            } else {
                u16::from_be_bytes([c[0], c[1]])
            }
        })
        .collect())
}

fn exact_integer(value: &Value) -> Option<i128> {
    match value {
        Value::Int(i) => Some((*i).into()),
        Value::UInt(u) => Some((*u).into()),
        Value::Bool(b) => Some((*b).into()),
        Value::Text(s) => s.trim().parse::<i128>().ok(),
        Value::Float(_) => None,
    }
}

fn int_bytes(ty: DataType, i: i128, value: &Value) -> Result<Vec<u8>, CodecError> {
    let oor = || out_of_range(value, ty);
    Ok(match ty {
        DataType::U16 => u16::try_from(i).map_err(|_| oor())?.to_be_bytes().to_vec(),
        DataType::I16 => i16::try_from(i).map_err(|_| oor())?.to_be_bytes().to_vec(),
        DataType::U32 => u32::try_from(i).map_err(|_| oor())?.to_be_bytes().to_vec(),
        DataType::I32 => i32::try_from(i).map_err(|_| oor())?.to_be_bytes().to_vec(),
        DataType::U64 => u64::try_from(i).map_err(|_| oor())?.to_be_bytes().to_vec(),
        DataType::I64 => i64::try_from(i).map_err(|_| oor())?.to_be_bytes().to_vec(),
        DataType::F32 => (i as f32).to_be_bytes().to_vec(),
        DataType::F64 => (i as f64).to_be_bytes().to_vec(),
        DataType::Bool | DataType::String => return Err(oor()),
    })
}

fn out_of_range(value: &Value, ty: DataType) -> CodecError {
    CodecError::OutOfRange {
        value: value.to_string(),
        ty: type_name(ty),
    }
}

/// The config spelling of a type.
pub fn type_name(ty: DataType) -> &'static str {
    match ty {
        DataType::Bool => "bool",
        DataType::U16 => "u16",
        DataType::I16 => "i16",
        DataType::U32 => "u32",
        DataType::I32 => "i32",
        DataType::U64 => "u64",
        DataType::I64 => "i64",
        DataType::F32 => "f32",
        DataType::F64 => "f64",
        DataType::String => "string",
    }
}

fn to_f64(value: &Value) -> Result<f64, CodecError> {
    match value {
        Value::Text(s) => s
            .trim()
            .parse::<f64>()
            .map_err(|_| CodecError::NotANumber { value: s.clone() }),
        v => v.as_f64().ok_or_else(|| CodecError::NotANumber {
            value: v.to_string(),
        }),
    }
}

/// A value as a coil state: booleans, 0/1, and the words true/false,
/// on/off, yes/no (any case).
pub fn to_bool(value: &Value) -> Result<bool, CodecError> {
    let bad = || CodecError::NotABool {
        value: value.to_string(),
    };
    match value {
        Value::Bool(b) => Ok(*b),
        Value::Int(0) | Value::UInt(0) => Ok(false),
        Value::Int(1) | Value::UInt(1) => Ok(true),
        Value::Float(f) if *f == 0.0 => Ok(false),
        Value::Float(f) if *f == 1.0 => Ok(true),
        Value::Text(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "on" | "1" | "yes" => Ok(true),
            "false" | "off" | "0" | "no" => Ok(false),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DataType::*;
    use WordOrder::*;

    const ORDERS: [WordOrder; 4] = [ABCD, CDAB, BADC, DCBA];

    /// (type, value, registers as they arrive for ABCD, CDAB, BADC, DCBA).
    /// Written out by hand from the byte diagrams, not computed.
    fn fixtures() -> Vec<(DataType, Value, [Vec<u16>; 4])> {
        vec![
            (
                U16,
                Value::Int(0x1234),
                [vec![0x1234], vec![0x1234], vec![0x3412], vec![0x3412]],
            ),
            (
                I16,
                Value::Int(-2),
                [vec![0xFFFE], vec![0xFFFE], vec![0xFEFF], vec![0xFEFF]],
            ),
            (
                U32,
                Value::Int(0xAABB_CCDD),
                [
                    vec![0xAABB, 0xCCDD],
                    vec![0xCCDD, 0xAABB],
                    vec![0xBBAA, 0xDDCC],
                    vec![0xDDCC, 0xBBAA],
                ],
            ),
            (
                I32,
                Value::Int(-123_456), // 0xFFFE1DC0
                [
                    vec![0xFFFE, 0x1DC0],
                    vec![0x1DC0, 0xFFFE],
                    vec![0xFEFF, 0xC01D],
                    vec![0xC01D, 0xFEFF],
                ],
            ),
            (
                U64,
                Value::Int(0x0102_0304_0506_0708),
                [
                    vec![0x0102, 0x0304, 0x0506, 0x0708],
                    vec![0x0708, 0x0506, 0x0304, 0x0102],
                    vec![0x0201, 0x0403, 0x0605, 0x0807],
                    vec![0x0807, 0x0605, 0x0403, 0x0201],
                ],
            ),
            (
                U64,
                Value::UInt(0xFFFF_FFFF_FFFF_FFFE),
                [
                    vec![0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE],
                    vec![0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF],
                    vec![0xFFFF, 0xFFFF, 0xFFFF, 0xFEFF],
                    vec![0xFEFF, 0xFFFF, 0xFFFF, 0xFFFF],
                ],
            ),
            (
                I64,
                Value::Int(-2), // 0xFFFF_FFFF_FFFF_FFFE
                [
                    vec![0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE],
                    vec![0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF],
                    vec![0xFFFF, 0xFFFF, 0xFFFF, 0xFEFF],
                    vec![0xFEFF, 0xFFFF, 0xFFFF, 0xFFFF],
                ],
            ),
            (
                F32,
                Value::Float(123.456), // 0x42F6E979
                [
                    vec![0x42F6, 0xE979],
                    vec![0xE979, 0x42F6],
                    vec![0xF642, 0x79E9],
                    vec![0x79E9, 0xF642],
                ],
            ),
            (
                F32,
                Value::Float(-21.7), // 0xC1AD999A
                [
                    vec![0xC1AD, 0x999A],
                    vec![0x999A, 0xC1AD],
                    vec![0xADC1, 0x9A99],
                    vec![0x9A99, 0xADC1],
                ],
            ),
            (
                F64,
                Value::Float(-2.5), // 0xC004_0000_0000_0000
                [
                    vec![0xC004, 0, 0, 0],
                    vec![0, 0, 0, 0xC004],
                    vec![0x04C0, 0, 0, 0],
                    vec![0, 0, 0, 0x04C0],
                ],
            ),
            (
                F64,
                Value::Float(1234.5678), // 0x40934A456D5CFAAD
                [
                    vec![0x4093, 0x4A45, 0x6D5C, 0xFAAD],
                    vec![0xFAAD, 0x6D5C, 0x4A45, 0x4093],
                    vec![0x9340, 0x454A, 0x5C6D, 0xADFA],
                    vec![0xADFA, 0x5C6D, 0x454A, 0x9340],
                ],
            ),
        ]
    }

    #[test]
    fn every_type_and_order_decodes_and_encodes() {
        for (ty, value, regs) in fixtures() {
            for (order, regs) in ORDERS.iter().zip(regs.iter()) {
                let f = Format::of(ty, *order);
                assert_eq!(
                    f.decode(regs).unwrap(),
                    value,
                    "decode {ty:?} {order:?} {regs:04X?}"
                );
                assert_eq!(
                    &f.encode(&value).unwrap(),
                    regs,
                    "encode {ty:?} {order:?} {value}"
                );
            }
        }
    }

    #[test]
    fn extra_registers_are_ignored_and_short_input_is_an_error() {
        let f = Format::of(U32, ABCD);
        assert_eq!(f.decode(&[0, 7, 99]).unwrap(), Value::Int(7));
        assert_eq!(
            f.decode(&[1]).unwrap_err(),
            CodecError::Short { need: 2, got: 1 }
        );
    }

    #[test]
    fn nan_and_infinity_decode() {
        for order in ORDERS {
            let f = Format::of(F32, order);
            let regs = f.encode(&Value::Float(f64::NAN)).unwrap();
            let Value::Float(x) = f.decode(&regs).unwrap() else {
                panic!("not a float")
            };
            assert!(x.is_nan(), "{order:?}");
        }
        // Canonical quiet NaN as a device sends it.
        let f = Format::of(F32, ABCD);
        assert!(matches!(f.decode(&[0x7FC0, 0]).unwrap(), Value::Float(x) if x.is_nan()));
        assert_eq!(
            f.decode(&[0xFF80, 0]).unwrap(),
            Value::Float(f64::NEG_INFINITY)
        );
        let f = Format::of(F64, CDAB);
        assert!(matches!(f.decode(&[0, 0, 0, 0x7FF8]).unwrap(), Value::Float(x) if x.is_nan()));
    }

    #[test]
    fn f32_reads_as_its_shortest_decimal() {
        let f = Format::of(F32, ABCD);
        // 21.7f32 is 0x41AD999A; as f64 it would be 21.700000762939453.
        assert_eq!(f.decode(&[0x41AD, 0x999A]).unwrap(), Value::Float(21.7));
    }

    #[test]
    fn scale_and_offset() {
        let mut f = Format::of(I16, ABCD);
        f.scale = Some(0.1);
        assert_eq!(f.decode(&[215]).unwrap(), Value::Float(21.5));
        assert_eq!(f.decode(&[3]).unwrap(), Value::Float(0.3));
        assert_eq!(f.decode(&[0xFFFD]).unwrap(), Value::Float(-0.3));
        f.offset = Some(-40.0);
        assert_eq!(f.decode(&[615]).unwrap(), Value::Float(21.5));
        assert_eq!(f.encode(&Value::Float(21.5)).unwrap(), vec![615]);
        // A scale that is not 1/n multiplies.
        let mut f = Format::of(U16, ABCD);
        f.scale = Some(2.5);
        assert_eq!(f.decode(&[4]).unwrap(), Value::Float(10.0));
        assert_eq!(f.encode(&Value::Int(10)).unwrap(), vec![4]);
        // Scaled floats.
        let mut f = Format::of(F32, CDAB);
        f.scale = Some(0.001);
        let regs = [0xE979, 0x42F6]; // 123.456 word-swapped
        assert_eq!(f.decode(&regs).unwrap(), Value::Float(0.123456));
    }

    #[test]
    fn integers_encode_exactly_and_check_range() {
        let f = Format::of(I64, ABCD);
        assert_eq!(
            f.encode(&Value::Int(i64::MIN)).unwrap(),
            vec![0x8000, 0, 0, 0]
        );
        let f = Format::of(U16, ABCD);
        assert_eq!(
            f.encode(&Value::Int(65536)).unwrap_err(),
            CodecError::OutOfRange {
                value: "65536".into(),
                ty: "u16"
            }
        );
        assert!(f.encode(&Value::Int(-1)).is_err());
        assert!(f.encode(&Value::Float(f64::NAN)).is_err());
        assert_eq!(f.encode(&Value::Float(41.6)).unwrap(), vec![42]);
        assert_eq!(f.encode(&Value::Text(" 7 ".into())).unwrap(), vec![7]);
        assert_eq!(
            f.encode(&Value::Text("seven".into())).unwrap_err(),
            CodecError::NotANumber {
                value: "seven".into()
            }
        );
        let f = Format::of(I16, ABCD);
        assert_eq!(f.encode(&Value::Int(-32768)).unwrap(), vec![0x8000]);
        assert!(f.encode(&Value::Int(32768)).is_err());
    }

    #[test]
    fn strings_trim_trailing_nuls_and_honour_byte_order() {
        let mut f = Format::of(String, ABCD);
        f.length = 4;
        let regs = [0x5356, 0x2D31, 0x0000, 0x0000]; // "SV-1"
        assert_eq!(f.decode(&regs).unwrap(), Value::Text("SV-1".into()));
        // Odd length: the NUL is in the low byte.
        assert_eq!(
            f.decode(&[0x4142, 0x4300, 0, 0]).unwrap(),
            Value::Text("ABC".into())
        );
        assert_eq!(
            f.encode(&Value::Text("ABC".into())).unwrap(),
            vec![0x4142, 0x4300, 0, 0]
        );
        f.order = BADC;
        assert_eq!(
            f.decode(&[0x5653, 0x312D, 0, 0]).unwrap(),
            Value::Text("SV-1".into())
        );
        assert_eq!(
            f.encode(&Value::Text("SV-1".into())).unwrap(),
            vec![0x5653, 0x312D, 0, 0]
        );
        assert_eq!(
            f.encode(&Value::Text("123456789".into())).unwrap_err(),
            CodecError::TooLong {
                len: 9,
                max: 8,
                registers: 4
            }
        );
        // Invalid UTF-8 is replaced, not an error.
        f.order = ABCD;
        f.length = 1;
        assert_eq!(
            f.decode(&[0xFF41]).unwrap(),
            Value::Text("\u{FFFD}A".into())
        );
    }

    #[test]
    fn bits_of_a_register() {
        let mut f = Format::of(Bool, ABCD);
        f.bit = Some(0);
        assert_eq!(f.decode(&[0x0001]).unwrap(), Value::Bool(true));
        f.bit = Some(15);
        assert_eq!(f.decode(&[0x8000]).unwrap(), Value::Bool(true));
        assert_eq!(f.decode(&[0x7FFF]).unwrap(), Value::Bool(false));
        assert_eq!(f.encode_bit(0x00FF, &Value::Bool(true)).unwrap(), 0x80FF);
        f.bit = Some(3);
        assert_eq!(f.encode_bit(0x00FF, &Value::Int(0)).unwrap(), 0x00F7);
        // Byte-swapped register: bit 8 is in the first wire byte.
        f.order = BADC;
        f.bit = Some(8);
        assert_eq!(f.decode(&[0x0001]).unwrap(), Value::Bool(true));
        assert_eq!(f.encode_bit(0, &Value::Bool(true)).unwrap(), 0x0001);
    }

    #[test]
    fn booleans_from_words() {
        for (v, b) in [
            (Value::Text("ON".into()), true),
            (Value::Text("off".into()), false),
            (Value::Text("1".into()), true),
            (Value::Int(0), false),
            (Value::Float(1.0), true),
            (Value::Bool(true), true),
        ] {
            assert_eq!(to_bool(&v).unwrap(), b, "{v:?}");
        }
        assert!(to_bool(&Value::Int(2)).is_err());
        assert!(to_bool(&Value::Text("maybe".into())).is_err());
        let f = Format::of(Bool, ABCD);
        assert_eq!(f.encode(&Value::Text("on".into())).unwrap(), vec![1]);
    }

    #[test]
    fn decode_as_shows_every_order() {
        let regs = [0x42F6, 0xE979];
        let got: Vec<Value> = ORDERS
            .iter()
            .map(|o| decode_as(F32, *o, &regs).unwrap())
            .collect();
        assert_eq!(got[0], Value::Float(123.456));
        assert_ne!(got[1], got[0]);
    }
}
