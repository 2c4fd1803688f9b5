//! The values that flow through the gateway: a [`Reading`] is born in a
//! driver, the pipeline turns it into [`Message`]s for the broker, and a
//! [`Command`] travels the other way, from a topic to a device write.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// Current wall-clock time in milliseconds since the Unix epoch.
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// One decoded value of a point.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Value {
    Bool(bool),
    Int(i64),
    /// Unsigned values that do not fit an `i64` (u64 registers).
    UInt(u64),
    Float(f64),
    Text(String),
}

impl Value {
    /// The value as a number, if it is one (bools count as 0/1).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
            Value::Int(i) => Some(*i as f64),
            Value::UInt(u) => Some(*u as f64),
            Value::Float(f) => Some(*f),
            Value::Text(_) => None,
        }
    }

    /// The value as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Int(i) => serde_json::Value::from(*i),
            Value::UInt(u) => serde_json::Value::from(*u),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Value::Text(s) => serde_json::Value::String(s.clone()),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::UInt(u) => write!(f, "{u}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Text(s) => f.write_str(s),
        }
    }
}

/// Whether a reading is trustworthy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Quality {
    Good,
    /// The point could not be read; the string says why.
    Bad(String),
}

/// One value of one point of one device at one time.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub device: Arc<str>,
    pub point: Arc<str>,
    pub value: Value,
    pub unit: Option<Arc<str>>,
    pub ts: Millis,
    pub quality: Quality,
}

/// A reading as JSON, `{"value":…,"unit":"…","ts":<ms>}`: what a
/// `payload: json` mapping publishes and what a bridge recognises as a
/// reading (OneNET posts its `value` at its `ts`). A bad-quality reading
/// has `"value":null` and its `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadingJson {
    /// `null` when the reading is bad; a missing `value` reads as `null`.
    #[serde(default)]
    pub value: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    pub ts: Millis,
}

impl ReadingJson {
    /// `r` with `value` and `unit` as a mapping transformed them (an
    /// empty unit is left out).
    pub fn new(r: &Reading, value: &Value, unit: &str) -> ReadingJson {
        let (value, error) = match &r.quality {
            Quality::Good => (value.to_json(), None),
            Quality::Bad(e) => (serde_json::Value::Null, Some(e.clone())),
        };
        ReadingJson {
            value,
            error,
            unit: (!unit.is_empty()).then(|| unit.to_string()),
            ts: r.ts,
        }
    }

    /// Reads a payload in this shape; `None` for anything else (other
    /// keys, no `ts`, not an object).
    pub fn parse(json: &serde_json::Value) -> Option<ReadingJson> {
        if !json.is_object() {
            return None;
        }
        ReadingJson::deserialize(json).ok()
    }

    /// Whether the reading is good (it has no `error`).
    pub fn is_good(&self) -> bool {
        self.error.is_none()
    }

    /// The JSON text.
    pub fn to_bytes(&self) -> Bytes {
        // Serialising a struct of strings, numbers and JSON values into
        // memory cannot fail.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }
}

/// All readings of one poll of one device; they share one timestamp.
pub type ReadingBatch = Vec<Reading>;

/// MQTT quality of service, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Qos {
    #[default]
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl Qos {
    pub fn from_u8(q: u8) -> Option<Qos> {
        match q {
            0 => Some(Qos::AtMostOnce),
            1 => Some(Qos::AtLeastOnce),
            2 => Some(Qos::ExactlyOnce),
            _ => None,
        }
    }
}

/// A message to publish on the embedded broker.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: Qos,
    pub retain: bool,
}

impl Message {
    pub fn new(topic: impl Into<String>, payload: impl Into<Bytes>) -> Message {
        Message {
            topic: topic.into(),
            payload: payload.into(),
            qos: Qos::AtMostOnce,
            retain: false,
        }
    }

    pub fn retained(mut self) -> Message {
        self.retain = true;
        self
    }
}

/// The outcome of a device write.
pub type CommandResult = Result<(), WriteError>;

