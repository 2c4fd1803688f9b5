//! `edgebridge rules test`: YAML fixtures that feed readings, messages and
//! serial lines to the rules, with no device or broker, and compare what
//! the rules published and wrote with what the fixture expects.
//!
//! ```yaml
//! rules: [pv.rhai]            # optional; default: every *.rhai next to the fixture
//! tests:
//!   - name: power is published in kW
//!     steps:
//!       - reading: { device: demo-pv, point: power, value: 2500, unit: W, ts: 0 }
//!         publishes:
//!           - { topic: PV/data, payload: "2.5", qos: 1, retain: true }
//!         result: dropped     # unchanged | dropped | { value: 2.5, unit: kW }
//! ```
//!
//! Each test starts from freshly compiled rules (empty `state`, `on_start`
//! run). An expectation that is left out is not checked; `publishes: []`
//! checks that nothing was published. A rule failure fails the step unless
//! the step lists it under `errors`.

use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::load;
use super::outcome::{Failure, Outcome, Verdict, Write};
use super::runner::Rules;
use crate::model::{Message, Millis, Qos, Quality, Reading, Value};

/// The deadline of one call under `rules test`. Fixtures check what rules
/// do, not how fast: a generous deadline keeps them from failing on a busy
/// machine, and still stops an endless loop.
pub const DEADLINE: Duration = Duration::from_secs(1);

/// Fixture files are named like this, next to the rules.
pub const FIXTURE_SUFFIX: &str = ".test.yaml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fixture {
    /// Rule files to load, relative to the fixture; default: all in its folder.
    #[serde(default)]
    rules: Option<Vec<PathBuf>>,
    tests: Vec<TestCase>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestCase {
    name: String,
    /// Expectations for what `on_start` does (a step without an input).
    #[serde(default)]
    start: Option<Step>,
    #[serde(default)]
    steps: Vec<Step>,
}

/// One step: an input (`reading`, `message`, `line`) and what it should
/// produce. A test's `start:` is a step without an input: what `on_start`
/// should produce.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    #[serde(default)]
    reading: Option<ReadingInput>,
    #[serde(default)]
    message: Option<MessageInput>,
    #[serde(default)]
    line: Option<LineInput>,
    /// What `now_ms()` returns; default: the input's `ts`, else the last value.
    #[serde(default)]
    now: Option<Millis>,
    #[serde(default)]
    publishes: Option<Vec<ExpectedPublish>>,
    #[serde(default)]
    writes: Option<Vec<ExpectedWrite>>,
    /// For readings: `unchanged`, `dropped`, or the changed fields.
    #[serde(default)]
    result: Option<serde_yaml::Value>,
    /// For lines: the readings `on_line` returned.
    #[serde(default)]
    readings: Option<Vec<ExpectedLineReading>>,
    /// Expected rule failures, each a part of the failure's text.
    #[serde(default)]
    errors: Option<Vec<String>>,
}

