//! Driver tasks as units that start and stop together: every device on
//! its own, except devices sharing a serial port (one RS-485 bus, one
//! task). A config reload restarts only the units whose devices changed;
//! the others keep polling untouched.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{spawn_devices, Devices, DriverContext, DriverError};
use crate::config::{DeviceConfig, DriverKind};
use crate::ops::reload::Changes;

/// Which unit a device belongs to: its shared port, or itself.
pub fn unit_key(dev: &DeviceConfig) -> String {
    match (dev.driver, &dev.port) {
        (DriverKind::ModbusRtu, Some(port)) => format!("port {port}"),
        _ => format!("device {}", dev.name),
    }
}

/// Devices grouped by unit, each group in config order.
fn group(devices: &[DeviceConfig]) -> BTreeMap<String, Vec<DeviceConfig>> {
    let mut units: BTreeMap<String, Vec<DeviceConfig>> = BTreeMap::new();
    for d in devices {
        units.entry(unit_key(d)).or_default().push(d.clone());
    }
    units
}

struct Unit {
    devices: Vec<DeviceConfig>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Unit {
    fn names(&self) -> impl Iterator<Item = &str> {
        self.devices.iter().map(|d| d.name.as_str())
    }

    /// Cancels the unit and waits for its tasks; `false` if they did not
    /// end within `within`.
    async fn stop(&self, within: Duration) -> bool {
        self.shutdown.cancel();
        tokio::time::timeout(within, self.tasks.wait())
            .await
            .is_ok()
    }
}

/// Every running driver unit, and the command routes to them.
pub struct DriverUnits {
    /// Where drivers report, and the gateway's shutdown token, for new units.
    ctx: DriverContext,
    units: BTreeMap<String, Unit>,
    devices: Devices,
}

/// How long a stopping unit may take (a Modbus request in flight ends
/// within its timeout).
const UNIT_STOP: Duration = Duration::from_secs(3);

impl DriverUnits {
    /// Starts every device. `ctx.shutdown` stops them all; `ctx.tasks` is
    /// not used (each unit tracks its own tasks).
    pub fn start(devices: &[DeviceConfig], ctx: DriverContext) -> Result<DriverUnits, DriverError> {
        let mut this = DriverUnits {
            ctx,
            units: BTreeMap::new(),
            devices: Devices::default(),
        };
        for (key, list) in group(devices) {
            match this.spawn(list) {
                Ok(unit) => {
                    this.units.insert(key, unit);
                }
                Err(e) => {
                    for u in this.units.values() {
                        u.shutdown.cancel();
                    }
                    return Err(e);
                }
            }
        }
        Ok(this)
    }

    fn spawn(&self, devices: Vec<DeviceConfig>) -> Result<Unit, DriverError> {
        let shutdown = self.ctx.shutdown.child_token();
        let tasks = TaskTracker::new();
        let ctx = DriverContext {
            events: self.ctx.events.clone(),
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
        };
        let senders = spawn_devices(&devices, &ctx)?;
        // Closed: `wait` returns once the unit's tasks have all ended.
        tasks.close();
        for (name, tx) in senders {
            self.devices.set_route(&name, Some(tx));
        }
        Ok(Unit {
            devices,
            shutdown,
            tasks,
        })
    }

    /// Routes commands to the running devices.
    pub fn devices(&self) -> &Devices {
        &self.devices
    }

    /// Checks that every unit of `new` could start (no driver missing),
    /// without touching anything.
    pub fn check(new: &[DeviceConfig]) -> Result<(), DriverError> {
        super::check_devices(new)
    }

    /// Moves to `new`: units whose devices are all unchanged keep running;
    /// changed units restart; removed ones stop; new ones start.
    pub async fn apply(&mut self, new: &[DeviceConfig]) -> Result<Changes, DriverError> {
        Self::check(new)?;
        let mut changes = Changes::default();
        let mut wanted = group(new);
        let old_keys: Vec<String> = self.units.keys().cloned().collect();
        for key in old_keys {
            if wanted.get(&key) == self.units.get(&key).map(|u| &u.devices) {
                if let (Some(u), Some(_)) = (self.units.get(&key), wanted.remove(&key)) {
                    changes.unchanged.extend(u.names().map(String::from));
                }
                continue;
            }
            let Some(unit) = self.units.remove(&key) else {
                continue;
            };
            if !unit.stop(UNIT_STOP).await {
                tracing::warn!(unit = %key, "driver unit did not stop within {UNIT_STOP:?}");
            }
            for name in unit.names() {
                // Still configured (perhaps now on another port): restarted.
                if new.iter().any(|d| d.name == name) {
                    changes.restarted.push(name.to_string());
                } else {
                    // Gone from the config (not just moved to another unit).
                    self.devices.set_route(name, None);
                    self.ctx
                        .events
                        .offline(name, Some("removed from the config"))
                        .await;
                    self.ctx.events.forget(name);
                    changes.stopped.push(name.to_string());
                }
            }
        }
        for (key, list) in wanted {
            for d in &list {
                let known = changes.restarted.contains(&d.name);
                if !known {
                    changes.started.push(d.name.clone());
                }
            }
            let unit = self.spawn(list)?;
            self.units.insert(key, unit);
        }
        Ok(changes)
    }

    /// Stops every unit (the gateway's shutdown token is already
    /// cancelled, or is cancelled here); `false` if some did not end
    /// within `within`.
    pub async fn stop(self, within: Duration) -> bool {
        self.ctx.shutdown.cancel();
        let all = async {
            for u in self.units.values() {
                u.tasks.wait().await;
            }
        };
        tokio::time::timeout(within, all).await.is_ok()
    }
}
