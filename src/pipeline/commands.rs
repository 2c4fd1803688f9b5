//! `commands:` mappings: a message on a local topic becomes a device write;
//! the outcome is published on the command's result topic.

use std::collections::HashMap;

use crate::bus::{Bus, Subscription};
use crate::config::{CommandConfig, Config, DataType};
use crate::drivers::Devices;
use crate::model::{Message, Qos, Value, ValueError};

/// Parses a command payload: `on`/`off`, `true`/`false`, numbers, or JSON
/// (`{"value": …}` or a bare JSON value); anything else is text.
pub fn parse_payload(payload: &[u8]) -> Result<Value, ValueError> {
    let text = std::str::from_utf8(payload)
        .map_err(|_| ValueError::NotUtf8)?
        .trim();
    match text.to_ascii_lowercase().as_str() {
        "on" | "true" => return Ok(Value::Bool(true)),
        "off" | "false" => return Ok(Value::Bool(false)),
        "" => return Err(ValueError::Empty),
        _ => {}
    }
    if let Ok(i) = text.parse::<i64>() {
        return Ok(Value::Int(i));
    }
    if let Ok(f) = text.parse::<f64>() {
        if f.is_finite() {
            return Ok(Value::Float(f));
        }
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(mut o)) => match o.remove("value") {
            Some(v) => json_value(v),
            None => Err(ValueError::NoValueKey),
        },
        Ok(v) => json_value(v),
        Err(_) => Ok(Value::Text(text.to_string())),
    }
}

fn json_value(v: serde_json::Value) -> Result<Value, ValueError> {
    match v {
        serde_json::Value::Bool(b) => Ok(Value::Bool(b)),
        serde_json::Value::Number(n) => n
            .as_i64()
            .map(Value::Int)
            .or_else(|| n.as_f64().map(Value::Float))
            .ok_or_else(|| ValueError::OutOfRange(n.to_string())),
        serde_json::Value::String(s) => parse_payload(s.as_bytes()),
        other => Err(ValueError::Unsupported(other.to_string())),
    }
}

/// Converts a parsed value to what a point of type `ty` takes.
pub fn coerce(value: Value, ty: DataType) -> Result<Value, ValueError> {
    match ty {
        DataType::Bool => match value {
            Value::Bool(b) => Ok(Value::Bool(b)),
            Value::Int(0) => Ok(Value::Bool(false)),
            Value::Int(1) => Ok(Value::Bool(true)),
            other => Err(ValueError::NotBool(other.to_string())),
        },
        DataType::String => Ok(Value::Text(value.to_string())),
        _ => match value {
            Value::Bool(b) => Ok(Value::Int(b as i64)),
            Value::Text(t) => Err(ValueError::NotNumber(t)),
            n => Ok(n),
        },
    }
}

struct Route {
    device: String,
    point: String,
    /// `None` for untyped simulator points: they take what was sent.
    ty: Option<DataType>,
    result_topic: String,
}

/// Subscribes to every command topic and serves them until the bus closes
/// or the returned task is aborted (a config reload); `None` when there
/// are no commands.
pub async fn run(
    config: &Config,
    bus: Bus,
    devices: Devices,
) -> Result<Option<tokio::task::JoinHandle<()>>, crate::bus::BusError> {
    if config.commands.is_empty() {
        return Ok(None);
    }
    let routes: HashMap<String, Route> = config
        .commands
        .iter()
        .filter_map(|c: &CommandConfig| {
            let (device, point) = c.target();
            let p = config
                .devices
                .iter()
                .find(|d| d.name == device)?
                .point(point)?;
            Some((
                c.topic.clone(),
                Route {
                    device: device.to_string(),
                    point: point.to_string(),
                    ty: (p.table.is_some() || p.data_type.is_some()).then(|| p.data_type()),
                    result_topic: c.result_topic(),
                },
            ))
        })
        .collect();
    let filters: Vec<(String, Qos)> = routes
        .keys()
        .map(|t| (t.clone(), Qos::AtLeastOnce))
        .collect();
    let sub: Subscription = bus.subscribe("edgebridge-commands", &filters).await?;
    Ok(Some(tokio::spawn(serve(sub, routes, bus, devices))))
}

async fn serve(mut sub: Subscription, routes: HashMap<String, Route>, bus: Bus, devices: Devices) {
    while let Some(msg) = sub.recv().await {
        let Some(route) = routes.get(&msg.topic) else {
            continue;
        };
        // One write at a time per command topic would serialise slow
        // devices; each write gets its own task, the driver orders them.
        let devices = devices.clone();
        let bus = bus.clone();
        let (device, point, ty, result_topic) = (
            route.device.clone(),
            route.point.clone(),
            route.ty,
            route.result_topic.clone(),
        );
        tokio::spawn(async move {
            let value = parse_payload(&msg.payload).and_then(|v| match ty {
                Some(ty) => coerce(v, ty),
                None => Ok(v),
            });
            let result = match value {
                Ok(v) => devices.write(&device, &point, v).await,
                Err(e) => Err(e.into()),
            };
            let payload = match &result {
                Ok(()) => serde_json::json!({"ok": true, "device": device, "point": point}),
                Err(e) => {
                    tracing::warn!(%device, %point, error = %e, "command failed");
                    serde_json::json!({"ok": false, "device": device, "point": point, "error": e.to_string()})
                }
            };
            bus.publish(Message::new(result_topic, payload.to_string()))
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_parse() {
        assert_eq!(parse_payload(b"on"), Ok(Value::Bool(true)));
        assert_eq!(parse_payload(b" OFF "), Ok(Value::Bool(false)));
        assert_eq!(parse_payload(b"1"), Ok(Value::Int(1)));
        assert_eq!(parse_payload(b"-2.5"), Ok(Value::Float(-2.5)));
        assert_eq!(parse_payload(br#"{"value":true}"#), Ok(Value::Bool(true)));
        assert_eq!(parse_payload(br#"{"value":"on"}"#), Ok(Value::Bool(true)));
        assert_eq!(parse_payload(b"42.0e0"), Ok(Value::Float(42.0)));
        assert!(parse_payload(br#"{"v":1}"#).is_err());
        assert!(parse_payload(b"").is_err());
        assert!(parse_payload(&[0xff, 0xfe]).is_err());
        assert_eq!(parse_payload(b"hello"), Ok(Value::Text("hello".into())));
    }

    #[test]
    fn coercion_follows_point_type() {
        assert_eq!(coerce(Value::Int(1), DataType::Bool), Ok(Value::Bool(true)));
        assert!(coerce(Value::Int(5), DataType::Bool).is_err());
        assert_eq!(coerce(Value::Bool(true), DataType::U16), Ok(Value::Int(1)));
        assert!(coerce(Value::Text("x".into()), DataType::F32).is_err());
    }
}
