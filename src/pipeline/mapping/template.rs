//! The `{placeholder}` template grammar of mappings, in one place: the
//! config check ([`Template::parse`]'s errors) and the mappings (its
//! parts) read a template the same way.

use std::fmt::{self, Write};

use crate::model::{Reading, Value};

/// What a placeholder stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Device,
    Point,
    Gateway,
    Value,
    Unit,
    Ts,
}

impl Field {
    /// The placeholders a topic may use.
    pub const TOPIC: &'static [Field] = &[Field::Device, Field::Point, Field::Gateway];
    /// The placeholders a payload template may use.
    pub const PAYLOAD: &'static [Field] = &[
        Field::Value,
        Field::Unit,
        Field::Ts,
        Field::Device,
        Field::Point,
        Field::Gateway,
    ];

    fn name(self) -> &'static str {
        match self {
            Field::Device => "device",
            Field::Point => "point",
            Field::Gateway => "gateway",
            Field::Value => "value",
            Field::Unit => "unit",
            Field::Ts => "ts",
        }
    }
}

/// Why a template was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unclosed `{{` in `{template}`")]
    Unclosed { template: String },
    #[error("unknown placeholder `{{{name}}}`; use {}", Allowed(.allowed))]
    Unknown {
        name: String,
        allowed: &'static [Field],
    },
}

/// `{device} {point} …`, for the error text.
struct Allowed(&'static [Field]);

impl fmt::Display for Allowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, field) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_char(' ')?;
            }
            write!(f, "{{{}}}", field.name())?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Lit(String),
    Field(Field),
}

/// A `{placeholder}` template, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Template(Vec<Part>);

impl Template {
    /// Parses `t`: text with `{name}` placeholders, each one of `allowed`.
    pub fn parse(t: &str, allowed: &'static [Field]) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = t;
        while let Some(open) = rest.find('{') {
            let Some(close) = rest[open..].find('}') else {
                return Err(TemplateError::Unclosed {
                    template: t.to_string(),
                });
            };
            if open > 0 {
                parts.push(Part::Lit(rest[..open].to_string()));
            }
            let name = &rest[open + 1..open + close];
            let field = allowed
                .iter()
                .copied()
                .find(|f| f.name() == name)
                .ok_or_else(|| TemplateError::Unknown {
                    name: name.to_string(),
                    allowed,
                })?;
            parts.push(Part::Field(field));
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_string()));
        }
        Ok(Template(parts))
    }

    /// A template without placeholders: `t` as it is.
    pub fn literal(t: &str) -> Template {
        Template(vec![Part::Lit(t.to_string())])
    }

    /// Appends the template filled in for `r` to `out`.
    pub fn render(&self, out: &mut String, r: &Reading, gateway: &str, value: &Value, unit: &str) {
        for p in &self.0 {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Field(Field::Device) => out.push_str(&r.device),
                Part::Field(Field::Point) => out.push_str(&r.point),
                Part::Field(Field::Gateway) => out.push_str(gateway),
                Part::Field(Field::Value) => {
                    let _ = write!(out, "{value}");
                }
                Part::Field(Field::Unit) => out.push_str(unit),
                Part::Field(Field::Ts) => {
                    let _ = write!(out, "{}", r.ts);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::Quality;

    fn render(t: &Template) -> String {
        let r = Reading {
            device: Arc::from("pv"),
            point: Arc::from("power"),
            value: Value::Int(0),
            unit: None,
            ts: 17,
            quality: Quality::Good,
        };
        let mut out = String::new();
        t.render(&mut out, &r, "gw", &Value::Float(2.5), "kW");
        out
    }

    #[test]
    fn fills_in_every_placeholder() {
        let t = Template::parse(
            "{gateway}/{device}.{point}={value}{unit}@{ts}!",
            Field::PAYLOAD,
        )
        .unwrap();
        assert_eq!(render(&t), "gw/pv.power=2.5kW@17!");
        assert_eq!(
            render(&Template::parse("plain", Field::TOPIC).unwrap()),
            "plain"
        );
        assert_eq!(render(&Template::literal("{x}")), "{x}");
    }

    #[test]
    fn refuses_unknown_and_unclosed_placeholders() {
        let e = Template::parse("a/{value}", Field::TOPIC).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown placeholder `{value}`; use {device} {point} {gateway}"
        );
        let e = Template::parse("{nope}", Field::PAYLOAD).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown placeholder `{nope}`; use {value} {unit} {ts} {device} {point} {gateway}"
        );
        let e = Template::parse("a/{device", Field::TOPIC).unwrap_err();
        assert_eq!(e.to_string(), "unclosed `{` in `a/{device`");
    }
}