impl Step {
    fn has_input(&self) -> bool {
        self.reading.is_some()
            || self.message.is_some()
            || self.line.is_some()
            || self.now.is_some()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadingInput {
    device: String,
    point: String,
    value: serde_yaml::Value,
    #[serde(default)]
    unit: Option<String>,
    #[serde(default)]
    ts: Option<Millis>,
    /// `good` (default) or `bad`.
    #[serde(default)]
    quality: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageInput {
    topic: String,
    /// A string is sent as it is; a map or list as JSON.
    payload: serde_yaml::Value,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LineInput {
    device: String,
    line: String,
    #[serde(default)]
    ts: Option<Millis>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectedPublish {
    topic: String,
    /// A string (or number/bool) is compared as text; a map or list as JSON.
    payload: serde_yaml::Value,
    #[serde(default)]
    qos: Option<u8>,
    #[serde(default)]
    retain: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectedWrite {
    device: String,
    point: String,
    value: serde_yaml::Value,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectedLineReading {
    point: String,
    value: serde_yaml::Value,
    #[serde(default)]
    unit: Option<String>,
}

/// The outcome of one test case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseReport {
    pub name: String,
    /// Empty when the test passed; otherwise a readable explanation.
    pub problems: Vec<String>,
}

/// The outcome of one fixture file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileReport {
    pub path: PathBuf,
    /// A fixture that could not be read or whose rules do not compile.
    pub error: Option<String>,
    pub cases: Vec<CaseReport>,
}

/// The outcome of a whole `rules test` run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub files: Vec<FileReport>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.failed() == 0 && !self.files.is_empty()
    }

    /// Failed cases plus fixtures that could not run.
    pub fn failed(&self) -> usize {
        self.files
            .iter()
            .map(|f| {
                usize::from(f.error.is_some())
                    + f.cases.iter().filter(|c| !c.problems.is_empty()).count()
            })
            .sum()
    }

    pub fn cases(&self) -> usize {
        self.files.iter().map(|f| f.cases.len()).sum()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for file in &self.files {
            writeln!(f, "{}", file.path.display())?;
            if let Some(e) = &file.error {
                for line in e.lines() {
                    writeln!(f, "  ERROR {line}")?;
                }
            }
            for case in &file.cases {
                if case.problems.is_empty() {
                    writeln!(f, "  ok    {}", case.name)?;
                } else {
                    writeln!(f, "  FAIL  {}", case.name)?;
                    for p in &case.problems {
                        for line in p.lines() {
                            writeln!(f, "        {line}")?;
                        }
                    }
                }
            }
        }
        if self.files.is_empty() {
            write!(f, "no rule test fixtures (*{FIXTURE_SUFFIX}) found")
        } else {
            write!(
                f,
                "{} test{}, {} failed",
                self.cases(),
                if self.cases() == 1 { "" } else { "s" },
                self.failed()
            )
        }
    }
}

/// The fixtures of `dir`: every `*.test.yaml`, sorted.
pub fn discover(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_fixture = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(FIXTURE_SUFFIX));
        if is_fixture && path.is_file() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Runs fixture files (a folder stands for its `*.test.yaml` files), on
/// a thread with the stack the gateway gives its rules.
pub fn run(paths: &[PathBuf], deadline: Duration) -> Report {
    let paths = paths.to_vec();
    let worker = std::thread::Builder::new()
        .name("rules-test".into())
        .stack_size(super::sandbox::RULES_STACK_SIZE)
        .spawn(move || run_here(&paths, deadline));
    match worker.map(|t| t.join()) {
        Ok(Ok(report)) => report,
        Ok(Err(_)) | Err(_) => Report {
            files: vec![FileReport {
                path: PathBuf::new(),
                error: Some("the rule tests could not run (thread failed)".into()),
                cases: Vec::new(),
            }],
        },
    }
}

fn run_here(paths: &[PathBuf], deadline: Duration) -> Report {
    let mut report = Report::default();
    for p in paths {
        if p.is_dir() {
            match discover(p) {
                Ok(found) => {
                    for f in found {
                        report.files.push(run_file(&f, deadline));
                    }
                }
                Err(e) => report.files.push(FileReport {
                    path: p.clone(),
                    error: Some(format!("cannot read folder: {e}")),
                    cases: Vec::new(),
                }),
            }
        } else {
            report.files.push(run_file(p, deadline));
        }
    }
    report
}

/// Runs one fixture file.
pub fn run_file(path: &Path, deadline: Duration) -> FileReport {
    let mut report = FileReport {
        path: path.to_path_buf(),
        error: None,
        cases: Vec::new(),
    };
    let fixture = match read_fixture(path) {
        Ok(f) => f,
        Err(e) => {
            report.error = Some(e);
            return report;
        }
    };
    let sources = match rule_sources(path, &fixture) {
        Ok(s) => s,
        Err(e) => {
            report.error = Some(e);
            return report;
        }
    };
    for case in &fixture.tests {
        report.cases.push(run_case(case, &sources, deadline));
    }
    report
}

fn read_fixture(path: &Path) -> Result<Fixture, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    serde_yaml::from_str(&text).map_err(|e| match e.location() {
        Some(l) => {
            let msg = e.to_string();
            let msg = msg.rfind(" at line ").map_or(msg.as_str(), |i| &msg[..i]);
            format!("{}:{}:{}: {msg}", path.display(), l.line(), l.column())
        }
        None => format!("{}: {e}", path.display()),
    })
}

fn rule_sources(path: &Path, fixture: &Fixture) -> Result<Vec<(PathBuf, String)>, String> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let paths = match &fixture.rules {
        Some(list) => list.iter().map(|p| dir.join(p)).collect(),
        None => load::rule_files(&dir).map_err(|e| e.to_string())?,
    };
    load::read_sources(&paths).map_err(|e| e.to_string())
}

fn run_case(case: &TestCase, sources: &[(PathBuf, String)], deadline: Duration) -> CaseReport {
    let mut report = CaseReport {
        name: case.name.clone(),
        problems: Vec::new(),
    };
    let mut rules = match Rules::from_sources(sources.to_vec(), deadline) {
        Ok(r) => r,
        Err(e) => {
            report
                .problems
                .push(format!("the rules do not compile:\n{e}"));
            return report;
        }
    };
    let mut clock: Millis = 0;
    rules.set_clock(Some(clock));
    let started = rules.start();
    let default = Step::default();
    let expect_start = case.start.as_ref().unwrap_or(&default);
    let mut problems = check(expect_start, &started, None, None);
    if expect_start.has_input() {
        problems.push(
            "`start` only says what `on_start` does: move `reading`, `message`, `line` \
             and `now` to a step"
                .into(),
        );
    }
    if !problems.is_empty() {
        report
            .problems
            .push(format!("on_start:\n{}", indent(&problems.join("\n"))));
    }

    for (i, step) in case.steps.iter().enumerate() {
        let (label, result) = match run_step(&mut rules, step, &mut clock) {
            Ok(r) => r,
            Err(e) => {
                report.problems.push(format!("step {}: {e}", i + 1));
                continue;
            }
        };
        let problems = check(
            step,
            &result.outcome,
            result.verdict.as_ref(),
            result.readings.as_deref(),
        );
        if !problems.is_empty() {
            report.problems.push(format!(
                "step {} ({label}):\n{}",
                i + 1,
                indent(&problems.join("\n"))
            ));
        }
    }
    report
}

struct StepResult {
    outcome: Outcome,
    verdict: Option<(Reading, Verdict)>,
    readings: Option<Vec<Reading>>,
}

fn run_step(
    rules: &mut Rules,
    step: &Step,
    clock: &mut Millis,
) -> Result<(String, StepResult), String> {
    let inputs = [
        step.reading.is_some(),
        step.message.is_some(),
        step.line.is_some(),
    ];
    if inputs.iter().filter(|x| **x).count() != 1 {
        return Err("a step needs exactly one of `reading`, `message` or `line`".into());
    }
    let input_ts = step
        .reading
        .as_ref()
        .and_then(|r| r.ts)
        .or(step.line.as_ref().and_then(|l| l.ts));
    if let Some(now) = step.now.or(input_ts) {
        *clock = now;
    }
    rules.set_clock(Some(*clock));

    if let Some(r) = &step.reading {
        let reading = Reading {
            device: Arc::from(r.device.as_str()),
            point: Arc::from(r.point.as_str()),
            value: yaml_value(&r.value)?,
            unit: r.unit.as_deref().map(Arc::from),
            ts: r.ts.unwrap_or(*clock),
            quality: match r.quality.as_deref() {
                None | Some("good") => Quality::Good,
                Some("bad") => Quality::Bad("from the fixture".into()),
                Some(q) => return Err(format!("quality `{q}`: use good or bad")),
            },
        };
        let label = format!(
            "reading {}/{} = {} at ts {}",
            reading.device, reading.point, reading.value, reading.ts
        );
        let out = rules.on_reading(&reading);
        return Ok((
            label,
            StepResult {
                outcome: out.outcome,
                verdict: Some((reading, out.verdict)),
                readings: None,
            },
        ));
    }
    if let Some(m) = &step.message {
        let payload = match &m.payload {
            serde_yaml::Value::String(s) => s.clone().into_bytes(),
            serde_yaml::Value::Mapping(_) | serde_yaml::Value::Sequence(_) => {
                yaml_to_json(&m.payload)?.to_string().into_bytes()
            }
            other => yaml_value(other)?.to_string().into_bytes(),
        };
        let label = format!(
            "message {} {:?}",
            m.topic,
            String::from_utf8_lossy(&payload)
        );
        let outcome = rules.on_message(&m.topic, &payload);
        return Ok((
            label,
            StepResult {
                outcome,
                verdict: None,
                readings: None,
            },
        ));
    }
    let Some(l) = &step.line else {
        return Err("a step needs `reading`, `message` or `line`".into());
    };
    let label = format!("line from {}: {:?}", l.device, l.line);
    let out = rules.on_line(&l.device, &l.line, l.ts.unwrap_or(*clock));
    Ok((
        label,
        StepResult {
            outcome: out.outcome,
            verdict: None,
            readings: Some(out.readings),
        },
    ))
}

/// Every way `outcome` differs from `expect`, readably.
fn check(
    expect: &Step,
    outcome: &Outcome,
    verdict: Option<&(Reading, Verdict)>,
    readings: Option<&[Reading]>,
) -> Vec<String> {
    let mut problems = Vec::new();
    match &expect.errors {
        None if !outcome.failures.is_empty() => problems.push(format!(
            "the rules failed:\n{}",
            indent(&join(&outcome.failures))
        )),
        None => {}
        Some(expected) => {
            let ok = expected.len() == outcome.failures.len()
                && expected
                    .iter()
                    .zip(&outcome.failures)
                    .all(|(e, f)| f.to_string().contains(e.as_str()));
            if !ok {
                problems.push(format!(
                    "errors differ (- expected, + actual):\n{}",
                    indent(&diff(
                        expected,
                        &outcome.failures,
                        |e, f| f.to_string().contains(e.as_str()),
                        |e| e.clone(),
                        Failure::to_string,
                    ))
                ));
            }
        }
    }
    if let Some(expected) = &expect.publishes {
        let matches = |e: &ExpectedPublish, m: &Message| publish_matches(e, m);
        let all = expected.len() == outcome.publishes.len()
            && expected
                .iter()
                .zip(&outcome.publishes)
                .all(|(e, m)| matches(e, m));
        if !all {
            problems.push(format!(
                "publishes differ (- expected, + actual):\n{}",
                indent(&diff(
                    expected,
                    &outcome.publishes,
                    matches,
                    show_expected_publish,
                    show_message
                ))
            ));
        }
    }
    if let Some(expected) = &expect.writes {
        let all = expected.len() == outcome.writes.len()
            && expected
                .iter()
                .zip(&outcome.writes)
                .all(|(e, w)| write_matches(e, w));
        if !all {
            problems.push(format!(
                "writes differ (- expected, + actual):\n{}",
                indent(&diff(
                    expected,
                    &outcome.writes,
                    write_matches,
                    |e| format!("{}/{} = {}", e.device, e.point, show_yaml(&e.value)),
                    |w| format!("{}/{} = {}", w.device, w.point, w.value),
                ))
            ));
        }
    }
    if let Some(expected) = &expect.result {
        match verdict {
            None => problems.push("`result` applies to `reading` steps only".into()),
            Some((original, v)) => {
                if let Err(p) = result_matches(expected, original, v) {
                    problems.push(p);
                }
            }
        }
    }
    if let Some(expected) = &expect.readings {
        match readings {
            None => problems.push("`readings` applies to `line` steps only".into()),
            Some(actual) => {
                let mut actual: Vec<&Reading> = actual.iter().collect();
                actual.sort_by(|a, b| a.point.cmp(&b.point));
                let mut expected: Vec<&ExpectedLineReading> = expected.iter().collect();
                expected.sort_by(|a, b| a.point.cmp(&b.point));
                let m = |e: &&ExpectedLineReading, r: &&Reading| line_reading_matches(e, r);
                let all = expected.len() == actual.len()
                    && expected.iter().zip(&actual).all(|(e, r)| m(e, r));
                if !all {
                    problems.push(format!(
                        "readings differ (- expected, + actual):\n{}",
                        indent(&diff(
                            &expected,
                            &actual,
                            m,
                            |e| format!(
                                "{} = {}{}",
                                e.point,
                                show_yaml(&e.value),
                                e.unit.as_ref().map(|u| format!(" {u}")).unwrap_or_default()
                            ),
                            |r| format!(
                                "{} = {}{}",
                                r.point,
                                r.value,
                                r.unit.as_ref().map(|u| format!(" {u}")).unwrap_or_default()
                            ),
                        ))
                    ));
                }
            }
        }
    }
    problems
}

fn join(failures: &[Failure]) -> String {
    failures
        .iter()
        .map(Failure::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn publish_matches(e: &ExpectedPublish, m: &Message) -> bool {
    e.topic == m.topic
        && e.qos.is_none_or(|q| Qos::from_u8(q) == Some(m.qos))
        && e.retain.is_none_or(|r| r == m.retain)
        && payload_matches(&e.payload, &m.payload)
}

fn payload_matches(expected: &serde_yaml::Value, actual: &[u8]) -> bool {
    match expected {
        serde_yaml::Value::Mapping(_) | serde_yaml::Value::Sequence(_) => {
            let Ok(want) = yaml_to_json(expected) else {
                return false;
            };
            serde_json::from_slice::<serde_json::Value>(actual).is_ok_and(|got| got == want)
        }
        serde_yaml::Value::String(s) => s.as_bytes() == actual,
        other => yaml_value(other).is_ok_and(|v| v.to_string().as_bytes() == actual),
    }
}

fn write_matches(e: &ExpectedWrite, w: &Write) -> bool {
    e.device == w.device
        && e.point == w.point
        && yaml_value(&e.value).is_ok_and(|v| same(&v, &w.value))
}

fn line_reading_matches(e: &&ExpectedLineReading, r: &&Reading) -> bool {
    *e.point == *r.point
        && yaml_value(&e.value).is_ok_and(|v| same(&v, &r.value))
        && e.unit.as_deref() == r.unit.as_deref()
}

/// Values are the same if equal, or numerically equal (2 and 2.0).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Text(x), Value::Text(y)) => x == y,
        (Value::Bool(x), Value::Bool(y)) => x == y,
        (Value::Bool(_), _) | (_, Value::Bool(_)) | (Value::Text(_), _) | (_, Value::Text(_)) => {
            false
        }
        _ => a.as_f64() == b.as_f64(),
    }
}

fn result_matches(
    expected: &serde_yaml::Value,
    original: &Reading,
    verdict: &Verdict,
) -> Result<(), String> {
    let actual = match verdict {
        Verdict::Unchanged => "unchanged".to_string(),
        Verdict::Dropped => "dropped".to_string(),
        Verdict::Changed(r) => format!("changed to {}", show_reading(r)),
    };
    let ok = match (expected, verdict) {
        (serde_yaml::Value::String(s), _) if s == "unchanged" => *verdict == Verdict::Unchanged,
        (serde_yaml::Value::String(s), _) if s == "dropped" => *verdict == Verdict::Dropped,
        (serde_yaml::Value::Mapping(fields), v) => {
            let changed = match v {
                Verdict::Changed(r) => r,
                Verdict::Unchanged => original,
                Verdict::Dropped => {
                    return Err(format!("result: expected a reading, got {actual}"))
                }
            };
            let mut ok = true;
            for (k, want) in fields {
                let matches = match k.as_str() {
                    Some("value") => yaml_value(want).is_ok_and(|w| same(&w, &changed.value)),
                    Some("unit") => want.as_str() == changed.unit.as_deref(),
                    Some("device") => want.as_str() == Some(&*changed.device),
                    Some("point") => want.as_str() == Some(&*changed.point),
                    Some("ts") => want.as_i64() == Some(changed.ts),
                    _ => {
                        return Err(format!(
                            "result: unknown field {k:?} (use value, unit, device, point, ts)"
                        ))
                    }
                };
                ok &= matches;
            }
            ok
        }
        _ => {
            return Err(
                "result: use `unchanged`, `dropped` or the fields of the changed reading".into(),
            )
        }
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "result differs:\n  - {}\n  + {actual}",
            show_yaml(expected)
        ))
    }
}

