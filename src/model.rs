//! The values that flow through the gateway: a [`Reading`] is born in a
//! driver, the pipeline turns it into [`Message`]s for the broker, and a
//! [`Command`] travels the other way, from a topic to a device write.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
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
pub type CommandResult = Result<(), String>;

/// A write to one point of one device.
#[derive(Debug)]
pub struct Command {
    pub device: String,
    pub point: String,
    pub value: Value,
    /// Where the driver reports the outcome; `None` when nobody waits.
    pub reply: Option<oneshot::Sender<CommandResult>>,
}
