//! [`Rules`]: a compiled set of rule files and the calls into them.
//!
//! Every call runs in the sandbox with a fresh deadline; a failure is
//! logged and counted in one place ([`Rules::record`]) and never stops the
//! caller. Files are called in name order.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rhai::{CallFnOptions, Dynamic, EvalAltResult, FuncArgs, ImmutableString, Scope};

use super::convert;
use super::load::{self, filter_matches, RuleError, RuleErrors, RuleFile};
use super::outcome::{Failure, FailureKind, LineOutcome, Outcome, ReadingOutcome, Verdict};
use super::sandbox::{
    self, DeviceWriter, Sandbox, DEADLINE_TOKEN, MAX_STATE_DEPTH, MAX_STATE_ITEMS, MAX_STRING_SIZE,
};
use crate::model::{Millis, Quality, Reading};

/// The loaded rules.
pub struct Rules {
    sandbox: Sandbox,
    files: Vec<RuleFile>,
    /// Where the files came from, for [`Rules::reload`].
    dir: Option<PathBuf>,
    /// What `now_ms()` returns; `None` is the wall clock.
    clock: Option<Millis>,
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rules")
            .field("files", &self.files)
            .field("dir", &self.dir)
            .field("deadline", &self.sandbox.budget())
            .finish_non_exhaustive()
    }
}

/// Counters of one rule file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleStats {
    pub file: Arc<str>,
    pub calls: u64,
    pub errors: u64,
    pub deadlines: u64,
}

/// What a successful reload changed.
#[derive(Debug, Default)]
pub struct Reloaded {
    /// Files whose `state` survived because their text did not change.
    pub kept: Vec<Arc<str>>,
    /// New or changed files (their `on_start` ran).
    pub started: Vec<Arc<str>>,
    /// What those `on_start` calls published and wrote.
    pub outcome: Outcome,
}

impl Rules {
    /// No rules: every reading passes unchanged.
    pub fn empty(deadline: Duration) -> Rules {
        Rules {
            sandbox: Sandbox::new(deadline),
            files: Vec::new(),
            dir: None,
            clock: None,
        }
    }

    /// Compiles every `*.rhai` in `dir`, in name order. `on_start` has not
    /// run yet: call [`Rules::start`] once the outputs are connected.
    pub fn load_dir(dir: &Path, deadline: Duration) -> Result<Rules, RuleErrors> {
        let mut rules = Rules::empty(deadline);
        let paths = load::rule_files(dir).map_err(|e| RuleErrors(vec![e]))?;
        let sources = load::read_sources(&paths)?;
        rules.files = load::compile_set(&rules.sandbox, sources, &[])?;
        rules.dir = Some(dir.to_path_buf());
        Ok(rules)
    }

    /// Compiles the given files (path, text); for tests and fixtures.
    pub fn from_sources(
        sources: Vec<(PathBuf, String)>,
        deadline: Duration,
    ) -> Result<Rules, RuleErrors> {
        let mut rules = Rules::empty(deadline);
        rules.files = load::compile_set(&rules.sandbox, sources, &[])?;
        Ok(rules)
    }

    /// Compiles the folder again. If every file compiles, the new set
    /// replaces the old one at once (unchanged files keep their `state`)
    /// and `on_start` runs for new and changed files; otherwise nothing
    /// changes and the errors are returned.
    pub fn reload(&mut self) -> Result<Reloaded, RuleErrors> {
        let Some(dir) = self.dir.clone() else {
            return Err(RuleErrors(vec![RuleError::Io {
                path: PathBuf::new(),
                message: "these rules were not loaded from a folder".into(),
            }]));
        };
        let paths = load::rule_files(&dir).map_err(|e| RuleErrors(vec![e]))?;
        let sources = load::read_sources(&paths)?;
        self.replace(sources)
    }

    /// [`Rules::reload`] from the given sources.
    pub fn replace(&mut self, sources: Vec<(PathBuf, String)>) -> Result<Reloaded, RuleErrors> {
        let files = load::compile_set(&self.sandbox, sources, &self.files)?;
        let mut reloaded = Reloaded::default();
        for f in &files {
            let kept = self
                .files
                .iter()
                .any(|old| Arc::ptr_eq(&old.stats, &f.stats));
            if kept {
                reloaded.kept.push(f.name.clone());
            } else {
                reloaded.started.push(f.name.clone());
            }
        }
        self.files = files;
        let started = reloaded.started.clone();
        reloaded.outcome = self.run_start(|f| started.contains(&f.name));
        Ok(reloaded)
    }

