//! The rules at run time. One thread owns the compiled [`Rules`] and runs
//! every call, so a slow rule never holds up a driver or the broker:
//!
//! - it *is* the pipeline when rules are configured: it takes the
//!   drivers' reading batches in order, runs `on_line`/`on_reading`, then
//!   the mappings, and publishes through [`Pipeline::publish`]; when more
//!   than [`SHED_RULES_AT`] batches wait, the batches it takes skip the
//!   rules (mappings only, in order), counted and logged (see the
//!   overload policy in [`crate::pipeline`]);
//! - a bus client subscribed to the rules' `SUBSCRIBE` filters feeds it
//!   messages for `on_message`;
//! - `write()` goes to [`Devices::write`] and waits for the device's answer
//!   (that wait does not count against the rule's deadline);
//! - SIGHUP sends it a reload; the new set replaces the old one between
//!   two calls, or not at all.
//!
//! A thread and not a task because rule calls are synchronous CPU work of
//! up to the deadline each, and `write()` blocks on a device.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::load::{filter_matches, RuleErrors};
use super::runner::{RuleStats, Rules};
use super::sandbox::{DeviceWriter, RULES_STACK_SIZE};
use crate::bus::Bus;
use crate::config::{Config, DataType, DriverKind};
use crate::drivers::Devices;
use crate::model::{CommandResult, Message, Qos, ReadingBatch, Value};
use crate::pipeline::commands::coerce;
use crate::pipeline::Pipeline;
use crate::status::{Event, Status};

/// Messages, reloads and stats requests waiting for the rules thread.
pub const RULES_QUEUE: usize = 256;
/// Reading batches waiting behind the one being taken from which it skips
/// the rules (see the overload policy in [`crate::pipeline`]).
pub const SHED_RULES_AT: usize = 256;
/// Rule messages remembered to recognise their echo (see [`RuleEchoes`]).
const ECHO_LIMIT: usize = 1024;
const ECHO_TTL: Duration = Duration::from_secs(10);
/// How often the counters go to `edgebridge/<id>/rules` (when changed).
pub const STATS_EVERY: Duration = Duration::from_secs(30);
/// At most one "rules are behind" warning per this interval.
const BYPASS_LOG_EVERY: Duration = Duration::from_secs(10);

enum Input {
    Message(Message),
    Reload(
        oneshot::Sender<Result<ReloadReport, RuleErrors>>,
        DeviceFacts,
    ),
    Stats(oneshot::Sender<Vec<RuleStats>>),
    /// Everything queued before it has been handled; the thread ends.
    Stop(oneshot::Sender<()>),
}

/// What a successful reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// Files whose text did not change; their `state` survived.
    pub kept: Vec<String>,
    /// New or changed files; their `on_start` ran.
    pub started: Vec<String>,
    /// The `SUBSCRIBE` filters of the new set.
    pub subscriptions: Vec<String>,
}

/// The gateway's side of the rules thread.
pub struct RulesRuntime {
    input: mpsc::Sender<Input>,
    bus: Bus,
    subscriber: Mutex<Subscriber>,
    /// Readings that skipped the rules (counted by the thread).
    bypassed: Arc<AtomicU64>,
    /// Set at shutdown: queued batches are mapped without rules, so a
    /// backlog behind a slow rule does not delay the exit.
    stopping: Arc<AtomicBool>,
    reporter: Mutex<Option<JoinHandle<()>>>,
}

struct Subscriber {
    filters: Vec<String>,
    task: Option<JoinHandle<()>>,
    generation: u32,
}

/// Executes `write()` through the gateway's devices, converting the value
/// to the point's type the way `commands:` do.
/// What the rules need to know of the configured devices; taken from the
/// config at start and again at every reload (SIGHUP).
struct DeviceFacts {
    /// Each point's type (`None`: untyped), for `write()`.
    types: HashMap<(String, String), Option<DataType>>,
    /// The serial-line devices, whose `line` readings go to `on_line`.
    serial_line: HashSet<String>,
}

