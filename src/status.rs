//! Status topics under `edgebridge/<id>/`: the gateway's own
//! online/offline, each device's, and whatever other components report.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::bus::Bus;
use crate::model::Message;

#[derive(Clone)]
pub struct Status {
    gateway_id: String,
    bus: Bus,
    /// The last reported state of each device, for the health summary.
    devices: Arc<Mutex<BTreeMap<String, bool>>>,
}

impl Status {
    pub fn new(gateway_id: &str, bus: Bus) -> Status {
        Status {
            gateway_id: gateway_id.to_string(),
            bus,
            devices: Arc::default(),
        }
    }

    /// `edgebridge/<id>/status`.
    pub fn gateway_topic(gateway_id: &str) -> String {
        format!("edgebridge/{gateway_id}/status")
    }

    pub fn gateway_id(&self) -> &str {
        &self.gateway_id
    }

    pub async fn gateway(&self, online: bool) {
        let payload = if online { "online" } else { "offline" };
        self.bus
            .publish(Message::new(Self::gateway_topic(&self.gateway_id), payload).retained())
            .await;
    }

    /// `edgebridge/<id>/devices/<device>/status`: `online`, or `offline`
    /// followed by the reason as JSON when there is one.
    pub async fn device(&self, device: &str, online: bool, reason: Option<&str>) {
        self.devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(device.to_string(), online);
        crate::ops::metrics::device_up(device, online);
        let payload = match (online, reason) {
            (true, _) => Bytes::from_static(b"online"),
            (false, None) => Bytes::from_static(b"offline"),
            (false, Some(r)) => {
                Bytes::from(serde_json::json!({"status": "offline", "reason": r}).to_string())
            }
        };
        self.publish_retained(&format!("devices/{device}/status"), payload)
            .await;
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

    /// Any retained status under `edgebridge/<id>/<subtopic>`.
    pub async fn publish_retained(&self, subtopic: &str, payload: impl Into<Bytes>) {
        let topic = format!("edgebridge/{}/{subtopic}", self.gateway_id);
        self.bus
            .publish(Message::new(topic, payload).retained())
            .await;
    }
}