    pub fn files(&self) -> &[RuleFile] {
        &self.files
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The deadline of one call.
    pub fn deadline(&self) -> Duration {
        self.sandbox.budget()
    }

    /// Where `write()` goes (the default accepts every write).
    pub fn set_writer(&self, writer: Arc<dyn DeviceWriter>) {
        self.sandbox.set_writer(writer);
    }

    /// Fixes what `now_ms()` returns; `None` restores the wall clock.
    pub fn set_clock(&mut self, now: Option<Millis>) {
        self.clock = now;
    }

    /// The union of every file's `SUBSCRIBE` filters, without repeats.
    pub fn subscriptions(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for f in &self.files {
            for s in &f.subscribe {
                if !out.contains(s) {
                    out.push(s.clone());
                }
            }
        }
        out
    }

    pub fn has_on_reading(&self) -> bool {
        self.files.iter().any(|f| f.handlers.on_reading)
    }

    pub fn stats(&self) -> Vec<RuleStats> {
        self.files
            .iter()
            .map(|f| RuleStats {
                file: f.name.clone(),
                calls: f.stats.calls.load(Ordering::Relaxed),
                errors: f.stats.errors.load(Ordering::Relaxed),
                deadlines: f.stats.deadlines.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Runs every file's `on_start()`.
    pub fn start(&mut self) -> Outcome {
        self.run_start(|_| true)
    }

    fn run_start(&self, which: impl Fn(&RuleFile) -> bool) -> Outcome {
        let mut out = Outcome::default();
        for f in self
            .files
            .iter()
            .filter(|f| f.handlers.on_start && which(f))
        {
            self.call(f, "on_start", (), &mut out);
        }
        out
    }

    /// Passes a reading through every file's `on_reading(r)`, in order.
    /// A changed map returned by one file is what the next file sees;
    /// `false` drops the reading and ends the chain.
    pub fn on_reading(&self, reading: &Reading) -> ReadingOutcome {
        let mut out = Outcome::default();
        let mut current: Option<Reading> = None;
        for f in self.files.iter().filter(|f| f.handlers.on_reading) {
            let seen = current.as_ref().unwrap_or(reading);
            let arg = Dynamic::from_map(convert::reading_to_map(seen));
            let Some(ret) = self.call(f, "on_reading", (arg,), &mut out) else {
                continue;
            };
            let ret = ret.flatten();
            if ret.is_unit() || ret.as_bool() == Ok(true) {
                continue;
            }
            if ret.as_bool() == Ok(false) {
                return ReadingOutcome {
                    verdict: Verdict::Dropped,
                    outcome: out,
                };
            }
            let changed = match ret.as_map_ref() {
                Ok(m) => convert::map_to_reading(&m, seen),
                Err(t) => Err(format!(
                    "returned {t}; return false (drop), a reading map (change) or nothing"
                )),
            };
            match changed {
                Ok(r) if &r == seen => {}
                Ok(r) => current = Some(r),
                Err(message) => self.fail(f, "on_reading", 0, 0, message, &mut out),
            }
        }
        let verdict = match current {
            Some(r) if &r != reading => Verdict::Changed(r),
            _ => Verdict::Unchanged,
        };
        ReadingOutcome {
            verdict,
            outcome: out,
        }
    }

    /// Calls `on_message(topic, payload)` of every file whose `SUBSCRIBE`
    /// matches `topic`. The payload is a string when it is UTF-8, a BLOB
    /// otherwise.
    pub fn on_message(&self, topic: &str, payload: &[u8]) -> Outcome {
        let mut out = Outcome::default();
        let subscribed = |f: &&RuleFile| {
            f.handlers.on_message && f.subscribe.iter().any(|s| filter_matches(s, topic))
        };
        for f in self.files.iter().filter(subscribed) {
            if payload.len() > MAX_STRING_SIZE {
                let msg = format!(
                    "a payload of {} bytes on `{topic}` is larger than the {MAX_STRING_SIZE} \
                     bytes a rule may handle; skipped",
                    payload.len()
                );
                self.fail(f, "on_message", 0, 0, msg, &mut out);
                continue;
            }
            let args = (
                Dynamic::from(ImmutableString::from(topic)),
                convert::payload_to_dynamic(payload),
            );
            self.call(f, "on_message", args, &mut out);
        }
        out
    }

    /// Calls `on_line(device, line)` of every file that has it. Each may
    /// return a map of point -> value (or -> `#{value, unit}`), which
    /// becomes readings of `device` at `ts`.
    pub fn on_line(&self, device: &str, line: &str, ts: Millis) -> LineOutcome {
        let mut result = LineOutcome::default();
        for f in self.files.iter().filter(|f| f.handlers.on_line) {
            let args = (
                Dynamic::from(ImmutableString::from(device)),
                Dynamic::from(ImmutableString::from(line)),
            );
            let Some(ret) = self.call(f, "on_line", args, &mut result.outcome) else {
                continue;
            };
            let ret = ret.flatten();
            if ret.is_unit() {
                continue;
            }
            match line_readings(device, &ret, ts) {
                Ok(mut rs) => result.readings.append(&mut rs),
                Err(message) => self.fail(f, "on_line", 0, 0, message, &mut result.outcome),
            }
        }
        result
    }

    /// One call of `function` in `file`. On failure the call's publishes are
    /// discarded (its writes have happened and stay recorded).
    fn call(
        &self,
        file: &RuleFile,
        function: &'static str,
        args: impl FuncArgs,
        out: &mut Outcome,
    ) -> Option<Dynamic> {
        file.stats.calls.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        self.sandbox.begin(&file.name, self.clock);
        let options = CallFnOptions::new()
            .eval_ast(false)
            .with_tag(file.scope.clone());
        let mut scope = Scope::new();
        let result = self
            .sandbox
            .engine
            .call_fn_with_options::<Dynamic>(options, &mut scope, &file.ast, function, args);
        let (publishes, writes) = self.sandbox.end();
        let result = result.map_err(|e| self.failure(file, function, &e));
        let problem = if !file.scope.state.is_map() {
            // `state = 5` replaces the shared map itself.
            Some("`state` must stay a map (use `state.x = …`); it was reset".to_string())
        } else if sandbox::exceeds_items(&file.scope.state, &mut MAX_STATE_ITEMS.clone()) {
            // Keep memory bounded over months: a rule that keys `state` by
            // something unbounded (timestamps) starts over instead of growing.
            Some(format!(
                "`state` grew past {MAX_STATE_ITEMS} entries or {MAX_STATE_DEPTH} levels \
                 and was cleared (is it keyed by something unbounded?)"
            ))
        } else {
            None
        };
        crate::ops::metrics::rule_call(
            &file.name,
            function,
            result.is_ok() && problem.is_none(),
            started.elapsed(),
        );
        if let Some(msg) = problem {
            let mut shared = file.scope.state.clone();
            if let Some(mut v) = shared.write_lock::<Dynamic>() {
                *v = Dynamic::from_map(rhai::Map::new());
            }
            let (line, column) = load::locate(&file.source, &format!("fn {function}"));
            self.fail(file, function, line, column, msg, out);
        }
        match result {
            Ok(v) => {
                out.absorb(publishes, writes);
                Some(v)
            }
            Err(failure) => {
                out.absorb(Vec::new(), writes);
                self.record(file, failure, out);
                None
            }
        }
    }

    fn failure(&self, file: &RuleFile, function: &'static str, e: &EvalAltResult) -> Failure {
        let inner = e.unwrap_inner();
        let pos = if inner.position().is_none() {
            e.position()
        } else {
            inner.position()
        };
        // rhai moves the position of a limit error (deadline, operations,
        // stack, sizes) to the call site, which for a handler is nowhere:
        // point at the handler instead.
        let (line, column) = match (pos.line(), pos.position()) {
            (Some(l), c) => (l, c.unwrap_or(0)),
            (None, _) => load::locate(&file.source, &format!("fn {function}")),
        };
        let (kind, message) = match inner {
            EvalAltResult::ErrorTerminated(token, _)
                if token.clone().into_string().as_deref() == Ok(DEADLINE_TOKEN) =>
            {
                (
                    FailureKind::Deadline,
                    format!(
                        "stopped after the {} deadline (an endless loop?)",
                        humantime::format_duration(self.sandbox.budget())
                    ),
                )
            }
            _ => (FailureKind::Error, describe(e, function)),
        };
        Failure {
            file: file.name.clone(),
            function,
            line,
            column,
            message,
            kind,
        }
    }

    fn fail(
        &self,
        file: &RuleFile,
        function: &'static str,
        line: usize,
        column: usize,
        message: String,
        out: &mut Outcome,
    ) {
        let failure = Failure {
            file: file.name.clone(),
            function,
            line,
            column,
            message,
            kind: FailureKind::Error,
        };
        self.record(file, failure, out);
    }

    /// The one place where a failed call is logged and counted.
    fn record(&self, file: &RuleFile, failure: Failure, out: &mut Outcome) {
        let counter = match failure.kind {
            FailureKind::Error => &file.stats.errors,
            FailureKind::Deadline => &file.stats.deadlines,
        };
        let count = counter.fetch_add(1, Ordering::Relaxed) + 1;
        let (log, suppressed) = file
            .stats
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(std::time::Instant::now());
        if log {
            tracing::warn!(
                rule = %file.name,
                function = failure.function,
                line = failure.line,
                count,
                suppressed,
                "rule failed: {failure}{}",
                if suppressed > 0 {
                    format!(
                        " ({suppressed} more failures of this file were not logged)"
                    )
                } else {
                    String::new()
                }
            );
        }
        out.failures.push(failure);
    }
}

/// The innermost error's message without rhai's position suffix (the
/// failure carries line and column), naming the script function it
/// happened in when that is not the handler itself.
fn describe(e: &EvalAltResult, handler: &str) -> String {
    let mut inner = e;
    let mut in_fn: Option<&str> = None;
    while let EvalAltResult::ErrorInFunctionCall(name, _, next, _) = inner {
        in_fn = Some(name);
        inner = next;
    }
    let mut text = inner.to_string();
    if !inner.position().is_none() {
        let suffix = format!(" ({})", inner.position());
        if let Some(stripped) = text.strip_suffix(&suffix) {
            text = stripped.to_string();
        }
    }
    if let Some(stripped) = text.strip_prefix("Runtime error: ") {
        text = stripped.to_string();
    }
    match in_fn {
        Some(f) if f != handler => format!("{text} (in fn {f})"),
        _ => text,
    }
}

/// The map `on_line` returned, as readings.
fn line_readings(device: &str, ret: &Dynamic, ts: Millis) -> Result<Vec<Reading>, String> {
    let map = ret.as_map_ref().map_err(|t| {
        format!("returned {t}; return a map of point -> value (e.g. #{{lat: 1.5}}) or nothing")
    })?;
    let device: Arc<str> = device.into();
    let mut out = Vec::with_capacity(map.len());
    for (point, v) in map.iter() {
        if point.is_empty()
            || !point
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(format!(
                "`{point}` is not a point name (letters, digits, `_`, `-`)"
            ));
        }
        let v = v.flatten_clone();
        let (value, unit) = match v.as_map_ref() {
            Ok(m) => {
                let value = m
                    .get("value")
                    .ok_or_else(|| format!("point `{point}`: a map needs `value`"))?;
                let unit = match m.get("unit").map(Dynamic::flatten_clone) {
                    None => None,
                    Some(u) if u.is_unit() => None,
                    Some(u) if u.is_string() => {
                        Some(Arc::from(u.into_string().unwrap_or_default()))
                    }
                    Some(u) => {
                        return Err(format!(
                            "point `{point}`: `unit` must be a string, not {}",
                            u.type_name()
                        ))
                    }
                };
                (convert::dynamic_to_value(value), unit)
            }
            Err(_) => (convert::dynamic_to_value(&v), None),
        };
        out.push(Reading {
            device: device.clone(),
            point: Arc::from(point.as_str()),
            value: value.map_err(|e| format!("point `{point}`: {e}"))?,
            unit,
            ts,
            quality: Quality::Good,
        });
    }
    Ok(out)
}
