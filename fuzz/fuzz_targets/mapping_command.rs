//! Mapping templates and command payloads. A topic/payload template and a
//! reading (names, value, unit) from the input are mapped; a command payload
//! is parsed, coerced to every point type and encoded as a Modbus write, as
//! a command from the network would be. Properties: no panic; messages are
//! well formed (non-empty topic, no wildcard from a template literal
//! without one); a JSON payload is valid JSON.
#![no_main]

use std::sync::Arc;

use edgebridge::config::{DataType, MappingConfig, PayloadFormat, QosLevel, WordOrder};
use edgebridge::drivers::modbus::decode::Format;
use edgebridge::model::{Qos, Quality, Reading, Value};
use edgebridge::pipeline::commands::{coerce, parse_payload};
use edgebridge::pipeline::mapping::Mappings;
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

/// (pattern, topic, payload template, format, scale, decimals, unit),
/// (device, point, value kind/int/float/text, reading unit, bad quality),
/// command payload.
type Input = (
    (
        String,
        String,
        String,
        u8,
        Option<f64>,
        Option<u8>,
        Option<String>,
    ),
    (String, String, (u8, i64, f64, String), Option<String>, bool),
    Vec<u8>,
);

fuzz_target!(|input: Input| {
    let ((pattern, topic, template, format, scale, decimals, unit), reading_in, command) = input;
    let (device, point, value, reading_unit, bad) = reading_in;
    // --- mappings
    let payload = match format % 3 {
        0 => PayloadFormat::Value,
        1 => PayloadFormat::Json,
        _ => PayloadFormat::Template(template),
    };
    let json = matches!(payload, PayloadFormat::Json);
    let config = MappingConfig {
        pattern,
        topic,
        payload,
        qos: QosLevel(Qos::AtLeastOnce),
        retain: false,
        continue_matching: true,
        scale,
        decimals,
        unit,
    };
    let catch_all = MappingConfig {
        pattern: "*/*".into(),
        topic: "devices/{device}/{point}".into(),
        payload: PayloadFormat::Json,
        ..config.clone()
    };
    let mappings = Mappings::new(&[config, catch_all], "gw-fuzz");
    let value = match value.0 % 5 {
        0 => Value::Bool(value.1 & 1 == 1),
        1 => Value::Int(value.1),
        2 => Value::UInt(value.1 as u64),
        3 => Value::Float(value.2),
        _ => Value::Text(value.3),
    };
    let reading = Reading {
        device: Arc::from(device.as_str()),
        point: Arc::from(point.as_str()),
        value,
        unit: reading_unit.as_deref().map(Arc::from),
        ts: 1_700_000_000_000,
        quality: if bad {
            Quality::Bad("fuzzed failure".into())
        } else {
            Quality::Good
        },
    };
    let mut out = Vec::new();
    mappings.apply(&reading, &mut out);
    for (n, m) in out.iter().enumerate() {
        let last = n + 1 == out.len();
        if json && !last {
            // The first mapping's JSON payload (the catch-all's too).
            serde_json::from_slice::<serde_json::Value>(&m.payload)
                .unwrap_or_else(|e| panic!("invalid JSON {:?}: {e}", m.payload));
        }
        if last && m.topic.starts_with("devices/") {
            serde_json::from_slice::<serde_json::Value>(&m.payload)
                .unwrap_or_else(|e| panic!("invalid JSON {:?}: {e}", m.payload));
        }
    }

    // --- command payloads, as a `commands:` topic would receive them
    if let Ok(v) = parse_payload(&command) {
        for ty in TYPES {
            if let Ok(c) = coerce(v.clone(), ty) {
                let _ = Format::of(ty, WordOrder::CDAB).encode(&c);
                let mut f = Format::of(ty, WordOrder::ABCD);
                f.scale = scale;
                let _ = f.encode(&c);
            }
        }
    }
});