impl DeviceFacts {
    fn of(config: &Config) -> DeviceFacts {
        let types = config
            .devices
            .iter()
            .flat_map(|d| {
                d.points.iter().map(move |p| {
                    let typed = p.table.is_some() || p.data_type.is_some();
                    (
                        (d.name.clone(), p.name.clone()),
                        typed.then(|| p.data_type()),
                    )
                })
            })
            .collect();
        let serial_line = config
            .devices
            .iter()
            .filter(|d| d.driver == DriverKind::SerialLine)
            .map(|d| d.name.clone())
            .collect();
        DeviceFacts { types, serial_line }
    }
}

type PointTypes = Arc<std::sync::RwLock<HashMap<(String, String), Option<DataType>>>>;

struct GatewayWriter {
    devices: Devices,
    handle: Handle,
    /// Shared with the worker, which replaces them on a reload.
    types: PointTypes,
}

impl DeviceWriter for GatewayWriter {
    fn write(&self, device: &str, point: &str, value: &Value) -> CommandResult {
        let ty = self
            .types
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(device.to_string(), point.to_string()))
            .copied();
        let value = match ty {
            Some(Some(ty)) => coerce(value.clone(), ty)?,
            _ => value.clone(),
        };
        self.handle
            .block_on(self.devices.write(device, point, value))
    }
}

impl RulesRuntime {
    /// Starts the rules thread: it runs every file's `on_start()`, then
    /// serves the drivers' `readings` (it is the pipeline from now on),
    /// messages and reloads until the gateway stops. The handle ends when
    /// the thread does.
    pub async fn start(
        rules: Rules,
        config: &Config,
        pipeline: Pipeline,
        readings: mpsc::Receiver<ReadingBatch>,
        bus: Bus,
        devices: Devices,
        status: Status,
    ) -> std::io::Result<(Arc<RulesRuntime>, JoinHandle<()>)> {
        let handle = Handle::current();
        let DeviceFacts { types, serial_line } = DeviceFacts::of(config);
        let types: PointTypes = Arc::new(std::sync::RwLock::new(types));
        rules.set_writer(Arc::new(GatewayWriter {
            devices,
            handle: handle.clone(),
            types: types.clone(),
        }));
        let filters = rules.subscriptions();
        let (input, rx) = mpsc::channel(RULES_QUEUE);
        let stopping = Arc::new(AtomicBool::new(false));
        let bypassed = Arc::new(AtomicU64::new(0));
        let worker = Worker {
            echoes: RuleEchoes {
                filters: filters.clone(),
                guard: crate::topic::Echoes::new(ECHO_TTL, ECHO_LIMIT),
            },
            stopping: stopping.clone(),
            bypassed: bypassed.clone(),
            last_bypass_log: None,
            rules,
            pipeline: pipeline.clone(),
            handle: handle.clone(),
            serial_line,
            types,
        };
        // Ends when the thread does (its sender is dropped), panic or not.
        let (done, ended) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("rules".into())
            .stack_size(RULES_STACK_SIZE)
            .spawn(move || {
                let _done = done;
                let (mut control, mut readings) = (rx, readings);
                let run = std::panic::AssertUnwindSafe(|| worker.run(&mut control, &mut readings));
                if std::panic::catch_unwind(run).is_err() {
                    // A bug (in rhai or here) must not pass silently, nor
                    // stop the readings: they go on without rules.
                    tracing::error!(
                        "the rules thread panicked; readings now go to the mappings \
                         without rules until the gateway restarts"
                    );
                    drop(control);
                    handle.block_on(crate::pipeline::run_without_rules(&mut readings, &pipeline));
                }
            })?;
        let runtime = Arc::new(RulesRuntime {
            input,
            bus,
            subscriber: Mutex::new(Subscriber {
                filters: Vec::new(),
                task: None,
                generation: 0,
            }),
            bypassed,
            stopping,
            reporter: Mutex::new(None),
        });
        runtime.subscribe(filters).await;
        let reporter = tokio::spawn(report_stats(Arc::downgrade(&runtime), status));
        *runtime.reporter.lock().unwrap_or_else(|e| e.into_inner()) = Some(reporter);
        let ended = tokio::spawn(async move {
            let _ = ended.await;
        });
        Ok((runtime, ended))
    }

