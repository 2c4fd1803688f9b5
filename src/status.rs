//! The status namespace `edgebridge/<id>/…`, owned by one task.
//!
//! Components never name a status topic: drivers report events through
//! [`crate::drivers::Events`] (online, offline with the reason, counters),
//! the rules their counters, the gateway its own online/offline; each
//! becomes an [`Event`] on one channel, and the task behind [`Status`]
//! turns them into retained messages, in the order they were reported:
//!
//! | topic | payload |
//! |---|---|
//! | `edgebridge/<id>/status` | `online` / `offline` |
//! | `edgebridge/<id>/devices/<device>/status` | `online`, `offline`, or `{"status":"offline","reason":…}` |
//! | `edgebridge/<id>/devices/<device>/stats` | the driver's counters as JSON, plus `"online"` |
//! | `edgebridge/<id>/rules` | the rules' counters |
//! | `edgebridge/<id>/bridges/<name>/status` | the bridge's status as JSON, when it changes ([`Status::follow_bridge`]) |
//!
//! (`edgebridge/<id>/health` is the health probe's round trip, see
//! [`crate::ops::health`].)

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::bus::Bus;
use crate::model::Message;

/// Events waiting for the status task. Reporters wait when it is full;
/// the task only formats and publishes, so it never is for long.
const EVENT_QUEUE: usize = 1024;

/// What a component reports about itself.
#[derive(Debug)]
pub enum Event {
    /// The gateway itself is up (`true`) or going down.
    Gateway { online: bool },
    /// A device came online, or went offline (with the reason, if known).
    Device {
        device: String,
        online: bool,
        reason: Option<String>,
    },
    /// A device's counters (a JSON object); `online` (the device's state
    /// when they were reported) is added.
    DeviceStats {
        device: String,
        counters: serde_json::Map<String, serde_json::Value>,
    },
    /// The rules' counters (JSON).
    Rules(String),
    /// A bridge's status (JSON).
    Bridge { name: String, json: String },
    /// Answered once everything reported before it is published.
    Sync(oneshot::Sender<()>),
}

/// The handle every component reports through; clones share the task.
#[derive(Clone)]
pub struct Status {
    gateway_id: Arc<str>,
    events: mpsc::Sender<Event>,
    /// The last reported state of each device, for the health summary
    /// and the `online` field of the counters.
    devices: Arc<Mutex<BTreeMap<String, bool>>>,
}

impl Status {
    /// Starts the status task, publishing on `bus`. It ends when the last
    /// handle is dropped, after publishing what was reported.
    pub fn start(gateway_id: &str, bus: Bus) -> Status {
        let (events, rx) = mpsc::channel(EVENT_QUEUE);
        let status = Status {
            gateway_id: Arc::from(gateway_id),
            events,
            devices: Arc::default(),
        };
        tokio::spawn(run(rx, bus, status.gateway_id.clone()));
        status
    }

    /// `edgebridge/<id>/status`.
    pub fn gateway_topic(gateway_id: &str) -> String {
        format!("edgebridge/{gateway_id}/status")
    }

    pub fn gateway_id(&self) -> &str {
        &self.gateway_id
    }

    /// Reports an event; it is published in the order reported.
    pub async fn report(&self, mut event: Event) {
        // The device states are kept here, not in the task, so that the
        // health summary and the counters see a state as soon as it is
        // reported.
        match &mut event {
            Event::Device { device, online, .. } => {
                self.devices
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(device.clone(), *online);
                crate::ops::metrics::device_up(device, *online);
            }
            Event::DeviceStats { device, counters } => {
                let online = self
                    .devices
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(device.as_str())
                    .copied()
                    .unwrap_or(false);
                counters.insert("online".into(), online.into());
            }
            _ => {}
        }
        // Only fails once the task is gone (the runtime is shutting down).
        let _ = self.events.send(event).await;
    }

    /// The gateway's own online/offline.
    pub async fn gateway(&self, online: bool) {
        self.report(Event::Gateway { online }).await;
    }

    /// Waits until everything reported so far is on the bus.
    pub async fn sync(&self) {
        let (tx, rx) = oneshot::channel();
        self.report(Event::Sync(tx)).await;
        let _ = rx.await;
    }

    /// Reports each change of a bridge's status (as JSON) until the bridge
    /// is gone, its last state included. The bridge only updates `status`.
    pub fn follow_bridge<T>(&self, name: &str, mut status: watch::Receiver<T>) -> JoinHandle<()>
    where
        T: Serialize + Send + Sync + 'static,
    {
        let (this, name) = (self.clone(), name.to_string());
        tokio::spawn(async move {
            let mut last = String::new();
            loop {
                let json = serde_json::to_string(&*status.borrow_and_update());
                match json {
                    Ok(json) if json != last => {
                        last = json.clone();
                        let name = name.clone();
                        this.report(Event::Bridge { name, json }).await;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(bridge = %name, error = %e, "cannot encode bridge status")
                    }
                }
                // Err once the bridge has stopped and its last state was
                // seen (an unseen last state comes first).
                if status.changed().await.is_err() {
                    return;
                }
            }
        })
    }

    /// Each device's last reported state (`true` = online), by name.
    pub fn devices(&self) -> BTreeMap<String, bool> {
        // A poisoned lock only means a panic elsewhere; the map is fine.
        self.devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Forgets a device that was removed from the config.
    pub fn forget_device(&self, device: &str) {
        self.devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(device);
    }
}

/// The status task: every event becomes its retained message.
async fn run(mut events: mpsc::Receiver<Event>, bus: Bus, gateway_id: Arc<str>) {
    while let Some(event) = events.recv().await {
        let (subtopic, payload) = match event {
            Event::Sync(done) => {
                let _ = done.send(());
                continue;
            }
            Event::Gateway { online } => {
                let topic = Status::gateway_topic(&gateway_id);
                let payload = if online { "online" } else { "offline" };
                bus.publish(Message::new(topic, payload).retained()).await;
                continue;
            }
            Event::Device {
                device,
                online,
                reason,
            } => (
                format!("devices/{device}/status"),
                device_state(online, reason.as_deref()),
            ),
            Event::DeviceStats { device, counters } => {
                let json = serde_json::Value::Object(counters).to_string();
                (format!("devices/{device}/stats"), Bytes::from(json))
            }
            Event::Rules(json) => ("rules".to_string(), Bytes::from(json)),
            Event::Bridge { name, json } => (format!("bridges/{name}/status"), Bytes::from(json)),
        };
        let topic = format!("edgebridge/{gateway_id}/{subtopic}");
        bus.publish(Message::new(topic, payload).retained()).await;
    }
}

/// A device's status payload: `online`, or `offline` with the reason as
/// JSON when there is one.
fn device_state(online: bool, reason: Option<&str>) -> Bytes {
    match (online, reason) {
        (true, _) => Bytes::from_static(b"online"),
        (false, None) => Bytes::from_static(b"offline"),
        (false, Some(r)) => {
            Bytes::from(serde_json::json!({"status": "offline", "reason": r}).to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offline_device_says_why_when_it_knows() {
        assert_eq!(device_state(true, Some("ignored")), "online");
        assert_eq!(device_state(false, None), "offline");
        let with_reason: serde_json::Value =
            serde_json::from_slice(&device_state(false, Some("timeout"))).unwrap();
        assert_eq!(
            with_reason,
            serde_json::json!({"status": "offline", "reason": "timeout"})
        );
    }
}
