//! Conversions between rhai values and the gateway's values: readings in
//! and out of scripts, JSON both ways, and publish payloads.

use rhai::{Array, Blob, Dynamic, ImmutableString, Map, FLOAT, INT};

use crate::model::{Quality, Reading, Value};

/// A reading as the map a script sees: `#{device, point, value, unit, ts, quality}`.
pub fn reading_to_map(r: &Reading) -> Map {
    let mut m = Map::new();
    m.insert(
        "device".into(),
        Dynamic::from(ImmutableString::from(&*r.device)),
    );
    m.insert(
        "point".into(),
        Dynamic::from(ImmutableString::from(&*r.point)),
    );
    m.insert("value".into(), value_to_dynamic(&r.value));
    m.insert(
        "unit".into(),
        match &r.unit {
            Some(u) => Dynamic::from(ImmutableString::from(&**u)),
            None => Dynamic::UNIT,
        },
    );
    m.insert("ts".into(), Dynamic::from(r.ts as INT));
    m.insert(
        "quality".into(),
        Dynamic::from(ImmutableString::from(match r.quality {
            Quality::Good => "good",
            Quality::Bad(_) => "bad",
        })),
    );
    m
}

/// The reading a script returned from `on_reading`: the keys it set replace
/// those of `original`; keys it did not set keep their original value.
pub fn map_to_reading(map: &Map, original: &Reading) -> Result<Reading, String> {
    let mut r = original.clone();
    for (key, v) in map {
        let v = v.flatten_clone();
        match key.as_str() {
            "device" => r.device = text(&v, "device")?.into(),
            "point" => r.point = text(&v, "point")?.into(),
            "value" => r.value = dynamic_to_value(&v).map_err(|e| format!("`value`: {e}"))?,
            "unit" => {
                r.unit = if v.is_unit() {
                    None
                } else {
                    Some(text(&v, "unit")?.into())
                }
            }
            "ts" => {
                r.ts = v
                    .as_int()
                    .map_err(|t| format!("`ts` must be an integer (ms), not {t}"))?
            }
            // Quality is the driver's verdict; a script cannot change it.
            "quality" => {}
            other => {
                return Err(format!(
                    "unknown key `{other}` in the returned reading \
                     (use device, point, value, unit, ts)"
                ))
            }
        }
    }
    if r.device.is_empty() || r.point.is_empty() {
        return Err("`device` and `point` must not be empty".into());
    }
    Ok(r)
}

fn text(v: &Dynamic, key: &str) -> Result<String, String> {
    if v.is_string() {
        Ok(v.clone().into_string().unwrap_or_default())
    } else {
        Err(format!("`{key}` must be a string, not {}", v.type_name()))
    }
}

/// A gateway value as a rhai value. A `u64` beyond `i64` becomes a float.
pub fn value_to_dynamic(v: &Value) -> Dynamic {
    match v {
        Value::Bool(b) => Dynamic::from_bool(*b),
        Value::Int(i) => Dynamic::from_int(*i),
        Value::UInt(u) => match INT::try_from(*u) {
            Ok(i) => Dynamic::from_int(i),
            Err(_) => Dynamic::from_float(*u as FLOAT),
        },
        Value::Float(f) => Dynamic::from_float(*f),
        Value::Text(s) => Dynamic::from(ImmutableString::from(s.as_str())),
    }
}

/// A rhai value as a gateway value: bool, integer, float, string or char.
pub fn dynamic_to_value(d: &Dynamic) -> Result<Value, String> {
    let d = d.flatten_clone();
    if let Ok(b) = d.as_bool() {
        Ok(Value::Bool(b))
    } else if let Ok(i) = d.as_int() {
        Ok(Value::Int(i))
    } else if let Ok(f) = d.as_float() {
        Ok(Value::Float(f))
    } else if let Ok(c) = d.as_char() {
        Ok(Value::Text(c.to_string()))
    } else if d.is_string() {
        Ok(Value::Text(d.into_string().unwrap_or_default()))
    } else {
        Err(format!(
            "expected a bool, number or string, not {}",
            d.type_name()
        ))
    }
}

