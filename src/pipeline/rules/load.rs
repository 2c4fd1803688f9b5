//! Finding and compiling rule files: every `*.rhai` in a folder, in name
//! order, compiled once. A set is only usable when every file compiles;
//! all problems are reported together, each as `file:line:col: message`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use rhai::{Dynamic, Map, AST};

use super::sandbox::{FileScope, Sandbox};

pub use crate::topic::{check_filter, matches as filter_matches};

/// One problem with a rule file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("{}: cannot read rules: {message}", path.display())]
    Io { path: PathBuf, message: String },
    #[error("{}:{line}:{column}: {message}", file.display())]
    Compile {
        file: PathBuf,
        /// 1-based.
        line: usize,
        column: usize,
        message: String,
    },
}

/// Every problem of one load, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleErrors(pub Vec<RuleError>);

impl fmt::Display for RuleErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::config::write_lines(f, &self.0)
    }
}

impl std::error::Error for RuleErrors {}

/// Which handlers a file defines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Handlers {
    pub on_reading: bool,
    pub on_message: bool,
    pub on_line: bool,
    pub on_start: bool,
}

/// Counters of one rule file; they survive reloads of an unchanged file.
#[derive(Debug, Default)]
pub struct FileStats {
    pub calls: AtomicU64,
    pub errors: AtomicU64,
    pub deadlines: AtomicU64,
    /// Failure logging of this file, so a rule failing on every reading
    /// does not flood the log for months.
    pub(crate) log: std::sync::Mutex<LogWindow>,
}

/// At most [`LogWindow::MAX_PER_WINDOW`] failure lines per file per
/// [`LogWindow::WINDOW`]; the rest are counted and summarised.
#[derive(Debug, Default)]
pub(crate) struct LogWindow {
    started: Option<std::time::Instant>,
    logged: u32,
    suppressed: u64,
}

impl LogWindow {
    pub const WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
    pub const MAX_PER_WINDOW: u32 = 10;

    /// Whether to log this failure, and how many were suppressed before it
    /// (to be mentioned once, when logging resumes).
    pub fn admit(&mut self, now: std::time::Instant) -> (bool, u64) {
        let expired = self
            .started
            .is_none_or(|t| now.duration_since(t) >= Self::WINDOW);
        if expired {
            self.started = Some(now);
            self.logged = 0;
        }
        if self.logged < Self::MAX_PER_WINDOW {
            self.logged += 1;
            (true, std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            (false, 0)
        }
    }
}

/// One compiled rule file.
pub struct RuleFile {
    /// The file name, e.g. `pv.rhai`; names the file in logs and errors.
    pub name: Arc<str>,
    pub path: PathBuf,
    /// Kept to tell an unchanged file on reload (its `state` survives).
    pub source: String,
    pub ast: AST,
    /// `const SUBSCRIBE = [...]`: the MQTT filters `on_message` receives.
    pub subscribe: Vec<String>,
    pub handlers: Handlers,
    pub scope: FileScope,
    pub stats: Arc<FileStats>,
}

impl fmt::Debug for RuleFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuleFile")
            .field("name", &self.name)
            .field("subscribe", &self.subscribe)
            .field("handlers", &self.handlers)
            .finish_non_exhaustive()
    }
}

/// The handlers the gateway calls, with the number of parameters each takes.
const HANDLERS: [(&str, usize); 4] = [
    ("on_reading", 1),
    ("on_message", 2),
    ("on_line", 2),
    ("on_start", 0),
];