    /// Readings that skipped the rules since start.
    pub fn bypassed(&self) -> u64 {
        self.bypassed.load(Ordering::Relaxed)
    }

    /// Compiles the rules folder again and swaps the set in if it
    /// compiles; otherwise the running rules stay and the errors are
    /// returned. The devices of `config` (the one now running) replace
    /// those the rules knew: their point types for `write()` and which
    /// ones are serial-line devices for `on_line`.
    pub async fn reload(&self, config: &Config) -> Result<ReloadReport, RuleErrors> {
        let (tx, rx) = oneshot::channel();
        let gone = || {
            RuleErrors(vec![super::RuleError::Io {
                path: Default::default(),
                message: "the rules are not running".into(),
            }])
        };
        self.input
            .send(Input::Reload(tx, DeviceFacts::of(config)))
            .await
            .map_err(|_| gone())?;
        let report = rx.await.map_err(|_| gone())??;
        self.subscribe(report.subscriptions.clone()).await;
        Ok(report)
    }

    /// Counters per rule file.
    pub async fn stats(&self) -> Vec<RuleStats> {
        let (tx, rx) = oneshot::channel();
        if self.input.send(Input::Stats(tx)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// (Re)subscribes the rules' bus client when the filters changed.
    async fn subscribe(&self, filters: Vec<String>) {
        let generation = {
            let mut s = self.subscriber.lock().unwrap_or_else(|e| e.into_inner());
            if s.filters == filters && (s.task.is_some() || filters.is_empty()) {
                return;
            }
            if let Some(t) = s.task.take() {
                t.abort();
            }
            s.filters = filters.clone();
            s.generation += 1;
            s.generation
        };
        if filters.is_empty() {
            return;
        }
        let subs: Vec<(String, Qos)> = filters
            .iter()
            .map(|f| (f.clone(), Qos::AtLeastOnce))
            .collect();
        let client_id = format!("edgebridge-rules-{generation}");
        let mut sub = match self.bus.subscribe(&client_id, &subs).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "rules: cannot subscribe; on_message gets nothing");
                return;
            }
        };
        let input = self.input.clone();
        let task = tokio::spawn(async move {
            while let Some(m) = sub.recv().await {
                if input.send(Input::Message(m)).await.is_err() {
                    break;
                }
            }
        });
        let mut s = self.subscriber.lock().unwrap_or_else(|e| e.into_inner());
        if s.generation == generation {
            s.task = Some(task);
        } else {
            task.abort();
        }
    }

    /// Stops receiving messages, lets the rules thread finish what is
    /// queued (up to `limit`) and ends it. Call after the pipeline ended.
    pub async fn shutdown(&self, limit: Duration) {
        self.stopping.store(true, Ordering::Relaxed);
        if let Some(r) = self
            .reporter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            r.abort();
        }
        if let Some(t) = self
            .subscriber
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .task
            .take()
        {
            t.abort();
        }
        let (tx, rx) = oneshot::channel();
        let stop = async {
            if self.input.send(Input::Stop(tx)).await.is_ok() {
                let _ = rx.await;
            }
        };
        if tokio::time::timeout(limit, stop).await.is_err() {
            tracing::warn!("the rules did not finish within {limit:?}");
        }
    }
}