/// Deepest nesting converted to or from JSON (serde_json's own parser
/// limit): the conversions recurse, and the stack must not run out.
pub const MAX_JSON_DEPTH: usize = 128;

/// A rhai value as JSON. Maps become objects, arrays and BLOBs arrays,
/// `()` null. Non-finite floats have no JSON form and are an error.
pub fn dynamic_to_json(d: &Dynamic) -> Result<serde_json::Value, String> {
    to_json_at(d, 0)
}

fn to_json_at(d: &Dynamic, depth: usize) -> Result<serde_json::Value, String> {
    use serde_json::Value as J;
    if depth > MAX_JSON_DEPTH {
        return Err(format!("nested deeper than {MAX_JSON_DEPTH} levels"));
    }
    let d = d.flatten_clone();
    if d.is_unit() {
        return Ok(J::Null);
    }
    if let Ok(b) = d.as_bool() {
        return Ok(J::Bool(b));
    }
    if let Ok(i) = d.as_int() {
        return Ok(J::from(i));
    }
    if let Ok(f) = d.as_float() {
        return serde_json::Number::from_f64(f)
            .map(J::Number)
            .ok_or_else(|| format!("{f} has no JSON form"));
    }
    if let Ok(c) = d.as_char() {
        return Ok(J::String(c.to_string()));
    }
    if d.is_string() {
        return Ok(J::String(d.into_string().unwrap_or_default()));
    }
    if let Ok(a) = d.as_array_ref() {
        return a
            .iter()
            .map(|v| to_json_at(v, depth + 1))
            .collect::<Result<_, _>>()
            .map(J::Array);
    }
    if let Ok(b) = d.as_blob_ref() {
        return Ok(J::Array(b.iter().map(|x| J::from(*x)).collect()));
    }
    if let Ok(m) = d.as_map_ref() {
        let mut o = serde_json::Map::with_capacity(m.len());
        for (k, v) in m.iter() {
            o.insert(k.to_string(), to_json_at(v, depth + 1)?);
        }
        return Ok(J::Object(o));
    }
    Err(format!("a {} cannot be written as JSON", d.type_name()))
}

/// JSON as a rhai value: objects become maps, numbers integers when they
/// fit, floats otherwise.
pub fn json_to_dynamic(j: &serde_json::Value) -> Dynamic {
    use serde_json::Value as J;
    match j {
        J::Null => Dynamic::UNIT,
        J::Bool(b) => Dynamic::from_bool(*b),
        J::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from_int(i),
            None => Dynamic::from_float(n.as_f64().unwrap_or(FLOAT::NAN)),
        },
        J::String(s) => Dynamic::from(ImmutableString::from(s.as_str())),
        J::Array(a) => Dynamic::from_array(a.iter().map(json_to_dynamic).collect::<Array>()),
        J::Object(o) => Dynamic::from_map(
            o.iter()
                .map(|(k, v)| (k.as_str().into(), json_to_dynamic(v)))
                .collect::<Map>(),
        ),
    }
}

/// The bytes `publish` sends for a payload: strings as they are, numbers
/// and bools as text (the same text as a mapping's `payload: value`), maps
/// and arrays as JSON, BLOBs as raw bytes.
pub fn payload_bytes(d: &Dynamic) -> Result<Vec<u8>, String> {
    let d = d.flatten_clone();
    if d.is_string() {
        return Ok(d.into_string().unwrap_or_default().into_bytes());
    }
    if d.is_map() || d.is_array() {
        return dynamic_to_json(&d).map(|j| j.to_string().into_bytes());
    }
    if d.is_blob() {
        return Ok(d.cast::<Blob>());
    }
    if d.is_unit() {
        return Err("the payload is () (nothing); publish \"\" to send an empty payload".into());
    }
    dynamic_to_value(&d).map(|v| v.to_string().into_bytes())
}