fn show_reading(r: &Reading) -> String {
    let mut s = format!("{}/{} = {}", r.device, r.point, r.value);
    if let Some(u) = &r.unit {
        let _ = write!(s, " {u}");
    }
    let _ = write!(s, " at ts {}", r.ts);
    s
}

fn show_expected_publish(e: &ExpectedPublish) -> String {
    let payload = match &e.payload {
        serde_yaml::Value::String(s) => format!("{s:?}"),
        serde_yaml::Value::Mapping(_) | serde_yaml::Value::Sequence(_) => {
            yaml_to_json(&e.payload).map_or_else(|err| err, |j| j.to_string())
        }
        other => format!("{:?}", show_yaml(other)),
    };
    let mut s = format!("{} {payload}", e.topic);
    if let Some(q) = e.qos {
        let _ = write!(s, " qos={q}");
    }
    if let Some(r) = e.retain {
        let _ = write!(s, " retain={r}");
    }
    s
}

fn show_message(m: &Message) -> String {
    let payload = match std::str::from_utf8(&m.payload) {
        Ok(s) => format!("{s:?}"),
        Err(_) => format!("<{} bytes: {:02x?}>", m.payload.len(), &m.payload[..]),
    };
    format!(
        "{} {payload} qos={} retain={}",
        m.topic, m.qos as u8, m.retain
    )
}

