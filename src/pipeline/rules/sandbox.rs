//! The rhai engine every rule runs in: explicit limits (`Engine::new()`
//! allows unlimited work, file imports and printing to stdout), a
//! wall-clock deadline per call, and the functions scripts may call.
//!
//! Scripts reach the gateway only through the functions registered here.
//! Their effects are collected in a [`CallState`] and handed back to the
//! caller as an [`Outcome`](super::Outcome); nothing is published from
//! inside the script.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rhai::module_resolvers::DummyModuleResolver;
use rhai::{Dynamic, Engine, EvalAltResult, ImmutableString, Map, NativeCallContext, Position};

use super::convert;
use super::outcome::Write;
use crate::model::{CommandResult, Message, Millis, Qos, Value};

/// Operations one call may run. A backstop: the wall-clock deadline
/// usually stops a runaway loop first.
pub const MAX_OPERATIONS: u64 = 50_000_000;
/// Nested function calls (recursion depth).
pub const MAX_CALL_LEVELS: usize = 32;
/// Nesting of expressions, at top level and inside functions.
pub const MAX_EXPR_DEPTH: usize = 64;
pub const MAX_FN_EXPR_DEPTH: usize = 32;
/// Longest string a script may build, in bytes.
pub const MAX_STRING_SIZE: usize = 64 * 1024;
/// Most elements in one array or BLOB. rhai measures the whole array after
/// every `push`, so filling an array costs O(n²): keep n small.
pub const MAX_ARRAY_SIZE: usize = 1_024;
/// Most keys in one map (this includes `state`).
pub const MAX_MAP_SIZE: usize = 1_000;
/// Most entries (map keys and array items, nested ones included) in a
/// file's `state`. rhai checks the size of a map only when it is built, not
/// when `m[key] = v` adds a key, so `state` is measured after every call.
pub const MAX_STATE_ITEMS: usize = 10_000;
/// Most variables alive at once in one call.
pub const MAX_VARIABLES: usize = 256;
/// Most functions one file may define.
pub const MAX_FUNCTIONS: usize = 256;
/// Most `publish` calls in one call of a handler: a loop cannot flood the bus.
pub const MAX_PUBLISHES_PER_CALL: usize = 1_000;
/// Most `write` calls in one call of a handler. Each waits for a device,
/// and that wait does not count against the deadline, so this bounds how
/// long one call can hold the rules thread.
pub const MAX_WRITES_PER_CALL: usize = 32;

/// How often (in operations) the deadline is checked; reading the clock
/// on every operation would cost more than the operation.
const DEADLINE_CHECK_EVERY: u64 = 128;

/// The token `on_progress` returns when the deadline passed; a
/// `ErrorTerminated` carrying it means "deadline", not some other stop.
pub const DEADLINE_TOKEN: &str = "edgebridge:deadline";

/// Executes a rule's `write(device, point, value)`.
///
/// The gateway's implementation sends a command to the device's driver and
/// waits for its answer; the offline tester records the write and succeeds.
pub trait DeviceWriter: Send + Sync {
    fn write(&self, device: &str, point: &str, value: &Value) -> CommandResult;
}

/// Accepts every write; for `edgebridge rules test` and `check`.
pub struct AcceptWrites;

impl DeviceWriter for AcceptWrites {
    fn write(&self, _: &str, _: &str, _: &Value) -> CommandResult {
        Ok(())
    }
}

/// The wall-clock deadline of the running call, shared with the engine's
/// progress callback. An atomic and not a lock because it is read every
/// [`DEADLINE_CHECK_EVERY`] operations.
struct Deadline {
    base: Instant,
    /// Nanoseconds after `base`; 0 when no call is running.
    at: AtomicU64,
}

impl Deadline {
    fn nanos_now(&self) -> u64 {
        // An u64 of nanoseconds lasts 584 years of uptime.
        self.base.elapsed().as_nanos() as u64
    }

    fn start(&self, budget: Duration) {
        let at = self
            .nanos_now()
            .saturating_add(budget.as_nanos() as u64)
            .max(1);
        self.at.store(at, Ordering::Relaxed);
    }

    fn clear(&self) {
        self.at.store(0, Ordering::Relaxed);
    }