/// Publishes the counters, retained, on `edgebridge/<id>/rules` every
/// [`STATS_EVERY`] when they changed:
/// `{"files":[{"file":"pv.rhai","calls":…,"errors":…,"deadlines":…}],"skipped":…}`.
async fn report_stats(runtime: std::sync::Weak<RulesRuntime>, status: Status) {
    let mut tick = tokio::time::interval(STATS_EVERY);
    let mut last = String::new();
    loop {
        tick.tick().await;
        let Some(rt) = runtime.upgrade() else {
            return;
        };
        let files: Vec<serde_json::Value> = rt
            .stats()
            .await
            .iter()
            .map(|s| {
                serde_json::json!({
                    "file": &*s.file,
                    "calls": s.calls,
                    "errors": s.errors,
                    "deadlines": s.deadlines,
                })
            })
            .collect();
        let payload = serde_json::json!({ "files": files, "skipped": rt.bypassed() }).to_string();
        drop(rt);
        if payload != last {
            status.report(Event::Rules(payload.clone())).await;
            last = payload;
        }
    }
}

/// What the rules published on topics their own `SUBSCRIBE` matches. The
/// broker hands such a message back to the rules' subscription; it is not
/// given to `on_message` (as MQTT 5's no-local would do), so a rule that
/// answers on `cmd/x/result` while subscribed to `cmd/#` cannot feed
/// itself forever. Messages from anybody else, mappings included, do reach
/// `on_message`.
struct RuleEchoes {
    /// The rules' `SUBSCRIBE` filters: only what they match can come back.
    filters: Vec<String>,
    guard: crate::topic::Echoes,
}

impl RuleEchoes {
    fn note(&mut self, m: &Message) {
        if self.filters.iter().any(|f| filter_matches(f, &m.topic)) {
            self.guard.expect(&m.topic, &m.payload, Instant::now());
        }
    }

    fn is_echo(&mut self, m: &Message) -> bool {
        self.guard.is_echo(&m.topic, &m.payload, Instant::now())
    }
}

struct Worker {
    echoes: RuleEchoes,
    stopping: Arc<AtomicBool>,
    /// Readings that skipped the rules, and when that was last logged.
    bypassed: Arc<AtomicU64>,
    last_bypass_log: Option<Instant>,
    rules: Rules,
    pipeline: Pipeline,
    handle: Handle,
    serial_line: HashSet<String>,
    /// The point types `write()` converts to (shared with the writer).
    types: PointTypes,
}

/// What the rules thread takes next.
enum Next {
    Control(Option<Input>),
    Batch(Option<ReadingBatch>),
    /// Both channels are closed.
    Done,
}

impl Worker {
    fn run(
        mut self,
        control: &mut mpsc::Receiver<Input>,
        readings: &mut mpsc::Receiver<ReadingBatch>,
    ) {
        let files: Vec<String> = self
            .rules
            .files()
            .iter()
            .map(|f| f.name.to_string())
            .collect();
        tracing::info!(files = ?files, "rules loaded");
        let started = self.rules.start();
        let mut out = Vec::new();
        self.rule_output(started.publishes, &mut out);
        self.publish(out);
        let (mut control_open, mut readings_open) = (true, true);
        loop {
            let next = self.handle.block_on(async {
                tokio::select! {
                    biased;
                    c = control.recv(), if control_open => Next::Control(c),
                    b = readings.recv(), if readings_open => Next::Batch(b),
                    else => Next::Done,
                }
            });
            match next {
                Next::Batch(Some(batch)) => {
                    let backlog = readings.len();
                    self.batch(batch, backlog);
                }
                Next::Batch(None) => readings_open = false,
                Next::Control(None) => control_open = false,
                Next::Done => break,
                Next::Control(Some(Input::Message(m))) => {
                    if self.echoes.is_echo(&m) {
                        continue;
                    }
                    let result = self.rules.on_message(&m.topic, &m.payload);
                    let mut out = Vec::new();
                    self.rule_output(result.publishes, &mut out);
                    self.publish(out);
                }
                Next::Control(Some(Input::Reload(reply, facts))) => {
                    // Even when the rules do not compile: the devices
                    // changed with the config already.
                    *self.types.write().unwrap_or_else(|e| e.into_inner()) = facts.types;
                    self.serial_line = facts.serial_line;
                    let result = self.reload();
                    let _ = reply.send(result);
                }
                Next::Control(Some(Input::Stats(reply))) => {
                    let _ = reply.send(self.rules.stats());
                }
                Next::Control(Some(Input::Stop(reply))) => {
                    // The drivers have stopped: what they sent last goes
                    // through the mappings (`stopping` is set).
                    while let Ok(batch) = readings.try_recv() {
                        self.batch(batch, 0);
                    }
                    let _ = reply.send(());
                    break;
                }
            }
        }
        tracing::debug!("rules thread stopped");
    }