/// The `*.rhai` files of `dir`, sorted by name.
pub fn rule_files(dir: &Path) -> Result<Vec<PathBuf>, RuleError> {
    let io = |e: std::io::Error| RuleError::Io {
        path: dir.to_path_buf(),
        message: e.to_string(),
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.extension().is_some_and(|e| e == "rhai") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads the files; errors for unreadable ones.
pub fn read_sources(paths: &[PathBuf]) -> Result<Vec<(PathBuf, String)>, RuleErrors> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for p in paths {
        match std::fs::read_to_string(p) {
            Ok(text) => out.push((p.clone(), text)),
            Err(e) => errors.push(RuleError::Io {
                path: p.clone(),
                message: e.to_string(),
            }),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(RuleErrors(errors))
    }
}

/// Compiles a set of sources. `previous` holds the files of the running
/// set: a file whose name and text are unchanged keeps its `state` and
/// counters.
pub fn compile_set(
    sandbox: &Sandbox,
    sources: Vec<(PathBuf, String)>,
    previous: &[RuleFile],
) -> Result<Vec<RuleFile>, RuleErrors> {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for (path, source) in sources {
        match compile_file(sandbox, &path, source, previous) {
            Ok(f) => files.push(f),
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        Ok(files)
    } else {
        Err(RuleErrors(errors))
    }
}

fn compile_file(
    sandbox: &Sandbox,
    path: &Path,
    source: String,
    previous: &[RuleFile],
) -> Result<RuleFile, Vec<RuleError>> {
    let name: Arc<str> = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
        .into();
    let at = |line: usize, column: usize, message: String| RuleError::Compile {
        file: path.to_path_buf(),
        line: line.max(1),
        column: column.max(1),
        message,
    };

    let mut ast = sandbox.engine.compile(&source).map_err(|e| {
        let pos = e.position();
        vec![at(
            pos.line().unwrap_or(0),
            pos.position().unwrap_or(0),
            e.err_type().to_string(),
        )]
    })?;
    ast.set_source(&*name);

    let mut errors = Vec::new();
    let mut handlers = Handlers::default();
    for f in ast.iter_functions() {
        let Some(&(_, arity)) = HANDLERS.iter().find(|(h, _)| *h == f.name) else {
            continue;
        };
        let (line, column) = locate(&source, &format!("fn {}", f.name));
        if f.params.len() != arity {
            errors.push(at(
                line,
                column,
                format!(
                    "`{}` takes {arity} parameter{}, this one takes {}",
                    f.name,
                    if arity == 1 { "" } else { "s" },
                    f.params.len()
                ),
            ));
            continue;
        }
        match f.name {
            "on_reading" => handlers.on_reading = true,
            "on_message" => handlers.on_message = true,
            "on_line" => handlers.on_line = true,
            _ => handlers.on_start = true,
        }
    }

    let consts: BTreeMap<String, Dynamic> = ast
        .iter_literal_variables(true, false)
        .map(|(n, _, v)| (n.to_string(), v))
        .collect();

    let (line, column) = locate(&source, "SUBSCRIBE");
    let subscribe = match consts.get("SUBSCRIBE") {
        None => Vec::new(),
        Some(v) => match subscribe_filters(v) {
            Ok(f) => f,
            Err(e) => {
                errors.push(at(line, column, e));
                Vec::new()
            }
        },
    };
    if handlers.on_message && !consts.contains_key("SUBSCRIBE") {
        let (line, column) = locate(&source, "fn on_message");
        errors.push(at(
            line,
            column,
            "`on_message` needs `const SUBSCRIBE = [\"topic/filter\", ...];` \
             listing the topics it receives"
                .into(),
        ));
    }
    if !handlers.on_message && consts.contains_key("SUBSCRIBE") {
        errors.push(at(
            line,
            column,
            "`SUBSCRIBE` is set but there is no `fn on_message(topic, payload)`".into(),
        ));
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    let kept = previous
        .iter()
        .find(|p| p.name == name && p.source == source);
    let (scope_state, stats) = match kept {
        Some(p) => (p.scope.state.clone(), p.stats.clone()),
        None => (
            Dynamic::from_map(Map::new()).into_shared(),
            Arc::new(FileStats::default()),
        ),
    };
    Ok(RuleFile {
        name,
        path: path.to_path_buf(),
        source,
        ast,
        subscribe,
        handlers,
        scope: FileScope {
            state: scope_state,
            consts: Arc::new(consts),
        },
        stats,
    })
}

/// `SUBSCRIBE` must be a literal array of MQTT filters.
fn subscribe_filters(v: &Dynamic) -> Result<Vec<String>, String> {
    let arr = v.as_array_ref().map_err(|_| {
        "`SUBSCRIBE` must be an array of topic filters, e.g. [\"cmd/#\"]".to_string()
    })?;
    let mut out = Vec::new();
    for item in arr.iter() {
        if !item.is_string() {
            return Err(format!(
                "`SUBSCRIBE` must hold topic filters (strings), not {}",
                item.type_name()
            ));
        }
        let f = item.clone().into_string().unwrap_or_default();
        check_filter(&f).map_err(|e| format!("`SUBSCRIBE`: {e}"))?;
        out.push(f);
    }
    Ok(out)
}

/// 1-based line and column of the first `needle` in `source` (1:1 if absent).
pub(crate) fn locate(source: &str, needle: &str) -> (usize, usize) {
    let Some(offset) = source.find(needle) else {
        return (1, 1);
    };
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_logs_are_limited_per_window() {
        let mut w = LogWindow::default();
        let t0 = std::time::Instant::now();
        for _ in 0..LogWindow::MAX_PER_WINDOW {
            assert_eq!(w.admit(t0), (true, 0));
        }
        assert_eq!(w.admit(t0), (false, 0));
        assert_eq!(w.admit(t0), (false, 0));
        assert_eq!(w.admit(t0 + LogWindow::WINDOW), (true, 2));
        assert_eq!(w.admit(t0 + LogWindow::WINDOW), (true, 0));
    }

    #[test]
    fn locate_finds_line_and_column() {
        assert_eq!(locate("a\n  fn on_x()", "fn on_x"), (2, 3));
        assert_eq!(locate("fn x", "fn x"), (1, 1));
        assert_eq!(locate("abc", "zz"), (1, 1));
    }
}
