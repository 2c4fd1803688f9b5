//! Device drivers: where a [`Reading`](crate::model::Reading) is born.
//! Each driver polls its devices and sends [`ReadingBatch`]es to the
//! pipeline; [`Devices`] carries [`Command`]s back to the owning driver.

pub mod modbus;
pub mod serial_line;
pub mod simulator;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, DriverKind};
use crate::model::{Command, CommandResult, ReadingBatch, Value};
use crate::status::Status;

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
    pub readings: mpsc::Sender<ReadingBatch>,
    pub status: Status,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
}

/// Routes commands to the driver task that owns each device.
#[derive(Clone, Default)]
pub struct Devices {
    senders: Arc<HashMap<String, mpsc::Sender<Command>>>,
}

impl Devices {
    /// Writes `value` to `device/point` and waits for the driver's answer.
    pub async fn write(&self, device: &str, point: &str, value: Value) -> CommandResult {
        let Some(tx) = self.senders.get(device) else {
            return Err(format!("no device named `{device}`"));
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
            .map_err(|_| format!("device `{device}` is not running"))?;
        match tokio::time::timeout(COMMAND_TIMEOUT, answer).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(format!("device `{device}` dropped the command")),
            Err(_) => Err(format!(
                "device `{device}` did not answer within {}s",
                COMMAND_TIMEOUT.as_secs()
            )),
        }
    }
}

/// Starts a task for every configured device.
pub fn spawn_all(config: &Config, ctx: &DriverContext) -> Result<Devices, DriverError> {
    let mut senders = HashMap::new();
    let mut modbus_devices = Vec::new();
    for dev in &config.devices {
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
    Ok(Devices {
        senders: Arc::new(senders),
    })
}

/// Answers a command, if anybody waits for the answer.
pub fn reply(cmd: Command, result: CommandResult) {
    if let Some(r) = cmd.reply {
        let _ = r.send(result);
    }
}
