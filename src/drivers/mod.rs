//! Device drivers: where a [`Reading`](crate::model::Reading) is born.
//! Each driver polls its devices and reports through [`Events`]:
//! [`ReadingBatch`]es to the pipeline; online, offline and counters to the
//! status task. Drivers never publish nor name a topic. [`Devices`] carries
//! [`Command`]s back to the owning driver.

pub mod check;
pub mod modbus;
pub mod serial_line;
pub mod simulator;
pub mod units;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::mpsc::{self, Permit};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{DeviceConfig, DriverKind};
use crate::model::{Command, CommandResult, ReadingBatch, Value, WriteError};
use crate::status::{Event, Status};

/// Commands waiting for one device's driver.
const COMMAND_QUEUE: usize = 64;
/// How long a command waits for the driver's answer.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("device `{device}`: driver `{driver}` is not implemented in this build yet")]
    NotImplemented {
        device: String,
        driver: &'static str,
    },
}

/// What every driver task gets from the gateway.
#[derive(Clone)]
pub struct DriverContext {
    pub events: Events,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
}

/// The pipeline has stopped (the gateway is shutting down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the pipeline has stopped")]
pub struct PipelineGone;

/// How a driver reports: readings to the pipeline, a device's state and
/// counters to the status task ([`crate::status`]).
#[derive(Clone)]
pub struct Events {
    readings: mpsc::Sender<ReadingBatch>,
    status: Status,
}

impl Events {
    pub fn new(readings: mpsc::Sender<ReadingBatch>, status: Status) -> Events {
        Events { readings, status }
    }

    /// A place for one poll's readings in the pipeline's channel. A
    /// driver waits for it while answering writes: a rule's `write()` may
    /// be what the pipeline waits for.
    pub async fn reserve(&self) -> Result<Permit<'_, ReadingBatch>, PipelineGone> {
        self.readings.reserve().await.map_err(|_| PipelineGone)
    }

    /// `device` answers (again).
    pub async fn online(&self, device: &str) {
        self.device(device, true, None).await;
    }

    /// `device` stopped answering, and why if known.
    pub async fn offline(&self, device: &str, reason: Option<&str>) {
        self.device(device, false, reason).await;
    }

    async fn device(&self, device: &str, online: bool, reason: Option<&str>) {
        self.status
            .report(Event::Device {
                device: device.to_string(),
                online,
                reason: reason.map(str::to_string),
            })
            .await;
    }

    /// A device's counters: a JSON object (anything else is ignored).
    pub async fn stats(&self, device: &str, counters: serde_json::Value) {
        let serde_json::Value::Object(counters) = counters else {
            return;
        };
        self.status
            .report(Event::DeviceStats {
                device: device.to_string(),
                counters,
            })
            .await;
    }

    /// `device` was removed from the config.
    pub fn forget(&self, device: &str) {
        self.status.forget_device(device);
    }
}

/// Command senders by device name.
pub type Senders = HashMap<String, mpsc::Sender<Command>>;

/// Routes commands to the driver task that owns each device. A config
/// reload swaps the routes of restarted devices in place, so every clone
/// (commands, rules) follows.
#[derive(Clone, Default)]
pub struct Devices {
    // A std lock: held only to clone a sender, never across an await.
    senders: Arc<RwLock<Senders>>,
}

impl Devices {
    /// Writes `value` to `device/point` and waits for the driver's answer.
    pub async fn write(&self, device: &str, point: &str, value: Value) -> CommandResult {
        let result = self.write_inner(device, point, value).await;
        // A rule may name any device; only configured names become labels,
        // so a stream of made-up names cannot grow the metrics without end.
        let known = self
            .senders
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(device);
        crate::ops::metrics::command(if known { device } else { "(unknown)" }, result.is_ok());
        result
    }

    async fn write_inner(&self, device: &str, point: &str, value: Value) -> CommandResult {
        let tx = self
            .senders
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(device)
            .cloned();
        let Some(tx) = tx else {
            return Err(WriteError::NoSuchDevice(device.to_string()));
        };
        let (reply, answer) = oneshot::channel();
        let cmd = Command {
            device: device.to_string(),
            point: point.to_string(),
            value,
            reply: Some(reply),
        };
        tx.send(cmd)
            .await
            .map_err(|_| WriteError::NotRunning(device.to_string()))?;
        match tokio::time::timeout(COMMAND_TIMEOUT, answer).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(WriteError::Dropped(device.to_string())),
            Err(_) => Err(WriteError::Timeout {
                device: device.to_string(),
                after: COMMAND_TIMEOUT,
            }),
        }
    }
}

impl Devices {
    pub fn new(senders: Senders) -> Devices {
        Devices {
            senders: Arc::new(RwLock::new(senders)),
        }
    }

    /// Routes `device` to a new driver task, or nowhere (`None`).
    pub fn set_route(&self, device: &str, sender: Option<mpsc::Sender<Command>>) {
        let mut map = self.senders.write().unwrap_or_else(|e| e.into_inner());
        match sender {
            Some(s) => map.insert(device.to_string(), s),
            None => map.remove(device),
        };
    }
}

/// Starts the driver tasks for `devices` (one task per device, or per
/// shared port); their command senders by device name.
pub fn spawn_devices(
    devices: &[DeviceConfig],
    ctx: &DriverContext,
) -> Result<Senders, DriverError> {
    let mut senders = HashMap::new();
    let mut modbus_devices = Vec::new();
    for dev in devices {
        if dev.driver.is_modbus() {
            // Devices sharing a serial port share one task: spawned below.
            modbus_devices.push(dev);
            continue;
        }
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        match dev.driver {
            DriverKind::Simulator => simulator::spawn(dev.clone(), ctx.clone(), rx),
            DriverKind::SerialLine => serial_line::spawn(dev, ctx, rx),
            other => {
                return Err(DriverError::NotImplemented {
                    device: dev.name.clone(),
                    driver: other.name(),
                })
            }
        }
        senders.insert(dev.name.clone(), tx);
    }
    senders.extend(modbus::spawn(&modbus_devices, ctx));
    Ok(senders)
}

/// Fails like [`spawn_devices`] would, without starting anything.
pub fn check_devices(devices: &[DeviceConfig]) -> Result<(), DriverError> {
    for dev in devices {
        match dev.driver {
            DriverKind::Simulator
            | DriverKind::SerialLine
            | DriverKind::ModbusRtu
            | DriverKind::ModbusTcp => {}
        }
    }
    Ok(())
}

/// Answers a command, if anybody waits for the answer.
pub fn reply(cmd: Command, result: CommandResult) {
    if let Some(r) = cmd.reply {
        let _ = r.send(result);
    }
}