    /// Time spent waiting for a device does not count against the script.
    fn extend(&self, by: Duration) {
        let at = self.at.load(Ordering::Relaxed);
        if at != 0 {
            self.at
                .store(at.saturating_add(by.as_nanos() as u64), Ordering::Relaxed);
        }
    }

    fn passed(&self) -> bool {
        let at = self.at.load(Ordering::Relaxed);
        at != 0 && self.nanos_now() > at
    }
}

/// The effects of the running call. Behind a std `Mutex` that is only
/// locked for a moment inside a registered function and never across an
/// await or a device write, so it is never contended.
#[derive(Default)]
pub struct CallState {
    /// The rule file being called (for `print` and logs).
    pub file: Arc<str>,
    pub publishes: Vec<Message>,
    pub writes: Vec<Write>,
    /// What `now_ms()` returns; `None` means the wall clock. Fixtures set it
    /// so tests of time-based rules are repeatable.
    pub clock: Option<Millis>,
}

/// Per-file data a call needs inside the engine: the file's `state` map
/// and its literal constants. Passed as the call's tag.
#[derive(Clone)]
pub struct FileScope {
    /// A shared map: changes made by one call are seen by the next.
    pub state: Dynamic,
    /// `const NAME = <literal>;` at the top of the file.
    pub consts: Arc<BTreeMap<String, Dynamic>>,
}

/// The configured engine plus the shared slots its functions use.
pub struct Sandbox {
    pub engine: Engine,
    call: Arc<Mutex<CallState>>,
    deadline: Arc<Deadline>,
    writer: Arc<Mutex<Arc<dyn DeviceWriter>>>,
    budget: Duration,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave `CallState` inconsistent
    // (it is plain data replaced at the start of every call).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn runtime_error(msg: impl Into<String>, pos: Position) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorRuntime(
        Dynamic::from(ImmutableString::from(msg.into())),
        pos,
    ))
}

/// Topics a rule may publish to: non-empty, no wildcards, no NUL.
fn check_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        Err("the topic is empty".into())
    } else if topic.contains(['+', '#', '\0']) {
        Err(format!(
            "cannot publish to `{topic}`: a topic must not contain `+`, `#` or NUL"
        ))
    } else {
        Ok(())
    }
}

fn publish_options(opts: &Map) -> Result<(Qos, bool), String> {
    let mut qos = Qos::AtMostOnce;
    let mut retain = false;
    for (k, v) in opts {
        let v = v.flatten_clone();
        match k.as_str() {
            "qos" => {
                qos = v
                    .as_int()
                    .ok()
                    .and_then(|q| u8::try_from(q).ok())
                    .and_then(Qos::from_u8)
                    .ok_or_else(|| format!("`qos` must be 0, 1 or 2, not {v}"))?
            }
            "retain" => {
                retain = v
                    .as_bool()
                    .map_err(|_| format!("`retain` must be true or false, not {v}"))?
            }
            other => {
                return Err(format!(
                    "unknown publish option `{other}` (use qos, retain)"
                ))
            }
        }
    }
    Ok((qos, retain))
}

