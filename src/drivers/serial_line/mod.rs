//! `serial-line`: every text line received on a serial port becomes a
//! reading of point `line` (a string); rules (`on_line`) parse it.
//!
//! The port is opened exclusively and reopened with backoff when it is
//! missing or lost (an unplugged USB adapter reads EOF forever, which is
//! treated as "lost", never as data).

pub mod check;
pub mod codec;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;
use tracing::Instrument as _;

use crate::config::{DeviceConfig, LineSettings};
use crate::drivers::modbus::transport::open_serial;
use crate::drivers::{reply, DriverContext};
use crate::model::{now_ms, Command, Quality, Reading, ReadingBatch, Value, WriteError};

use codec::{LineFramer, DEFAULT_DELIMITER, DEFAULT_MAX_LINE};

/// The point every line is reported as.
pub const LINE_POINT: &str = "line";

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// How often the counters are published, as for Modbus devices.
const STATS_EVERY: Duration = crate::drivers::modbus::fieldbus::STATS_EVERY;
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Starts the task of one serial-line device.
pub fn spawn(dev: &DeviceConfig, ctx: &DriverContext, commands: mpsc::Receiver<Command>) {
    let task = SerialLine::from_config(dev);
    let span = tracing::info_span!("serial_line", device = %dev.name);
    ctx.tasks
        .spawn(task.run(ctx.clone(), commands).instrument(span));
}

/// A serial-line device.
pub struct SerialLine {
    name: Arc<str>,
    port: String,
    settings: LineSettings,
    framer: LineFramer,
    point: Arc<str>,
    unit: Option<Arc<str>>,
    online: Option<bool>,
    /// Times the port was missing or lost.
    transport_errors: u64,
    next_stats: tokio::time::Instant,
}

enum Stop {
    Shutdown,
    Lost(String),
}

impl SerialLine {
    pub fn from_config(d: &DeviceConfig) -> SerialLine {
        let unit = d
            .point(LINE_POINT)
            .and_then(|p| p.unit.as_deref())
            .map(Arc::from);
        SerialLine {
            name: Arc::from(d.name.as_str()),
            port: d.port.clone().unwrap_or_default(),
            settings: d.line_settings(),
            framer: LineFramer::new(
                d.delimiter.as_deref().unwrap_or(DEFAULT_DELIMITER),
                d.max_line_length.unwrap_or(DEFAULT_MAX_LINE),
            ),
            point: Arc::from(LINE_POINT),
            unit,
            online: None,
            transport_errors: 0,
            next_stats: tokio::time::Instant::now() + STATS_EVERY,
        }
    }

    /// Reads lines until shutdown, reopening the port as needed.
    pub async fn run(mut self, ctx: DriverContext, mut commands: mpsc::Receiver<Command>) {
        let mut backoff = FIRST_BACKOFF;
        let mut down: Option<String> = None;
        while !ctx.shutdown.is_cancelled() {
            let why = match open_serial(&self.port, &self.settings) {
                Ok(port) => {
                    if down.take().is_some() {
                        tracing::info!(device = %self.name, port = %self.port, "serial port is back");
                    }
                    backoff = FIRST_BACKOFF;
                    self.set_online(&ctx, true, None).await;
                    match self.read_lines(port, &ctx, &mut commands).await {
                        Stop::Shutdown => return,
                        Stop::Lost(why) => {
                            let why = format!("{} lost: {why}", self.port);
                            tracing::warn!(device = %self.name, reason = %why, "serial port lost; reopening with backoff");
                            why
                        }
                    }
                }
                Err(e) => {
                    let why = format!("cannot open {}: {e}", self.port);
                    if down.is_none() {
                        tracing::warn!(device = %self.name, reason = %why, "serial port unavailable; retrying with backoff");
                    }
                    why
                }
            };
            self.transport_errors += 1;
            self.set_online(&ctx, false, Some(&why)).await;
            down = Some(why.clone());
            let until = tokio::time::Instant::now() + backoff;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            loop {
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return,
                    Some(cmd) = commands.recv() => reject(cmd, &self.name),
                    _ = tokio::time::sleep_until(until) => break,
                }
            }
        }
    }

    /// `edgebridge/<id>/devices/<device>/stats`, retained.
    async fn publish_stats(&mut self, ctx: &DriverContext) {
        self.next_stats = tokio::time::Instant::now() + STATS_EVERY;
        let st = self.framer.stats();
        let json = serde_json::json!({
            "lines": st.lines,
            "oversize": st.oversize,
            "invalid_utf8": st.invalid_utf8,
            "transport_errors": self.transport_errors,
        });
        ctx.events.stats(&self.name, json).await;
    }

    async fn set_online(&mut self, ctx: &DriverContext, on: bool, why: Option<&str>) {
        if self.online != Some(on) {
            self.online = Some(on);
            if on {
                ctx.events.online(&self.name).await;
            } else {
                ctx.events.offline(&self.name, why).await;
            }
            self.publish_stats(ctx).await;
        }
    }

    async fn read_lines(
        &mut self,
        mut port: tokio_serial::SerialStream,
        ctx: &DriverContext,
        commands: &mut mpsc::Receiver<Command>,
    ) -> Stop {
        self.framer.reset();
        let mut buf = [0u8; 512];
        let mut lines = Vec::new();
        loop {
            let n = tokio::select! {
                _ = ctx.shutdown.cancelled() => return Stop::Shutdown,
                Some(cmd) = commands.recv() => {
                    reject(cmd, &self.name);
                    continue;
                }
                _ = tokio::time::sleep_until(self.next_stats) => {
                    self.publish_stats(ctx).await;
                    continue;
                }
                r = port.read(&mut buf) => r,
            };
            let n = match n {
                // A hung-up tty reads 0 bytes forever: the port is gone.
                Ok(0) => return Stop::Lost("end of file (device unplugged)".into()),
                Err(e) => return Stop::Lost(e.to_string()),
                Ok(n) => n,
            };
            let before = self.framer.stats();
            self.framer.feed(&buf[..n], &mut lines);
            let after = self.framer.stats();
            if after.oversize > before.oversize {
                if before.oversize == 0 {
                    tracing::warn!(device = %self.name, "line longer than max_line_length dropped (further drops are counted on the stats topic)");
                } else {
                    tracing::debug!(device = %self.name, dropped_total = after.oversize, "line longer than max_line_length dropped");
                }
            }
            if after.invalid_utf8 > before.invalid_utf8 {
                tracing::debug!(device = %self.name, total = after.invalid_utf8, "line with invalid UTF-8 (replaced)");
            }
            if lines.is_empty() {
                continue;
            }
            let ts = now_ms();
            let batch: ReadingBatch = lines
                .drain(..)
                .map(|line| Reading {
                    device: self.name.clone(),
                    point: self.point.clone(),
                    value: Value::Text(line),
                    unit: self.unit.clone(),
                    ts,
                    quality: Quality::Good,
                })
                .collect();
            // Writes are refused at once even while the pipeline is full.
            loop {
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return Stop::Shutdown,
                    slot = ctx.events.reserve() => match slot {
                        Ok(slot) => {
                            slot.send(batch);
                            break;
                        }
                        Err(_) => return Stop::Shutdown,
                    },
                    Some(cmd) = commands.recv() => reject(cmd, &self.name),
                }
            }
        }
    }
}

fn reject(cmd: Command, device: &str) {
    reply(cmd, Err(WriteError::ReadOnlyDriver(device.to_string())));
}
