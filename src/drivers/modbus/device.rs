//! One Modbus device on a bus: its points, its request plan, and its
//! health (online, consecutive failures, backoff). The bus task decides
//! *when* a device is polled; this decides *what* a poll or a write sends
//! and what it means.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_modbus::{ExceptionCode, Request};

use crate::config::{DeviceConfig, Table};
use crate::model::{
    now_ms, CommandResult, Millis, Quality, Reading, ReadingBatch, Value, WriteError,
};

use super::decode::{to_bool, CodecError};
use super::plan::{Block, Limits, Plan, Span};
use super::point::{table_name, Point};
use super::session::{BlockData, RequestError, Session};

/// Longest wait between two polls of an offline device.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A device went online or offline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub online: bool,
    /// Why it went offline.
    pub reason: Option<String>,
}

/// Counters of one device, published on its `stats` topic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeviceStats {
    pub polls: u64,
    pub failed_polls: u64,
    /// Requests sent (reads and writes).
    pub requests: u64,
    /// Modbus exceptions answered.
    pub exceptions: u64,
    /// Requests without an answer in time.
    pub timeouts: u64,
    /// Answers that were garbled (bad CRC, wrong length, wrong header).
    pub garbled: u64,
    pub writes: u64,
    pub failed_writes: u64,
    /// Times the port or connection was found missing or lost.
    pub transport_errors: u64,
}

/// A poll in progress, see [`Device::start_poll`].
#[derive(Debug)]
pub struct PollRun {
    ts: Millis,
    queue: VecDeque<Block>,
    readings: ReadingBatch,
}

impl PollRun {
    /// The readings so far.
    pub fn into_readings(self) -> ReadingBatch {
        self.readings
    }
}

/// A Modbus device (one slave id) and what the driver knows about it.
#[derive(Debug)]
pub struct Device {
    pub name: Arc<str>,
    pub slave: u8,
    pub points: Vec<Point>,
    plan: Plan,
    pub poll_every: Duration,
    pub timeout: Duration,
    offline_after: u32,
    /// FC 15/16 even for a single coil or register.
    multiple_writes: bool,
    failures: u32,
    /// `None` until the first poll settles it.
    online: Option<bool>,
    backoff: Duration,
    /// When the device should be polled next.
    pub next_due: Instant,
    /// A write succeeded since the current poll started: poll again at
    /// once.
    repoll: bool,
    pub stats: DeviceStats,
    /// Timeouts and garbled answers are logged at most once per
    /// [`FAULT_LOG_EVERY`], each line with the counter's value, so that
    /// what the log says adds up to the `stats` topic and the metrics.
    fault_log: FaultLog,
}

/// How often a device's timeouts and garbled answers are logged at most.
const FAULT_LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct FaultLog {
    last: Option<Instant>,
    /// Faults since the last line.
    unlogged: u64,
}

