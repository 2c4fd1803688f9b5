//! Register decoding for every type and word order, with and without
//! scale/offset/bit, and the encode -> decode round trip of what decoded.
#![no_main]

use edgebridge::config::{DataType, WordOrder};
use edgebridge::drivers::modbus::decode::Format;
use edgebridge::model::Value;
use libfuzzer_sys::fuzz_target;

const TYPES: [DataType; 10] = [
    DataType::Bool,
    DataType::U16,
    DataType::I16,
    DataType::U32,
    DataType::I32,
    DataType::U64,
    DataType::I64,
    DataType::F32,
    DataType::F64,
    DataType::String,
];
const ORDERS: [WordOrder; 4] = [
    WordOrder::ABCD,
    WordOrder::DCBA,
    WordOrder::BADC,
    WordOrder::CDAB,
];

fuzz_target!(|input: (u8, u8, u8, Option<f64>, Option<f64>, Vec<u16>)| {
    let (ty, order, extra, scale, offset, regs) = input;
    let ty = TYPES[usize::from(ty) % TYPES.len()];
    let order = ORDERS[usize::from(order) % ORDERS.len()];
    let mut f = Format::of(ty, order);
    match ty {
        // Validation requires 1 or more registers for a string.
        DataType::String => f.length = u16::from(extra % 129) + 1,
        DataType::Bool => f.bit = Some(extra % 16),
        _ => {
            f.scale = scale;
            f.offset = offset;
        }
    }
    let Ok(value) = f.decode(&regs) else {
        assert!(regs.len() < usize::from(f.registers()));
        return;
    };
    // Whatever decoded must encode again without a panic; without scale
    // and offset, integers and bools round-trip exactly.
    if let Ok(words) = f.encode(&value) {
        assert_eq!(words.len(), usize::from(f.registers()).max(1));
        let exact = f.scale.is_none() && f.offset.is_none();
        if exact && matches!(value, Value::Int(_) | Value::UInt(_)) {
            assert_eq!(f.decode(&words).ok(), Some(value.clone()));
        }
    }
    if ty == DataType::Bool {
        let _ = f.encode_bit(regs[0], &value);
    }
});
