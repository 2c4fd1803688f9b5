//! Mappings: a reading becomes zero or more messages. Templates are parsed
//! once at start; applying a mapping only fills in the parts.

mod template;

use std::sync::{Arc, RwLock};

use bytes::Bytes;

use crate::config::{MappingConfig, PayloadFormat};
use crate::model::{Message, Qos, Quality, Reading, ReadingJson, Value};
pub use template::{Field, Template, TemplateError};

/// `device/point` with `*` per segment.
#[derive(Debug, Clone)]
struct Pattern {
    device: Option<String>,
    point: Option<String>,
}

impl Pattern {
    fn parse(p: &str) -> Pattern {
        let (d, pt) = p.split_once('/').unwrap_or((p, "*"));
        let seg = |s: &str| (s != "*").then(|| s.to_string());
        Pattern {
            device: seg(d),
            point: seg(pt),
        }
    }

    fn matches(&self, r: &Reading) -> bool {
        self.device.as_deref().is_none_or(|d| d == &*r.device)
            && self.point.as_deref().is_none_or(|p| p == &*r.point)
    }
}

#[derive(Debug, Clone)]
struct Mapping {
    pattern: Pattern,
    topic: Template,
    payload: Payload,
    qos: Qos,
    retain: bool,
    continue_matching: bool,
    scale: Option<f64>,
    decimals: Option<u8>,
    unit: Option<String>,
}

#[derive(Debug, Clone)]
enum Payload {
    Value,
    Json,
    Template(Template),
}

/// All mappings of a config, in order. Clones share one set, which a
/// config reload replaces with [`Mappings::replace`]: every holder (the
/// pipeline, the rules thread) applies the new set from its next reading.
#[derive(Debug, Clone)]
pub struct Mappings {
    // A std lock: held only to clone the `Arc`, never across an await.
    current: Arc<RwLock<Arc<Vec<Mapping>>>>,
    gateway: String,
}

impl Mappings {
    pub fn new(configs: &[MappingConfig], gateway_id: &str) -> Mappings {
        Mappings {
            gateway: gateway_id.to_string(),
            current: Arc::new(RwLock::new(Arc::new(compile(configs)))),
        }
    }

    /// Replaces the set for every clone of this `Mappings`.
    pub fn replace(&self, configs: &[MappingConfig]) {
        let list = Arc::new(compile(configs));
        // A poisoned lock only means a panic elsewhere; the value is whole.
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = list;
    }

    /// Appends the messages for `r` to `out`: first match wins unless the
    /// mapping says `continue: true`. A reading of bad quality is only
    /// published by `json` mappings, with its error.
    pub fn apply(&self, r: &Reading, out: &mut Vec<Message>) {
        let list = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for m in list.iter() {
            if !m.pattern.matches(r) {
                continue;
            }
            if let Some(msg) = m.message(r, &self.gateway) {
                out.push(msg);
            }
            if !m.continue_matching {
                break;
            }
        }
    }
}

/// Parses a template of a validated config. Validation refused the
/// templates that do not parse; were one to get here, it stays literal.
fn template(t: &str, allowed: &'static [Field]) -> Template {
    Template::parse(t, allowed).unwrap_or_else(|_| Template::literal(t))
}

fn compile(configs: &[MappingConfig]) -> Vec<Mapping> {
    configs
        .iter()
        .map(|m| Mapping {
            pattern: Pattern::parse(&m.pattern),
            topic: template(&m.topic, Field::TOPIC),
            payload: match &m.payload {
                PayloadFormat::Value => Payload::Value,
                PayloadFormat::Json => Payload::Json,
                PayloadFormat::Template(t) => Payload::Template(template(t, Field::PAYLOAD)),
            },
            qos: m.qos.0,
            retain: m.retain,
            continue_matching: m.continue_matching,
            scale: m.scale,
            decimals: m.decimals,
            unit: m.unit.clone(),
        })
        .collect()
}

impl Mapping {
    fn message(&self, r: &Reading, gateway: &str) -> Option<Message> {
        let value = self.transform(&r.value);
        let unit = self
            .unit
            .as_deref()
            .or(r.unit.as_deref())
            .unwrap_or_default();
        let payload = match (&self.payload, &r.quality) {
            (Payload::Json, _) => ReadingJson::new(r, &value, unit).to_bytes(),
            (_, Quality::Bad(_)) => return None,
            (Payload::Value, _) => Bytes::from(value.to_string()),
            (Payload::Template(t), _) => {
                let mut s = String::new();
                t.render(&mut s, r, gateway, &value, unit);
                Bytes::from(s)
            }
        };
        let mut topic = String::with_capacity(32);
        self.topic.render(&mut topic, r, gateway, &value, unit);
        Some(Message {
            topic,
            payload,
            qos: self.qos,
            retain: self.retain,
        })
    }

