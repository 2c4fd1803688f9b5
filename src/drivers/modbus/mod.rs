//! Modbus RTU and TCP, in layers from the wire up:
//!
//! - [`transport`]: the byte pipe (a serial port or a TCP stream), with
//!   "port lost" detection, draining and byte counters;
//! - [`session`]: one request with a timeout, and recovery after a
//!   timeout or a garbled answer;
//! - [`point`], [`decode`]: a point's registers and their values;
//! - [`plan`]: which requests read a device's points (coalescing, and the
//!   fallback when a device answers an exception);
//! - [`device`]: one slave: poll, write, online/offline and backoff;
//! - [`fieldbus`]: the task that owns one transport and its devices;
//! - [`inspect`]: what `edgebridge read` prints.

pub mod check;
pub mod decode;
pub mod device;
pub mod fieldbus;
pub mod inspect;
pub mod plan;
pub mod point;
pub mod session;
pub mod transport;

use tokio::sync::mpsc;
use tracing::Instrument as _;

use crate::config::{DeviceConfig, DriverKind};
use crate::drivers::DriverContext;
use crate::model::Command;

use device::Device;
use fieldbus::{FieldBus, FieldBusIo};
use session::{Endpoint, Session};

/// Writes waiting for one bus.
const COMMAND_QUEUE: usize = 64;

/// Starts one task per serial port (shared by every modbus-rtu device on
/// it) and one per modbus-tcp device. Returns each device's command sender.
pub fn spawn(
    devices: &[&DeviceConfig],
    ctx: &DriverContext,
) -> Vec<(String, mpsc::Sender<Command>)> {
    // Serial devices grouped by port, in config order.
    let mut groups: Vec<(Endpoint, Vec<&DeviceConfig>)> = Vec::new();
    for d in devices {
        let Some(endpoint) = endpoint_of(d) else {
            continue;
        };
        let shared = matches!(endpoint, Endpoint::Serial { .. });
        match groups
            .iter_mut()
            .find(|(e, _)| shared && same_port(e, &endpoint))
        {
            Some((e, list)) => {
                // The bus keeps the longest silence any device asks for.
                if let (Endpoint::Serial { frame_gap, .. }, Endpoint::Serial { frame_gap: g, .. }) =
                    (e, &endpoint)
                {
                    *frame_gap = (*frame_gap).max(*g);
                }
                list.push(d);
            }
            None => groups.push((endpoint, vec![d])),
        }
    }
    let mut senders = Vec::new();
    for (endpoint, list) in groups {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        for d in &list {
            senders.push((d.name.clone(), tx.clone()));
        }
        let names: Vec<&str> = list.iter().map(|d| d.name.as_str()).collect();
        tracing::info!(%endpoint, devices = ?names, "starting Modbus bus");
        let span = tracing::info_span!("modbus", %endpoint);
        let bus = FieldBus::new(
            Session::new(endpoint),
            list.iter().map(|d| Device::from_config(d)).collect(),
            FieldBusIo {
                events: ctx.events.clone(),
                commands: rx,
                shutdown: ctx.shutdown.clone(),
            },
        );
        ctx.tasks.spawn(bus.run().instrument(span));
    }
    senders
}

/// Where a Modbus device is reached; `None` for other drivers.
pub fn endpoint_of(d: &DeviceConfig) -> Option<Endpoint> {
    match d.driver {
        DriverKind::ModbusRtu => Some(Endpoint::Serial {
            path: d.port.clone().unwrap_or_default(),
            settings: d.line_settings(),
            frame_gap: d.frame_gap(),
        }),
        DriverKind::ModbusTcp => Some(Endpoint::Tcp {
            address: d.address.clone().unwrap_or_default(),
        }),
        _ => None,
    }
}

fn same_port(a: &Endpoint, b: &Endpoint) -> bool {
    match (a, b) {
        (Endpoint::Serial { path: p, .. }, Endpoint::Serial { path: q, .. }) => p == q,
        _ => false,
    }
}