/// Why a device write did not happen. The texts are what a command's
/// result topic and a rule's `write()` report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    #[error("no device named `{0}`")]
    NoSuchDevice(String),
    /// A shared bus's task was handed a device it does not serve.
    #[error("no device named `{0}` on this bus")]
    NotOnBus(String),
    #[error("device `{0}` is not running")]
    NotRunning(String),
    #[error("device `{0}` dropped the command")]
    Dropped(String),
    #[error("device `{device}` did not answer within {}s", .after.as_secs())]
    Timeout { device: String, after: Duration },
    /// The device's connection is down; the text says why.
    #[error("device unreachable: {0}")]
    Unreachable(String),
    #[error("device `{device}` has no point `{point}`")]
    NoSuchPoint { device: String, point: String },
    #[error("point `{device}/{point}` is read-only (set `writable: true` on it to allow writes)")]
    ReadOnly { device: String, point: String },
    #[error("point `{device}/{point}` is in the {table} table, which Modbus cannot write")]
    ReadOnlyTable {
        device: String,
        point: String,
        table: &'static str,
    },
    #[error("device `{0}` is a serial-line device and cannot be written")]
    ReadOnlyDriver(String),
    /// The value does not fit the point (its type, range or bit).
    #[error("`{device}/{point}`: {reason}")]
    Encode {
        device: String,
        point: String,
        reason: String,
    },
    /// The device refused the request or did not answer it.
    #[error("write to `{device}/{point}` failed: {reason}")]
    Failed {
        device: String,
        point: String,
        reason: String,
    },
    #[error(transparent)]
    Value(#[from] ValueError),
    /// In somebody else's words (a test double, a writer elsewhere).
    #[error("{0}")]
    Other(String),
}

impl From<String> for WriteError {
    fn from(s: String) -> WriteError {
        WriteError::Other(s)
    }
}

impl From<&str> for WriteError {
    fn from(s: &str) -> WriteError {
        WriteError::Other(s.to_string())
    }
}

/// Why a command payload is not a value for a point.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("payload is not UTF-8 text")]
    NotUtf8,
    #[error("empty payload")]
    Empty,
    #[error("JSON payload needs a \"value\" key")]
    NoValueKey,
    #[error("number {0} out of range")]
    OutOfRange(String),
    #[error("unsupported value {0}")]
    Unsupported(String),
    #[error("`{0}` is not a boolean (use on/off, true/false, 1/0)")]
    NotBool(String),
    #[error("`{0}` is not a number")]
    NotNumber(String),
}

/// A write to one point of one device.
#[derive(Debug)]
pub struct Command {
    pub device: String,
    pub point: String,
    pub value: Value,
    /// Where the driver reports the outcome; `None` when nobody waits.
    pub reply: Option<oneshot::Sender<CommandResult>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(quality: Quality) -> Reading {
        Reading {
            device: Arc::from("pv"),
            point: Arc::from("power"),
            value: Value::Float(2500.0),
            unit: Some(Arc::from("W")),
            ts: 1_700_000_000_123,
            quality,
        }
    }

    #[test]
    fn reading_json_round_trips() {
        let good = ReadingJson::new(&reading(Quality::Good), &Value::Float(2.5), "kW");
        let text = String::from_utf8(good.to_bytes().to_vec()).unwrap();
        assert_eq!(text, r#"{"value":2.5,"unit":"kW","ts":1700000000123}"#);
        let back = ReadingJson::parse(&serde_json::from_str(&text).unwrap()).unwrap();
        assert!(back.is_good());
        assert_eq!(back, good);

        let bad = ReadingJson::new(&reading(Quality::Bad("timeout".into())), &Value::Int(0), "");
        let text = String::from_utf8(bad.to_bytes().to_vec()).unwrap();
        assert_eq!(
            text,
            r#"{"value":null,"error":"timeout","ts":1700000000123}"#
        );
        let back = ReadingJson::parse(&serde_json::from_str(&text).unwrap()).unwrap();
        assert!(!back.is_good());
    }

    #[test]
    fn other_json_is_not_a_reading() {
        for other in [
            r#"{"value":1,"ts":5,"other":2}"#,
            r#"{"value":1}"#,
            r#"{"value":1,"ts":1.5}"#,
            r#"[1,2]"#,
            "3",
        ] {
            let json = serde_json::from_str(other).unwrap();
            assert_eq!(ReadingJson::parse(&json), None, "{other}");
        }
    }

    #[test]
    fn write_errors_say_what_went_wrong() {
        let e = WriteError::Timeout {
            device: "plc".into(),
            after: Duration::from_secs(10),
        };
        assert_eq!(e.to_string(), "device `plc` did not answer within 10s");
        let e = WriteError::ReadOnly {
            device: "plc".into(),
            point: "temp".into(),
        };
        assert!(e.to_string().contains("is read-only"));
        let e: WriteError = ValueError::NotNumber("x".into()).into();
        assert_eq!(e.to_string(), "`x` is not a number");
        assert_eq!(WriteError::from("timeout").to_string(), "timeout");
    }
}