fn show_yaml(v: &serde_yaml::Value) -> String {
    match v {
        serde_yaml::Value::String(s) => s.clone(),
        serde_yaml::Value::Null => "null".into(),
        other => serde_yaml::to_string(other)
            .map(|s| s.trim_end().replace('\n', " "))
            .unwrap_or_default(),
    }
}

/// A YAML scalar as a gateway value.
fn yaml_value(v: &serde_yaml::Value) -> Result<Value, String> {
    use serde_yaml::Value as Y;
    match v {
        Y::Bool(b) => Ok(Value::Bool(*b)),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ok(Value::Int(i))
            } else if let Some(u) = n.as_u64() {
                Ok(Value::UInt(u))
            } else {
                Ok(Value::Float(n.as_f64().unwrap_or(f64::NAN)))
            }
        }
        Y::String(s) => Ok(Value::Text(s.clone())),
        other => Err(format!(
            "`{}` is not a value (use a bool, number or string)",
            show_yaml(other)
        )),
    }
}

fn yaml_to_json(v: &serde_yaml::Value) -> Result<serde_json::Value, String> {
    serde_json::to_value(v).map_err(|e| format!("not JSON: {e}"))
}

/// A line diff of two lists under a custom equality (longest common
/// subsequence): `  ` same, `- ` only expected, `+ ` only actual.
fn diff<E, A>(
    expected: &[E],
    actual: &[A],
    eq: impl Fn(&E, &A) -> bool,
    show_e: impl Fn(&E) -> String,
    show_a: impl Fn(&A) -> String,
) -> String {
    let (n, m) = (expected.len(), actual.len());
    // lcs[i][j]: common length of expected[i..] and actual[j..].
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if eq(&expected[i], &actual[j]) {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && eq(&expected[i], &actual[j]) {
            out.push(format!("  {}", show_a(&actual[j])));
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push(format!("- {}", show_e(&expected[i])));
            i += 1;
        } else {
            out.push(format!("+ {}", show_a(&actual[j])));
            j += 1;
        }
    }
    if out.is_empty() {
        out.push("  (nothing)".into());
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const RULE: &str = r#"
        const SUBSCRIBE = ["cmd/led"];
        fn on_reading(r) {
            if r.point == "skip" { return false; }
            if r.unit == "W" { r.value = r.value / 1000.0; r.unit = "kW"; publish("PV/data", r.value, #{qos: 1}); return r; }
        }
        fn on_message(topic, payload) { write("plc", "led", payload == "on"); publish("cmd/led/result", #{ok: true}); }
        fn on_line(device, line) { #{ n: parse_int(line) } }
    "#;

    const PASSING: &str = r#"
tests:
  - name: converts
    steps:
      - reading: { device: pv, point: power, value: 2500, unit: W, ts: 5 }
        publishes: [ { topic: PV/data, payload: "2.5", qos: 1, retain: false } ]
        result: { value: 2.5, unit: kW }
      - reading: { device: pv, point: skip, value: 1 }
        publishes: []
        result: dropped
  - name: led
    steps:
      - message: { topic: cmd/led, payload: "on" }
        writes: [ { device: plc, point: led, value: true } ]
        publishes: [ { topic: cmd/led/result, payload: { ok: true } } ]
  - name: lines
    steps:
      - line: { device: gps, line: "42" }
        readings: [ { point: n, value: 42 } ]
      - line: { device: gps, line: "x" }
        errors: [ "Error parsing integer" ]
"#;

    #[test]
    fn a_passing_fixture_passes() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "r.rhai", RULE);
        let f = write(dir.path(), "r.test.yaml", PASSING);
        let report = run(&[f], DEADLINE);
        assert!(report.passed(), "{report}");
        assert_eq!(report.cases(), 3);
        assert!(
            report.to_string().ends_with("3 tests, 0 failed"),
            "{report}"
        );
    }

    #[test]
    fn a_wrong_expectation_fails_with_a_diff() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "r.rhai", RULE);
        write(
            dir.path(),
            "r.test.yaml",
            r#"
tests:
  - name: wrong
    steps:
      - reading: { device: pv, point: power, value: 2500, unit: W }
        publishes: [ { topic: PV/data, payload: "2500" }, { topic: PV/extra, payload: x } ]
        result: unchanged
      - message: { topic: cmd/led, payload: "on" }
        writes: [ { device: plc, point: led, value: false } ]
"#,
        );
        let report = run(&[dir.path().to_path_buf()], DEADLINE);
        assert!(!report.passed());
        assert_eq!(report.failed(), 1);
        let text = report.to_string();
        for needle in [
            "FAIL  wrong",
            "step 1 (reading pv/power = 2500 at ts 0)",
            "publishes differ (- expected, + actual):",
            "- PV/data \"2500\"",
            "+ PV/data \"2.5\" qos=1 retain=false",
            "- PV/extra \"x\"",
            "result differs:",
            "- unchanged",
            "+ changed to pv/power = 2.5 kW at ts 0",
            "step 2 (message cmd/led \"on\")",
            "- plc/led = false",
            "+ plc/led = true",
            "1 test, 1 failed",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
    }

    #[test]
    fn rule_failures_fail_the_step_unless_expected() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "r.rhai", RULE);
        let f = write(
            dir.path(),
            "r.test.yaml",
            "tests:\n  - name: t\n    steps:\n      - line: { device: gps, line: \"x\" }\n",
        );
        let report = run(&[f], DEADLINE);
        assert!(!report.passed());
        assert!(report.to_string().contains("the rules failed:"), "{report}");
    }

    #[test]
    fn bad_fixtures_and_rules_are_reported_with_their_place() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "r.rhai", "fn on_reading(r) {\n  let = 1;\n}");
        let f = write(
            dir.path(),
            "a.test.yaml",
            "tests:\n  - name: t\n    stesp: []\n",
        );
        let report = run(&[f], DEADLINE);
        let text = report.to_string();
        assert!(
            text.contains("a.test.yaml:3:5: tests[0]: unknown field `stesp`"),
            "{text}"
        );
        let f = write(
            dir.path(),
            "c.test.yaml",
            "tests:\n  - name: t\n    steps:\n      - line: { device: a, line: b }\n        publish: []\n",
        );
        let text = run(&[f], DEADLINE).to_string();
        assert!(
            text.contains("c.test.yaml:5:9: tests[0].steps[0]: unknown field `publish`"),
            "{text}"
        );

        let f = write(
            dir.path(),
            "b.test.yaml",
            "tests:\n  - name: t\n    steps: []\n",
        );
        let report = run(&[f], DEADLINE);
        let text = report.to_string();
        assert!(text.contains("r.rhai:2:7: "), "{text}");
        assert!(!report.passed());
    }

    #[test]
    fn start_takes_no_input_and_steps_no_typos() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "r.rhai", RULE);
        let f = write(
            dir.path(),
            "a.test.yaml",
            "tests:\n  - name: t\n    start: { message: { topic: a, payload: b } }\n",
        );
        let report = run(&[f], DEADLINE);
        assert!(report.to_string().contains("`start` only says"), "{report}");
        let f = write(
            dir.path(),
            "b.test.yaml",
            "tests:\n  - name: t\n    steps:\n      - { line: { device: gps, line: x }, publishez: [] }\n",
        );
        let report = run(&[f], DEADLINE);
        assert!(
            report.to_string().contains("unknown field `publishez`"),
            "{report}"
        );
    }

    #[test]
    fn no_fixtures_is_not_a_pass() {
        let dir = tempfile::tempdir().unwrap();
        let report = run(&[dir.path().to_path_buf()], DEADLINE);
        assert!(!report.passed());
        assert!(report.to_string().contains("no rule test fixtures"));
    }

    #[test]
    fn diff_marks_missing_and_extra_lines() {
        let d = diff(
            &["a", "b", "c"],
            &["a", "x", "c"],
            |e, a| e == a,
            |e| e.to_string(),
            |a| a.to_string(),
        );
        assert_eq!(d, "  a\n- b\n+ x\n  c");
    }
}

#[cfg(test)]
mod shipped {
    use super::*;

    /// The rules in the repo's `rules/` pass their own fixtures.
    #[test]
    fn shipped_rules_pass_their_fixtures() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
        let report = run(&[dir], DEADLINE);
        assert!(report.passed(), "{report}");
    }
}