/// A received payload as a script argument: a string when it is UTF-8, a
/// BLOB (byte array) otherwise.
pub fn payload_to_dynamic(payload: &[u8]) -> Dynamic {
    match std::str::from_utf8(payload) {
        Ok(s) => Dynamic::from(ImmutableString::from(s)),
        Err(_) => Dynamic::from_blob(payload.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn reading() -> Reading {
        Reading {
            device: Arc::from("pv"),
            point: Arc::from("power"),
            value: Value::Float(2500.0),
            unit: Some(Arc::from("W")),
            ts: 1000,
            quality: Quality::Good,
        }
    }

    #[test]
    fn reading_round_trips_through_a_map() {
        let r = reading();
        let m = reading_to_map(&r);
        assert_eq!(map_to_reading(&m, &r).unwrap(), r);
    }

    #[test]
    fn changed_keys_replace_original_ones() {
        let r = reading();
        let mut m = Map::new();
        m.insert("value".into(), Dynamic::from_float(2.5));
        m.insert("unit".into(), Dynamic::from(ImmutableString::from("kW")));
        let out = map_to_reading(&m, &r).unwrap();
        assert_eq!(out.value, Value::Float(2.5));
        assert_eq!(out.unit.as_deref(), Some("kW"));
        assert_eq!(out.device, r.device);
    }

    #[test]
    fn bad_returned_readings_say_why() {
        let r = reading();
        let mut m = Map::new();
        m.insert("valu".into(), Dynamic::from_int(1));
        assert!(map_to_reading(&m, &r)
            .unwrap_err()
            .contains("unknown key `valu`"));
        let mut m = Map::new();
        m.insert("value".into(), Dynamic::from_map(Map::new()));
        assert!(map_to_reading(&m, &r).unwrap_err().contains("`value`"));
        let mut m = Map::new();
        m.insert("ts".into(), Dynamic::from_float(1.5));
        assert!(map_to_reading(&m, &r).unwrap_err().contains("`ts`"));
    }

    #[test]
    fn big_unsigned_values_become_floats() {
        assert_eq!(value_to_dynamic(&Value::UInt(7)).as_int(), Ok(7));
        assert!(value_to_dynamic(&Value::UInt(u64::MAX)).is_float());
    }

    #[test]
    fn json_round_trip() {
        let j: serde_json::Value =
            serde_json::from_str(r#"{"a":1,"b":[true,null,"x"],"c":{"d":2.5}}"#).unwrap();
        assert_eq!(dynamic_to_json(&json_to_dynamic(&j)).unwrap(), j);
    }

    #[test]
    fn json_nesting_is_limited() {
        let mut d = Dynamic::from_array(Vec::new());
        for _ in 0..MAX_JSON_DEPTH + 1 {
            d = Dynamic::from_array(vec![d]);
        }
        assert!(dynamic_to_json(&d).unwrap_err().contains("nested deeper"));
    }

    #[test]
    fn non_finite_floats_are_not_json() {
        assert!(dynamic_to_json(&Dynamic::from_float(f64::NAN)).is_err());
    }

    #[test]
    fn payloads() {
        let s = |d: Dynamic| String::from_utf8(payload_bytes(&d).unwrap()).unwrap();
        assert_eq!(s(Dynamic::from(ImmutableString::from("on"))), "on");
        assert_eq!(s(Dynamic::from_float(2.5)), "2.5");
        assert_eq!(s(Dynamic::from_float(3.0)), "3");
        assert_eq!(s(Dynamic::from_int(-4)), "-4");
        assert_eq!(s(Dynamic::from_bool(true)), "true");
        let mut m = Map::new();
        m.insert("value".into(), Dynamic::from_bool(true));
        assert_eq!(s(Dynamic::from_map(m)), r#"{"value":true}"#);
        assert!(payload_bytes(&Dynamic::UNIT).is_err());
    }

    #[test]
    fn received_payloads_are_strings_or_blobs() {
        assert!(payload_to_dynamic(b"on").is_string());
        assert!(payload_to_dynamic(&[0xff, 0x00]).is_blob());
    }
}
