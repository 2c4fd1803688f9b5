//! `serial-line`: every text line received on a serial port becomes a
//! reading of point `line` (a string); rules (`on_line`) parse it.
//!
//! The port is opened exclusively and reopened with backoff when it is
//! missing or lost (an unplugged USB adapter reads EOF forever, which is
//! treated as "lost", never as data).

pub mod codec;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{DeviceConfig, LineSettings};
use crate::drivers::modbus::bus::StatusReport;
use crate::drivers::modbus::transport::open_serial;
use crate::model::{now_ms, Quality, Reading, ReadingBatch, Value};

use codec::{LineFramer, DEFAULT_DELIMITER, DEFAULT_MAX_LINE};

/// The point every line is reported as.
pub const LINE_POINT: &str = "line";

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A serial-line device.
pub struct SerialLine {
    name: Arc<str>,
    port: String,
    settings: LineSettings,
    framer: LineFramer,
    point: Arc<str>,
    unit: Option<Arc<str>>,
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
        }
    }

    /// Reads lines until shutdown, reopening the port as needed.
    pub async fn run(
        mut self,
        readings: mpsc::Sender<ReadingBatch>,
        status: Arc<dyn StatusReport>,
        shutdown: CancellationToken,
    ) {
        let mut backoff = FIRST_BACKOFF;
        let mut down: Option<String> = None;
        let mut online: Option<bool> = None;
        let set = |on: bool, why: Option<&str>, online: &mut Option<bool>| {
            if *online != Some(on) {
                *online = Some(on);
                status.device(&self.name, on, why);
            }
        };
        while !shutdown.is_cancelled() {
            let mut port = match open_serial(&self.port, &self.settings) {
                Ok(p) => p,
                Err(e) => {
                    let why = format!("cannot open {}: {e}", self.port);
                    if down.is_none() {
                        tracing::warn!(device = %self.name, reason = %why, "serial port unavailable; retrying with backoff");
                    }
                    set(false, Some(&why), &mut online);
                    down = Some(why);
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            if down.take().is_some() {
                tracing::info!(device = %self.name, port = %self.port, "serial port is back");
            }
            backoff = FIRST_BACKOFF;
            set(true, None, &mut online);
            self.framer.reset();
            let mut buf = [0u8; 512];
            let mut lines = Vec::new();
            let why = loop {
                let n = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = port.read(&mut buf) => r,
                };
                match n {
                    Ok(0) => break "end of file (device unplugged)".to_string(),
                    Err(e) => break e.to_string(),
                    Ok(n) => {
                        let before = self.framer.stats();
                        self.framer.feed(&buf[..n], &mut lines);
                        let after = self.framer.stats();
                        if after.oversize > before.oversize {
                            tracing::warn!(device = %self.name, dropped_total = after.oversize, "line longer than max_line_length dropped");
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
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            r = readings.send(batch) => if r.is_err() { return },
                        }
                    }
                }
            };
            let why = format!("{} lost: {why}", self.port);
            tracing::warn!(device = %self.name, reason = %why, "serial port lost; reopening with backoff");
            set(false, Some(&why), &mut online);
            down = Some(why);
            drop(port);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
        }
    }
}