    fn transform(&self, v: &Value) -> Value {
        if self.scale.is_none() && self.decimals.is_none() {
            return v.clone();
        }
        let Some(mut x) = (match v {
            Value::Bool(_) | Value::Text(_) => None,
            other => other.as_f64(),
        }) else {
            return v.clone();
        };
        if let Some(s) = self.scale {
            x *= s;
        }
        if let Some(d) = self.decimals {
            let f = 10f64.powi(d as i32);
            x = (x * f).round() / f;
        }
        Value::Float(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(device: &str, point: &str, value: Value) -> Reading {
        Reading {
            device: Arc::from(device),
            point: Arc::from(point),
            value,
            unit: Some(Arc::from("W")),
            ts: 1_700_000_000_000,
            quality: Quality::Good,
        }
    }

    fn mappings(yaml: &str) -> Mappings {
        let cfg: Vec<MappingConfig> = serde_yaml::from_str(yaml).unwrap();
        Mappings::new(&cfg, "gw-1")
    }

    fn apply(m: &Mappings, r: &Reading) -> Vec<(String, String)> {
        let mut out = Vec::new();
        m.apply(r, &mut out);
        out.into_iter()
            .map(|m| (m.topic, String::from_utf8(m.payload.to_vec()).unwrap()))
            .collect()
    }

    #[test]
    fn first_match_wins_unless_continue() {
        let m = mappings(
            "- { match: pv/power, topic: PV/data }\n- { match: '*/*', topic: 'devices/{device}/{point}' }\n",
        );
        let r = reading("pv", "power", Value::Float(2.5));
        assert_eq!(apply(&m, &r), vec![("PV/data".into(), "2.5".into())]);
        let m = mappings(
            "- { match: pv/power, topic: PV/data, continue: true }\n- { match: '*/*', topic: 'devices/{device}/{point}' }\n",
        );
        assert_eq!(apply(&m, &r).len(), 2);
        let other = reading("meter", "energy", Value::Int(7));
        assert_eq!(
            apply(&m, &other),
            vec![("devices/meter/energy".into(), "7".into())]
        );
    }

    #[test]
    fn json_payload_shape() {
        let m = mappings("- { match: '*/*', topic: 'x/{gateway}', payload: json }\n");
        let out = apply(&m, &reading("pv", "power", Value::Float(2.5)));
        assert_eq!(out[0].0, "x/gw-1");
        let v: serde_json::Value = serde_json::from_str(&out[0].1).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"value": 2.5, "unit": "W", "ts": 1_700_000_000_000i64})
        );
    }

    #[test]
    fn template_payload_and_scale() {
        let m = mappings(
            "- { match: 'pv/*', topic: t, payload: '{device}.{point}={value}{unit}@{ts}', scale: 0.001, decimals: 2, unit: kW }\n",
        );
        let out = apply(&m, &reading("pv", "power", Value::Float(2345.0)));
        assert_eq!(out[0].1, "pv.power=2.35kW@1700000000000");
    }

    #[test]
    fn bad_quality_only_in_json() {
        let m = mappings("- { match: '*/*', topic: a, continue: true }\n- { match: '*/*', topic: b, payload: json }\n");
        let mut r = reading("pv", "power", Value::Float(0.0));
        r.quality = Quality::Bad("timeout".into());
        let out = apply(&m, &r);
        assert_eq!(out.len(), 1);
        assert!(out[0].1.contains("\"error\":\"timeout\""));
    }

    #[test]
    fn bool_values_print_true_false() {
        let m = mappings("- { match: '*/sunshine', topic: PV/sunshine }\n");
        assert_eq!(
            apply(&m, &reading("pv", "sunshine", Value::Bool(true)))[0].1,
            "true"
        );
    }

    #[test]
    fn replace_reaches_every_clone() {
        let m = mappings("- { match: a/p, topic: old }");
        let held_elsewhere = m.clone();
        let r = reading("a", "p", Value::Int(1));
        assert_eq!(apply(&held_elsewhere, &r), [("old".into(), "1".into())]);
        let new: Vec<MappingConfig> =
            serde_yaml::from_str("- { match: a/p, topic: 'new/{device}' }").unwrap();
        m.replace(&new);
        assert_eq!(apply(&held_elsewhere, &r), [("new/a".into(), "1".into())]);
    }
}
