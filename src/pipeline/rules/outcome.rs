//! What one call of the rules produced, so the runtime can act on it and
//! `edgebridge rules test` can compare it with a fixture.

use std::fmt;
use std::sync::Arc;

use crate::model::{Message, Reading, Value};

/// A `write(device, point, value)` a rule made, with the device's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    pub device: String,
    pub point: String,
    pub value: Value,
    /// The device's answer as the rule saw it (`r.error` is its text).
    pub result: Result<(), String>,
}

/// Why a rule call failed. It has been logged and counted already.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureKind {
    /// A runtime error: a type error, a missing key, a sandbox limit.
    Error,
    /// The call ran past its wall-clock deadline and was stopped.
    Deadline,
}

/// One failed call: where it failed and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The rule file's name, e.g. `pv.rhai`.
    pub file: Arc<str>,
    /// The handler the gateway called, e.g. `on_reading`.
    pub function: &'static str,
    /// 1-based; 0 when rhai did not say.
    pub line: usize,
    pub column: usize,
    pub message: String,
    pub kind: FailureKind,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}: {}", self.file, self.function, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}: {}",
                self.file, self.line, self.column, self.function, self.message
            )
        }
    }
}

/// Messages, writes and failures of one call into the rules.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// `publish(...)` calls, in call order.
    pub publishes: Vec<Message>,
    /// `write(...)` calls, in call order; already executed.
    pub writes: Vec<Write>,
    /// Calls that failed; each was logged and counted when it happened.
    pub failures: Vec<Failure>,
}

impl Outcome {
    pub(crate) fn absorb(&mut self, publishes: Vec<Message>, writes: Vec<Write>) {
        self.publishes.extend(publishes);
        self.writes.extend(writes);
    }
}

/// What happens to a reading after `on_reading`.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// No rule changed it; the mappings see the original.
    Unchanged,
    /// A rule returned a changed map; the mappings see this reading.
    Changed(Reading),
    /// A rule returned `false`; no mappings for this reading.
    Dropped,
}

impl Verdict {
    /// The reading the mappings should see, if any.
    pub fn into_reading(self, original: Reading) -> Option<Reading> {
        match self {
            Verdict::Unchanged => Some(original),
            Verdict::Changed(r) => Some(r),
            Verdict::Dropped => None,
        }
    }
}

/// The result of [`super::Rules::on_reading`].
#[derive(Debug, Clone, PartialEq)]
pub struct ReadingOutcome {
    pub verdict: Verdict,
    pub outcome: Outcome,
}

/// The result of [`super::Rules::on_line`]: readings parsed from the line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LineOutcome {
    pub readings: Vec<Reading>,
    pub outcome: Outcome,
}