impl FaultLog {
    /// Counts one fault; whether to log now, and how many the line covers.
    fn note(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < FAULT_LOG_EVERY)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

impl Device {
    pub fn from_config(d: &DeviceConfig) -> Device {
        let points: Vec<Point> = d.points.iter().filter_map(Point::from_config).collect();
        let plan = Plan::for_points(&points, Limits::from_device(d));
        Device {
            name: Arc::from(d.name.as_str()),
            slave: d.slave.unwrap_or(1),
            points,
            plan,
            poll_every: d.poll_interval(),
            timeout: d.request_timeout(),
            offline_after: d.offline_threshold(),
            multiple_writes: d.multiple_writes.unwrap_or(false),
            failures: 0,
            online: None,
            backoff: d.poll_interval(),
            next_due: Instant::now(),
            repoll: false,
            stats: DeviceStats::default(),
            fault_log: FaultLog::default(),
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn is_online(&self) -> Option<bool> {
        self.online
    }

    /// Reads every point once. Readings share the poll's timestamp. An
    /// exception only affects the points of that block (after the plan's
    /// fallback); a timeout or a lost port ends the poll: the readings so
    /// far are returned with the error.
    pub async fn poll(
        &mut self,
        session: &mut Session,
    ) -> (ReadingBatch, Result<(), RequestError>) {
        let mut run = self.start_poll();
        loop {
            if let Some(result) = self.poll_step(&mut run, session).await {
                return (run.readings, result);
            }
        }
    }

    /// Starts a poll that [`Device::poll_step`] runs one request at a
    /// time, so that writes can go between two requests of a long poll.
    pub fn start_poll(&mut self) -> PollRun {
        self.stats.polls += 1;
        self.repoll = false;
        PollRun {
            ts: now_ms(),
            queue: self.plan.blocks().iter().cloned().collect(),
            readings: Vec::with_capacity(self.points.len()),
        }
    }

    /// Sends the next request of `run`. `None` while requests remain;
    /// the poll's outcome once it is over.
    pub async fn poll_step(
        &mut self,
        run: &mut PollRun,
        session: &mut Session,
    ) -> Option<Result<(), RequestError>> {
        let Some(block) = run.queue.pop_front() else {
            return Some(Ok(()));
        };
        self.stats.requests += 1;
        match session.read(self.slave, &block, self.timeout).await {
            Ok(data) => self.decode_block(&block, &data, run.ts, &mut run.readings),
            Err(RequestError::Exception(code)) if !about_addresses(code) => {
                // Busy, failing, or a TCP gateway that cannot reach the
                // device: the device's trouble, not the addresses'.
                self.stats.exceptions += 1;
                return Some(Err(RequestError::Exception(code)));
            }
            Err(RequestError::Exception(code)) if code == ExceptionCode::IllegalFunction => {
                // The device lacks this function (e.g. no input registers):
                // smaller blocks would not help.
                self.stats.exceptions += 1;
                for &i in &block.points {
                    if let Some(p) = self.points.get(i) {
                        let why = format!(
                            "{} table not supported by the device: {code}",
                            table_name(p.table)
                        );
                        run.readings.push(bad_reading(&self.name, p, run.ts, why));
                    }
                }
            }
            Err(RequestError::Exception(code)) => {
                self.stats.exceptions += 1;
                let parts = self.plan.split(&block);
                if parts.is_empty() {
                    for &i in &block.points {
                        if let Some(p) = self.points.get(i) {
                            let why = format!(
                                "{} {} answered exception: {code}",
                                table_name(p.table),
                                p.address
                            );
                            run.readings.push(bad_reading(&self.name, p, run.ts, why));
                        }
                    }
                } else {
                    tracing::info!(
                        device = %self.name,
                        table = table_name(block.table),
                        start = block.start,
                        count = block.count,
                        %code,
                        parts = parts.len(),
                        "block read answered with an exception; reading it in smaller parts from now on"
                    );
                    for part in parts.into_iter().rev() {
                        run.queue.push_front(part);
                    }
                }
            }
            Err(e) => {
                match &e {
                    RequestError::Timeout(_) => self.stats.timeouts += 1,
                    RequestError::Protocol(_) => self.stats.garbled += 1,
                    _ => {}
                }
                if matches!(e, RequestError::Timeout(_) | RequestError::Protocol(_)) {
                    if let Some(faults) = self.fault_log.note(Instant::now()) {
                        tracing::warn!(device = %self.name, error = %e, faults,
                            timeouts = self.stats.timeouts, garbled = self.stats.garbled,
                            "request failed ({faults} timeouts or garbled answers since the last such line; the totals are the device's counters)");
                    }
                }
                return Some(Err(e));
            }
        }
        run.queue.is_empty().then_some(Ok(()))
    }

    fn decode_block(&self, block: &Block, data: &BlockData, ts: Millis, out: &mut ReadingBatch) {
        for &i in &block.points {
            let (Some(p), Some(span)) = (self.points.get(i), self.plan.span(i)) else {
                continue;
            };
            let off = block.offset_of(span);
            let value = match data {
                BlockData::Bits(bits) => bits
                    .get(off)
                    .map(|b| Ok(p.format.decode_bit(*b)))
                    .unwrap_or_else(|| Err("answer too short".to_string())),
                BlockData::Words(words) => words
                    .get(off..)
                    .ok_or_else(|| "answer too short".to_string())
                    .and_then(|w| p.format.decode(w).map_err(|e| e.to_string())),
            };
            out.push(match value {
                Ok(value) => Reading {
                    device: self.name.clone(),
                    point: p.name.clone(),
                    value,
                    unit: p.unit.clone(),
                    ts,
                    quality: Quality::Good,
                },
                Err(why) => bad_reading(&self.name, p, ts, why),
            });
        }
    }

    /// Books the outcome of a poll and schedules the next one. Returns a
    /// transition when the device went online or offline.
    pub fn record(
        &mut self,
        result: &Result<(), RequestError>,
        now: Instant,
    ) -> Option<Transition> {
        match result {
            Ok(()) => {
                self.failures = 0;
                self.backoff = self.poll_every;
                self.schedule_regular(now);
                self.set_online(true, None)
            }
            Err(e) => {
                self.stats.failed_polls += 1;
                self.failures = self.failures.saturating_add(1);
                if self.failures >= self.offline_after {
                    let t = self.set_online(false, Some(e.to_string()));
                    self.schedule_backoff(now);
                    t
                } else {
                    self.schedule_regular(now);
                    None
                }
            }
        }
    }

    /// The transport is gone (port missing, adapter pulled, connection
    /// refused): the device is offline at once, without counting polls.
    pub fn transport_down(&mut self, reason: &str) -> Option<Transition> {
        self.stats.transport_errors += 1;
        self.failures = self.failures.max(self.offline_after);
        self.set_online(false, Some(reason.to_string()))
    }

    fn set_online(&mut self, online: bool, reason: Option<String>) -> Option<Transition> {
        if self.online == Some(online) {
            return None;
        }
        self.online = Some(online);
        Some(Transition { online, reason })
    }

    /// Fixed rate; a device that fell behind is due now (it then waits its
    /// turn behind devices that have waited longer).
    fn schedule_regular(&mut self, now: Instant) {
        if std::mem::take(&mut self.repoll) {
            self.next_due = now;
            return;
        }
        self.next_due = (self.next_due + self.poll_every).max(now);
    }

    fn schedule_backoff(&mut self, now: Instant) {
        self.next_due = now + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF.max(self.poll_every));
    }

    /// Writes `value` to the point named `point`.
    pub async fn write(
        &mut self,
        session: &mut Session,
        point: &str,
        value: &Value,
    ) -> CommandResult {
        let name = self.name.clone();
        let Some(p) = self.points.iter().find(|p| &*p.name == point) else {
            return Err(WriteError::NoSuchPoint {
                device: name.to_string(),
                point: point.to_string(),
            });
        };
        if !p.writable {
            return Err(WriteError::ReadOnly {
                device: name.to_string(),
                point: point.to_string(),
            });
        }
        let (addr, slave, timeout) = (p.address, self.slave, self.timeout);
        let failed = |e: RequestError| WriteError::Failed {
            device: name.to_string(),
            point: point.to_string(),
            reason: e.to_string(),
        };
        let encode = |e: CodecError| WriteError::Encode {
            device: name.to_string(),
            point: point.to_string(),
            reason: e.to_string(),
        };
        let request = match p.table {
            Table::Coil => {
                let on = to_bool(value).map_err(encode)?;
                if self.multiple_writes {
                    Request::WriteMultipleCoils(addr, Cow::Owned(vec![on]))
                } else {
                    Request::WriteSingleCoil(addr, on)
                }
            }
            Table::Holding if p.format.bit.is_some() => {
                // One bit of a register: read, change the bit, write back.
                let block = Block {
                    table: Table::Holding,
                    start: addr,
                    count: 1,
                    points: Vec::new(),
                    merge: super::plan::Merge::Solo,
                };
                let word = match session.read(slave, &block, timeout).await.map_err(failed)? {
                    BlockData::Words(w) => w.first().copied().unwrap_or(0),
                    BlockData::Bits(_) => 0,
                };
                let word = p.format.encode_bit(word, value).map_err(encode)?;
                if self.multiple_writes {
                    Request::WriteMultipleRegisters(addr, Cow::Owned(vec![word]))
                } else {
                    Request::WriteSingleRegister(addr, word)
                }
            }
            Table::Holding => {
                let regs = p.format.encode(value).map_err(encode)?;
                match regs.as_slice() {
                    [one] if !self.multiple_writes => Request::WriteSingleRegister(addr, *one),
                    _ => Request::WriteMultipleRegisters(addr, Cow::Owned(regs)),
                }
            }
            Table::Discrete | Table::Input => {
                return Err(WriteError::ReadOnlyTable {
                    device: name.to_string(),
                    point: point.to_string(),
                    table: table_name(p.table),
                })
            }
        };
        self.stats.requests += 1;
        session
            .call(slave, request, timeout)
            .await
            .map(|_| ())
            .map_err(failed)
    }

    /// Books the outcome of a write.
    /// Books the outcome of a write. After a good one the device is polled
    /// at once, so the written value shows up without waiting for `poll`
    /// (also when the write went between two requests of a poll).
    pub fn record_write(&mut self, result: &CommandResult, now: Instant) {
        self.stats.writes += 1;
        if result.is_err() {
            self.stats.failed_writes += 1;
            return;
        }
        self.next_due = self.next_due.min(now);
        self.repoll = true;
    }

    /// The spans of the points, for tools that print the plan.
    pub fn spans(&self) -> Vec<Span> {
        self.points.iter().map(Span::of).collect()
    }
}

/// Exceptions that say something about the requested addresses, so that
/// smaller requests may succeed.
fn about_addresses(code: ExceptionCode) -> bool {
    matches!(
        code,
        ExceptionCode::IllegalFunction
            | ExceptionCode::IllegalDataAddress
            | ExceptionCode::IllegalDataValue
    )
}

/// A reading for a point that could not be read.
fn bad_reading(device: &Arc<str>, p: &Point, ts: Millis, why: String) -> Reading {
    Reading {
        device: device.clone(),
        point: p.name.clone(),
        value: Value::Text(String::new()),
        unit: p.unit.clone(),
        ts,
        quality: Quality::Bad(why),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    /// Issue 13: what the log says adds up to the counters. Every fault is
    /// covered by exactly one line's `faults`, however many lines the rate
    /// limit lets through.
    #[test]
    fn every_fault_is_covered_by_one_log_line() {
        let mut log = FaultLog::default();
        let mut covered = 0;
        let mut lines = 0;
        let mut now = Instant::now();
        for i in 0..100u64 {
            if let Some(n) = log.note(now) {
                covered += n;
                lines += 1;
            }
            if i % 10 == 9 {
                now += FAULT_LOG_EVERY / 4;
            }
        }
        // What the next line will report.
        covered += log.unlogged;
        assert_eq!(covered, 100);
        assert!((2..=4).contains(&lines), "{lines} lines for 25 s of faults");
    }

    fn device(extra: &str) -> Device {
        let text = format!(
            "gateway: {{ id: gw }}\ndevices:\n  - {{ name: d, driver: modbus-tcp, address: \"h:502\", \
             poll: 100ms, {extra} points: [{{ name: p, table: holding, address: 0 }}] }}\n"
        );
        let c = Config::from_text(Path::new("c.yaml"), &text, |_| None).unwrap();
        Device::from_config(&c.devices[0])
    }

    fn timeout() -> Result<(), RequestError> {
        Err(RequestError::Timeout(Duration::from_millis(300)))
    }

    #[test]
    fn offline_after_n_failures_then_backoff_then_online() {
        let mut d = device("offline_after: 2,");
        let t0 = d.next_due;
        assert_eq!(d.record(&timeout(), t0), None);
        assert_eq!(d.is_online(), None);
        assert_eq!(d.next_due, t0 + Duration::from_millis(100), "normal rate");
        let t = d.record(&timeout(), t0).unwrap();
        assert!(!t.online);
        assert_eq!(t.reason.as_deref(), Some("no answer within 300ms"));
        // Backoff doubles from the poll interval.
        assert_eq!(d.next_due, t0 + Duration::from_millis(100));
        assert_eq!(d.record(&timeout(), t0), None);
        assert_eq!(d.next_due, t0 + Duration::from_millis(200));
        assert_eq!(d.record(&timeout(), t0), None);
        assert_eq!(d.next_due, t0 + Duration::from_millis(400));
        for _ in 0..20 {
            d.record(&timeout(), t0);
        }
        assert_eq!(d.next_due, t0 + MAX_BACKOFF, "capped");
        // One good poll: online, normal rate again.
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(
            d.record(&Ok(()), t1),
            Some(Transition {
                online: true,
                reason: None
            })
        );
        assert_eq!(d.record(&Ok(()), t1), None, "reported once");
        assert_eq!(d.record(&timeout(), t1), None, "one failure is not offline");
    }

    #[test]
    fn a_device_that_fell_behind_is_due_now() {
        let mut d = device("");
        let late = Instant::now() + Duration::from_secs(5);
        d.record(&Ok(()), late);
        assert_eq!(d.next_due, late);
    }

    #[test]
    fn transport_down_is_offline_at_once() {
        let mut d = device("");
        let t = d.transport_down("cannot open /dev/ttyUSB0").unwrap();
        assert!(!t.online);
        assert_eq!(d.transport_down("again"), None);
    }
}