impl Sandbox {
    /// A sandboxed engine whose calls may run for `budget` each.
    pub fn new(budget: Duration) -> Sandbox {
        let call = Arc::new(Mutex::new(CallState::default()));
        let deadline = Arc::new(Deadline {
            base: Instant::now(),
            at: AtomicU64::new(0),
        });
        let writer: Arc<Mutex<Arc<dyn DeviceWriter>>> =
            Arc::new(Mutex::new(Arc::new(AcceptWrites)));

        let mut engine = Engine::new();
        engine
            .set_max_operations(MAX_OPERATIONS)
            .set_max_call_levels(MAX_CALL_LEVELS)
            .set_max_expr_depths(MAX_EXPR_DEPTH, MAX_FN_EXPR_DEPTH)
            .set_max_string_size(MAX_STRING_SIZE)
            .set_max_array_size(MAX_ARRAY_SIZE)
            .set_max_map_size(MAX_MAP_SIZE)
            .set_max_variables(MAX_VARIABLES)
            .set_max_functions(MAX_FUNCTIONS)
            .set_max_modules(0)
            .set_module_resolver(DummyModuleResolver::new());
        // Rejected when the file is compiled, with line and column.
        engine.disable_symbol("eval");
        engine.disable_symbol("import");

        let dl = deadline.clone();
        engine.on_progress(move |ops| {
            if ops % DEADLINE_CHECK_EVERY == 0 && dl.passed() {
                Some(Dynamic::from(ImmutableString::from(DEADLINE_TOKEN)))
            } else {
                None
            }
        });

        // `state` and the file's constants, found through the call's tag.
        // Variables with a scope index are the function's own locals and
        // parameters; those are never overridden.
        #[allow(deprecated)] // `on_var` is stable in use, only marked volatile.
        engine.on_var(|name, index, ctx| {
            if index > 0 {
                return Ok(None);
            }
            let Some(scope) = ctx.tag().read_lock::<FileScope>() else {
                return Ok(None);
            };
            if name == "state" {
                return Ok(Some(scope.state.clone()));
            }
            Ok(scope.consts.get(name).cloned())
        });

        let c = call.clone();
        engine.on_print(move |s| {
            let file = lock(&c).file.clone();
            tracing::info!(rule = %file, "{s}");
        });
        engine.on_debug(|s, src, pos| {
            tracing::debug!(
                rule = src.unwrap_or(""),
                line = pos.line().unwrap_or(0),
                "{s}"
            );
        });

        register_api(&mut engine, &call, &deadline, &writer);

        Sandbox {
            engine,
            call,
            deadline,
            writer,
            budget,
        }
    }

    /// Where `write()` goes from now on.
    pub fn set_writer(&self, writer: Arc<dyn DeviceWriter>) {
        *lock(&self.writer) = writer;
    }

    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// Prepares the shared slots for a call into `file`.
    pub fn begin(&self, file: &Arc<str>, clock: Option<Millis>) {
        let mut c = lock(&self.call);
        c.file = file.clone();
        c.publishes.clear();
        c.writes.clear();
        c.clock = clock;
        drop(c);
        self.deadline.start(self.budget);
    }

    /// Ends a call and takes what it published and wrote.
    pub fn end(&self) -> (Vec<Message>, Vec<Write>) {
        self.deadline.clear();
        let mut c = lock(&self.call);
        (
            std::mem::take(&mut c.publishes),
            std::mem::take(&mut c.writes),
        )
    }
}

/// Whether `d` holds more than `budget` map entries and array items, or
/// nests deeper than [`MAX_STATE_DEPTH`].
pub fn exceeds_items(d: &Dynamic, budget: &mut usize) -> bool {
    exceeds_at(d, budget, 0)
}

/// Deepest nesting of `state` (the check recurses).
pub const MAX_STATE_DEPTH: usize = 64;

fn exceeds_at(d: &Dynamic, budget: &mut usize, depth: usize) -> bool {
    if depth > MAX_STATE_DEPTH {
        return true;
    }
    // `as_*_ref` read shared values through their lock: no copy.
    if let Ok(m) = d.as_map_ref() {
        if m.len() > *budget {
            return true;
        }
        *budget -= m.len();
        return m.values().any(|v| exceeds_at(v, budget, depth + 1));
    }
    if let Ok(a) = d.as_array_ref() {
        if a.len() > *budget {
            return true;
        }
        *budget -= a.len();
        return a.iter().any(|v| exceeds_at(v, budget, depth + 1));
    }
    false
}

/// The stack of a thread that runs rules. rhai recurses over nested
/// values (sizes, clones, drops) up to the array and map limits, and a
/// debug build's frames are large; the memory is only reserved, not used.
pub const RULES_STACK_SIZE: usize = 32 * 1024 * 1024;

