//! The rules at run time. One thread owns the compiled [`Rules`] and runs
//! every call, so a slow rule never holds up a driver or the broker:
//!
//! - the pipeline hands it reading batches with `try_send` on a bounded
//!   channel; when the channel is full the batch skips the rules (straight
//!   to the mappings) and that is counted and logged, so polling never
//!   waits for a script;
//! - a bus client subscribed to the rules' `SUBSCRIBE` filters feeds it
//!   messages for `on_message`;
//! - `write()` goes to [`Devices::write`] and waits for the device's answer
//!   (that wait does not count against the rule's deadline);
//! - SIGHUP sends it a reload; the new set replaces the old one between
//!   two calls, or not at all.
//!
//! A thread and not a task because rule calls are synchronous CPU work of
//! up to the deadline each, and `write()` blocks on a device.

use std::collections::{HashMap, HashSet, VecDeque};
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
use crate::pipeline::mapping::Mappings;
use crate::status::Status;

/// Inputs waiting for the rules thread. Beyond this, reading batches skip
/// the rules.
pub const RULES_QUEUE: usize = 256;
/// Rule messages remembered to recognise their echo (see [`Echoes`]).
const ECHO_LIMIT: usize = 1024;
const ECHO_TTL: Duration = Duration::from_secs(10);
/// How often the counters go to `edgebridge/<id>/rules` (when changed).
pub const STATS_EVERY: Duration = Duration::from_secs(30);
/// At most one "rules are behind" warning per this interval.
const BYPASS_LOG_EVERY: Duration = Duration::from_secs(10);

enum Input {
    Batch(ReadingBatch),
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
    bypassed: AtomicU64,
    last_bypass_log: Mutex<Option<Instant>>,
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
    /// serves readings, messages and reloads until the gateway stops.
    pub async fn start(
        rules: Rules,
        config: &Config,
        mappings: Arc<Mappings>,
        bus: Bus,
        devices: Devices,
        status: Status,
    ) -> std::io::Result<Arc<RulesRuntime>> {
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
        let worker = Worker {
            echoes: Echoes {
                filters: filters.clone(),
                pending: VecDeque::new(),
            },
            stopping: stopping.clone(),
            rules,
            mappings,
            bus: bus.clone(),
            handle,
            serial_line,
            types,
        };
        std::thread::Builder::new()
            .name("rules".into())
            .stack_size(RULES_STACK_SIZE)
            .spawn(move || {
                // A bug (in rhai or here) must not pass silently: readings
                // would then skip the rules without a word.
                let run = std::panic::AssertUnwindSafe(|| worker.run(rx));
                if std::panic::catch_unwind(run).is_err() {
                    tracing::error!(
                        "the rules thread panicked; readings now go to the mappings \
                         without rules until the gateway restarts"
                    );
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
            bypassed: AtomicU64::new(0),
            last_bypass_log: Mutex::new(None),
            stopping,
            reporter: Mutex::new(None),
        });
        runtime.subscribe(filters).await;
        let reporter = tokio::spawn(report_stats(Arc::downgrade(&runtime), status));
        *runtime.reporter.lock().unwrap_or_else(|e| e.into_inner()) = Some(reporter);
        Ok(runtime)
    }

    /// Hands a batch to the rules; gives it back when the rules are behind
    /// (the caller then maps it without rules).
    pub fn offer(&self, batch: ReadingBatch) -> Result<(), ReadingBatch> {
        match self.input.try_send(Input::Batch(batch)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(Input::Batch(b))) => {
                self.note_bypass(b.len());
                Err(b)
            }
            // The rules thread has stopped (shutdown): map the rest.
            Err(mpsc::error::TrySendError::Closed(Input::Batch(b))) => Err(b),
            // Only batches are offered.
            Err(_) => Ok(()),
        }
    }

    /// The one place where skipped batches are counted and logged.
    fn note_bypass(&self, readings: usize) {
        let total = self.bypassed.fetch_add(readings as u64, Ordering::Relaxed) + readings as u64;
        let mut last = self
            .last_bypass_log
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed() >= BYPASS_LOG_EVERY) {
            *last = Some(Instant::now());
            tracing::warn!(
                skipped_total = total,
                "the rules are behind: readings go to the mappings without rules \
                 (a slow rule or a slow write?)"
            );
        }
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
            status.publish_retained("rules", payload.clone()).await;
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
struct Echoes {
    filters: Vec<String>,
    pending: VecDeque<(Instant, String, bytes::Bytes)>,
}

impl Echoes {
    fn note(&mut self, m: &Message) {
        if self.filters.iter().any(|f| filter_matches(f, &m.topic)) {
            if self.pending.len() >= ECHO_LIMIT {
                self.pending.pop_front();
            }
            self.pending
                .push_back((Instant::now(), m.topic.clone(), m.payload.clone()));
        }
    }

    fn is_echo(&mut self, m: &Message) -> bool {
        while self
            .pending
            .front()
            .is_some_and(|(t, ..)| t.elapsed() > ECHO_TTL)
        {
            self.pending.pop_front();
        }
        match self
            .pending
            .iter()
            .position(|(_, topic, payload)| *topic == m.topic && *payload == m.payload)
        {
            Some(i) => {
                self.pending.remove(i);
                true
            }
            None => false,
        }
    }
}

struct Worker {
    echoes: Echoes,
    stopping: Arc<AtomicBool>,
    rules: Rules,
    mappings: Arc<Mappings>,
    bus: Bus,
    handle: Handle,
    serial_line: HashSet<String>,
    /// The point types `write()` converts to (shared with the writer).
    types: PointTypes,
}

impl Worker {
    fn run(mut self, mut rx: mpsc::Receiver<Input>) {
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
        while let Some(input) = rx.blocking_recv() {
            match input {
                Input::Batch(batch) => self.batch(batch),
                Input::Message(m) => {
                    if self.echoes.is_echo(&m) {
                        continue;
                    }
                    let result = self.rules.on_message(&m.topic, &m.payload);
                    let mut out = Vec::new();
                    self.rule_output(result.publishes, &mut out);
                    self.publish(out);
                }
                Input::Reload(reply, facts) => {
                    // Even when the rules do not compile: the devices
                    // changed with the config already.
                    *self.types.write().unwrap_or_else(|e| e.into_inner()) = facts.types;
                    self.serial_line = facts.serial_line;
                    let result = self.reload();
                    let _ = reply.send(result);
                }
                Input::Stats(reply) => {
                    let _ = reply.send(self.rules.stats());
                }
                Input::Stop(reply) => {
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

    fn batch(&mut self, batch: ReadingBatch) {
        let mut out = Vec::new();
        if self.stopping.load(Ordering::Relaxed) {
            for r in &batch {
                self.mappings.apply(r, &mut out);
            }
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

    fn reading(&mut self, r: crate::model::Reading, out: &mut Vec<Message>) {
        if !self.rules.has_on_reading() {
            self.mappings.apply(&r, out);
            return;
        }
        let result = self.rules.on_reading(&r);
        self.rule_output(result.outcome.publishes, out);
        if let Some(r) = result.verdict.into_reading(r) {
            self.mappings.apply(&r, out);
        }
    }

    fn publish(&self, messages: Vec<Message>) {
        if messages.is_empty() {
            return;
        }
        crate::ops::metrics::pipeline_messages(messages.len());
        self.handle.block_on(async {
            for m in messages {
                self.bus.publish(m).await;
            }
        });
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