    /// Messages published by rules: remembered when they may echo back.
    fn rule_output(&mut self, messages: Vec<Message>, out: &mut Vec<Message>) {
        for m in &messages {
            self.echoes.note(m);
        }
        out.extend(messages);
    }

    /// One batch along the pipeline: through the rules, or past them when
    /// `backlog` batches wait behind it (or the gateway is stopping).
    fn batch(&mut self, batch: ReadingBatch, backlog: usize) {
        Pipeline::received(&batch);
        let mut out = Vec::new();
        let stopping = self.stopping.load(Ordering::Relaxed);
        if stopping || backlog >= SHED_RULES_AT {
            if !stopping {
                self.note_bypass(batch.len());
            }
            self.pipeline.map_all(&batch, &mut out);
            self.publish(out);
            return;
        }
        for r in batch {
            if &*r.point == "line" && self.serial_line.contains(&*r.device) {
                if let Value::Text(line) = &r.value {
                    let parsed = self.rules.on_line(&r.device, line, r.ts);
                    self.rule_output(parsed.outcome.publishes, &mut out);
                    for derived in parsed.readings {
                        self.reading(derived, &mut out);
                    }
                }
            }
            self.reading(r, &mut out);
        }
        self.publish(out);
    }

    /// The one place where skipped batches are counted and logged.
    fn note_bypass(&mut self, readings: usize) {
        let total = self.bypassed.fetch_add(readings as u64, Ordering::Relaxed) + readings as u64;
        if self
            .last_bypass_log
            .is_none_or(|t| t.elapsed() >= BYPASS_LOG_EVERY)
        {
            self.last_bypass_log = Some(Instant::now());
            tracing::warn!(
                skipped_total = total,
                "the rules are behind: readings go to the mappings without rules \
                 (a slow rule or a slow write?)"
            );
        }
    }

    fn reading(&mut self, r: crate::model::Reading, out: &mut Vec<Message>) {
        if !self.rules.has_on_reading() {
            self.pipeline.map(&r, out);
            return;
        }
        let result = self.rules.on_reading(&r);
        self.rule_output(result.outcome.publishes, out);
        if let Some(r) = result.verdict.into_reading(r) {
            self.pipeline.map(&r, out);
        }
    }

    fn publish(&self, mut messages: Vec<Message>) {
        self.handle.block_on(self.pipeline.publish(&mut messages));
    }

    fn reload(&mut self) -> Result<ReloadReport, RuleErrors> {
        match self.rules.reload() {
            Ok(r) => {
                let report = ReloadReport {
                    kept: r.kept.iter().map(|n| n.to_string()).collect(),
                    started: r.started.iter().map(|n| n.to_string()).collect(),
                    subscriptions: self.rules.subscriptions(),
                };
                tracing::info!(
                    kept = ?report.kept,
                    started = ?report.started,
                    "rules reloaded"
                );
                self.echoes.filters = report.subscriptions.clone();
                let mut out = Vec::new();
                self.rule_output(r.outcome.publishes, &mut out);
                self.publish(out);
                Ok(report)
            }
            Err(e) => {
                for err in &e.0 {
                    tracing::error!(
                        "rules reload rejected, the previous rules keep running: {err}"
                    );
                }
                Err(e)
            }
        }
    }
}