fn register_api(
    engine: &mut Engine,
    call: &Arc<Mutex<CallState>>,
    deadline: &Arc<Deadline>,
    writer: &Arc<Mutex<Arc<dyn DeviceWriter>>>,
) {
    // publish(topic, payload) and publish(topic, payload, #{qos, retain})
    let c = call.clone();
    let publish = move |ctx: &NativeCallContext,
                        topic: &str,
                        payload: Dynamic,
                        opts: Option<Map>|
          -> Result<(), Box<EvalAltResult>> {
        let pos = ctx.call_position();
        check_topic(topic).map_err(|e| runtime_error(format!("publish: {e}"), pos))?;
        let bytes = convert::payload_bytes(&payload)
            .map_err(|e| runtime_error(format!("publish to `{topic}`: {e}"), pos))?;
        let (qos, retain) = match opts {
            Some(o) => {
                publish_options(&o).map_err(|e| runtime_error(format!("publish: {e}"), pos))?
            }
            None => (Qos::AtMostOnce, false),
        };
        let mut state = lock(&c);
        if state.publishes.len() >= MAX_PUBLISHES_PER_CALL {
            return Err(runtime_error(
                format!("publish: more than {MAX_PUBLISHES_PER_CALL} messages in one call"),
                pos,
            ));
        }
        state.publishes.push(Message {
            topic: topic.to_string(),
            payload: Bytes::from(bytes),
            qos,
            retain,
        });
        Ok(())
    };
    let p2 = publish.clone();
    engine.register_fn(
        "publish",
        move |ctx: NativeCallContext, topic: &str, payload: Dynamic| p2(&ctx, topic, payload, None),
    );
    engine.register_fn(
        "publish",
        move |ctx: NativeCallContext, topic: &str, payload: Dynamic, opts: Map| {
            publish(&ctx, topic, payload, Some(opts))
        },
    );

    // write(device, point, value) -> #{ok: bool, error: string}
    let (c, dl, w) = (call.clone(), deadline.clone(), writer.clone());
    engine.register_fn(
        "write",
        move |ctx: NativeCallContext,
              device: &str,
              point: &str,
              value: Dynamic|
              -> Result<Map, Box<EvalAltResult>> {
            let pos = ctx.call_position();
            let value = convert::dynamic_to_value(&value)
                .map_err(|e| runtime_error(format!("write to {device}/{point}: {e}"), pos))?;
            if lock(&c).writes.len() >= MAX_WRITES_PER_CALL {
                return Err(runtime_error(
                    format!("write: more than {MAX_WRITES_PER_CALL} writes in one call"),
                    pos,
                ));
            }
            let writer = lock(&w).clone();
            let started = Instant::now();
            let result = writer
                .write(device, point, &value)
                .map_err(|e| e.to_string());
            dl.extend(started.elapsed());
            lock(&c).writes.push(Write {
                device: device.to_string(),
                point: point.to_string(),
                value,
                result: result.clone(),
            });
            let mut m = Map::new();
            m.insert("ok".into(), Dynamic::from_bool(result.is_ok()));
            m.insert(
                "error".into(),
                Dynamic::from(ImmutableString::from(result.err().unwrap_or_default())),
            );
            Ok(m)
        },
    );

    let c = call.clone();
    engine.register_fn("now_ms", move || -> i64 {
        lock(&c).clock.unwrap_or_else(crate::model::now_ms)
    });

    engine.register_fn("log", |ctx: NativeCallContext, msg: Dynamic| {
        emit_log(&ctx, "info", &msg)
    });
    engine.register_fn(
        "log",
        |ctx: NativeCallContext, level: &str, msg: Dynamic| emit_log(&ctx, level, &msg),
    );

    engine.register_fn(
        "parse_json",
        |ctx: NativeCallContext, text: &str| -> Result<Dynamic, Box<EvalAltResult>> {
            serde_json::from_str::<serde_json::Value>(text)
                .map(|j| convert::json_to_dynamic(&j))
                .map_err(|e| runtime_error(format!("parse_json: {e}"), ctx.call_position()))
        },
    );
    engine.register_fn(
        "to_json",
        |ctx: NativeCallContext, v: Dynamic| -> Result<String, Box<EvalAltResult>> {
            convert::dynamic_to_json(&v)
                .map(|j| j.to_string())
                .map_err(|e| runtime_error(format!("to_json: {e}"), ctx.call_position()))
        },
    );
}

fn emit_log(ctx: &NativeCallContext, level: &str, msg: &Dynamic) {
    let rule = ctx.call_source().unwrap_or("");
    let line = ctx.call_position().line().unwrap_or(0);
    let msg = msg.flatten_clone();
    match level {
        "error" => tracing::error!(rule, line, "{msg}"),
        "warn" | "warning" => tracing::warn!(rule, line, "{msg}"),
        "debug" => tracing::debug!(rule, line, "{msg}"),
        "trace" => tracing::trace!(rule, line, "{msg}"),
        _ => tracing::info!(rule, line, "{msg}"),
    }
}
