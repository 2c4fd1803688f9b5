//! `commands:` mappings: a message on a local topic becomes a device write;
//! the outcome is published on the command's result topic.

use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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

#[derive(Clone)]
struct Route {
    device: String,
    point: String,
    /// `None` for untyped simulator points: they take what was sent.
    ty: Option<DataType>,
    result_topic: String,
}

/// Writes under way at once, at most; further commands wait on the bus
/// (whose subscriber queue is bounded too).
const WRITES_IN_FLIGHT: usize = 32;

/// The running `commands:` service. Each command is its own task (a slow
/// device does not hold up the others; the driver orders its writes), at
/// most [`WRITES_IN_FLIGHT`] at once, and all of them tracked so that the
/// gateway can wait for their results at shutdown.
pub struct Commands {
    stop: CancellationToken,
    writes: TaskTracker,
    task: JoinHandle<()>,
}

impl Commands {
    /// Stops taking commands. Writes under way still finish and publish
    /// their results (each is bounded by the driver's answer timeout).
    pub fn abort(&self) {
        self.stop.cancel();
    }

    /// Stops taking commands and waits up to `within` for the writes under
    /// way to publish their results; false if some did not.
    pub async fn stop(self, within: Duration) -> bool {
        self.abort();
        let _ = self.task.await;
        tokio::time::timeout(within, self.writes.wait())
            .await
            .is_ok()
    }
}

/// Awaiting [`Commands`] waits until it takes no more commands (after
/// [`Commands::abort`], or when the bus closes).
impl IntoFuture for Commands {
    type Output = ();
    type IntoFuture = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let _ = self.task.await;
        })
    }
}

/// Subscribes to every command topic and serves them until the bus closes
/// or [`Commands::abort`] (a config reload); `None` when there are no
/// commands.
pub async fn run(
    config: &Config,
    bus: Bus,
    devices: Devices,
) -> Result<Option<Commands>, crate::bus::BusError> {
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
    let stop = CancellationToken::new();
    let writes = TaskTracker::new();
    let server = Server {
        routes,
        bus,
        devices,
        writes: writes.clone(),
        room: Arc::new(Semaphore::new(WRITES_IN_FLIGHT)),
    };
    let task = tokio::spawn(server.serve(sub, stop.clone()));
    Ok(Some(Commands { stop, writes, task }))
}

struct Server {
    routes: HashMap<String, Route>,
    bus: Bus,
    devices: Devices,
    writes: TaskTracker,
    room: Arc<Semaphore>,
}

impl Server {
    async fn serve(self, mut sub: Subscription, stop: CancellationToken) {
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => break,
                msg = sub.recv() => match msg {
                    Some(m) => m,
                    None => break,
                },
            };
            let Some(route) = self.routes.get(&msg.topic) else {
                continue;
            };
            let permit = tokio::select! {
                _ = stop.cancelled() => break,
                permit = self.room.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    // Never closed: the server owns the semaphore.
                    Err(_) => break,
                },
            };
            let write = write(
                self.devices.clone(),
                self.bus.clone(),
                route.clone(),
                msg.payload,
            );
            self.writes.spawn(async move {
                write.await;
                drop(permit);
            });
        }
        self.writes.close();
    }
}

/// Carries out one command and publishes its result.
async fn write(devices: Devices, bus: Bus, route: Route, payload: bytes::Bytes) {
    let Route {
        device,
        point,
        ty,
        result_topic,
    } = route;
    let value = parse_payload(&payload).and_then(|v| match ty {
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
